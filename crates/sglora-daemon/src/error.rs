//! The daemon's error type: what can go wrong serving a request or running the service. A
//! request's error keeps the library's typed [`sglora::Error`] (an out-of-distribution refusal
//! keeps its similarity, threshold and expert) until the one place that maps errors to the wire,
//! `dbus.rs`. Cheap to clone (coalesced requests share one result).

use std::path::PathBuf;
use std::sync::Arc;

/// Result alias of the daemon crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the service can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The library refused or failed the request (bad description or option, out of
    /// distribution, low expected gain, bundle or model failure, output).
    #[error("{}", generation_message(.0))]
    Generation(Arc<sglora::Error>),
    /// The compute stage is full: `capacity` requests are already queued or running.
    #[error("busy: {}", self.detail())]
    Busy {
        /// `max_concurrent + max_queue`.
        capacity: usize,
    },
    /// This caller already holds `limit` places in the compute stage.
    #[error("busy: {}", self.detail())]
    CallerBusy {
        /// `max_queue_per_caller`.
        limit: usize,
    },
    /// The service is shutting down and takes no new work.
    #[error("the service is stopping; retry once it is back")]
    Stopping,
    /// No cached adapter has this id.
    #[error("not found: {}", self.detail())]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// A cached adapter's files no longer matched their SHA-256 (changed or damaged on disk);
    /// it has been removed from the cache.
    #[error("damaged: {}", self.detail())]
    Damaged {
        /// The adapter's id.
        id: String,
    },
    /// A call past the configured limits (`[embed]`): too many texts or bytes.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The cache database failed (corrupt, locked, read-only, disk full).
    #[error("output {}: cache database: {message}{hint}", path.display())]
    Database {
        /// `cache.db`.
        path: PathBuf,
        /// SQLite's message.
        message: String,
        /// Why the database may not be writable, in words (or empty).
        hint: String,
    },
    /// A file or directory of the service could not be read or written.
    #[error("{action} {}: {cause}", path.display())]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating-system error.
        cause: Arc<std::io::Error>,
    },
    /// The configuration file or a setting is invalid.
    #[error("invalid option: {0}")]
    Config(String),
    /// The D-Bus connection failed (no bus, name taken, policy refused).
    #[error("D-Bus: {0}")]
    Bus(Arc<zbus::Error>),
    /// The drop folder cannot be watched.
    #[error("watching the drop folder: {0}")]
    Watch(Arc<notify::Error>),
    /// A worker task died (a panic in a request, which then fails alone).
    #[error("internal error: {0}")]
    Internal(String),
    /// What the daemon was doing when `source` happened (start-up steps).
    #[error("{what}: {source}")]
    Context {
        /// The step, in words ("opening the cache (/var/lib/sglora/cache.db)").
        what: String,
        /// What went wrong.
        source: Arc<Error>,
    },
}

fn generation_message(e: &sglora::Error) -> String {
    match e {
        sglora::Error::InvalidDescription(m) => format!("invalid description: {m}"),
        sglora::Error::InvalidOption(m) => format!("invalid option: {m}"),
        sglora::Error::InvalidText(m) => format!("invalid text: {m}"),
        e @ sglora::Error::Adapter { .. } => e.to_string(),
        e @ (sglora::Error::OutOfDistribution { .. } | sglora::Error::OutOfScope { .. }) => {
            format!("out of distribution: {e}")
        }
        e @ sglora::Error::LowExpectedGain { .. } => format!("low expected gain: {e}"),
        e => format!("internal error: {e}"),
    }
}

impl From<sglora::Error> for Error {
    fn from(e: sglora::Error) -> Self {
        Error::Generation(Arc::new(e))
    }
}

impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Self {
        Error::Bus(Arc::new(e))
    }
}

impl From<notify::Error> for Error {
    fn from(e: notify::Error) -> Self {
        Error::Watch(Arc::new(e))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(e.to_string())
    }
}

impl Error {
    /// Say what the daemon was doing.
    pub fn context(self, what: impl Into<String>) -> Error {
        Error::Context {
            what: what.into(),
            source: Arc::new(self),
        }
    }

    /// What to tell the caller of a `Busy` or `NotFound`, without the kind in front (the wire's
    /// error name says the kind); for other errors their whole message.
    pub fn detail(&self) -> String {
        match self {
            Error::Busy { capacity } => {
                format!("{capacity} requests are already queued or running; retry later")
            }
            Error::CallerBusy { limit } => format!(
                "you already have {limit} requests queued or running; wait for one to finish"
            ),
            Error::NotFound { id } => format!("no cached adapter with id {id:?}"),
            Error::Damaged { id } => format!(
                "the files of adapter {id:?} were changed or damaged on disk, so it was removed \
                 from the cache; generate it again"
            ),
            Error::TooLarge(m) => m.clone(),
            e => e.to_string(),
        }
    }

    /// The library error at the root of this one, if any (for exit codes).
    pub fn generation(&self) -> Option<&sglora::Error> {
        match self {
            Error::Generation(e) => Some(e),
            Error::Context { source, .. } => source.generation(),
            _ => None,
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            cause: Arc::new(e),
        }
    }
}
