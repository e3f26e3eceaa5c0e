"""The `tune` ablation: functional fine-tuning of the CVAE (`python -m pipeline.run --only tune`).

It never helped on held-out experts beyond noise, and its output (cvae_tuned.pt, tune.json) is not
shipped (models/README.md).
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from .prior import denormalise, norm_stats, normalise, normalise_spread
from .work import Work, jdump, jload, log


def stage(w: Work):
    """The `tune` ablation (`--only tune`; not shipped). Functional fine-tuning of the CVAE: the reconstruction objective alone asks the decoder
    to land near an expert's parameters, but what matters is how the generated adapter
    *retrieves*. Here each step takes an expert task, builds its prior leave-one-out (from the
    other experts, as for an unseen task), samples z from p(z|c), decodes a LoRA and backpropagates
    InfoNCE on a batch of that task's *train* pairs through the frozen encoder into the CVAE,
    plus the CVAE's own loss (reconstruction + KL) on that expert's snapshots as a regulariser.
    20 % of the experts are held out; the step count is chosen by their *validation* MRR with
    z = the prior mean. Unseen tasks are never touched."""
    path = w.p("cvae_tuned.pt")
    if os.path.exists(path):
        return
    import random

    import torch

    from .lora import evaluate, positives

    c = w.cfg
    experts = w.suite["experts"]
    pr = jload(w.p("prior.json"))["best"]
    snaps, mu, var = w.expert_arrays()
    nm, ns = norm_stats(mu)
    mus, vs = w.loo_priors(mu, var, w.loo_queries(), pr["k"], pr["tau"])
    M = torch.from_numpy(normalise(mus, nm, ns))
    S = torch.from_numpy(normalise_spread(vs, ns))
    X = [torch.from_numpy(normalise(s, nm, ns)) for s in snaps]
    nm_t, ns_t = torch.tensor(nm), torch.tensor(ns)
    zs = jload(w.p("zeroshot.json"))
    rng = np.random.default_rng(11)
    held = sorted(rng.choice(len(experts), size=max(1, len(experts) // 5), replace=False).tolist())
    train = [i for i in range(len(experts)) if i not in held]
    model = w.load_cvae(tuned=False)
    L = w.lora
    L.zero()  # shared A in place; B comes from the decoder through embed_with

    def decode(i, sample):
        eps = torch.randn(1, model.zdim) if sample else None  # z sampled from p(z|c), or its mean
        return model.generate(M[i : i + 1], S[i : i + 1], eps)[0]

    def heldout():
        model.eval()
        with torch.no_grad():
            ms = [evaluate(L, experts[i].val, denormalise(decode(i, False), nm_t, ns_t).numpy()) for i in held]
        zv = [zs[experts[i].name]["val"] for i in held]
        # selection on MRR (smoother than R@1 on ~35 queries per task); R@1 is logged too
        return (
            float(np.mean([m["mrr"] - z["mrr"] for m, z in zip(ms, zv)])),
            float(np.mean([m["r1"] - z["r1"] for m, z in zip(ms, zv)])),
        )

    # The basis U has entries of ~1/sqrt(D) (unit columns); the MLP weights are ~0.1. One
    # Adam learning rate would move U by its own size in a few steps, so U gets a smaller one.
    mlp = [p for n, p in model.named_parameters() if p.requires_grad and n != "U"]
    opt = torch.optim.Adam(
        [{"params": mlp, "lr": c["tune_lr"]}, {"params": [model.U], "lr": c["tune_lr"] * c["tune_u_lr_scale"]}]
    )
    torch.manual_seed(12)
    pyrng = random.Random(13)
    pos = {i: positives(experts[i].train) for i in train}
    start, start_r1 = heldout()
    best = (start, {k: v.clone() for k, v in model.state_dict().items()}, 0)
    hist = [{"step": 0, "heldout_val_mrr_gain": start, "heldout_val_r1_gain": start_r1}]
    log(
        f"tune: held-out experts' val gain before: MRR {start:+.4f}, R@1 {start_r1:+.4f} ({len(held)} held out, {len(train)} trained on)"
    )
    order = []
    for step in tqdm(range(1, c["tune_steps"] + 1), desc="tune", mininterval=5):
        if not order:
            order = list(train)
            pyrng.shuffle(order)
        i = order.pop()
        bp = pyrng.sample(experts[i].train, min(c["batch"], len(experts[i].train)))
        model.train()
        L.model.train()
        x = decode(i, True)
        f_loss = L.info_nce(bp, pos[i], c["temp"], flat=denormalise(x, nm_t, ns_t))
        xs = X[i]
        xh, kl = model(xs, M[i : i + 1].expand_as(xs), S[i : i + 1].expand_as(xs))
        elbo = (((xh - xs) ** 2).mean(1) + c["cvae_lam"] * kl / xs.shape[1]).mean()
        loss = f_loss + elbo
        opt.zero_grad()
        loss.backward()
        opt.step()
        L.model.eval()
        if step % c["tune_eval_every"] == 0 or step == c["tune_steps"]:
            g, g1 = heldout()
            hist.append(
                {
                    "step": step,
                    "heldout_val_mrr_gain": g,
                    "heldout_val_r1_gain": g1,
                    "info_nce": f_loss.item(),
                    "elbo": elbo.item(),
                }
            )
            if g > best[0]:
                best = (g, {k: v.clone() for k, v in model.state_dict().items()}, step)
    log(f"tune: best held-out val MRR gain {best[0]:+.4f} at step {best[2]} (before {start:+.4f})")
    torch.save(best[1], path + ".tmp")
    os.replace(path + ".tmp", path)
    jdump(
        w.p("tune.json"),
        {
            "heldout": [experts[i].name for i in held],
            "before": start,
            "best": best[0],
            "best_step": best[2],
            "hist": hist,
            "lr": c["tune_lr"],
            "u_lr": c["tune_lr"] * c["tune_u_lr_scale"],
            "steps": c["tune_steps"],
        },
    )
