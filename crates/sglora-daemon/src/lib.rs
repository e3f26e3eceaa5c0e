//! # sglora-daemon
//!
//! The sglora service around the [`sglora`] library: the D-Bus interface
//! `org.sglora.Generator1`, the watched drop folder, the SQLite adapter cache, and the systemd
//! glue (readiness, watchdog, signals, drain). The library does the generating; this crate only
//! decides when, caches the result and delivers it. `ARCHITECTURE.md` maps the request path.
//!
//! [`run`] is the whole daemon for a configuration ([`Config`]); the pieces are public for tests
//! and tools: [`Service`] (cache first, coalescing, bounded compute stage), [`Cache`],
//! [`Dropbox`] and the interface objects [`Generator1`] and [`Admin1`].
#![deny(missing_docs)]

mod accounts;
mod acl;
mod cache;
mod config;
mod daemon;
mod dbus;
mod dirs;
mod dropbox;
mod error;
mod index;
mod log;
mod service;

pub use cache::{is_valid_id, Cache, Entry, Listed, Match, Stats, SCHEMA_VERSION};
pub use config::{
    BusKind, CacheConfig, Config, DropboxConfig, EmbedConfig, ModelConfig, Overrides,
    ServiceConfig, DEFAULT_CONFIG, MAX_EMBED_BYTES, MAX_EMBED_TEXTS,
};
pub use daemon::{run, run_blocking, sd_notify};
pub use dbus::{
    notify_properties, parse_options, Admin1, Bounded, Callers, DbusError, Generator1, Options,
    Text, Texts, ADMIN_INTERFACE, BUS_NAME, MAX_OPTIONS, OBJECT_PATH,
};
pub use dropbox::{parse_request, sanitize, triage, Dropbox, Triage, Watch};
pub use error::{Error, Result};
pub use service::{Caller, Counters, Served, Service};
