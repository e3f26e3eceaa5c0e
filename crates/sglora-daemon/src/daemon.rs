//! `sglora daemon`: the thin glue that loads the bundle once, opens the cache, serves
//! `org.sglora.Generator1` on D-Bus, watches the drop folder, talks to systemd (`sd_notify`
//! READY/STOPPING/WATCHDOG) and shuts down cleanly on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sglora::Generator;

use crate::cache::Cache;
use crate::config::{BusKind, Config};
use crate::dbus::{Admin1, Callers, Generator1, BUS_NAME, OBJECT_PATH};
use crate::dropbox::Dropbox;
use crate::error::{Error, Result};
use crate::log;
use crate::service::Service;

/// Send a state string to systemd's notification socket, if there is one.
pub fn sd_notify(state: &str) -> bool {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(path))
    };
    sent.is_ok()
}

fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}

/// Nothing the daemon creates is for "other" users: keep the caller's umask (the unit sets
/// `UMask=0007`) but never let it grant world access, whoever started us.
fn restrict_umask() {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o007));
    umask(old | Mode::from_bits_truncate(0o007));
}

/// glibc gives every thread that allocates its own arena (up to 8 per core), and each keeps
/// the memory its thread freed: under load the resident size grew by ~80 MB that way. Two
/// arenas are plenty for a daemon whose model work runs on a couple of threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt adjusts allocator tuning; called at start-up.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Loading and optimising the models leaves ~30 MB of freed heap that glibc keeps; hand it back
/// to the system so the resident size reflects what the daemon really holds (measured in
/// BENCHMARKS.md).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the OS; no pointers are invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Start-up runs a lot of code that serving never runs again (ONNX parsing, tract's graph
/// optimiser, the tokenizer's JSON reader), and the kernel maps the executable's code in 64 KB
/// fault-around chunks: after loading, ~17 MB of the binary's code pages were resident. Unmap
/// the executable's code pages once start-up is done; the pages a request needs fault back in
/// from the page cache (minor faults, microseconds), so the resident size follows the code the
/// daemon actually uses. Only read-only mappings of our own executable with no private
/// (copy-on-write) pages are touched, so nothing but clean, file-backed pages is dropped.
fn drop_startup_code() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(exe) = std::fs::metadata("/proc/self/exe") else {
            return;
        };
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        let mut dropped = 0usize;
        for region in code_regions(&smaps, exe.ino()) {
            // SAFETY: the range is a whole, page-aligned, clean private file mapping of our
            // executable's code (no anonymous pages, so nothing was written to it);
            // MADV_DONTNEED only unmaps its pages, which refault from the file on next use.
            let rc = unsafe {
                libc::madvise(
                    region.0 as *mut libc::c_void,
                    region.1 - region.0,
                    libc::MADV_DONTNEED,
                )
            };
            if rc == 0 {
                dropped += region.1 - region.0;
            }
        }
        log::info(&format!(
            "start-up code unmapped ({} MB of address space; pages in use fault back in)",
            dropped >> 20
        ));
    }
}

/// `(start, end)` of each read-only (code or constant data) private mapping of inode `ino` with
/// no anonymous pages, from `/proc/self/smaps` text. Relocated data (RELRO) is read-only too but
/// has copy-on-write pages, so it is never picked.
fn code_regions(smaps: &str, ino: u64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let (perms, _off, _dev, inode) = (f.next(), f.next(), f.next(), f.next());
            current = match (
                usize::from_str_radix(a, 16),
                usize::from_str_radix(b, 16),
                perms,
                inode.and_then(|i| i.parse::<u64>().ok()),
            ) {
                (Ok(a), Ok(b), Some("r-xp" | "r--p"), Some(i)) if i == ino && b > a => Some((a, b)),
                _ => None,
            };
        } else if first == "Anonymous:" {
            if let Some(r) = current.take() {
                if f.next() == Some("0") {
                    out.push(r);
                }
            }
        }
    }
    out
}

/// Create `dir` if needed and give it `mode`: 0750 for the state directory (group members pass
/// through it to the drop folder, and cannot rename or replace its entries), 0700 for the
/// adapter cache (callers get their adapters as file descriptors, so nobody but the service
/// reads the cache). A link there is refused ([`crate::dirs::real_dir`]).
fn private_dir(dir: &std::path::Path, mode: u32) -> Result<()> {
    crate::dirs::real_dir(dir, mode).map_err(|e| Error::io("preparing", dir, e))
}

/// [`run`] on a runtime of its own, sized for the daemon: model work runs on blocking threads,
/// at most `max_concurrent` at a time (the service's permits), and a small pool keeps per-thread
/// allocator arenas and scratch buffers few.
pub fn run_blocking(cfg: Config, bundle: PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.service.max_concurrent + 2)
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("starting the async runtime: {e}")))?;
    rt.block_on(run(cfg, bundle))
}

/// Run until SIGTERM/SIGINT.
pub async fn run(cfg: Config, bundle: PathBuf) -> Result<()> {
    let t0 = Instant::now();
    // SIGTERM/SIGINT are taken over first: a stop that comes while the bundle loads, or after the
    // service answers but before the main task reaches its wait (under load a request can be
    // served first), is a clean shutdown once the service is up, never death by the signal's
    // default action.
    use tokio::signal::unix::{signal, SignalKind};
    let listen =
        |kind| signal(kind).map_err(|e| Error::Internal(format!("listening for signals: {e}")));
    let mut term = listen(SignalKind::terminate())?;
    let mut int = listen(SignalKind::interrupt())?;
    restrict_umask();
    limit_malloc_arenas();
    let runtime = cfg.model.encoder_weights;
    let overlay = cfg.state_dir.join(sglora::OVERLAY_FILE);
    let g = tokio::task::spawn_blocking(move || {
        Generator::load_with(&bundle, runtime)?.with_overlay(overlay)
    })
    .await?
    .map_err(|e| Error::from(e).context("loading the model bundle and the added experts"))?;
    log::info(&format!(
        "bundle {} loaded ({} experts, {} of them added) in {:.0} ms",
        g.bundle().manifest.bundle_id,
        g.experts().len(),
        g.experts().len() - g.experts().shipped(),
        t0.elapsed().as_secs_f64() * 1e3
    ));
    for (name, why) in g.skipped_experts() {
        log::warn(&format!("added expert {name:?} is left out: {why}"));
    }
    private_dir(&cfg.state_dir, 0o750)?;
    private_dir(&cfg.cache_dir, 0o700)?;
    private_dir(&cfg.cache_dir.join("adapters"), 0o700)?;
    let db = cfg.state_dir.join("cache.db");
    let cache = Cache::open(
        &db,
        &cfg.cache_dir.join("adapters"),
        cfg.cache.max_bytes,
        cfg.cache.similarity_threshold,
    )
    .map_err(|e| e.context(format!("opening the cache ({})", db.display())))?;
    let svc = Arc::new(
        Service::new(
            g,
            cache,
            cfg.service.max_concurrent,
            cfg.service.max_queue,
            cfg.service.per_caller(),
        )
        .with_embed_limits(cfg.embed.clone()),
    );

    let builder = match (&cfg.bus_address, &cfg.bus) {
        (Some(a), _) => zbus::connection::Builder::address(a.as_str()),
        (None, BusKind::Session) => zbus::connection::Builder::session(),
        (None, BusKind::System) => zbus::connection::Builder::system(),
    };
    let callers = Arc::new(Callers::default());
    let conn = builder
        .name(BUS_NAME)
        .serve_at(OBJECT_PATH, Generator1::new(svc.clone(), callers.clone()))
        .serve_at(OBJECT_PATH, Admin1::new(svc.clone(), callers))
        .build()
        .await
        .map_err(|e| Error::from(e).context(format!("connecting to the bus and owning {BUS_NAME} (is another sglorad running? does the bus policy allow it?)")))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    if cfg.dropbox.enabled {
        let root = cfg.dropbox_dir();
        let db = Arc::new(
            Dropbox::create(&root, &cfg.dropbox)
                .map_err(|e| Error::io("creating the drop folder", &root, e))?,
        );
        let watch = db
            .watch()
            .map_err(|e| Error::from(e).context(format!("watching {}", db.inbox.display())))?;
        let (svc2, rx) = (svc.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(db.run(watch, svc2, rx)));
        log::info(&format!("watching {}", root.join("inbox").display()));
    }
    tasks.push(tokio::spawn(crate::dbus::notify_properties(
        conn.clone(),
        Duration::from_secs(1),
        stop_rx.clone(),
    )));
    if let Some(every) = watchdog_interval() {
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = t.tick() => { sd_notify("WATCHDOG=1"); }
                    _ = rx.changed() => break,
                }
            }
        }));
    }
    release_free_heap();
    drop_startup_code();
    sd_notify("READY=1");
    log::info(&format!(
        "ready: {BUS_NAME} on {} in {:.0} ms",
        cfg.bus_address.as_deref().unwrap_or(match cfg.bus {
            BusKind::System => "the system bus",
            BusKind::Session => "the session bus",
        }),
        t0.elapsed().as_secs_f64() * 1e3
    ));

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    sd_notify("STOPPING=1");
    svc.stop();
    log::info("stopping: no new work is taken; finishing in-flight requests");
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + Duration::from_secs(cfg.service.shutdown_grace_secs);
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, t).await;
    }
    while svc.busy() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(conn);
    log::info("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5600-5700 r--p 00000000 08:01 42 /usr/bin/sglora
Rss:                  64 kB
Anonymous:             0 kB
5700-5900 r-xp 00100000 08:01 42 /usr/bin/sglora
Rss:                2048 kB
Anonymous:             0 kB
5900-5a00 r-xp 00300000 08:01 42 /usr/bin/sglora
Anonymous:             4 kB
5a00-5b00 r-xp 00000000 08:01 43 /usr/lib/libc.so.6
Anonymous:             0 kB
7f00-7f10 rw-p 00000000 00:00 0
Anonymous:            16 kB
";

    #[test]
    fn only_clean_code_mappings_of_the_executable_are_picked() {
        // Code or data with copy-on-write pages, other files and anonymous memory are left alone.
        assert_eq!(
            code_regions(SMAPS, 42),
            vec![(0x5600, 0x5700), (0x5700, 0x5900)]
        );
        assert_eq!(code_regions(SMAPS, 43), vec![(0x5a00, 0x5b00)]);
        assert!(code_regions(SMAPS, 7).is_empty());
    }

    fn rss_file_kb() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("RssFile:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn dropping_code_pages_keeps_the_process_running() {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata("/proc/self/exe").unwrap().ino();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let emulated = std::env::var_os("SGLORA_EMULATED").is_some();
        // qemu-arm (`make test-armv7`) maps a 32-bit guest's executable at addresses its own
        // /proc/self/smaps does not list under the file; only there may it be missing.
        assert!(
            emulated || !code_regions(&smaps, ino).is_empty(),
            "the test binary's own code mapping was not found"
        );
        let before = rss_file_kb();
        drop_startup_code();
        let after = rss_file_kb();
        // Code runs again (it faults back in) and gives the right answers.
        let mut r = sglora::Rng::new(7);
        let v = r.normals(1000);
        let m = v.iter().sum::<f64>() / 1000.0;
        assert!(m.abs() < 0.2, "mean {m}");
        // Under qemu-user (`make test-aarch64`; the runner in .cargo/config.toml sets
        // SGLORA_EMULATED) /proc/self/status is the emulator's, whose RSS holds its translation
        // cache rather than the guest's code pages: there the RSS drop cannot be observed.
        if !emulated {
            assert!(after < before, "RssFile {before} kB -> {after} kB");
        }
    }
}
