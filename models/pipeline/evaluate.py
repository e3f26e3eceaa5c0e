"""Evaluation on the unseen tasks: the `eval` stage, the paired noise test, `eval-adapter`.

The `eval` stage scores every method's adapter (zero-shot, soup, top-1, the top-K merge, the
multi-task LoRA, SG-LoRA, the oracle) on each unseen task's test split and tests the gains of
`PAIRED_METHODS` against the test set's noise; `report` turns the results into eval.json and
EVAL.md. `eval_adapter` scores adapter folders written by the Rust CLI
(`python -m pipeline.run eval-adapter`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from tqdm import tqdm

from . import report
from .prior import generate, norm_stats, scores
from .report import PAIRED_METHODS
from .work import Work, jdump, jload


def stage(w: Work):
    """The `eval` stage: every method's adapter for each unseen task, scored on its test split
    (cached per task in eval_cache.json), then the report (`report.write`)."""
    from .lora import evaluate

    path = w.p("eval_cache.json")
    cache = jload(path) if os.path.exists(path) else {}
    c = w.cfg
    experts = w.suite["experts"]
    _, mu, var = w.expert_arrays()
    nm, ns = norm_stats(mu)
    keys = w.keys()
    pr = jload(w.p("prior.json"))["best"]
    model = w.load_cvae()
    E = w.embedder()
    zs = jload(w.p("zeroshot.json"))
    mt = np.load(w.p("multitask.npz"))["snaps"][-1]
    soup = mu.mean(0)
    for t in tqdm(w.suite["unseen"], desc="eval unseen"):
        res = cache.get(t.name, {})
        q = E(t.description)
        gen_mean, mstar, idx, wts = generate(model, q, keys, mu, var, pr["k"], pr["tau"], nm, ns)
        sims = scores(q, keys)
        top1 = int(np.argmax(sims))
        oracle = w.load_trained("oracles", t.name)[0][-1]
        g = float(pr.get("gain", 1.0))
        vecs = {
            "soup": soup,
            "top1": mu[top1],
            "topk_merge": mstar,
            "topk_merge_gain": g * mstar,
            "multitask": mt,
            "sglora_mean": gen_mean,
            "oracle": oracle,
        }
        # the adapters tested against noise are embedded once: their ranks give both
        if "paired" not in res:
            res["paired"] = paired_gains(w, t, {m: vecs[m] for m in PAIRED_METHODS}, res)
        for name, v in vecs.items():
            if name not in res:
                res[name] = evaluate(w.lora, t.test, v)
        if "sglora_seeds" not in res:
            runs = [
                evaluate(w.lora, t.test, generate(model, q, keys, mu, var, pr["k"], pr["tau"], nm, ns, seed=s)[0])
                for s in range(1, c["sample_seeds"] + 1)
            ]
            res["sglora_seeds"] = {m: float(np.mean([r[m] for r in runs])) for m in ("r1", "r5", "mrr")}
        res["zero_shot"] = zs[t.name]["test"]
        res["retrieved"] = [
            {"expert": experts[i].name, "weight": float(a), "sim": float(sims[i])} for i, a in zip(idx, wts)
        ]
        cache[t.name] = res
        jdump(path, cache)
    from .wording import evaluate_wording

    report.write(w, cache, evaluate_wording(w, model))


def paired_gains(w: Work, task, vecs, metrics):
    """Each adapter's R@1 and MRR gain over zero-shot on the task's test queries, with a 95 %
    bootstrap interval over the queries (paired: one resample serves both adapters). A gain is
    *significant* when its interval excludes 0. Adapters missing from `metrics` get their
    metrics there too, from the same ranks."""
    from .lora import rank_metrics, ranks
    from .stats import named_rng, paired_interval

    r0 = ranks(w.lora, task.test, None)
    out = {}
    for name, v in vecs.items():
        ts = time.time()
        r = ranks(w.lora, task.test, v)
        if name not in metrics:
            metrics[name] = dict(rank_metrics(r), secs=time.time() - ts)
        out[name] = {}
        for metric, f in (("r1", lambda x: (x == 1).astype(float)), ("mrr", lambda x: 1.0 / x)):
            gain, lo, hi = paired_interval(f(r), f(r0), named_rng(f"{task.name}/{name}/{metric}"))
            out[name][metric] = {"gain": gain, "ci": [lo, hi]}
    return out


def eval_adapter(argv):
    """Evaluate adapter directories written by the Rust CLI (loaded with PeftModel.from_pretrained)."""
    ap = argparse.ArgumentParser(prog="pipeline.run eval-adapter")
    ap.add_argument("adapters", nargs="+", help="adapter directories (adapter_model.safetensors + adapter_config.json)")
    ap.add_argument(
        "--task", action="append", required=True, help="task name from the suite, e.g. antonym/adj.all (repeatable)"
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default=None)
    a = ap.parse_args(argv)
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from .lora import base_model_dir, retrieval_metrics, test_set

    p = Work(a.tiny, a.work)
    tasks = {t.name: t for t in p.suite["experts"] + p.suite["unseen"]}
    lo = p.lora  # tokenizer + pooling helpers
    for d in a.adapters:
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_model_dir()), d).eval()
        orig, lo.model = lo.model, model
        try:
            for name in a.task:
                if name not in tasks:
                    raise SystemExit(f"unknown task {name!r}; known: {', '.join(sorted(tasks))}")
                queries, gallery, pos = test_set(tasks[name].test)
                with torch.no_grad():
                    m = retrieval_metrics(lo.embed_all(queries), lo.embed_all(gallery), pos)
                print(json.dumps({"adapter": d, "task": name, **m}))
        finally:
            lo.model = orig
