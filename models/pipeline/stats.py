"""Small statistics helpers shared by the evaluation and the analyses."""

from __future__ import annotations

import zlib

import numpy as np


def paired_interval(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int = 10000
) -> tuple[float, float, float]:
    """Mean of a - b and its 95 % percentile bootstrap interval, resampling the pairs together."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def named_rng(name: str) -> np.random.Generator:
    """A generator seeded by a name, so a result does not depend on what was computed before it."""
    return np.random.default_rng(zlib.crc32(name.encode()))
