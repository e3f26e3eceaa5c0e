"""Ablation: does a shorter expert recipe make the experts transfer better, relative to what they learn?

`python -m pipeline.ablate_recipe --work W [--epochs 4 --snapshots 2]` (run from models/, after the
`prior` stage of a full run in the same work folder). Expert tasks only: unseen tasks are never used.

The bar is relative to the oracle, which is trained with the experts' recipe. An expert trained
for fewer steps learns less of its own task, but may keep more of what its relation shares with
other cells, so that the merge recovers a larger share of what a task's own LoRA learns. Every expert
task is trained again with the shorter recipe (same frozen A, learning rate, warm-up share, seed and
data; cached under W/ablate_recipe/e<E>s<S>/) and scored on its validation and test splits, beside
the shipped recipe's experts:

- the task's own adapter (what the oracle recipe reaches on it),
- its leave-out prior mean mu* (the pipeline's K and tau, `Work.held_out_for`), built from the
  experts of the same recipe,
- the share of the own adapter's gain that mu* recovers (the expert-side version of "gap closed").

Writes W/ablate_recipe/e<E>s<S>/summary.json and prints a Markdown table for models/README.md.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from .work import analysis_work, jdump, log, safe, save_trained


def main() -> None:
    def options(ap):
        ap.add_argument("--epochs", type=int, default=4, help="epochs of the shorter recipe (shipped: 10)")
        ap.add_argument("--snapshots", type=int, default=2, help="last epochs averaged into mu_k (shipped: 4)")

    pipe = analysis_work(__doc__, after="prior", add_args=options)
    extra = pipe.cli
    if not 1 <= extra.snapshots <= extra.epochs:
        raise SystemExit(f"--snapshots must be between 1 and --epochs ({extra.epochs}), got {extra.snapshots}")
    from .lora import evaluate

    shipped = (pipe.cfg["epochs"], pipe.cfg["snapshots"])
    out = pipe.p("ablate_recipe", f"e{extra.epochs}s{extra.snapshots}")
    os.makedirs(out, exist_ok=True)
    run = pipe.analysis_inputs()
    experts, pr, zs, mu_ship, var_ship = run.experts, run.prior, run.zs, run.mu, run.var
    n = len(experts)

    pipe.cfg["epochs"], pipe.cfg["snapshots"] = extra.epochs, extra.snapshots
    mu_alt, var_alt = [], []
    for i, t in enumerate(tqdm(experts, desc=f"experts, {extra.epochs} epochs")):
        path = os.path.join(out, safe(t.name) + ".npz")
        if not os.path.exists(path):
            snaps, losses = pipe.train(t.train, seed=1000 + i, desc=t.name)  # the experts stage's seed
            save_trained(path, snaps, {"losses": losses})
        s = np.load(path)["snaps"]
        mu_alt.append(s.mean(0))
        var_alt.append(s.var(0))
    pipe.cfg["epochs"], pipe.cfg["snapshots"] = shipped
    mu_alt, var_alt = np.stack(mu_alt), np.stack(var_alt)

    results = {}
    for label, mu, var in (
        (f"shipped: {shipped[0]} epochs, {shipped[1]} snapshots", mu_ship, var_ship),
        (f"{extra.epochs} epochs, {extra.snapshots} snapshots", mu_alt, var_alt),
    ):
        gains = {"own": [], "mu*": []}
        mus = pipe.loo_priors(mu, var, pipe.templated_requests(), pr["k"], pr["tau"])[0]
        for i, t in enumerate(experts):
            for name, v in (("own", mu[i]), ("mu*", mus[i])):
                row = []
                for split in ("val", "test"):
                    m = evaluate(pipe.lora, getattr(t, split), v)
                    row += [m["mrr"] - zs[t.name][split]["mrr"], m["r1"] - zs[t.name][split]["r1"]]
                gains[name].append(row)
        own, ms = np.array(gains["own"]), np.array(gains["mu*"])
        results[label] = {
            "own": dict(zip(("val_mrr", "val_r1", "test_mrr", "test_r1"), own.mean(0).tolist())),
            "mu*": dict(zip(("val_mrr", "val_r1", "test_mrr", "test_r1"), ms.mean(0).tolist())),
            "mu*_above_zs_test_r1": int((ms[:, 3] > 0).sum()),
            "share_recovered": dict(
                zip(("val_mrr", "val_r1", "test_mrr", "test_r1"), (ms.mean(0) / own.mean(0)).tolist())
            ),
            "mean_norm": float(np.linalg.norm(mu, axis=1).mean()),
        }
        log(f"{label}: {json.dumps(results[label])}")
    jdump(
        os.path.join(out, "summary.json"),
        {
            "n_experts": n,
            "k": pr["k"],
            "tau": pr["tau"],
            "recipes": results,
            "note": "expert tasks only; gains over zero-shot, mean over experts; share = mu* gain / own-adapter gain",
        },
    )
    print(
        "| recipe | own adapter: val MRR / test R@1 gain | leave-out mu*: val MRR / test R@1 gain | share recovered (val MRR / test R@1) | mu* above ZS (test R@1) |"
    )
    print("|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['own']['val_mrr']:+.4f} / {r['own']['test_r1']:+.4f} | {r['mu*']['val_mrr']:+.4f} / "
            f"{r['mu*']['test_r1']:+.4f} | {r['share_recovered']['val_mrr']:.2f} / {r['share_recovered']['test_r1']:.2f} | "
            f"{r['mu*_above_zs_test_r1']}/{n} |"
        )


if __name__ == "__main__":
    main()
