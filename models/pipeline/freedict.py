"""A second task family in the task format (models/TASKS.md): word translation, from FreeDict.

`python -m pipeline.freedict --out DIR` reads the FreeDict bilingual dictionaries that Debian ships
(`dict-freedict-<src>-<tgt>`, dictd files under /usr/share/dictd; nobody here wrote them) and
writes one task per dictionary: query = a headword, positives = its translations. English into
German, French, Spanish, Italian, Dutch, Portuguese and Swedish, and each of those (and Danish)
into English: 15 tasks; `meta.relation` is the direction (`from_english` / `to_english`),
`meta.domain` the other language. library.json holds out four (two of a language whose other
direction is an expert, two of a language the experts never see) and declares translation in
scope, so the guard's generated off-topic translation requests are not counted against it.

Pairs: headwords of one to three words of letters (no digits), translations split at commas and
semicolons with glosses in brackets removed, a translation equal to its headword dropped, at most
three per headword; up to 400 headwords per task, seeded, split 60/20/20 by headword.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re

from .tasks import Task

DICTD = "/usr/share/dictd"
LANGS = {
    "deu": "German",
    "fra": "French",
    "spa": "Spanish",
    "ita": "Italian",
    "nld": "Dutch",
    "por": "Portuguese",
    "swe": "Swedish",
    "dan": "Danish",
}
# (source, target) of each task's dictionary; eng-dan has only ~400 headwords, so Danish is one way
PAIRS = [("eng", x) for x in LANGS if x != "dan"] + [(x, "eng") for x in LANGS]
UNSEEN = ["eng-ita", "por-eng", "eng-nld", "nld-eng"]
PACKAGES = [f"dict-freedict-{s}-{t}" for s, t in PAIRS]
MAX_QUERIES = 400
MAX_POSITIVES = 3
SEED = 20261203
WORD = re.compile(r"^[^\W\d_]+(?:[-' ][^\W\d_]+){0,2}$")

FROM_ENGLISH = [
    "Translate an English word into {L}",
    "Given an English word, find its {L} translation",
    "English to {L} dictionary lookup",
    "Find the {L} word for an English word",
    "What is this English word in {L}?",
    "Map English vocabulary to its {L} equivalents",
    "Look up the {L} translation of an English term",
    "English -> {L}: return the matching {L} word",
    "Bilingual dictionary, English-{L}: from the English headword to its {L} translation",
    "For each English word, retrieve the {L} word with the same meaning",
]
TO_ENGLISH = [
    "Translate a {L} word into English",
    "Given a {L} word, find its English translation",
    "{L} to English dictionary lookup",
    "Find the English word for a {L} word",
    "What does this {L} word mean in English?",
    "Map {L} vocabulary to its English equivalents",
    "Look up the English translation of a {L} term",
    "{L} -> English: return the matching English word",
    "Bilingual dictionary, {L}-English: from the {L} headword to its English translation",
    "For each {L} word, retrieve the English word with the same meaning",
]
# user-style wordings, for evaluation only (never keys, never choosing): written before any run
EVAL_FROM_ENGLISH = [
    "how do I say a word in {L}?",
    "travel phrasebook: English word in, {L} word out",
    "help me write to my {L} friends, give me the {L} word for an English one",
    "English word -> {L}",
    "vocabulary quiz that asks for the {L} of each English word",
]
EVAL_TO_ENGLISH = [
    "what does this {L} word mean?",
    "I'm learning {L}: give me the English for a word I don't know",
    "dictionary app: type a {L} word, get the English",
    "{L} word -> English meaning",
    "reading a {L} newspaper and need the English for words I don't know",
]


def b64(s: str) -> int:
    """dictd's base-64 offsets and lengths."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for ch in s:
        n = n * 64 + digits.index(ch)
    return n


def entries(src: str, tgt: str, root: str = DICTD):
    """(headword, translations) of one dictionary, in its index order."""
    base = os.path.join(root, f"freedict-{src}-{tgt}")
    if not os.path.exists(base + ".index"):
        raise SystemExit(
            f"{base}.index not found: install the Debian package dict-freedict-{src}-{tgt} "
            f"(make tasks-freedict installs all {len(PACKAGES)})"
        )
    with gzip.open(base + ".dict.dz") as f:
        data = f.read()
    with open(base + ".index", encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or parts[0].startswith("00"):
                continue
            off, n = b64(parts[1]), b64(parts[2])
            text = data[off : off + n].decode("utf-8", errors="replace").strip().split("\n")
            head = re.split(r" /| <", text[0])[0].strip()
            out = []
            for sense in text[1:]:
                sense = re.sub(r"^\d+\.\s*", "", sense.strip())
                sense = re.sub(r"\([^)]*\)|\[[^\]]*\]|<[^>]*>|\"[^\"]*\"", "", sense)
                out += [x.strip() for x in re.split(r"[,;]", sense) if x.strip()]
            yield head, out


def _fill(template: str, lang: str) -> str:
    """A template with the language filled in ("a Italian word" -> "an Italian word")."""
    return re.sub(r"\ba ([AEIOU])", r"an \1", template.format(L=lang))


def task(src: str, tgt: str, root: str = DICTD) -> Task:
    """One dictionary as a task."""
    seen, recs = set(), []
    for head, trans in entries(src, tgt, root):
        if not WORD.match(head) or len(head) > 30 or head.lower() in seen:
            continue
        pos = list(dict.fromkeys(t for t in trans if WORD.match(t) and len(t) <= 30 and t.lower() != head.lower()))
        if pos:
            seen.add(head.lower())
            recs.append((head, pos[:MAX_POSITIVES]))
    rng = random.Random(f"{SEED}/{src}-{tgt}")
    rng.shuffle(recs)
    recs = recs[:MAX_QUERIES]
    n = len(recs)
    cut = {"train": recs[: int(0.6 * n)], "val": recs[int(0.6 * n) : int(0.8 * n)], "test": recs[int(0.8 * n) :]}
    splits = {k: [(q, p, q) for q, ps in v for p in ps] for k, v in cut.items()}
    to_english = tgt == "eng"
    lang = LANGS[src if to_english else tgt]
    templates = TO_ENGLISH if to_english else FROM_ENGLISH
    ex = ", ".join(f"{q} -> {ps[0]}" for q, ps in random.Random(f"{SEED}/{src}-{tgt}/ex").sample(cut["train"], 3))
    descriptions = [_fill(x, lang) + ("" if x.endswith("?") else ".") for x in templates]
    descriptions.append(f"{_fill(templates[0], lang)} (for example {ex}).")
    evals = [_fill(x, lang) for x in (EVAL_TO_ENGLISH if to_english else EVAL_FROM_ENGLISH)]
    return Task(
        name=f"{src}-{tgt}",
        relation="to_english" if to_english else "from_english",
        domain=lang,
        description=descriptions[0],
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        n_sources=n,
        descriptions=descriptions,
        meta={"family": "freedict", "dictionary": f"dict-freedict-{src}-{tgt}"},
        eval_descriptions=evals,
    )


def main(argv=None) -> None:
    from . import taskdir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the library folder to write")
    ap.add_argument("--dictd", default=DICTD, help="where the dictd files are (default %(default)s)")
    a = ap.parse_args(argv)
    tasks = [task(s, t, a.dictd) for s, t in PAIRS]
    for t in tasks:
        print(f"{t.name}: {t.n_sources} headwords, {len(t.train)}/{len(t.val)}/{len(t.test)} pairs")
    taskdir.write(a.out, tasks, UNSEEN, "freedict", in_scope_kinds=["translation"])
    print(f"wrote {len(tasks)} tasks to {a.out} ({len(UNSEEN)} unseen: {', '.join(UNSEEN)})")


if __name__ == "__main__":
    main()
