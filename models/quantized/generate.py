"""Quantized fixtures: fixtures of models/ (and models/families/) whose expert weights come through
DequantizeLinear, written by python/scattermoe_testing/qdq.py, with the outputs of the quantized
graph itself (ONNX Runtime 1.31, CPU, DequantizeLinear-fed MatMuls run as written:
`session.disable_quant_qdq`) at the fixture's token counts.

    /work/torchvenv/bin/python models/quantized/generate.py      # needs onnxruntime's quantization tools

`index.json` lists each fixture: its source, how it was quantized, the layers the rewriter must
replace (or the reason it must give for leaving one: the spoiled variants), the element type.
The MatMulNBits QDQ fixtures come from onnxruntime.quantization's MatMulNBitsQuantizer in QDQ
format (4-bit, blocked along the input), which needs onnx_ir (in the torch venv).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent
sys.path.insert(0, str(MODELS.parent / "python"))

from scattermoe_testing import qdq  # noqa: E402
from scattermoe_testing.qdq import Scheme  # noqa: E402

# (source fixture, scheme or "nbits-sym" / "nbits-asym", layers replaced, reason when left)
FIXTURES = [
    ("mixtral", Scheme("int4", "block_in", 16), 1, None),                    # hf_loop, TorchScript
    ("qwen3_moe", Scheme("int8", "channel"), 1, None),
    ("deepseek_v3", Scheme("uint8", "row", zero=True), 1, None),           # shared experts stay as ONNX ops
    ("mixtral_bmm", Scheme("uint4", "block_in", 16, True), 1, None),       # batched_mm, TorchScript
    ("gpt_oss_bmm_dynamo", Scheme("fp8", "block_out", 16), 1, None),       # batched_mm, dynamo, biases, swiglu_oai
    ("families/phimoe_bmm", Scheme("int8", "expert"), 1, None),
    ("dense_einsum", Scheme("int8", "tensor"), 1, None),
    ("dense_bmm", Scheme("fp8", "channel"), 1, None),
    ("capacity_einsum", Scheme("int4", "block_in", 32), 1, None),
    ("megablocks", Scheme("uint8", "channel", zero=True), 1, None),
    ("qwen3_moe_bmm_f16", Scheme("int4", "block_in", 16), 1, None),        # float16
    ("mixtral_f16", Scheme("int8", "channel", zero=True), 1, None),
    ("families/jetmoe_moe", Scheme("int8", "channel"), 1, None),           # JetMoE, dynamo
    ("families/llama4_moe", Scheme("fp8", "block_in", 16), 1, None),
    ("families/nemotron_h_moe_bmm_dynamo", Scheme("uint4", "block_in", 16), 1, None),
    ("switch", "nbits-sym", 1, None),                                       # onnxruntime.quantization QDQ, int4
    ("families/nemotron_h_moe_f16", "nbits-asym", 1, None),                 # the same, uint4 with zero points, float16
    ("families/nemotron_h_moe", "nbits-sym", 1, None),
    # spoiled: left, with the reason the rewriter gives
    ("mixtral_bmm", Scheme("int8", "in_channel", zero=True), 0, "one scale per input channel"),
    ("mixtral_bmm", "codes-computed", 0, "codes that are not constant"),
    # a scale of another expert: each DequantizeLinear is read as it is, so the rewrite computes
    # what the graph computes
    ("switch", "swapped-scales", 1, None),
]


def _sources(name: str):
    path = MODELS / f"{name}.onnx"
    return onnx.load(str(path)), np.load(MODELS / f"{name}.npz")


def _codes_computed(m: onnx.ModelProto) -> onnx.ModelProto:
    """The first stack's codes gathered by a constant arange before DequantizeLinear reads them."""
    q = qdq.quantize_model(m, Scheme("int8", "channel"))
    g = q.graph
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear")
    codes = next(t for t in g.initializer if t.name == dq.input[0])
    idx = onnx.numpy_helper.from_array(np.arange(codes.dims[0], dtype=np.int64), codes.name + "_all")
    g.initializer.append(idx)
    gathered = codes.name + "_gathered"
    g.node.insert(0, onnx.helper.make_node("Gather", [codes.name, idx.name], [gathered], name=gathered, axis=0))
    dq.input[0] = gathered
    return q


def _swapped_scales(m: onnx.ModelProto) -> onnx.ModelProto:
    """Per-expert weights, experts 0 and 1 reading each other's scales."""
    q = qdq.quantize_model(m, Scheme("int8", "channel"))
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in q.graph.initializer}
    a, b = dqs[0], dqs[2]  # expert 0's and expert 1's first projection
    assert inits[a.input[1]].dims == inits[b.input[1]].dims
    a.input[1], b.input[1] = b.input[1], a.input[1]
    return q


def quantized(name: str, how) -> onnx.ModelProto:
    m, _ = _sources(name)
    if how == "nbits-sym":
        return qdq.quantize_matmul_nbits_qdq(m, 16, symmetric=True)
    if how == "nbits-asym":
        return qdq.quantize_matmul_nbits_qdq(m, 16, symmetric=False)
    if how == "codes-computed":
        return _codes_computed(m)
    if how == "swapped-scales":
        return _swapped_scales(m)
    return qdq.quantize_model(m, how)


def outputs(m: onnx.ModelProto, z) -> dict:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    out = {}
    for t in (1, 7, 16):
        x = z[f"x_{t}"]
        try:
            y = s.run(None, {name: x})[0]
        except Exception:  # noqa: BLE001 - traced loops run only where every expert is hit
            continue
        out[f"x_{t}"], out[f"y_{t}"] = x, y
    return out


def main():
    index = []
    for src, how, layers, reason in FIXTURES:
        tag = how if isinstance(how, str) else how.id
        name = f"{src.split('/')[-1]}.{tag}"
        q = quantized(src, how)
        onnx.save(q, str(HERE / f"{name}.onnx"))
        _, z = _sources(src)
        ys = outputs(q, z)
        np.savez(HERE / f"{name}.npz", **ys)
        dtype = "float16" if z["x_1"].dtype == np.float16 else "float32"
        index.append({"name": name, "source": src, "quantized": tag, "layers": layers, "reason": reason, "dtype": dtype,
                      "lengths": sorted(int(k[2:]) for k in ys if k.startswith("x_")),
                      "bytes": (HERE / f"{name}.onnx").stat().st_size})
        print(f"{name:<48} {index[-1]['bytes']:>8} bytes  lengths {index[-1]['lengths']}")
    (HERE / "index.json").write_text(json.dumps({"fixtures": index}, indent=1) + "\n")


if __name__ == "__main__":
    main()
