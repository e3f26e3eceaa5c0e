"""Minimal, dependency-free reader for the WordNet 3.0 database files (`dict/data.*`).

Debian's `wordnet-base` installs them under /usr/share/wordnet. The format is documented in
wndb(5): one synset per line, `offset lexfile pos w_cnt (word lex_id)* p_cnt (ptr)* [frames] | gloss`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/share/wordnet/dict")

# lexnames(5): lexicographer file number -> name
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]

POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}


@dataclass
class Pointer:
    symbol: str
    target: tuple[str, int]  # (pos, offset) ; pos 's' normalised to 'a'
    src_word: int  # 0 = semantic (whole synset); else 1-based word index in source
    dst_word: int  # 0 = semantic; else 1-based word index in target


@dataclass
class Synset:
    key: tuple[str, int]
    lexname: str
    words: list[str]
    pointers: list[Pointer] = field(default_factory=list)
    definition: str = ""
    examples: list[str] = field(default_factory=list)

    def lemma(self, i: int = 0) -> str:
        return self.words[i].replace("_", " ")


def find_dict_dir() -> str:
    for d in WORDNET_DIRS:
        if os.path.exists(os.path.join(d, "data.noun")):
            return d
    raise FileNotFoundError(
        "WordNet 3.0 data files not found; install Debian's `wordnet-base` package (apt-get install wordnet-base)"
    )


_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")


def _clean_word(w: str) -> str:
    return _ADJ_MARKER.sub("", w)


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    parts = [p.strip() for p in gloss.split(";")]
    definition_parts, examples = [], []
    for p in parts:
        if p.startswith('"'):
            ex = p.strip('"').strip()
            if ex:
                examples.append(ex)
        elif not examples:
            definition_parts.append(p)
    return "; ".join(x for x in definition_parts if x), examples


def load(dict_dir: str | None = None) -> dict[tuple[str, int], Synset]:
    """Parse all four data files into synsets keyed by (pos, offset); 's' satellites become 'a'."""
    dict_dir = dict_dir or find_dict_dir()
    synsets: dict[tuple[str, int], Synset] = {}
    for pos, fname in POS_FILES.items():
        with open(os.path.join(dict_dir, fname), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # licence header
                data, _, gloss = line.partition(" | ")
                t = data.split()
                offset, lexnum = int(t[0]), int(t[1])
                w_cnt = int(t[3], 16)
                words = [_clean_word(t[4 + 2 * i]) for i in range(w_cnt)]
                i = 4 + 2 * w_cnt
                p_cnt = int(t[i])
                i += 1
                ptrs = []
                for _ in range(p_cnt):
                    sym, off, ppos, st = t[i], int(t[i + 1]), t[i + 2], t[i + 3]
                    i += 4
                    ppos = "a" if ppos == "s" else ppos
                    ptrs.append(Pointer(sym, (ppos, off), int(st[:2], 16), int(st[2:], 16)))
                definition, examples = _split_gloss(gloss.strip())
                synsets[(pos, offset)] = Synset((pos, offset), LEXNAMES[lexnum], words, ptrs, definition, examples)
    return synsets
