//! PEFT adapter output: `adapter_model.safetensors` + `adapter_config.json` + `provenance.json`,
//! written atomically (temporary directory, fsync of every file and of the directory, then a
//! no-replace rename), so a reader never sees a half-written adapter.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use serde::Serialize;

use crate::bundle::{sha256_hex, Bundle, Manifest};
use crate::error::{Error, Result};
use crate::gain::ExpectedGain;
use crate::options::ResolvedOptions;
use crate::stages::{AskedRelation, ExpertChoice, Generation, InScope, Timings};

/// Name of the weights file inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Name of the PEFT config file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Name of the provenance file.
pub const PROVENANCE_FILE: &str = "provenance.json";

fn convert(values: &[f32], dtype: &str) -> (Dtype, Vec<u8>) {
    match dtype {
        "F16" => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        "BF16" => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        _ => (Dtype::F32, crate::le::f32s_to_le(values)),
    }
}

/// Serialise the adapter weights: the shared A of each module and its slice of the flat B vector,
/// under PEFT's tensor names. Deterministic: the same inputs give the same bytes.
pub fn weights_bytes(manifest: &Manifest, flat_b: &[f32], lora_a: &[f32]) -> Result<Vec<u8>> {
    let lora = &manifest.lora;
    if flat_b.len() != lora.flat_dim {
        return Err(Error::InvalidOption(format!(
            "flat vector has {} values, expected {}",
            flat_b.len(),
            lora.flat_dim
        )));
    }
    let a_len: usize = lora.layout[0].lora_a_shape.iter().product();
    if lora_a.len() != a_len * lora.layout.len() {
        return Err(Error::InvalidOption(
            "shared A does not match the layout".into(),
        ));
    }
    let mut buffers: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for (i, m) in lora.layout.iter().enumerate() {
        let (dt, a) = convert(&lora_a[i * a_len..(i + 1) * a_len], &lora.dtype);
        buffers.push((m.lora_a.clone(), m.lora_a_shape.clone(), dt, a));
        let (dt, b) = convert(&flat_b[m.offset..m.offset + m.len], &lora.dtype);
        buffers.push((m.lora_b.clone(), m.lora_b_shape.clone(), dt, b));
    }
    let mut views = Vec::with_capacity(buffers.len());
    for (name, shape, dt, bytes) in &buffers {
        let v =
            TensorView::new(*dt, shape.clone(), bytes).map_err(|e| Error::model("adapter", e))?;
        views.push((name.clone(), v));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::model("adapter", e))
}

/// The `adapter_config.json` PEFT expects, from the bundle's reference config.
pub(crate) fn config_json(manifest: &Manifest) -> serde_json::Value {
    let mut cfg = manifest.lora.adapter_config.clone();
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert("peft_type".into(), "LORA".into());
        obj.insert("r".into(), manifest.lora.r.into());
        obj.insert("lora_alpha".into(), manifest.lora.lora_alpha.into());
        obj.insert(
            "target_modules".into(),
            manifest.lora.target_modules.clone().into(),
        );
        obj.insert(
            "base_model_name_or_path".into(),
            manifest.base_model.id.clone().into(),
        );
        obj.insert("inference_mode".into(), true.into());
    }
    cfg
}

/// Where an adapter came from: `provenance.json`, next to the weights. Fields are in
/// alphabetical order, as the file has always listed them.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance<'a> {
    /// The relation the bundle's relation head read in the description; absent for a bundle
    /// without a head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked_relation: Option<&'a AskedRelation>,
    /// The base model's id (`manifest.base_model.id`).
    pub base_model: &'a str,
    /// Best retrieval score of any expert.
    pub best_similarity: f64,
    /// The bundle that generated it.
    pub bundle: ProvenanceBundle<'a>,
    /// Seconds since the Unix epoch at serialisation.
    pub created_unix: u64,
    /// The description (trimmed).
    pub description: &'a str,
    /// Hex SHA-256 of the description.
    pub description_sha256: &'a str,
    /// Hex SHA-256 of the embedding's little-endian f32 bytes.
    pub embedding_sha256: String,
    /// The bundle's estimate of the adapter's R@1 gain, with its interval.
    pub expected_gain: &'a ExpectedGain,
    /// The experts mixed, most similar first.
    pub experts: &'a [ExpertChoice],
    /// Hex SHA-256 of the expert overlay (experts added on the device) the repository held;
    /// absent when nothing was added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts_overlay_sha256: Option<&'a str>,
    /// The scope classifier's score and threshold (`null` for a bundle without one).
    pub in_scope: Option<InScope>,
    /// Options after defaults.
    pub options: &'a ResolvedOptions,
    /// Whether it was generated out of distribution (`allow_ood`).
    pub out_of_distribution: bool,
    /// Seed of the latent noise (also in `options`; top level for readers that look only here).
    pub seed: u64,
    /// Version of the sglora library that wrote it.
    pub sglora_version: &'static str,
    /// Stage timings up to the decoder.
    pub timings_ms: &'a Timings,
    /// Tokens the encoder saw.
    pub tokens: usize,
    /// Whether the description was cut to the encoder's window.
    pub truncated: bool,
    /// Hex SHA-256 of `adapter_model.safetensors`.
    pub weights_sha256: &'a str,
    /// The latent code.
    pub z: &'a [f32],
}

/// The bundle part of [`Provenance`].
#[derive(Debug, Clone, Serialize)]
pub struct ProvenanceBundle<'a> {
    /// `manifest.bundle_id`.
    pub id: &'a str,
    /// `"full"` or `"tiny"`.
    pub mode: &'a str,
    /// Where the bundle was loaded from.
    pub path: &'a Path,
    /// The bundle's hash over every file.
    pub sha256: &'a str,
}

impl<'a> Provenance<'a> {
    /// The provenance of `g`, generated by `bundle`, whose weights file hashes to `weights_sha256`.
    /// `overlay` is the hash of the expert overlay the repository held, if any.
    pub fn new(
        bundle: &'a Bundle,
        g: &'a Generation,
        weights_sha256: &'a str,
        overlay: Option<&'a str>,
    ) -> Provenance<'a> {
        let m = &bundle.manifest;
        let ex = &g.explanation;
        let emb_bytes = crate::le::f32s_to_le(&g.embedding);
        Provenance {
            asked_relation: ex.asked_relation.as_ref(),
            base_model: &m.base_model.id,
            best_similarity: ex.best_similarity,
            bundle: ProvenanceBundle {
                id: &m.bundle_id,
                mode: &m.mode,
                path: &bundle.dir,
                sha256: &bundle.hash,
            },
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            description: g.description.text(),
            description_sha256: g.description.sha256(),
            embedding_sha256: sha256_hex(&emb_bytes),
            expected_gain: &ex.expected_gain,
            experts: &ex.experts,
            experts_overlay_sha256: overlay,
            in_scope: ex.in_scope,
            options: &ex.options,
            out_of_distribution: ex.out_of_distribution,
            seed: ex.options.seed,
            sglora_version: env!("CARGO_PKG_VERSION"),
            timings_ms: &ex.timings,
            tokens: ex.tokens,
            truncated: ex.truncated,
            weights_sha256,
            z: &g.z,
        }
    }
}

/// Files of one adapter, ready to be written.
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    /// `adapter_model.safetensors` bytes.
    pub weights: Vec<u8>,
    /// Hex SHA-256 of `weights`, computed once when they were serialised.
    pub weights_sha256: String,
    /// `adapter_config.json` bytes.
    pub config: Vec<u8>,
    /// `provenance.json` bytes.
    pub provenance: Vec<u8>,
}

impl AdapterFiles {
    /// Serialise a generation of `bundle`: weights (shared A + generated B), PEFT config,
    /// provenance (`overlay`: the hash of the expert overlay the repository held, if any).
    pub fn new(
        bundle: &Bundle,
        g: &Generation,
        lora_a: &[f32],
        overlay: Option<&str>,
    ) -> Result<AdapterFiles> {
        let m = &bundle.manifest;
        let weights = weights_bytes(m, &g.flat, lora_a)?;
        let weights_sha256 = sha256_hex(&weights);
        let config =
            serde_json::to_vec_pretty(&config_json(m)).map_err(|e| Error::model("adapter", e))?;
        let provenance =
            serde_json::to_vec_pretty(&Provenance::new(bundle, g, &weights_sha256, overlay))
                .map_err(|e| Error::model("adapter", e))?;
        Ok(AdapterFiles {
            weights,
            weights_sha256,
            config,
            provenance,
        })
    }

    /// Read an adapter directory's three files back, whose weights hash to `weights_sha256`
    /// (known to the caller: the cache records it and checks it on every hit, so it is not
    /// computed a second time here).
    pub fn read(dir: &Path, weights_sha256: &str) -> std::io::Result<AdapterFiles> {
        Ok(AdapterFiles {
            weights: fs::read(dir.join(WEIGHTS_FILE))?,
            weights_sha256: weights_sha256.to_string(),
            config: fs::read(dir.join(CONFIG_FILE))?,
            provenance: fs::read(dir.join(PROVENANCE_FILE))?,
        })
    }

    /// Total size in bytes.
    pub fn len(&self) -> usize {
        self.weights.len() + self.config.len() + self.provenance.len()
    }

    /// Whether all three files are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An output write that failed (disk full, read-only, …): an `Output` error naming the file.
fn write_failed(path: &Path, action: &str, e: std::io::Error) -> Error {
    Error::Output {
        path: path.into(),
        what: format!("{action} failed: {e}"),
    }
}

/// Create `path` with `mode` (before the umask) — never through a link, never over an existing
/// entry (`O_EXCL`) — write `bytes` and fsync them: the one durable file write of the adapter
/// writer and the daemon.
pub fn create_synced(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    create_written(path, bytes, mode)?.sync_all()
}

/// [`create_synced`] without the fsync: the open file, its bytes handed to the kernel.
fn create_written(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<File> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(f)
}

/// Create and write every file, then fsync each: the writes are all handed to the kernel and
/// their write-back started (`sync_file_range`, Linux) before the first fsync waits, so the
/// files' data goes to the disk together instead of one round trip after another. Each file is
/// still fsynced before this returns.
fn write_all_synced(files: &[(&Path, &[u8])], mode: u32) -> Result<()> {
    let mut open = Vec::with_capacity(files.len());
    for &(path, bytes) in files {
        let mut f =
            create_written(path, bytes, mode).map_err(|e| write_failed(path, "writing", e))?;
        start_writeback(&mut f);
        open.push((path, f));
    }
    for (path, f) in open {
        f.sync_all().map_err(|e| write_failed(path, "writing", e))?;
    }
    Ok(())
}

/// Ask the kernel to start writing `f`'s dirty pages now, without waiting (a hint: the fsync
/// that follows is what makes the data durable, so a failure here is ignored).
fn start_writeback(f: &mut File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only reads its arguments.
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| write_failed(path, "syncing the directory", e))
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// Write one file atomically and without replacing anything: `bytes` go to a temporary file
/// beside `dest` (mode 0644 before the umask), are fsynced, and the file is linked into place
/// (`link` fails if `dest` exists, so nothing is ever overwritten), then the directory is
/// fsynced. A reader sees no file or the whole file.
pub fn write_file_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    write_file_atomic_with(dest, |f| {
        f.write_all(bytes)
            .map_err(|e| write_failed(dest, "writing", e))
    })
}

/// The final component of `dest` and the directory it goes in (`.` for a bare name).
fn name_and_parent(dest: &Path) -> Result<(&std::ffi::OsStr, PathBuf)> {
    let name = dest.file_name().ok_or_else(|| Error::Output {
        path: dest.into(),
        what: "has no final path component".into(),
    })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((name, parent))
}

/// [`write_file_atomic`] with the contents written by `write` into the temporary file.
pub fn write_file_atomic_with(
    dest: &Path,
    write: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let (name, parent) = name_and_parent(dest)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        unique_suffix()
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(|e| Error::Output {
                path: dest.into(),
                what: format!(
                    "cannot write a file in {}: {e} (is it writable?)",
                    parent.display()
                ),
            })?;
        write(&mut f)?;
        f.sync_all().map_err(|e| write_failed(dest, "syncing", e))?;
        drop(f);
        fs::hard_link(&tmp, dest).map_err(|e| Error::Output {
            path: dest.into(),
            what: match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    "already exists; choose another path or remove it first".into()
                }
                _ => format!("cannot be created: {e}"),
            },
        })
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    sync_dir(&parent)
}

/// Remove temporary directories that [`write_atomic`] left in `dir` when its process was killed
/// mid-write (`.NAME.tmp-PID-NANOS`). Call it only where this process is the sole writer (the
/// daemon's outbox at start-up). Returns how many were removed; links are removed, not followed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.contains(".tmp-")) {
            continue;
        }
        let p = e.path();
        let removed = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).is_ok(),
            Ok(_) => fs::remove_file(&p).is_ok(),
            Err(_) => false,
        };
        n += usize::from(removed);
    }
    n
}

/// Whether `dir` holds exactly these adapter files (a delivery that already happened).
pub fn same_files(dir: &Path, files: &AdapterFiles) -> bool {
    let eq = |name: &str, want: &[u8]| fs::read(dir.join(name)).map(|b| b == want).unwrap_or(false);
    fs::symlink_metadata(dir)
        .map(|m| m.is_dir())
        .unwrap_or(false)
        && eq(WEIGHTS_FILE, &files.weights)
        && eq(CONFIG_FILE, &files.config)
        && eq(PROVENANCE_FILE, &files.provenance)
}

/// Write `files` to `dest` atomically. With `force`, an existing `dest` is replaced (the old one
/// is moved aside first and removed only after the new one is in place); without it, an
/// existing `dest` is an error and nothing is touched.
pub fn write_atomic(dest: &Path, files: &AdapterFiles, force: bool) -> Result<PathBuf> {
    // Adapters are read-only artefacts: 0755/0644 before the umask, never group-writable.
    write_atomic_modes(dest, files, force, (0o755, 0o644), |_| Ok(()))
}

/// [`write_atomic`] for one reader: the temporary directory and its files are created 0700 and
/// 0600, so nobody but the writing user can open them while they are written, and `prepare`
/// then runs on the finished directory before it is published under `dest` (to grant its
/// reader access, say).
pub fn write_atomic_with(
    dest: &Path,
    files: &AdapterFiles,
    force: bool,
    prepare: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<PathBuf> {
    write_atomic_modes(dest, files, force, (0o700, 0o600), prepare)
}

fn write_atomic_modes(
    dest: &Path,
    files: &AdapterFiles,
    force: bool,
    (dir_mode, file_mode): (u32, u32),
    prepare: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<PathBuf> {
    let (name, parent) = name_and_parent(dest)?;
    if !parent.is_dir() {
        fs::create_dir_all(&parent).map_err(|e| Error::Output {
            path: dest.into(),
            what: format!(
                "cannot create the parent directory {}: {e}",
                parent.display()
            ),
        })?;
    }
    if let Ok(meta) = fs::symlink_metadata(dest) {
        if !force {
            return Err(Error::Output {
                path: dest.into(),
                what: "already exists; choose another path or pass --force".into(),
            });
        }
        if !replaceable(dest, &meta) {
            return Err(Error::Output {
                path: dest.into(),
                what: "exists and is not an adapter directory; --force replaces only an \
                       adapter directory (or an empty one), never another file or folder"
                    .into(),
            });
        }
    }
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        unique_suffix()
    ));
    let result = (|| {
        fs::DirBuilder::new()
            .mode(dir_mode)
            .create(&tmp)
            .map_err(|e| Error::Output {
                path: dest.into(),
                what: format!(
                    "cannot create a directory in {}: {e} (is it writable?)",
                    parent.display()
                ),
            })?;
        write_all_synced(
            &[
                (&tmp.join(WEIGHTS_FILE), &files.weights),
                (&tmp.join(CONFIG_FILE), &files.config),
                (&tmp.join(PROVENANCE_FILE), &files.provenance),
            ],
            file_mode,
        )?;
        prepare(&tmp).map_err(|e| Error::Output {
            path: dest.into(),
            what: format!("cannot set the permissions of the new adapter: {e}"),
        })?;
        sync_dir(&tmp)?;
        publish(&tmp, dest, &parent, force)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result?;
    sync_dir(&parent)?;
    Ok(dest.to_path_buf())
}

/// Whether `--force` may replace what is at `dest`: a real directory (not a link) that is empty
/// or holds nothing but an adapter's files.
fn replaceable(dest: &Path, meta: &fs::Metadata) -> bool {
    if !meta.is_dir() {
        return false;
    }
    let Ok(entries) = fs::read_dir(dest) else {
        return false;
    };
    entries.into_iter().all(|e| {
        e.is_ok_and(|e| {
            let name = e.file_name();
            [WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE]
                .iter()
                .any(|f| name == *f)
        })
    })
}

/// `renameat2(2)` within one directory, by its system call: nix wraps it only for glibc, and the
/// static (musl) builds need it as much.
fn renameat2(
    dir: &File,
    from: &std::ffi::OsStr,
    to: &std::ffi::OsStr,
    flags: libc::c_uint,
) -> std::result::Result<(), nix::errno::Errno> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    let to = std::ffi::CString::new(to.as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    let fd = dir.as_raw_fd();
    // SAFETY: both paths are NUL-terminated and outlive the call; the descriptor is open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            fd,
            from.as_ptr(),
            fd,
            to.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

fn publish(tmp: &Path, dest: &Path, parent: &Path, force: bool) -> Result<()> {
    let dir = File::open(parent).map_err(|e| Error::io("opening", parent, e))?;
    let tmp_name = tmp.file_name().unwrap_or_default();
    let dest_name = dest.file_name().unwrap_or_default();
    match renameat2(&dir, tmp_name, dest_name, libc::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) if force => {
            // Swap atomically, then remove what used to be there.
            renameat2(&dir, tmp_name, dest_name, libc::RENAME_EXCHANGE).map_err(|e| {
                Error::Output {
                    path: dest.into(),
                    what: format!("cannot replace: {e}"),
                }
            })?;
            fs::remove_dir_all(tmp).map_err(|e| Error::io("removing the replaced adapter", tmp, e))
        }
        Err(nix::errno::Errno::EEXIST) => Err(Error::Output {
            path: dest.into(),
            what: "already exists; choose another path or pass --force".into(),
        }),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
            // Filesystem without renameat2 flags: fall back to a plain rename after a check.
            if dest.exists() && !force {
                return Err(Error::Output {
                    path: dest.into(),
                    what: "already exists".into(),
                });
            }
            if dest.exists() {
                fs::remove_dir_all(dest).map_err(|e| Error::io("removing", dest, e))?;
            }
            fs::rename(tmp, dest).map_err(|e| Error::io("renaming into", dest, e))
        }
        Err(e) => Err(Error::Output {
            path: dest.into(),
            what: format!("cannot move the adapter into place: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(tag: &str) -> AdapterFiles {
        AdapterFiles {
            weights: tag.as_bytes().to_vec(),
            weights_sha256: sha256_hex(tag.as_bytes()),
            config: b"{}".to_vec(),
            provenance: b"{}".to_vec(),
        }
    }

    #[test]
    fn writes_then_refuses_to_clobber_then_replaces_with_force() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        write_atomic(&dest, &files("one"), false).unwrap();
        assert_eq!(fs::read(dest.join(WEIGHTS_FILE)).unwrap(), b"one");
        let err = write_atomic(&dest, &files("two"), false).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(fs::read(dest.join(WEIGHTS_FILE)).unwrap(), b"one");
        write_atomic(&dest, &files("three"), true).unwrap();
        assert_eq!(fs::read(dest.join(WEIGHTS_FILE)).unwrap(), b"three");
        // no temporary directories are left behind
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("out")]);
    }

    #[test]
    fn unwritable_parent_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let err = write_atomic(&file.join("out"), &files("x"), false).unwrap_err();
        assert!(matches!(err, Error::Output { .. }), "{err}");
    }
}
