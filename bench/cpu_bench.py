#!/usr/bin/env python3
"""CPU benchmark: the plugin's ScatterMoE node against the same layer exported as a per-expert loop
of standard ONNX ops, both on ONNX Runtime's CPU execution provider (float32).

    .venv/bin/python bench/cpu_bench.py [--quick] [--threads 2] [--tokens 1,16,128,1024]

Layers (reduced width, so the whole run takes minutes on 2 cores):
  mixtral  Mixtral-8x7B's shape at 1/8 width:    d 512, f 1792, E 8,   k 2, SiLU-gated
  qwen3    Qwen3-30B-A3B's shape at 1/8 width:   d 256, f 96,   E 128, k 8, SiLU-gated
Both models take the same inputs (X, routing weights, routing indices: the router stays outside)
and hold the weights as float32 initializers; the loop graph stores each expert's transposed
weights as its own initializer, as torch.onnx exports nn.Linear. Both pack their constant weights
when the session is created (ORT's MatMul for MLAS, the plugin for its AVX2 kernel; session
creation times include it); --no-prepack runs the plugin with SCATTERMOE_CPU_PREPACK=0, on the
weights as stored.

Each model is timed in a process of its own (one InferenceSession, as an application would run
it: two sessions in one process disturb each other through their thread pools), in rounds that
alternate plugin and loop; a time is the median of the timed runs of one round, and the table shows
the best round. Outputs of the two models are compared on every input (rel err column).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from scattermoe_testing import data, graphs, ort_utils  # noqa: E402
from scattermoe_testing.reference import rel_err  # noqa: E402

LAYERS = {
    "mixtral": dict(d=512, f=1792, E=8, k=2, note="Mixtral-8x7B at 1/8 width"),
    "qwen3": dict(d=256, f=96, E=128, k=8, note="Qwen3-30B-A3B at 1/8 width"),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def layer_weights(name: str, seed: int) -> dict:
    L = LAYERS[name]
    w = data.moe_inputs(np.random.default_rng(seed), T=1, d=L["d"], f=L["f"], E=L["E"], k=L["k"])
    return {"w_in": w["w_in"], "w_out": w["w_out"]}


def layer_feeds(name: str, T: int, seed: int) -> dict:
    L = LAYERS[name]
    rng = np.random.default_rng([seed, T])
    f = data.moe_inputs(rng, T=T, d=L["d"], f=1, E=L["E"], k=L["k"])  # f unused: only X and routing are fed
    return {n: f[n] for n in ("X", "routing_weights", "routing_indices")}


def build_model(name: str, which: str, seed: int):
    L = LAYERS[name]
    inits = layer_weights(name, seed)
    if which == "plugin":
        return graphs.scatter_moe_model(d=L["d"], f=L["f"], E=L["E"], k=L["k"], initializers=inits)
    return graphs.moe_loop_model(d=L["d"], f=L["f"], E=L["E"], k=L["k"], initializers=inits)


def worker(args) -> int:
    """One model, one session, every token count: prints one JSON line."""
    lib = args.lib if args.worker == "plugin" else None
    t0 = time.perf_counter()
    sess = ort_utils.session(build_model(args.layer, args.worker, args.seed), lib, threads=args.threads)
    build_s = time.perf_counter() - t0
    out = {"build_s": build_s, "ms": {}, "runs": {}}
    outputs = {}
    for T in [int(t) for t in args.tokens.split(",")]:
        feeds = layer_feeds(args.layer, T, args.seed)
        outputs[f"T{T}"] = sess.run(None, feeds)[0]
        for _ in range(args.warmup):
            sess.run(None, feeds)
        times = []
        start = time.perf_counter()
        for i in range(args.reps):
            t1 = time.perf_counter()
            sess.run(None, feeds)
            t2 = time.perf_counter()
            times.append(t2 - t1)
            if i >= 2 and t2 - start > args.budget:
                break
        out["ms"][T] = statistics.median(times) * 1e3
        out["runs"][T] = len(times)
    if args.save:
        np.savez(args.save, **outputs)
    print(json.dumps(out))
    return 0


def run_worker(which, layer, args, save) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--layer", layer, "--tokens", args.tokens,
           "--threads", str(args.threads), "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--budget", str(args.budget), "--lib", args.lib, "--seed", str(args.seed), "--save", save]
    env = dict(os.environ)
    if args.no_prepack:
        env["SCATTERMOE_CPU_PREPACK"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} {layer} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 1 warm-up run, at most 5 timed runs")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra_op_num_threads (default 2)")
    ap.add_argument("--tokens", default="1,16,128,1024", help="comma-separated token counts")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layers: " + ", ".join(LAYERS))
    ap.add_argument("--rounds", type=int, default=None, help="alternating plugin/loop rounds (default 3, quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per token count (default 30, quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 3, quick 1)")
    ap.add_argument("--budget", type=float, default=None, help="max seconds of timed runs per token count (default 8, quick 3)")
    ap.add_argument("--lib", default=str(ort_utils.library_path()), help="custom-op library")
    ap.add_argument("--no-prepack", action="store_true", help="plugin without packed weights (SCATTERMOE_CPU_PREPACK=0)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["plugin", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--layer", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.reps = args.reps or (5 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.budget = args.budget or (3.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.worker:
        return worker(args)

    import onnxruntime as ort

    tokens = [int(t) for t in args.tokens.split(",")]
    layers = [name.strip() for name in args.layers.split(",")]
    if not Path(args.lib).exists():
        print(f"custom-op library {args.lib} not found: cargo build --release --workspace (or --lib PATH)", file=sys.stderr)
        return 2

    print("ScatterMoE CPU benchmark: plugin ScatterMoE node vs the per-expert loop graph (standard ONNX ops)")
    print(f"  onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op_num_threads={args.threads}, "
          f"inter_op_num_threads=1, sequential, graph optimizations: all")
    print(f"  dtype float32, weights as initializers, SiLU-gated experts, routing: distinct top-k of random logits, "
          f"softmax weights (seed {args.seed})")
    print(f"  time = median wall time of one InferenceSession.run over up to {args.reps} runs after {args.warmup} warm-up "
          f"runs (at most {args.budget:g} s of timed runs), each model in its own process; best of {rounds} "
          f"alternating round(s)")
    print(f"  machine: {cpu_name()}, {os.cpu_count()} logical CPUs, load average {loadavg()} at start; library {args.lib}"
          + (" (SCATTERMOE_CPU_PREPACK=0)" if args.no_prepack else ""))
    print()

    header = (f"{'layer':<8} {'d':>4} {'f':>5} {'E':>4} {'k':>2} {'tokens':>6} | {'plugin ms':>10} {'loop ms':>10} "
              f"{'loop/plugin':>11} | {'rel err':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in layers:
            L = LAYERS[name]
            res = {"plugin": [], "loop": []}
            for r in range(rounds):
                order = ("plugin", "loop") if r % 2 == 0 else ("loop", "plugin")
                for which in order:
                    res[which].append(run_worker(which, name, args, os.path.join(tmp, f"{which}.npz")))
            outs = {w: np.load(os.path.join(tmp, f"{w}.npz")) for w in ("plugin", "loop")}
            for T in tokens:
                tp = min(x["ms"][str(T)] for x in res["plugin"])
                tl = min(x["ms"][str(T)] for x in res["loop"])
                err = rel_err(outs["plugin"][f"T{T}"], outs["loop"][f"T{T}"])
                rows.append(dict(layer=name, d=L["d"], f=L["f"], E=L["E"], k=L["k"], tokens=T, plugin_ms=tp,
                                 loop_ms=tl, ratio=tl / tp, rel_err=err,
                                 rounds_ms={w: [x["ms"][str(T)] for x in res[w]] for w in res}))
                print(f"{name:<8} {L['d']:>4} {L['f']:>5} {L['E']:>4} {L['k']:>2} {T:>6} | {tp:>10.3f} {tl:>10.3f} "
                      f"{tl / tp:>10.2f}x | {err:>8.1e}", flush=True)
            bp = min(x["build_s"] for x in res["plugin"])
            bl = min(x["build_s"] for x in res["loop"])
            print(f"{'':<8} (session creation: plugin {bp:.2f} s, loop graph {bl:.2f} s)")
    print()
    print("loop/plugin > 1: the plugin is faster. rel err: max|plugin - loop| / max|loop| on that input.")
    print(f"load average at the end: {loadavg()} (other work on the machine makes the times noisy)")
    slower = [r for r in rows if r["ratio"] < 1.0]
    if slower:
        print("plugin slower than the loop graph at: " + ", ".join(f"{r['layer']} T={r['tokens']}" for r in slower))
    if args.json:
        meta = dict(onnxruntime=ort.__version__, threads=args.threads, dtype="float32", reps=args.reps,
                    warmup=args.warmup, rounds=rounds, cpu=cpu_name(), cpus=os.cpu_count(), library=args.lib,
                    prepack=not args.no_prepack)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
