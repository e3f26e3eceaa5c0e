//! Sentence encoder: `tokenizer.json` + int8 ONNX MiniLM run by tract, mean pooling, L2 norm.
//!
//! The model is loaded, typed with a symbolic sequence length and optimised once; every request
//! reuses the same runnable plan.

use std::sync::Arc;

use tokenizers::{Tokenizer, TruncationParams};
use tract_onnx::prelude::*;

use crate::bundle::Bundle;
use crate::error::{Error, Result};

/// A runnable, optimised tract plan.
pub type Plan = Arc<TypedRunnableModel>;

/// Description embedding with the number of tokens it was computed from.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// L2-normalised vector.
    pub vector: Vec<f32>,
    /// Tokens used (after truncation, special tokens included).
    pub tokens: usize,
    /// Whether the text was cut at the manifest's `max_tokens`.
    pub truncated: bool,
}

/// Tokeniser, int8 word-embedding table and encoder plan.
pub struct Encoder {
    tokenizer: Tokenizer,
    plan: Runner,
    dim: usize,
    max_tokens: usize,
    table: Vec<i8>,
    scales: Vec<f32>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("dim", &self.dim)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

/// An optimised plan and the run states kept between calls, so each run reuses the scratch
/// buffers of an earlier one instead of allocating a fresh session (one state per thread that
/// runs concurrently).
pub struct Runner {
    plan: Plan,
    states: std::sync::Mutex<Vec<TypedSimpleState>>,
}

impl Runner {
    fn new(plan: Plan) -> Runner {
        Runner {
            plan,
            states: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Run the plan on `inputs`.
    pub fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let pooled = self.states.lock().ok().and_then(|mut v| v.pop());
        let mut state = match pooled {
            Some(s) => s,
            None => self.plan.spawn()?,
        };
        let out = state.run(inputs)?;
        if let Ok(mut v) = self.states.lock() {
            v.push(state);
        }
        Ok(out)
    }
}

/// Load an ONNX file, tolerating onnxruntime-written shape annotations that clash with our facts.
pub(crate) fn load_onnx(
    bundle: &Bundle,
    name: &str,
    facts: &[(DatumType, Vec<Option<usize>>)],
    stage: &'static str,
) -> Result<Runner> {
    let bytes = bundle.read(name)?;
    let build = || -> TractResult<Plan> {
        let mut model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_read(&mut bytes.as_slice())?;
        let s = model.sym("S");
        for (i, (dt, shape)) in facts.iter().enumerate() {
            let dims: TVec<TDim> = shape
                .iter()
                .map(|d| {
                    d.map(|x| TDim::from(x as i64))
                        .unwrap_or_else(|| s.clone().into())
                })
                .collect();
            model.set_input_fact(i, InferenceFact::dt_shape(*dt, dims))?;
        }
        model.into_optimized()?.into_runnable()
    };
    let build = || build().map(Runner::new);
    // The bytes matched the manifest's hash, so a file tract cannot load is a defective bundle
    // (built for another format, or damaged before it was pinned), not a runtime failure.
    build().map_err(|e| {
        Error::bundle(
            bundle.path(name),
            format!("cannot be loaded as the {stage} model: {e:#}"),
        )
    })
}

/// Read the int8 word-embedding table and its per-row scales.
fn load_table(bundle: &Bundle, dim: usize) -> Result<(Vec<i8>, Vec<f32>)> {
    use safetensors::{Dtype, SafeTensors};
    let name = &bundle.manifest.encoder.embeddings;
    let path = bundle.path(name);
    let bytes = bundle.read(name)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::bundle(&path, format!("not a valid safetensors file: {e}")))?;
    let t = st
        .tensor("word_embeddings")
        .map_err(|e| Error::bundle(&path, format!("word_embeddings: {e}")))?;
    let s = st
        .tensor("word_embeddings_scale")
        .map_err(|e| Error::bundle(&path, format!("word_embeddings_scale: {e}")))?;
    let vocab = s.shape().first().copied().unwrap_or(0);
    if t.dtype() != Dtype::I8
        || t.shape() != [vocab, dim]
        || s.dtype() != Dtype::F32
        || s.shape() != [vocab]
    {
        return Err(Error::bundle(
            &path,
            format!("expected word_embeddings I8 [vocab, {dim}] and word_embeddings_scale F32 [vocab], found {:?} {:?} and {:?} {:?}", t.dtype(), t.shape(), s.dtype(), s.shape()),
        ));
    }
    let table = t.data().iter().map(|&b| b as i8).collect();
    let scales = s
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((table, scales))
}

impl Encoder {
    /// Load the tokenizer and the encoder of a bundle.
    pub fn load(bundle: &Bundle) -> Result<Encoder> {
        let spec = &bundle.manifest.encoder;
        let tok_path = bundle.path(&spec.tokenizer);
        let mut tokenizer = Tokenizer::from_bytes(bundle.read(&spec.tokenizer)?)
            .map_err(|e| Error::bundle(&tok_path, format!("not a valid tokenizer.json: {e}")))?;
        // The packaged tokenizer pads to 128 tokens; a batch of one needs no padding.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| Error::bundle(&tok_path, format!("cannot set truncation: {e}")))?;
        let (table, scales) = load_table(bundle, spec.dim)?;
        let facts = [
            (f32::datum_type(), vec![Some(1), None, Some(spec.dim)]),
            (i64::datum_type(), vec![Some(1), None]),
        ];
        let plan = load_onnx(bundle, &spec.file, &facts, "encoder")?;
        Ok(Encoder {
            tokenizer,
            plan,
            dim: spec.dim,
            max_tokens: spec.max_tokens,
            table,
            scales,
        })
    }

    /// Token ids (with special tokens, truncated) of `text`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::model("tokenizer", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Embed token ids: run the encoder, mean-pool over tokens, L2-normalise.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Embedding> {
        if ids.is_empty() {
            return Err(Error::InvalidDescription(
                "the description produced no tokens".into(),
            ));
        }
        let n = ids.len();
        let d = self.dim;
        let mut embeds = Vec::with_capacity(n * d);
        for &id in ids {
            let i = id as usize;
            let Some(scale) = self.scales.get(i) else {
                return Err(Error::model(
                    "encoder",
                    format!("token id {id} is outside the embedding table"),
                ));
            };
            embeds.extend(
                self.table[i * d..(i + 1) * d]
                    .iter()
                    .map(|&q| f32::from(q) * scale),
            );
        }
        let run = || -> TractResult<Vec<f32>> {
            let input = Tensor::from_shape(&[1, n, d], &embeds)?;
            let mask = Tensor::from_shape(&[1, n], &vec![1i64; n])?;
            let out = self.plan.run(tvec!(input.into(), mask.into()))?;
            let view = out[0].to_plain_array_view::<f32>()?;
            let shape = view.shape().to_vec();
            if shape != [1, n, self.dim] {
                anyhow::bail!(
                    "encoder output shape {shape:?}, expected [1, {n}, {}]",
                    self.dim
                );
            }
            let mut acc = vec![0f64; self.dim];
            let data: Vec<f32> = view.iter().copied().collect();
            for row in data.chunks_exact(self.dim) {
                for (a, x) in acc.iter_mut().zip(row) {
                    *a += f64::from(*x);
                }
            }
            let norm = acc.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            Ok(acc.iter().map(|x| (x / norm) as f32).collect())
        };
        let vector = run().map_err(|e| Error::model("encoder", e))?;
        Ok(Embedding {
            vector,
            tokens: n,
            truncated: n >= self.max_tokens,
        })
    }

    /// Tokenise and embed.
    pub fn embed(&self, text: &str) -> Result<Embedding> {
        self.embed_ids(&self.tokenize(text)?)
    }

    /// Embedding size.
    pub fn dim(&self) -> usize {
        self.dim
    }
}
