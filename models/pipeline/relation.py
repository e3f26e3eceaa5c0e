"""The `relation` stage: which relation a description asks for, read from its tokens (#18).

The mean-pooled description embedding carries the domain words of a request more than the
direction of its relation: with the keys alone the top expert had the asked-for relation for half
of the hand-written user wordings (models/README.md). The relation head reads the encoder's
*token* states instead:

    logit_r = max_t (w_r . h_t) + b_r,   p(r | request) = softmax(logit)_r

over the final-layer states h_t of the description's tokens, as the device's encoder computes them
(the bundle's int8 ONNX encoder; the Rust runtimes give the same states to the parity tolerance).
It is trained by cross-entropy on the expert tasks' key wordings (the first `desc_keys` of each
description set; the held-out wordings stay held out) and `HEAD_BANK` wordings (descriptions.py),
AdamW with a fixed seed, dropping a random 30 % of each description's tokens from the max so no
single phrase of the banks decides. An expert's retrieval score becomes

    score_j = key score_j + gamma * log(R * p(relation_j | request))

over the head's R relations (`prior.RelationTerm`: the log-odds against a uniform guess, so the
best score stays on a key similarity's scale for the guard and the expected-gain features), and gamma is chosen on the held-out bank paraphrases and the hand-written
expert-task wordings (`models/eval/expert_wording.json`), both leave-out (an expert task is served
by the experts sharing no source with it), by the share whose top expert has the task's relation;
ties go to the smaller gamma. The user wording of the unseen tasks (`models/eval/user_wording.json`)
is reported for every gamma and chooses nothing.

Cached: `relation_head.npz` (weight [R, 384], bias [R]), `relation_head.json` (relations, gamma,
the table) and `desc_sets_lp.npz` (log p of every description-set wording, aligned with
`desc_sets.npz`). A library whose experts share one relation gets no head (`relation_head.json`
says so and the bundle has none).
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from .work import Work, jdump, jload, log

GAMMAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
EPOCHS, LR, WEIGHT_DECAY, TOKEN_DROP, BATCH, SEED = 20, 3e-3, 0.01, 0.3, 128, 20261203


def _padded(states):
    import torch

    n, t = len(states), max(len(s) for s in states)
    x = torch.zeros(n, t, states[0].shape[1])
    m = torch.zeros(n, t, dtype=torch.bool)
    for i, s in enumerate(states):
        x[i, : len(s)] = torch.from_numpy(np.asarray(s, np.float32))
        m[i, : len(s)] = True
    return x, m


def train_head(states, labels, n_rel: int) -> tuple[np.ndarray, np.ndarray]:
    """The max-pooled linear head (W [n_rel, d], b [n_rel], float32) by cross-entropy."""
    import torch

    torch.manual_seed(SEED)
    x, m = _padded(states)
    y = torch.as_tensor(np.asarray(labels))
    lin = torch.nn.Linear(x.shape[-1], n_rel)
    opt = torch.optim.AdamW(lin.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(y))
        for s in range(0, len(y), BATCH):
            b = perm[s : s + BATCH]
            keep = m[b] & (torch.rand(m[b].shape) > TOKEN_DROP)
            keep[:, 0] |= ~keep.any(1)  # never an empty max
            z = lin(x[b]).masked_fill(~keep[..., None], -1e9).max(1).values
            loss = torch.nn.functional.cross_entropy(z, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lin.weight.detach().numpy().astype(np.float32), lin.bias.detach().numpy().astype(np.float32)


def log_probs(weight: np.ndarray, bias: np.ndarray, states: np.ndarray) -> np.ndarray:
    """log p(relation | description) from one description's token states [n, d] (float64): each
    logit the largest over tokens of `w_r . h_t` (f32 products accumulated in f64) plus `b_r`,
    then a log-softmax in f64. The Rust side (`relation.rs`) computes the same."""
    z = (np.asarray(states, np.float64) @ weight.T.astype(np.float64)).max(0) + bias.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def stage(w: Work):
    """Train the head, choose gamma, write the log-probabilities of every description-set wording."""
    if os.path.exists(w.p("relation_head.json")):
        return
    from .descriptions import head_set
    from .prior import RelationTerm, Request
    from .retrieval import user_wording
    from .scope import expert_wording

    c = w.cfg
    n_keys = c["desc_keys"]
    gammas = c.get("relation_gammas", GAMMAS)
    experts = w.suite["experts"]
    rels = sorted({t.relation for t in experts})
    if len(rels) < 2:
        jdump(w.p("relation_head.json"), {"head": None, "why": f"the experts share one relation ({rels[0]})"})
        log("relation: one relation among the experts, no head")
        return
    ri = {r: i for i, r in enumerate(rels)}
    rel_of = np.array([ri[t.relation] for t in experts])
    E = w.embedder()
    sets = jload(w.p("desc_sets.json"))
    train = [
        (d, rel_of[i])
        for i, t in enumerate(experts)
        for d in sets["experts"][t.name][:n_keys] + head_set(t, c["head_wordings"])
    ]
    log(f"relation: training the head on {len(train)} wordings of {len(experts)} expert tasks")
    states = [E.states(d) for d, _ in tqdm(train, desc="relation head: token states")]
    weight, bias = train_head(states, [y for _, y in train], len(rels))
    del states

    lp = {}
    for g in ("experts", "unseen"):
        lp[g] = np.stack(
            [
                np.stack([log_probs(weight, bias, E.states(x)) for x in sets[g][t.name]])
                for t in tqdm(w.suite[g], desc=f"relation head: description sets ({g})")
            ]
        ).astype(np.float64)

    # gamma, leave-out: (request, relation index, experts it may not retrieve) per set
    base = w.keys(relation=False)
    embs = np.load(w.p("desc_sets.npz"))
    names = [t.name for t in experts]
    unseen_rel = {t.name: t.relation for t in w.suite["unseen"]}

    req = w.requester({"weight": weight, "bias": bias})

    groups = {
        "bank_heldout_expert": [
            (Request(embs["experts"][i, p], lp["experts"][i, p]), rel_of[i], w.held_out_for(i))
            for i in range(len(experts))
            for p in range(n_keys, embs["experts"].shape[1])
        ],
        "expert_wording": [
            (req(d), rel_of[names.index(k)], w.held_out_for(names.index(k)))
            for k, v in expert_wording(w).items()
            if k in names
            for d in v
        ],
        "user_wording_unseen": [
            (req(d), ri.get(unseen_rel[k], -1), [])
            for k, v in user_wording(w)["unseen"].items()
            if k in unseen_rel
            for d in v
        ],
    }
    table = {g: {} for g in groups}
    head_acc = {}
    for g, rows in groups.items():
        if not rows:
            continue
        head_acc[g] = float(np.mean([int(np.argmax(r.rel_lp)) == y for r, y, _ in rows]))
        key_scores = [base.scores(r.emb) for r, _, _ in rows]
        for gamma in sorted({0.0, *gammas}):  # gamma 0 (keys only) is always reported
            term = RelationTerm(gamma, rel_of)
            ok = []
            for (r, y, ex), s0 in zip(rows, key_scores):
                s = s0 + term.term(r.rel_lp)
                s[ex] = -np.inf
                ok.append(int(rel_of[int(np.argmax(s))] == y))
            table[g][f"{gamma:g}"] = float(np.mean(ok))
    chooses = [g for g in ("bank_heldout_expert", "expert_wording") if table[g]]

    def merit(gamma):
        return float(np.mean([table[g][f"{gamma:g}"] for g in chooses]))

    gamma = max(gammas, key=lambda x: (round(merit(x), 9), -x))
    np.savez(w.p("desc_sets_lp.npz"), **lp)
    np.savez(w.p("relation_head.npz"), weight=weight, bias=bias)
    out = {
        "head": {"pool": "max over tokens", "epochs": EPOCHS, "token_drop": TOKEN_DROP, "seed": SEED},
        "relations": rels,
        "gamma": gamma,
        "trained_on": f"{len(train)} wordings of {len(experts)} expert tasks: {n_keys} key wordings and "
        f"up to {c['head_wordings']} HEAD_BANK wordings each",
        "head_accuracy": head_acc,
        "right_relation_by_gamma": table,
        "selection": "mean share, over " + " and ".join(chooses) + " (leave-out), whose top expert has the task's "
        "relation; ties to the smaller gamma; user_wording_unseen is reported only",
        "at_chosen": {g: table[g][f"{gamma:g}"] for g in table if table[g]},
        "at_gamma_0": {g: table[g]["0"] for g in table if table[g]},
    }
    jdump(w.p("relation_head.json"), out)
    log(f"relation: gamma {gamma:g}: {out['at_chosen']} (without the head: {out['at_gamma_0']}); head alone {head_acc}")
