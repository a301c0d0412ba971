"""Timing, memory and the check's greedy trace (its verdicts: check.py), shared by the ORT and torch columns.

A column is anything with `prefill(ids) -> (last logits [B, V], state)`, `decoder(state, first ids,
max_len)` whose `step()` runs one greedy step on the device and `reset()` returns to the prompt, and
`take_extras()` (the per-layer readings logged since the last call, probe.py; none for a timed column).
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


def greedy_picks(dev, dec, steps):
    """The greedy picks [B, steps] of `steps` decode steps from the prompt (after `reset`), a numpy array."""
    import torch

    dec.reset()
    picks = [dec.step().argmax(-1) for _ in range(steps)]
    dev.sync()
    return torch.stack(picks, 1).cpu().numpy()


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
    """Greedy decode of `steps` tokens from the prompt, untimed. With `force` (the lead column's fed tokens)
    the column is fed those tokens instead of its own picks (teacher forcing), so that every step of every
    column sees the same history and stays comparable. Every torch op here runs on the stream ORT runs on
    (dev.ctx()): the logits are read and the next token written in the order ORT computes them; read
    from another stream they would be an earlier step's (ORT's run returns before its work is done).
    Returns fed tokens [steps], own picks [steps + 1], logits [steps + 1, V] float32 and, where the column
    gives per-layer readings (a checking copy's extra outputs, torch's hooks), their runs' log."""
    import torch

    with dev.ctx():
        col.take_extras()
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
        lg = torch.stack([r[0] for r in rows]).cpu().numpy()
        fed = [int(t[0, 0]) for t in fed[:steps]]
        extras = col.take_extras()
    dev.sync()
    return dict(fed=fed, picks=[int(x) for x in lg.argmax(-1)], logits=lg, extras=extras)
