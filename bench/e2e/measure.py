"""Timing, memory and the correctness check, shared by the ORT and torch columns.

A column is anything with `prefill(ids) -> (last logits [B, V], state)` and `decoder(state, first ids,
max_len)` whose `step()` runs one greedy step on the device and `reset()` returns to the prompt.
"""

import statistics
import time


class Device:
    """Synchronisation and memory of the device the columns run on."""

    def __init__(self, kind):
        import torch

        self.torch, self.kind = torch, kind
        self.stream = torch.cuda.Stream() if kind == "cuda" else None

    def sync(self):
        if self.kind == "cuda":
            self.torch.cuda.synchronize()

    def used(self):
        """Bytes in use on the device (every allocator of the process: ORT's arena and torch's)."""
        if self.kind != "cuda":
            return None
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def settle(self):
        import gc

        gc.collect()
        if self.kind == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def ctx(self):
        """Context in which torch ops go to the stream ORT runs on."""
        import contextlib

        return self.torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


def time_decode(dev, dec, steps, repeats, warmup):
    """ms per decode step: `steps` greedy steps from the prompt, timed as a whole (the loop queues on the
    device and is waited for once at the end), median over `repeats`; `warmup` untimed steps first (for
    ORT's CUDA graph they include the capture)."""
    dec.reset()
    for _ in range(warmup):
        dec.step()
    dev.sync()
    ms = []
    for _ in range(repeats):
        dec.reset()
        dev.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step()
        dev.sync()
        ms.append((time.perf_counter() - t0) * 1e3 / steps)
    return dict(ms=statistics.median(ms), runs=[round(x, 4) for x in ms])


def time_prefill(dev, fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    dev.sync()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dev.sync()
        ms.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=statistics.median(ms), runs=[round(x, 4) for x in ms])


def greedy_trace(col, dev, prompt, steps, force=None):
    """Greedy decode of `steps` tokens from the prompt, untimed; the host copies happen after the loop.
    With `force` (another column's fed tokens) the column is fed those tokens instead of its own picks
    (teacher forcing), so that every step of two columns sees the same history and stays comparable.
    Returns (fed tokens [steps], own picks [steps + 1], logits [steps + 1, V] float32)."""
    import torch

    logits, state = col.prefill(prompt)
    first = logits.argmax(-1, keepdim=True)
    if force is not None:
        first = torch.full_like(first, force[0])
    dec = col.decoder(state, first, prompt.shape[1] + steps + 1)
    rows = [logits.float().clone()]
    fed = [first.clone()]
    for i in range(steps):
        rows.append(dec.step().float().clone())
        if force is not None and i + 1 < steps:
            dec.ids.fill_(force[i + 1])
        fed.append(dec.ids.clone())
    dev.sync()
    lg = torch.stack([r[0] for r in rows]).cpu().numpy()
    return dict(fed=[int(t[0, 0]) for t in fed[:steps]], picks=[int(x) for x in lg.argmax(-1)], logits=lg)


# two logits closer than this fraction of the largest one are a tie the dtype cannot order (about
# two roundings of the logits' own precision): a different greedy pick there is not a wrong model
TIE = {"float32": 1e-5, "float16": 2.0**-9, "bfloat16": 2.0**-6}


def compare(ref, got, tol, dtype):
    """The check of a rewritten model (`got`, fed `ref`'s tokens) against its original (`ref`, free
    running): at every step the greedy pick is the same, except where the original's top two logits
    are a tie at the dtype's precision (TIE), and the logits agree within `tol` (max |a - b| / max |a|).
    Identical picks at every step are identical greedy tokens: `got` run free would generate `ref`'s.
    Returns a record; record['ok'] is the verdict, record['why'] the reason it failed."""
    import numpy as np

    la, lb = ref["logits"], got["logits"]
    n = min(la.shape[0], lb.shape[0])
    same_history = got["fed"] == ref["fed"][: len(got["fed"])]
    if not same_history:  # rows up to the first different token fed are comparable (row i follows tokens 0..i-1)
        n = min(n, next(i for i, (x, y) in enumerate(zip(ref["fed"], got["fed"])) if x != y) + 1)
    errs, ties, wrong = [], [], []
    for i in range(n):
        a, b = la[i].astype(np.float64), lb[i].astype(np.float64)
        scale = max(np.abs(a).max(), 1e-30)
        errs.append(float(np.abs(a - b).max() / scale) if np.isfinite(b).all() else float("inf"))
        pa, pb = ref["picks"][i], got["picks"][i]
        if pa != pb:
            margin = float(a[pa] - a[pb])
            (ties if margin <= TIE[dtype] * scale else wrong).append(dict(step=i, ref=pa, got=pb, margin=margin, scale=float(scale)))
    worst = max(errs) if errs else 0.0
    rec = dict(steps=n, max_rel_err=worst, tol=tol, tokens_equal=not ties and not wrong, ties=ties, mismatches=wrong,
               same_history=same_history)
    why = []
    if not same_history:
        why.append("not fed the reference's tokens")
    if wrong:
        w = wrong[0]
        why.append(f"greedy picks differ at {len(wrong)} step(s), first at step {w['step']} ({w['ref']} vs {w['got']}; the original's "
                   f"margin there {w['margin']:.4g} of logits up to {w['scale']:.4g}, above a {dtype} tie)")
    if worst > tol:
        why.append(f"logits differ: max relative error {worst:.3g} > tolerance {tol:g} (step {int(np.argmax(errs))})")
    rec["ok"] = not why
    rec["why"] = "; ".join(why)
    return rec
