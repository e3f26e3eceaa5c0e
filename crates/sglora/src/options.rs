//! The options of one generation: what a caller asks for ([`GenerateOptions`], every field
//! optional, deserialisable from JSON as the drop folder's requests carry it) and what runs after
//! the bundle's defaults were applied and every range was checked ([`ResolvedOptions`]).

use serde::{Deserialize, Serialize};

use crate::bundle::Manifest;
use crate::error::{Error, Result};

/// Options of one generation; `None` means the bundle's default.
///
/// Deserialises from the JSON object a drop-folder request carries (every key optional, unknown
/// keys refused), so the CLI, the D-Bus `a{sv}` options and the drop folder share one vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateOptions {
    /// Seed of the latent noise (recorded in the provenance; the same seed gives the same bytes).
    pub seed: u64,
    /// Number of experts mixed (1 ..= the number of experts).
    pub top_k: Option<usize>,
    /// Softmax temperature τ over the retrieval scores (0.0001 ..= 100).
    pub temperature: Option<f64>,
    /// Scale of the latent noise, 0 ..= 10 (0 decodes the prior mean).
    pub noise_scale: Option<f64>,
    /// Generate even when the description is out of distribution (marked in the provenance).
    pub allow_ood: bool,
    /// Override of the bundle's out-of-distribution threshold on the best similarity (0 ..= 1:
    /// below 0 the guard would accept anything, which `allow_ood` says openly instead).
    pub min_similarity: Option<f64>,
    /// Refuse to generate when the bundle's expected R@1 gain estimate is below this many R@1
    /// points (0 ..= 100); `None`: no minimum. `allow_ood` does not lift it.
    pub min_expected_gain: Option<f64>,
}

/// Options after the bundle's defaults were applied and ranges checked: what a generation ran
/// with, as the provenance records it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ResolvedOptions {
    /// Seed of the latent noise.
    pub seed: u64,
    /// Number of experts mixed (K).
    pub top_k: usize,
    /// Softmax temperature τ.
    pub temperature: f64,
    /// Scale of the latent noise.
    pub noise_scale: f64,
    /// Out-of-distribution threshold on the best similarity.
    pub min_similarity: f64,
    /// Whether out-of-distribution generation was allowed.
    pub allow_ood: bool,
    /// Minimum expected R@1 gain, in points (`None`: no minimum).
    pub min_expected_gain: Option<f64>,
}

impl GenerateOptions {
    /// Apply the bundle's defaults and check every range; `experts` is the repository's size
    /// (the largest valid `top_k`).
    pub fn resolve(&self, manifest: &Manifest, experts: usize) -> Result<ResolvedOptions> {
        let top_k = self.top_k.unwrap_or(manifest.prior.top_k);
        if top_k == 0 || top_k > experts {
            return Err(Error::InvalidOption(format!(
                "top_k must be between 1 and {experts} (the number of experts)"
            )));
        }
        let temperature = self.temperature.unwrap_or(manifest.prior.temperature);
        if !(temperature.is_finite() && (1e-4..=100.0).contains(&temperature)) {
            return Err(Error::InvalidOption(
                "temperature must be between 0.0001 and 100".into(),
            ));
        }
        let noise_scale = self.noise_scale.unwrap_or(manifest.cvae.noise_scale);
        if !(noise_scale.is_finite() && (0.0..=10.0).contains(&noise_scale)) {
            return Err(Error::InvalidOption(
                "noise_scale must be between 0 and 10".into(),
            ));
        }
        let min_similarity = self.min_similarity.unwrap_or(manifest.ood.min_similarity);
        if !(min_similarity.is_finite() && (0.0..=1.0).contains(&min_similarity)) {
            return Err(Error::InvalidOption(
                "min_similarity must be between 0 and 1 (to generate for any description, \
                 allow out-of-distribution generation instead)"
                    .into(),
            ));
        }
        if let Some(g) = self.min_expected_gain {
            if !(g.is_finite() && (0.0..=100.0).contains(&g)) {
                return Err(Error::InvalidOption(
                    "min_expected_gain must be between 0 and 100 (R@1 points), or unset for no \
                     minimum"
                        .into(),
                ));
            }
        }
        Ok(ResolvedOptions {
            seed: self.seed,
            top_k,
            temperature,
            noise_scale,
            min_similarity,
            allow_ood: self.allow_ood,
            min_expected_gain: self.min_expected_gain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserialises_strictly() {
        let o: GenerateOptions =
            serde_json::from_str(r#"{"seed": 5, "top_k": 2, "min_similarity": 0.1}"#).unwrap();
        assert_eq!((o.seed, o.top_k, o.min_similarity), (5, Some(2), Some(0.1)));
        assert_eq!(
            serde_json::from_str::<GenerateOptions>("{}").unwrap(),
            GenerateOptions::default()
        );
        for bad in [
            r#"{"colour": 1}"#,
            r#"{"seed": -1}"#,
            r#"{"top_k": -1}"#,
            r#"{"seed": 1e30}"#,
            r#"{"allow_ood": "yes"}"#,
        ] {
            assert!(
                serde_json::from_str::<GenerateOptions>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_guard_cannot_be_switched_off_by_a_threshold() {
        let m: Manifest =
            serde_json::from_str(include_str!("../../../models/default/manifest.json"))
                .expect("the default bundle's manifest");
        for bad in [-1.0, -0.01, 1.01, f64::NAN, f64::INFINITY] {
            let o = GenerateOptions {
                min_similarity: Some(bad),
                ..Default::default()
            };
            let e = o.resolve(&m, m.experts.count).unwrap_err().to_string();
            assert!(e.contains("min_similarity"), "{bad}: {e}");
        }
        for ok in [0.0, 0.5, 1.0] {
            let o = GenerateOptions {
                min_similarity: Some(ok),
                ..Default::default()
            };
            assert_eq!(o.resolve(&m, m.experts.count).unwrap().min_similarity, ok);
        }
    }

    #[test]
    fn min_expected_gain_is_range_checked() {
        let m: Manifest =
            serde_json::from_str(include_str!("../../../models/default/manifest.json"))
                .expect("the default bundle's manifest");
        let resolve = |g| {
            GenerateOptions {
                min_expected_gain: g,
                ..Default::default()
            }
            .resolve(&m, m.experts.count)
        };
        for bad in [
            -1.0,
            -1e-9,
            100.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let e = resolve(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("min_expected_gain") && e.contains("between 0 and 100"),
                "{bad}: {e}"
            );
        }
        for ok in [Some(0.0), Some(2.5), Some(100.0), None] {
            assert_eq!(resolve(ok).unwrap().min_expected_gain, ok);
        }
        let o: GenerateOptions = serde_json::from_str(r#"{"min_expected_gain": 3}"#).unwrap();
        assert_eq!(o.min_expected_gain, Some(3.0));
        assert!(serde_json::from_str::<GenerateOptions>(r#"{"min_expected_gain": "3"}"#).is_err());
    }
}
