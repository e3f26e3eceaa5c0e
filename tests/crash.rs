//! Crash consistency: SIGKILL the real daemon at a random moment while it generates adapters for
//! D-Bus callers and drop-folder requests, restart it, and check after every kill that nothing is
//! lost or half-visible:
//! - the cache database passes `PRAGMA integrity_check`;
//! - every cache row points to a complete adapter whose weights match the row's SHA-256 (rows are
//!   inserted only after their files are durable; orphan directories are allowed after a kill
//!   and must be gone after the restart);
//! - every visible `outbox/` entry is a complete, valid adapter (temporaries are hidden and
//!   removed at the next start);
//! - at the end every dropped request is in `done/` (with exactly one output) or in `failed/`
//!   with a reason; none is lost or delivered twice.
//!
//! `cargo test` runs 20 cycles; `make soak` runs 100 (`SGLORA_CRASH_CYCLES`) and writes
//! `SGLORA_CRASH_JSON`.

use sglora_testkit as common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bus::*;

const TEXTS: [&str; 4] = [
    "Given the name of an animal, find the broader category it is a kind of.",
    "Given an adjective, find the word with the opposite meaning.",
    "Given a body part, find the larger body part it belongs to.",
    "Given the name of a plant, find the group of plants it belongs to.",
];

/// Problems with an adapter directory, or None if it is complete and self-consistent.
fn adapter_problem(dir: &Path, want_sha: Option<&str>) -> Option<String> {
    let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"));
    let w = match read("adapter_model.safetensors") {
        Ok(w) => w,
        Err(e) => return Some(e),
    };
    let st = match safetensors::SafeTensors::deserialize(&w) {
        Ok(st) => st,
        Err(e) => return Some(format!("weights do not parse: {e}")),
    };
    if st.len() != 24 {
        return Some(format!("{} tensors, expected 24", st.len()));
    }
    for f in ["adapter_config.json", "provenance.json"] {
        match read(f).map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Some(format!("{f}: {e}")),
            Err(e) => return Some(e),
        }
    }
    let sha = sglora::sha256_hex(&w);
    if let Some(want) = want_sha {
        if sha != want {
            return Some(format!("weights sha {sha} != row's {want}"));
        }
    }
    let prov: serde_json::Value =
        serde_json::from_slice(&read("provenance.json").unwrap_or_default()).unwrap_or_default();
    if prov["weights_sha256"] != sha.as_str() {
        return Some("provenance weights_sha256 does not match the weights".into());
    }
    None
}

#[derive(Debug, Default, serde::Serialize)]
struct Counts {
    cycles: u64,
    kills_with_work_pending: u64,
    dbus_calls_sent: u64,
    dbus_calls_answered_before_kill: u64,
    dbus_calls_cut_by_kill: u64,
    drop_requests: u64,
    rows_checked: u64,
    bad_rows: u64,
    integrity_failures: u64,
    orphan_dirs_after_kill: u64,
    orphan_dirs_after_restart: u64,
    outbox_entries_checked: u64,
    bad_outbox_entries: u64,
    hidden_temps_after_kill: u64,
    hidden_temps_after_restart: u64,
    leftovers_surviving_restart: u64,
    requests_pending_at_a_kill: u64,
    done: u64,
    failed: u64,
    lost: u64,
    delivered_twice: u64,
}

/// Check the state a stopped or killed daemon left: database and outbox. Returns the orphan
/// cache directories and hidden outbox temporaries found (a restart must remove them).
fn check_state(state: &Path, c: &mut Counts, after_restart: bool) -> Vec<PathBuf> {
    let mut leftovers = Vec::new();
    let db = rusqlite::Connection::open(state.join("cache.db")).unwrap();
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    if ok != "ok" {
        c.integrity_failures += 1;
    }
    let rows: Vec<(String, String)> = db
        .prepare("SELECT id, weights_sha256 FROM adapters")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let adapters = state.join("cache/adapters");
    let ids: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for (id, sha) in &rows {
        c.rows_checked += 1;
        if let Some(p) = adapter_problem(&adapters.join(id), Some(sha)) {
            eprintln!("bad cache row {id}: {p}");
            c.bad_rows += 1;
        }
    }
    for e in std::fs::read_dir(&adapters).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !ids.contains(name.as_str()) {
            leftovers.push(e.path());
            if after_restart {
                c.orphan_dirs_after_restart += 1;
            } else {
                c.orphan_dirs_after_kill += 1;
            }
        }
    }
    let outbox = state.join("dropbox/outbox");
    for e in std::fs::read_dir(&outbox).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            leftovers.push(e.path());
            if after_restart {
                c.hidden_temps_after_restart += 1;
            } else {
                c.hidden_temps_after_kill += 1;
            }
            continue;
        }
        c.outbox_entries_checked += 1;
        if let Some(p) = adapter_problem(&e.path(), None) {
            eprintln!("bad outbox entry {name}: {p}");
            c.bad_outbox_entries += 1;
        }
    }
    leftovers
}

fn drop_request(inbox: &Path, name: &str, text: &str, seed: u64) {
    let body = serde_json::json!({"description": text, "seed": seed, "allow_ood": true});
    let tmp = inbox.join(format!(".{name}.part"));
    std::fs::write(&tmp, body.to_string()).unwrap();
    std::fs::rename(&tmp, inbox.join(format!("{name}.json"))).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_corrupts_nothing() {
    let cycles: u64 = std::env::var("SGLORA_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let inbox = st.join("dropbox/inbox");
    let mut c = Counts::default();
    let mut names = Vec::new();
    let mut rng = sglora::Rng::new(2026);
    let t0 = Instant::now();
    let mut leftovers: Vec<PathBuf> = Vec::new();
    for cycle in 0..cycles {
        let d = Daemon::start(&bus, st, &[]);
        // Before READY the restart reconciled the cache and cleaned the outbox: whatever the
        // kill left behind is gone.
        let still = leftovers.iter().filter(|p| p.exists()).count() as u64;
        c.leftovers_surviving_restart += still;
        let conn = connect(&bus).await;
        // Work for this cycle: six D-Bus misses and three drop-folder requests (~100-200 ms of
        // generation with two running at a time).
        let mut calls = Vec::new();
        for j in 0..6u64 {
            let conn = conn.clone();
            let text = TEXTS[((cycle + j) % 4) as usize];
            let seed = 100_000 + cycle * 10 + j;
            calls.push(tokio::spawn(async move {
                generate(&conn, text, &opts(seed)).await.is_ok()
            }));
            c.dbus_calls_sent += 1;
        }
        for j in 0..3u64 {
            let name = format!("req-{cycle}-{j}");
            drop_request(
                &inbox,
                &name,
                TEXTS[((cycle + j + 2) % 4) as usize],
                200_000 + cycle * 10 + j,
            );
            names.push(name);
            c.drop_requests += 1;
        }
        // Kill at a random moment in the next 0-250 ms (a generation takes tens of ms; the
        // drop folder waits for its settle time first).
        let wait = (rng.uniform() * 250.0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if prop_u64(&conn, "Pending").await > 0 {
            c.kills_with_work_pending += 1;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        drop(d); // waits for the process
        for h in calls {
            if h.await.unwrap_or(false) {
                c.dbus_calls_answered_before_kill += 1;
            } else {
                c.dbus_calls_cut_by_kill += 1;
            }
        }
        c.requests_pending_at_a_kill += std::fs::read_dir(&inbox)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count() as u64;
        leftovers = check_state(st, &mut c, false);
        c.cycles += 1;
    }

    // Last start: every pending request is processed.
    let d = Daemon::start(&bus, st, &[]);
    c.leftovers_surviving_restart += leftovers.iter().filter(|p| p.exists()).count() as u64;
    let t = Instant::now();
    loop {
        let pending = std::fs::read_dir(&inbox)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count();
        if pending == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{pending} requests still pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the last move to done/ land, then stop cleanly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.stop();
    check_state(st, &mut c, true);

    let done: HashSet<String> = std::fs::read_dir(st.join("dropbox/done"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let failed: HashSet<String> = std::fs::read_dir(st.join("dropbox/failed"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let outputs: BTreeMap<String, usize> = std::fs::read_dir(st.join("dropbox/outbox"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .fold(BTreeMap::new(), |mut m, n| {
            let base = match n.rsplit_once('-') {
                Some((b, i)) if i.parse::<u32>().is_ok() && b.matches('-').count() == 2 => {
                    b.to_string()
                }
                _ => n,
            };
            *m.entry(base).or_default() += 1;
            m
        });
    for n in &names {
        if done.contains(&format!("{n}.json")) {
            c.done += 1;
            match outputs.get(n) {
                Some(1) => {}
                Some(_) => c.delivered_twice += 1,
                None => c.lost += 1,
            }
        } else if failed.contains(&format!("{n}.json"))
            && failed.contains(&format!("{n}.error.txt"))
        {
            c.failed += 1;
        } else {
            c.lost += 1;
        }
    }
    let summary = serde_json::to_string_pretty(&c).unwrap();
    println!("{summary}\n{:.0} s", t0.elapsed().as_secs_f64());
    if let Ok(p) = std::env::var("SGLORA_CRASH_JSON") {
        std::fs::write(p, &summary).unwrap();
    }
    assert_eq!(c.integrity_failures, 0, "{summary}");
    assert_eq!(c.bad_rows, 0, "{summary}");
    assert_eq!(c.bad_outbox_entries, 0, "{summary}");
    assert_eq!(c.orphan_dirs_after_restart, 0, "{summary}");
    assert_eq!(c.hidden_temps_after_restart, 0, "{summary}");
    assert_eq!(c.leftovers_surviving_restart, 0, "{summary}");
    assert_eq!(c.lost, 0, "{summary}");
    assert_eq!(c.delivered_twice, 0, "{summary}");
    assert_eq!(c.done + c.failed, c.drop_requests, "{summary}");
    assert!(c.kills_with_work_pending > 0, "no kill hit work: {summary}");
}
