//! The model bundle: `manifest.json` plus the files it lists (format in `models/BUNDLE.md`).
//!
//! Opening a bundle checks every listed file's size and SHA-256 and the consistency of the LoRA
//! layout, so later stages can trust shapes without re-checking them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The bundle format version this library reads (2: per-expert retrieval keys and an
/// expected-gain model; format 1 is refused).
pub const FORMAT_VERSION: u32 = 2;

/// Most retrieval keys one expert may have (a sanity bound against lying manifests).
pub const MAX_KEYS_PER_EXPERT: usize = 1024;

/// Largest LoRA parameter vector a bundle may describe (a sanity bound against lying manifests:
/// 2^28 f32 values are 1 GiB).
pub const MAX_FLAT_DIM: usize = 1 << 28;

/// `manifest.json`, as written by `models/pipeline/export.py`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Always `"sglora-bundle"`.
    pub format: String,
    /// Format version; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// `"full"` or `"tiny"` (the CI smoke bundle).
    pub mode: String,
    /// Short identifier derived from the files' hashes.
    pub bundle_id: String,
    /// The model the adapters apply to.
    pub base_model: BaseModel,
    /// Sentence encoder settings.
    pub encoder: EncoderSpec,
    /// LoRA layout of generated adapters.
    pub lora: LoraSpec,
    /// The expert repository.
    pub experts: ExpertsSpec,
    /// Retrieval settings.
    pub prior: PriorSpec,
    /// How an expert's retrieval score is computed from its keys.
    pub retrieval: RetrievalSpec,
    /// The model of the expected R@1 gain of a generated adapter.
    pub expected_gain: ExpectedGainSpec,
    /// The CVAE files.
    pub cvae: CvaeSpec,
    /// Out-of-distribution guard.
    pub ood: OodSpec,
    /// Every file of the bundle with its SHA-256 and size.
    pub files: BTreeMap<String, FileEntry>,
}

/// Base model identity.
#[derive(Debug, Clone, Deserialize)]
pub struct BaseModel {
    /// Hugging Face id, written into `adapter_config.json`.
    pub id: String,
    /// Hidden size.
    pub hidden: usize,
}

/// Sentence encoder settings.
#[derive(Debug, Clone, Deserialize)]
pub struct EncoderSpec {
    /// ONNX file (int8).
    pub file: String,
    /// `tokenizer.json` file.
    pub tokenizer: String,
    /// Word-embedding table (`word_embeddings` I8 `[vocab, dim]`, `word_embeddings_scale` F32
    /// `[vocab]`); the lookup happens before the ONNX graph, whose input is `inputs_embeds`.
    pub embeddings: String,
    /// Truncation length in tokens.
    pub max_tokens: usize,
    /// Pooling (`"mean"`).
    pub pooling: String,
    /// Normalisation (`"l2"`).
    pub normalize: String,
    /// Embedding size.
    pub dim: usize,
}

/// One LoRA module: where its B matrix sits in the flat vector and its tensor names.
#[derive(Debug, Clone, Deserialize)]
pub struct LayoutEntry {
    /// Module path in the PEFT model.
    pub module: String,
    /// Tensor name of A in `adapter_model.safetensors`.
    #[serde(rename = "lora_A")]
    pub lora_a: String,
    /// Shape of A: `[r, in_features]`.
    #[serde(rename = "lora_A_shape")]
    pub lora_a_shape: Vec<usize>,
    /// Tensor name of B.
    #[serde(rename = "lora_B")]
    pub lora_b: String,
    /// Shape of B: `[out_features, r]`.
    #[serde(rename = "lora_B_shape")]
    pub lora_b_shape: Vec<usize>,
    /// Offset of B in the flat vector.
    pub offset: usize,
    /// Number of elements of B.
    pub len: usize,
}

/// LoRA layout.
#[derive(Debug, Clone, Deserialize)]
pub struct LoraSpec {
    /// `"LORA"`.
    pub peft_type: String,
    /// LoRA rank r.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Target module names.
    pub target_modules: Vec<String>,
    /// Tensor dtype of written adapters: `"F32"`, `"F16"` or `"BF16"`.
    pub dtype: String,
    /// Length of the flat parameter vector.
    pub flat_dim: usize,
    /// `"shared-frozen"`: A is the same for all experts and stored in the experts file.
    pub a_mode: String,
    /// Modules in flat-vector order.
    pub layout: Vec<LayoutEntry>,
    /// The `adapter_config.json` PEFT writes for this layout.
    pub adapter_config: serde_json::Value,
}

/// Expert repository files.
#[derive(Debug, Clone, Deserialize)]
pub struct ExpertsSpec {
    /// safetensors file with the retrieval keys (`retrieval.keys`), `mu`, `var`, `norm_mean`,
    /// `norm_std`, `lora_A`.
    pub file: String,
    /// JSON file with names and descriptions.
    pub meta: String,
    /// Number of experts.
    pub count: usize,
}

/// Retrieval settings.
#[derive(Debug, Clone, Deserialize)]
pub struct PriorSpec {
    /// Number of experts mixed.
    pub top_k: usize,
    /// Softmax temperature over the retrieval scores.
    pub temperature: f64,
}

/// How an expert's retrieval score is computed: `manifest.retrieval`.
#[derive(Debug, Clone, Deserialize)]
pub struct RetrievalSpec {
    /// Name of the keys tensor in the experts file (F32 `[n, keys_per_expert, encoder.dim]`,
    /// each row L2-normalised).
    pub keys: String,
    /// Keys per expert, m ≥ 1.
    pub keys_per_expert: usize,
    /// Size of a key: `encoder.dim` without a projection (absent means that), the projection's
    /// output size with one.
    #[serde(default)]
    pub key_dim: Option<usize>,
    /// Name of the optional projection tensor in the experts file (F32 `[key_dim, encoder.dim]`):
    /// a request embedding `q` is scored as `P q / |P q|`; `null` or absent: none.
    #[serde(default)]
    pub projection: Option<String>,
    /// Score kind; only `"mean_top"` (the mean of the `top` largest dot products).
    pub score: String,
    /// How many of an expert's key similarities are averaged, 1 ..= `keys_per_expert`.
    pub top: usize,
    /// How the keys and `top` were chosen (documentation).
    #[serde(default)]
    pub selection: String,
    /// The optional relation head ([`crate::relation`]): which relation a request asks for, read
    /// from the encoder's token states, added to every expert's score. `null` or absent: none
    /// (bundles before it load unchanged).
    #[serde(default)]
    pub relation_head: Option<RelationHeadSpec>,
}

/// `manifest.retrieval.relation_head`: a linear head over the encoder's final-layer token states,
/// max-pooled over tokens, whose log-probabilities add `gamma · ln(R · p(relation of the
/// expert))` to each expert's score (0 for an expert whose relation is not listed).
#[derive(Debug, Clone, Deserialize)]
pub struct RelationHeadSpec {
    /// Name of the weight tensor in the experts file (F32 `[R, encoder.dim]`).
    pub weight: String,
    /// Name of the bias tensor in the experts file (F32 `[R]`).
    pub bias: String,
    /// The head's relations, in row order (R ≥ 2, distinct, matched against
    /// `experts.json`'s `relation`).
    pub relations: Vec<String>,
    /// Weight of the relation term, finite and ≥ 0.
    pub gamma: f64,
    /// Pooling over tokens; only `"max"`.
    pub pool: String,
    /// How the head and `gamma` were chosen (documentation).
    #[serde(default)]
    pub selection: String,
}

impl RelationHeadSpec {
    /// Why this head cannot be used, if it cannot.
    fn check(&self) -> std::result::Result<(), String> {
        if self.pool != "max" {
            return Err(format!(
                "retrieval.relation_head.pool {:?} is not supported (this sglora knows \"max\")",
                self.pool
            ));
        }
        if !(2..=4096).contains(&self.relations.len()) {
            return Err(format!(
                "retrieval.relation_head lists {} relations, expected 2 ..= 4096",
                self.relations.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(r) = self.relations.iter().find(|r| !seen.insert(r.as_str())) {
            return Err(format!(
                "retrieval.relation_head lists relation {r:?} twice"
            ));
        }
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(format!(
                "retrieval.relation_head.gamma is {}, expected a finite number >= 0",
                self.gamma
            ));
        }
        Ok(())
    }
}

impl RetrievalSpec {
    /// The size of a key (`key_dim`, or `encoder.dim` when absent).
    pub fn key_dim(&self, encoder_dim: usize) -> usize {
        self.key_dim.unwrap_or(encoder_dim)
    }
}

/// The linear model of the expected R@1 gain: `manifest.expected_gain`. Keys other than these
/// (e.g. `calibration`) are informational and ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ExpectedGainSpec {
    /// Unit of the estimate; `"R@1 points"`.
    pub unit: String,
    /// Model kind; `"linear"`.
    pub model: String,
    /// Feature names, in `coef` order (see `crate::gain::Feature`).
    pub features: Vec<String>,
    /// Constant term.
    pub intercept: f64,
    /// One coefficient per feature.
    pub coef: Vec<f64>,
    /// Prediction interval, as offsets from the estimate.
    pub interval: GainIntervalSpec,
    /// What the model was fitted on (documentation).
    #[serde(default)]
    pub fitted_on: String,
}

/// `expected_gain.interval`: `[estimate + low, estimate + high]` covers the true gain with
/// probability `level` (on the data it was fitted on).
#[derive(Debug, Clone, Deserialize)]
pub struct GainIntervalSpec {
    /// Coverage, in (0, 1).
    pub level: f64,
    /// Lower offset.
    pub low: f64,
    /// Upper offset.
    pub high: f64,
}

/// CVAE files and sizes.
#[derive(Debug, Clone, Deserialize)]
pub struct CvaeSpec {
    /// Prior network `p(z|c)`.
    pub prior_file: String,
    /// Decoder `p(x|z,c)`.
    pub decoder_file: String,
    /// Latent size.
    pub z_dim: usize,
    /// Condition size.
    pub cond_dim: usize,
    /// Default scale of the sampled noise (0 = prior mean).
    pub noise_scale: f64,
}

/// Out-of-distribution guard.
#[derive(Debug, Clone, Deserialize)]
pub struct OodSpec {
    /// Refuse when the best expert similarity is below this.
    pub min_similarity: f64,
    /// Refuse when the scope classifier scores the description below its `min_score`
    /// (optional; bundles built before it have none).
    #[serde(default)]
    pub scope: Option<ScopeSpec>,
}

/// `ood.scope`: a linear classifier of the description embedding (see the `scope` module).
/// Other keys (`fitted_on`, `rule`) are informational and ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ScopeSpec {
    /// `"linear"`, the only kind.
    pub kind: String,
    /// `w`, one per embedding dimension.
    pub weights: Vec<f64>,
    /// `b`.
    pub bias: f64,
    /// In scope when `w · e + b >= min_score`.
    pub min_score: f64,
}

/// The first keys of a manifest: which format and version it is.
#[derive(Deserialize)]
struct Header {
    format: String,
    format_version: u32,
}

fn check_header(h: &Header) -> std::result::Result<(), String> {
    if h.format != "sglora-bundle" {
        return Err(format!(
            "format is {:?}, expected \"sglora-bundle\"",
            h.format
        ));
    }
    match h.format_version {
        FORMAT_VERSION => Ok(()),
        1 => Err(format!(
            "bundle format 1 is no longer read: this sglora reads format {FORMAT_VERSION} \
             (per-expert retrieval keys); rebuild it with `make models` or use the bundle shipped \
             with this version"
        )),
        v => Err(format!(
            "format_version {v} is not supported by this sglora (reads {FORMAT_VERSION}); \
             rebuild the bundle or upgrade sglora"
        )),
    }
}

/// A bundle file's hash and size.
#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    /// Hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// An opened and verified bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Bundle directory.
    pub dir: PathBuf,
    /// Parsed manifest.
    pub manifest: Manifest,
    /// SHA-256 of `manifest.json` (which pins every file): the bundle hash.
    pub hash: String,
}

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn size_problem(got: u64, want: u64) -> String {
    format!("size is {got} bytes, the manifest says {want} (truncated or replaced?)")
}

/// Byte offset in a file of `part`, a slice borrowed from `whole` (the file's bytes): where a
/// parsed safetensors tensor's data starts, for reading it again with `pread`.
pub(crate) fn offset_in(whole: &[u8], part: &[u8]) -> u64 {
    (part.as_ptr() as usize - whole.as_ptr() as usize) as u64
}

/// What is wrong with `bytes` as the file `entry` describes, if anything.
/// The largest `manifest.json` accepted (real ones are a few KiB).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Open `path` (a link is followed to its target) and read it whole, provided it is a regular
/// file of at most `max` bytes: a link to `/dev/zero`, a FIFO or a huge file is refused before a
/// byte is read, and a file that grows while it is read is read no further than `max + 1`.
fn read_regular(path: &Path, max: u64) -> std::result::Result<(fs::File, Vec<u8>), ReadProblem> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that opening a FIFO does not wait for a writer (it is refused below).
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(ReadProblem::Io)?;
    let meta = file.metadata().map_err(ReadProblem::Io)?;
    if !meta.is_file() {
        return Err(ReadProblem::NotRegular);
    }
    if meta.len() > max {
        return Err(ReadProblem::TooLong(meta.len()));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    (&file)
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadProblem::Io)?;
    if bytes.len() as u64 > max {
        return Err(ReadProblem::TooLong(bytes.len() as u64));
    }
    Ok((file, bytes))
}

/// Why [`read_regular`] refused.
enum ReadProblem {
    Io(std::io::Error),
    NotRegular,
    TooLong(u64),
}

impl ReadProblem {
    fn describe(&self, max: u64) -> String {
        match self {
            ReadProblem::Io(e) => format!("cannot read: {e}"),
            ReadProblem::NotRegular => {
                "is not a regular file (a device, FIFO, directory or a link to one)".into()
            }
            ReadProblem::TooLong(n) => format!("is {n} bytes or more, at most {max} expected"),
        }
    }
}

fn check_bytes(entry: &FileEntry, bytes: &[u8]) -> Option<String> {
    if bytes.len() as u64 != entry.bytes {
        return Some(size_problem(bytes.len() as u64, entry.bytes));
    }
    let got = sha256_hex(bytes);
    (got != entry.sha256).then(|| {
        format!(
            "sha256 is {got}, the manifest says {} (corrupted?)",
            entry.sha256
        )
    })
}

/// A problem found by [`Bundle::verify_files`].
#[derive(Debug, Clone)]
pub struct FileProblem {
    /// File name inside the bundle.
    pub file: String,
    /// What is wrong.
    pub what: String,
}

impl Bundle {
    /// Open `dir`, parse its manifest, check the layout and every file's size and hash.
    ///
    /// Sizes are checked here; each file's SHA-256 is checked by [`Bundle::read`] as the file is
    /// loaded, so every byte is read from disk once.
    pub fn open(dir: impl AsRef<Path>) -> Result<Bundle> {
        let bundle = Bundle::open_unverified(dir)?;
        for (name, entry) in &bundle.manifest.files {
            let path = bundle.dir.join(name);
            let meta = fs::metadata(&path)
                .map_err(|e| Error::bundle(&path, format!("cannot read: {e}")))?;
            if !meta.is_file() {
                return Err(Error::bundle(&path, ReadProblem::NotRegular.describe(0)));
            }
            let len = meta.len();
            if len != entry.bytes {
                return Err(Error::bundle(&path, size_problem(len, entry.bytes)));
            }
        }
        Ok(bundle)
    }

    /// Parse and check the manifest without hashing the files (used by `bundle verify` to report
    /// every problem rather than the first).
    pub fn open_unverified(dir: impl AsRef<Path>) -> Result<Bundle> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("manifest.json");
        let (_, bytes) = read_regular(&path, MAX_MANIFEST_BYTES).map_err(|e| match e {
            ReadProblem::Io(e) if e.kind() == std::io::ErrorKind::NotFound => Error::bundle(
                &path,
                "not found: is this a model bundle directory? (see models/BUNDLE.md)",
            ),
            ReadProblem::Io(e) => Error::io("reading", &path, e),
            e => Error::bundle(&path, e.describe(MAX_MANIFEST_BYTES)),
        })?;
        let not_valid =
            |e: serde_json::Error| Error::bundle(&path, format!("not a valid manifest: {e}"));
        // The format and its version first, so that a bundle of another format version is told
        // so rather than which of this version's keys it lacks.
        let header: Header = serde_json::from_slice(&bytes).map_err(not_valid)?;
        check_header(&header).map_err(|what| Error::bundle(&path, what))?;
        // With the path of the offending key ("ood.scope.min_score: invalid type …").
        let manifest: Manifest =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&bytes))
                .map_err(|e| {
                    Error::bundle(
                        &path,
                        format!("not a valid manifest: {}: {}", e.path(), e.inner()),
                    )
                })?;
        let bundle = Bundle {
            hash: sha256_hex(&bytes),
            dir,
            manifest,
        };
        bundle.check_manifest()?;
        Ok(bundle)
    }

    fn check_manifest(&self) -> Result<()> {
        let m = &self.manifest;
        let path = self.dir.join("manifest.json");
        let bad = |what: String| Err(Error::bundle(&path, what));
        let l = &m.lora;
        if l.peft_type != "LORA" {
            return bad(format!("lora.peft_type {:?} is not LORA", l.peft_type));
        }
        if l.a_mode != "shared-frozen" {
            return bad(format!("lora.a_mode {:?} is not supported", l.a_mode));
        }
        if !matches!(l.dtype.as_str(), "F32" | "F16" | "BF16") {
            return bad(format!(
                "lora.dtype {:?} is not one of F32, F16, BF16",
                l.dtype
            ));
        }
        if l.r == 0 || l.layout.is_empty() {
            return bad("lora.r is 0 or lora.layout is empty".into());
        }
        let mut offset = 0;
        for e in &l.layout {
            let expect_b = e.lora_b_shape.len() == 2 && e.lora_b_shape[1] == l.r;
            let expect_a = e.lora_a_shape.len() == 2 && e.lora_a_shape[0] == l.r;
            if !expect_a || !expect_b {
                return bad(format!(
                    "module {}: A/B shapes do not have rank {}",
                    e.module, l.r
                ));
            }
            let b_len = e.lora_b_shape[0].checked_mul(e.lora_b_shape[1]);
            let a_len = e.lora_a_shape[0].checked_mul(e.lora_a_shape[1]);
            if e.offset != offset || Some(e.len) != b_len || a_len.is_none() {
                return bad(format!(
                    "module {}: offset/len inconsistent with the layout",
                    e.module
                ));
            }
            offset = match offset.checked_add(e.len) {
                Some(o) if o <= MAX_FLAT_DIM => o,
                _ => {
                    return bad(format!(
                        "the layout covers more than {MAX_FLAT_DIM} parameters"
                    ))
                }
            };
        }
        if offset != l.flat_dim {
            return bad(format!(
                "lora.flat_dim {} but the layout covers {offset}",
                l.flat_dim
            ));
        }
        if m.encoder.pooling != "mean" || m.encoder.normalize != "l2" {
            return bad("only mean pooling with l2 normalisation is supported".into());
        }
        if m.encoder.max_tokens == 0 || m.encoder.dim == 0 {
            return bad("encoder.max_tokens and encoder.dim must be positive".into());
        }
        if m.encoder.max_tokens > 4096 || m.encoder.dim > 16384 || m.experts.count > 1 << 20 {
            return bad(format!(
                "encoder.max_tokens {}, encoder.dim {} or experts.count {} is beyond any real bundle",
                m.encoder.max_tokens, m.encoder.dim, m.experts.count
            ));
        }
        if m.prior.top_k == 0 || m.prior.temperature.is_nan() || m.prior.temperature <= 0.0 {
            return bad("prior.top_k must be >= 1 and prior.temperature > 0".into());
        }
        let r = &m.retrieval;
        if r.score != "mean_top" {
            return bad(format!(
                "retrieval.score {:?} is not supported (this sglora knows \"mean_top\")",
                r.score
            ));
        }
        if !(1..=MAX_KEYS_PER_EXPERT).contains(&r.keys_per_expert) {
            return bad(format!(
                "retrieval.keys_per_expert is {}, expected 1 ..= {MAX_KEYS_PER_EXPERT}",
                r.keys_per_expert
            ));
        }
        if !(1..=r.keys_per_expert).contains(&r.top) {
            return bad(format!(
                "retrieval.top is {}, expected 1 ..= retrieval.keys_per_expert ({})",
                r.top, r.keys_per_expert
            ));
        }
        let key_dim = r.key_dim(m.encoder.dim);
        match &r.projection {
            None if key_dim != m.encoder.dim => {
                return bad(format!(
                    "retrieval.key_dim {key_dim} differs from encoder.dim {} without a \
                     retrieval.projection",
                    m.encoder.dim
                ))
            }
            Some(_) if r.key_dim.is_none() => {
                return bad("retrieval.projection needs retrieval.key_dim".into())
            }
            Some(_) if !(1..=16384).contains(&key_dim) => {
                return bad(format!(
                    "retrieval.key_dim is {key_dim}, expected 1 ..= 16384"
                ))
            }
            _ => {}
        }
        if let Some(Err(what)) = r.relation_head.as_ref().map(RelationHeadSpec::check) {
            return bad(what);
        }
        if let Err(what) = crate::gain::GainModel::new(&m.expected_gain) {
            return bad(what);
        }
        if let Some(scope) = &m.ood.scope {
            if let Err(what) = crate::scope::Scope::new(scope, m.encoder.dim) {
                return bad(what);
            }
        }
        for f in [
            &m.encoder.file,
            &m.encoder.tokenizer,
            &m.experts.file,
            &m.experts.meta,
            &m.cvae.prior_file,
            &m.cvae.decoder_file,
        ] {
            if !m.files.contains_key(f) {
                return bad(format!("{f} is used but not listed under \"files\""));
            }
        }
        for name in m.files.keys() {
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return bad(format!(
                    "file name {name:?} must be a plain name inside the bundle"
                ));
            }
        }
        Ok(())
    }

    /// Check every listed file's size and SHA-256; returns all problems found.
    pub fn verify_files(&self) -> Vec<FileProblem> {
        let mut problems = Vec::new();
        for (name, entry) in &self.manifest.files {
            let path = self.dir.join(name);
            let what = match read_regular(&path, entry.bytes) {
                Err(ReadProblem::TooLong(n)) => Some(size_problem(n, entry.bytes)),
                Err(e) => Some(e.describe(entry.bytes)),
                Ok((_, bytes)) => check_bytes(entry, &bytes),
            };
            if let Some(what) = what {
                problems.push(FileProblem {
                    file: name.clone(),
                    what,
                });
            }
        }
        problems
    }

    /// Absolute path of a bundle file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Read a bundle file into memory and check it against the manifest (size and SHA-256).
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        self.open_checked(name).map(|(_, bytes)| bytes)
    }

    /// Open a bundle file, read it and check it against the manifest; returns the open handle
    /// with the bytes, so a caller that reads parts of the file again later (`pread`) reads the
    /// very file that was checked, even if the path is replaced meanwhile.
    pub fn open_checked(&self, name: &str) -> Result<(fs::File, Vec<u8>)> {
        let p = self.path(name);
        let entry = self
            .manifest
            .files
            .get(name)
            .ok_or_else(|| Error::bundle(&p, "is not listed in the manifest"))?;
        let (file, bytes) = read_regular(&p, entry.bytes).map_err(|e| match e {
            ReadProblem::Io(e) => Error::io("reading", &p, e),
            ReadProblem::TooLong(n) => Error::bundle(&p, size_problem(n, entry.bytes)),
            e => Error::bundle(&p, e.describe(entry.bytes)),
        })?;
        match check_bytes(entry, &bytes) {
            Some(what) => Err(Error::bundle(p, what)),
            None => Ok((file, bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default bundle's manifest, changed by `edit`, opened (unverified) from a temporary
    /// directory.
    fn open_edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Bundle> {
        let mut m: serde_json::Value =
            serde_json::from_str(include_str!("../../../models/default/manifest.json")).unwrap();
        // the edits start from a bundle without a retrieval projection
        if let Some(r) = m["retrieval"].as_object_mut() {
            r.remove("projection");
            r.remove("key_dim");
        }
        edit(&mut m);
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        Bundle::open_unverified(dir.path())
    }

    fn refusal(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        open_edited(edit).unwrap_err().to_string()
    }

    #[test]
    fn the_default_manifest_is_format_2() {
        let b = open_edited(|_| {}).unwrap();
        assert_eq!(b.manifest.format_version, FORMAT_VERSION);
        assert_eq!(FORMAT_VERSION, 2);
        assert!(b.manifest.retrieval.top <= b.manifest.retrieval.keys_per_expert);
    }

    #[test]
    fn format_1_is_refused_with_what_to_do() {
        // A whole format-1 manifest: no retrieval or expected_gain block, desc_emb instead of
        // keys. The version is reported, not the first missing key.
        let e = refusal(|m| {
            m["format_version"] = 1.into();
            let o = m.as_object_mut().unwrap();
            o.remove("retrieval");
            o.remove("expected_gain");
        });
        assert!(
            e.contains("bundle format 1 is no longer read")
                && e.contains("reads format 2")
                && e.contains("make models"),
            "{e}"
        );
        let e = refusal(|m| m["format_version"] = 3.into());
        assert!(e.contains("format_version 3 is not supported"), "{e}");
        let e = refusal(|m| m["format"] = "other".into());
        assert!(e.contains("sglora-bundle"), "{e}");
    }

    #[test]
    fn the_scope_block_is_checked_and_optional() {
        let e = refusal(|m| m["ood"]["scope"]["weights"] = serde_json::json!([1.0, 2.0]));
        assert!(e.contains("ood.scope.weights has 2 values"), "{e}");
        let e = refusal(|m| m["ood"]["scope"]["kind"] = "forest".into());
        assert!(e.contains("ood.scope.kind"), "{e}");
        let e = refusal(|m| m["ood"]["scope"]["min_score"] = "high".into());
        assert!(e.contains("ood.scope.min_score: invalid type"), "{e}");
        let b = open_edited(|m| {
            m["ood"].as_object_mut().unwrap().remove("scope");
        })
        .unwrap();
        assert!(b.manifest.ood.scope.is_none());
    }

    #[test]
    fn relation_head_is_optional_and_checked_naming_the_field() {
        let head = || {
            serde_json::json!({"weight": "relation_weight", "bias": "relation_bias",
                "relations": ["hypernym", "member"], "gamma": 0.1, "pool": "max"})
        };
        // absent or null: none (bundles before the head)
        let b = open_edited(|m| {
            m["retrieval"]
                .as_object_mut()
                .unwrap()
                .remove("relation_head");
        })
        .unwrap();
        assert!(b.manifest.retrieval.relation_head.is_none());
        let b = open_edited(|m| m["retrieval"]["relation_head"] = serde_json::Value::Null).unwrap();
        assert!(b.manifest.retrieval.relation_head.is_none());
        let b = open_edited(|m| m["retrieval"]["relation_head"] = head()).unwrap();
        let h = b.manifest.retrieval.relation_head.unwrap();
        assert_eq!((h.relations.len(), h.gamma), (2, 0.1));
        let e = refusal(|m| {
            m["retrieval"]["relation_head"] = head();
            m["retrieval"]["relation_head"]["pool"] = "mean".into();
        });
        assert!(e.contains("relation_head.pool \"mean\""), "{e}");
        let e = refusal(|m| {
            m["retrieval"]["relation_head"] = head();
            m["retrieval"]["relation_head"]["relations"] = serde_json::json!(["a"]);
        });
        assert!(e.contains("lists 1 relations"), "{e}");
        let e = refusal(|m| {
            m["retrieval"]["relation_head"] = head();
            m["retrieval"]["relation_head"]["relations"] = serde_json::json!(["a", "b", "a"]);
        });
        assert!(e.contains("relation \"a\" twice"), "{e}");
        for bad in [-0.1, f64::MAX * 2.0] {
            let e = refusal(|m| {
                m["retrieval"]["relation_head"] = head();
                m["retrieval"]["relation_head"]["gamma"] = serde_json::json!(bad);
            });
            assert!(e.contains("relation_head"), "{bad}: {e}");
        }
    }

    #[test]
    fn retrieval_block_is_checked_naming_the_field() {
        let e = refusal(|m| m["retrieval"]["score"] = "max".into());
        assert!(e.contains("retrieval.score") && e.contains("max"), "{e}");
        let e = refusal(|m| m["retrieval"]["top"] = 0.into());
        assert!(e.contains("retrieval.top"), "{e}");
        let e = refusal(|m| {
            m["retrieval"]["keys_per_expert"] = 3.into();
            m["retrieval"]["top"] = 4.into();
        });
        assert!(e.contains("retrieval.top is 4"), "{e}");
        let e = refusal(|m| m["retrieval"]["keys_per_expert"] = 0.into());
        assert!(e.contains("retrieval.keys_per_expert"), "{e}");
        let e = refusal(|m| {
            m.as_object_mut().unwrap().remove("retrieval");
        });
        assert!(e.contains("retrieval"), "{e}");
        let e = refusal(|m| m["retrieval"]["key_dim"] = 100.into());
        assert!(e.contains("retrieval.key_dim 100 differs"), "{e}");
        let e = refusal(|m| m["retrieval"]["projection"] = "projection".into());
        assert!(e.contains("needs retrieval.key_dim"), "{e}");
        let b = open_edited(|m| {
            m["retrieval"]["projection"] = "projection".into();
            m["retrieval"]["key_dim"] = 400.into();
        })
        .unwrap();
        assert_eq!(b.manifest.retrieval.key_dim(384), 400);
        let b = open_edited(|m| m["retrieval"]["projection"] = serde_json::Value::Null).unwrap();
        assert_eq!(b.manifest.retrieval.projection, None);
        // Within range, any m and t are accepted.
        let b = open_edited(|m| {
            m["retrieval"]["keys_per_expert"] = 4.into();
            m["retrieval"]["top"] = 2.into();
        })
        .unwrap();
        assert_eq!(
            (
                b.manifest.retrieval.keys_per_expert,
                b.manifest.retrieval.top
            ),
            (4, 2)
        );
    }

    #[test]
    fn expected_gain_block_is_checked_and_extra_keys_ignored() {
        let e = refusal(|m| m["expected_gain"]["features"][0] = "luck".into());
        assert!(
            e.contains("expected_gain.features[0]") && e.contains("luck"),
            "{e}"
        );
        let e = refusal(|m| {
            m["expected_gain"]["coef"]
                .as_array_mut()
                .unwrap()
                .push(1.0.into())
        });
        assert!(e.contains("expected_gain.coef"), "{e}");
        let e = refusal(|m| m["expected_gain"]["interval"]["level"] = 1.5.into());
        assert!(e.contains("expected_gain.interval.level"), "{e}");
        // Informational keys the reader does not know are no error.
        open_edited(|m| {
            m["expected_gain"]["calibration"] = serde_json::json!({"coverage": 0.81, "n": 24});
        })
        .unwrap();
    }
}
