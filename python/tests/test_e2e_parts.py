"""The torch-free parts of the end-to-end benchmark (bench/e2e): the check's verdicts (measure.compare)
and the cut that removes a model's MoE blocks for the MoE share (export.cut_moe), on the builder
fixture models/ort_genai/gpt_oss. The whole path runs in python/tests/test_e2e_tiny.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

from scattermoe_testing import ort_utils

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "e2e"))

import export  # noqa: E402
import measure  # noqa: E402


def _trace(logits, fed=None):
    picks = [int(x) for x in logits.argmax(-1)]
    return dict(fed=fed if fed is not None else picks[:-1], picks=picks, logits=logits.astype(np.float32))


def test_compare_passes_same_picks_and_counts_a_tie_but_fails_a_clear_difference_or_a_logit_error(rng):
    base = rng.standard_normal((5, 50)) * 4.0
    ref = _trace(base)
    # the same logits, a little noise: same picks
    rec = measure.compare(ref, _trace(base + 1e-4 * rng.standard_normal(base.shape), ref["fed"]), 5e-2, "bfloat16")
    assert rec["ok"] and rec["tokens_equal"] and rec["steps"] == 5, rec

    # step 2's top two made a tie at bfloat16 precision, and the rewritten model picks the second
    tie = base.copy()
    top = np.argsort(tie[2])[-2:]
    tie[2, top[1]] = tie[2, top[0]] + 1e-3 * np.abs(tie[2]).max()
    ref_tie = _trace(tie)
    got = tie.copy()
    got[2, top[0]] += 2e-3 * np.abs(tie[2]).max()
    rec = measure.compare(ref_tie, _trace(got, ref_tie["fed"]), 5e-2, "bfloat16")
    assert rec["ok"] and not rec["tokens_equal"] and len(rec["ties"]) == 1 and not rec["mismatches"], rec

    # the same flip where the original's margin is clear: a wrong model
    clear = base.copy()
    a, b = np.argsort(clear[3])[-2:][::-1]
    got = clear.copy()
    got[3, b] = clear[3, a] + 1.0
    rec = measure.compare(ref, _trace(got, ref["fed"]), 5e-1, "bfloat16")
    assert not rec["ok"] and rec["mismatches"][0]["step"] == 3 and "greedy picks differ" in rec["why"], rec

    # same picks, logits off by more than the tolerance
    rec = measure.compare(ref, _trace(base * 1.01, ref["fed"]), 1e-4, "float32")
    assert not rec["ok"] and "logits differ" in rec["why"], rec


def test_cut_moe_removes_every_moe_node_and_its_router_and_the_cut_model_runs(tmp_path: Path):
    src = ROOT / "models" / "ort_genai" / "gpt_oss" / "model.onnx"
    dst = tmp_path / "nomoe" / "model.onnx"
    info = export.cut_moe(str(src), str(dst))
    before = onnx.load(str(src), load_external_data=False)
    after = onnx.load(str(dst), load_external_data=False)
    moe = [n for n in before.graph.node if n.op_type == "MoE"]
    assert moe and info["cut"] == len(moe)
    assert not any(n.op_type == "MoE" for n in after.graph.node)
    names = {n.name for n in after.graph.node}
    assert not any("/moe/router/" in n for n in names), sorted(n for n in names if "router" in n)
    inits = {t.name for t in after.graph.initializer}
    assert not any("experts" in n or "router" in n for n in inits)
    s = ort_utils.session(str(dst), threads=1)
    # this fixture's GroupQueryAttention keeps a window-sized cache: the past is that long (zeros)
    window = max((onnx.helper.get_attribute_value(a) for n in after.graph.node if n.op_type == "GroupQueryAttention"
                  for a in n.attribute if a.name == "local_window_size"), default=0)
    feeds = {"input_ids": np.array([[1, 2, 3]], np.int64), "attention_mask": np.ones((1, window + 3), np.int64)}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], window, 16), np.float32)
    logits = s.run(["logits"], feeds)[0]
    assert logits.shape[:2] == (1, 3) and np.isfinite(logits).all()
