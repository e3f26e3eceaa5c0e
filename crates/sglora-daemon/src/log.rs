//! Minimal journald-friendly logging to stderr: one line per event with a `<N>` syslog priority
//! prefix (systemd parses it; `SyslogLevelPrefix=` is on by default).

/// Informational message.
pub fn info(msg: &str) {
    eprintln!("<6>sglorad: {msg}");
}

/// Something went wrong with one request or file; the service goes on.
pub fn warn(msg: &str) {
    eprintln!("<4>sglorad: {msg}");
}

/// The service cannot go on.
pub fn error(msg: &str) {
    eprintln!("<3>sglorad: {msg}");
}
