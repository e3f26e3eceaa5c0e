"""A run's work folder and what every stage shares: the recipe, paths, cached results, helpers.

`Work` is the state of one pipeline run (`python -m pipeline.run`, models/README.md): which recipe
(`FULL` or `TINY`), where the work folder, the bundle and the fixtures go, the base model with its
LoRA layout (loaded once), and readers of what earlier stages cached (the task suite, trained
adapters, the experts' moments, the CVAE). The stages (`stages`, `evaluate`, `fixtures`, `tune`)
are functions of a `Work`; the analysis modules (`pipeline.ablate_*`) get theirs from
`analysis_work`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.dirname(HERE)
REPO = os.path.dirname(MODELS)

FULL = dict(
    # suite v3: 24 unseen tasks (v2: 14; the first 14 are v2's) and up to 16 experts per relation
    # (v2: 48 experts, at most 10 per relation) -> 67 experts
    min_sources=200,
    min_targets=50,
    min_sources_after_exclusion=150,
    n_experts=80,
    n_unseen=24,
    max_experts_per_relation=16,
    max_sources=400,
    max_pairs_per_source=3,
    exclude_relations=["example", "group", "similar", "definition"],  # tasks.FLAT_RELATIONS
    # suite v4: word -> definition and member -> group re-measured with today's recipe, added
    # after v3's selection (relation: (experts, unseen tasks)); v3's 67 + 24 tasks are unchanged
    added_relations={"definition": (8, 2), "group": (2, 1)},
    rank=8,
    alpha=16,
    epochs=10,
    snapshots=4,
    lr=4e-3,
    batch=32,
    temp=0.05,
    transfer_per_task=6,
    desc_set_size=48,  # descriptions per task (descriptions.py); the first desc_keys are key candidates
    desc_keys=36,
    head_wordings=24,  # HEAD_BANK wordings per expert task the relation head also trains on (relation.py)
    gain_queries=3,  # held-out paraphrases per expert in the expected-gain fit (retrieval.guard_stage)
    multitask_epochs=2,
    cvae_epochs=600,
    cvae_lam=1.0,
    cvae_lr=3e-3,
    cvae_folds=5,
    cvae_check_every=50,
    cvae_correction_scales=(0.1, 0.25, 0.5, 1.0),
    basis_c=16,
    basis_u=16,
    zdim=8,
    sample_seeds=5,
    tune_steps=600,
    tune_eval_every=40,
    tune_lr=1e-3,
    tune_u_lr_scale=0.05,
)
TINY = dict(
    FULL,
    n_experts=6,
    n_unseen=2,
    max_sources=40,
    epochs=2,
    snapshots=2,
    transfer_per_task=2,
    desc_set_size=12,
    desc_keys=8,
    head_wordings=6,
    # one expert per relation leaves the leave-out choice of gamma nothing to compare (every gamma
    # scores 0), so the smoke run fixes it and its bundle exercises the relation term
    relation_gammas=(0.1,),
    gain_queries=1,
    multitask_epochs=1,
    cvae_epochs=150,
    max_experts_per_relation=2,
    added_relations={"definition": (1, 0)},
    cvae_folds=2,
    tune_steps=12,
    tune_eval_every=6,
)


def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


def jdump(path, obj):
    """Write JSON atomically (a temporary file renamed over `path`)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_trained(path, snaps, info: dict) -> None:
    """Write an adapter's snapshots (float32) and its info atomically: what `Work.load_trained`
    reads (the same bytes for the same content: `scale.trained_bytes`)."""
    from .scale import trained_bytes, write_atomic

    write_atomic(path, trained_bytes(snaps, info))


def jload(path):
    with open(path) as f:
        return json.load(f)


def safe(name: str) -> str:
    """A task name as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Work:
    """One run: recipe `cfg`, the work folder (`p()`), the bundle and fixtures folders, the base
    model (`lora`) and readers of the results earlier stages cached there."""

    def __init__(
        self,
        tiny: bool,
        work=None,
        bundle_out=None,
        fixtures_out=None,
        ray_address=None,
        ray_cpus=None,
        tasks_dir=None,
        unseen=None,
    ):
        self.tiny = tiny
        # the library the `suite` stage reads (models/TASKS.md; None: the WordNet suite) and the
        # unseen tasks named on the command line (None: the library's own list)
        self.tasks_dir = tasks_dir
        self.unseen = unseen
        # where the experts/oracles stages train (scale.run_jobs): a Ray cluster, or here
        self.ray_address = ray_address if ray_address is not None else os.environ.get("RAY_ADDRESS") or None
        self.ray_cpus = ray_cpus
        self.cfg = TINY if tiny else FULL
        if work is None and tasks_dir is not None:
            lib = os.path.basename(os.path.abspath(tasks_dir))
            work = os.path.join(MODELS, "work", lib + ("-tiny" if tiny else ""))
        self.work = work or os.path.join(MODELS, "work", "tiny" if tiny else "full")
        # only the full WordNet run writes the shipped bundle and the Rust fixtures
        own = tiny or tasks_dir is not None
        self.bundle = bundle_out or (os.path.join(self.work, "bundle") if own else os.path.join(MODELS, "default"))
        self.fixtures = fixtures_out or (
            os.path.join(self.work, "fixtures") if own else os.path.join(REPO, "tests", "fixtures")
        )
        os.makedirs(self.work, exist_ok=True)
        self._lora = None
        self._suite = None

    @property
    def lora(self):
        """The base model with the shared LoRA-FA layout (`lora.Lora`), loaded on first use."""
        if self._lora is None:
            from .lora import Lora

            self._lora = Lora(self.cfg["rank"], self.cfg["alpha"])
        return self._lora

    def p(self, *parts):
        """A path in the work folder."""
        return os.path.join(self.work, *parts)

    @property
    def suite(self):
        """The `suite` stage's tasks: experts, unseen tasks and each unseen task's novelty."""
        if self._suite is None:
            from .tasks import Task

            s = jload(self.p("suite.json"))
            self._suite = {
                "experts": [Task.from_json(t) for t in s["experts"]],
                "unseen": [Task.from_json({k: v for k, v in t.items() if k != "novelty"}) for t in s["unseen"]],
                "novelty": {t["name"]: t["novelty"] for t in s["unseen"]},
                # which library (a folder, or "wordnet": also a suite.json of before the task format)
                "library": s.get("library", "wordnet"),
                "name": s.get("name", "wordnet"),
                "in_scope_kinds": s.get("in_scope_kinds", []),
            }
        return self._suite

    @property
    def wordnet(self) -> bool:
        """Whether the tasks are the WordNet suite (its hand-written evaluation sets apply)."""
        return self.suite["library"] == "wordnet"

    def description_set(self, task, n: int) -> list[str]:
        """The first `n` wordings of `task` (its library's descriptions, extended by the generic
        framings of `descriptions.extend` when it has fewer; a suite.json of before the task
        format has none stored, and its WordNet phrase-bank set is made here)."""
        from .descriptions import description_set, extend

        if not task.descriptions:
            return description_set(task, n)
        return extend(task.name, task.descriptions, n)

    def train(self, task_pairs, seed, desc):
        """A LoRA-FA adapter trained on the pairs with the recipe's settings (snapshots, losses)."""
        c = self.cfg
        steps = math.ceil(len(task_pairs) / c["batch"]) * c["epochs"]
        with tqdm(total=steps, desc=desc, leave=False, mininterval=5) as bar:
            return self.lora.train(task_pairs, c["epochs"], c["lr"], c["batch"], c["temp"], c["snapshots"], seed, bar)

    def load_trained(self, folder, name):
        """A cached adapter (`experts/` or `oracles/`): its snapshots and info."""
        d = np.load(self.p(folder, safe(name) + ".npz"))
        return d["snaps"], json.loads(str(d["info"]))

    def expert_arrays(self):
        """Every expert's snapshots, and their mean mu_k and variance sigma^2_k (float32)."""
        experts = self.suite["experts"]
        snaps = [self.load_trained("experts", t.name)[0] for t in experts]
        mu = np.stack([s.mean(0) for s in snaps]).astype(np.float32)
        var = np.stack([s.var(0) for s in snaps]).astype(np.float32)
        return snaps, mu, var

    def held_out_for(self, i: int) -> list[int]:
        """The experts that may not serve expert task i when it stands in for an unseen task:
        itself and every expert sharing a source synset with it. An unseen task shares no source
        with any expert (suite rule), so its prior never comes from an expert that saw its items;
        plain leave-one-out let 1.6 experts per task (on average, suite v2) do exactly that."""
        if not hasattr(self, "_held_out"):
            srcs = [{p[2] for part in (t.train, t.val, t.test) for p in part} for t in self.suite["experts"]]
            self._held_out = [[j for j, s in enumerate(srcs) if j == i or s & srcs[i]] for i in range(len(srcs))]
        return list(self._held_out[i])

    def keys(self, relation: bool = True):
        """The `keys` stage's retrieval keys (`prior.Keys`: keys, top, projection) with, after the
        `relation` stage and unless `relation` is false, the relation head's term."""
        from .prior import Keys

        r = jload(self.p("retrieval.json"))
        proj = np.load(self.p("projection.npy")) if r.get("projection") else None
        head = self.relation_head() if relation else None
        term = None
        if head is not None:
            from .prior import RelationTerm

            term = RelationTerm.of(head["gamma"], head["relations"], [t.relation for t in self.suite["experts"]])
        return Keys(np.load(self.p("keys.npy")), int(r["top"]), proj, term)

    def relation_head(self) -> dict | None:
        """The `relation` stage's head (`relation.py`): relations, gamma, weight [R, d], bias [R];
        None when the library has none (its experts share one relation)."""
        if not hasattr(self, "_relation_head"):
            meta = jload(self.p("relation_head.json"))
            if meta.get("head") is None:
                self._relation_head = None
            else:
                npz = np.load(self.p("relation_head.npz"))
                self._relation_head = dict(meta, weight=npz["weight"], bias=npz["bias"])
        return self._relation_head

    def requester(self, head: dict | None = None):
        """`text -> prior.Request` as the device forms it: one run of the bundle's encoder, the
        pooled embedding and, with a relation head (`head`'s weight and bias, else the `relation`
        stage's), its log-probabilities from the token states."""
        from .prior import Request
        from .relation import log_probs

        E, head = self.embedder(), head or self.relation_head()

        def request(text: str) -> Request:
            if head is None:
                return Request(E(text))
            s = E.states(text)
            return Request(E.pool(s), log_probs(head["weight"], head["bias"], s))

        request.ids = E.ids
        return request

    def set_requests(self, group: str) -> list[list]:
        """The description sets' wordings of `group` ("experts" or "unseen") as `prior.Request`s
        [task][wording], from the `keys` stage's embeddings and the `relation` stage's
        log-probabilities."""
        from .prior import Request

        embs = np.load(self.p("desc_sets.npz"))[group]
        lp = np.load(self.p("desc_sets_lp.npz"))[group] if self.relation_head() is not None else None
        return [
            [Request(embs[i, p], None if lp is None else lp[i, p]) for p in range(embs.shape[1])]
            for i in range(embs.shape[0])
        ]

    def ood(self) -> dict:
        """The bundle's `ood` block: the `guard` stage's best-score threshold, replaced by the
        `scope` stage's classifier (`scope.ood_block`)."""
        from .scope import ood_block

        guard = jload(self.p("guard.json"))["ood"]
        return ood_block(guard, jload(self.p("scope.json")))

    def loo_queries(self):
        """Each expert task's stand-in request for leave-out validation: one held-out bank
        paraphrase from its description set (`keys` stage), chosen by a fixed seed."""
        reqs = self.set_requests("experts")
        n_keys = self.cfg["desc_keys"]
        rng = np.random.default_rng(5)
        return [r[n_keys + int(rng.integers(len(r) - n_keys))] for r in reqs]

    def templated_requests(self) -> list:
        """Each expert task's templated description as a `prior.Request` (the first wording of its
        description set): what the analyses query with."""
        return [r[0] for r in self.set_requests("experts")]

    def loo_priors(self, mu, var, queries, k, tau):
        """Each expert's semantic prior as if its task were unseen (see `held_out_for`), for the
        stand-in requests `queries` (`loo_queries`) scored against the retrieval keys."""
        from .prior import semantic_prior

        keys = self.keys()
        out_m, out_v = [], []
        for i in range(len(mu)):
            _, _, _, m, v = semantic_prior(queries[i], keys, mu, var, k, tau, exclude=self.held_out_for(i))
            out_m.append(m)
            out_v.append(v)
        return np.stack(out_m), np.stack(out_v)

    def analysis_inputs(self) -> argparse.Namespace:
        """What the analysis modules (`pipeline.ablate_*`) read from a run after its `prior` stage:
        the expert tasks, the validated prior settings (`prior`: k, tau, gain), the description
        embeddings, the experts' mu and var, and the zero-shot metrics by task name."""
        _, mu, var = self.expert_arrays()
        return argparse.Namespace(
            experts=self.suite["experts"],
            prior=jload(self.p("prior.json"))["best"],
            demb=np.load(self.p("desc_emb.npy")),
            mu=mu,
            var=var,
            zs=jload(self.p("zeroshot.json")),
        )

    def torch_desc_embs(self, texts):
        """Description embeddings by the PyTorch base model (float64): the encoder's reference."""
        self.lora.zero()
        return self.lora.embed_all(texts).numpy().astype(np.float64)

    def embedder(self):
        """The bundle's int8 ONNX encoder, as the device runs it (`export.OnnxEmbedder`)."""
        from .export import OnnxEmbedder

        return OnnxEmbedder(os.path.join(self.bundle, "encoder.onnx"), os.path.join(self.bundle, "tokenizer.json"))

    def load_cvae(self, tuned: bool = False):
        """The CVAE as shipped (the `cvae` stage's), or with `tuned` the `tune` ablation's when it ran."""
        import torch

        from .cvae import CVAE

        c = self.cfg
        _, mu, _ = self.expert_arrays()
        d = mu.shape[1]
        gain = float(jload(self.p("prior.json"))["best"].get("gain", 1.0))
        m = CVAE(
            d,
            np.zeros((d, c["basis_c"]), np.float32),
            np.zeros((d, c["basis_u"]), np.float32),
            zdim=c["zdim"],
            gain=gain,
        )
        path = self.p("cvae_tuned.pt") if tuned and os.path.exists(self.p("cvae_tuned.pt")) else self.p("cvae.pt")
        m.load_state_dict(torch.load(path))
        m.eval()
        return m


def analysis_work(doc: str, after: str, add_args=None) -> Work:
    """The command line of an analysis module (`python -m pipeline.<name> --work W [--tiny]`): the
    Work of the run in W, which must have finished its `after` stage. `add_args(parser)` adds
    the module's own options; the parsed options are the Work's `cli` attribute."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", required=True, help=f"work folder of a full run (after its `{after}` stage)")
    ap.add_argument("--tiny", action="store_true", help="the tiny recipe (smoke test on a --tiny work folder)")
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    w = Work(args.tiny, args.work)
    w.cli = args
    return w
