//! The shipped D-Bus policy (systemd/org.sglora.Generator1.conf) on a private *system-like* bus:
//! only user `sglora` may own the name; root and members of group `sglora` may call; any other
//! uid is refused. Needs root (CI runs as root) to create the test users and switch uids.

use sglora_testkit as common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NAME: &str = "org.sglora.Generator1";
const PATH: &str = "/org/sglora/Generator1";
const CLIENT: &str = "sglora-test-client";
const CLIENT2: &str = "sglora-test-client2";
const OUTSIDER: &str = "sglora-test-outsider";
const ADMIN: &str = "org.sglora.Admin1";
const ANIMAL: &str = "Given the name of an animal, find the broader category it is a kind of.";

fn ids(user: &str) -> Option<(u32, u32)> {
    let u = nix::unistd::User::from_name(user).ok()??;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// Whether this test can run (as root, which CI is), with the test users created; says so when
/// it cannot.
fn root_with_users() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: this test needs root to create users and switch uids (CI runs as root)");
        return false;
    }
    ensure_users();
    true
}

fn ensure_users() {
    // The tests of this file run in parallel; useradd must not race with itself.
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if nix::unistd::Group::from_name("sglora")
        .ok()
        .flatten()
        .is_none()
    {
        assert!(Command::new("groupadd")
            .args(["--system", "sglora"])
            .status()
            .unwrap()
            .success());
    }
    if ids("sglora").is_none() {
        let ok = Command::new("useradd")
            .args([
                "--system",
                "--gid",
                "sglora",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "sglora",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    for (user, extra) in [
        (CLIENT, Some("sglora")),
        (CLIENT2, Some("sglora")),
        (OUTSIDER, None),
    ] {
        if ids(user).is_none() {
            let mut c = Command::new("useradd");
            c.args(["--no-create-home", "--shell", "/usr/sbin/nologin"]);
            if let Some(g) = extra {
                c.args(["--groups", g]);
            }
            assert!(c.arg(user).status().unwrap().success(), "useradd {user}");
        }
    }
}

/// A command run as `user` with its supplementary groups (setpriv, util-linux).
fn cmd_as(user: &str, program: &str) -> Command {
    if user == "root" {
        return Command::new(program);
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .arg(program);
    c
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn busctl(address: &str, user: &str, method: &str, args: &[&str]) -> std::process::Output {
    let mut c = cmd_as(user, "busctl");
    c.arg(format!("--address={address}"))
        .args(["call", NAME, PATH, NAME, method])
        .args(args);
    c.output().unwrap()
}

/// A private system-like bus in `dir`: Debian's system.conf default context plus the shipped
/// policy. Returns the bus process and its address.
fn system_bus(dir: &std::path::Path) -> (Kill, String) {
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sock = dir.join("system_bus_socket");
    let address = format!("unix:path={}", sock.display());
    let policy = root().join("systemd/org.sglora.Generator1.conf");
    let conf = std::fs::read_to_string(root().join("tests/system-bus.conf.in"))
        .unwrap()
        .replace("@LISTEN@", &address)
        .replace("@POLICY@", &policy.display().to_string());
    let conf_path = dir.join("system.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let bus = Kill(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args(["--nofork", "--nopidfile"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    (bus, address)
}

/// The daemon as user `sglora` with only `CAP_LEASE` (as the shipped unit runs it), state and
/// cache under `dir`, configuration `config` (TOML), the drop folder if `dropbox`; returns once
/// it answers root. Returns the process and the state and cache directories.
fn service(
    dir: &std::path::Path,
    address: &str,
    config: &str,
    dropbox: bool,
) -> (Kill, std::path::PathBuf, std::path::PathBuf) {
    let state = dir.join("state");
    let cache = dir.join("cache");
    for d in [&state, &cache] {
        std::fs::create_dir_all(d).unwrap();
        nix::unistd::chown(
            d.as_path(),
            Some(nix::unistd::Uid::from_raw(ids("sglora").unwrap().0)),
            Some(nix::unistd::Gid::from_raw(ids("sglora").unwrap().1)),
        )
        .unwrap();
    }
    let conf = dir.join("sglorad.toml");
    std::fs::write(&conf, config).unwrap();
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "sglora",
        "--regid",
        "sglora",
        "--init-groups",
        "--inh-caps",
        "+lease",
        "--ambient-caps",
        "+lease",
        "--",
    ])
    .arg(env!("CARGO_BIN_EXE_sglora"))
    .arg("--bundle")
    .arg(bundle_dir())
    .args(["daemon", "--bus-address", address])
    .arg("--state-dir")
    .arg(&state)
    .arg("--cache-dir")
    .arg(&cache)
    .arg("--config")
    .arg(&conf)
    .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
    if !dropbox {
        c.arg("--no-dropbox");
    }
    let mut daemon = Kill(c.spawn().unwrap());
    let t = Instant::now();
    loop {
        let o = busctl(address, "root", "ListExperts", &[]);
        if o.status.success() {
            break;
        }
        if let Some(st) = daemon.0.try_wait().unwrap() {
            let e = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
            panic!("daemon exited {st}: {e}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "daemon never answered root"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (daemon, state, cache)
}

#[test]
fn shipped_policy_admits_root_and_group_and_refuses_others() {
    if !root_with_users() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_bus, address) = system_bus(dir.path());

    // A non-service user may not own the name.
    let mut c = cmd_as(OUTSIDER, env!("CARGO_BIN_EXE_sglora"));
    c.arg("--bundle")
        .arg(bundle_dir())
        .args(["daemon", "--no-dropbox", "--bus-address", &address])
        .arg("--state-dir")
        .arg(dir.path().join("o-state"))
        .arg("--cache-dir")
        .arg(dir.path().join("o-cache"))
        .arg("--config")
        .arg("/dev/null");
    std::fs::create_dir_all(dir.path().join("o-state")).unwrap();
    std::fs::create_dir_all(dir.path().join("o-cache")).unwrap();
    nix::unistd::chown(
        &dir.path().join("o-state"),
        Some(nix::unistd::Uid::from_raw(ids(OUTSIDER).unwrap().0)),
        None,
    )
    .unwrap();
    nix::unistd::chown(
        &dir.path().join("o-cache"),
        Some(nix::unistd::Uid::from_raw(ids(OUTSIDER).unwrap().0)),
        None,
    )
    .unwrap();
    let out = c.output().unwrap();
    assert!(!out.status.success(), "an outsider must not own the name");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("org.sglora.Generator1"), "{err}");

    // The service user owns it.
    let (_daemon, _state, cache) = service(dir.path(), &address, "", false);
    // An outsider listens for the service's signals throughout (line-buffered, so what it heard
    // is there when it is stopped).
    let mut listen = cmd_as(OUTSIDER, "stdbuf");
    listen
        .args([
            "-oL",
            "gdbus",
            "monitor",
            "--address",
            &address,
            "--dest",
            NAME,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut outsider_ears = Kill(listen.spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));

    let desc = "Given an adjective, find the word with the opposite meaning.";
    let root_call = busctl(
        &address,
        "root",
        "Generate",
        &["sa{sv}", desc, "1", "allow_ood", "b", "true"],
    );
    assert!(
        root_call.status.success(),
        "root: {}",
        String::from_utf8_lossy(&root_call.stderr)
    );
    let member = busctl(
        &address,
        CLIENT,
        "Generate",
        &["sa{sv}", desc, "1", "allow_ood", "b", "true"],
    );
    assert!(
        member.status.success(),
        "group member: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    let outsider = busctl(
        &address,
        OUTSIDER,
        "Generate",
        &["sa{sv}", desc, "1", "allow_ood", "b", "true"],
    );
    assert!(!outsider.status.success(), "an outsider must be refused");
    let err = String::from_utf8_lossy(&outsider.stderr);
    assert!(
        err.contains("denied") || err.contains("Access"),
        "refusal should be an access error: {err}"
    );
    // A member's failed request (its private text in GenerationFailed).
    let secret = "my private task: match my diary entries with the names of my friends";
    let failed = busctl(
        &address,
        CLIENT,
        "Generate",
        &["sa{sv}", secret, "1", "top_k", "i", "-3"],
    );
    assert!(!failed.status.success());
    // Signals reach the caller and nobody else: root's own connection hears AdapterReady for its
    // call, another connection of the same user hears nothing.
    signals_reach_only_the_caller(&address, desc);
    std::thread::sleep(Duration::from_millis(300));
    let _ = outsider_ears.0.kill();
    let _ = outsider_ears.0.wait();
    let mut heard = String::new();
    std::io::Read::read_to_string(outsider_ears.0.stdout.as_mut().unwrap(), &mut heard).unwrap();
    assert!(
        heard.contains(NAME),
        "the outsider's monitor did not run: {heard:?}"
    );
    for private in ["AdapterReady", "GenerationFailed", desc, secret] {
        assert!(
            !heard.contains(private),
            "an outsider received {private:?}: {heard}"
        );
    }
    // Adapter files are not world-accessible.
    let adapters = cache.join("adapters");
    for e in std::fs::read_dir(&adapters).unwrap() {
        let m = std::fs::metadata(e.unwrap().path()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o002,
            0,
            "world-writable adapter dir"
        );
    }
}

/// Root calls `Generate` on one connection while a second connection of root listens for the
/// service's signals: the caller gets `AdapterReady`, the other connection nothing.
fn signals_reach_only_the_caller(address: &str, desc: &str) {
    use futures_util::StreamExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connect = || async {
            zbus::connection::Builder::address(address)
                .build()
                .await
                .unwrap()
        };
        let (caller, other) = (connect().await, connect().await);
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(NAME)
            .build()
            .unwrap();
        let mut mine = zbus::MessageStream::for_match_rule(rule.clone(), &caller, None)
            .await
            .unwrap();
        let mut theirs = zbus::MessageStream::for_match_rule(rule, &other, None)
            .await
            .unwrap();
        let opts: std::collections::HashMap<&str, zbus::Variant> =
            [("allow_ood", true.into()), ("seed", 7u64.into())].into();
        caller
            .call_method(Some(NAME), PATH, Some(NAME), "Generate", &(desc, opts))
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), mine.next())
            .await
            .expect("the caller receives its AdapterReady")
            .unwrap()
            .unwrap();
        assert_eq!(
            m.header().member().map(|m| m.to_string()).as_deref(),
            Some("AdapterReady")
        );
        // The counters' PropertiesChanged is for every member (it names no caller and no
        // request); anything else is private to the caller.
        let end = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end, theirs.next()).await {
            assert_eq!(
                m.header().interface().map(|i| i.to_string()).as_deref(),
                Some("org.freedesktop.DBus.Properties"),
                "another connection received {m:?}"
            );
        }
    });
}

/// `busctl call` of `interface`.`method` as `user`.
fn call_as(
    address: &str,
    user: &str,
    interface: &str,
    method: &str,
    args: &[&str],
) -> std::process::Output {
    let mut c = cmd_as(user, "busctl");
    c.arg(format!("--address={address}"))
        .args(["call", NAME, PATH, interface, method])
        .args(args);
    c.output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `Generate` as `user`: (adapter id, cache hit), or the error text.
fn generate_as(
    address: &str,
    user: &str,
    desc: &str,
    seed: &str,
) -> Result<(String, bool), String> {
    let o = call_as(
        address,
        user,
        NAME,
        "Generate",
        &["sa{sv}", desc, "1", "seed", "t", seed],
    );
    let out = text(&o);
    if !o.status.success() {
        return Err(out);
    }
    // ssbs "DIR" "ID" true|false "{...}"
    let mut quoted = out.split('"').skip(1).step_by(2);
    let _dir = quoted.next();
    let id = quoted.next().unwrap_or_default().to_string();
    Ok((id, out.contains("\" true \"")))
}

/// Run by [`open_adapter_as`] in a child process under another uid; a no-op as a test of its
/// own. Calls `OpenAdapter`, reads every descriptor it gets, tries to write through one, and
/// prints what happened.
#[test]
fn helper_open_adapter() {
    let (Ok(address), Ok(id)) = (
        std::env::var("SGLORA_HELPER_ADDRESS"),
        std::env::var("SGLORA_HELPER_ID"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = zbus::connection::Builder::address(address.as_str())
            .build()
            .await
            .unwrap();
        match c
            .call_method(Some(NAME), PATH, Some(NAME), "OpenAdapter", &(id.as_str(),))
            .await
        {
            Err(e) => println!("HELPER ERROR {e}"),
            Ok(m) => {
                let mut fds: std::collections::HashMap<String, zbus::OwnedFd> =
                    m.body().deserialize().unwrap();
                let mut names: Vec<_> = fds.keys().cloned().collect();
                names.sort();
                for name in names {
                    let fd: std::os::fd::OwnedFd = fds.remove(&name).unwrap().into();
                    let mut f = std::fs::File::from(fd);
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
                    let wrote = std::io::Write::write_all(&mut f, b"x").is_ok();
                    println!("HELPER FILE {name} {} {wrote}", sglora::sha256_hex(&bytes));
                }
            }
        }
    });
}

/// `OpenAdapter(id)` as `user` in a child process: its `HELPER` lines.
fn open_adapter_as(address: &str, user: &str, id: &str) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let mut c = cmd_as(user, exe.to_str().unwrap());
    c.args([
        "--exact",
        "helper_open_adapter",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("SGLORA_HELPER_ADDRESS", address)
    .env("SGLORA_HELPER_ID", id);
    let o = c.output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        // libtest prints "test helper_open_adapter ... " on the line the first output ends.
        .filter_map(|l| l.find("HELPER ").map(|i| l[i..].to_string()))
        .collect()
}

/// Two members of group `sglora` and the service on a system-like bus with the shipped policy:
/// neither member reads, confirms, evicts or starves the other's work, only root and the service
/// user administer, and oversized calls cost no memory beyond their message (issue #19).
#[test]
fn members_cannot_read_or_disturb_each_other() {
    if !root_with_users() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_bus, address) = system_bus(dir.path());
    // Small stage: 1 running + 7 waiting, 2 places per caller.
    let (daemon, state, cache) = service(
        dir.path(),
        &address,
        "[service]\nmax_concurrent = 1\nmax_queue = 7\nmax_queue_per_caller = 2\n[dropbox]\nsettle_ms = 100\n",
        true,
    );
    let (uid_a, _) = ids(CLIENT).unwrap();

    // A's adapter is A's: B asking the same gets its own (no hit that would confirm what A
    // asked), and cannot get, open or evict A's by id.
    let (id_a, hit) = generate_as(&address, CLIENT, ANIMAL, "1").unwrap();
    assert!(!hit);
    let (id_a2, hit) = generate_as(&address, CLIENT, ANIMAL, "1").unwrap();
    assert!(hit && id_a2 == id_a, "A's repeat is a cache hit");
    let (id_b, hit) = generate_as(&address, CLIENT2, ANIMAL, "1").unwrap();
    assert!(
        !hit,
        "B was served A's cached adapter: a hit tells B what A asked"
    );
    assert_ne!(id_b, id_a);
    for method in ["GetAdapter", "OpenAdapter"] {
        let o = call_as(&address, CLIENT2, NAME, method, &["s", &id_a]);
        assert!(
            !o.status.success() && text(&o).contains("no cached adapter"),
            "B's {method} of A's adapter: {}",
            text(&o)
        );
    }
    let o = call_as(&address, CLIENT2, NAME, "Evict", &["s", &id_a]);
    assert_eq!(text(&o).trim(), "b false", "B evicted A's adapter");
    let o = call_as(&address, CLIENT, NAME, "GetAdapter", &["s", &id_a]);
    assert!(o.status.success(), "A lost its adapter: {}", text(&o));

    // A gets its files as read-only descriptors; the cache itself is closed to members.
    let lines = open_adapter_as(&address, CLIENT, &id_a);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "provenance.json",
    ] {
        let want = sglora::sha256_hex(
            &std::fs::read(cache.join("adapters").join(&id_a).join(name)).unwrap(),
        );
        assert!(
            lines.contains(&format!("HELPER FILE {name} {want} false")),
            "{name}: {lines:?}"
        );
    }
    let lines = open_adapter_as(&address, CLIENT2, &id_a);
    assert!(
        lines.len() == 1 && lines[0].contains("NotFound"),
        "{lines:?}"
    );
    for p in [
        state.join("cache.db"),
        cache.join("adapters").join(&id_a).join("provenance.json"),
    ] {
        let o = cmd_as(CLIENT2, "cat").arg(&p).output().unwrap();
        assert!(!o.status.success(), "a member read {}", p.display());
    }

    // Administration is for root and the service user: the policy refuses members, and the
    // service refuses them again.
    for (method, args) in [
        ("Evict", vec!["s", id_a.as_str()]),
        ("ReloadExperts", vec![]),
        ("ListAdapters", vec![]),
        ("RemoveExpert", vec!["s", "added/anything"]),
    ] {
        let o = call_as(&address, CLIENT2, ADMIN, method, &args);
        assert!(
            !o.status.success() && (text(&o).contains("denied") || text(&o).contains("Access")),
            "a member called {ADMIN}.{method}: {}",
            text(&o)
        );
    }
    let o = call_as(&address, CLIENT2, NAME, "ReloadExperts", &[]);
    assert!(!o.status.success(), "ReloadExperts is still on {NAME}");
    let o = call_as(&address, "root", ADMIN, "ListAdapters", &[]);
    let listed = text(&o);
    assert!(
        o.status.success() && listed.contains(&format!("\"{id_a}\" {uid_a} ")),
        "root's ListAdapters: {listed}"
    );
    assert!(
        !listed.contains("animal"),
        "ListAdapters shows descriptions: {listed}"
    );

    // Fairness: A floods (24 concurrent distinct misses), B's requests meanwhile are served.
    let flood: Vec<_> = (0..24)
        .map(|i| {
            let mut c = cmd_as(CLIENT, "busctl");
            c.arg(format!("--address={address}"))
                .args([
                    "call", NAME, PATH, NAME, "Generate", "sa{sv}", ANIMAL, "1", "seed", "t",
                ])
                .arg(format!("{}", 100 + i))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let mut b_busy = 0;
    for seed in 0..4 {
        if let Err(e) = generate_as(&address, CLIENT2, ANIMAL, &format!("{}", 500 + seed)) {
            assert!(e.contains("queued or running"), "{e}");
            b_busy += 1;
        }
    }
    let (mut a_ok, mut a_busy) = (0, 0);
    for c in flood {
        let o = c.wait_with_output().unwrap();
        if o.status.success() {
            a_ok += 1;
        } else {
            assert!(text(&o).contains("queued or running"), "{}", text(&o));
            a_busy += 1;
        }
    }
    println!("flood: A {a_ok} served, {a_busy} busy; B busy {b_busy} of 4");
    assert!(
        a_busy > 0,
        "the flood never reached A's limit, so it proves nothing"
    );
    assert_eq!(b_busy, 0, "A's flood made B busy");

    // Memory: options with 500,000 keys (three at once) and a flood of reloads stay far below
    // the unit's MemoryHigh (200 MB).
    let pid = daemon.0.id() as i32;
    let before = common::bus::proc_status_kb(pid, "VmHWM");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = zbus::connection::Builder::address(address.as_str())
            .build()
            .await
            .unwrap();
        let big: std::collections::HashMap<String, zbus::Variant> = (0..500_000)
            .map(|i| (format!("k{i}"), zbus::Variant::from(i as u32)))
            .collect();
        let big = std::sync::Arc::new(big);
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let (c, big) = (c.clone(), big.clone());
                tokio::spawn(async move {
                    c.call_method(Some(NAME), PATH, Some(NAME), "Generate", &(ANIMAL, &*big))
                        .await
                        .map(|_| ())
                })
            })
            .collect();
        for h in calls {
            let e = h.await.unwrap().expect_err("500,000 options are refused");
            assert!(e.to_string().contains("more than 32 options"), "{e}");
        }
        // One option whose value is a 20 MB array (decoded, it would be a vector of 20 million
        // values), three at once.
        let blob = std::sync::Arc::new(vec![7u8; 20_000_000]);
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let (c, blob) = (c.clone(), blob.clone());
                tokio::spawn(async move {
                    let opts: std::collections::HashMap<&str, zbus::Variant> =
                        [("seed", zbus::Variant::from(&blob[..]))].into();
                    c.call_method(Some(NAME), PATH, Some(NAME), "Generate", &(ANIMAL, opts))
                        .await
                        .map(|_| ())
                })
            })
            .collect();
        for h in calls {
            let e = h
                .await
                .unwrap()
                .expect_err("an array-valued option is refused");
            assert!(e.to_string().contains("must be a number"), "{e}");
        }
        let reloads: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.call_method(Some(NAME), PATH, Some(ADMIN), "ReloadExperts", &())
                        .await
                        .map(|_| ())
                })
            })
            .collect();
        for h in reloads {
            h.await.unwrap().expect("root may reload");
        }
    });
    let after = common::bus::proc_status_kb(pid, "VmHWM");
    println!(
        "daemon peak RSS: {before} kB before, {after} kB after 3 x 500k-key options, 3 x 20 MB array options and 20 reloads"
    );
    assert!(
        after < 200 * 1024,
        "peak RSS {after} kB is past MemoryHigh=200M"
    );

    // Drop folder: a request is made for its file's owner; a file of a non-member's is refused.
    let inbox = state.join("dropbox/inbox");
    let o = cmd_as(CLIENT, "sh")
        .arg("-c")
        .arg(format!(
            "umask 022; printf '%s' '{ANIMAL}' > {}/mine.txt",
            inbox.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        wait_for(&state.join("dropbox/outbox/mine/provenance.json"), 30),
        "{}",
        std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default()
    );
    // The output and the kept request are A's to read and nobody else's among the members; the
    // inbox cannot be listed by members.
    for (user, can) in [(CLIENT, true), (CLIENT2, false)] {
        for p in [
            state.join("dropbox/outbox/mine/provenance.json"),
            state.join("dropbox/done/mine.txt"),
        ] {
            let o = cmd_as(user, "cat").arg(&p).output().unwrap();
            assert_eq!(
                o.status.success(),
                can,
                "{user} reading {}: {}",
                p.display(),
                text(&o)
            );
        }
    }
    let o = cmd_as(CLIENT2, "ls").arg(&inbox).output().unwrap();
    assert!(
        !o.status.success(),
        "a member listed the inbox: {}",
        text(&o)
    );
    let (uid_out, gid_out) = ids(OUTSIDER).unwrap();
    let theirs = inbox.join(".theirs.txt");
    std::fs::write(&theirs, ANIMAL).unwrap();
    std::os::unix::fs::chown(&theirs, Some(uid_out), Some(gid_out)).unwrap();
    std::fs::rename(&theirs, inbox.join("theirs.txt")).unwrap();
    assert!(wait_for(&state.join("dropbox/failed/theirs.error.txt"), 30));
    let why = std::fs::read_to_string(state.join("dropbox/failed/theirs.error.txt")).unwrap();
    assert!(why.contains("not a member"), "{why}");
    let o = call_as(&address, "root", ADMIN, "ListAdapters", &[]);
    let owners = text(&o);
    assert!(
        owners.matches(&format!(" {uid_a} ")).count() >= 2,
        "the drop-folder adapter is not A's: {owners}"
    );
}
