"""The task format (models/TASKS.md): what every stage of the pipeline reads its tasks from.

A library is a folder with one folder per task and an optional `library.json`:

    LIB/library.json              {"format": 1, "name": …, "unseen": [task names], "in_scope_kinds": [...],
                                   "order": [task folders]}
    LIB/<task>/task.json          {"format": 1, "name": …, "descriptions": [...], "meta": {...},
                                   "eval_descriptions": [...]}
    LIB/<task>/train.jsonl        one {"query": …, "positives": [...], "source": …} per line
    LIB/<task>/val.jsonl, test.jsonl
    LIB/<task>/gallery.jsonl      optional: one {"target": …} per line (default: the split's targets)

`load` reads and checks a library and returns its tasks (`tasks.Task`); `write` writes one (the
WordNet suite and `pipeline.freedict` are producers). A bad library is refused with a
`TaskFormatError` that names the file, the line and what to change.
"""

from __future__ import annotations

import json
import os

from .tasks import Task

FORMAT = 1
SPLITS = ("train", "val", "test")
NOVELTY = {
    (True, True): "known relation, known domain (new combination)",
    (True, False): "known relation, new domain",
    (False, True): "new relation, known domain",
    (False, False): "new relation, new domain",
}


class TaskFormatError(ValueError):
    """A library that does not follow models/TASKS.md."""


def _folder_name(name: str) -> str:
    from .work import safe

    return safe(name)


def write(root: str, tasks: list[Task], unseen: list[str], name: str, in_scope_kinds=()) -> None:
    """Write `tasks` as a library under `root` (each task's pairs grouped into records by runs of
    one query and source, in their order, so `load` gives back the same pairs in the same order)."""
    os.makedirs(root, exist_ok=True)
    for t in tasks:
        d = os.path.join(root, _folder_name(t.name))
        os.makedirs(d, exist_ok=True)
        meta = dict(t.meta, relation=t.relation, domain=t.domain)
        doc = {
            "format": FORMAT,
            "name": t.name,
            "descriptions": t.descriptions or [t.description],
            "meta": meta,
        }
        if t.eval_descriptions:
            doc["eval_descriptions"] = t.eval_descriptions
        _write_json(os.path.join(d, "task.json"), doc)
        for split in SPLITS:
            recs = []
            for q, target, src in getattr(t, split):
                if recs and recs[-1]["query"] == q and recs[-1]["source"] == src:
                    recs[-1]["positives"].append(target)
                else:
                    recs.append({"query": q, "positives": [target], "source": src})
            tmp = os.path.join(d, split + ".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, os.path.join(d, split + ".jsonl"))
    lib = {"format": FORMAT, "name": name, "unseen": list(unseen), "order": [_folder_name(t.name) for t in tasks]}
    if in_scope_kinds:
        lib["in_scope_kinds"] = list(in_scope_kinds)
    _write_json(os.path.join(root, "library.json"), lib)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def library(root: str) -> dict:
    """`library.json` (or the defaults: no unseen tasks named, no in-scope kinds)."""
    path = os.path.join(root, "library.json")
    if not os.path.exists(path):
        return {"format": FORMAT, "name": os.path.basename(os.path.abspath(root)), "unseen": [], "in_scope_kinds": []}
    lib = _read_json(path)
    _check_format(lib, path)
    for key in ("unseen", "in_scope_kinds", "order"):
        v = lib.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise TaskFormatError(f"{path}: {key!r} must be a list of strings")
        lib[key] = v
    lib.setdefault("name", os.path.basename(os.path.abspath(root)))
    return lib


def load(root: str, limit: int | None = None) -> list[Task]:
    """Every task of the library at `root`, in folder-name order. `limit`: at most that many
    records per split (the tiny run)."""
    if not os.path.isdir(root):
        raise TaskFormatError(f"{root}: no such folder (a library is a folder of task folders, models/TASKS.md)")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    order = library(root).get("order")
    if order:
        stray = sorted(set(folders) - set(order))
        absent = [f for f in order if f not in folders]
        if stray or absent:
            raise TaskFormatError(
                f"{root}/library.json: 'order' does not list the task folders "
                f"(not listed: {', '.join(stray) or 'none'}; listed but missing: {', '.join(absent) or 'none'})"
            )
        folders = order
    tasks = [read_task(os.path.join(root, f), limit) for f in folders]
    if not tasks:
        raise TaskFormatError(f"{root}: no task folders (each task is a folder with task.json, models/TASKS.md)")
    seen = {}
    for f, t in zip(folders, tasks):
        if t.name in seen:
            raise TaskFormatError(f"{root}: task name {t.name!r} is used by both {seen[t.name]}/ and {f}/")
        seen[t.name] = f
    return tasks


def read_task(folder: str, limit: int | None = None) -> Task:
    """One task folder as a `Task` (pairs = (query, positive, source) for every positive)."""
    path = os.path.join(folder, "task.json")
    if not os.path.exists(path):
        raise TaskFormatError(f"{folder}: no task.json (models/TASKS.md)")
    doc = _read_json(path)
    _check_format(doc, path)
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TaskFormatError(f"{path}: 'name' must be a non-empty string")
    descs = doc.get("descriptions")
    if isinstance(descs, str):
        descs = [descs]
    if not isinstance(descs, list) or not descs or not all(isinstance(x, str) and x.strip() for x in descs):
        raise TaskFormatError(f"{path}: 'descriptions' must be a non-empty list of non-empty strings")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise TaskFormatError(f"{path}: 'meta' must be an object")
    evals = doc.get("eval_descriptions", [])
    if not isinstance(evals, list) or not all(isinstance(x, str) and x.strip() for x in evals):
        raise TaskFormatError(f"{path}: 'eval_descriptions' must be a list of non-empty strings")
    splits = {}
    for split in SPLITS:
        splits[split] = _read_split(os.path.join(folder, split + ".jsonl"), limit)
        if not splits[split]:
            raise TaskFormatError(f"{folder}/{split}.jsonl: no pairs (every split needs at least one query)")
    gallery = os.path.join(folder, "gallery.jsonl")
    extra = _read_gallery(gallery) if os.path.exists(gallery) else []
    if extra:
        have = set(extra)
        for split, pairs in splits.items():
            missing = sorted({p[1] for p in pairs} - have)
            if missing:
                raise TaskFormatError(
                    f"{gallery}: {len(missing)} positives of {split}.jsonl are not in the gallery "
                    f"(first: {missing[0]!r}); the gallery must hold every split's positives"
                )
    sources = {p[2] for s in splits.values() for p in s}
    return Task(
        name=name,
        relation=str(meta.get("relation", name)),
        domain=str(meta.get("domain", "")),
        description=descs[0],
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        n_sources=len(sources),
        descriptions=list(descs),
        meta={k: v for k, v in meta.items() if k not in ("relation", "domain")},
        eval_descriptions=list(evals),
        gallery=extra,
    )


def novelty(task: Task, experts: list[Task]) -> str:
    """How an unseen task relates to the experts: is its relation, is its domain among theirs."""
    return NOVELTY[(task.relation in {t.relation for t in experts}, task.domain in {t.domain for t in experts})]


def _check_format(doc, path: str) -> None:
    if not isinstance(doc, dict):
        raise TaskFormatError(f"{path}: must be a JSON object")
    if doc.get("format", FORMAT) != FORMAT:
        raise TaskFormatError(f"{path}: format {doc.get('format')!r}; this pipeline reads format {FORMAT}")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TaskFormatError(f"{path}: not JSON ({e})") from None
    except UnicodeDecodeError:
        raise TaskFormatError(f"{path}: not UTF-8") from None


def _lines(path: str):
    if not os.path.exists(path):
        raise TaskFormatError(f"{path}: missing (each task has train.jsonl, val.jsonl and test.jsonl)")
    with open(path, encoding="utf-8", errors="strict") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield no, json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{no}: not JSON ({e})") from None


def _read_split(path: str, limit: int | None) -> list[tuple]:
    pairs, n = [], 0
    for no, rec in _lines(path):
        if limit is not None and n >= limit:
            break
        if not isinstance(rec, dict):
            raise TaskFormatError(f"{path}:{no}: each line is an object with 'query' and 'positives'")
        q, pos = rec.get("query"), rec.get("positives")
        if not isinstance(q, str) or not q.strip():
            raise TaskFormatError(f"{path}:{no}: 'query' must be a non-empty string")
        if isinstance(pos, str):
            pos = [pos]
        if not isinstance(pos, list) or not pos or not all(isinstance(p, str) and p.strip() for p in pos):
            raise TaskFormatError(f"{path}:{no}: 'positives' must be a non-empty list of non-empty strings")
        src = rec.get("source", q)
        if not isinstance(src, (str, int)) or isinstance(src, bool):
            raise TaskFormatError(f"{path}:{no}: 'source' must be a string or an integer")
        pairs += [(q, p, src) for p in pos]
        n += 1
    return pairs


def _read_gallery(path: str) -> list[str]:
    out = []
    for no, rec in _lines(path):
        t = rec.get("target") if isinstance(rec, dict) else None
        if not isinstance(t, str) or not t.strip():
            raise TaskFormatError(f'{path}:{no}: each line is {{"target": "…"}}')
        out.append(t)
    return out


def main(argv=None) -> int:
    """`python -m pipeline.taskdir check DIR`: load a library as the pipeline would and summarise it."""
    import argparse

    ap = argparse.ArgumentParser(description="check a library in the task format (models/TASKS.md)")
    ap.add_argument("command", choices=["check"])
    ap.add_argument("library")
    a = ap.parse_args(argv)
    try:
        lib = library(a.library)
        tasks = load(a.library)
    except TaskFormatError as e:
        print(f"error: {e}")
        return 1
    names = {t.name for t in tasks}
    unknown = [n for n in lib["unseen"] if n not in names]
    if unknown:
        print(f"error: {a.library}/library.json: unseen task(s) not in the library: {', '.join(unknown)}")
        return 1
    for t in tasks:
        role = "unseen" if t.name in lib["unseen"] else "expert"
        print(
            f"{t.name}: {role}, relation {t.relation!r}, {len(t.descriptions)} descriptions, "
            f"{len(t.eval_descriptions)} eval descriptions, {len(t.train)}/{len(t.val)}/{len(t.test)} pairs"
        )
    print(f"{lib['name']}: {len(tasks)} tasks, {len(lib['unseen'])} unseen; in scope: {lib['in_scope_kinds'] or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
