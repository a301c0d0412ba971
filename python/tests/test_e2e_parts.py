"""The torch-free parts of the end-to-end benchmark (bench/e2e): the check's verdicts (check.compare,
check.compare_layers), the per-layer checking copies (probe.py) and the spoiled rewrite (e2e.spoil) on
the builder fixture models/ort_genai/gpt_oss, ONNX Runtime's load errors put in one line
(ortrun.not_runnable), and the cut that removes a model's MoE blocks for the MoE share
(export.cut_moe), and the CUDA-graph rows' run options (ortrun.Session) and pick check
(bench_model.graph_check). The whole path runs in python/tests/test_e2e_tiny.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from scattermoe_testing import mutate, ort_utils

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "e2e"))

import check  # noqa: E402
import e2e  # noqa: E402
import export  # noqa: E402
import ortrun  # noqa: E402
import probe  # noqa: E402

GPT_OSS = ROOT / "models" / "ort_genai" / "gpt_oss" / "model.onnx"


def _trace(logits, fed=None, layers=None):
    picks = [int(x) for x in logits.argmax(-1)]
    return dict(fed=fed if fed is not None else picks[:-1], picks=picks, logits=logits.astype(np.float32), layers=layers)


def test_compare_passes_same_picks_and_reports_a_near_tie_as_a_tie_but_fails_a_clear_difference_or_a_logit_error(rng):
    base = rng.standard_normal((5, 50)) * 4.0
    ref = _trace(base)
    # the same logits, a little noise: same picks
    rec = check.compare(ref, _trace(base + 1e-4 * rng.standard_normal(base.shape), ref["fed"]), 2e-2)
    assert rec["ok"] and rec["tokens_equal"] and rec["steps"] == 5, rec

    # step 2's top two 1% of the largest logit apart (below float16's 2e-2), and the other model picks the second
    tie = base.copy()
    top = np.argsort(tie[2])[-2:]
    scale = np.abs(tie[2]).max()
    tie[2, top[0]] = tie[2, top[1]] - 1e-2 * scale
    ref_tie = _trace(tie)
    got = tie.copy()
    got[2, top[0]] += 1.5e-2 * scale  # within the logit tolerance: 1.5e-2 < 2e-2
    rec = check.compare(ref_tie, _trace(got, ref_tie["fed"]), 2e-2)
    assert rec["ok"] and not rec["tokens_equal"] and len(rec["ties"]) == 1 and not rec["mismatches"], rec
    assert rec["ties"][0]["step"] == 2

    # the same flip where the reference's margin is 3% of its largest logit: a wrong pick, though each logit
    # moved by less than the tolerance (1.6% each way)
    clear = tie.copy()
    clear[2, top[0]] = clear[2, top[1]] - 3e-2 * scale
    got = clear.copy()
    got[2, top[0]] += 1.6e-2 * scale
    got[2, top[1]] -= 1.6e-2 * scale
    rec = check.compare(_trace(clear), _trace(got, ref_tie["fed"]), 2e-2)
    assert not rec["ok"] and rec["mismatches"][0]["step"] == 2 and "greedy picks differ" in rec["why"], rec
    assert "logits differ" not in rec["why"], rec

    # same picks, logits off by more than the tolerance
    rec = check.compare(ref, _trace(base * 1.01, ref["fed"]), 1e-4)
    assert not rec["ok"] and "logits differ" in rec["why"], rec


def _layers(rng, P=4, steps=3, E=8, k=2, d=16, L=2):
    """Per-layer readings of a trace: P prompt positions and `steps` decode positions, L layers."""
    out = dict(prompt=P)
    T = P + steps
    for i in range(L):
        scores = rng.standard_normal((T, E)) * 3.0
        idx = np.argsort(-scores, -1)[:, : k + 1]
        out[probe.MOE.format(i)] = rng.standard_normal((T, d)).astype(np.float32)
        out[probe.TOPV.format(i)] = np.take_along_axis(scores, idx, -1).astype(np.float32)
        out[probe.TOPI.format(i)] = idx
    return out


def _copy(layers):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in layers.items()}


def test_compare_layers_names_the_layer_and_sets_a_routing_tie_apart(rng):
    ref = _layers(rng)
    rows = 4  # the prompt's row and 3 steps: positions 3..6
    rec = check.compare_layers(ref, _copy(ref), 2e-2, rows)
    assert rec["why"] is None and [x["max_rel_err"] for x in rec["per_layer"]] == [0.0, 0.0]

    # layer 1's output off at position 5 by 5% of its largest value (the error's scale): named
    bad = _copy(ref)
    bad[probe.MOE.format(1)][5, 0] += 0.05 * np.abs(ref[probe.MOE.format(1)]).max()
    rec = check.compare_layers(ref, bad, 2e-2, rows)
    assert rec["why"].startswith("MoE layer 1 differs first") and "position 5" in rec["why"], rec

    # layer 0's router at position 4 swaps its k-th and (k+1)-th experts, 1% of the largest score apart: a routing tie;
    # that position's outputs then differ in this layer and the next, and row 1 (position 4) is set apart
    tied = _copy(ref)
    v, i = ref[probe.TOPV.format(0)], ref[probe.TOPI.format(0)]
    v[4, 2] = v[4, 1] - 1e-2 * np.abs(v).max()
    tied[probe.TOPI.format(0)][4, [1, 2]] = i[4, [2, 1]]
    tied[probe.MOE.format(0)][4] += 1.0
    tied[probe.MOE.format(1)][4] += 1.0
    rec = check.compare_layers(ref, tied, 2e-2, rows)
    assert rec["why"] is None and rec["row_ties"] == {1} and rec["per_layer"][0]["routing_ties"] == 1, rec

    # the same swap at a clear gap (20% of the largest score): the router chose other experts, named
    v[4, 2] = v[4, 1] - 0.2 * np.abs(v).max()
    rec = check.compare_layers(ref, tied, 2e-2, rows)
    assert rec["why"].startswith("MoE layer 0 differs first: its router chose other experts") and not rec["row_ties"], rec

    # a routing tie sets its row's logits apart in compare(): the row's error is reported, not gated
    logits = rng.standard_normal((rows, 50)) * 4.0
    v[4, 2] = v[4, 1] - 1e-2 * np.abs(v).max()
    got_logits = logits.copy()
    got_logits[1] += 0.5
    rec = check.compare(_trace(logits, layers=ref), _trace(got_logits, _trace(logits)["fed"], layers=tied), 2e-2)
    assert rec["ok"] and rec["routing_tie_steps"][0]["step"] == 1 and rec["routing_tie_steps"][0]["rel_err"] > 2e-2, rec


def test_a_rewrite_that_matches_torch_where_its_original_does_not_passes_saying_so_and_one_that_matches_neither_fails(rng):
    import bench_model

    base = rng.standard_normal((5, 50)) * 4.0
    torch_t = _trace(base)
    fed = torch_t["fed"]
    off = base.copy()
    off[2] += 0.5  # the original as run deviates from torch at one row
    export_t = _trace(off, fed)
    cols = {c: {} for c in ("torch", "export", "rewritten")}
    # the rewritten model matches torch: the gated pair passes, says why, and the torch pair is shown
    out = bench_model.checks({"torch": torch_t, "export": export_t, "rewritten": _trace(base.copy(), fed)}, 2e-2, cols)
    rw = out["rewritten vs export"]
    assert not out["export vs torch"]["ok"] and rw["ok"] and "matches torch" in rw["note"] and rw["why_original"], out
    assert out["rewritten vs torch"]["ok"] and not out["rewritten vs torch"]["gate"]
    # one that matches neither fails
    other = base.copy()
    other[3] += 0.5
    out = bench_model.checks({"torch": torch_t, "export": export_t, "rewritten": _trace(other, fed)}, 2e-2, cols)
    assert not out["rewritten vs export"]["ok"] and not out["rewritten vs torch"]["ok"], out
    # an original faithful to torch: no fallback, the pair stands as compared
    out = bench_model.checks({"torch": torch_t, "export": _trace(base.copy(), fed), "rewritten": _trace(other, fed)}, 2e-2, cols)
    assert not out["rewritten vs export"]["ok"] and "rewritten vs torch" not in out, out


def test_not_runnable_names_the_node():
    msg = ("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from m.onnx failed:This is an invalid model. Type Error: Type "
           "'tensor(bfloat16)' of input parameter (linear_4) of operator (TopK) in node (node_topk__1) is invalid.")
    why = ortrun.not_runnable(RuntimeError(msg), "1.31.1", "bfloat16")
    assert "node 'node_topk__1' (TopK) takes tensor(bfloat16)" in why and "DTYPE=fp16" in why, why
    msg = "Could not find an implementation for MatMul(13) node with name '/m/MatMul'"
    assert "node '/m/MatMul' (MatMul, opset 13) has no kernel" in ortrun.not_runnable(RuntimeError(msg), "1.31.1", "float16")
    assert ortrun.not_runnable(RuntimeError("out of memory"), "1.31.1", "float16") is None


def _run_layers(path, lib, feeds, n):
    s = ort_utils.session(str(path), lib=lib, threads=1)
    names = probe.names(n)
    outs = dict(zip(names, s.run(names, feeds)))
    return probe.stack([outs], prompt=feeds["input_ids"].shape[1])


@pytest.mark.skipif(not mutate.CLI.exists(), reason=f"{mutate.CLI} not built")
def test_checking_copies_of_the_builder_fixture_and_its_rewrite_agree_and_a_spoiled_expert_names_its_layer(tmp_path: Path, lib):
    rw = tmp_path / "rw" / "model.onnx"
    rw.parent.mkdir()
    p = subprocess.run([str(mutate.CLI), "rewrite", str(GPT_OSS), str(rw), "--json", "--force", "--no-prove"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    orig = tmp_path / "orig" / "model.onnx"
    orig.parent.mkdir()
    for f in GPT_OSS.parent.iterdir():
        shutil.copy(f, orig.parent / f.name)  # ONNX Runtime refuses external data behind a link out of the folder
    layers = probe.layer_map(str(rw), str(orig), report)
    assert len(layers) == 2 and all(x["scores"].endswith("router/Reshape/output_0") for x in layers), layers
    copies = [probe.checking_copy(str(m), layers) for m in (orig, rw)]
    g = onnx.load(str(orig), load_external_data=False).graph
    window = max((onnx.helper.get_attribute_value(a) for n in g.node if n.op_type == "GroupQueryAttention" for a in n.attribute
                  if a.name == "local_window_size"), default=0)
    rng = np.random.default_rng(3)
    S = 6
    feeds = {"input_ids": rng.integers(0, 100, (1, S)).astype(np.int64), "attention_mask": np.ones((1, window + S), np.int64)}
    for i in g.input:
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.type.tensor_type.shape.dim[1].dim_value, window, 16), np.float32)
    ref, got = (_run_layers(c, lib, feeds, 2) for c in copies)
    assert ref[probe.MOE.format(0)].shape == (S, 64) and ref[probe.TOPI.format(0)].shape[1] == layers[0]["k"] + 1
    rec = check.compare_layers(ref, got, 1e-4, rows=1)
    assert rec["why"] is None and max(x["max_rel_err"] for x in rec["per_layer"]) < 1e-4, rec
    assert all((ref[probe.TOPI.format(i)] == got[probe.TOPI.format(i)]).all() for i in range(2))

    # expert e's w_out in layer 1 doubled, e one that layer 1 chose for these tokens: layer 1 named, layer 0 unchanged
    e = int(ref[probe.TOPI.format(1)][0, 0])
    info = e2e.spoil(str(rw), 2.0, layer=1, expert=e)
    assert info["layer"] == 1
    bad = _run_layers(probe.checking_copy(str(rw), layers), lib, feeds, 2)
    rec = check.compare_layers(ref, bad, 1e-4, rows=1)
    assert rec["why"].startswith("MoE layer 1 differs first"), rec
    assert rec["per_layer"][0]["max_rel_err"] < 1e-4 < rec["per_layer"][1]["max_rel_err"], rec


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


def test_a_graph_session_never_captures_its_prefill_and_gives_each_decoder_its_own_graph(monkeypatch):
    """ORT replays a session's first capture for every later run of the same gpu_graph_id without reading
    the bindings: a graph session's prefill runs must carry -1 (never captured), each fixed-shape decoder
    an id of its own. (Options only: ORT's CUDA graph itself needs the device. The session reads only
    dtype names from torch here, so a stand-in serves where torch is not installed.)"""
    import types

    fake = types.SimpleNamespace(float32="float32", float16="float16", bfloat16="bfloat16", int64="int64")
    monkeypatch.setitem(sys.modules, "torch", fake)
    ort = ortrun.load_ort()
    plain = ortrun.Session(ort, str(GPT_OSS), "genai", "cpu", head_dim=8)
    graph = ortrun.Session(ort, str(GPT_OSS), "genai", "cpu", graph=True, head_dim=8)
    with pytest.raises(RuntimeError, match="gpu_graph_id"):  # ORT's answer for a key never set
        plain.run_options.get_run_config_entry("gpu_graph_id")
    assert plain.graph_options() is plain.run_options
    assert graph.run_options.get_run_config_entry("gpu_graph_id") == "-1"
    ids = [graph.graph_options().get_run_config_entry("gpu_graph_id") for _ in range(3)]
    assert ids == ["1", "2", "3"]


def test_graph_rows_count_the_greedy_picks_that_match_the_plain_session():
    import bench_model

    plain = {1: np.array([[5, 6, 7, 8]]), 16: np.arange(64).reshape(16, 4)}
    graph = {1: np.array([[5, 6, 7, 8]]), 16: np.arange(64).reshape(16, 4)}
    graph[16][3, 2] = -1  # one pick differs
    rows = {"decode_b1_graph": {"ms": 1.0}, "decode_b16_graph": {"ms": 2.0}}
    bench_model.graph_check(rows, plain, graph)
    assert rows["decode_b1_graph"]["same_picks"] == [4, 4]
    assert rows["decode_b16_graph"]["same_picks"] == [63, 64]
