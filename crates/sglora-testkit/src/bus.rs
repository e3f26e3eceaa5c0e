//! A private dbus-daemon and the real `sglora daemon` on it, for the integration tests, the soak
//! test and the benchmark.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use zbus::Variant;

use crate::bundle_dir;

/// A `/proc/PID/status` field in kB (0 if the process or field is gone).
pub fn proc_status_kb(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == field).then(|| v.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// The daemon's well-known bus name.
pub const NAME: &str = "org.sglora.Generator1";
/// Its object path.
pub const PATH: &str = "/org/sglora/Generator1";
/// An in-distribution description (hypernyms of animals).
pub const ANIMAL: &str = "Given the name of an animal, find the broader category it is a kind of.";
/// Another in-distribution description, far from [`ANIMAL`].
pub const ANTONYM: &str = "Given an adjective, find the word with the opposite meaning.";

/// A private dbus-daemon (session configuration) on a socket in a temporary directory.
pub struct Bus {
    child: Child,
    /// Its D-Bus address.
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    /// Start it and wait for its socket.
    pub fn start() -> Bus {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("bus");
        let address = format!("unix:path={}", sock.display());
        let child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={address}"))
            .stdout(Stdio::null())
            .spawn()
            .expect("dbus-daemon must be installed (Debian package dbus-daemon)");
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "dbus-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Bus {
            child,
            address,
            _dir: dir,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `sglora daemon`.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its stderr log.
    pub log: PathBuf,
    /// Seconds from spawn to READY=1.
    pub ready_s: f64,
}

impl Daemon {
    /// Start `sglora daemon` (the binary under test, the bundle under test) and wait for READY.
    pub fn start(bus: &Bus, state: &Path, extra: &[&str]) -> Daemon {
        Daemon::spawn(&crate::sglora_bin(), &bundle_dir(), bus, state, extra)
    }

    /// [`Daemon::start`] with `config` (TOML) instead of [`write_config`]'s.
    pub fn start_configured(bus: &Bus, state: &Path, config: &str, extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(state).unwrap();
        let p = state.join("sglorad.toml");
        std::fs::write(&p, config).unwrap();
        Daemon::launch(&crate::sglora_bin(), &bundle_dir(), bus, state, &p, extra)
    }

    /// Start `bin daemon` on `bundle` and wait for its sd_notify READY=1 on a socket of our own.
    pub fn spawn(bin: &Path, bundle: &Path, bus: &Bus, state: &Path, extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(state).unwrap();
        let config = write_config(state);
        Daemon::launch(bin, bundle, bus, state, &config, extra)
    }

    fn launch(
        bin: &Path,
        bundle: &Path,
        bus: &Bus,
        state: &Path,
        config: &Path,
        extra: &[&str],
    ) -> Daemon {
        let notify_dir = tempfile::tempdir().unwrap();
        let notify_path = notify_dir.path().join("notify");
        let sock = UnixDatagram::bind(&notify_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let log = state.join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id())
        ));
        std::fs::create_dir_all(state).unwrap();
        let logf = std::fs::File::create(&log).unwrap();
        let t0 = Instant::now();
        let child = Command::new(bin)
            .arg("--bundle")
            .arg(bundle)
            .arg("daemon")
            .arg("--bus-address")
            .arg(&bus.address)
            .arg("--state-dir")
            .arg(state)
            .arg("--cache-dir")
            .arg(state.join("cache"))
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut buf = [0u8; 256];
        loop {
            let n = sock.recv(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "no READY=1 from the daemon: {e}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        Daemon {
            child,
            log,
            ready_s: t0.elapsed().as_secs_f64(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`, …).
    pub fn status_kb(&self, field: &str) -> u64 {
        proc_status_kb(self.pid(), field)
    }

    /// SIGTERM, wait for a clean exit (asserted), return the log.
    pub fn stop(self) -> String {
        self.stop_timed().0
    }

    /// [`Daemon::stop`], and the time from SIGTERM to the exit.
    pub fn stop_timed(mut self) -> (String, Duration) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "daemon exited with {status}");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "daemon did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = t.elapsed();
        (std::fs::read_to_string(&self.log).unwrap_or_default(), took)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file with a short settle time so the drop-folder tests are quick.
pub fn write_config(state: &Path) -> PathBuf {
    let p = state.join("sglorad.toml");
    std::fs::write(
        &p,
        "[dropbox]\nsettle_ms = 100\n[cache]\nsimilarity_threshold = 0.97\n",
    )
    .unwrap();
    p
}

/// A zbus connection to the private bus.
pub async fn connect(bus: &Bus) -> zbus::Connection {
    zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .unwrap()
}

/// `Generate` options.
pub type Opts = HashMap<String, Variant<'static>>;

/// Options with a seed, OOD allowed.
pub fn opts(seed: u64) -> Opts {
    HashMap::from([
        ("seed".to_string(), Variant::U64(seed)),
        ("allow_ood".to_string(), Variant::Bool(true)),
    ])
}

/// Call `Generate`.
pub async fn generate(
    c: &zbus::Connection,
    desc: &str,
    o: &Opts,
) -> zbus::Result<(String, String, bool, String)> {
    let m = c
        .call_method(Some(NAME), PATH, Some(NAME), "Generate", &(desc, o))
        .await?;
    m.body().deserialize()
}

/// Read a u64 property.
pub async fn prop_u64(c: &zbus::Connection, name: &str) -> u64 {
    let m = c
        .call_method(
            Some(NAME),
            PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(NAME, name),
        )
        .await
        .unwrap();
    let v: zbus::OwnedVariant = m.body().deserialize().unwrap();
    u64::try_from(&v).unwrap()
}

/// The D-Bus error name and message of a failed call.
pub fn dbus_error(e: zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            format!("{} {}", name.as_str(), msg.unwrap_or_default())
        }
        other => panic!("expected a D-Bus method error, got {other}"),
    }
}

/// Run a stock tool.
pub fn tool(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}
