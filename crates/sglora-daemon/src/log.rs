//! Minimal journald-friendly logging to stderr: one line per event with a `<N>` syslog priority
//! prefix (systemd parses it; `SyslogLevelPrefix=` is on by default).
//!
//! Messages carry names and texts that callers chose (drop-folder file names, descriptions), so
//! every control character is escaped: a name with a newline cannot start a forged line (with
//! its own `<0>` priority), and escape sequences never reach a terminal.

/// Informational message.
pub fn info(msg: &str) {
    eprintln!("{}", line(6, msg));
}

/// Something went wrong with one request or file; the service goes on.
pub fn warn(msg: &str) {
    eprintln!("{}", line(4, msg));
}

/// One log line: the priority prefix, then `msg` with its control characters escaped.
fn line(priority: u8, msg: &str) -> String {
    let mut out = format!("<{priority}>sglorad: ");
    for c in msg.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_lines() {
        let l = line(6, "dropbox: x\n<0>sglorad: FORGED\r\u{1b}[2J done");
        assert_eq!(l.lines().count(), 1, "{l}");
        assert!(!l.chars().any(|c| c.is_control()), "{l:?}");
        assert_eq!(
            l,
            "<6>sglorad: dropbox: x\\n<0>sglorad: FORGED\\r\\u{1b}[2J done"
        );
        assert_eq!(line(4, "plain ünïcode"), "<4>sglorad: plain ünïcode");
    }
}
