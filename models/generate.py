#!/usr/bin/env python3
"""Generates the rewriter's fixtures: tiny MoE blocks exported by torch's own ONNX exporter.

Each fixture is one MoE block (the real Hugging Face transformers class with a tiny config and
seeded random weights, or a hand-written torch module of a common MoE form), exported with
torch.onnx.export(dynamo=False) at a traced token count, and saved as

    <name>.onnx   the exported block (input `hidden_states`, output `output`)
    <name>.npz    torch's own outputs: x_<S>, y_<S> for S in (1, 7, traced)

plus index.json describing every fixture (MATRIX_FIXTURES: cases of models/matrix.py, other
experts implementations and the dynamo exporter) (family, E, k, d, f, dtype, opset, traced length, and
whether ONNX Runtime ran the exported original at each token count).

Needs torch and transformers (made with torch 2.11, transformers 5.17); onnx and onnxruntime are
used when present, to check the exports. A model that fails is reported and skipped.

    python3 generate.py --out models/            # all
    python3 generate.py --out /tmp/m --only mixtral,dense_einsum
"""

import argparse
import json
import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TRACED = 16
LENGTHS = (1, 7, TRACED)


# ---------------------------------------------------------------------------------------------
# Hand-written MoE modules (the forms people write in plain torch)
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """softmax -> top-k -> renormalise."""

    def __init__(self, d, E, k):
        super().__init__()
        self.proj = nn.Linear(d, E, bias=False)
        self.k = k

    def forward(self, x):
        probs = torch.softmax(self.proj(x), dim=-1)
        w, idx = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w, idx


class LoopWhereMoE(nn.Module):
    """Per-expert loop over a static range: torch.where on the index tensor, gather the rows,
    an nn.Linear MLP per expert (GELU, not gated, with biases), index_add_ back."""

    def __init__(self, d, f, E, k):
        super().__init__()
        self.E = E
        self.router = Router(d, E, k)
        self.fc1 = nn.ModuleList([nn.Linear(d, f) for _ in range(E)])
        self.fc2 = nn.ModuleList([nn.Linear(f, d) for _ in range(E)])

    def forward(self, x):  # x: [T, d]
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = torch.where(idx == e)
            h = F.gelu(self.fc1[e](x[tok]))
            y = self.fc2[e](h) * w[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y)
        return out


class DenseEinsumMoE(nn.Module):
    """Every expert for every token (einsum over stacked weights), combined with a dense gate
    tensor that holds the top-k weights (zeros elsewhere)."""

    def __init__(self, d, f, E, k):
        super().__init__()
        self.router = Router(d, E, k)
        self.w_gate = nn.Parameter(torch.empty(E, f, d))
        self.w_up = nn.Parameter(torch.empty(E, f, d))
        self.w_down = nn.Parameter(torch.empty(E, d, f))

    def forward(self, x):  # x: [B, S, d]
        w, idx = self.router(x)
        gates = torch.zeros(x.shape[:-1] + (self.w_gate.shape[0],), dtype=x.dtype).scatter(-1, idx, w)
        g = torch.einsum("bsd,efd->bsef", x, self.w_gate)
        u = torch.einsum("bsd,efd->bsef", x, self.w_up)
        h = F.silu(g) * u
        y = torch.einsum("bsef,edf->bsed", h, self.w_down)
        return torch.einsum("bse,bsed->bsd", gates, y)


class DenseBmmMoE(nn.Module):
    """Every expert for every token with batched MatMul over stacked weights [E, d, f] (the rows
    broadcast over the expert axis), combined with the top-k gate [T, E] (zeros elsewhere) by a
    multiply and a sum over experts. GELU (tanh form), not gated, with biases."""

    def __init__(self, d, f, E, k):
        super().__init__()
        self.E = E
        self.router = Router(d, E, k)
        self.w1 = nn.Parameter(torch.empty(E, d, f))
        self.b1 = nn.Parameter(torch.empty(E, 1, f))
        self.w2 = nn.Parameter(torch.empty(E, f, d))
        self.b2 = nn.Parameter(torch.empty(E, 1, d))

    def forward(self, x):  # x: [T, d]
        w, idx = self.router(x)
        gates = torch.zeros(x.shape[0], self.E, dtype=x.dtype).scatter(1, idx, w)  # [T, E]
        h = F.gelu(torch.matmul(x.unsqueeze(0), self.w1) + self.b1, approximate="tanh")  # [E, T, f]
        y = torch.matmul(h, self.w2) + self.b2  # [E, T, d]
        return (y * gates.t().unsqueeze(-1)).sum(dim=0)


class CapacityEinsumMoE(nn.Module):
    """Switch/GShard style top-1 with a fixed expert capacity: one-hot dispatch and combine tensors
    [T, E, C], einsum into per-expert buffers, experts, einsum back. Tokens past an expert's capacity
    are dropped (contribute zero)."""

    def __init__(self, d, f, E, capacity):
        super().__init__()
        self.E, self.C = E, capacity
        self.router = nn.Linear(d, E, bias=False)
        self.wi = nn.Parameter(torch.empty(E, d, f))
        self.wo = nn.Parameter(torch.empty(E, f, d))

    def forward(self, x):  # x: [T, d]
        probs = torch.softmax(self.router(x), dim=-1)
        gate, idx = torch.max(probs, dim=-1)
        mask = F.one_hot(idx, self.E).to(x.dtype)  # [T, E]
        pos = torch.cumsum(mask, dim=0) * mask - 1.0  # position in the expert's buffer, -1 elsewhere
        keep = mask * (pos < self.C).to(x.dtype)
        pos_c = torch.clamp(pos, min=0, max=self.C - 1).to(torch.int64)
        dispatch = F.one_hot(pos_c, self.C).to(x.dtype) * keep.unsqueeze(-1)  # [T, E, C]
        combine = dispatch * gate[:, None, None]
        expert_in = torch.einsum("tec,td->ecd", dispatch, x)
        h = F.relu(torch.einsum("ecd,edf->ecf", expert_in, self.wi))
        expert_out = torch.einsum("ecf,efd->ecd", h, self.wo)
        return torch.einsum("tec,ecd->td", combine, expert_out)


class MegablocksMoE(nn.Module):
    """Megablocks-style: sort assignments by expert, gather the token rows in that order, scatter
    them into padded per-expert buffers [E, T*k, d], batched MatMul per expert, gather back,
    un-permute and take the weighted sum over k."""

    def __init__(self, d, f, E, k):
        super().__init__()
        self.E, self.k = E, k
        self.router = Router(d, E, k)
        self.w1 = nn.Parameter(torch.empty(E, d, 2 * f))
        self.w2 = nn.Parameter(torch.empty(E, f, d))

    def forward(self, x):  # x: [T, d]
        T, d = x.shape
        w, idx = self.router(x)
        flat = idx.reshape(-1)  # [T*k]
        sorted_e, order = torch.sort(flat)
        tok = torch.div(order, self.k, rounding_mode="floor")
        xs = x[tok]  # tokens in expert order
        onehot = F.one_hot(sorted_e, self.E)
        pos = (torch.cumsum(onehot, dim=0) - 1).gather(1, sorted_e.unsqueeze(1)).squeeze(1)  # row in its expert's bin
        buf = torch.zeros(self.E, flat.shape[0], d, dtype=x.dtype)
        buf = buf.index_put((sorted_e, pos), xs)
        h = torch.bmm(buf, self.w1)  # [E, T*k, 2f]
        g, u = h.chunk(2, dim=-1)
        h = F.silu(g) * u
        o = torch.bmm(h, self.w2)  # [E, T*k, d]
        ys = o[sorted_e, pos]  # back to the sorted assignment order
        y = torch.zeros_like(ys).index_copy(0, order, ys)  # un-permute to (t, j) order
        y = y.view(T, self.k, d) * w.unsqueeze(-1)
        return y.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers blocks
# ---------------------------------------------------------------------------------------------


def hf(name):
    import transformers as tr

    eager = {"experts_implementation": "eager"}
    if name == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        c = tr.MixtralConfig(hidden_size=32, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, **eager)
        return MixtralSparseMoeBlock(c), dict(E=8, k=2, d=32, f=64, act="silu")
    if name == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        c = tr.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **eager)
        return Qwen2MoeSparseMoeBlock(c), dict(E=8, k=2, d=32, f=48, act="silu", shared_expert=True)
    if name == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        c = tr.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=True, **eager)
        return Qwen3MoeSparseMoeBlock(c), dict(E=8, k=2, d=32, f=48, act="silu")
    if name == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

        c = tr.OlmoeConfig(hidden_size=32, intermediate_size=48, num_experts=8, num_experts_per_tok=2, **eager)
        return OlmoeSparseMoeBlock(c), dict(E=8, k=2, d=32, f=48, act="silu")
    if name == "granitemoe":
        from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE

        c = tr.GraniteMoeConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **eager)
        return GraniteMoeMoE(c), dict(E=4, k=2, d=32, f=48, act="silu")
    if name == "phimoe":
        from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

        c = tr.PhimoeConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **eager)
        return PhimoeSparseMoeBlock(c), dict(E=4, k=2, d=32, f=48, act="silu")
    if name == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        c = tr.GptOssConfig(hidden_size=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **eager)
        return GptOssMLP(c), dict(E=4, k=2, d=32, f=32, act="swiglu_oai", bias=True)
    if name == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        c = tr.DeepseekV3Config(hidden_size=32, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True, **eager)
        return DeepseekV3MoE(c), dict(E=8, k=2, d=32, f=32, act="silu", shared_expert=True)
    if name == "dbrx":
        from transformers.models.dbrx.modeling_dbrx import DbrxFFN

        c = tr.DbrxConfig(d_model=32, ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2,
                                                      hidden_size=32), **eager)
        return DbrxFFN(c), dict(E=4, k=2, d=32, f=48, act="silu")
    if name == "switch":
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

        c = tr.SwitchTransformersConfig(d_model=32, d_ff=64, num_experts=4, expert_capacity=5, router_bias=False, **eager)
        return SwitchTransformersSparseMLP(c), dict(E=4, k=1, d=32, f=64, act="relu", capacity=5)
    raise KeyError(name)


def hand(name):
    if name == "loop_where":
        return LoopWhereMoE(32, 64, 4, 2), dict(E=4, k=2, d=32, f=64, act="gelu", bias=True)
    if name == "dense_einsum":
        return DenseEinsumMoE(32, 48, 4, 2), dict(E=4, k=2, d=32, f=48, act="silu")
    if name == "capacity_einsum":
        return CapacityEinsumMoE(32, 64, 4, 5), dict(E=4, k=1, d=32, f=64, act="relu", capacity=5)
    if name == "megablocks":
        return MegablocksMoE(32, 48, 4, 2), dict(E=4, k=2, d=32, f=48, act="silu")
    if name == "dense_bmm":
        return DenseBmmMoE(32, 64, 4, 2), dict(E=4, k=2, d=32, f=64, act="gelu_tanh", bias=True)
    raise KeyError(name)


# name, family, builder, input rank (3: [1, S, d]; 2: [S, d]), opset, dtype
FIXTURES = [
    ("mixtral", "hf_loop", "hf:mixtral", 3, 17, "float32"),
    ("mixtral_op18", "hf_loop", "hf:mixtral", 3, 18, "float32"),
    ("mixtral_f16", "hf_loop", "hf:mixtral", 3, 17, "float16"),
    ("qwen2_moe", "hf_loop", "hf:qwen2_moe", 3, 17, "float32"),
    ("qwen3_moe", "hf_loop", "hf:qwen3_moe", 3, 17, "float32"),
    ("qwen3_moe_op18_f16", "hf_loop", "hf:qwen3_moe", 3, 18, "float16"),
    ("olmoe", "hf_loop", "hf:olmoe", 3, 17, "float32"),
    ("granitemoe", "hf_loop", "hf:granitemoe", 3, 17, "float32"),
    ("phimoe", "hf_loop", "hf:phimoe", 3, 17, "float32"),
    ("gpt_oss", "hf_loop", "hf:gpt_oss", 3, 17, "float32"),
    ("deepseek_v3", "hf_loop", "hf:deepseek_v3", 3, 17, "float32"),
    ("dbrx", "hf_loop", "hf:dbrx", 3, 17, "float32"),
    ("switch", "capacity", "hf:switch", 3, 17, "float32"),
    ("loop_where", "hf_loop", "hand:loop_where", 2, 17, "float32"),
    ("dense_einsum", "dense", "hand:dense_einsum", 3, 17, "float32"),
    ("capacity_einsum", "capacity", "hand:capacity_einsum", 2, 17, "float32"),
    ("megablocks", "megablocks", "hand:megablocks", 2, 17, "float32"),
    ("dense_bmm", "dense", "hand:dense_bmm", 2, 17, "float32"),
]


# Fixtures taken from the matrix (models/matrix.py): the same tiny config, seeded weights and
# exporter as its case `<class>.<experts implementation>.<exporter>.<dtype>`, traced at 16 tokens.
# name, family, matrix case
MATRIX_FIXTURES = [
    ("mixtral_bmm", "batched_mm", "MixtralSparseMoeBlock.batched_mm.ts17.f32"),
    ("mixtral_bmm_dynamo", "batched_mm", "MixtralSparseMoeBlock.batched_mm.dynamo.f32"),
    ("qwen3_moe_bmm_f16", "batched_mm", "Qwen3MoeSparseMoeBlock.batched_mm.ts18.f16"),
    ("gpt_oss_bmm", "batched_mm", "GptOssMLP.batched_mm.ts17.f32"),
    ("gpt_oss_bmm_dynamo", "batched_mm", "GptOssMLP.batched_mm.dynamo.f32"),
    ("deepseek_v3_bmm_dynamo", "batched_mm", "DeepseekV3MoE.batched_mm.dynamo.f32"),
]


def export_matrix_case(name, family, case, out_dir):
    """Exports one matrix case under the fixture's name, with the fixture's index entry."""
    import shutil
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import matrix

    cls, impl, exporter, dt = case.split(".")
    fam = next((f for f in matrix.enumerate_blocks() if f[2] == cls), None)
    if fam is None:
        raise KeyError(f"no MoE block class {cls}")
    dtype = "float32" if dt == "f32" else "float16"
    with tempfile.TemporaryDirectory() as tmp:
        rec = matrix.export_case(fam, impl, exporter, dtype, tmp, 1)
        if rec["status"] != "exported":
            raise RuntimeError(f"{case}: {rec['status']}: {rec.get('reason')}")
        shutil.copy(os.path.join(tmp, case + ".onnx"), os.path.join(out_dir, name + ".onnx"))
        shutil.copy(os.path.join(tmp, case + ".npz"), os.path.join(out_dir, name + ".npz"))
    path = os.path.join(out_dir, name + ".onnx")
    arrays = dict(np.load(os.path.join(out_dir, name + ".npz")))
    entry = dict(name=name, family=family, source=f"matrix:{case}", opset=18 if exporter != "ts17" else 17, dtype=dtype,
                 input_rank=3, traced=TRACED, lengths=list(LENGTHS), bytes=os.path.getsize(path),
                 original_runs_in_ort=check_ort(path, arrays), experts_implementation=impl,
                 exporter="dynamo" if exporter == "dynamo" else "torchscript")
    try:
        import onnx

        m = onnx.load(path)
        entry["nodes"] = len(m.graph.node)
        entry["ir_version"] = m.ir_version
    except Exception:
        pass
    return entry


class FirstOutput(nn.Module):
    """Exports only the block's output (GPT-OSS's MLP also returns its router scores)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        y = self.m(x)
        return y[0] if isinstance(y, tuple) else y


def randomise(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            if p.dim() >= 2:
                scale = 1.0 / math.sqrt(p.shape[-1])
                # routers get a wider spread so that routing is decisive and all experts get tokens
                if any(s in name for s in ("router", "gate.weight", "classifier", "proj.weight")) and p.dim() == 2 and p.shape[0] <= 16:
                    scale *= 3.0
            else:
                scale = 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def routing_probe(block):
    """Hooks the experts module to record which experts a forward pass hit."""
    seen = {}
    experts = getattr(block, "experts", None)
    if experts is None:
        return seen, None

    def hook(_mod, args, kwargs):
        a = list(args) + list(kwargs.values())
        if len(a) >= 2 and torch.is_tensor(a[1]):
            seen["idx"] = a[1].detach()
        return None

    h = experts.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, h


def all_hit(idx, E):
    if idx is None:
        return True
    if idx.dtype in (torch.int64, torch.int32) and idx.dim() <= 2 and idx.shape[-1] != E:
        return len(torch.unique(idx)) == E
    # one-hot masks (Switch): [T, k, E]
    return bool((idx.reshape(-1, E).sum(0) > 0).all())


def build(spec, seed):
    kind, name = spec.split(":")
    m, info = (hf if kind == "hf" else hand)(name)
    randomise(m, seed)
    return m.eval(), info


def export_one(name, family, spec, rank, opset, dtype, out_dir, seed):
    import io
    torch.manual_seed(seed)
    block, info = build(spec, seed)
    E, d = info["E"], info["d"]
    tdtype = getattr(torch, dtype)
    block = block.to(tdtype)
    model = FirstOutput(block).eval()

    def make_x(S, s):
        g = torch.Generator().manual_seed(s)
        shape = (1, S, d) if rank == 3 else (S, d)
        return torch.randn(shape, generator=g).to(tdtype)

    # A traced input that sends tokens to every expert: the exporter unrolls the loop over the
    # experts that this input hits.
    seen, hook = routing_probe(block)
    x_trace = None
    for s in range(seed * 1000, seed * 1000 + 200):
        x = make_x(TRACED, s)
        with torch.no_grad():
            model(x)
        if all_hit(seen.get("idx"), E):
            x_trace = x
            break
    if hook is not None:
        hook.remove()
    if x_trace is None:
        raise RuntimeError("no traced input found that hits every expert")

    path = os.path.join(out_dir, name + ".onnx")
    seq_axis = 1 if rank == 3 else 0
    with torch.no_grad():
        torch.onnx.export(
            model, (x_trace,), path, dynamo=False, opset_version=opset,
            input_names=["hidden_states"], output_names=["output"],
            dynamic_axes={"hidden_states": {seq_axis: "S"}, "output": {seq_axis: "S"}},
            do_constant_folding=True,
        )
    fix_ir(path)

    arrays = {}
    for S in LENGTHS:
        x = x_trace if S == TRACED else make_x(S, 7 + S)
        with torch.no_grad():
            y = model(x)
        arrays[f"x_{S}"] = x.numpy()
        arrays[f"y_{S}"] = y.numpy()
    np.savez(os.path.join(out_dir, name + ".npz"), **arrays)

    ort_ok = check_ort(path, arrays)
    size = os.path.getsize(path)
    entry = dict(name=name, family=family, source=spec, opset=opset, dtype=dtype, input_rank=rank,
                 traced=TRACED, lengths=list(LENGTHS), bytes=size, original_runs_in_ort=ort_ok, **info)
    try:
        import onnx
        entry["nodes"] = len(onnx.load(path).graph.node)
        entry["ir_version"] = onnx.load(path).ir_version
    except Exception:
        pass
    return entry


def fix_ir(path):
    """ORT 1.31 reads IR <= 13: keep what torch wrote unless it is newer."""
    try:
        import onnx
    except ImportError:
        return
    m = onnx.load(path)
    if m.ir_version > 10:
        m.ir_version = 10
        onnx.save(m, path)


def check_ort(path, arrays):
    """Runs the exported original in ORT at each length: max relative error, or the error text."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    res = {}
    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:
        return {"session": str(e)[:300]}
    for S in LENGTHS:
        x, y = arrays[f"x_{S}"], arrays[f"y_{S}"]
        try:
            (o,) = sess.run(None, {"hidden_states": x})
            err = float(np.abs(o.astype(np.float64) - y).max() / max(np.abs(y).max(), 1e-30))
            res[str(S)] = err
        except Exception as e:
            res[str(S)] = "fails: " + str(e).splitlines()[0][:200]
    return res


# --- JetMoE, Llama-4, Nemotron-H, whole LMs ---
# Fixtures under models/families/ (their own index.json): JetMoE's MoE block and a whole tiny JetMoE
# LM (whose attention is Mixture-of-Attention), and whole tiny causal LMs. The block inputs are
# `hidden_states` [1, S, d]; the LMs take `input_ids` [1, S] and return `logits`. Each entry says
# what the rewriter must do with it (`expect`), which tests/rewrite_families.rs checks.

FAMILY_TRACED = 16
FAMILY_EXPERTS = 4  # every family fixture has 4 experts


# every whole-model fixture's sizes, and Gemma 4's MoE layers at them (also DiffusionGemma's)
_TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
_GEMMA_MOE = dict(intermediate_size=48, head_dim=8, global_head_dim=8, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"], num_experts=4, top_k_experts=2,
                  moe_intermediate_size=24)


def _tiny_lm(name, experts_impl="eager"):
    import transformers as tr

    common = dict(_TINY, tie_word_embeddings=False, experts_implementation=experts_impl)
    if name == "jetmoe":
        c = tr.JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            kv_channels=8, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=64, tie_word_embeddings=False)
        return tr.JetMoeForCausalLM(c)
    if name == "mixtral":
        c = tr.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8, **common)
        return tr.MixtralForCausalLM(c)
    if name == "qwen3_moe":
        c = tr.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                              head_dim=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **common)
        return tr.Qwen3MoeForCausalLM(c)
    if name == "gemma4":
        # Gemma 4's MoE layers: the experts beside a dense MLP inside the decoder layer (no block
        # class of their own, so models/matrix.py does not enumerate them)
        c = tr.Gemma4TextConfig(hidden_size_per_layer_input=0, vocab_size_per_layer_input=64, enable_moe_block=True,
                                **_GEMMA_MOE, **common)
        return tr.Gemma4ForCausalLM(c)
    raise KeyError(name)


def _tiny_encoder(name, experts_impl="eager"):
    """A whole tiny text encoder (input_ids -> hidden states): DiffusionGemma's, whose layers hold
    Gemma 4's MoE (router on the residual, experts on its second pre-norm) beside a dense MLP."""
    import transformers as tr

    if name == "diffusion_gemma":
        from transformers.models.diffusion_gemma import modeling_diffusion_gemma as md

        c = tr.DiffusionGemmaTextConfig(**_GEMMA_MOE, **_TINY, experts_implementation=experts_impl)
        return md.DiffusionGemmaEncoderTextModel(c)
    raise KeyError(name)


class _Hidden(nn.Module):
    """A text encoder: input_ids -> its last hidden states (an explicit all-ones attention mask)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state


class _Logits(nn.Module):
    """A causal LM without cache: input_ids -> logits. The explicit all-ones attention mask keeps
    transformers from tracing its packed-sequence detection (torch.diff, which the TorchScript
    exporter cannot write)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


class _LogitsWithPast(nn.Module):
    """A two-layer causal LM with past keys and values as inputs: (input_ids, past_key_0,
    past_value_0, past_key_1, past_value_1) -> logits. The cache is rebuilt from the tensors."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, pk0, pv0, pk1, pv1):
        from transformers import DynamicCache

        c = DynamicCache()
        c.update(pk0, pv0, 0)
        c.update(pk1, pv1, 1)
        mask = torch.ones((1, pk0.shape[2] + input_ids.shape[1]), dtype=torch.int64)
        return self.m(input_ids=input_ids, attention_mask=mask, past_key_values=c, use_cache=True).logits


PAST = 5
PAST_NAMES = ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]


def _jetmoe_block():
    import transformers as tr
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

    c = tr.JetMoeConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, kv_channels=8,
                        num_key_value_heads=2, num_attention_heads=4)
    return JetMoeMoE(c)


def _llama4_block(k=1):
    import transformers as tr
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    c = tr.Llama4TextConfig(hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_local_experts=4,
                            num_experts_per_tok=k, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Llama4TextMoe(c)


def _nemotron_h_block(experts_impl):
    import transformers as tr
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    c = tr.NemotronHConfig(hidden_size=32, moe_intermediate_size=48, moe_shared_expert_intermediate_size=64, n_routed_experts=4,
                           num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.0,
                           experts_implementation=experts_impl)
    return NemotronHMoE(c)


def _clamped_swiglu_block(family, experts_impl):
    """GLM-5-Next's or HY-V4's MoE block: experts silu(min(gate, l)) * clamp(up, -l, l). The limit is
    small, so the clamps act on the fixture's values."""
    if family == "glm5_next":
        from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig as Config
        from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextMoE as Block
        limit = 0.5
    else:
        from transformers.models.hy_v4.configuration_hy_v4 import HYV4Config as Config
        from transformers.models.hy_v4.modeling_hy_v4 import HYV4MoE as Block
        limit = 1.0
    c = Config(hidden_size=32, moe_intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, n_group=1,
               topk_group=1, n_shared_experts=1, swiglu_limit=limit)
    c._experts_implementation = experts_impl
    return Block(c)


def _family_block(parts):
    """The block of a "block:<family>[:<option>]" builder."""
    if parts[1] == "nemotron_h":
        return _nemotron_h_block(parts[2])
    if parts[1] in ("glm5_next", "hy_v4"):
        return _clamped_swiglu_block(parts[1], parts[2])
    if parts[1] == "llama4":
        return _llama4_block(int(parts[2][1:]) if len(parts) > 2 else 1)  # "k2": top-2
    return {"jetmoe": _jetmoe_block}[parts[1]]()


# name, builder ("block:jetmoe" or "lm:<family>[:<experts implementation>]"), exporter, dtype, expect
# expect: dict(scattermoe=N, parallel_linear=N) for a rewrite, or dict(refused=reason substring)
FAMILY_FIXTURES = [
    ("jetmoe_moe", "block:jetmoe", "dynamo", "float32", dict(scattermoe=1, parallel_linear=0)),
    ("jetmoe_moe_f16", "block:jetmoe", "dynamo", "float16", dict(scattermoe=1, parallel_linear=0)),
    # torch's TorchScript exporter writes JetMoE's index_add as ScatterElements without a
    # reduction: a token's k rows overwrite each other, so the export does not compute JetMoE
    ("jetmoe_moe_ts", "block:jetmoe", "torchscript", "float32", dict(refused="ScatterElements")),
    ("jetmoe_lm", "lm:jetmoe", "dynamo", "float32", dict(scattermoe=2, parallel_linear=4)),
    ("mixtral_lm", "lm:mixtral", "torchscript", "float32", dict(scattermoe=2, parallel_linear=0)),
    ("qwen3_moe_lm", "lm:qwen3_moe", "torchscript", "float32", dict(scattermoe=2, parallel_linear=0)),
    # Llama-4: sigmoid top-1 scores scale the experts' inputs, shared expert beside
    ("llama4_moe", "block:llama4", "dynamo", "float32", dict(scattermoe=1, parallel_linear=0)),
    ("llama4_moe_f16", "block:llama4", "dynamo", "float16", dict(scattermoe=1, parallel_linear=0)),
    ("llama4_moe_ts", "block:llama4", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    # Nemotron-H: non-gated experts with squared ReLU (relu2)
    ("nemotron_h_moe", "block:nemotron_h:eager", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    ("nemotron_h_moe_bmm_dynamo", "block:nemotron_h:batched_mm", "dynamo", "float32", dict(scattermoe=1, parallel_linear=0)),
    # with past keys and values (5 cached positions) as inputs
    ("mixtral_lm_past", "lmpast:mixtral", "torchscript", "float32", dict(scattermoe=2, parallel_linear=0)),
    ("qwen3_moe_lm_past", "lmpast:qwen3_moe", "torchscript", "float32", dict(scattermoe=2, parallel_linear=0)),
    # batched_mm experts, dynamo: needs the batched_mm rule
    ("mixtral_lm_bmm_dynamo", "lm:mixtral:batched_mm", "dynamo", "float32", dict(scattermoe=2, parallel_linear=0, needs="batched_mm")),
    # float16 experts summed in float32 (the router's weights are float32): the op writes float16,
    # a Cast gives the sum its type
    ("nemotron_h_moe_f16", "block:nemotron_h:eager", "torchscript", "float16", dict(scattermoe=1, parallel_linear=0)),
    # GLM-5-Next and HY-V4: swiglu_limit experts (limits 0.5 and 1.0)
    ("glm5_next_moe", "block:glm5_next:eager", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    ("hy_v4_moe_bmm_dynamo", "block:hy_v4:batched_mm", "dynamo", "float32", dict(scattermoe=1, parallel_linear=0)),
    # Llama-4 with top-2 routing: one row per assignment, summed over k after the op
    ("llama4_moe_k2", "block:llama4:k2", "dynamo", "float32", dict(scattermoe=1, parallel_linear=0)),
    ("llama4_moe_k2_ts", "block:llama4:k2", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    # cases of models/matrix.py (matrix:<case>[:config overrides]); exporter and dtype are the case's
    # float16 rows whose experts are not gated (`gated = 0` must carry its value)
    ("switch_f16", "matrix:SwitchTransformersSparseMLP.eager.ts17.f16", "torchscript", "float16", dict(scattermoe=1, parallel_linear=0)),
    # float16 rows cast up: the experts compute, weight and accumulate in float32
    ("openai_privacy_filter_f16", "matrix:OpenAIPrivacyFilterMLP.eager.ts17.f16", "torchscript", "float16", dict(scattermoe=1, parallel_linear=0)),
    # the loop unrolled over the 2 experts its traced input hit, of 4
    ("ernie45_moe", "matrix:Ernie4_5_MoeSparseMoeBlock.eager.ts17.f32", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    # routers other than TopK: PhiMoE's sparsemixer (two masked ArgMax), Zaya's TopK over E + 1
    # classes with the skip class masked to expert 0 (its router MLP narrowed to keep the file small)
    ("phimoe_bmm", "matrix:PhimoeSparseMoeBlock.batched_mm.ts17.f32", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    ("zaya_bmm_dynamo", "matrix:ZayaSparseMoeBlock.batched_mm.dynamo.f32:router_hidden_size=32", "dynamo", "float32", dict(scattermoe=1, parallel_linear=0)),
    # Zaya's eager loop: index_add_ as ScatterElements without a reduction, and a router that can
    # give one token expert 0 twice (the skip class masked to 0): the graph keeps one of the two
    ("zaya_moe", "matrix:ZayaSparseMoeBlock.eager.ts17.f32:router_hidden_size=32", "torchscript", "float32", dict(refused="without a reduction")),
    # transformers 4 (export with that version on the path; see export_family_matrix): Mixtral's loop
    # over the hit experts, its accumulator zeros shaped by (batch * sequence, hidden) arithmetic
    ("mixtral_tf4_57", "matrix@4.57.3:MixtralSparseMoeBlock.eager.ts17.f32", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    # the dynamo exporter's spelling of transformers 4.46's loop over every expert: torch.where as
    # Slice columns of NonZero, rows and router weights by GatherND, index_add_ as ScatterND add
    ("mixtral_tf4_46_dynamo", "matrix@4.46.3:MixtralSparseMoeBlock.eager.dynamo.f32", "dynamo", "float32", dict(scattermoe=1, parallel_linear=0)),
    # transformers 4.57's Qwen3-VL-MoE experts: every expert on every token (x.repeat(E, 1).view(E,
    # -1, d), bmm), outputs and gate reshaped to [E, batch, -1(, d)] and summed over E; TorchScript
    # float32 and dynamo float16 (a float32 sum of float16 products)
    ("qwen3_vl_moe_tf4_57", "matrix@4.57.3:Qwen3VLMoeTextSparseMoeBlock.eager.ts17.f32", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    ("qwen3_vl_moe_tf4_57_dynamo_f16", "matrix@4.57.3:Qwen3VLMoeTextSparseMoeBlock.eager.dynamo.f16", "dynamo", "float16", dict(scattermoe=1, parallel_linear=0)),
    # transformers 4.57's GPT-OSS on the CPU: a loop over the hit experts of a one-hot with E + 1
    # classes (its depth computed from the gate's shape), each weighted by the dense gate's column
    ("gpt_oss_tf4_57", "matrix@4.57.3:GptOssMLP.eager.ts17.f32", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    # transformers 4.57's DeepSeek-V2: the sorted rows cut into per-expert blocks by Slices at the
    # running sums of the expert counts, each expert's own MLP, Concat, `new_x[order] = outs`
    ("deepseek_v2_tf4_57", "matrix@4.57.3:DeepseekV2MoE.eager.ts17.f32", "torchscript", "float32", dict(scattermoe=1, parallel_linear=0)),
    # routers with a selection bias and the group-limited choice (TopKRouter's n_group, topk_group):
    # 8 experts in 4 groups of 2, the best 2 groups compete; DeepSeek-V3's sigmoid + bias, top-2-sum
    # group scores, -inf fill, weights gathered from the scores, normalised + 1e-20, scaled by 2.5
    ("deepseek_v3_groups", "matrix:DeepseekV3MoE.eager.ts17.f32:n_routed_experts=8,n_group=4,topk_group=2",
     "torchscript", "float32", dict(scattermoe=1, parallel_linear=0, router="sigmoid, k=2, normalize, lower_index, bias, groups 2/4 top2_sum")),
    ("deepseek_v3_groups_bmm_dynamo", "matrix:DeepseekV3MoE.batched_mm.dynamo.f32:n_routed_experts=8,n_group=4,topk_group=2",
     "dynamo", "float32", dict(scattermoe=1, parallel_linear=0, router="sigmoid, k=2, normalize, lower_index, bias, groups 2/4 top2_sum")),
    ("deepseek_v3_groups_f16", "matrix:DeepseekV3MoE.batched_mm.ts17.f16:n_routed_experts=8,n_group=4,topk_group=2",
     "torchscript", "float16", dict(scattermoe=1, parallel_linear=0, router="sigmoid, k=2, normalize, lower_index, bias, groups 2/4 top2_sum")),
    # DeepSeek-V2's group_limited_greedy: softmax, the groups' max, 0 fill, the TopK's values as weights
    ("deepseek_v2_groups", "matrix:DeepseekV2Moe.batched_mm.ts17.f32:n_routed_experts=8,n_group=4,topk_group=2,topk_method=group_limited_greedy",
     "torchscript", "float32", dict(scattermoe=1, parallel_linear=0, router="softmax, k=2, lower_index, groups 2/4 max fill 0, weights from choice")),
    # Mistral 4: softmax, top-2-sum groups, 0 fill, weights gathered from the scores
    ("mistral4_groups_dynamo", "matrix:Mistral4MoE.batched_mm.dynamo.f32:n_routed_experts=8,n_group=4,topk_group=2",
     "dynamo", "float32", dict(scattermoe=1, parallel_linear=0, router="softmax, k=2, normalize, lower_index, groups 2/4 top2_sum fill 0")),
    # MiniMax-M2: sigmoid + bias, no groups, an unsorted TopK
    ("minimax_m2_moe", "matrix:MiniMaxM2SparseMoeBlock.eager.ts17.f32", "torchscript", "float32",
     dict(scattermoe=1, parallel_linear=0, router="sigmoid, k=2, normalize, lower_index, bias")),
    # Gemma 4: the router reads the residual and the experts its second pre-norm (the proof computes
    # both from the value they share); the weights scaled per expert (TopKRouter's expert_scale)
    ("gemma4_lm", "lm:gemma4", "torchscript", "float32", dict(scattermoe=2, parallel_linear=0, router="softmax, k=2, normalize, lower_index, expert scale")),
    ("gemma4_lm_bmm", "lm:gemma4:batched_mm", "torchscript", "float32", dict(scattermoe=2, parallel_linear=0, router="softmax, k=2, normalize, lower_index, expert scale")),
    ("gemma4_lm_bmm_dynamo", "lm:gemma4:batched_mm", "dynamo", "float32", dict(scattermoe=2, parallel_linear=0, router="softmax, k=2, normalize, lower_index, expert scale", needs="batched_mm")),
    # DiffusionGemma's text encoder: Gemma 4's MoE layers in another model (its output named
    # `logits` like the LMs', the last hidden states)
    ("diffusion_gemma_enc_bmm", "enc:diffusion_gemma:batched_mm", "torchscript", "float32", dict(scattermoe=2, parallel_linear=0, router="softmax, k=2, normalize, lower_index, expert scale")),
    ("diffusion_gemma_enc_bmm_dynamo", "enc:diffusion_gemma:batched_mm", "dynamo", "float32", dict(scattermoe=2, parallel_linear=0, router="softmax, k=2, normalize, lower_index, expert scale", needs="batched_mm")),
]


def _export(model, x, path, exporter, input_name, output_name, opset=17, extra=()):
    import torch

    with torch.no_grad():
        if extra:
            names = [input_name] + PAST_NAMES
            axes = {input_name: {1: "S"}, **{n: {2: "P"} for n in PAST_NAMES}, output_name: {1: "S"}}
            torch.onnx.export(model, (x, *extra), path, dynamo=False, opset_version=opset, input_names=names,
                              output_names=[output_name], dynamic_axes=axes, do_constant_folding=True)
        elif exporter == "dynamo":
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=[input_name], output_names=[output_name],
                              dynamic_shapes=({1: torch.export.Dim("S", min=1, max=64)},), external_data=False)
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, input_names=[input_name],
                              output_names=[output_name], dynamic_axes={input_name: {1: "S"}, output_name: {1: "S"}},
                              do_constant_folding=True)
    fix_ir(path)
    # the dynamo exporter stores a stack trace per node: drop them to keep the fixtures small
    import onnx

    mp = onnx.load(path)
    for n in mp.graph.node:
        n.doc_string = ""
        del n.metadata_props[:]
    mp.graph.doc_string = ""
    onnx.save(mp, path)


def export_family_matrix(name, spec, expect, out_dir):
    """A case of models/matrix.py (`matrix:<case>[:key=value,...]`, the values tiny-config overrides
    where the family's config has the key) under the fixture's name, with its index entry."""
    import shutil
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import matrix

    parts = spec.split(":")
    if "@" in parts[0]:  # matrix@<transformers version>: an export of that version's block
        import transformers

        want = parts[0].split("@", 1)[1]
        if transformers.__version__ != want:
            raise RuntimeError(f"{spec} is an export of transformers {want}, this is {transformers.__version__}: "
                               f"pip install --target DIR transformers=={want}, then PYTHONPATH=DIR python models/generate.py --families --only NAME")
    case = parts[1]
    overrides = dict(kv.split("=") for kv in parts[2].split(",")) if len(parts) > 2 else {}
    cls, impl, exporter, dt = case.split(".")
    fam = next((f for f in matrix.enumerate_blocks() if f[2] == cls), None)
    if fam is None:
        raise KeyError(f"no MoE block class {cls}")
    saved = dict(matrix.TINY)
    matrix.TINY.update({k: int(v) if v.lstrip("-").isdigit() else v for k, v in overrides.items()})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rec = matrix.export_case(fam, impl, exporter, "float32" if dt == "f32" else "float16", tmp, 1)
            if rec["status"] != "exported":
                raise RuntimeError(f"{case}: {rec['status']}: {rec.get('reason')}")
            for ext in (".onnx", ".npz"):
                shutil.copy(os.path.join(tmp, case + ext), os.path.join(out_dir, name + ext))
    finally:
        matrix.TINY.clear()
        matrix.TINY.update(saved)
    import onnx

    path = os.path.join(out_dir, name + ".onnx")
    mp = onnx.load(path)
    arrays = dict(np.load(os.path.join(out_dir, name + ".npz")))
    return dict(name=name, source=spec, exporter="dynamo" if exporter == "dynamo" else "torchscript",
                dtype=rec["dtype"], input="hidden_states", output="output", traced=TRACED, lengths=list(LENGTHS),
                bytes=os.path.getsize(path), nodes=len(mp.graph.node),
                opset=[o.version for o in mp.opset_import if o.domain == ""][0], ir_version=mp.ir_version,
                original_runs_in_ort=check_ort(path, arrays), expect=expect)


def export_family(name, spec, exporter, dtype, expect, out_dir, seed):
    if spec.startswith("matrix:") or spec.startswith("matrix@"):
        return export_family_matrix(name, spec, expect, out_dir)
    torch.manual_seed(seed)
    parts = spec.split(":")
    tdtype = getattr(torch, dtype)
    if parts[0] == "block":
        m = _family_block(parts)
        input_name, output_name = "hidden_states", "output"
        randomise(m, seed)
        m = FirstOutput(m.to(tdtype).eval()).eval()

        def make_x(S, s):
            return torch.randn((1, S, 32), generator=torch.Generator().manual_seed(s)).to(tdtype)
    else:
        impl = parts[2] if len(parts) > 2 else "eager"
        if parts[0] == "enc":
            enc = _tiny_encoder(parts[1], impl)
            randomise(enc, seed)
            m = _Hidden(enc.to(tdtype).eval()).eval()
        else:
            lm = _tiny_lm(parts[1], impl)
            randomise(lm, seed)
            m = (_LogitsWithPast if parts[0] == "lmpast" else _Logits)(lm.to(tdtype).eval()).eval()
        input_name, output_name = "input_ids", "logits"

        def make_x(S, s):
            return torch.randint(0, 64, (1, S), generator=torch.Generator().manual_seed(s))

    # traced loops unroll over the experts the traced input hits: pick one that hits every expert
    # (the whole-LM exports are checked by ORT at the traced length below)
    path = os.path.join(out_dir, name + ".onnx")

    def past(s):
        # [1, kv heads, PAST, head_dim] per layer; extra inputs are saved as in_<name>_<S>
        if parts[0] != "lmpast":
            return ()
        g = torch.Generator().manual_seed(s)
        return tuple(torch.randn((1, 2, PAST, 8), generator=g).to(tdtype) for _ in PAST_NAMES)

    # traced per-expert loops unroll over the experts the traced input hits: take an input that
    # hits every expert of every layer
    seen = []

    def hook(_mod, args, kwargs):
        a = list(args) + list(kwargs.values())
        if len(a) >= 2 and torch.is_tensor(a[1]) and not a[1].dtype.is_floating_point:
            seen.append(a[1].detach())

    hooks = [mod.register_forward_pre_hook(hook, with_kwargs=True) for n, mod in m.named_modules() if n.endswith(".experts")]
    x_trace = None
    for s in range(seed * 1000, seed * 1000 + 200):
        seen.clear()
        x = make_x(FAMILY_TRACED, s)
        with torch.no_grad():
            m(x, *past(seed * 1000 + 1))
        if all(len(torch.unique(i)) == FAMILY_EXPERTS for i in seen):
            x_trace = x
            break
    for h in hooks:
        h.remove()
    if x_trace is None:
        raise RuntimeError("no traced input found that hits every expert of every layer")
    _export(m, x_trace, path, exporter, input_name, output_name, extra=past(seed * 1000 + 1))
    arrays = {}
    for S in LENGTHS:
        x = x_trace if S == FAMILY_TRACED else make_x(S, 7 + S)
        extra = past(seed * 1000 + 1 if S == FAMILY_TRACED else 17 + S)
        with torch.no_grad():
            y = m(x, *extra)
        arrays[f"x_{S}"] = x.numpy()
        arrays[f"y_{S}"] = y.numpy()
        for n, t in zip(PAST_NAMES, extra):
            arrays[f"in_{n}_{S}"] = t.numpy()
    np.savez(os.path.join(out_dir, name + ".npz"), **arrays)
    ort_ok = {}
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for S in LENGTHS:
            try:
                feed = {input_name: arrays[f"x_{S}"]}
                feed.update({n: arrays[f"in_{n}_{S}"] for n in PAST_NAMES if f"in_{n}_{S}" in arrays})
                (o,) = sess.run(None, feed)
                y = arrays[f"y_{S}"]
                ort_ok[str(S)] = float(np.abs(o.astype(np.float64) - y).max() / max(np.abs(y).max(), 1e-30))
            except Exception as e:
                ort_ok[str(S)] = "fails: " + str(e).splitlines()[0][:200]
    except ImportError:
        pass
    import onnx

    mp = onnx.load(path)
    return dict(name=name, source=spec, exporter=exporter, dtype=dtype, input=input_name, output=output_name,
                traced=FAMILY_TRACED, lengths=list(LENGTHS), bytes=os.path.getsize(path), nodes=len(mp.graph.node),
                opset=[o.version for o in mp.opset_import if o.domain == ""][0], ir_version=mp.ir_version,
                original_runs_in_ort=ort_ok, expect=expect)


def families_main(out_dir, only):
    os.makedirs(out_dir, exist_ok=True)
    index, failed = [], []
    for i, (name, spec, exporter, dtype, expect) in enumerate(FAMILY_FIXTURES):
        if only and name not in only:
            continue
        try:
            e = export_family(name, spec, exporter, dtype, expect, out_dir, 100 + i)
            index.append(e)
            print(f"ok   {name}: {e['nodes']} nodes, {e['bytes']} bytes, ORT original: {e['original_runs_in_ort']}", flush=True)
        except Exception as ex:
            failed.append(name)
            print(f"FAIL {name}: {type(ex).__name__}: {str(ex)[:1500]}", flush=True)
    path = os.path.join(out_dir, "index.json")
    old = json.load(open(path)) if os.path.exists(path) else dict(fixtures=[])
    keep = [f for f in old["fixtures"] if f["name"] not in {e["name"] for e in index}]
    with open(path, "w") as fh:
        json.dump(dict(torch=torch.__version__, fixtures=sorted(keep + index, key=lambda f: f["name"]), failed=failed), fh, indent=1)
    print(f"{len(index)} exported, {len(failed)} failed: {failed}", flush=True)


# --- end of JetMoE, Llama-4, Nemotron-H, whole LMs ---


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--families", action="store_true", help="write the fixtures of models/families/ into --out")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    only = set(filter(None, a.only.split(",")))
    if a.families:
        return families_main(a.out, only)
    print(f"torch {torch.__version__}", flush=True)
    try:
        import transformers
        print(f"transformers {transformers.__version__}", flush=True)
    except ImportError:
        pass
    index, failed = [], []
    for i, (name, family, spec, rank, opset, dtype) in enumerate(FIXTURES):
        if only and name not in only:
            continue
        try:
            e = export_one(name, family, spec, rank, opset, dtype, a.out, a.seed + i)
            index.append(e)
            print(f"ok   {name}: {e.get('nodes')} nodes, {e['bytes']} bytes, ORT original: {e['original_runs_in_ort']}", flush=True)
        except Exception as ex:
            failed.append(name)
            print(f"FAIL {name}: {type(ex).__name__}: {str(ex)[:2000]}", flush=True)
            print("".join(traceback.format_exc().splitlines(True)[-12:])[-3000:], flush=True)
    for name, family, case in MATRIX_FIXTURES:
        if only and name not in only:
            continue
        try:
            e = export_matrix_case(name, family, case, a.out)
            index.append(e)
            print(f"ok   {name}: {e.get('nodes')} nodes, {e['bytes']} bytes, ORT original: {e['original_runs_in_ort']}", flush=True)
        except Exception as ex:
            failed.append(name)
            print(f"FAIL {name}: {type(ex).__name__}: {str(ex)[:2000]}", flush=True)
    if only:  # keep the other fixtures' entries
        path = os.path.join(a.out, "index.json")
        if os.path.exists(path):
            names = {e["name"] for e in index}
            index = [e for e in json.load(open(path))["fixtures"] if e["name"] not in names] + index
    with open(os.path.join(a.out, "index.json"), "w") as fh:
        json.dump(dict(torch=torch.__version__, fixtures=index, failed=failed), fh, indent=1)
    print(f"{len(index)} exported, {len(failed)} failed: {failed}", flush=True)


if __name__ == "__main__":
    main()
