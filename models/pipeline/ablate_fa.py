"""Ablation: LoRA-FA (shared frozen A) vs standard LoRA from one shared initialisation seed.

`python -m pipeline.ablate_fa --work W` (run from models/, after the `prior` stage of a full run
in the same work folder). For every expert task it trains a standard LoRA (A and B trained, both
initialised from the shared seed, same recipe and data seed as the LoRA-FA expert) and caches it
under `W/ablate_fa/`. It then compares, on the expert tasks only (unseen tasks are never used):

- own-task gain: each expert on its own task's test and validation split, over zero-shot;
- semantic-prior transfer: each expert task served leave-one-out by the top-K mixture mean of the
  *other* experts (the pipeline's K and tau), scaled by gain 1 and by the validated gain, on its
  validation split -- what SG-LoRA's prior does on an unseen task;
- how comparable the parameter spaces are: mean cosine between experts' mean B vectors.

Writes `W/ablate_fa/summary.json` and prints a Markdown table for models/README.md.
"""

from __future__ import annotations

import os
import time

import numpy as np
from tqdm import tqdm

from .work import analysis_work, jdump, jload, log, safe, save_trained


def main() -> None:
    pipe = analysis_work(__doc__, after="prior")
    c = pipe.cfg
    from .lora import Lora, evaluate
    from .prior import mixture, retrieve

    out = pipe.p("ablate_fa")
    os.makedirs(out, exist_ok=True)
    experts = pipe.suite["experts"]
    std = Lora(c["rank"], c["alpha"], train_a=True)
    for i, t in enumerate(tqdm(experts, desc="standard LoRA experts")):
        path = os.path.join(out, safe(t.name) + ".npz")
        if os.path.exists(path):
            continue
        t0 = time.time()
        snaps, losses = std.train(t.train, c["epochs"], c["lr"], c["batch"], c["temp"], c["snapshots"], seed=1000 + i)
        mu = snaps.mean(0)
        info = {
            "losses": losses,
            "test": evaluate(std, t.test, mu),
            "val": evaluate(std, t.val, mu),
            "secs": time.time() - t0,
        }
        save_trained(path, snaps, info)

    zs = jload(pipe.p("zeroshot.json"))
    pr = jload(pipe.p("prior.json"))["best"]
    demb = np.load(pipe.p("desc_emb.npy"))
    rows = {}
    for kind, lora, folder in (
        ("LoRA-FA (shared frozen A)", pipe.lora, "experts"),
        ("standard LoRA (shared init seed)", std, "ablate_fa"),
    ):
        snaps, infos = zip(*(pipe.load_trained(folder, t.name) for t in experts))
        mu = np.stack([s.mean(0) for s in snaps])
        var = np.stack([s.var(0) for s in snaps])
        own_test = [inf["test"]["r1"] - zs[t.name]["test"]["r1"] for inf, t in zip(infos, experts)]
        own_val = [inf["val"]["r1"] - zs[t.name]["val"]["r1"] for inf, t in zip(infos, experts)]
        loo = {1.0: [], float(pr["gain"]): []}
        loo_mrr = {g: [] for g in loo}
        for i, t in enumerate(tqdm(experts, desc=f"LOO prior ({kind})")):
            idx, _, w = retrieve(demb[i], demb, pr["k"], pr["tau"], exclude=i)
            m, _ = mixture(mu, var, idx, w)
            for g in loo:
                if lora.train_a:
                    # scale the weight update B·A by g: B is scaled, A is the mixture's A
                    nb = lora.dim // 2
                    v = np.concatenate([g * m[:nb], m[nb:]])
                else:
                    v = g * m
                r = evaluate(lora, t.val, v)
                loo[g].append(r["r1"] - zs[t.name]["val"]["r1"])
                loo_mrr[g].append(r["mrr"] - zs[t.name]["val"]["mrr"])
        b = mu[:, : lora.dim // 2] if lora.train_a else mu  # B only: a shared A init would dominate
        un = b / np.linalg.norm(b, axis=1, keepdims=True)
        cos = un @ un.T
        off = cos[~np.eye(len(mu), dtype=bool)]
        rows[kind] = {
            "dim": int(mu.shape[1]),
            "own_test_r1_gain": float(np.mean(own_test)),
            "own_val_r1_gain": float(np.mean(own_val)),
            "experts_gaining_1pt_test": int(sum(g > 0.01 for g in own_test)),
            "loo_prior_val_r1_gain": {str(g): float(np.mean(v)) for g, v in loo.items()},
            "loo_prior_val_mrr_gain": {str(g): float(np.mean(v)) for g, v in loo_mrr.items()},
            "loo_prior_beats_zs": {str(g): int(sum(x > 0 for x in v)) for g, v in loo.items()},
            "mean_pairwise_cosine_of_mu": float(off.mean()),
            "train_secs_mean": float(np.mean([inf.get("secs", 0.0) for inf in infos])),
        }
    summary = {
        "n_experts": len(experts),
        "k": pr["k"],
        "tau": pr["tau"],
        "validated_gain": pr["gain"],
        "rows": rows,
        "note": "expert tasks only; LOO = each task served by the other experts' prior",
    }
    jdump(os.path.join(out, "summary.json"), summary)
    g = str(float(pr["gain"]))
    print(
        f"| variant | flat dim | own test R@1 gain | experts +1 pt | LOO prior val R@1 gain (gain 1 / {g}) | LOO beats ZS | "
        "LOO val MRR gain | mean cos(B_a, B_b) | s / expert |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, r in rows.items():
        print(
            f"| {kind} | {r['dim']} | {r['own_test_r1_gain']:+.4f} | {r['experts_gaining_1pt_test']}/{len(experts)} | "
            f"{r['loo_prior_val_r1_gain']['1.0']:+.4f} / {r['loo_prior_val_r1_gain'][g]:+.4f} | "
            f"{r['loo_prior_beats_zs']['1.0']} / {r['loo_prior_beats_zs'][g]} | "
            f"{r['loo_prior_val_mrr_gain']['1.0']:+.4f} / {r['loo_prior_val_mrr_gain'][g]:+.4f} | "
            f"{r['mean_pairwise_cosine_of_mu']:.3f} | {r['train_secs_mean']:.0f} |"
        )
    log("ablation written to " + os.path.join(out, "summary.json"))


if __name__ == "__main__":
    main()
