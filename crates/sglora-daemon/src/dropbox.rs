//! The watched drop folder: `inbox/NAME.txt` or `inbox/NAME.json` in, `outbox/NAME/` out, the
//! request moved to `done/` (or to `failed/` with `NAME.error.txt`).
//!
//! Only completed writes are read: inotify close-after-write and rename-into events (a regular
//! file's creation is not one: it is still being written), then the file's size and mtime must
//! hold still for `settle_ms`. Dotfiles, `*.tmp`, `*.part` and
//! directories are ignored; symlinks, FIFOs, devices, oversized, non-UTF-8 or malformed requests
//! are moved to `failed/` with a reason (the link itself is moved, never followed). Names are
//! sanitised and never clobber an existing output. Files present at start-up are processed, and
//! a periodic rescan catches anything an overflowing event queue dropped.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sglora::{AdapterFiles, GenerateOptions};

use crate::service::Service;

/// The four folders.
#[derive(Debug, Clone)]
pub struct Dropbox {
    /// Requests arrive here.
    pub inbox: PathBuf,
    /// Adapters go here.
    pub outbox: PathBuf,
    /// Processed requests.
    pub done: PathBuf,
    /// Failed requests and their `.error.txt`.
    pub failed: PathBuf,
    max_bytes: u64,
    settle: Duration,
}

/// What to do with a directory entry of the inbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Triage {
    /// Not ours (dotfile, temporary, directory): leave it alone.
    Ignore,
    /// Refuse with a reason.
    Reject(String),
    /// Read and process.
    Process,
}

/// Triage by name and type (without following links).
pub fn triage(path: &Path) -> Triage {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Triage::Ignore;
    };
    if name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".swp")
        || name.ends_with('~')
    {
        return Triage::Ignore;
    }
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Triage::Ignore;
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Triage::Ignore;
    }
    if ft.is_symlink() {
        return Triage::Reject("symbolic links are not accepted; drop the file itself".into());
    }
    if ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device() {
        return Triage::Reject("only regular files are accepted".into());
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("txt") | Some("json") => Triage::Process,
        _ => Triage::Reject(
            "unsupported extension: use NAME.txt (the description) or NAME.json".into(),
        ),
    }
}

/// Sanitise a request's stem into a safe output name: `[A-Za-z0-9._-]`, at most 100 bytes, no
/// leading dot.
pub fn sanitize(stem: &str) -> String {
    let mut s: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(100);
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "request".into()
    } else {
        s
    }
}

/// `dir/NAME.EXT`, `dir/NAME-1.EXT`, `dir/NAME-2.EXT`, …: the names a request's output may take.
fn numbered<'a>(dir: &'a Path, name: &'a str, ext: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    (0..).map(move |i: usize| {
        if i == 0 {
            dir.join(format!("{name}{ext}"))
        } else {
            dir.join(format!("{name}-{i}{ext}"))
        }
    })
}

/// The first free name of [`numbered`] (nothing there, not even a dangling link).
fn unique(dir: &Path, name: &str, ext: &str) -> PathBuf {
    numbered(dir, name, ext)
        .find(|p| fs::symlink_metadata(p).is_err())
        .unwrap_or_else(|| dir.join(name))
}

/// Parse request bytes by extension into (description, options).
pub fn parse_request(ext: &str, bytes: &[u8]) -> Result<(String, GenerateOptions), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "the file is not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    match ext {
        "txt" => Ok((text.to_string(), GenerateOptions::default())),
        "json" => {
            let bad = |e: serde_json::Error| format!("invalid JSON request: {e}");
            let mut fields: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(text).map_err(bad)?;
            let description = match fields.remove("description") {
                Some(serde_json::Value::String(d)) => d,
                Some(_) => return Err("invalid JSON request: description must be a string".into()),
                None => return Err("invalid JSON request: missing field `description`".into()),
            };
            // The rest are the options, in `GenerateOptions`' own vocabulary (unknown keys refused).
            let o = serde_json::from_value(serde_json::Value::Object(fields)).map_err(bad)?;
            Ok((description, o))
        }
        _ => Err("unsupported extension".into()),
    }
}

impl Dropbox {
    /// Create (if needed) the four folders under `root`.
    pub fn create(root: &Path, max_bytes: u64, settle_ms: u64) -> std::io::Result<Dropbox> {
        let d = Dropbox {
            inbox: root.join("inbox"),
            outbox: root.join("outbox"),
            done: root.join("done"),
            failed: root.join("failed"),
            max_bytes,
            settle: Duration::from_millis(settle_ms),
        };
        // inbox: the group (clients) drops requests, sticky so a member can neither remove nor
        // replace another member's pending request; the rest: the group reads, only we write.
        let root = root.to_path_buf();
        for (p, mode) in [
            (&root, 0o750),
            (&d.inbox, 0o1770),
            (&d.outbox, 0o750),
            (&d.done, 0o750),
            (&d.failed, 0o750),
        ] {
            crate::dirs::real_dir(p, mode)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        }
        // Half-written outputs of a killed predecessor (hidden temporaries) go; complete ones
        // were published by an atomic rename and stay.
        let stale = sglora::remove_stale_temps(&d.outbox);
        if stale > 0 {
            crate::log::warn(&format!(
                "dropbox: removed {stale} unfinished output(s) left by an interrupted run"
            ));
        }
        Ok(d)
    }

    fn fail(&self, path: &Path, reason: &str) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = sanitize(
            Path::new(&name)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("request"),
        );
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| format!(".{}", sanitize(e)))
            .unwrap_or_default();
        let dest = unique(&self.failed, &stem, &ext);
        let dest_stem = dest
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or(stem);
        let err_path = self.failed.join(format!("{dest_stem}.error.txt"));
        let _ = write_durable(&err_path, format!("{name}: {reason}\n").as_bytes());
        if fs::rename(path, &dest).is_err() {
            let _ = fs::remove_file(path);
        }
        crate::log::warn(&format!("dropbox: {name} failed: {reason}"));
    }

    /// Wait until the file's size and mtime hold still; false if it vanished.
    async fn settled(&self, path: &Path) -> bool {
        let stat = |p: &Path| {
            fs::symlink_metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        };
        let mut last = stat(path);
        for _ in 0..50 {
            tokio::time::sleep(self.settle).await;
            let now = stat(path);
            if now.is_none() {
                return false;
            }
            if now == last {
                return true;
            }
            last = now;
        }
        true
    }

    /// Process one inbox entry to completion.
    pub async fn process(&self, svc: &Service, path: &Path) {
        match triage(path) {
            Triage::Ignore => return,
            Triage::Reject(r) => return self.fail(path, &r),
            Triage::Process => {}
        }
        if !self.settled(path).await {
            return;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_string();
        let bytes = match read_regular(path, self.max_bytes) {
            Ok(b) => b,
            Err(r) => return self.fail(path, &r),
        };
        let (desc, opts) = match parse_request(&ext, &bytes) {
            Ok(x) => x,
            Err(r) => return self.fail(path, &r),
        };
        let served = match svc.generate(&desc, &opts).await {
            Ok(s) => s,
            Err(e) => return self.fail(path, &e.to_string()),
        };
        let stem = sanitize(
            &path
                .file_stem()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default(),
        );
        // A miss hands over the bytes it just generated; a hit reads the cached copy.
        let files = match served.files {
            Some(f) => f,
            None => match AdapterFiles::read(&served.entry.dir, &served.entry.weights_sha256) {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    return self.fail(
                        path,
                        &format!("internal error reading the cached adapter: {e}"),
                    )
                }
            },
        };
        // A request whose output was published before the daemon was killed (but not yet moved
        // to done/) is delivered once: an identical adapter under its name counts as done.
        let delivered = numbered(&self.outbox, &stem, "")
            .take(100)
            .take_while(|p| fs::symlink_metadata(p).is_ok())
            .find(|p| sglora::same_files(p, &files));
        let out = match delivered {
            Some(p) => p,
            None => match self.publish(&stem, &files) {
                Ok(p) => p,
                Err(e) => return self.fail(path, &e.to_string()),
            },
        };
        let done = unique(&self.done, &stem, &format!(".{ext}"));
        if let Err(e) = fs::rename(path, &done) {
            crate::log::warn(&format!(
                "dropbox: cannot move {} to done/: {e}",
                path.display()
            ));
        }
        crate::log::info(&format!(
            "dropbox: {} -> {} (adapter {}, cache_hit={})",
            path.display(),
            out.display(),
            served.entry.id,
            served.cache_hit
        ));
    }

    /// Write `files` to a free `outbox/STEM[-N]` atomically. A concurrent writer may take the
    /// name between the check and the rename: retry with the next free name.
    fn publish(&self, stem: &str, files: &AdapterFiles) -> sglora::Result<PathBuf> {
        let mut out = unique(&self.outbox, stem, "");
        for _ in 0..5 {
            match sglora::write_atomic(&out, files, false) {
                Ok(_) => return Ok(out),
                Err(sglora::Error::Output { .. }) if out.exists() => {
                    out = unique(&self.outbox, stem, "")
                }
                Err(e) => return Err(e),
            }
        }
        sglora::write_atomic(&out, files, false)
    }

    /// Start watching the inbox (before the service reports ready, so every request dropped
    /// after that is seen by its events); [`Dropbox::run`] then serves what the watch reports.
    pub fn watch(&self) -> notify::Result<Watch> {
        use notify::{EventKind, RecursiveMode, Watcher};
        // (path, whether the event was its creation)
        let (tx, rx) = tokio::sync::mpsc::channel::<(PathBuf, bool)>(1024);
        let inbox = self.inbox.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(ev) = res {
                    let relevant = matches!(
                        ev.kind,
                        EventKind::Access(notify::event::AccessKind::Close(
                            notify::event::AccessMode::Write
                        )) | EventKind::Modify(notify::event::ModifyKind::Name(_))
                            | EventKind::Create(_)
                    );
                    if relevant {
                        let created = matches!(ev.kind, EventKind::Create(_));
                        for p in ev.paths {
                            if p.parent() == Some(inbox.as_path()) {
                                let _ = tx.try_send((p, created));
                            }
                        }
                    }
                }
            })?;
        watcher.watch(&self.inbox, RecursiveMode::NonRecursive)?;
        Ok(Watch {
            _watcher: Box::new(watcher),
            events: rx,
            since: std::time::SystemTime::now(),
        })
    }

    /// Requests in the inbox whose last change is older than `before`, oldest first: their
    /// writers closed them before the watch (or the last rescan) could report it. Newer files are
    /// left to their own close-after-write or rename event, so a file still being written is not
    /// read.
    fn settled_before(&self, before: std::time::SystemTime) -> Vec<PathBuf> {
        let mut v: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&self.inbox)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| triage(p) != Triage::Ignore)
                    .filter_map(|p| {
                        let t = fs::symlink_metadata(&p)
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH);
                        (t < before).then_some((t, p))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Serve the inbox until `stop` fires: files already there first, then what `watch` reports,
    /// with a periodic rescan for events an overflowing queue dropped.
    pub async fn run(
        self: Arc<Self>,
        watch: Watch,
        svc: Arc<Service>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let Watch {
            _watcher,
            events: mut rx,
            since,
        } = watch;
        for p in self.settled_before(since) {
            if *stop.borrow() {
                return;
            }
            self.process(&svc, &p).await;
        }
        let mut rescan = tokio::time::interval(Duration::from_secs(30));
        rescan.tick().await;
        loop {
            tokio::select! {
                // Stopping wins over any work that is ready: nothing new starts after it.
                biased;
                _ = stop.changed() => break,
                Some((p, created)) = rx.recv() => {
                    // A regular file that was just created is still being written: it is read
                    // on its close-after-write event, never before. Anything else that appears
                    // (a link, a FIFO) is triaged, and refused, at once.
                    let Ok(meta) = fs::symlink_metadata(&p) else { continue };
                    if !(created && meta.is_file()) {
                        self.process(&svc, &p).await;
                    }
                }
                _ = rescan.tick() => {
                    let quiet = std::time::SystemTime::now() - Duration::from_secs(30);
                    for p in self.settled_before(quiet) {
                        if *stop.borrow() {
                            break;
                        }
                        self.process(&svc, &p).await;
                    }
                }
            }
        }
    }
}

/// An established watch of the inbox ([`Dropbox::watch`]).
pub struct Watch {
    _watcher: Box<dyn notify::Watcher + Send>,
    events: tokio::sync::mpsc::Receiver<(PathBuf, bool)>,
    since: std::time::SystemTime,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("since", &self.since).finish()
    }
}

/// Open without following links and without blocking on FIFOs; accept only regular files up to
/// `max` bytes.
fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("only regular files are accepted".into());
    }
    // A hard link (where the kernel allows linking files one does not own) would hand the
    // service a file of someone else's, whose text then lands in a group-readable provenance.
    if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
        return Err("hard links are not accepted; drop a file of your own".into());
    }
    if meta.len() > max {
        return Err(format!(
            "the file is {} bytes; the limit is {max} bytes",
            meta.len()
        ));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > max {
        return Err(format!("the file grew beyond the limit of {max} bytes"));
    }
    Ok(buf)
}

fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
        .bits()
}

fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp-write");
    // Never write through a link: drop whatever is there (the entry itself), then create anew
    // (O_EXCL does not follow symlinks); the rename replaces a link at `path`, not its target.
    let _ = fs::remove_file(&tmp);
    // Error reports: the group reads them, nobody but the service writes them.
    sglora::create_synced(&tmp, bytes, 0o640)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize("../evil"), "_evil");
        assert_eq!(sanitize("a/b\nc"), "a_b_c");
        assert_eq!(sanitize("..."), "request");
        assert_eq!(sanitize("ok-name_1.v2"), "ok-name_1.v2");
        assert_eq!(sanitize(&"x".repeat(300)).len(), 100);
    }

    #[test]
    fn requests_parse_strictly() {
        let (d, o) = parse_request(
            "json",
            br#"{"description": "find antonyms", "seed": 5, "top_k": 2}"#,
        )
        .unwrap();
        assert_eq!((d.as_str(), o.seed, o.top_k), ("find antonyms", 5, Some(2)));
        assert!(parse_request("json", br#"{"description": 3}"#).is_err());
        assert!(
            parse_request("json", br#"{"description": "x", "colour": 1}"#)
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(parse_request("json", br#"{"description": "x", "seed": -1}"#).is_err());
        assert!(parse_request("json", br#"{"description": "x", "top_k": -1}"#).is_err());
        assert!(parse_request("json", br#"{"description": "x", "seed": 1e30}"#).is_err());
        assert!(parse_request("txt", b"\xff\xfe")
            .unwrap_err()
            .contains("UTF-8"));
        assert_eq!(parse_request("txt", b"plain text").unwrap().0, "plain text");
    }

    #[test]
    fn triage_by_type_and_name() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        fs::write(p("a.txt"), b"x").unwrap();
        fs::write(p(".hidden.txt"), b"x").unwrap();
        fs::write(p("b.txt.part"), b"x").unwrap();
        fs::write(p("c.bin"), b"x").unwrap();
        fs::create_dir(p("dir.txt")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", p("link.txt")).unwrap();
        nix::unistd::mkfifo(&p("fifo.txt"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(triage(&p("a.txt")), Triage::Process);
        assert_eq!(triage(&p(".hidden.txt")), Triage::Ignore);
        assert_eq!(triage(&p("b.txt.part")), Triage::Ignore);
        assert_eq!(triage(&p("dir.txt")), Triage::Ignore);
        assert!(matches!(triage(&p("c.bin")), Triage::Reject(_)));
        assert!(matches!(triage(&p("link.txt")), Triage::Reject(_)));
        assert!(matches!(triage(&p("fifo.txt")), Triage::Reject(_)));
        assert!(read_regular(&p("link.txt"), 100).is_err());
        fs::hard_link(p("a.txt"), p("hard.txt")).unwrap();
        assert!(read_regular(&p("hard.txt"), 100)
            .unwrap_err()
            .contains("hard links"));
    }
}
