//! The expected gain of a generated adapter: a linear model (`manifest.expected_gain`, fitted by
//! the pipeline) over features of the retrieval, giving an estimate of the adapter's R@1 gain
//! over the base model, in R@1 points, with a prediction interval. `models/BUNDLE.md` is
//! normative for the features; every sum runs in f64 in retrieval order.

use serde::Serialize;

use crate::bundle::ExpectedGainSpec;
use crate::prior::Retrieved;

/// A feature of the retrieval the gain model may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `s_1`: the top expert's retrieval score.
    BestScore,
    /// `s_1 − s_2` (0 when K = 1).
    Margin,
    /// `−Σ α_k ln α_k / ln K`, the normalised entropy of the weights (0 when K = 1).
    WeightEntropy,
    /// `Σ α_k [relation_k = relation_1]`: the weight on the top expert's relation.
    RelationAgreement,
}

impl Feature {
    /// Every feature, in the order the documentation lists them.
    pub const ALL: [Feature; 4] = [
        Feature::BestScore,
        Feature::Margin,
        Feature::WeightEntropy,
        Feature::RelationAgreement,
    ];

    /// The name the manifest uses.
    pub fn name(self) -> &'static str {
        match self {
            Feature::BestScore => "best_score",
            Feature::Margin => "margin",
            Feature::WeightEntropy => "weight_entropy",
            Feature::RelationAgreement => "relation_agreement",
        }
    }

    /// The feature of a manifest name.
    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// The features of one retrieval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Features {
    /// The top expert's score.
    pub best_score: f64,
    /// Top score minus the second's (0 for one expert).
    pub margin: f64,
    /// Normalised entropy of the weights, in [0, 1] (0 for one expert).
    pub weight_entropy: f64,
    /// Weight on experts of the top expert's relation, in [0, 1].
    pub relation_agreement: f64,
}

impl Features {
    /// The features of `picked` (the retrieved experts, most similar first, with their softmax
    /// weights); `relation(i)` is the relation of expert `i` of the repository. No expert gives
    /// all zeros.
    pub fn of<'a>(picked: &[Retrieved], relation: impl Fn(usize) -> &'a str) -> Features {
        let Some(first) = picked.first() else {
            return Features {
                best_score: 0.0,
                margin: 0.0,
                weight_entropy: 0.0,
                relation_agreement: 0.0,
            };
        };
        let k = picked.len();
        let margin = picked
            .get(1)
            .map_or(0.0, |second| first.similarity - second.similarity);
        let weight_entropy = if k > 1 {
            let h: f64 = picked
                .iter()
                .map(|r| {
                    if r.weight > 0.0 {
                        -r.weight * libm::log(r.weight)
                    } else {
                        0.0
                    }
                })
                .sum();
            h / libm::log(k as f64)
        } else {
            0.0
        };
        let top_relation = relation(first.index);
        let relation_agreement = picked
            .iter()
            .filter(|r| relation(r.index) == top_relation)
            .map(|r| r.weight)
            .sum();
        Features {
            best_score: first.similarity,
            margin,
            weight_entropy,
            relation_agreement,
        }
    }

    /// The value of one feature.
    pub fn get(&self, f: Feature) -> f64 {
        match f {
            Feature::BestScore => self.best_score,
            Feature::Margin => self.margin,
            Feature::WeightEntropy => self.weight_entropy,
            Feature::RelationAgreement => self.relation_agreement,
        }
    }
}

/// The expected R@1 gain of an adapter, in R@1 points, and its prediction interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ExpectedGain {
    /// The model's estimate.
    pub estimate: f64,
    /// Lower end of the interval.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
    /// The interval's coverage, in (0, 1).
    pub level: f64,
}

/// The bundle's gain model, checked: `estimate = intercept + Σ coef_i · feature_i`, interval
/// `[estimate + low, estimate + high]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GainModel {
    intercept: f64,
    terms: Vec<(Feature, f64)>,
    level: f64,
    low: f64,
    high: f64,
}

impl GainModel {
    /// Check `manifest.expected_gain`; the error names the field at fault.
    pub fn new(spec: &ExpectedGainSpec) -> Result<GainModel, String> {
        if spec.unit != "R@1 points" {
            return Err(format!(
                "expected_gain.unit {:?} is not supported (this sglora knows \"R@1 points\")",
                spec.unit
            ));
        }
        if spec.model != "linear" {
            return Err(format!(
                "expected_gain.model {:?} is not supported (this sglora knows \"linear\")",
                spec.model
            ));
        }
        if spec.coef.len() != spec.features.len() {
            return Err(format!(
                "expected_gain.coef has {} values for {} expected_gain.features",
                spec.coef.len(),
                spec.features.len()
            ));
        }
        let mut terms = Vec::with_capacity(spec.features.len());
        for (i, (name, c)) in spec.features.iter().zip(&spec.coef).enumerate() {
            let known = Feature::ALL.map(Feature::name).join(", ");
            let f = Feature::from_name(name).ok_or_else(|| {
                format!("expected_gain.features[{i}] {name:?} is not a known feature ({known})")
            })?;
            if terms.iter().any(|(g, _)| *g == f) {
                return Err(format!(
                    "expected_gain.features[{i}] {name:?} is listed twice"
                ));
            }
            if !c.is_finite() {
                return Err(format!("expected_gain.coef[{i}] is not a finite number"));
            }
            terms.push((f, *c));
        }
        let iv = &spec.interval;
        if !spec.intercept.is_finite() {
            return Err("expected_gain.intercept is not a finite number".into());
        }
        if !(iv.level > 0.0 && iv.level < 1.0) {
            return Err(format!(
                "expected_gain.interval.level is {}, expected a number in (0, 1)",
                iv.level
            ));
        }
        if !(iv.low.is_finite() && iv.high.is_finite() && iv.low <= iv.high) {
            return Err(format!(
                "expected_gain.interval low {} and high {} must be finite with low <= high",
                iv.low, iv.high
            ));
        }
        Ok(GainModel {
            intercept: spec.intercept,
            terms,
            level: iv.level,
            low: iv.low,
            high: iv.high,
        })
    }

    /// The expected gain for a retrieval's features.
    pub fn estimate(&self, f: &Features) -> ExpectedGain {
        let estimate = self
            .terms
            .iter()
            .fold(self.intercept, |acc, (feat, c)| acc + c * f.get(*feat));
        ExpectedGain {
            estimate,
            low: estimate + self.low,
            high: estimate + self.high,
            level: self.level,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::GainIntervalSpec;

    fn r(index: usize, similarity: f64, weight: f64) -> Retrieved {
        Retrieved {
            index,
            similarity,
            weight,
        }
    }

    fn spec(features: &[&str], coef: &[f64]) -> ExpectedGainSpec {
        ExpectedGainSpec {
            unit: "R@1 points".into(),
            model: "linear".into(),
            features: features.iter().map(|s| s.to_string()).collect(),
            intercept: -2.0,
            coef: coef.to_vec(),
            interval: GainIntervalSpec {
                level: 0.8,
                low: -3.0,
                high: 3.5,
            },
            fitted_on: String::new(),
        }
    }

    const RELATIONS: [&str; 4] = ["hypernym", "antonym", "hypernym", "meronym"];

    #[test]
    fn features_match_hand_computation() {
        // Experts 2, 0, 1 (relations hypernym, hypernym, antonym) with weights .5, .3, .2.
        let picked = [r(2, 0.8, 0.5), r(0, 0.6, 0.3), r(1, 0.5, 0.2)];
        let f = Features::of(&picked, |i| RELATIONS[i]);
        assert_eq!(f.best_score, 0.8);
        assert!((f.margin - 0.2).abs() < 1e-15, "{}", f.margin);
        // −(.5 ln .5 + .3 ln .3 + .2 ln .2) / ln 3 = 1.0296530140645737 / 1.0986122886681098
        let h = 1.029_653_014_064_573_7 / 1.098_612_288_668_109_8;
        assert!((f.weight_entropy - h).abs() < 1e-12, "{}", f.weight_entropy);
        assert!((f.relation_agreement - 0.8).abs() < 1e-15);
        // Equal weights: entropy 1; a zero weight contributes 0·ln 0 = 0.
        let even = Features::of(&[r(0, 0.5, 0.5), r(3, 0.5, 0.5)], |i| RELATIONS[i]);
        assert!((even.weight_entropy - 1.0).abs() < 1e-15);
        assert_eq!((even.margin, even.relation_agreement), (0.0, 0.5));
        let zero = Features::of(&[r(0, 0.9, 1.0), r(2, 0.1, 0.0)], |i| RELATIONS[i]);
        assert_eq!(zero.weight_entropy, 0.0);
        assert_eq!(zero.relation_agreement, 1.0);
    }

    #[test]
    fn one_expert_has_no_margin_and_no_entropy() {
        let f = Features::of(&[r(1, 0.7, 1.0)], |i| RELATIONS[i]);
        assert_eq!(
            f,
            Features {
                best_score: 0.7,
                margin: 0.0,
                weight_entropy: 0.0,
                relation_agreement: 1.0
            }
        );
        let none = Features::of(&[], |i| RELATIONS[i]);
        assert_eq!(none.best_score, 0.0);
    }

    #[test]
    fn estimate_and_interval() {
        let m = GainModel::new(&spec(
            &[
                "best_score",
                "margin",
                "weight_entropy",
                "relation_agreement",
            ],
            &[6.0, 10.0, -1.0, 2.0],
        ))
        .unwrap();
        let f = Features {
            best_score: 0.5,
            margin: 0.1,
            weight_entropy: 0.25,
            relation_agreement: 0.75,
        };
        // −2 + 3 + 1 − 0.25 + 1.5 = 3.25
        let g = m.estimate(&f);
        assert_eq!(
            g,
            ExpectedGain {
                estimate: 3.25,
                low: 0.25,
                high: 6.75,
                level: 0.8
            }
        );
        // A subset of the features, in another order.
        let m = GainModel::new(&spec(&["margin", "best_score"], &[1.0, 2.0])).unwrap();
        assert_eq!(m.estimate(&f).estimate, -2.0 + 0.1 + 1.0);
    }

    #[test]
    fn bad_models_are_refused_naming_the_field() {
        let err = |s: ExpectedGainSpec| GainModel::new(&s).unwrap_err();
        let e = err(spec(&["best_score", "luck"], &[1.0, 2.0]));
        assert!(
            e.contains("expected_gain.features[1]") && e.contains("luck"),
            "{e}"
        );
        let e = err(spec(&["best_score", "margin"], &[1.0]));
        assert!(e.contains("expected_gain.coef"), "{e}");
        let e = err(spec(&["margin", "margin"], &[1.0, 1.0]));
        assert!(e.contains("twice"), "{e}");
        let e = err(spec(&["margin"], &[f64::NAN]));
        assert!(e.contains("expected_gain.coef[0]"), "{e}");
        let mut s = spec(&["margin"], &[1.0]);
        s.model = "forest".into();
        assert!(err(s).contains("expected_gain.model"));
        let mut s = spec(&["margin"], &[1.0]);
        s.unit = "MRR".into();
        assert!(err(s).contains("expected_gain.unit"));
        for level in [0.0, 1.0, f64::NAN] {
            let mut s = spec(&["margin"], &[1.0]);
            s.interval.level = level;
            assert!(err(s).contains("expected_gain.interval.level"), "{level}");
        }
        let mut s = spec(&["margin"], &[1.0]);
        s.interval.low = 4.0;
        assert!(err(s).contains("expected_gain.interval"));
        let mut s = spec(&["margin"], &[1.0]);
        s.intercept = f64::INFINITY;
        assert!(err(s).contains("expected_gain.intercept"));
    }
}
