//! Experts added on the device: adapters trained elsewhere joined to the bundle's repository
//! without retraining anything, kept in one file beside the daemon's state
//! ([`OVERLAY_FILE`]), never in the read-only bundle.
//!
//! The file holds what was added, not what retrieval derives from it: per expert its name,
//! descriptions, relation and origin, and the adapter's own low-rank factors on the bundle's
//! LoRA modules. Each load projects the factors onto the bundle's shared frozen A and embeds
//! the descriptions with the bundle's encoder ([`crate::Generator::with_overlay`]), so an
//! overlay stays valid when a new bundle is installed: an expert whose projection onto that
//! bundle's A is too poor is left out and reported, not applied wrongly.
//!
//! **Projection.** The bundle's adapters are `ΔW = s_b·B·A` with A fixed (`lora.a_mode =
//! "shared-frozen"`), so only B is an expert's parameter. An adapter `s·B_u·A_u` of any rank is
//! replaced by the least-squares B: `B = (s/s_b)·B_u·A_u·Aᵀ(A·Aᵀ)⁻¹` per module, which minimises
//! `‖s_b·B·A − s·B_u·A_u‖_F`. Its relative error `‖residual‖_F / ‖ΔW_u‖_F` over all modules is
//! reported, and above [`MAX_PROJECTION_ERROR`] (or the caller's limit) the expert is refused:
//! an adapter trained with the bundle's A (our pipeline's experts and oracles) projects exactly,
//! one with its own random A keeps only the part of each `ΔW` in A's row space — for rank 8 in
//! 384 dimensions, about 2 % of it.
//!
//! **Variance.** An added expert has no training snapshots, so its `σ²` (the spread the prior
//! mixes in) is the per-parameter mean of the bundle's experts' `σ²`: a typical expert's spread.
//!
//! **Keys.** Each description is embedded and projected as a request is
//! ([`crate::Keys::project`]); the `m` key slots of the expert are filled with them in turn, so
//! with `retrieval.top` = 1 (the default bundle) a request's score for the expert is its best
//! similarity to one of the descriptions.
//!
//! Writes take an exclusive lock (`flock` on [`LOCK_FILE`] beside it), read the file again, and
//! replace it atomically (temporary file, fsync, rename, directory fsync): the CLI and the
//! daemon can both change it, and a crash leaves the old or the new file.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::bundle::{sha256_hex, LayoutEntry};
use crate::error::{Error, Result};
use crate::lora::{parse_module, Lora, Target};

/// The overlay's file name in the state directory.
pub const OVERLAY_FILE: &str = "experts-overlay.safetensors";
/// The lock file beside it.
pub const LOCK_FILE: &str = "experts-overlay.lock";
/// The default upper limit on an added adapter's relative projection error.
pub const MAX_PROJECTION_ERROR: f64 = 0.10;
/// Most descriptions per added expert.
pub const MAX_DESCRIPTIONS: usize = 64;
/// Longest expert name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Largest overlay file read.
const MAX_OVERLAY_BYTES: u64 = 1 << 30;
const FORMAT: &str = "sglora-experts-overlay";
const VERSION: &str = "1";

/// What is recorded of one added expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddedMeta {
    /// Unique name in the repository.
    pub name: String,
    /// Its descriptions (the first is the one listed); each becomes a retrieval key.
    pub descriptions: Vec<String>,
    /// Relation family, for the expected-gain model's relation agreement (may be empty).
    #[serde(default)]
    pub relation: String,
    /// Domain (informational, may be empty).
    #[serde(default)]
    pub domain: String,
    /// Where the adapter came from (the directory given, as given).
    pub source: String,
    /// Hex SHA-256 of the adapter's `adapter_model.safetensors`.
    pub weights_sha256: String,
    /// The adapter's rank.
    pub rank: usize,
    /// Seconds since the Unix epoch when it was added.
    pub added_unix: u64,
    /// The projection error it was accepted with as a limit; a bundle whose shared A loses
    /// more of it leaves the expert out.
    pub max_projection_error: f64,
}

/// One added expert as stored: its record and, per module of the bundle's layout (in layout
/// order), the adapter's factors `(Aᵀ [in, r], s·Bᵀ [r, out])`.
#[derive(Debug, Clone)]
pub(crate) struct AddedExpert {
    pub meta: AddedMeta,
    pub factors: Vec<(Vec<f32>, Vec<f32>)>,
}

/// The overlay file's contents.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    pub(crate) experts: Vec<AddedExpert>,
    /// Hex SHA-256 of the file, `None` when there is no file.
    sha256: Option<String>,
}

fn damaged(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Overlay {
        path: path.to_path_buf(),
        what: format!(
            "{what}; remove or restore the file (it holds only experts added with `sglora \
             experts add`)"
        ),
    }
}

impl Overlay {
    /// Read an overlay file; a missing file is an empty overlay.
    pub fn read(path: &Path) -> Result<Overlay> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overlay::default()),
            Err(e) => return Err(Error::io("reading", path, e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_OVERLAY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("reading", path, e))?;
        if bytes.len() as u64 > MAX_OVERLAY_BYTES {
            return Err(damaged(
                path,
                format!("is larger than {MAX_OVERLAY_BYTES} bytes"),
            ));
        }
        Overlay::from_bytes(path, &bytes)
    }

    fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Overlay> {
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| damaged(path, format!("is not a valid safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(damaged(path, "is not an sglora experts overlay"));
        }
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(damaged(
                path,
                format!(
                    "has overlay format version {:?}; this sglora reads version {VERSION}",
                    meta.get("version")
                ),
            ));
        }
        let metas: Vec<AddedMeta> = serde_json::from_str(
            meta.get("experts")
                .ok_or_else(|| damaged(path, "lists no experts"))?,
        )
        .map_err(|e| damaged(path, format!("has an invalid expert list ({e})")))?;
        let modules: usize = meta
            .get("modules")
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| damaged(path, "does not say how many modules each expert has"))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| damaged(path, format!("is not a valid safetensors file ({e})")))?;
        let tensor = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let t = st
                .tensor(name)
                .map_err(|_| damaged(path, format!("has no tensor {name}")))?;
            if t.dtype() != Dtype::F32 {
                return Err(damaged(path, format!("tensor {name} is not F32")));
            }
            let v: Vec<f32> = crate::le::f32s_from_le(t.data()).collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(damaged(path, format!("tensor {name} is not finite")));
            }
            Ok((t.shape().to_vec(), v))
        };
        let mut experts = Vec::with_capacity(metas.len());
        for (i, meta) in metas.into_iter().enumerate() {
            let mut factors = Vec::with_capacity(modules);
            for j in 0..modules {
                let (ds, down) = tensor(&format!("e{i}.m{j}.down"))?;
                let (us, up) = tensor(&format!("e{i}.m{j}.up"))?;
                if ds.len() != 2 || us.len() != 2 || ds[1] != meta.rank || us[0] != meta.rank {
                    return Err(damaged(
                        path,
                        format!("expert {i}'s module {j} has shapes {ds:?} and {us:?}"),
                    ));
                }
                factors.push((down, up));
            }
            experts.push(AddedExpert { meta, factors });
        }
        let mut names: Vec<&str> = experts.iter().map(|e| e.meta.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(damaged(path, "lists an expert name twice"));
        }
        Ok(Overlay {
            experts,
            sha256: Some(sha256_hex(bytes)),
        })
    }

    /// The added experts' records, in the order they were added.
    pub fn experts(&self) -> impl Iterator<Item = &AddedMeta> {
        self.experts.iter().map(|e| &e.meta)
    }

    /// Number of added experts.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// Hex SHA-256 of the file it was read from (`None`: there was no file).
    pub fn sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let modules = self.experts.first().map_or(0, |e| e.factors.len());
        let metas: Vec<&AddedMeta> = self.experts().collect();
        let mut info = HashMap::new();
        info.insert("format".to_string(), FORMAT.to_string());
        info.insert("version".to_string(), VERSION.to_string());
        info.insert("modules".to_string(), modules.to_string());
        info.insert(
            "experts".to_string(),
            serde_json::to_string(&metas).map_err(|e| Error::model("overlay", e))?,
        );
        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, e) in self.experts.iter().enumerate() {
            let r = e.meta.rank;
            for (j, (down, up)) in e.factors.iter().enumerate() {
                let (k, n) = (down.len() / r.max(1), up.len() / r.max(1));
                buffers.push((
                    format!("e{i}.m{j}.down"),
                    vec![k, r],
                    crate::le::f32s_to_le(down),
                ));
                buffers.push((
                    format!("e{i}.m{j}.up"),
                    vec![r, n],
                    crate::le::f32s_to_le(up),
                ));
            }
        }
        let views = buffers
            .iter()
            .map(|(name, shape, b)| {
                TensorView::new(Dtype::F32, shape.clone(), b)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::model("overlay", e))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, Some(info)).map_err(|e| Error::model("overlay", e))
    }

    /// Replace the file at `path` atomically with this overlay (or remove it when empty, so an
    /// overlay emptied again is the bundle's repository, version included).
    fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(Path::new("."));
        if self.is_empty() {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("removing", path, e)),
            }
        } else {
            let bytes = self.to_bytes()?;
            let tmp = dir.join(format!(".{OVERLAY_FILE}.tmp-{}", std::process::id()));
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| {
                    give_to_dir_owner(&f, &tmp).map_err(std::io::Error::other)?;
                    f.write_all(&bytes)?;
                    f.sync_all()
                });
            if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io("writing", path, e));
            }
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("syncing", dir, e))
    }
}

/// When root writes into the state directory (`sudo sglora experts add` on an installed
/// system), the file it creates is given to the directory's owner (the service user), so the
/// daemon can still read the overlay and take the lock; mode 0600 stays.
fn give_to_dir_owner(file: &std::fs::File, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let owner = std::fs::metadata(dir).map_err(|e| Error::io("reading", dir, e))?;
    std::os::unix::fs::fchown(file, Some(owner.uid()), Some(owner.gid()))
        .map_err(|e| Error::io("giving to the state directory's owner", path, e))
}

/// An exclusive lock on the overlay of `path` (its [`LOCK_FILE`]), held until dropped.
pub(crate) struct Locked {
    _file: std::fs::File,
    pub path: PathBuf,
}

pub(crate) fn lock(path: &Path) -> Result<Locked> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let lock_path = dir.unwrap_or(Path::new(".")).join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock_path)
        .map_err(|e| Error::io("opening the lock", &lock_path, e))?;
    give_to_dir_owner(&file, &lock_path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io(
            "locking",
            &lock_path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(Locked {
        _file: file,
        path: path.to_path_buf(),
    })
}

impl Locked {
    pub fn read(&self) -> Result<Overlay> {
        Overlay::read(&self.path)
    }

    pub fn write(&self, overlay: &Overlay) -> Result<()> {
        overlay.write(&self.path)
    }
}

/// A LoRA projected onto the bundle's shared A: the flat B vector (the expert's `μ`) and how
/// much of the adapter's `ΔW` it keeps.
#[derive(Debug, Clone)]
pub struct Projection {
    /// Flat parameter vector in the bundle's layout.
    pub flat: Vec<f32>,
    /// `‖residual‖_F / ‖ΔW‖_F` over every module.
    pub relative_error: f64,
    /// The module whose own relative error is largest, and that error.
    pub worst_module: (String, f64),
}

/// The adapter's factors on the bundle's modules, in layout order: `(Aᵀ, s·Bᵀ)` each. The
/// adapter must adapt exactly the layout's modules.
pub(crate) fn factors_on(lora: &Lora, layout: &[LayoutEntry]) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let refuse = |what: String| Error::Adapter {
        path: lora.dir().to_path_buf(),
        what,
    };
    let mut wanted: Vec<(usize, Target)> = Vec::with_capacity(layout.len());
    for l in layout {
        wanted.push(parse_module(&l.module).ok_or_else(|| {
            Error::model(
                "overlay",
                format!("the bundle's LoRA module {} is not a BERT map", l.module),
            )
        })?);
    }
    let extra: Vec<String> = lora
        .deltas()
        .filter(|(l, t, _)| !wanted.contains(&(*l, *t)))
        .map(|(l, t, _)| format!("layer {l} {}", t.path()))
        .collect();
    if !extra.is_empty() {
        return Err(refuse(format!(
            "adapts modules the bundle's experts do not ({}); an expert must adapt exactly the \
             bundle's target modules ({})",
            extra.join(", "),
            layout
                .first()
                .map(|_| "see `lora.target_modules` in the bundle's manifest")
                .unwrap_or("none")
        )));
    }
    wanted
        .iter()
        .zip(layout)
        .map(|(&(layer, target), l)| {
            let d = lora.delta(layer, target).ok_or_else(|| {
                refuse(format!(
                    "does not adapt {}, one of the bundle's target modules; an expert must \
                     adapt exactly the bundle's target modules",
                    l.module
                ))
            })?;
            let ((_, _, at), (_, _, sbt)) = d.factors();
            Ok((at, sbt))
        })
        .collect()
}

/// Cholesky factor of a symmetric positive definite `n × n` matrix (row-major), or `None`.
fn cholesky(g: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = g[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Solve `L Lᵀ x = b` in place.
fn cholesky_solve(l: &[f64], n: usize, b: &mut [f64]) {
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i * n + k] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= l[k * n + i] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
}

/// Project factors onto the shared A (`lora_a`: `[modules, r_b, in]`) of a layout whose
/// adapters are scaled by `s_b`; every sum in f64, in index order.
pub(crate) fn project(
    layout: &[LayoutEntry],
    lora_a: &[f32],
    s_b: f64,
    flat_dim: usize,
    factors: &[(Vec<f32>, Vec<f32>)],
) -> Result<Projection> {
    if factors.len() != layout.len() {
        return Err(Error::model(
            "overlay",
            format!(
                "{} modules given for a layout of {}",
                factors.len(),
                layout.len()
            ),
        ));
    }
    let mut flat = vec![0f32; flat_dim];
    let (mut total, mut kept) = (0f64, 0f64);
    let mut worst = (String::new(), 0f64);
    let mut a_at = 0;
    for (l, (down, up)) in layout.iter().zip(factors) {
        let (rb, k) = (l.lora_a_shape[0], l.lora_a_shape[1]);
        let n = l.lora_b_shape[0];
        let a = &lora_a[a_at..a_at + rb * k];
        a_at += rb * k;
        let ru = down.len() / k.max(1);
        if down.len() != k * ru || up.len() != ru * n || ru == 0 || l.len != n * rb {
            return Err(Error::model(
                "overlay",
                format!(
                    "module {}: factors of {} and {} values do not fit {k} → {n}",
                    l.module,
                    down.len(),
                    up.len()
                ),
            ));
        }
        // C = A · down  [rb, ru];  T = C · up  [rb, n];  G = A Aᵀ  [rb, rb].
        let mut c = vec![0f64; rb * ru];
        for i in 0..rb {
            for t in 0..k {
                let ait = f64::from(a[i * k + t]);
                for j in 0..ru {
                    c[i * ru + j] += ait * f64::from(down[t * ru + j]);
                }
            }
        }
        let mut tm = vec![0f64; rb * n];
        for i in 0..rb {
            for j in 0..ru {
                let cij = c[i * ru + j];
                for o in 0..n {
                    tm[i * n + o] += cij * f64::from(up[j * n + o]);
                }
            }
        }
        let mut g = vec![0f64; rb * rb];
        for i in 0..rb {
            for j in 0..rb {
                g[i * rb + j] = (0..k)
                    .map(|t| f64::from(a[i * k + t]) * f64::from(a[j * k + t]))
                    .sum();
            }
        }
        let chol = cholesky(&g, rb).ok_or_else(|| {
            Error::model(
                "overlay",
                format!("the bundle's shared A of {} is not of full rank", l.module),
            )
        })?;
        // P = G⁻¹ T, column by column (a column of P is one output's r_b coefficients).
        let mut p = vec![0f64; rb * n];
        let mut col = vec![0f64; rb];
        let mut module_kept = 0f64;
        for o in 0..n {
            for i in 0..rb {
                col[i] = tm[i * n + o];
            }
            cholesky_solve(&chol, rb, &mut col);
            for i in 0..rb {
                p[i * n + o] = col[i];
                module_kept += tm[i * n + o] * col[i];
            }
        }
        // ‖ΔW_u‖² = Σ (downᵀ down) ⊙ (up upᵀ).
        let mut u = vec![0f64; ru * ru];
        let mut v = vec![0f64; ru * ru];
        for i in 0..ru {
            for j in 0..ru {
                u[i * ru + j] = (0..k)
                    .map(|t| f64::from(down[t * ru + i]) * f64::from(down[t * ru + j]))
                    .sum();
                v[i * ru + j] = (0..n)
                    .map(|o| f64::from(up[i * n + o]) * f64::from(up[j * n + o]))
                    .sum();
            }
        }
        let module_total: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
        let module_err = if module_total > 0.0 {
            ((module_total - module_kept).max(0.0) / module_total).sqrt()
        } else {
            0.0
        };
        if module_err > worst.1 || worst.0.is_empty() {
            worst = (l.module.clone(), module_err);
        }
        total += module_total;
        kept += module_kept;
        // B = Pᵀ / s_b, [n, rb] row-major.
        for o in 0..n {
            for i in 0..rb {
                flat[l.offset + o * rb + i] = (p[i * n + o] / s_b) as f32;
            }
        }
    }
    if total.is_nan() || total <= 0.0 {
        return Err(Error::Expert(
            "the adapter changes nothing (every LoRA product is zero), so there is nothing to \
             add"
            .into(),
        ));
    }
    if flat.iter().any(|x| !x.is_finite()) {
        return Err(Error::model("overlay", "the projection is not finite"));
    }
    Ok(Projection {
        flat,
        relative_error: ((total - kept).max(0.0) / total).sqrt(),
        worst_module: worst,
    })
}

/// Check an expert name: not empty, at most [`MAX_NAME_BYTES`], no control characters, no
/// leading or trailing white space.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Expert(format!("expert name {name:?} {why}")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(&format!("is longer than {MAX_NAME_BYTES} bytes"));
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if name.trim() != name {
        return bad("starts or ends with white space");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(module: &str, r: usize, k: usize, n: usize, offset: usize) -> LayoutEntry {
        LayoutEntry {
            module: module.into(),
            lora_a: String::new(),
            lora_a_shape: vec![r, k],
            lora_b: String::new(),
            lora_b_shape: vec![n, r],
            offset,
            len: n * r,
        }
    }

    /// A deterministic pseudo-random matrix.
    fn mat(len: usize, seed: u64) -> Vec<f32> {
        crate::rng::Rng::new(seed)
            .normals(len)
            .into_iter()
            .map(|x| x as f32)
            .collect()
    }

    #[test]
    fn an_adapter_on_the_shared_a_projects_exactly() {
        // One module 6 → 5, shared A of rank 2; an adapter with that A and B, scale 3, on a
        // layout of scale 2: the projection must give B·3/2 with no error.
        let (r, k, n) = (2, 6, 5);
        let layout = [entry("encoder.layer.0.attention.self.query", r, k, n, 0)];
        let a = mat(r * k, 1);
        let b = mat(n * r, 2);
        let at: Vec<f32> = (0..k * r).map(|x| a[(x % r) * k + x / r]).collect();
        let sbt: Vec<f32> = (0..r * n).map(|x| 3.0 * b[(x % n) * r + x / n]).collect();
        let p = project(&layout, &a, 2.0, n * r, &[(at, sbt)]).unwrap();
        assert!(p.relative_error < 1e-6, "{}", p.relative_error);
        for (got, want) in p.flat.iter().zip(&b) {
            assert!((got - want * 1.5).abs() < 1e-4, "{got} vs {}", want * 1.5);
        }
    }

    #[test]
    fn the_projection_error_is_the_share_outside_a() {
        // k = 4, A = the first two unit rows; an adapter whose ΔW has equal energy on the
        // first two and the last two input coordinates keeps half of it: error √½.
        let layout = [entry("encoder.layer.0.attention.self.value", 2, 4, 1, 0)];
        let a = vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        // rank 1: Aᵀ_u = [1, 1, 1, 1] (k × 1), s·Bᵀ_u = [1] (1 × n).
        let p = project(&layout, &a, 1.0, 2, &[(vec![1.0; 4], vec![1.0])]).unwrap();
        assert!((p.relative_error - 0.5f64.sqrt()).abs() < 1e-12, "{p:?}");
        assert_eq!(p.flat, vec![1.0, 1.0]);
        // An adapter entirely outside A's rows keeps nothing.
        let p = project(
            &layout,
            &a,
            1.0,
            2,
            &[(vec![0.0, 0.0, 1.0, 0.0], vec![2.0])],
        )
        .unwrap();
        assert!((p.relative_error - 1.0).abs() < 1e-12, "{p:?}");
        // One that changes nothing is refused.
        let e = project(&layout, &a, 1.0, 2, &[(vec![0.0; 4], vec![1.0])]).unwrap_err();
        assert!(e.to_string().contains("changes nothing"), "{e}");
    }

    #[test]
    fn an_overlay_round_trips_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OVERLAY_FILE);
        assert!(Overlay::read(&path).unwrap().is_empty());
        let meta = AddedMeta {
            name: "mine".into(),
            descriptions: vec!["given a word, find its opposite".into()],
            relation: "antonym".into(),
            domain: String::new(),
            source: "/tmp/x".into(),
            weights_sha256: "00".into(),
            rank: 1,
            added_unix: 7,
            max_projection_error: 0.1,
        };
        let o = Overlay {
            experts: vec![AddedExpert {
                meta: meta.clone(),
                factors: vec![(vec![1.0, 2.0], vec![3.0])],
            }],
            sha256: None,
        };
        let l = lock(&path).unwrap();
        l.write(&o).unwrap();
        let back = l.read().unwrap();
        assert_eq!(back.experts().collect::<Vec<_>>(), vec![&meta]);
        assert_eq!(back.experts[0].factors, o.experts[0].factors);
        assert_eq!(
            back.sha256(),
            Some(sha256_hex(&std::fs::read(&path).unwrap()).as_str())
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        // Emptied, the file goes.
        l.write(&Overlay::default()).unwrap();
        assert!(!path.exists());
        // Damage is named, with what to do.
        std::fs::write(&path, b"not safetensors").unwrap();
        let e = Overlay::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("not a valid safetensors") && e.contains("remove or restore"),
            "{e}"
        );
    }

    #[test]
    fn files_root_writes_belong_to_the_state_directorys_owner() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: needs root (CI runs as root)");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(4242), Some(4343)).unwrap();
        let path = dir.path().join(OVERLAY_FILE);
        let o = Overlay {
            experts: vec![AddedExpert {
                meta: AddedMeta {
                    name: "x".into(),
                    descriptions: vec!["d".into()],
                    relation: String::new(),
                    domain: String::new(),
                    source: String::new(),
                    weights_sha256: String::new(),
                    rank: 1,
                    added_unix: 0,
                    max_projection_error: 0.1,
                },
                factors: vec![(vec![1.0], vec![1.0])],
            }],
            sha256: None,
        };
        lock(&path).unwrap().write(&o).unwrap();
        for f in [path.clone(), dir.path().join(LOCK_FILE)] {
            let m = std::fs::metadata(&f).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{}", f.display());
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("support/tickets").is_ok());
        for bad in ["", " x", "x\n", &"x".repeat(MAX_NAME_BYTES + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
