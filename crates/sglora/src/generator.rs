//! The generation pipeline: description → embedding → experts → semantic prior → CVAE → adapter.
//!
//! [`Generator`] owns the loaded bundle, the encoder, the expert repository and the CVAE; it is
//! `Send + Sync` and is meant to be loaded once and shared. Each step takes one stage type of
//! [`crate::stages`] and returns the next, so a caller (the daemon) can stop between them — embed
//! once, look up its cache, then generate — without anything being computed twice.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::adapter::{self, AdapterFiles};
use crate::bundle::Bundle;
use crate::cvae::Cvae;
use crate::encoder::{Encoder, Runtime};
use crate::error::{Error, Result};
use crate::experts::{AddedOrigin, ExpertMeta, Experts, Extra};
use crate::gain::{Features, GainModel};
use crate::lora::Lora;
use crate::options::{GenerateOptions, ResolvedOptions};
use crate::overlay::{self, AddedExpert, AddedMeta, Overlay};
use crate::prior::{self, Retrieved};
use crate::scope::Scope;
use crate::stages::{
    AskedRelation, Description, Embedded, ExpertChoice, Explanation, Generation, InScope, Timings,
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
    overlay: Option<LoadedOverlay>,
}

/// The expert overlay a generator was loaded with.
#[derive(Debug, Clone)]
struct LoadedOverlay {
    path: PathBuf,
    sha256: Option<String>,
    skipped: Vec<(String, String)>,
    /// The file's identity when it was read ([`overlay_stamp`]).
    stamp: Option<String>,
}

/// The identity of the overlay file: device, inode, size and change time (it is replaced by a
/// rename, so any change gives a new inode); `None` when there is no file.
fn overlay_stamp(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.len(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// What [`Generator::add_expert`] asks for.
#[derive(Debug, Clone)]
pub struct AddExpert {
    /// Name in the repository (unique).
    pub name: String,
    /// One or more descriptions of the adapter's task; each becomes a retrieval key.
    pub descriptions: Vec<String>,
    /// Relation family (for the expected gain's relation agreement); may be empty.
    pub relation: String,
    /// Domain (informational); may be empty.
    pub domain: String,
    /// Refuse when the projection onto the shared A loses more than this share of `ΔW`
    /// (`‖residual‖_F / ‖ΔW‖_F`), in [0, 1]; [`overlay::MAX_PROJECTION_ERROR`] by default.
    pub max_projection_error: f64,
    /// Where the adapter came from (recorded).
    pub source: String,
}

/// What [`Generator::add_expert`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Added {
    /// The expert's name.
    pub name: String,
    /// Relative error of the projection onto the shared A.
    pub projection_error: f64,
    /// The module whose projection lost most, and its own relative error.
    pub worst_module: (String, f64),
    /// The adapter's rank.
    pub rank: usize,
    /// Experts in the repository once the overlay is loaded again.
    pub experts: usize,
    /// Hex SHA-256 of the overlay file written.
    pub overlay_sha256: Option<String>,
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
            overlay: None,
        })
    }

    /// Join the experts of the overlay file at `path` (it may not exist yet: nothing was
    /// added) to the repository, and remember `path` for [`Generator::reload`],
    /// [`Generator::add_expert`] and [`Generator::remove_expert`]. Each added expert is
    /// projected onto this bundle's shared A and its descriptions embedded; one whose name a
    /// shipped expert has, or whose projection now loses more than its limit, is left out and
    /// listed by [`Generator::skipped_experts`].
    pub fn with_overlay(mut self, path: impl Into<PathBuf>) -> Result<Generator> {
        let path = path.into();
        // The identity is taken before the contents: a file replaced in between is seen as
        // changed by the next check, never the other way round.
        let stamp = overlay_stamp(&path);
        let ov = Overlay::read(&path)?;
        let mut skipped = Vec::new();
        if !ov.is_empty() {
            let var = self.experts.mean_var()?;
            let mut extra = Vec::with_capacity(ov.len());
            for e in &ov.experts {
                match self.prepare(e, &var) {
                    Ok(x) if self.experts.metas().iter().any(|m| m.name == x.meta.name) => {
                        skipped.push((
                            x.meta.name.clone(),
                            "a shipped expert has this name".to_string(),
                        ));
                    }
                    Ok(x) => extra.push(x),
                    Err(err) => skipped.push((e.meta.name.clone(), err.to_string())),
                }
            }
            self.experts = self.experts.with_extra(extra)?;
        }
        self.overlay = Some(LoadedOverlay {
            path,
            sha256: ov.sha256().map(str::to_string),
            skipped,
            stamp,
        });
        Ok(self)
    }

    /// Whether the overlay file was changed (added to, removed from, created, deleted) since
    /// this generator read it: `Some(its identity now)` if so (one `stat`; the daemon checks
    /// before each request so that `sglora experts add` takes effect without a reload).
    pub fn overlay_changed(&self) -> Option<Option<String>> {
        let o = self.overlay.as_ref()?;
        let now = overlay_stamp(&o.path);
        (now != o.stamp).then_some(now)
    }

    /// One overlay expert made ready for the repository: projected, keyed, checked.
    fn prepare(&self, e: &AddedExpert, var: &[f32]) -> Result<Extra> {
        let p = self.project(&e.factors)?;
        if p.relative_error > e.meta.max_projection_error {
            return Err(Error::Expert(format!(
                "its projection onto this bundle's shared LoRA A loses {:.1} % of the adapter's \
                 weight change (limit {:.1} %)",
                100.0 * p.relative_error,
                100.0 * e.meta.max_projection_error
            )));
        }
        let keys = self.keys_of(&e.meta.descriptions)?;
        Ok(Extra {
            meta: ExpertMeta {
                name: e.meta.name.clone(),
                description: e.meta.descriptions.first().cloned().unwrap_or_default(),
                relation: e.meta.relation.clone(),
                domain: e.meta.domain.clone(),
                added: Some(AddedOrigin {
                    source: e.meta.source.clone(),
                    weights_sha256: e.meta.weights_sha256.clone(),
                    rank: e.meta.rank,
                    projection_error: p.relative_error,
                    added_unix: e.meta.added_unix,
                    descriptions: e.meta.descriptions.clone(),
                }),
            },
            keys,
            mu: p.flat,
            var: var.to_vec(),
        })
    }

    /// Adapter factors on the bundle's layout, projected onto its shared A.
    fn project(&self, factors: &[(Vec<f32>, Vec<f32>)]) -> Result<overlay::Projection> {
        let m = &self.bundle.manifest;
        overlay::project(
            &m.lora.layout,
            &self.experts.lora_a,
            m.lora.lora_alpha / m.lora.r as f64,
            m.lora.flat_dim,
            factors,
        )
    }

    /// The overlay file to change, or why there is none.
    fn writable_overlay(&self) -> Result<&Path> {
        self.overlay_path().ok_or_else(|| {
            Error::Expert(
                "no place for added experts: give a state directory (--state-dir, or the \
                 daemon's state_dir)"
                    .into(),
            )
        })
    }

    /// Retrieval keys for descriptions: each embedded and projected as a request is, the
    /// repository's key slots filled with them in turn.
    fn keys_of(&self, descriptions: &[String]) -> Result<Vec<f32>> {
        let keys = self.experts.keys();
        if descriptions.is_empty() || descriptions.len() > overlay::MAX_DESCRIPTIONS {
            return Err(Error::Expert(format!(
                "an expert needs 1 to {} descriptions, {} given",
                overlay::MAX_DESCRIPTIONS,
                descriptions.len()
            )));
        }
        let mut projected = Vec::with_capacity(descriptions.len());
        for d in descriptions {
            let d = Description::new(d)?;
            let e = self.encoder.embed(d.text())?;
            projected.push(keys.project(&e.vector).into_owned());
        }
        Ok((0..keys.per_expert)
            .flat_map(|j| projected[j % projected.len()].iter().copied())
            .collect())
    }

    /// The overlay file this generator reads added experts from, if any.
    pub fn overlay_path(&self) -> Option<&Path> {
        self.overlay.as_ref().map(|o| o.path.as_path())
    }

    /// Added experts left out at load, with the reason.
    pub fn skipped_experts(&self) -> &[(String, String)] {
        self.overlay.as_ref().map_or(&[], |o| o.skipped.as_slice())
    }

    /// Hex SHA-256 of the overlay file loaded (`None`: nothing added).
    pub fn overlay_sha256(&self) -> Option<&str> {
        self.overlay.as_ref().and_then(|o| o.sha256.as_deref())
    }

    /// The expert repository's version: the bundle's hash, with the overlay's when experts were
    /// added. Everything a generation depends on is in it (the daemon's cache scope).
    pub fn repository_version(&self) -> String {
        match self.overlay_sha256() {
            Some(o) => format!("{}+overlay:{o}", self.bundle.hash),
            None => self.bundle.hash.clone(),
        }
    }

    /// Add an adapter (read with [`Encoder::load_adapter`]) to the overlay file as an expert.
    /// The overlay is locked, read again and replaced atomically; this generator is not
    /// changed: load the overlay again ([`Generator::reload`]) to use the expert. Refused with
    /// [`Error::Expert`]: no overlay path, a name in use, a projection that loses more than
    /// `max_projection_error`; with [`Error::Adapter`]: modules other than the bundle's.
    pub fn add_expert(&self, lora: &Lora, req: &AddExpert) -> Result<Added> {
        let path = self.writable_overlay()?;
        overlay::check_name(&req.name)?;
        if !(0.0..=1.0).contains(&req.max_projection_error) {
            return Err(Error::InvalidOption(format!(
                "max_projection_error must be a number in [0, 1], got {}",
                req.max_projection_error
            )));
        }
        // Descriptions are checked (and embedded) before anything else is computed.
        self.keys_of(&req.descriptions)?;
        let m = &self.bundle.manifest;
        let factors = overlay::factors_on(lora, &m.lora.layout)?;
        let p = self.project(&factors)?;
        if p.relative_error > req.max_projection_error {
            return Err(Error::Expert(format!(
                "adapter {} cannot join this repository: the bundle's experts share one frozen \
                 LoRA A, and the adapter's weight change projected onto it loses {:.1} % \
                 (worst module {}: {:.1} %), more than the limit {:.1} %; train it with the \
                 bundle's A (models/README.md) or raise max_projection_error",
                lora.dir().display(),
                100.0 * p.relative_error,
                p.worst_module.0,
                100.0 * p.worst_module.1,
                100.0 * req.max_projection_error
            )));
        }
        let locked = overlay::lock(path)?;
        let mut ov = locked.read()?;
        if self.experts.metas()[..self.experts.shipped()]
            .iter()
            .any(|e| e.name == req.name)
            || ov.experts().any(|e| e.name == req.name)
        {
            return Err(Error::Expert(format!(
                "an expert named {:?} is already in the repository; choose another name (or \
                 remove the added one first)",
                req.name
            )));
        }
        ov.experts.push(AddedExpert {
            meta: AddedMeta {
                name: req.name.clone(),
                descriptions: req.descriptions.clone(),
                relation: req.relation.clone(),
                domain: req.domain.clone(),
                source: req.source.clone(),
                weights_sha256: lora.weights_sha256().to_string(),
                rank: lora.rank(),
                added_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                max_projection_error: req.max_projection_error,
            },
            factors,
        });
        locked.write(&ov)?;
        let written = locked.read()?;
        Ok(Added {
            name: req.name.clone(),
            projection_error: p.relative_error,
            worst_module: p.worst_module,
            rank: lora.rank(),
            experts: self.experts.shipped() + written.len(),
            overlay_sha256: written.sha256().map(str::to_string),
        })
    }

    /// Remove an added expert from the overlay file (locked, replaced atomically); this
    /// generator is not changed ([`Generator::reload`]). A shipped expert or an unknown name is
    /// refused with [`Error::Expert`].
    pub fn remove_expert(&self, name: &str) -> Result<()> {
        let path = self.writable_overlay()?;
        let locked = overlay::lock(path)?;
        let mut ov = locked.read()?;
        let Some(at) = ov.experts().position(|e| e.name == name) else {
            let shipped = self.experts.metas()[..self.experts.shipped()]
                .iter()
                .any(|e| e.name == name);
            return Err(Error::Expert(if shipped {
                format!(
                    "{name:?} is shipped with the bundle; only experts added with `sglora \
                     experts add` can be removed"
                )
            } else {
                format!("no added expert is named {name:?}; `sglora experts` lists them")
            }));
        };
        ov.experts.remove(at);
        locked.write(&ov)
    }

    /// Load the same bundle directory again, on the same runtime (the daemon's reload): a bundle
    /// that changed on disk is verified anew.
    pub fn reload(&self) -> Result<Generator> {
        let g = Generator::load_with(&self.bundle.dir, self.encoder.runtime())?;
        match &self.overlay {
            Some(o) => g.with_overlay(&o.path),
            None => Ok(g),
        }
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
        let (embedding, relation) = match self.experts.relation_head() {
            None => (self.encoder.embed_ids(&ids)?, None),
            Some(head) => {
                let (embedding, states) = self.encoder.embed_ids_and_states(&ids)?;
                (embedding, Some(head.read(&states)))
            }
        };
        timings.encode_ms = ms(t1);
        Ok(Embedded {
            description,
            embedding,
            relation,
            timings,
        })
    }

    /// Stage 2: retrieval, weights and the expected gain for an embedded description. Never
    /// fails for OOD or a low expected gain; [`Explanation::check`] says whether a generation
    /// may go ahead.
    pub fn explain(&self, e: &Embedded, opts: ResolvedOptions) -> Explanation {
        let mut timings = e.timings.clone();
        let t0 = Instant::now();
        let sims = prior::similarities(&e.embedding.vector, e.relation.as_ref(), &self.experts);
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
        let asked_relation =
            self.experts
                .relation_head()
                .zip(e.relation.as_ref())
                .map(|(head, guess)| {
                    let (relation, probability) = head.likeliest(guess);
                    AskedRelation {
                        relation: relation.to_string(),
                        probability,
                    }
                });
        Explanation {
            description: e.description.text().to_string(),
            tokens: e.embedding.tokens,
            truncated: e.embedding.truncated,
            asked_relation,
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
        AdapterFiles::new(&self.bundle, g, &self.experts.lora_a, self.overlay_sha256())
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
