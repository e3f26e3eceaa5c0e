//! One type per stage of a generation, each produced by one [`crate::Generator`] step from the
//! one before it:
//!
//! ```text
//! &str ──Description::new──► Description ──embed──► Embedded ──explain──► Explanation
//!      ──generate──► Generation ──adapter_files──► AdapterFiles ──write_atomic──► directory
//! ```
//!
//! Every field is visible: what a stage hands on is what it holds, nothing is hidden from
//! serialisation.

use serde::Serialize;

use crate::bundle::sha256_hex;
use crate::encoder::Embedding;
use crate::error::{Error, Result};
use crate::gain::ExpectedGain;
use crate::options::ResolvedOptions;
use crate::relation::RelationGuess;

/// Longest accepted description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;

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

/// A validated description (trimmed, checked by [`validate_description`]) and the SHA-256 of its
/// text, computed once: the cache keys on it and the provenance records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    text: String,
    sha256: String,
}

impl Description {
    /// Validate and hash a description.
    pub fn new(text: &str) -> Result<Description> {
        let text = validate_description(text)?.to_string();
        let sha256 = sha256_hex(text.as_bytes());
        Ok(Description { text, sha256 })
    }

    /// The trimmed text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Hex SHA-256 of [`Description::text`].
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// Wall-clock time of each stage, in milliseconds (writing the files is timed by the caller of
/// [`crate::write_atomic`]: the provenance is serialised before it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Tokenisation of the description.
    pub tokenize_ms: f64,
    /// Encoder forward pass, pooling and normalisation.
    pub encode_ms: f64,
    /// Scores of every expert, top-K and the expected gain.
    pub retrieve_ms: f64,
    /// Moment-matched mixture and normalisation.
    pub prior_ms: f64,
    /// CVAE prior + sampling + decoder + de-normalisation.
    pub cvae_ms: f64,
}

/// Stage 1: a description and its embedding.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The validated description.
    pub description: Description,
    /// Its L2-normalised embedding.
    pub embedding: Embedding,
    /// The relation head's reading of it (`None` for a bundle without a head).
    pub relation: Option<RelationGuess>,
    /// Tokenisation and encoder time.
    pub timings: Timings,
}

/// The relation a description asks for, as the relation head reads it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AskedRelation {
    /// The likeliest of the head's relations.
    pub relation: String,
    /// Its probability.
    pub probability: f64,
}

/// An expert with its retrieval score and mixture weight.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertChoice {
    /// Position in the expert repository (what the mixture reads).
    pub index: usize,
    /// Expert name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Retrieval score for the request (the mean of its `retrieval.top` best key similarities,
    /// plus the relation head's term when the bundle has one; the name is kept from format 1,
    /// where it was one cosine similarity).
    pub similarity: f64,
    /// Mixture weight α.
    pub weight: f64,
}

/// Stage 2: which experts a description retrieves, with their weights, and whether it is out of
/// distribution. Serialises whole (`sglora explain --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The description after trimming.
    pub description: String,
    /// Tokens the encoder saw.
    pub tokens: usize,
    /// Whether the description was truncated to the encoder's window.
    pub truncated: bool,
    /// The relation the bundle's relation head reads in the description, with its probability
    /// (`null` for a bundle without a head).
    pub asked_relation: Option<AskedRelation>,
    /// Chosen experts, most similar first.
    pub experts: Vec<ExpertChoice>,
    /// Best retrieval score of any expert (-1 for an empty repository).
    pub best_similarity: f64,
    /// Whether the best score is below `min_similarity` or the scope score below its threshold.
    pub out_of_distribution: bool,
    /// The scope classifier's verdict inputs (`null` for a bundle without one).
    pub in_scope: Option<InScope>,
    /// The bundle's estimate of the adapter's R@1 gain over the base model.
    pub expected_gain: ExpectedGain,
    /// Options used.
    pub options: ResolvedOptions,
    /// Stage timings so far.
    pub timings: Timings,
}

impl Explanation {
    /// The scope classifier's verdict when it, and not the best score, makes the description
    /// out of distribution.
    pub fn refused_by_scope(&self) -> Option<InScope> {
        self.in_scope.filter(|s| {
            s.score < s.min_score && self.best_similarity >= self.options.min_similarity
        })
    }

    /// Whether a generation for this explanation may go ahead under its options: the error
    /// [`crate::Generator::generate`] refuses with, if any. Out of distribution (unless
    /// `allow_ood`) first, then an expected gain below `min_expected_gain` (which `allow_ood`
    /// does not lift).
    pub fn check(&self) -> Result<()> {
        let o = &self.options;
        if !o.allow_ood {
            if let Some(s) = self.refused_by_scope() {
                return Err(Error::OutOfScope {
                    score: s.score,
                    threshold: s.min_score,
                    expert: self
                        .experts
                        .first()
                        .map(|e| e.name.clone())
                        .unwrap_or_default(),
                });
            }
        }
        if self.out_of_distribution && !o.allow_ood {
            return Err(Error::OutOfDistribution {
                best: self.best_similarity as f32,
                threshold: o.min_similarity as f32,
                expert: self
                    .experts
                    .first()
                    .map(|e| e.name.clone())
                    .unwrap_or_default(),
            });
        }
        match o.min_expected_gain {
            Some(threshold) if self.expected_gain.estimate < threshold => {
                Err(Error::LowExpectedGain {
                    estimate: self.expected_gain.estimate,
                    low: self.expected_gain.low,
                    high: self.expected_gain.high,
                    threshold,
                })
            }
            _ => Ok(()),
        }
    }
}

/// The scope classifier's score of a description and the threshold it was held to.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct InScope {
    /// `w · e + b` (`manifest.ood.scope`).
    pub score: f64,
    /// Below this the description is out of distribution.
    pub min_score: f64,
}

/// Stage 3: a generated adapter in memory.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The description it was generated for.
    pub description: Description,
    /// The description's embedding (the cache's near-duplicate key).
    pub embedding: Vec<f32>,
    /// Retrieval details, timings up to the decoder included.
    pub explanation: Explanation,
    /// The flat LoRA B vector (bundle layout order), de-normalised.
    pub flat: Vec<f32>,
    /// The latent code used.
    pub z: Vec<f32>,
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

    #[test]
    fn a_description_is_hashed_once_as_trimmed() {
        let d = Description::new("  find antonyms\n").unwrap();
        assert_eq!(d.text(), "find antonyms");
        assert_eq!(d.sha256(), sha256_hex(b"find antonyms"));
    }
}
