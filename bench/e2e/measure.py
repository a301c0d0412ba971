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


def greedy_trace(col, dev, prompt, steps):
    """(tokens [steps], logits [steps + 1, V] float32 on the host): the prompt's last logits, then each
    greedy step's. Untimed; the host copies happen after the loop."""
    import torch

    logits, state = col.prefill(prompt)
    first = logits.argmax(-1, keepdim=True)
    dec = col.decoder(state, first, prompt.shape[1] + steps + 1)
    rows = [logits.float().clone()]
    toks = [first.clone()]
    for _ in range(steps):
        rows.append(dec.step().float().clone())
        toks.append(dec.ids.clone())
    dev.sync()
    return [int(t[0, 0]) for t in toks[:steps]], torch.stack([r[0] for r in rows]).cpu().numpy()


def compare(ref, got, tol):
    """The check of a rewritten model against its original: identical greedy tokens, and logits within
    `tol` (max |a - b| / max |a| per step) at every step both have seen the same tokens. Returns a
    record; record['ok'] is the verdict, record['why'] the reason it failed."""
    import numpy as np

    t_ref, l_ref = ref
    t_got, l_got = got
    n = len(t_ref)
    first_diff = next((i for i in range(n) if t_ref[i] != t_got[i]), None)
    upto = n if first_diff is None else first_diff + 1  # logits up to the first differing pick are comparable
    errs = []
    for i in range(min(upto + 1, l_ref.shape[0])):
        a, b = l_ref[i].astype(np.float64), l_got[i].astype(np.float64)
        errs.append(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) if np.isfinite(b).all() else float("inf"))
    worst = max(errs) if errs else 0.0
    rec = dict(steps=n, max_rel_err=worst, tol=tol, tokens_equal=first_diff is None, first_diff=first_diff)
    why = []
    if first_diff is not None:
        row = l_ref[first_diff]
        top = np.sort(row)[-2:]
        why.append(f"greedy tokens differ from step {first_diff} ({t_ref[first_diff]} vs {t_got[first_diff]}; "
                   f"the original's top-2 margin there {float(top[1] - top[0]):.4g}, logits scale {float(np.abs(row).max()):.4g})")
    if worst > tol:
        why.append(f"logits differ: max relative error {worst:.3g} > tolerance {tol:g} (step {int(np.argmax(errs))})")
    rec["ok"] = not why
    rec["why"] = "; ".join(why)
    return rec
