//! The bridge between the window and the [`Session`]: the window hands it
//! [`Request`]s and reads [`Update`]s each frame, never waiting; a task on
//! the app's tokio runtime carries the requests out on the session and
//! sends back what came of them and every session event, asking the
//! window to repaint each time. An idle window repaints only then.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use quicproquo_client::{DirectConfig, ServerTrust, Session, SessionConfig};
use quicproquo_core::client::Event;
use quicproquo_core::types::IdentityKey;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::model::{Update, now_ms};

/// KeyPackages kept on the server: a new identity uploads them, and each
/// opening tops them up.
pub const REGISTER_COUNT: u32 = 20;

/// What the window asks of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Makes a new identity in a new state file and registers it.
    Create {
        /// The state's password.
        password: String,
        /// The server, `host:port`.
        server: String,
        /// The server certificate's SHA-256, 64 hex digits.
        fingerprint: String,
    },
    /// Opens the state file.
    Open {
        /// Its password.
        password: String,
    },
    /// Sends a message.
    Send {
        /// To which group.
        group: String,
        /// What.
        text: String,
    },
    /// Creates a group.
    CreateGroup {
        /// Its name.
        name: String,
        /// Post-quantum.
        pq: bool,
    },
    /// Adds a member by identity key (64 hex digits).
    AddMember {
        /// To which group.
        group: String,
        /// Their key.
        key: String,
    },
    /// Leaves a group.
    Leave {
        /// Which.
        group: String,
    },
    /// Removes a member.
    RemoveMember {
        /// From which group.
        group: String,
        /// Whom.
        member: IdentityKey,
    },
    /// Names a key in the contact book.
    NameContact {
        /// The name.
        name: String,
        /// Whose key.
        key: IdentityKey,
    },
    /// Asks for a group's safety number.
    SafetyNumber {
        /// Which group.
        group: String,
    },
    /// Updates this user's keys in every group.
    UpdateKeys,
}

/// The window's end of the bridge.
#[derive(Debug)]
pub struct Bridge {
    requests: mpsc::UnboundedSender<Request>,
    updates: std_mpsc::Receiver<Update>,
}

impl Bridge {
    /// A bridge whose other end is handed back, for tests: what the window
    /// asks arrives on the receiver, what the test sends shows up.
    pub fn detached() -> (
        Bridge,
        mpsc::UnboundedReceiver<Request>,
        std_mpsc::Sender<Update>,
    ) {
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (updates_tx, updates) = std_mpsc::channel();
        (Bridge { requests, updates }, requests_rx, updates_tx)
    }

    /// Starts the session task on `runtime`: it serves `paths` and calls
    /// `repaint` after every update it sends.
    pub fn spawn(
        runtime: &tokio::runtime::Handle,
        paths: Paths,
        repaint: impl Fn() + Send + Sync + 'static,
    ) -> Bridge {
        let (bridge, requests, updates) = Bridge::detached();
        let out = Out {
            updates,
            repaint: Arc::new(repaint),
        };
        runtime.spawn(serve(paths, requests, out));
        bridge
    }

    /// Hands a request over; it never waits. A bridge whose task is gone
    /// drops it (the window then shows nothing more from the session).
    pub fn request(&self, request: Request) {
        let _ = self.requests.send(request);
    }

    /// The updates that arrived since the last call.
    pub fn updates(&self) -> Vec<Update> {
        self.updates.try_iter().collect()
    }
}

/// Where the app keeps its files, and how its session reaches members
/// directly.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The encrypted state file.
    pub state: PathBuf,
    /// The server and its pinned fingerprint, chosen at the first run.
    pub settings: PathBuf,
    /// Direct links (the command line's `--direct-*` and `--mdns`).
    pub direct: Option<DirectConfig>,
}

impl Paths {
    /// The state file at `state`, its settings beside it; no direct links.
    pub fn beside(state: PathBuf) -> Paths {
        let settings = state.with_extension("server.json");
        Paths {
            state,
            settings,
            direct: None,
        }
    }

    /// The same, with these direct links.
    pub fn with_direct(self, direct: Option<DirectConfig>) -> Paths {
        Paths { direct, ..self }
    }
}

/// The server a state file talks to, kept beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// `host:port`.
    pub server: String,
    /// The server certificate's SHA-256, 64 hex digits.
    pub fingerprint: String,
}

/// The session task's way back to the window.
#[derive(Clone)]
struct Out {
    updates: std_mpsc::Sender<Update>,
    repaint: Arc<dyn Fn() + Send + Sync>,
}

impl Out {
    fn send(&self, update: Update) {
        let _ = self.updates.send(update);
        (self.repaint)();
    }
}

async fn serve(paths: Paths, mut requests: mpsc::UnboundedReceiver<Request>, out: Out) {
    let mut session: Option<Arc<Session>> = None;
    while let Some(request) = requests.recv().await {
        match (request, &session) {
            (
                Request::Create {
                    password,
                    server,
                    fingerprint,
                },
                None,
            ) => {
                let settings = Settings {
                    server,
                    fingerprint,
                };
                match create(&paths, &settings, &password).await {
                    Ok(s) => session = Some(opened(s, &out).await),
                    Err(e) => out.send(Update::OpenFailed(e)),
                }
            }
            (Request::Open { password }, None) => match open(&paths, &password).await {
                Ok(s) => session = Some(opened(s, &out).await),
                Err(e) => out.send(Update::OpenFailed(e)),
            },
            (Request::Create { .. } | Request::Open { .. }, Some(_)) => {}
            (request, Some(s)) => {
                // Commands run side by side: a slow one (an add waiting
                // for the server) does not hold up sending.
                tokio::spawn(command(s.clone(), request, out.clone()));
            }
            (_, None) => out.send(Update::Failed("the state is not open yet".into())),
        }
    }
}

async fn create(paths: &Paths, settings: &Settings, password: &str) -> Result<Session, String> {
    let trust = ServerTrust::fingerprint_hex(&settings.fingerprint).map_err(|e| e.to_string())?;
    if let Some(dir) = paths.state.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_vec_pretty(settings).map_err(|e| e.to_string())?;
    std::fs::write(&paths.settings, json)
        .map_err(|e| format!("{}: {e}", paths.settings.display()))?;
    let config = SessionConfig {
        state: paths.state.clone(),
        server: settings.server.clone(),
        trust,
        direct: paths.direct.clone(),
    };
    Session::create(config, password)
        .await
        .map_err(|e| e.to_string())
}

async fn open(paths: &Paths, password: &str) -> Result<Session, String> {
    let bytes =
        std::fs::read(&paths.settings).map_err(|e| format!("{}: {e}", paths.settings.display()))?;
    let settings: Settings =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", paths.settings.display()))?;
    let trust = ServerTrust::fingerprint_hex(&settings.fingerprint).map_err(|e| e.to_string())?;
    let config = SessionConfig {
        state: paths.state.clone(),
        server: settings.server,
        trust,
        direct: paths.direct.clone(),
    };
    Session::open(config, password)
        .await
        .map_err(|e| e.to_string())
}

/// Subscribes the window to `session`'s events and tells it the session is
/// open.
async fn opened(session: Session, out: &Out) -> Arc<Session> {
    let session = Arc::new(session);
    match session.subscribe().await {
        Ok(mut events) => {
            // Membership and the outbox changed: the members panel, counts
            // and "waiting for server" come from the group list, so it is
            // read again, by one task of its own (a command running in the
            // session must not hold up the events). A burst of changes
            // (thousands of deliveries) is one read: `Notify` keeps at
            // most one wake-up pending.
            let refresh = Arc::new(tokio::sync::Notify::new());
            let weak = Arc::downgrade(&session);
            let (reader_out, wake) = (out.clone(), refresh.clone());
            tokio::spawn(async move {
                loop {
                    wake.notified().await;
                    let Some(session) = weak.upgrade() else { break };
                    if let Ok(groups) = session.groups().await {
                        reader_out.send(Update::Groups(groups));
                    }
                }
            });
            let out = out.clone();
            tokio::spawn(async move {
                while let Some(e) = events.recv().await {
                    let changed = matches!(
                        e,
                        Event::Joined { .. }
                            | Event::Removed { .. }
                            | Event::MemberAdded { .. }
                            | Event::MemberRemoved { .. }
                            | Event::MemberLeft { .. }
                            | Event::GroupChanged { .. }
                            | Event::Delivered { .. }
                    );
                    out.send(Update::Event(e));
                    if changed {
                        refresh.notify_one();
                    }
                }
                // The session is gone: let the reader go too.
                refresh.notify_one();
            });
        }
        Err(e) => out.send(Update::Failed(e.to_string())),
    }
    // Subscribed first, then asked: a connection that came up before is
    // reported here, a later change as an event.
    if session.is_connected().await.unwrap_or(false) {
        out.send(Update::Event(Event::Connected));
    }
    let groups = session.groups().await.unwrap_or_default();
    let contacts = session.contacts().await.unwrap_or_default();
    out.send(Update::Opened {
        identity: session.identity_key(),
        groups,
        contacts,
    });
    // KeyPackages topped up at every opening, in the background: a first
    // run whose server was out of reach registers on the next one.
    let s = session.clone();
    let out = out.clone();
    tokio::spawn(async move {
        match s.register(REGISTER_COUNT).await {
            Ok(_) => out.send(Update::Registered),
            Err(e) => out.send(Update::Failed(format!(
                "registering with the server failed ({e}); others cannot add you until it succeeds, which is tried again when you next unlock"
            ))),
        }
    });
    session
}

async fn command(session: Arc<Session>, request: Request, out: Out) {
    let done = match request {
        Request::Send { group, text } => session.send(&group, &text).await.map(|_| {
            Some(Update::Sent {
                group,
                text,
                sent_at_ms: now_ms(),
            })
        }),
        Request::CreateGroup { name, pq } => session.create_group(&name, pq).await.map(|_| None),
        Request::AddMember { group, key } => match parse_key(&key) {
            Ok(key) => session.add(&group, key).await.map(|_| None),
            Err(e) => {
                out.send(Update::Failed(e));
                return;
            }
        },
        Request::Leave { group } => session.leave(&group).await.map(|_| None),
        Request::RemoveMember { group, member } => {
            session.remove(&group, member).await.map(|_| None)
        }
        Request::NameContact { name, key } => match session.add_contact(&name, key).await {
            Ok(_) => session.contacts().await.map(|c| Some(Update::Contacts(c))),
            Err(e) => Err(e),
        },
        Request::SafetyNumber { group } => session.safety_number(&group).await.map(|n| {
            n.map(|n| Update::SafetyNumber {
                group,
                digits: n.grouped(),
            })
        }),
        Request::UpdateKeys => session.update(None).await.map(|_| None),
        Request::Create { .. } | Request::Open { .. } => return,
    };
    match done {
        Ok(update) => {
            if let Some(u) = update {
                out.send(u);
            }
        }
        Err(e) => out.send(Update::Failed(e.to_string())),
    }
    if let Ok(groups) = session.groups().await {
        out.send(Update::Groups(groups));
    }
}

/// An identity key pasted by the user: 64 hex digits, spaces allowed.
pub fn parse_key(text: &str) -> Result<IdentityKey, String> {
    let hex: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    IdentityKey::from_hex(&hex).ok_or_else(|| "an identity key is 64 hex digits".into())
}
