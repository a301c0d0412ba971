#!/usr/bin/env python3
"""Do the benchmark's random weights (configs.randomise) keep a real-size model's activations O(1)?

One decoder layer at the model's real dimensions is built on the CPU in float32 and redrawn before
each use (seed + layer index: each pass is a fresh, independent layer, so a full-depth stack costs the
memory of one layer), and a prompt's hidden states go through `--depth` such layers. Per layer it
prints the residual stream's RMS and max |h| (float16 overflows at 65504), the attention and MoE
outputs' RMS, and the router: the gap between the k-th and (k+1)-th router logit (a gap below the
arithmetic's error lets two implementations choose different experts for a token), the weight of the
k-th choice (what such a flip moves) and the expert load. At the end, the logits of a random LM head
at the real vocabulary: max |logit| and the top-2 margin over it (the check's tie rule).

With `--twin N` the first N layers also run in float16 (the same weights rounded, the CPU's float16
arithmetic) from the float16-rounded prompt: the relative error of each MoE output and of the logits
against float32, and the tokens whose expert choice differs. That is how far apart two correct
float16 implementations of the model can be (two graphs of the same model differ by less: the same
routers on the same rounded inputs).

    python bench/e2e/init_check.py --model gptoss --depth 24 --twin 2     (about 3 minutes, 1 thread, ~8 GB)
"""

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import configs  # noqa: E402


def one_layer_model(name, experts_impl="eager"):
    """The model's base (no LM head) with one decoder layer at real widths and a small vocabulary (the
    prompt enters as embeddings)."""
    import torch
    import transformers as tr

    cfg = configs.hf_config(name, False, experts_impl)
    cfg.num_hidden_layers = 1
    cfg.vocab_size = 64
    if name == "gptoss":
        cfg.layer_types = ["full_attention"]
    with torch.device("cpu"):
        base = getattr(tr, configs.MODELS[name]["model"])(cfg).model
    return base.eval(), cfg


def router_of(layer):
    return layer.mlp.router if hasattr(layer.mlp, "router") else layer.mlp.gate


def stats(base, cfg, h, k):
    """Runs the base's one layer on h; returns (layer output, record) with hooks' readings."""
    import torch

    layer = base.layers[0]
    got = {}
    hooks = [router_of(layer).register_forward_hook(lambda m, i, o: got.__setitem__("router", o)),
             layer.mlp.register_forward_hook(lambda m, i, o: got.__setitem__("moe", o[0] if isinstance(o, tuple) else o)),
             layer.register_forward_hook(lambda m, i, o: got.__setitem__("out", o[0] if isinstance(o, tuple) else o)),
             layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: got.__setitem__("mid", i[0]))]
    with torch.no_grad():
        base(inputs_embeds=h, use_cache=False)
    for x in hooks:
        x.remove()
    logits, scores, idx = got["router"]
    top = logits.float().topk(k + 1, dim=-1).values
    gap = (top[:, k - 1] - top[:, k]).double()
    load = torch.bincount(idx.reshape(-1), minlength=logits.shape[-1]).double()
    kth = scores.float().sort(dim=-1).values[:, 0]  # the smallest chosen weight
    out, mid, moe = got["out"].float(), got["mid"].float(), got["moe"].float()
    rec = dict(rms_in=rms(h), rms_attn=rms(mid - h.float()), rms_moe=rms(moe), rms_out=rms(out), max_out=float(out.abs().max()),
               gap_min=float(gap.min()), gap_p1=float(gap.quantile(0.01)), gap_med=float(gap.median()),
               kth_w_med=float(kth.median()), kth_w_max=float(kth.max()), unused=int((load == 0).sum()),
               load_max_over_mean=float(load.max() / load.mean()), rl_std=float(logits.float().std()))
    return got["out"], rec, moe.reshape(-1, moe.shape[-1]), idx.reshape(idx.shape[0], -1)


def rms(x):
    return float(x.float().pow(2).mean().sqrt())


def logits_of(h, cfg, seed, chunk=16384):
    """A random final RMSNorm (1 + 0.1 N(0,1)) and LM head (N(0, 1/d)) at the real vocabulary, drawn in chunks."""
    import torch

    d = cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    w = 1.0 + 0.1 * torch.randn(d, generator=g)
    x = h.float().reshape(-1, d)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w
    out = []
    for at in range(0, cfg_vocab(cfg), chunk):
        n = min(chunk, cfg_vocab(cfg) - at)
        W = torch.randn(n, d, generator=g) / math.sqrt(d)
        out.append(x @ W.T)
    return torch.cat(out, -1)


def cfg_vocab(cfg):
    return cfg.real_vocab


def margins(lg):
    top = lg.topk(2, dim=-1).values
    scale = lg.abs().max(-1).values
    return (top[:, 0] - top[:, 1]) / scale, scale


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gptoss", choices=sorted(configs.MODELS))
    ap.add_argument("--depth", type=int, default=0, help="layers (default: the model's full depth)")
    ap.add_argument("--twin", type=int, default=0, help="also run the first N layers in float16 (default: the benchmark's depth)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    spec = configs.MODELS[a.model]
    depth = a.depth or spec["full_depth"]
    twin = a.twin if a.twin else spec["layers"]
    base, cfg = one_layer_model(a.model)
    cfg.real_vocab = spec["real"]["vocab_size"]
    k = cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(a.seed)
    h = torch.randn(1, a.tokens, cfg.hidden_size, generator=g)  # embedding rows are N(0, 1) (configs.randomise)
    h16 = h.half()
    print(f"{a.model}: d {cfg.hidden_size}, E {router_of(base.layers[0]).weight.shape[0]}, k {k}, {a.tokens} tokens, {depth} layers "
          f"(float16 twin: first {twin}), router gain {configs.ROUTER_GAIN}", flush=True)
    print("layer | rms in | rms attn | rms moe | rms out | max|h| | router std | k/k+1 gap min, p1, median | k-th weight median, max | "
          "unused experts | load max/mean | twin: moe rel err, tokens routed differently, h rel err")
    t0 = time.time()
    twin_rows = []
    for i in range(depth):
        configs.randomise(base, a.seed * 1000 + i, in_out=a.model == "gptoss")
        out, r, moe, idx = stats(base, cfg, h, k)
        tw = ""
        if i < twin:
            base.layers[0].half()
            out16, _, moe16, idx16 = stats(base, cfg, h16, k)
            base.layers[0].float()
            e_moe = float((moe16.float() - moe).abs().max() / moe.abs().max())
            diff = int((idx16.sort(-1).values != idx.sort(-1).values).any(-1).sum())
            e_h = float((out16.float() - out).abs().max() / out.abs().max())
            twin_rows.append((e_moe, diff, e_h))
            tw = f" | {e_moe:.2e}, {diff}, {e_h:.2e}"
            h16 = out16
        print(f"{i} | {r['rms_in']:.3f} | {r['rms_attn']:.3f} | {r['rms_moe']:.3f} | {r['rms_out']:.3f} | {r['max_out']:.2f} | "
              f"{r['rl_std']:.2f} | {r['gap_min']:.4f}, {r['gap_p1']:.4f}, {r['gap_med']:.3f} | {r['kth_w_med']:.3f}, {r['kth_w_max']:.3f} | "
              f"{r['unused']} | {r['load_max_over_mean']:.2f}{tw}", flush=True)
        h = out
        if i + 1 == twin:
            h_twin = h.clone()
    lg = logits_of(h, cfg, a.seed + 7)
    m, scale = margins(lg)
    print(f"logits after {depth} layers: max|logit| median {float(scale.median()):.2f}; top-2 margin / max|logit|: median "
          f"{float(m.median()):.4f}, below float16's 2e-2 {float((m < 2e-2).float().mean()):.2f}, below bfloat16's 5e-2 "
          f"{float((m < 5e-2).float().mean()):.2f} of tokens")
    if twin:
        lg32 = logits_of(h_twin, cfg, a.seed + 7)
        lg16 = logits_of(h16.float(), cfg, a.seed + 7)  # the head in float32: the error is the layers'
        err = float(((lg16 - lg32).abs().max(-1).values / lg32.abs().max(-1).values).max())
        same = float((lg16.argmax(-1) == lg32.argmax(-1)).float().mean())
        m, _ = margins(lg32)
        print(f"float16 twin after {twin} layers: logits max relative error {err:.2e} (tolerance 2e-2), greedy picks equal for "
              f"{same:.2f} of tokens; top-2 margin / max|logit| median {float(m.median()):.4f}")
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
