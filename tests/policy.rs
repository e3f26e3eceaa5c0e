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
const OUTSIDER: &str = "sglora-test-outsider";

fn ids(user: &str) -> Option<(u32, u32)> {
    let u = nix::unistd::User::from_name(user).ok()??;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

fn ensure_users() {
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
    for (user, extra) in [(CLIENT, Some("sglora")), (OUTSIDER, None)] {
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

#[test]
fn shipped_policy_admits_root_and_group_and_refuses_others() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: this test needs root to create users and switch uids (CI runs as root)");
        return;
    }
    ensure_users();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let sock = dir.path().join("system_bus_socket");
    let address = format!("unix:path={}", sock.display());
    let policy = root().join("systemd/org.sglora.Generator1.conf");
    // Debian's system.conf default context, plus our policy file.
    let conf = format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{}</include>
</busconfig>"#,
        policy.display()
    );
    let conf_path = dir.path().join("system.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let _bus = Kill(
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
    let state = dir.path().join("state");
    let cache = dir.path().join("cache");
    for d in [&state, &cache] {
        std::fs::create_dir_all(d).unwrap();
        nix::unistd::chown(
            d.as_path(),
            Some(nix::unistd::Uid::from_raw(ids("sglora").unwrap().0)),
            None,
        )
        .unwrap();
    }
    let mut c = cmd_as("sglora", env!("CARGO_BIN_EXE_sglora"));
    c.arg("--bundle")
        .arg(bundle_dir())
        .args(["daemon", "--no-dropbox", "--bus-address", &address])
        .arg("--state-dir")
        .arg(&state)
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--config")
        .arg("/dev/null")
        .stderr(Stdio::piped());
    let mut daemon = Kill(c.spawn().unwrap());
    let daemon = &mut daemon.0;
    let t = Instant::now();
    loop {
        let o = busctl(&address, "root", "ListExperts", &[]);
        if o.status.success() {
            break;
        }
        if let Some(st) = daemon.try_wait().unwrap() {
            let mut e = String::new();
            std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut e).unwrap();
            panic!("daemon exited {st}: {e}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "daemon never answered root"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
        let leaked = tokio::time::timeout(Duration::from_secs(1), theirs.next()).await;
        assert!(leaked.is_err(), "another connection received {leaked:?}");
    });
}
