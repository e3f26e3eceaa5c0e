//! Semantic prior: top-K experts by retrieval score and their moment-matched mixture.
//!
//! An expert's score for a query `q` is the mean of the `t` largest dot products `q · key_{k,j}`
//! over its `m` keys (`manifest.retrieval`, `score = "mean_top"`; with one key, the cosine
//! similarity of the descriptions). `α = softmax(score/τ)` over the K best-scoring experts; `μ* = Σ α_k μ_k` and
//! `σ*² = Σ α_k σ²_k + Σ α_k (μ_k − μ*)²`, accumulated in f64 in retrieval order (as the Python
//! reference `models/pipeline/prior.py` does).

use crate::error::Result;
use crate::experts::Experts;
use crate::relation::RelationGuess;

/// One retrieved expert.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    /// Index in the expert repository.
    pub index: usize,
    /// Retrieval score (mean of the expert's `top` largest key similarities).
    pub similarity: f64,
    /// Mixture weight α.
    pub weight: f64,
}

/// The retrieval score of every expert for the (L2-normalised) query `q` (projected first,
/// [`crate::Keys::project`], when the keys have a projection): for expert `k`, the mean of the
/// `top` largest of `q · key_{k,j}` (each accumulated in f64 from f32 products in element
/// order), summed largest first and divided by `top`.
///
/// With a relation head's reading of the request (`relation`, [`crate::RelationHead::read`]),
/// each expert's score then gains the head's term for its relation ([`crate::relation`]).
pub fn similarities(
    query: &[f32],
    relation: Option<&RelationGuess>,
    experts: &Experts,
) -> Vec<f64> {
    let keys = experts.keys();
    let projected = keys.project(query);
    let mut dots = Vec::with_capacity(keys.values.len() / keys.dim.max(1));
    crate::kernels::dots_f64(&keys.values, &projected, &mut dots);
    let mut sims: Vec<f64> = dots
        .chunks_exact_mut(keys.per_expert)
        .take(experts.len())
        .map(|d| mean_top(d, keys.top))
        .collect();
    if let (Some(head), Some(guess)) = (experts.relation_head(), relation) {
        for (i, s) in sims.iter_mut().enumerate() {
            *s += head.term(guess, &experts.meta(i).relation);
        }
    }
    sims
}

/// Mean of the `t` largest values (`1 ≤ t ≤ values.len()`), summed largest first; reorders
/// `values`.
fn mean_top(values: &mut [f64], t: usize) -> f64 {
    if t == 1 {
        return values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    }
    values.sort_unstable_by(|a, b| b.total_cmp(a));
    values[..t].iter().sum::<f64>() / t as f64
}

/// The `k` best-scoring experts (ties broken by index) with softmax weights at temperature `tau`.
pub fn retrieve(sims: &[f64], k: usize, tau: f64) -> Vec<Retrieved> {
    let mut order: Vec<usize> = (0..sims.len()).collect();
    order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]).then(a.cmp(&b)));
    order.truncate(k.min(sims.len()));
    let max = order.first().map(|&i| sims[i]).unwrap_or(0.0);
    let ws: Vec<f64> = order
        .iter()
        .map(|&i| ((sims[i] - max) / tau).exp())
        .collect();
    let total: f64 = ws.iter().sum();
    order
        .iter()
        .zip(ws)
        .map(|(&index, w)| Retrieved {
            index,
            similarity: sims[index],
            weight: w / total,
        })
        .collect()
}

/// The semantic prior in parameter space.
#[derive(Debug, Clone)]
pub struct Prior {
    /// μ*.
    pub mean: Vec<f32>,
    /// σ*².
    pub var: Vec<f32>,
}

/// Moment-matched mixture of the retrieved experts' parameter distributions.
///
/// Fails only if an expert's parameters cannot be read from the bundle file.
pub fn mixture(experts: &Experts, picked: &[Retrieved]) -> Result<Prior> {
    let d = experts.dim();
    // One pass over the K rows, read into two reused buffers rather than holding all K experts:
    // accumulate Σα μ and Σα (σ² + μ²) in f64, then σ*² = Σα (σ² + μ²) − μ*², which equals the
    // two-pass form Σα σ² + Σα (μ − μ*)² because Σα = 1. f64 keeps the cancellation harmless:
    // parameters are O(1e-2), so its absolute error is ~1e-20, far below f32 resolution of σ*².
    let (mut mu, mut var) = (vec![0f32; d], vec![0f32; d]);
    let mut m = vec![0f64; d];
    let mut s = vec![0f64; d];
    let total: f64 = picked.iter().map(|r| r.weight).sum();
    for r in picked {
        experts.read_mu(r.index, &mut mu)?;
        experts.read_var(r.index, &mut var)?;
        let w = r.weight / total;
        for (((m, s), x), v) in m.iter_mut().zip(s.iter_mut()).zip(&mu).zip(&var) {
            let x = f64::from(*x);
            *m += w * x;
            *s += w * (f64::from(*v) + x * x);
        }
    }
    Ok(Prior {
        var: m
            .iter()
            .zip(&s)
            .map(|(m, s)| (s - m * m).max(0.0) as f32)
            .collect(),
        mean: m.into_iter().map(|x| x as f32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::Keys;

    /// Two experts with three 2-d keys each; for q = [1, 0] expert 0's key similarities are
    /// 1, 0 and 0.6, expert 1's 0.8 three times.
    fn three_keys(top: usize) -> Experts {
        let keys = Keys {
            dim: 2,
            per_expert: 3,
            top,
            values: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8, 0.8, 0.6, 0.8, 0.6, 0.8, 0.6],
            projection: None,
        };
        let names = vec!["e0".to_string(), "e1".to_string()];
        Experts::from_parts(names.clone(), names, keys, vec![0.0; 2], vec![0.0; 2]).unwrap()
    }

    #[test]
    fn score_is_the_mean_of_the_top_key_similarities() {
        let q = [1.0f32, 0.0];
        let (six, eight) = (f64::from(0.6f32), f64::from(0.8f32));
        // t = 1: the best key.
        let s = similarities(&q, None, &three_keys(1));
        assert_eq!(s, vec![1.0, eight]);
        // t = 2 (between 1 and m): (1 + 0.6) / 2, which ties expert 1's 0.8 exactly in f32
        // terms (13421773 / 2^24 both); the tie goes to the lower index.
        let s = similarities(&q, None, &three_keys(2));
        assert_eq!(s, vec![(1.0 + six) / 2.0, eight]);
        assert_eq!(s[0], s[1]);
        let order: Vec<usize> = retrieve(&s, 2, 0.1).iter().map(|r| r.index).collect();
        assert_eq!(order, vec![0, 1]);
        // t = m: the mean of all, (1 + 0 + 0.6) / 3 < 0.8: expert 1 now ranks first.
        let s = similarities(&q, None, &three_keys(3));
        assert!(
            (s[0] - 1.6 / 3.0).abs() < 1e-7 && (s[1] - 0.8).abs() < 1e-7,
            "{s:?}"
        );
        assert_eq!(s[0], (1.0 + six + 0.0) / 3.0);
        assert_eq!(s[1], (eight + eight + eight) / 3.0);
        let order: Vec<usize> = retrieve(&s, 2, 0.1).iter().map(|r| r.index).collect();
        assert_eq!(order, vec![1, 0]);
    }

    #[test]
    fn softmax_weights_sum_to_one_and_follow_similarity() {
        let r = retrieve(&[0.1, 0.9, 0.5, 0.9], 3, 0.1);
        assert_eq!(r.iter().map(|x| x.index).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f64 = r.iter().map(|x| x.weight).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((r[0].weight - r[1].weight).abs() < 1e-12);
        assert!(r[1].weight > r[2].weight);
    }

    #[test]
    fn k_larger_than_repository_is_clamped() {
        assert_eq!(retrieve(&[0.2, 0.3], 8, 1.0).len(), 2);
    }

    #[test]
    fn one_pass_mixture_matches_the_two_pass_definition() {
        // Parameters of the bundle's magnitude (1e-2) with spreads from 1e-10 to 1e-4: the
        // one-pass σ*² must agree with Σα σ² + Σα (μ − μ*)² to f32 precision.
        let (k, d) = (5usize, 64usize);
        let mut rng = crate::rng::Rng::new(3);
        let mu: Vec<f32> = rng
            .normals(k * d)
            .iter()
            .map(|x| (x * 1e-2) as f32)
            .collect();
        let var: Vec<f32> = (0..k * d)
            .map(|i| 10f32.powi(-10 + (i % 7) as i32))
            .collect();
        let names: Vec<String> = (0..k).map(|i| i.to_string()).collect();
        let ex = Experts::from_parts(
            names.clone(),
            names,
            Keys::single(1, vec![0.0; k]),
            mu.clone(),
            var.clone(),
        )
        .unwrap();
        let picked = retrieve(&[0.3, 0.1, 0.5, 0.2, 0.4], k, 0.1);
        let p = mixture(&ex, &picked).unwrap();
        for j in 0..d {
            let m: f64 = picked
                .iter()
                .map(|r| r.weight * f64::from(mu[r.index * d + j]))
                .sum();
            let v: f64 = picked
                .iter()
                .map(|r| {
                    let x = f64::from(mu[r.index * d + j]) - m;
                    r.weight * (f64::from(var[r.index * d + j]) + x * x)
                })
                .sum();
            assert!(
                (f64::from(p.mean[j]) - m).abs() <= 1e-7 * m.abs().max(1e-12),
                "mean {j}"
            );
            assert!(
                (f64::from(p.var[j]) - v).abs() <= 1e-6 * v,
                "var {j}: {} vs {v}",
                p.var[j]
            );
        }
    }

    #[test]
    fn mixture_of_two_matches_hand_computation() {
        let ex = Experts::from_parts(
            vec!["a".into(), "b".into()],
            vec!["da".into(), "db".into()],
            Keys::single(2, vec![1.0, 0.0, 0.0, 1.0]),
            vec![1.0, 3.0, 2.0, 5.0],
            vec![0.5, 0.5, 1.0, 1.0],
        )
        .unwrap();
        let picked = [
            Retrieved {
                index: 0,
                similarity: 0.0,
                weight: 0.25,
            },
            Retrieved {
                index: 1,
                similarity: 0.0,
                weight: 0.75,
            },
        ];
        let p = mixture(&ex, &picked).unwrap();
        // mean = .25*[1,3] + .75*[2,5] = [1.75, 4.5]
        assert_eq!(p.mean, vec![1.75, 4.5]);
        // var = .25*(.5 + .75²) + .75*(1 + .25²) ; .25*(.5+1.5²) + .75*(1+.5²)
        let v0 = 0.25 * (0.5 + 0.75f64 * 0.75) + 0.75 * (1.0 + 0.25 * 0.25);
        let v1 = 0.25 * (0.5 + 1.5f64 * 1.5) + 0.75 * (1.0 + 0.5 * 0.5);
        assert!((f64::from(p.var[0]) - v0).abs() < 1e-6 && (f64::from(p.var[1]) - v1).abs() < 1e-6);
    }
}
