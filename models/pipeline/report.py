"""The evaluation report: eval.json and EVAL.md in the bundle from the `eval` stage's results.

Per method, the mean R@1 / MRR / R@5 over the unseen tasks with a bootstrap interval over tasks,
the gap closed towards the oracle, how many of the per-task gains the test sets resolve
(`noise_summary`), the validity gate and a per-task table.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .work import Work, jdump, jload, log

METHODS = [
    ("zero_shot", "zero-shot base model"),
    ("soup", "model soup (uniform mean of experts)"),
    ("top1", "top-1 expert"),
    ("topk_merge", "top-K weighted merge (mu*)"),
    ("topk_merge_gain", "top-K merge x validated gain (the CVAE's base)"),
    ("multitask", "multi-task LoRA (all expert data)"),
    ("sglora_mean", "SG-LoRA (z = prior mean)"),
    ("sglora_seeds", "SG-LoRA (mean over 5 seeds)"),
    ("oracle", "oracle (LoRA trained on the task)"),
]
# adapters whose per-task gain over zero-shot is tested against the test set's noise (`eval`)
PAIRED_METHODS = ("topk_merge", "sglora_mean", "oracle")


def write(w: Work, cache, wording=None):
    """eval.json and EVAL.md from the per-task results (`eval_cache.json`) and the user-wording
    results (`wording.evaluate_wording`); re-hashes the manifest."""
    from .wording import section

    methods = METHODS
    names = list(cache)
    rng = np.random.default_rng(0)
    boots = rng.integers(0, len(names), size=(10000, len(names)))

    def stat(method, metric):
        vals = np.array([cache[n][method][metric] for n in names])
        b = vals[boots].mean(1)
        return float(vals.mean()), float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5)), vals

    zs = stat("zero_shot", "r1")[0]
    orc = stat("oracle", "r1")[0]
    table = {}
    for m, label in methods:
        r1, lo, hi, v1 = stat(m, "r1")
        mrr, mlo, mhi, _ = stat(m, "mrr")
        r5 = stat(m, "r5")[0]
        z1 = np.array([cache[n]["zero_shot"]["r1"] for n in names])
        table[m] = {
            "label": label,
            "r1": r1,
            "r1_ci": [lo, hi],
            "mrr": mrr,
            "mrr_ci": [mlo, mhi],
            "r5": r5,
            "gap_closed": (r1 - zs) / (orc - zs) if orc != zs else float("nan"),
            "beats_zero_shot": int((v1 > z1).sum()),
            "n_tasks": len(names),
        }
    gate = jload(w.p("transfer.json"))["summary"] if os.path.exists(w.p("transfer.json")) else {}
    noise = noise_summary(cache, names)
    out = {
        "mode": "tiny" if w.tiny else "full",
        "methods": table,
        "tasks": cache,
        "gate": gate,
        "novelty": w.suite["novelty"],
        "noise": noise,
    }
    os.makedirs(w.bundle, exist_ok=True)
    wording_lines, out["wording"] = section(w, wording, cache) if wording else ([], None)
    lines = [
        "# Evaluation on unseen tasks",
        "",
        f"Mode: **{out['mode']}**; {len(names)} unseen tasks; R@1 / MRR as mean over tasks with a bootstrap 95% "
        "interval over tasks (10,000 resamples); R@5 mean; *gap closed* = (method - zero-shot) / (oracle - "
        "zero-shot) on mean R@1; *beats ZS* = tasks where the method's R@1 is above zero-shot.",
        "",
        "| method | R@1 | 95% CI | MRR | 95% CI | R@5 | gap closed | beats ZS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, _ in methods:
        r = table[m]
        lines.append(
            f"| {r['label']} | {r['r1']:.3f} | [{r['r1_ci'][0]:.3f}, {r['r1_ci'][1]:.3f}] | {r['mrr']:.3f} | "
            f"[{r['mrr_ci'][0]:.3f}, {r['mrr_ci'][1]:.3f}] | {r['r5']:.3f} | {r['gap_closed']:.2f} | "
            f"{r['beats_zero_shot']}/{r['n_tasks']} |"
        )
    labels = dict(methods)
    hr = noise["tasks_with_headroom"]
    lines += [
        "",
        "## Which differences the test sets can resolve",
        "",
        "Per task, each adapter's gain over zero-shot has a 95 % bootstrap interval over the task's test queries "
        "(paired, 10,000 resamples); *significant* = the interval excludes 0.",
        "",
        "| method | metric | above ZS | significantly above | significantly below |",
        "|---|---|---|---|---|",
    ]
    for m in PAIRED_METHODS:
        for metric in ("r1", "mrr"):
            c = noise["counts"][m][metric]
            lines.append(
                f"| {labels[m]} | {'R@1' if metric == 'r1' else 'MRR'} | {c['above']}/{len(names)} | "
                f"{c['significantly_above']}/{len(names)} | {c['significantly_below']}/{len(names)} |"
            )
    lines += [
        "",
        f"Tasks with measurable headroom -- the oracle's R@1 gain significant (a subset defined by the oracle "
        f"alone): **{hr['n_tasks']}/{len(names)}**"
        + (f", oracle gain {hr['oracle_r1_gain']:+.3f} R@1 on them." if hr["n_tasks"] else "."),
        "",
    ]
    for m in PAIRED_METHODS[:-1] if hr["n_tasks"] else ():
        h = hr[m]
        lines.append(
            f"- {labels[m]}: above zero-shot on {h['above']}/{hr['n_tasks']}, R@1 gain {h['r1_gain']:+.3f}, "
            f"gap closed {h['gap_closed']:.2f}"
        )
    lines += [
        "",
        "## Validity gate (expert suite, before the CVAE)",
        "",
        "```",
        json.dumps(gate, indent=1),
        "```",
        "",
        "## Per task (R@1)",
        "",
        "Gains over zero-shot with their 95 % interval over the task's queries; * = significant.",
        "",
        "| task | novelty | n | ZS | top-K merge | SG-LoRA | oracle | top experts (weight) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, m):
        p = r["paired"][m]["r1"]
        star = "*" if p["ci"][0] > 0 or p["ci"][1] < 0 else ""
        return f"{r[m]['r1']:.3f} ({p['gain']:+.3f}{star} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}])"

    for n in names:
        r = cache[n]
        tops = ", ".join(f"{x['expert']} ({x['weight']:.2f})" for x in r["retrieved"][:3])
        lines.append(
            f"| {n} | {w.suite['novelty'].get(n, '')} | {r['zero_shot']['n']} | {r['zero_shot']['r1']:.3f} | "
            f"{cell(r, 'topk_merge')} | {cell(r, 'sglora_mean')} | {cell(r, 'oracle')} | {tops} |"
        )
    lines += wording_lines
    jdump(os.path.join(w.bundle, "eval.json"), out)
    with open(os.path.join(w.bundle, "EVAL.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if os.path.exists(os.path.join(w.bundle, "manifest.json")):
        from .export import refresh_manifest

        refresh_manifest(w.bundle)
    log("\n".join(lines[6 : 6 + len(methods) + 1]))


def noise_summary(cache, names):
    """Counts of significant per-task gains and losses (see `paired_gains`), and the methods'
    results on the tasks where the oracle's R@1 gain is significant."""

    def sig(p, up):
        return p["ci"][0] > 0 if up else p["ci"][1] < 0

    counts = {
        m: {
            metric: {
                "above": sum(cache[n]["paired"][m][metric]["gain"] > 0 for n in names),
                "significantly_above": sum(sig(cache[n]["paired"][m][metric], True) for n in names),
                "significantly_below": sum(sig(cache[n]["paired"][m][metric], False) for n in names),
            }
            for metric in ("r1", "mrr")
        }
        for m in PAIRED_METHODS
    }
    room = [n for n in names if sig(cache[n]["paired"]["oracle"]["r1"], True)]
    orc = float(np.mean([cache[n]["paired"]["oracle"]["r1"]["gain"] for n in room])) if room else float("nan")
    hr = {"n_tasks": len(room), "tasks": room, "oracle_r1_gain": orc}
    for m in PAIRED_METHODS:
        g = float(np.mean([cache[n]["paired"][m]["r1"]["gain"] for n in room])) if room else float("nan")
        hr[m] = {
            "above": sum(cache[n]["paired"][m]["r1"]["gain"] > 0 for n in room),
            "r1_gain": g,
            "gap_closed": g / orc if room and orc else float("nan"),
        }
    return {
        "bootstrap": "per task, over its test queries, paired, 10,000 resamples, 95 % percentile interval",
        "counts": counts,
        "tasks_with_headroom": hr,
    }
