"""vLLM's fused_moe: its Triton kernel `fused_moe_kernel` and its tile configurations, run the way its
fused_experts_impl runs a 16-bit layer (vllm/model_executor/layers/fused_moe/fused_moe.py):

    config = tuned JSON for (E, N = f, device) at the batch size nearest M, else get_default_config
    sorted_ids, expert_ids, n_post = moe_align_block_size(topk_ids, BLOCK_SIZE_M, E)
                                     (or, when M * k * 4 <= E, one block per assignment: no alignment)
    cache1[M, k, 2f] = fused_moe_kernel(x, w1, ..., mul_routed_weight=False, top_k=k)
    cache2[M * k, f] = act(cache1)                    (silu_and_mul; GPT-OSS: its clamped SwiGLU)
    cache3[M, k, d]  = fused_moe_kernel(cache2, w2, ..., mul_routed_weight=True, top_k=1)
    y = cache3.sum(1)                                 (moe_sum)

The code comes from vLLM's wheel, unpacked in the git-ignored .carry/vllm (bench/run_gpu_bench.sh's
header), never committed. Why not `import vllm`: the registry's vLLM pins a torch other than the
device's (0.34.0: torch 2.14, the device 2.11) and its package loads its compiled extension on
import. So `load` takes the kernel (with the one @triton.jit helper it calls) and the default-config
heuristic out of fused_moe.py's source (ast) and runs them beside the device's triton, reads the tuned
configurations from its configs/ folder by vLLM's own file-name rule, and does what vLLM's compiled
moe_align_block_size does in torch (`align`: same outputs, same meaning; a few small launches, not
timed apart from the column). The activation between the two kernels is torch's (vLLM's is a CUDA op
of its extension). Arguments are passed in the order of vLLM 0.34.0's invoke_fused_moe_triton_kernel
(16-bit path: no quantization, no tensor descriptors, no TMA, no swap-AB); `load` checks the
kernel's parameter names against that order and refuses another version with the difference named.
"""
import ast
import glob
import json
import os
import re

import torch

# fused_moe_kernel's parameters, in vLLM 0.34.0's order (invoke_fused_moe_triton_kernel passes them so).
KERNEL_PARAMS = tuple((
    "a_ptr b_ptr b_desc c_ptr b_bias_ptr a_scale_ptr b_scale_ptr topk_weights_ptr sorted_token_ids_ptr "
    "expert_ids_ptr num_tokens_post_padded_ptr a_desc N K EM num_valid_tokens stride_am stride_ak stride_be "
    "stride_bk stride_bn stride_cm stride_cn stride_asm stride_ask stride_bse stride_bsk stride_bsn stride_bbe "
    "stride_bbn group_n group_k naive_block_assignment BLOCK_SIZE_M BLOCK_SIZE_N BLOCK_SIZE_K GROUP_SIZE_M "
    "SPLIT_K MUL_ROUTED_WEIGHT top_k compute_type use_fp8_w8a8 use_int8_w8a8 use_int8_w8a16 per_channel_quant "
    "HAS_BIAS SWAP_AB USE_TD USE_TMA_B USE_TMA_A C_IS_SORTED").split())
FUSED_MOE = os.path.join("vllm", "model_executor", "layers", "fused_moe")


class _Off:
    """The two vLLM settings get_default_config reads, at their defaults on an NVIDIA GPU."""
    VLLM_BATCH_INVARIANT = False

    @staticmethod
    def is_rocm():
        return False


class VllmMoe:
    def __init__(self, kernel, default_config, configs_dir, version):
        self.kernel, self.default_config, self.configs_dir, self.version = kernel, default_config, configs_dir, version

    def config_file(self, E, N, device_name):
        """vLLM's get_config_file_name for 16-bit weights (no dtype, no block shape)."""
        name = re.sub(r"[\s/]+", "_", device_name)
        if "H200" in name.split("_"):
            name = "NVIDIA_H200"
        return os.path.join(self.configs_dir, f"E={E},N={N},device_name={name}.json")

    def config(self, M, E, f, d, k, device_name):
        """(config, source): the tuned entry nearest M when vLLM ships a file for this shape and GPU, else
        vLLM's default heuristic; source names which."""
        path = self.config_file(E, f, device_name)
        if os.path.exists(path):
            with open(path) as fh:
                table = {int(m): c for m, c in json.load(fh).items() if m != "triton_version"}
            return dict(table[min(table, key=lambda m: abs(m - M))]), os.path.basename(path)
        return dict(self.default_config(M, E, f, d, k, None, None)), "default config (no tuned file)"


def load(directory):
    """The kernel and the default-config heuristic from directory/vllm/.../fused_moe/fused_moe.py."""
    src_path = os.path.join(os.path.abspath(directory), FUSED_MOE, "fused_moe.py")
    if not os.path.isfile(src_path):
        raise FileNotFoundError(f"no {FUSED_MOE}/fused_moe.py under {directory}")
    import triton
    import triton.language as tl

    tree = ast.parse(open(src_path).read(), src_path)
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    want = ("write_zeros_to_output", "fused_moe_kernel", "get_default_config")
    missing = [n for n in want if n not in defs]
    if missing:
        raise RuntimeError(f"{src_path} has no {', '.join(missing)}: not the vLLM this peer was written for")
    params = [a.arg for a in defs["fused_moe_kernel"].args.args]
    if tuple(params) != KERNEL_PARAMS:
        diff = [f"{i}: {a} != {b}" for i, (a, b) in enumerate(zip(params, KERNEL_PARAMS)) if a != b]
        raise RuntimeError(f"fused_moe_kernel's parameters differ from vLLM 0.34.0's ({len(params)} against "
                           f"{len(KERNEL_PARAMS)}; {'; '.join(diff[:4])})")
    module = ast.Module(body=[defs[n] for n in want], type_ignores=[])
    # The source file stays the kernel's file name, so triton's errors and line numbers point into vLLM's.
    ns = {"triton": triton, "tl": tl, "torch": torch, "envs": _Off, "current_platform": _Off,
          "next_power_of_2": lambda n: 1 << max(int(n) - 1, 0).bit_length(),
          "should_moe_wna16_use_cuda": lambda *a: False, "__name__": "vllm_fused_moe"}
    exec(compile(module, src_path, "exec"), ns)
    version = "?"
    for meta in glob.glob(os.path.join(os.path.abspath(directory), "vllm-*.dist-info", "METADATA")):
        for line in open(meta):
            if line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
    return VllmMoe(ns["fused_moe_kernel"], ns["get_default_config"], os.path.join(os.path.dirname(src_path), "configs"),
                   version)


def align(ri, block_m, E):
    """What vLLM's moe_align_block_size returns, in torch: sorted_ids [max_pad] int32 (assignment ids t * k + j
    grouped by expert, each expert's run padded to a multiple of block_m with the sentinel T * k), expert_ids
    [max_pad / block_m] int32 (the expert of each block; blocks past n_post are never run), n_post [1] int32
    (the padded total). Sizes as vLLM's: max_pad = T k + E (block_m - 1), at most T k block_m when T k < E.
    No host synchronisation (a CUDA graph can hold it)."""
    flat = ri.reshape(-1).long()
    n = flat.numel()
    max_pad = n + E * (block_m - 1)
    if n < E:
        max_pad = min(n * block_m, max_pad)
    counts = torch.zeros(E, dtype=torch.long, device=ri.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    rank = torch.arange(n, device=ri.device) - (counts.cumsum(0) - counts)[e_sorted]
    sorted_ids = torch.full((max_pad,), n, dtype=torch.int32, device=ri.device)
    sorted_ids[(pad_end - padded)[e_sorted] + rank] = order.to(torch.int32)
    blocks = torch.arange(0, max_pad, block_m, device=ri.device)
    expert_ids = torch.searchsorted(pad_end, blocks, right=True).clamp_(max=E - 1).to(torch.int32)
    return sorted_ids, expert_ids, pad_end[-1:].to(torch.int32)


def invoke(vm, A, B, C, topk_weights, sorted_ids, expert_ids, n_post, mul_routed_weight, top_k, config, bias=None):
    """invoke_fused_moe_triton_kernel's 16-bit path: C[M, top_k, N] (= A's rows by the sorted ids) @ B[e]^T."""
    import triton
    import triton.language as tl

    M = A.size(0)
    num_tokens = M * top_k
    if sorted_ids is not None:
        EM = sorted_ids.size(0)
        if A.size(0) < config["BLOCK_SIZE_M"]:
            EM = min(sorted_ids.size(0), A.size(0) * top_k * config["BLOCK_SIZE_M"])
    else:
        EM = num_tokens * config["BLOCK_SIZE_M"]
    config = dict(config)
    config["SPLIT_K"] = 1
    block_k = config.pop("BLOCK_SIZE_K")
    config.pop("USE_TMA", None)
    compute_type = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[A.dtype]
    grid = (triton.cdiv(EM, config["BLOCK_SIZE_M"]) * triton.cdiv(B.size(1), config["BLOCK_SIZE_N"]),)
    vm.kernel[grid](
        A, B, None, C, bias, None, None, topk_weights, sorted_ids, expert_ids, n_post, None,
        B.size(1), B.size(2), EM, num_tokens,
        A.stride(0), A.stride(1), B.stride(0), B.stride(2), B.stride(1), C.stride(1), C.stride(2),
        0, 0, 0, 0, 0,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        0, 0,
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=compute_type, use_fp8_w8a8=False,
        use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False,
        naive_block_assignment=sorted_ids is None, HAS_BIAS=bias is not None, BLOCK_SIZE_K=block_k,
        SWAP_AB=False, USE_TD=False, USE_TMA_B=False, USE_TMA_A=False, C_IS_SORTED=False, **config)


def forward(vm, x, rw, ri, w1, w2, b1, b2, layer, config=None, device_name=None):
    """fused_experts_impl for 16-bit weights: w1 [E, 2f, d] (gate_up, or the layer's glu layout), w2 [E, d, f];
    rw [T, k] (the routing weights, applied in the second kernel), ri [T, k]. layer: the bench layer whose
    gated activation runs between the kernels (peers/workload.py's glu_act: its glu layout, SwiGLU or
    GPT-OSS's clamped form). config: a fixed config (else looked up per call, as vLLM does per batch size)."""
    from peers import workload

    M, d = x.shape
    E, N, _ = w1.shape
    k = ri.shape[1]
    if config is None:
        config, _ = vm.config(M, E, w2.shape[2], d, k, device_name or torch.cuda.get_device_name())
    if M * k * 4 <= E:  # vLLM's low-latency path: one block per assignment, no alignment
        sorted_ids, expert_ids = None, ri.reshape(-1).to(torch.int32)
        n_post = torch.full((1,), M * k * config["BLOCK_SIZE_M"], dtype=torch.int32, device=x.device)
    else:
        sorted_ids, expert_ids, n_post = align(ri, config["BLOCK_SIZE_M"], E)
    tw = rw.contiguous()
    cache1 = torch.empty(M, k, N, device=x.device, dtype=x.dtype)
    invoke(vm, x, w1, cache1, tw, sorted_ids, expert_ids, n_post, False, k, config, b1)
    a = workload.glu_act(cache1.view(M * k, N), layer)
    cache3 = torch.empty(M, k, d, device=x.device, dtype=x.dtype)
    invoke(vm, a.contiguous(), w2, cache3, tw, sorted_ids, expert_ids, n_post, True, 1, config, b2)
    return cache3.sum(dim=1)
