//! The generation pipeline: description → embedding → experts → semantic prior → CVAE → adapter.
//!
//! [`Generator`] owns the loaded bundle, the encoder plan, the expert repository and the CVAE
//! plans; it is `Send + Sync` and is meant to be loaded once and shared.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::adapter::{self, AdapterFiles};
use crate::bundle::{sha256_hex, Bundle};
use crate::cvae::Cvae;
use crate::encoder::{Embedding, Encoder, WeightPrecision};
use crate::error::{Error, Result};
use crate::experts::Experts;
use crate::prior::{self, Retrieved};

/// Longest accepted description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;

/// Options of one generation; `None` means the bundle's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    /// Seed of the latent noise.
    pub seed: u64,
    /// Number of experts mixed.
    pub top_k: Option<usize>,
    /// Softmax temperature.
    pub temperature: Option<f64>,
    /// Scale of the latent noise (0 = the prior mean).
    pub noise_scale: Option<f64>,
    /// Generate even when the description is out of distribution (marked in the provenance).
    pub allow_ood: bool,
    /// Override of the bundle's out-of-distribution threshold.
    pub min_similarity: Option<f64>,
}

/// Options after defaults were applied and ranges checked.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ResolvedOptions {
    /// Seed.
    pub seed: u64,
    /// K.
    pub top_k: usize,
    /// τ.
    pub temperature: f64,
    /// Noise scale.
    pub noise_scale: f64,
    /// OOD threshold.
    pub min_similarity: f64,
    /// Whether OOD generation was allowed.
    pub allow_ood: bool,
}

/// An expert with its similarity and mixture weight.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertChoice {
    /// Expert name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Cosine similarity to the request.
    pub similarity: f64,
    /// Mixture weight α.
    pub weight: f64,
}

/// Wall-clock time of each stage, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Tokenisation.
    pub tokenize_ms: f64,
    /// Encoder.
    pub encode_ms: f64,
    /// Similarities and top-K.
    pub retrieve_ms: f64,
    /// Moment-matched mixture.
    pub prior_ms: f64,
    /// CVAE prior + sampling + decoder + de-normalisation.
    pub cvae_ms: f64,
    /// Serialising and writing the adapter.
    pub write_ms: f64,
}

/// Retrieval result for a description.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The description after trimming.
    pub description: String,
    /// Tokens the encoder saw.
    pub tokens: usize,
    /// Whether the description was truncated to the encoder's window.
    pub truncated: bool,
    /// Chosen experts, most similar first.
    pub experts: Vec<ExpertChoice>,
    /// Best similarity to any expert.
    pub best_similarity: f64,
    /// Whether the best similarity is below the threshold.
    pub out_of_distribution: bool,
    /// Options used.
    pub options: ResolvedOptions,
    /// The description embedding (not serialised).
    #[serde(skip)]
    pub embedding: Vec<f32>,
    /// Stage timings so far.
    pub timings: Timings,
    #[serde(skip)]
    picked: Vec<Retrieved>,
}

/// A generated adapter in memory.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Retrieval details.
    pub explanation: Explanation,
    /// The flat LoRA B vector (bundle layout order), de-normalised.
    pub flat: Vec<f32>,
    /// The latent code used.
    pub z: Vec<f32>,
}

/// Check a description: non-empty after trimming, at most 4 KiB, no NUL/control characters
/// other than tab and newlines. Returns the trimmed text.
pub fn validate_description(text: &str) -> Result<&str> {
    let t = text.trim();
    if t.is_empty() {
        return Err(Error::InvalidDescription(
            "it is empty; say in words what the task matches with what".into(),
        ));
    }
    if t.len() > MAX_DESCRIPTION_BYTES {
        return Err(Error::InvalidDescription(format!(
            "it is {} bytes long; the limit is {MAX_DESCRIPTION_BYTES} bytes (a task description is a sentence or two)",
            t.len()
        )));
    }
    if let Some(c) = t
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(Error::InvalidDescription(format!(
            "it contains the control character U+{:04X}",
            c as u32
        )));
    }
    Ok(t)
}

/// The loaded model bundle, ready to generate.
#[derive(Debug)]
pub struct Generator {
    bundle: Bundle,
    encoder: Encoder,
    experts: Experts,
    cvae: Cvae,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Generator {
    /// Open (and verify) a bundle and load every model.
    pub fn load(dir: impl AsRef<Path>) -> Result<Generator> {
        Generator::load_with(dir, WeightPrecision::native())
    }

    /// [`Generator::load`] with the encoder's weights held at `weights` in memory.
    pub fn load_with(dir: impl AsRef<Path>, weights: WeightPrecision) -> Result<Generator> {
        let bundle = Bundle::open(dir)?;
        Generator::from_bundle_with(bundle, weights)
    }

    /// Load models from an opened bundle.
    pub fn from_bundle(bundle: Bundle) -> Result<Generator> {
        Generator::from_bundle_with(bundle, WeightPrecision::native())
    }

    /// [`Generator::from_bundle`] with the encoder's weights held at `weights` in memory.
    pub fn from_bundle_with(bundle: Bundle, weights: WeightPrecision) -> Result<Generator> {
        let experts = Experts::load(&bundle)?;
        let encoder = Encoder::load_with(&bundle, weights)?;
        let cvae = Cvae::load(&bundle, weights)?;
        Ok(Generator {
            bundle,
            encoder,
            experts,
            cvae,
        })
    }

    /// The bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The expert repository.
    pub fn experts(&self) -> &Experts {
        &self.experts
    }

    /// The encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The CVAE.
    pub fn cvae(&self) -> &Cvae {
        &self.cvae
    }

    /// Apply defaults and check ranges.
    pub fn resolve(&self, o: &GenerateOptions) -> Result<ResolvedOptions> {
        let m = &self.bundle.manifest;
        let top_k = o.top_k.unwrap_or(m.prior.top_k);
        if top_k == 0 || top_k > self.experts.len() {
            return Err(Error::InvalidOption(format!(
                "top_k must be between 1 and {} (the number of experts)",
                self.experts.len()
            )));
        }
        let temperature = o.temperature.unwrap_or(m.prior.temperature);
        if !(temperature.is_finite() && (1e-4..=100.0).contains(&temperature)) {
            return Err(Error::InvalidOption(
                "temperature must be between 0.0001 and 100".into(),
            ));
        }
        let noise_scale = o.noise_scale.unwrap_or(m.cvae.noise_scale);
        if !(noise_scale.is_finite() && (0.0..=10.0).contains(&noise_scale)) {
            return Err(Error::InvalidOption(
                "noise_scale must be between 0 and 10".into(),
            ));
        }
        let min_similarity = o.min_similarity.unwrap_or(m.ood.min_similarity);
        if !(min_similarity.is_finite() && (-1.0..=1.0).contains(&min_similarity)) {
            return Err(Error::InvalidOption(
                "min_similarity must be between -1 and 1".into(),
            ));
        }
        Ok(ResolvedOptions {
            seed: o.seed,
            top_k,
            temperature,
            noise_scale,
            min_similarity,
            allow_ood: o.allow_ood,
        })
    }

    /// Embed a description.
    pub fn embed(&self, description: &str) -> Result<(Embedding, Timings)> {
        let text = validate_description(description)?;
        let mut t = Timings::default();
        let t0 = Instant::now();
        let ids = self.encoder.tokenize(text)?;
        t.tokenize_ms = ms(t0);
        let t1 = Instant::now();
        let e = self.encoder.embed_ids(&ids)?;
        t.encode_ms = ms(t1);
        Ok((e, t))
    }

    /// Retrieval and weights for a description (no generation). Never fails for OOD; the result
    /// says whether it is out of distribution.
    pub fn explain(&self, description: &str, options: &GenerateOptions) -> Result<Explanation> {
        let opts = self.resolve(options)?;
        let (emb, timings) = self.embed(description)?;
        Ok(self.explain_embedding(validate_description(description)?, emb, timings, opts))
    }

    /// Retrieval for an already computed embedding.
    pub fn explain_embedding(
        &self,
        text: &str,
        emb: Embedding,
        mut timings: Timings,
        opts: ResolvedOptions,
    ) -> Explanation {
        let t0 = Instant::now();
        let sims = prior::similarities(&emb.vector, &self.experts);
        let picked = prior::retrieve(&sims, opts.top_k, opts.temperature);
        timings.retrieve_ms = ms(t0);
        let best = picked.first().map(|r| r.similarity).unwrap_or(-1.0);
        let experts = picked
            .iter()
            .map(|r| {
                let m = self.experts.meta(r.index);
                ExpertChoice {
                    name: m.name.clone(),
                    description: m.description.clone(),
                    similarity: r.similarity,
                    weight: r.weight,
                }
            })
            .collect();
        Explanation {
            description: text.to_string(),
            tokens: emb.tokens,
            truncated: emb.truncated,
            experts,
            best_similarity: best,
            out_of_distribution: best < opts.min_similarity,
            options: opts,
            embedding: emb.vector,
            timings,
            picked,
        }
    }

    /// Generate the flat LoRA vector for a description.
    pub fn generate(&self, description: &str, options: &GenerateOptions) -> Result<Generation> {
        let ex = self.explain(description, options)?;
        self.generate_from(ex)
    }

    /// Generate from an explanation (lets callers embed once, look up a cache, then generate).
    pub fn generate_from(&self, mut ex: Explanation) -> Result<Generation> {
        let opts = ex.options;
        if ex.out_of_distribution && !opts.allow_ood {
            return Err(Error::OutOfDistribution {
                best: ex.best_similarity as f32,
                threshold: opts.min_similarity as f32,
                expert: ex
                    .experts
                    .first()
                    .map(|e| e.name.clone())
                    .unwrap_or_default(),
            });
        }
        let t0 = Instant::now();
        let p = prior::mixture(&self.experts, &ex.picked)?;
        let (mu_n, std_n) = self.normalise(&p.mean, &p.var);
        ex.timings.prior_ms = ms(t0);
        let t1 = Instant::now();
        let lp = self.cvae.prior(&mu_n, &std_n)?;
        let z = self.cvae.sample_z(&lp, opts.seed, opts.noise_scale);
        let x_n = self.cvae.decode(&z, &lp.cond, &mu_n, &std_n)?;
        let flat = self.denormalise(&x_n);
        ex.timings.cvae_ms = ms(t1);
        Ok(Generation {
            explanation: ex,
            flat,
            z,
        })
    }

    /// `(μ* − mean)/std` and `sqrt(σ*²)/std`.
    pub fn normalise(&self, mean: &[f32], var: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (m, s) = (&self.experts.norm_mean, &self.experts.norm_std);
        let mu = mean
            .iter()
            .zip(m)
            .zip(s)
            .map(|((x, m), s)| (x - m) / s)
            .collect();
        let sd = var
            .iter()
            .zip(s)
            .map(|(v, s)| v.max(0.0).sqrt() / s)
            .collect();
        (mu, sd)
    }

    /// `x · std + mean`.
    pub fn denormalise(&self, x_n: &[f32]) -> Vec<f32> {
        x_n.iter()
            .zip(&self.experts.norm_mean)
            .zip(&self.experts.norm_std)
            .map(|((x, m), s)| x * s + m)
            .collect()
    }

    /// Serialise a generation into adapter files (weights, PEFT config, provenance).
    pub fn adapter_files(&self, g: &Generation, extra: serde_json::Value) -> Result<AdapterFiles> {
        let m = &self.bundle.manifest;
        let weights = adapter::weights_bytes(m, &g.flat, &self.experts.lora_a)?;
        let config = serde_json::to_vec_pretty(&adapter::config_json(m))
            .map_err(|e| Error::model("adapter", e))?;
        let ex = &g.explanation;
        let emb_bytes: Vec<u8> = ex.embedding.iter().flat_map(|v| v.to_le_bytes()).collect();
        let provenance = serde_json::json!({
            "description": ex.description,
            "description_sha256": sha256_hex(ex.description.as_bytes()),
            "embedding_sha256": sha256_hex(&emb_bytes),
            "tokens": ex.tokens,
            "truncated": ex.truncated,
            "experts": ex.experts,
            "best_similarity": ex.best_similarity,
            "out_of_distribution": ex.out_of_distribution,
            "options": ex.options,
            "seed": ex.options.seed,
            "z": g.z,
            "weights_sha256": sha256_hex(&weights),
            "bundle": {"id": m.bundle_id, "sha256": self.bundle.hash, "mode": m.mode, "path": self.bundle.dir},
            "base_model": m.base_model.id,
            "sglora_version": env!("CARGO_PKG_VERSION"),
            "timings_ms": ex.timings,
            "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "extra": extra,
        });
        let provenance =
            serde_json::to_vec_pretty(&provenance).map_err(|e| Error::model("adapter", e))?;
        Ok(AdapterFiles {
            weights,
            config,
            provenance,
        })
    }

    /// Generate and write the adapter directory atomically; returns the generation with its
    /// write time filled in.
    pub fn generate_to(
        &self,
        description: &str,
        options: &GenerateOptions,
        dest: &Path,
        force: bool,
    ) -> Result<Generation> {
        let mut g = self.generate(description, options)?;
        self.write(&mut g, dest, force)?;
        Ok(g)
    }

    /// Write an already generated adapter (fills `timings.write_ms`).
    pub fn write(&self, g: &mut Generation, dest: &Path, force: bool) -> Result<()> {
        let t0 = Instant::now();
        let files = self.adapter_files(g, serde_json::Value::Null)?;
        adapter::write_atomic(dest, &files, force)?;
        g.explanation.timings.write_ms = ms(t0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_are_validated() {
        assert!(validate_description("  ").is_err());
        assert!(validate_description("a\u{0}b").is_err());
        assert!(validate_description(&"x".repeat(MAX_DESCRIPTION_BYTES + 1)).is_err());
        assert_eq!(
            validate_description("  find antonyms\n").unwrap(),
            "find antonyms"
        );
        assert!(validate_description("line one\nline two\twith tab").is_ok());
        assert!(validate_description("\u{202E}rtl mark is not a control char? it is Cf").is_ok());
    }
}
