"""`python -m pipeline.run hot-add --sglora BIN --bundle DIR [--task T] [--out F]`: the proof of
`sglora experts add` (#23, part 2) on a bundle and its work folder.

One unseen task's oracle LoRA is trained with the pipeline (the `oracles` stage's recipe and seed,
cached in the work folder's `oracles/`), saved by PEFT as any trainer would save it, and added to
a fresh state directory with `sglora experts add` and three descriptions from the task's phrase
bank (`--keys`: by default its templated description and two paraphrases; 36 is the key set a
shipped expert has; the user-wording test set is not used to build anything). Then, with the CLI as a device runs it:

- each user-worded description of the task (`models/eval/user_wording.json`; in a tiny run,
  which has no such set, the task's held-out bank paraphrases) is explained and generated
  before and after: is the added expert the top one, and what R@1 does the served adapter
  reach on the task's test split, against the oracle's own (PEFT, fp32; the paired bootstrap
  interval of the difference over the test queries says whether it is within noise);
- every other unseen task's templated description is generated before and after: the weights
  must be byte-identical unless the added expert is among its retrieved experts.
"""

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np

from .work import Work, jdump, log, safe


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
    return r.stdout


def main(argv):
    ap = argparse.ArgumentParser(prog="pipeline.run hot-add")
    ap.add_argument("--sglora", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--task", default=None, help="the unseen task (default: the first with user wording)")
    ap.add_argument(
        "--keys",
        type=int,
        default=3,
        help="bank descriptions the expert is added with (36: the key set a shipped expert has)",
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not 1 <= a.keys <= 36:
        ap.error("--keys must be 1 to 36 (the bank's first 36 wordings; the rest are held out)")
    from . import stages
    from .descriptions import description_set
    from .evaluate import _peft_embedder
    from .lora import query_ranks, test_set
    from .retrieval import user_wording
    from .stats import named_rng, paired_interval

    w = Work(a.tiny, a.work)
    stages.suite(w)
    unseen = w.suite["unseen"]
    wording = {} if a.tiny else user_wording()["unseen"]
    if a.task:
        task = next((t for t in unseen if t.name == a.task), None)
        if task is None:
            raise SystemExit(f"unknown unseen task {a.task!r}; known: {', '.join(t.name for t in unseen)}")
    else:
        task = next((t for t in unseen if t.name in wording), unseen[0])
    i = unseen.index(task)
    bank = description_set(task, 48)
    requests = wording.get(task.name) or bank[36:43]
    added_with = bank[: a.keys]

    # The oracle, as the `oracles` stage trains it, saved by PEFT.
    stages._train_cached(w, task, "oracles", seed=5000 + i)
    mu = w.load_trained("oracles", task.name)[0].mean(0)
    tmp = tempfile.mkdtemp(prefix="sglora-hot-add-")
    oracle_dir = os.path.join(tmp, "oracle")
    w.lora.set_flat(mu)
    w.lora.model.save_pretrained(oracle_dir)
    w.lora.zero()
    queries, gallery, pos = test_set(task.test)

    def ranks_of(adapter):
        e = _peft_embedder(w.lora, adapter)
        return query_ranks(e(queries), e(gallery), pos)

    oracle_ranks = ranks_of(oracle_dir)
    r1 = lambda ranks: float((ranks == 1).mean())  # noqa: E731
    state = os.path.join(tmp, "state")
    os.makedirs(state)
    cli = [a.sglora, "--bundle", a.bundle]

    def served(text, with_expert, dest):
        extra = ["--state-dir", state] if with_expert else []
        ex = json.loads(_run(cli + extra + ["explain", text, "--json"]))
        _run(cli + extra + ["generate", text, "--allow-ood", "-o", dest])
        prov = json.load(open(os.path.join(dest, "provenance.json")))
        return ex["experts"][0]["name"], [e["name"] for e in ex["experts"]], prov["weights_sha256"]

    rows = []
    for k, text in enumerate(requests):
        row = {"description": text}
        for when in ("before", "after"):
            if when == "after" and k == 0:
                name = f"oracle/{task.name}"
                added = json.loads(
                    _run(
                        cli
                        + ["--state-dir", state, "experts", "add", oracle_dir, "--name", name]
                        + [x for d in added_with for x in ("--description", d)]
                        + ["--relation", task.relation, "--json"]
                    )
                )
                log(f"added {name}: projection error {added['projection_error']:.2e}")
            d = os.path.join(tmp, f"{when}-{k}")
            top, _, _ = served(text, when == "after", d)
            ranks = ranks_of(d)
            _, lo, hi = paired_interval(ranks == 1, oracle_ranks == 1, named_rng(f"hot-add/{k}/{when}"))
            row[when] = {"top": top, "r1": r1(ranks), "vs_oracle": r1(ranks) - r1(oracle_ranks), "ci": [lo, hi]}
        rows.append(row)
        log(json.dumps(row))

    others = []
    for t in unseen:
        if t is task:
            continue
        _, _, before = served(t.description, False, os.path.join(tmp, "o-before-" + safe(t.name)))
        _, names, after = served(t.description, True, os.path.join(tmp, "o-after-" + safe(t.name)))
        others.append({"task": t.name, "identical": before == after, "retrieves_added": f"oracle/{task.name}" in names})
    summary = {
        "task": task.name,
        "oracle_r1": r1(oracle_ranks),
        "projection_error": added["projection_error"],
        "added_with": added_with,
        "requests": len(rows),
        "top_is_added_after": sum(r["after"]["top"] == f"oracle/{task.name}" for r in rows),
        "mean_r1_before": float(np.mean([r["before"]["r1"] for r in rows])),
        "mean_r1_after": float(np.mean([r["after"]["r1"] for r in rows])),
        "after_within_noise_of_oracle": sum(r["after"]["ci"][0] <= 0 <= r["after"]["ci"][1] for r in rows),
        "other_tasks": len(others),
        "other_tasks_identical": sum(o["identical"] for o in others),
        "other_tasks_changed_without_retrieving_it": sum(
            (not o["identical"]) and not o["retrieves_added"] for o in others
        ),
    }
    print(json.dumps(summary, indent=1))
    if a.out:
        jdump(a.out, {"summary": summary, "requests": rows, "others": others})
    if summary["other_tasks_changed_without_retrieving_it"]:
        raise SystemExit("adding an expert changed the adapter of a task that does not retrieve it")
    if summary["projection_error"] > 1e-3:
        raise SystemExit("the pipeline's oracle did not project exactly onto the bundle's shared A")
