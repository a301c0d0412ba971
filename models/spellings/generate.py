"""Property-based generator of hand-written MoE spellings: dense, capacity (Switch/GShard),
Megablocks-style and (from seed 7000) per-expert loop layers written in plain torch the ways people
write them. Every seed draws one
spelling (the choices below) and exports it; a new spelling is a new seed, not new code.

    /path/to/torch/python models/spellings/generate.py --seeds 0-47 --out models/spellings
    /path/to/torch/python models/spellings/generate.py --seeds 1000-1999 --out /tmp/spellings
    /path/to/torch/python models/spellings/generate.py --seeds 49-94:3 --merge   # add seeds to the corpus
    /path/to/torch/python models/spellings/generate.py --seeds 49-94:3 --dtype float16 --merge   # NAME_f16

Writes NAME.onnx (TorchScript or dynamo exporter, per seed), NAME.npz (x_S, y_S for S in 1, 7 and
the traced length, torch's outputs in the model's dtype) and index.json (each model's choices, or why torch
could not export it, or why ONNX Runtime refuses what torch wrote: the dynamo exporter at opset 17
writes some opset-18 attributes, e.g. Split's num_outputs). Needs torch (2.11 here), onnx and
onnxruntime; the tests read only the files. `tally.py` counts each choice's outcomes from a test log.

`--dtype float16` draws the same spellings (a seed's choices do not depend on it) with float16
weights, inputs and outputs, named NAME_f16 (entry `dtype`: "float16").
"""

import argparse
import json
import os
import random
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TRACED = 16
LENGTHS = (1, 7, TRACED)
DTYPE = torch.float32  # --dtype


def act_fn(name):
    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }[name]


class Experts(nn.Module):
    """Stacked expert weights in the layout a spelling asks for; `mlp(h)` applies them to
    per-expert rows h [..., E, R, d] (expert axis third from the end, or given by `axis`)."""

    def __init__(self, E, d, f, act, gated, bias):
        super().__init__()
        self.E, self.d, self.f, self.gated, self.bias = E, d, f, gated, bias
        n = 2 * f if gated else f
        self.w1 = nn.Parameter(torch.randn(E, d, n) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(E, f, d) / f**0.5)
        self.b1 = nn.Parameter(torch.randn(E, n) * 0.1) if bias else None
        self.b2 = nn.Parameter(torch.randn(E, d) * 0.1) if bias else None
        self.act = act_fn(act)

    def inner(self, h):
        if self.gated:
            g, u = h.chunk(2, dim=-1)
            return self.act(g) * u
        return self.act(h)


class Router(nn.Module):
    def __init__(self, d, E, k, form):
        super().__init__()
        self.proj = nn.Linear(d, E, bias=False)
        self.k, self.form = k, form

    def forward(self, x):
        logits = self.proj(x)
        if self.form == "softmax_topk_renorm":
            w, idx = torch.topk(torch.softmax(logits, dim=-1), self.k, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)
        elif self.form == "softmax_topk":
            w, idx = torch.topk(torch.softmax(logits, dim=-1), self.k, dim=-1)
        elif self.form in ("softmax32_topk_renorm", "softmax32_topk"):
            # Qwen2/3, OLMoE: the probabilities in float32 whatever the logits' type, the weights
            # cast back (TorchScript writes a Softmax in the logits' type and a Cast after it)
            w, idx = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), self.k, dim=-1)
            if self.form == "softmax32_topk_renorm":
                w = w / w.sum(dim=-1, keepdim=True)
            w = w.to(logits.dtype)
        else:  # topk_softmax
            w, idx = torch.topk(logits, self.k, dim=-1)
            w = torch.softmax(w, dim=-1)
        return w, idx


# ------------------------------------------------------------------------------------------------
# Dense: every expert for every token
# ------------------------------------------------------------------------------------------------


class DenseMoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.router = Router(c["d"], c["E"], c["k"], c["router"])
        self.ex = Experts(c["E"], c["d"], c["f"], c["act"], c["gated"], c["bias"])

    def gates(self, x, w, idx):
        E = self.c["E"]
        if self.c["gate"] == "scatter":
            return torch.zeros(x.shape[:-1] + (E,), dtype=x.dtype).scatter(-1, idx, w)
        # one-hot of each choice weighted and summed over k
        return (F.one_hot(idx, E).to(x.dtype) * w.unsqueeze(-1)).sum(dim=-2)

    def forward(self, x):
        c, ex = self.c, self.ex
        shape = x.shape
        if c["tokens"] == "flatten":  # tokens as rows [T, d] instead of the kept batch axes
            x = x.reshape(-1, shape[-1])
        y = self.moe(x)
        return y.reshape(shape)

    def moe(self, x):
        c, ex = self.c, self.ex
        w, idx = self.router(x)
        gates = self.gates(x, w, idx)  # [..., E]
        if c["compute"] == "einsum":
            h = torch.einsum("...d,edn->...en", x, ex.w1)
            if ex.bias:
                h = h + ex.b1
            h = ex.inner(h)
            y = torch.einsum("...ef,efd->...ed", h, ex.w2)
            if ex.bias:
                y = y + ex.b2
            # y: [..., E, d]
        else:  # matmul: rows broadcast over a new expert axis [..., E, R, d]
            h = torch.matmul(x.unsqueeze(-3), ex.w1)
            if ex.bias:
                h = h + ex.b1.unsqueeze(-2)
            h = ex.inner(h)
            y = torch.matmul(h, ex.w2)
            if ex.bias:
                y = y + ex.b2.unsqueeze(-2)
            y = y.transpose(-3, -2)  # [..., R, E, d]
        if c["combine"] == "einsum":
            return torch.einsum("...e,...ed->...d", gates, y)
        if c["combine"] == "mulsum":
            return (y * gates.unsqueeze(-1)).sum(dim=-2)
        return torch.matmul(gates.unsqueeze(-2), y).squeeze(-2)


# ------------------------------------------------------------------------------------------------
# Capacity: Switch/GShard top-1 or top-2 with a fixed capacity per expert
# ------------------------------------------------------------------------------------------------


class CapacityMoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.router = nn.Linear(c["d"], c["E"], bias=False)
        self.ex = Experts(c["E"], c["d"], c["f"], c["act"], c["gated"], c["bias"])

    def experts(self, xin):
        ex = self.ex
        h = torch.matmul(xin, ex.w1)
        if ex.bias:
            h = h + ex.b1.unsqueeze(1)
        h = ex.inner(h)
        out = torch.matmul(h, ex.w2)
        if ex.bias:
            out = out + ex.b2.unsqueeze(1)
        return out

    def forward(self, x):
        c, ex = self.c, self.ex
        E, C = c["E"], c["C"]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T = x.shape[0]
        if c["k"] == 2:
            return self.top2(x).reshape(shape)
        probs = torch.softmax(self.router(x), dim=-1)
        if c["choice"] == "max":
            gate, idx = torch.max(probs, dim=-1)
        else:
            idx = torch.argmax(probs, dim=-1)
            gate = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        if c["mask"] == "onehot":
            mask = F.one_hot(idx, E).to(x.dtype)  # [T, E]
        elif c["mask"] == "scatter":
            mask = torch.zeros(T, E, dtype=x.dtype).scatter(1, idx.unsqueeze(1), 1.0)
        else:  # comparison with an arange
            mask = (idx.unsqueeze(-1) == torch.arange(E)).to(x.dtype)
        if c["gate"] == "masked_sum":  # the chosen probability as a masked sum
            gate = (probs * mask).sum(dim=-1)
        if c["positions"] == "cumsum_mul":
            pos = torch.cumsum(mask, dim=0) * mask - 1.0
            pos_tok = pos.sum(dim=-1) + (E - 1)  # the chosen expert's entry (others are -1)
        elif c["positions"] == "exclusive":  # exclusive count of earlier tokens of the same expert
            pos_tok = ((torch.cumsum(mask, dim=0) - mask) * mask).sum(dim=-1)
        else:  # the running count gathered at the chosen expert
            pos_tok = (torch.cumsum(mask, dim=0) - 1).gather(1, idx.unsqueeze(1)).squeeze(1)
        kept = (pos_tok < C).to(x.dtype)  # [T]
        if c["slot"] == "clip_onehot":
            slot = F.one_hot(pos_tok.clamp(0, C - 1).long(), C).to(x.dtype)  # [T, C]
            dispatch = mask.unsqueeze(-1) * slot.unsqueeze(1) * kept[:, None, None]  # [T, E, C]
        else:  # a comparison with the slot numbers: a position >= C matches none
            slot = (pos_tok.unsqueeze(-1) == torch.arange(C)).to(x.dtype)
            dispatch = mask.unsqueeze(-1) * slot.unsqueeze(1)
            if c["kept_mul"]:
                dispatch = dispatch * kept[:, None, None]
        combine = dispatch * gate[:, None, None]
        y = self.through_slots(x, dispatch, combine, T)
        if c["overflow"] == "pass":
            y = y + x * (1.0 - kept).unsqueeze(-1)
        return y.reshape(shape)

    def top2(self, x):
        """GShard top-2: the second choice is the best expert but the first; its positions come
        after every first choice of its expert (`offset = "missing"` spoils that on purpose:
        first and second choices then share slots, which no op computes)."""
        c = self.c
        E, C = c["E"], c["C"]
        T = x.shape[0]
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1)
        idx1 = torch.argmax(probs, dim=-1)
        mask1 = F.one_hot(idx1, E).to(x.dtype)
        if c["second"] == "mul":  # the first choice's probability zeroed
            idx2 = torch.argmax(probs * (1.0 - mask1), dim=-1)
        else:  # the first choice's logit masked to -inf
            idx2 = torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=-1)
        mask2 = F.one_hot(idx2, E).to(x.dtype)
        g1 = (probs * mask1).sum(dim=-1)
        g2 = (probs * mask2).sum(dim=-1)
        # fairscale clamps at the type's eps; 1e-9 (kept for float32, whose corpus was made with it)
        # is zero in float16, where a token with both choices dropped would get 0 / 0
        tiny = 1e-9 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps
        if c["norm"] == "before":
            denom = torch.clamp(g1 + g2, min=tiny)
            g1, g2 = g1 / denom, g2 / denom
        pos1 = torch.cumsum(mask1, dim=0) - 1.0
        pos2 = torch.cumsum(mask2, dim=0) - 1.0
        if c["offset"] == "counts":
            pos2 = pos2 + mask1.sum(dim=0, keepdim=True)
        mask1 = mask1 * (pos1 < C).to(x.dtype)
        mask2 = mask2 * (pos2 < C).to(x.dtype)
        if c["norm"] == "after":  # fairscale: the gates of the kept choices, renormalised
            g1 = (probs * mask1).sum(dim=-1)
            g2 = (probs * mask2).sum(dim=-1)
            denom = torch.clamp(g1 + g2, min=tiny)
            g1, g2 = g1 / denom, g2 / denom
        p1 = (pos1 * mask1).sum(dim=-1)
        p2 = (pos2 * mask2).sum(dim=-1)
        if c["slot"] == "clip_onehot":
            s1 = F.one_hot(p1.long(), C).to(x.dtype)
            s2 = F.one_hot(p2.long(), C).to(x.dtype)
        else:
            s1 = (p1.unsqueeze(-1) == torch.arange(C)).to(x.dtype)
            s2 = (p2.unsqueeze(-1) == torch.arange(C)).to(x.dtype)
        d1 = mask1.unsqueeze(-1) * s1.unsqueeze(1)  # [T, E, C]
        d2 = mask2.unsqueeze(-1) * s2.unsqueeze(1)
        dispatch = d1 + d2
        if c["combine_form"] == "gate_dispatch":
            combine = g1[:, None, None] * d1 + g2[:, None, None] * d2
        else:  # fairscale: gate times mask [T, E], then times the slots
            combine = (g1.unsqueeze(-1) * mask1).unsqueeze(-1) * s1.unsqueeze(1) + (g2.unsqueeze(-1) * mask2).unsqueeze(-1) * s2.unsqueeze(1)
        return self.through_slots(x, dispatch, combine, T)

    def through_slots(self, x, dispatch, combine, T):
        """The experts over the slots: T tokens dispatched into per-expert buffers [E, C, d] (einsum
        or MatMul, as the case says), each expert's MLP, outputs combined back into tokens. (T is
        the caller's: reading x.shape again would add nodes to the traced graph.)"""
        c = self.c
        E, C = c["E"], c["C"]
        if c["dispatch"] == "einsum":
            xin = torch.einsum("tec,td->ecd", dispatch, x)
        else:
            xin = torch.matmul(dispatch.reshape(T, E * C).t(), x).reshape(E, C, -1)
        out = self.experts(xin)
        if c["combine"] == "einsum":
            return torch.einsum("tec,ecd->td", combine, out)
        return torch.matmul(combine.reshape(T, E * C), out.reshape(E * C, -1))


# ------------------------------------------------------------------------------------------------
# Megablocks-style: sort by expert, bin, batched MatMul, un-permute
# ------------------------------------------------------------------------------------------------


class MegablocksMoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.router = Router(c["d"], c["E"], c["k"], c["router"])
        self.ex = Experts(c["E"], c["d"], c["f"], c["act"], c["gated"], c["bias"])

    def forward(self, x):
        c, ex = self.c, self.ex
        E, k = c["E"], c["k"]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, d = x.shape
        w, idx = self.router(x)
        flat = idx.reshape(-1)
        N = flat.shape[0]
        if c["sort"] == "sort":
            sorted_e, order = torch.sort(flat)
        elif c["sort"] == "topk":  # TopK of the smallest over the whole length
            sorted_e, order = torch.topk(flat, N, largest=False)
        else:
            order = torch.argsort(flat)
            sorted_e = flat[order]
        tok = torch.div(order, k, rounding_mode="floor") if c["tokdiv"] == "div" else order // k
        xs = x[tok] if c["gather"] == "index" else x.index_select(0, tok)
        if c["hist"] == "onehot":
            counts = F.one_hot(flat, E).sum(dim=0)
        elif c["hist"] == "scatter_add":
            counts = torch.zeros(E, dtype=torch.long).scatter_add(0, flat, torch.ones_like(flat))
        else:
            counts = torch.bincount(flat, minlength=E)
        if c["positions"] == "cumsum_onehot":
            oh = F.one_hot(sorted_e, E)
            pos = (torch.cumsum(oh, dim=0) - 1).gather(1, sorted_e.unsqueeze(1)).squeeze(1)
        else:  # position = sorted index - first index of the expert's bin
            starts = torch.cumsum(counts, dim=0) - counts
            pos = torch.arange(N) - starts[sorted_e]
        if c["buffer"] == "padded":
            buf = torch.zeros(E, N, d, dtype=x.dtype).index_put((sorted_e, pos), xs)
        else:  # one flat buffer of E*N rows, viewed per expert
            buf = torch.zeros(E * N, d, dtype=x.dtype).index_copy(0, sorted_e * N + pos, xs).view(E, N, d)
        if c["bmm"] == "bmm":
            h = torch.bmm(buf, ex.w1)
        elif c["bmm"] == "matmul":
            h = torch.matmul(buf, ex.w1)
        else:
            h = torch.einsum("end,edf->enf", buf, ex.w1)
        if ex.bias:
            h = h + ex.b1.unsqueeze(1)
        h = ex.inner(h)
        o = torch.bmm(h, ex.w2) if c["bmm"] == "bmm" else torch.matmul(h, ex.w2)
        if ex.bias:
            o = o + ex.b2.unsqueeze(1)
        if c["readback"] == "index":
            ys = o[sorted_e, pos]
        else:
            ys = o.reshape(E * N, d)[sorted_e * N + pos]
        if c["unpermute"] == "index_copy":
            y = torch.zeros_like(ys).index_copy(0, order, ys)
        elif c["unpermute"] == "scatter":
            y = torch.zeros_like(ys).scatter(0, order.unsqueeze(1).expand(-1, d), ys)
        elif c["unpermute"] == "index_add":  # order is a permutation: adding into zeros is copying
            y = torch.zeros_like(ys).index_add(0, order, ys)
        elif c["unpermute"] == "index_put":
            y = torch.zeros_like(ys)
            y[order] = ys
        else:  # gather by the inverse permutation
            y = ys[torch.argsort(order)]
        y = y.view(T, k, d)
        if c["combine"] == "mulsum":
            out = (y * w.unsqueeze(-1)).sum(dim=1)
        elif c["combine"] == "einsum":
            out = torch.einsum("tk,tkd->td", w, y)
        else:
            out = torch.bmm(w.unsqueeze(1), y).squeeze(1)
        return out.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Per-expert loops: for each expert, its tokens' rows through its MLP, added back (seeds from 7000)
# ------------------------------------------------------------------------------------------------


class LoopMoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        E, d, f = c["E"], c["d"], c["f"]
        self.router = Router(d, E, c["k"], c["router"])
        if c["weights"] == "stacked":
            self.ex = Experts(E, d, f, c["act"], c["gated"], c["bias"])
        else:  # one nn.Linear per projection and expert, as transformers 4's Mixtral
            n = 2 * f if c["gated"] and c["weights"] == "modules_fused" else f
            self.w1 = nn.ModuleList([nn.Linear(d, n, bias=c["bias"]) for _ in range(E)])
            self.w3 = nn.ModuleList([nn.Linear(d, f, bias=c["bias"]) for _ in range(E)]) if c["gated"] and c["weights"] == "modules" else None
            self.w2 = nn.ModuleList([nn.Linear(f, d, bias=c["bias"]) for _ in range(E)])
            self.act = act_fn(c["act"])

    def mlp(self, e, h):
        c = self.c
        if c["weights"] == "stacked":
            ex = self.ex
            a = h @ ex.w1[e] + (ex.b1[e] if ex.bias else 0)
            return ex.inner(a) @ ex.w2[e] + (ex.b2[e] if ex.bias else 0)
        if not c["gated"]:
            return self.w2[e](self.act(self.w1[e](h)))
        if self.w3 is not None:
            return self.w2[e](self.act(self.w1[e](h)) * self.w3[e](h))
        g, u = self.w1[e](h).chunk(2, dim=-1)
        return self.w2[e](self.act(g) * u)

    def forward(self, x):
        c = self.c
        E, k = c["E"], c["k"]
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T, d = x.shape
        w, idx = self.router(x)
        if c["zeros"] == "zeros_like":
            out = torch.zeros_like(x)
        elif c["zeros"] == "zeros_shape":  # transformers 4: torch.zeros((batch * seq, hidden))
            out = torch.zeros((shape[0] * shape[1] if len(shape) == 3 else shape[0], d), dtype=x.dtype)
        else:
            out = x.new_zeros(x.shape)
        gate = torch.zeros(T, E, dtype=x.dtype).scatter(1, idx, w) if c["weight"] == "dense_gate" else None
        mask = F.one_hot(idx, E).permute(2, 1, 0) if c["mask"] == "onehot" else None
        if c["iterate"] == "hit":  # the experts with tokens, as transformers 4.5x iterates them
            # (`for e in expert_hit`: TorchScript unrolls the traced list, the dynamo exporter refuses it)
            hits = (F.one_hot(idx, E).permute(2, 1, 0).sum(dim=(-1, -2)) > 0).nonzero()
            experts = [e[0] for e in hits]
        else:
            experts = list(range(E))
        for e in experts:
            if c["mask"] == "onehot":
                m = mask[e]  # [k, T]
                slot, tok = torch.where(m) if c["coords"] == "where" else m.nonzero().unbind(1)
            else:
                m = idx == e  # [T, k]
                tok, slot = torch.where(m) if c["coords"] == "where" else m.nonzero().unbind(1)
            if c["rows"] == "index":
                h = x[tok]
            elif c["rows"] == "index_select":
                h = x.index_select(0, tok)
            else:
                h = x[None, tok].reshape(-1, d)
            if c["weight"] == "pair":
                wt = w[tok, slot, None]
            elif c["weight"] == "flat":
                wt = w.reshape(-1)[tok * k + slot].unsqueeze(-1)
            else:
                wt = gate[tok, e].unsqueeze(-1)
            y = self.mlp(e, h) * wt
            if c["add"] == "index_add":
                out.index_add_(0, tok, y)
            elif c["add"] == "index_put":
                out.index_put_((tok,), y, accumulate=True)
            else:
                out.scatter_add_(0, tok.unsqueeze(1).expand(-1, d), y)
        return out.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Drawing a spelling from a seed
# ------------------------------------------------------------------------------------------------


def draw(seed):
    r = random.Random(seed)
    family = ["dense", "capacity", "megablocks"][seed % 3]
    if seed >= 7000 and seed % 4 == 3:  # per-expert loops from seed 7000 on; earlier seeds keep their family
        family = "loop"
    E = r.choice([2, 3, 4, 6, 8])
    c = dict(
        family=family,
        E=E,
        d=r.choice([8, 16, 24]),
        f=r.choice([8, 16, 32]),
        act=r.choice(["silu", "gelu", "gelu_tanh", "relu"]),
        gated=r.random() < 0.5,
        bias=r.random() < 0.4,
        rank=r.choice([2, 3]),
        exporter=r.choice(["torchscript", "torchscript", "dynamo"]),
        opset=r.choice([17, 18]),
    )
    if family == "capacity":
        c.update(k=1, C=r.choice([2, 3, 4, 6]), choice=r.choice(["max", "argmax"]),
                 positions=r.choice(["cumsum_mul", "exclusive", "gather"]), dispatch=r.choice(["einsum", "matmul"]),
                 combine=r.choice(["einsum", "matmul"]), overflow=r.choice(["drop", "pass"]),
                 mask=r.choice(["onehot", "scatter", "eq"]), gate=r.choice(["value", "masked_sum"]),
                 slot=r.choice(["clip_onehot", "compare"]), kept_mul=r.random() < 0.5)
        # top-2 (GShard) from seed 48 on; earlier seeds keep the top-1 corpus they were made with
        if seed >= 48 and r.random() < 0.75:
            c.update(k=2, second=r.choice(["mul", "fill"]), norm=r.choice(["none", "before", "after"]),
                     combine_form=r.choice(["gate_dispatch", "fairscale"]),
                     offset="missing" if r.random() < 0.2 else "counts")
            for key in ("choice", "mask", "gate", "positions", "kept_mul", "overflow"):  # top-1 choices only
                del c[key]
    else:
        routers = ["softmax_topk_renorm", "softmax_topk", "topk_softmax"]
        if seed >= 7800:  # float32 probabilities of 16-bit logits from seed 7800 on; earlier seeds keep theirs
            routers += ["softmax32_topk_renorm", "softmax32_topk"]
        c.update(k=r.randint(1, min(3, E)), router=r.choice(routers))
    if family == "dense":
        c.update(gate=r.choice(["scatter", "onehot"]), compute=r.choice(["einsum", "matmul"]),
                 combine=r.choice(["einsum", "mulsum", "matmul"]), tokens=r.choice(["kept", "flatten"]))
    if family == "loop":
        c.update(weights=r.choice(["stacked", "modules", "modules_fused"]), zeros=r.choice(["zeros_like", "zeros_shape", "new_zeros"]),
                 mask=r.choice(["onehot", "eq"]), coords=r.choice(["where", "nonzero"]), iterate=r.choice(["range", "hit"]),
                 rows=r.choice(["index", "index_select", "none_index"]), weight=r.choice(["pair", "flat", "dense_gate"]),
                 add=r.choice(["index_add", "index_put", "scatter_add"]))
    if family == "megablocks":
        c.update(sort=r.choice(["sort", "argsort", "topk"]), hist=r.choice(["onehot", "scatter_add", "bincount"]),
                 positions=r.choice(["cumsum_onehot", "offsets"]), buffer=r.choice(["padded", "flat"]),
                 bmm=r.choice(["bmm", "matmul", "einsum"]), readback=r.choice(["index", "flat"]),
                 unpermute=r.choice(["index_copy", "scatter", "inverse", "index_add", "index_put"]),
                 combine=r.choice(["mulsum", "einsum", "bmm"]), gather=r.choice(["index", "index_select"]),
                 tokdiv=r.choice(["div", "floordiv"]))
    return c


def build(c):
    return {"dense": DenseMoE, "capacity": CapacityMoE, "megablocks": MegablocksMoE, "loop": LoopMoE}[c["family"]](c).eval()


def export(model, c, x, path):
    seq_axis = 1 if c["rank"] == 3 else 0
    with torch.no_grad():
        if c["exporter"] == "torchscript":
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=c["opset"],
                              input_names=["hidden_states"], output_names=["output"],
                              dynamic_axes={"hidden_states": {seq_axis: "S"}, "output": {seq_axis: "S"}})
        else:
            S = torch.export.Dim("S", min=1, max=4096)
            prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=c["opset"],
                                     input_names=["hidden_states"], output_names=["output"],
                                     dynamic_shapes=({seq_axis: S},), verbose=False)
            prog.save(path)
    import onnx
    m = onnx.load(path)
    if m.ir_version > 10:  # ONNX Runtime 1.31 reads IR <= 13; keep files readable by older ones
        m.ir_version = 10
    onnx.save(m, path)
    # a model ONNX Runtime cannot load is no spelling to rewrite: the export failed
    import onnxruntime as ort
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise RuntimeError("ONNX Runtime refuses torch's export: " + str(e).replace(path, "MODEL")[:240]) from None


def one(seed, out_dir):
    c = draw(seed)
    name = f"{c['family']}_{seed}" + ("_f16" if DTYPE == torch.float16 else "")
    torch.manual_seed(seed)
    model = build(c).to(DTYPE)  # seeded weights drawn in float32, then rounded

    def make_x(S, s):
        g = torch.Generator().manual_seed(s)
        shape = (1, S, c["d"]) if c["rank"] == 3 else (S, c["d"])
        return torch.randn(shape, generator=g).to(DTYPE)

    entry = dict(name=name, seed=seed, **c)
    if DTYPE != torch.float32:
        entry["dtype"] = str(DTYPE).removeprefix("torch.")
    path = os.path.join(out_dir, name + ".onnx")
    try:
        export(model, c, make_x(TRACED, seed), path)
    except Exception as e:  # noqa: BLE001 - the report records every reason torch gives
        if os.path.exists(path):
            os.remove(path)
        entry["export_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return entry
    arrays = {}
    for S in LENGTHS:
        x = make_x(S, seed if S == TRACED else 7 + S)
        with torch.no_grad():
            arrays[f"x_{S}"] = x.numpy()
            arrays[f"y_{S}"] = model(x).numpy()
    np.savez(os.path.join(out_dir, name + ".npz"), **arrays)
    entry["bytes"] = os.path.getsize(path)
    return entry


def seeds_arg(s):
    out = []
    for part in s.split(","):
        part, _, step = part.partition(":")
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1, int(step or 1)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0-47")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--merge", action="store_true", help="keep index.json's other entries (replace those of these seeds)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="the layers' weights, inputs and outputs")
    args = ap.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    entries = []
    for s in seeds_arg(args.seeds):
        e = one(s, args.out)
        entries.append(e)
        print(e["name"], "export failed: " + e["export_failed"] if "export_failed" in e else "ok", file=sys.stderr)
    index = os.path.join(args.out, "index.json")
    if args.merge and os.path.exists(index):
        with open(index) as fh:
            old = json.load(fh)["models"]
        names = {e["name"] for e in entries}
        entries = sorted([e for e in old if e["name"] not in names] + entries, key=lambda e: e["seed"])
    with open(index, "w") as fh:
        json.dump(dict(torch=torch.__version__, lengths=list(LENGTHS), models=entries), fh, indent=1)


if __name__ == "__main__":
    main()
