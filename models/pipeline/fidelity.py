"""Fidelity gate of sglora's runtimes (#21): `python -m pipeline.run fidelity --example BIN
--bundle DIR [--out JSON]`.

Builds a fixed set of over a thousand varied texts — the golden fixtures' descriptions, every
expert's and unseen task's description, phrase-bank description sets of every task, the
hand-written user wordings (unseen tasks, expert tasks, off-topic), WordNet words and glosses
from the tasks' splits — embeds them with PyTorch fp32 (sentence-transformers, the reference)
and with two sglora runtimes through `examples/fidelity.rs` (BIN: default `integer` vs `int8`),
and reports per runtime the embedding cosine to PyTorch (min, mean, 1st percentile), and between
the two runtimes how many texts retrieve a different top-K expert set, how many change a mixture
weight by more than 0.01, and how many flip the scope guard's decision.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile

import numpy as np

from .work import Work

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def texts(w: Work, seed: int = 20261202) -> list[tuple[str, str]]:
    """(kind, text) pairs, deduplicated, in a fixed order."""
    from .descriptions import description_set

    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    golden = json.load(open(os.path.join(REPO, "tests", "fixtures", "golden.json")))
    out += [("fixture", c["description"]) for c in golden["cases"]]
    tasks = list(w.suite["experts"]) + list(w.suite["unseen"])
    out += [("task description", t.description) for t in tasks]
    for t in tasks:
        out += [("description set", d) for d in description_set(t, 4, seed=seed)]
    uw = json.load(open(os.path.join(REPO, "models", "eval", "user_wording.json")))
    out += [("user wording, unseen task", x) for v in uw["unseen"].values() for x in v]
    out += [("off-topic", x["text"]) for x in uw["off_topic"]]
    ew = json.load(open(os.path.join(REPO, "models", "eval", "expert_wording.json")))
    out += [("user wording, expert task", x) for v in ew.values() for x in v]
    words, glosses = set(), set()
    for t in tasks:
        for q, target, _ in t.train:
            for s in (q, target):
                (glosses if " " in s.strip() else words).add(s.strip())
    out += [("WordNet word", x) for x in rng.sample(sorted(words), min(250, len(words)))]
    out += [("WordNet gloss", x) for x in rng.sample(sorted(glosses), min(250, len(glosses)))]
    seen, uniq = set(), []
    for k, x in out:
        x = " ".join(x.split())
        if x and x not in seen:
            seen.add(x)
            uniq.append((k, x))
    return uniq


def main(argv):
    ap = argparse.ArgumentParser(prog="pipeline.run fidelity")
    ap.add_argument("--example", required=True, help="target/release/examples/fidelity")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--work", default=None, help="work folder holding suite.json (built if missing)")
    ap.add_argument("--runtimes", default="integer,int8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from . import stages

    w = Work(False, a.work)
    stages.suite(w)
    items = texts(w)
    names = a.runtimes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "texts.txt"), os.path.join(tmp, "out.jsonl")
        with open(src, "w") as f:
            f.write("".join(x + "\n" for _, x in items))
        subprocess.run([a.example, a.bundle, src, dst, *names], check=True)
        rows = [json.loads(line) for line in open(dst)]
    assert len(rows) == len(items)
    w.lora.zero()
    ref = w.lora.embed_all([x for _, x in items]).numpy().astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    report = {"texts": len(items), "kinds": {}, "runtimes": {}}
    for k, _ in items:
        report["kinds"][k] = report["kinds"].get(k, 0) + 1
    cos = {}
    for n in names:
        e = np.array([r[n]["embedding"] for r in rows], dtype=np.float64)
        c = (e * ref).sum(1) / np.linalg.norm(e, axis=1)
        cos[n] = c
        worst = int(np.argmin(c))
        report["runtimes"][n] = {
            "cosine_to_pytorch_fp32": {
                "min": float(c.min()),
                "p01": float(np.quantile(c, 0.01)),
                "mean": float(c.mean()),
                "below_0.99": int((c < 0.99).sum()),
            },
            "worst": {"kind": items[worst][0], "text": items[worst][1]},
            "by_kind_min": {k: float(min(c[i] for i, (kk, _) in enumerate(items) if kk == k)) for k in report["kinds"]},
        }
    a0, b0 = names[0], names[1]
    set_changed = weight_changed = guard_flipped = 0
    max_dw = 0.0
    for r in rows:
        x, y = r[a0], r[b0]
        if set(x["experts"]) != set(y["experts"]):
            set_changed += 1
        else:
            wx = dict(zip(x["experts"], x["weights"]))
            dw = max(abs(wx[i] - v) for i, v in zip(y["experts"], y["weights"]))
            max_dw = max(max_dw, dw)
            weight_changed += dw > 0.01
        guard_flipped += x["out_of_distribution"] != y["out_of_distribution"]
    ea = np.array([r[a0]["embedding"] for r in rows])
    eb = np.array([r[b0]["embedding"] for r in rows])
    between = (ea * eb).sum(1)
    report["between"] = {
        "runtimes": [a0, b0],
        "embedding_cosine_min": float(between.min()),
        "embedding_cosine_mean": float(between.mean()),
        "top_k_set_changed": set_changed,
        "weight_change_over_0.01": int(weight_changed),
        "max_weight_change_same_set": max_dw,
        "guard_decision_flipped": guard_flipped,
    }
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
