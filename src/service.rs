//! The generation service shared by the D-Bus interface and the drop folder: cache lookup,
//! coalescing of identical concurrent requests, bounded concurrency and queue, statistics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{OnceCell, Semaphore};

use crate::cache::{Cache, Entry, Match};
use crate::error::Error;
use crate::generator::{validate_description, GenerateOptions, Generator, ResolvedOptions};

/// Why a request failed, as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceError {
    /// Bad description.
    InvalidDescription(String),
    /// Bad option.
    InvalidOption(String),
    /// No expert close enough.
    OutOfDistribution(String),
    /// Queue full.
    Busy(String),
    /// Unknown adapter id.
    NotFound(String),
    /// Anything else (I/O, model).
    Internal(String),
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, m) = match self {
            ServiceError::InvalidDescription(m) => ("invalid description", m),
            ServiceError::InvalidOption(m) => ("invalid option", m),
            ServiceError::OutOfDistribution(m) => ("out of distribution", m),
            ServiceError::Busy(m) => ("busy", m),
            ServiceError::NotFound(m) => ("not found", m),
            ServiceError::Internal(m) => ("internal error", m),
        };
        write!(f, "{k}: {m}")
    }
}

impl From<Error> for ServiceError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidDescription(m) => ServiceError::InvalidDescription(m),
            Error::InvalidOption(m) => ServiceError::InvalidOption(m),
            e @ Error::OutOfDistribution { .. } => ServiceError::OutOfDistribution(e.to_string()),
            e => ServiceError::Internal(e.to_string()),
        }
    }
}

/// A served adapter.
#[derive(Debug, Clone)]
pub struct Served {
    /// Cache entry (id, directory, provenance).
    pub entry: Entry,
    /// Whether it came from the cache.
    pub cache_hit: bool,
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

type Shared = Arc<OnceCell<Result<Served, ServiceError>>>;

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

/// The service.
pub struct Service {
    gen: RwLock<Arc<Generator>>,
    cache: Mutex<Cache>,
    permits: Semaphore,
    in_stage: AtomicUsize,
    capacity: usize,
    inflight: Mutex<HashMap<String, Shared>>,
    /// Statistics.
    pub counters: Counters,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

fn scope(bundle_hash: &str, o: &ResolvedOptions) -> String {
    format!(
        "{bundle_hash};seed={};k={};tau={};noise={};ood={}",
        o.seed, o.top_k, o.temperature, o.noise_scale, o.allow_ood
    )
}

fn internal<E: std::fmt::Display>(e: E) -> ServiceError {
    ServiceError::Internal(e.to_string())
}

impl Service {
    /// A service around a loaded generator and an opened cache.
    pub fn new(gen: Generator, cache: Cache, max_concurrent: usize, max_queue: usize) -> Service {
        Service {
            gen: RwLock::new(Arc::new(gen)),
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
        self.gen
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Replace the generator (after reloading the bundle); cached adapters of the old bundle are
    /// no longer served because the bundle hash is part of every cache key.
    pub fn replace_generator(&self, g: Generator) {
        match self.gen.write() {
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
    pub fn cache_stats(&self) -> crate::cache::Stats {
        self.cache().stats().unwrap_or_default()
    }

    /// Look up an adapter by id.
    pub fn get(&self, id: &str) -> Result<Entry, ServiceError> {
        self.cache()
            .get(id)
            .map_err(internal)?
            .ok_or_else(|| ServiceError::NotFound(format!("no cached adapter with id {id:?}")))
    }

    /// Evict an adapter; false if there was none.
    pub fn evict(&self, id: &str) -> Result<bool, ServiceError> {
        self.cache().remove(id).map_err(internal)
    }

    /// Serve an adapter for a description: exact-text cache hit, else embed and try a near
    /// duplicate, else generate (one generation for concurrent identical requests).
    pub async fn generate(
        &self,
        description: &str,
        options: &GenerateOptions,
    ) -> Result<Served, ServiceError> {
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

    async fn generate_inner(
        &self,
        description: &str,
        options: &GenerateOptions,
    ) -> Result<Served, ServiceError> {
        let gen = self.generator();
        let text = validate_description(description)?.to_string();
        let opts = gen.resolve(options)?;
        let scope = scope(&gen.bundle().hash, &opts);
        if let Some((entry, _)) = self.cache().lookup(&text, &scope, None).map_err(internal)? {
            return Ok(Served {
                entry,
                cache_hit: true,
            });
        }
        let key = format!("{scope}\u{0}{text}");
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
        slot.get_or_init(|| {
            self.embed_lookup_generate(gen.clone(), text.clone(), scope.clone(), opts)
        })
        .await
        .clone()
    }

    /// Take a place in the bounded compute stage: past `max_concurrent + max_queue` requests,
    /// refuse with `Busy` instead of queueing without bound; then wait for a compute permit.
    async fn enter(&self) -> Result<Slot<'_>, ServiceError> {
        if self.in_stage.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.in_stage.fetch_sub(1, Ordering::SeqCst);
            return Err(ServiceError::Busy(format!(
                "{} requests are already queued or running; retry later",
                self.capacity
            )));
        }
        let leave = Leave(&self.in_stage);
        let permit = self.permits.acquire().await.map_err(internal)?;
        Ok(Slot {
            _permit: permit,
            _leave: leave,
        })
    }

    /// Retrieval only (no generation), under the same concurrency bound as generation.
    pub async fn explain(
        &self,
        description: String,
        options: GenerateOptions,
    ) -> Result<crate::generator::Explanation, ServiceError> {
        let _slot = self.enter().await?;
        let g = self.generator();
        Ok(
            tokio::task::spawn_blocking(move || g.explain(&description, &options))
                .await
                .map_err(internal)??,
        )
    }

    async fn embed_lookup_generate(
        &self,
        gen: Arc<Generator>,
        text: String,
        scope: String,
        opts: ResolvedOptions,
    ) -> Result<Served, ServiceError> {
        let _slot = self.enter().await?;
        let g = gen.clone();
        let t = text.clone();
        let (emb, timings) = tokio::task::spawn_blocking(move || g.embed(&t))
            .await
            .map_err(internal)??;
        if let Some((entry, m)) = self
            .cache()
            .lookup(&text, &scope, Some(&emb.vector))
            .map_err(internal)?
        {
            debug_assert!(m == Match::Similar || m == Match::Exact);
            return Ok(Served {
                entry,
                cache_hit: true,
            });
        }
        let g = gen.clone();
        let t = text.clone();
        let generation = tokio::task::spawn_blocking(move || {
            let ex = g.explain_embedding(&t, emb, timings, opts);
            let generation = g.generate_from(ex)?;
            let files = g.adapter_files(&generation, serde_json::Value::Null)?;
            Ok::<_, Error>((generation, files))
        })
        .await
        .map_err(internal)??;
        let (generation, files) = generation;
        let entry = self
            .cache()
            .insert(&text, &scope, &generation.explanation.embedding, &files)
            .map_err(internal)?;
        self.counters.generated.fetch_add(1, Ordering::Relaxed);
        Ok(Served {
            entry,
            cache_hit: false,
        })
    }
}
