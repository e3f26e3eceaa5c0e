"""Python side of `make bench`: what a user would otherwise run, on the same descriptions.

    python -m pipeline.bench --bundle ../models/default --out ../target/bench [--quick]

Writes OUT/python.json (timings, ms, one thread) and OUT/fp32-bundle/ (the bundle with the fp32
encoder, for the Rust side's int8-vs-fp32 row). Measures:
- the encoder: onnxruntime on the bundle's int8 file and on the fp32 export, and
  sentence-transformers (PyTorch fp32), for the 5/20/100-word descriptions;
- generation on a cache miss with the pipeline's own stack (sentence-transformers encoder, numpy
  retrieval and mixture from pipeline.prior, the PyTorch CVAE with the bundle's weights, PEFT
  safetensors written and fsynced like the device does), stage by stage;
- embeddings with an adapter (the last generated one, kept in OUT/bench-adapter): onnxruntime
  int8 running the merged model (W + (alpha/r)·BA folded into the bundle's int8 encoder and
  re-quantised per output column) and sentence-transformers + PEFT, texts/s at batch 1 and 32 for
  the 20-word text, and each stack's peak RSS in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def dist(v):
    v = sorted(v)
    if not v:
        return {"p50": 0.0, "p95": 0.0, "mean": 0.0, "n": 0}
    q = lambda p: v[int(round((len(v) - 1) * p))]  # noqa: E731  (same rule as the Rust side)
    return {"p50": q(0.5), "p95": q(0.95), "mean": float(np.mean(v)), "n": len(v)}


def timed(fn, reps, warm=3):
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def merged_int8(bundle: str, adapter: str, out: str) -> str:
    """The bundle's int8 encoder with the adapter folded in: for every adapted MatMul, the int8
    weight is dequantised, W += (alpha/r)·(B·A)ᵀ added, and re-quantised per output column as
    the bundle's export does. What a user without sglora would run in onnxruntime."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    s = cfg["lora_alpha"] / cfg["r"]
    t = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    m = onnx.load(os.path.join(bundle, "encoder.onnx"))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    deq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    done = 0
    for n in g.node:
        if n.op_type != "MatMul" or n.input[1] not in deq or "/attention/self/" not in n.name:
            continue
        layer = n.name.split("layer.")[1].split("/")[0]
        module = n.name.split("/attention/self/")[1].split("/")[0]
        key = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
        if key + ".lora_A.weight" not in t:
            continue
        d = deq[n.input[1]]
        q, scale = numpy_helper.to_array(inits[d.input[0]]), numpy_helper.to_array(inits[d.input[1]])
        w = q.astype(np.float32) * scale[None, :] + s * (t[key + ".lora_B.weight"] @ t[key + ".lora_A.weight"]).T
        scale = np.abs(w).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale[None, :]), -127, 127).astype(np.int8)
        inits[d.input[0]].CopyFrom(numpy_helper.from_array(q, d.input[0]))
        inits[d.input[1]].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), d.input[1]))
        done += 1
    if done == 0:
        raise SystemExit(f"no adapted module of {adapter} found in the encoder")
    os.makedirs(out, exist_ok=True)
    for f in ("tokenizer.json", "embeddings.safetensors"):
        shutil.copy(os.path.join(bundle, f), os.path.join(out, f))
    onnx.save(m, os.path.join(out, "encoder.onnx"))
    return out


# A process of its own per stack, for its peak RSS: load, then embed 32 texts at batch 32 (each
# imports only what that stack needs: onnxruntime's has no PyTorch).
PEAK_SCRIPTS = {
    "ort_int8_merged": """
import numpy as np, onnxruntime as ort
from safetensors.numpy import load_file
from tokenizers import Tokenizer
t = load_file({emb!r})
table = t["word_embeddings"].astype(np.float32) * t["word_embeddings_scale"][:, None]
so = ort.SessionOptions()
so.intra_op_num_threads = 1
sess = ort.InferenceSession({onnx!r}, so, providers=["CPUExecutionProvider"])
tok = Tokenizer.from_file({tok!r})
ids = np.array([tok.encode({text!r}).ids] * 32, dtype=np.int64)
sess.run(None, {{"inputs_embeds": table[ids], "attention_mask": np.ones_like(ids)}})
""",
    "st_peft": """
import torch
from peft import PeftModel
from sentence_transformers import SentenceTransformer
torch.set_num_threads(1)
st = SentenceTransformer({base!r}, device="cpu")
st[0].model = PeftModel.from_pretrained(st[0].model, {adapter!r}).eval()
with torch.no_grad():
    st.encode([{text!r}] * 32, batch_size=32, normalize_embeddings=True)
""",
}


def peak_rss_kb(code: str) -> int:
    """Peak RSS (kB) of a fresh Python running `code`: its own VmHWM, read as it ends (the
    kernel's ru_maxrss of a child would count the forked copy of this big process too)."""
    import subprocess
    import sys

    tail = "\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    p = subprocess.run(
        [sys.executable, "-c", code + tail],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"peak-RSS run exited {p.returncode}: {p.stderr[-2000:]}")
    return int(p.stdout.split()[-1])


def bench_embeddings(a, bundle, adapter, text, st_model_dir, quick):
    """texts/s at batch 1 and 32 with the adapter: onnxruntime int8 on the merged model, and
    sentence-transformers + PEFT; base rows for both; peak RSS per stack."""
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    from .export import OnnxEmbedder

    merged = merged_int8(bundle, adapter, os.path.join(a.out, "merged-int8"))
    tok = os.path.join(bundle, "tokenizer.json")
    ort_base = OnnxEmbedder(os.path.join(bundle, "encoder.onnx"), tok)
    ort_merged = OnnxEmbedder(os.path.join(merged, "encoder.onnx"), tok, table=ort_base.table)
    st_base = SentenceTransformer(st_model_dir, device="cpu")
    st_lora = SentenceTransformer(st_model_dir, device="cpu")
    st_lora[0].model = PeftModel.from_pretrained(st_lora[0].model, adapter).eval()
    reps = 5 if quick else 30
    out = {}

    def ort_batch(e, n):
        ids = np.array([e.ids(text)] * n, dtype=np.int64)
        h = e.sess.run(None, {"inputs_embeds": e.table[ids].astype(np.float32), "attention_mask": np.ones_like(ids)})[0]
        v = h.mean(1)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    for name, fn in (
        ("ort_int8_base", lambda n: ort_batch(ort_base, n)),
        ("ort_int8_merged", lambda n: ort_batch(ort_merged, n)),
        ("st_base", lambda n: st_base.encode([text] * n, batch_size=n, normalize_embeddings=True)),
        ("st_peft", lambda n: st_lora.encode([text] * n, batch_size=n, normalize_embeddings=True)),
    ):
        out[name] = {}
        with torch.no_grad():
            for batch in (1, 32):
                d = dist(timed(lambda b=batch, f=fn: f(b), reps if batch == 1 else max(3, reps // 6)))
                out[name][str(batch)] = {"ms": d, "texts_per_s": batch * 1e3 / d["p50"] if d["p50"] else 0.0}
        print(
            f"  embed {name}: {out[name]['1']['texts_per_s']:.0f} texts/s at batch 1, "
            f"{out[name]['32']['texts_per_s']:.0f} at batch 32",
            flush=True,
        )
    # Fidelity of the merged int8 model to PEFT (what the comparison runs is the same adapter).
    with torch.no_grad():
        ref = st_lora.encode([text], normalize_embeddings=True)[0]
    out["merged_vs_peft_cosine"] = float(ort_merged(text) @ ref)
    fill = {
        "onnx": os.path.join(merged, "encoder.onnx"),
        "emb": os.path.join(merged, "embeddings.safetensors"),
        "tok": tok,
        "text": text,
        "base": st_model_dir,
        "adapter": adapter,
    }
    out["peak_rss_kb"] = {k: peak_rss_kb(v.format(**fill)) for k, v in PEAK_SCRIPTS.items()}
    print(f"  embed peak RSS (kB): {out['peak_rss_kb']}", flush=True)
    return out


def fp32_bundle(bundle: str, out: str) -> str:
    """Copy of the bundle whose encoder.onnx is the fp32 export (manifest re-hashed)."""
    from .export import export_fp32_encoder, write_manifest

    dst = os.path.join(out, "fp32-bundle")
    if os.path.exists(os.path.join(dst, "manifest.json")):
        return dst
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp)
    export_fp32_encoder(os.path.join(tmp, "encoder.onnx"))
    with open(os.path.join(tmp, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["encoder"]["quantization"] = "none (fp32 export, for benchmarks only)"
    write_manifest(tmp, manifest)
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    return dst


def load_cvae(bundle: str, manifest: dict):
    """The pipeline's CVAE module with the weights the bundle's ONNX files carry."""
    import onnx
    import torch
    from onnx import numpy_helper

    from .cvae import CVAE

    inits = {}
    for name in (manifest["cvae"]["prior_file"], manifest["cvae"]["decoder_file"]):
        for i in onnx.load(os.path.join(bundle, name)).graph.initializer:
            inits[i.name] = numpy_helper.to_array(i)
    d = manifest["lora"]["flat_dim"]
    kc = (manifest["cvae"]["cond_dim"] - 1) // 2
    sd_names = {}
    for k, v in inits.items():
        if k.startswith("onnx::MatMul_") and v.ndim == 2 and v.shape[1] == d:
            sd_names["U"] = v.T.copy()  # the exporter stored U transposed under a generated name
        else:
            sd_names[k.removeprefix("m.")] = v
    ku = sd_names["U"].shape[1]
    hidden = sd_names["prior.0.weight"].shape[0]
    model = CVAE(
        d,
        np.zeros((d, kc), np.float32),
        np.zeros((d, ku), np.float32),
        zdim=manifest["cvae"]["z_dim"],
        hidden=hidden,
        gain=float(manifest["prior"].get("decoder_gain", 1.0)),
    )
    state = model.state_dict()
    loaded = 0
    for k in state:
        if k in sd_names and tuple(sd_names[k].shape) == tuple(state[k].shape):
            state[k] = torch.tensor(sd_names[k])
            loaded += 1
    model.load_state_dict(state)
    model.eval()
    missing = [k for k in state if k not in sd_names and not k.startswith("post.")]
    return model, {"loaded": loaded, "missing_outside_posterior": missing}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=os.path.join(REPO, "models/default"))
    ap.add_argument("--out", default=os.path.join(REPO, "target/bench"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime
    import sentence_transformers
    import torch
    from safetensors.numpy import load_file, save_file
    from sentence_transformers import SentenceTransformer

    from . import lora as lora_mod
    from .export import OnnxEmbedder
    from .prior import Keys, RelationTerm, Request, denormalise, mixture, noise, normalise, normalise_spread, retrieve
    from .relation import log_probs

    torch.set_num_threads(1)
    with open(os.path.join(REPO, "benches/descriptions.json")) as f:
        texts = json.load(f)
    with open(os.path.join(a.bundle, "manifest.json")) as f:
        manifest = json.load(f)
    fp32_dir = fp32_bundle(a.bundle, a.out)
    tok = os.path.join(a.bundle, "tokenizer.json")
    ort8 = OnnxEmbedder(os.path.join(a.bundle, "encoder.onnx"), tok)
    ort32 = OnnxEmbedder(os.path.join(fp32_dir, "encoder.onnx"), tok, table=ort8.table)
    st = SentenceTransformer(lora_mod.base_model_dir(), device="cpu")
    st.eval()

    enc = {"ort_int8": {}, "ort_fp32": {}, "st_torch": {}}
    fidelity = {}
    for words, text in texts["encoder_by_words"].items():
        reps = 10 if a.quick else (60 if words == "100" else 150)
        with torch.no_grad():
            enc["st_torch"][words] = dist(timed(lambda t=text: st.encode(t, normalize_embeddings=True), reps))
        enc["ort_int8"][words] = dist(timed(lambda t=text: ort8(t), reps))
        enc["ort_fp32"][words] = dist(timed(lambda t=text: ort32(t), reps))
        ref = st.encode(text, normalize_embeddings=True)
        fidelity[words] = {"ort_int8_vs_torch": float(ort8(text) @ ref), "ort_fp32_vs_torch": float(ort32(text) @ ref)}
        print(
            f"  encoder {words:>3} words: st {enc['st_torch'][words]['p50']:.2f} ms, "
            f"ort int8 {enc['ort_int8'][words]['p50']:.2f} ms, ort fp32 {enc['ort_fp32'][words]['p50']:.2f} ms",
            flush=True,
        )

    # ---- generation with the pipeline's PyTorch stack ----------------------------------------
    ex = load_file(os.path.join(a.bundle, manifest["experts"]["file"]))
    rs = manifest["retrieval"]
    head = rs.get("relation_head")
    term = None
    if head:
        with open(os.path.join(a.bundle, manifest["experts"]["meta"])) as f:
            experts_meta = json.load(f)["experts"]
        term = RelationTerm.of(head["gamma"], head["relations"], [e["relation"] for e in experts_meta])
    keys = Keys(ex[rs["keys"]], rs["top"], ex[rs["projection"]] if rs.get("projection") else None, term)
    mu, var = ex["mu"], ex["var"]
    nm, ns, lora_a = ex["norm_mean"], ex["norm_std"], ex["lora_A"]
    model, wl = load_cvae(a.bundle, manifest)
    # The reference must compute what the bundle computes: compare with onnxruntime once.
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    M0 = rng.normal(size=(1, mu.shape[1])).astype(np.float32)
    S0 = np.abs(rng.normal(size=(1, mu.shape[1]))).astype(np.float32)
    with torch.no_grad():
        c0 = model.cond(torch.tensor(M0), torch.tensor(S0))
        z0 = torch.tensor(rng.normal(size=(1, model.zdim)).astype(np.float32))
        x_t = model.decode(z0, c0, torch.tensor(M0), torch.tensor(S0)).numpy()
    sess = ort.InferenceSession(
        os.path.join(a.bundle, manifest["cvae"]["decoder_file"]), providers=["CPUExecutionProvider"]
    )
    x_o = sess.run(None, {"z": z0.numpy(), "cond": c0.numpy(), "mu_star": M0, "std_star": S0})[0]
    wl["torch_vs_onnx_decoder_max_abs"] = float(np.abs(x_t - x_o).max())
    print(f"  PyTorch CVAE vs the bundle's decoder ONNX: max abs diff {wl['torch_vs_onnx_decoder_max_abs']:.2e}")
    k, tau = manifest["prior"]["top_k"], manifest["prior"]["temperature"]
    layout = manifest["lora"]["layout"]
    cfg = json.dumps(manifest["lora"]["adapter_config"], indent=2).encode()
    stages = {s: [] for s in ("tokenize", "encode", "retrieve", "prior", "cvae", "write")}
    total = []
    tmp = tempfile.mkdtemp(prefix="sglora-bench-")
    n = 0

    def write_adapter(flat, dest, prov):
        part = dest + ".tmp"
        os.makedirs(part)
        tensors = {}
        for i, e in enumerate(layout):
            tensors[e["lora_A"]] = lora_a[i]
            tensors[e["lora_B"]] = flat[e["offset"] : e["offset"] + e["len"]].reshape(e["lora_B_shape"])
        save_file(tensors, os.path.join(part, "adapter_model.safetensors"))
        with open(os.path.join(part, "adapter_config.json"), "wb") as f:
            f.write(cfg)
        with open(os.path.join(part, "provenance.json"), "w") as f:
            json.dump(prov, f)
        for name in os.listdir(part):
            fd = os.open(os.path.join(part, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        os.rename(part, dest)
        fd = os.open(os.path.dirname(dest), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    reps = 1 if a.quick else 5
    with torch.no_grad():
        for _ in range(reps + 1):  # the first round is warm-up
            for desc in texts["generation"]:
                n += 1
                t0 = time.perf_counter()
                feats = st.preprocess([desc]) if hasattr(st, "preprocess") else st.tokenize([desc])
                t1 = time.perf_counter()
                out = st.forward(feats)
                q = torch.nn.functional.normalize(out["sentence_embedding"], dim=1)[0].numpy().astype(np.float64)
                if head:  # the relation head reads the same forward pass's token states
                    lp = log_probs(ex[head["weight"]], ex[head["bias"]], out["token_embeddings"][0].numpy())
                    q = Request(q, lp)
                t2 = time.perf_counter()
                idx, sims, w = retrieve(q, keys, k, tau)
                t3 = time.perf_counter()
                m, v = mixture(mu, var, idx, w)
                M = torch.from_numpy(normalise(m, nm, ns)[None])
                S = torch.from_numpy(normalise_spread(v, ns)[None])
                t4 = time.perf_counter()
                x = model.generate(M, S, torch.from_numpy(noise(0, model.zdim)))[0].numpy()
                flat = denormalise(x, nm, ns).astype(np.float32)
                t5 = time.perf_counter()
                write_adapter(
                    flat,
                    os.path.join(tmp, f"a{n}"),
                    {
                        "description": desc,
                        "experts": [int(i) for i in idx],
                        "weights": [float(x) for x in w],
                        "seed": 0,
                    },
                )
                t6 = time.perf_counter()
                if n > len(texts["generation"]):
                    for s, (ta, tb) in zip(stages, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6)]):
                        stages[s].append((tb - ta) * 1e3)
                    total.append((t6 - t0) * 1e3)
    # The last adapter written is the one the embedding section applies.
    adapter = os.path.join(a.out, "bench-adapter")
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(os.path.join(tmp, f"a{n}"), adapter)
    shutil.rmtree(tmp, ignore_errors=True)
    gen = {"stages": {s: dist(v) for s, v in stages.items()}, "total": dist(total), "cvae_weights": wl}
    print(f"  generation (PyTorch stack): total p50 {gen['total']['p50']:.2f} ms", flush=True)
    embeddings = bench_embeddings(
        a, a.bundle, adapter, texts["encoder_by_words"]["20"], lora_mod.base_model_dir(), a.quick
    )
    out = {
        "embeddings": embeddings,
        "encoder": enc,
        "encoder_fidelity_cosine": fidelity,
        "generation": gen,
        "fp32_bundle": fp32_dir,
        "versions": {
            "python": ".".join(map(str, __import__("sys").version_info[:3])),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "sentence-transformers": sentence_transformers.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    with open(os.path.join(a.out, "python.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'python.json')}")


if __name__ == "__main__":
    main()
