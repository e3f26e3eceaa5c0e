"""make test-tasks: a library in the task format (models/TASKS.md) is read back exactly, and a broken
one is refused with the file, the line and what is wrong (pipeline.taskdir), never half-loaded.

usage: python tests/tasks_check.py LIBRARY (e.g. the FreeDict library of make tasks-freedict)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
from pipeline import taskdir  # noqa: E402

lib = sys.argv[1]
tasks = taskdir.load(lib)
tmp = tempfile.mkdtemp(prefix="sglora-tasks-")
try:
    # a library written by taskdir.write is loaded back to the same tasks, in the same order
    again = os.path.join(tmp, "again")
    taskdir.write(again, tasks, taskdir.library(lib)["unseen"], "again", ["translation"])
    back = taskdir.load(again)
    assert [t.to_json() for t in back] == [t.to_json() for t in tasks], "a written library reads back differently"

    def broken(name, change, expect):
        """Copy the library, apply `change` to the copy, and check that loading it fails naming `expect`."""
        d = os.path.join(tmp, name)
        shutil.copytree(lib, d)
        first = os.path.join(d, sorted(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))[0])
        change(d, first)
        try:
            taskdir.load(d)
        except taskdir.TaskFormatError as e:
            assert expect in str(e), f"{name}: {e!s} does not say {expect!r}"
            print(f"tasks_check: {name}: refused: {e}")
        else:
            raise SystemExit(f"tasks_check: {name}: a broken library was loaded")

    def write(path, text):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def edit_json(path, **kw):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        d.update(kw)
        write(path, json.dumps(d))

    broken("no-test-split", lambda d, t: os.remove(os.path.join(t, "test.jsonl")), "test.jsonl: missing")
    broken(
        "bad-json-line",
        lambda d, t: write(os.path.join(t, "val.jsonl"), '{"query": "a", "positives": ["b"]}\n{oops\n'),
        "val.jsonl:2: not JSON",
    )
    broken(
        "empty-query",
        lambda d, t: write(os.path.join(t, "train.jsonl"), '{"query": " ", "positives": ["b"]}\n'),
        "train.jsonl:1: 'query'",
    )
    broken(
        "positives-not-list",
        lambda d, t: write(os.path.join(t, "train.jsonl"), '{"query": "a", "positives": 3}\n'),
        "'positives' must be",
    )
    broken("no-descriptions", lambda d, t: edit_json(os.path.join(t, "task.json"), descriptions=[]), "'descriptions'")
    broken(
        "other-format", lambda d, t: edit_json(os.path.join(t, "task.json"), format=2), "this pipeline reads format 1"
    )
    broken("not-utf8", lambda d, t: open(os.path.join(t, "task.json"), "wb").write(b"\xff\xfe{}"), "not UTF-8")
    broken(
        "gallery-lacks-positive",
        lambda d, t: write(os.path.join(t, "gallery.jsonl"), '{"target": "nothing here"}\n'),
        "not in the gallery",
    )

    def duplicate(d, t):
        shutil.copytree(t, t + "-copy")
        os.remove(os.path.join(d, "library.json"))  # no order: every folder is read

    broken("duplicate-name", duplicate, "is used by both")
    broken("order-misses-folder", lambda d, t: os.mkdir(os.path.join(d, "zz-new")), "'order' does not list")

    # the checker a device maker runs says the same, with exit code 1
    models = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.taskdir", "check", os.path.join(tmp, "bad-json-line")],
        capture_output=True,
        text=True,
        cwd=models,
    )
    assert r.returncode == 1 and "not JSON" in r.stdout, (r.returncode, r.stdout, r.stderr)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.taskdir", "check", os.path.abspath(lib)],
        capture_output=True,
        text=True,
        cwd=models,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout.strip().splitlines()[-1])
    print(f"tasks_check: {len(tasks)} tasks read back exactly; 10 kinds of broken library refused")
finally:
    shutil.rmtree(tmp)
