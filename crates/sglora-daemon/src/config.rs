//! Daemon configuration: a TOML file (default `/etc/sglora/sglorad.toml`), systemd's directory
//! variables, then command-line overrides. Every key is optional; `sglorad.toml.example` at the
//! top of the repository documents them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use sglora::Runtime;

use crate::error::{Error, Result};

/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/sglora/sglorad.toml";

/// Which bus to serve on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// The system bus (default under systemd).
    System,
    /// The user's session bus.
    Session,
}

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Model bundle directory (default: the installed bundle or ./models/default).
    pub bundle: Option<PathBuf>,
    /// Bus to use.
    pub bus: BusKind,
    /// Explicit bus address (overrides `bus`).
    pub bus_address: Option<String>,
    /// Persistent state: the cache database and the drop folder.
    pub state_dir: PathBuf,
    /// Cached adapter directories.
    pub cache_dir: PathBuf,
    /// Cache settings.
    pub cache: CacheConfig,
    /// Drop-folder settings.
    pub dropbox: DropboxConfig,
    /// Concurrency limits.
    pub service: ServiceConfig,
    /// Model loading.
    pub model: ModelConfig,
    /// Limits of `Embed` calls.
    pub embed: EmbedConfig,
}

/// Most texts one `Embed` call may ever carry, whatever the configuration says (the D-Bus
/// decoder stops keeping texts past it).
pub const MAX_EMBED_TEXTS: usize = 4096;
/// Most text bytes one `Embed` call may ever carry.
pub const MAX_EMBED_BYTES: usize = 16 << 20;

/// Limits of one `Embed` call; past them the call is refused (`InvalidArgument`) before any
/// work, so a caller cannot grow the service's memory with one call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Texts per call (at most 4096).
    pub max_texts: usize,
    /// Bytes of text per call, all texts together (at most 16 MiB).
    pub max_bytes: usize,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            max_texts: 256,
            max_bytes: 1 << 20,
        }
    }
}

/// How the models are held in memory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The runtime and the encoder's in-memory weights: `auto` ([`Runtime::native`]), `integer`
    /// (sglora's exact integer kernels: least memory, fastest, the same bits on every platform),
    /// `int8` (sglora's f32 FMA chains over the int8 weights), or tract with `fp16` or `fp32`
    /// weights (runs any ONNX encoder).
    pub encoder_weights: Runtime,
}

/// Cache settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Size budget of cached adapters in bytes; least recently used ones are evicted past it.
    pub max_bytes: u64,
    /// Cosine similarity of description embeddings at or above which a cached adapter is served
    /// for a different text (same bundle and options).
    pub similarity_threshold: f64,
}

/// Drop-folder settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DropboxConfig {
    /// Watch the drop folder.
    pub enabled: bool,
    /// Drop-folder root (holds `inbox/`, `outbox/`, `done/`, `failed/`); default `STATE/dropbox`.
    pub dir: Option<PathBuf>,
    /// Largest accepted request file in bytes.
    pub max_file_bytes: u64,
    /// How long a file's size and mtime must stay unchanged before it is read (ms), where the
    /// kernel grants the service no file lease to tell whether a writer still holds it.
    pub settle_ms: u64,
    /// Outputs, processed requests and failure reports older than this are removed (seconds;
    /// 0 keeps them until `max_kept_bytes` needs the room).
    pub retention_secs: u64,
    /// Bytes that `outbox/`, `done/` and `failed/` may hold together; past it the oldest entries
    /// are removed first.
    pub max_kept_bytes: u64,
}

/// Concurrency limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Generations running at once.
    pub max_concurrent: usize,
    /// Requests waiting for a generation slot; past it callers get `Busy`.
    pub max_queue: usize,
    /// Places in the compute stage (running or waiting) one caller may hold; past it that
    /// caller gets `Busy` while the others are still served. Default: a quarter of
    /// `max_concurrent + max_queue` (at least 1).
    pub max_queue_per_caller: Option<usize>,
    /// Seconds to let in-flight work finish on SIGTERM.
    pub shutdown_grace_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 256 * 1024 * 1024,
            similarity_threshold: 0.97,
        }
    }
}

impl Default for DropboxConfig {
    fn default() -> Self {
        DropboxConfig {
            enabled: true,
            dir: None,
            max_file_bytes: 64 * 1024,
            settle_ms: 200,
            retention_secs: 7 * 24 * 3600,
            max_kept_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_concurrent: 2,
            max_queue: 64,
            max_queue_per_caller: None,
            shutdown_grace_secs: 2,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bundle: None,
            bus: BusKind::System,
            bus_address: None,
            state_dir: PathBuf::from("/var/lib/sglora"),
            cache_dir: PathBuf::from("/var/cache/sglora"),
            cache: CacheConfig::default(),
            dropbox: DropboxConfig::default(),
            service: ServiceConfig::default(),
            model: ModelConfig::default(),
            embed: EmbedConfig::default(),
        }
    }
}

impl ServiceConfig {
    /// The places one caller may hold in the compute stage.
    pub fn per_caller(&self) -> usize {
        self.max_queue_per_caller
            .unwrap_or((self.max_concurrent + self.max_queue) / 4)
            .max(1)
    }
}

impl Config {
    /// Read `path`; a missing file is an error only if `required`.
    pub fn load(path: &Path, required: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default().with_env())
            }
            Err(e) => return Err(Error::io("reading the configuration", path, e)),
        };
        let cfg: Config = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("configuration {}: {e}", path.display())))?;
        let cfg = cfg.with_env();
        cfg.check()?;
        Ok(cfg)
    }

    /// Directories from systemd (`STATE_DIRECTORY`, `CACHE_DIRECTORY`) when set; they win over
    /// the file because the unit is what grants access to them.
    pub fn with_env(mut self) -> Config {
        let first = |v: std::ffi::OsString| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        };
        if let Some(p) = std::env::var_os("STATE_DIRECTORY").and_then(first) {
            self.state_dir = p;
        }
        if let Some(p) = std::env::var_os("CACHE_DIRECTORY").and_then(first) {
            self.cache_dir = p;
        }
        self
    }

    /// Range checks.
    pub fn check(&self) -> Result<()> {
        let bad = |s: &str| Err(Error::Config(s.to_string()));
        if !(0.0..=1.0).contains(&self.cache.similarity_threshold) {
            return bad("cache.similarity_threshold must be between 0 and 1");
        }
        if self.service.max_concurrent == 0 {
            return bad("service.max_concurrent must be at least 1");
        }
        let stage = self.service.max_concurrent + self.service.max_queue;
        if self
            .service
            .max_queue_per_caller
            .is_some_and(|n| n == 0 || n > stage)
        {
            return bad(
                "service.max_queue_per_caller must be between 1 and max_concurrent + max_queue",
            );
        }
        if self.service.shutdown_grace_secs > 60 {
            return bad("service.shutdown_grace_secs must be at most 60");
        }
        if self.dropbox.max_file_bytes == 0 || self.dropbox.max_file_bytes > 16 * 1024 * 1024 {
            return bad("dropbox.max_file_bytes must be between 1 and 16 MiB");
        }
        if !(1..=MAX_EMBED_TEXTS).contains(&self.embed.max_texts) {
            return bad("embed.max_texts must be between 1 and 4096");
        }
        if !(1..=MAX_EMBED_BYTES).contains(&self.embed.max_bytes) {
            return bad("embed.max_bytes must be between 1 and 16 MiB");
        }
        if self.dropbox.max_kept_bytes < 1024 * 1024 {
            return bad("dropbox.max_kept_bytes must be at least 1 MiB (an adapter is ~300 KB)");
        }
        Ok(())
    }

    /// Apply command-line overrides (each set one wins over the file and the environment), then
    /// check the ranges again.
    pub fn apply(mut self, o: Overrides) -> Result<Config> {
        if let Some(b) = o.bus {
            self.bus = b;
        }
        if o.bus_address.is_some() {
            self.bus_address = o.bus_address;
        }
        set(&mut self.state_dir, o.state_dir);
        set(&mut self.cache_dir, o.cache_dir);
        if o.dropbox_dir.is_some() {
            self.dropbox.dir = o.dropbox_dir;
        }
        if o.no_dropbox {
            self.dropbox.enabled = false;
        }
        set(&mut self.cache.max_bytes, o.cache_max_bytes);
        set(&mut self.cache.similarity_threshold, o.cache_threshold);
        set(&mut self.service.max_concurrent, o.max_concurrent);
        set(&mut self.service.max_queue, o.max_queue);
        self.check()?;
        Ok(self)
    }

    /// The drop-folder root.
    pub fn dropbox_dir(&self) -> PathBuf {
        self.dropbox
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("dropbox"))
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// Settings given on the command line (`sglora daemon --…`); `None` leaves the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--session` / `--system`.
    pub bus: Option<BusKind>,
    /// `--bus-address`.
    pub bus_address: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--cache-dir`.
    pub cache_dir: Option<PathBuf>,
    /// `--dropbox-dir`.
    pub dropbox_dir: Option<PathBuf>,
    /// `--no-dropbox`.
    pub no_dropbox: bool,
    /// `--cache-max-bytes`.
    pub cache_max_bytes: Option<u64>,
    /// `--cache-threshold`.
    pub cache_threshold: Option<f64>,
    /// `--max-concurrent`.
    pub max_concurrent: Option<usize>,
    /// `--max-queue`.
    pub max_queue: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_rejects_unknown_ones() {
        let t = r#"
            bundle = "/b"
            bus = "session"
            state_dir = "/s"
            cache_dir = "/c"
            [cache]
            max_bytes = 1000
            similarity_threshold = 0.9
            [dropbox]
            enabled = false
            max_file_bytes = 10
            settle_ms = 5
            [service]
            max_concurrent = 3
            max_queue = 4
            shutdown_grace_secs = 1
            [model]
            encoder_weights = "fp32"
        "#;
        let c: Config = toml::from_str(t).unwrap();
        assert_eq!(c.model.encoder_weights, Runtime::Fp32);
        assert!(toml::from_str::<Config>("[model]\nencoder_weights = \"int4\"").is_err());
        // The shipped example parses with every key it sets.
        let example = include_str!("../../../sglorad.toml.example");
        let e: Config = toml::from_str(example).unwrap();
        assert_eq!(e.model.encoder_weights, Runtime::Auto);
        assert_eq!(c.bus, BusKind::Session);
        assert_eq!(c.cache.max_bytes, 1000);
        assert!(!c.dropbox.enabled);
        assert_eq!(c.service.max_queue, 4);
        assert!(toml::from_str::<Config>("colour = 1").is_err());
        assert!(toml::from_str::<Config>("[cache]\nmax_bytes = \"x\"").is_err());
    }
}
