//! The near-duplicate index of the cache: every cached description embedding of one scope as
//! int8 codes, scanned with an exact error bound so the codes never change which entry matches.

use std::collections::HashMap;

/// Symmetric int8 code of a vector: `v ≈ scale · code`, `scale = max|v| / 127`.
fn quantise(v: &[f32]) -> (Vec<i8>, f32) {
    let m = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if m > 0.0 { m / 127.0 } else { 1.0 };
    let code = v
        .iter()
        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (code, scale)
}

fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    // Integer arithmetic: exact, so it vectorises freely (pmaddwd / sdot) and gives the same
    // answer on every architecture.
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// Brute-force nearest-embedding index of one scope, stored as int8 codes (a quarter of the
/// memory of f32 and a quarter of the bytes scanned per lookup).
///
/// A scan returns every row whose cosine *may* reach the threshold: with `e ≈ s·c` and
/// `q ≈ s_q·c_q`, `|q·e − s s_q c_q·c| ≤ (s/2)‖q‖₁ + (s_q/2) s‖c‖₁`, so a row is kept when its
/// approximate score plus that bound reaches the threshold. Candidates are then scored exactly
/// (f64 over the stored f32 embedding), so the int8 codes never change which entry matches.
#[derive(Debug, Default, Clone)]
pub struct EmbeddingIndex {
    dim: usize,
    ids: Vec<String>,
    pos: HashMap<String, usize>,
    codes: Vec<i8>,
    scales: Vec<f32>,
    l1: Vec<f32>,
}

impl EmbeddingIndex {
    /// Rows in the index.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Add (or replace) the embedding of `id`. Embeddings of another length than the first
    /// one are refused (false): a scope has one encoder.
    pub fn insert(&mut self, id: &str, embedding: &[f32]) -> bool {
        if self.ids.is_empty() {
            self.dim = embedding.len();
        }
        if embedding.len() != self.dim || self.dim == 0 {
            return false;
        }
        self.remove(id);
        let (code, scale) = quantise(embedding);
        let l1 = scale * code.iter().map(|&c| f32::from(c).abs()).sum::<f32>();
        self.pos.insert(id.to_string(), self.ids.len());
        self.ids.push(id.to_string());
        self.codes.extend_from_slice(&code);
        self.scales.push(scale);
        self.l1.push(l1);
        true
    }

    /// Remove `id` if present (swap-remove: order is not kept).
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(i) = self.pos.remove(id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        if i != last {
            let d = self.dim;
            self.codes.copy_within(last * d..(last + 1) * d, i * d);
            self.pos.insert(self.ids[last].clone(), i);
        }
        self.codes.truncate(last * self.dim);
        self.ids.swap_remove(i);
        self.scales.swap_remove(i);
        self.l1.swap_remove(i);
        true
    }

    /// Ids of the rows whose cosine to `q` may be ≥ `threshold`, best approximate score first.
    pub fn candidates(&self, q: &[f32], threshold: f64) -> Vec<&str> {
        if q.len() != self.dim || self.ids.is_empty() {
            return Vec::new();
        }
        let (qc, qs) = quantise(q);
        let q_l1: f32 = q.iter().map(|x| x.abs()).sum();
        let mut out: Vec<(f32, usize)> = Vec::new();
        for (i, code) in self.codes.chunks_exact(self.dim).enumerate() {
            let s = self.scales[i];
            let approx = s * qs * dot_i8(&qc, code) as f32;
            // f32 rounding of the score itself is covered by a small absolute slack.
            let bound = 0.5 * s * q_l1 + 0.5 * qs * self.l1[i] + 1e-5;
            if f64::from(approx + bound) >= threshold {
                out.push((approx, i));
            }
        }
        out.sort_by(|a, b| b.0.total_cmp(&a.0));
        out.into_iter().map(|(_, i)| self.ids[i].as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    /// The int8 scan never drops a row whose exact cosine reaches the threshold, over random
    /// unit vectors and near-duplicates of them, and removal keeps codes and ids aligned.
    #[test]
    fn index_candidates_contain_every_true_match() {
        let mut rng = sglora::Rng::new(7);
        for &dim in &[3usize, 384] {
            let mut ix = EmbeddingIndex::default();
            let mut rows = Vec::new();
            for i in 0..300 {
                let v = unit(
                    &rng.normals(dim)
                        .iter()
                        .map(|&x| x as f32)
                        .collect::<Vec<_>>(),
                );
                assert!(ix.insert(&format!("{i}"), &v));
                rows.push(v);
            }
            for i in (0..300).step_by(7) {
                assert!(ix.remove(&format!("{i}")));
            }
            assert!(!ix.remove("0"));
            assert_eq!(ix.len(), 300 - 43);
            for trial in 0..200 {
                let base = &rows[trial % rows.len()];
                let eps = [0.0, 0.05, 0.15, 0.3][trial % 4];
                let q = unit(
                    &base
                        .iter()
                        .zip(rng.normals(dim))
                        .map(|(x, n)| x + eps * n as f32 / (dim as f32).sqrt())
                        .collect::<Vec<_>>(),
                );
                for &t in &[0.5, 0.9, 0.97, 0.99] {
                    let cands = ix.candidates(&q, t);
                    for (i, r) in rows.iter().enumerate() {
                        if i % 7 == 0 {
                            assert!(!cands.contains(&format!("{i}").as_str()));
                        } else if dot(&q, r) >= t {
                            assert!(
                                cands.contains(&format!("{i}").as_str()),
                                "row {i} dim {dim} t {t}"
                            );
                        }
                    }
                }
            }
            assert!(!ix.insert("x", &vec![1.0; dim + 1]), "other length refused");
        }
    }
}
