//! # sglora
//!
//! Semantic-guided LoRA generation (SG-LoRA) for edge devices: a text description of a task goes
//! in, a ready-to-load PEFT LoRA adapter comes out, with no user data and no training on the
//! device. This crate is the generation core only — numerics, bundle, encoder, experts, prior,
//! CVAE, adapter files — and pulls in no service dependencies (no SQLite, async runtime, D-Bus,
//! file watching or TOML); the daemon lives in `sglora-daemon`. `ARCHITECTURE.md` maps it.
//!
//! One type per stage: [`Description::new`] validates and hashes a description once, [`Generator::embed`] gives an
//! [`Embedded`] description,
//! [`Generator::explain`] a [`Explanation`] (retrieval), [`Generator::generate`] a [`Generation`]
//! (the flat LoRA vector), and [`Generator::adapter_files`] the [`AdapterFiles`] that
//! [`write_atomic`] puts on disk.
//!
//! ```no_run
//! use sglora::{GenerateOptions, Generator};
//! let g = Generator::load("models/default")?;
//! let out = g.generate_to("Given an animal, find its broader category.", &GenerateOptions::default(),
//!                         std::path::Path::new("adapter"), false)?;
//! println!("{:?}", out.explanation.experts);
//! # Ok::<(), sglora::Error>(())
//! ```
#![deny(missing_docs)]

mod adapter;
mod bert;
mod bundle;
mod cvae;
mod encoder;
mod error;
mod experts;
mod export;
mod gain;
mod generator;
mod kernels;
mod le;
mod lora;
mod onnx_graph;
mod options;
mod overlay;
mod prior;
mod relation;
mod rng;
mod scope;
mod stages;
mod tokenizer;

pub use adapter::{
    create_synced, remove_stale_temps, same_files, weights_bytes, write_atomic, write_atomic_with,
    write_file_atomic, write_file_atomic_with, AdapterFiles, Provenance, ProvenanceBundle,
    CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE,
};
pub use bundle::{
    sha256_hex, BaseModel, Bundle, CvaeSpec, EncoderSpec, ExpectedGainSpec, ExpertsSpec, FileEntry,
    FileProblem, GainIntervalSpec, LayoutEntry, LoraSpec, Manifest, OodSpec, PriorSpec,
    RelationHeadSpec, RetrievalSpec, ScopeSpec, FORMAT_VERSION, MAX_KEYS_PER_EXPERT,
};
pub use cvae::{Cvae, LatentPrior, Normalisation};
pub use encoder::{
    check_text, Embedding, Encoder, Runtime, BATCH_TOKENS, INTEGER_LEVELS, MAX_TEXT_BYTES,
};
pub use error::{Error, Result};
pub use experts::{AddedOrigin, ExpertMeta, Experts, Keys};
pub use export::{
    onnx_adapter, onnx_adapter_file, onnx_merged, slot_names, write_onnx_merged,
    write_onnx_slotted, AdapterParameter, Precision,
};
pub use gain::{ExpectedGain, Feature, Features, GainModel};
pub use generator::{AddExpert, Added, Generator};
pub use kernels::integer::Path as IntegerPath;
pub use le::{f32s_from_le, f32s_to_le};
pub use lora::{Lora, Target, MAX_ADAPTER_BYTES};
pub use options::{GenerateOptions, ResolvedOptions};
pub use overlay::{
    AddedMeta, Overlay, MAX_DESCRIPTIONS as MAX_EXPERT_DESCRIPTIONS,
    MAX_NAME_BYTES as MAX_EXPERT_NAME_BYTES, MAX_PROJECTION_ERROR, OVERLAY_FILE,
};
pub use prior::{mixture, retrieve, similarities, Prior, Retrieved};
pub use relation::{RelationGuess, RelationHead};
pub use rng::Rng;
pub use scope::Scope;
pub use stages::{
    validate_description, AskedRelation, Description, Embedded, ExpertChoice, Explanation,
    Generation, InScope, Timings, MAX_DESCRIPTION_BYTES,
};
pub use tokenizer::{Tokenizer, TokenizerError};
