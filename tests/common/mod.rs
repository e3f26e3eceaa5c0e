//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod bus;
pub mod cli;
pub mod load;

use std::path::PathBuf;

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
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
