//! The relation head: which relation a request asks for, read from the encoder's token states.
//!
//! The mean-pooled description embedding carries a request's domain words more than the
//! direction of its relation ("the group this animal belongs to" and "a member of this group"
//! pool to neighbours). The head reads the final-layer token states `h_t` instead:
//!
//! ```text
//! logit_r = max_t (w_r · h_t) + b_r        log p(r | request) = log_softmax(logit)_r
//! term_j  = γ · (log p(relation_j | request) + ln R)
//! ```
//!
//! and each expert's retrieval score gains `term_j`: the log-odds of its relation against a
//! uniform guess over the head's `R` relations, so the best score stays on a key similarity's
//! scale (the out-of-distribution threshold and the expected-gain features read it), and an
//! expert whose relation the head does not list gets 0. Each product `w_r · h_t` is accumulated
//! in f64 from the f32 values in element order, the bias added and the log-softmax taken in f64,
//! as the pipeline's `relation.log_probs` does (`models/pipeline/relation.py`, which trains it);
//! `exp` and `ln` are the pure-Rust `libm`'s, so every platform gets the same bits.

use crate::bundle::RelationHeadSpec;

/// A loaded relation head (`manifest.retrieval.relation_head` and its two tensors).
#[derive(Debug, Clone, PartialEq)]
pub struct RelationHead {
    relations: Vec<String>,
    gamma: f64,
    /// `[R, dim]` row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    dim: usize,
}

/// What the head read from one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationGuess {
    /// `log p(r | request)` for each of the head's relations, in its order.
    pub log_probs: Vec<f64>,
}

impl RelationHead {
    /// A head from its manifest entry and tensors (`weight` `[R, dim]`, `bias` `[R]`, finite):
    /// why not, if they do not fit.
    pub fn new(
        spec: &RelationHeadSpec,
        weight: Vec<f32>,
        bias: Vec<f32>,
        dim: usize,
    ) -> Result<RelationHead, String> {
        let r = spec.relations.len();
        if weight.len() != r * dim || bias.len() != r {
            return Err(format!(
                "the relation head has {} weights and {} biases, expected {r}×{dim} and {r}",
                weight.len(),
                bias.len()
            ));
        }
        if weight.iter().chain(&bias).any(|x| !x.is_finite()) {
            return Err("the relation head's tensors are not finite".into());
        }
        Ok(RelationHead {
            relations: spec.relations.clone(),
            gamma: spec.gamma,
            weight,
            bias,
            dim,
        })
    }

    /// The head's relations, in its order.
    pub fn relations(&self) -> &[String] {
        &self.relations
    }

    /// The weight γ of the relation term.
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// `log p(r | request)` from the request's token states (`[n, dim]` row-major, n ≥ 1).
    pub fn read(&self, states: &[f32]) -> RelationGuess {
        let mut logits = vec![f64::NEG_INFINITY; self.relations.len()];
        let mut dots = Vec::with_capacity(logits.len());
        for h in states.chunks_exact(self.dim) {
            crate::kernels::dots_f64(&self.weight, h, &mut dots);
            for (z, d) in logits.iter_mut().zip(&dots) {
                *z = z.max(*d);
            }
        }
        for (z, b) in logits.iter_mut().zip(&self.bias) {
            *z += f64::from(*b);
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = logits.iter().map(|z| libm::exp(z - max)).sum();
        let lse = max + libm::log(total);
        RelationGuess {
            log_probs: logits.iter().map(|z| z - lse).collect(),
        }
    }

    /// Expert `relation`'s part of its score for a request the head read as `guess`:
    /// `γ · (log p + ln R)`, 0 for a relation the head does not list.
    pub fn term(&self, guess: &RelationGuess, relation: &str) -> f64 {
        match self.relations.iter().position(|r| r == relation) {
            Some(i) => self.gamma * (guess.log_probs[i] + libm::log(self.relations.len() as f64)),
            None => 0.0,
        }
    }

    /// The relation the head finds likeliest and its probability (the first on a tie).
    pub fn likeliest<'a>(&'a self, guess: &RelationGuess) -> (&'a str, f64) {
        let mut best = 0;
        for (i, lp) in guess.log_probs.iter().enumerate() {
            if *lp > guess.log_probs[best] {
                best = i;
            }
        }
        (&self.relations[best], libm::exp(guess.log_probs[best]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(gamma: f64) -> RelationHead {
        let spec = RelationHeadSpec {
            weight: "w".into(),
            bias: "b".into(),
            relations: vec!["hypernym".into(), "member".into(), "group".into()],
            gamma,
            pool: "max".into(),
            selection: String::new(),
        };
        // relation 0 reads dimension 0, relation 1 dimension 1, relation 2 neither (bias 0.5)
        let w = vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        RelationHead::new(&spec, w, vec![0.0, 0.0, 0.5], 2).unwrap()
    }

    #[test]
    fn logits_are_the_max_over_tokens_plus_bias_then_a_log_softmax() {
        let h = head(0.1);
        // token 0 says relation 0 (2.0), token 1 says relation 1 (3.0)
        let g = h.read(&[2.0, -1.0, 0.0, 3.0]);
        let z = [2.0f64, 3.0, 0.5];
        let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
        for (lp, z) in g.log_probs.iter().zip(z) {
            assert!((lp - (z - lse)).abs() < 1e-12, "{lp} vs {}", z - lse);
        }
        let p: f64 = g.log_probs.iter().map(|x| x.exp()).sum();
        assert!((p - 1.0).abs() < 1e-12);
        assert_eq!(h.likeliest(&g).0, "member");
    }

    #[test]
    fn the_term_is_gamma_times_the_log_odds_against_uniform() {
        let h = head(0.2);
        let g = h.read(&[2.0, -1.0, 0.0, 3.0]);
        let want = 0.2 * (g.log_probs[1] + 3f64.ln());
        assert!((h.term(&g, "member") - want).abs() < 1e-15);
        assert!(h.term(&g, "member") > 0.0 && h.term(&g, "group") < 0.0);
        // an unlisted relation: no opinion; gamma 0: no effect
        assert_eq!(h.term(&g, "antonym"), 0.0);
        assert_eq!(head(0.0).term(&g, "member"), 0.0);
        // a uniform reading gives every listed relation 0 too
        let flat = RelationGuess {
            log_probs: vec![-(3f64.ln()); 3],
        };
        assert!(h.term(&flat, "hypernym").abs() < 1e-15);
    }

    #[test]
    fn tensors_that_do_not_fit_are_refused() {
        let spec = RelationHeadSpec {
            weight: "w".into(),
            bias: "b".into(),
            relations: vec!["a".into(), "b".into()],
            gamma: 0.1,
            pool: "max".into(),
            selection: String::new(),
        };
        let e = RelationHead::new(&spec, vec![0.0; 5], vec![0.0; 2], 3).unwrap_err();
        assert!(e.contains("expected 2×3"), "{e}");
        let e = RelationHead::new(&spec, vec![f32::NAN; 6], vec![0.0; 2], 3).unwrap_err();
        assert!(e.contains("not finite"), "{e}");
    }
}
