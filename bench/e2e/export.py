"""Model preparation, per model and dtype, into a work folder that later calls reuse:

    <work>/<model>-<dtype>/
        ckpt/                  save_pretrained of the random model (+ a word-level tokenizer), for the builder only,
                               removed once the builder has run
        export/model.onnx      transformers -> torch.onnx.export(dynamo=True), with past keys and values
        rewritten/model.onnx   `scattermoe rewrite` of the export; rewrite.json its report
        nomoe/model.onnx       the export's graph with every MoE block cut out (for the MoE share)
        builder/model.onnx     onnxruntime-genai's model builder (GPT-OSS only), and its rewrite and cut
        prepared.json          what was made, how long it took, and why anything was not

The export: one graph for prefill and decode, inputs input_ids [B, S] and past_key_i / past_value_i
[B, kv heads, P, head dim] per layer (P = 0 at prefill), outputs logits [B, 1, vocab] (the last
position only: `logits_to_keep=1`, as generation needs) and present_key_i / present_value_i
[B, kv heads, P + S, head dim]. Positions follow from P; there is no attention mask (every row of a
batch is a full-length sequence). transformers' experts implementation is `batched_mm`, the only one
the dynamo exporter writes (eager's loop over hit experts is data-dependent; grouped_mm has no ONNX
translation: docs/rewriter-matrix.md).
"""

import json
import os
import shutil
import subprocess
import sys
import time

import configs

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def paths(work, model, dtype):
    root = os.path.join(work, f"{model}-{dtype}")
    return dict(root=root, ckpt=os.path.join(root, "ckpt"), export=os.path.join(root, "export", "model.onnx"),
                rewritten=os.path.join(root, "rewritten", "model.onnx"), nomoe=os.path.join(root, "nomoe", "model.onnx"),
                builder=os.path.join(root, "builder", "model.onnx"), builder_rw=os.path.join(root, "builder_rw", "model.onnx"),
                builder_nomoe=os.path.join(root, "builder_nomoe", "model.onnx"), prepared=os.path.join(root, "prepared.json"))


class WithPast:
    """The causal LM as (input_ids, *past) -> (logits of the last position, *present)."""

    @staticmethod
    def wrap(lm):
        import torch.nn as nn

        class _WithPast(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, past):
                from transformers import DynamicCache

                cache = DynamicCache()
                for i in range(len(past) // 2):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.m(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                present = []
                for layer in out.past_key_values.layers:
                    present += [layer.keys, layer.values]
                return (out.logits, *present)

        return _WithPast(lm).eval()


def io_names(layers):
    past = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def export_onnx(lm, cfg, path, tdtype, device):
    """torch.onnx.export(dynamo=True) of the model with past; external data beside the graph."""
    import onnx
    import torch

    layers = cfg.num_hidden_layers
    past_names, present_names = io_names(layers)
    model = WithPast.wrap(lm)
    B, S, P = 2, 3, 4  # example sizes: none 0 or 1 (torch.export would specialise them)
    ids = torch.randint(0, cfg.vocab_size, (B, S), device=device)
    past = [torch.randn(configs.past_shape(cfg, B, P), device=device).to(tdtype) for _ in past_names]
    b, s, p = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=65536), torch.export.Dim("past", min=0, max=65536)
    dyn = {"input_ids": {0: b, 1: s}, "past": [{0: b, 2: p} for _ in past_names]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with torch.no_grad():
        prog = torch.onnx.export(model, (ids, past), dynamic_shapes=dyn, dynamo=True, opset_version=18,
                                 input_names=["input_ids"] + past_names, output_names=["logits"] + present_names,
                                 external_data=True, verbose=False, optimize=True)
    prog.save(path, external_data=True)
    # keep to what ONNX Runtime 1.20+ reads, and drop the per-node stack traces (large, unused)
    m = onnx.load(path, load_external_data=False)
    if m.ir_version > 10:
        m.ir_version = 10
    for n in m.graph.node:
        n.doc_string = ""
    onnx.save(m, path)
    return dict(nodes=len(m.graph.node), inputs=[i.name for i in m.graph.input], outputs=[o.name for o in m.graph.output])


def router_outcomes(report):
    """Each rewritten layer's router, from the rewrite report: "fused: <TopKRouter attributes>" or
    "left: <why>" (router fusion, docs/rewriter.md)."""
    out = []
    for layer in report.get("layers", []):
        r = layer.get("router")
        if r is None:  # fusion did not run: --keep-router, or a layer without a router
            out.append("not tried")
        else:
            out.append(("fused: " if r.get("fused") else "left: ") + str(r.get("detail", "")))
    return out


def rewrite(cli, src, dst, extra=()):
    """`scattermoe rewrite SRC DST --json` (+ extra args); returns the report (raises on failure)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    t0 = time.time()
    p = subprocess.run([cli, "rewrite", src, dst, "--json", "--force", *extra], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"scattermoe rewrite failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-800:]}")
    report = json.loads(p.stdout)
    report["seconds"] = round(time.time() - t0, 2)
    if not report["layers"]:
        raise RuntimeError(f"scattermoe rewrite replaced no layer: {json.dumps(report.get('rejected'))[:800]}")
    return report


def cut_moe(src, dst, op_types=("ScatterMoE", "MoE")):
    """The graph with each MoE node's output replaced by its input 0 (the hidden states) and every node
    no output depends on any more removed: the model without its MoE blocks (router included), for
    the MoE share of a step. Initializers stay in the source's external data file, hard-linked into
    `dst`'s folder (ONNX Runtime refuses external data outside the model's folder, symbolic links
    included); copied where a hard link cannot be made."""
    import onnx

    m = onnx.load(src, load_external_data=False)
    g = m.graph
    keep = []
    for n in g.node:
        if n.op_type in op_types:
            keep.append(onnx.helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name + "/cut"))
        else:
            keep.append(n)
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(keep):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    for t in inits:
        for e in t.external_data:
            if e.key == "location":
                link = os.path.join(os.path.dirname(dst), e.value)
                if not os.path.exists(link):
                    target = os.path.join(os.path.dirname(src), e.value)
                    try:
                        os.link(target, link)
                    except OSError:
                        shutil.copy(target, link)
    onnx.save(m, dst)
    return dict(nodes=len(live), cut=sum(1 for n in live if n.name.endswith("/cut")))


def save_checkpoint(lm, cfg, path):
    """save_pretrained of the model, with a word-level tokenizer (the builder loads one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    lm.save_pretrained(path)
    V = cfg.vocab_size
    vocab = {f"t{i}": i for i in range(V - 4)} | {"<unk>": V - 4, "<s>": V - 3, "</s>": V - 2, "<pad>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def run_builder(ckpt, out_dir, dtype, ep, python=None, pythonpath=""):
    """onnxruntime-genai's model builder on the checkpoint: `-p {bf16,fp16,fp32} -e {cuda,cpu}`.
    windowed_kv_cache=false: every layer's KV buffer is max-length (GPT-OSS's sliding-window layers
    would otherwise keep a window-sized buffer that the caller must rotate as genai's runtime does)."""
    prec = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    cache = out_dir + ".cache"
    extra = ["windowed_kv_cache=false"]
    cmd = [python or sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", ckpt, "-o", out_dir, "-p", prec, "-e", ep,
           "-c", cache, "--extra_options", *extra]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(cache, ignore_errors=True)
    if p.returncode != 0:
        raise RuntimeError(f"model builder failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-800:]}")
    return dict(seconds=round(time.time() - t0, 2), command=" ".join(cmd))
