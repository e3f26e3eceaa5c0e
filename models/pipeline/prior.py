"""Semantic prior: top-K retrieval by description similarity and the moment-matched mixture.

This is the reference implementation the Rust `prior` module must match (parity fixtures).
"""

from __future__ import annotations

import numpy as np


def retrieve(query_emb: np.ndarray, expert_embs: np.ndarray, k: int, tau: float, exclude=None):
    """Indices of the top-k experts by cosine similarity, their similarities and softmax(sim/tau).
    `exclude`: an expert index or a list of them that may not be retrieved (pipeline only)."""
    sims = expert_embs @ query_emb
    sims = sims.astype(np.float64)
    if exclude is not None:
        sims = sims.copy()
        sims[exclude] = -np.inf
    k = min(k, int(np.isfinite(sims).sum()))
    # stable: highest similarity first, ties broken by lower index
    idx = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]
    s = np.array([sims[i] for i in idx])
    w = np.exp((s - s.max()) / tau)
    w = w / w.sum()
    return np.array(idx), s, w


def mixture(mu: np.ndarray, var: np.ndarray, idx, w) -> tuple[np.ndarray, np.ndarray]:
    """mu* = sum a_k mu_k ; var* = sum a_k var_k + sum a_k (mu_k - mu*)^2 (float64 accumulate)."""
    m = np.zeros(mu.shape[1], dtype=np.float64)
    for i, a in zip(idx, w):
        m += a * mu[i].astype(np.float64)
    v = np.zeros_like(m)
    for i, a in zip(idx, w):
        d = mu[i].astype(np.float64) - m
        v += a * (var[i].astype(np.float64) + d * d)
    return m, v
