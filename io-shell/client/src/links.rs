//! A session's direct links to other members (`quicproquo-p2p`): the
//! endpoint, the connections, and the tasks that dial, accept, receive and
//! send, reporting to the session's task as [`News`].
//!
//! The machine decides what goes directly and what a direct message
//! means; this only carries messages and says which peers are reachable.
//! Only members of this user's groups are admitted, both ways
//! ([`ClientMachine::direct_peers_allowed`], refreshed when membership
//! changes). A member with a given address (`host:port`), or one mDNS
//! finds when it is on, is dialed when it has no link, and again every
//! [`DIRECT_REDIAL`] while it has none. A send that goes unanswered
//! within [`DIRECT_ACK_TIMEOUT`](quicproquo_core::limits::DIRECT_ACK_TIMEOUT)
//! closes its link: the message goes through the server, and the link is
//! dialed again later.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use ed25519_dalek::SigningKey;
use quicproquo_core::Time;
use quicproquo_core::client::ClientMachine;
use quicproquo_core::limits::{DIRECT_CONNECT_TIMEOUT, DIRECT_REDIAL};
use quicproquo_core::protocol::DirectMessage;
use quicproquo_core::types::IdentityKey;
use quicproquo_p2p::discovery::Discovery;
use quicproquo_p2p::{Ack, Admit, Endpoint, Link, P2pError, Received};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Direct links of a session: where to listen and whom to reach.
#[derive(Debug, Clone, Default)]
pub struct DirectConfig {
    /// The UDP address to answer members on (`0.0.0.0:0` for any port).
    pub listen: Option<SocketAddr>,
    /// Members' addresses: (the member's identity key in hex or contact
    /// name, `host:port`).
    pub peers: Vec<(String, String)>,
    /// Announce this endpoint and find members on the local network with
    /// mDNS (`_qpq._udp.local`).
    pub mdns: bool,
}

impl DirectConfig {
    /// The configuration the command-line options ask for: `None` when no
    /// option is given; any option turns listening on (on any port without
    /// `listen`). Each peer is `MEMBER=HOST:PORT`.
    pub fn from_options(
        listen: Option<SocketAddr>,
        peers: &[String],
        mdns: bool,
    ) -> Result<Option<DirectConfig>, String> {
        if listen.is_none() && peers.is_empty() && !mdns {
            return Ok(None);
        }
        let peers = peers
            .iter()
            .map(|p| {
                p.split_once('=')
                    .filter(|(m, a)| !m.is_empty() && !a.is_empty())
                    .map(|(m, a)| (m.to_owned(), a.to_owned()))
                    .ok_or_else(|| format!("direct peer {p:?}: expected MEMBER=HOST:PORT"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(DirectConfig {
            listen,
            peers,
            mdns,
        }))
    }
}

/// The command-line options of a session's direct links, shared by `qpq`
/// (`daemon`, `recv --stream`) and `qpq-gui` (flatten it into a clap
/// parser).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DirectArgs {
    /// Answer members directly on this UDP address (e.g. 0.0.0.0:7444;
    /// port 0 picks one). Only members of your groups are admitted;
    /// messages to a member reached directly need no server.
    #[arg(long, env = "QPQ_DIRECT_LISTEN", value_name = "ADDR")]
    pub direct_listen: Option<SocketAddr>,
    /// A member's direct address, as MEMBER=HOST:PORT with MEMBER their
    /// contact name or identity key; repeatable. Implies listening (on any
    /// port without --direct-listen).
    #[arg(long = "direct-peer", value_name = "MEMBER=HOST:PORT")]
    pub direct_peers: Vec<String>,
    /// Find members on the local network with mDNS and announce yourself
    /// there (`_qpq._udp.local`, under an id derived from your key).
    /// Implies listening.
    #[arg(long)]
    pub mdns: bool,
}

impl DirectArgs {
    /// The session's direct configuration, if any option is given.
    pub fn config(&self) -> Result<Option<DirectConfig>, String> {
        DirectConfig::from_options(self.direct_listen, &self.direct_peers, self.mdns)
            .map_err(|e| format!("--direct-peer: {e}"))
    }
}

/// What the link tasks report to the loop that owns the machine; hand it
/// to [`Links::on_news`].
pub struct News(Kind);

enum Kind {
    /// A connection to a peer is up (dialed or accepted).
    Up(Link),
    /// A connection closed.
    Down { peer: IdentityKey, link: u64 },
    /// Dialing a peer failed.
    DialFailed(IdentityKey),
    /// A peer sent a message.
    Message {
        peer: IdentityKey,
        received: Received,
    },
    /// The peer's answer to a direct send, or why there was none.
    Answer {
        /// The machine it was sent for ([`Links::machine_replaced`]).
        generation: u64,
        token: u64,
        peer: IdentityKey,
        link: u64,
        result: Result<Ack, P2pError>,
    },
}

/// The members an endpoint admits, shared between its handshakes and the
/// [`Links`] that keep it current: made by [`admitted`].
pub struct Allowed(Arc<RwLock<BTreeSet<IdentityKey>>>);

/// The members of `machine`'s groups, and the [`Admit`] for an endpoint
/// that admits them (and whoever [`Links::refresh_allowed`] admits later).
pub fn admitted(machine: &ClientMachine) -> (Allowed, Admit) {
    let allowed = Arc::new(RwLock::new(machine.direct_peers_allowed()));
    let admit: Admit = {
        let allowed = allowed.clone();
        Arc::new(move |peer: &IdentityKey| {
            allowed.read().map(|a| a.contains(peer)).unwrap_or(false)
        })
    };
    (Allowed(allowed), admit)
}

/// Links kept to one peer: one it dialed and one it was dialed on.
const LINKS_PER_PEER_MAX: usize = 2;

/// News the tasks may have queued before they wait for the session.
const NEWS_QUEUED: usize = 256;

/// The session's direct links.
pub struct Links {
    endpoint: Arc<Endpoint>,
    allowed: Arc<RwLock<BTreeSet<IdentityKey>>>,
    /// Open connections by peer; the last one carries sends.
    open: BTreeMap<IdentityKey, Vec<Link>>,
    addresses: BTreeMap<IdentityKey, String>,
    discovery: Option<Arc<Discovery>>,
    /// One mDNS query at a time (they share the daemon's browse).
    finding: Arc<tokio::sync::Mutex<()>>,
    /// Peers being dialed.
    dialing: BTreeSet<IdentityKey>,
    /// Peers not to dial before this.
    not_before: BTreeMap<IdentityKey, Instant>,
    /// Messages waiting for the machine's answer, by its token.
    received: BTreeMap<u64, Received>,
    next_token: u64,
    /// Bumped when the machine is replaced: answers to the old one's sends
    /// are dropped (its tokens mean nothing to the new one).
    generation: u64,
    news_tx: mpsc::Sender<Kind>,
    news_rx: mpsc::Receiver<Kind>,
    tasks: JoinSet<()>,
}

impl Links {
    /// Binds the endpoint on `config.listen` and starts answering members
    /// (and announcing with mDNS if asked). Members named in
    /// `config.peers` that are neither a key nor a contact are left out,
    /// each with a warning in the second value. Call inside a tokio
    /// runtime.
    pub fn start(
        config: &DirectConfig,
        key: &SigningKey,
        machine: &ClientMachine,
    ) -> Result<(Links, Vec<String>), P2pError> {
        let (allowed, admit) = admitted(machine);
        let listen = config
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let endpoint = Endpoint::bind(listen, key, admit)?;
        Self::with_endpoint(endpoint, allowed, config, machine)
    }

    /// As [`Links::start`], on an endpoint the caller made (over a
    /// simulated network, say) with the admission `admitted` returned.
    pub fn with_endpoint(
        endpoint: Endpoint,
        allowed: Allowed,
        config: &DirectConfig,
        machine: &ClientMachine,
    ) -> Result<(Links, Vec<String>), P2pError> {
        let endpoint = Arc::new(endpoint);
        let mut warnings = Vec::new();
        let contacts = machine.contacts();
        let mut addresses = BTreeMap::new();
        for (member, address) in &config.peers {
            let key = IdentityKey::from_hex(member).or_else(|| {
                contacts
                    .iter()
                    .find(|(name, _)| name == member)
                    .map(|(_, k)| *k)
            });
            match key {
                Some(k) => {
                    addresses.insert(k, address.clone());
                }
                None => warnings.push(format!(
                    "direct peer {member:?} is neither an identity key nor a contact; left out"
                )),
            }
        }
        let discovery = if config.mdns {
            let d = Discovery::start()?;
            d.announce(&endpoint.identity(), endpoint.local_addr()?.port())?;
            Some(Arc::new(d))
        } else {
            None
        };
        let (news_tx, news_rx) = mpsc::channel(NEWS_QUEUED);
        let mut tasks = JoinSet::new();
        {
            let endpoint = endpoint.clone();
            let news = news_tx.clone();
            tasks.spawn(async move {
                while let Some(link) = endpoint.accept().await {
                    if news.send(Kind::Up(link)).await.is_err() {
                        return;
                    }
                }
            });
        }
        let links = Links {
            endpoint,
            allowed: allowed.0,
            open: BTreeMap::new(),
            addresses,
            discovery,
            finding: Arc::new(tokio::sync::Mutex::new(())),
            dialing: BTreeSet::new(),
            not_before: BTreeMap::new(),
            received: BTreeMap::new(),
            next_token: 0,
            generation: 0,
            news_tx,
            news_rx,
            tasks,
        };
        Ok((links, warnings))
    }

    /// Where the endpoint answers.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The next news, waiting for it.
    pub async fn news(&mut self) -> Option<News> {
        self.news_rx.recv().await.map(News)
    }

    /// The next news if one is ready.
    pub fn try_news(&mut self) -> Option<News> {
        self.news_rx.try_recv().ok().map(News)
    }

    /// Takes the members admitted from the machine (after membership
    /// changed); links to anyone else close.
    pub fn refresh_allowed(&mut self, machine: &mut ClientMachine, now: Time) {
        let allowed = machine.direct_peers_allowed();
        let gone: Vec<IdentityKey> = self
            .open
            .keys()
            .filter(|p| !allowed.contains(p))
            .copied()
            .collect();
        for peer in gone {
            for link in self.open.remove(&peer).unwrap_or_default() {
                link.close();
            }
            machine.handle_direct_link(now, peer, false);
        }
        if let Ok(mut a) = self.allowed.write() {
            *a = allowed;
        }
    }

    /// Dials every admitted peer with no link whose time has come and
    /// whose address is known (or, with mDNS, findable).
    pub fn dial_due(&mut self) {
        let now = Instant::now();
        let allowed: Vec<IdentityKey> = self
            .allowed
            .read()
            .map(|a| a.iter().copied().collect())
            .unwrap_or_default();
        for peer in allowed {
            if self.open.contains_key(&peer)
                || self.dialing.contains(&peer)
                || self.not_before.get(&peer).is_some_and(|t| *t > now)
            {
                continue;
            }
            let address = self.addresses.get(&peer).cloned();
            if address.is_none() && self.discovery.is_none() {
                continue;
            }
            self.dialing.insert(peer);
            self.not_before.insert(peer, now + DIRECT_REDIAL);
            let (endpoint, discovery, finding, news) = (
                self.endpoint.clone(),
                self.discovery.clone(),
                self.finding.clone(),
                self.news_tx.clone(),
            );
            self.tasks.spawn(async move {
                let found = dial(&endpoint, discovery.as_deref(), &finding, peer, address).await;
                let news_of = match found {
                    Ok(link) => Kind::Up(link),
                    Err(e) => {
                        tracing::debug!("direct link to {} not made: {e}", peer.short());
                        Kind::DialFailed(peer)
                    }
                };
                let _ = news.send(news_of).await;
            });
        }
    }

    /// When [`Self::dial_due`] has something to do next.
    pub fn next_dial(&self) -> Option<Instant> {
        let allowed = self.allowed.read().ok()?;
        allowed
            .iter()
            .filter(|p| !self.open.contains_key(p) && !self.dialing.contains(p))
            .filter(|p| self.discovery.is_some() || self.addresses.contains_key(p))
            .map(|p| self.not_before.get(p).copied().unwrap_or_else(Instant::now))
            .min()
    }

    /// Hands news to the machine.
    pub fn on_news(&mut self, news: News, machine: &mut ClientMachine, now: Time) {
        match news.0 {
            Kind::Up(link) => {
                let peer = link.peer();
                self.dialing.remove(&peer);
                let admitted = self
                    .allowed
                    .read()
                    .map(|a| a.contains(&peer))
                    .unwrap_or(false);
                if !admitted {
                    link.close();
                    return;
                }
                self.receive_from(link.clone());
                let links = self.open.entry(peer).or_default();
                links.push(link);
                // One each way is all two members need; a peer that
                // keeps connecting replaces its oldest link.
                if links.len() > LINKS_PER_PEER_MAX {
                    links.remove(0).close();
                }
                if links.len() == 1 {
                    machine.handle_direct_link(now, peer, true);
                }
            }
            Kind::Down { peer, link } => self.drop_link(peer, link, machine, now),
            Kind::DialFailed(peer) => {
                self.dialing.remove(&peer);
            }
            Kind::Message { peer, received } => {
                let token = self.next_token;
                self.next_token += 1;
                let message = received.message.clone();
                self.received.insert(token, received);
                machine.handle_direct_message(now, token, peer, message);
            }
            Kind::Answer {
                generation, token, ..
            } if generation != self.generation => {
                tracing::debug!("an answer to direct send {token} of a replaced machine dropped");
            }
            Kind::Answer {
                token,
                peer,
                link,
                result,
                ..
            } => {
                let taken = match result {
                    Ok(Ack::Taken) => true,
                    Ok(Ack::Refused) => false,
                    Err(e) => {
                        // No answer in time, or the link broke: not a link
                        // to wait on again for every message.
                        tracing::debug!("direct send to {} failed: {e}", peer.short());
                        self.drop_link(peer, link, machine, now);
                        false
                    }
                };
                machine.handle_direct_answer(now, token, taken);
            }
        }
    }

    /// Sends the machine's direct message; false if no link to `peer` is
    /// up (the machine is answered "not taken" by the caller).
    pub fn send(&mut self, token: u64, peer: IdentityKey, message: DirectMessage) -> bool {
        let Some(link) = self.open.get(&peer).and_then(|l| l.last()).cloned() else {
            return false;
        };
        let news = self.news_tx.clone();
        let generation = self.generation;
        self.tasks.spawn(async move {
            let result = link.send(&message).await;
            let _ = news
                .send(Kind::Answer {
                    generation,
                    token,
                    peer,
                    link: link.id(),
                    result,
                })
                .await;
        });
        true
    }

    /// Answers a message the machine took or refused (its state is
    /// written).
    pub fn answer(&mut self, token: u64, taken: bool) {
        if let Some(received) = self.received.remove(&token) {
            let ack = if taken { Ack::Taken } else { Ack::Refused };
            self.tasks.spawn(async move {
                let _ = received.answer(ack).await;
            });
        }
    }

    /// The machine was replaced by one restored from the state file (a
    /// command given up on): answers to the old machine's sends are
    /// dropped, and messages it had not answered go unanswered (their
    /// streams are reset; the senders send them through the server).
    pub fn machine_replaced(&mut self) {
        self.generation += 1;
        self.received.clear();
    }

    /// Closes every link and stops answering and announcing.
    pub fn close(&mut self) {
        self.endpoint.close();
        if let Some(d) = &self.discovery {
            d.stop();
        }
        self.tasks.abort_all();
    }

    fn drop_link(&mut self, peer: IdentityKey, id: u64, machine: &mut ClientMachine, now: Time) {
        let Some(links) = self.open.get_mut(&peer) else {
            return;
        };
        links.retain(|l| {
            if l.id() == id {
                l.close();
                false
            } else {
                true
            }
        });
        if links.is_empty() {
            self.open.remove(&peer);
            self.not_before.insert(peer, Instant::now() + DIRECT_REDIAL);
            machine.handle_direct_link(now, peer, false);
        }
    }

    /// Reads the messages a connection brings until it closes.
    fn receive_from(&mut self, link: Link) {
        let news = self.news_tx.clone();
        self.tasks.spawn(async move {
            let peer = link.peer();
            loop {
                match link.receive().await {
                    Ok(received) => {
                        if news.send(Kind::Message { peer, received }).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = news
                            .send(Kind::Down {
                                peer,
                                link: link.id(),
                            })
                            .await;
                        return;
                    }
                }
            }
        });
    }
}

/// Whether an event may change whom this user shares a group with (and
/// so whom the links admit).
pub(crate) fn changes_membership(e: &quicproquo_core::client::Event) -> bool {
    use quicproquo_core::client::Event;
    matches!(
        e,
        Event::Joined { .. }
            | Event::Removed { .. }
            | Event::MemberAdded { .. }
            | Event::MemberRemoved { .. }
            | Event::MemberLeft { .. }
            | Event::GroupChanged { .. }
    )
}

/// Connects to `peer` at its given address, or where mDNS finds it.
async fn dial(
    endpoint: &Endpoint,
    discovery: Option<&Discovery>,
    finding: &tokio::sync::Mutex<()>,
    peer: IdentityKey,
    address: Option<String>,
) -> Result<Link, P2pError> {
    let candidates: Vec<SocketAddr> = match (address, discovery) {
        (Some(address), _) => tokio::net::lookup_host(address.as_str())
            .await
            .map_err(|e| P2pError::Connect(format!("{address}: {e}")))?
            .collect(),
        (None, Some(d)) => {
            let _one = finding.lock().await;
            d.find(&peer, DIRECT_CONNECT_TIMEOUT).await?
        }
        (None, None) => Vec::new(),
    };
    let mut last = P2pError::Connect("no address".into());
    for addr in candidates {
        match endpoint.connect(addr, peer).await {
            Ok(link) => return Ok(link),
            Err(e) => last = e,
        }
    }
    Err(last)
}
