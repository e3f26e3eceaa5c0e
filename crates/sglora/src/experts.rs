//! The expert repository: per expert, its retrieval keys (L2-normalised embeddings its score is
//! computed from, `manifest.retrieval`) and the mean `μ_k` and variance `σ²_k` of its flattened
//! LoRA parameters, plus the shared (frozen) LoRA A matrices and the parameter normalisation.
//! Stored as `experts.safetensors` + `experts.json` in the bundle.
//!
//! The per-expert `μ_k`/`σ²_k` (the bulk of the file) are checked at load and then read from the
//! open file only for the K experts a prior needs (`pread`), so they cost page cache rather than
//! process memory; keys, normalisation and the shared A stay in memory.

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
use crate::relation::RelationHead;

/// Descriptive metadata of one expert.
#[derive(Debug, Clone, Deserialize)]
pub struct ExpertMeta {
    /// Unique name, e.g. `hypernym/noun.animal`.
    pub name: String,
    /// The task description it was trained for.
    pub description: String,
    /// Relation family (the gain model's `relation_agreement` compares it).
    #[serde(default)]
    pub relation: String,
    /// Domain (informational).
    #[serde(default)]
    pub domain: String,
    /// For an expert added on the device (not shipped in the bundle): where it came from.
    #[serde(skip)]
    pub added: Option<AddedOrigin>,
}

/// Where an added expert came from ([`crate::overlay`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AddedOrigin {
    /// The adapter directory given when it was added.
    pub source: String,
    /// Hex SHA-256 of its `adapter_model.safetensors`.
    pub weights_sha256: String,
    /// The adapter's rank.
    pub rank: usize,
    /// Relative error of its projection onto the bundle's shared A.
    pub projection_error: f64,
    /// Seconds since the Unix epoch when it was added.
    pub added_unix: u64,
    /// Every description it was added with (the first is [`ExpertMeta::description`]).
    pub descriptions: Vec<String>,
}

impl ExpertMeta {
    /// `"bundle"` for a shipped expert, `"added"` for one added on the device.
    pub fn origin(&self) -> &'static str {
        if self.added.is_some() {
            "added"
        } else {
            "bundle"
        }
    }
}

/// An expert to append to a loaded repository: its record, its keys (`[per_expert, key dim]`,
/// each L2-normalised) and its `μ`, `σ²` rows.
#[derive(Debug, Clone)]
pub(crate) struct Extra {
    pub meta: ExpertMeta,
    pub keys: Vec<f32>,
    pub mu: Vec<f32>,
    pub var: Vec<f32>,
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

/// The experts' retrieval keys: `values` is `[n, per_expert, dim]`, row-major, each row
/// L2-normalised; an expert's score for a query is the mean of the `top` largest dot products of
/// the query (first projected, `P q / |P q|`, when there is a projection) with its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Keys {
    /// Size of a key (the embedding size, or the projection's output size).
    pub dim: usize,
    /// Keys per expert, m ≥ 1.
    pub per_expert: usize,
    /// How many of the largest key similarities are averaged, 1 ..= m.
    pub top: usize,
    /// The keys.
    pub values: Vec<f32>,
    /// The projection P, `[dim, embedding size]` row-major, or `None`.
    pub projection: Option<Vec<f32>>,
}

impl Keys {
    /// One key per expert (`values` is `[n, dim]`), no projection: the score is the dot product
    /// with it.
    pub fn single(dim: usize, values: Vec<f32>) -> Keys {
        Keys {
            dim,
            per_expert: 1,
            top: 1,
            values,
            projection: None,
        }
    }

    /// The query in key space: itself without a projection, else `P q / |P q|` (each output
    /// accumulated in f64 from f32 products in element order, normalised in f64, rounded to
    /// f32; a zero `P q` stays zero).
    pub fn project<'q>(&self, query: &'q [f32]) -> std::borrow::Cow<'q, [f32]> {
        let Some(p) = &self.projection else {
            return std::borrow::Cow::Borrowed(query);
        };
        let mut rows = Vec::with_capacity(self.dim);
        crate::kernels::dots_f64(p, query, &mut rows);
        let norm = rows.iter().map(|x| x * x).sum::<f64>().sqrt();
        let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        std::borrow::Cow::Owned(rows.iter().map(|x| (x * scale) as f32).collect())
    }
}

/// All experts, in bundle order.
#[derive(Debug, Clone)]
pub struct Experts {
    meta: Vec<ExpertMeta>,
    dim: usize,
    keys: Keys,
    /// The relation head (`manifest.retrieval.relation_head`), if the bundle has one.
    relation: Option<RelationHead>,
    params: Params,
    /// Rows in `params`; experts after them are added ones, their rows in `extra`.
    base: usize,
    /// `(μ, σ²)` of each added expert.
    extra: Vec<(Vec<f32>, Vec<f32>)>,
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

/// Whether a key is finite with an L2 norm of 1 (to 1e-3: rounding of an f32 or f16 unit
/// vector is far below it, an unnormalised or zero vector far above).
fn unit_norm(key: &[f32]) -> bool {
    let sq: f64 = key.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
    key.iter().all(|x| x.is_finite()) && (sq.sqrt() - 1.0).abs() <= 1e-3
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
        let r = &m.retrieval;
        let kd = r.key_dim(e);
        let projection = match &r.projection {
            None => None,
            Some(name) => {
                let p = f32_tensor(&st, name, &[kd, e], &file)?;
                if p.iter().any(|x| !x.is_finite()) {
                    return Err(Error::bundle(
                        &file,
                        format!("tensor {name} (the retrieval projection) is not finite"),
                    ));
                }
                Some(p)
            }
        };
        let keys = Keys {
            dim: kd,
            per_expert: r.keys_per_expert,
            top: r.top,
            values: f32_tensor(&st, &r.keys, &[n, r.keys_per_expert, kd], &file)?,
            projection,
        };
        if let Some(row) = keys.values.chunks_exact(kd).position(|k| !unit_norm(k)) {
            return Err(Error::bundle(
                &file,
                format!(
                    "tensor {}: key {} of expert {} is not a finite L2-normalised vector",
                    r.keys,
                    row % r.keys_per_expert,
                    row / r.keys_per_expert
                ),
            ));
        }
        let relation = match &r.relation_head {
            None => None,
            Some(spec) => {
                let rn = spec.relations.len();
                let weight = f32_tensor(&st, &spec.weight, &[rn, e], &file)?;
                let bias = f32_tensor(&st, &spec.bias, &[rn], &file)?;
                Some(
                    RelationHead::new(spec, weight, bias, e)
                        .map_err(|why| Error::bundle(&file, why))?,
                )
            }
        };
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
            dim: d,
            keys,
            relation,
            params,
            base: n,
            extra: Vec::new(),
            lora_a: f32_tensor(&st, "lora_A", &a_shape, &file)?,
            meta: meta.experts,
        };
        let norm = Normalisation::new(
            f32_tensor(&st, "norm_mean", &[d], &file)?,
            f32_tensor(&st, "norm_std", &[d], &file)?,
        )
        .map_err(|e| Error::bundle(&file, e.to_string()))?;
        Ok((ex, norm))
    }

    /// Build from raw parts (tests and tools): `keys` of `n` experts (its values
    /// `[n, per_expert, dim]`), `mu`/`var` are `[n, d]`; relations and domains are empty.
    pub fn from_parts(
        names: Vec<String>,
        descriptions: Vec<String>,
        keys: Keys,
        mu: Vec<f32>,
        var: Vec<f32>,
    ) -> Result<Experts> {
        let n = names.len();
        if n == 0
            || descriptions.len() != n
            || keys.per_expert == 0
            || !(1..=keys.per_expert).contains(&keys.top)
            || Some(keys.values.len())
                != n.checked_mul(keys.per_expert)
                    .and_then(|x| x.checked_mul(keys.dim))
            || keys
                .projection
                .as_ref()
                .is_some_and(|p| keys.dim == 0 || p.is_empty() || !p.len().is_multiple_of(keys.dim))
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
                added: None,
            })
            .collect();
        Ok(Experts {
            meta,
            dim,
            keys,
            relation: None,
            params: Params::Memory { mu, var },
            base: n,
            extra: Vec::new(),
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

    /// The relation head, if the bundle has one ([`crate::relation`]).
    pub fn relation_head(&self) -> Option<&RelationHead> {
        self.relation.as_ref()
    }

    /// The retrieval keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Key `j` of expert `i` (`j` < [`Keys::per_expert`]).
    pub fn key(&self, i: usize, j: usize) -> &[f32] {
        let (m, e) = (self.keys.per_expert, self.keys.dim);
        let at = (i * m + j) * e;
        &self.keys.values[at..at + e]
    }

    /// Read `μ_i` into `out` (length [`Experts::dim`]); checked finite.
    pub fn read_mu(&self, i: usize, out: &mut [f32]) -> Result<()> {
        self.read_row(i, false, out)
    }

    /// Read `σ²_i` into `out` (length [`Experts::dim`]); checked finite and non-negative.
    pub fn read_var(&self, i: usize, out: &mut [f32]) -> Result<()> {
        self.read_row(i, true, out)
    }

    /// Append added experts (their keys must have this repository's shape).
    pub(crate) fn with_extra(mut self, extra: Vec<Extra>) -> Result<Experts> {
        let (m, kd) = (self.keys.per_expert, self.keys.dim);
        for e in extra {
            if e.keys.len() != m * kd
                || e.mu.len() != self.dim
                || e.var.len() != self.dim
                || !e.keys.chunks_exact(kd).all(unit_norm)
                || bad_params(e.mu.iter().copied(), e.var.iter().copied())
            {
                return Err(Error::model(
                    "experts",
                    format!("added expert {} does not fit the repository", e.meta.name),
                ));
            }
            self.keys.values.extend_from_slice(&e.keys);
            self.meta.push(e.meta);
            self.extra.push((e.mu, e.var));
        }
        Ok(self)
    }

    /// Number of experts shipped in the bundle (the first ones; added experts follow).
    pub fn shipped(&self) -> usize {
        self.base
    }

    /// The per-parameter mean of the shipped experts' `σ²` (f64 sums in expert order): the
    /// variance an added expert without snapshots gets.
    pub(crate) fn mean_var(&self) -> Result<Vec<f32>> {
        let mut acc = vec![0f64; self.dim];
        let mut row = vec![0f32; self.dim];
        for i in 0..self.base {
            self.read_var(i, &mut row)?;
            for (a, x) in acc.iter_mut().zip(&row) {
                *a += f64::from(*x);
            }
        }
        let n = self.base.max(1) as f64;
        Ok(acc.iter().map(|a| (a / n) as f32).collect())
    }

    fn read_row(&self, i: usize, var: bool, out: &mut [f32]) -> Result<()> {
        let d = self.dim;
        if let Some((mu, v)) = i.checked_sub(self.base).and_then(|j| self.extra.get(j)) {
            if out.len() != d {
                return Err(Error::model("experts", "row of the wrong length"));
            }
            out.copy_from_slice(if var { v } else { mu });
            return Ok(());
        }
        if i >= self.base || out.len() != d {
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

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// A two-expert bundle with 2-d embeddings, `m` keys per expert (tensor `keys` of
    /// `key_shape`), a one-module LoRA of flat size 2, in a temporary directory; opened
    /// unverified (only the experts files are read, and those are pinned).
    fn tiny(
        m: usize,
        top: usize,
        key_shape: &[usize],
        keys: &[f32],
    ) -> (tempfile::TempDir, Bundle) {
        tiny_projected(m, top, key_shape, keys, None)
    }

    /// [`tiny`] with a projection tensor `projection` of the given shape (`key_dim` its rows).
    fn tiny_projected(
        m: usize,
        top: usize,
        key_shape: &[usize],
        keys: &[f32],
        projection: Option<(&[usize], &[f32])>,
    ) -> (tempfile::TempDir, Bundle) {
        let dir = tempfile::tempdir().unwrap();
        let mut man: serde_json::Value =
            serde_json::from_str(include_str!("../../../models/default/manifest.json")).unwrap();
        let f32s = |v: &[f32]| crate::le::f32s_to_le(v);
        let mut tensors: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
            ("keys", key_shape.to_vec(), f32s(keys)),
            ("mu", vec![2, 2], f32s(&[0.1, 0.2, 0.3, 0.4])),
            ("var", vec![2, 2], f32s(&[0.01; 4])),
            ("norm_mean", vec![2], f32s(&[0.0; 2])),
            ("norm_std", vec![2], f32s(&[1.0; 2])),
            ("lora_A", vec![1, 1, 2], f32s(&[1.0, 0.0])),
        ];
        // start from no projection (the default bundle may ship one)
        if let Some(r) = man["retrieval"].as_object_mut() {
            r.remove("projection");
            r.remove("key_dim");
        }
        if let Some((shape, p)) = projection {
            tensors.push(("projection", shape.to_vec(), f32s(p)));
            man["retrieval"]["projection"] = "projection".into();
            man["retrieval"]["key_dim"] = shape[0].into();
        }
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.to_string(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let st = safetensors::serialize(views, None).unwrap();
        let meta = serde_json::json!({"experts": [
            {"name": "a", "description": "da", "relation": "hypernym"},
            {"name": "b", "description": "db", "relation": "antonym"},
        ]});
        let meta = serde_json::to_vec(&meta).unwrap();
        for (name, bytes) in [("experts.safetensors", &st), ("experts.json", &meta)] {
            std::fs::write(dir.path().join(name), bytes).unwrap();
            man["files"][name] = serde_json::json!({
                "sha256": crate::bundle::sha256_hex(bytes), "bytes": bytes.len()});
        }
        man["encoder"]["dim"] = 2.into();
        // the default bundle's scope classifier is for 384 dimensions
        man["ood"].as_object_mut().unwrap().remove("scope");
        // and its relation head reads 384-dimensional states
        man["retrieval"]
            .as_object_mut()
            .unwrap()
            .remove("relation_head");
        man["experts"]["count"] = 2.into();
        man["retrieval"]["keys_per_expert"] = m.into();
        man["retrieval"]["top"] = top.into();
        man["lora"]["r"] = 1.into();
        man["lora"]["flat_dim"] = 2.into();
        man["lora"]["layout"] = serde_json::json!([{
            "module": "m", "lora_A": "a", "lora_A_shape": [1, 2], "lora_B": "b",
            "lora_B_shape": [2, 1], "offset": 0, "len": 2}]);
        std::fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_vec(&man).unwrap(),
        )
        .unwrap();
        let b = Bundle::open_unverified(dir.path()).unwrap();
        (dir, b)
    }

    const KEYS: [f32; 8] = [1.0, 0.0, 0.0, 1.0, 0.6, 0.8, -0.8, 0.6];

    #[test]
    fn keys_load_with_the_manifest_shape() {
        let (_d, b) = tiny(2, 1, &[2, 2, 2], &KEYS);
        let (ex, _) = Experts::load(&b).unwrap();
        assert_eq!((ex.keys().per_expert, ex.keys().top), (2, 1));
        assert_eq!(ex.key(1, 1), &[-0.8, 0.6]);
        assert_eq!(ex.meta(1).relation, "antonym");
        // q = [0, 1]: expert 0's best key is [0, 1] (1), expert 1's [0.6, 0.8] (0.8).
        let s = crate::prior::similarities(&[0.0, 1.0], None, &ex);
        assert_eq!(s, vec![1.0, f64::from(0.8f32)]);
    }

    #[test]
    fn keys_of_another_shape_or_not_unit_are_refused() {
        // The manifest says 1 key per expert, the file holds 2.
        let (_d, b) = tiny(1, 1, &[2, 2, 2], &KEYS);
        let e = Experts::load(&b).unwrap_err().to_string();
        assert!(
            e.contains("tensor keys has shape [2, 2, 2], expected [2, 1, 2]"),
            "{e}"
        );
        let mut bad = KEYS;
        bad[6] = f32::NAN;
        let (_d, b) = tiny(2, 1, &[2, 2, 2], &bad);
        let e = Experts::load(&b).unwrap_err().to_string();
        assert!(
            e.contains("key 1 of expert 1") && e.contains("L2-normalised"),
            "{e}"
        );
        let mut bad = KEYS;
        bad[4] = 0.5;
        let (_d, b) = tiny(2, 1, &[2, 2, 2], &bad);
        let e = Experts::load(&b).unwrap_err().to_string();
        assert!(e.contains("key 0 of expert 1"), "{e}");
    }

    #[test]
    fn a_projection_is_loaded_and_applied() {
        // P = [[1, 0], [0, 0], [1, 1]] maps 2-d embeddings to 3-d keys; q = [1, 0] becomes
        // [1, 0, 1] / √2. Expert 0's key [1, 0, 0] scores 1/√2, expert 1's [0.6, 0, 0.8] 1.4/√2.
        let p = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let keys = [1.0, 0.0, 0.0, 0.6, 0.0, 0.8];
        let (_d, b) = tiny_projected(1, 1, &[2, 1, 3], &keys, Some((&[3, 2], &p)));
        let (ex, _) = Experts::load(&b).unwrap();
        assert_eq!(ex.keys().projection.as_deref(), Some(&p[..]));
        let s = crate::prior::similarities(&[1.0, 0.0], None, &ex);
        let h = f64::from(std::f32::consts::FRAC_1_SQRT_2);
        assert_eq!(s[0], h);
        assert!((s[1] - 1.4 * h).abs() < 1e-7, "{s:?}");
        // The projection's shape must be [key_dim, encoder.dim].
        let (_d, b) = tiny_projected(1, 1, &[2, 1, 3], &keys, Some((&[3, 2], &p)));
        let mut man = b.manifest.clone();
        man.retrieval.key_dim = Some(2);
        let wrong = Bundle { manifest: man, ..b };
        let e = Experts::load(&wrong).unwrap_err().to_string();
        assert!(
            e.contains("tensor projection has shape [3, 2], expected [2, 2]"),
            "{e}"
        );
    }
}
