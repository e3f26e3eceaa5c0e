//! Semantic prior: top-K experts by description similarity and their moment-matched mixture.
//!
//! `α = softmax(sim/τ)` over the K most similar experts; `μ* = Σ α_k μ_k` and
//! `σ*² = Σ α_k σ²_k + Σ α_k (μ_k − μ*)²`, accumulated in f64 in retrieval order (as the Python
//! reference `models/pipeline/prior.py` does).

use crate::error::Result;
use crate::experts::Experts;

/// One retrieved expert.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    /// Index in the expert repository.
    pub index: usize,
    /// Cosine similarity of the descriptions.
    pub similarity: f64,
    /// Mixture weight α.
    pub weight: f64,
}

/// Cosine similarity of the (L2-normalised) query to every expert description.
pub fn similarities(query: &[f32], experts: &Experts) -> Vec<f64> {
    (0..experts.len())
        .map(|i| {
            experts
                .desc_emb(i)
                .iter()
                .zip(query)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        })
        .collect()
}

/// The `k` most similar experts (ties broken by index) with softmax weights at temperature `tau`.
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
    // Rows are read into two reused buffers (μ once for the mean, μ and σ² again for the
    // variance) rather than holding all K experts at once.
    let (mut mu, mut var) = (vec![0f32; d], vec![0f32; d]);
    let mut m = vec![0f64; d];
    for r in picked {
        experts.read_mu(r.index, &mut mu)?;
        for (acc, x) in m.iter_mut().zip(&mu) {
            *acc += r.weight * f64::from(*x);
        }
    }
    let mut v = vec![0f64; d];
    for r in picked {
        experts.read_mu(r.index, &mut mu)?;
        experts.read_var(r.index, &mut var)?;
        for j in 0..d {
            let diff = f64::from(mu[j]) - m[j];
            v[j] += r.weight * (f64::from(var[j]) + diff * diff);
        }
    }
    Ok(Prior {
        mean: m.into_iter().map(|x| x as f32).collect(),
        var: v.into_iter().map(|x| x as f32).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn mixture_of_two_matches_hand_computation() {
        let ex = Experts::from_parts(
            vec!["a".into(), "b".into()],
            vec!["da".into(), "db".into()],
            2,
            vec![1.0, 0.0, 0.0, 1.0],
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
