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

    def forward(self, inputs_embeds, attention_mask):
        return self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, token_type_ids=torch.zeros_like(attention_mask)
        ).last_hidden_state


def export_fp32_encoder(path: str) -> np.ndarray:
    """fp32 ONNX export of the base model's transformer (inputs_embeds, attention_mask ->
    last_hidden_state, dynamic batch and sequence); returns the fp32 word-embedding table."""
    from transformers import AutoModel

    base = AutoModel.from_pretrained(lora_mod.base_model_dir(), attn_implementation="eager").eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    # The word-embedding lookup happens outside the graph (Rust: crates/sglora/src/encoder.rs) from an int8
    # table: tract does not constant-fold a dequantisation feeding Gather, so an in-graph int8
    # table was dequantised whole on every call (+50 ms).
    table = base.embeddings.word_embeddings.weight.detach().numpy().astype(np.float32)
    torch.onnx.export(
        _EncoderWrapper(base),
        (torch.tensor(table[ids.numpy()]), torch.ones_like(ids)),
        path,
        input_names=["inputs_embeds", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={
            "inputs_embeds": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"},
        },
        opset_version=17,
        dynamo=False,
    )
    return table


def export_encoder(out_dir: str, work_dir: str) -> dict:
    """fp32 export of the base model, then weight-only int8 per output channel."""
    os.makedirs(work_dir, exist_ok=True)
    fp32 = os.path.join(work_dir, "encoder_fp32.onnx")
    table = export_fp32_encoder(fp32)
    np.save(os.path.join(work_dir, "word_embeddings_fp32.npy"), table)
    from safetensors.numpy import save_file

    scale = (np.abs(table).max(axis=1) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    save_file({"word_embeddings": q, "word_embeddings_scale": scale}, os.path.join(out_dir, "embeddings.safetensors"))
    int8 = os.path.join(out_dir, "encoder.onnx")
    quantize_weights_int8(fp32, int8)
    shutil.copy(os.path.join(lora_mod.base_model_dir(), "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    return {"fp32": fp32, "int8": int8}


def quantize_weights_int8(src: str, dst: str) -> dict:
    """Weight-only int8: every 2-D MatMul weight is stored as symmetric int8 with one fp32 scale
    per output column behind a DequantizeLinear; activations stay fp32. tract folds the dequantisation at load time, so inference runs its fast fp32 kernels.

    Measured (tract 0.23.9, x86, batch of one): onnxruntime's dynamic int8 (QOperator
    MatMulInteger) ran at 365 ms per description vs 17 ms for this, and reached min cosine 0.9905
    to fp32 vs 0.9990 for this. See models/README.md.
    """
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(src)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    targets = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            if w.ndim == 2 and w.size >= 384 * 384:
                targets[n.input[1]] = 1  # [in, out]: one scale per output column
    deq = []
    for name, axis in targets.items():
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = np.abs(w).max(axis=1 - axis) / 127.0
        scale[scale == 0] = 1.0
        shape = [1, -1] if axis == 1 else [-1, 1]
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        g.initializer.remove(inits[name])
        g.initializer.extend(
            [
                numpy_helper.from_array(q, name + "_int8"),
                numpy_helper.from_array(scale.astype(np.float32), name + "_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), name + "_zero"),
            ]
        )
        deq.append(
            helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale", name + "_zero"], [name], axis=axis)
        )
    for node in reversed(deq):
        g.node.insert(0, node)
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    return {"quantized_tensors": len(targets)}


class OnnxEmbedder:
    """What the device computes: tokenizer.json (no padding, truncation) + ONNX encoder + mean pool + L2."""

    def __init__(self, onnx_path: str, tokenizer_path: str, max_tokens: int = 128, table=None):
        """`table`: the word-embedding matrix the device uses ([vocab, 384]); default: the
        dequantised int8 table next to the ONNX file (embeddings.safetensors)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if table is None:
            from safetensors.numpy import load_file

            t = load_file(os.path.join(os.path.dirname(onnx_path), "embeddings.safetensors"))
            table = t["word_embeddings"].astype(np.float32) * t["word_embeddings_scale"][:, None]
        self.table = table

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.tok = Tokenizer.from_file(tokenizer_path)
        self.tok.no_padding()
        self.tok.enable_truncation(max_tokens)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def states(self, text: str) -> np.ndarray:
        """The encoder's final-layer token states [n_tokens, 384] (float32), before pooling."""
        ids = np.array([self.ids(text)], dtype=np.int64)
        emb = self.table[ids].astype(np.float32)
        return self.sess.run(None, {"inputs_embeds": emb, "attention_mask": np.ones_like(ids)})[0][0]

    @staticmethod
    def pool(states: np.ndarray) -> np.ndarray:
        """Mean over tokens, L2-normalised (float64 accumulation, float32 result)."""
        v = states.astype(np.float64).mean(0)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def __call__(self, text: str) -> np.ndarray:
        return self.pool(self.states(text))


def export_cvae(model, out_dir: str) -> dict:
    from .cvae import DecoderNet, PriorNet

    d = model.dim
    mu = torch.zeros(1, d)
    sd = torch.ones(1, d)
    prior_path = os.path.join(out_dir, "cvae_prior.onnx")
    dec_path = os.path.join(out_dir, "cvae_decoder.onnx")
    with torch.no_grad():
        torch.onnx.export(
            PriorNet(model).eval(),
            (mu, sd),
            prior_path,
            input_names=["mu_star", "std_star"],
            output_names=["cond", "z_mean", "z_logvar"],
            opset_version=17,
            dynamo=False,
        )
        c = model.cond(mu, sd)
        z = torch.zeros(1, model.zdim)
        torch.onnx.export(
            DecoderNet(model).eval(),
            (z, c, mu, sd),
            dec_path,
            input_names=["z", "cond", "mu_star", "std_star"],
            output_names=["x"],
            opset_version=17,
            dynamo=False,
        )
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
