"""Time the full ScatterMoE forward (bf16, SwiGLU, gate_up) against torch._grouped_mm and the floor.

usage: python3 tests/gpu/bench_forward.py --fatbin-dir DIR [--shapes mixtral,qwen3,fine] [--tokens ...]
Each measurement: a CUDA graph holding SETS forwards over different inputs/routings (so small
token counts do not just re-read L2), replayed REPS times between CUDA events; median / SETS.
"""
import argparse
import json
import math
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "bench"))
from peers.timing import graph_ms  # noqa: E402  (the benchmark's CUDA-graph timer)
from peers.torch_gmm import forward as torch_moe  # noqa: E402  (the benchmark's torch._grouped_mm peer)
from smoe_cuda import Kernels  # noqa: E402

SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "fine": (1024, 512, 64, 8),
          "deepseek_v3": (7168, 2048, 256, 8), "gpt_oss": (2880, 2880, 128, 4), "gpt_oss20": (2880, 2880, 32, 4),
          "olmoe": (2048, 1024, 64, 8), "qwen2_moe": (2048, 1408, 60, 4), "granite": (1024, 512, 32, 8),
          "phimoe": (4096, 6400, 16, 2), "dbrx": (6144, 10752, 16, 4)}
FLOPS_PEAK, BW_PEAK = 792e12, 4.30e12
SETS = 4
SMALL_ONLY = ("32x32", "32x64s6")


def graph_time(fn, max_reps=40):
    """ms per forward: fn runs SETS forwards, timed as one CUDA graph (bench/peers/timing.py)."""
    return graph_ms([fn], budget_s=0.4, max_reps=max_reps) / SETS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fatbin-dir", default="target/scattermoe-kernels")
    ap.add_argument("--shapes", default="mixtral,qwen3,fine")
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    ap.add_argument("--cfgs", default="128x128,wgmma_ws,wgmma_mc,32x64,32x64s6,32x32")
    ap.add_argument("--json", default="")
    ap.add_argument("--only-auto", action="store_true",
                    help="time the automatic choice only (no stages, no forced configurations, no torch)")
    a = ap.parse_args()
    K = Kernels(a.fatbin_dir)
    dt = torch.bfloat16
    rows = []
    for shape in a.shapes.split(","):
        d, f, E, k = SHAPES[shape]
        torch.manual_seed(0)
        w1 = (torch.randn(E, 2 * f, d, device="cuda", dtype=dt) / math.sqrt(d))
        w2 = (torch.randn(E, d, f, device="cuda", dtype=dt) / math.sqrt(f))
        w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
        for T in [int(t) for t in a.tokens.split(",")]:
            ins = []
            for _ in range(SETS):
                x = torch.randn(T, d, device="cuda", dtype=dt)
                ri = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.to(torch.int32).contiguous()
                rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dt)
                ins.append((x, ri, rw, K.alloc_forward(T, k, E, d, f, dt)))
            used = sum(torch.unique(i[1]).numel() for i in ins) / SETS
            flops = 2 * T * k * (d * 2 * f + f * d)
            byts = used * (2 * f * d + d * f) * 2 + 2 * T * d * 2
            floor = max(flops / FLOPS_PEAK, byts / BW_PEAK) * 1e3
            row = dict(shape=shape, T=T, floor_ms=floor)
            # correctness spot check vs torch path (bf16 both): relative error
            x, ri, rw, bufs = ins[0]
            y = K.forward(x, rw, ri, w1, w2, None, None, bufs).float()
            try:
                yt = torch_moe(x, rw, ri.long(), w1t, w2t).float()
                row["err_vs_torch"] = ((y - yt).abs().max() / yt.abs().max().clamp_min(1e-30)).item()
            except Exception as ex:  # noqa: BLE001
                row["torch_error"] = repr(ex)[:200]
            fwd = lambda **kw: [K.forward(x_, rw_, ri_, w1, w2, None, None, b_, **kw)  # noqa: E731
                                for (x_, ri_, rw_, b_) in ins]
            row["ours_auto"] = graph_time(lambda: fwd())
            if a.only_auto:
                rows.append(row)
                print(json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}), flush=True)
                del ins
                torch.cuda.empty_cache()
                continue
            for st in ("route", "g1", "g2", "comb"):
                row[f"stage_{st}"] = graph_time(lambda: fwd(stages=(st,)), max_reps=20)
            rows_per_expert = T * k / min(E, T * k)
            for cfg in a.cfgs.split(","):
                if cfg in SMALL_ONLY and rows_per_expert > 1024:
                    continue
                for st, key in (("g1", "cfg1"), ("g2", "cfg2")):
                    try:
                        row[f"{st}_{cfg}"] = graph_time(lambda: fwd(stages=(st,), **{key: cfg}), max_reps=20)
                    except Exception as ex:  # noqa: BLE001
                        print("ERR", cfg, st, repr(ex)[:200])
            g1 = {c: row[f"g1_{c}"] for c in a.cfgs.split(",") if f"g1_{c}" in row}
            g2 = {c: row[f"g2_{c}"] for c in a.cfgs.split(",") if f"g2_{c}" in row}
            b1, b2 = min(g1, key=g1.get), min(g2, key=g2.get)
            row["best_g1"], row["best_g2"] = b1, b2
            row["ours_best_sum"] = row["stage_route"] + g1[b1] + g2[b2] + row["stage_comb"]
            if "torch_error" not in row:
                try:
                    ril = [i[1].long() for i in ins]
                    row["torch_grouped_mm"] = graph_time(lambda: [torch_moe(x_, rw_, r_, w1t, w2t)
                                                                  for (x_, _, rw_, _), r_ in zip(ins, ril)])
                except Exception as ex:  # noqa: BLE001
                    row["torch_error"] = repr(ex)[:200]
            rows.append(row)
            print(json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}),
                  flush=True)
            del ins
            torch.cuda.empty_cache()
        del w1, w2, w1t, w2t
        torch.cuda.empty_cache()
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    print("\nshape    tokens  floor  ours(auto) ours(best-cfg sum) torch_gmm auto/floor auto/torch  "
          "route/g1/g2/comb (auto, ms)   best g1 / g2 cfg")
    for r in rows:
        if "stage_route" not in r:
            print(f"{r['shape']:<8s} {r['T']:>6d} {r['floor_ms']:7.3f} {r['ours_auto']:8.3f}")
            continue
        tg = r.get("torch_grouped_mm", float("nan"))
        print(f"{r['shape']:<8s} {r['T']:>6d} {r['floor_ms']:7.3f} {r['ours_auto']:8.3f} {r['ours_best_sum']:12.3f}"
              f" {tg:14.3f} {r['ours_auto'] / r['floor_ms']:8.2f} {r['ours_auto'] / tg:9.2f}   "
              f"{r['stage_route']:.3f}/{r['stage_g1']:.3f}/{r['stage_g2']:.3f}/{r['stage_comb']:.3f}"
              f"   {r['best_g1']} / {r['best_g2']}")


if __name__ == "__main__":
    main()
