"""The quantization's error on whole MoE layers, per format and group size (issue 18's accuracy table).

usage: .venv/bin/python bench/quant_accuracy.py [--shapes mixtral,qwen3] [--work DIR] [--seed 0]

For each shape it writes one bfloat16 layer as an ONNX model (one ScatterMoE node, SwiGLU; weights
standard normal / sqrt(fan-in), as bench/gpu_bench.py draws them; external data), then runs
`scattermoe quantize --json` on it once per form below. The CLI quantizes the experts
(docs/quantize.md) and reports max |y_q - y| / max |y| over the layer's output at 1, 16 and 64
tokens, both layers run by the op's CPU kernels on the same random inputs: the error the
quantization adds to the bfloat16 layer. Prints one markdown table; the CLI's JSON per form goes to
WORK/<shape>-<form>.json (`--render` prints the table again from those files). The layer's model
stays in WORK (Mixtral's: 2.8 GB), each quantized one is removed after its report. Needs
target/release/scattermoe (cargo build --release); the CLI holds one node's weights as float32
(docs/quantize.md: 5.6 GB for Mixtral's).
"""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

from peers.onnx_models import bf16_bits  # (bench/ is this script's directory)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# d, f, E, k (bench/peers/layers.py)
SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8)}
# name -> CLI options
FORMS = {
    "fp8 per channel": ["--fp8"],
    "fp8 128x128": ["--fp8", "--block", "128x128"],
    "int8 per channel": ["--int8"],
    "int4 group 32": ["--int4", "--group", "32"],
    "int4 group 64": ["--int4", "--group", "64"],
    "int4 group 128": ["--int4", "--group", "128"],
    "int4 group 128 symmetric": ["--int4", "--group", "128", "--symmetric"],
}


def tag(form):
    """A form's name in file names."""
    return form.replace(" ", "-")


def weight(name, E, rows, cols, rng):
    bits = np.empty((E, rows, cols), dtype=np.uint16)
    for e in range(E):
        bits[e] = bf16_bits(rng.standard_normal((rows, cols), dtype=np.float32) / math.sqrt(cols))
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.BFLOAT16
    t.dims.extend([E, rows, cols])
    t.raw_data = bits.tobytes()
    return t


def layer_model(path, d, f, E, k, seed):
    rng = np.random.default_rng(seed)
    w_in, w_out = weight("w_in", E, 2 * f, d, rng), weight("w_out", E, d, f, rng)
    node = helper.make_node("ScatterMoE", ["X", "routing_weights", "routing_indices", "w_in", "w_out"], ["Y"],
                            name="scatter_moe", domain="ai.scattermoe", gated=1, activation="silu")
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["T", d]),
         helper.make_tensor_value_info("routing_weights", TensorProto.BFLOAT16, ["T", k]),
         helper.make_tensor_value_info("routing_indices", TensorProto.INT64, ["T", k])],
        [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, ["T", d])],
        [w_in, w_out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.scattermoe", 1)])
    onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--work", default="/tmp/quant-accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true", help="only print the table of the JSON files in --work")
    a = ap.parse_args()
    if a.render:
        print(table(a.work, a.shapes.split(",")))
        return
    cli = os.path.join(ROOT, "target", "release", "scattermoe")
    os.makedirs(a.work, exist_ok=True)
    for shape in a.shapes.split(","):
        d, f, E, k = SHAPES[shape]
        src = os.path.join(a.work, f"{shape}.onnx")
        layer_model(src, d, f, E, k, a.seed)
        for form, opts in FORMS.items():
            out = os.path.join(a.work, f"{shape}-{tag(form)}.onnx")
            r = subprocess.run([cli, "quantize", *opts, "--json", "--force", src, out], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{shape} {form}: scattermoe quantize failed ({r.returncode}): {r.stderr.strip()}")
            rep = json.loads(r.stdout)
            with open(os.path.join(a.work, f"{shape}-{tag(form)}.json"), "w") as fh:
                json.dump(rep, fh, indent=1)
            for p in (out, out + ".data"):
                if os.path.exists(p):
                    os.remove(p)
            print(f"{shape} {form}: {json.dumps(rep['nodes'][0]['errors'])}", file=sys.stderr, flush=True)
    print(table(a.work, a.shapes.split(",")))


def table(work, shapes):
    """The markdown table of the reports in `work`: one row per shape and form, one column per length."""
    lines = []
    for shape in shapes:
        for form in FORMS:
            path = os.path.join(work, f"{shape}-{tag(form)}.json")
            if not os.path.exists(path):
                continue
            errs = json.load(open(path))["nodes"][0]["errors"]
            if not lines:
                lines.append("| shape | form | " + " | ".join(f"{n} token{'s' if n > 1 else ''}" for n, _ in errs) + " |")
                lines.append("|---|---|" + "---:|" * len(errs))
            lines.append(f"| {shape} | {form} | " + " | ".join(f"{e:.2e}" for _, e in errs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
