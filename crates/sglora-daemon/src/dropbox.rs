//! The watched drop folder: `inbox/NAME.txt` or `inbox/NAME.json` in, `outbox/NAME/` out, the
//! request moved to `done/` (or to `failed/` with `NAME.error.txt`).
//!
//! Only completed writes are read: inotify close-after-write and rename-into events (a regular
//! file's creation is not one: it is still being written), and then only a file that nobody
//! holds open for writing (a read lease, `F_SETLEASE`, is refused while a writer has it open,
//! so a file renamed in mid-write waits for its writer's close). Where the kernel grants no
//! lease (the service user lacks `CAP_LEASE`), the file's size and mtime must instead hold
//! still for `settle_ms`. A request is made for its file's owner, who must be a member of the
//! inbox's group (or root, or the service user). Dotfiles, `*.tmp`, `*.part` and
//! directories are ignored; symlinks, FIFOs, devices, oversized, non-UTF-8 or malformed requests
//! are moved to `failed/` with a reason (the link itself is moved, never followed). Names are
//! sanitised and never clobber an existing output. Files present at start-up are processed, and
//! a periodic rescan catches anything an overflowing event queue dropped.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sglora::{AdapterFiles, GenerateOptions};

use crate::service::{Caller, Service};

/// The four folders.
#[derive(Debug)]
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
    /// Whether leases tell us that a file is still open for writing (cleared, with one warning,
    /// the first time the kernel refuses one).
    leases: std::sync::atomic::AtomicBool,
    /// The inbox's group: the callers the service serves.
    group: u32,
    /// Retention of outputs, processed requests and reports: age and total bytes.
    retention: Option<Duration>,
    max_kept_bytes: u64,
    /// Bytes written since the last [`Dropbox::prune`].
    written: std::sync::atomic::AtomicU64,
}

/// Why a request file was not read.
#[derive(Debug, PartialEq, Eq)]
enum Unread {
    /// Some process still holds it open for writing: its close-after-write event comes later.
    StillOpen,
    /// Refused, with the reason for `failed/`.
    Refused(String),
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
    ///
    /// Ignores `SIGIO` for the whole process: the open-for-writing check takes a lease for an
    /// instant, and a writer opening the file in that instant makes the kernel signal the lease
    /// holder, whose default action would end the daemon.
    pub fn create(root: &Path, cfg: &crate::config::DropboxConfig) -> std::io::Result<Dropbox> {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGIO,
                nix::sys::signal::SigHandler::SigIgn,
            )
        }
        .map_err(std::io::Error::from)?;
        let d = Dropbox {
            inbox: root.join("inbox"),
            outbox: root.join("outbox"),
            done: root.join("done"),
            failed: root.join("failed"),
            max_bytes: cfg.max_file_bytes,
            settle: Duration::from_millis(cfg.settle_ms),
            leases: std::sync::atomic::AtomicBool::new(true),
            group: nix::unistd::getegid().as_raw(),
            retention: (cfg.retention_secs > 0).then(|| Duration::from_secs(cfg.retention_secs)),
            max_kept_bytes: cfg.max_kept_bytes,
            written: std::sync::atomic::AtomicU64::new(0),
        };
        // inbox: the group (clients) drops requests but cannot list or watch them (-wx), sticky
        // so a member can neither remove nor replace another member's pending request, setgid
        // so a request is the group's and 0640 lets the service read it; the rest likewise
        // cannot be listed (--x): members open their own outputs by name, readable by them
        // alone (acl.rs); only we write.
        let root = root.to_path_buf();
        for (p, mode) in [
            (&root, 0o750),
            (&d.inbox, 0o3730),
            (&d.outbox, 0o710),
            (&d.done, 0o710),
            (&d.failed, 0o710),
        ] {
            crate::dirs::real_dir(p, mode)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        }
        let group = std::os::unix::fs::MetadataExt::gid(&fs::symlink_metadata(&d.inbox)?);
        let d = Dropbox { group, ..d };
        // Half-written outputs of a killed predecessor (hidden temporaries) go; complete ones
        // were published by an atomic rename and stay.
        let stale = sglora::remove_stale_temps(&d.outbox)
            + sglora::remove_stale_temps(&d.done)
            + sglora::remove_stale_temps(&d.failed);
        if stale > 0 {
            crate::log::warn(&format!(
                "dropbox: removed {stale} unfinished output(s) left by an interrupted run"
            ));
        }
        Ok(d)
    }

    /// Remove what `outbox/`, `done/` and `failed/` keep past the retention age, then, until
    /// they hold at most `max_kept_bytes` together, the oldest entry of the requester who holds
    /// the most bytes (so one member's flood removes its own entries first). Returns the number
    /// removed. Entries are removed as themselves (a link, never its target).
    pub fn prune(&self) -> usize {
        self.written.store(0, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::SystemTime::now();
        // (last change, clamped to now; bytes; path; requester)
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf, u32)> = Vec::new();
        for dir in [&self.outbox, &self.done, &self.failed] {
            let Ok(rd) = fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                // Hidden temporaries are a writer's, in progress.
                if e.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let Ok(m) = fs::symlink_metadata(&p) else {
                    continue;
                };
                let bytes = if m.is_dir() {
                    fs::read_dir(&p)
                        .map(|rd| {
                            rd.flatten()
                                .filter_map(|f| fs::symlink_metadata(f.path()).ok())
                                .map(|m| m.len())
                                .sum()
                        })
                        .unwrap_or(0)
                } else {
                    m.len()
                };
                let owner = crate::acl::reader(&p)
                    .unwrap_or_else(|| std::os::unix::fs::MetadataExt::uid(&m));
                let t = m.modified().unwrap_or(now).min(now);
                entries.push((t, bytes, p, owner));
            }
        }
        entries.sort();
        let remove = |p: &Path| match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(p).is_ok(),
            Ok(_) => fs::remove_file(p).is_ok(),
            Err(_) => false,
        };
        let mut removed = 0;
        // Past the age, oldest first.
        let (old, mut kept): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| {
            self.retention
                .is_some_and(|r| now.duration_since(e.0).unwrap_or_default() > r)
        });
        for e in old {
            removed += usize::from(remove(&e.2));
        }
        // Past the budget: the biggest holder's oldest.
        let mut total: u64 = kept.iter().map(|e| e.1).sum();
        while total > self.max_kept_bytes && !kept.is_empty() {
            let mut held: HashMap<u32, u64> = HashMap::new();
            for e in &kept {
                *held.entry(e.3).or_default() += e.1;
            }
            let Some((&top, _)) = held
                .iter()
                .max_by_key(|(uid, b)| (**b, std::cmp::Reverse(**uid)))
            else {
                break;
            };
            let i = kept.iter().position(|e| e.3 == top).unwrap_or(0);
            let e = kept.remove(i);
            total = total.saturating_sub(e.1);
            removed += usize::from(remove(&e.2));
        }
        if removed > 0 {
            crate::log::info(&format!(
                "dropbox: removed {removed} old output(s), request(s) and report(s) (retention)"
            ));
        }
        removed
    }

    /// Count bytes written, and prune once they reach an eighth of the budget, so a flood of
    /// requests cannot outrun the budget by more than that between two rescans.
    fn wrote(&self, bytes: u64) {
        let w = self
            .written
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed)
            + bytes;
        if w >= self.max_kept_bytes / 8 {
            self.prune();
        }
    }

    fn fail(&self, path: &Path, reason: &str) {
        // Reports and the failed request are for the file's owner alone (and the service).
        let meta = fs::symlink_metadata(path).ok();
        let owner = Caller::uid(meta.as_ref().map_or(
            nix::unistd::geteuid().as_raw(),
            std::os::unix::fs::MetadataExt::uid,
        ));
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
        let _ = write_durable(&err_path, format!("{name}: {reason}\n").as_bytes(), owner);
        self.wrote(reason.len() as u64 + 4096);
        // A regular file we may read is kept as a private copy; one we may not (oversized, a
        // hard link) is removed, since its own mode may let other members read it; anything
        // else (a link, a FIFO) is moved unread, as itself.
        let small = meta
            .as_ref()
            .is_some_and(|m| m.is_file() && m.len() <= self.max_bytes);
        let copied = small
            && read_regular(path, self.max_bytes, false)
                .ok()
                .is_some_and(|(b, _)| self.keep(path, &dest, &b, owner).is_ok());
        let regular = meta.as_ref().is_some_and(|m| m.is_file());
        if !copied && (regular || fs::rename(path, &dest).is_err()) {
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
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_string();
        let (bytes, owner) = match self.read_request(path).await {
            Ok(b) => b,
            Err(Unread::StillOpen) => return,
            Err(Unread::Refused(r)) => return self.fail(path, &r),
        };
        if let Err(r) = self.check_member(owner) {
            return self.fail(path, &r);
        }
        let (desc, opts) = match parse_request(&ext, &bytes) {
            Ok(x) => x,
            Err(r) => return self.fail(path, &r),
        };
        let served = match svc.generate(&desc, &opts, Caller::uid(owner)).await {
            Ok(s) => s,
            // Stopping: the request stays in the inbox for the next start.
            Err(crate::error::Error::Stopping) => return,
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
            None => match self.publish(&stem, &files, Caller::uid(owner)) {
                Ok(p) => p,
                Err(e) => return self.fail(path, &e.to_string()),
            },
        };
        self.wrote(
            (files.weights.len() + files.config.len() + files.provenance.len() + bytes.len())
                as u64,
        );
        let done = unique(&self.done, &stem, &format!(".{ext}"));
        if let Err(e) = self.keep(path, &done, &bytes, Caller::uid(owner)) {
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

    /// [`read_regular`], and with leases, only once nobody holds the file open for writing;
    /// the first refused lease switches to the settle rule for good, with one warning.
    async fn read_request(&self, path: &Path) -> Result<(Vec<u8>, u32), Unread> {
        let leases = self.leases.load(std::sync::atomic::Ordering::Relaxed);
        if leases {
            match read_regular(path, self.max_bytes, true) {
                Err(Unread::Refused(r)) if r == NO_LEASE => {
                    self.leases
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    crate::log::warn(
                        "dropbox: the kernel refuses file leases to the service (it needs \
                         CAP_LEASE, which the shipped unit grants): a request is read once its \
                         size and mtime hold still for settle_ms, so a file renamed into inbox/ \
                         while still being written may be read early",
                    );
                }
                r => return r,
            }
        }
        if !self.settled(path).await {
            return Err(Unread::StillOpen);
        }
        read_regular(path, self.max_bytes, false)
    }

    /// Requests are made for their file's owner, who must be root, the service user or a
    /// member of the inbox's group by `/etc/passwd` and `/etc/group` ([`crate::accounts`]): a
    /// file of anyone else's may be moved in by a member, but it is not theirs to spend.
    fn check_member(&self, uid: u32) -> Result<(), String> {
        if Caller::uid(uid).is_admin() {
            return Ok(());
        }
        if crate::accounts::is_member(uid, self.group) {
            Ok(())
        } else {
            Err(format!(
                "the file's owner (uid {uid}) is not a member of the inbox's group (gid {}); \
                 only members may drop requests, in files of their own",
                self.group
            ))
        }
    }

    /// Write `files` to a free `outbox/STEM[-N]` atomically. A concurrent writer may take the
    /// name between the check and the rename: retry with the next free name.
    /// The output is readable by `caller` and the service alone from the moment it appears.
    fn publish(&self, stem: &str, files: &AdapterFiles, caller: Caller) -> sglora::Result<PathBuf> {
        let write = |out: &Path| {
            sglora::write_atomic_with(out, files, false, |tmp| crate::acl::private_to(tmp, caller))
        };
        let mut out = unique(&self.outbox, stem, "");
        for _ in 0..5 {
            match write(&out) {
                Ok(_) => return Ok(out),
                Err(sglora::Error::Output { .. }) if out.exists() => {
                    out = unique(&self.outbox, stem, "")
                }
                Err(e) => return Err(e),
            }
        }
        write(&out)
    }

    /// Keep a request's `bytes` at `dest` as the service's own file, readable by `caller` alone
    /// (the member's file keeps whatever mode its writer gave it, so it is not moved), then
    /// remove the request from the inbox.
    fn keep(&self, path: &Path, dest: &Path, bytes: &[u8], caller: Caller) -> std::io::Result<()> {
        write_durable(dest, bytes, caller)?;
        fs::remove_file(path)
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
        self.prune();
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
                    self.prune();
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

/// The reason [`read_regular`] gives when the kernel refuses a lease (not a refusal of the
/// request: [`Dropbox::read_request`] switches rules and reads again).
const NO_LEASE: &str = "\u{0}no lease";

/// Whether some process holds the open file `f` open for writing: a read lease is granted
/// only when nobody does. `Err(NO_LEASE)` when the kernel grants no lease at all.
fn open_for_writing(f: &fs::File) -> Result<bool, Unread> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a file descriptor we own, with integer arguments only.
    let r = unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_SETLEASE, nix::libc::F_RDLCK) };
    if r == 0 {
        // Released at once: the lease is only the question "is anyone writing?", and holding
        // it would make a writer's open wait for us.
        // SAFETY: as above.
        unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_SETLEASE, nix::libc::F_UNLCK) };
        return Ok(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(nix::libc::EAGAIN) | Some(nix::libc::EBUSY) => Ok(true),
        _ => Err(Unread::Refused(NO_LEASE.into())),
    }
}

/// Open without following links and without blocking on FIFOs; accept only regular files up to
/// `max` bytes that are not hard links, and with `leases` only once nobody holds them open for
/// writing. Returns the bytes and the file's owner.
fn read_regular(path: &Path, max: u64, leases: bool) -> Result<(Vec<u8>, u32), Unread> {
    let refuse = Unread::Refused;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
        .map_err(|e| refuse(format!("cannot open: {e}")))?;
    let meta = f
        .metadata()
        .map_err(|e| refuse(format!("cannot stat: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(refuse("only regular files are accepted".into()));
    }
    // A hard link (where the kernel allows linking files one does not own) would hand the
    // service a file of someone else's, whose text then lands in a provenance file.
    if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
        return Err(refuse(
            "hard links are not accepted; drop a file of your own".into(),
        ));
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "the file is writable by others than its owner (mode {mode:04o}), so another member \
             could change it before it is read; write requests 0640 or 0644"
        )));
    }
    if leases && open_for_writing(&f)? {
        return Err(Unread::StillOpen);
    }
    if meta.len() > max {
        return Err(refuse(format!(
            "the file is {} bytes; the limit is {max} bytes",
            meta.len()
        )));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| refuse(format!("cannot read: {e}")))?;
    if buf.len() as u64 > max {
        return Err(refuse(format!(
            "the file grew beyond the limit of {max} bytes"
        )));
    }
    Ok((buf, std::os::unix::fs::MetadataExt::uid(&meta)))
}

fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
        .bits()
}

/// Write `bytes` to `path` through a hidden temporary, readable by `caller` alone besides the
/// service from the start, and never writable by anyone else.
fn write_durable(path: &Path, bytes: &[u8], caller: Caller) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-write"));
    // Never write through a link: drop whatever is there (the entry itself), then create anew
    // (O_EXCL does not follow symlinks); the rename replaces a link at `path`, not its target.
    let _ = fs::remove_file(&tmp);
    sglora::create_synced(&tmp, bytes, 0o600)?;
    crate::acl::private_to(&tmp, caller)?;
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
        assert!(read_regular(&p("link.txt"), 100, false).is_err());
        fs::hard_link(p("a.txt"), p("hard.txt")).unwrap();
        assert!(matches!(
            read_regular(&p("hard.txt"), 100, false).unwrap_err(),
            Unread::Refused(r) if r.contains("hard links")
        ));
    }

    /// Retention: entries past the age go, then the oldest until the byte budget holds; hidden
    /// temporaries and the inbox are never touched.
    #[test]
    fn prune_keeps_the_age_and_byte_budget() {
        let d = tempfile::tempdir().unwrap();
        let cfg = crate::config::DropboxConfig {
            retention_secs: 3600,
            max_kept_bytes: 1024 * 1024,
            ..Default::default()
        };
        let b = Dropbox::create(d.path(), &cfg).unwrap();
        let mb = vec![0u8; 400 * 1024];
        let set_age = |p: &Path, secs: u64| {
            let t = std::time::SystemTime::now() - Duration::from_secs(secs);
            fs::File::options()
                .write(true)
                .open(p)
                .or_else(|_| fs::File::open(p))
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        fs::write(b.done.join("ancient.txt"), b"x").unwrap();
        set_age(&b.done.join("ancient.txt"), 7200);
        for (i, age) in [(0, 300), (1, 200), (2, 100)] {
            let out = b.outbox.join(format!("a{i}"));
            fs::create_dir(&out).unwrap();
            fs::write(out.join(sglora::WEIGHTS_FILE), &mb).unwrap();
            set_age(&out, age);
        }
        fs::write(b.outbox.join(".a3.tmp-1"), &mb).unwrap();
        fs::write(b.inbox.join("pending.txt"), b"x").unwrap();
        set_age(&b.inbox.join("pending.txt"), 7200);
        assert_eq!(b.prune(), 2);
        assert!(!b.done.join("ancient.txt").exists(), "past the age");
        assert!(
            !b.outbox.join("a0").exists(),
            "the oldest goes for the budget"
        );
        assert!(b.outbox.join("a1").exists() && b.outbox.join("a2").exists());
        assert!(b.outbox.join(".a3.tmp-1").exists() && b.inbox.join("pending.txt").exists());
    }

    /// Past the byte budget the requester holding the most goes first: another requester's
    /// older output survives a flood.
    #[test]
    fn prune_takes_from_the_biggest_holder_first() {
        let d = tempfile::tempdir().unwrap();
        let cfg = crate::config::DropboxConfig {
            retention_secs: 0,
            max_kept_bytes: 1024 * 1024,
            ..Default::default()
        };
        let b = Dropbox::create(d.path(), &cfg).unwrap();
        let blob = vec![0u8; 400 * 1024];
        let out = |name: &str, uid: u32, age: u64| {
            let p = b.outbox.join(name);
            fs::create_dir(&p).unwrap();
            fs::write(p.join(sglora::WEIGHTS_FILE), &blob).unwrap();
            crate::acl::private_to(&p, Caller::uid(uid)).unwrap();
            let t = std::time::SystemTime::now() - Duration::from_secs(age);
            fs::File::open(&p).unwrap().set_modified(t).unwrap();
        };
        out("quiet", 5002, 500);
        for (i, age) in [(0, 300), (1, 200), (2, 100)] {
            out(&format!("flood{i}"), 5001, age);
        }
        if crate::acl::reader(&b.outbox.join("quiet")).is_none() {
            eprintln!("skipped: no POSIX ACLs on this file system");
            return;
        }
        assert_eq!(b.prune(), 2);
        assert!(
            b.outbox.join("quiet").exists(),
            "the quiet requester lost its output"
        );
        assert!(!b.outbox.join("flood0").exists() && !b.outbox.join("flood1").exists());
        assert!(b.outbox.join("flood2").exists());
    }

    /// A file some process still holds open for writing is not read; once it is closed, it is.
    /// (Leases need the file's owner or CAP_LEASE: the test's own files qualify.)
    #[test]
    fn a_file_open_for_writing_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r.txt");
        let mut w = fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut w, b"first sentence.").unwrap();
        assert_eq!(
            read_regular(&path, 100, true).unwrap_err(),
            Unread::StillOpen
        );
        std::io::Write::write_all(&mut w, b" second sentence.").unwrap();
        drop(w);
        let (bytes, owner) = read_regular(&path, 100, true).unwrap();
        assert_eq!(bytes, b"first sentence. second sentence.");
        assert_eq!(owner, nix::unistd::geteuid().as_raw());
    }
}
