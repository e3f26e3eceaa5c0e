//! The generation service shared by the D-Bus interface and the drop folder: cache lookup,
//! coalescing of identical concurrent requests, bounded concurrency and queue, statistics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{OnceCell, Semaphore};

use sglora::{AdapterFiles, Description, Explanation, GenerateOptions, Generator, ResolvedOptions};

use crate::cache::{Cache, Entry, Match, Stats};
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

/// A place in the compute stage (released on drop).
struct Slot<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    _leave: Leave<'a>,
}

/// The request path shared by D-Bus and the drop folder: cache first, coalescing of identical
/// requests, a bounded compute stage, statistics.
pub struct Service {
    generator: RwLock<Arc<Generator>>,
    cache: Mutex<Cache>,
    permits: Semaphore,
    in_stage: AtomicUsize,
    capacity: usize,
    inflight: Mutex<HashMap<String, Shared>>,
    /// Request counters, exposed as D-Bus properties.
    pub counters: Counters,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

/// What a cached adapter may be reused for: the bundle and every resolved option that changes
/// what is generated or whether it may be generated at all (the out-of-distribution threshold
/// and the minimum expected gain too, so an adapter made under a lowered threshold or without a
/// minimum is never served to a request that would have been refused).
fn scope(bundle_hash: &str, o: &ResolvedOptions) -> String {
    let min_gain = o
        .min_expected_gain
        .map_or_else(|| "none".to_string(), |g| g.to_string());
    format!(
        "{bundle_hash};seed={};k={};tau={};noise={};ood={};min_sim={};min_gain={min_gain}",
        o.seed, o.top_k, o.temperature, o.noise_scale, o.allow_ood, o.min_similarity
    )
}

impl Service {
    /// A service around a loaded generator and an opened cache.
    pub fn new(
        generator: Generator,
        cache: Cache,
        max_concurrent: usize,
        max_queue: usize,
    ) -> Service {
        Service {
            generator: RwLock::new(Arc::new(generator)),
            cache: Mutex::new(cache),
            permits: Semaphore::new(max_concurrent.max(1)),
            in_stage: AtomicUsize::new(0),
            capacity: max_concurrent.max(1) + max_queue,
            inflight: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
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
    pub async fn reload(&self) -> Result<usize> {
        let old = self.generator();
        let g = tokio::task::spawn_blocking(move || old.reload())
            .await?
            .map_err(|e| {
                Error::Internal(format!(
                    "reload failed, the previous bundle stays in service: {e}"
                ))
            })?;
        let n = g.experts().len();
        match self.generator.write() {
            Ok(mut w) => *w = Arc::new(g),
            Err(p) => *p.into_inner() = Arc::new(g),
        }
        Ok(n)
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

    /// Look up an adapter by id.
    pub fn get(&self, id: &str) -> Result<Entry> {
        self.cache()
            .get(id)?
            .ok_or_else(|| Error::NotFound { id: id.to_string() })
    }

    /// Evict an adapter; false if there was none.
    pub fn evict(&self, id: &str) -> Result<bool> {
        self.cache().remove(id)
    }

    /// Serve an adapter for a description: exact-text cache hit, else embed and try a near
    /// duplicate, else generate (one generation for concurrent identical requests).
    pub async fn generate(&self, description: &str, options: &GenerateOptions) -> Result<Served> {
        let r = self.generate_inner(description, options).await;
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

    async fn generate_inner(&self, description: &str, options: &GenerateOptions) -> Result<Served> {
        let generator = self.generator();
        let description = Description::new(description)?;
        let opts = generator.resolve(options)?;
        let scope = scope(&generator.bundle().hash, &opts);
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
        slot.get_or_init(|| self.embed_lookup_generate(generator, description, scope, opts))
            .await
            .clone()
    }

    /// Take a place in the bounded compute stage: past `max_concurrent + max_queue` requests,
    /// refuse with `Busy` instead of queueing without bound; then wait for a compute permit.
    async fn enter(&self) -> Result<Slot<'_>> {
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
        })
    }

    /// Retrieval only (no generation), under the same concurrency bound as generation.
    pub async fn explain(
        &self,
        description: &str,
        options: &GenerateOptions,
    ) -> Result<Explanation> {
        let generator = self.generator();
        let description = Description::new(description)?;
        let opts = generator.resolve(options)?;
        let _slot = self.enter().await?;
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
    ) -> Result<Served> {
        let _slot = self.enter().await?;
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
        if let Some((entry, m)) = self.cache().lookup(
            &embedded.description,
            &scope,
            Some(&embedded.embedding.vector),
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
