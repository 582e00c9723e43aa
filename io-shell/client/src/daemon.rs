//! The daemon protocol: a running [`Session`] served as JSON lines, on
//! stdin/stdout and on a Unix socket, so scripts and bots pay the state
//! file's key derivation once and get events as they happen.
//!
//! Each line a client writes is one request:
//! `{"id": 7, "method": "send", "params": {"group": "team", "text": "hi"}}`
//! (`id` is optional and echoed; any JSON value). Each answer is one line:
//! `{"type": "result", "id": 7, "result": {...}}` with the command's
//! outcome as `qpq --json` prints it, or `{"type": "error", "id": 7,
//! "message": "..."}`. Events ([`crate::json::event`]) arrive on every
//! connection as they happen, interleaved with answers, from the moment it
//! connects. Methods (params in brackets):
//!
//! | method | params | result type |
//! |---|---|---|
//! | `whoami` | | `identity` |
//! | `register` | `count` (10) | `registered` |
//! | `group_create` | `name`, `pq` (false) | `group_created` |
//! | `group_add` | `group`, `member` (64 hex) | `member_added` |
//! | `group_remove` | `group`, `member` | `member_removed` |
//! | `group_leave` | `group` | `left` |
//! | `group_list` | | `groups` (`groups`: a `group` object each) |
//! | `update` | `group` (all) | `updated` |
//! | `send` | `group`, `text`, `reply_to` (none; 32 hex) | `sent` (with the message's `id`) |
//! | `edit` | `group`, `target` (32 hex), `text` | `sent` |
//! | `delete` | `group`, `target` | `sent` |
//! | `send_file` | `group`, `name`, `media_type` (`application/octet-stream`), `data_base64` | `sent` |
//! | `contact_add` | `name`, `key` | `contact_added` |
//! | `contact_remove` | `name` | `contact_removed` |
//! | `contact_list` | | `contacts` (`contacts`: a `contact` object each) |
//! | `group_verify` | `group` | `safety_number` (`epoch`, `digits`) |
//! | `direct_links` | | `direct_links` (`address`: where this session answers members directly, or null; `peers`: the members reached directly now, 64 hex each) |
//! | `shutdown` | | `shutdown`, then the daemon closes the session |
//!
//! Limits: a request line is at most [`DAEMON_LINE_BYTES_MAX`] bytes (a
//! longer one is answered with an error and the connection closed); at most
//! [`DAEMON_CONNECTIONS_MAX`] socket connections at once; a connection
//! that does not take its answers and events for [`DAEMON_WRITE_TIMEOUT`]
//! is closed (so it cannot hold up the session).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use quicproquo_core::client::{Attachment, Command, Content, ContentId};
use quicproquo_core::types::{IdentityKey, hex};
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, watch};

use crate::session::{Session, SessionError};

/// Longest request line: an attachment of `ATTACHMENT_BYTES_MAX` (1 MB) in
/// base64 (4 bytes for 3), or a message of `TEXT_BYTES_MAX` escaped as
/// JSON (up to 6 bytes a byte), with room for the rest.
pub const DAEMON_LINE_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Socket connections served at once; one more waits for a free slot.
pub const DAEMON_CONNECTIONS_MAX: usize = 64;
/// How long a connection may leave its answers and events unread before
/// it is closed.
pub const DAEMON_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `session` on one stream of JSON lines until the reader ends, the
/// connection fails, or a `shutdown` request (which sets `stop`).
pub async fn serve_stream<R, W>(
    session: &Session,
    reader: R,
    mut writer: W,
    stop: &watch::Sender<bool>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut events = match session.subscribe().await {
        Ok(rx) => rx,
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    let mut reader = BufReader::new(reader);
    let mut stopped = stop.subscribe();
    let mut line = Vec::new();
    // The request being answered. Requests are answered one at a time, in
    // order, but events keep flowing to the writer meanwhile: the session
    // waits for room in this connection's event channel, so a connection
    // that stopped draining events while a command ran would hold up the
    // very command it waits for (seen with thousands of pipelined sends).
    let mut pending: Option<std::pin::Pin<Box<dyn Future<Output = Value> + Send + '_>>> = None;
    loop {
        tokio::select! {
            read = read_line(&mut reader, &mut line), if pending.is_none() => {
                match read? {
                    Line::End => return Ok(()),
                    Line::TooLong => {
                        let e = json!({"type": "error", "id": null, "message": format!("request line longer than {DAEMON_LINE_BYTES_MAX} bytes")});
                        write(&mut writer, &e).await?;
                        return Ok(());
                    }
                    Line::Text => {
                        let request = std::mem::take(&mut line);
                        pending = Some(Box::pin(async move { answer(session, &request, stop).await }));
                    }
                }
            }
            answer = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                write(&mut writer, &answer).await?;
            }
            event = events.recv() => match event {
                Some(e) => write(&mut writer, &crate::json::event(&e)).await?,
                None => return Ok(()),
            },
            _ = stopped.changed() => return Ok(()),
        }
    }
}

/// Serves `session` on a Unix socket at `path` (mode 0600, replacing a
/// stale one) until `stop` is set; the socket file is removed at the end.
#[cfg(unix)]
pub async fn serve_socket(
    session: Arc<Session>,
    path: PathBuf,
    stop: watch::Sender<bool>,
) -> std::io::Result<()> {
    let listener = bind_private(&path)?;
    let slots = Arc::new(Semaphore::new(DAEMON_CONNECTIONS_MAX));
    let mut stopped = stop.subscribe();
    let stop = Arc::new(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(slot) = slots.clone().acquire_owned().await else { break };
                let (session, stop) = (session.clone(), stop.clone());
                tokio::spawn(async move {
                    let (r, w) = stream.into_split();
                    let _ = serve_stream(&session, r, w, &stop).await;
                    drop(slot);
                });
            }
            _ = stopped.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// The socket path a session on `state` serves: `<state>.sock`.
pub fn socket_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".sock");
    PathBuf::from(name)
}

/// Sends one request to the daemon at `path` and returns its answer (the
/// `result` object), skipping the events that arrive meanwhile.
#[cfg(unix)]
pub async fn request(path: &Path, method: &str, params: Value) -> Result<Value, String> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (r, mut w) = stream.into_split();
    let id = 1;
    let req = json!({"id": id, "method": method, "params": params});
    write(&mut w, &req).await.map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line).await {
            Ok(Line::Text) => {}
            Ok(_) => return Err("the daemon closed the connection".into()),
            Err(e) => return Err(e.to_string()),
        }
        let parsed = serde_json::from_slice::<Value>(&line);
        line.clear();
        let Ok(v) = parsed else {
            continue;
        };
        if v["id"] != id {
            continue;
        }
        return match v["type"].as_str() {
            Some("result") => Ok(v["result"].clone()),
            _ => Err(v["message"]
                .as_str()
                .unwrap_or("the daemon refused")
                .to_owned()),
        };
    }
}

/// Answers one request line.
async fn answer(session: &Session, line: &[u8], stop: &watch::Sender<bool>) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error(&Value::Null, "a request is a JSON object"),
        Err(e) => return error(&Value::Null, &format!("not JSON: {e}")),
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let method = request["method"].as_str().unwrap_or_default();
    let params = &request["params"];
    match run(session, method, params, stop).await {
        Ok(result) => json!({"type": "result", "id": id, "result": result}),
        Err(message) => error(&id, &message),
    }
}

async fn run(
    session: &Session,
    method: &str,
    params: &Value,
    stop: &watch::Sender<bool>,
) -> Result<Value, String> {
    let text = |key: &str| -> Result<String, String> {
        params[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`{key}` (a string) is missing"))
    };
    let member = || -> Result<IdentityKey, String> { parse_key(&text("member")?) };
    let command = match method {
        "whoami" => {
            return Ok(
                json!({"type": "identity", "identity_key": hex(session.identity_key().as_bytes())}),
            );
        }
        "group_list" => {
            let groups = session.groups().await.map_err(|e| e.to_string())?;
            let groups: Vec<Value> = groups.iter().map(crate::json::group).collect();
            return Ok(json!({"type": "groups", "groups": groups}));
        }
        "direct_links" => {
            let peers = session.direct_links().await.map_err(|e| e.to_string())?;
            let peers: Vec<String> = peers.iter().map(|k| hex(k.as_bytes())).collect();
            let address = session.direct_addr().map(|a| a.to_string());
            return Ok(json!({"type": "direct_links", "address": address, "peers": peers}));
        }
        "contact_list" => {
            let contacts = session.contacts().await.map_err(|e| e.to_string())?;
            let contacts: Vec<Value> = contacts
                .iter()
                .map(|(name, key)| json!({"type": "contact", "name": name, "key": hex(key.as_bytes())}))
                .collect();
            return Ok(json!({"type": "contacts", "contacts": contacts}));
        }
        "group_verify" => {
            let group = text("group")?;
            let number = session
                .safety_number(&group)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no group named `{group}`"))?;
            return Ok(
                json!({"type": "safety_number", "group": group, "epoch": number.epoch, "digits": number.digits}),
            );
        }
        "shutdown" => {
            let _ = stop.send(true);
            return Ok(json!({"type": "shutdown"}));
        }
        "register" => Command::Register {
            count: params["count"]
                .as_u64()
                .map_or(10, |c| u32::try_from(c).unwrap_or(u32::MAX)),
        },
        "group_create" => Command::CreateGroup {
            name: text("name")?,
            pq: params["pq"].as_bool().unwrap_or(false),
        },
        "group_add" => Command::AddMember {
            group: text("group")?,
            member: member()?,
        },
        "group_remove" => Command::RemoveMember {
            group: text("group")?,
            member: member()?,
        },
        "group_leave" => Command::Leave {
            group: text("group")?,
        },
        "update" => Command::Update {
            group: params["group"].as_str().map(str::to_owned),
        },
        "send" => match params["reply_to"].as_str() {
            None => Command::Send {
                group: text("group")?,
                text: text("text")?,
            },
            Some(reply_to) => Command::SendContent {
                group: text("group")?,
                content: Content::Text {
                    text: text("text")?,
                    reply_to: Some(parse_id(reply_to)?),
                },
            },
        },
        "edit" => Command::SendContent {
            group: text("group")?,
            content: Content::Edit {
                target: parse_id(&text("target")?)?,
                text: text("text")?,
            },
        },
        "delete" => Command::SendContent {
            group: text("group")?,
            content: Content::Delete {
                target: parse_id(&text("target")?)?,
            },
        },
        "send_file" => Command::SendContent {
            group: text("group")?,
            content: Content::Attachment {
                attachment: Attachment {
                    media_type: params["media_type"]
                        .as_str()
                        .unwrap_or(DEFAULT_MEDIA_TYPE)
                        .to_owned(),
                    name: text("name")?,
                    data: BASE64
                        .decode(text("data_base64")?)
                        .map_err(|e| format!("`data_base64` is not base64: {e}"))?,
                },
                reply_to: None,
            },
        },
        "contact_add" => Command::AddContact {
            name: text("name")?,
            key: parse_key(&text("key")?)?,
        },
        "contact_remove" => Command::RemoveContact {
            name: text("name")?,
        },
        other => return Err(format!("unknown method `{other}`")),
    };
    match session.command(command).await {
        Ok(outcome) => Ok(crate::json::outcome(&outcome)),
        Err(SessionError::Command(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The daemon request that runs `command`: its method and params (the
/// inverse of what the daemon parses); `None` for a command the daemon
/// does not take (receiving: a session receives by itself).
pub fn request_for(command: &Command) -> Option<(&'static str, Value)> {
    Some(match command {
        Command::Register { count } => ("register", json!({"count": count})),
        Command::CreateGroup { name, pq } => ("group_create", json!({"name": name, "pq": pq})),
        Command::AddMember { group, member } => (
            "group_add",
            json!({"group": group, "member": hex(member.as_bytes())}),
        ),
        Command::RemoveMember { group, member } => (
            "group_remove",
            json!({"group": group, "member": hex(member.as_bytes())}),
        ),
        Command::Leave { group } => ("group_leave", json!({"group": group})),
        Command::Update { group } => ("update", json!({"group": group})),
        Command::Send { group, text } => ("send", json!({"group": group, "text": text})),
        Command::SendContent { group, content } => match content {
            Content::Text { text, reply_to } => (
                "send",
                json!({"group": group, "text": text, "reply_to": reply_to.map(|r| r.to_hex())}),
            ),
            Content::Edit { target, text } => (
                "edit",
                json!({"group": group, "target": target.to_hex(), "text": text}),
            ),
            Content::Delete { target } => {
                ("delete", json!({"group": group, "target": target.to_hex()}))
            }
            Content::Attachment { attachment, .. } => (
                "send_file",
                json!({"group": group, "name": attachment.name, "media_type": attachment.media_type, "data_base64": BASE64.encode(&attachment.data)}),
            ),
            Content::Unsupported { .. } => return None,
        },
        Command::AddContact { name, key } => (
            "contact_add",
            json!({"name": name, "key": hex(key.as_bytes())}),
        ),
        Command::RemoveContact { name } => ("contact_remove", json!({"name": name})),
        _ => return None,
    })
}

fn error(id: &Value, message: &str) -> Value {
    json!({"type": "error", "id": id, "message": message})
}

/// The media type of a file sent without one.
pub const DEFAULT_MEDIA_TYPE: &str = "application/octet-stream";

/// Parses a message id given as 32 hex digits.
pub fn parse_id(s: &str) -> Result<ContentId, String> {
    ContentId::from_hex(s.trim())
        .ok_or_else(|| "a message id is 32 hex digits (as `qpq --json recv` shows it)".to_owned())
}

/// Parses an identity key given as 64 hex digits.
pub fn parse_key(s: &str) -> Result<IdentityKey, String> {
    IdentityKey::from_hex(s.trim())
        .ok_or_else(|| "an identity key is 64 hex digits (as `qpq whoami` prints it)".to_owned())
}

enum Line {
    Text,
    End,
    TooLong,
}

/// Reads one line (without its newline) onto the end of `line`, which
/// must start empty; at most [`DAEMON_LINE_BYTES_MAX`] bytes. The caller
/// clears `line` once it has used it.
///
/// Cancel-safe, as `select!` needs: bytes taken from `reader` are in
/// `line` before the next await, so when the future is dropped half-way
/// through a line (an event came first) the next call goes on from there.
/// Clearing `line` here instead lost the start of a request whenever an
/// event arrived while the rest of its line was still on the way.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<Line> {
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                Line::End
            } else {
                Line::Text
            });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > DAEMON_LINE_BYTES_MAX + 1 {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Text);
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, v: &Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    match tokio::time::timeout(DAEMON_WRITE_TIMEOUT, async {
        w.write_all(&bytes).await?;
        w.flush().await
    })
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client does not read",
        )),
    }
}

/// Binds a Unix socket at `path` that only this user can use: made in a
/// private directory (0700), set to 0600, then moved into place, so there
/// is no moment another user could connect. A socket left at `path` by a
/// session that ended without removing it is replaced (the caller holds
/// the state file's lock, so no live session owns it).
#[cfg(unix)]
fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.with_extension(format!("sock-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let inner = dir.join("s");
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&dir);
    bound
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event wins the `select!` while a request line is half-way in:
    /// the next read goes on with the same line, losing nothing.
    #[tokio::test]
    async fn a_line_read_half_way_survives_cancellation() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = BufReader::new(rx);
        let mut line = Vec::new();
        tx.write_all(b"{\"id\":1,").await.unwrap();
        tokio::select! {
            biased;
            _ = read_line(&mut reader, &mut line) => panic!("no newline yet"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        tx.write_all(b"\"method\":\"whoami\"}\r\nnext\n")
            .await
            .unwrap();
        assert!(matches!(
            read_line(&mut reader, &mut line).await,
            Ok(Line::Text)
        ));
        assert_eq!(line, b"{\"id\":1,\"method\":\"whoami\"}");
        line.clear();
        assert!(matches!(
            read_line(&mut reader, &mut line).await,
            Ok(Line::Text)
        ));
        assert_eq!(line, b"next");
        line.clear();
        drop(tx);
        assert!(matches!(
            read_line(&mut reader, &mut line).await,
            Ok(Line::End)
        ));
    }
}
