//! `make bench`: how fast and how small sglora is, next to what a user would otherwise run, all
//! measured in the same run. Prints a table and writes `BENCHMARKS.md` (+ JSON).
//!
//! ```text
//! cargo bench --bench bench -- [--bundle DIR] [--fp32-bundle DIR] [--python JSON]
//!                              [--markdown FILE] [--json FILE] [--quick]
//! ```
//! The Python side (`models/pipeline/bench.py`, run first by `make bench`) measures onnxruntime,
//! sentence-transformers and the PyTorch generation stack on the same descriptions and writes
//! the JSON given by `--python`; it also exports the fp32 encoder bundle given by `--fp32-bundle`.

#[allow(unused_imports)]
use sglora_testkit as common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::params;
use serde_json::{json, Value};
use sglora::sha256_hex;
use sglora::{Encoder, Runtime};
use sglora::{GenerateOptions, Generator};
use sglora::{CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE};
use sglora_daemon::Cache;

use common::bus::{Bus, Daemon};
use common::load;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    bundle: PathBuf,
    fp32_bundle: Option<PathBuf>,
    python: Option<PathBuf>,
    markdown: PathBuf,
    json: PathBuf,
    quick: bool,
}

fn parse_args() -> Res<Args> {
    let root = common::root();
    let mut a = Args {
        bundle: root.join("models/default"),
        fp32_bundle: None,
        python: None,
        markdown: root.join("BENCHMARKS.md"),
        json: root.join("target/bench/rust.json"),
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--bundle" => a.bundle = val()?.into(),
            "--fp32-bundle" => a.fp32_bundle = Some(val()?.into()),
            "--python" => a.python = Some(val()?.into()),
            "--markdown" => a.markdown = val()?.into(),
            "--json" => a.json = val()?.into(),
            "--quick" => a.quick = true,
            "--bench" => {} // cargo passes it
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(a)
}

/// Median, p95, mean and count of a sample (ms).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Dist {
    p50: f64,
    p95: f64,
    mean: f64,
    n: usize,
}

fn dist(v: &[f64]) -> Dist {
    if v.is_empty() {
        return Dist::default();
    }
    Dist {
        p50: load::quantile(v, 0.5),
        p95: load::quantile(v, 0.95),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        n: v.len(),
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn py_dist(v: &Value) -> Option<Dist> {
    Some(Dist {
        p50: v.get("p50")?.as_f64()?,
        p95: v.get("p95")?.as_f64()?,
        mean: v.get("mean")?.as_f64()?,
        n: v.get("n")?.as_u64()? as usize,
    })
}

fn fmt_ms(d: Option<Dist>) -> String {
    match d {
        Some(d) if d.n > 0 => format!("{:.2} / {:.2}", d.p50, d.p95),
        _ => "–".into(),
    }
}

fn ratio(num: Option<Dist>, den: Option<Dist>) -> String {
    match (num, den) {
        (Some(a), Some(b)) if a.n > 0 && b.n > 0 && b.p50 > 0.0 => format!("{:.1}×", a.p50 / b.p50),
        _ => "–".into(),
    }
}

fn texts() -> Res<(BTreeMap<String, String>, Vec<String>)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(
        common::root().join("benches/descriptions.json"),
    )?)?;
    let enc = serde_json::from_value(v["encoder_by_words"].clone())?;
    let generation = serde_json::from_value(v["generation"].clone())?;
    Ok((enc, generation))
}

fn cpu_info() -> (String, Vec<String>, f64) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags")
        .split_whitespace()
        .map(String::from)
        .collect();
    let mhz = field("cpu MHz").parse().unwrap_or(0.0);
    (field("model name"), flags, mhz)
}

// ---------------------------------------------------------------------------------------------
// 1. Encoder

fn bench_encoder(
    enc: &Encoder,
    texts: &BTreeMap<String, String>,
    quick: bool,
) -> Res<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for (words, text) in texts {
        let tokens = enc.tokenize(text)?.len();
        let reps = match (quick, words.as_str()) {
            (true, _) => 10,
            (false, "100") => 60,
            _ => 150,
        };
        for _ in 0..3 {
            enc.embed(text)?;
        }
        let mut v = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(enc.embed(text)?);
            v.push(ms(t));
        }
        out.insert(words.clone(), json!({"tokens": tokens, "ms": dist(&v)}));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 7. Embeddings with an adapter applied

/// Peak RSS (kB) of `sglora embed` (the binary under test) run on 32 copies of `text` with the
/// adapter, in a process of its own: its VmHWM, polled every millisecond until it exits (VmHWM
/// only grows; `ru_maxrss` of a child would count the forked copy of this process too).
fn embed_peak_rss_kb(bundle: &Path, adapter: &Path, text: &str) -> Res<u64> {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sglora"))
        .arg("--bundle")
        .arg(bundle)
        .args(["embed", "--adapter"])
        .arg(adapter)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id() as i32;
    let mut peak = 0;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin.write_all(format!("{text}\n").repeat(32).as_bytes())?;
    drop(stdin);
    loop {
        peak = peak.max(common::bus::proc_status_kb(pid, "VmHWM"));
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                return Err(format!("sglora embed: {status}").into());
            }
            return Ok(peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// texts/s at batch 1 and 32 for the 20-word text, base and with a generated adapter, on one
/// thread and (batch 32) on every core; peak RSS of `sglora embed` with the adapter.
fn bench_embed(g: &Generator, bundle: &Path, text: &str, quick: bool) -> Res<Value> {
    let dir = tempfile::tempdir()?;
    let adapter = dir.path().join("adapter");
    let desc = "Given an adjective, find the word with the opposite meaning.";
    g.generate_to(desc, &GenerateOptions::default(), &adapter, false)?;
    let enc = g.encoder();
    let lora = enc.load_adapter(&adapter)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let reps = if quick { 5 } else { 30 };
    let mut out = serde_json::Map::new();
    for (name, l) in [("base", None), ("adapter", Some(&lora))] {
        let mut rows = serde_json::Map::new();
        for (batch, threads) in [(1usize, 1usize), (32, 1), (32, cores)] {
            let texts = vec![text; batch];
            let n = if batch == 1 { reps } else { (reps / 6).max(3) };
            enc.embed_texts(&texts, l, threads)?; // warm-up
            let d = time_n(n, || {
                std::hint::black_box(enc.embed_texts(&texts, l, threads)?);
                Ok(())
            })?;
            rows.insert(
                format!("{batch}x{threads}"),
                json!({"batch": batch, "threads": threads, "ms": d, "texts_per_s": batch as f64 * 1e3 / d.p50}),
            );
        }
        out.insert(name.into(), Value::Object(rows));
    }
    out.insert("cores".into(), json!(cores));
    out.insert(
        "peak_rss_kb".into(),
        json!(embed_peak_rss_kb(bundle, &adapter, text)?),
    );
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------------------------
// 2. Generation (cache miss), per stage

fn bench_generation(g: &Generator, descs: &[String], quick: bool) -> Res<Value> {
    let tmp = tempfile::tempdir()?;
    let reps = if quick { 1 } else { 5 };
    let mut stages: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut total = Vec::new();
    let opts = GenerateOptions {
        allow_ood: true,
        ..Default::default()
    };
    // warm-up
    g.generate_to(&descs[0], &opts, &tmp.path().join("warm"), true)?;
    let mut n = 0;
    for _ in 0..reps {
        for d in descs {
            n += 1;
            let dest = tmp.path().join(format!("a{n}"));
            let t = Instant::now();
            let r = g.generate_text(d, &opts)?;
            let tw = Instant::now();
            sglora::write_atomic(&dest, &g.adapter_files(&r)?, false)?;
            let write_ms = ms(tw);
            total.push(ms(t));
            let tm = &r.explanation.timings;
            for (k, v) in [
                ("tokenize", tm.tokenize_ms),
                ("encode", tm.encode_ms),
                ("retrieve", tm.retrieve_ms),
                ("prior", tm.prior_ms),
                ("cvae", tm.cvae_ms),
                ("write", write_ms),
            ] {
                stages.entry(k).or_default().push(v);
            }
        }
    }
    let stages: BTreeMap<_, _> = stages.iter().map(|(k, v)| (*k, dist(v))).collect();
    Ok(json!({"total": dist(&total), "stages": stages}))
}

// ---------------------------------------------------------------------------------------------
// 3. Cache

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.into_iter().map(|x| x / n).collect()
}

fn random_unit(rng: &mut sglora::Rng, dim: usize) -> Vec<f32> {
    unit(rng.normals(dim).into_iter().map(|x| x as f32).collect())
}

fn blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The index as it was before (f64 dot over every row, ids cloned): the comparison.
fn old_scan(rows: &[(String, Vec<f32>)], q: &[f32]) -> Option<(f64, String)> {
    rows.iter()
        .map(|(id, e)| {
            (
                e.iter()
                    .zip(q)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>(),
                id.clone(),
            )
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

fn time_n<F: FnMut() -> Res<()>>(n: usize, mut f: F) -> Res<Dist> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        v.push(ms(t));
    }
    Ok(dist(&v))
}

fn bench_cache(g: &Generator, descs: &[String], quick: bool) -> Res<Value> {
    // (a) real adapters: a hit re-hashes the ~300 KB weights file.
    let tmp = tempfile::tempdir()?;
    let mut cache = Cache::open(
        &tmp.path().join("cache.db"),
        &tmp.path().join("adapters"),
        u64::MAX,
        0.97,
    )?;
    let opts = GenerateOptions {
        allow_ood: true,
        ..Default::default()
    };
    let mut embs = Vec::new();
    for d in descs {
        let generation = g.generate_text(d, &opts)?;
        let files = g.adapter_files(&generation)?;
        cache.insert(
            &generation.description,
            "real",
            0,
            &generation.embedding,
            &files,
        )?;
        embs.push(generation.embedding.clone());
    }
    let reps = if quick { 50 } else { 500 };
    let mut i = 0;
    let exact = time_n(reps, || {
        i += 1;
        let d = &descs[i % descs.len()];
        // Validating and hashing the text is part of an exact lookup's cost.
        cache
            .lookup(&sglora::Description::new(d)?, "real", None)?
            .ok_or("exact hit expected")?;
        Ok(())
    })?;
    let mut i = 0;
    let not_cached = sglora::Description::new("not cached text")?;
    let similar = time_n(reps, || {
        i += 1;
        let k = i % descs.len();
        let (_, m) = cache
            .lookup(&not_cached, "real", Some(&embs[k]))?
            .ok_or("similar hit expected")?;
        assert_eq!(m, sglora_daemon::Match::Similar);
        Ok(())
    })?;
    let weights_bytes = std::fs::metadata(
        cache
            .lookup(&sglora::Description::new(&descs[0])?, "real", None)?
            .ok_or("hit")?
            .0
            .dir
            .join(WEIGHTS_FILE),
    )?
    .len();
    drop(cache);

    // (b) growth: rows written straight into the database (and tiny files), then opened.
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let dim = g.encoder().dim();
    let tmp = tempfile::tempdir()?;
    let db = tmp.path().join("cache.db");
    let dir = tmp.path().join("adapters");
    drop(Cache::open(&db, &dir, u64::MAX, 0.97)?);
    let mut rng = sglora::Rng::new(42);
    let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
    let mut growth = Vec::new();
    let wsha = sha256_hex(b"w");
    for &n in sizes {
        let t_fill = Instant::now();
        {
            let mut conn = rusqlite::Connection::open(&db)?;
            conn.pragma_update(None, "synchronous", "OFF")?;
            let tx = conn.transaction()?;
            for i in rows.len()..n {
                let id = format!("{i:024x}");
                let text = format!("bench text {i}");
                let e = random_unit(&mut rng, dim);
                tx.execute(
                    "INSERT INTO adapters(id, text_sha, scope, embedding, description, bytes, weights_sha256, provenance, created, last_used, hits)
                     VALUES (?1, ?2, 'bench', ?3, ?4, 3, ?5, '{}', ?6, ?6, 0)",
                    params![id, sha256_hex(text.as_bytes()), blob(&e), text, wsha, i as i64],
                )?;
                let d = dir.join(&id);
                std::fs::create_dir(&d)?;
                std::fs::write(d.join(WEIGHTS_FILE), b"w")?;
                std::fs::write(d.join(CONFIG_FILE), b"{}")?;
                std::fs::write(d.join(PROVENANCE_FILE), b"{}")?;
                rows.push((id, e));
            }
            tx.commit()?;
        }
        let fill_s = t_fill.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut cache = Cache::open(&db, &dir, u64::MAX, 0.97)?;
        let open_ms = ms(t);
        let reps = if n >= 100_000 { 50 } else { 200 };
        let mut i = 0;
        let exact = time_n(reps, || {
            i += 7919;
            let k = i % n;
            cache
                .lookup(
                    &sglora::Description::new(&format!("bench text {k}"))?,
                    "bench",
                    None,
                )?
                .ok_or("exact")?;
            Ok(())
        })?;
        let absent = sglora::Description::new("absent")?;
        let mut i = 0;
        let similar = time_n(reps, || {
            i += 7919;
            let k = i % n;
            cache
                .lookup(&absent, "bench", Some(&rows[k].1))?
                .ok_or("similar")?;
            Ok(())
        })?;
        let queries: Vec<Vec<f32>> = (0..reps).map(|_| random_unit(&mut rng, dim)).collect();
        let mut i = 0;
        let miss = time_n(reps, || {
            i += 1;
            if cache
                .lookup(&absent, "bench", Some(&queries[i - 1]))?
                .is_some()
            {
                return Err("a random vector matched".into());
            }
            Ok(())
        })?;
        let mut i = 0;
        let old = time_n(reps.min(50), || {
            i += 1;
            std::hint::black_box(old_scan(&rows, &queries[i - 1]));
            Ok(())
        })?;
        println!(
            "  cache {n:>6} rows: open {open_ms:.0} ms, exact {:.3} ms, similar {:.3} ms, miss scan {:.3} ms (f64 scan before: {:.3} ms)",
            exact.p50, similar.p50, miss.p50, old.p50
        );
        growth.push(json!({
            "entries": n, "fill_s": fill_s, "open_ms": open_ms, "exact": exact, "similar": similar,
            "miss": miss, "old_f64_scan": old,
            "index_bytes": n * (dim + 8 + 24 + 24 + 48),
        }));
    }
    Ok(
        json!({"real": {"exact": exact, "similar": similar, "weights_bytes": weights_bytes}, "growth": growth}),
    )
}

// ---------------------------------------------------------------------------------------------
// 4. Daemon

fn bench_daemon(bundle: &Path, quick: bool) -> Res<Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bus = Bus::start();
    let state = tempfile::tempdir()?;
    let bin = Path::new(env!("CARGO_BIN_EXE_sglora"));
    let mut ready = Vec::new();
    // Start-up: a few cold starts on an empty state directory.
    for i in 0..if quick { 1 } else { 3 } {
        let s = state.path().join(format!("start{i}"));
        let d = Daemon::spawn(bin, bundle, &bus, &s, &["--no-dropbox"]);
        ready.push(d.ready_s * 1e3);
        d.stop();
    }
    let d = Daemon::spawn(
        bin,
        bundle,
        &bus,
        &state.path().join("main"),
        &["--no-dropbox"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let idle = json!({
        "VmRSS": d.status_kb("VmRSS"), "RssAnon": d.status_kb("RssAnon"),
        "RssFile": d.status_kb("RssFile"), "VmHWM_at_start": d.status_kb("VmHWM"),
    });
    let addr = bus.address.clone();
    let out = rt.block_on(async {
        load::warm(&addr).await?;
        let c = zbus::connection::Builder::address(addr.as_str())
            .build()
            .await?;
        let o = common::bus::opts(1);
        let mut hit = Vec::new();
        for _ in 0..if quick { 50 } else { 500 } {
            let t = Instant::now();
            let r = common::bus::generate(&c, load::TEXTS[0], &o).await?;
            hit.push(ms(t));
            assert!(r.2, "expected a hit");
        }
        let secs = if quick { 3 } else { 10 };
        let mut runs = Vec::new();
        for (mix, share) in [("50% hits", 0.5), ("all misses", 0.0)] {
            for clients in [1, 8, 32] {
                let spec = load::Spec {
                    clients,
                    duration: Duration::from_secs(secs),
                    hit_share: share,
                    abandon_every: 0,
                    seed_base: 10_000_000 * (runs.len() as u64 + 1),
                };
                let r = load::run(&addr, &spec).await;
                println!(
                    "  daemon {mix:>10}, {clients:>2} clients: {:.0} calls/s, p50 {:.1} ms, p95 {:.1} ms, busy {}, errors {}",
                    r.ok as f64 / r.wall_s,
                    load::quantile(&r.latencies_ms, 0.5),
                    load::quantile(&r.latencies_ms, 0.95),
                    r.busy,
                    r.errors.len()
                );
                runs.push(json!({
                    "mix": mix, "clients": clients, "seconds": r.wall_s, "ok": r.ok, "hits": r.hits,
                    "busy": r.busy, "errors": r.errors.len(), "first_error": r.errors.first(),
                    "calls_per_s": r.ok as f64 / r.wall_s, "latency": dist(&r.latencies_ms),
                }));
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(json!({"hit_round_trip": dist(&hit), "throughput": runs}))
    })?;
    let peak = d.status_kb("VmHWM");
    let after = d.status_kb("VmRSS");
    d.stop();
    Ok(json!({
        "ready_ms": dist(&ready), "idle_kb": idle, "peak_rss_kb": peak, "rss_after_load_kb": after,
        "hit_round_trip": out["hit_round_trip"], "throughput": out["throughput"],
    }))
}

// ---------------------------------------------------------------------------------------------
// 5. Footprint, 6. floor

fn stripped_size(bin: &Path, strip: &str) -> Option<u64> {
    let tmp = tempfile::tempdir().ok()?;
    let out = tmp.path().join("s");
    let ok = std::process::Command::new(strip)
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .ok()?
        .success();
    ok.then(|| std::fs::metadata(&out).ok().map(|m| m.len()))?
}

fn footprint(bundle: &Path) -> Res<Value> {
    let bin = Path::new(env!("CARGO_BIN_EXE_sglora"));
    let root = common::root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    // static (musl) builds: `make aarch64`, `make x86_64-static`
    let arm = target.join("aarch64-unknown-linux-musl/board/sglora");
    let x86_static = target.join("x86_64-unknown-linux-musl/board/sglora");
    let x86_board = target.join("board/sglora");
    let manifest: Value = serde_json::from_slice(&std::fs::read(bundle.join("manifest.json"))?)?;
    let files: BTreeMap<String, u64> = manifest["files"]
        .as_object()
        .ok_or("manifest files")?
        .iter()
        .map(|(k, v)| (k.clone(), v["bytes"].as_u64().unwrap_or(0)))
        .collect();
    Ok(json!({
        "x86_64_release_bytes": std::fs::metadata(bin)?.len(),
        "x86_64_release_stripped_bytes": stripped_size(bin, "strip"),
        "x86_64_board_bytes": std::fs::metadata(&x86_board).ok().map(|m| m.len()),
        "aarch64_board_bytes": std::fs::metadata(&arm).ok().map(|m| m.len()),
        "x86_64_static_board_bytes": std::fs::metadata(&x86_static).ok().map(|m| m.len()),
        "bundle_files": files,
    }))
}

/// Single-thread read bandwidth (GB/s), best of 3 over a 256 MiB buffer.
fn read_bandwidth() -> f64 {
    let n = 32 << 20; // u64s
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf.iter().fold(0u64, |a, &x| a.wrapping_add(x));
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 8) as f64 / best / 1e9
}

fn floor(g: &Generator, enc: &BTreeMap<String, Value>, generation: &Value) -> Value {
    let (_, flags, mhz) = cpu_info();
    let lanes = if flags.iter().any(|f| f == "avx512f") {
        16.0
    } else if flags.iter().any(|f| f == "avx2") {
        8.0
    } else {
        4.0
    };
    let fma_units = 2.0;
    let ghz = if mhz > 0.0 { mhz / 1e3 } else { 2.5 };
    let peak_gmacs = lanes * fma_units * ghz;
    let bw = read_bandwidth();
    let m = &g.bundle().manifest;
    let h = m.base_model.hidden as f64;
    let ffn = 4.0 * h;
    let layers = 6.0;
    let weights_per_layer = 4.0 * h * h + 2.0 * h * ffn;
    let enc_weight_f32_bytes = layers * weights_per_layer * 4.0;
    let weights = g.encoder().runtime().name();
    let weight_bytes = match g.encoder().runtime() {
        Runtime::Integer | Runtime::Int8 => 1.0,
        Runtime::Fp16 => 2.0,
        Runtime::Fp32 | Runtime::Auto => 4.0,
    };
    // The integer path's peak: int8 MACs per cycle of its dot-product instructions, two issued
    // per cycle (assumed; AVX2 needs four instructions per 32 MACs, `smull` + `sadalp` two per 8).
    let path = sglora::IntegerPath::best();
    let int_macs_per_cycle = match path {
        sglora::IntegerPath::Avx512Vnni => 128.0,
        sglora::IntegerPath::AvxVnni => 64.0,
        sglora::IntegerPath::Avx2 => 16.0,
        sglora::IntegerPath::NeonDot => 32.0,
        sglora::IntegerPath::Neon => 8.0,
        sglora::IntegerPath::Scalar => 1.0,
    };
    let int_peak_gmacs = int_macs_per_cycle * ghz;
    let integer = g.encoder().runtime() == Runtime::Integer;
    let tokens20 = enc
        .get("20")
        .and_then(|v| v["tokens"].as_f64())
        .unwrap_or(20.0);
    // The integer runtime multiplies every weight by each activation level.
    let levels = if integer {
        sglora::INTEGER_LEVELS as f64
    } else {
        1.0
    };
    let enc_macs = tokens20 * layers * weights_per_layer * levels;
    let keys = g.experts().keys();
    let key_rows = keys.values.len() as f64 / keys.dim.max(1) as f64;
    let proj = keys.projection.as_ref().map_or(0.0, |p| p.len() as f64);
    let retrieve_macs = keys.values.len() as f64 + proj;
    let file = |k: &str| m.files.get(k).map(|f| f.bytes as f64).unwrap_or(0.0);
    let cvae_bytes = file(&m.cvae.prior_file) + file(&m.cvae.decoder_file);
    let d = m.lora.flat_dim as f64;
    let k = m.prior.top_k as f64;
    let prior_bytes = 2.0 * k * d * 4.0;
    let row = |name: &str, bytes: f64, macs: f64, measured: f64, peak: f64| {
        let t_bw = bytes / (bw * 1e9) * 1e3;
        let t_c = macs / (peak * 1e9) * 1e3;
        let fl = t_bw.max(t_c);
        json!({"stage": name, "bytes": bytes, "macs": macs, "floor_bw_ms": t_bw, "floor_compute_ms": t_c,
               "floor_ms": fl, "measured_ms": measured, "x_floor": if fl > 0.0 { measured / fl } else { 0.0 }})
    };
    let st = |k: &str| generation["stages"][k]["p50"].as_f64().unwrap_or(f64::NAN);
    let enc20 = enc
        .get("20")
        .and_then(|v| v["ms"]["p50"].as_f64())
        .unwrap_or(f64::NAN);
    json!({
        "cpu_lanes_f32": lanes, "ghz": ghz, "peak_gmacs_one_core": peak_gmacs, "read_gb_s_one_core": bw,
        "integer_path": path.name(), "integer_peak_gmacs_one_core": int_peak_gmacs,
        "rows": [
            row(&format!("encode, 20 words ({weights} runtime{}, MACs at the {} peak)", if integer { format!(", {levels} int8 activation levels") } else { String::new() }, if integer { path.name() } else { "f32 FMA" }),
                enc_weight_f32_bytes / 4.0 * weight_bytes, enc_macs, enc20, if integer { int_peak_gmacs } else { peak_gmacs }),
            row(&format!("retrieve ({key_rows:.0} keys of {}, f64 chains)", keys.dim), retrieve_macs * 4.0, retrieve_macs, st("retrieve"), peak_gmacs / 2.0),
            row("prior mixture (K experts' μ, σ²)", prior_bytes, 3.0 * k * d, st("prior"), peak_gmacs),
            row("CVAE prior net + decoder (weights read once)", cvae_bytes, cvae_bytes / 4.0, st("cvae"), peak_gmacs),
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Report

fn markdown(r: &Value, py: &Value) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `make bench` ({}). Machine: {} ({} cores), commit `{}`. Every comparison below \
         was measured in the same run; compare ratios across runs, not absolute times. Times are \
         ms as **p50 / p95**; one thread unless a row says otherwise.\n",
        r["date"].as_str().unwrap_or(""),
        r["cpu"].as_str().unwrap_or(""),
        r["cores"],
        r["commit"].as_str().unwrap_or("")
    );

    // 1. encoder
    let _ = writeln!(w, "## 1. Encoder: description → embedding (one thread)\n");
    let _ = writeln!(
        w,
        "| words (tokens) | sglora: int8 file, {} | same file, sglora's int8 × f32 FMA chains (`int8` runtime) | same file, tract, fp16 weights | same file, tract, fp32 weights | tract fp32 file | onnxruntime int8 (same file) | onnxruntime fp32 | sentence-transformers (PyTorch fp32) |",
        match r["encoder_weights"].as_str().unwrap_or("?") {
            "integer" => format!(
                "sglora's integer kernels, {} (default)",
                r["integer_path"].as_str().unwrap_or("?")
            ),
            other => format!("{other} runtime (default here)"),
        }
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    for words in ["5", "20", "100"] {
        let ours = py_dist(&r["encoder"]["default"][words]["ms"]);
        let chains = py_dist(&r["encoder"]["int8"][words]["ms"]);
        let fp32 = py_dist(&r["encoder"]["fp32"][words]["ms"]);
        let f32w = py_dist(&r["encoder"]["int8_f32w"][words]["ms"]);
        let f16w = py_dist(&r["encoder"]["int8_f16w"][words]["ms"]);
        let p = |k: &str| py_dist(&py["encoder"][k][words]);
        let _ = writeln!(
            w,
            "| {words} ({}) | {} | {} ({}) | {} ({}) | {} ({}) | {} ({}) | {} ({}) | {} ({}) | {} ({}) |",
            r["encoder"]["default"][words]["tokens"],
            fmt_ms(ours),
            fmt_ms(chains),
            ratio(chains, ours),
            fmt_ms(f16w),
            ratio(f16w, ours),
            fmt_ms(f32w),
            ratio(f32w, ours),
            fmt_ms(fp32),
            ratio(fp32, ours),
            fmt_ms(p("ort_int8")),
            ratio(p("ort_int8"), ours),
            fmt_ms(p("ort_fp32")),
            ratio(p("ort_fp32"), ours),
            fmt_ms(p("st_torch")),
            ratio(p("st_torch"), ours),
        );
    }
    let _ = writeln!(
        w,
        "\n(×: that column's p50 over sglora's; above 1 means sglora is faster.)\n"
    );

    // 2. generation
    let _ = writeln!(
        w,
        "## 2. Generation, cache miss: description → adapter directory on disk\n"
    );
    let _ = writeln!(
        w,
        "| stage | sglora (Rust) | PyTorch reference (pipeline's CVAE, sentence-transformers, CPU) | ratio |"
    );
    let _ = writeln!(w, "|---|---|---|---|");
    for st in [
        "tokenize", "encode", "retrieve", "prior", "cvae", "write", "total",
    ] {
        let ours = if st == "total" {
            py_dist(&r["generation"]["total"])
        } else {
            py_dist(&r["generation"]["stages"][st])
        };
        let theirs = if st == "total" {
            py_dist(&py["generation"]["total"])
        } else {
            py_dist(&py["generation"]["stages"][st])
        };
        let _ = writeln!(
            w,
            "| {st} | {} | {} | {} |",
            fmt_ms(ours),
            fmt_ms(theirs),
            ratio(theirs, ours)
        );
    }
    let tot = py_dist(&r["generation"]["total"]).unwrap_or_default();
    let _ = writeln!(
        w,
        "\nGoal p50 ≤ 15 ms: **{}** ({:.2} ms). Goal ≥ 20× the PyTorch reference: **{}** ({}).\n",
        if tot.p50 <= 15.0 { "met" } else { "missed" },
        tot.p50,
        match py_dist(&py["generation"]["total"]) {
            Some(p) if p.p50 / tot.p50 >= 20.0 => "met",
            Some(_) => "missed",
            None => "not measured",
        },
        ratio(py_dist(&py["generation"]["total"]), Some(tot))
    );

    // 3. cache
    let c = &r["cache"];
    let _ = writeln!(w, "## 3. Cache\n");
    let _ = writeln!(
        w,
        "Hit with real adapters (library call; the hit re-hashes the {} KB weights file): exact {} ms, near-duplicate {} ms. Goal ≤ 1 ms: **{}**.\n",
        c["real"]["weights_bytes"].as_u64().unwrap_or(0) / 1024,
        fmt_ms(py_dist(&c["real"]["exact"])),
        fmt_ms(py_dist(&c["real"]["similar"])),
        if py_dist(&c["real"]["exact"]).map(|d| d.p50 <= 1.0).unwrap_or(false) { "met" } else { "missed" }
    );
    let _ = writeln!(
        w,
        "| entries | open (reconcile) ms | exact hit | near-duplicate hit | miss (full scan) | previous f64 scan | index MB |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for g in c["growth"].as_array().into_iter().flatten() {
        let _ = writeln!(
            w,
            "| {} | {:.0} | {} | {} | {} | {} ({}) | {:.1} |",
            g["entries"],
            g["open_ms"].as_f64().unwrap_or(0.0),
            fmt_ms(py_dist(&g["exact"])),
            fmt_ms(py_dist(&g["similar"])),
            fmt_ms(py_dist(&g["miss"])),
            fmt_ms(py_dist(&g["old_f64_scan"])),
            ratio(py_dist(&g["old_f64_scan"]), py_dist(&g["miss"])),
            g["index_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    let _ = writeln!(
        w,
        "\nExact hits use SQLite's index on the text hash (O(log n)); near-duplicate lookup is a linear scan of int8 codes with an error bound, followed by an exact check of the few candidates.\n"
    );

    // 4. daemon
    let d = &r["daemon"];
    let kb = |v: &Value| v.as_f64().unwrap_or(0.0) / 1024.0;
    let _ = writeln!(w, "## 4. Daemon (release binary, private dbus-daemon)\n");
    let _ = writeln!(
        w,
        "- start-up to READY=1: {} ms (cold, empty state directory)\n- RSS idle after start: {:.1} MB (anonymous {:.1} MB + file-backed {:.1} MB); goal ≤ 40 MB: **{}**\n- peak RSS over the whole load below: {:.1} MB; RSS after it: {:.1} MB\n- D-Bus round trip of a cache hit (zbus client): {} ms\n",
        fmt_ms(py_dist(&d["ready_ms"])),
        kb(&d["idle_kb"]["VmRSS"]),
        kb(&d["idle_kb"]["RssAnon"]),
        kb(&d["idle_kb"]["RssFile"]),
        if kb(&d["idle_kb"]["VmRSS"]) <= 40.0 { "met" } else { "missed" },
        kb(&d["peak_rss_kb"]),
        kb(&d["rss_after_load_kb"]),
        fmt_ms(py_dist(&d["hit_round_trip"])),
    );
    let _ = writeln!(
        w,
        "| mix | clients | calls/s | latency p50 / p95 ms | Busy | errors |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for t in d["throughput"].as_array().into_iter().flatten() {
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {} | {} | {} |",
            t["mix"].as_str().unwrap_or(""),
            t["clients"],
            t["calls_per_s"].as_f64().unwrap_or(0.0),
            fmt_ms(py_dist(&t["latency"])),
            t["busy"],
            t["errors"]
        );
    }

    // 5. footprint
    let f = &r["footprint"];
    let mb = |v: &Value| match v.as_f64() {
        Some(b) => format!("{:.1} MB", b / 1e6),
        None => {
            "not built (`make aarch64`, `make x86_64-static`, `cargo build --profile board`)".into()
        }
    };
    let _ = writeln!(w, "\n## 5. Footprint\n");
    let _ = writeln!(
        w,
        "- x86_64 release binary: {} ({} stripped); board profile: {}; static (musl) board: {}\n- aarch64 static (musl) board binary (stripped): {} (goal ≤ 12 MB)\n",
        mb(&f["x86_64_release_bytes"]),
        mb(&f["x86_64_release_stripped_bytes"]),
        mb(&f["x86_64_board_bytes"]),
        mb(&f["x86_64_static_board_bytes"]),
        mb(&f["aarch64_board_bytes"]),
    );
    let _ = writeln!(w, "| bundle file | MB |\n|---|---|");
    let mut total = 0.0;
    for (k, v) in f["bundle_files"].as_object().into_iter().flatten() {
        let b = v.as_f64().unwrap_or(0.0);
        total += b;
        let _ = writeln!(w, "| {k} | {:.2} |", b / 1e6);
    }
    let _ = writeln!(w, "| **total** | {:.2} |", total / 1e6);

    // 6. floor
    let fl = &r["floor"];
    let _ = writeln!(
        w,
        "\n## 6. How far from the floor\n\nOne core: {:.1} GB/s measured read bandwidth; f32 compute peak {:.0} GMAC/s assumed ({} f32 lanes × 2 FMA units × {:.2} GHz from /proc/cpuinfo); integer peak {:.0} GMAC/s assumed (the {} path's int8 MACs per instruction × 2 per cycle). Floor = max(bytes / bandwidth, MACs / peak).\n",
        fl["read_gb_s_one_core"].as_f64().unwrap_or(0.0),
        fl["peak_gmacs_one_core"].as_f64().unwrap_or(0.0),
        fl["cpu_lanes_f32"],
        fl["ghz"].as_f64().unwrap_or(0.0),
        fl["integer_peak_gmacs_one_core"].as_f64().unwrap_or(0.0),
        fl["integer_path"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        w,
        "| stage | MB read | MMAC | floor ms (bandwidth / compute) | measured p50 ms | × floor |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for row in fl["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            w,
            "| {} | {:.1} | {:.1} | {:.2} ({:.2} / {:.2}) | {:.2} | {:.1} |",
            row["stage"].as_str().unwrap_or(""),
            row["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            row["macs"].as_f64().unwrap_or(0.0) / 1e6,
            row["floor_ms"].as_f64().unwrap_or(0.0),
            row["floor_bw_ms"].as_f64().unwrap_or(0.0),
            row["floor_compute_ms"].as_f64().unwrap_or(0.0),
            row["measured_ms"].as_f64().unwrap_or(0.0),
            row["x_floor"].as_f64().unwrap_or(0.0),
        );
    }
    // 7. embeddings with an adapter
    let e = &r["embed"];
    let pe = &py["embeddings"];
    let tps = |v: &Value| v["texts_per_s"].as_f64();
    let cell = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.0}"));
    let rss = |kb: &Value| {
        kb.as_f64()
            .map_or("–".to_string(), |k| format!("{:.0}", k / 1024.0))
    };
    let _ = writeln!(
        w,
        "\n## 7. Embeddings with an adapter (`sglora embed`, `Embed`)\n\nThe 20-word text, texts/s (from the p50 time of a batch; batch 32 = 32 copies of it, no padding anywhere); one thread unless a row says otherwise. The adapter is a generated one (r = 8 on query and value); onnxruntime runs it merged into the bundle's int8 encoder (W + (α/r)·BA re-quantised per output column: cosine {:.4} to PEFT on this text), sentence-transformers applies it with PEFT. Peak RSS: a process of its own that loads the stack and embeds 32 texts.\n",
        pe["merged_vs_peft_cosine"].as_f64().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        w,
        "| stack | batch 1 | batch 32 | peak RSS MB |\n|---|---|---|---|"
    );
    let cores = e["cores"].as_u64().unwrap_or(1);
    for (label, key) in [
        ("sglora, base model", "base"),
        ("sglora, with the adapter", "adapter"),
    ] {
        let _ = writeln!(
            w,
            "| {label} | {} | {} ({} on {cores} threads) | {} |",
            cell(tps(&e[key]["1x1"])),
            cell(tps(&e[key]["32x1"])),
            cell(tps(&e[key][format!("32x{cores}")])),
            if key == "adapter" {
                rss(&e["peak_rss_kb"])
            } else {
                "".into()
            },
        );
    }
    for (label, key) in [
        ("onnxruntime int8, base model", "ort_int8_base"),
        ("onnxruntime int8, merged model", "ort_int8_merged"),
        ("sentence-transformers (PyTorch fp32), base", "st_base"),
        ("sentence-transformers + PEFT", "st_peft"),
    ] {
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} |",
            cell(tps(&pe[key]["1"])),
            cell(tps(&pe[key]["32"])),
            rss(&pe["peak_rss_kb"][key]),
        );
    }
    for (batch, ours, theirs) in [(1, "1x1", "1"), (32, "32x1", "32")] {
        let (o, t) = (
            tps(&e["adapter"][ours]),
            tps(&pe["ort_int8_merged"][theirs]),
        );
        if let (Some(o), Some(t)) = (o, t) {
            let _ = writeln!(
                w,
                "\nGoal at batch {batch}: with an adapter no slower than onnxruntime int8 on the merged model: **{}** ({o:.0} vs {t:.0} texts/s, {:.2}×).",
                if o >= t { "met" } else { "missed" },
                o / t
            );
        }
    }

    if let Some(v) = py.get("versions") {
        let _ = writeln!(w, "\nPython side: {v}");
    }
    s
}

fn main() -> Res<()> {
    let a = parse_args()?;
    let (enc_texts, gen_texts) = texts()?;
    let (cpu, _, _) = cpu_info();
    println!("loading {}", a.bundle.display());
    let g = Generator::load(&a.bundle)?;

    println!("1. encoder");
    let mut encoder = BTreeMap::new();
    encoder.insert("default", bench_encoder(g.encoder(), &enc_texts, a.quick)?);
    {
        // The same int8 weights with f32 activations (the `int8` runtime), same run.
        let chains = Encoder::load_with(g.bundle(), Runtime::Int8)?;
        encoder.insert("int8", bench_encoder(&chains, &enc_texts, a.quick)?);
        drop(chains);
        // The same file run by tract, weights dequantised to fp16 / fp32 at load, same run.
        let f16w = Encoder::load_with(g.bundle(), Runtime::Fp16)?;
        encoder.insert("int8_f16w", bench_encoder(&f16w, &enc_texts, a.quick)?);
        drop(f16w);
        let f32w = Encoder::load_with(g.bundle(), Runtime::Fp32)?;
        encoder.insert("int8_f32w", bench_encoder(&f32w, &enc_texts, a.quick)?);
    }
    if let Some(fp) = &a.fp32_bundle {
        let g32 = Generator::load(fp)?;
        encoder.insert("fp32", bench_encoder(g32.encoder(), &enc_texts, a.quick)?);
    }
    for (k, v) in &encoder {
        for (words, x) in v {
            println!(
                "  {k:>4} {words:>3} words: p50 {:.2} ms",
                x["ms"]["p50"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!("2. generation");
    let generation = bench_generation(&g, &gen_texts, a.quick)?;
    println!(
        "  total p50 {:.2} ms",
        generation["total"]["p50"].as_f64().unwrap_or(0.0)
    );
    println!("3. cache");
    let cache = bench_cache(&g, &gen_texts, a.quick)?;
    println!("4. daemon");
    let daemon = bench_daemon(&a.bundle, a.quick)?;
    println!("5. footprint, 6. floor");
    let footprint = footprint(&a.bundle)?;
    let fl = floor(&g, &encoder["default"], &generation);
    println!("7. embeddings with an adapter");
    let embed = bench_embed(&g, &a.bundle, &enc_texts["20"], a.quick)?;
    println!("  {embed}");

    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(common::root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let report = json!({
        "date": date, "commit": commit, "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "quick": a.quick, "encoder": encoder, "generation": generation, "cache": cache,
        "encoder_weights": g.encoder().runtime().name(),
        "integer_path": sglora::IntegerPath::best().name(),
        "daemon": daemon, "footprint": footprint, "floor": fl, "embed": embed,
    });
    let py: Value = match &a.python {
        Some(p) => serde_json::from_slice(&std::fs::read(p)?)?,
        None => Value::Null,
    };
    if let Some(p) = a.json.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&a.json, serde_json::to_vec_pretty(&report)?)?;
    let md = markdown(&report, &py);
    println!("\n{md}");
    std::fs::write(&a.markdown, md)?;
    println!("wrote {} and {}", a.markdown.display(), a.json.display());
    Ok(())
}
