//! Running the `sglora` binary under test.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::bundle_dir;

/// Run the binary under test on the bundle under test.
pub fn sglora(args: &[&str]) -> Output {
    sglora_with(&bundle_dir(), args)
}

/// Run the binary under test on `bundle`.
pub fn sglora_with(bundle: &Path, args: &[&str]) -> Output {
    Command::new(crate::sglora_bin())
        .arg("--bundle")
        .arg(bundle)
        .args(args)
        .output()
        .expect("run sglora")
}

/// Run it with `input` on stdin (a child that exits early is fine).
pub fn sglora_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(crate::sglora_bin())
        .arg("--bundle")
        .arg(bundle_dir())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// Its stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
