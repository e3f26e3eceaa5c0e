//! The bundle's BERT encoder (MiniLM) run by sglora's own fixed-order kernels
//! ([`crate::kernels`]): int8 weights stay int8 in memory, and the output is bit-identical on
//! every platform.
//!
//! The weights are read out of the bundle's `encoder.onnx` by node name, as the pipeline's export
//! (PyTorch → ONNX, weight-only int8) names them: `/model/embeddings/…`,
//! `/model/encoder/layer.N/{attention/self/{query,key,value},attention/output/dense,
//! intermediate/dense,output/dense}/MatMul` behind `DequantizeLinear`, biases on the `Add` that
//! follows each, `LayerNormalization` nodes with their epsilon, the attention scale on
//! `attention/self/Mul`. A file laid out otherwise is refused with a message that names the
//! missing node; `encoder_weights = "fp32"` runs any ONNX encoder through tract instead.
//!
//! The computation is the exported graph's, for unpadded sequences (one, or several side by side
//! whose linear maps run as one product: [`Bert::forward_batch`]): embeddings
//! (inputs + token type 0 + position) → layer norm → per layer: self-attention (softmax of
//! `q·k · scale`), output projection, residual, layer norm, GELU feed-forward, residual, layer
//! norm.

use crate::error::{unsupported, Unsupported};
use crate::kernels::{gelu, layer_norm, softmax, Linear};
use crate::lora::{Lora, Target};
use crate::onnx_graph::Graph;

/// Keys (scores) or channels (context) held in registers at once in the attention loops.
const BLOCK: usize = 16;

/// `BLOCK` values as an array (the slice is that long by construction), so the loops over it
/// have a constant trip count and their accumulators stay in registers.
#[inline(always)]
fn block(x: &[f32]) -> &[f32; BLOCK] {
    x.try_into().expect("a slice of BLOCK values")
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

struct Layer {
    /// Query, key and value side by side (`[tokens, 3·dim]`): the token states are read and
    /// quantised once for the three.
    qkv: Linear,
    o: Linear,
    ln1: Norm,
    up: Linear,
    down: Linear,
    ln2: Norm,
    scale: f32,
}

/// A loaded BERT encoder.
pub struct Bert {
    dim: usize,
    heads: usize,
    /// Position embeddings, `[positions, dim]`.
    pos: Vec<f32>,
    /// Token-type-0 embedding, `[dim]`.
    type0: Vec<f32>,
    ln: Norm,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for Bert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bert")
            .field("dim", &self.dim)
            .field("heads", &self.heads)
            .field("layers", &self.layers.len())
            .finish()
    }
}

fn norm(g: &Graph, node: &str, dim: usize) -> Result<Norm, Unsupported> {
    let n = g.node(node, "LayerNormalization")?;
    let gamma = g.f32s(g.input(n, 1)?)?;
    let beta = g.f32s(g.input(n, 2)?)?;
    if gamma.dims != [dim] || beta.dims != [dim] {
        return Err(unsupported!(
            "{node}: scale/bias shapes {:?}/{:?}",
            gamma.dims,
            beta.dims
        ));
    }
    let axis = g.attr_i64(n, "axis").unwrap_or(-1);
    if axis != -1 {
        return Err(unsupported!("{node}: normalises axis {axis}, expected -1"));
    }
    Ok(Norm {
        gamma: gamma.data,
        beta: beta.data,
        eps: g.attr_f32(n, "epsilon").unwrap_or(1e-5),
    })
}

/// `MatMul` node `p/MatMul` with the bias stored on `p/Add`.
fn linear(
    g: &Graph,
    p: &str,
    inputs: usize,
    outputs: Option<usize>,
    int8_levels: Option<usize>,
) -> Result<Linear, Unsupported> {
    let add = g.node(&format!("{p}/Add"), "Add")?;
    let bias = add
        .input
        .iter()
        .find_map(|i| g.f32s(i).ok())
        .ok_or_else(|| unsupported!("{p}/Add has no stored bias"))?;
    let l = g.matmul(&format!("{p}/MatMul"), Some(bias.data))?;
    if l.inputs() != inputs || outputs.is_some_and(|o| o != l.outputs()) {
        return Err(unsupported!(
            "{p}: weight is {}×{}, expected {inputs}×{}",
            l.inputs(),
            l.outputs(),
            outputs.map_or("?".into(), |o| o.to_string())
        ));
    }
    Ok(match int8_levels {
        Some(levels) => l.with_int8_activations(levels),
        None => l,
    })
}

impl Bert {
    /// Read the encoder out of ONNX bytes; `dim` is the manifest's hidden size. With
    /// `int8_levels` the int8 matmuls quantise their inputs per token to that many int8 levels
    /// and sum exactly in int32 ([`Linear::with_int8_activations`]); without, they run f32 FMA
    /// chains.
    pub fn from_onnx(
        bytes: &[u8],
        dim: usize,
        int8_levels: Option<usize>,
    ) -> Result<Bert, Unsupported> {
        let g = Graph::parse(bytes)?;
        let pos_node = g.node("/model/embeddings/position_embeddings/Gather", "Gather")?;
        let pos = g.f32s(g.input(pos_node, 0)?)?;
        let type_node = g.node("/model/embeddings/token_type_embeddings/Gather", "Gather")?;
        let types = g.f32s(g.input(type_node, 0)?)?;
        if pos.dims.len() != 2
            || pos.dims[1] != dim
            || types.dims.len() != 2
            || types.dims[1] != dim
        {
            return Err(unsupported!(
                "embedding tables {:?}/{:?} do not have width {dim}",
                pos.dims,
                types.dims
            ));
        }
        let ln = norm(&g, "/model/embeddings/LayerNorm/LayerNormalization", dim)?;
        let count = (0..)
            .take_while(|l| {
                let p = format!("/model/encoder/layer.{l}/");
                g.node_names().any(|n| n.starts_with(&p))
            })
            .count();
        if count == 0 {
            return Err("no /model/encoder/layer.0 nodes: not a BERT export".into());
        }
        let mut layers = Vec::with_capacity(count);
        let mut heads = 0;
        for l in 0..count {
            let p = format!("/model/encoder/layer.{l}");
            let scale = g.const_operand(g.node(&format!("{p}/attention/self/Mul"), "Mul")?)?;
            // The exported scale is 1/sqrt(head size).
            let head = (1.0 / (f64::from(scale) * f64::from(scale))).round() as usize;
            if head == 0 || !dim.is_multiple_of(head) {
                return Err(unsupported!(
                    "{p}: attention scale {scale} does not fit width {dim}"
                ));
            }
            heads = dim / head;
            g.node(&format!("{p}/intermediate/intermediate_act_fn/Erf"), "Erf")
                .map_err(|e| unsupported!("{e} (only the erf GELU is supported)"))?;
            g.node(&format!("{p}/attention/self/Softmax"), "Softmax")?;
            let up = linear(
                &g,
                &format!("{p}/intermediate/dense"),
                dim,
                None,
                int8_levels,
            )?;
            let hidden = up.outputs();
            let qkv = ["query", "key", "value"].map(|m| {
                linear(
                    &g,
                    &format!("{p}/attention/self/{m}"),
                    dim,
                    Some(dim),
                    int8_levels,
                )
            });
            let [q, k, v] = qkv;
            layers.push(Layer {
                qkv: Linear::side_by_side(&[q?, k?, v?])?,
                o: linear(
                    &g,
                    &format!("{p}/attention/output/dense"),
                    dim,
                    Some(dim),
                    int8_levels,
                )?,
                ln1: norm(
                    &g,
                    &format!("{p}/attention/output/LayerNorm/LayerNormalization"),
                    dim,
                )?,
                up,
                down: linear(
                    &g,
                    &format!("{p}/output/dense"),
                    hidden,
                    Some(dim),
                    int8_levels,
                )?,
                ln2: norm(&g, &format!("{p}/output/LayerNorm/LayerNormalization"), dim)?,
                scale,
            });
        }
        Ok(Bert {
            dim,
            heads,
            pos: pos.data,
            type0: types.data[..dim].to_vec(),
            ln,
            layers,
        })
    }

    /// Longest sequence the position table allows.
    pub fn max_positions(&self) -> usize {
        self.pos.len() / self.dim
    }

    /// Number of encoder layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// `(inputs, outputs)` of the linear map `target` (the same in every layer).
    pub fn shape(&self, target: Target) -> (usize, usize) {
        let hidden = self.layers.first().map_or(0, |l| l.up.outputs());
        match target {
            Target::Intermediate => (self.dim, hidden),
            Target::Output => (hidden, self.dim),
            _ => (self.dim, self.dim),
        }
    }

    /// Last hidden states of one or more sequences: `h` holds their token embeddings one after
    /// another (`lens[s]` tokens for sequence `s`, consumed), and so does the result, with
    /// `lora`'s low-rank maps added to the maps it adapts (checked against this encoder when it
    /// was read: [`Lora::from_dir`]). Every linear map runs once over all their tokens, so its
    /// weights are read once per batch instead of once per sequence; attention stays within
    /// each sequence. Each sequence's rows are the same bits it gets alone: every operation is
    /// row by row (a token's quantisation, sums and scaling never see another row) or within its
    /// own sequence.
    pub fn forward_batch(
        &self,
        h: Vec<f32>,
        lens: &[usize],
        lora: Option<&Lora>,
    ) -> Result<Vec<f32>, Unsupported> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected. The body is plain Rust, compiled once more with wider
            // vectors: rustc never reassociates or contracts float operations, so the same
            // operations in the same order give the same bits.
            return unsafe { self.forward_avx2(h, lens, lora) };
        }
        self.forward_body(h, lens, lora)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn forward_avx2(
        &self,
        h: Vec<f32>,
        lens: &[usize],
        lora: Option<&Lora>,
    ) -> Result<Vec<f32>, Unsupported> {
        self.forward_body(h, lens, lora)
    }

    #[inline(always)]
    fn forward_body(
        &self,
        mut h: Vec<f32>,
        lens: &[usize],
        lora: Option<&Lora>,
    ) -> Result<Vec<f32>, Unsupported> {
        let d = self.dim;
        if let Some(l) = lora.filter(|l| l.layers() != self.layers.len()) {
            return Err(unsupported!(
                "the adapter was read for {} layers, the encoder has {}",
                l.layers(),
                self.layers.len()
            ));
        }
        let total: usize = lens.iter().sum();
        if h.len() != total * d {
            return Err(unsupported!(
                "{} input values are not the {total} tokens of width {d} of the sequences",
                h.len()
            ));
        }
        if let Some(&t) = lens.iter().find(|&&t| t == 0 || t > self.max_positions()) {
            return Err(unsupported!(
                "a sequence of {t} tokens is not 1..={} tokens",
                self.max_positions()
            ));
        }
        // Where each sequence starts, in rows.
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |at, &t| {
                let s = *at;
                *at += t;
                Some(s)
            })
            .collect();
        for (&s0, &t) in starts.iter().zip(lens) {
            for i in 0..t {
                let row = &mut h[(s0 + i) * d..(s0 + i + 1) * d];
                let p = &self.pos[i * d..(i + 1) * d];
                for ((v, &ty), &pv) in row.iter_mut().zip(&self.type0).zip(p) {
                    *v = *v + ty + pv;
                }
            }
        }
        layer_norm(&mut h, &self.ln.gamma, &self.ln.beta, self.ln.eps);
        let (mut qkv, mut q, mut k, mut v, mut a, mut u, mut f) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut ctx = vec![0.0f32; total * d];
        let mut kt = Vec::new();
        let mut p = Vec::new();
        let (mut lu, mut lt) = (Vec::new(), Vec::new());
        // `y += s·((x·Aᵀ)·Bᵀ)` after the base product, where the adapter changes the map.
        let mut adapt = |layer: usize, target: Target, x: &[f32], y: &mut [f32]| {
            if let Some(delta) = lora.and_then(|l| l.delta(layer, target)) {
                delta.add_to(x, y, &mut lu, &mut lt);
            }
        };
        for (li, l) in self.layers.iter().enumerate() {
            l.qkv.forward(&h, &mut qkv);
            for (m, (out, target)) in [
                (&mut q, Target::Query),
                (&mut k, Target::Key),
                (&mut v, Target::Value),
            ]
            .into_iter()
            .enumerate()
            {
                out.clear();
                for row in qkv.chunks_exact(3 * d) {
                    out.extend_from_slice(&row[m * d..(m + 1) * d]);
                }
                adapt(li, target, &h, out);
            }
            for (&s0, &t) in starts.iter().zip(lens) {
                self.attend(l, &q, &k, &v, s0, t, &mut kt, &mut p, &mut ctx);
            }
            l.o.forward(&ctx, &mut a);
            adapt(li, Target::AttentionOutput, &ctx, &mut a);
            for (x, r) in a.iter_mut().zip(&h) {
                *x += r;
            }
            layer_norm(&mut a, &l.ln1.gamma, &l.ln1.beta, l.ln1.eps);
            l.up.forward(&a, &mut u);
            adapt(li, Target::Intermediate, &a, &mut u);
            gelu(&mut u);
            l.down.forward(&u, &mut f);
            adapt(li, Target::Output, &u, &mut f);
            for (x, r) in f.iter_mut().zip(&a) {
                *x += r;
            }
            layer_norm(&mut f, &l.ln2.gamma, &l.ln2.beta, l.ln2.eps);
            std::mem::swap(&mut h, &mut f);
        }
        Ok(h)
    }

    /// Self-attention of one sequence (rows `s0..s0 + t` of `q`, `k`, `v`) into the same rows
    /// of `ctx`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn attend(
        &self,
        l: &Layer,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s0: usize,
        t: usize,
        kt: &mut Vec<f32>,
        p: &mut Vec<f32>,
        ctx: &mut [f32],
    ) {
        let d = self.dim;
        let hd = d / self.heads;
        let (q, k, v) = (
            &q[s0 * d..(s0 + t) * d],
            &k[s0 * d..(s0 + t) * d],
            &v[s0 * d..(s0 + t) * d],
        );
        let ctx = &mut ctx[s0 * d..(s0 + t) * d];
        // Keys transposed to [dim, tokens] (rows padded with zeros to a whole number of
        // blocks), so one query's scores against all keys are independent chains side by
        // side; each score is still Σ_c q[c]·k[c] summed in c order from 0.
        let tp = t.div_ceil(BLOCK) * BLOCK;
        kt.clear();
        kt.resize(d * tp, 0.0);
        for (j, row) in k.chunks_exact(d).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                kt[c * tp + j] = x;
            }
        }
        let g = Group {
            q,
            kt,
            tp,
            v,
            d,
            hd,
            t,
            scale: l.scale,
        };
        p.clear();
        p.resize(QUERIES * t, 0.0);
        for head in 0..self.heads {
            let c0 = head * hd;
            let mut i = 0;
            while i < t {
                // QUERIES queries at a time share every key and value row read, and their
                // chains run side by side; each is still the same sums in the same order.
                i += g.attend(c0, i, p, ctx);
            }
        }
    }
}

/// Queries of one head attended together ([`Group::attend`]).
const QUERIES: usize = 4;

/// One sequence's queries, keys (transposed, `tp` columns) and values, for [`Group::attend`].
struct Group<'a> {
    q: &'a [f32],
    kt: &'a [f32],
    tp: usize,
    v: &'a [f32],
    d: usize,
    hd: usize,
    t: usize,
    scale: f32,
}

impl Group<'_> {
    /// Attention of queries `i..i + QUERIES` (those below `t`) in the head whose channels start
    /// at `c0`, into their rows of `ctx`; `p` is scratch for QUERIES rows of scores. Past the
    /// last query the group repeats it, and those rows are dropped. Returns how many queries
    /// it attended.
    #[inline(always)]
    fn attend(&self, c0: usize, i: usize, p: &mut [f32], ctx: &mut [f32]) -> usize {
        let (d, hd, t, tp) = (self.d, self.hd, self.t, self.tp);
        let n = (t - i).min(QUERIES);
        let rows: [usize; QUERIES] = std::array::from_fn(|g| (i + g).min(t - 1));
        // Scores p[g][j] = (Σ_c q[i+g][c]·k[j][c]) · scale, c in order from 0; 16 keys at a
        // time in registers for each query (the padding's scores are dropped).
        for j0 in (0..t).step_by(BLOCK) {
            let mut acc = [[0.0f32; BLOCK]; QUERIES];
            for c in 0..hd {
                let at = (c0 + c) * tp + j0;
                let row = block(&self.kt[at..at + BLOCK]);
                let [a0, a1, a2, a3] = &mut acc;
                let q = |g: usize| self.q[rows[g] * d + c0 + c];
                let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
                for x in 0..BLOCK {
                    a0[x] += q0 * row[x];
                    a1[x] += q1 * row[x];
                    a2[x] += q2 * row[x];
                    a3[x] += q3 * row[x];
                }
            }
            let end = (j0 + BLOCK).min(t);
            for (g, acc) in acc.iter().enumerate() {
                for (s, &a) in p[g * t + j0..g * t + end].iter_mut().zip(acc) {
                    *s = a * self.scale;
                }
            }
        }
        for g in 0..n {
            softmax(&mut p[g * t..(g + 1) * t]);
        }
        // Context ctx[i+g][c] = Σ_j p[g][j]·v[j][c], j in order from 0; 16 channels at a time
        // in registers for each query.
        let mut cb = 0;
        while cb < hd {
            let w = (hd - cb).min(BLOCK);
            let mut acc = [[0.0f32; BLOCK]; QUERIES];
            if w == BLOCK {
                for j in 0..t {
                    let at = j * d + c0 + cb;
                    let row = block(&self.v[at..at + BLOCK]);
                    let [a0, a1, a2, a3] = &mut acc;
                    let (p0, p1, p2, p3) = (p[j], p[t + j], p[2 * t + j], p[3 * t + j]);
                    for x in 0..BLOCK {
                        a0[x] += p0 * row[x];
                        a1[x] += p1 * row[x];
                        a2[x] += p2 * row[x];
                        a3[x] += p3 * row[x];
                    }
                }
            } else {
                for j in 0..t {
                    let at = j * d + c0 + cb;
                    let row = &self.v[at..at + w];
                    for (g, acc) in acc.iter_mut().enumerate() {
                        let pj = p[g * t + j];
                        for (a, &y) in acc.iter_mut().zip(row) {
                            *a += pj * y;
                        }
                    }
                }
            }
            for (g, acc) in acc.iter().take(n).enumerate() {
                let at = (i + g) * d + c0 + cb;
                ctx[at..at + w].copy_from_slice(&acc[..w]);
            }
            cb += w;
        }
        n
    }
}
