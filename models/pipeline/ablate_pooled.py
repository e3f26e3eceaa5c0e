"""Ablation: would a LoRA trained jointly on a relation's tasks serve an unseen task better than the merge?

`python -m pipeline.ablate_pooled --work W` (run from models/, after the `prior` stage of a full
run in the same work folder). Expert tasks only: unseen tasks are never used.

The merge mu* averages experts that were each trained on one (relation, domain) cell. The question
here is whether the *same data*, trained jointly, holds more of what an unseen cell of that relation
needs: a "relation expert" that the repository could hold beside the cell experts. For each
relation, its expert tasks are split into two halves (fixed seed); a LoRA is trained on the train
pairs of one half (the experts' recipe: same frozen A, same epochs, snapshots and learning rate;
every task sharing a source synset with a task of the other half is left out of its data) and scored
on the *validation* splits of the other half, beside:

- the task's leave-out prior mean mu* (the base, from all experts not held out for it),
- the uniform mean of the very experts whose data the joint LoRA used (same data, merged instead
  of trained jointly),
- half-and-half blends of mu* with the joint LoRA,
- the task's own adapter (the ceiling).

Relations with two experts give a "half" of one task: the joint LoRA is then a retrained expert.
Each joint LoRA is cached under W/ablate_pooled/ (resumable). Writes W/ablate_pooled/summary.json
and prints a Markdown table for models/README.md.
"""

from __future__ import annotations

import os

import numpy as np

from .work import analysis_work, jdump, log, safe, save_trained


def main() -> None:
    pipe = analysis_work(__doc__, after="prior")
    from .lora import evaluate

    out = pipe.p("ablate_pooled")
    os.makedirs(out, exist_ok=True)
    run = pipe.analysis_inputs()
    experts, pr, mu, var, zs = run.experts, run.prior, run.mu, run.var, run.zs
    n = len(experts)
    mus = pipe.loo_priors(mu, var, pipe.templated_requests(), pr["k"], pr["tau"])[0]
    excl = [set(pipe.held_out_for(i)) for i in range(n)]

    relations = sorted({t.relation for t in experts})
    rng = np.random.default_rng(7)
    plan = []  # (relation, half, trained-on indices, scored indices)
    for r in relations:
        idx = [i for i, t in enumerate(experts) if t.relation == r]
        if len(idx) < 2:
            continue
        idx = [idx[j] for j in rng.permutation(len(idx))]
        halves = [idx[0::2], idx[1::2]]
        for h in range(2):
            scored = halves[h]
            blocked = set().union(*(excl[i] for i in scored))
            trained = [j for j in halves[1 - h] if j not in blocked]
            if trained:
                plan.append((r, h, trained, scored))

    if not plan:
        raise SystemExit(
            "no relation has two expert tasks that share no source synsets, so there is nothing to "
            "score; run this on a full run's work folder (the tiny suite has one expert per relation)"
        )
    rows = {}  # task index -> candidate -> (mrr gain, r1 gain)
    joint_info = []
    for r, h, trained, scored in plan:
        path = os.path.join(out, f"{safe(r)}_{h}.npz")
        if not os.path.exists(path):
            pairs = [p for j in trained for p in experts[j].train]
            log(f"joint LoRA for {r} (half {h}): {len(trained)} tasks, {len(pairs)} pairs")
            snaps, losses = pipe.train(pairs, seed=7000 + 10 * relations.index(r) + h, desc=f"joint {r}/{h}")
            save_trained(path, snaps, {"losses": losses, "trained": [experts[j].name for j in trained]})
        joint = np.load(path)["snaps"].mean(0)
        joint_info.append(
            {
                "relation": r,
                "half": h,
                "trained_on": [experts[j].name for j in trained],
                "scored": [experts[i].name for i in scored],
            }
        )
        same_data = mu[trained].astype(np.float64).mean(0)
        for i in scored:
            mstar = mus[i]
            cands = {
                "mu* (the base)": mstar,
                "joint LoRA of the relation's other half": joint,
                "uniform merge of the same experts": same_data,
                "0.5 mu* + 0.5 joint": 0.5 * mstar + 0.5 * joint,
                "mu* + 0.5 joint": mstar + 0.5 * joint,
                "own adapter (ceiling)": mu[i],
            }
            z = zs[experts[i].name]
            rows[i] = {}
            for name, v in cands.items():
                row = {}
                for split in ("val", "test"):
                    m = evaluate(pipe.lora, getattr(experts[i], split), v)
                    row[split] = (m["mrr"] - z[split]["mrr"], m["r1"] - z[split]["r1"])
                rows[i][name] = row
            log(f"{experts[i].name}: " + ", ".join(f"{k} {v['val'][0]:+.3f}" for k, v in rows[i].items()))

    names = list(next(iter(rows.values())).keys())
    scored = sorted(rows)
    table = []
    for name in names:
        entry = {"candidate": name}
        for split in ("val", "test"):
            g = np.array([rows[i][name][split] for i in scored])
            entry[f"{split}_mrr_gain"] = float(g[:, 0].mean())
            entry[f"{split}_r1_gain"] = float(g[:, 1].mean())
            entry[f"{split}_above_zs_r1"] = int((g[:, 1] > 0).sum())
        table.append(entry)
    per_relation = {}
    for r in relations:
        ii = [i for i in scored if experts[i].relation == r]
        if ii:
            per_relation[r] = {name: float(np.mean([rows[i][name]["val"][0] for i in ii])) for name in names}
            per_relation[r]["n"] = len(ii)
    summary = {
        "n_scored": len(scored),
        "k": pr["k"],
        "tau": pr["tau"],
        "rows": table,
        "per_relation_val_mrr_gain": per_relation,
        "joint_loras": joint_info,
        "per_task": {experts[i].name: rows[i] for i in scored},
        "note": "expert tasks only; gains over zero-shot, mean over the scored expert tasks",
    }
    jdump(os.path.join(out, "summary.json"), summary)
    print(
        f"| candidate ({len(scored)} expert tasks) | val MRR gain | val R@1 gain | test MRR gain | test R@1 gain | above ZS (test R@1) |"
    )
    print("|---|---|---|---|---|---|")
    for e in table:
        print(
            f"| {e['candidate']} | {e['val_mrr_gain']:+.4f} | {e['val_r1_gain']:+.4f} | {e['test_mrr_gain']:+.4f} | "
            f"{e['test_r1_gain']:+.4f} | {e['test_above_zs_r1']}/{len(scored)} |"
        )
    print()
    print("| relation | n | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r, d in per_relation.items():
        print(f"| {r} | {d['n']} | " + " | ".join(f"{d[k]:+.4f}" for k in names) + " |")
    log("ablation written to " + os.path.join(out, "summary.json"))


if __name__ == "__main__":
    main()
