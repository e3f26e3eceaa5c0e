//! The in-scope guard: is a description a task this bundle's experts are about at all?
//!
//! The best expert score says how near the closest expert is, not whether the request is a task
//! of the repository's kind: an app framing, a story or a list of examples lowers it as much as
//! an off-topic request does. Since the scope guard, `manifest.ood.scope` holds a linear
//! classifier of the description's embedding, fitted by the pipeline (`models/pipeline/scope.py`):
//! `score = w · e + b`, accumulated in f64 in element order (BUNDLE.md, Generation step 2); a
//! score below `min_score` is out of distribution.

use crate::bundle::ScopeSpec;

/// A checked `ood.scope` block.
#[derive(Debug, Clone)]
pub struct Scope {
    weights: Vec<f64>,
    bias: f64,
    min_score: f64,
}

impl Scope {
    /// Check a manifest's scope block against the encoder's dimension; the error names the field.
    pub fn new(spec: &ScopeSpec, dim: usize) -> Result<Scope, String> {
        if spec.kind != "linear" {
            return Err(format!(
                "ood.scope.kind is {:?}; this sglora knows only \"linear\"",
                spec.kind
            ));
        }
        if spec.weights.len() != dim {
            return Err(format!(
                "ood.scope.weights has {} values, expected encoder.dim ({dim})",
                spec.weights.len()
            ));
        }
        if let Some(i) = spec.weights.iter().position(|w| !w.is_finite()) {
            return Err(format!("ood.scope.weights[{i}] is not a finite number"));
        }
        for (name, v) in [("bias", spec.bias), ("min_score", spec.min_score)] {
            if !v.is_finite() {
                return Err(format!("ood.scope.{name} is not a finite number"));
            }
        }
        Ok(Scope {
            weights: spec.weights.clone(),
            bias: spec.bias,
            min_score: spec.min_score,
        })
    }

    /// `w · e + b` for a description embedding (f64, element order, then the bias).
    pub fn score(&self, embedding: &[f32]) -> f64 {
        let dot = embedding
            .iter()
            .zip(&self.weights)
            .fold(0.0f64, |acc, (&e, &w)| acc + f64::from(e) * w);
        dot + self.bias
    }

    /// The threshold: below it a description is out of scope.
    pub fn min_score(&self) -> f64 {
        self.min_score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(weights: Vec<f64>) -> ScopeSpec {
        ScopeSpec {
            kind: "linear".into(),
            weights,
            bias: -0.5,
            min_score: 0.25,
        }
    }

    #[test]
    fn the_score_is_the_affine_function_in_f64() {
        let s = Scope::new(&spec(vec![1.0, -2.0, 0.5]), 3).unwrap();
        assert_eq!(s.score(&[0.5, 0.25, 2.0]), 0.5 - 0.5 + 1.0 - 0.5);
        assert_eq!(s.min_score(), 0.25);
        // f32 inputs widen exactly: a product a float32 sum would round is kept
        let s = Scope::new(&spec(vec![1.0, 1.0]), 2).unwrap();
        assert_eq!(s.score(&[16_777_216.0, 1.0]), 16_777_217.0 - 0.5);
    }

    #[test]
    fn a_bad_block_is_refused_naming_the_field() {
        let e = Scope::new(&spec(vec![1.0; 3]), 4).unwrap_err();
        assert!(
            e.contains("ood.scope.weights has 3 values") && e.contains("(4)"),
            "{e}"
        );
        let e = Scope::new(&spec(vec![1.0, f64::NAN]), 2).unwrap_err();
        assert!(e.contains("ood.scope.weights[1]"), "{e}");
        let mut s = spec(vec![1.0]);
        s.min_score = f64::INFINITY;
        assert!(Scope::new(&s, 1)
            .unwrap_err()
            .contains("ood.scope.min_score"));
        let mut s = spec(vec![1.0]);
        s.kind = "mlp".into();
        assert!(Scope::new(&s, 1).unwrap_err().contains("ood.scope.kind"));
    }
}
