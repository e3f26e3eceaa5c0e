//! The real daemon on a real (private) dbus-daemon, with real SQLite and real files. Calls go
//! through zbus and through the stock `busctl` and `gdbus` tools.

use sglora_testkit as common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::bus::*;
use common::*;
use zbus::Variant;

/// A re-wording of [`ANIMAL`] within the cache's near-duplicate threshold.
const PARAPHRASE: &str =
    "Given the name of an animal, find the broader category that it is a kind of.";

/// Cosine similarity of two descriptions' embeddings, by the bundle's encoder.
fn cosine_of(g: &sglora::Generator, a: &str, b: &str) -> f64 {
    sglora::similarities(
        &g.encoder().embed(a).unwrap().vector,
        None,
        &sglora::Experts::from_parts(
            vec!["q".into()],
            vec!["q".into()],
            sglora::Keys::single(384, g.encoder().embed(b).unwrap().vector),
            vec![0.0],
            vec![0.0],
        )
        .unwrap(),
    )[0]
}

/// The cache serves a near-duplicate only when its retrieval is of the same kind: a description
/// within the (here lowered) threshold that asks for another relation ("the group it is a member
/// of" against "the category it is a kind of") gets its own adapter, a paraphrase asking the
/// same thing is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_duplicate_asking_another_relation_is_not_served() {
    const GROUP: &str =
        "Given the name of an animal, find the group or collection it is a member of.";
    let g = sglora::Generator::load(bundle_dir()).unwrap();
    let top_relation = |text: &str| {
        let ex = g
            .explain_text(text, &sglora::GenerateOptions::default())
            .unwrap();
        g.experts().meta(ex.experts[0].index).relation.clone()
    };
    // premises, measured with the bundle's encoder: both within the threshold, another relation
    let (cos, cos_p) = (
        cosine_of(&g, GROUP, ANIMAL),
        cosine_of(&g, PARAPHRASE, ANIMAL),
    );
    println!("cosine to ANIMAL: {GROUP:?} {cos:.3}, paraphrase {cos_p:.3}");
    assert!(cos >= 0.5 && cos_p >= 0.5, "premise: within the threshold");
    assert_ne!(top_relation(GROUP), top_relation(ANIMAL), "premise");
    assert_eq!(top_relation(PARAPHRASE), top_relation(ANIMAL), "premise");

    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let _d = Daemon::start(
        &bus,
        state.path(),
        &["--no-dropbox", "--cache-threshold", "0.5"],
    );
    let c = connect(&bus).await;
    let (_, id, hit, _) = generate(&c, ANIMAL, &opts(1)).await.unwrap();
    assert!(!hit);
    let (_, id2, hit2, prov) = generate(&c, GROUP, &opts(1)).await.unwrap();
    assert!(
        !hit2 && id2 != id,
        "another relation must not be served ANIMAL's adapter"
    );
    let prov: serde_json::Value = serde_json::from_str(&prov).unwrap();
    assert_eq!(prov["description"], GROUP);
    let (_, id3, hit3, _) = generate(&c, PARAPHRASE, &opts(1)).await.unwrap();
    assert!(
        hit3 && id3 == id,
        "a paraphrase of the same task is still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_api_cache_hits_paraphrases_and_stock_tools() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;

    let t = Instant::now();
    let (dir, id, hit, prov) = generate(&c, ANIMAL, &opts(1)).await.unwrap();
    let miss_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(!hit);
    assert!(Path::new(&dir).join("adapter_model.safetensors").is_file());
    let prov: serde_json::Value = serde_json::from_str(&prov).unwrap();
    assert_eq!(prov["description"], ANIMAL);
    let t = Instant::now();
    let (dir2, id2, hit2, _) = generate(&c, ANIMAL, &opts(1)).await.unwrap();
    let hit_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(hit2 && id2 == id && dir2 == dir);
    println!("round trip: miss {miss_ms:.1} ms, exact hit {hit_ms:.1} ms");

    // A re-wording above the threshold is served from the cache; the similarity is measured
    // with the same encoder first so the test states its premise.
    let paraphrase = PARAPHRASE;
    let g = sglora::Generator::load(bundle_dir()).unwrap();
    let cos = cosine_of(&g, paraphrase, ANIMAL);
    println!("paraphrase cosine {cos:.4}");
    assert!(
        cos >= 0.97,
        "premise: the paraphrase must be within the threshold ({cos})"
    );
    let (_, id3, hit3, _) = generate(&c, paraphrase, &opts(1)).await.unwrap();
    assert!(
        hit3 && id3 == id,
        "a paraphrase above the threshold must hit"
    );
    // Another task misses; another seed misses.
    let (_, id4, hit4, _) = generate(&c, ANTONYM, &opts(1)).await.unwrap();
    assert!(!hit4 && id4 != id);
    let (_, id5, hit5, _) = generate(&c, ANIMAL, &opts(2)).await.unwrap();
    assert!(!hit5 && id5 != id);
    assert_eq!(prop_u64(&c, "CacheEntries").await, 3);
    assert_eq!(prop_u64(&c, "RequestsServed").await, 5);
    assert_eq!(prop_u64(&c, "GenerationsRun").await, 3);

    // Errors are proper D-Bus errors.
    let e = dbus_error(generate(&c, "   ", &opts(1)).await.unwrap_err());
    assert!(
        e.starts_with("org.sglora.Generator1.Error.InvalidDescription"),
        "{e}"
    );
    let bad: Opts = HashMap::from([("top_k".to_string(), Variant::I32(-1))]);
    let e = dbus_error(generate(&c, ANIMAL, &bad).await.unwrap_err());
    assert!(
        e.starts_with("org.sglora.Generator1.Error.InvalidOption"),
        "{e}"
    );
    let strict: Opts = HashMap::from([("min_similarity".to_string(), Variant::F64(1.0))]);
    let e = dbus_error(
        generate(
            &c,
            "Summarise quarterly earnings calls in three bullet points.",
            &strict,
        )
        .await
        .unwrap_err(),
    );
    assert!(
        e.starts_with("org.sglora.Generator1.Error.OutOfDistribution"),
        "{e}"
    );

    // GetAdapter / Evict
    let m = c
        .call_method(Some(NAME), PATH, Some(NAME), "GetAdapter", &(id4.as_str(),))
        .await
        .unwrap();
    let (gdir, _): (String, String) = m.body().deserialize().unwrap();
    assert!(Path::new(&gdir).is_dir());
    let m = c
        .call_method(Some(NAME), PATH, Some(NAME), "Evict", &(id4.as_str(),))
        .await
        .unwrap();
    assert!(m.body().deserialize::<bool>().unwrap());
    assert!(!Path::new(&gdir).exists());
    let e = dbus_error(
        c.call_method(Some(NAME), PATH, Some(NAME), "GetAdapter", &(id4.as_str(),))
            .await
            .unwrap_err(),
    );
    assert!(e.starts_with("org.sglora.Generator1.Error.NotFound"), "{e}");
    let e = dbus_error(
        c.call_method(Some(NAME), PATH, Some(NAME), "GetAdapter", &("../../etc",))
            .await
            .unwrap_err(),
    );
    assert!(e.starts_with("org.sglora.Generator1.Error.NotFound"), "{e}");

    // Stock tools: busctl and gdbus.
    let addr = format!("--address={}", bus.address);
    let o = tool(
        "busctl",
        &[
            &addr,
            "call",
            NAME,
            PATH,
            NAME,
            "Generate",
            "sa{sv}",
            ANIMAL,
            "2",
            "seed",
            "t",
            "1",
            "allow_ood",
            "b",
            "true",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("ssbs") && out.contains(&id) && out.contains(" true "),
        "{out}"
    );
    let o = tool("busctl", &[&addr, "introspect", NAME, PATH]);
    let out = String::from_utf8_lossy(&o.stdout);
    for member in [
        ".Generate",
        ".Explain",
        ".ExplainJson",
        ".ListExperts",
        ".GetAdapter",
        ".OpenAdapter",
        ".Evict",
        ".AdapterReady",
        ".GenerationFailed",
        ".CacheHitRatio",
    ] {
        assert!(out.contains(member), "introspection lacks {member}: {out}");
    }
    let o = tool(
        "busctl",
        &[
            &addr, "call", NAME, PATH, NAME, "Generate", "sa{sv}", "", "0",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("empty"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = tool(
        "gdbus",
        &[
            "call",
            "--address",
            &bus.address,
            "--dest",
            NAME,
            "--object-path",
            PATH,
            "--method",
            &format!("{NAME}.Explain"),
            ANTONYM,
            "{}",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("antonym"), "{out}");
    // the whole explanation, expected gain included
    let reply = c
        .call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "ExplainJson",
            &(ANTONYM, opts(0)),
        )
        .await
        .expect("ExplainJson");
    let json: String = reply.body().deserialize().expect("a string");
    let ex: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let g = &ex["expected_gain"];
    let (est, lo, hi) = (
        g["estimate"].as_f64(),
        g["low"].as_f64(),
        g["high"].as_f64(),
    );
    assert!(
        matches!((est, lo, hi), (Some(e), Some(l), Some(h)) if l <= e && e <= h),
        "{json}"
    );
    assert!(
        ex["experts"][0]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("antonym")),
        "{json}"
    );
    let o = tool(
        "gdbus",
        &[
            "call",
            "--address",
            &bus.address,
            "--dest",
            NAME,
            "--object-path",
            PATH,
            "--method",
            &format!("{NAME}.ListExperts"),
        ],
    );
    assert!(o.status.success());
    let o = tool(
        "busctl",
        &[&addr, "get-property", NAME, PATH, NAME, "CacheHitRatio"],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("d "),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // The administrator's interface (this test's uid runs the daemon, so it is the service user).
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some("org.sglora.Admin1"),
            "ReloadExperts",
            &(),
        )
        .await
        .unwrap();
    assert!(m.body().deserialize::<u32>().unwrap() > 0);
    let gone = c
        .call_method(Some(NAME), PATH, Some(NAME), "ReloadExperts", &())
        .await;
    assert!(gone.is_err(), "ReloadExperts moved to org.sglora.Admin1");

    let log = d.stop();
    assert!(log.contains("stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_cache_and_damaged_adapters_are_regenerated() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let (dir, id, _, _) = generate(&c, ANIMAL, &opts(4)).await.unwrap();
    let (dir_b, _, _, _) = generate(&c, ANTONYM, &opts(4)).await.unwrap();
    d.stop();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let (_, id2, hit, _) = generate(&c, ANIMAL, &opts(4)).await.unwrap();
    assert!(hit && id2 == id, "the cache must survive a restart");
    // corrupt the weights: detected by hash, regenerated
    let w = Path::new(&dir).join("adapter_model.safetensors");
    let good = std::fs::read(&w).unwrap();
    std::fs::write(&w, b"corrupt").unwrap();
    let (_, _, hit, _) = generate(&c, ANIMAL, &opts(4)).await.unwrap();
    assert!(!hit, "a corrupted adapter must not be served");
    assert_eq!(
        std::fs::read(&w).unwrap(),
        good,
        "regeneration is deterministic"
    );
    // delete a whole adapter directory: regenerated
    std::fs::remove_dir_all(&dir_b).unwrap();
    let (dir_b2, _, hit, _) = generate(&c, ANTONYM, &opts(4)).await.unwrap();
    assert!(
        !hit && Path::new(&dir_b2)
            .join("adapter_model.safetensors")
            .is_file()
    );
    d.stop();
    // the database is intact
    let db = rusqlite::Connection::open(state.path().join("cache.db")).unwrap();
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_byte_budget_and_identical_requests_coalesce() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    // one adapter is ~300 KB; allow two
    let d = Daemon::start(
        &bus,
        state.path(),
        &["--no-dropbox", "--cache-max-bytes", "700000"],
    );
    let c = connect(&bus).await;
    for seed in 0..4 {
        generate(&c, ANIMAL, &opts(seed)).await.unwrap();
        assert!(prop_u64(&c, "CacheBytes").await <= 700_000);
    }
    assert_eq!(prop_u64(&c, "CacheEntries").await, 2);
    let dirs = std::fs::read_dir(state.path().join("cache/adapters"))
        .unwrap()
        .count();
    assert_eq!(dirs, 2, "evicted adapters' files are removed");

    // 8 concurrent identical requests: one generation, one answer for all.
    let before = prop_u64(&c, "GenerationsRun").await;
    let calls = (0..8).map(|_| {
        let c = c.clone();
        tokio::spawn(async move { generate(&c, ANTONYM, &opts(77)).await.unwrap() })
    });
    let results: Vec<_> = futures_join(calls.collect()).await;
    let ids: std::collections::HashSet<_> = results.iter().map(|r| r.1.clone()).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(
        prop_u64(&c, "GenerationsRun").await,
        before + 1,
        "identical concurrent requests must coalesce"
    );
    d.stop();
}

async fn futures_join<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_queue_answers_busy() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &bus,
        state.path(),
        &["--no-dropbox", "--max-concurrent", "1", "--max-queue", "1"],
    );
    let c = connect(&bus).await;
    let calls: Vec<_> = (0..24u64)
        .map(|seed| {
            let c = c.clone();
            tokio::spawn(async move { generate(&c, ANIMAL, &opts(1000 + seed)).await })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in calls {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                let e = dbus_error(e);
                assert!(
                    e.starts_with("org.sglora.Generator1.Error.Busy"),
                    "only Busy is allowed: {e}"
                );
                busy += 1;
            }
        }
    }
    println!("24 concurrent distinct requests, capacity 2: {ok} served, {busy} busy");
    assert!(ok >= 1 && busy >= 1);
    d.stop();
}

#[test]
fn drop_folder_requests_rejections_and_startup_files() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("dropbox");
    let inbox = root.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    // present before start-up: must be processed
    std::fs::write(inbox.join("early.txt"), ANIMAL).unwrap();
    let d = Daemon::start(&bus, state.path(), &[]);
    assert!(
        wait_for(&root.join("outbox/early/adapter_model.safetensors"), 60),
        "start-up file not processed"
    );
    assert!(root.join("done/early.txt").exists());

    std::fs::write(
        inbox.join("req.json"),
        format!(r#"{{"description": "{ANTONYM}", "seed": 9, "allow_ood": true}}"#),
    )
    .unwrap();
    assert!(wait_for(
        &root.join("outbox/req/adapter_model.safetensors"),
        60
    ));
    // the same name again gets a unique output, never clobbering the first
    std::fs::write(
        inbox.join("req.json"),
        format!(r#"{{"description": "{ANTONYM}", "seed": 10, "allow_ood": true}}"#),
    )
    .unwrap();
    assert!(wait_for(
        &root.join("outbox/req-1/adapter_model.safetensors"),
        60
    ));
    let p1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("outbox/req/provenance.json")).unwrap())
            .unwrap();
    assert_eq!(p1["seed"], 9);

    // rejections, each with a reason in failed/NAME.error.txt
    std::fs::write(inbox.join("binary.txt"), [0xffu8, 0xfe, 0x00, 0x01]).unwrap();
    std::fs::write(inbox.join("huge.txt"), vec![b'a'; 200_000]).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", inbox.join("shadow.txt")).unwrap();
    std::fs::write(inbox.join("..evil.json"), r#"{"description": 1}"#).unwrap();
    std::fs::write(
        inbox.join("wrong.json"),
        r#"{"description": "x", "top_k": -3}"#,
    )
    .unwrap();
    for (name, needle) in [
        ("binary", "UTF-8"),
        ("huge", "limit"),
        ("shadow", "symbolic link"),
        ("wrong", "invalid JSON"),
    ] {
        let err = root.join(format!("failed/{name}.error.txt"));
        assert!(wait_for(&err, 30), "{name} was not rejected");
        let text = std::fs::read_to_string(&err).unwrap();
        assert!(text.contains(needle), "{name}: {text}");
    }
    // a dotfile is ignored (not ours), so "..evil.json" stays where it is and nothing escapes
    std::thread::sleep(Duration::from_millis(500));
    assert!(inbox.join("..evil.json").exists());
    assert!(!state.path().join("evil").exists() && !root.join("evil").exists());
    // the symlink target was never touched
    assert!(std::fs::symlink_metadata(root.join("failed/shadow.txt"))
        .unwrap()
        .file_type()
        .is_symlink());

    // a file written slowly in pieces through one open handle is read once, complete
    {
        use std::io::Write;
        let mut f = std::fs::File::create(inbox.join("slow.txt")).unwrap();
        for word in ANIMAL.split_inclusive(' ') {
            f.write_all(word.as_bytes()).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    assert!(wait_for(&root.join("outbox/slow/provenance.json"), 60));
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("outbox/slow/provenance.json")).unwrap())
            .unwrap();
    assert_eq!(p["description"], ANIMAL);
    // temporary names are ignored until renamed into place
    std::fs::write(inbox.join("late.txt.part"), ANTONYM).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(inbox.join("late.txt.part").exists());
    std::fs::rename(inbox.join("late.txt.part"), inbox.join("late.txt")).unwrap();
    assert!(wait_for(
        &root.join("outbox/late/adapter_model.safetensors"),
        60
    ));
    // no temporary directories visible in outbox
    for e in std::fs::read_dir(root.join("outbox")).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with('.'), "temporary {n} left in outbox");
    }
    d.stop();
}

/// The guard cannot be lifted through the cache: an adapter generated for an off-topic request
/// with `allow_ood` (provenance says so, with the scope score below its threshold) is not served
/// to the same request without it, which is refused as out of distribution by the scope guard;
/// lowering `min_similarity` does not lift the scope guard either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifted_guard_does_not_leak_through_the_cache() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let off_topic = "Summarise quarterly earnings calls in three bullet points.";
    let lifted: Opts = HashMap::from([("allow_ood".to_string(), Variant::Bool(true))]);
    let (_, _, hit, prov) = generate(&c, off_topic, &lifted).await.unwrap();
    assert!(!hit);
    let prov: serde_json::Value = serde_json::from_str(&prov).unwrap();
    assert_eq!(prov["out_of_distribution"], true);
    let s = &prov["in_scope"];
    assert!(
        s["score"].as_f64().unwrap() < s["min_score"].as_f64().unwrap(),
        "{prov}"
    );
    let lowered: Opts = HashMap::from([("min_similarity".to_string(), Variant::F64(0.0))]);
    for opts in [Opts::new(), lowered] {
        let e = dbus_error(generate(&c, off_topic, &opts).await.unwrap_err());
        assert!(
            e.starts_with("org.sglora.Generator1.Error.OutOfDistribution")
                && e.contains("does not read as a task"),
            "{e}"
        );
    }
    d.stop();
}

/// An adapter cached under one runtime is not served by a daemon running another (its bytes are
/// that runtime's, not what this one makes for the same seed), and is still there for the first
/// runtime afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_runtime_does_not_serve_another_runtimes_adapters() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let text = "Given an adjective, find a word that means the opposite.";
    let run = |cfg: &'static str| {
        let (bus, state) = (&bus, state.path());
        async move {
            let d = Daemon::start_configured(bus, state, cfg, &["--no-dropbox"]);
            let c = connect(bus).await;
            let (_, _, hit, prov) = generate(&c, text, &opts(3)).await.unwrap();
            d.stop();
            let prov: serde_json::Value = serde_json::from_str(&prov).unwrap();
            (
                hit,
                prov["weights_sha256"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    let (hit, integer) = run("[model]\nencoder_weights = \"auto\"\n").await;
    assert!(!hit);
    let (hit, int8) = run("[model]\nencoder_weights = \"int8\"\n").await;
    assert!(
        !hit,
        "an adapter made by the integer runtime was served by the int8 runtime"
    );
    assert_ne!(
        integer, int8,
        "the runtimes made the same bytes: the test proves nothing"
    );
    let (hit, again) = run("[model]\nencoder_weights = \"integer\"\n").await;
    assert!(hit, "the integer runtime's adapter was lost");
    assert_eq!(again, integer);
}

/// A minimum expected gain cannot be bypassed through the cache: an adapter made without a
/// minimum is not served to a request whose minimum it does not meet (same text), and one made
/// under a minimum it met is not served to a near-duplicate description whose own estimate is
/// below that minimum: both are refused as a fresh generation would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minimum_expected_gain_does_not_leak_through_the_cache() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let with_min = |min: f64| {
        let mut o = opts(1);
        o.insert("min_expected_gain".to_string(), Variant::F64(min));
        o
    };
    let low_gain = "org.sglora.Generator1.Error.LowExpectedGain";

    // Same text: cached without a minimum, asked for again with one above its estimate.
    let (_, _, hit, prov) = generate(&c, ANIMAL, &opts(1)).await.unwrap();
    assert!(!hit);
    let prov: serde_json::Value = serde_json::from_str(&prov).unwrap();
    let est = prov["expected_gain"]["estimate"].as_f64().unwrap();
    let above = (est + 1.0).clamp(0.0, 100.0);
    assert!(est < above, "premise: the estimate {est} must be below 100");
    let e = dbus_error(generate(&c, ANIMAL, &with_min(above)).await.unwrap_err());
    assert!(
        e.starts_with(low_gain) && e.contains("min_expected_gain"),
        "{e}"
    );

    // Near duplicates: the one with the higher estimate is generated under a minimum between
    // the two; the other, a near-duplicate hit in the same scope, must still be refused.
    let g = sglora::Generator::load(bundle_dir()).unwrap();
    let cos = cosine_of(&g, PARAPHRASE, ANIMAL);
    assert!(cos >= 0.97, "premise: a near duplicate ({cos})");
    let o = sglora::GenerateOptions {
        seed: 1,
        allow_ood: true,
        ..Default::default()
    };
    let gain = |t: &str| g.explain_text(t, &o).unwrap().expected_gain.estimate;
    let (a, p) = (gain(ANIMAL), gain(PARAPHRASE));
    let (hi, lo) = if a > p {
        (ANIMAL, PARAPHRASE)
    } else {
        (PARAPHRASE, ANIMAL)
    };
    let mid = (a + p) / 2.0;
    println!("expected gain: animal {a}, paraphrase {p}");
    assert!(
        a != p && (0.0..=100.0).contains(&mid) && a.min(p) < mid,
        "premise: two different estimates around a valid minimum ({a}, {p})"
    );
    let (_, _, hit, _) = generate(&c, hi, &with_min(mid)).await.unwrap();
    assert!(!hit);
    let e = dbus_error(generate(&c, lo, &with_min(mid)).await.unwrap_err());
    assert!(e.starts_with(low_gain), "{e}");
    assert_eq!(prop_u64(&c, "CacheEntries").await, 2);
    d.stop();
}

/// A request written into `inbox/` with a pause longer than the settle time is read only once
/// its writer closes it: the adapter is for the whole text, not for its first sentence.
#[test]
fn a_paused_writer_is_read_only_after_it_closes() {
    use std::io::Write;
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("dropbox");
    let d = Daemon::start(&bus, state.path(), &[]);
    let (first, rest) = (
        "Given the name of an animal,",
        " find the broader category it is a kind of.",
    );
    let mut f = std::fs::File::create(root.join("inbox/slow.txt")).unwrap();
    f.write_all(first.as_bytes()).unwrap();
    f.flush().unwrap();
    // Five settle periods (200 ms each) with the file open and unchanged.
    std::thread::sleep(Duration::from_millis(1000));
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    let prov = root.join("outbox/slow/provenance.json");
    if !wait_for(&prov, 20) {
        panic!("the request was not processed; daemon log:\n{}", d.stop());
    }
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(&prov).unwrap()).unwrap();
    assert_eq!(p["description"], format!("{first}{rest}"));
    assert!(
        !root.join("outbox/slow-1").exists(),
        "the request was processed twice"
    );

    // Renamed into inbox/ while its writer still holds it open (the rename is a completion
    // event, but the writer is not done): read only after the writer closes it.
    let mut f = std::fs::File::create(root.join("inbox/.moved.txt.part")).unwrap();
    f.write_all(first.as_bytes()).unwrap();
    f.flush().unwrap();
    std::fs::rename(
        root.join("inbox/.moved.txt.part"),
        root.join("inbox/moved.txt"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    let prov = root.join("outbox/moved/provenance.json");
    if !wait_for(&prov, 20) {
        panic!(
            "the moved request was not processed; daemon log:\n{}",
            d.stop()
        );
    }
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(&prov).unwrap()).unwrap();
    assert_eq!(
        p["description"],
        format!("{first}{rest}"),
        "a file renamed in mid-write was read before its writer closed it"
    );
    d.stop();
}

/// The interface descriptions installed under `/usr/share/dbus-1/interfaces/` are what the
/// daemon answers to `Introspect`, interface by interface. `SGLORA_BLESS=1` rewrites them from
/// the daemon after an API change, on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_interface_descriptions_match_the_daemon() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some("org.freedesktop.DBus.Introspectable"),
            "Introspect",
            &(),
        )
        .await
        .unwrap();
    let xml: String = m.body().deserialize().unwrap();
    d.stop();
    for iface in ["org.sglora.Generator1", "org.sglora.Admin1"] {
        let start = xml
            .find(&format!("<interface name=\"{iface}\">"))
            .unwrap_or_else(|| panic!("{iface} not introspected: {xml}"));
        let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
        let live: String = xml[start..end]
            .lines()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join("\n");
        let file = root().join(format!("dbus/{iface}.xml"));
        let want = format!(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n\
             <!-- {iface}, as sglorad answers Introspect at /org/sglora/Generator1. README.md \
             (Daemon) documents the methods; written by tests/daemon.rs with SGLORA_BLESS=1. -->\n\
             <node>\n{live}\n</node>\n"
        );
        if std::env::var_os("SGLORA_BLESS").is_some() {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &want).unwrap();
            continue;
        }
        let have = std::fs::read_to_string(&file).unwrap_or_default();
        assert_eq!(
            have,
            want,
            "{} is not what the daemon introspects; after an intended API change, rerun with \
             SGLORA_BLESS=1",
            file.display()
        );
    }
}

/// The drop folder under a flood: requests drain without a settle wait each (the lease says
/// when a writer is done), `outbox/`, `done/` and `failed/` stay within `max_kept_bytes`
/// (plus the eighth written between two prunes), and SIGTERM mid-flood stops the daemon
/// within the unit's stop timeout with nothing started after "stopping".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_folder_flood_drains_within_its_disk_budget_and_stops_promptly() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("dropbox");
    let budget: u64 = 4 * 1024 * 1024;
    let d = Daemon::start_configured(
        &bus,
        state.path(),
        &format!("[dropbox]\nmax_kept_bytes = {budget}\n[service]\nshutdown_grace_secs = 2\n"),
        &[],
    );
    // A request others could rewrite before it is read is refused.
    drop_request(&root.join("inbox"), "open.txt", ANIMAL.as_bytes(), 0o664);
    assert!(wait_for(&root.join("failed/open.error.txt"), 20));
    let why = std::fs::read_to_string(root.join("failed/open.error.txt")).unwrap();
    assert!(why.contains("writable by others"), "{why}");
    assert!(
        !root.join("failed/open.txt").exists(),
        "the member's own file was kept"
    );
    let n = 120;
    let t = Instant::now();
    for i in 0..n {
        // Each seed a miss.
        let req = serde_json::json!({"description": ANIMAL, "seed": i});
        drop_request(
            &root.join("inbox"),
            &format!("r{i}.json"),
            req.to_string().as_bytes(),
            0o644,
        );
    }
    // Retention removes the oldest of done/ as the flood goes on: count what is left to do.
    let left = || std::fs::read_dir(root.join("inbox")).unwrap().count();
    while left() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{} of {n} requests still in the inbox",
            left()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t.elapsed().as_secs_f64();
    let kept: u64 = ["outbox", "done", "failed"]
        .iter()
        .flat_map(|d| walkdir(&root.join(d)))
        .sum();
    println!(
        "drop folder: {n} requests (distinct seeds, all generated) in {took:.2} s ({:.0}/s); outbox+done+failed hold {kept} bytes (budget {budget})",
        n as f64 / took
    );
    assert!(
        kept <= budget + budget / 8 + 400_000,
        "the drop folder keeps {kept} bytes past its budget of {budget}"
    );

    // A second flood, stopped midway.
    for i in 0..400 {
        drop_request(
            &root.join("inbox"),
            &format!("s{i}.txt"),
            ANIMAL.as_bytes(),
            0o644,
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (log, stop) = d.stop_timed();
    println!("SIGTERM mid-flood: stopped in {:.2} s", stop.as_secs_f64());
    assert!(
        stop < Duration::from_secs(5),
        "stopping took {stop:?}, past the unit's TimeoutStopSec=5s"
    );
    let after = log
        .split("stopping")
        .nth(1)
        .expect("the daemon logged stopping");
    // The drop folder works one request at a time: at most the one in flight finishes, and
    // what was not started stays in the inbox for the next start (not failed for "stopping").
    let finished = after.lines().filter(|l| l.contains(" -> ")).count();
    assert!(finished <= 1, "work started after stopping: {after}");
    assert!(
        !after.contains("failed"),
        "requests failed at shutdown: {after}"
    );
    // Nothing of the second flood is lost: each request either went through (logged) or
    // still waits in the inbox. How many went through before SIGTERM depends on the machine.
    let waiting = std::fs::read_dir(root.join("inbox")).unwrap().count();
    let served = log
        .lines()
        .filter(|l| l.contains("/inbox/s") && l.contains(" -> "))
        .count();
    println!("second flood: {served} served before stopping, {waiting} left in the inbox");
    assert!(
        waiting > 0,
        "the flood was over before SIGTERM: {served} served"
    );
    assert_eq!(waiting + served, 400, "requests lost at shutdown: {log}");
}

fn walkdir(p: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                out.extend(walkdir(&e.path()));
            } else {
                out.push(m.len());
            }
        }
    }
    out
}

/// Counters announce themselves: after a burst of requests a watcher gets `PropertiesChanged`
/// with the new `RequestsServed`, and the burst costs at most one signal per second, not one
/// per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_emit_throttled_properties_changed() {
    use futures_util::StreamExt;
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .build()
        .unwrap();
    let mut changes = zbus::MessageStream::for_match_rule(rule, &c, None)
        .await
        .unwrap();
    let t = Instant::now();
    for seed in 0..20 {
        generate(&c, ANIMAL, &opts(seed)).await.unwrap();
    }
    let burst = t.elapsed();
    let (mut signals, mut served) = (0, None);
    let end = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end, changes.next()).await {
        let (iface, changed, _): (String, HashMap<String, zbus::OwnedVariant>, Vec<String>) =
            m.body().deserialize().unwrap();
        assert_eq!(iface, NAME);
        signals += 1;
        if let Some(v) = changed.get("RequestsServed") {
            served = Some(u64::try_from(&**v).unwrap());
        }
    }
    d.stop();
    println!("20 requests in {burst:?}: {signals} PropertiesChanged signals");
    assert_eq!(served, Some(20), "the last RequestsServed announced");
    let seconds = (burst + Duration::from_millis(2500)).as_secs() + 2;
    assert!(
        signals as u64 <= seconds,
        "{signals} signals in about {seconds} s: not throttled"
    );
}

/// Call `Embed`.
async fn embed_call(
    c: &zbus::Connection,
    id: &str,
    texts: &[&str],
) -> zbus::Result<(u32, Vec<u8>)> {
    let none: HashMap<String, Variant<'static>> = HashMap::new();
    let m = c
        .call_method(Some(NAME), PATH, Some(NAME), "Embed", &(id, texts, none))
        .await?;
    m.body().deserialize()
}

/// `Embed` gives the bytes `sglora embed` (the library) gives, with the caller's adapter applied
/// or the base model; every limit and bad input is a distinct error, and a flood of texts or a
/// damaged adapter costs nothing but the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_applies_the_callers_adapter_within_limits() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let cfg = "[embed]\nmax_texts = 8\nmax_bytes = 4096\n";
    let d = Daemon::start_configured(&bus, state.path(), cfg, &["--no-dropbox"]);
    let c = connect(&bus).await;
    let (dir, id, _, _) = generate(&c, ANTONYM, &opts(2)).await.unwrap();
    let texts = ["hot", "the opposite of a large dog", "cold"];

    let g = sglora::Generator::load(bundle_dir()).unwrap();
    let lora = g.encoder().load_adapter(Path::new(&dir)).unwrap();
    let want = |lora: Option<&sglora::Lora>| -> Vec<u8> {
        let e = g.encoder().embed_texts(&texts, lora, 1).unwrap();
        sglora::f32s_to_le(&e.into_iter().flat_map(|e| e.vector).collect::<Vec<_>>())
    };
    let (dim, adapted) = embed_call(&c, &id, &texts).await.unwrap();
    assert_eq!(dim, 384);
    assert_eq!(adapted.len(), texts.len() * 384 * 4);
    assert_eq!(
        adapted,
        want(Some(&lora)),
        "Embed = the library with the adapter"
    );
    let (_, base) = embed_call(&c, "", &texts).await.unwrap();
    assert_eq!(base, want(None), "an empty id is the base model");
    assert_ne!(base, adapted, "the adapter changes the embeddings");

    let err = |r: zbus::Result<(u32, Vec<u8>)>| dbus_error(r.unwrap_err());
    let e = err(embed_call(&c, "0123456789abcdef01234567", &texts).await);
    assert!(e.contains("Error.NotFound"), "{e}");
    let nine = ["x"; 9];
    let e = err(embed_call(&c, "", &nine).await);
    assert!(
        e.contains("Error.InvalidArgument") && e.contains("max_texts"),
        "{e}"
    );
    let long = "word ".repeat(1000);
    let e = err(embed_call(&c, "", &[long.as_str()]).await);
    assert!(
        e.contains("Error.InvalidArgument") && e.contains("max_bytes"),
        "{e}"
    );
    let e = err(embed_call(&c, "", &["fine", "  "]).await);
    assert!(
        e.contains("Error.InvalidArgument") && e.contains("text 1 is empty"),
        "{e}"
    );
    let e = err(embed_call(&c, "", &[]).await);
    assert!(e.contains("Error.InvalidArgument"), "{e}");
    let huge = "y".repeat(1 << 20);
    let e = err(embed_call(&c, "", &[huge.as_str()]).await);
    assert!(
        e.contains("Error.InvalidArgument") && e.contains("65536"),
        "{e}"
    );
    let before = d.status_kb("VmRSS");
    let many: Vec<&str> = vec!["t"; 100_000];
    let e = err(embed_call(&c, "", &many).await);
    assert!(
        e.contains("Error.InvalidArgument") && e.contains("4096"),
        "{e}"
    );
    let grew = d.status_kb("VmRSS").saturating_sub(before);
    println!("100,000 texts refused; RSS grew {grew} kB");
    let opts_bad: HashMap<String, Variant<'static>> =
        HashMap::from([("normalize".to_string(), Variant::Bool(false))]);
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "Embed",
            &("", &texts[..], opts_bad),
        )
        .await;
    let e = dbus_error(m.unwrap_err());
    assert!(e.contains("Error.InvalidOption"), "{e}");

    // Damaged on disk: detected by the recorded SHA-256, a distinct error, removed.
    let w = Path::new(&dir).join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x40;
    std::fs::write(&w, &bytes).unwrap();
    let e = err(embed_call(&c, &id, &texts).await);
    assert!(
        e.contains("Error.Damaged") && e.contains("generate it again"),
        "{e}"
    );
    let e = err(embed_call(&c, &id, &texts).await);
    assert!(
        e.contains("Error.NotFound"),
        "removed after the damage: {e}"
    );
    let (_, id2, hit, _) = generate(&c, ANTONYM, &opts(2)).await.unwrap();
    assert!(!hit && id2 == id, "regenerated under the same id");
    let (_, again) = embed_call(&c, &id, &texts).await.unwrap();
    assert_eq!(again, adapted, "the regenerated adapter embeds as before");

    // The README's stock-tool call and its Python client (Debian's python3 + python3-jeepney).
    let addr = format!("--address={}", bus.address);
    let o = tool(
        "busctl",
        &[
            &addr, "call", NAME, PATH, NAME, "Embed", "sasa{sv}", &id, "2", "hot", "cold", "0",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.starts_with("uay 384 3072 "),
        "{}",
        &out[..out.len().min(80)]
    );
    let o = std::process::Command::new("/usr/bin/python3")
        .arg(root().join("examples/embed_client.py"))
        .args([id.as_str(), "hot", "the opposite of a large dog", "cold"])
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .output()
        .expect("/usr/bin/python3 (Debian's python3 with python3-jeepney)");
    assert!(
        o.status.success(),
        "examples/embed_client.py (needs python3-jeepney): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let printed: Vec<f32> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap() as f32)
        .collect();
    assert_eq!(
        sglora::f32s_to_le(&printed),
        adapted,
        "the Python client prints the vectors Embed returned"
    );
    d.stop();
}

/// `Export` hands the caller a read-only descriptor of the file `sglora export` writes for the
/// same adapter, byte for byte; an unknown format is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_hands_a_read_only_merged_onnx() {
    use std::io::Read;
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let (dir, id, _, _) = generate(&c, ANTONYM, &opts(6)).await.unwrap();
    let out = state.path().join("cli.onnx");
    let o = common::cli::sglora(&[
        "export",
        &dir,
        "--format",
        "onnx-merged",
        "--int8",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::cli::stderr(&o));
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "Export",
            &(&id, "onnx-merged-int8"),
        )
        .await
        .unwrap();
    let fd: zbus::OwnedFd = m.body().deserialize().unwrap();
    let fd = std::os::fd::OwnedFd::from(fd);
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
    assert_eq!(
        flags & nix::libc::O_ACCMODE,
        nix::libc::O_RDONLY,
        "read-only"
    );
    let mut f = std::fs::File::from(fd);
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, std::fs::read(&out).unwrap(), "the CLI's bytes");
    use std::io::Write;
    assert!(f.write_all(b"x").is_err(), "cannot be written");
    // The fp32 export is the largest thing the daemon makes: it must stay well inside the unit's
    // MemoryMax (256 MiB).
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "Export",
            &(&id, "onnx-merged"),
        )
        .await
        .unwrap();
    let fd: zbus::OwnedFd = m.body().deserialize().unwrap();
    let size = std::fs::File::from(std::os::fd::OwnedFd::from(fd))
        .metadata()
        .unwrap()
        .len();
    let hwm = d.status_kb("VmHWM");
    println!("fp32 export {size} bytes; daemon peak RSS {hwm} kB");
    assert!(size > 50_000_000, "{size}");
    assert!(hwm < 200 * 1024, "peak RSS {hwm} kB after an fp32 export");
    // The onnxruntime adapter file: the CLI's bytes too.
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "Export",
            &(&id, "onnx-adapter"),
        )
        .await
        .unwrap();
    let fd: zbus::OwnedFd = m.body().deserialize().unwrap();
    let mut got = Vec::new();
    std::fs::File::from(std::os::fd::OwnedFd::from(fd))
        .read_to_end(&mut got)
        .unwrap();
    let cli = state.path().join("cli.onnx_adapter");
    let o = common::cli::sglora(&[
        "export",
        &dir,
        "--format",
        "onnx-adapter",
        "-o",
        cli.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::cli::stderr(&o));
    assert_eq!(got, std::fs::read(&cli).unwrap());
    assert_eq!(&got[4..8], b"TORT");
    let e = c
        .call_method(Some(NAME), PATH, Some(NAME), "Export", &(&id, "gguf"))
        .await
        .unwrap_err();
    let e = dbus_error(e);
    assert!(
        e.contains("Error.InvalidOption") && e.contains("onnx-merged"),
        "{e}"
    );
    let e = dbus_error(
        c.call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "Export",
            &("0123456789abcdef01234567", "onnx-merged"),
        )
        .await
        .unwrap_err(),
    );
    assert!(e.contains("Error.NotFound"), "{e}");
    d.stop();
}

/// An expert added over `org.sglora.Admin1.AddExpert` (the adapter's files as descriptors, so
/// the service reads nothing of the caller's) is listed with its origin and retrieved at once;
/// the adapters cached before it are not served in its presence (the repository's version is
/// part of the cache scope), it survives a restart, and once removed the earlier adapters are
/// served again. Bad calls get their own errors and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_added_over_the_bus_is_used_at_once_and_kept() {
    const ADMIN: &str = "org.sglora.Admin1";
    const ADDED: &str =
        "Crossword helper: from a clue word, come up with another word that means the same thing";
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let src = src.path().join("adapter");
    sglora::Generator::load(bundle_dir())
        .unwrap()
        .generate_to(
            "Given an adjective, find the word with the opposite meaning.",
            &sglora::GenerateOptions::default(),
            &src,
            false,
        )
        .unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let list = |c: zbus::Connection| async move {
        let m = c
            .call_method(Some(NAME), PATH, Some(NAME), "ListExperts", &())
            .await
            .unwrap();
        m.body()
            .deserialize::<Vec<(String, String, String)>>()
            .unwrap()
    };
    let shipped = list(c.clone()).await;
    assert!(shipped.iter().all(|(_, _, o)| o == "bundle"));
    let (_, _, hit, before) = generate(&c, ADDED, &opts(1)).await.unwrap();
    assert!(!hit);

    let add = |c: zbus::Connection, name: &'static str, o: HashMap<String, Variant<'static>>| {
        let (cfg, w) = (
            std::fs::File::open(src.join("adapter_config.json")).unwrap(),
            std::fs::File::open(src.join("adapter_model.safetensors")).unwrap(),
        );
        async move {
            use std::os::fd::AsFd;
            let m = c
                .call_method(
                    Some(NAME),
                    PATH,
                    Some(ADMIN),
                    "AddExpert",
                    &(
                        zbus::Fd::from(cfg.as_fd()),
                        zbus::Fd::from(w.as_fd()),
                        name,
                        vec![ADDED, "given a word, find a synonym"],
                        o,
                    ),
                )
                .await?;
            m.body().deserialize::<(String, f64, u32)>()
        }
    };
    let (name, err, n) = add(c.clone(), "mine/synonym", HashMap::new())
        .await
        .unwrap();
    assert_eq!(name, "mine/synonym");
    assert!(err < 1e-3, "projection error {err}");
    assert_eq!(n as usize, shipped.len() + 1);
    let now = list(c.clone()).await;
    assert!(now.contains(&("mine/synonym".into(), ADDED.into(), "added".into())));
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some(NAME),
            "Explain",
            &(ADDED, HashMap::<String, Variant>::new()),
        )
        .await
        .unwrap();
    let picked: Vec<(String, f64, f64)> = m.body().deserialize().unwrap();
    assert_eq!(picked[0].0, "mine/synonym", "{picked:?}");
    let (_, _, hit, with) = generate(&c, ADDED, &opts(1)).await.unwrap();
    assert!(
        !hit,
        "an adapter cached before the expert was added was served"
    );
    let sha = |p: &str| {
        serde_json::from_str::<serde_json::Value>(p).unwrap()["weights_sha256"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(sha(&with), sha(&before));

    // Refused, nothing changed: the same name again, an unknown option, a directory as a file,
    // removing a shipped expert or an unknown one.
    let e = dbus_error(
        add(c.clone(), "mine/synonym", HashMap::new())
            .await
            .unwrap_err(),
    );
    assert!(e.contains("ExpertRefused") && e.contains("already"), "{e}");
    let e = dbus_error(
        add(
            c.clone(),
            "other",
            HashMap::from([("colour".to_string(), Variant::U32(1))]),
        )
        .await
        .unwrap_err(),
    );
    assert!(e.contains("InvalidOption") && e.contains("colour"), "{e}");
    let dir = std::fs::File::open(state.path()).unwrap();
    let w = std::fs::File::open(src.join("adapter_model.safetensors")).unwrap();
    use std::os::fd::AsFd;
    let r = c
        .call_method(
            Some(NAME),
            PATH,
            Some(ADMIN),
            "AddExpert",
            &(
                zbus::Fd::from(dir.as_fd()),
                zbus::Fd::from(w.as_fd()),
                "other",
                vec![ADDED],
                HashMap::<String, Variant>::new(),
            ),
        )
        .await;
    let e = dbus_error(r.unwrap_err());
    assert!(
        e.contains("InvalidArgument") && e.contains("not a regular file"),
        "{e}"
    );
    for who in [shipped[0].0.as_str(), "nobody"] {
        let r = c
            .call_method(Some(NAME), PATH, Some(ADMIN), "RemoveExpert", &(who,))
            .await;
        let e = dbus_error(r.unwrap_err());
        assert!(e.contains("ExpertRefused"), "{e}");
    }
    assert_eq!(list(c.clone()).await.len(), shipped.len() + 1);

    // Across a restart: still there, and the adapter made with it is a cache hit.
    d.stop();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    assert_eq!(list(c.clone()).await, now);
    let (_, _, hit, again) = generate(&c, ADDED, &opts(1)).await.unwrap();
    assert!(hit && sha(&again) == sha(&with));

    // Removed with the CLI while the daemon runs: the next request sees the bundle's
    // repository again, and so is what it serves.
    let o = std::process::Command::new(sglora_bin())
        .arg("--bundle")
        .arg(bundle_dir())
        .arg("--state-dir")
        .arg(state.path())
        .args(["experts", "remove", "mine/synonym"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(list(c.clone()).await, shipped);
    let (_, _, hit, back) = generate(&c, ADDED, &opts(1)).await.unwrap();
    assert!(hit && sha(&back) == sha(&before));

    // Added and removed over the bus once more.
    add(c.clone(), "mine/synonym", HashMap::new())
        .await
        .unwrap();
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some(ADMIN),
            "RemoveExpert",
            &("mine/synonym",),
        )
        .await
        .unwrap();
    assert_eq!(
        m.body().deserialize::<u32>().unwrap() as usize,
        shipped.len()
    );
    assert_eq!(list(c.clone()).await, shipped);
    let log = d.stop();
    assert!(!log.contains("loading it failed"), "{log}");
}
