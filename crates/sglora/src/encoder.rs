//! Sentence encoder: WordPiece tokens ([`crate::tokenizer`]) + the bundle's int8 ONNX MiniLM,
//! mean pooling, L2 norm.
//!
//! Two runtimes ([`Runtime`]): by default sglora's own fixed-order kernels
//! ([`crate::bert`]) keep the int8 matmul weights as int8 (11 MB) and give bit-identical
//! embeddings on every platform, which is what makes a seed's adapter the same on x86 and
//! aarch64. The other settings run the ONNX file through tract, typed with a symbolic sequence
//! length and optimised once (every request reuses the runnable plan), with the weights
//! dequantised at load to fp32 or narrowed to fp16; tract runs any ONNX encoder, but its kernels
//! sum in a different order on each instruction set.
//!
//! The int8 word-embedding table is not loaded at all: each token's row is read from the open,
//! hash-checked file when it is needed (`pread`), so it costs page cache, not process memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::bert::Bert;
use crate::bundle::{offset_in, Bundle};
use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::tokenizer::Tokenizer;

/// Tokens [`Encoder::embed_texts`] runs through the encoder in one batch (several texts side by
/// side; a text longer than this runs alone). Enough rows that every weight panel is reused
/// across many tokens, few enough that a batch's activations stay near the core. Measured once
/// (one core, 32 copies of a 28-token text, against embedding them one by one in the same
/// process): 512 tokens 13 % faster, 256 2 %, 1024 nothing — on a noisy host, so a sound value
/// rather than a tuned optimum (BENCHMARKS.md, section 7, has the end-to-end numbers).
pub const BATCH_TOKENS: usize = 512;

/// Longest text [`Encoder::embed_texts`] accepts. The encoder reads at most the manifest's
/// `max_tokens` (128) tokens of a text, a few hundred bytes of English, and cuts the rest, as
/// sentence-transformers does; a text far longer than that is a caller's mistake, refused
/// before it is tokenised.
pub const MAX_TEXT_BYTES: usize = 64 << 10;

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

/// Which runtime runs the networks, and at which in-memory precision the encoder's matmul
/// weights are held (the bundle's files are not changed). One choice for the library, the CLI
/// and the daemon's `[model] encoder_weights` setting, spelt as in the configuration file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// The platform's best exact choice, [`Runtime::native`]; resolved when a model is loaded.
    #[default]
    Auto,
    /// int8 weights as stored times int8 activations (each token's row quantised on the fly to
    /// an int8 value plus an int8 residual), summed exactly in int32 by sglora's integer kernels
    /// ([`crate::kernels`]): 1 byte per weight, each CPU's integer dot-product instructions,
    /// bit-identical results on every platform (armv7 included).
    Integer,
    /// int8 weights as stored times f32 activations, in fixed-order fused multiply-add chains
    /// (sglora's kernels before the integer path): bit-identical on platforms with hardware FMA,
    /// slow without it.
    Int8,
    /// tract with fp16 weights: 2 bytes per weight; products and sums stay fp32. Relative
    /// rounding of each weight is ≤ 2⁻¹¹, far below the int8 quantisation step the bundle
    /// already applied.
    Fp16,
    /// tract with fp32 weights (its default): 4 bytes per weight; runs any ONNX encoder.
    Fp32,
}

impl Runtime {
    /// `"auto"`, `"integer"`, `"int8"`, `"fp16"` or `"fp32"` (the configuration file's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Auto => "auto",
            Runtime::Integer => "integer",
            Runtime::Int8 => "int8",
            Runtime::Fp16 => "fp16",
            Runtime::Fp32 => "fp32",
        }
    }

    /// Every runtime, in the order the documentation lists them.
    pub const ALL: [Runtime; 5] = [
        Runtime::Auto,
        Runtime::Integer,
        Runtime::Int8,
        Runtime::Fp16,
        Runtime::Fp32,
    ];

    /// [`Runtime::Auto`] made concrete ([`Runtime::native`]); any other choice as it is.
    pub fn resolve(self) -> Runtime {
        match self {
            Runtime::Auto => Runtime::native(),
            r => r,
        }
    }

    /// [`Runtime::Integer`] on every platform: exact integer sums need no particular
    /// instruction set, so x86-64, aarch64 and armv7 give the same bits.
    pub fn native() -> Runtime {
        Runtime::Integer
    }

    /// Whether sglora's own kernels run the networks ([`Runtime::Integer`], [`Runtime::Int8`];
    /// [`Runtime::Auto`] resolved first), rather than tract.
    pub fn is_native(self) -> bool {
        matches!(self.resolve(), Runtime::Integer | Runtime::Int8)
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;

    /// The configuration file's spelling ([`Runtime::name`]).
    fn from_str(s: &str) -> std::result::Result<Runtime, String> {
        Runtime::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Runtime::ALL.iter().map(|r| r.name()).collect();
                format!("unknown runtime {s:?}; use one of {}", names.join(", "))
            })
    }
}

/// Activation levels of the integer runtime: each activation is quantised to an int8 and an int8
/// residual, so a matmul does this many int8 × int8 products per weight.
pub const INTEGER_LEVELS: usize = 2;

/// Weight constants smaller than this stay fp32 (biases, norms): they cost nothing.
const MIN_NARROWED: usize = 4096;

/// Narrow every large fp32 constant that only feeds matrix products to fp16; returns how many.
fn narrow_weights(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::{einsum::EinSum, konst::Const};
    let mut narrowed = 0;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(k) = node.op_as::<Const>() else {
            continue;
        };
        let t = k.val();
        if t.datum_type() != f32::datum_type() || t.len() < MIN_NARROWED {
            continue;
        }
        let only_matmuls = node.outputs[0]
            .successors
            .iter()
            .all(|s| model.nodes[s.node].op_is::<EinSum>());
        if !only_matmuls {
            continue;
        }
        let half = t.cast_to::<f16>()?.into_owned().into_arc_tensor();
        model.nodes[id].outputs[0].fact = TypedFact::try_from(&half)?;
        model.nodes[id].op = Box::new(Const::new(half)?);
        narrowed += 1;
    }
    Ok(narrowed)
}

/// Whether text number `i` is one [`Encoder::embed_texts`] accepts: not empty after trimming, at most
/// [`MAX_TEXT_BYTES`].
pub fn check_text(i: usize, t: &str) -> Result<()> {
    if t.trim().is_empty() {
        return Err(Error::InvalidText(format!("text {i} is empty")));
    }
    if t.len() > MAX_TEXT_BYTES {
        return Err(Error::InvalidText(format!(
            "text {i} is {} bytes long; the limit is {MAX_TEXT_BYTES} bytes (the encoder reads \
             only its first 128 tokens, so cut it to those)",
            t.len()
        )));
    }
    Ok(())
}

/// The int8 word-embedding table: per-row scales in memory, rows read from the open file.
struct Table {
    file: File,
    /// Byte offset of row 0 in the file.
    offset: u64,
    scales: Vec<f32>,
}

/// The network behind the embedding table.
enum Model {
    /// sglora's fixed-order kernels, int8 weights.
    Native(Bert),
    /// A tract plan.
    Tract(Runner),
}

/// Tokeniser, int8 word-embedding table and encoder network.
pub struct Encoder {
    tokenizer: Tokenizer,
    model: Model,
    dim: usize,
    max_tokens: usize,
    table: Table,
    runtime: Runtime,
    /// The bundle's base model id, which adapters must name.
    base_id: String,
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
    weights: Runtime,
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
        let mut typed = model.into_typed()?.into_decluttered()?;
        if weights == Runtime::Fp16 {
            narrow_weights(&mut typed)?;
        }
        typed.into_optimized()?.into_runnable()
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

/// Run a tract encoder plan on `[1, n, d]` token embeddings: last hidden state, `[n, d]`.
fn run_tract(plan: &Runner, embeds: Vec<f32>, n: usize, d: usize) -> TractResult<Vec<f32>> {
    let input = Tensor::from_shape(&[1, n, d], &embeds)?;
    let mask = Tensor::from_shape(&[1, n], &vec![1i64; n])?;
    let out = plan.run(tvec!(input.into(), mask.into()))?;
    let view = out[0].to_plain_array_view::<f32>()?;
    let shape = view.shape().to_vec();
    if shape != [1, n, d] {
        return Err(TractError::msg(format!(
            "encoder output shape {shape:?}, expected [1, {n}, {d}]"
        )));
    }
    Ok(view.iter().copied().collect())
}

/// Check the int8 word-embedding file and keep it open; only the per-row scales are loaded.
fn open_table(bundle: &Bundle, dim: usize) -> Result<Table> {
    let (file, bytes) = bundle.open_checked(&bundle.manifest.encoder.embeddings)?;
    let (rows, scales) = table_parts(bundle, &bytes, dim)?;
    let offset = offset_in(&bytes, rows);
    Ok(Table {
        file,
        offset,
        scales,
    })
}

/// The int8 rows (`[vocab, dim]`, as stored in `bytes`, the embeddings file) and the per-row
/// scales of the bundle's word-embedding table, checked.
pub(crate) fn table_parts<'a>(
    bundle: &Bundle,
    bytes: &'a [u8],
    dim: usize,
) -> Result<(&'a [u8], Vec<f32>)> {
    use safetensors::{Dtype, SafeTensors};
    let path = bundle.path(&bundle.manifest.encoder.embeddings);
    let st = SafeTensors::deserialize(bytes)
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
    Ok((t.data(), crate::le::f32s_from_le(s.data()).collect()))
}

impl Encoder {
    /// Load the tokenizer and the encoder of a bundle, on [`Runtime::native`].
    pub fn load(bundle: &Bundle) -> Result<Encoder> {
        Encoder::load_with(bundle, Runtime::Auto)
    }

    /// Load on the given runtime ([`Runtime::Auto`] is resolved here).
    pub fn load_with(bundle: &Bundle, runtime: Runtime) -> Result<Encoder> {
        let weights = runtime.resolve();
        let spec = &bundle.manifest.encoder;
        let tok_path = bundle.path(&spec.tokenizer);
        let tokenizer = Tokenizer::from_json(&bundle.read(&spec.tokenizer)?, spec.max_tokens)
            .map_err(|e| {
                Error::bundle(&tok_path, format!("not a supported tokenizer.json: {e}"))
            })?;
        let table = open_table(bundle, spec.dim)?;
        let model = if weights.is_native() {
            // Two int8 levels per activation (int8 and its int8 residual): one level alone moves
            // embeddings too far from the float model (models/README.md, "Integer kernels").
            let levels = (weights == Runtime::Integer).then_some(INTEGER_LEVELS);
            let bytes = bundle.read(&spec.file)?;
            let bert = Bert::from_onnx(&bytes, spec.dim, levels).map_err(|e| {
                Error::bundle(
                    bundle.path(&spec.file),
                    format!(
                        "cannot be run by sglora's kernels: {e}; set [model] \
                         encoder_weights = \"fp32\" to run it through tract instead"
                    ),
                )
            })?;
            if bert.max_positions() < spec.max_tokens {
                return Err(Error::bundle(
                    bundle.path(&spec.file),
                    format!(
                        "has {} positions, fewer than max_tokens = {}",
                        bert.max_positions(),
                        spec.max_tokens
                    ),
                ));
            }
            Model::Native(bert)
        } else {
            let facts = [
                (f32::datum_type(), vec![Some(1), None, Some(spec.dim)]),
                (i64::datum_type(), vec![Some(1), None]),
            ];
            Model::Tract(load_onnx(bundle, &spec.file, &facts, "encoder", weights)?)
        };
        Ok(Encoder {
            tokenizer,
            model,
            dim: spec.dim,
            max_tokens: spec.max_tokens,
            table,
            runtime: weights,
            base_id: bundle.manifest.base_model.id.clone(),
        })
    }

    /// Read a PEFT LoRA adapter directory (ours or one trained elsewhere) and check that it
    /// applies to this encoder: the same base model, LoRA on BERT's linear maps, shapes that
    /// fit. Only sglora's own kernels ([`Runtime::is_native`]) apply adapters.
    pub fn load_adapter(&self, dir: &std::path::Path) -> Result<Lora> {
        let Model::Native(bert) = &self.model else {
            return Err(Error::InvalidOption(format!(
                "adapters are applied by sglora's own kernels only, and this encoder runs on \
                 tract ({}); load it with the default runtime (encoder_weights = \"auto\")",
                self.runtime.name()
            )));
        };
        Lora::from_dir(dir, &self.base_id, bert.layers(), |t| bert.shape(t))
    }

    /// [`Encoder::load_adapter`] on the contents of `adapter_config.json` and
    /// `adapter_model.safetensors` (received as file descriptors, say); `label` names the
    /// adapter in errors.
    pub fn load_adapter_bytes(
        &self,
        label: &std::path::Path,
        config: &[u8],
        weights: &[u8],
    ) -> Result<Lora> {
        let Model::Native(bert) = &self.model else {
            return Err(Error::InvalidOption(format!(
                "adapters are applied by sglora's own kernels only, and this encoder runs on \
                 tract ({}); load it with the default runtime (encoder_weights = \"auto\")",
                self.runtime.name()
            )));
        };
        Lora::from_bytes(label, config, weights, &self.base_id, bert.layers(), |t| {
            bert.shape(t)
        })
    }

    /// Token ids (with special tokens, truncated) of `text`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text))
    }

    /// Embed token ids: run the encoder, mean-pool over tokens, L2-normalise.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Embedding> {
        self.embed_ids_with(ids, None)
    }

    /// [`Encoder::embed_ids`] with an adapter applied ([`Encoder::load_adapter`]).
    pub fn embed_ids_with(&self, ids: &[u32], lora: Option<&Lora>) -> Result<Embedding> {
        let hidden = self.hidden_states(&[ids], lora)?;
        Ok(self.pool(&hidden))
    }

    /// [`Encoder::embed_ids`] and the final-layer token states it pooled (`[tokens, dim]`
    /// row-major), which the relation head reads ([`crate::RelationHead::read`]).
    pub fn embed_ids_and_states(&self, ids: &[u32]) -> Result<(Embedding, Vec<f32>)> {
        let hidden = self.hidden_states(&[ids], None)?;
        Ok((self.pool(&hidden), hidden))
    }

    /// Appends the input embeddings of `ids` (the bundle's int8 rows times their scales) to
    /// `embeds`.
    fn look_up(&self, ids: &[u32], embeds: &mut Vec<f32>) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::InvalidDescription(
                "the description produced no tokens".into(),
            ));
        }
        let d = self.dim;
        embeds.reserve(ids.len() * d);
        let mut row = vec![0u8; d];
        for &id in ids {
            let i = id as usize;
            let Some(scale) = self.table.scales.get(i) else {
                return Err(Error::model(
                    "encoder",
                    format!("token id {id} is outside the embedding table"),
                ));
            };
            let at = self.table.offset + (i * d) as u64;
            self.table.file.read_exact_at(&mut row, at).map_err(|e| {
                Error::model(
                    "encoder",
                    format!("cannot read row {id} of the embedding table: {e}"),
                )
            })?;
            embeds.extend(row.iter().map(|&q| f32::from(q as i8) * scale));
        }
        Ok(())
    }

    /// Embeddings of several token-id sequences ([`Encoder::hidden_states`], pooled each).
    fn embed_batch(&self, batch: &[Vec<u32>], lora: Option<&Lora>) -> Result<Vec<Embedding>> {
        let hidden = self.hidden_states(batch, lora)?;
        let mut at = 0;
        Ok(batch
            .iter()
            .map(|ids| {
                let rows = &hidden[at * self.dim..(at + ids.len()) * self.dim];
                at += ids.len();
                self.pool(rows)
            })
            .collect())
    }

    /// The encoder's final-layer token states of several token-id sequences, one after another
    /// (`[Σ lens, dim]`): on sglora's kernels one batched pass
    /// ([`crate::bert::Bert::forward_batch`], each sequence's bits as it alone would get), on
    /// tract one pass per sequence.
    fn hidden_states<I: AsRef<[u32]>>(&self, batch: &[I], lora: Option<&Lora>) -> Result<Vec<f32>> {
        let d = self.dim;
        let lens: Vec<usize> = batch.iter().map(|ids| ids.as_ref().len()).collect();
        let total: usize = lens.iter().sum();
        let mut embeds = Vec::with_capacity(total * d);
        for ids in batch {
            self.look_up(ids.as_ref(), &mut embeds)?;
        }
        let hidden = match &self.model {
            Model::Native(bert) => bert
                .forward_batch(embeds, &lens, lora)
                .map_err(|e| Error::model("encoder", e))?,
            Model::Tract(_) if lora.is_some() => {
                return Err(Error::InvalidOption(
                    "adapters are applied by sglora's own kernels only".into(),
                ))
            }
            Model::Tract(plan) => {
                let mut out = Vec::with_capacity(total * d);
                let mut at = 0;
                for &n in &lens {
                    let rows = embeds[at * d..(at + n) * d].to_vec();
                    out.extend(
                        run_tract(plan, rows, n, d).map_err(|e| Error::model("encoder", e))?,
                    );
                    at += n;
                }
                out
            }
        };
        if hidden.len() != total * d {
            return Err(Error::model(
                "encoder",
                format!("output has {} values, expected {total}×{d}", hidden.len()),
            ));
        }
        Ok(hidden)
    }

    /// Mean over the token states `[n, dim]`, L2-normalised: the mean and the norm in f64, in
    /// index order.
    fn pool(&self, hidden: &[f32]) -> Embedding {
        let d = self.dim;
        let n = hidden.len() / d;
        let mut acc = vec![0f64; d];
        for row in hidden.chunks_exact(d) {
            for (a, x) in acc.iter_mut().zip(row) {
                *a += f64::from(*x);
            }
        }
        let norm = acc.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        let vector = acc.iter().map(|x| (x / norm) as f32).collect();
        Embedding {
            vector,
            tokens: n,
            truncated: n >= self.max_tokens,
        }
    }

    /// Tokenise and embed.
    pub fn embed(&self, text: &str) -> Result<Embedding> {
        self.embed_ids(&self.tokenize(text)?)
    }

    /// Embed many texts, with an adapter applied or not, on up to `threads` threads; the
    /// embeddings come back in input order and each is the same bits as [`Encoder::embed`]
    /// (with the adapter: [`Encoder::embed_ids_with`]) gives for it alone. Every text is checked
    /// first (non-empty, at most [`MAX_TEXT_BYTES`]), so a bad one fails the call before any
    /// work, naming its index. Consecutive texts run through the encoder together, up to
    /// [`BATCH_TOKENS`] tokens at a time, so each batch reads the weights once.
    pub fn embed_texts<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        lora: Option<&Lora>,
        threads: usize,
    ) -> Result<Vec<Embedding>> {
        for (i, t) in texts.iter().enumerate() {
            check_text(i, t.as_ref())?;
        }
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        // Batches of consecutive texts, each at most BATCH_TOKENS tokens (a longer text alone).
        let mut batches: Vec<&[Vec<u32>]> = Vec::new();
        let (mut from, mut tokens) = (0, 0);
        for (i, x) in ids.iter().enumerate() {
            if i > from && tokens + x.len() > BATCH_TOKENS {
                batches.push(&ids[from..i]);
                (from, tokens) = (i, 0);
            }
            tokens += x.len();
        }
        if from < ids.len() {
            batches.push(&ids[from..]);
        }
        let threads = threads.clamp(1, batches.len().max(1));
        if threads == 1 {
            let mut out = Vec::with_capacity(texts.len());
            for b in batches {
                out.extend(self.embed_batch(b, lora)?);
            }
            return Ok(out);
        }
        // Batches are dealt out by index; each thread returns what it embedded.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done: Vec<Vec<(usize, Result<Vec<Embedding>>)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(b) = batches.get(i) else { break mine };
                            mine.push((i, self.embed_batch(b, lora)));
                        }
                    })
                })
                .collect();
            // A worker that panicked returns nothing; its batches are reported below.
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let mut by_batch: Vec<Option<Result<Vec<Embedding>>>> =
            (0..batches.len()).map(|_| None).collect();
        for (i, r) in done.into_iter().flatten() {
            by_batch[i] = Some(r);
        }
        let mut out = Vec::with_capacity(texts.len());
        for r in by_batch {
            out.extend(
                r.unwrap_or_else(|| Err(Error::model("encoder", "a worker thread failed")))?,
            );
        }
        Ok(out)
    }

    /// Embedding size.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The runtime the encoder was loaded on (never [`Runtime::Auto`]).
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }
}
