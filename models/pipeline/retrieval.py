"""Retrieval that works on users' own words: the `keys` and `guard` stages.

`keys` (after `encoder`): every task gets a description set (`descriptions.description_set`),
embedded by the int8 encoder as the device embeds; the first `n_keys` of an expert's set are its
candidate retrieval keys, the rest are held-out paraphrases. How a request is scored against a
set is chosen on those held-out paraphrases of the expert tasks, leave-out (an expert task is
served by the experts that share no source with it, as an unseen task is): the share whose top
expert has the task's relation. Candidates: the templated description alone (bundle format 1's
single key), the set's centroid, the best key, and the mean of the best 3 or 5 keys.

`guard` (after `prior`): the expected-gain model and the out-of-distribution threshold, both on
leave-out expert paraphrases. Features of a retrieval (`features`) -> the R@1 gain (points) its
merged adapter brings on the task's validation split, fitted by least squares; the interval is
the 10th-90th percentile of leave-one-relation-out residuals. The threshold is the lowest best
score whose false acceptance on the calibration half of the hand-written off-topic set
(`models/eval/user_wording.json`, even positions) is at most `GUARD_FALSE_ACCEPT`.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from .prior import Keys, scores, semantic_prior
from .work import MODELS, Work, jdump, jload, log

FEATURES = ["best_score", "margin", "weight_entropy", "relation_agreement"]
GUARD_FALSE_ACCEPT = 0.02
RELATION_BETAS = (2, 4, 10, 25, 100)
USER_WORDING = os.path.join(MODELS, "eval", "user_wording.json")


def user_wording(w: Work | None = None) -> dict:
    """The hand-written held-out set: user-worded descriptions per unseen task, and the off-topic
    descriptions split into a calibration part (even positions) and a test part (odd). For a
    library in the task format (models/TASKS.md) the user wording is its tasks'
    `eval_descriptions`, and off-topic descriptions of a kind the library declares in scope
    (`in_scope_kinds`: a translation library's "translation") are left out of both parts."""
    d = jload(USER_WORDING)
    unseen = d["unseen"]
    kinds = set()
    if w is not None and not w.wordnet:
        unseen = {t.name: t.eval_descriptions for t in w.suite["unseen"] if t.eval_descriptions}
        kinds = set(w.suite["in_scope_kinds"])
    offk = [x for x in d["off_topic"] if x["kind"] not in kinds]
    off = [x["text"] for x in offk]
    return {"unseen": unseen, "off_calibration": off[0::2], "off_test": off[1::2], "off_kinds": offk}


def features(idx, sims, wts, relations) -> list[float]:
    """The expected-gain model's inputs for one retrieval (top-K, most similar first): the best
    score, its margin over the second, the normalised entropy of the weights, and the weight
    share of the top expert's relation (BUNDLE.md, expected_gain)."""
    k = len(idx)
    margin = float(sims[0] - sims[1]) if k > 1 else 0.0
    w = np.asarray(wts, dtype=np.float64)
    ent = float(-(w[w > 0] * np.log(w[w > 0])).sum() / np.log(k)) if k > 1 else 0.0
    agree = float(sum(a for j, a in zip(idx, w) if relations[j] == relations[idx[0]]))
    return [float(sims[0]), margin, ent, agree]


def predict(model: dict, f) -> tuple[float, float, float]:
    """(estimate, low, high) of the expected-gain model for features `f`."""
    est = model["intercept"] + float(np.dot(model["coef"], f))
    return est, est + model["interval"]["low"], est + model["interval"]["high"]


def relation_projection(x: np.ndarray, labels, beta: float, lam: float = 0.1) -> np.ndarray:
    """`[I; sqrt(beta) W]`: the embedding itself stacked on its coordinates along the relations'
    linear discriminants `W` (Fisher LDA of the key embeddings `x` by relation, the within-class
    scatter shrunk by `lam`; unit-norm rows). In the projected space a request's similarity to a
    key adds beta x its similarity in the relation subspace, so the relation a description asks for
    outweighs the domain words it mentions."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    d = x.shape[1]
    m = x.mean(0)
    rels = sorted(set(labels.tolist()))
    sb, sw = np.zeros((d, d)), np.zeros((d, d))
    for r in rels:
        xr = x[labels == r]
        c = xr.mean(0)
        sb += len(xr) * np.outer(c - m, c - m)
        sw += (xr - c).T @ (xr - c)
    sb, sw = sb / len(x), sw / len(x)
    a = np.linalg.solve(sw + lam * np.trace(sw) / d * np.eye(d), sb)
    vals, vecs = np.linalg.eig(a)
    order = np.argsort(-vals.real)[: max(len(rels) - 1, 1)]
    wd = vecs[:, order].real.T
    wd /= np.linalg.norm(wd, axis=1, keepdims=True)
    return np.vstack([np.eye(d), np.sqrt(beta) * wd]).astype(np.float32)


def _candidates(emb: np.ndarray, relations, n_keys: int) -> dict:
    """Ways of scoring a request against the expert sets (`prior.Keys`)."""
    k = emb[:, :n_keys]
    cen = k.mean(1)
    out = {
        "templated": Keys(np.ascontiguousarray(emb[:, :1])),
        "centroid": Keys((cen / np.linalg.norm(cen, axis=1, keepdims=True))[:, None, :].astype(np.float32)),
        "max": Keys(np.ascontiguousarray(k)),
        "mean_top3": Keys(np.ascontiguousarray(k), top=3),
    }
    flat, labels = k.reshape(-1, k.shape[-1]), np.repeat(relations, n_keys)
    for beta in RELATION_BETAS:
        p = relation_projection(flat, labels, beta)
        pk = np.einsum("od,nmd->nmo", p.astype(np.float64), k.astype(np.float64))
        pk /= np.linalg.norm(pk, axis=-1, keepdims=True)
        out[f"relation_projection_b{beta:g}"] = Keys(pk.astype(np.float32), 1, p)
    return out


def threshold_for(off_scores) -> float:
    """The guard's rule: the lowest best score whose false acceptance on the off-topic
    calibration descriptions is at most GUARD_FALSE_ACCEPT."""
    off = np.sort(np.asarray(off_scores, dtype=np.float64))
    allowed = int(np.floor(GUARD_FALSE_ACCEPT * len(off)))  # off-topic descriptions that may pass
    return float(np.nextafter(off[len(off) - allowed - 1], np.inf)) if len(off) else 0.0


def keys_stage(w: Work):
    """Description sets, their embeddings, the choice of scoring and the bundle's retrieval keys."""
    if os.path.exists(w.p("retrieval.json")) and os.path.exists(w.p("keys.npy")):
        return
    c = w.cfg
    n, n_keys = c["desc_set_size"], c["desc_keys"]
    E = w.embedder()
    if os.path.exists(w.p("desc_sets.npz")):
        embs = dict(np.load(w.p("desc_sets.npz")))
    else:
        sets = {g: [w.description_set(t, n) for t in w.suite[g]] for g in ("experts", "unseen")}
        embs = {
            g: np.stack([np.stack([E(x) for x in s]) for s in tqdm(sets[g], desc=f"description sets ({g})")])
            for g in sets
        }
        jdump(w.p("desc_sets.json"), {g: {t.name: s for t, s in zip(w.suite[g], sets[g])} for g in sets})
        np.savez(w.p("desc_sets.npz"), **embs)
    experts = w.suite["experts"]
    rel = [t.relation for t in experts]
    off = np.stack([E(x) for x in user_wording(w)["off_calibration"]])
    table = {}
    cands = _candidates(embs["experts"], rel, n_keys)
    for name, keys in cands.items():
        thr = threshold_for([scores(q, keys).max() for q in off])
        hits, ok, best = [], [], []
        for i, t in enumerate(experts):
            for h in embs["experts"][i, n_keys:]:
                s = scores(h, keys)
                s[w.held_out_for(i)] = -np.inf
                j = int(np.argmax(s))
                hits.append(rel[j] == t.relation)
                ok.append(rel[j] == t.relation and s[j] >= thr)
                best.append(float(s[j]))
        uh = [
            rel[int(np.argmax(scores(h, keys)))] == t.relation
            for u, t in enumerate(w.suite["unseen"])
            for h in embs["unseen"][u, 1:]
        ]
        table[name] = {
            "accepted_and_right_relation_expert_heldout": float(np.mean(ok)),
            "relation_top1_expert_heldout": float(np.mean(hits)),
            "accepted_expert_heldout": float(np.mean(np.array(best) >= thr)),
            "threshold": thr,
            "relation_top1_unseen_bank": float(np.mean(uh)) if uh else None,
            "keys_per_expert": int(keys.keys.shape[1]),
            "top": keys.top,
        }
        log(f"retrieval scoring {name}: {table[name]}")
    order = list(table)
    chosen = max(order, key=lambda k: (table[k]["accepted_and_right_relation_expert_heldout"], -order.index(k)))
    keys = cands[chosen]
    np.save(w.p("keys.npy"), keys.keys)
    if keys.proj is not None:
        np.save(w.p("projection.npy"), keys.proj)
    jdump(
        w.p("retrieval.json"),
        {
            "chosen": chosen,
            "top": keys.top,
            "projection": keys.proj is not None,
            "keys_per_expert": int(keys.keys.shape[1]),
            "set_size": n,
            "n_keys": n_keys,
            "table": table,
            "selection": "share of held-out bank paraphrases of the expert tasks (leave-out) that the guard accepts "
            "(its rule applied to each candidate) and whose top expert has the task's relation",
        },
    )
    log(f"retrieval: {chosen} ({table[chosen]})")


def guard_stage(w: Work):
    """The expected-gain model and the out-of-distribution threshold (`guard.json`)."""
    path = w.p("guard.json")
    if os.path.exists(path):
        return
    from .lora import evaluate

    c = w.cfg
    keys = w.keys()
    pr = jload(w.p("prior.json"))["best"]
    k, tau, gain = pr["k"], pr["tau"], float(pr.get("gain", 1.0))
    _, mu, var = w.expert_arrays()
    experts = w.suite["experts"]
    rel = [t.relation for t in experts]
    zs = jload(w.p("zeroshot.json"))
    reqs = w.set_requests("experts")
    n_keys = c["desc_keys"]
    rows = []
    rng = np.random.default_rng(11)
    for i, t in enumerate(tqdm(experts, desc="expected gain (leave-out experts)")):
        held = reqs[i][n_keys:]
        picks = [0] + [
            n_keys + int(j) for j in rng.choice(len(held), size=min(c["gain_queries"], len(held)), replace=False)
        ]
        for p in picks:
            idx, sims, wts, m, _ = semantic_prior(reqs[i][p], keys, mu, var, k, tau, exclude=w.held_out_for(i))
            g = 100 * (evaluate(w.lora, t.val, gain * m)["r1"] - zs[t.name]["val"]["r1"])
            rows.append(
                {
                    "expert": i,
                    "relation": t.relation,
                    "query": int(p),
                    "features": features(idx, sims, wts, rel),
                    "gain": g,
                }
            )
    X = np.array([[1.0] + r["features"] for r in rows])
    y = np.array([r["gain"] for r in rows])
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    # residuals of fits that never saw the relation: an interval for a task of a new kind
    resid = np.zeros_like(y)
    for r_name in sorted(set(rel)):
        mask = np.array([r["relation"] == r_name for r in rows])
        if mask.all():
            resid[mask] = y[mask] - X[mask] @ beta
            continue
        b = np.linalg.lstsq(X[~mask], y[~mask], rcond=None)[0]
        resid[mask] = y[mask] - X[mask] @ b
    lo, hi = (float(x) for x in np.percentile(resid, [10, 90]))
    model = {
        "unit": "R@1 points",
        "model": "linear",
        "features": FEATURES,
        "intercept": float(beta[0]),
        "coef": [float(b) for b in beta[1:]],
        "interval": {"level": 0.8, "low": lo, "high": hi},
        "fitted_on": f"{len(rows)} leave-out retrievals of the {len(experts)} expert tasks (templated description and "
        f"{c['gain_queries']} held-out bank paraphrases each): R@1 gain of the merged prior on the task's validation "
        "split; interval: 10th-90th percentile of leave-one-relation-out residuals",
        "in_sample_r2": float(1 - ((y - X @ beta) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)),
    }
    # the threshold on the best score
    request = w.requester()
    uw = user_wording(w)
    inscope = [r["features"][0] for r in rows if r["query"] != 0]
    off = [float(scores(request(x), keys).max()) for x in tqdm(uw["off_calibration"], desc="off-topic calibration")]
    thr = threshold_for(off)
    acc_in = float(np.mean([s >= thr for s in inscope]))
    benefit_in = float(np.mean([r["gain"] for r in rows if r["query"] != 0 and r["features"][0] >= thr]))
    guard = {
        "min_similarity": thr,
        "rule": f"lowest best score with false acceptance <= {GUARD_FALSE_ACCEPT:.0%} on the calibration half of the "
        "hand-written off-topic set",
        "calibration": {
            "in_scope": "held-out bank paraphrases of the expert tasks, leave-out",
            "n_in_scope": len(inscope),
            "in_scope_accepted": acc_in,
            "mean_gain_of_accepted_in_scope": benefit_in,
            "n_off_topic": len(off),
            "off_topic_accepted": float(np.mean([o >= thr for o in off])),
            "off_topic_best_score_max": max(off),
        },
    }
    jdump(path, {"expected_gain": model, "ood": guard, "rows": rows})
    log(
        f"guard: threshold {thr} (in-scope accepted {acc_in:.2f}); expected gain {model['coef']} r2 {model['in_sample_r2']:.2f}"
    )
