"""The original exported graph: the real Hugging Face MoE block with the benchmark's weights, exported as
models/generate.py exports the fixtures: torch.onnx.export(dynamo=False, opset 17, constant folding,
dynamic token axis), router included, bfloat16 weights (external data when over 2 GB).

Blocks (FAMILIES): transformers' MixtralSparseMoeBlock; Qwen3MoeSparseMoeBlock (qwen3, and the fine shape at
its sizes); DeepseekV3MoE's routed part (its gate and experts, as DeepseekV3MoE.forward calls them, without
the shared experts, which the layer leaves out); GptOssMLP (router with its bias, experts with theirs, the
clamped SwiGLU). The block's parameters are the benchmark's tensors themselves (views, no copy: DeepSeek-V3's
experts are 22.5 GB); GPT-OSS stores gate_up_proj as [E, d, 2f] and down_proj as [E, f, d], transposed views
of the benchmark's [E, 2f, d] (interleaved) and [E, d, f].

Routing: the blocks compute their own. Mixtral, Qwen3-MoE and GPT-OSS give the benchmark's routing (softmax,
top-k, renormalised; GPT-OSS takes the top-k logits first and softmaxes over the k, the same weights, rounded
to bfloat16). DeepSeek-V3's router scores by sigmoid, picks the top-k within the best groups, normalises the
k sigmoid scores and scales them by routed_scaling_factor: built with n_group = topk_group = 1 (no group
limit) and routed_scaling_factor = 1 it picks the benchmark's experts (sigmoid is monotonic and the logits
are distinct) with its own weights, sigmoid(l_i) / sum over the k of sigmoid(l_j): `routing_weights` gives
them, and the column's error is taken against the float32 reference with those weights.

The exporter traces the loop over the experts the traced input hits: the graph Splits the hit list
into exactly that many pieces, so it runs only on inputs that hit as many experts (it fails on the
others, e.g. at 1 token after a 16-token trace). `Exporter` therefore exports again whenever the hit
count changes (input sets of one token count share it by construction, see workload.py), tracing with
the token count being measured, and keeps one export (and its session) at a time. Each export writes the
whole expert tensors (the per-expert Gathers index them with values the trace cannot fold), and ORT loads
them onto the device: `fits` checks the free device memory first.

As exported, Qwen3-MoE's router computes softmax(logits, dtype=float) as a bfloat16 Softmax followed by
a Cast (the TorchScript exporter's rendering), so that graph's routing weights carry bf16 rounding;
the routing itself (top-k) is unaffected by the logits workload.py builds.
"""
import contextlib
import gc
import os
import shutil
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models"))
from generate import FirstOutput  # noqa: E402  (the fixtures' wrapper: exports the hidden states only)

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
# blocks whose bfloat16 export ONNX Runtime cannot load, and why (cpu_check.py checks that it still cannot)
UNLOADABLE = {
    "gpt_oss": "the TorchScript export (opset 17) writes GptOssTopKRouter's top-k of the bf16 logits as TopK over bfloat16, "
               "a type TopK-11 does not take: ORT refuses the model at load on every EP",
}


class RoutedOnly(torch.nn.Module):
    """DeepseekV3MoE.forward without `+ self.shared_experts(residuals)`: its gate, then its experts."""

    def __init__(self, moe):
        super().__init__()
        self.gate, self.experts = moe.gate, moe.experts

    def forward(self, hidden_states):
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        return self.experts(hidden_states, topk_indices, topk_weights).view(*orig_shape)


def _config_and_class(family, layer):
    import transformers as tr

    d, f, E, k = layer.dims
    eager = {"experts_implementation": "eager"}  # the per-expert loop, as the fixtures were exported
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        return tr.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k, **eager), Block
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        return tr.Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=E, num_experts_per_tok=k,
                                 norm_topk_prob=True, **eager), Block
    if family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block

        return tr.DeepseekV3Config(hidden_size=d, moe_intermediate_size=f, n_routed_experts=E, num_experts_per_tok=k,
                                   n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                                   **eager), Block
    if family == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as Block

        assert layer.activation == "swiglu_oai" and layer.glu == "interleaved" and layer.bias
        return tr.GptOssConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k,
                               **eager), Block
    raise ValueError(f"no Hugging Face block for family {family!r} (known: {', '.join(FAMILIES)})")


def _sources(family, w):
    """{parameter name: tensor it aliases}; w: workload.make_weights' dict (any float dtype, any device)."""
    if family == "gpt_oss":
        return {"experts.gate_up_proj": w["w_gu"].transpose(1, 2), "experts.gate_up_proj_bias": w["b_gu"],
                "experts.down_proj": w["w_down"].transpose(1, 2), "experts.down_proj_bias": w["b_down"],
                "router.weight": w["wr"]}
    return {"experts.gate_up_proj": w["w_gu"], "experts.down_proj": w["w_down"], "gate.weight": w["wr"]}


def build_block(family, layer, w):
    """(the block in eval mode, ready to export, transformers version). Built on the meta device, then each
    parameter set to its tensor of `w` (a view: no copy) and every other parameter or buffer (GPT-OSS's router
    bias, DeepSeek-V3's score correction bias) to zeros of w's dtype on w's device. DeepSeek-V3's block is
    wrapped in RoutedOnly; its shared experts are never materialised."""
    import transformers as tr

    cfg, Block = _config_and_class(family, layer)
    with torch.device("meta"):
        block = Block(cfg)
    if family == "deepseek_v3":
        block = RoutedOnly(block)
    ref = w["w_gu"]
    src = _sources(family, w)
    names = dict(block.named_parameters())
    missing = [n for n in src if n not in names or tuple(names[n].shape) != tuple(src[n].shape)]
    if missing:
        layout = ", ".join(f"{n} {tuple(p.shape)}" for n, p in names.items())
        raise RuntimeError(f"block parameters not in the expected layout ({', '.join(missing)}): {layout}")
    for name, p in names.items():
        mod, _, leaf = name.rpartition(".")
        t = src[name] if name in src else torch.zeros(p.shape, dtype=ref.dtype, device=ref.device)
        setattr(block.get_submodule(mod), leaf, torch.nn.Parameter(t, requires_grad=False))
    for name, b in list(block.named_buffers()):
        mod, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(mod), leaf, torch.zeros(b.shape, dtype=torch.float32 if b.is_floating_point() else b.dtype,
                                                           device=ref.device))
    return block.eval(), tr.__version__


def routing_weights(family, logits, ri):
    """The routing weights [T, k] (float32) the block computes for indices ri, where they are not the
    benchmark's (DeepSeek-V3: normalised sigmoid scores); None where they are."""
    if family != "deepseek_v3":
        return None
    s = logits.float().sigmoid().gather(1, ri)
    return s / (s.sum(-1, keepdim=True) + 1e-20)


def fits(layer, margin=1.15, reserve=4 << 30):
    """(whether an export's session fits the free device memory, message): it holds the whole expert
    tensors once more (the graph Gathers from them), plus room for the per-expert intermediates."""
    free, total = torch.cuda.mem_get_info()
    need = int(layer.expert_bytes() * margin) + reserve
    gb = 1 << 30
    return free >= need, (f"an export's session holds the experts again: needs ~{need / gb:.1f} GiB, "
                          f"{free / gb:.1f} of {total / gb:.1f} GiB free")


@contextlib.contextmanager
def _shape_inference_without_big_values(limit=16 << 20):
    """The TorchScript exporter's graph-level shape inference (run twice per export) rebuilds every node as
    a one-node ONNX model, embedding the full value of each parameter the node reads: each expert's
    Gather(gate_up_proj | down_proj, idx) serialises the whole fused tensor, 2 x hit x (805 + 403) MB for
    qwen3 (874 s on CPU at 84 hit). Those Gathers' indices are dynamic, so the values never fold; hiding
    tensors over `limit` from that pass alone leaves them typed graph inputs with their shapes.
    The exported file is byte-identical (checked: fine/qwen3 at 16 tokens, mixtral graph)."""
    orig = torch._C._jit_pass_onnx_graph_shape_type_inference

    def lean(graph, params_dict, opset):
        small = {name: v for name, v in params_dict.items()
                 if not (isinstance(v, torch.Tensor) and v.numel() * v.element_size() > limit)}
        return orig(graph, small, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = lean
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = orig


def export(block, x, path, opset=17):
    """x: [T, d] bf16 on the GPU, traced as [1, T, d] (the blocks take [batch, seq, d])."""
    with torch.no_grad(), _shape_inference_without_big_values():
        torch.onnx.export(FirstOutput(block).eval(), (x.unsqueeze(0),), path, dynamo=False, opset_version=opset,
                          input_names=["hidden_states"], output_names=["output"],
                          dynamic_axes={"hidden_states": {1: "S"}, "output": {1: "S"}}, do_constant_folding=True)
    import onnx

    m = onnx.load(path, load_external_data=False)
    nodes = len(m.graph.node)
    if m.ir_version > 10:  # as generate.py does; the weights stay where the exporter put them
        m.ir_version = 10
        onnx.save(m, path)
    return nodes


@dataclass
class Export:
    n_hit: int  # experts the traced input hit: the only inputs the graph runs on hit as many
    traced_tokens: int
    nodes: int
    session: object
    directory: str
    placement: dict = None  # {execution provider: nodes}, filled by the first run


class Exporter:
    """One HF block per layer shape; one export + ORT session per distinct experts-hit count, kept one at a time."""

    def __init__(self, layer, w, workdir):
        self.layer = layer
        self.block, self.transformers_version = build_block(layer.family, layer, w)
        self.workdir = workdir
        self.current = None
        self.failed = {}  # n_hit -> why its export or session failed

    def session_for(self, n_hit, x, make_session):
        """(session, Export) for inputs hitting n_hit experts; exports (traced with x) when n_hit changed."""
        if n_hit in self.failed:
            raise RuntimeError(self.failed[n_hit])
        if self.current is None or self.current.n_hit != n_hit:
            self.drop()
            if x.is_cuda:
                torch.cuda.empty_cache()
                ok, why = fits(self.layer)
                if not ok:
                    raise MemoryError(why)
            directory = os.path.join(self.workdir, f"hit{n_hit}")
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "block.onnx")
            try:
                nodes = export(self.block, x, path)
                self.current = Export(n_hit, x.shape[0], nodes, make_session(path), directory)
            except Exception as e:  # not tried again for this hit count
                shutil.rmtree(directory, ignore_errors=True)
                self.failed[n_hit] = f"export/session traced at {x.shape[0]} tokens: {type(e).__name__}: {e}"
                raise RuntimeError(self.failed[n_hit]) from e
        return self.current.session, self.current

    def drop(self):
        if self.current is not None:
            shutil.rmtree(self.current.directory, ignore_errors=True)
            self.current = None
            gc.collect()  # the session (and its device copy of the experts) goes now, not at some later collection

    def close(self):
        self.drop()
        del self.block
