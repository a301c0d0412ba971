"""Routing kernels A/B: per-call GPU time of the routing launches (count + scan + scatter, or the one-block
kernel), each build in turn over three rounds: a CUDA graph of 50 calls, replayed 7 times, median.
usage (device, project root): python3 tests/gpu/time_routing.py DIR_A,DIR_B  (fatbin directories)"""
import os, sys

import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from smoe_cuda import Kernels
dirs = sys.argv[1].split(",")
builds = [(d.rstrip("/").split("/")[-1], Kernels(d)) for d in dirs]
shapes = [(1, 8, 2), (128, 128, 8), (512, 128, 8), (1024, 128, 8), (4096, 128, 8), (16384, 128, 8), (4096, 8, 2), (16384, 8, 2), (1024, 64, 8)]
res = {}
for rnd in range(3):
    for T, E, k in shapes:
        torch.manual_seed(T)
        ri = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.to(torch.int32).contiguous()
        for tag, K in (builds if rnd % 2 == 0 else builds[::-1]):
            b = K.alloc_routing(T, k, E)
            K.routing(ri, E, b); torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                with torch.cuda.graph(g, stream=s):
                    for _ in range(50):
                        K.routing(ri, E, b)
            g.replay(); torch.cuda.synchronize()
            ts = []
            for _ in range(7):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
                ts.append(e0.elapsed_time(e1) * 1000 / 50)
            res.setdefault((T, E, k, tag), []).append(sorted(ts)[3])
print("T E k | " + " | ".join(t for t, _ in builds) + "   (us per routing call, median of 7 graph replays of 50 calls, per round)")
for T, E, k in shapes:
    print(f"{T} {E} {k} | " + " | ".join(" ".join(f"{v:6.2f}" for v in res[(T, E, k, t)]) for t, _ in builds))
