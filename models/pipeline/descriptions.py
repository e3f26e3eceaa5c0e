"""Description sets: many wordings of one task, produced by code from hand-written phrase banks.

A user describes a task in their own words, not in the suite's template. Every task (expert and
unseen) therefore gets `n` descriptions drawn with a fixed seed from banks of

- relation wordings in several registers (technical, plain, question, "find X from Y",
  "given Y, X"), each with a slot `{q}` for what a query is;
- domain wordings: the lexicographer file in plain words (`tasks.DOMAIN_PHRASE`), everyday
  category names, and 2-4 example items sampled from the task's *train* split;
- framings: none, or an app / product context; terse ("animal -> its category") or verbose.

The first description of a set is always the suite's templated one. The bundle's retrieval keys
are built from the first `n_keys` of each expert's set; the rest are the held-out paraphrases the
`keys` stage validates on. No language model is involved: the banks below are the whole source.
The user-wording test set (`models/eval/user_wording.json`) was written separately, before these
banks, in styles they do not produce, and is never used to build or choose anything.
"""

from __future__ import annotations

import random

from .tasks import DOMAIN_PHRASE, Task

# relation -> wordings; `{q}` is a noun phrase for one query item ("a word", "an animal",
# "a word such as oak or maple"), `{qs}` its plural-ish topic form ("animals").
RELATION_BANK = {
    "definition": [
        "given {q}, retrieve its dictionary definition",
        "find the definition of {q}",
        "look up what {q} means and return the gloss",
        "what does {q} mean? return its definition",
        "map {q} to the sentence that defines it",
        "word to definition: for {q}, find the explanation of its meaning",
        "given {q}, get the dictionary entry text explaining it",
        "glossary lookup: from {q}, find the description of what it is",
        "explain {q} by retrieving its meaning",
        "retrieve the gloss that defines {q}",
        "for {q}, which definition describes it?",
        "from a term to its meaning, for {qs}",
    ],
    "term": [
        "given the definition of {q}, find the word being defined",
        "reverse dictionary: from a description of {q}, retrieve the word",
        "find the word that matches this definition of {q}",
        "which word is described by this explanation? the answer is {q}",
        "from a gloss to the term it defines, for {qs}",
        "guess the word from its meaning, where the word is {q}",
        "name {q} from its dictionary definition",
        "definition to word: map a description of {q} to its name",
        "what is the word for this meaning? it is {q}",
        "given a meaning, retrieve {q} that it defines",
        "describe-the-thing lookup: the description in, the name of {q} out",
        "find the term for a description of {qs}",
    ],
    "hypernym": [
        "given {q}, find the broader category it is a kind of",
        "find the hypernym of {q}",
        "what kind of thing is {q}? return its more general class",
        "map {q} to its parent category",
        "generalise {q} to the class above it",
        "from {q}, retrieve a more general term that includes it",
        "is-a lookup: {q} is a type of what?",
        "categorise {q} under its superordinate term",
        "given a specific word, get its general category, for {qs}",
        "find the umbrella term for {q}",
        "which category does {q} belong to as a kind?",
        "specific to general: from {q} to the word for its type",
    ],
    "hyponym": [
        "given {q}, find a more specific kind of it",
        "find a hyponym of {q}",
        "what are the types of {q}? return one subtype",
        "map {q} to one of its subcategories",
        "specialise {q} to a narrower term",
        "from {q}, retrieve an example kind that falls under it",
        "list a specific variety of {q}",
        "general to specific: from {q} to a word for one of its kinds",
        "given a category word, get a member kind, for {qs}",
        "which specific type is a kind of {q}?",
        "narrow {q} down to a particular sort",
        "find a subclass of {q}",
    ],
    "instance_of": [
        "given a proper name of {q}, find what kind of thing it is",
        "find the class a named {q} is an instance of",
        "who or what is this name? return its type, for {qs}",
        "map the name of a specific {q} to its category",
        "from a proper noun to the general kind it belongs to, for {qs}",
        "what kind of thing is the named entity? {q}",
        "classify a famous name as its type, about {qs}",
        "instance lookup: a particular named {q} to what it is",
        "given a name, retrieve its occupation or kind, for {qs}",
        "tell what sort of thing a named {q} is",
        "name to category, for named {qs}",
        "identify the type of a proper name, where names are of {qs}",
    ],
    "part": [
        "given {q}, find one of its parts",
        "find a component of {q}",
        "what is {q} made up of? return one part",
        "map {q} to a piece it contains",
        "whole to part: from {q} to one of its components",
        "list a part that belongs to {q}",
        "from {q}, retrieve a meronym",
        "which pieces does {q} have? give one",
        "break {q} down into a constituent part",
        "given a whole thing, get a part of it, for {qs}",
        "has-part lookup for {q}",
        "find what {q} consists of",
    ],
    "whole": [
        "given {q}, find the larger whole that contains it",
        "find the thing that {q} is a part of",
        "what is {q} a component of? return the whole",
        "map {q} to the object it belongs to as a piece",
        "part to whole: from {q} to what it is part of",
        "from {q}, retrieve its holonym",
        "which larger thing includes {q}?",
        "given a part, get the whole object, for {qs}",
        "part-of lookup for {q}",
        "find where {q} sits as a piece of something bigger",
        "name the whole that has {q} as a part",
        "from a component to the assembly it belongs to, for {qs}",
    ],
    "member": [
        "given {q}, find one of its members",
        "find a member of {q}",
        "who or what belongs to {q}? return one member",
        "map {q} to something that is in it",
        "group to member: from {q} to one of its members",
        "list an element of {q}",
        "from a collection to an item in it, for {qs}",
        "which things make up {q}? give one",
        "given a group, get one of the things it contains, for {qs}",
        "member lookup for {q}",
        "name something that is part of the group {q}",
        "from {q}, retrieve a member meronym",
    ],
    "group": [
        "given {q}, find the group or collection it belongs to",
        "find the family, genus or group of {q}",
        "which group is {q} a member of?",
        "map {q} to the collection it is part of",
        "member to group: from {q} to its group",
        "what family or genus does {q} belong to?",
        "from {q}, retrieve its member holonym",
        "given a member, get the set it belongs to, for {qs}",
        "classify {q} into the group that contains it",
        "group lookup for {q}",
        "find the taxonomic group or organisation of {q}",
        "name the collection that includes {q}",
    ],
    "antonym": [
        "given {q}, find the word with the opposite meaning",
        "find the antonym of {q}",
        "what is the opposite of {q}?",
        "map {q} to its opposite",
        "return the contrary of {q}",
        "opposites: from {q} to the word that means the reverse",
        "flip the meaning of {q}",
        "from a word to its antonym, for {qs}",
        "which word means the reverse of {q}?",
        "antonym lookup for {q}",
        "get the contrasting word for {q}",
        "give the opposite term of {q}",
    ],
    "topic": [
        "given {q}, find the subject area or field it belongs to",
        "find the field of study of {q}",
        "which discipline is {q} a term of?",
        "map {q} to its topic or domain of knowledge",
        "term to field: from {q} to the subject it is used in",
        "what subject is {q} from?",
        "classify {q} by its area of expertise",
        "from a technical term to its field, for {qs}",
        "topic lookup for {q}",
        "name the science or subject that {q} belongs to",
        "which field uses the term {q}?",
        "get the domain category of {q}",
    ],
    "region": [
        "given {q}, find the country or region it is associated with",
        "find the place {q} comes from or is used in",
        "which region is {q} associated with?",
        "map {q} to its geographic region",
        "term to country: from {q} to where it is used",
        "what country is {q} linked to?",
        "from a word to its region of usage, for {qs}",
        "region lookup for {q}",
        "name the place tied to {q}",
        "get the country or area connected to {q}",
        "where is {q} from?",
        "classify {q} by geographic region",
    ],
}

# relation -> (what a query is, what a target is), for terse wordings ("animal -> its category")
TERSE = {
    "definition": ("word", "definition"),
    "term": ("definition", "word"),
    "hypernym": ("word", "broader category"),
    "hyponym": ("category", "specific kind"),
    "instance_of": ("proper name", "what it is"),
    "part": ("whole", "part"),
    "whole": ("part", "whole"),
    "member": ("group", "member"),
    "group": ("member", "its group"),
    "antonym": ("word", "opposite"),
    "topic": ("term", "subject field"),
    "region": ("term", "country or region"),
}

# lexicographer file -> everyday names: (singular noun phrases, a plural topic phrase)
EVERYDAY = {
    "noun.Tops": (["a general concept", "an abstract idea"], "general concepts"),
    "noun.act": (["an activity", "an action", "something people do"], "activities and actions"),
    "noun.animal": (["an animal", "a creature", "a kind of animal"], "animals"),
    "noun.artifact": (["a man-made object", "a tool or device", "an object"], "objects, tools and devices"),
    "noun.attribute": (["a quality", "a property", "a trait"], "qualities and properties"),
    "noun.body": (["a body part", "a part of the body", "an organ"], "the human body"),
    "noun.cognition": (["an idea", "a concept", "a field of knowledge"], "ideas and knowledge"),
    "noun.communication": (["a message", "a kind of text or speech", "a form of communication"], "communication"),
    "noun.event": (["an event", "a happening", "an occurrence"], "events"),
    "noun.feeling": (["a feeling", "an emotion", "a mood"], "feelings and emotions"),
    "noun.food": (["a food", "a dish", "something to eat or drink"], "food and drink"),
    "noun.group": (["a group", "an organisation", "a collection"], "groups and organisations"),
    "noun.location": (["a place", "a location", "a city or region"], "places"),
    "noun.motive": (["a motive", "a reason", "a goal"], "motives"),
    "noun.object": (["a natural object", "a landform", "a thing in nature"], "natural objects"),
    "noun.person": (["a person", "a kind of person", "a role or occupation"], "people and roles"),
    "noun.phenomenon": (["a natural phenomenon", "a physical effect", "a weather or physics phenomenon"], "phenomena"),
    "noun.plant": (["a plant", "a tree or flower", "a kind of plant"], "plants"),
    "noun.possession": (["money or property", "a possession", "a financial term"], "money and property"),
    "noun.process": (["a process", "a natural process", "a biological or chemical process"], "processes"),
    "noun.quantity": (["a unit of measure", "a quantity", "an amount"], "units and quantities"),
    "noun.relation": (["a relation", "a relationship between things"], "relations"),
    "noun.shape": (["a shape", "a geometric form", "a figure"], "shapes"),
    "noun.state": (["a state or condition", "a condition", "a situation"], "states and conditions"),
    "noun.substance": (["a substance", "a material", "a chemical"], "substances and materials"),
    "noun.time": (["a time period", "a point in time", "a unit of time"], "time"),
    "verb.body": (["a verb about the body", "a grooming or bodily action verb"], "body verbs"),
    "verb.change": (["a verb of change", "a verb meaning to change something"], "verbs of change"),
    "verb.cognition": (["a verb of thinking", "a mental verb"], "thinking verbs"),
    "verb.communication": (["a verb of speaking", "a communication verb"], "speaking verbs"),
    "verb.competition": (["a verb of fighting or competing", "a sports or battle verb"], "competition verbs"),
    "verb.consumption": (["a verb of eating or using up", "a consumption verb"], "consumption verbs"),
    "verb.contact": (["a verb of touching or hitting", "a contact verb"], "contact verbs"),
    "verb.creation": (["a verb of making", "a creation verb"], "verbs of making"),
    "verb.emotion": (["a verb of feeling", "an emotion verb"], "emotion verbs"),
    "verb.motion": (["a verb of movement", "a motion verb"], "movement verbs"),
    "verb.perception": (["a verb of seeing or hearing", "a perception verb"], "perception verbs"),
    "verb.possession": (["a verb of owning or giving", "a verb of buying and selling"], "possession verbs"),
    "verb.social": (["a verb of social activity", "a social verb"], "social verbs"),
    "verb.stative": (["a verb of being or having", "a stative verb"], "stative verbs"),
    "verb.weather": (["a weather verb"], "weather verbs"),
    "adj.all": (["an adjective", "a describing word"], "adjectives"),
    "adj.pert": (["a relational adjective", "an adjective derived from a noun"], "relational adjectives"),
    "adj.ppl": (["a participle adjective"], "participle adjectives"),
    "adv.all": (["an adverb", "a word that modifies a verb"], "adverbs"),
}

APPS = [
    "flashcards app",
    "vocabulary trainer",
    "trivia bot",
    "crossword helper",
    "search box",
    "kids' learning game",
    "writing assistant",
    "quiz generator",
    "museum guide",
    "study tool",
    "chatbot",
    "e-reader",
    "language-learning app",
    "knowledge graph tool",
    "word game",
]

# framings; those marked True need a wording that starts with a verb ("find ...", "map ...")
FRAMES = [
    ("For my {app}: {body}.", False),
    ("{App} feature: {body}.", False),
    ("I'm building a {app} and need this: {body}.", False),
    ("We need a model for our {app} that can {body}.", True),
    ("{Body} (for a {app}).", False),
    ("In a {app}, {body}.", True),
]

PLAIN = [
    ("{Body}.", False),
    ("Task: {body}.", False),
    ("{Body}, please.", True),
    ("I want to {body}.", True),
    ("A model that can {body}.", True),
    ("Retrieval task: {body}.", False),
]

VERBS = {
    "find", "look", "map", "retrieve", "explain", "guess", "name", "generalise", "categorise",
    "specialise", "list", "narrow", "classify", "tell", "identify", "break", "flip", "return", "get",
    "give", "glossary",
}  # fmt: skip

VERBOSE = [
    " The input is a single item and the output should be the matching entry from a list.",
    " Queries are short; the right answer is one of many candidates to rank.",
    " It should rank the correct answer above the others.",
    " Accuracy on the top result matters most.",
    " Think of it as a lookup over a word list.",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _framed(rng: random.Random, body: str, verb: bool, app_frame: bool) -> str:
    """`body` in a seeded app framing (`app_frame`) or plain framing; frames that need a clause
    starting with a verb only when `verb`."""
    frames = [f for f, needs_verb in (FRAMES if app_frame else PLAIN) if verb or not needs_verb]
    app = rng.choice(APPS)
    return rng.choice(frames).format(app=app, App=_cap(app), body=body, Body=_cap(body))


def _examples(task: Task, rng: random.Random) -> list[str]:
    """2-4 domain-side items from the train split: the query word, or for `term` (whose query is
    a definition) the word defined."""
    items = sorted({(t if task.relation == "term" else q) for q, t, _ in task.train})
    items = [x for x in items if len(x) <= 40]
    return rng.sample(items, min(len(items), rng.randint(2, 4)))


def _domain(task: Task, rng: random.Random) -> tuple[str, str]:
    """(`q`, `qs`): what one query item is, and the plural topic phrase."""
    singular, plural = EVERYDAY.get(task.domain, ([DOMAIN_PHRASE[task.domain]], DOMAIN_PHRASE[task.domain]))
    kind = rng.randrange(4)
    if kind == 0:
        q = DOMAIN_PHRASE[task.domain]
    elif kind == 1:
        q = rng.choice(singular)
    else:
        ex = _examples(task, rng)
        head = rng.choice(singular)
        q = f"{head} such as {', '.join(ex[:-1])} or {ex[-1]}" if len(ex) > 1 else head
        if kind == 3:
            q = f"{head} (e.g. {', '.join(ex)})"
    return q, plural


def description_set(task: Task, n: int, seed: int = 20261201) -> list[str]:
    """`n` distinct descriptions of `task`: the templated one first, then seeded draws."""
    if task.relation not in RELATION_BANK:
        raise KeyError(f"no phrase bank for relation {task.relation!r} (pipeline/descriptions.py)")
    rng = random.Random(f"{seed}/{task.name}")
    out = [task.description]
    seen = set(out)
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        q, qs = _domain(task, rng)
        style = rng.randrange(10)
        if style == 0:
            a, b = TERSE[task.relation]
            dom = rng.choice([qs, q, DOMAIN_PHRASE[task.domain]])
            text = rng.choice([f"{a} -> {b}, {dom}", f"{dom}: {a} to {b}", f"{a} to {b} ({dom})"])
        else:
            body = rng.choice(RELATION_BANK[task.relation]).format(q=q, qs=qs)
            verb = body.split()[0] in VERBS and "?" not in body
            text = _framed(rng, body, verb, style <= 3)
            if style >= 8:
                text += rng.choice(VERBOSE)
        text = text.replace("?.", "?").replace("?,", "?")
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _body(text: str) -> str:
    """A description as a clause to frame: no final full stop, lower-case start (unless an acronym)."""
    t = text.strip().rstrip(".")
    return t if t[:2].isupper() else t[:1].lower() + t[1:]


def extend(name: str, given: list[str], n: int, seed: int = 20261203) -> list[str]:
    """`n` distinct wordings of a task from its own descriptions (a library's `task.json`,
    models/TASKS.md): the given ones first, in order; when there are fewer than `n`, each further
    one is a given description in a seeded app framing, plain framing or verbose tail (the
    phrase banks' generic parts, so a library with one description per task still gets a set)."""
    out = list(dict.fromkeys(x.strip() for x in given if x.strip()))[:n]
    if len(out) >= n:
        return out
    rng = random.Random(f"{seed}/{name}")
    bodies = [_body(x) for x in out]
    seen, tries = set(out), 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        body = rng.choice(bodies)
        verb = body.split()[0].lower() in VERBS | {"translate", "convert", "turn", "match", "rank", "pick"}
        style = rng.randrange(10)
        text = _framed(rng, body, verb, style <= 4)
        if style >= 8:
            text += rng.choice(VERBOSE)
        text = text.replace("?.", "?").replace("?,", "?")
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# Wordings for the relation head only (`pipeline.relation`): how people say the relation and
# its direction in their own register, each with `{q}` (what a query item is) and optionally an
# example pair `{a}` -> `{b}` from the task's train split. They never become retrieval keys.
HEAD_BANK = {
    "definition": [
        "I type {q} and want back a short explanation of what it means",
        "look up the meaning of {q}, e.g. '{a}' should give '{b}'",
        "a glossary: the word goes in, its definition comes out, for {q}",
        "what does this word mean? the words are {q}",
        "{q} -> what it means",
        "help me explain {q} in a sentence, like a dictionary would",
    ],
    "term": [
        "I describe {q} in a sentence and want the word itself back",
        "guess the word from a description, e.g. '{a}' should give '{b}'",
        "what's the word for this? the answers are {q}",
        "description of {q} -> the word",
        "a clue or explanation goes in and the name of {q} comes out",
        "tip-of-the-tongue helper: from what I mean to the word for it, for {q}",
    ],
    "hypernym": [
        "I type {q} and want the more general kind of thing it is",
        "roll {q} up to the broader category, e.g. '{a}' should give '{b}'",
        "what is {q} a type of?",
        "{q} -> the general class it falls under",
        "go up one level from a specific word to its category, for {q}",
        "sort {q} into the bigger group of things they are examples of",
    ],
    "hyponym": [
        "I type a general word for {q} and want a more specific kind of it",
        "drill down from a category to one of its kinds, e.g. '{a}' should give '{b}'",
        "what are some specific types of {q}?",
        "general term for {q} -> a specific example type",
        "go down one level from a broad word to a narrower one, for {q}",
        "given a broad class of {q}, suggest a particular sort of it",
    ],
    "instance_of": [
        "I type the name of a particular one of {q} and want to know what kind of thing it is",
        "tell me what a named thing is, e.g. '{a}' should give '{b}'",
        "who or what was this? the names are of {q}",
        "proper name -> what kind of thing it is ({q})",
        "from a specific named individual to its general type, for {q}",
        "classify famous names of {q} by what they are",
    ],
    "part": [
        "I type {q} and want one of the pieces it is made of",
        "break something down into its parts, e.g. '{a}' should give '{b}'",
        "what parts does this have? the wholes are {q}",
        "whole ({q}) -> one of its components",
        "go from the bigger thing to a smaller piece inside it, for {q}",
        "list what {q} contains or is built from",
    ],
    "whole": [
        "I type one piece of {q} and want the bigger thing it belongs to",
        "from a part to what it is part of, e.g. '{a}' should give '{b}'",
        "what larger thing is this a piece of? the parts are {q}",
        "part ({q}) -> the whole that contains it",
        "go from the small piece up to the thing that includes it, for {q}",
        "where does this component go? find the whole for {q}",
    ],
    "member": [
        "I type a group of {q} and want one member of that group",
        "from a collection to one of the things in it, e.g. '{a}' should give '{b}'",
        "who or what is in this group? the groups are of {q}",
        "group ({q}) -> one of its members",
        "go from the family, team or set down to a single member, for {q}",
        "name something that belongs to a given collection of {q}",
    ],
    "group": [
        "I type one of {q} and want the group or family it belongs to",
        "from a member to the collection it is in, e.g. '{a}' should give '{b}'",
        "which group, family or body does this belong to? the members are {q}",
        "member ({q}) -> the group it is part of",
        "go from a single member up to its family, genus or organisation, for {q}",
        "find the collection that a given one of {q} is counted in",
    ],
    "antonym": [
        "I type {q} and want the word that means the opposite",
        "flip a word to its opposite, e.g. '{a}' should give '{b}'",
        "what's the opposite of this? the words are {q}",
        "{q} -> its opposite",
        "find the reverse-meaning word for {q}",
        "pair each of {q} with its contrary",
    ],
    "topic": [
        "I type {q} and want the subject or field it belongs to",
        "tag a term with its field, e.g. '{a}' should give '{b}'",
        "which area of knowledge is this from? the terms are {q}",
        "{q} -> the discipline it is used in",
        "file {q} under the subject they belong to",
        "what field would you look up to learn about {q}?",
    ],
    "region": [
        "I type {q} and want the country or region it is tied to",
        "link a term to its place, e.g. '{a}' should give '{b}'",
        "where in the world is this from? the terms are {q}",
        "{q} -> the country or area it belongs to",
        "find the geographic region associated with {q}",
        "tag {q} with the nation or region where it is found or used",
    ],
}


def head_set(task: Task, n: int, seed: int = 20261203) -> list[str]:
    """`n` distinct wordings of `task` from `HEAD_BANK` (the relation head's extra training
    wordings), with the domain said as in the description sets and example pairs from the
    task's train split, in seeded framings."""
    bank = HEAD_BANK.get(task.relation)
    if not bank:
        return []
    rng = random.Random(f"{seed}/{task.name}/head")
    pairs = [(q, t) for q, t, _ in task.train if len(q) <= 60 and len(t) <= 60]
    out, seen, tries = [], set(), 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        q, _ = _domain(task, rng)
        a, b = rng.choice(pairs) if pairs else ("", "")
        tpl = rng.choice(bank)
        if "{a}" in tpl and not pairs:
            continue
        body = tpl.format(q=q, a=a, b=b)
        style = rng.randrange(6)
        text = _framed(rng, body, False, style <= 2) if style <= 3 else _cap(body) + rng.choice([".", "", "?"])
        text = text.replace("?.", "?").replace("?,", "?").replace("??", "?")
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
