//! Server configuration: built-in defaults, overridden by `qpq-server.toml`
//! (or the file `QPQ_CONFIG` / `--config` names), overridden by `QPQ_*`
//! environment variables, overridden by command-line flags.
//!
//! Every key of [`FileConfig`] has a flag `--key-name` and a variable
//! `QPQ_KEY_NAME`; `qpq-server --help` lists them. The checked-in
//! `qpq-server.toml` documents each key and its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use quicproquo_core::limits;
use quicproquo_core::node::{Durability, NodeConfig, RateConfig};
use quicproquo_proto::{REPLY_BYTES_MAX, REQUEST_BYTES_MAX};
use serde::Deserialize;

/// Default UDP address the server listens on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default data directory; the database is `<data_dir>/qpq.db`.
pub const DEFAULT_DATA_DIR: &str = "qpq-data";
/// Default config file, read if present.
pub const DEFAULT_CONFIG: &str = "qpq-server.toml";
/// Default log filter.
/// The storage engine is chatty at `info`; its warnings still show. A
/// `log` setting is added to it, not put in its place
/// ([`ServerConfig::log_filter`]).
pub const DEFAULT_LOG: &str = "info,fjall=warn,lsm_tree=warn";
/// How often the server logs a summary line at `info` by default
/// (`log_summary_interval_ms`): connections, requests and errors by kind,
/// refused authentications, fsyncs and messages per fsync, and what the
/// queues hold.
pub const SUMMARY_INTERVAL_MS: u64 = 60_000;
/// Name of the database directory inside the data directory.
pub const DB_DIR_NAME: &str = "qpq.db";
/// Default space kept free on the database's filesystem. Writes that add
/// data stop short of it; it leaves the storage engine room to flush its
/// in-memory table (up to 64 MiB) and to compact, and acknowledgements room
/// to drain a full server (ARCHITECTURE.md § Storage).
pub const DEFAULT_STORAGE_RESERVE_BYTES: u64 = 256 * 1024 * 1024;

/// Transport limits the shell enforces before the core sees anything.
pub mod transport {
    /// Connections open at once; beyond it new connections are refused.
    pub const CONNECTIONS_MAX: u32 = 10_000;
    /// Connections from one IP address at once, so one host cannot take
    /// the whole table.
    pub const CONNECTIONS_PER_IP_MAX: u32 = 64;
    /// Handshakes in progress at once (quinn's incoming buffer).
    pub const PENDING_HANDSHAKES_MAX: u32 = 1_024;
    /// Handshakes from addresses not yet validated that may be in progress
    /// at once. A client whose first packet finds this many is answered
    /// with a QUIC Retry and proves its address with one more round trip;
    /// only proven addresses count against [`CONNECTIONS_PER_IP_MAX`], so
    /// Initials with a forged source address cannot lock that address out.
    pub const UNVALIDATED_HANDSHAKES_MAX: u32 = 64;
    /// Concurrent request streams per connection: enough for pipelining
    /// and a long-poll per channel, small enough to bound memory.
    pub const STREAMS_PER_CONNECTION_MAX: u32 = 128;
    /// Bytes a connection may have in flight towards the server, over all
    /// its streams (QUIC's connection window), and the most the server
    /// holds for the connection's requests until they are answered: a
    /// request that finds this spent is answered `unavailable`. Without the
    /// second, a client could pin a nearly full-size request on every one
    /// of its streams by never finishing them.
    pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
    /// Bytes of fetch replies one connection may have in the making or
    /// unread at once. A fetch or fetchWait sets aside room for the largest
    /// reply before the machine reads anything (waiting for it up to the
    /// request timeout); the room shrinks to the reply's real size, and is
    /// given back while a fetchWait waits. Without it a client that never
    /// reads could make the server hold a 4 MiB reply on every stream.
    pub const CONNECTION_REPLY_BYTES_MAX: u32 = 16 * 1024 * 1024;
    /// Idle time after which a silent connection is closed.
    pub const IDLE_TIMEOUT_MS: u64 = 30_000;
    /// Time a client has to send a whole request on a stream.
    pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
    /// Time a QUIC + TLS handshake may take.
    pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
    /// Longest time from SIGTERM or SIGINT to the end of serving: waiting
    /// long-polls are answered at once, other in-flight requests have until
    /// [`SHUTDOWN_CLOSE_MS`] before its end to finish, then connections
    /// are closed and the last writes synced.
    pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
    /// The last part of [`SHUTDOWN_GRACE_MS`], kept for closing the
    /// connections once in-flight requests are cut.
    pub const SHUTDOWN_CLOSE_MS: u64 = 1_000;
    /// How often the service runs one bounded step of the machine's sweep
    /// (expired messages of queues nobody touches, idle commit fences).
    pub const SWEEP_INTERVAL_MS: u64 = 60_000;
}

/// What `qpq-server --version` prints: the crate version and the commit
/// it was built from (`unknown` outside a git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("QPQ_GIT_COMMIT"),
    ")"
);

/// Command-line flags; each also reads its `QPQ_*` variable.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "qpq-server",
    version = VERSION,
    about = "quicproquo NodeService: end-to-end encrypted group messaging delivery over QUIC",
    long_about = "quicproquo NodeService: stores single-use MLS KeyPackages and per-recipient \
message queues for qpq clients, over QUIC + TLS 1.3, in an embedded database.\n\n\
With no arguments it reads ./qpq-server.toml if present, listens on 0.0.0.0:7443 (UDP), \
keeps data in ./qpq-data/qpq.db and, on first start, generates a self-signed certificate \
in the data directory and prints its SHA-256 fingerprint for clients to pin.\n\n\
Precedence: flag > QPQ_* variable > config file > built-in default."
)]
pub struct Args {
    /// Config file (TOML); default ./qpq-server.toml if it exists.
    #[arg(long, env = "QPQ_CONFIG", value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: FileConfig,
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
}

/// `qpq-server`'s commands besides serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ServerCommand {
    /// Copies the server's state from fjall to PostgreSQL, stopped.
    ///
    /// Copies the server's state from one storage backend to another, with
    /// the server stopped: from the fjall database in data_dir to the
    /// PostgreSQL database at postgres_url (which must hold no qpq data
    /// yet). Everything is copied — queued messages, KeyPackages, hybrid
    /// keys, commit fences, dedup records and counters — then read back
    /// from both and compared. Set storage = "postgres" afterwards.
    Migrate {
        /// The backend to copy from: `fjall`.
        #[arg(long, value_name = "BACKEND")]
        from: String,
        /// The backend to copy to: `postgres`.
        #[arg(long, value_name = "BACKEND")]
        to: String,
    },
    /// Writes the server's whole state to one file, while it runs or not.
    ///
    /// The file holds a snapshot of the fjall database in data_dir at one
    /// instant (each request wholly in it or wholly out) and every other
    /// regular file of data_dir: the generated TLS certificate and its
    /// private key among them, so the fingerprint clients pin survives a
    /// restore. A running server takes the snapshot itself and streams it
    /// over its socket admin.sock in data_dir while it goes on serving;
    /// with no server running, the command reads the database directly.
    /// The file (mode
    /// 0600) takes its name only once it is complete and synced. It holds
    /// the server's TLS private key: keep it as safe as the key. With
    /// storage = "postgres", back up PostgreSQL with its own tools
    /// (pg_dump) instead.
    Backup {
        /// The file to write; not inside data_dir.
        #[arg(value_name = "DEST")]
        dest: PathBuf,
        /// Replace DEST if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Restores a backup into data_dir, with the server stopped.
    ///
    /// The whole file (format, version, checksum) is checked before
    /// anything changes. The database is built beside the old one, read
    /// back and compared with the backup, then moved into place with the
    /// other files, their modes kept. Without --force, a data_dir that
    /// holds a database, or a file that differs from the backup's copy,
    /// is refused.
    Restore {
        /// The backup file.
        #[arg(value_name = "SRC")]
        src: PathBuf,
        /// Restore even though data_dir holds a database, or files that
        /// differ from the backup's copies; what is replaced is kept aside
        /// as `<name>.before-restore-<unix time>`.
        #[arg(long)]
        force: bool,
    },
    /// Prints the certificate's SHA-256 fingerprint, as clients pin it.
    ///
    /// The fingerprint of the certificate the server serves (64 hex
    /// digits, as clients pin it with --server-fingerprint), from
    /// tls_cert or the certificate generated in data_dir. Starts nothing.
    Fingerprint,
    /// Checks the configuration and prints the settings in effect.
    ///
    /// Checks the configuration (file, QPQ_* variables and flags) as a
    /// start would, and prints the settings in effect as a config file:
    /// each key not set anywhere is marked `# default`, the PostgreSQL
    /// password is hidden. Also loads tls_cert/tls_key and checks that
    /// data_dir can be used. Binds nothing, creates nothing and does not
    /// connect to PostgreSQL. Exits non-zero, naming the key, on an error.
    CheckConfig,
    /// Asks the running server for one answer; exits non-zero without one.
    ///
    /// Asks the running server this configuration describes for one
    /// answer, as a client would: a QUIC + TLS 1.3 handshake pinning its
    /// certificate (from tls_cert or data_dir), one request (an
    /// authentication challenge, which writes nothing) and its reply.
    /// Listening on all addresses, it is asked on loopback. Exits 0 and
    /// prints the round trip if it answered, non-zero otherwise: for
    /// container health checks and supervisors.
    Health {
        /// How long to wait for the whole exchange, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = crate::health::HEALTH_TIMEOUT_MS)]
        timeout_ms: u64,
    },
    /// Prints a shell completion script to stdout.
    ///
    /// For example `qpq-server completions bash >
    /// /etc/bash_completion.d/qpq-server`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Prints the manual page, or writes every page into a directory.
    ///
    /// Prints the qpq-server(1) manual page (roff) to stdout, or with
    /// --out-dir writes it and one page per command
    /// (qpq-server-backup.1, ...) into that directory.
    Man {
        /// Directory to write every page into.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

macro_rules! config_keys {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty, env = $env:literal ; )*) => {
        /// Every configuration key. In the file all are optional; missing
        /// keys take their defaults.
        #[derive(Debug, Clone, Default, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct FileConfig {
            $(
                $(#[$doc])*
                #[arg(long, env = $env, global = true)]
                pub $name: Option<$ty>,
            )*
        }

        impl FileConfig {
            /// Every key's name, in the order of the file.
            pub const KEYS: &[&str] = &[$( stringify!($name), )*];

            /// Keys set in `other` replace those in `self`.
            fn merge(self, other: FileConfig) -> FileConfig {
                FileConfig { $( $name: other.$name.or(self.$name), )* }
            }

            /// The names of the keys that are set.
            pub fn set_keys(&self) -> Vec<&'static str> {
                let mut set = Vec::new();
                $( if self.$name.is_some() { set.push(stringify!($name)); } )*
                set
            }
        }
    };
}

config_keys! {
    /// UDP address and port to listen on [default: 0.0.0.0:7443].
    listen: String, env = "QPQ_LISTEN";
    /// Data directory; holds qpq.db and the generated certificate [default: qpq-data].
    data_dir: PathBuf, env = "QPQ_DATA_DIR";
    /// `fsync` (answer after data is on disk) or `buffered` (answer at once, sync at most every 50 ms; a crash may lose acknowledged messages) [default: fsync].
    durability: String, env = "QPQ_DURABILITY";
    /// `fjall` (the embedded database in data_dir) or `postgres` (a PostgreSQL database at postgres_url, which several qpq-server nodes may share) [default: fjall].
    storage: String, env = "QPQ_STORAGE";
    /// PostgreSQL connection string for storage = "postgres", e.g. `postgres://qpq:secret@db.example:5432/qpq` or `host=/run/postgresql dbname=qpq`; without TLS, so keep it on loopback, a Unix socket or a trusted network.
    postgres_url: String, env = "QPQ_POSTGRES_URL";
    /// Log filter, added to the default: e.g. `debug` (one line per connection; the storage engine stays at warn) or `fjall=info` [default: info,fjall=warn,lsm_tree=warn].
    log: String, env = "QPQ_LOG";
    /// Log a summary line at info this often, ms; 0 turns it off [default: 60000].
    log_summary_interval_ms: u64, env = "QPQ_LOG_SUMMARY_INTERVAL_MS";
    /// Bytes kept free on the database's filesystem: writes that add data are refused (`unavailable`, "disk is full") rather than go below it; 0 turns the check off [default: 268435456].
    storage_reserve_bytes: u64, env = "QPQ_STORAGE_RESERVE_BYTES";
    /// TCP address for the Prometheus metrics endpoint (HTTP, GET /metrics), e.g. 127.0.0.1:9464; keep it on loopback [default: off].
    metrics_listen: String, env = "QPQ_METRICS_LISTEN";
    /// PEM certificate chain to serve instead of the generated self-signed one.
    tls_cert: PathBuf, env = "QPQ_TLS_CERT";
    /// PEM private key for tls_cert.
    tls_key: PathBuf, env = "QPQ_TLS_KEY";
    /// Connections open at once [default: 10000].
    connections_max: u32, env = "QPQ_CONNECTIONS_MAX";
    /// Connections from one IP address at once [default: 64].
    connections_per_ip_max: u32, env = "QPQ_CONNECTIONS_PER_IP_MAX";
    /// QUIC handshakes in progress at once [default: 1024].
    pending_handshakes_max: u32, env = "QPQ_PENDING_HANDSHAKES_MAX";
    /// Handshakes from unproven addresses in progress at once; beyond it a QUIC Retry makes clients prove their address first (0: always) [default: 64].
    unvalidated_handshakes_max: u32, env = "QPQ_UNVALIDATED_HANDSHAKES_MAX";
    /// Concurrent request streams per connection [default: 128].
    streams_per_connection_max: u32, env = "QPQ_STREAMS_PER_CONNECTION_MAX";
    /// Receive window, and bytes of unanswered requests held, per connection [default: 8388608].
    connection_receive_window_bytes: u32, env = "QPQ_CONNECTION_RECEIVE_WINDOW_BYTES";
    /// Bytes of fetch replies in the making or unread, per connection [default: 16777216].
    connection_reply_bytes_max: u32, env = "QPQ_CONNECTION_REPLY_BYTES_MAX";
    /// Close connections idle this long, ms [default: 30000].
    idle_timeout_ms: u64, env = "QPQ_IDLE_TIMEOUT_MS";
    /// Time to send one whole request, ms [default: 10000].
    request_timeout_ms: u64, env = "QPQ_REQUEST_TIMEOUT_MS";
    /// Largest enqueued payload, bytes [default: 1048576, also the maximum].
    payload_bytes_max: usize, env = "QPQ_PAYLOAD_BYTES_MAX";
    /// KeyPackages kept per identity in each pool (one per cipher suite; the last resort is extra) [default: 1000].
    key_packages_per_identity_max: u32, env = "QPQ_KEY_PACKAGES_PER_IDENTITY_MAX";
    /// Messages per queue [default: 10000].
    queue_depth_max: u64, env = "QPQ_QUEUE_DEPTH_MAX";
    /// Payload bytes per queue [default: 268435456].
    queue_bytes_max: u64, env = "QPQ_QUEUE_BYTES_MAX";
    /// Longest fetchWait, ms [default: 25000].
    fetch_wait_timeout_ms_max: u64, env = "QPQ_FETCH_WAIT_TIMEOUT_MS_MAX";
    /// Waiting fetchWait calls per connection [default: 64].
    waiters_per_connection_max: usize, env = "QPQ_WAITERS_PER_CONNECTION_MAX";
    /// Waiting fetchWait calls in total [default: 100000].
    waiters_max: usize, env = "QPQ_WAITERS_MAX";
    /// Drop queued messages older than this, ms; 0 keeps them [default: 0].
    message_ttl_ms: u64, env = "QPQ_MESSAGE_TTL_MS";
    /// Delete a group's commit fence this long after its last Commit, ms; 0 keeps fences [default: 7776000000, 90 days].
    fence_ttl_ms: u64, env = "QPQ_FENCE_TTL_MS";
    /// Run one step of the background sweep this often, ms [default: 60000].
    sweep_interval_ms: u64, env = "QPQ_SWEEP_INTERVAL_MS";
    /// Sustained enqueues per second per sender identity [default: 10000].
    enqueue_per_sender_per_sec: u32, env = "QPQ_ENQUEUE_PER_SENDER_PER_SEC";
    /// Enqueue burst per sender identity [default: 20000].
    enqueue_per_sender_burst: u32, env = "QPQ_ENQUEUE_PER_SENDER_BURST";
    /// KeyPackage/hybrid-key fetches per second per (requester, target) [default: 1].
    key_fetch_per_pair_per_sec: u32, env = "QPQ_KEY_FETCH_PER_PAIR_PER_SEC";
    /// KeyPackage/hybrid-key fetch burst per (requester, target) [default: 20].
    key_fetch_per_pair_burst: u32, env = "QPQ_KEY_FETCH_PER_PAIR_BURST";
    /// KeyPackage fetches per second per target, all requesters together [default: 5].
    key_package_fetch_per_target_per_sec: u32, env = "QPQ_KEY_PACKAGE_FETCH_PER_TARGET_PER_SEC";
    /// KeyPackage fetch burst per target [default: 100].
    key_package_fetch_per_target_burst: u32, env = "QPQ_KEY_PACKAGE_FETCH_PER_TARGET_BURST";
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid value for `{key}`: {message}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Where the machine's state is stored.
#[derive(Clone, PartialEq, Eq)]
pub enum Storage {
    /// The embedded fjall database, `<data_dir>/qpq.db`.
    Fjall,
    /// A PostgreSQL database, shared by every node configured with it.
    Postgres {
        /// The connection string (may hold a password: show it through
        /// [`crate::store::postgres::redact_url`]).
        url: String,
    },
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Fjall => f.write_str("Fjall"),
            // The URL may hold a password.
            Storage::Postgres { url } => f
                .debug_struct("Postgres")
                .field("url", &crate::store::postgres::redact_url(url))
                .finish(),
        }
    }
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The storage backend.
    pub storage: Storage,
    /// Bytes kept free on the database's filesystem (0: not checked).
    pub storage_reserve_bytes: u64,
    /// Log filter, added to [`DEFAULT_LOG`] ([`ServerConfig::log_filter`]).
    pub log: String,
    /// How often a summary line is logged, if at all.
    pub log_summary_interval: Option<Duration>,
    /// Where to serve Prometheus metrics over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Served certificate and key, or `None` for the generated one.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Transport limits.
    pub transport: TransportLimits,
    /// The machine's configuration (durability and limits).
    pub node: NodeConfig,
}

/// Limits the shell applies to QUIC connections and streams, and the
/// service's sweep cadence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportLimits {
    /// Connections open at once.
    pub connections_max: u32,
    /// Connections per IP address.
    pub connections_per_ip_max: u32,
    /// Handshakes in progress.
    pub pending_handshakes_max: u32,
    /// Handshakes from addresses not yet validated in progress; beyond it,
    /// a QUIC Retry.
    pub unvalidated_handshakes_max: u32,
    /// Concurrent bidirectional streams per connection.
    pub streams_per_connection_max: u32,
    /// Connection receive window, and bytes of unanswered requests held.
    pub connection_receive_window_bytes: u32,
    /// Bytes of fetch replies in the making or unread per connection.
    pub connection_reply_bytes_max: u32,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Time to receive a whole request.
    pub request_timeout: Duration,
    /// Handshake timeout.
    pub handshake_timeout: Duration,
    /// How often the service runs a step of the machine's sweep.
    pub sweep_interval: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            connections_max: transport::CONNECTIONS_MAX,
            connections_per_ip_max: transport::CONNECTIONS_PER_IP_MAX,
            pending_handshakes_max: transport::PENDING_HANDSHAKES_MAX,
            unvalidated_handshakes_max: transport::UNVALIDATED_HANDSHAKES_MAX,
            streams_per_connection_max: transport::STREAMS_PER_CONNECTION_MAX,
            connection_receive_window_bytes: transport::CONNECTION_RECEIVE_WINDOW_BYTES,
            connection_reply_bytes_max: transport::CONNECTION_REPLY_BYTES_MAX,
            idle_timeout: Duration::from_millis(transport::IDLE_TIMEOUT_MS),
            request_timeout: Duration::from_millis(transport::REQUEST_TIMEOUT_MS),
            handshake_timeout: Duration::from_millis(transport::HANDSHAKE_TIMEOUT_MS),
            sweep_interval: Duration::from_millis(transport::SWEEP_INTERVAL_MS),
        }
    }
}

impl ServerConfig {
    /// Resolves the configuration from parsed flags (which already include
    /// the environment) and the config file.
    pub fn load(args: Args) -> Result<ServerConfig, ConfigError> {
        Ok(Self::load_explained(args)?.0)
    }

    /// [`ServerConfig::load`], also naming the keys the config file, the
    /// environment or the flags set (the others took their defaults).
    pub fn load_explained(args: Args) -> Result<(ServerConfig, Vec<&'static str>), ConfigError> {
        let (path, required) = match args.config {
            Some(p) => (p, true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let merged = read_file(&path, required)?.merge(args.overrides);
        let set = merged.set_keys();
        Ok((Self::resolve(merged)?, set))
    }

    /// [`ServerConfig::load`] for `qpq-server migrate`, which reads the
    /// fjall database of `data_dir` and writes to `postgres_url` whatever
    /// `storage` says: the resolved storage is PostgreSQL.
    pub fn load_for_migration(args: Args) -> Result<ServerConfig, ConfigError> {
        let (path, required) = match args.config {
            Some(p) => (p, true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let mut merged = read_file(&path, required)?.merge(args.overrides);
        merged.storage = Some("postgres".into());
        Self::resolve(merged)
    }

    /// Resolves a merged set of keys against the defaults.
    pub fn resolve(c: FileConfig) -> Result<ServerConfig, ConfigError> {
        let listen_str = c.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_str.parse().map_err(|e| ConfigError::Value {
            key: "listen",
            message: format!("`{listen_str}` is not an address:port ({e})"),
        })?;
        let metrics_listen = match c.metrics_listen.as_deref() {
            None | Some("") => None,
            Some(s) => Some(s.parse().map_err(|e| ConfigError::Value {
                key: "metrics_listen",
                message: format!("`{s}` is not an address:port ({e})"),
            })?),
        };
        let durability = match c.durability.as_deref().unwrap_or("fsync") {
            "fsync" => Durability::Fsync,
            "buffered" => Durability::Buffered,
            other => {
                return Err(ConfigError::Value {
                    key: "durability",
                    message: format!("`{other}`: expected `fsync` or `buffered`"),
                });
            }
        };
        let storage = match (c.storage.as_deref().unwrap_or("fjall"), c.postgres_url) {
            ("fjall", None) => Storage::Fjall,
            ("fjall", Some(_)) => {
                return Err(ConfigError::Value {
                    key: "postgres_url",
                    message: "is set, but storage is `fjall`; set storage = \"postgres\" to use it"
                        .into(),
                });
            }
            ("postgres", Some(url)) if !url.trim().is_empty() => Storage::Postgres { url },
            ("postgres", _) => {
                return Err(ConfigError::Value {
                    key: "postgres_url",
                    message: "storage = \"postgres\" needs a connection string".into(),
                });
            }
            (other, _) => {
                return Err(ConfigError::Value {
                    key: "storage",
                    message: format!("`{other}`: expected `fjall` or `postgres`"),
                });
            }
        };
        let tls = match (c.tls_cert, c.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Value {
                    key: "tls_cert",
                    message: "tls_cert and tls_key must be given together".to_owned(),
                });
            }
        };
        let d = NodeConfig::default();
        let payload_bytes_max = c.payload_bytes_max.unwrap_or(d.payload_bytes_max);
        if payload_bytes_max == 0 || payload_bytes_max > limits::PAYLOAD_BYTES_MAX {
            return Err(ConfigError::Value {
                key: "payload_bytes_max",
                message: format!("must be between 1 and {}", limits::PAYLOAD_BYTES_MAX),
            });
        }
        let fetch_wait_timeout_ms_max = c
            .fetch_wait_timeout_ms_max
            .unwrap_or(d.fetch_wait_timeout_ms_max);
        let t = TransportLimits::default();
        let idle_timeout = c
            .idle_timeout_ms
            .map_or(t.idle_timeout, Duration::from_millis);
        if Duration::from_millis(fetch_wait_timeout_ms_max) >= idle_timeout {
            return Err(ConfigError::Value {
                key: "fetch_wait_timeout_ms_max",
                message: "must be shorter than idle_timeout_ms, or waiting connections are closed as idle".to_owned(),
            });
        }
        let streams = c
            .streams_per_connection_max
            .unwrap_or(t.streams_per_connection_max);
        if streams == 0 {
            return Err(ConfigError::Value {
                key: "streams_per_connection_max",
                message: "must be at least 1".to_owned(),
            });
        }
        // Both connection budgets must hold the largest message, or it
        // could never be received or sent.
        let receive_window = c
            .connection_receive_window_bytes
            .unwrap_or(t.connection_receive_window_bytes);
        if (receive_window as usize) < REQUEST_BYTES_MAX {
            return Err(ConfigError::Value {
                key: "connection_receive_window_bytes",
                message: format!("must be at least the largest request, {REQUEST_BYTES_MAX}"),
            });
        }
        let reply_bytes = c
            .connection_reply_bytes_max
            .unwrap_or(t.connection_reply_bytes_max);
        if (reply_bytes as usize) < REPLY_BYTES_MAX {
            return Err(ConfigError::Value {
                key: "connection_reply_bytes_max",
                message: format!("must be at least the largest reply, {REPLY_BYTES_MAX}"),
            });
        }
        Ok(ServerConfig {
            listen,
            data_dir: c
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            storage,
            storage_reserve_bytes: c
                .storage_reserve_bytes
                .unwrap_or(DEFAULT_STORAGE_RESERVE_BYTES),
            log: c.log.unwrap_or_else(|| DEFAULT_LOG.to_owned()),
            log_summary_interval: match c.log_summary_interval_ms.unwrap_or(SUMMARY_INTERVAL_MS) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            metrics_listen,
            tls,
            transport: TransportLimits {
                connections_max: c.connections_max.unwrap_or(t.connections_max),
                connections_per_ip_max: c
                    .connections_per_ip_max
                    .unwrap_or(t.connections_per_ip_max),
                pending_handshakes_max: c
                    .pending_handshakes_max
                    .unwrap_or(t.pending_handshakes_max),
                unvalidated_handshakes_max: c
                    .unvalidated_handshakes_max
                    .unwrap_or(t.unvalidated_handshakes_max),
                streams_per_connection_max: streams,
                connection_receive_window_bytes: receive_window,
                connection_reply_bytes_max: reply_bytes,
                idle_timeout,
                request_timeout: c
                    .request_timeout_ms
                    .map_or(t.request_timeout, Duration::from_millis),
                handshake_timeout: t.handshake_timeout,
                sweep_interval: c
                    .sweep_interval_ms
                    .filter(|ms| *ms > 0)
                    .map_or(t.sweep_interval, Duration::from_millis),
            },
            node: NodeConfig {
                durability,
                payload_bytes_max,
                key_package_bytes_max: d.key_package_bytes_max,
                key_packages_per_identity_max: c
                    .key_packages_per_identity_max
                    .unwrap_or(d.key_packages_per_identity_max),
                queue_depth_max: c.queue_depth_max.unwrap_or(d.queue_depth_max),
                queue_bytes_max: c.queue_bytes_max.unwrap_or(d.queue_bytes_max),
                fetch_wait_timeout_ms_max,
                waiters_per_connection_max: c
                    .waiters_per_connection_max
                    .unwrap_or(d.waiters_per_connection_max),
                waiters_max: c.waiters_max.unwrap_or(d.waiters_max),
                connections_max: d.connections_max,
                message_ttl: c
                    .message_ttl_ms
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis)
                    .or(d.message_ttl),
                fence_ttl: match c.fence_ttl_ms {
                    Some(0) => None,
                    Some(ms) => Some(Duration::from_millis(ms)),
                    None => d.fence_ttl,
                },
                enqueue_rate: RateConfig {
                    burst: c.enqueue_per_sender_burst.unwrap_or(d.enqueue_rate.burst),
                    per_sec: c
                        .enqueue_per_sender_per_sec
                        .unwrap_or(d.enqueue_rate.per_sec),
                },
                key_fetch_pair_rate: RateConfig {
                    burst: c
                        .key_fetch_per_pair_burst
                        .unwrap_or(d.key_fetch_pair_rate.burst),
                    per_sec: c
                        .key_fetch_per_pair_per_sec
                        .unwrap_or(d.key_fetch_pair_rate.per_sec),
                },
                key_package_fetch_target_rate: RateConfig {
                    burst: c
                        .key_package_fetch_per_target_burst
                        .unwrap_or(d.key_package_fetch_target_rate.burst),
                    per_sec: c
                        .key_package_fetch_per_target_per_sec
                        .unwrap_or(d.key_package_fetch_target_rate.per_sec),
                },
            },
        })
    }

    /// The database directory, `<data_dir>/qpq.db`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(DB_DIR_NAME)
    }

    /// The tracing filter the server logs with: [`DEFAULT_LOG`] followed
    /// by the `log` setting, whose directives win where they name the same
    /// target (`debug` raises everything but the storage engine;
    /// `fjall=info` raises the storage engine too).
    pub fn log_filter(&self) -> String {
        if self.log == DEFAULT_LOG || self.log.trim().is_empty() {
            DEFAULT_LOG.to_owned()
        } else {
            format!("{DEFAULT_LOG},{}", self.log)
        }
    }

    /// The settings in effect, one `key = value` line per key in the
    /// file's syntax (so the text is itself a config file that gives the
    /// same settings), each key not set anywhere marked `# default`; a key
    /// that is off is a comment. The PostgreSQL password is hidden.
    /// `set` names the keys the file, the environment or the flags set.
    pub fn effective_toml(&self, set: &[&str]) -> String {
        fn text(s: &str) -> String {
            toml::Value::String(s.to_owned()).to_string()
        }
        fn path(p: &Path) -> String {
            text(&p.to_string_lossy())
        }
        fn ms(d: Duration) -> String {
            d.as_millis().to_string()
        }
        let n = &self.node;
        let t = &self.transport;
        let off = |what: &str| format!("# off: {what}");
        let lines: Vec<(&str, String)> = vec![
            ("listen", text(&self.listen.to_string())),
            ("data_dir", path(&self.data_dir)),
            (
                "durability",
                text(match n.durability {
                    Durability::Fsync => "fsync",
                    Durability::Buffered => "buffered",
                }),
            ),
            (
                "storage",
                text(match self.storage {
                    Storage::Fjall => "fjall",
                    Storage::Postgres { .. } => "postgres",
                }),
            ),
            (
                "postgres_url",
                match &self.storage {
                    Storage::Postgres { url } => text(&crate::store::postgres::redact_url(url)),
                    Storage::Fjall => off("storage is fjall"),
                },
            ),
            ("log", text(&self.log)),
            (
                "log_summary_interval_ms",
                self.log_summary_interval.map_or("0".to_owned(), ms),
            ),
            (
                "storage_reserve_bytes",
                self.storage_reserve_bytes.to_string(),
            ),
            (
                "metrics_listen",
                self.metrics_listen
                    .map_or_else(|| off("no metrics endpoint"), |a| text(&a.to_string())),
            ),
            (
                "tls_cert",
                self.tls.as_ref().map_or_else(
                    || off("the certificate generated in data_dir"),
                    |(cert, _)| path(cert),
                ),
            ),
            (
                "tls_key",
                self.tls.as_ref().map_or_else(
                    || off("the key generated in data_dir"),
                    |(_, key)| path(key),
                ),
            ),
            ("connections_max", t.connections_max.to_string()),
            (
                "connections_per_ip_max",
                t.connections_per_ip_max.to_string(),
            ),
            (
                "pending_handshakes_max",
                t.pending_handshakes_max.to_string(),
            ),
            (
                "unvalidated_handshakes_max",
                t.unvalidated_handshakes_max.to_string(),
            ),
            (
                "streams_per_connection_max",
                t.streams_per_connection_max.to_string(),
            ),
            (
                "connection_receive_window_bytes",
                t.connection_receive_window_bytes.to_string(),
            ),
            (
                "connection_reply_bytes_max",
                t.connection_reply_bytes_max.to_string(),
            ),
            ("idle_timeout_ms", ms(t.idle_timeout)),
            ("request_timeout_ms", ms(t.request_timeout)),
            ("payload_bytes_max", n.payload_bytes_max.to_string()),
            (
                "key_packages_per_identity_max",
                n.key_packages_per_identity_max.to_string(),
            ),
            ("queue_depth_max", n.queue_depth_max.to_string()),
            ("queue_bytes_max", n.queue_bytes_max.to_string()),
            (
                "fetch_wait_timeout_ms_max",
                n.fetch_wait_timeout_ms_max.to_string(),
            ),
            (
                "waiters_per_connection_max",
                n.waiters_per_connection_max.to_string(),
            ),
            ("waiters_max", n.waiters_max.to_string()),
            ("message_ttl_ms", n.message_ttl.map_or("0".to_owned(), ms)),
            ("fence_ttl_ms", n.fence_ttl.map_or("0".to_owned(), ms)),
            ("sweep_interval_ms", ms(t.sweep_interval)),
            (
                "enqueue_per_sender_per_sec",
                n.enqueue_rate.per_sec.to_string(),
            ),
            ("enqueue_per_sender_burst", n.enqueue_rate.burst.to_string()),
            (
                "key_fetch_per_pair_per_sec",
                n.key_fetch_pair_rate.per_sec.to_string(),
            ),
            (
                "key_fetch_per_pair_burst",
                n.key_fetch_pair_rate.burst.to_string(),
            ),
            (
                "key_package_fetch_per_target_per_sec",
                n.key_package_fetch_target_rate.per_sec.to_string(),
            ),
            (
                "key_package_fetch_per_target_burst",
                n.key_package_fetch_target_rate.burst.to_string(),
            ),
        ];
        let mut out = String::new();
        for (key, value) in lines {
            let line = match value.strip_prefix("# ") {
                Some(comment) => format!("# {key}: {comment}"),
                None => format!("{key} = {value}"),
            };
            if set.contains(&key) {
                out.push_str(&line);
            } else {
                out.push_str(&format!("{line:<60} # default"));
            }
            out.push('\n');
        }
        out
    }
}

fn read_file(path: &Path, required: bool) -> Result<FileConfig, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(FileConfig::default());
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = ServerConfig::resolve(FileConfig::default()).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:7443");
        assert_eq!(c.db_path(), PathBuf::from("qpq-data/qpq.db"));
        assert_eq!(c.storage_reserve_bytes, 256 << 20);
        assert_eq!(c.node.durability, Durability::Fsync);
        assert!(c.tls.is_none());
        assert!(c.metrics_listen.is_none(), "metrics are off by default");
    }

    #[test]
    fn checked_in_config_file_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../qpq-server.toml");
        let file = read_file(&path, true).unwrap();
        let from_file = ServerConfig::resolve(file).unwrap();
        let defaults = ServerConfig::resolve(FileConfig::default()).unwrap();
        assert_eq!(from_file.listen, defaults.listen);
        assert_eq!(from_file.data_dir, defaults.data_dir);
        assert_eq!(from_file.storage, Storage::Fjall);
        assert_eq!(
            from_file.storage_reserve_bytes,
            defaults.storage_reserve_bytes
        );
        assert_eq!(from_file.log, defaults.log);
        assert_eq!(
            from_file.log_summary_interval,
            defaults.log_summary_interval
        );
        assert_eq!(from_file.metrics_listen, defaults.metrics_listen);
        assert_eq!(from_file.transport, defaults.transport);
        assert_eq!(from_file.node, defaults.node);
    }

    #[test]
    fn postgres_storage_needs_its_url_and_only_it_takes_one() {
        let c = ServerConfig::resolve(FileConfig {
            storage: Some("postgres".into()),
            postgres_url: Some("postgres://qpq@127.0.0.1/qpq".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            c.storage,
            Storage::Postgres {
                url: "postgres://qpq@127.0.0.1/qpq".into()
            }
        );
        let e = ServerConfig::resolve(FileConfig {
            storage: Some("postgres".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("postgres_url"), "{e}");
        let e = ServerConfig::resolve(FileConfig {
            postgres_url: Some("postgres://x".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("storage"), "{e}");
        let e = ServerConfig::resolve(FileConfig {
            storage: Some("sqlite".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("`sqlite`"), "{e}");
    }

    #[test]
    fn flags_override_file_and_bad_values_are_named() {
        let file = FileConfig {
            listen: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        let flags = FileConfig {
            listen: Some("127.0.0.1:2".into()),
            durability: Some("buffered".into()),
            ..Default::default()
        };
        let c = ServerConfig::resolve(file.merge(flags)).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.node.durability, Durability::Buffered);
        let bad = FileConfig {
            durability: Some("sometimes".into()),
            ..Default::default()
        };
        let e = ServerConfig::resolve(bad).unwrap_err();
        assert!(e.to_string().contains("durability"), "{e}");
    }

    #[test]
    fn connection_budgets_must_hold_the_largest_message() {
        let small_window = FileConfig {
            connection_receive_window_bytes: Some(REQUEST_BYTES_MAX as u32 - 1),
            ..Default::default()
        };
        let e = ServerConfig::resolve(small_window).unwrap_err();
        assert!(
            e.to_string().contains("connection_receive_window_bytes"),
            "{e}"
        );
        let small_replies = FileConfig {
            connection_reply_bytes_max: Some(REPLY_BYTES_MAX as u32 - 1),
            ..Default::default()
        };
        let e = ServerConfig::resolve(small_replies).unwrap_err();
        assert!(e.to_string().contains("connection_reply_bytes_max"), "{e}");
        let exact = FileConfig {
            connection_receive_window_bytes: Some(REQUEST_BYTES_MAX as u32),
            connection_reply_bytes_max: Some(REPLY_BYTES_MAX as u32),
            ..Default::default()
        };
        assert!(ServerConfig::resolve(exact).is_ok());
    }

    /// Resolves `text` as a config file.
    fn resolve_text(text: &str) -> ServerConfig {
        ServerConfig::resolve(toml::from_str(text).unwrap()).unwrap()
    }

    #[test]
    fn effective_settings_name_every_key_and_read_back_as_the_same_config() {
        let set = FileConfig {
            listen: Some("127.0.0.1:9".into()),
            durability: Some("buffered".into()),
            metrics_listen: Some("127.0.0.1:9464".into()),
            message_ttl_ms: Some(3_600_000),
            fence_ttl_ms: Some(0),
            log: Some("debug".into()),
            ..Default::default()
        };
        let keys = set.set_keys();
        let c = ServerConfig::resolve(set).unwrap();
        let text = c.effective_toml(&keys);
        for key in FileConfig::KEYS {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{key} ="))
                        || l.starts_with(&format!("# {key}:"))),
                "{key} missing from\n{text}"
            );
        }
        assert_eq!(text.lines().count(), FileConfig::KEYS.len());
        assert!(text.contains("listen = \"127.0.0.1:9\"\n"), "{text}");
        assert!(text.contains("# default"), "{text}");
        let back = resolve_text(&text);
        assert_eq!(back.listen, c.listen);
        assert_eq!(back.data_dir, c.data_dir);
        assert_eq!(back.storage, c.storage);
        assert_eq!(back.log, c.log);
        assert_eq!(back.log_summary_interval, c.log_summary_interval);
        assert_eq!(back.metrics_listen, c.metrics_listen);
        assert_eq!(back.storage_reserve_bytes, c.storage_reserve_bytes);
        assert_eq!(back.tls, c.tls);
        assert_eq!(back.transport, c.transport);
        assert_eq!(back.node, c.node);
    }

    #[test]
    fn effective_settings_hide_the_database_password() {
        let c = ServerConfig::resolve(FileConfig {
            storage: Some("postgres".into()),
            postgres_url: Some("postgres://qpq:hunter2@db.example/qpq".into()),
            ..Default::default()
        })
        .unwrap();
        let text = c.effective_toml(&["storage", "postgres_url"]);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("postgres_url = \"postgres://qpq:"), "{text}");
    }

    #[test]
    fn the_log_setting_adds_to_the_default_filter() {
        let c = |log: Option<&str>| {
            ServerConfig::resolve(FileConfig {
                log: log.map(str::to_owned),
                ..Default::default()
            })
            .unwrap()
            .log_filter()
        };
        assert_eq!(c(None), DEFAULT_LOG);
        assert_eq!(c(Some("debug")), format!("{DEFAULT_LOG},debug"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<FileConfig>("listn = \"x\"").unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
    }
}
