//! The expert repository: per expert, its description embedding and the mean `μ_k` and variance
//! `σ²_k` of its flattened LoRA parameters, plus the shared (frozen) LoRA A matrices and the
//! parameter normalisation. Stored as `experts.safetensors` + `experts.json` in the bundle.
//!
//! The per-expert `μ_k`/`σ²_k` (the bulk of the file) are checked at load and then read from the
//! open file only for the K experts a prior needs (`pread`), so they cost page cache rather than
//! process memory; embeddings, normalisation and the shared A stay in memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::bundle::{offset_in, Bundle};
use crate::cvae::Normalisation;
use crate::error::{Error, Result};
use crate::le::f32s_from_le as le_f32s;

/// Descriptive metadata of one expert.
#[derive(Debug, Clone, Deserialize)]
pub struct ExpertMeta {
    /// Unique name, e.g. `hypernym/noun.animal`.
    pub name: String,
    /// The task description it was trained for.
    pub description: String,
    /// Relation family (informational).
    #[serde(default)]
    pub relation: String,
    /// Domain (informational).
    #[serde(default)]
    pub domain: String,
}

#[derive(Deserialize)]
struct MetaFile {
    experts: Vec<ExpertMeta>,
}

/// Where the experts' `μ` and `σ²` rows live.
#[derive(Debug, Clone)]
enum Params {
    /// In memory (built with [`Experts::from_parts`]).
    Memory { mu: Vec<f32>, var: Vec<f32> },
    /// In the hash-checked bundle file, kept open: byte offsets of row 0 of `mu` and `var`.
    File {
        file: Arc<File>,
        path: PathBuf,
        mu_at: u64,
        var_at: u64,
    },
}

/// All experts, in bundle order.
#[derive(Debug, Clone)]
pub struct Experts {
    meta: Vec<ExpertMeta>,
    emb_dim: usize,
    dim: usize,
    desc_emb: Vec<f32>,
    params: Params,
    /// Shared LoRA A matrices, `[modules, r, in]` flattened.
    pub lora_a: Vec<f32>,
}

fn f32_view<'a>(
    st: &'a SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    file: &std::path::Path,
) -> Result<safetensors::tensor::TensorView<'a>> {
    let t = st
        .tensor(name)
        .map_err(|e| Error::bundle(file, format!("tensor {name}: {e}")))?;
    if t.dtype() != Dtype::F32 {
        return Err(Error::bundle(
            file,
            format!("tensor {name} has dtype {:?}, expected F32", t.dtype()),
        ));
    }
    if t.shape() != shape {
        return Err(Error::bundle(
            file,
            format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.shape()
            ),
        ));
    }
    Ok(t)
}

fn f32_tensor(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    file: &std::path::Path,
) -> Result<Vec<f32>> {
    Ok(le_f32s(f32_view(st, name, shape, file)?.data()).collect())
}

/// `μ` must be finite, `σ²` finite and non-negative.
fn bad_params(mu: impl Iterator<Item = f32>, var: impl Iterator<Item = f32>) -> bool {
    !(all_in_range(mu, f32::NEG_INFINITY) && all_in_range(var, 0.0))
}

/// Whether every value is finite and ≥ `lower`. Branch-free so it vectorises: it runs over every
/// row a generation reads, not only at load.
fn all_in_range(values: impl Iterator<Item = f32>, lower: f32) -> bool {
    values.fold(true, |ok, x| ok & (x.abs() < f32::INFINITY) & (x >= lower))
}

const BAD_PARAMS: &str = "expert tensors contain NaN/inf or negative variances";

impl Experts {
    /// Load and check the expert repository of a bundle, and the CVAE's normalisation stored
    /// beside it in the same file (one read and one hash check for both).
    pub fn load(bundle: &Bundle) -> Result<(Experts, Normalisation)> {
        let m = &bundle.manifest;
        let file = bundle.path(&m.experts.file);
        let (handle, bytes) = bundle.open_checked(&m.experts.file)?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bundle(&file, format!("not a valid safetensors file: {e}")))?;
        let meta_path = bundle.path(&m.experts.meta);
        let meta: MetaFile = serde_json::from_slice(&bundle.read(&m.experts.meta)?)
            .map_err(|e| Error::bundle(&meta_path, format!("invalid experts metadata: {e}")))?;
        let n = m.experts.count;
        if meta.experts.len() != n {
            return Err(Error::bundle(
                &meta_path,
                format!(
                    "lists {} experts, the manifest says {n}",
                    meta.experts.len()
                ),
            ));
        }
        let (e, d) = (m.encoder.dim, m.lora.flat_dim);
        let l0 = &m.lora.layout[0];
        let a_shape = [m.lora.layout.len(), l0.lora_a_shape[0], l0.lora_a_shape[1]];
        if m.lora
            .layout
            .iter()
            .any(|l| l.lora_a_shape != l0.lora_a_shape)
        {
            return Err(Error::bundle(
                &file,
                "all modules must share the A shape for a shared A",
            ));
        }
        let mu = f32_view(&st, "mu", &[n, d], &file)?;
        let var = f32_view(&st, "var", &[n, d], &file)?;
        if bad_params(le_f32s(mu.data()), le_f32s(var.data())) {
            return Err(Error::bundle(&file, BAD_PARAMS));
        }
        let params = Params::File {
            mu_at: offset_in(&bytes, mu.data()),
            var_at: offset_in(&bytes, var.data()),
            file: Arc::new(handle),
            path: file.clone(),
        };
        let ex = Experts {
            emb_dim: e,
            dim: d,
            desc_emb: f32_tensor(&st, "desc_emb", &[n, e], &file)?,
            params,
            lora_a: f32_tensor(&st, "lora_A", &a_shape, &file)?,
            meta: meta.experts,
        };
        let norm = Normalisation::new(
            f32_tensor(&st, "norm_mean", &[d], &file)?,
            f32_tensor(&st, "norm_std", &[d], &file)?,
        )
        .map_err(|e| Error::bundle(&file, e.to_string()))?;
        if ex.desc_emb.iter().any(|x| !x.is_finite()) {
            return Err(Error::bundle(&file, BAD_PARAMS));
        }
        Ok((ex, norm))
    }

    /// Build from raw parts (tests and tools); `desc_emb` is `[n, emb_dim]`, `mu`/`var` are `[n, d]`.
    pub fn from_parts(
        names: Vec<String>,
        descriptions: Vec<String>,
        emb_dim: usize,
        desc_emb: Vec<f32>,
        mu: Vec<f32>,
        var: Vec<f32>,
    ) -> Result<Experts> {
        let n = names.len();
        if n == 0
            || descriptions.len() != n
            || desc_emb.len() != n * emb_dim
            || mu.len() != var.len()
            || !mu.len().is_multiple_of(n)
        {
            return Err(Error::InvalidOption("inconsistent expert parts".into()));
        }
        let dim = mu.len() / n;
        let meta = names
            .into_iter()
            .zip(descriptions)
            .map(|(name, description)| ExpertMeta {
                name,
                description,
                relation: String::new(),
                domain: String::new(),
            })
            .collect();
        Ok(Experts {
            meta,
            emb_dim,
            dim,
            desc_emb,
            params: Params::Memory { mu, var },
            lora_a: vec![],
        })
    }

    /// Number of experts.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// True when there are no experts.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Flat parameter dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Metadata of expert `i`.
    pub fn meta(&self, i: usize) -> &ExpertMeta {
        &self.meta[i]
    }

    /// All metadata.
    pub fn metas(&self) -> &[ExpertMeta] {
        &self.meta
    }

    /// Description embedding of expert `i`.
    pub fn desc_emb(&self, i: usize) -> &[f32] {
        &self.desc_emb[i * self.emb_dim..(i + 1) * self.emb_dim]
    }

    /// Read `μ_i` into `out` (length [`Experts::dim`]); checked finite.
    pub fn read_mu(&self, i: usize, out: &mut [f32]) -> Result<()> {
        self.read_row(i, false, out)
    }

    /// Read `σ²_i` into `out` (length [`Experts::dim`]); checked finite and non-negative.
    pub fn read_var(&self, i: usize, out: &mut [f32]) -> Result<()> {
        self.read_row(i, true, out)
    }

    fn read_row(&self, i: usize, var: bool, out: &mut [f32]) -> Result<()> {
        let d = self.dim;
        if i >= self.len() || out.len() != d {
            return Err(Error::model(
                "experts",
                format!(
                    "no expert row {i} of length {} ({} experts of {d})",
                    out.len(),
                    self.len()
                ),
            ));
        }
        match &self.params {
            Params::Memory { mu, var: v } => {
                out.copy_from_slice(&(if var { v } else { mu })[i * d..(i + 1) * d]);
            }
            Params::File {
                file,
                path,
                mu_at,
                var_at,
            } => {
                let at = if var { *var_at } else { *mu_at } + (i * d * 4) as u64;
                // SAFETY: every bit pattern is a valid f32, u8 has alignment 1, and the byte
                // slice covers exactly the f32 slice's memory for the duration of the read.
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), d * 4) };
                file.read_exact_at(bytes, at)
                    .map_err(|e| Error::io("reading", path, e))?;
                if cfg!(target_endian = "big") {
                    for x in out.iter_mut() {
                        *x = f32::from_bits(x.to_bits().swap_bytes());
                    }
                }
            }
        }
        let lower = if var { 0.0 } else { f32::NEG_INFINITY };
        if !all_in_range(out.iter().copied(), lower) {
            if let Params::File { path, .. } = &self.params {
                return Err(Error::bundle(path, BAD_PARAMS));
            }
            return Err(Error::model("experts", BAD_PARAMS));
        }
        Ok(())
    }
}
