"""The task suite: retrieval tasks that differ in kind, built from WordNet 3.0.

A task is a (relation, domain) cell: queries are words (or definitions), targets are the related
words/definitions/sentences, the domain is the lexicographer file of the query synset. Every task
has a plain-language description that says what is matched with what and in which domain.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from . import wordnet

# Singular noun phrase describing what a query of each lexicographer file is.
DOMAIN_PHRASE = {
    "noun.Tops": "a very general concept",
    "noun.act": "an action or activity",
    "noun.animal": "an animal",
    "noun.artifact": "a man-made object",
    "noun.attribute": "a property or quality",
    "noun.body": "a part of the body",
    "noun.cognition": "an idea or field of knowledge",
    "noun.communication": "a form of communication",
    "noun.event": "an event or happening",
    "noun.feeling": "a feeling or emotion",
    "noun.food": "a food or drink",
    "noun.group": "a group or organisation",
    "noun.location": "a place",
    "noun.motive": "a motive or goal",
    "noun.object": "a natural object",
    "noun.person": "a person or kind of person",
    "noun.phenomenon": "a natural phenomenon",
    "noun.plant": "a plant",
    "noun.possession": "money, property or possession",
    "noun.process": "a natural process",
    "noun.quantity": "a quantity or unit of measure",
    "noun.relation": "a relation between things",
    "noun.shape": "a shape",
    "noun.state": "a state or condition",
    "noun.substance": "a substance or material",
    "noun.time": "a period or point in time",
    "verb.body": "a verb about the body or grooming",
    "verb.change": "a verb of change",
    "verb.cognition": "a verb of thinking",
    "verb.communication": "a verb of speaking or communicating",
    "verb.competition": "a verb of fighting or competing",
    "verb.consumption": "a verb of eating, drinking or using up",
    "verb.contact": "a verb of touching or hitting",
    "verb.creation": "a verb of making or creating",
    "verb.emotion": "a verb of feeling",
    "verb.motion": "a verb of movement",
    "verb.perception": "a verb of seeing, hearing or sensing",
    "verb.possession": "a verb of owning, buying or giving",
    "verb.social": "a verb of social activity",
    "verb.stative": "a verb of being or having",
    "verb.weather": "a weather verb",
    "adj.all": "an adjective",
    "adj.pert": "a relational adjective",
    "adj.ppl": "a participle adjective",
    "adv.all": "an adverb",
}

# relation name -> (WordNet pointer symbol or special kind, description template with {d}).
# Descriptions name the relation first and the domain last: in the first full run (templates
# "Given {d}, find ...") description similarity was dominated by the domain, while transfer
# follows the relation (same-domain/other-relation experts *hurt*, -3.0 MRR points), and the
# validity gate failed (Spearman 0.25 on MRR). See models/README.md.
RELATIONS = {
    "definition": (
        "<gloss>",
        "Dictionary lookup: given a word, retrieve the definition that explains what it means. Domain: {d}.",
    ),
    "term": ("<term>", "Reverse dictionary: given a definition, find the word it defines. Domain: {d}."),
    "example": (
        "<example>",
        "Fill in the blank: given a word, find an example sentence in which it fits the blank. Domain: {d}.",
    ),
    "hypernym": ("@", "Generalisation: given a word, find the broader category it is a kind of. Domain: {d}."),
    "hyponym": ("~", "Specialisation: given a general word, find a more specific kind of it. Domain: {d}."),
    "instance_of": ("@i", "Given a proper name, find what kind of thing it is an instance of. Domain: {d}."),
    "part": ("%p", "Part-whole: given a whole thing, find one of its parts or components. Domain: {d}."),
    "whole": ("#p", "Whole-part: given a part, find the larger whole that contains it. Domain: {d}."),
    "member": ("%m", "Given a group or collection, find one of its members. Domain: {d}."),
    "group": ("#m", "Given a member, find the group, family or collection it belongs to. Domain: {d}."),
    "antonym": ("!", "Opposites: given a word, find the word with the opposite meaning. Domain: {d}."),
    "similar": ("&", "Synonyms: given an adjective, find an adjective with a similar meaning. Domain: {d}."),
    "topic": (";c", "Given a term, find the subject area or field of study it belongs to. Domain: {d}."),
    "topic_term": ("-c", "Given a subject area, find a technical term used in that field. Domain: {d}."),
    "region": (";r", "Given a term, find the country or region it is associated with. Domain: {d}."),
    "substance": ("%s", "Given a thing, find the substance or material it is made of. Domain: {d}."),
}

# Suite v1 (first full run) measured these relations flat: mean own-task R@1 gain of their LoRAs
# example +0.9, group -0.2, similar +1.9, definition +2.1 points (vs +17.5 instance_of, +12.4
# topic, +9.7 antonym). Experts that learn nothing transfer nothing, so they are left out.
FLAT_RELATIONS = ["example", "group", "similar", "definition"]


class Split(list):
    """A split's (query, target, source) pairs; `gallery`, when not empty, is the gallery its
    queries are ranked against (a task's gallery.jsonl, models/TASKS.md) instead of the split's
    distinct targets (`lora.test_set`)."""

    gallery: list[str] = []


@dataclass
class Task:
    name: str
    relation: str
    domain: str
    description: str
    train: list[tuple[str, str, int]]  # (query, target, source id)
    val: list[tuple[str, str, int]]
    test: list[tuple[str, str, int]]
    n_sources: int
    # from the task format (models/TASKS.md): every wording of the task (the first is `description`),
    # other metadata, wordings kept for evaluation only, and the gallery (empty: each split's targets)
    descriptions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    eval_descriptions: list[str] = field(default_factory=list)
    gallery: list[str] = field(default_factory=list)

    def __post_init__(self):
        for k in ("train", "val", "test"):
            split = Split(getattr(self, k))
            split.gallery = self.gallery
            setattr(self, k, split)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("train", "val", "test"):
            d[k] = list(getattr(self, k))
        return d

    @staticmethod
    def from_json(d: dict) -> Task:
        d = dict(d)
        for k in ("train", "val", "test"):
            d[k] = [tuple(x) for x in d[k]]
        return Task(**d)


def describe(relation: str, domain: str) -> str:
    return RELATIONS[relation][1].format(d=DOMAIN_PHRASE[domain])


def _mask(sentence: str, lemma: str) -> str | None:
    """Replace the word (and its inflections) in an example sentence by a blank."""
    words = lemma.split()
    head = words[0]
    stem = head[: max(3, len(head) - 2)] if len(head) > 4 else head
    pat = re.compile(r"\b" + re.escape(stem) + r"\w*" + "".join(r"\s+\w+" for _ in words[1:]), re.I)
    out, n = pat.subn("___", sentence)
    return out if n else None


def _pairs_for(syn: wordnet.Synset, relation: str, synsets) -> list[tuple[str, str]]:
    kind = RELATIONS[relation][0]
    q = syn.lemma(0)
    if kind == "<gloss>":
        return [(q, syn.definition)] if syn.definition else []
    if kind == "<term>":
        return [(syn.definition, q)] if syn.definition else []
    if kind == "<example>":
        for ex in syn.examples:
            m = _mask(ex, q)
            if m and len(m.split()) >= 4:
                return [(q, m)]
        return []
    out = []
    for p in syn.pointers:
        if p.symbol != kind or p.target not in synsets:
            continue
        tgt = synsets[p.target]
        qi = syn.lemma(p.src_word - 1) if p.src_word else q
        ti = tgt.lemma(p.dst_word - 1) if p.dst_word else tgt.lemma(0)
        if qi.lower() != ti.lower():
            out.append((qi, ti))
    return out


def candidate_cells(synsets, min_sources: int, min_targets: int) -> dict[tuple[str, str], dict]:
    """All (relation, domain) cells with enough sources and distinct targets."""
    cells: dict[tuple[str, str], dict[int, list]] = defaultdict(dict)
    for sid, (_key, syn) in enumerate(sorted(synsets.items())):
        for rel in RELATIONS:
            pairs = _pairs_for(syn, rel, synsets)
            if pairs:
                cells[(rel, syn.lexname)][sid] = pairs
    out = {}
    for cell, by_src in cells.items():
        targets = {t for ps in by_src.values() for _, t in ps}
        if len(by_src) >= min_sources and len(targets) >= min_targets:
            out[cell] = by_src
    return out


def _split(by_src: dict[int, list], rng: random.Random, max_sources: int, max_pairs_per_source: int):
    srcs = sorted(by_src)
    rng.shuffle(srcs)
    srcs = srcs[:max_sources]
    n_test = round(0.4 * len(srcs))
    n_val = round(0.15 * (len(srcs) - n_test))
    parts = {"test": srcs[:n_test], "val": srcs[n_test : n_test + n_val], "train": srcs[n_test + n_val :]}
    out = {}
    for name, ss in parts.items():
        out[name] = [(q, t, s) for s in sorted(ss) for q, t in by_src[s][:max_pairs_per_source]]
    return out, len(srcs)


def _added_relations(all_cells, expert_cells, unseen_sources, cfg, seed):
    """Suite v4: relations re-measured after v3 (`cfg["added_relations"]`: relation -> (experts,
    unseen tasks)), chosen after v3's selection with their own seeded draw so that v3's tasks stay
    exactly as they were. An added unseen task takes only a cell whose sources no v3 expert task
    uses (so no v3 expert loses items); added experts take the other cells of the relation that
    keep enough sources once every unseen source is removed."""
    rng = random.Random(f"{seed}/added")
    used = {s for (cell, by_src) in expert_cells for s in _sampled_sources(cell, by_src, cfg, seed)}
    unseen, experts = [], []
    for rel, (n_exp, n_unseen) in sorted(cfg.get("added_relations", {}).items()):
        doms = sorted(d for r, d in all_cells if r == rel)
        rng.shuffle(doms)
        free = [d for d in doms if not set(all_cells[(rel, d)]) & used]
        chosen = free[:n_unseen]
        unseen += [(rel, d) for d in chosen]
        excluded = unseen_sources | {s for d in chosen for s in all_cells[(rel, d)]}
        for d in doms:
            if len([c for c in experts if c[0] == rel]) >= n_exp or d in chosen:
                continue
            if len([s for s in all_cells[(rel, d)] if s not in excluded]) >= cfg["min_sources_after_exclusion"]:
                experts.append((rel, d))
    return unseen, experts


def _sampled_sources(cell, by_src, cfg, seed) -> set[int]:
    """The sources a task built from `by_src` uses (what `_split` keeps)."""
    rel, dom = cell
    parts, _ = _split(by_src, random.Random(f"{seed}/{rel}/{dom}"), cfg["max_sources"], cfg["max_pairs_per_source"])
    return {s for part in parts.values() for _, _, s in part}


def build_suite(cfg: dict, seed: int = 20261129) -> dict:
    """Choose unseen and expert tasks with a fixed seed; unseen sources never occur in experts."""
    synsets = wordnet.load()
    all_cells = candidate_cells(synsets, cfg["min_sources"], cfg["min_targets"])
    cells = {c: v for c, v in all_cells.items() if c[0] not in cfg.get("exclude_relations", ())}
    rng = random.Random(seed)
    by_rel = defaultdict(list)
    for rel, dom in sorted(cells):
        by_rel[rel].append(dom)
    # Unseen tasks: relations with >= 3 cells, round robin over relations in a seeded order.
    rels = sorted(r for r, ds in by_rel.items() if len(ds) >= 3)
    rng.shuffle(rels)
    unseen_cells = []
    pools = {r: rng.sample(by_rel[r], len(by_rel[r])) for r in rels}
    while len(unseen_cells) < cfg["n_unseen"] and any(len(p) > 2 for p in pools.values()):
        for r in rels:
            if len(unseen_cells) < cfg["n_unseen"] and len(pools[r]) > 2:
                unseen_cells.append((r, pools[r].pop()))
    unseen_sources = {s for c in unseen_cells for s in cells[c]}
    # Expert tasks: round robin over all relations, excluding unseen sources.
    expert_pool = defaultdict(list)
    for rel in sorted(by_rel):
        for dom in rng.sample(by_rel[rel], len(by_rel[rel])):
            if (rel, dom) in unseen_cells:
                continue
            by_src = {s: p for s, p in cells[(rel, dom)].items() if s not in unseen_sources}
            if len(by_src) >= cfg["min_sources_after_exclusion"]:
                expert_pool[rel].append((dom, by_src))
    expert_cells = []
    order = sorted(expert_pool)
    rng.shuffle(order)
    unseen_rels = {r for r, _ in unseen_cells}
    order.sort(key=lambda r: r not in unseen_rels)  # cover every unseen relation first
    per_rel = defaultdict(int)
    while len(expert_cells) < cfg["n_experts"] and any(expert_pool[r] for r in order):
        for r in order:
            if len(expert_cells) < cfg["n_experts"] and expert_pool[r] and per_rel[r] < cfg["max_experts_per_relation"]:
                dom, by_src = expert_pool[r].pop(0)
                expert_cells.append(((r, dom), by_src))
                per_rel[r] += 1
        if all(per_rel[r] >= cfg["max_experts_per_relation"] or not expert_pool[r] for r in order):
            break
    added_unseen, added_experts = _added_relations(all_cells, expert_cells, unseen_sources, cfg, seed)
    unseen_cells += added_unseen
    unseen_sources |= {s for c in added_unseen for s in all_cells[c]}
    for rel, dom in added_experts:
        by_src = {s: p for s, p in all_cells[(rel, dom)].items() if s not in unseen_sources}
        expert_cells.append(((rel, dom), by_src))
    cells = {**cells, **{c: all_cells[c] for c in added_unseen + added_experts}}
    expert_relations = {c[0] for c, _ in expert_cells}
    expert_domains = {c[1] for c, _ in expert_cells}

    def make(cell, by_src):
        rel, dom = cell
        parts, n = _split(by_src, random.Random(f"{seed}/{rel}/{dom}"), cfg["max_sources"], cfg["max_pairs_per_source"])
        return Task(f"{rel}/{dom}", rel, dom, describe(rel, dom), parts["train"], parts["val"], parts["test"], n)

    experts = [make(c, b) for c, b in expert_cells]
    unseen = []
    for c in unseen_cells:
        if c[0] not in expert_relations:
            continue
        t = make(c, cells[c])
        kind = (
            "known relation, known domain (new combination)" if c[1] in expert_domains else "known relation, new domain"
        )
        unseen.append((t, kind))
    return {
        "seed": seed,
        "config": cfg,
        "n_candidate_cells": len(cells),
        "candidate_cells": sorted(f"{r}/{d}" for r, d in cells),
        "experts": [t.to_json() for t in experts],
        "unseen": [dict(t.to_json(), novelty=k) for t, k in unseen],
    }
