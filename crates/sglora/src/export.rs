//! Adapters for other runtimes: the bundle's encoder with a LoRA adapter folded into its weights,
//! as a self-contained ONNX file (`sglora export --format onnx-merged`).
//!
//! The file is what a Hugging Face export of the merged model looks like to its user: inputs
//! `input_ids` and `attention_mask` (int64, `[batch, seq]`), output `last_hidden_state`
//! (`[batch, seq, 384]`); mean-pool it over the mask and L2-normalise, with the bundle's
//! `tokenizer.json`, to get what `sglora embed --adapter` gives. (Token types are always 0, as for
//! single-text embeddings; the graph computes them from the mask.) It is made from the bundle's
//! own `encoder.onnx` by editing the graph, not by re-exporting a model:
//!
//! - the word-embedding lookup is put in front: a `Gather` of `input_ids` from the bundle's int8
//!   rows times their per-row scales (the values the bundle stores, in both files);
//! - each adapted map's weight becomes `W + (α/r)·(B·A)ᵀ`, the low-rank product computed by the
//!   same fixed-order kernels `sglora embed` uses; fp32 dequantises every weight, `int8`
//!   re-quantises the adapted ones per output column (symmetric, like the bundle's export) and
//!   keeps the others byte for byte.
//!
//! The base weights are the bundle's int8 values either way (the device has no others), so the
//! fp32 file is as close to PyTorch as the bundle's encoder is (cosine ≥ 0.999).

use std::collections::{HashMap, HashSet};

use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto, StringStringEntryProto,
    TensorProto,
};
use tract_onnx::prelude::Framework;

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::lora::Lora;

// ONNX TensorProto.DataType values.
const FLOAT: i32 = 1;
const INT8: i32 = 3;
const INT64: i32 = 7;

/// Where the merged weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Every matrix weight fp32 (~55 MB; the word-embedding table stays int8 + scales).
    Fp32,
    /// int8 weights with a scale per output column, as the bundle's encoder (~24 MB).
    Int8,
}

fn bad(bundle: &Bundle, what: impl std::fmt::Display) -> Error {
    Error::bundle(
        bundle.path(&bundle.manifest.encoder.file),
        format!("cannot be exported: {what}"),
    )
}

fn tensor(name: &str, data_type: i32, dims: &[usize], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        data_type,
        dims: dims.iter().map(|&d| d as i64).collect(),
        raw_data: raw,
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// The values of an int8 or fp32 tensor, whichever field holds them.
fn i8_values(t: &TensorProto) -> Vec<i8> {
    if t.raw_data.is_empty() {
        t.int32_data.iter().map(|&v| v as i8).collect()
    } else {
        t.raw_data.iter().map(|&b| b as i8).collect()
    }
}

fn f32_values(t: &TensorProto) -> Vec<f32> {
    if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        crate::le::f32s_from_le(&t.raw_data).collect()
    }
}

/// Symmetric per-output-column int8 of `w` (`[k, n]` row-major): `(q, scale)`.
fn quantize_columns(w: &[f32], k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
    let mut scale = vec![0f32; n];
    for row in w.chunks_exact(n) {
        for (s, &x) in scale.iter_mut().zip(row) {
            *s = s.max(x.abs());
        }
    }
    for s in &mut scale {
        *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
    }
    let mut q = Vec::with_capacity(k * n);
    for row in w.chunks_exact(n) {
        for (&x, &s) in row.iter().zip(&scale) {
            q.push((x / s).round_ties_even().clamp(-127.0, 127.0) as i8);
        }
    }
    (q, scale)
}

/// The bundle's encoder with `lora` merged in, as ONNX bytes (module docs).
pub fn onnx_merged(bundle: &Bundle, lora: &Lora, precision: Precision) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_onnx_merged(bundle, lora, precision, &mut out)?;
    Ok(out)
}

/// [`onnx_merged`] encoded straight into `out` (64 KiB at a time, no second copy of the model
/// in memory); returns the bytes written. An fp32 export of MiniLM-L6 holds ~60 MB of weights
/// while it is made.
pub fn write_onnx_merged(
    bundle: &Bundle,
    lora: &Lora,
    precision: Precision,
    out: &mut dyn std::io::Write,
) -> Result<u64> {
    let model = merged_model(bundle, Some(lora), precision)?;
    encode_into(&model, out)
}

fn encode_into(model: &ModelProto, out: &mut dyn std::io::Write) -> Result<u64> {
    let mut sink = Sink {
        out,
        buf: vec![0; 64 << 10],
        len: 0,
        written: 0,
        err: None,
    };
    model
        .encode(&mut sink)
        .map_err(|e| Error::model("export", e))?;
    sink.flush();
    match sink.err {
        Some(e) => Err(Error::Output {
            path: "(export)".into(),
            what: format!("writing the ONNX file failed: {e}"),
        }),
        None => Ok(sink.written as u64),
    }
}

/// A `BufMut` that passes what prost encodes on to a writer, a buffer at a time; the first write
/// error is kept (and later bytes dropped) for the caller to report.
struct Sink<'a> {
    out: &'a mut dyn std::io::Write,
    buf: Vec<u8>,
    len: usize,
    written: usize,
    err: Option<std::io::Error>,
}

impl Sink<'_> {
    fn flush(&mut self) {
        if self.err.is_none() && self.len > 0 {
            if let Err(e) = self.out.write_all(&self.buf[..self.len]) {
                self.err = Some(e);
            }
        }
        self.len = 0;
    }
}

// SAFETY: `chunk_mut` returns the unused tail of `buf` (never empty: it flushes a full buffer
// first), and `advance_mut` only moves `len` over bytes the caller wrote there.
unsafe impl prost::bytes::BufMut for Sink<'_> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize - self.written
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        self.len += cnt;
        self.written += cnt;
    }

    fn chunk_mut(&mut self) -> &mut prost::bytes::buf::UninitSlice {
        if self.len == self.buf.len() {
            self.flush();
        }
        let len = self.len;
        prost::bytes::buf::UninitSlice::new(&mut self.buf[len..])
    }
}

/// The edited model (module docs).
fn merged_model(bundle: &Bundle, lora: Option<&Lora>, precision: Precision) -> Result<ModelProto> {
    let spec = &bundle.manifest.encoder;
    let bytes = bundle.read(&spec.file)?;
    let mut model: ModelProto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| bad(bundle, format!("not a readable ONNX file: {e:#}")))?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| bad(bundle, "no graph"))?;
    let d = spec.dim;

    // Weight value name → its DequantizeLinear node (index), and initialisers by name.
    let dq_of: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "DequantizeLinear")
        .map(|(i, n)| (n.output[0].clone(), i))
        .collect();
    let init_at: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let init = |name: &str| -> Result<usize> {
        init_at
            .get(name)
            .copied()
            .ok_or_else(|| bad(bundle, format!("no initialiser {name}")))
    };
    // Dequantised weight `[k, n]` behind DequantizeLinear `di`.
    let dequantised =
        |graph: &tract_onnx::pb::GraphProto, di: usize| -> Result<(usize, usize, Vec<f32>)> {
            let dq = &graph.node[di];
            let q = &graph.initializer[init(&dq.input[0])?];
            let s = f32_values(&graph.initializer[init(&dq.input[1])?]);
            let [k, n] = q.dims[..] else {
                return Err(bad(
                    bundle,
                    format!("{}: weight of shape {:?}", dq.output[0], q.dims),
                ));
            };
            let (k, n) = (k as usize, n as usize);
            if s.len() != n {
                return Err(bad(
                    bundle,
                    format!("{}: {} scales for {n} columns", dq.output[0], s.len()),
                ));
            }
            let qv = i8_values(q);
            let w = qv
                .chunks_exact(n)
                .flat_map(|row| row.iter().zip(&s).map(|(&q, &s)| f32::from(q) * s))
                .collect();
            Ok((k, n, w))
        };

    // Each adapted map: the weight value its MatMul multiplies by, and the added ΔW.
    let mut merged: HashMap<String, Vec<f32>> = HashMap::new();
    for (layer, target, delta) in lora.into_iter().flat_map(Lora::deltas) {
        let name = matmul_node(layer, target);
        let mm = graph
            .node
            .iter()
            .find(|n| n.name == name && n.op_type == "MatMul")
            .ok_or_else(|| bad(bundle, format!("no MatMul node {name}")))?;
        let w = mm.input[1].clone();
        let di = *dq_of.get(&w).ok_or_else(|| {
            bad(
                bundle,
                format!("{name}: weight is not int8 behind DequantizeLinear"),
            )
        })?;
        let (k, n, mut wv) = dequantised(graph, di)?;
        // ΔW row i = s·(e_i·Aᵀ)·Bᵀ, by the kernels `sglora embed` runs.
        let mut dw = vec![0f32; k * n];
        let (mut u, mut t) = (Vec::new(), Vec::new());
        delta.add_to(&crate::lora::eye(k), &mut dw, &mut u, &mut t);
        for (x, y) in wv.iter_mut().zip(&dw) {
            *x += y;
        }
        merged.insert(w, wv);
    }

    match precision {
        Precision::Fp32 => {
            // Every DequantizeLinear becomes an fp32 initialiser under its output's name.
            let mut drop_inits = HashSet::new();
            let mut added = Vec::new();
            let mut dqs: Vec<usize> = dq_of.values().copied().collect();
            dqs.sort_unstable();
            for &di in &dqs {
                let out = graph.node[di].output[0].clone();
                let (k, n, w) = match merged.remove(&out) {
                    Some(w) => {
                        let q = &graph.initializer[init(&graph.node[di].input[0])?];
                        (q.dims[0] as usize, q.dims[1] as usize, w)
                    }
                    None => dequantised(graph, di)?,
                };
                added.push(tensor(&out, FLOAT, &[k, n], crate::le::f32s_to_le(&w)));
                drop_inits.extend(graph.node[di].input.iter().cloned());
            }
            let keep: HashSet<usize> = (0..graph.node.len()).filter(|i| !dqs.contains(i)).collect();
            graph.node = std::mem::take(&mut graph.node)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| keep.contains(i))
                .map(|(_, n)| n)
                .collect();
            graph.initializer.retain(|t| !drop_inits.contains(&t.name));
            graph.initializer.extend(added);
        }
        Precision::Int8 => {
            for (w, wv) in merged.drain() {
                let dq = graph.node[dq_of[&w]].clone();
                let qi = init(&dq.input[0])?;
                let si = init(&dq.input[1])?;
                let (k, n) = (
                    graph.initializer[qi].dims[0] as usize,
                    graph.initializer[qi].dims[1] as usize,
                );
                let (q, s) = quantize_columns(&wv, k, n);
                graph.initializer[qi] = tensor(
                    &dq.input[0],
                    INT8,
                    &[k, n],
                    q.iter().map(|&x| x as u8).collect(),
                );
                graph.initializer[si] =
                    tensor(&dq.input[1], FLOAT, &[n], crate::le::f32s_to_le(&s));
            }
        }
    }

    // The word-embedding lookup in front: `input_ids` → `inputs_embeds`.
    let (rows, scales) = word_embeddings(bundle, d)?;
    let vocab = scales.len();
    drop(bytes);
    let mut front = Vec::new();
    // The table stays int8 with its per-row scales in both files: `Cast` then `Mul` gives the
    // same fp32 products as a dequantised table would, at a quarter of the size.
    graph.initializer.push(tensor(
        "word_embeddings_int8",
        INT8,
        &[vocab, d],
        rows.iter().map(|&x| x as u8).collect(),
    ));
    graph.initializer.push(tensor(
        "word_embeddings_scale",
        FLOAT,
        &[vocab],
        crate::le::f32s_to_le(&scales),
    ));
    graph.initializer.push(tensor(
        "word_embeddings_axes",
        INT64,
        &[1],
        (-1i64).to_le_bytes().to_vec(),
    ));
    let p = "/model/embeddings/word_embeddings";
    front.push(node(
        "Gather",
        &format!("{p}/Gather"),
        &["word_embeddings_int8", "input_ids"],
        "we_q",
    ));
    let mut cast = node("Cast", &format!("{p}/Cast"), &["we_q"], "we_f");
    cast.attribute.push(int_attr("to", i64::from(FLOAT)));
    front.push(cast);
    front.push(node(
        "Gather",
        &format!("{p}/GatherScale"),
        &["word_embeddings_scale", "input_ids"],
        "we_s",
    ));
    front.push(node(
        "Unsqueeze",
        &format!("{p}/Unsqueeze"),
        &["we_s", "word_embeddings_axes"],
        "we_s1",
    ));
    front.push(node(
        "Mul",
        &format!("{p}/Mul"),
        &["we_f", "we_s1"],
        "inputs_embeds",
    ));
    front.append(&mut graph.node);
    graph.node = front;
    let mask = graph
        .input
        .iter()
        .find(|i| i.name == "attention_mask")
        .cloned()
        .ok_or_else(|| bad(bundle, "no attention_mask input"))?;
    let Some(at) = graph.input.iter().position(|i| i.name == "inputs_embeds") else {
        return Err(bad(bundle, "no inputs_embeds input"));
    };
    graph.input[at] = tract_onnx::pb::ValueInfoProto {
        name: "input_ids".into(),
        ..mask
    };
    if !graph.output.iter().any(|o| o.name == "last_hidden_state") {
        return Err(bad(bundle, "no last_hidden_state output"));
    }
    model.producer_name = "sglora".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    model.metadata_props.extend(
        [
            ("base_model", bundle.manifest.base_model.id.clone()),
            ("bundle_id", bundle.manifest.bundle_id.clone()),
            (
                "adapter_weights_sha256",
                lora.map_or("none".into(), |l| l.weights_sha256().to_string()),
            ),
            (
                "lora_scale",
                lora.map_or("none".into(), |l| l.scale().to_string()),
            ),
            ("pooling", "mean over attention_mask, then L2".into()),
            (
                "precision",
                match precision {
                    Precision::Fp32 => "fp32",
                    Precision::Int8 => "int8 per output column",
                }
                .into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| StringStringEntryProto {
            key: k.into(),
            value: v,
        }),
    );
    Ok(model)
}

/// The bundle's int8 word-embedding rows and per-row scales.
fn word_embeddings(bundle: &Bundle, d: usize) -> Result<(Vec<i8>, Vec<f32>)> {
    let bytes = bundle.read(&bundle.manifest.encoder.embeddings)?;
    let (rows, scales) = crate::encoder::table_parts(bundle, &bytes, d)?;
    Ok((rows.iter().map(|&b| b as i8).collect(), scales))
}

/// One parameter of an onnxruntime adapter file: name, dims, fp32 values.
pub type AdapterParameter = (String, Vec<i64>, Vec<f32>);

/// An onnxruntime adapter file (`.onnx_adapter`, the FlatBuffers format of
/// `onnxruntime/lora/adapter_format/adapter_schema.fbs`, identifier `TORT`, format version 1)
/// holding fp32 `parameters`. Laid out front to back: root offset, identifier, then each table
/// after its vtable and before what it points to (every offset points forward); parameter data
/// 8-byte aligned (`force_align: 8`).
pub fn onnx_adapter_file(
    parameters: &[AdapterParameter],
    adapter_version: i32,
    model_version: i32,
) -> Vec<u8> {
    struct W(Vec<u8>);
    impl W {
        fn pad_to(&mut self, align: usize, rem: usize) {
            while self.0.len() % align != rem {
                self.0.push(0);
            }
        }
        fn u16(&mut self, v: u16) {
            self.0.extend(v.to_le_bytes());
        }
        fn u32(&mut self, v: u32) {
            self.0.extend(v.to_le_bytes());
        }
        fn i32(&mut self, v: i32) {
            self.0.extend(v.to_le_bytes());
        }
        /// Point the uoffset at `at` to the current end.
        fn patch_here(&mut self, at: usize) {
            let rel = (self.0.len() - at) as u32;
            self.0[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        /// Point the root offset (at 0) to the table at `t`.
        fn patch_here_at_zero(&mut self, t: usize) {
            self.0[0..4].copy_from_slice(&(t as u32).to_le_bytes());
        }
        /// Point the uoffset at `at` to the table at `t` (after it).
        fn patch_table_ref(&mut self, at: usize, t: usize) {
            self.0[at..at + 4].copy_from_slice(&((t - at) as u32).to_le_bytes());
        }
        /// A vtable of `fields` 4-byte fields, then the table's soffset; returns the table start.
        fn table(&mut self, fields: u16) -> usize {
            self.pad_to(2, 0);
            let vt = self.0.len();
            self.u16(4 + 2 * fields);
            self.u16(4 + 4 * fields);
            for f in 0..fields {
                self.u16(4 + 4 * f);
            }
            self.pad_to(4, 0);
            let t = self.0.len();
            self.i32((t - vt) as i32);
            t
        }
        /// A vector whose elements start 8-byte aligned: length, then `bytes`.
        fn vector8(&mut self, len: usize, bytes: &[u8]) {
            self.pad_to(8, 4);
            self.u32(len as u32);
            self.0.extend_from_slice(bytes);
        }
    }
    let mut w = W(Vec::new());
    w.u32(0); // root offset, patched below
    w.0.extend_from_slice(b"TORT");
    let root = w.table(4);
    w.patch_here_at_zero(root);
    w.i32(1); // format_version
    w.i32(adapter_version);
    w.i32(model_version);
    let params_field = w.0.len();
    w.u32(0);
    w.pad_to(4, 0);
    w.patch_here(params_field);
    w.u32(parameters.len() as u32);
    let slots: Vec<usize> = (0..parameters.len())
        .map(|_| {
            let at = w.0.len();
            w.u32(0);
            at
        })
        .collect();
    for ((name, dims, values), slot) in parameters.iter().zip(slots) {
        let t = w.table(4);
        w.patch_table_ref(slot, t);
        let (name_f, dims_f) = (w.0.len(), w.0.len() + 4);
        w.u32(0);
        w.u32(0);
        w.i32(FLOAT); // data_type
        let raw_f = w.0.len();
        w.u32(0);
        w.pad_to(4, 0);
        w.patch_here(name_f);
        w.u32(name.len() as u32);
        w.0.extend_from_slice(name.as_bytes());
        w.0.push(0);
        let dims_bytes: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
        w.pad_to(8, 4);
        w.patch_here(dims_f);
        w.vector8(dims.len(), &dims_bytes);
        w.pad_to(8, 4);
        w.patch_here(raw_f);
        let raw = crate::le::f32s_to_le(values);
        w.vector8(raw.len(), &raw);
    }
    w.0
}

/// The exported graph's `MatMul` node of `target` in `layer`
/// (`/model/encoder/layer.3/attention/self/query/MatMul`).
fn matmul_node(layer: usize, target: crate::lora::Target) -> String {
    format!(
        "/model/encoder/layer.{layer}/{}/MatMul",
        target.path().replace('.', "/")
    )
}

/// Names of the two graph inputs of a LoRA slot (and of the adapter file's parameters):
/// `encoder.layer.L.attention.self.query.lora_A` (`[inputs, r]`, that is Aᵀ) and `….lora_B`
/// (`[r, outputs]`, `(α/r)·Bᵀ`: the scale is folded in, so adapters of any α share the base).
pub fn slot_names(layer: usize, target: crate::lora::Target) -> (String, String) {
    let m = format!("encoder.layer.{layer}.{}", target.path());
    (format!("{m}.lora_A"), format!("{m}.lora_B"))
}

/// The bundle's encoder (int8, `input_ids` in front as in [`onnx_merged`]) with a LoRA slot on
/// every map the bundle's adapters target (`manifest.lora.layout`): `y = x·W + b + (x·A)·B`
/// where `A`, `B` are graph inputs ([`slot_names`]) whose default initialisers are empty
/// (`[inputs, 0]`, `[0, outputs]`), so the file runs as the base model until an adapter file
/// ([`onnx_adapter`]) fills the slots (`RunOptions.add_active_adapter`).
pub fn write_onnx_slotted(bundle: &Bundle, out: &mut dyn std::io::Write) -> Result<u64> {
    let mut model = merged_model(bundle, None, Precision::Int8)?;
    let targets = slot_targets(bundle)?;
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| bad(bundle, "no graph"))?;
    for (layer, target) in targets {
        let name = matmul_node(layer, target);
        let at = graph
            .node
            .iter()
            .position(|n| n.name == name && n.op_type == "MatMul")
            .ok_or_else(|| bad(bundle, format!("no MatMul node {name}")))?;
        let (x, y) = (
            graph.node[at].input[0].clone(),
            graph.node[at].output[0].clone(),
        );
        let (a, b) = slot_names(layer, target);
        // The weight's shape, from the int8 initialiser behind its DequantizeLinear.
        let w = graph.node[at].input[1].clone();
        let q = graph
            .node
            .iter()
            .find(|n| n.op_type == "DequantizeLinear" && n.output[0] == w)
            .map(|n| n.input[0].clone())
            .ok_or_else(|| bad(bundle, format!("{name}: weight is not int8")))?;
        let dims = graph
            .initializer
            .iter()
            .find(|t| t.name == q)
            .map(|t| t.dims.clone())
            .unwrap_or_default();
        let [inputs, outputs] = dims[..] else {
            return Err(bad(bundle, format!("{name}: weight of shape {dims:?}")));
        };
        let (inputs, outputs) = (inputs as usize, outputs as usize);
        let rank = format!("lora_rank_{layer}_{}", target.path().replace('.', "_"));
        for (n, dims) in [(&a, [Some(inputs), None]), (&b, [None, Some(outputs)])] {
            graph.input.push(value_info(n, FLOAT, &dims, &rank));
            let shape: Vec<usize> = dims.iter().map(|d| d.unwrap_or(0)).collect();
            graph.initializer.push(tensor(n, FLOAT, &shape, Vec::new()));
        }
        let (u, v, sum) = (
            format!("{name}/lora_u"),
            format!("{name}/lora_v"),
            format!("{name}/lora_out"),
        );
        // Consumers of y now read y + (x·A)·B.
        for n in graph.node.iter_mut() {
            for i in n.input.iter_mut().filter(|i| **i == y) {
                *i = sum.clone();
            }
        }
        let nodes = [
            node("MatMul", &format!("{name}/LoraA"), &[&x, &a], &u),
            node("MatMul", &format!("{name}/LoraB"), &[&u, &b], &v),
            node("Add", &format!("{name}/LoraAdd"), &[&y, &v], &sum),
        ];
        for (k, n) in nodes.into_iter().enumerate() {
            graph.node.insert(at + 1 + k, n);
        }
    }
    model.metadata_props.push(StringStringEntryProto {
        key: "lora_slots".into(),
        value: "inputs encoder.layer.L.<module>.lora_A [in, r] and .lora_B [r, out] (alpha/r folded into B), empty by default; fill them with an .onnx_adapter from `sglora export --format onnx-adapter`".into(),
    });
    encode_into(&model, out)
}

/// The maps the bundle's adapters target, from `manifest.lora.layout`.
fn slot_targets(bundle: &Bundle) -> Result<Vec<(usize, crate::lora::Target)>> {
    bundle
        .manifest
        .lora
        .layout
        .iter()
        .map(|e| {
            let m = e.module.strip_prefix("base_model.model.encoder.layer.");
            m.and_then(|m| {
                let (l, path) = m.split_once('.')?;
                Some((l.parse().ok()?, crate::lora::Target::from_path(path)?))
            })
            .ok_or_else(|| {
                bad(
                    bundle,
                    format!("layout module {} is not a BERT encoder map", e.module),
                )
            })
        })
        .collect()
}

/// The adapter file for the slotted base of this bundle: every map the adapter changes must
/// have a slot (the bundle's targets), and gets `A` = Aᵀ and `B` = s·Bᵀ.
pub fn onnx_adapter(bundle: &Bundle, lora: &Lora) -> Result<Vec<u8>> {
    let slots = slot_targets(bundle)?;
    let mut params = Vec::new();
    for (layer, target, delta) in lora.deltas() {
        if !slots.contains(&(layer, target)) {
            return Err(Error::Adapter {
                path: lora.dir().to_path_buf(),
                what: format!(
                    "changes layer {layer} {}, which the slotted base has no slot for (it has \
                     the bundle's targets, {}); export it as onnx-merged instead",
                    target.path(),
                    bundle.manifest.lora.target_modules.join(", ")
                ),
            });
        }
        let (a, b) = slot_names(layer, target);
        let (at, bt) = delta.factors();
        params.push((a, vec![at.0 as i64, at.1 as i64], at.2));
        params.push((b, vec![bt.0 as i64, bt.1 as i64], bt.2));
    }
    Ok(onnx_adapter_file(&params, 1, 1))
}

fn value_info(
    name: &str,
    elem: i32,
    dims: &[Option<usize>],
    sym: &str,
) -> tract_onnx::pb::ValueInfoProto {
    use tract_onnx::pb::{
        tensor_shape_proto::dimension::Value, tensor_shape_proto::Dimension, type_proto,
        TensorShapeProto, TypeProto,
    };
    let dim = |d: &Option<usize>| Dimension {
        value: Some(match d {
            Some(n) => Value::DimValue(*n as i64),
            None => Value::DimParam(sym.to_string()),
        }),
        ..Default::default()
    };
    tract_onnx::pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(TensorShapeProto {
                    dim: dims.iter().map(dim).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_quantise_symmetrically_per_column() {
        let (q, s) = quantize_columns(&[127.0, -0.5, -254.0, 0.25, 0.0, 0.0], 3, 2);
        assert_eq!(s, [2.0, 0.5 / 127.0]);
        assert_eq!(q, [64, -127, -127, 64, 0, 0], "63.5 rounds to even 64");
        let (q, s) = quantize_columns(&[0.0, 0.0], 2, 1);
        assert_eq!((q, s), (vec![0, 0], vec![1.0]));
    }

    /// A reader of just what onnxruntime reads: root → Adapter → parameters → Parameter.
    #[test]
    fn adapter_files_read_back_field_by_field() {
        let f = onnx_adapter_file(
            &[
                ("a.A".into(), vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
                ("b".into(), vec![1], vec![-1.5]),
            ],
            3,
            5,
        );
        let u32_at = |p: usize| u32::from_le_bytes(f[p..p + 4].try_into().unwrap()) as usize;
        let i32_at = |p: usize| i32::from_le_bytes(f[p..p + 4].try_into().unwrap());
        let u16_at = |p: usize| u16::from_le_bytes(f[p..p + 2].try_into().unwrap()) as usize;
        assert_eq!(&f[4..8], b"TORT");
        // Field `i` of the table at `t`, through its vtable.
        let field = |t: usize, i: usize| {
            let vt = (t as i64 - i64::from(i32_at(t))) as usize;
            assert!(4 + 2 * i < u16_at(vt), "field {i} is in the vtable");
            t + u16_at(vt + 4 + 2 * i)
        };
        let root = u32_at(0);
        assert_eq!(
            [0, 1, 2].map(|i| i32_at(field(root, i))),
            [1, 3, 5],
            "format, adapter and model versions"
        );
        let pf = field(root, 3);
        let params = pf + u32_at(pf);
        assert_eq!(u32_at(params), 2);
        let p0 = params + 4 + u32_at(params + 4);
        let nf = field(p0, 0);
        let name = nf + u32_at(nf);
        assert_eq!(&f[name + 4..name + 4 + u32_at(name)], b"a.A");
        let df = field(p0, 1);
        let dims = df + u32_at(df);
        assert_eq!(u32_at(dims), 2);
        assert_eq!((dims + 4) % 8, 0, "dims 8-byte aligned");
        assert_eq!(i32_at(field(p0, 2)), FLOAT);
        let rf = field(p0, 3);
        let raw = rf + u32_at(rf);
        assert_eq!(u32_at(raw), 24);
        assert_eq!((raw + 4) % 8, 0, "raw_data 8-byte aligned (force_align: 8)");
        let v: Vec<f32> = crate::le::f32s_from_le(&f[raw + 4..raw + 28]).collect();
        assert_eq!(v, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}
