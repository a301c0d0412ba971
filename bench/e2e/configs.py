"""The benchmark's models: real layer dimensions, few layers, seeded random weights.

Each model is a transformers causal LM built from a config, never from a hub checkpoint: the
dimensions of the public model named, with `layers` decoder layers instead of the full depth
(per-layer costs scale with depth; the embedding and LM head do not). `--tiny` shrinks every
width (hidden, heads, head dim, expert width, vocabulary) so that the same path runs on a CPU in
seconds; the expert count and top-k stay those of the real model, so routing has its real shape.
"""

import math

# router weights' gain over 1/sqrt(d): router logits of standard deviation ROUTER_GAIN (README, "Weights")
ROUTER_GAIN = 3.0

# name: (transformers config class, model class, layers, real config, tiny overrides)
MODELS = {
    # Mixtral-8x7B: d 4096, f 14336, E 8, k 2, 32 heads / 8 kv heads of 128
    "mixtral": dict(
        config="MixtralConfig", model="MixtralForCausalLM", layers=2, full_depth=32,
        real=dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False),
        tiny=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512),
    ),
    # Qwen3-30B-A3B: d 2048, moe f 768, E 128, k 8, 32 heads / 4 kv heads of 128, q/k norms
    "qwen3": dict(
        config="Qwen3MoeConfig", model="Qwen3MoeForCausalLM", layers=4, full_depth=48,
        real=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6, max_position_embeddings=40960, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
        tiny=dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    ),
    # GPT-OSS-20B: d 2880, f 2880, E 32, k 4, 64 heads / 8 kv heads of 64, sliding window 128 on
    # every other layer, attention sinks, biased experts with its clamped SwiGLU
    "gptoss": dict(
        config="GptOssConfig", model="GptOssForCausalLM", layers=2, full_depth=24,
        real=dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                  head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
        tiny=dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  sliding_window=16, max_position_embeddings=512),
    ),
}


def hf_config(name, tiny, experts_impl):
    """The transformers config of model `name` with the benchmark's depth and `experts_impl`."""
    import transformers as tr

    spec = MODELS[name]
    kw = dict(spec["real"])
    if tiny:
        kw.update(spec["tiny"])
    kw["num_hidden_layers"] = spec["layers"]
    if name == "gptoss":
        kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec["layers"])]
        # the rope scaling of GPT-OSS (YaRN, factor 32 over 4096) as its published config has it
        kw["rope_parameters"] = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                     original_max_position_embeddings=4096, truncate=False)
    cfg = getattr(tr, spec["config"])(**kw)
    cfg._experts_implementation = experts_impl
    # GPT-OSS's sinks have no SDPA path in transformers: eager attention there
    cfg._attn_implementation = "eager" if name == "gptoss" else "sdpa"
    return cfg


def build(name, tiny, dtype, seed, device="cpu", experts_impl="batched_mm"):
    """The model with seeded random weights (in float32 arithmetic, then cast), eval mode, on `device`."""
    import torch
    import transformers as tr

    cfg = hf_config(name, tiny, experts_impl)
    cls = getattr(tr, MODELS[name]["model"])
    try:
        with torch.device(device):  # built where it runs: a real-size model's init on the host takes minutes
            model = cls(cfg)
    except Exception as e:  # noqa: BLE001
        print(f"building on {device} failed ({type(e).__name__}: {e}); building on the host", flush=True)
        model = cls(cfg).to(device)
    randomise(model, seed, in_out=name == "gptoss")
    return model.to(dtype).eval()


def randomise(model, seed, in_out=False):
    """Seeded weights, drawn parameter by parameter in name order so that the values do not depend on
    how the model was built. Matrices ~ N(0, 1/fan_in) (activations keep their scale through the
    layers at any width); routers ROUTER_GAIN wider (each token's experts clearly chosen, the k-th
    still carrying a few percent); norms 1 (+ small noise), biases and attention sinks small; why and
    what it gives at the real widths (init_check.py): README.md, "Weights". `in_out`: the expert
    stacks are stored [E, in, out] (GPT-OSS), not [E, out, in]."""
    import torch

    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not p.dtype.is_floating_point:
                continue
            r = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32)
            # in place: one float32 temporary per parameter (Mixtral's expert stack is 3.8 GB of it)
            if "norm" in name:
                r.mul_(0.1).add_(1.0)
            elif "sinks" in name:
                r.mul_(0.5)
            elif p.dim() == 1 or name.endswith("bias"):
                r.mul_(0.02)
            elif "embed_tokens" in name:
                pass
            else:
                fan_in = p.shape[-2] if (in_out and "experts." in name) else p.shape[-1]
                r.div_(math.sqrt(fan_in))
                if any(s in name for s in (".gate.", ".router.")) and "proj" not in name:
                    r.mul_(ROUTER_GAIN)
            p.copy_(r.to(p.dtype))
            del r


def past_shape(cfg, batch, past):
    """[batch, kv heads, past, head_dim] of one layer's cached keys or values."""
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (batch, cfg.num_key_value_heads, past, head)
