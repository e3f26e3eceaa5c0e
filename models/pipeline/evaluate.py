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
    request = w.requester()
    zs = jload(w.p("zeroshot.json"))
    mt = np.load(w.p("multitask.npz"))["snaps"][-1]
    soup = mu.mean(0)
    for t in tqdm(w.suite["unseen"], desc="eval unseen"):
        res = cache.get(t.name, {})
        q = request(t.description)
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


def sglora_embedder(binary: str, bundle: str, adapter: str | None):
    """`texts -> [n, 384] tensor` through `sglora embed [--adapter DIR] --json -` (the device's own
    int8 encoder applying the adapter), for scoring adapters without PEFT."""
    import subprocess

    import torch

    def embed_all(texts):
        cmd = [binary, "--bundle", bundle, "embed", "--json", "-"]
        if adapter:
            cmd[4:4] = ["--adapter", adapter]
        p = subprocess.run(cmd, input="\n".join(texts) + "\n", capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
        return torch.tensor(json.loads(p.stdout)["embeddings"], dtype=torch.float32)

    return embed_all


def _peft_embedder(lo, adapter: str):
    """`texts -> tensor` through PyTorch with the adapter loaded by PeftModel.from_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from .lora import base_model_dir

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_model_dir()), adapter).eval()

    def embed_all(texts):
        orig, lo.model = lo.model, model
        try:
            with torch.no_grad():
                return lo.embed_all(texts)
        finally:
            lo.model = orig

    return embed_all


def eval_adapter(argv):
    """Evaluate adapter directories written by the Rust CLI: through PEFT (PyTorch, fp32;
    the default) or `--through sglora` (the device's `sglora embed --adapter`)."""
    ap = argparse.ArgumentParser(prog="pipeline.run eval-adapter")
    ap.add_argument("adapters", nargs="+", help="adapter directories (adapter_model.safetensors + adapter_config.json)")
    ap.add_argument(
        "--task", action="append", required=True, help="task name from the suite, e.g. antonym/adj.all (repeatable)"
    )
    ap.add_argument("--through", choices=("peft", "sglora"), default="peft", help="who applies the adapter")
    ap.add_argument("--sglora", default=None, help="the sglora binary (--through sglora)")
    ap.add_argument("--bundle", default=None, help="the bundle directory (--through sglora)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default=None)
    a = ap.parse_args(argv)
    if a.through == "sglora" and not (a.sglora and a.bundle):
        ap.error("--through sglora needs --sglora BIN and --bundle DIR")
    from .lora import retrieval_metrics, test_set

    p = Work(a.tiny, a.work)
    tasks = {t.name: t for t in p.suite["experts"] + p.suite["unseen"]}
    for name in a.task:
        if name not in tasks:
            raise SystemExit(f"unknown task {name!r}; known: {', '.join(sorted(tasks))}")
    for d in a.adapters:
        if a.through == "sglora":
            embed_all = sglora_embedder(a.sglora, a.bundle, d)
        else:
            embed_all = _peft_embedder(p.lora, d)
        for name in a.task:
            queries, gallery, pos = test_set(tasks[name].test)
            m = retrieval_metrics(embed_all(queries), embed_all(gallery), pos)
            print(json.dumps({"adapter": d, "task": name, "through": a.through, **m}))


def embed_parity(argv):
    """`python -m pipeline.run embed-parity --sglora BIN --bundle DIR`: one adapter per unseen
    task, generated by the CLI from the task's description (seed 0), scored on the task's test
    split twice — through PEFT (PyTorch fp32, as the `eval` stage scores) and through `sglora
    embed --adapter` (the device's integer encoder) — and the zero-shot base model both ways. The
    mean |R@1 difference| must be at most `--tolerance` (0.01) and every task's at most
    `--max-queries` (4) of its test queries; writes `--out` (JSON)."""
    import subprocess

    ap = argparse.ArgumentParser(prog="pipeline.run embed-parity")
    ap.add_argument("--sglora", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default=None, help="work folder holding suite.json (built if missing)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tolerance", type=float, default=0.01, help="largest mean |R@1 difference| accepted")
    ap.add_argument("--max-queries", type=int, default=4, help="most test queries one task may score differently (net)")
    a = ap.parse_args(argv)
    from . import stages
    from .lora import retrieval_metrics, test_set

    p = Work(a.tiny, a.work)
    stages.suite(p)
    rows = []
    adapters = p.p("embed-parity-adapters")
    os.makedirs(adapters, exist_ok=True)
    for t in tqdm(p.suite["unseen"], desc="embed parity"):
        d = os.path.join(adapters, t.name.replace("/", "_"))
        subprocess.run(
            [a.sglora, "--bundle", a.bundle, "generate", t.description, "-o", d, "--allow-ood", "--force"],
            check=True,
            capture_output=True,
        )
        queries, gallery, pos = test_set(t.test)
        row = {"task": t.name, "n": len(queries)}
        for who, make in (
            ("peft", lambda d: _peft_embedder(p.lora, d)),
            ("sglora", lambda d: sglora_embedder(a.sglora, a.bundle, d)),
        ):
            e = make(d)
            row[who] = retrieval_metrics(e(queries), e(gallery), pos)["r1"]
        zs = sglora_embedder(a.sglora, a.bundle, None)
        row["sglora_zero_shot"] = retrieval_metrics(zs(queries), zs(gallery), pos)["r1"]
        p.lora.zero()
        row["peft_zero_shot"] = retrieval_metrics(p.lora.embed_all(queries), p.lora.embed_all(gallery), pos)["r1"]
        row["diff"] = row["sglora"] - row["peft"]
        row["diff_queries"] = round(row["diff"] * row["n"])
        row["zero_shot_diff"] = row["sglora_zero_shot"] - row["peft_zero_shot"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    diffs = np.array([r["diff"] for r in rows])
    zdiffs = np.array([r["zero_shot_diff"] for r in rows])
    summary = {
        "tasks": len(rows),
        "max_abs_diff": float(np.abs(diffs).max()),
        "max_abs_diff_queries": int(max(abs(r["diff_queries"]) for r in rows)),
        "mean_diff": float(diffs.mean()),
        "mean_abs_diff": float(np.abs(diffs).mean()),
        "zero_shot_max_abs_diff": float(np.abs(zdiffs).max()),
        "zero_shot_mean_abs_diff": float(np.abs(zdiffs).mean()),
        "mean_r1_peft": float(np.mean([r["peft"] for r in rows])),
        "mean_r1_sglora": float(np.mean([r["sglora"] for r in rows])),
        "within_tolerance": int((np.abs(diffs) <= a.tolerance + 1e-12).sum()),
        "tolerance": a.tolerance,
    }
    print(json.dumps(summary))
    if a.out:
        jdump(a.out, {"summary": summary, "tasks": rows})
    # One query of a 160-query test split is 0.00625 R@1: the int8 base alone (no adapter) moves
    # tasks by up to three queries (zero_shot_max_abs_diff), so a task may differ by a few.
    if summary["mean_abs_diff"] > a.tolerance or summary["max_abs_diff_queries"] > a.max_queries:
        raise SystemExit(
            f"R@1 through sglora differs from PEFT by {summary['mean_abs_diff']:.4f} on average "
            f"(accepted {a.tolerance}) and by at most {summary['max_abs_diff_queries']} test queries "
            f"of a task (accepted {a.max_queries})"
        )
