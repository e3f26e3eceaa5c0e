//! The harness shared by sglora's integration tests (`tests/`) and benchmarks (`benches/`): where
//! the bundle and fixtures under test are, the `sglora` binary under test ([`cli`]), a private
//! `dbus-daemon` with the daemon under test on it ([`bus`]), and the concurrent load generator of
//! the soak test and the benchmarks ([`load`]). A dev-dependency only; nothing ships it.
#![deny(missing_docs)]

pub mod bus;
pub mod cli;
pub mod load;

use std::path::{Path, PathBuf};

/// Repository root (the workspace root, two levels above this crate).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/sglora-testkit sits two levels below the repository root")
        .to_path_buf()
}

/// The `sglora` binary under test: `$SGLORA_BIN` if set, else the one Cargo built next to the
/// running test or benchmark (`target/<profile>/deps/<test>` → `target/<profile>/sglora`; Cargo
/// builds a package's binaries before its integration tests and benchmarks).
pub fn sglora_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SGLORA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the running test");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir.join("sglora");
    assert!(
        bin.exists(),
        "{} does not exist: run the tests with cargo, which builds it",
        bin.display()
    );
    bin
}

/// The bundle under test: `$SGLORA_TEST_BUNDLE` (relative to the repository root unless
/// absolute) or the committed default bundle.
pub fn bundle_dir() -> PathBuf {
    root().join(
        std::env::var_os("SGLORA_TEST_BUNDLE")
            .map(PathBuf::from)
            .unwrap_or_else(|| "models/default".into()),
    )
}

/// The golden fixtures matching [`bundle_dir`].
pub fn fixtures_dir() -> PathBuf {
    root().join(
        std::env::var_os("SGLORA_TEST_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| "tests/fixtures".into()),
    )
}

/// Read an F32 tensor from a safetensors file's bytes.
pub fn tensor(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("fixture safetensors");
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    sglora::f32s_from_le(t.data()).collect()
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max)
}

/// Wait up to `secs` seconds for `p` to exist.
pub fn wait_for(p: &std::path::Path, secs: u64) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(secs) {
        if p.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// Drop a request into `inbox` as integrators are told to: written under a hidden `.part` name,
/// given `mode`, then renamed to `name`.
pub fn drop_request(inbox: &std::path::Path, name: &str, bytes: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = inbox.join(format!(".{name}.part"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, inbox.join(name)).unwrap();
}
