//! The generation pipeline: description → embedding → experts → semantic prior → CVAE → adapter.
//!
//! [`Generator`] owns the loaded bundle, the encoder, the expert repository and the CVAE; it is
//! `Send + Sync` and is meant to be loaded once and shared. Each step takes one stage type of
//! [`crate::stages`] and returns the next, so a caller (the daemon) can stop between them — embed
//! once, look up its cache, then generate — without anything being computed twice.

use std::path::Path;
use std::time::Instant;

use crate::adapter::{self, AdapterFiles};
use crate::bundle::Bundle;
use crate::cvae::Cvae;
use crate::encoder::{Encoder, Runtime};
use crate::error::{Error, Result};
use crate::experts::Experts;
use crate::gain::{Features, GainModel};
use crate::options::{GenerateOptions, ResolvedOptions};
use crate::prior::{self, Retrieved};
use crate::scope::Scope;
use crate::stages::{
    Description, Embedded, ExpertChoice, Explanation, Generation, InScope, Timings,
};

/// The loaded model bundle, ready to generate.
#[derive(Debug)]
pub struct Generator {
    bundle: Bundle,
    encoder: Encoder,
    experts: Experts,
    cvae: Cvae,
    gain: GainModel,
    scope: Option<Scope>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Generator {
    /// Open (and verify) a bundle and load every model on [`Runtime::native`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Generator> {
        Generator::load_with(dir, Runtime::Auto)
    }

    /// [`Generator::load`] on the given runtime.
    pub fn load_with(dir: impl AsRef<Path>, runtime: Runtime) -> Result<Generator> {
        let bundle = Bundle::open(dir)?;
        Generator::from_bundle_with(bundle, runtime)
    }

    /// Load models from an opened bundle, on [`Runtime::native`].
    pub fn from_bundle(bundle: Bundle) -> Result<Generator> {
        Generator::from_bundle_with(bundle, Runtime::Auto)
    }

    /// [`Generator::from_bundle`] on the given runtime.
    pub fn from_bundle_with(bundle: Bundle, runtime: Runtime) -> Result<Generator> {
        let gain = GainModel::new(&bundle.manifest.expected_gain)
            .map_err(|what| Error::bundle(bundle.path("manifest.json"), what))?;
        let scope = match &bundle.manifest.ood.scope {
            Some(spec) => Some(
                Scope::new(spec, bundle.manifest.encoder.dim)
                    .map_err(|what| Error::bundle(bundle.path("manifest.json"), what))?,
            ),
            None => None,
        };
        let (experts, norm) = Experts::load(&bundle)?;
        let encoder = Encoder::load_with(&bundle, runtime)?;
        let cvae = Cvae::load(&bundle, runtime, norm)?;
        Ok(Generator {
            bundle,
            encoder,
            experts,
            cvae,
            gain,
            scope,
        })
    }

    /// Load the same bundle directory again, on the same runtime (the daemon's reload): a bundle
    /// that changed on disk is verified anew.
    pub fn reload(&self) -> Result<Generator> {
        Generator::load_with(&self.bundle.dir, self.encoder.runtime())
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

    /// Apply the bundle's defaults and check ranges.
    pub fn resolve(&self, o: &GenerateOptions) -> Result<ResolvedOptions> {
        o.resolve(&self.bundle.manifest, self.experts.len())
    }

    /// Stage 1: embed a validated description.
    pub fn embed(&self, description: Description) -> Result<Embedded> {
        let mut timings = Timings::default();
        let t0 = Instant::now();
        let ids = self.encoder.tokenize(description.text())?;
        timings.tokenize_ms = ms(t0);
        let t1 = Instant::now();
        let embedding = self.encoder.embed_ids(&ids)?;
        timings.encode_ms = ms(t1);
        Ok(Embedded {
            description,
            embedding,
            timings,
        })
    }

    /// Stage 2: retrieval, weights and the expected gain for an embedded description. Never
    /// fails for OOD or a low expected gain; [`Explanation::check`] says whether a generation
    /// may go ahead.
    pub fn explain(&self, e: &Embedded, opts: ResolvedOptions) -> Explanation {
        let mut timings = e.timings.clone();
        let t0 = Instant::now();
        let sims = prior::similarities(&e.embedding.vector, &self.experts);
        let picked = prior::retrieve(&sims, opts.top_k, opts.temperature);
        let features = Features::of(&picked, |i| self.experts.meta(i).relation.as_str());
        let expected_gain = self.gain.estimate(&features);
        timings.retrieve_ms = ms(t0);
        let best = picked.first().map(|r| r.similarity).unwrap_or(-1.0);
        let in_scope = self.scope.as_ref().map(|s| InScope {
            score: s.score(&e.embedding.vector),
            min_score: s.min_score(),
        });
        let experts = picked
            .iter()
            .map(|r| {
                let m = self.experts.meta(r.index);
                ExpertChoice {
                    index: r.index,
                    name: m.name.clone(),
                    description: m.description.clone(),
                    similarity: r.similarity,
                    weight: r.weight,
                }
            })
            .collect();
        Explanation {
            description: e.description.text().to_string(),
            tokens: e.embedding.tokens,
            truncated: e.embedding.truncated,
            experts,
            best_similarity: best,
            out_of_distribution: best < opts.min_similarity
                || in_scope.is_some_and(|s| s.score < s.min_score),
            in_scope,
            expected_gain,
            options: opts,
            timings,
        }
    }

    /// Stage 3: the flat LoRA vector for an embedded description (retrieval included). Refuses
    /// an out-of-distribution description unless the options allow it, and one whose expected
    /// gain is below the options' `min_expected_gain` ([`Explanation::check`]).
    pub fn generate(&self, e: Embedded, opts: ResolvedOptions) -> Result<Generation> {
        let ex = self.explain(&e, opts);
        self.generate_explained(e, ex)
    }

    /// Stage 3 after a caller already ran stage 2 on `e` (the daemon checks the explanation
    /// before it looks up its cache): the same refusals, then the prior and the CVAE, without
    /// retrieving again. `ex` must be [`Generator::explain`] of `e`.
    pub fn generate_explained(&self, e: Embedded, mut ex: Explanation) -> Result<Generation> {
        ex.check()?;
        let opts = ex.options;
        let t0 = Instant::now();
        let picked: Vec<Retrieved> = ex
            .experts
            .iter()
            .map(|c| Retrieved {
                index: c.index,
                similarity: c.similarity,
                weight: c.weight,
            })
            .collect();
        let p = prior::mixture(&self.experts, &picked)?;
        let norm = self.cvae.normalisation();
        let (mu_n, std_n) = norm.normalise(&p);
        ex.timings.prior_ms = ms(t0);
        let t1 = Instant::now();
        let lp = self.cvae.prior(&mu_n, &std_n)?;
        let z = self.cvae.sample_z(&lp, opts.seed, opts.noise_scale);
        let x_n = self.cvae.decode(&z, &lp.cond, &mu_n, &std_n)?;
        let flat = norm.denormalise(&x_n);
        ex.timings.cvae_ms = ms(t1);
        Ok(Generation {
            description: e.description,
            embedding: e.embedding.vector,
            explanation: ex,
            flat,
            z,
        })
    }

    /// Stage 4: serialise a generation into adapter files (weights, PEFT config, provenance).
    pub fn adapter_files(&self, g: &Generation) -> Result<AdapterFiles> {
        AdapterFiles::new(&self.bundle, g, &self.experts.lora_a)
    }

    /// Every stage for a description: validate, resolve the options, embed, generate.
    pub fn generate_text(
        &self,
        description: &str,
        options: &GenerateOptions,
    ) -> Result<Generation> {
        let (e, opts) = self.embed_text(description, options)?;
        self.generate(e, opts)
    }

    /// Retrieval only, for a description.
    pub fn explain_text(
        &self,
        description: &str,
        options: &GenerateOptions,
    ) -> Result<Explanation> {
        let (e, opts) = self.embed_text(description, options)?;
        Ok(self.explain(&e, opts))
    }

    /// What both text entry points do first: resolve the options (a bad option is reported
    /// before any work), validate and hash the description once, embed it.
    fn embed_text(
        &self,
        description: &str,
        options: &GenerateOptions,
    ) -> Result<(Embedded, ResolvedOptions)> {
        let opts = self.resolve(options)?;
        Ok((self.embed(Description::new(description)?)?, opts))
    }

    /// Generate and write the adapter directory atomically.
    pub fn generate_to(
        &self,
        description: &str,
        options: &GenerateOptions,
        dest: &Path,
        force: bool,
    ) -> Result<Generation> {
        let g = self.generate_text(description, options)?;
        adapter::write_atomic(dest, &self.adapter_files(&g)?, force)?;
        Ok(g)
    }
}
