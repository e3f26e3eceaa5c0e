//! Load on the real daemon over a real bus: concurrent clients mixing cache hits and misses,
//! some hanging up mid-call. Zero errors other than the documented `Busy`, memory within the
//! unit's `MemoryMax`, no deadlock, and nothing left pending afterwards.
//!
//! `cargo test` runs a short version (8 clients, 5 s); `make soak` runs the version
//! (`SGLORA_SOAK_CLIENTS=32 SGLORA_SOAK_SECS=60`) and writes `target/soak.json`.

use sglora_testkit as common;

use std::time::{Duration, Instant};

use common::bus::*;
use common::load;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `MemoryMax=` of the shipped unit, in kB.
fn unit_memory_max_kb() -> u64 {
    let unit = std::fs::read_to_string(common::root().join("systemd/sglorad.service")).unwrap();
    let v = unit
        .lines()
        .find_map(|l| l.strip_prefix("MemoryMax="))
        .expect("the unit sets MemoryMax");
    let mb: u64 = v
        .trim()
        .trim_end_matches('M')
        .parse()
        .expect("MemoryMax in M");
    mb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_hits_misses_and_hangups() {
    let clients = env_num("SGLORA_SOAK_CLIENTS", 8) as usize;
    let secs = env_num("SGLORA_SOAK_SECS", 5);
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    load::warm(&bus.address).await.unwrap();
    let rss_start = d.status_kb("VmRSS");

    // Sample RSS while the load runs.
    let pid = d.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut samples = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            samples.push(proc_status_kb(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(250));
        }
        samples
    });
    let spec = load::Spec {
        clients,
        duration: Duration::from_secs(secs),
        hit_share: std::env::var("SGLORA_SOAK_HIT_SHARE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.5),
        abandon_every: 25,
        seed_base: 1000,
    };
    let r = load::run(&bus.address, &spec).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().unwrap();

    // Idle again: nothing queued or running, and a fresh call is served.
    let c = connect(&bus).await;
    let t = Instant::now();
    loop {
        if prop_u64(&c, "Pending").await == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "work still pending 30 s after the load stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_ms = t.elapsed().as_secs_f64() * 1e3;
    let after = tokio::time::timeout(
        Duration::from_secs(10),
        generate(&c, load::TEXTS[0], &opts(1)),
    )
    .await
    .expect("the daemon answers after the load (no deadlock)")
    .unwrap();
    assert!(after.2, "the warmed entry is still a hit");
    let hwm = d.status_kb("VmHWM");
    let rss_end = d.status_kb("VmRSS");
    let served = prop_u64(&c, "RequestsServed").await;
    let generated = prop_u64(&c, "GenerationsRun").await;
    let entries = prop_u64(&c, "CacheEntries").await;
    let log = d.stop();

    let summary = serde_json::json!({
        "clients": clients,
        "seconds": secs,
        "calls_ok": r.ok,
        "hits": r.hits,
        "busy": r.busy,
        "abandoned": r.abandoned,
        "errors": r.errors.len(),
        "calls_per_s": r.ok as f64 / r.wall_s,
        "p50_ms": load::quantile(&r.latencies_ms, 0.5),
        "p95_ms": load::quantile(&r.latencies_ms, 0.95),
        "p99_ms": load::quantile(&r.latencies_ms, 0.99),
        "hit_p50_ms": load::quantile(&r.hit_ms, 0.5),
        "rss_start_kb": rss_start,
        "rss_max_sampled_kb": samples.iter().copied().max().unwrap_or(0),
        "rss_by_quarter_kb": (1..=4)
            .map(|q| samples.get(samples.len() * q / 4 - usize::from(q == 4)).copied().unwrap_or(0))
            .collect::<Vec<_>>(),
        "vm_hwm_kb": hwm,
        "rss_end_kb": rss_end,
        "drain_ms": drain_ms,
        "daemon_requests_served": served,
        "daemon_generations_run": generated,
        "cache_entries": entries,
    });
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    if let Ok(p) = std::env::var("SGLORA_SOAK_JSON") {
        std::fs::write(p, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
    assert!(
        r.errors.is_empty(),
        "{} errors besides Busy, first: {:?}\nlog:\n{log}",
        r.errors.len(),
        r.errors.first()
    );
    assert!(r.ok > 0 && r.hits > 0, "{summary}");
    assert!(
        hwm < unit_memory_max_kb(),
        "peak RSS {hwm} kB reaches the unit's MemoryMax"
    );
    assert!(!log.contains("panicked"), "{log}");
}
