#!/usr/bin/env python3
"""End-to-end benchmark of whole MoE language models: the export as written, the rewritten export,
onnxruntime-genai's builder model and its rewrite on ONNX Runtime, and transformers in torch; one
table, one chart (issue 19). How each column is made and measured: columns.py, export.py, ortrun.py,
measure.py; the device calls: run.sh.

    e2e.py prepare --models mixtral,qwen3,gptoss --dtype fp16 --work DIR --cli scattermoe [--tiny]
    e2e.py bench   --models ... --dtype fp16 --work DIR --lib libscattermoe_ort.so --out OUT [--tiny]
    e2e.py report  --work DIR --out OUT
    e2e.py all     (the three in turn)

`prepare` builds each model (seeded random weights), saves it, exports it, rewrites it, cuts its MoE
blocks out, and runs the builder (GPT-OSS), caching everything in DIR/<model>-<dtype>/. `bench`
measures every column of each prepared model and checks the rewritten models against their
originals; a failed check makes the run exit 3 after its results are written. `report` writes
OUT/e2e.md, e2e.json and e2e.png from every result in DIR/results/.

--tiny shrinks every width (configs.py) and the phases (prefill 64 tokens, decode 8 steps at batch 1
and 4 from 16-token prompts), for ONNX Runtime's CPU execution provider and torch on the CPU (float32:
ORT's CPU kernels have no bfloat16 MatMul, MoE or GroupQueryAttention).
"""

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import configs  # noqa: E402
import export  # noqa: E402

# per-dtype tolerance of the rewritten model's logits against the original's (max |a - b| / max |a|)
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}

PHASES_REAL = dict(prefill=2048, prompt=128, steps=128, batches=(1, 16), check_prompt=32, greedy=32, repeats=3, warmup=8)
PHASES_TINY = dict(prefill=64, prompt=16, steps=8, batches=(1, 4), check_prompt=8, greedy=32, repeats=2, warmup=2)


def log(*a):
    print(f"[e2e {time.strftime('%H:%M:%S')}]", *a, flush=True)


def short(e):
    """One line: the error's type and its last 600 characters (a subprocess's traceback ends with the cause)."""
    return " ".join(f"{type(e).__name__}: {e}".split())[-600:]


# ------------------------------------------------------------------------------------------ prepare
def prepare_one(a, name, dtype):
    import torch

    p = export.paths(a.work, name, dtype)
    os.makedirs(p["root"], exist_ok=True)
    rec = json.load(open(p["prepared"])) if os.path.exists(p["prepared"]) else {}
    rec.update(model=name, dtype=dtype, tiny=a.tiny, seed=a.seed, notes=rec.get("notes", {}))
    tdtype = getattr(torch, dtype)
    device = a.device
    builder = name == "gptoss" and not a.no_builder
    need_ckpt = builder and not os.path.exists(p["builder"])
    if not os.path.exists(p["export"]) or (need_ckpt and not os.path.exists(os.path.join(p["ckpt"], "config.json"))):
        t0 = time.time()
        lm = configs.build(name, a.tiny, tdtype, a.seed, device=device)
        rec["build_s"] = round(time.time() - t0, 1)
        if need_ckpt:  # only the builder reads a checkpoint (the torch column rebuilds from the seed)
            t0 = time.time()
            export.save_checkpoint(lm, lm.config, p["ckpt"])
            rec["save_s"] = round(time.time() - t0, 1)
        if not os.path.exists(p["export"]):
            t0 = time.time()
            rec["export"] = export.export_onnx(lm, lm.config, p["export"], tdtype, device)
            rec["export"]["seconds"] = round(time.time() - t0, 1)
            log(f"{name} {dtype}: exported in {rec['export']['seconds']} s ({rec['export']['nodes']} nodes)")
        del lm
        if device == "cuda":
            torch.cuda.empty_cache()
    extra = a.rewrite_args.split() if a.rewrite_args else []
    if not os.path.exists(p["rewritten"]):
        rep = export.rewrite(a.cli, p["export"], p["rewritten"], extra)
        json.dump(rep, open(os.path.join(p["root"], "rewrite.json"), "w"), indent=1)
        rec["rewrite"] = dict(layers=len(rep["layers"]), seconds=rep["seconds"], families=sorted({x["family"] for x in rep["layers"]}),
                              routers=export.router_outcomes(rep))
        log(f"{name} {dtype}: rewritten, {len(rep['layers'])} layers in {rep['seconds']} s")
    why = type_check(p["export"])
    if why:
        rec["notes"]["type_check"] = f"the export fails ONNX's type check ({why}): ONNX Runtime will likely refuse it"
        log(f"{name} {dtype}: {rec['notes']['type_check']}")
    else:
        rec["notes"].pop("type_check", None)
    if a.spoil:
        rec["spoiled"] = spoil(p["rewritten"], a.spoil, a.spoil_layer, a.spoil_expert)
    rec["nomoe"] = export.cut_moe(p["rewritten"], p["nomoe"])
    if builder:
        try:
            if not os.path.exists(p["builder"]):
                ep = "cuda" if device == "cuda" else "cpu"
                rec["builder"] = export.run_builder(p["ckpt"], os.path.dirname(p["builder"]), dtype, ep, python=a.builder_python,
                                                    pythonpath=a.builder_pythonpath)
                shutil.rmtree(p["ckpt"], ignore_errors=True)  # disk: the device holds one model's files at a time
                log(f"{name} {dtype}: builder model in {rec['builder']['seconds']} s")
            if not os.path.exists(p["builder_rw"]):
                rep = export.rewrite(a.cli, p["builder"], p["builder_rw"], extra)
                json.dump(rep, open(os.path.join(p["root"], "rewrite_builder.json"), "w"), indent=1)
                rec["builder_rewrite"] = dict(layers=len(rep["layers"]), seconds=rep["seconds"], routers=export.router_outcomes(rep))
            if a.spoil:
                rec["spoiled_builder"] = spoil(p["builder_rw"], a.spoil, a.spoil_layer, a.spoil_expert)
            rec["builder_nomoe"] = export.cut_moe(p["builder"], p["builder_nomoe"])
            rec["notes"].pop("builder", None)
        except Exception as e:  # noqa: BLE001 - the builder columns are reported as not run, with the reason
            rec["notes"]["builder"] = "not run: " + short(e)
            log(f"{name} {dtype}: builder columns not available: {short(e)}")
    json.dump(rec, open(p["prepared"], "w"), indent=1)
    return rec


def spoil(path, factor, layer=0, expert=0):
    """Makes a rewritten model wrong on purpose, to show that the check fails on a wrong model and names
    the layer: the ScatterMoE node of MoE layer `layer` gets expert `expert`'s second projection (w_out)
    times `factor` (a Mul on its weight input; every other expert and layer unchanged)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path, load_external_data=False)
    nodes = [(i, n) for i, n in enumerate(m.graph.node) if n.op_type == "ScatterMoE"]
    if layer >= len(nodes):
        raise RuntimeError(f"{path}: no MoE layer {layer} to spoil ({len(nodes)} ScatterMoE nodes)")
    i, n = nodes[layer]
    w = n.input[4]
    dims = next((list(t.dims) for t in m.graph.initializer if t.name == w), None)
    if dims is None or len(dims) != 3:
        raise RuntimeError(f"{path}: {n.name}'s w_out {w} is not a rank-3 initializer")
    scale = np.ones((dims[0], 1, 1), np.float32)
    scale[expert] = factor
    c = onnx.helper.make_node("Constant", [], [w + "/spoil"], value=numpy_helper.from_array(scale, w + "/spoil"))
    ct = onnx.helper.make_node("CastLike", [w + "/spoil", w], [w + "/spoil_t"])
    mul = onnx.helper.make_node("Mul", [w, w + "/spoil_t"], [w + "/spoiled"])
    n.input[4] = w + "/spoiled"
    for j, new in enumerate((c, ct, mul)):
        m.graph.node.insert(i + j, new)
    onnx.save(m, path)
    return dict(node=n.name, layer=layer, expert=expert, factor=factor)


def type_check(path):
    """ONNX's own type check of a graph (strict shape inference, no weights read): None, or the node it
    refuses, e.g. a bfloat16 TopK at opset 18, which ONNX Runtime 1.31 refuses to load too."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False), check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - reported, not fatal: ONNX Runtime decides at bench time
        return " ".join(str(e).split())[:400]
    return None


# ------------------------------------------------------------------------------------------ bench
def bench_one(a, name, dtype):
    import bench_model

    return bench_model.run(a, name, dtype, PHASES_TINY if a.tiny else PHASES_REAL, TOL[dtype], log)


# ------------------------------------------------------------------------------------------ main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("prepare", "bench", "report", "all"))
    ap.add_argument("--models", default="mixtral,qwen3,gptoss")
    ap.add_argument("--dtype", default="", help="fp16, bf16 or fp32 (default fp16; fp32 with --tiny)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="", help="cuda or cpu (default cuda, cpu with --tiny)")
    ap.add_argument("--work", default="/tmp/e2e-work")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/e2e-out"))
    ap.add_argument("--cli", default="target/release/scattermoe")
    ap.add_argument("--lib", default="target/release/libscattermoe_ort.so")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--columns", default="export,rewritten,builder,builder_rw,torch")
    ap.add_argument("--rewrite-args", default="", help="extra arguments of `scattermoe rewrite` (e.g. --no-prove)")
    ap.add_argument("--builder-python", default="", help="the Python that runs onnxruntime-genai's builder (default: this one)")
    ap.add_argument("--builder-pythonpath", default=os.environ.get("E2E_BUILDER_PYTHONPATH", ""),
                    help="folders put first on the builder's PYTHONPATH (where onnxruntime-genai was unpacked)")
    ap.add_argument("--no-builder", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph decode rows")
    ap.add_argument("--gather-budget-gib", type=float, default=8.0,
                    help="gathered expert weights one run of the export as written may ask for (columns.batched_mm_token_limit)")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (default: ORT's; 1 with --tiny)")
    ap.add_argument("--spoil", type=float, default=0.0,
                    help="scale one expert's w_out in the rewritten models (the check must fail and name the layer)")
    ap.add_argument("--spoil-layer", type=int, default=0, help="the MoE layer --spoil changes")
    ap.add_argument("--spoil-expert", type=int, default=0, help="the expert --spoil changes")
    ap.add_argument("--no-layers", action="store_true", help="no per-layer readings in the check (no checking copies)")
    ap.add_argument("--keep", action="store_true", help="keep DIR/<model>-<dtype> after bench (default: removed on a device run)")
    a = ap.parse_args(argv)
    a.dtype = export.DTYPES[a.dtype or ("fp32" if a.tiny else "fp16")]
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    a.threads = a.threads or (1 if a.tiny else 0)
    a.builder_python = a.builder_python or sys.executable
    return a


def main(argv=None):
    a = parse(argv)
    if a.tiny:
        import torch

        torch.set_num_threads(1)
    models = [m for m in a.models.split(",") if m]
    for m in models:
        if m not in configs.MODELS:
            raise SystemExit(f"unknown model {m}: one of {', '.join(configs.MODELS)}")
    failed = []
    if a.cmd in ("prepare", "all"):
        for m in models:
            prepare_one(a, m, a.dtype)
    if a.cmd in ("bench", "all"):
        for m in models:
            res = bench_one(a, m, a.dtype)
            if not res.get("checks_ok", False):
                failed.append(m + (" (nothing checked)" if "check" in res.get("notes", {}) else ""))
    if a.cmd in ("report", "all", "bench"):
        import report

        report.write(a.work, a.out, log)
    if failed:
        log(f"CHECK FAILED: {', '.join(failed)}: a rewritten model does not match its original, or none was checked (see the checks "
            "table and notes)")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
