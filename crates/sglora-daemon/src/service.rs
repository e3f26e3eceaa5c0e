//! The generation service shared by the D-Bus interface and the drop folder: cache lookup,
//! coalescing of identical concurrent requests, bounded concurrency and queue, statistics.
//!
//! Every request carries its [`Caller`] (the uid the bus or the file system vouches for). A
//! caller's adapters are its own: its cache scope names it, only it (or an administrator) may
//! read or evict them, and it may hold at most `max_queue_per_caller` places in the compute
//! stage, so one caller's flood cannot make the others `Busy`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{OnceCell, Semaphore};

use sglora::{
    AdapterFiles, Description, Explanation, GenerateOptions, Generator, ResolvedOptions, Runtime,
};

use crate::cache::{Cache, Entry, Match, Stats};
use crate::config::EmbedConfig;
use crate::error::{Error, Result};

/// A served adapter.
#[derive(Debug, Clone)]
pub struct Served {
    /// Cache entry (id, directory, provenance).
    pub entry: Entry,
    /// Whether it came from the cache.
    pub cache_hit: bool,
    /// The files of a fresh generation (a miss), so a caller that delivers them elsewhere (the
    /// drop folder) need not read the cached copy back; `None` for a cache hit.
    pub files: Option<Arc<AdapterFiles>>,
}

/// Counters exposed as D-Bus properties.
#[derive(Debug, Default)]
pub struct Counters {
    /// Successful Generate calls.
    pub served: AtomicU64,
    /// Of which cache hits.
    pub hits: AtomicU64,
    /// Failed requests.
    pub failed: AtomicU64,
    /// Generations actually run.
    pub generated: AtomicU64,
}

/// Who a request is for: the uid that the bus (`GetConnectionUnixUser`) or the drop folder
/// (the request file's owner) vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caller {
    /// The caller's uid.
    pub uid: u32,
}

impl Caller {
    /// The caller with uid `uid`.
    pub fn uid(uid: u32) -> Caller {
        Caller { uid }
    }

    /// Root and the service's own user administer the service: they may evict any adapter,
    /// reload the bundle and list the cache.
    pub fn is_admin(&self) -> bool {
        self.uid == 0 || self.uid == nix::unistd::geteuid().as_raw()
    }
}

type Shared = Arc<OnceCell<Result<Served>>>;

struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Removes an in-flight key when the request that created it ends, however it ends.
struct InflightGuard<'a> {
    map: &'a Mutex<HashMap<String, Shared>>,
    key: String,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Gives a caller's place back when its request leaves the compute stage.
struct LeaveCaller<'a> {
    map: &'a Mutex<HashMap<u32, usize>>,
    uid: u32,
}

impl Drop for LeaveCaller<'_> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// A place in the compute stage (released on drop).
struct Slot<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    _leave: Leave<'a>,
    _leave_caller: LeaveCaller<'a>,
}

/// The request path shared by D-Bus and the drop folder: cache first, coalescing of identical
/// requests, a bounded compute stage, statistics.
pub struct Service {
    generator: RwLock<Arc<Generator>>,
    cache: Mutex<Cache>,
    permits: Semaphore,
    in_stage: AtomicUsize,
    capacity: usize,
    per_caller: usize,
    by_caller: Mutex<HashMap<u32, usize>>,
    stopping: std::sync::atomic::AtomicBool,
    reloading: tokio::sync::Mutex<()>,
    /// The overlay file identity whose reload failed (not retried until the file changes).
    failed_overlay: Mutex<Option<Option<String>>>,
    inflight: Mutex<HashMap<String, Shared>>,
    embed_limits: EmbedConfig,
    /// Request counters, exposed as D-Bus properties.
    pub counters: Counters,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

/// What a cached adapter may be reused for: the caller it was made for, the bundle and every
/// resolved option that changes what is generated or whether it may be generated at all (the
/// out-of-distribution threshold and the minimum expected gain too, so an adapter made under a
/// lowered threshold or without a minimum is never served to a request that would have been
/// refused). The caller is part of it so that nobody is served, or learns from a cache hit,
/// what another caller asked for.
/// The cache scope of a request: the caller, the expert repository's version (the bundle's
/// hash, with the overlay's once experts were added: an added or removed expert can change any
/// retrieval), the runtime whose arithmetic made the adapter (another runtime gives other bytes
/// for the same seed, so a change of `encoder_weights`, or of the default runtime in an upgrade,
/// must not serve the old ones), and every option that changes the result.
fn scope(caller: Caller, repository: &str, runtime: Runtime, o: &ResolvedOptions) -> String {
    let min_gain = o
        .min_expected_gain
        .map_or_else(|| "none".to_string(), |g| g.to_string());
    format!(
        "uid={};{repository};runtime={};seed={};k={};tau={};noise={};ood={};min_sim={};min_gain={min_gain}",
        caller.uid,
        runtime.name(),
        o.seed,
        o.top_k,
        o.temperature,
        o.noise_scale,
        o.allow_ood,
        o.min_similarity
    )
}

/// Whether a cached adapter's provenance records a retrieval of the same kind as `ex`: its top
/// expert of the same relation as `ex`'s (relations from the repository, `relation_of` an
/// expert's name) and the same asked relation (both absent without a relation head).
/// Unreadable provenance, or a top expert the repository no longer has, is not the same.
fn same_retrieval(
    provenance: &str,
    ex: &sglora::Explanation,
    relation_of: impl Fn(&str) -> Option<String>,
) -> bool {
    let Ok(p) = serde_json::from_str::<serde_json::Value>(provenance) else {
        return false;
    };
    let cached_top = p["experts"][0]["name"].as_str().and_then(&relation_of);
    let top = ex.experts.first().and_then(|e| relation_of(&e.name));
    let asked = p["asked_relation"]["relation"].as_str();
    cached_top.is_some()
        && cached_top == top
        && asked == ex.asked_relation.as_ref().map(|r| r.relation.as_str())
}

impl Service {
    /// A service around a loaded generator and an opened cache: at most `max_concurrent`
    /// generations at once, `max_queue` more waiting, of which one caller may hold
    /// `max_queue_per_caller` (at least 1, at most the whole stage).
    pub fn new(
        generator: Generator,
        cache: Cache,
        max_concurrent: usize,
        max_queue: usize,
        max_queue_per_caller: usize,
    ) -> Service {
        let capacity = max_concurrent.max(1) + max_queue;
        Service {
            generator: RwLock::new(Arc::new(generator)),
            cache: Mutex::new(cache),
            permits: Semaphore::new(max_concurrent.max(1)),
            in_stage: AtomicUsize::new(0),
            capacity,
            per_caller: max_queue_per_caller.clamp(1, capacity),
            by_caller: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            reloading: tokio::sync::Mutex::new(()),
            failed_overlay: Mutex::new(None),
            inflight: Mutex::new(HashMap::new()),
            embed_limits: EmbedConfig::default(),
            counters: Counters::default(),
        }
    }

    /// The limits of one [`Service::embed`] call (default: [`EmbedConfig::default`]).
    pub fn with_embed_limits(mut self, limits: EmbedConfig) -> Service {
        self.embed_limits = limits;
        self
    }

    /// One of the caller's cached adapters exported for another runtime (`format`:
    /// `onnx-merged`, `onnx-merged-int8` ([`sglora::onnx_merged`]) or `onnx-adapter`
    /// ([`sglora::onnx_adapter`], for the slotted base `sglora export --base-slotted` writes)) as a read-only file
    /// with no name: written to an unlinked temporary file in the cache directory (`O_TMPFILE`,
    /// the service's alone) and reopened read-only, so the caller needs no access to the cache
    /// and cannot change what it was given. Takes a place in the compute stage like a generation.
    pub async fn export(&self, id: &str, format: &str, caller: Caller) -> Result<std::fs::File> {
        self.check_running()?;
        let precision = match format {
            "onnx-merged" => Some(sglora::Precision::Fp32),
            "onnx-merged-int8" => Some(sglora::Precision::Int8),
            "onnx-adapter" => None,
            other => {
                return Err(sglora::Error::InvalidOption(format!(
                    "unknown export format {other:?}; known: onnx-merged, onnx-merged-int8, \
                     onnx-adapter (the PEFT files themselves: OpenAdapter)"
                ))
                .into())
            }
        };
        let generator = self.generator();
        let entry = self.get(id, caller)?;
        let scratch = self.cache().dir().to_path_buf();
        let _slot = self.enter(caller).await?;
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let lora = generator
                .encoder()
                .load_adapter(&entry.dir)
                .map_err(|e| match e {
                    sglora::Error::Adapter { .. } => Error::Damaged { id },
                    e => e.into(),
                })?;
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_TMPFILE | nix::libc::O_CLOEXEC)
                .open(&scratch)
                .map_err(|e| Error::io("creating an unnamed file in", &scratch, e))?;
            {
                let mut w = std::io::BufWriter::new(&mut f);
                match precision {
                    Some(p) => {
                        sglora::write_onnx_merged(generator.bundle(), &lora, p, &mut w)?;
                    }
                    None => w
                        .write_all(&sglora::onnx_adapter(generator.bundle(), &lora)?)
                        .map_err(|e| Error::io("writing an export in", &scratch, e))?,
                }
                w.flush()
                    .map_err(|e| Error::io("writing an export in", &scratch, e))?;
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            let ro = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(format!("/proc/self/fd/{fd}"))
                .map_err(|e| Error::io("reopening read-only", &scratch, e))?;
            Ok::<_, Error>(ro)
        })
        .await?
    }

    /// Embed `texts` with the bundle's encoder, with one of the caller's cached adapters
    /// applied (`adapter_id`; empty: the base model): `(dim, vectors)`, the vectors row-major
    /// in input order. Past the `[embed]` limits, or with an empty or too long text, the call
    /// is refused before any work; it takes one place in the compute stage, like a generation
    /// (`Busy` past it).
    pub async fn embed(
        &self,
        adapter_id: &str,
        texts: Vec<String>,
        caller: Caller,
    ) -> Result<(usize, Vec<f32>)> {
        self.check_running()?;
        let limits = &self.embed_limits;
        if texts.is_empty() {
            return Err(sglora::Error::InvalidText("no texts to embed".into()).into());
        }
        if texts.len() > limits.max_texts {
            return Err(Error::TooLarge(format!(
                "{} texts in one call; the limit is {} (embed.max_texts): split them",
                texts.len(),
                limits.max_texts
            )));
        }
        let bytes: usize = texts.iter().map(String::len).sum();
        if bytes > limits.max_bytes {
            return Err(Error::TooLarge(format!(
                "{bytes} bytes of text in one call; the limit is {} (embed.max_bytes): split them",
                limits.max_bytes
            )));
        }
        for (i, t) in texts.iter().enumerate() {
            sglora::check_text(i, t)?;
        }
        let generator = self.generator();
        let dir = if adapter_id.is_empty() {
            None
        } else {
            Some(self.get(adapter_id, caller)?.dir)
        };
        let _slot = self.enter(caller).await?;
        let id = adapter_id.to_string();
        let vectors = tokio::task::spawn_blocking(move || {
            let enc = generator.encoder();
            let lora = match &dir {
                Some(d) => Some(enc.load_adapter(d).map_err(|e| match e {
                    // Verified a moment ago: it was evicted or changed since.
                    sglora::Error::Adapter { .. } => Error::Damaged { id },
                    e => e.into(),
                })?),
                None => None,
            };
            let out = enc.embed_texts(&texts, lora.as_ref(), 1)?;
            Ok::<_, Error>((enc.dim(), out))
        })
        .await??;
        let (dim, out) = vectors;
        Ok((dim, out.into_iter().flat_map(|e| e.vector).collect()))
    }

    /// The generator for a new request: the current one, loaded again first when the expert
    /// overlay file changed since (an expert added or removed with the CLI, say), so a change
    /// takes effect at the next request. A reload that fails leaves the current one serving, is
    /// logged, and is not tried again until the file changes once more.
    pub async fn current(&self) -> Arc<Generator> {
        let g = self.generator();
        let Some(now) = g.overlay_changed() else {
            return g;
        };
        let failed = |s: &Self| {
            s.failed_overlay
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        };
        if failed(self) == Some(now.clone()) {
            return g;
        }
        drop(g);
        match self.reload().await {
            Ok(_) => {}
            Err(e) => {
                crate::log::warn(&format!(
                    "the expert overlay changed, but loading it failed; the previous \
                     repository stays in service: {e}"
                ));
                *self
                    .failed_overlay
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(now);
            }
        }
        self.generator()
    }

    /// The current generator.
    pub fn generator(&self) -> Arc<Generator> {
        self.generator
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Re-read the bundle (expert repository and models) from disk on the same runtime and put
    /// it in service; returns the number of experts. A bundle that fails verification leaves the
    /// old one in service. Cached adapters of the old bundle are no longer served because the
    /// bundle hash is part of every cache key.
    ///
    /// Reloads run one at a time, and one asked for while another runs waits for it and then
    /// returns without reading the bundle again (it was just read): a flood of reloads holds
    /// at most one bundle besides the one in service.
    pub async fn reload(&self) -> Result<usize> {
        let before = self.generator();
        let _one = self.reloading.lock().await;
        let current = self.generator();
        if !Arc::ptr_eq(&current, &before) {
            return Ok(current.experts().len());
        }
        drop(before);
        let old = current;
        let g = tokio::task::spawn_blocking(move || old.reload())
            .await?
            .map_err(|e| {
                Error::Internal(format!(
                    "reload failed, the previous bundle stays in service: {e}"
                ))
            })?;
        let n = g.experts().len();
        self.put_in_service(g);
        Ok(n)
    }

    /// Add an adapter (the contents of its `adapter_config.json` and
    /// `adapter_model.safetensors`) as an expert to the overlay in the state directory and put
    /// the repository with it in service; runs with reloads one at a time, so the repository
    /// served afterwards holds it. Requests already running finish on the repository they
    /// started with; new ones (and the cache scope) see the new version.
    pub async fn add_expert(
        &self,
        config: Vec<u8>,
        weights: Vec<u8>,
        req: sglora::AddExpert,
    ) -> Result<sglora::Added> {
        let _one = self.reloading.lock().await;
        let g = self.generator();
        let (added, next) = tokio::task::spawn_blocking(move || -> Result<_> {
            let label = std::path::PathBuf::from(&req.source);
            let lora = g.encoder().load_adapter_bytes(&label, &config, &weights)?;
            let added = g.add_expert(&lora, &req)?;
            let next = g.reload().map_err(|e| {
                Error::Internal(format!(
                    "the expert was added to the overlay, but loading the repository again \
                     failed, so the previous one stays in service: {e}"
                ))
            })?;
            Ok((added, next))
        })
        .await??;
        self.put_in_service(next);
        Ok(added)
    }

    /// Remove an added expert from the overlay and put the repository without it in service.
    pub async fn remove_expert(&self, name: String) -> Result<usize> {
        let _one = self.reloading.lock().await;
        let g = self.generator();
        let next = tokio::task::spawn_blocking(move || -> Result<_> {
            g.remove_expert(&name)?;
            g.reload().map_err(|e| {
                Error::Internal(format!(
                    "the expert was removed from the overlay, but loading the repository again \
                     failed, so the previous one stays in service: {e}"
                ))
            })
        })
        .await??;
        let n = next.experts().len();
        self.put_in_service(next);
        Ok(n)
    }

    fn put_in_service(&self, g: Generator) {
        match self.generator.write() {
            Ok(mut w) => *w = Arc::new(g),
            Err(p) => *p.into_inner() = Arc::new(g),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any generation is queued or running.
    pub fn busy(&self) -> bool {
        self.in_stage.load(Ordering::SeqCst) > 0
    }

    /// Requests queued or running in the compute stage plus distinct in-flight keys; both
    /// return to zero when the daemon is idle, whatever the clients did (a caller that hangs up
    /// mid-call leaves its generation to finish and be cached, nothing else).
    pub fn pending(&self) -> (usize, usize) {
        (
            self.in_stage.load(Ordering::SeqCst),
            self.inflight.lock().map(|m| m.len()).unwrap_or(0),
        )
    }

    /// Cache statistics.
    pub fn cache_stats(&self) -> Stats {
        self.cache().stats().unwrap_or_default()
    }

    /// Stop taking work: from now on every request is refused (`Stopping`), while what is
    /// already running finishes.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn check_running(&self) -> Result<()> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::Stopping);
        }
        Ok(())
    }

    /// Look up one of the caller's adapters by id (an administrator's: any). Another caller's
    /// adapter is `NotFound`, exactly like one that does not exist, so an id says nothing to
    /// anyone but its owner.
    pub fn get(&self, id: &str, caller: Caller) -> Result<Entry> {
        let owner = (!caller.is_admin()).then_some(caller.uid);
        self.cache()
            .get_owned(id, owner)?
            .ok_or_else(|| Error::NotFound { id: id.to_string() })
    }

    /// Evict one of the caller's adapters; false if it has none with this id (another
    /// caller's adapter included).
    pub fn evict(&self, id: &str, caller: Caller) -> Result<bool> {
        let mut cache = self.cache();
        match cache.get_owned(id, Some(caller.uid)) {
            Ok(Some(_)) => cache.remove(id),
            Ok(None) => Ok(false),
            // Found but damaged: already removed.
            Err(Error::Damaged { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Evict any adapter (the administrator's `Evict`); false if there was none.
    pub fn evict_any(&self, id: &str) -> Result<bool> {
        self.cache().remove(id)
    }

    /// Every cached adapter (id, owner uid, bytes, last used in ms since the epoch, hits), for
    /// the administrator.
    pub fn list(&self) -> Result<Vec<crate::cache::Listed>> {
        self.cache().list()
    }

    /// Serve an adapter for a description: exact-text cache hit, else embed and try a near
    /// duplicate, else generate (one generation for concurrent identical requests).
    pub async fn generate(
        &self,
        description: &str,
        options: &GenerateOptions,
        caller: Caller,
    ) -> Result<Served> {
        let r = self.generate_inner(description, options, caller).await;
        match &r {
            Ok(s) => {
                self.counters.served.fetch_add(1, Ordering::Relaxed);
                if s.cache_hit {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    async fn generate_inner(
        &self,
        description: &str,
        options: &GenerateOptions,
        caller: Caller,
    ) -> Result<Served> {
        self.check_running()?;
        let generator = self.current().await;
        let description = Description::new(description)?;
        let opts = generator.resolve(options)?;
        let scope = scope(
            caller,
            &generator.repository_version(),
            generator.encoder().runtime(),
            &opts,
        );
        if let Some((entry, _)) = self.cache().lookup(&description, &scope, None)? {
            return Ok(Served {
                entry,
                cache_hit: true,
                files: None,
            });
        }
        let key = format!("{scope}\u{0}{}", description.sha256());
        let (slot, created) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&key) {
                Some(s) => (s.clone(), false),
                None => {
                    let s: Shared = Arc::new(OnceCell::new());
                    inflight.insert(key.clone(), s.clone());
                    (s, true)
                }
            }
        };
        // The caller that created the key removes it when done, also if its future is dropped
        // midway (a caller that hangs up), so the map never keeps finished or abandoned work.
        let _guard = created.then(|| InflightGuard {
            map: &self.inflight,
            key,
        });
        slot.get_or_init(|| self.embed_lookup_generate(generator, description, scope, opts, caller))
            .await
            .clone()
    }

    /// Take a place in the bounded compute stage: past the caller's `max_queue_per_caller`
    /// places, or past `max_concurrent + max_queue` requests in all, refuse with `Busy`
    /// instead of queueing without bound; then wait for a compute permit.
    async fn enter(&self, caller: Caller) -> Result<Slot<'_>> {
        {
            let mut m = self.by_caller.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(caller.uid).or_insert(0);
            if *n >= self.per_caller {
                let limit = self.per_caller;
                if *n == 0 {
                    m.remove(&caller.uid);
                }
                return Err(Error::CallerBusy { limit });
            }
            *n += 1;
        }
        let leave_caller = LeaveCaller {
            map: &self.by_caller,
            uid: caller.uid,
        };
        if self.in_stage.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.in_stage.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Busy {
                capacity: self.capacity,
            });
        }
        let leave = Leave(&self.in_stage);
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Slot {
            _permit: permit,
            _leave: leave,
            _leave_caller: leave_caller,
        })
    }

    /// Retrieval only (no generation), under the same concurrency bound as generation.
    pub async fn explain(
        &self,
        description: &str,
        options: &GenerateOptions,
        caller: Caller,
    ) -> Result<Explanation> {
        self.check_running()?;
        let generator = self.current().await;
        let description = Description::new(description)?;
        let opts = generator.resolve(options)?;
        let _slot = self.enter(caller).await?;
        Ok(tokio::task::spawn_blocking(move || {
            let e = generator.embed(description)?;
            Ok::<_, sglora::Error>(generator.explain(&e, opts))
        })
        .await??)
    }

    async fn embed_lookup_generate(
        &self,
        generator: Arc<Generator>,
        description: Description,
        scope: String,
        opts: ResolvedOptions,
        caller: Caller,
    ) -> Result<Served> {
        let _slot = self.enter(caller).await?;
        let g = generator.clone();
        let (embedded, explanation) = tokio::task::spawn_blocking(move || {
            let e = g.embed(description)?;
            // Refuse what a fresh generation would refuse before a near-duplicate's adapter is
            // served: the cached neighbour passed the checks for its own text, not this one's.
            let ex = g.explain(&e, opts);
            ex.check()?;
            Ok::<_, sglora::Error>((e, ex))
        })
        .await??;
        // A near-duplicate text is served only if its retrieval is of the same kind as this
        // one's: a top expert of the same relation and, with a relation head, the same asked
        // relation. Two texts a word apart can ask for opposite relations ("the group this
        // belongs to" / "a member of this group") and still embed within the threshold.
        let relation_of = |name: &str| {
            generator
                .experts()
                .metas()
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.relation.clone())
        };
        let same = |provenance: &str| same_retrieval(provenance, &explanation, relation_of);
        if let Some((entry, m)) = self.cache().lookup_where(
            &embedded.description,
            &scope,
            Some(&embedded.embedding.vector),
            same,
        )? {
            debug_assert!(m == Match::Similar || m == Match::Exact);
            return Ok(Served {
                entry,
                cache_hit: true,
                files: None,
            });
        }
        let (generation, files) = tokio::task::spawn_blocking(move || {
            let generation = generator.generate_explained(embedded, explanation)?;
            let files = generator.adapter_files(&generation)?;
            Ok::<_, sglora::Error>((generation, files))
        })
        .await??;
        let entry = self.cache().insert(
            &generation.description,
            &scope,
            caller.uid,
            &generation.embedding,
            &files,
        )?;
        self.counters.generated.fetch_add(1, Ordering::Relaxed);
        Ok(Served {
            entry,
            cache_hit: false,
            files: Some(Arc::new(files)),
        })
    }
}
