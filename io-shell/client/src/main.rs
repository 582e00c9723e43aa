//! `qpq`: the quicproquo command-line client. Each command loads the
//! encrypted state file, runs one command of the client machine against the
//! server, persisting whenever the machine asks, and prints the result —
//! human-readable by default, one JSON object per line with `--json`.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::{CommandFactory, Parser, Subcommand};
use quicproquo_client::display::{Names, escape_control, short_key};
use quicproquo_client::state_file::{self, Existing, KdfParams, StateKey, StateLock};
use quicproquo_client::state_ops::{self, Held, Sealed, StateOpError};
use quicproquo_client::{
    Client, ClientError, Clock, DirectArgs, DriveError, ServerTrust, Session, SessionConfig,
    SessionError, daemon,
};
use quicproquo_core::ErrorKind;
use quicproquo_core::client::{
    Attachment, ClientMachine, Command, CommandError, Content, ContentId, Event, Outcome,
    TEXT_BYTES_MAX,
};
use quicproquo_core::limits::ATTACHMENT_BYTES_MAX;
use quicproquo_core::types::{IdentityKey, hex};
use rand_core::{OsRng, RngCore};
use serde_json::json;
use tokio::sync::Notify;
use zeroize::Zeroizing;

/// `println!` through an [`Output`].
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        $out.line(false, format_args!($($arg)*))
    };
}

/// `eprintln!` through an [`Output`].
macro_rules! note {
    ($out:expr, $($arg:tt)*) => {
        $out.line(true, format_args!($($arg)*))
    };
}

/// What `qpq --version` prints: the crate version and the commit it was
/// built from (`unknown` outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("QPQ_GIT_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "qpq",
    version = VERSION,
    about = "quicproquo: end-to-end encrypted group messaging (MLS) over QUIC",
    long_about = "quicproquo: end-to-end encrypted group messaging (MLS, RFC 9420) over QUIC.\n\n\
Start with `qpq init`, then `qpq register`. Share the key `qpq whoami` prints; \
someone who has it can add you to a group with `qpq group add`.\n\n\
The server is trusted by the certificate fingerprint qpq-server prints at start \
(--server-fingerprint) or by a CA file (--server-ca); verification is never turned off."
)]
struct Cli {
    /// Server address (host:port).
    #[arg(
        long,
        env = "QPQ_SERVER",
        default_value = "localhost:7443",
        global = true
    )]
    server: String,
    /// SHA-256 fingerprint (64 hex digits) of the server's certificate, as qpq-server prints it.
    #[arg(
        long,
        env = "QPQ_SERVER_FINGERPRINT",
        global = true,
        value_name = "HEX"
    )]
    server_fingerprint: Option<String>,
    /// PEM file of the CA that issued the server's certificate.
    #[arg(long, env = "QPQ_SERVER_CA", global = true, value_name = "PATH")]
    server_ca: Option<PathBuf>,
    /// Encrypted state file (identity, groups, keys).
    #[arg(
        long,
        env = "QPQ_STATE",
        default_value = "qpq-state.bin",
        global = true
    )]
    state: PathBuf,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a new identity and state file (password from QPQ_PASSWORD or a prompt).
    Init,
    /// Print this identity's key (64 hex digits) for others to add you.
    Whoami {
        /// Also print it as a QR code.
        #[arg(long)]
        qr: bool,
    },
    /// Upload KeyPackages so others can add you to groups — for plain and
    /// for post-quantum groups — and your signed hybrid public key (which
    /// pq groups of earlier versions seal to), made on first use.
    Register {
        /// Single-use KeyPackages to keep on the server for each kind of
        /// group (a last-resort one is added to each).
        #[arg(long, default_value_t = 10)]
        count: u32,
    },
    /// Create, extend, list and verify groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Name people's identity keys, and list and forget the names.
    ///
    /// Messages, members and group changes are then shown by these names
    /// instead of by the first 16 hex digits of a key, and `group add` and
    /// `group remove` take a name. The names are yours alone: they are kept
    /// in your state file and never sent.
    #[command(subcommand)]
    Contact(ContactCmd),
    /// Rotate your keys (a self-update Commit) in one group or all.
    ///
    /// Without a group name it also rotates your hybrid (post-quantum) key
    /// and uploads the new public key; the last 4 keys are kept so messages
    /// already sealed to an older one still open.
    Update {
        /// The group; all groups (and the hybrid key) if omitted.
        name: Option<String>,
    },
    /// Send a message (or, with --file, a file) to every other member of a
    /// group. It prints the message's id, which replies, edits and
    /// deletions refer to (`qpq --json recv` shows the ids of received
    /// messages).
    Send {
        /// The group's name.
        name: String,
        /// The message, or `-` to read it from stdin (all of it, less one
        /// final newline). Not with --file.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Answer this message (its id, 32 hex digits).
        #[arg(long, value_name = "ID")]
        reply_to: Option<String>,
        /// Send this file (at most 1 MB) instead of a text.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// The file's media type.
        #[arg(long = "type", value_name = "TYPE", requires = "file", default_value = daemon::DEFAULT_MEDIA_TYPE)]
        media_type: String,
    },
    /// Replace the text of a message you sent earlier; the others see the
    /// new text in its place.
    Edit {
        /// The group's name.
        name: String,
        /// The message's id (32 hex digits, as `qpq send` printed it).
        id: String,
        /// Its new text.
        text: String,
    },
    /// Withdraw a message you sent earlier; the others see it deleted.
    Delete {
        /// The group's name.
        name: String,
        /// The message's id (32 hex digits, as `qpq send` printed it).
        id: String,
    },
    /// Receive and show pending messages.
    ///
    /// With --stream it keeps one session open (one connection, the state
    /// file opened once) and shows messages as they arrive until
    /// interrupted; meanwhile other qpq commands on the same state file are
    /// carried out by it, through its socket (<state>.sock).
    Recv {
        /// Keep receiving until interrupted.
        #[arg(long)]
        stream: bool,
        /// If nothing is pending, wait this long for something (ms).
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
        /// Save the files in received messages here (as `<id>-<name>`);
        /// without it they are only announced.
        #[arg(long, value_name = "DIR")]
        save_dir: Option<PathBuf>,
        #[command(flatten)]
        direct: DirectArgs,
    },
    /// Keep a session open and serve it as JSON lines, for scripts and bots.
    ///
    /// Requests come one per line on stdin and on a Unix socket
    /// (<state>.sock by default, mode 0600), e.g.
    /// {"id": 1, "method": "send", "params": {"group": "team", "text": "hi"}};
    /// answers ({"type": "result", "id": 1, "result": {...}} or
    /// {"type": "error", ...}) and events (the objects `qpq --json` prints)
    /// come back as lines. Methods: whoami, register, group_create,
    /// group_add, group_remove, group_leave, group_list, group_verify,
    /// update, send, edit, delete, send_file, contact_add, contact_remove,
    /// contact_list, direct_links, shutdown.
    /// Other qpq commands on the same state file are carried out by the
    /// daemon through its socket. Stops on `shutdown`, SIGINT or
    /// SIGTERM (and at the end of stdin with --no-socket).
    Daemon {
        /// Serve on this socket instead of <state>.sock.
        #[arg(long, env = "QPQ_SOCKET", value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Serve only stdin/stdout, no socket.
        #[arg(long, conflicts_with = "socket")]
        no_socket: bool,
        #[command(flatten)]
        direct: DirectArgs,
    },
    /// Write a copy of the state file to DEST, to move it to another
    /// machine or keep it safe.
    ///
    /// The copy is the state file as it is, still sealed with its password,
    /// which is asked for (or taken from QPQ_PASSWORD) and checked first: a
    /// wrong one writes nothing. It is everything `qpq import` needs; the
    /// server's address and fingerprint are not in it. DEST is written
    /// atomically, readable by you only. Refused while a session (`recv
    /// --stream`, `daemon`) has the state file open.
    Export {
        /// The file to write.
        #[arg(value_name = "DEST")]
        dest: PathBuf,
        /// Replace DEST if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Install a state file written by `qpq export` at --state.
    ///
    /// SRC must open with its password (QPQ_PASSWORD or a prompt), which it
    /// keeps. It is checked first — a wrong password, a file that is not a
    /// state file, a truncated or modified one, or one of a newer qpq
    /// installs nothing — and installed atomically. Refused if a state file
    /// is at --state already, unless --force: then that one is kept as
    /// <state>.bak (refused if <state>.bak exists). Refused while a session
    /// has the state file open.
    ///
    /// Use one copy of an identity at a time: what one copy fetches is gone
    /// from the server for any other, so another copy, or an older export,
    /// misses those messages and the group changes among them.
    Import {
        /// The exported state file.
        #[arg(value_name = "SRC")]
        src: PathBuf,
        /// Replace the state file at --state, keeping it as <state>.bak.
        #[arg(long)]
        force: bool,
    },
    /// Change the state file's password.
    ///
    /// The current password comes from QPQ_PASSWORD or a prompt, the new
    /// one from QPQ_NEW_PASSWORD or a prompt asked twice. The state is
    /// sealed again with a fresh salt and nonce and written atomically;
    /// then only the new password opens it (copies made by `qpq export`
    /// keep the password they had). Refused while a session has the state
    /// file open.
    Passwd,
    /// Tool: print a shell completion script for qpq to stdout.
    ///
    /// For example `qpq completions bash >
    /// ~/.local/share/bash-completion/completions/qpq`, or `qpq completions
    /// zsh > ~/.zfunc/_qpq` with ~/.zfunc in $fpath.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Tool: print the qpq(1) manual page, or write it and one page per
    /// subcommand to a directory.
    Man {
        /// Write qpq.1 and a page per subcommand (qpq-send.1,
        /// qpq-group-add.1, ...) here, replacing pages of the same name,
        /// instead of printing qpq(1). Created if missing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCmd {
    /// Create a group with you as its only member.
    Create {
        /// The group's name (known to every member).
        name: String,
        /// Post-quantum group: an MLS group of the hybrid suite 0x004F
        /// (ML-KEM-768 + X25519), against harvest-now-decrypt-later.
        /// Members join with KeyPackages of that suite, which `qpq
        /// register` uploads; adding someone whose client has none is
        /// refused. Messages cost what they cost in a plain group; Commits
        /// and Welcomes are larger.
        #[arg(long)]
        pq: bool,
    },
    /// Add someone (by identity key or contact name) to a group.
    Add {
        /// The group's name.
        name: String,
        /// Their identity key, 64 hex digits (`qpq whoami`), or their
        /// contact name.
        member_key: String,
    },
    /// Remove someone from a group.
    Remove {
        /// The group's name.
        name: String,
        /// Their identity key, 64 hex digits, or their contact name.
        member_key: String,
    },
    /// Leave a group (its other members commit your removal).
    Leave {
        /// The group's name.
        name: String,
    },
    /// List a group's members.
    Members {
        /// The group's name.
        name: String,
    },
    /// List your groups.
    List,
    /// Show the group's safety number, to compare with other members.
    ///
    /// Sixty digits derived from the group's MLS state at its current
    /// epoch. Members who see the same digits at the same epoch share the
    /// same group state: the server has not forked the group or swapped
    /// anyone's keys. Compare them in person or on a call. The number
    /// changes with every change to the group (an add, a removal, a key
    /// update), so compare at the same epoch.
    Verify {
        /// The group's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum ContactCmd {
    /// Name an identity key (a key already named gets the new name).
    Add {
        /// 1 to 64 bytes, no control characters; unique among your contacts.
        name: String,
        /// Their identity key, 64 hex digits (`qpq whoami`).
        key: String,
    },
    /// List your contacts with their full keys.
    List,
    /// Forget a contact's name.
    Remove {
        /// The contact's name.
        name: String,
    },
}

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    let filter = std::env::var("QPQ_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let out = Output::new(cli.json);
    if let Cmd::Recv { save_dir, .. } = &cli.command {
        out.set_save_dir(save_dir.clone());
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            out.error(&anyhow!(e));
            std::process::exit(1);
        }
    };
    // When nobody reads the output any more (`qpq recv | head -1`), the
    // command stops at its next wait, as a crash there would (the state
    // file is always whole), and the process exits quietly.
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(cli, &out) => Some(result),
            () = out.gone() => None,
        }
    });
    // Everything the command did is written by now. A read of stdin may
    // still be blocked on its thread (the daemon reads requests there), and
    // an ordinary runtime shutdown would wait for it.
    runtime.shutdown_background();
    if let Some(code) = out.report_failure() {
        std::process::exit(code);
    }
    if let Some(Err(e)) = result {
        out.error(&e);
        std::process::exit(1);
    }
}

/// Exits after a command line clap refused. Help and version are printed
/// as clap prints them; a usage error with `--json` is one `error` object on
/// stdout, like every other error in JSON mode.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    if !json
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        e.exit();
    }
    // The message is the paragraph before clap's usage lines.
    let text = e.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    Output::new(json).error(&anyhow!("{message}"));
    std::process::exit(e.exit_code());
}

async fn run(cli: Cli, out: &Output) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Init => return init(&cli, out),
        Cmd::Whoami { qr } => {
            let (_, (_, machine)) = State::load(&cli.state)?;
            return whoami(&machine, *qr, out);
        }
        Cmd::Group(GroupCmd::List) => {
            let (_, (_, machine)) = State::load(&cli.state)?;
            return list(&machine, out, None);
        }
        Cmd::Group(GroupCmd::Members { name }) => {
            let (_, (_, machine)) = State::load(&cli.state)?;
            return list(&machine, out, Some(name));
        }
        Cmd::Group(GroupCmd::Verify { name }) => {
            let (_, (_, machine)) = State::load(&cli.state)?;
            return verify(&machine, name, out);
        }
        Cmd::Contact(ContactCmd::List) => {
            let (_, (_, machine)) = State::load(&cli.state)?;
            return contacts(&machine, out);
        }
        Cmd::Export { dest, force } => return export(&cli, dest, *force, out),
        Cmd::Import { src, force } => return import(&cli, src, *force, out),
        Cmd::Passwd => return passwd(&cli, out),
        Cmd::Completions { shell } => return completions(*shell, out),
        Cmd::Man { out_dir } => return man(out_dir.as_deref(), out),
        _ => {}
    }
    match &cli.command {
        Cmd::Recv { stream: true, .. } => return stream(&cli, out).await,
        Cmd::Daemon {
            socket, no_socket, ..
        } => {
            let socket = (!no_socket).then(|| {
                socket
                    .clone()
                    .unwrap_or_else(|| daemon::socket_path(&cli.state))
            });
            return serve_daemon(&cli, socket).await;
        }
        _ => {}
    }
    // Read before taking the lock, so a slow writer to stdin does not hold
    // up other commands on this state file.
    let stdin_text = match &cli.command {
        Cmd::Send {
            text: Some(text), ..
        } if text == "-" => Some(message_from_stdin()?),
        _ => None,
    };
    // One command at a time per state file: another `qpq` on the same file
    // waits here instead of overwriting this one's state. A running
    // session (`recv --stream`, `daemon`) holds the file for as long as it
    // runs: the command goes to it instead.
    let _lock = match state_ops::lock_or_session(&cli.state)? {
        Held::Locked(lock) => lock,
        Held::Session(socket) => {
            let command = command(&cli, None, stdin_text)?;
            return forward(&socket, &command, out).await;
        }
    };
    let (mut state, (key, mut machine)) = State::load(&cli.state)?;
    out.set_names(Names::of(&machine));
    let command = command(&cli, Some(&machine), stdin_text)?;
    // The connection is made when the command needs the server (group
    // creation is local); if the server cannot be reached, what the
    // command queued stays in the state for the next command.
    let trust = match trust(&cli) {
        // Creating a group needs no server (deliveries left over from an
        // earlier command wait for one that does), and contacts never do.
        Err(_)
            if matches!(
                command,
                Command::CreateGroup { .. }
                    | Command::AddContact { .. }
                    | Command::RemoveContact { .. }
            ) =>
        {
            None
        }
        other => Some(other?),
    };
    // This command's own change is shown by its outcome, not also as an
    // event when the server takes it.
    out.restated(restated(&command, machine.identity_key()));
    let mut down = None;
    let outcome = drive(
        &mut machine,
        &cli,
        trust.as_ref(),
        &mut state,
        &key,
        command,
        out,
        &mut down,
    )
    .await?;
    finish(&cli, outcome, down, out)
}

/// Prints a command's outcome, or fails with why it failed. A server that
/// could not be reached is named once: as the error when the command needed
/// it, as a warning when what it asked for was kept for the next command.
fn finish(
    cli: &Cli,
    outcome: Result<Outcome, CommandError>,
    down: Option<Down>,
    out: &Output,
) -> anyhow::Result<()> {
    match (outcome, down) {
        (Err(CommandError::Server(e)), Some(d)) if e.kind == ErrorKind::Unavailable => {
            bail!("connecting to {}: {}", cli.server, d.reason)
        }
        (Err(e), _) => Err(e.into()),
        (Ok(o), down) => {
            out.outcome(&o);
            match down {
                Some(d) if d.permanent => bail!("connecting to {}: {}", cli.server, d.reason),
                Some(d) => {
                    out.warning(&format!(
                        "connecting to {}: {}; what could not be sent is kept for the next command",
                        cli.server, d.reason
                    ));
                    Ok(())
                }
                None => Ok(()),
            }
        }
    }
}

/// The machine stopped trying to reach the server during a command.
struct Down {
    reason: String,
    permanent: bool,
}

/// The machine command `cli` asks for. `machine` (the loaded state) names
/// contacts; without it a contact name is looked up in the state file.
fn command(
    cli: &Cli,
    machine: Option<&ClientMachine>,
    stdin_text: Option<String>,
) -> anyhow::Result<Command> {
    Ok(match &cli.command {
        Cmd::Register { count } => Command::Register { count: *count },
        Cmd::Group(GroupCmd::Create { name, pq }) => Command::CreateGroup {
            name: name.clone(),
            pq: *pq,
        },
        Cmd::Group(GroupCmd::Add { name, member_key }) => Command::AddMember {
            group: name.clone(),
            member: member(cli, machine, member_key)?,
        },
        Cmd::Group(GroupCmd::Remove { name, member_key }) => Command::RemoveMember {
            group: name.clone(),
            member: member(cli, machine, member_key)?,
        },
        Cmd::Contact(ContactCmd::Add { name, key }) => Command::AddContact {
            name: name.clone(),
            key: parse_key(key)?,
        },
        Cmd::Contact(ContactCmd::Remove { name }) => Command::RemoveContact { name: name.clone() },
        Cmd::Group(GroupCmd::Leave { name }) => Command::Leave {
            group: name.clone(),
        },
        Cmd::Update { name } => Command::Update {
            group: name.clone(),
        },
        Cmd::Send {
            name,
            text,
            reply_to,
            file,
            media_type,
        } => {
            let reply_to = reply_to
                .as_deref()
                .map(daemon::parse_id)
                .transpose()
                .map_err(|e| anyhow!("--reply-to: {e}"))?;
            let content = match file {
                Some(path) => Content::Attachment {
                    attachment: attachment(path, media_type)?,
                    reply_to,
                },
                None => Content::Text {
                    text: stdin_text.or_else(|| text.clone()).unwrap_or_default(),
                    reply_to,
                },
            };
            Command::SendContent {
                group: name.clone(),
                content,
            }
        }
        Cmd::Edit { name, id, text } => Command::SendContent {
            group: name.clone(),
            content: Content::Edit {
                target: daemon::parse_id(id).map_err(|e| anyhow!(e))?,
                text: text.clone(),
            },
        },
        Cmd::Delete { name, id } => Command::SendContent {
            group: name.clone(),
            content: Content::Delete {
                target: daemon::parse_id(id).map_err(|e| anyhow!(e))?,
            },
        },
        Cmd::Recv {
            stream: false,
            timeout_ms,
            ..
        } => Command::Receive {
            wait_ms: *timeout_ms,
        },
        Cmd::Init
        | Cmd::Whoami { .. }
        | Cmd::Group(GroupCmd::List | GroupCmd::Members { .. } | GroupCmd::Verify { .. })
        | Cmd::Contact(ContactCmd::List)
        | Cmd::Recv { stream: true, .. }
        | Cmd::Daemon { .. }
        | Cmd::Export { .. }
        | Cmd::Import { .. }
        | Cmd::Passwd
        | Cmd::Completions { .. }
        | Cmd::Man { .. } => {
            unreachable!("handled above")
        }
    })
}

fn init(cli: &Cli, out: &Output) -> anyhow::Result<()> {
    if state_file::exists(&cli.state) {
        bail!(
            "{} exists already; it holds an identity. Use --state to pick another file",
            cli.state.display()
        );
    }
    let _lock = lock(&cli.state)?;
    if state_file::exists(&cli.state) {
        bail!("{} was created meanwhile", cli.state.display());
    }
    let password = password(&cli.state, true)?;
    let machine = ClientMachine::generate(os_seed());
    let key = StateKey::derive(password.as_bytes(), KdfParams::RECOMMENDED, &mut OsRng)?;
    state_file::save_with_key(&cli.state, &key, &machine.snapshot())?;
    let id = hex(machine.identity_key().as_bytes());
    if out.json {
        say!(
            out,
            "{}",
            json!({"type": "initialized", "identity_key": id, "state": path_text(&cli.state)})
        );
    } else {
        say!(out, "Created a new identity in {}.", cli.state.display());
        say!(
            out,
            "Your identity key (share it with people who will add you):\n{id}"
        );
        say!(out, "Next: qpq register");
    }
    Ok(())
}

/// `export DEST`: the state file, checked to open with its password,
/// copied to DEST as it is.
fn export(cli: &Cli, dest: &Path, force: bool, out: &Output) -> anyhow::Result<()> {
    // Refused before the password is asked for; the write refuses again
    // if DEST appears meanwhile.
    if dest.is_dir() {
        bail!("{} is a directory; name the file to write", dest.display());
    }
    if !force && dest.symlink_metadata().is_ok() {
        bail!("{} exists already; --force replaces it", dest.display());
    }
    let _lock = state_ops::lock_idle(&cli.state)?;
    let opened = Sealed::read(&cli.state)
        .map_err(no_state_hint)?
        .open(password(&cli.state, false)?.as_bytes())?;
    let existing = if force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    opened.write_to(dest, existing)?;
    let id = hex(opened.identity_key().as_bytes());
    if out.json {
        say!(
            out,
            "{}",
            json!({"type": "exported", "state": path_text(&cli.state), "file": path_text(dest), "identity_key": id})
        );
    } else {
        say!(
            out,
            "Exported {} to {}, sealed with its password. `qpq import` installs it.",
            shown(&cli.state),
            shown(dest)
        );
    }
    Ok(())
}

/// `import SRC`: SRC, checked to open with its password, installed as the
/// state file; one already there is kept as `<state>.bak` with --force.
fn import(cli: &Cli, src: &Path, force: bool, out: &Output) -> anyhow::Result<()> {
    let exists = |state: &Path| {
        anyhow!(
            "{} exists already and holds an identity; --force replaces it (keeping it as {})",
            state.display(),
            state_ops::backup_path(state).display()
        )
    };
    // What can be refused is refused before the password is asked for.
    let sealed = Sealed::read(src)?;
    let lock = state_ops::lock_idle(&cli.state)?;
    if !force && state_file::exists(&cli.state) {
        return Err(exists(&cli.state));
    }
    let opened = sealed.open(password(src, false)?.as_bytes())?;
    let kept = match state_ops::install(&opened, &cli.state, &lock, force) {
        Err(StateOpError::Exists(state)) => return Err(exists(&state)),
        other => other?,
    };
    let id = hex(opened.identity_key().as_bytes());
    if out.json {
        say!(
            out,
            "{}",
            json!({
                "type": "imported",
                "state": path_text(&cli.state),
                "file": path_text(src),
                "identity_key": id,
                "kept": kept.as_deref().map(path_text),
            })
        );
    } else {
        say!(
            out,
            "Imported {} into {}. Your identity key:\n{id}",
            shown(src),
            shown(&cli.state)
        );
        if let Some(kept) = kept {
            say!(
                out,
                "The state file it replaced is kept as {}.",
                shown(&kept)
            );
        }
    }
    Ok(())
}

/// `passwd`: the state file sealed again under a new password.
fn passwd(cli: &Cli, out: &Output) -> anyhow::Result<()> {
    let lock = state_ops::lock_idle(&cli.state)?;
    let opened = Sealed::read(&cli.state)
        .map_err(no_state_hint)?
        .open(password(&cli.state, false)?.as_bytes())?;
    let new = ask_password(
        NEW_PASSWORD_VAR,
        &format!("New password for {}: ", cli.state.display()),
        true,
    )?;
    state_ops::change_password(&opened, new.as_bytes(), &cli.state, &lock)?;
    if out.json {
        say!(
            out,
            "{}",
            json!({"type": "password_changed", "state": path_text(&cli.state)})
        );
    } else {
        say!(out, "Changed the password of {}.", shown(&cli.state));
    }
    Ok(())
}

/// A missing state file, with what to do about it.
fn no_state_hint(e: StateOpError) -> anyhow::Error {
    match e {
        StateOpError::Missing(path) => {
            anyhow!("no state file at {}; run `qpq init` first", path.display())
        }
        e => e.into(),
    }
}

/// `completions SHELL`: the completion script, on stdout.
fn completions(shell: clap_complete::Shell, out: &Output) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "qpq", &mut script);
    print_text(out, script)
}

/// `man [--out-dir DIR]`: qpq(1) on stdout, or it and a page per
/// subcommand written to DIR.
fn man(out_dir: Option<&Path>, out: &Output) -> anyhow::Result<()> {
    // `help` has no page of its own: each page documents --help.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = out_dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        return print_text(out, page);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    man_pages(cmd, dir, &mut files).with_context(|| format!("writing in {}", dir.display()))?;
    if out.json {
        let files: Vec<String> = files.iter().map(|f| path_text(f)).collect();
        say!(out, "{}", json!({"type": "man_pages", "files": files}));
    } else {
        say!(out, "Wrote {} manual pages to {}.", files.len(), shown(dir));
    }
    Ok(())
}

/// Writes the page of `cmd` (built) and of each of its visible
/// subcommands to `dir`, named by their display names (`qpq-group-add.1`),
/// and adds their paths to `files`.
fn man_pages(cmd: clap::Command, dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    files.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
    for sub in subcommands {
        man_pages(sub, dir, files)?;
    }
    Ok(())
}

/// Prints generated text (a script, a manual page) as it is, also with
/// `--json`: it is the command's output.
fn print_text(out: &Output, text: Vec<u8>) -> anyhow::Result<()> {
    let text = String::from_utf8(text).context("generated text is not UTF-8")?;
    say!(out, "{}", text.strip_suffix('\n').unwrap_or(&text));
    Ok(())
}

/// A path as JSON text. serde_json refuses (and `json!` panics on) a path
/// that is not UTF-8; such bytes are shown as U+FFFD instead.
fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A path as text that cannot drive the terminal.
fn shown(path: &Path) -> String {
    escape_control(&path.display().to_string()).into_owned()
}

fn whoami(machine: &ClientMachine, qr: bool, out: &Output) -> anyhow::Result<()> {
    let id = hex(machine.identity_key().as_bytes());
    if out.json {
        say!(
            out,
            "{}",
            json!({"type": "identity", "identity_key": id, "phase": format!("{:?}", machine.phase())})
        );
        return Ok(());
    }
    say!(out, "{id}");
    if qr {
        let code = qrcode::QrCode::new(id.as_bytes()).context("making the QR code")?;
        let text = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        say!(out, "{text}");
    }
    Ok(())
}

fn list(machine: &ClientMachine, out: &Output, only: Option<&String>) -> anyhow::Result<()> {
    let names = Names::of(machine);
    let mut groups = machine.groups();
    if let Some(name) = only {
        groups.retain(|g| &g.name == name);
        if groups.is_empty() {
            bail!("no group named `{name}`");
        }
    }
    if out.json {
        for g in &groups {
            let mut v = quicproquo_client::json::group(g);
            // The contact name of each member that has one.
            v["names"] = g
                .members
                .iter()
                .filter_map(|m| Some((hex(m.as_bytes()), json!(names.name(m)?))))
                .collect::<serde_json::Map<_, _>>()
                .into();
            say!(out, "{v}");
        }
        return Ok(());
    }
    if groups.is_empty() {
        say!(
            out,
            "No groups yet. Create one with `qpq group create NAME`."
        );
    }
    for g in groups {
        say!(
            out,
            "{}{}  ({} members, epoch {}){}",
            escape_control(&g.name),
            if g.pq { "  [pq]" } else { "" },
            g.members.len(),
            g.epoch,
            match g.waiting {
                0 => String::new(),
                n => format!("  — {n} change(s) or message(s) waiting for the server"),
            }
        );
        for m in g.members {
            let me = if m == machine.identity_key() {
                "  (you)"
            } else {
                ""
            };
            say!(out, "    {}{me}", names.show(&m));
        }
    }
    Ok(())
}

/// `group verify NAME`: the group's safety number at its current epoch.
fn verify(machine: &ClientMachine, group: &str, out: &Output) -> anyhow::Result<()> {
    let Some(number) = machine.safety_number(group) else {
        bail!("no group named `{group}`");
    };
    if out.json {
        say!(
            out,
            "{}",
            json!({"type": "safety_number", "group": group, "epoch": number.epoch, "digits": number.digits})
        );
        return Ok(());
    }
    say!(
        out,
        "Safety number of {} at epoch {}:",
        escape_control(group),
        number.epoch
    );
    let grouped = number.grouped();
    let groups: Vec<&str> = grouped.split(' ').collect();
    for row in groups.chunks(4) {
        say!(out, "    {}", row.join(" "));
    }
    say!(
        out,
        "Compare it with the other members in person or on a call, at the same epoch: equal numbers mean you share one group state."
    );
    Ok(())
}

/// `contact list`: every contact with its full key.
fn contacts(machine: &ClientMachine, out: &Output) -> anyhow::Result<()> {
    let contacts = machine.contacts();
    if out.json {
        for (name, key) in &contacts {
            say!(
                out,
                "{}",
                json!({"type": "contact", "name": name, "key": hex(key.as_bytes())})
            );
        }
        return Ok(());
    }
    if contacts.is_empty() {
        say!(
            out,
            "No contacts yet. Name a key with `qpq contact add NAME KEY`."
        );
    }
    for (name, key) in contacts {
        say!(out, "{}  {}", escape_control(&name), hex(key.as_bytes()));
    }
    Ok(())
}

/// A member given to `group add` or `group remove`: an identity key, or
/// the name of a contact (looked up in `machine`, or in the state file when
/// a running session holds it). A key is taken as the key it is, whatever
/// the contacts are named.
fn member(cli: &Cli, machine: Option<&ClientMachine>, given: &str) -> anyhow::Result<IdentityKey> {
    if let Ok(key) = parse_key(given) {
        return Ok(key);
    }
    let loaded;
    let machine = match machine {
        Some(m) => m,
        None => {
            loaded = State::load(&cli.state)?.1.1;
            &loaded
        }
    };
    let contacts = machine.contacts();
    let (_, key) = contacts.iter().find(|(n, _)| n == given).ok_or_else(|| {
        anyhow!("`{given}` is neither an identity key (64 hex digits, as `qpq whoami` prints it) nor a contact name")
    })?;
    Ok(*key)
}

/// The event of `command`'s own change once the server takes it, which
/// the command's outcome reports too.
fn restated(command: &Command, me: IdentityKey) -> Option<Event> {
    match command {
        Command::AddMember { group, member } => Some(Event::MemberAdded {
            group: group.clone(),
            member: *member,
            by: me,
        }),
        Command::RemoveMember { group, member } => Some(Event::MemberRemoved {
            group: group.clone(),
            member: *member,
            by: me,
        }),
        _ => None,
    }
}

/// Hands `command` to the session running on this state file, through
/// its socket, and prints its answer.
async fn forward(socket: &std::path::Path, command: &Command, out: &Output) -> anyhow::Result<()> {
    let Some((method, params)) = daemon::request_for(command) else {
        bail!(
            "a qpq session (`recv --stream` or `daemon`) has this state file open and receives for it"
        );
    };
    let result = daemon::request(socket, method, params)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    match quicproquo_client::json::outcome_from(&result) {
        Some(outcome) => out.outcome(&outcome),
        None => say!(out, "{result}"),
    }
    Ok(())
}

/// `recv --stream`: one session, open until interrupted; messages are shown
/// as they arrive and other `qpq` commands on the state file come in
/// through its socket.
async fn stream(cli: &Cli, out: &Output) -> anyhow::Result<()> {
    let session = Arc::new(open_session(cli).await?);
    let mut events = session.subscribe().await?;
    out.set_names(Names::new(
        session.identity_key(),
        session.contacts().await?,
    ));
    let (stop, _) = tokio::sync::watch::channel(false);
    let socket = daemon::socket_path(&cli.state);
    let server = tokio::spawn(daemon::serve_socket(
        session.clone(),
        socket.clone(),
        stop.clone(),
    ));
    let mut stopped = stop.subscribe();
    let result = loop {
        tokio::select! {
            _ = stopped.changed() => break Ok(()),
            event = events.recv() => match event {
                Some(Event::Disconnected { reason, permanent: true }) => {
                    break Err(anyhow!("connecting to {}: {reason}", cli.server));
                }
                Some(e) => out.event(&e),
                None => break Ok(()),
            },
            () = interrupted() => break Ok(()),
        }
    };
    let _ = stop.send(true);
    let _ = server.await;
    drop(events);
    close(session).await?;
    result
}

/// `qpq daemon`: one session served as JSON lines on stdin/stdout and, if
/// `socket`, on that Unix socket, until `shutdown` or a signal.
async fn serve_daemon(cli: &Cli, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let session = Arc::new(open_session(cli).await?);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let server =
        socket.map(|path| tokio::spawn(daemon::serve_socket(session.clone(), path, stop.clone())));
    let stdio = {
        let (session, stop) = (session.clone(), stop.clone());
        tokio::spawn(async move {
            daemon::serve_stream(&session, tokio::io::stdin(), tokio::io::stdout(), &stop).await
        })
    };
    let serve_only_stdio = server.is_none();
    tokio::select! {
        _ = stopped.changed() => {}
        () = interrupted() => {}
        _ = stdio, if serve_only_stdio => {}
    }
    let _ = stop.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
    close(session).await
}

/// Opens the session of `qpq recv --stream` and `qpq daemon`.
async fn open_session(cli: &Cli) -> anyhow::Result<Session> {
    let password = password(&cli.state, false)?;
    let direct = match &cli.command {
        Cmd::Recv { direct, .. } | Cmd::Daemon { direct, .. } => {
            direct.config().map_err(|e| anyhow!(e))?
        }
        _ => None,
    };
    let config = SessionConfig {
        state: cli.state.clone(),
        server: cli.server.clone(),
        trust: trust(cli)?,
        direct,
    };
    Session::open(config, &password)
        .await
        .map_err(|e| match e {
            SessionError::InUse(path) => anyhow!(
                "{} is open in another qpq session (`recv --stream` or `daemon`); send it commands with qpq as usual",
                path.display()
            ),
            e => anyhow!(e),
        })
}

/// Closes a session once every task sharing it has let go of it.
async fn close(session: Arc<Session>) -> anyhow::Result<()> {
    let mut session = session;
    loop {
        match Arc::try_unwrap(session) {
            Ok(s) => return Ok(s.close().await?),
            Err(shared) => {
                session = shared;
                tokio::task::yield_now().await;
            }
        }
    }
}

/// SIGINT or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs one command to its end with the client library's loop, connecting
/// when the machine asks, writing the state file whenever the machine asks
/// and printing its events. A server the machine stopped trying to reach
/// is left in `down` (for [`finish`]); one it keeps trying to reach is
/// shown as a warning.
#[allow(clippy::too_many_arguments)]
async fn drive(
    machine: &mut ClientMachine,
    cli: &Cli,
    trust: Option<&ServerTrust>,
    state: &mut State,
    key: &StateKey,
    command: Command,
    out: &Output,
    down: &mut Option<Down>,
) -> anyhow::Result<Result<Outcome, CommandError>> {
    let signing_key = machine.signing_key().clone();
    let connect = async || {
        let Some(trust) = trust else {
            return Err(ClientError::Connect("the server is not trusted yet".into()));
        };
        Client::connect_as(&cli.server, trust, &signing_key).await
    };
    quicproquo_client::drive(
        machine,
        &Clock::new(),
        connect,
        command,
        |snapshot| state.save(key, snapshot),
        |e| match e {
            Event::Disconnected { reason, permanent } => {
                *down = Some(Down {
                    reason: reason.clone(),
                    permanent: *permanent,
                });
            }
            e => out.event(e),
        },
    )
    .await
    .map_err(|e| match e {
        DriveError::Persist(e) => e,
        other => anyhow!(other.to_string()),
    })
}

/// How the server is trusted: a pinned fingerprint or a CA file.
fn trust(cli: &Cli) -> anyhow::Result<ServerTrust> {
    Ok(match (&cli.server_fingerprint, &cli.server_ca) {
        (Some(fp), None) => ServerTrust::fingerprint_hex(fp)?,
        (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
        (Some(_), Some(_)) => bail!("give either --server-fingerprint or --server-ca, not both"),
        (None, None) => bail!(
            "the server is not trusted yet: pass --server-fingerprint HEX (qpq-server prints it at start) or --server-ca PATH (or set QPQ_SERVER_FINGERPRINT / QPQ_SERVER_CA)"
        ),
    })
}

/// The open state file: where it lives and its derived key.
struct State {
    path: PathBuf,
}

impl State {
    /// Loads and decrypts the state file.
    fn load(path: &std::path::Path) -> anyhow::Result<(State, (StateKey, ClientMachine))> {
        if !state_file::exists(path) {
            bail!("no state file at {}; run `qpq init` first", path.display());
        }
        Self::load_with(path, &password(path, false)?)
    }

    /// Loads and decrypts the state file with `password`.
    fn load_with(
        path: &std::path::Path,
        password: &str,
    ) -> anyhow::Result<(State, (StateKey, ClientMachine))> {
        if !state_file::exists(path) {
            bail!("no state file at {}; run `qpq init` first", path.display());
        }
        let (plaintext, key) = state_file::load_and_keep_key(path, password.as_bytes())
            .with_context(|| format!("opening {}", path.display()))?;
        let machine = ClientMachine::restore(&plaintext, os_seed())
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok((
            State {
                path: path.to_owned(),
            },
            (key, machine),
        ))
    }

    fn save(&mut self, key: &StateKey, snapshot: &[u8]) -> anyhow::Result<()> {
        state_file::save_with_key(&self.path, key, snapshot)
            .with_context(|| format!("saving {}", self.path.display()))
    }
}

/// Takes the state file's lock (`<state>.lock`, gone again once released),
/// waiting for any other `qpq` using the same state file to finish.
fn lock(state: &std::path::Path) -> anyhow::Result<StateLock> {
    Ok(StateLock::acquire(state)?)
}

/// The password of the state file at `path`: from QPQ_PASSWORD, else
/// asked for (twice if `confirm`, for a new file).
fn password(path: &std::path::Path, confirm: bool) -> anyhow::Result<Zeroizing<String>> {
    ask_password(
        PASSWORD_VAR,
        &format!("Password for {}: ", path.display()),
        confirm,
    )
}

/// A password from the variable `var`, else asked for on the terminal
/// with `prompt` (twice if `confirm`). Never empty.
fn ask_password(var: &str, prompt: &str, confirm: bool) -> anyhow::Result<Zeroizing<String>> {
    match std::env::var(var) {
        Ok(p) if p.is_empty() => {
            bail!("{var} is set but empty; a state file needs a password")
        }
        Ok(p) => return Ok(Zeroizing::new(p)),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{var} is not valid UTF-8"),
        Err(std::env::VarError::NotPresent) => {}
    }
    let p = Zeroizing::new(
        rpassword::prompt_password(escape_control(prompt).as_ref()).with_context(|| {
            format!("reading the password (set {var} when there is no terminal)")
        })?,
    );
    if confirm {
        let again = Zeroizing::new(rpassword::prompt_password("Repeat the password: ")?);
        if again != p {
            bail!("the passwords differ");
        }
    }
    if p.is_empty() {
        bail!("the password is empty");
    }
    Ok(p)
}

/// The message of `send GROUP -`: all of stdin, less one final newline
/// (`\n` or `\r\n`), as `echo hello | qpq send team -` means `hello`.
/// The file at `path` as an attachment of `media_type`, named by its file
/// name.
fn attachment(path: &Path, media_type: &str) -> anyhow::Result<Attachment> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: not a file name qpq can send", path.display()))?
        .to_owned();
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > ATTACHMENT_BYTES_MAX as u64 {
        bail!(
            "{} is {len} bytes; a file sent in a message is at most {ATTACHMENT_BYTES_MAX}",
            path.display()
        );
    }
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let attachment = Attachment {
        media_type: media_type.to_owned(),
        name,
        data,
    };
    Content::Attachment {
        attachment: attachment.clone(),
        reply_to: None,
    }
    .check()?;
    Ok(attachment)
}

fn message_from_stdin() -> anyhow::Result<String> {
    // Room for the longest message and its newline, and one byte more to
    // tell that it is too long without reading an unbounded stdin.
    let limit = TEXT_BYTES_MAX + 3;
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit as u64)
        .read_to_end(&mut bytes)
        .context("reading the message from stdin")?;
    let mut text =
        String::from_utf8(bytes).map_err(|_| anyhow!("the message on stdin is not UTF-8"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.len() > TEXT_BYTES_MAX {
        bail!("the message on stdin is longer than {TEXT_BYTES_MAX} bytes");
    }
    Ok(text)
}

fn parse_key(s: &str) -> anyhow::Result<IdentityKey> {
    daemon::parse_key(s).map_err(|e| anyhow!(e))
}

fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    seed
}

/// Prints results in the chosen format. Nothing is printed with
/// `println!`, which panics when the reader of a pipe has gone away: a
/// failed write is remembered instead, nothing more is written, and
/// [`Output::gone`] wakes `main` to stop the command.
struct Output {
    json: bool,
    failed: Cell<Option<WriteFailure>>,
    gone: Notify,
    /// Who is who, from the state file the command loaded.
    names: RefCell<Names>,
    /// The event of the running command's own change, which its outcome
    /// reports instead.
    restated: RefCell<Option<Event>>,
    /// Where files in received messages are saved (`recv --save-dir`).
    save_dir: RefCell<Option<PathBuf>>,
}

/// Why output stopped.
#[derive(Debug, Clone, Copy)]
enum WriteFailure {
    /// The reader of stdout or stderr went away (EPIPE).
    Closed,
    /// Writing stdout failed otherwise (a full disk, an I/O error).
    Stdout(std::io::ErrorKind),
}

impl Output {
    fn new(json: bool) -> Output {
        Output {
            json,
            failed: Cell::new(None),
            gone: Notify::new(),
            names: RefCell::new(Names::default()),
            restated: RefCell::new(None),
            save_dir: RefCell::new(None),
        }
    }

    /// Saves the files of received messages in `dir` from now on.
    fn set_save_dir(&self, dir: Option<PathBuf>) {
        *self.save_dir.borrow_mut() = dir;
    }

    /// Saves `file` of message `id` in the save directory, if there is one:
    /// what to say of it.
    fn save(&self, id: Option<ContentId>, file: &Attachment) -> String {
        let size = format!(
            "file {} ({}, {} bytes)",
            escape_control(&file.name),
            escape_control(&file.media_type),
            file.data.len()
        );
        let Some(dir) = self.save_dir.borrow().clone() else {
            return format!("{size}, not saved (recv --save-dir keeps files)");
        };
        // The sender's name without anything that leaves the directory or
        // drives a terminal; the id keeps two files of one name apart.
        let name: String = file
            .name
            .chars()
            .map(|c| {
                if c.is_control() || c == '/' || c == '\\' {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let name = name.trim_start_matches('.');
        let prefix = id.map_or_else(|| "file".to_owned(), |id| id.to_hex()[..8].to_owned());
        let path = dir.join(format!("{prefix}-{name}"));
        match std::fs::write(&path, &file.data) {
            Ok(()) => format!(
                "{size}, saved to {}",
                escape_control(&path.display().to_string())
            ),
            Err(e) => format!("{size}, not saved: {}: {e}", path.display()),
        }
    }

    /// Shows peers by these names from now on.
    fn set_names(&self, names: Names) {
        *self.names.borrow_mut() = names;
    }

    /// Leaves `event` out once: the command's outcome says it.
    fn restated(&self, event: Option<Event>) {
        *self.restated.borrow_mut() = event;
    }

    /// Writes `text` and a newline to stdout, or to stderr if `to_stderr`.
    fn line(&self, to_stderr: bool, text: std::fmt::Arguments<'_>) {
        if self.failed.get().is_some() {
            return;
        }
        let written = if to_stderr {
            let mut e = std::io::stderr().lock();
            writeln!(e, "{text}").and_then(|()| e.flush())
        } else {
            let mut o = std::io::stdout().lock();
            writeln!(o, "{text}").and_then(|()| o.flush())
        };
        let failure = match written {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => WriteFailure::Closed,
            Err(e) if !to_stderr => WriteFailure::Stdout(e.kind()),
            // Failing to write a note to stderr loses nothing of the
            // command's results; carry on.
            Err(_) => return,
        };
        self.failed.set(Some(failure));
        self.gone.notify_one();
    }

    /// Completes once output has failed.
    async fn gone(&self) {
        self.gone.notified().await;
    }

    /// If output failed, the exit code: 141 (128 + SIGPIPE, what a shell
    /// reports for a process a closed pipe stopped) when the reader went
    /// away, or 1 after reporting any other failure on stderr.
    fn report_failure(&self) -> Option<i32> {
        match self.failed.get()? {
            WriteFailure::Closed => Some(141),
            WriteFailure::Stdout(kind) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "error: writing the output: {}",
                    std::io::Error::from(kind)
                );
                Some(1)
            }
        }
    }

    fn event(&self, e: &Event) {
        match e {
            // One command: its outcome says what was delivered, and a
            // connection that comes up is nothing to report.
            Event::Connected | Event::Delivered { .. } => return,
            Event::Reconnecting {
                reason,
                retry_in_ms,
            } => {
                return self.warning(&format!(
                    "server unreachable: {reason}; trying again in {retry_in_ms} ms"
                ));
            }
            Event::Disconnected { reason, .. } => {
                return self.warning(&format!("server unreachable: {reason}"));
            }
            e if self.restated.borrow().as_ref() == Some(e) => {
                *self.restated.borrow_mut() = None;
                return;
            }
            _ => {}
        }
        let names = self.names.borrow();
        if self.json {
            let mut v = quicproquo_client::json::event(e);
            // The contact name beside each key that has one.
            for (field, named) in [
                ("member", "member_name"),
                ("by", "by_name"),
                ("peer", "peer_name"),
            ] {
                let key = v[field].as_str().and_then(|k| daemon::parse_key(k).ok());
                if let Some(name) = key.as_ref().and_then(|k| names.name(k)) {
                    v[named] = json!(name);
                }
            }
            if let Event::Message {
                id,
                attachment: Some(file),
                ..
            } = e
                && self.save_dir.borrow().is_some()
            {
                v["saved"] = json!(self.save(*id, file));
            }
            say!(self, "{v}");
            return;
        }
        // Everything shown below may come from a peer: escaped, so it
        // cannot print a fake line or drive the terminal.
        let who = |sender: &IdentityKey, sender_name: &Option<String>| {
            sender_name
                .as_deref()
                .map_or_else(|| short_key(sender), |n| escape_control(n).into_owned())
        };
        let short = |id: &ContentId| id.to_hex()[..8].to_owned();
        match e {
            Event::Message {
                group,
                sender,
                sender_name,
                text,
                sent_at_ms,
                id,
                reply_to,
                attachment,
                ..
            } => {
                let body = match attachment {
                    Some(file) => self.save(*id, file),
                    None => escape_control(text).into_owned(),
                };
                say!(
                    self,
                    "[{}] {}{}: {}{}",
                    escape_control(group),
                    sent_at_ms.map(sent_time).unwrap_or_default(),
                    who(sender, sender_name),
                    reply_to.map_or_else(String::new, |r| format!("(reply to {}) ", short(&r))),
                    body
                )
            }
            Event::Edited {
                group,
                sender,
                sender_name,
                target,
                text,
                sent_at_ms,
                ..
            } => say!(
                self,
                "[{}] {}{} edited {}: {}",
                escape_control(group),
                sent_at_ms.map(sent_time).unwrap_or_default(),
                who(sender, sender_name),
                short(target),
                escape_control(text)
            ),
            Event::Deleted {
                group,
                sender,
                sender_name,
                target,
                sent_at_ms,
                ..
            } => say!(
                self,
                "[{}] {}{} deleted {}",
                escape_control(group),
                sent_at_ms.map(sent_time).unwrap_or_default(),
                who(sender, sender_name),
                short(target)
            ),
            Event::Joined { group, members } => {
                say!(
                    self,
                    "* you joined {} ({members} members)",
                    escape_control(group)
                );
            }
            Event::GroupChanged {
                group,
                epoch,
                members,
            } => say!(
                self,
                "* {} changed: epoch {epoch}, {members} members",
                escape_control(group)
            ),
            Event::Removed { group, by } => {
                say!(
                    self,
                    "* {} removed you from {}",
                    names.who(by),
                    escape_control(group)
                );
            }
            Event::MemberAdded { group, member, by } => say!(
                self,
                "* {} added {} to {}",
                names.who(by),
                names.who(member),
                escape_control(group)
            ),
            Event::MemberRemoved { group, member, by } => say!(
                self,
                "* {} removed {} from {}",
                names.who(by),
                names.who(member),
                escape_control(group)
            ),
            Event::MemberLeft { group, member } => say!(
                self,
                "* {} left {}",
                names.who(member),
                escape_control(group)
            ),
            Event::DirectLink { peer, up: true, .. } => {
                say!(self, "* {} is reached directly", names.who(peer))
            }
            Event::DirectLink {
                peer, up: false, ..
            } => say!(
                self,
                "* {} is no longer reached directly; messages to them go through the server",
                names.who(peer)
            ),
            Event::Tampering { what } => note!(self, "TAMPERING: {}", escape_control(what)),
            Event::Warning { message } => note!(self, "warning: {}", escape_control(message)),
            other => note!(self, "{}", escape_control(&format!("{other:?}"))),
        }
    }

    fn outcome(&self, o: &Outcome) {
        let names = self.names.borrow();
        if self.json {
            let mut v = quicproquo_client::json::outcome(o);
            if let Outcome::MemberAdded { member, .. } | Outcome::MemberRemoved { member, .. } = o
                && let Some(name) = names.name(member)
            {
                v["name"] = json!(name);
            }
            say!(self, "{v}");
            return;
        }
        match o {
            Outcome::Registered {
                uploaded,
                already,
                failed,
            } => {
                say!(
                    self,
                    "Uploaded {uploaded} KeyPackages ({already} were already on the server)."
                );
                if *failed > 0 {
                    note!(self, "{failed} uploads failed; run `qpq register` again.");
                }
            }
            Outcome::GroupCreated { group } => {
                say!(self, "Created group {}.", escape_control(group));
            }
            Outcome::MemberAdded {
                group,
                member,
                undelivered,
            } => {
                say!(
                    self,
                    "Added {} to {}.",
                    names.show(member),
                    escape_control(group)
                );
                self.pending(*undelivered);
            }
            Outcome::Sent {
                group,
                id,
                delivered,
                undelivered,
            } => {
                let members = if *delivered == 1 { "member" } else { "members" };
                say!(
                    self,
                    "Sent to {delivered} {members} of {} (id {}).",
                    escape_control(group),
                    id.to_hex()
                );
                self.pending(*undelivered);
            }
            Outcome::MemberRemoved {
                group,
                member,
                undelivered,
            } => {
                say!(
                    self,
                    "Removed {} from {}.",
                    names.show(member),
                    escape_control(group)
                );
                self.pending(*undelivered);
            }
            Outcome::Left { group } => say!(self, "Left {}.", escape_control(group)),
            Outcome::ContactAdded {
                name,
                key,
                renamed_from,
            } => match renamed_from {
                Some(old) => say!(
                    self,
                    "Renamed contact {} ({}) to {}.",
                    escape_control(old),
                    short_key(key),
                    escape_control(name)
                ),
                None => say!(
                    self,
                    "Added contact {} ({}).",
                    escape_control(name),
                    short_key(key)
                ),
            },
            Outcome::ContactRemoved { name, key } => say!(
                self,
                "Removed contact {} ({}).",
                escape_control(name),
                short_key(key)
            ),
            Outcome::Updated {
                groups,
                undelivered,
            } => {
                say!(self, "Rotated your keys in {} group(s).", groups.len());
                self.pending(*undelivered);
            }
            Outcome::Received { messages } => {
                if *messages == 0 {
                    note!(self, "No new messages.");
                }
            }
            other => say!(self, "{}", escape_control(&format!("{other:?}"))),
        }
    }

    fn warning(&self, message: &str) {
        if self.json {
            say!(self, "{}", json!({"type": "warning", "message": message}));
        } else {
            note!(self, "warning: {}", escape_control(message));
        }
    }

    fn error(&self, e: &anyhow::Error) {
        if self.json {
            say!(
                self,
                "{}",
                json!({"type": "error", "message": format!("{e:#}")})
            );
        } else {
            // Errors can quote the server or a peer.
            note!(self, "error: {}", escape_control(&format!("{e:#}")));
        }
    }

    fn pending(&self, undelivered: u32) {
        if undelivered > 0 {
            note!(
                self,
                "{undelivered} deliveries are pending; the next qpq command retries them."
            );
        }
    }
}

/// When a message was sent, as its sender's clock says, in local time and
/// followed by a space: `14:02 `, or with the date when it is not today.
/// A time no calendar can show (a peer may send any number) is shown as
/// `?`.
fn sent_time(ms: u64) -> String {
    let Some(utc) = i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
    else {
        return "? ".into();
    };
    let local = utc.with_timezone(&chrono::Local);
    if local.date_naive() == chrono::Local::now().date_naive() {
        format!("{} ", local.format("%H:%M"))
    } else {
        format!("{} ", local.format("%Y-%m-%d %H:%M"))
    }
}

/// The variable the state file's password is read from.
const PASSWORD_VAR: &str = "QPQ_PASSWORD";
/// The variable `qpq passwd` reads the new password from.
const NEW_PASSWORD_VAR: &str = "QPQ_NEW_PASSWORD";
