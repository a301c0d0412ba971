"""onnxruntime-genai 0.18's model builder output (models/ort_genai/: GPT-OSS and LFM2-MoE, tiny
random checkpoints; made by models/ort_genai/generate.py): every com.microsoft.MoE node it writes
(it always writes activation_alpha / activation_beta) is rewritten, and the whole model's logits
match ONNX Runtime running the builder's model, for a prompt and for a decode step with past keys.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from scattermoe_testing import ort_utils

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"
MODELS = sorted((ROOT / "models" / "ort_genai").glob("*/model.onnx"))


def _window(model: onnx.ModelProto) -> int:
    """The KV capacity GroupQueryAttention needs when the builder gave it a sliding-window cache."""
    w = 0
    for n in model.graph.node:
        at = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "GroupQueryAttention" and at.get("sliding_window_cache") == 1:
            w = max(w, at.get("local_window_size", 0))
    return w


def _feeds(model: onnx.ModelProto, sess, ids: np.ndarray, past: dict | None) -> dict:
    b, s = ids.shape
    feeds = {"input_ids": ids.astype(np.int64)}
    past_len = 0
    head = 16  # kv_cache_dim of the checkpoints models/ort_genai/generate.py makes
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            v = past[i.name] if past else np.zeros((b, i.shape[1], _window(model), head), np.float32)
            feeds[i.name] = v
            past_len = v.shape[2]
        elif i.name.startswith("past.") and i.name.endswith(".conv"):
            feeds[i.name] = past[i.name] if past else np.zeros((b, i.shape[1], i.shape[2]), np.float32)
    feeds["attention_mask"] = np.ones((b, past_len + s), np.int64)
    return feeds



def _presents(sess, outs) -> dict:
    d = {}
    for o, v in zip(sess.get_outputs(), outs):
        if o.name.startswith("present."):
            d[o.name.replace("present.", "past_key_values.", 1) if o.name.endswith((".key", ".value")) else o.name.replace("present.", "past.", 1)] = v
    return d


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("path", MODELS, ids=[p.parent.name for p in MODELS])
def test_builder_moe_nodes_are_rewritten_and_logits_match(path: Path, lib, rng, tmp_path: Path):
    src = onnx.load(str(path), load_external_data=False)
    moe = [n for n in src.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]
    assert moe and all(any(a.name == "activation_alpha" for a in n.attribute) for n in moe)
    out = tmp_path / "model.onnx"
    r = subprocess.run([str(CLI), "rewrite", str(path), str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["layers"]) == len(moe), report["rejected"]
    dst = onnx.load(str(out), load_external_data=False)
    assert not any(n.op_type == "MoE" for n in dst.graph.node)
    assert sum(n.op_type == "ScatterMoE" for n in dst.graph.node) == len(moe)

    a = ort_utils.session(str(path), threads=1)
    b = ort_utils.session(str(out), lib=lib, threads=1)
    vocab = a.get_outputs()[0].shape[-1]
    names = [o.name for o in a.get_outputs()]
    past_a = past_b = None
    for step, tokens in enumerate((7, 1, 1)):
        ids = rng.integers(0, vocab, (1, tokens))
        fa = _feeds(src, a, ids, past_a)
        fb = _feeds(dst, b, ids, past_b)
        ya, yb = a.run(names, fa), b.run(names, fb)
        la, lb = ya[0].astype(np.float64), yb[0].astype(np.float64)
        err = np.abs(la - lb).max() / np.abs(la).max()
        assert err <= 1e-4, f"step {step} ({tokens} tokens): relative error {err:.3g}"
        past_a, past_b = _presents(a, ya), _presents(b, yb)
