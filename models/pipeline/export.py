"""ONNX export (encoder int8, CVAE prior/decoder), the int8 reference embedder, bundle writing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import torch

from . import lora as lora_mod


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _EncoderWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=torch.zeros_like(input_ids)).last_hidden_state


def export_encoder(out_dir: str, work_dir: str) -> dict:
    """fp32 export of the base model, then onnxruntime dynamic int8 per-channel quantisation."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    os.makedirs(work_dir, exist_ok=True)
    fp32 = os.path.join(work_dir, "encoder_fp32.onnx")
    base = AutoModel.from_pretrained(lora_mod.base_model_dir(), attn_implementation="eager").eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    torch.onnx.export(
        _EncoderWrapper(base), (ids, torch.ones_like(ids)), fp32,
        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                      "last_hidden_state": {0: "batch", 1: "seq"}},
        opset_version=17, dynamo=False,
    )
    int8 = os.path.join(out_dir, "encoder.onnx")
    # The feed-forward output projections (1536 -> 384, after GELU) are the most sensitive to
    # int8: quantising all 48 MatMuls gave min cosine 0.985 to fp32 over our descriptions,
    # keeping these six in fp32 gives 0.991 (+11 MB). See models/README.md.
    import onnx
    names = [n.name for n in onnx.load(fp32).graph.node if n.op_type == "MatMul"]
    keep_fp32 = [n for n in names if "/output/dense/" in n and "/attention/" not in n]
    quantize_dynamic(fp32, int8, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=keep_fp32)
    shutil.copy(os.path.join(lora_mod.base_model_dir(), "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    return {"fp32": fp32, "int8": int8}


class OnnxEmbedder:
    """What the device computes: tokenizer.json (no padding, truncation) + ONNX encoder + mean pool + L2."""

    def __init__(self, onnx_path: str, tokenizer_path: str, max_tokens: int = 128):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.tok = Tokenizer.from_file(tokenizer_path)
        self.tok.no_padding()
        self.tok.enable_truncation(max_tokens)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def __call__(self, text: str) -> np.ndarray:
        ids = np.array([self.ids(text)], dtype=np.int64)
        out = self.sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        v = out.astype(np.float64).mean(0)
        return (v / np.linalg.norm(v)).astype(np.float32)


def export_cvae(model, out_dir: str) -> dict:
    from .cvae import DecoderNet, PriorNet

    d = model.dim
    mu = torch.zeros(1, d)
    sd = torch.ones(1, d)
    prior_path = os.path.join(out_dir, "cvae_prior.onnx")
    dec_path = os.path.join(out_dir, "cvae_decoder.onnx")
    with torch.no_grad():
        torch.onnx.export(PriorNet(model).eval(), (mu, sd), prior_path, input_names=["mu_star", "std_star"],
                          output_names=["cond", "z_mean", "z_logvar"], opset_version=17, dynamo=False)
        c = model.cond(mu, sd)
        z = torch.zeros(1, model.zdim)
        torch.onnx.export(DecoderNet(model).eval(), (z, c, mu, sd), dec_path,
                          input_names=["z", "cond", "mu_star", "std_star"], output_names=["x"],
                          opset_version=17, dynamo=False)
    return {"prior": prior_path, "decoder": dec_path}


def write_manifest(out_dir: str, manifest: dict) -> None:
    files = {}
    for name in sorted(os.listdir(out_dir)):
        p = os.path.join(out_dir, name)
        if name == "manifest.json" or not os.path.isfile(p):
            continue
        files[name] = {"sha256": sha256(p), "bytes": os.path.getsize(p)}
    manifest["files"] = files
    ident = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    manifest["bundle_id"] = f"sglora-{manifest['mode']}-{ident[:16]}"
    for name in files:
        os.chmod(os.path.join(out_dir, name), 0o644)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def refresh_manifest(out_dir: str) -> None:
    """Re-hash the bundle's files after documentation files (EVAL.md, eval.json) changed."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    write_manifest(out_dir, manifest)
