"""Mutation tests of the rewriter (python/scattermoe_testing/mutate.py): single-node mutations of
the fixtures; every mutant is rewritten to a model that matches it in ONNX Runtime, or left with
a reason. Zero silent wrong rewrites.

The default run checks a seeded sample (about a minute); the whole set is
  .venv/bin/python python/scattermoe_testing/mutate.py --shuffle --jsonl run.jsonl
(docs/rewriter.md gives its last numbers). SCATTERMOE_MUTANTS=N changes the sample size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import pytest

from scattermoe_testing import mutate

pytestmark = pytest.mark.skipif(not mutate.CLI.exists(), reason=f"{mutate.CLI} not built")

SAMPLE = int(os.environ.get("SCATTERMOE_MUTANTS") or 120)


def test_a_seeded_sample_of_mutants_has_no_wrong_rewrite(rng):
    seed = int(rng.integers(2**31))
    s = mutate.run(sample=SAMPLE, seed=seed, log=None)
    print({k: v for k, v in s.items() if k != "wrong_cases"})
    assert s["wrong"] == 0, s["wrong_cases"]
    # the sample exercised the rewriter: some mutants were rewritten, some left
    assert s["rewritten-matching"] > 0 and s["left"] > 0, s


def _mutant(fixture, where):
    m = onnx.load(str(mutate.MODELS / f"{fixture}.onnx"))
    found = [mu for mu in mutate.mutants(fixture, m) if mu.where == where]
    assert len(found) == 1, [mu.where for mu in mutate.mutants(fixture, m)][:20]
    return found[0]


# mutants that the matchers accept and that are rewritten wrongly without proof (found by the harness)
KNOWN_HOLES = [
    # a hand-written loop whose slice of the routing weights is one column off
    ("loop_where", "/m/Constant_54_output_0[0]-1 (used by ['Slice'])"),
    # PhiMoE's router scattering its mask along the wrong axis: repeated experts in a row
    ("phimoe", "ScatterElements /m/router/ScatterElements.axis+1"),
]


@pytest.mark.parametrize("fixture,where", KNOWN_HOLES)
def test_proof_catches_what_the_matcher_lets_through(fixture, where):
    mu = _mutant(fixture, where)
    with tempfile.TemporaryDirectory() as d:
        rec = mutate.check(mu, Path(d))
    if rec["outcome"] == "left" and not rec["reason"].startswith("not proven"):
        # the matcher itself now refuses the mutant: the hole is closed structurally too
        assert not rec.get("wrong_without_proof"), rec
        return
    # without proof: rewritten, and the rewritten model differs from the mutant (the harness sees it)
    assert rec.get("wrong_without_proof"), rec
    # with proof: left, with the proof's error as the reason
    assert rec["outcome"] == "left" and rec["reason"].startswith("not proven"), rec


# The router's projection deleted: TopK then chooses among the d hidden features, not the E
# experts, and an index past E drops out of the graph's one-hot (a zero row) where the op refuses
# it. The proof feeds routing indices in [0, E) at the region's boundary, so only the matcher can
# see this: it must know the router's width is E (found by the seeded sample, granitemoe).
ROUTER_DELETED = [
    ("granitemoe", "MatMul /m/router/MatMul"),
    ("mixtral", "MatMul /m/gate/MatMul"),
    ("olmoe", "MatMul /m/gate/MatMul"),
    ("dense_einsum", "MatMul /m/router/proj/MatMul"),
    ("megablocks", "MatMul /m/router/proj/MatMul"),
    ("capacity_einsum", "MatMul /m/router/MatMul"),
    ("phimoe", "MatMul /m/router/MatMul"),
]


@pytest.mark.parametrize("fixture,where", ROUTER_DELETED, ids=[r[0] for r in ROUTER_DELETED])
def test_a_router_wider_than_the_experts_is_left(fixture, where):
    m = onnx.load(str(mutate.MODELS / f"{fixture}.onnx"))
    [mu] = [mu for mu in mutate.mutants(fixture, m) if mu.where == where and mu.kind == "delete-node"]
    with tempfile.TemporaryDirectory() as d:
        rec = mutate.check(mu, Path(d))
    assert rec["outcome"] in ("left", "load-failure"), rec
    if rec["outcome"] == "left":
        assert "wrong_without_proof" not in rec, rec


# Rewired graphs the structured fuzzer (fuzz/mutate_cli.py) found rewritten wrongly with the proof
# on: (fixture, node name, input index, new value, what the report must say). In each, the graph
# gives a value another shape than the op's contract or the graph's own declarations say, which
# the proof's cut-out models (fed the declared or the contract's shapes) did not reproduce.
REWIRED = [
    # routing weights divided by a sum over an expert weight: [4, 32, 2], not [T, k]
    ("dense_bmm", "/m/router/ReduceSum", 0, "m.w1", "ScatterMoE: inputs 'routing_weights'"),
    # a mask cast from a value of another rank; '_to_copy' keeps its declared [S, 4]
    ("deepseek_v3_bmm_dynamo", "node__to_copy", 0, "view_1", "declared shapes are stale"),
    # the shared expert's product with a value of twice the tokens: runs at 1 token only
    ("deepseek_v3_bmm_dynamo", "node_silu_1", 1, "split_split_0", "at no token count but one"),
    # a view of a scalar: [1], while 'view_5' keeps its declared [2*S]
    ("deepseek_v3_bmm_dynamo", "node_view_5", 0, "val_30", "declared shapes are stale"),
    # the router's sum over axes a value computes (the token count): the weights' shape is not
    # told, so they are computed in the proof, not fed as [T, k]
    ("dense_einsum", "/m/router/ReduceSum", 1, "/m/Unsqueeze_output_0", "ScatterMoE: inputs 'routing_weights'"),
]


@pytest.mark.parametrize("fixture,node,slot,value,reason", REWIRED, ids=[r[0] + ":" + r[1] for r in REWIRED])
def test_rewired_graphs_the_fuzzer_found_are_left_with_the_reason(fixture, node, slot, value, reason):
    sys.path.insert(0, str(mutate.ROOT / "fuzz"))
    import mutate_cli

    m = onnx.load(str(mutate.MODELS / f"{fixture}.onnx"))
    [n] = [n for n in m.graph.node if n.name == node]
    n.input[slot] = value
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "mutant.onnx", Path(d) / "rewritten.onnx"
        onnx.save(m, str(src))
        # the hazard is real: unproven, the rewrite is wrong where the mutant runs
        rep, err = mutate.rewrite(src, dst, prove=False)
        assert rep and rep["layers"], err
        elem = m.graph.output[0].type.tensor_type.elem_type
        got = mutate_cli.compare(src, dst, str(mutate.ort_utils.library_path()), elem)
        assert got not in ("equal", "mutant-fails"), got
        dst.unlink()
        # proven: left, nothing written, and the report names the reason
        rep, err = mutate.rewrite(src, dst, prove=True)
        assert rep is None and not dst.exists(), rep
        p = subprocess.run([str(mutate.CLI), "rewrite", str(src), str(dst), "--json", "--allow-none"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        rejected = json.loads(p.stdout)["rejected"]
        assert any(reason in r["reason"] for r in rejected), rejected


def _set_attr(m, node, name, value):
    [n] = [n for n in m.graph.node if n.name == node]
    [a] = [a for a in n.attribute if a.name == name]
    a.i = value


def _rewire(m, node, slot, value):
    [n] = [n for n in m.graph.node if n.name == node]
    n.input[slot] = value


# Mutants on which the CLI crashed (found by fuzz/mutate_cli.py): a panic in the proof's shape
# reading (a Gemm of a rank-1 input), ONNX Runtime's own loader aborting the process (a Split
# whose num_outputs disagrees with its outputs; 2^40 of them hung it). Each must end in a clean
# exit with the reason.
CRASHERS = [
    ("gpt_oss_bmm_dynamo", lambda m: _rewire(m, "node_linear", 1, "val_24"), None),
    ("deepseek_v3_bmm_dynamo", lambda m: _set_attr(m, "node_Split_99", "num_outputs", 1), "ONNX Runtime aborts the process"),
    ("mixtral_bmm_dynamo", lambda m: _set_attr(m, "node_Split_66", "num_outputs", 2**40), "ONNX Runtime aborts the process"),
    # Unsqueeze with repeated axes (a panic in the shape reading)
    ("olmoe", lambda m: _rewire(m, "/m/Unsqueeze_3", 1, "/m/experts/Constant_12_output_0"), None),
]


@pytest.mark.parametrize("fixture,edit,reason", CRASHERS, ids=["gemm-rank1", "split-num-outputs", "split-2^40", "unsqueeze-axes"])
def test_mutants_that_crashed_the_cli_end_cleanly(fixture, edit, reason):
    m = onnx.load(str(mutate.MODELS / f"{fixture}.onnx"))
    edit(m)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "mutant.onnx", Path(d) / "rewritten.onnx"
        onnx.save(m, str(src))
        p = subprocess.run([str(mutate.CLI), "rewrite", str(src), str(dst), "--json", "--allow-none"], capture_output=True, text=True, timeout=120)
        assert p.returncode in (0, 1), (p.returncode, p.stderr[-2000:])
        if p.returncode == 1:
            assert "error:" in p.stderr and not dst.exists(), p.stderr
            return
        if reason:
            assert any(reason in r["reason"] for r in json.loads(p.stdout)["rejected"]), p.stdout



def test_a_router_that_makes_fewer_rows_than_tokens_is_not_proven():
    # Nemotron-H's group mask expanded to [1, 0, 4] (the router's constant for the group axis one
    # less): the mutant's router makes no routing row at 1 token (and fails at more). Its TopK
    # indices' shape is not told by the graph; fed at the op's [T, k] the proof accepted it.
    mu = _mutant("families/nemotron_h_moe", "/m/gate/Constant_9_output_0[1]-1 (used by ['Where'])")
    with tempfile.TemporaryDirectory() as d:
        rec = mutate.check(mu, Path(d))
        assert rec.get("wrong_without_proof") and rec["outcome"] == "left", rec
        src, dst = Path(d) / "mutant.onnx", Path(d) / "out.onnx"
        onnx.save(mu.model, str(src))
        p = subprocess.run([str(mutate.CLI), "rewrite", str(src), str(dst), "--json", "--allow-none"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        rejected = json.loads(p.stdout)["rejected"]
        assert any(r["reason"].startswith("not proven") and "routing_indices" in r["reason"] for r in rejected), rejected
