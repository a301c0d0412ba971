"""Router fusion (docs/rewriter.md) against ONNX Runtime's CPU provider running the original, where
the two could part: a float16 model whose router casts its float16 logits to float32 before the
Softmax. ONNX Runtime's CPU optimizer runs the float16 MatMul in float32 and removes its Cast to
float16 and the Cast back, so the graph's Softmax sees unrounded logits; two logits equal only after
rounding to float16 then rank differently than the rounded ones would. The fused TopKRouter must
read the float32 value the graph ranks (so it sees what the graph sees on every provider), not the
float16 logits. The case is the structured mutator's finding (`fuzz/mutate_cli.py --seed 20261212
--only 2929`: Mixtral's float16 fixture with one router weight tripled, which makes token 3's
logits of experts 0 and 2 equal in float16)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from scattermoe_testing import ort_utils

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"


def test_a_float16_router_ties_as_the_graph_ranks_them(lib, tmp_path):
    m = onnx.load(ROOT / "models" / "mixtral_f16.onnx")
    w = next(t for t in m.graph.initializer if t.name == "onnx::MatMul_641")  # the router's [d, E] weight
    a = numpy_helper.to_array(w).copy()
    a.reshape(-1)[200] = np.float16(3.58984375)
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    src, dst = tmp_path / "m.onnx", tmp_path / "rw.onnx"
    onnx.save(m, src)
    r = subprocess.run([str(CLI), "rewrite", str(src), str(dst), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    routers = [layer["router"] for layer in json.loads(r.stdout)["layers"]]
    assert routers and all(x["fused"] for x in routers), routers
    rw = onnx.load(dst)
    types = {v.name: v.type.tensor_type.elem_type for v in list(rw.graph.value_info) + list(rw.graph.input)}
    casts = {n.output[0]: n for n in rw.graph.node if n.op_type == "Cast"}
    router = next(n for n in rw.graph.node if n.op_type == "TopKRouter")
    feeding = casts.get(router.input[0])
    assert feeding is not None and feeding.attribute[0].i == onnx.TensorProto.FLOAT, \
        f"the TopKRouter reads {router.input[0]} ({types.get(router.input[0])}), not the graph's float32 Cast"
    orig, new = ort_utils.session(src, lib), ort_utils.session(dst, lib)
    for seed in range(4):  # seed 0 holds the tie
        x = np.random.default_rng(seed).standard_normal([1, 16, 32]).astype(np.float16)
        want = orig.run(None, {"hidden_states": x})[0].astype(np.float32)
        got = new.run(None, {"hidden_states": x})[0].astype(np.float32)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err < 1e-2, f"seed {seed}: rel err {err:.3g}"
