"""The in-scope guard: is a request a task this repository is about at all (the `scope` stage)?

Until now the guard refused a request whose best expert score fell below a threshold set on
off-topic text. People wrap a task in an app, a story or examples, and those words pull the best
score down as much as an off-topic request's: with the threshold at 2 % false acceptance, 57 % of
the user-worded unseen tasks were accepted. The best score answers "how close is the nearest
expert", not "is this a word-relation task".

The scope guard answers the second question with a linear classifier on the request embedding
(the encoder's, before any projection): L2-regularised logistic regression of the expert tasks'
description sets (positives, every wording of every expert) against off-topic task descriptions
generated from the phrase bank below (negatives). Both sides get the same app framings,
requests and verbose tails, so what the classifier learns is the task, not the wrapping. Its
score is `w . e + b`; the threshold is the guard's rule (`retrieval.threshold_for`: at most 2 %
false acceptance) on the calibration half of the hand-written off-topic set, and the
regularisation is chosen by the share of the hand-written expert-task wordings
(`models/eval/expert_wording.json`, leave-out of nothing: the classifier does not retrieve) it
then accepts. Neither hand-written set is ever a training example; the user-wording test set of
the unseen tasks is not used at all.

No language model is involved: the off-topic bank is the whole source of negatives.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np

from .descriptions import _cap
from .retrieval import threshold_for, user_wording
from .work import MODELS, Work, jdump, jload, log

EXPERT_WORDING = os.path.join(MODELS, "eval", "expert_wording.json")
LAMBDAS = (0.3, 1.0, 3.0, 10.0)
N_OFF_TOPIC = 3000

# kind -> task bodies (a verb phrase); `{slot}`s are filled from FILL
OFF_TASKS = {
    "vision": [
        "detect {obj} in photos",
        "classify images of {obj}",
        "segment {obj} in camera frames",
        "count the {obj} in a picture",
        "read the text on {doc} from a photo",
        "caption pictures of {obj}",
        "find similar images of {obj}",
        "estimate the depth of a scene from one image",
        "recognise faces in {place} videos",
        "spot defects on {obj} in factory images",
    ],
    "audio": [
        "transcribe {audio} into text",
        "identify the speaker in {audio}",
        "detect the language spoken in {audio}",
        "classify environmental sounds such as sirens and barking",
        "recognise a wake word on the microphone",
        "separate the voice from the music in {audio}",
        "detect the emotion in a caller's voice",
        "tag songs by genre from the audio",
        "turn text into natural-sounding speech",
    ],
    "translation": [
        "translate {doc} from {lang} into {lang2}",
        "translate short messages between {lang} and {lang2}",
        "localise app strings into {lang2}",
        "detect which language {doc} are written in",
        "transliterate names from {lang} script to Latin letters",
    ],
    "finance": [
        "predict tomorrow's {asset} price",
        "flag fraudulent card transactions",
        "score loan applicants for credit risk",
        "categorise bank transactions into budget categories",
        "forecast monthly sales from past {data}",
        "extract totals and dates from {doc}",
        "detect unusual trades in {data}",
    ],
    "code": [
        "complete {plang} code as I type",
        "find bugs in {plang} functions",
        "explain what a {plang} snippet does",
        "search a code base for the function that does something",
        "write unit tests for {plang} code",
        "convert questions in English into SQL queries",
        "classify commit messages by type of change",
    ],
    "chit-chat": [
        "chat with users about {topic}",
        "answer small talk in a friendly way",
        "keep a conversation going about {topic}",
        "tell jokes on request",
        "reply to greetings and goodbyes",
        "be a companion that asks how my day was",
    ],
    "nlp": [
        "classify the sentiment of {doc}",
        "summarise {doc}",
        "extract people and company names from {doc}",
        "answer questions about {doc}",
        "detect spam in {doc}",
        "correct spelling and grammar in {doc}",
        "rank {doc} by relevance to a search query",
        "detect toxic comments in {doc}",
        "split {doc} into sentences and tag parts of speech",
        "find duplicate questions in {doc}",
        "generate a title for {doc}",
        "classify {doc} by topic",
    ],
    "other": [
        "recommend {item} a user will like",
        "forecast the weather for tomorrow",
        "predict when a machine will fail from {data}",
        "plan a delivery route through several stops",
        "control a robot arm to pick up {obj}",
        "play chess against the user",
        "diagnose diseases from {data}",
        "estimate house prices from their features",
        "match job seekers to job offers",
        "schedule meetings for a team",
        "detect anomalies in {data}",
        "predict customer churn from {data}",
    ],
}
FILL = {
    "obj": ["cars", "cats and dogs", "plants", "traffic signs", "products on shelves", "pedestrians", "bottles"]
    + ["birds", "tumours", "fruit"],
    "doc": ["news articles", "product reviews", "emails", "tweets", "support tickets", "receipts"]
    + ["legal contracts", "medical notes", "forum posts", "invoices"],
    "audio": ["voice notes", "phone calls", "podcasts", "meeting recordings", "radio news"],
    "place": ["security camera", "doorbell", "street", "shop"],
    "lang": ["English", "German", "Spanish", "Japanese", "Arabic", "Hindi"],
    "lang2": ["French", "Chinese", "Portuguese", "Russian", "Italian", "Korean"],
    "asset": ["stock", "bitcoin", "gold", "currency exchange"],
    "data": ["sensor readings", "sales records", "server logs", "lab results", "click data", "usage history"],
    "plang": ["Python", "Rust", "JavaScript", "Java", "C++", "Go"],
    "topic": ["movies", "sports", "the weather", "travel", "cooking", "music"],
    "item": ["movies", "songs", "products", "recipes", "books", "restaurants"],
}
APPS = ["photo app", "smart speaker", "banking app", "IDE plugin", "support desk", "home assistant"]
APPS += ["shop website", "news reader", "fitness tracker", "car dashboard", "chatbot", "game", "camera"]
APPS += ["email client", "factory line"]
FRAMES = [
    "For my {app}: {body}.",
    "{App} feature: {body}.",
    "I'm building a {app} and need to {body}.",
    "We need a model for our {app} that can {body}.",
    "{Body} (for a {app}).",
    "{Body}.",
    "Task: {body}.",
    "I want to {body}.",
    "A model that can {body}.",
    "Can the model {body}?",
    "Is it possible to {body}?",
    "{Body}, please.",
    "Help me {body}.",
]
VERBOSE = [
    " The input is a short text and the output a label.",
    " It has to run on a small device.",
    " Accuracy matters most.",
    " Latency should be low.",
    "",
]


def off_topic_set(n: int, seed: int = 20261202, in_scope=()) -> list[tuple[str, str]]:
    """`n` distinct (kind, description) pairs of tasks the repository is not about, the kinds in
    turn (but those `in_scope`: a library's `in_scope_kinds`), drawn with a fixed seed."""
    rng = random.Random(seed)
    out, seen = [], set()
    kinds = sorted(k for k in OFF_TASKS if k not in in_scope)
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        body = rng.choice(OFF_TASKS[kind])
        for k, v in FILL.items():
            while "{" + k + "}" in body:
                body = body.replace("{" + k + "}", rng.choice(v), 1)
        app = rng.choice(APPS)
        t = rng.choice(FRAMES).format(app=app, App=_cap(app), body=body, Body=_cap(body)) + rng.choice(VERBOSE)
        if t not in seen:
            seen.add(t)
            out.append((kind, t))
    return out


def expert_wording(w: Work | None = None) -> dict[str, list[str]]:
    """Hand-written descriptions of expert tasks in users' styles (task name -> texts): the
    in-scope side of the guard's choice, never a training example (for a library in the task
    format: its expert tasks' `eval_descriptions`)."""
    if w is not None and not w.wordnet:
        return {t.name: t.eval_descriptions for t in w.suite["experts"] if t.eval_descriptions}
    return jload(EXPERT_WORDING)


def logistic(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method in float64 (the bias unpenalised),
    the classes weighted to equal total weight: (weights, bias)."""
    x = np.hstack([np.asarray(x, np.float64), np.ones((len(x), 1))])
    y = np.asarray(y, np.float64)
    sw = np.where(y > 0, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1)) * len(y)
    reg = lam * np.eye(x.shape[1])
    reg[-1, -1] = 0
    w = np.zeros(x.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-(x @ w)))
        g = x.T @ (sw * (p - y)) + reg @ w
        h = (x * (sw * p * (1 - p))[:, None]).T @ x + reg
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[:-1], float(w[-1])


def score(e, weights, bias) -> float:
    """The scope score of one embedding, as the device computes it (f64 accumulation in element
    order, BUNDLE.md)."""
    acc = 0.0
    for a, b in zip(np.asarray(e, np.float32).tolist(), np.asarray(weights, np.float64).tolist()):
        acc += a * b
    return acc + bias


def scope_stage(w: Work):
    """Fit the scope classifier, choose its regularisation and threshold (`scope.json`); in full
    mode also refresh the shipped bundle's guard when its keys are this work folder's
    (`patch_bundle`)."""
    path = w.p("scope.json")
    if not os.path.exists(path):
        jdump(path, fit(w))
    patch_bundle(w)


def fit(w: Work) -> dict:
    E = w.embedder()
    embs = np.load(w.p("desc_sets.npz"))
    pos = embs["experts"].reshape(-1, embs["experts"].shape[-1])
    off = off_topic_set(N_OFF_TOPIC if not w.tiny else 400, in_scope=w.suite["in_scope_kinds"])
    neg = np.stack([E(t) for _, t in off])
    uw = user_wording(w)
    cal = np.stack([E(x) for x in uw["off_calibration"]])
    names = {t.name for t in w.suite["experts"]}
    dev_texts = [x for name, xs in expert_wording(w).items() if name in names for x in xs]
    # without hand-written wordings of these experts (the tiny suite), the held-out bank paraphrases
    n_keys = w.cfg["desc_keys"]
    dev = (
        np.stack([E(x) for x in dev_texts])
        if dev_texts
        else embs["experts"][:, n_keys:].reshape(-1, embs["experts"].shape[-1])
    )
    x = np.vstack([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    table, fits = {}, {}
    for lam in LAMBDAS:
        wt, b = logistic(x, y, lam)
        thr = threshold_for([score(q, wt, b) for q in cal])
        acc = float(np.mean([score(q, wt, b) >= thr for q in dev]))
        table[f"{lam:g}"] = {"threshold": thr, "in_scope_accepted": acc}
        fits[f"{lam:g}"] = (wt, b, thr)
        log(f"scope: lambda {lam:g}: threshold {thr:.3f}, hand-written expert wordings accepted {acc:.2f}")
    order = list(table)
    chosen = max(order, key=lambda k: (table[k]["in_scope_accepted"], -order.index(k)))
    wt, b, thr = fits[chosen]
    return {
        "kind": "linear",
        "weights": [float(v) for v in wt],
        "bias": b,
        "min_score": thr,
        "lambda": float(chosen),
        "table": table,
        "keys_sha256": hashlib.sha256(np.ascontiguousarray(w.keys().keys).tobytes()).hexdigest(),
        "fitted_on": f"logistic regression (L2, lambda chosen from {', '.join(f'{v:g}' for v in LAMBDAS)}) of the "
        f"{len(pos)} description-set wordings of the {len(w.suite['experts'])} expert tasks against {len(neg)} "
        "off-topic task descriptions from pipeline/scope.py's phrase bank, classes weighted equally",
        "rule": "lowest score with false acceptance <= 2% on the calibration half of the hand-written off-topic set; "
        "lambda by the share of the hand-written expert-task wordings (models/eval/expert_wording.json"
        + (")" if dev_texts else "; none for this suite, so the held-out bank paraphrases)")
        + " it then accepts",
        "n_in_scope_choice": len(dev),
        "n_off_topic_calibration": len(cal),
    }


def ood_block(best_score_guard: dict, scope: dict) -> dict:
    """The manifest's `ood`: the scope classifier decides; the best-score threshold it replaces is
    kept for the record, and `min_similarity` becomes 0 (a caller may still raise it)."""
    keep = {k: scope[k] for k in ("kind", "weights", "bias", "min_score", "fitted_on", "rule")}
    return {
        "min_similarity": 0.0,
        "scope": keep,
        "replaced": {"min_similarity": best_score_guard.get("min_similarity"), "rule": best_score_guard.get("rule")},
    }


def patch_bundle(w: Work) -> None:
    """Full mode: put the scope guard into the shipped bundle's manifest if the bundle's retrieval
    keys are the ones this work folder computed (so a guard is never paired with keys it was not
    fitted for), then re-hash the manifest."""
    from .export import refresh_manifest

    mpath = os.path.join(w.bundle, "manifest.json")
    if w.tiny or not os.path.exists(mpath):
        return
    scope = jload(w.p("scope.json"))
    with open(mpath) as f:
        man = json.load(f)
    from safetensors.numpy import load_file

    bundle_keys = load_file(os.path.join(w.bundle, man["experts"]["file"]))["keys"]
    if hashlib.sha256(np.ascontiguousarray(bundle_keys).tobytes()).hexdigest() != scope["keys_sha256"]:
        log("scope: the shipped bundle's keys differ from this work folder's; its guard is left as it is")
        return
    old = man["ood"].get("replaced") if "scope" in man["ood"] else man["ood"]
    block = ood_block(old, scope)
    if man["ood"] == block:
        return
    man["ood"] = block
    with open(mpath, "w") as f:
        json.dump(man, f, indent=2)
        f.write("\n")
    g = guard_records(w, block)
    jdump(w.p("scope_eval.json"), g)
    patch_eval(os.path.join(w.bundle, "EVAL.md"), guard_section(block, g))
    refresh_manifest(w.bundle)
    patch_fixtures(w)
    log(f"scope: guard of {w.bundle} replaced (threshold {scope['min_score']:.3f})")


def accepts(ood: dict, e, best: float) -> tuple[bool, float | None]:
    """The device's guard decision for embedding `e` with best expert score `best`: (accepted,
    scope score or None without a scope classifier)."""
    sc = ood.get("scope")
    s = score(e, sc["weights"], sc["bias"]) if sc else None
    return bool(best >= ood["min_similarity"] and (s is None or s >= sc["min_score"])), s


def guard_records(w: Work, ood: dict) -> dict:
    """What the guard does on every held-out set, without serving anything: the unseen tasks'
    templated descriptions, bank paraphrases and hand-written user wording (with its style), both
    halves of the hand-written off-topic set, the hand-written expert-task wordings and requests
    for relations the repository lacks."""
    from .prior import scores
    from .tasks import RELATIONS, describe
    from .wording import BANK_PER_TASK, MISSING_DOMAINS, STYLES

    request = w.requester()
    keys = w.keys()
    uw = user_wording(w)
    sets = jload(w.p("desc_sets.json"))["unseen"]

    def rec(text, **kw):
        q = request(text)
        ok, s = accepts(ood, q.emb, float(scores(q, keys).max()))
        return dict(kw, accepted=ok, scope=s)

    out = {"templated": [], "bank": [], "user": []}
    for t in w.suite["unseen"]:
        out["templated"].append(rec(t.description))
        out["bank"] += [rec(x) for x in sets[t.name][1 : 1 + BANK_PER_TASK]]
        out["user"] += [
            rec(x, style=STYLES[i] if w.wordnet and i < len(STYLES) else None)
            for i, x in enumerate(uw["unseen"].get(t.name, []))
        ]
    kinds = {x["text"]: x["kind"] for x in uw["off_kinds"]}
    for part in ("off_calibration", "off_test"):
        out[part] = [rec(x, off_kind=kinds[x]) for x in uw[part]]
    names = {t.name for t in w.suite["experts"]}
    out["expert_wording"] = [rec(x) for n, xs in expert_wording(w).items() if n in names for x in xs]
    have = {t.relation for t in w.suite["experts"]}
    missing = [r for r in RELATIONS if r not in have] if w.wordnet else []  # WordNet's relations only
    out["missing"] = [rec(describe(r, d), relation=r) for r in missing for d in MISSING_DOMAINS]
    return out


def guard_section(ood: dict, g: dict) -> list[str]:
    """EVAL.md's section on the guard, from `guard_records`."""
    from .wording import STYLES, _pct

    sc = ood["scope"]
    rep = ood.get("replaced") or {}
    L = [
        "",
        "## The out-of-distribution guard",
        "",
        f"The scope classifier decides: a request is accepted when `w . e + b >= {sc['min_score']:.3f}` (`e` the "
        f"description's embedding; {sc['fitted_on']}; {sc['rule']}). It replaces the best-score threshold "
        f"({rep.get('min_similarity', float('nan')):.3f}: {rep.get('rule', '-')}); `min_similarity` is now 0, "
        "so the best score no longer refuses anything unless a caller raises it.",
        "",
        "| set | n | accepted |",
        "|---|---|---|",
        f"| user wording of unseen tasks (false refusal = 1 - this) | {len(g['user'])} | "
        f"{_pct(r['accepted'] for r in g['user'])} |",
        f"| templated descriptions of unseen tasks | {len(g['templated'])} | "
        f"{_pct(r['accepted'] for r in g['templated'])} |",
        f"| bank paraphrases of unseen tasks | {len(g['bank'])} | {_pct(r['accepted'] for r in g['bank'])} |",
        f"| hand-written expert-task wordings (chose lambda) | {len(g['expert_wording'])} | "
        f"{_pct(r['accepted'] for r in g['expert_wording'])} |",
        f"| off-topic, calibration half | {len(g['off_calibration'])} | "
        f"{_pct(r['accepted'] for r in g['off_calibration'])} |",
        f"| off-topic, held-out half (false acceptance) | {len(g['off_test'])} | "
        f"{_pct(r['accepted'] for r in g['off_test'])} |",
    ]
    kinds = sorted({r["off_kind"] for r in g["off_test"]})
    L.append(
        "| held-out off-topic by kind | | "
        + ", ".join(f"{k} {_pct(r['accepted'] for r in g['off_test'] if r['off_kind'] == k)}" for k in kinds)
        + " |"
    )
    if any(r.get("style") for r in g["user"]):
        L += ["", "User wording accepted, by style:", "", "| style | accepted |", "|---|---|"]
        for s in STYLES:
            L.append(f"| {s} | {_pct(r['accepted'] for r in g['user'] if r.get('style') == s)} |")
    miss = g["missing"]
    L += (
        []
        if not miss
        else [
            "",
            f"Requests for relations the repository has no expert for ({', '.join(sorted({m['relation'] for m in miss}))}; "
            f"the suite's template over their domains): accepted {_pct(m['accepted'] for m in miss)}. The scope "
            "classifier tells word-relation tasks from other tasks, not one relation from another: such a request is "
            "in scope and is served by the nearest relations' experts.",
        ]
    )
    return L


def patch_eval(path: str, lines: list[str]) -> None:
    """Replace EVAL.md's guard section with `lines` and mark the user-wording section's accepted
    columns as the replaced guard's."""
    with open(path) as f:
        text = f.read()
    head, sep, rest = text.partition("\n## The out-of-distribution guard\n")
    if not sep:
        raise SystemExit(f"{path}: no guard section to replace")
    nxt = rest.find("\n## ")
    tail = rest[nxt:] if nxt >= 0 else "\n"
    note = "*Accepted* in the two tables of this section is the replaced best-score guard's"
    if note not in head:
        head = head.replace(
            "\n## Descriptions in users' own words\n",
            "\n## Descriptions in users' own words\n\n"
            + note
            + " (as this bundle was first built); the scope guard now shipped is measured in the next section.\n",
            1,
        )
    with open(path, "w") as f:
        f.write(head.rstrip("\n") + "\n" + "\n".join(lines) + "\n" + tail)


def patch_fixtures(w: Work) -> None:
    """After `patch_bundle`: the golden fixtures name the re-hashed bundle and record each case's
    scope score and decision (from the int8 embedding they already hold)."""
    from safetensors.numpy import load_file

    gpath = os.path.join(w.fixtures, "golden.json")
    if not os.path.exists(gpath):
        return
    man = jload(os.path.join(w.bundle, "manifest.json"))
    golden = jload(gpath)
    tensors = load_file(os.path.join(w.fixtures, "golden.safetensors"))
    for i, case in enumerate(golden["cases"]):
        ok, s = accepts(man["ood"], tensors[f"{i}.emb_int8"], case["similarities"][0])
        case["scope_score"], case["out_of_distribution"] = s, not ok
    golden["bundle_id"] = man["bundle_id"]
    jdump(gpath, golden)
