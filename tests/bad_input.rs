//! Bad input everywhere it can enter, each answered with a clear error and nothing lost: the CLI,
//! D-Bus, the drop folder, the bundle, the cache database and a full disk. (tests/cli.rs and
//! tests/daemon.rs hold the first cases of each; this file completes the matrix of
//! RELIABILITY.md.)

use sglora_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::bus::*;
use common::cli::*;
use common::*;
use zbus::Variant;

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

// ---- descriptions through the CLI -------------------------------------------------------------

#[test]
fn cli_description_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let o = out.to_str().unwrap();
    let megabyte = "word ".repeat(200_000);
    let ten_k_tokens = "token ".repeat(10_000);
    for (name, input, needle) in [
        ("1 MB", megabyte.as_bytes(), "limit"),
        ("10k tokens", ten_k_tokens.as_bytes(), "limit"),
        (
            "NUL byte",
            b"find the\0antonym of a word".as_slice(),
            "U+0000",
        ),
        ("escape", b"find \x1b[31m antonyms".as_slice(), "U+001B"),
        (
            "invalid UTF-8",
            b"find \xc3\x28 antonyms".as_slice(),
            "UTF-8",
        ),
        ("empty", b"".as_slice(), "empty"),
        ("whitespace", b" \n\t\r ".as_slice(), "empty"),
    ] {
        let r = sglora_stdin(&["generate", "-", "-o", o], input);
        assert_eq!(r.status.code(), Some(2), "{name}: {}", stderr(&r));
        assert!(stderr(&r).contains(needle), "{name}: {}", stderr(&r));
        assert!(!out.exists(), "{name}: nothing may be written");
    }
    // Right-to-left marks are text (format characters): accepted and recorded verbatim.
    let rtl = "\u{200F}Given an adjective, find the word with the opposite meaning.\u{200E}";
    let r = sglora(&["generate", rtl, "-o", o, "--allow-ood"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(read_json(&out.join("provenance.json"))["description"], rtl);
    // Within the byte limit but beyond the encoder's 128 tokens: truncated, and said so.
    let long = "antonym ".repeat(500);
    let out2 = tmp.path().join("b");
    let r = sglora(&[
        "generate",
        long.trim(),
        "-o",
        out2.to_str().unwrap(),
        "--allow-ood",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let p = read_json(&out2.join("provenance.json"));
    assert_eq!(p["truncated"], true);
    assert_eq!(p["tokens"], 128);
}

// ---- D-Bus: descriptions and options ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_description_and_option_matrix() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    let megabyte = "word ".repeat(200_000);
    let ten_k = "token ".repeat(10_000);
    for (name, text, needle) in [
        ("empty", "", "empty"),
        ("whitespace", " \n\t ", "empty"),
        ("1 MB", megabyte.as_str(), "limit"),
        ("10k tokens", ten_k.as_str(), "limit"),
        ("control", "find\u{7}antonyms", "U+0007"),
    ] {
        let e = generate(&c, text, &opts(1)).await.unwrap_err();
        let e = dbus_error(e);
        assert!(
            e.starts_with("org.sglora.Generator1.Error.InvalidDescription") && e.contains(needle),
            "{name}: {e}"
        );
    }
    // D-Bus strings cannot carry NUL: the bus drops a client that sends one, on its own
    // connection; the daemon never sees it and keeps serving everyone else.
    let rogue = connect(&bus).await;
    assert!(generate(&rogue, "a\0b", &opts(1)).await.is_err());

    let o = |pairs: Vec<(&str, Variant<'static>)>| -> Opts {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    for (name, opts, needle) in [
        (
            "unknown key",
            o(vec![("colour", Variant::U32(3))]),
            "unknown option",
        ),
        (
            "seed as text",
            o(vec![("seed", Variant::from("7"))]),
            "integer",
        ),
        ("negative seed", o(vec![("seed", Variant::I64(-1))]), "seed"),
        ("top_k zero", o(vec![("top_k", Variant::U32(0))]), "top_k"),
        (
            "top_k huge",
            o(vec![("top_k", Variant::U64(1 << 40))]),
            "top_k",
        ),
        (
            "temperature text",
            o(vec![("temperature", Variant::from("hot"))]),
            "number",
        ),
        (
            "temperature negative",
            o(vec![("temperature", Variant::F64(-1.0))]),
            "temperature",
        ),
        (
            "temperature NaN",
            o(vec![("temperature", Variant::F64(f64::NAN))]),
            "temperature",
        ),
        (
            "noise infinite",
            o(vec![("noise_scale", Variant::F64(f64::INFINITY))]),
            "noise",
        ),
        (
            "allow_ood as int",
            o(vec![("allow_ood", Variant::U32(1))]),
            "boolean",
        ),
        (
            "min_expected_gain text",
            o(vec![("min_expected_gain", Variant::from("2"))]),
            "number",
        ),
        (
            "min_expected_gain negative",
            o(vec![("min_expected_gain", Variant::F64(-0.5))]),
            "min_expected_gain must be between 0 and 100",
        ),
        (
            "min_expected_gain NaN",
            o(vec![("min_expected_gain", Variant::F64(f64::NAN))]),
            "min_expected_gain must be between 0 and 100",
        ),
        (
            "min_expected_gain infinite",
            o(vec![("min_expected_gain", Variant::F64(f64::INFINITY))]),
            "min_expected_gain must be between 0 and 100",
        ),
        (
            "min_expected_gain too large",
            o(vec![("min_expected_gain", Variant::I32(101))]),
            "min_expected_gain must be between 0 and 100",
        ),
    ] {
        let e = dbus_error(generate(&c, ANIMAL, &opts).await.expect_err(name));
        assert!(
            e.starts_with("org.sglora.Generator1.Error.InvalidOption") && e.contains(needle),
            "{name}: {e}"
        );
    }
    // The largest seed is a valid seed.
    let big = o(vec![
        ("seed", Variant::U64(u64::MAX)),
        ("allow_ood", Variant::Bool(true)),
    ]);
    let (dir, _, _, prov) = generate(&c, ANIMAL, &big).await.unwrap();
    assert!(Path::new(&dir).join("adapter_model.safetensors").is_file());
    let prov: serde_json::Value = serde_json::from_str(&prov).unwrap();
    assert_eq!(prov["seed"], u64::MAX);
    // RTL marks are accepted.
    let rtl = format!("\u{200F}{ANTONYM}");
    generate(&c, &rtl, &opts(1)).await.unwrap();
    // Nothing bad reached the cache: exactly the two good requests.
    assert_eq!(prop_u64(&c, "CacheEntries").await, 2);
    d.stop();
}

// ---- the drop folder ---------------------------------------------------------------------------

/// Creates one bad file in the inbox.
type MakeFile<'a> = Box<dyn Fn() + 'a>;

#[test]
fn drop_folder_bad_file_matrix() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("dropbox");
    let inbox = root.join("inbox");
    let d = Daemon::start(&bus, state.path(), &[]);
    let failed = root.join("failed");
    let cases: Vec<(&str, MakeFile, &str)> = vec![
        (
            "empty",
            Box::new(|| std::fs::write(inbox.join("empty.txt"), b"").unwrap()),
            "empty",
        ),
        (
            "fifo",
            Box::new(|| {
                nix::unistd::mkfifo(&inbox.join("fifo.txt"), nix::sys::stat::Mode::S_IRWXU).unwrap()
            }),
            "regular",
        ),
        (
            "types",
            Box::new(|| std::fs::write(inbox.join("types.json"), r#"{"description": 1}"#).unwrap()),
            "invalid JSON",
        ),
        (
            "unknown",
            Box::new(|| {
                std::fs::write(
                    inbox.join("unknown.json"),
                    format!(r#"{{"description": "{ANIMAL}", "colour": "red"}}"#),
                )
                .unwrap()
            }),
            "unknown field",
        ),
        (
            "hugeseed",
            Box::new(|| {
                std::fs::write(
                    inbox.join("hugeseed.json"),
                    format!(r#"{{"description": "{ANIMAL}", "seed": 18446744073709551616}}"#),
                )
                .unwrap()
            }),
            "invalid JSON",
        ),
        (
            "floatseed",
            Box::new(|| {
                std::fs::write(
                    inbox.join("floatseed.json"),
                    format!(r#"{{"description": "{ANIMAL}", "seed": 1e30}}"#),
                )
                .unwrap()
            }),
            "invalid JSON",
        ),
        (
            "negk",
            Box::new(|| {
                std::fs::write(
                    inbox.join("negk.json"),
                    format!(r#"{{"description": "{ANIMAL}", "top_k": -1}}"#),
                )
                .unwrap()
            }),
            "invalid JSON",
        ),
        (
            "hot",
            Box::new(|| {
                std::fs::write(
                    inbox.join("hot.json"),
                    format!(r#"{{"description": "{ANIMAL}", "temperature": -2.0}}"#),
                )
                .unwrap()
            }),
            "temperature",
        ),
        (
            "gaintext",
            Box::new(|| {
                std::fs::write(
                    inbox.join("gaintext.json"),
                    format!(r#"{{"description": "{ANIMAL}", "min_expected_gain": "high"}}"#),
                )
                .unwrap()
            }),
            "invalid JSON",
        ),
        (
            "gainneg",
            Box::new(|| {
                std::fs::write(
                    inbox.join("gainneg.json"),
                    format!(r#"{{"description": "{ANIMAL}", "min_expected_gain": -1}}"#),
                )
                .unwrap()
            }),
            "min_expected_gain must be between 0 and 100",
        ),
        (
            // No adapter is expected to gain 100 R@1 points: refused, with what to do.
            "gainhigh",
            Box::new(|| {
                std::fs::write(
                    inbox.join("gainhigh.json"),
                    format!(
                        r#"{{"description": "{ANIMAL}", "min_expected_gain": 100, "allow_ood": true}}"#
                    ),
                )
                .unwrap()
            }),
            "low expected gain",
        ),
        (
            "ext",
            Box::new(|| std::fs::write(inbox.join("ext.exe"), b"MZ\x90\x00").unwrap()),
            "extension",
        ),
    ];
    for (_, make, _) in &cases {
        make();
    }
    for (name, _, needle) in &cases {
        let err = failed.join(format!("{name}.error.txt"));
        assert!(wait_for(&err, 30), "{name} was not rejected");
        let text = std::fs::read_to_string(&err).unwrap();
        assert!(text.contains(needle), "{name}: {text}");
    }
    // Odd names are served under sanitised names that stay inside outbox/.
    std::fs::write(inbox.join("a..b.txt"), ANIMAL).unwrap();
    std::fs::write(inbox.join("new\nline.txt"), ANIMAL).unwrap();
    std::fs::write(inbox.join(OsStr::from_bytes(b"bytes\xff\xfe.txt")), ANIMAL).unwrap();
    for out in ["a..b", "new_line", "bytes__"] {
        assert!(
            wait_for(
                &root
                    .join("outbox")
                    .join(out)
                    .join("adapter_model.safetensors"),
                60
            ),
            "{out} not produced"
        );
    }
    // Everything that left outbox/'s parent is accounted for: only the four folders exist.
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["done", "failed", "inbox", "outbox"]);
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
}

// ---- the bundle -------------------------------------------------------------------------------

fn copy_bundle(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(bundle_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Re-pin one file in the copy's manifest so the damage reaches the parser, not the hash check.
fn repin(bundle: &Path, file: &str) {
    let mp = bundle.join("manifest.json");
    let mut m = read_json(&mp);
    let bytes = std::fs::read(bundle.join(file)).unwrap();
    m["files"][file]["sha256"] = sglora::sha256_hex(&bytes).into();
    m["files"][file]["bytes"] = (bytes.len() as u64).into();
    std::fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn bundle_damage_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    // A safetensors header that lies about sizes (offsets past the end), hashes made to match.
    for file in ["experts.safetensors", "embeddings.safetensors"] {
        let b = tmp.path().join(format!("lying-{file}"));
        copy_bundle(&b);
        let p = b.join(file);
        let bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
        let mut h: serde_json::Value = serde_json::from_str(&header).unwrap();
        for (k, v) in h.as_object_mut().unwrap().iter_mut() {
            if k != "__metadata__" {
                let end = v["data_offsets"][1].as_u64().unwrap();
                v["data_offsets"][1] = (end * 4 + 1000).into();
            }
        }
        let mut new_header = serde_json::to_vec(&h).unwrap();
        while !new_header.len().is_multiple_of(8) {
            new_header.push(b' ');
        }
        let mut out = (new_header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&new_header);
        out.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&p, out).unwrap();
        repin(&b, file);
        let r = sglora_with(
            &b,
            &[
                "generate",
                ANIMAL,
                "-o",
                tmp.path().join("x").to_str().unwrap(),
            ],
        );
        assert_eq!(r.status.code(), Some(4), "{file}: {}", stderr(&r));
        assert!(stderr(&r).contains(file), "{file}: {}", stderr(&r));
        assert!(!tmp.path().join("x").exists());
    }
    // A truncated ONNX file whose pins were updated: the loader (not the hash) refuses it.
    let b = tmp.path().join("truncated-onnx");
    copy_bundle(&b);
    let p = b.join("cvae_decoder.onnx");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    repin(&b, "cvae_decoder.onnx");
    let r = sglora_with(&b, &["generate", ANIMAL]);
    assert_eq!(r.status.code(), Some(4), "{}", stderr(&r));
    assert!(stderr(&r).contains("cvae_decoder.onnx"), "{}", stderr(&r));
    // A manifest that is not JSON, and one with a file missing.
    let b = tmp.path().join("bad-manifest");
    copy_bundle(&b);
    std::fs::write(b.join("manifest.json"), b"{ not json").unwrap();
    let r = sglora_with(&b, &["experts"]);
    assert_eq!(r.status.code(), Some(4), "{}", stderr(&r));
    assert!(stderr(&r).contains("manifest.json"), "{}", stderr(&r));
    let b = tmp.path().join("missing-file");
    copy_bundle(&b);
    std::fs::remove_file(b.join("tokenizer.json")).unwrap();
    let r = sglora_with(&b, &["experts"]);
    assert_eq!(r.status.code(), Some(4), "{}", stderr(&r));
    assert!(stderr(&r).contains("tokenizer.json"), "{}", stderr(&r));
}

// ---- the cache database -----------------------------------------------------------------------

fn sha_file(p: &Path) -> String {
    sglora::sha256_hex(&std::fs::read(p).unwrap())
}

/// Start the daemon expecting it to fail; returns its stderr.
fn daemon_fails(bus: &Bus, state: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sglora"))
        .arg("--bundle")
        .arg(bundle_dir())
        .args([
            "daemon",
            "--no-dropbox",
            "--bus-address",
            &bus.address,
            "--state-dir",
        ])
        .arg(state)
        .arg("--cache-dir")
        .arg(state.join("cache"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the daemon started on a bad database"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_database_corrupt_and_locked() {
    let bus = Bus::start();
    // Corrupt: refused with a clear message; the file is left as it was for inspection.
    let state = tempfile::tempdir().unwrap();
    let db = state.path().join("cache.db");
    std::fs::write(&db, vec![0x5a; 64 * 1024]).unwrap();
    let before = sha_file(&db);
    let err = daemon_fails(&bus, state.path());
    assert!(
        err.contains("cache.db") && err.contains("not a database"),
        "{err}"
    );
    assert_eq!(
        sha_file(&db),
        before,
        "the damaged database must not be touched"
    );
    // A valid database with a damaged page: integrity check names the problem.
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    for seed in 0..3 {
        generate(&c, ANIMAL, &opts(seed)).await.unwrap();
    }
    d.stop();
    let db = state.path().join("cache.db");
    let mut bytes = std::fs::read(&db).unwrap();
    let page = 4096;
    for b in &mut bytes[page + 100..2 * page] {
        *b = 0xa5;
    }
    std::fs::write(&db, &bytes).unwrap();
    let err = daemon_fails(&bus, state.path());
    assert!(err.contains("cache.db"), "{err}");
    assert!(
        err.contains("corrupt") || err.contains("malformed"),
        "{err}"
    );

    // Locked by another process: a miss fails after the busy timeout with a clear error and
    // leaves nothing behind; hits are still served; after the lock goes, all works again.
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&bus, state.path(), &["--no-dropbox"]);
    let c = connect(&bus).await;
    generate(&c, ANIMAL, &opts(1)).await.unwrap();
    let locker = rusqlite::Connection::open(state.path().join("cache.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t = Instant::now();
    let e = dbus_error(generate(&c, ANTONYM, &opts(1)).await.unwrap_err());
    assert!(e.contains("locked"), "{e}");
    assert!(
        t.elapsed() >= Duration::from_secs(4),
        "busy timeout honoured"
    );
    let (_, _, hit, _) = generate(&c, ANIMAL, &opts(1)).await.unwrap();
    assert!(hit, "a hit is served while the database is locked");
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    let adapters = state.path().join("cache/adapters");
    assert_eq!(
        std::fs::read_dir(&adapters).unwrap().count(),
        1,
        "the failed insert left no directory"
    );
    let (_, _, hit, _) = generate(&c, ANTONYM, &opts(1)).await.unwrap();
    assert!(!hit);
    assert_eq!(prop_u64(&c, "CacheEntries").await, 2);
    d.stop();
}

// ---- read-only state and a full disk (need root to mount tmpfs) -------------------------------

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Mount(dir.to_path_buf()))
    }

    fn remount_ro(&self) {
        let s = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(s.success());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_state_and_full_disk() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let bus = Bus::start();
    let tmp = tempfile::tempdir().unwrap();

    // Read-only state directory: refused at start with the file and the cause; data untouched.
    let state = tmp.path().join("ro");
    let Some(m) = Mount::tmpfs(&state, "8m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    };
    let d = Daemon::start(&bus, &state, &["--no-dropbox"]);
    let c = connect(&bus).await;
    generate(&c, ANIMAL, &opts(1)).await.unwrap();
    d.stop();
    let before = sha_file(&state.join("cache.db"));
    m.remount_ro();
    let err = daemon_fails(&bus, &state);
    assert!(
        err.contains("cache.db") && err.contains("read-only file system"),
        "{err}"
    );
    assert_eq!(sha_file(&state.join("cache.db")), before);
    drop(m);

    // Full disk under the adapter cache: misses fail with ENOSPC spelled out, no partial
    // adapter stays, earlier adapters keep being served, and evicting frees room again.
    let state = tmp.path().join("full");
    std::fs::create_dir_all(&state).unwrap();
    let Some(_m) = Mount::tmpfs(&state.join("cache"), "1m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    };
    let d = Daemon::start(&bus, &state, &["--no-dropbox"]);
    let c = connect(&bus).await;
    let mut ok = Vec::new();
    let mut err = None;
    for seed in 0..10 {
        match generate(&c, ANIMAL, &opts(seed)).await {
            Ok(r) => ok.push(r.1),
            Err(e) => {
                err = Some(dbus_error(e));
                break;
            }
        }
    }
    let err = err.expect("a 1 MB cache filesystem must fill up");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!ok.is_empty());
    let adapters = state.join("cache/adapters");
    let dirs: Vec<String> = std::fs::read_dir(&adapters)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs.len(), ok.len(), "no partial adapter left: {dirs:?}");
    let (_, id, hit, _) = generate(&c, ANIMAL, &opts(0)).await.unwrap();
    assert!(hit && id == ok[0], "earlier adapters are still served");
    let m = c
        .call_method(Some(NAME), PATH, Some(NAME), "Evict", &(ok[0].as_str(),))
        .await
        .unwrap();
    let evicted: bool = m.body().deserialize().unwrap();
    assert!(evicted);
    generate(&c, ANIMAL, &opts(100)).await.unwrap();
    d.stop();

    // The CLI writing to a full filesystem: exit 5, nothing half-written.
    let full = tmp.path().join("cli-full");
    let Some(_m2) = Mount::tmpfs(&full, "100k") else {
        return;
    };
    let out = full.join("adapter");
    let r = sglora(&[
        "generate",
        ANIMAL,
        "-o",
        out.to_str().unwrap(),
        "--allow-ood",
    ]);
    assert_eq!(r.status.code(), Some(5), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("No space left on device"),
        "{}",
        stderr(&r)
    );
    assert_eq!(
        std::fs::read_dir(&full).unwrap().count(),
        0,
        "nothing left behind"
    );
}

/// Run the CLI on `bundle` with a deadline: a bundle file that reads forever or blocks must be
/// refused, not read.
fn sglora_within(bundle: &Path, args: &[&str], limit: Duration) -> std::process::Output {
    let mut child = Command::new(sglora_bin())
        .arg("--bundle")
        .arg(bundle)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("sglora {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn bundle_files_must_be_regular_files() {
    let tmp = tempfile::tempdir().unwrap();
    let limit = Duration::from_secs(30);
    // A link to an endless device, in place of the manifest or of a listed file.
    for file in ["manifest.json", "experts.json"] {
        let b = tmp.path().join(format!("zero-{file}"));
        copy_bundle(&b);
        std::fs::remove_file(b.join(file)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", b.join(file)).unwrap();
        for args in [&["explain", ANIMAL][..], &["bundle", "verify"][..]] {
            let r = sglora_within(&b, args, limit);
            let err = stderr(&r);
            // A bundle error (4), or `bundle verify` listing the file as failed (1).
            assert!(
                matches!(r.status.code(), Some(1 | 4)),
                "{args:?} {file}: {err}"
            );
            assert!(
                err.contains(file) && err.contains("not a regular file"),
                "{args:?} {file}: {err}"
            );
        }
    }
    // A FIFO nobody writes to: refused at once, never waited on.
    let b = tmp.path().join("fifo");
    copy_bundle(&b);
    std::fs::remove_file(b.join("tokenizer.json")).unwrap();
    nix::unistd::mkfifo(&b.join("tokenizer.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    for args in [&["explain", ANIMAL][..], &["bundle", "verify"][..]] {
        let r = sglora_within(&b, args, limit);
        let err = stderr(&r);
        assert!(matches!(r.status.code(), Some(1 | 4)), "{args:?}: {err}");
        assert!(
            err.contains("tokenizer.json") && err.contains("not a regular file"),
            "{args:?}: {err}"
        );
    }
}

/// A symbolic link at any of the service's own directories (planted by whoever could write the
/// state directory's parent, or left by a botched migration) makes the daemon refuse to start,
/// naming the link, instead of chmodding, filling or deleting what it points at.
#[test]
fn linked_service_directories_are_refused() {
    let bus = Bus::start();
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep.txt"), b"precious").unwrap();
    std::fs::set_permissions(
        &outside,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for linked in ["cache/adapters", "cache", "dropbox/done", "dropbox/inbox"] {
        let state = tmp.path().join(linked.replace('/', "-"));
        let at = state.join(linked);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, &at).unwrap();
        let cache = state.join("cache");
        let args = [
            "daemon",
            "--bus-address",
            &bus.address,
            "--state-dir",
            state.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--config",
            "/dev/null",
        ];
        // A daemon that starts anyway runs until the deadline: the test fails, it does not hang.
        let out = sglora_within(&bundle_dir(), &args, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{linked}: the daemon started");
        assert!(
            err.contains("symbolic link") && err.contains(linked),
            "{linked}: {err}"
        );
    }
    let mode = std::fs::metadata(&outside).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o7777,
        0o755,
        "the link's target was chmodded"
    );
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["keep.txt"],
        "something was written or deleted outside"
    );
}
