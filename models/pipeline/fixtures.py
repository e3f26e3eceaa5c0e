"""Golden fixtures for the Rust parity tests (tests/fixtures/, or the tiny run's work folder).

For a few descriptions, every step of generating an adapter as the device does it, from the
bundle's own files: the int8 and PyTorch embeddings, the token ids, the retrieved experts and
their weights, mu* and var*, the CVAE's condition, z (from the portable noise) and the adapter;
and reference normals of `rng.Rng`.
"""

from __future__ import annotations

import os

import numpy as np

from .prior import denormalise, noise, norm_stats, normalise, normalise_spread, semantic_prior
from .retrieval import features, predict
from .rng import Rng
from .scope import accepts
from .work import Work, jdump, jload, log

FIXTURE_DESCRIPTIONS = [
    "Given an animal, find the broader category it is a kind of.",
    "Match the name of a plant to its dictionary definition.",
    "find the opposite of an adjective",
    "Given a part of a machine or tool, find the whole object it belongs to.",
    "For a word about feelings, retrieve an example sentence that uses it with a blank.",
    "Given the dictionary definition of a food, find the word that is being defined.",
]


def stage(w: Work):
    """The `fixtures` stage: golden.safetensors and golden.json, every intermediate of generating
    an adapter for `FIXTURE_DESCRIPTIONS` with the bundle's own files (ONNX via onnxruntime),
    and the portable normals for a few seeds."""
    import onnxruntime as ort
    from safetensors.numpy import save_file

    os.makedirs(w.fixtures, exist_ok=True)
    man = jload(os.path.join(w.bundle, "manifest.json"))
    _, mu, var = w.expert_arrays()
    nm, ns = norm_stats(mu)
    keys = w.keys()
    gm = man["expected_gain"]
    rel = [t.relation for t in w.suite["experts"]]
    request = w.requester()
    head = w.relation_head()
    k, tau = man["prior"]["top_k"], man["prior"]["temperature"]
    ref = w.torch_desc_embs(FIXTURE_DESCRIPTIONS)
    ps = ort.InferenceSession(os.path.join(w.bundle, "cvae_prior.onnx"), providers=["CPUExecutionProvider"])
    ds = ort.InferenceSession(os.path.join(w.bundle, "cvae_decoder.onnx"), providers=["CPUExecutionProvider"])
    tensors, cases = {}, []
    for i, text in enumerate(FIXTURE_DESCRIPTIONS):
        q = request(text)
        e = q.emb
        idx, sims, wts, m, v = semantic_prior(q, keys, mu, var, k, tau)
        f = features(idx, sims, wts, rel)
        accepted, scope_score = accepts(man["ood"], e, float(sims[0]))
        M, S = normalise(m, nm, ns)[None], normalise_spread(v, ns)[None]
        cnd, zm, zlv = ps.run(None, {"mu_star": M, "std_star": S})
        seed = 7 + i
        eps = noise(seed, zm.shape[1])
        z = (zm + np.exp(0.5 * zlv) * eps).astype(np.float32)
        x = ds.run(None, {"z": z, "cond": cnd, "mu_star": M, "std_star": S})[0]
        for name, arr in {
            "emb_int8": e,
            "emb_fp32": ref[i].astype(np.float32),
            "mu_star": m.astype(np.float32),
            "var_star": v.astype(np.float32),
            "cond": cnd[0],
            "z_mean": zm[0],
            "z_logvar": zlv[0],
            "z": z[0],
            "x_norm": x[0],
            "x": denormalise(x[0], nm, ns),
        }.items():
            tensors[f"{i}.{name}"] = np.ascontiguousarray(arr, dtype=np.float32)
        cases.append(
            {
                "description": text,
                "token_ids": request.ids(text),
                "relation_log_probs": None if head is None else [float(x) for x in q.rel_lp],
                "experts": [int(j) for j in idx],
                "similarities": [float(s) for s in sims],
                "weights": [float(a) for a in wts],
                "features": f,
                "expected_gain": list(predict(gm, f)),
                "scope_score": scope_score,
                "out_of_distribution": not accepted,
                "seed": seed,
            }
        )
    rng_ref = {str(s): Rng(s).normals(16) for s in (0, 1, 42, 2**63 + 5)}
    save_file(tensors, os.path.join(w.fixtures, "golden.safetensors"))
    jdump(
        os.path.join(w.fixtures, "golden.json"),
        {
            "bundle_id": man["bundle_id"],
            "top_k": k,
            "temperature": tau,
            "relations": None if head is None else head["relations"],
            "cases": cases,
            "rng_normals": rng_ref,
        },
    )
    log(f"fixtures written to {w.fixtures}")
