"""The `eval` stage's second half: descriptions in users' own words, the guard, the expected gain.

For every unseen task and three kinds of wording -- its templated description, bank paraphrases
from its description set (`keys` stage) and the hand-written user-wording set
(`models/eval/user_wording.json`, never used to build or choose anything) -- the request is
scored against the bundle's keys as the device does: accepted by the guard or not, top expert of
the task's relation or not, expected gain, and the measured R@1 gain (points, test split) of the
top-1 expert, the top-K merge x gain and SG-LoRA (z = prior mean) adapters it would get. The same
for format 1's retrieval (the templated description as the only key, at v3's shipped threshold)
for comparison, for the held-out off-topic descriptions, and for requests of relations the
repository has no expert for. `quality_vs_coverage` plots each unseen task's gain and share of
the oracle gain against its best-expert score.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from .prior import generate, norm_stats, retrieve
from .retrieval import features, predict, user_wording
from .scope import accepts, expert_wording, guard_section
from .tasks import RELATIONS, describe
from .work import Work, jdump, jload

# what the v3 bundle (format 1: one key per expert, its templated description) shipped
V3_THRESHOLD = 0.518
BANK_PER_TASK = 3
STYLES = ["app framing", "question", "with examples", "terse", "long", "everyday words", "spec style"]
# relations with no expert in the suite, asked for in the suite's own template
MISSING_DOMAINS = ["noun.animal", "noun.food", "adj.all", "verb.motion", "noun.artifact"]


def evaluate_wording(w: Work, model) -> dict:
    """Every record above, cached in `wording_cache.json` per description."""
    from .lora import evaluate

    path = w.p("wording_cache.json")
    cache = jload(path) if os.path.exists(path) else {}
    keys, keys_only = w.keys(), w.keys(relation=False)
    old_keys = np.load(w.p("desc_emb.npy"))
    pr = jload(w.p("prior.json"))["best"]
    k, tau, gain = pr["k"], pr["tau"], float(pr.get("gain", 1.0))
    guard = jload(w.p("guard.json"))
    ood, gm = w.ood(), guard["expected_gain"]
    experts = w.suite["experts"]
    rel = [t.relation for t in experts]
    _, mu, var = w.expert_arrays()
    nm, ns = norm_stats(mu)
    zs = jload(w.p("zeroshot.json"))
    request = w.requester()
    uw = user_wording(w)
    sets = jload(w.p("desc_sets.json"))["unseen"]

    def record(text, relation=None):
        q = request(text)
        idx, sims, wts = retrieve(q, keys, k, tau)
        est, lo, hi = predict(gm, features(idx, sims, wts, rel))
        old = old_keys @ q.emb
        plain = int(np.argmax(keys_only.scores(q.emb)))  # the same keys without the relation head
        ok, scope_score = accepts(ood, q.emb, float(sims[0]))
        return (
            q,
            idx,
            {
                "text": text,
                "best": float(sims[0]),
                "accepted": ok,
                "scope": scope_score,
                "top_expert": experts[int(idx[0])].name,
                "relation_ok": None if relation is None else rel[int(idx[0])] == relation,
                "keys_only_relation_ok": None if relation is None else rel[plain] == relation,
                "expected": [est, lo, hi],
                "v1_best": float(old.max()),
                "v1_accepted": bool(old.max() >= V3_THRESHOLD),
                "v1_relation_ok": None if relation is None else rel[int(np.argmax(old))] == relation,
            },
        )

    top1_cache = {}
    for t in tqdm(w.suite["unseen"], desc="eval wording"):
        kinds = {"templated": [t.description], "bank": sets[t.name][1 : 1 + BANK_PER_TASK]}
        if t.name in uw["unseen"]:
            kinds["user"] = uw["unseen"][t.name]
        z = zs[t.name]["test"]["r1"]
        for kind, texts in kinds.items():
            for si, text in enumerate(texts):
                key = f"{t.name}|{kind}|{si}"
                if key in cache:
                    continue
                q, idx, r = record(text, t.relation)
                j = int(idx[0])
                if (t.name, j) not in top1_cache:
                    top1_cache[(t.name, j)] = evaluate(w.lora, t.test, mu[j])["r1"]
                gen, mstar, _, _ = generate(model, q, keys, mu, var, k, tau, nm, ns)
                r.update(
                    task=t.name,
                    kind=kind,
                    style=STYLES[si] if kind == "user" and w.wordnet and si < len(STYLES) else None,
                    gain_top1=100 * (top1_cache[(t.name, j)] - z),
                    gain_merge=100 * (evaluate(w.lora, t.test, gain * mstar)["r1"] - z),
                    gain_sglora=100 * (evaluate(w.lora, t.test, gen)["r1"] - z),
                )
                cache[key] = r
                jdump(path, cache)
    off = {}
    for part in ("off_calibration", "off_test"):
        off[part] = [record(x)[2] for x in uw[part]]
    kinds_of = {x["text"]: x["kind"] for x in uw["off_kinds"]}
    for part in off.values():
        for r in part:
            r["off_kind"] = kinds_of[r["text"]]
    have = set(rel)
    lacking = [r for r in RELATIONS if r not in have] if w.wordnet else []  # WordNet's relations only
    missing = [dict(record(describe(r, d))[2], relation=r) for r in lacking for d in MISSING_DOMAINS]
    names = {t.name for t in experts}
    mine = [record(x)[2] for n, xs in expert_wording(w).items() if n in names for x in xs]
    return {"records": list(cache.values()), "off_topic": off, "missing": missing, "expert_wording": mine, "ood": ood}


def quality_vs_coverage(w: Work, cache, records) -> list[dict]:
    """Per unseen task (templated description): best-expert score (its wording record's),
    SG-LoRA's R@1 gain, the oracle's, and the share of the oracle gain, sorted by score."""
    best = {r["task"]: r["best"] for r in records if r["kind"] == "templated"}
    rows = []
    for t in w.suite["unseen"]:
        r = cache[t.name]
        g = r["sglora_mean"]["r1"] - r["zero_shot"]["r1"]
        o = r["oracle"]["r1"] - r["zero_shot"]["r1"]
        rows.append(
            {
                "task": t.name,
                "best_score": best[t.name],
                "gain": 100 * g,
                "oracle_gain": 100 * o,
                "share": g / o if o > 0.01 else None,
            }
        )
    return sorted(rows, key=lambda x: x["best_score"])


def plot(rows, path) -> None:
    """The quality-vs-coverage figure (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    x = [r["best_score"] for r in rows]
    ax[0].scatter(x, [r["gain"] for r in rows], c="tab:blue")
    ax[0].axhline(0, color="grey", lw=0.8)
    ax[0].set_xlabel("best-expert score of the task's description")
    ax[0].set_ylabel("SG-LoRA R@1 gain over zero-shot (points)")
    xs = [r["best_score"] for r in rows if r["share"] is not None]
    ax[1].scatter(xs, [r["share"] for r in rows if r["share"] is not None], c="tab:orange")
    ax[1].axhline(0, color="grey", lw=0.8)
    ax[1].set_xlabel("best-expert score of the task's description")
    ax[1].set_ylabel("share of the oracle's gain")
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle("Unseen tasks: what a closer expert buys")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def added_relations(w: Work) -> list[str]:
    """Suite v4's re-measured relations: each added expert's own-task R@1 gain (its validation
    and test splits) -- the rule is to keep a relation if its experts help at all on validation."""
    zs = jload(w.p("zeroshot.json"))
    added = sorted(w.cfg.get("added_relations", {}))
    L = [
        "",
        "## Relations re-measured in suite v4",
        "",
        "Experts of the relations dropped in v1 as flat, trained with today's recipe; a relation stays if its "
        "experts gain on their own validation split (R@1 points).",
        "",
        "| relation | expert | val gain | test gain |",
        "|---|---|---|---|",
    ]
    for t in w.suite["experts"]:
        if t.relation in added:
            info = w.load_trained("experts", t.name)[1]
            L.append(
                f"| {t.relation} | {t.name} | {100 * (info['val']['r1'] - zs[t.name]['val']['r1']):+.1f} | "
                f"{100 * (info['test']['r1'] - zs[t.name]['test']['r1']):+.1f} |"
            )
    return L


def _pct(xs) -> str:
    xs = [bool(x) for x in xs]
    return f"{100 * np.mean(xs):.0f} % ({sum(xs)}/{len(xs)})" if xs else "n/a"


def _mean_over_tasks(records, field) -> float:
    by = {}
    for r in records:
        by.setdefault(r["task"], []).append(r[field])
    return float(np.mean([np.mean(v) for v in by.values()])) if by else float("nan")


def section(w: Work, wording: dict, cache) -> tuple[list[str], dict]:
    """EVAL.md's sections on user wording, the guard, the expected gain and quality vs coverage
    (and the figure beside EVAL.md), with the numbers for eval.json."""
    recs = wording["records"]
    head = w.relation_head()
    by_kind = {k: [r for r in recs if r["kind"] == k] for k in ("templated", "bank", "user")}
    L = [
        "",
        "## Descriptions in users' own words",
        "",
        "Every unseen task requested three ways: its templated description, "
        f"{BANK_PER_TASK} paraphrases from its phrase-bank description set, and the hand-written user-wording "
        + (
            "set (`models/eval/user_wording.json`: 7 styles per task, written before any tuning, never used to build "
            "keys or choose anything). "
            if w.wordnet
            else "set (each task's `eval_descriptions` in the library, models/TASKS.md: never used to build keys "
            "or choose anything). "
        )
        + "*Accepted* = accepted by the guard (next section); "
        "*right relation* = the top expert has the task's relation. Format 1 = the previous "
        f"retrieval (the templated description as each expert's only key) at v3's threshold {V3_THRESHOLD}"
        + (
            f"; *keys only* = this bundle's keys without its relation head (γ = {head['gamma']:g}, models/README.md)."
            if head
            else "."
        ),
        "",
        "| wording | n | accepted | right relation | "
        + ("keys only: right relation | " if head else "")
        + "format 1: accepted | format 1: right relation |",
        "|---|---|---|---|" + ("---|" if head else "") + "---|---|",
    ]
    for kind, rs in by_kind.items():
        L.append(
            f"| {kind} | {len(rs)} | {_pct(r['accepted'] for r in rs)} | {_pct(r['relation_ok'] for r in rs)} | "
            + (f"{_pct(r['keys_only_relation_ok'] for r in rs)} | " if head else "")
            + f"{_pct(r['v1_accepted'] for r in rs)} | {_pct(r['v1_relation_ok'] for r in rs)} |"
        )
    if any(r["style"] for r in by_kind["user"]):
        L += ["", "By style of the user-wording set:", "", "| style | accepted | right relation |", "|---|---|---|"]
        for s in STYLES:
            rs = [r for r in by_kind["user"] if r["style"] == s]
            L.append(f"| {s} | {_pct(r['accepted'] for r in rs)} | {_pct(r['relation_ok'] for r in rs)} |")
    gains = {}
    L += [
        "",
        "R@1 gain over zero-shot (points; test split; mean over tasks of the mean over a task's descriptions; every "
        "description served, accepted or not):",
        "",
        "| method | templated | bank paraphrases | user wording | user / templated |",
        "|---|---|---|---|---|",
    ]
    for field, label in (
        ("gain_top1", "top-1 expert"),
        ("gain_merge", "top-K merge x gain"),
        ("gain_sglora", "SG-LoRA (z = prior mean)"),
    ):
        g = {k: _mean_over_tasks(rs, field) for k, rs in by_kind.items()}
        gains[field] = g
        # a ratio to a gain of less than a twentieth of a point says nothing
        ratio = g["user"] / g["templated"] if by_kind["user"] and abs(g["templated"]) >= 0.05 else float("nan")
        shown = "n/a" if np.isnan(ratio) else f"{ratio:.2f}"
        L.append(f"| {label} | {g['templated']:+.2f} | {g['bank']:+.2f} | {g['user']:+.2f} | {shown} |")
    off = wording["off_topic"]
    miss = wording["missing"]
    L += guard_section(
        wording["ood"],
        dict(by_kind, off_calibration=off["off_calibration"], off_test=off["off_test"], missing=miss)
        | {"expert_wording": wording["expert_wording"]},
    )
    # expected gain calibration: predicted vs measured SG-LoRA gain on the unseen tasks
    pred = np.array([r["expected"][0] for r in recs])
    meas = np.array([r["gain_sglora"] for r in recs])
    inside = [r["expected"][1] <= r["gain_sglora"] <= r["expected"][2] for r in recs]
    corr = float(np.corrcoef(pred, meas)[0, 1]) if len(recs) > 2 and pred.std() > 0 else float("nan")
    gm = jload(w.p("guard.json"))["expected_gain"]
    L += [
        "",
        "## Expected gain",
        "",
        f"A linear model of the R@1 gain (points) on {', '.join(gm['features'])}, fitted on {gm['fitted_on']}; "
        f"80 % interval [{gm['interval']['low']:+.2f}, {gm['interval']['high']:+.2f}] around the estimate. "
        "Calibration on the unseen tasks (every description above, measured: SG-LoRA's test R@1 gain):",
        "",
        f"- mean predicted {pred.mean():+.2f}, mean measured {meas.mean():+.2f}; Pearson r {corr:.2f}; "
        f"measured inside the 80 % interval: {_pct(inside)}",
        "",
        "| predicted tercile | n | mean predicted | mean measured |",
        "|---|---|---|---|",
    ]
    if len(recs) >= 3:
        cuts = np.percentile(pred, [100 / 3, 200 / 3])
        for lo, hi, name in ((-np.inf, cuts[0], "low"), (cuts[0], cuts[1], "mid"), (cuts[1], np.inf, "high")):
            m = (pred > lo) & (pred <= hi)
            if m.any():
                L.append(f"| {name} | {int(m.sum())} | {pred[m].mean():+.2f} | {meas[m].mean():+.2f} |")
    L += added_relations(w) if w.wordnet else []
    rows = quality_vs_coverage(w, cache, recs)
    png = "quality_vs_coverage.png"
    plot(rows, os.path.join(w.bundle, png))
    L += [
        "",
        "## Quality vs coverage",
        "",
        "Each unseen task's SG-LoRA gain and share of the oracle's gain against how close its templated "
        "description comes to an expert (best score): what a denser library buys.",
        "",
        f"![quality vs coverage]({png})",
        "",
        "| task | best score | SG-LoRA gain | oracle gain | share of oracle gain |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['share']:.2f}" if r["share"] is not None else "n/a (oracle gain <= 1 pt)"
        L.append(f"| {r['task']} | {r['best_score']:.3f} | {r['gain']:+.1f} | {r['oracle_gain']:+.1f} | {share} |")
    if len(rows) >= 3:
        L += ["", "| best-score tercile | tasks | mean gain | mean share of oracle gain |", "|---|---|---|---|"]
        for i, part in enumerate(np.array_split(np.arange(len(rows)), 3)):
            rs = [rows[j] for j in part]
            sh = [r["share"] for r in rs if r["share"] is not None]
            L.append(
                f"| {['low', 'mid', 'high'][i]} ({rs[0]['best_score']:.2f}-{rs[-1]['best_score']:.2f}) | {len(rs)} | "
                f"{np.mean([r['gain'] for r in rs]):+.2f} | {np.mean(sh) if sh else float('nan'):.2f} |"
            )
    summary = {
        "guard": {k: v for k, v in wording["ood"].items() if k != "scope"}
        | {"scope_min_score": wording["ood"]["scope"]["min_score"]},
        "accepted": {k: float(np.mean([r["accepted"] for r in rs])) if rs else None for k, rs in by_kind.items()},
        "relation_top1": {
            k: float(np.mean([r["relation_ok"] for r in rs])) if rs else None for k, rs in by_kind.items()
        },
        "relation_top1_keys_only": {
            k: float(np.mean([r["keys_only_relation_ok"] for r in rs])) if rs else None for k, rs in by_kind.items()
        },
        "gains": gains,
        "off_topic_false_acceptance": {p: float(np.mean([r["accepted"] for r in v])) for p, v in off.items()},
        "expected_gain_calibration": {
            "mean_predicted": float(pred.mean()),
            "mean_measured": float(meas.mean()),
            "pearson": corr,
            "interval_coverage": float(np.mean(inside)),
        },
        "missing_relations_accepted": float(np.mean([m["accepted"] for m in miss])) if miss else None,
        "quality_vs_coverage": rows,
        "records": recs,
        "off_topic": off,
        "missing": miss,
    }
    return L, summary
