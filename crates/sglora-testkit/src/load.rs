//! Concurrent D-Bus clients driving `Generate` for a fixed time: the soak test and the benchmark
//! share this driver.

use std::time::{Duration, Instant};

use zbus::Variant;

use super::bus::{Opts, NAME, PATH};

/// Descriptions the load mixes (distinct tasks, so they never hit each other's cache rows).
pub const TEXTS: [&str; 8] = [
    "Given the name of an animal, find the broader category it is a kind of.",
    "Given an adjective, find the word with the opposite meaning.",
    "Given a body part, find the larger body part it belongs to.",
    "Given a verb of motion, find a more general verb it is a way of doing.",
    "Given the name of a plant, find the group of plants it belongs to.",
    "Given a food, find the more general kind of food it is.",
    "Given the name of an artifact, find the part it is made of.",
    "Given a feeling, find the broader feeling it is a kind of.",
];

/// What the clients do.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Concurrent clients, each on its own bus connection.
    pub clients: usize,
    /// How long they keep calling.
    pub duration: Duration,
    /// Share of calls that repeat an already cached (text, seed); the rest use a fresh seed and
    /// so always miss.
    pub hit_share: f64,
    /// Every n-th call of a client is abandoned: the client sends it, waits a moment and drops
    /// its connection, then reconnects (0: never).
    pub abandon_every: usize,
    /// First seed of the misses (keep runs against one cache apart).
    pub seed_base: u64,
}

/// What happened.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Successful calls.
    pub ok: u64,
    /// Of which cache hits.
    pub hits: u64,
    /// Calls answered `Error.Busy` (documented back-pressure).
    pub busy: u64,
    /// Calls abandoned on purpose.
    pub abandoned: u64,
    /// Any other failure, with its message.
    pub errors: Vec<String>,
    /// Latency of each successful call, ms.
    pub latencies_ms: Vec<f64>,
    /// Latency of successful hits, ms.
    pub hit_ms: Vec<f64>,
    /// Wall time, s.
    pub wall_s: f64,
}

fn opts(seed: u64) -> Opts {
    Opts::from([
        ("seed".to_string(), Variant::U64(seed)),
        ("allow_ood".to_string(), Variant::Bool(true)),
    ])
}

async fn call(c: &zbus::Connection, text: &str, seed: u64) -> zbus::Result<bool> {
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "Generate",
            &(text, &opts(seed)),
        )
        .await?;
    let (_, _, hit, _): (String, String, bool, String) = m.body().deserialize()?;
    Ok(hit)
}

async fn connect(address: &str) -> zbus::Result<zbus::Connection> {
    zbus::connection::Builder::address(address).build().await
}

/// Fill the cache with the hit set (each text with seed 1) so hits are hits from the start.
pub async fn warm(address: &str) -> zbus::Result<()> {
    let c = connect(address).await?;
    for t in TEXTS {
        call(&c, t, 1).await?;
    }
    Ok(())
}

async fn client(address: String, spec: Spec, index: usize) -> Report {
    let mut r = Report::default();
    let mut c = match connect(&address).await {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(format!("connect: {e}"));
            return r;
        }
    };
    let end = Instant::now() + spec.duration;
    let mut n: u64 = 0;
    // A small LCG per client: reproducible mixes without a shared RNG.
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ index as u64;
    while Instant::now() < end {
        n += 1;
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        let text = TEXTS[(state >> 3) as usize % TEXTS.len()];
        let hit = u < spec.hit_share;
        let seed = if hit {
            1
        } else {
            spec.seed_base + (index as u64) * 1_000_000 + n
        };
        if spec.abandon_every > 0 && n.is_multiple_of(spec.abandon_every as u64) {
            let c2 = c.clone();
            let t = text.to_string();
            let h = tokio::spawn(async move { call(&c2, &t, seed).await });
            tokio::time::sleep(Duration::from_millis(2)).await;
            h.abort();
            drop(c);
            r.abandoned += 1;
            c = match connect(&address).await {
                Ok(c) => c,
                Err(e) => {
                    r.errors.push(format!("reconnect: {e}"));
                    return r;
                }
            };
            continue;
        }
        let t0 = Instant::now();
        match call(&c, text, seed).await {
            Ok(was_hit) => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                r.ok += 1;
                r.latencies_ms.push(ms);
                if was_hit {
                    r.hits += 1;
                    r.hit_ms.push(ms);
                }
            }
            Err(zbus::Error::MethodError(name, _, _)) if name.as_str().ends_with(".Busy") => {
                r.busy += 1;
                // Back off as a well-behaved client would.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => r.errors.push(e.to_string()),
        }
    }
    r
}

/// Run `spec` against the daemon at `address`.
pub async fn run(address: &str, spec: &Spec) -> Report {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..spec.clients)
        .map(|i| tokio::spawn(client(address.to_string(), spec.clone(), i)))
        .collect();
    let mut total = Report::default();
    for h in handles {
        match h.await {
            Ok(r) => {
                total.ok += r.ok;
                total.hits += r.hits;
                total.busy += r.busy;
                total.abandoned += r.abandoned;
                total.errors.extend(r.errors);
                total.latencies_ms.extend(r.latencies_ms);
                total.hit_ms.extend(r.hit_ms);
            }
            Err(e) => total.errors.push(format!("client task: {e}")),
        }
    }
    total.wall_s = t0.elapsed().as_secs_f64();
    total
}

/// The q-quantile (0..=1) of `v` (sorted copy; NaN-free input).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}
