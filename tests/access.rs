//! Access rules of what the daemon creates and touches (the D-Bus policy itself is proven in
//! tests/policy.rs): nothing is world-accessible whatever umask it was started with, only the
//! inbox is group-writable, and links planted in its folders are never followed out of them.

use sglora_testkit as common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::bus::*;
use common::*;

fn walk(p: &Path, out: &mut Vec<(std::path::PathBuf, u32, bool)>) {
    let m = std::fs::symlink_metadata(p).unwrap();
    out.push((p.to_path_buf(), m.mode() & 0o7777, m.is_dir()));
    if m.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            walk(&e.unwrap().path(), out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_world_accessible_even_with_umask_000() {
    use nix::sys::stat::{umask, Mode};
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path().join("state");
    let old = umask(Mode::empty());
    let d = Daemon::start(&bus, &st, &[]);
    umask(old);
    let c = connect(&bus).await;
    generate(&c, ANIMAL, &opts(1)).await.unwrap();
    let inbox = st.join("dropbox/inbox");
    std::fs::write(inbox.join("ok.txt"), ANTONYM).unwrap();
    std::fs::write(inbox.join("bad.exe"), b"x").unwrap();
    assert!(wait_for(&st.join("dropbox/outbox/ok/provenance.json"), 60));
    assert!(wait_for(&st.join("dropbox/failed/bad.error.txt"), 30));
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    let mut all = Vec::new();
    walk(&st.join("dropbox"), &mut all);
    walk(&st.join("cache"), &mut all);
    walk(&st.join("cache.db"), &mut all);
    let mut checked = 0;
    for (p, mode, is_dir) in &all {
        // Files the test itself dropped keep the mode their writer gave them.
        let dropped =
            p.starts_with(st.join("dropbox/done")) || p.starts_with(st.join("dropbox/failed"));
        if dropped && !is_dir && !p.to_string_lossy().ends_with(".error.txt") {
            continue;
        }
        checked += 1;
        assert_eq!(
            mode & 0o007,
            0,
            "{} is accessible to others: {mode:o}",
            p.display()
        );
        let group_writable = mode & 0o020 != 0;
        if *is_dir && p.ends_with("dropbox/inbox") {
            assert!(group_writable, "the inbox must be group-writable: {mode:o}");
            assert!(
                mode & 0o1000 != 0,
                "the inbox must be sticky (members cannot remove each other's requests): {mode:o}"
            );
        } else if *is_dir && p.starts_with(st.join("dropbox")) {
            assert!(
                !group_writable,
                "{} must not be group-writable: {mode:o}",
                p.display()
            );
        }
        // The adapter cache and its database are the service's alone: callers get adapters as
        // file descriptors (OpenAdapter).
        if p.starts_with(st.join("cache")) || p.starts_with(st.join("cache.db")) {
            assert_eq!(mode & 0o077, 0, "{} is not private: {mode:o}", p.display());
        }
        if p.to_string_lossy().ends_with(".error.txt") {
            // Another member must not be able to rewrite a failure report (nor read it: it is
            // its requester's alone, by an ACL entry; this test's requester is the service's
            // own user, so the report is plainly 0600).
            assert_eq!(*mode, 0o600, "{}: {mode:o}", p.display());
        }
    }
    assert!(checked > 10, "{checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_links_are_never_followed() {
    let bus = Bus::start();
    let state = tempfile::tempdir().unwrap();
    let st = state.path().join("state");
    let outside = state.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let root = st.join("dropbox");
    for sub in ["inbox", "outbox", "done", "failed"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    // An output name already taken by a link to a directory outside, a planted link where the
    // error report's temporary file goes, and a link in the adapter cache.
    std::os::unix::fs::symlink(&outside, root.join("outbox/req")).unwrap();
    std::os::unix::fs::symlink(&victim, root.join("failed/bad.error.tmp-write")).unwrap();
    std::fs::create_dir_all(st.join("cache/adapters")).unwrap();
    std::os::unix::fs::symlink(&outside, st.join("cache/adapters/0123456789abcdef01234567"))
        .unwrap();

    let d = Daemon::start(&bus, &st, &[]);
    // The cache's reconciliation removed the link itself, not the directory it pointed at.
    assert!(std::fs::symlink_metadata(st.join("cache/adapters/0123456789abcdef01234567")).is_err());
    assert!(victim.exists());
    // The other test of this file sets the process's umask to 000 for a moment: give the
    // request its mode explicitly (a group-writable request is refused).
    drop_request(&root.join("inbox"), "req.txt", ANIMAL.as_bytes(), 0o644);
    std::fs::write(root.join("inbox/bad.exe"), b"MZ").unwrap();
    if !wait_for(&root.join("outbox/req-1/provenance.json"), 60) {
        panic!("not delivered; daemon log:\n{}", d.stop());
    }
    assert!(wait_for(&root.join("failed/bad.error.txt"), 30));
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious",
        "a planted link was written through"
    );
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["victim.txt"], "nothing was written outside");
    assert!(std::fs::symlink_metadata(root.join("outbox/req"))
        .unwrap()
        .file_type()
        .is_symlink());
    let report = std::fs::symlink_metadata(root.join("failed/bad.error.txt")).unwrap();
    assert!(report.file_type().is_file());
    assert!(std::fs::read_to_string(root.join("failed/bad.error.txt"))
        .unwrap()
        .contains("extension"));
}
