"""Resumable SG-LoRA pipeline: `python -m pipeline.run [--tiny] [--stage S]` (run from models/).

Stages (each caches its results under the work folder and is skipped when they exist; the work
folder's `stages.json` records which version of this code computed each stage, and a stage that
reuses results of other code says so):
suite -> zeroshot -> experts -> gate -> oracles -> multitask -> encoder -> keys -> relation -> scope -> prior -> guard -> cvae
-> bundle -> eval -> fixtures (and the `tune` ablation with `--only tune`). Full mode writes models/default/ and tests/fixtures/; tiny mode writes its
bundle under the work folder (and `--bundle-out` can place it elsewhere).

This module orders the stages and records them; the stages are in `stages` (training and export),
`evaluate` (and `report`), `fixtures` and `tune`; what they share is `work.Work`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import evaluate, fixtures, relation, retrieval, scope, stages, tune
from .work import HERE, Work, jdump, jload, log

STAGES = {
    "suite": stages.suite,
    "zeroshot": stages.zeroshot,
    "experts": stages.experts,
    "gate": stages.gate,
    "oracles": stages.oracles,
    "multitask": stages.multitask,
    "encoder": stages.encoder,
    "keys": retrieval.keys_stage,
    "relation": relation.stage,
    "scope": scope.scope_stage,
    "prior": stages.prior,
    "guard": retrieval.guard_stage,
    "cvae": stages.cvae,
    "bundle": stages.bundle,
    "eval": evaluate.stage,
    "fixtures": fixtures.stage,
}
# `tune` (functional fine-tuning of the CVAE) is an ablation, run with `--only tune`; it never
# helped on held-out experts beyond noise, and its output is not shipped (models/README.md).
ABLATIONS = {"tune": tune.stage}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval-adapter":
        from .evaluate import eval_adapter

        return eval_adapter(argv[1:])
    if argv and argv[0] == "embed-parity":
        from .evaluate import embed_parity

        return embed_parity(argv[1:])
    if argv and argv[0] == "hot-add":
        from .hot_add import main as hot_add

        return hot_add(argv[1:])
    if argv and argv[0] == "fidelity":
        from .fidelity import main as fidelity

        return fidelity(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true", help="a handful of tasks and steps (CI smoke run, <= 10 min)")
    ap.add_argument("--stage", default="all", help=f"run up to and including this stage: {', '.join(STAGES)}")
    ap.add_argument("--only", default=None, help="run just this stage")
    ap.add_argument("--work", default=None, help="work folder (default models/work/{full,tiny})")
    ap.add_argument("--bundle-out", default=None)
    ap.add_argument("--fixtures-out", default=None)
    ap.add_argument(
        "--ray-address",
        default=None,
        help="train the experts and oracles stages as Ray tasks on this cluster (default: $RAY_ADDRESS; "
        "unset: here); cached per task either way, byte-identical (pipeline/scale.py)",
    )
    ap.add_argument(
        "--tasks",
        default=None,
        help="build from this library in the task format (models/TASKS.md) instead of the WordNet suite",
    )
    ap.add_argument(
        "--unseen",
        default=None,
        help="comma-separated names of the library's tasks to hold out for evaluation (default: its library.json)",
    )
    ap.add_argument(
        "--ray-cpus", type=int, default=None, help="CPUs each Ray job reserves (default: its torch threads)"
    )
    args = ap.parse_args(argv)
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise SystemExit(f"--ray-cpus must be at least 1, not {args.ray_cpus}")
    unseen = [x.strip() for x in args.unseen.split(",") if x.strip()] if args.unseen is not None else None
    p = Work(
        args.tiny, args.work, args.bundle_out, args.fixtures_out, args.ray_address, args.ray_cpus, args.tasks, unseen
    )
    names = list(STAGES)
    if args.only:
        if args.only not in STAGES and args.only not in ABLATIONS:
            raise SystemExit(f"unknown stage {args.only!r}; stages: {', '.join(names + list(ABLATIONS))}")
        todo = [args.only]
    else:
        todo = names[: names.index(args.stage) + 1] if args.stage != "all" else names
    t0 = time.time()
    version = code_version()
    records_path = p.p("stages.json")
    records = jload(records_path) if os.path.exists(records_path) else {}
    for s in todo:
        ts = time.time()
        outputs = (p.work, p.bundle, p.fixtures)
        before = work_state(outputs)
        (STAGES.get(s) or ABLATIONS[s])(p)
        if work_state(outputs) != before:  # the stage computed something: record the code that did
            records[s] = {"code": version, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            jdump(records_path, records)
        elif s in records and records[s]["code"] != version:
            log(
                f"note: stage {s} reused results cached by other pipeline code ({records[s]['code']}, "
                f"{records[s]['finished']}; now {version}). If the change concerns {s}, delete its cached "
                "files (models/README.md, Stages) or use a fresh --work."
            )
        log(f"stage {s} done in {time.time() - ts:.1f}s (total {time.time() - t0:.0f}s)")


def code_version() -> str:
    """A hash of the pipeline's source files: which code computed a cached stage."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(HERE) if f.endswith(".py")):
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def work_state(folders) -> dict:
    """(size, mtime) of every file in the folders (the work folder, bundle and fixtures), one
    level of subfolders deep: whether a stage wrote anything."""
    state = {}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            for e in os.scandir(entry.path) if entry.is_dir() else [entry]:
                if e.is_file() and e.name != "stages.json":
                    st = e.stat()
                    state[e.path] = (st.st_size, st.st_mtime_ns)
    return state


if __name__ == "__main__":
    main()
