"""The method's reference maths: the semantic prior and the generator's normalised space.

Top-K retrieval by description similarity, the moment-matched mixture (mu*, sigma*^2), the
parameter normalisation the CVAE works in, and the generator's noise. This is the reference the
Rust side must match (parity fixtures, BUNDLE.md); the evaluation, the fixtures, the benchmark
and the `cvae` and `tune` stages all go through these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rng import Rng


@dataclass(frozen=True)
class Request:
    """A request as retrieval sees it: its description embedding and, when the bundle has a
    relation head (`relation.py`), log p(relation | description) over the head's relations."""

    emb: np.ndarray
    rel_lp: np.ndarray | None = None


@dataclass(frozen=True)
class RelationTerm:
    """The relation head's part of an expert's score, `gamma * log(R * p(relation_j | request))`
    over the head's R relations: the log-odds of expert j's relation against a uniform guess, so
    the relation the head finds likelier than 1/R raises a score and an unlikelier one lowers it,
    and the best expert's score stays on the scale of a key similarity (the guard's threshold
    and the expected-gain features read it). `rel_of[j]` is expert j's relation as an index into
    the head's relations, or -1 for a relation the head does not know, which gets 0 (no opinion)."""

    gamma: float
    rel_of: np.ndarray

    @classmethod
    def of(cls, gamma: float, relations, expert_relations) -> RelationTerm:
        """The term for experts of `expert_relations` under a head over `relations` (an expert
        of another relation gets -1)."""
        ri = {r: i for i, r in enumerate(relations)}
        return cls(float(gamma), np.array([ri.get(r, -1) for r in expert_relations]))

    def term(self, rel_lp: np.ndarray) -> np.ndarray:
        lp = np.asarray(rel_lp, dtype=np.float64)
        known = self.rel_of >= 0
        out = np.zeros(len(self.rel_of))
        out[known] = lp[self.rel_of[known]] + np.log(len(lp))
        return self.gamma * out


@dataclass
class Keys:
    """An expert repository's retrieval keys (bundle format 2, BUNDLE.md): `keys` [n, m, d'] (each
    row L2-normalised, in the projected space when there is a projection), how many of an
    expert's best key similarities its score averages (`top`), the optional linear projection
    [d', d] a request embedding goes through (then L2-normalised) first, and the optional
    relation head's term (`RelationTerm`)."""

    keys: np.ndarray
    top: int = 1
    proj: np.ndarray | None = None
    relation: RelationTerm | None = None

    def project(self, query_emb) -> np.ndarray:
        """The request in key space: P q / |P q| (float64 accumulation, float32 result)."""
        if self.proj is None:
            return np.asarray(query_emb, dtype=np.float32)
        q = self.proj.astype(np.float64) @ np.asarray(query_emb, dtype=np.float64)
        return (q / np.linalg.norm(q)).astype(np.float32)

    def scores(self, query) -> np.ndarray:
        """Every expert's score (float64): the mean of its `top` largest key similarities, plus
        the relation term when the keys have one. `query`: a `Request`, or a plain embedding for
        keys without a relation head."""
        emb, lp = (query.emb, query.rel_lp) if isinstance(query, Request) else (query, None)
        sims = np.sort((self.keys @ self.project(emb)).astype(np.float64), axis=1)[:, ::-1]
        s = sims[:, : self.top].mean(axis=1)
        if self.relation is not None:
            if lp is None:
                raise ValueError("these keys have a relation head: score a Request with its rel_lp")
            s = s + self.relation.term(lp)
        return s


def scores(query, keys) -> np.ndarray:
    """Every expert's retrieval score for one query (float64): `Keys.scores`, or for a plain
    array of one key per expert ([n, d], bundle format 1 and the ablations) the cosine similarity."""
    if isinstance(keys, Keys):
        return keys.scores(query)
    emb = query.emb if isinstance(query, Request) else query
    return (keys @ emb).astype(np.float64)


def retrieve(query_emb, keys, k: int, tau: float, exclude=None):
    """Indices of the top-k experts by retrieval score (`scores`; `query_emb` an embedding or a
    `Request`), their scores and
    softmax(score/tau). `exclude`: an expert index or a list of them that may not be retrieved
    (pipeline only)."""
    sims = scores(query_emb, keys)
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


def semantic_prior(query_emb, keys, mu, var, k: int, tau: float, exclude=None):
    """`retrieve` then `mixture`: (idx, sims, weights, mu*, var*) for one description embedding."""
    idx, sims, w = retrieve(query_emb, keys, k, tau, exclude=exclude)
    m, v = mixture(mu, var, idx, w)
    return idx, sims, w, m, v


def norm_stats(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parameter normalisation (norm_mean, norm_std) from the experts' mu: one scale and *no
    centring*. The decoder's base is gain x (normalised mu*); uncentred, that is exactly the
    validated merge gain x mu* of the `prior` stage. (Centred on the experts' mean, as until suite
    v2, the base was mean + gain (mu* - mean): not what was validated.)"""
    mean = np.zeros(mu.shape[1], dtype=np.float32)
    # one scale: per-coordinate stats of 48 samples are noise
    std = np.full_like(mean, max(float(np.sqrt((mu.astype(np.float64) ** 2).mean())), 1e-8))
    return mean.astype(np.float32), std.astype(np.float32)


def normalise(x, nm, ns) -> np.ndarray:
    """Parameter vector(s) into the CVAE's space: (x - norm_mean) / norm_std, float32."""
    return ((x - nm) / ns).astype(np.float32)


def normalise_spread(var, ns) -> np.ndarray:
    """The prior's spread into the CVAE's space: sqrt(var) / norm_std, float32."""
    return (np.sqrt(var) / ns).astype(np.float32)


def denormalise(x, nm, ns):
    """A normalised vector (numpy or torch) back to LoRA parameters: x * norm_std + norm_mean."""
    return x * ns + nm


def noise(seed: int, zdim: int) -> np.ndarray:
    """The generator's eps for a seed ([1, zdim] float32): the portable normals of `rng.Rng`."""
    return np.array([Rng(seed).normals(zdim)], dtype=np.float32)


def generate(model, query_emb, keys, mu, var, k: int, tau: float, nm, ns, seed=None):
    """Description embedding -> flat adapter with the PyTorch CVAE (`cvae.CVAE`): the semantic
    prior, normalised, through the generator with z = the prior mean, or with `seed` a sample
    with the portable noise. Returns (adapter, mu*, retrieved indices, their weights)."""
    import torch

    idx, _, w, m, v = semantic_prior(query_emb, keys, mu, var, k, tau)
    M = torch.from_numpy(normalise(m, nm, ns)[None])
    S = torch.from_numpy(normalise_spread(v, ns)[None])
    eps = None if seed is None else torch.from_numpy(noise(seed, model.zdim))
    with torch.no_grad():
        x = model.generate(M, S, eps)[0].numpy()
    return denormalise(x, nm, ns), m, idx, w
