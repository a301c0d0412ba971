#!/usr/bin/env python3
"""The rewriter's matrix over transformers' MoE blocks: family x experts implementation x exporter x dtype.

Two phases, so that a change to the rewriter re-runs only the second:

    export   (needs torch 2.11 + transformers 5.17 + onnx; onnxscript for the dynamo exporter)
             enumerates every MoE block class in transformers.models.*.modeling_* (a class whose
             __init__ builds an experts module: `self.experts = ...` or `...Experts(...)`; decoder
             layers and whole models excluded, so models whose experts sit only in the decoder
             layer, Gemma 4 and DiffusionGemma, are covered by generate.py --families' whole-model
             fixtures instead), builds each with a tiny config (d=32, E=4, k=2,
             small f; whatever else the config requires left at its default), seeded weights, and
             exports it for every experts implementation transformers registers that runs on CPU
             ("eager", "batched_mm", "grouped_mm"), every exporter (TorchScript opset 17 and 18,
             dynamo) and dtype (float32, float16). Writes <case>.onnx, <case>.npz (torch's x/y at
             1, 7 and the traced token count), one part.<class>.json per family and
             families.json into --dir (--resume skips families already there).

    check    (needs onnxruntime, numpy, onnx, and the built `scattermoe` CLI and plugin; no torch)
             runs each export in ONNX Runtime (CPU) at 1, 7 and traced tokens against torch, then
             `scattermoe rewrite --json`, counts ScatterMoE nodes and runs the rewritten model with
             the plugin at 1, 7 and traced tokens (f32 1e-4, f16 1e-2). Writes results.json and the
             table (docs/rewriter-matrix.md by default).

    python models/matrix.py list
    python models/matrix.py export --dir /tmp/matrix [--jobs 8] [--only mixtral,olmoe]
    python models/matrix.py check --dir /tmp/matrix --cli target/release/scattermoe \\
        --plugin target/release/libscattermoe_ort.so --md docs/rewriter-matrix.md
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

TRACED = 16
LENGTHS = (1, 7, TRACED)
IMPLS = ("eager", "batched_mm", "grouped_mm")  # transformers 5's experts implementations that run on CPU
EXPORTERS = ("ts17", "ts18", "dynamo")
DTYPES = ("float32", "float16")
TOL = {"float32": 1e-4, "float16": 1e-2}

# Tiny-config values, set only where the family's config already has the attribute.
TINY = dict(
    hidden_size=32, d_model=32, n_embd=32,
    intermediate_size=32, moe_intermediate_size=16, expert_intermediate_size=16, d_ff=32,
    shared_expert_intermediate_size=32, ffn_hidden_size=16, expert_hidden_size=16,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_routed_experts=4,
    num_experts_per_tok=2, moe_top_k=2, top_k=2, num_selected_experts=2, moe_k=2,
    n_group=1, topk_group=1, num_expert_group=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, kv_channels=8,
    num_hidden_layers=2, vocab_size=128, first_k_dense_replace=0, expert_capacity=24,
    moe_layer_freq=1, decoder_sparse_step=1, mlp_only_layers=[],
)


# ---------------------------------------------------------------------------------------------
# enumeration (torch + transformers)
# ---------------------------------------------------------------------------------------------


def enumerate_blocks():
    """(model_type, module name, class name) of every MoE block class, sorted."""
    import importlib
    import inspect
    import pkgutil

    import torch.nn as nn
    import transformers.models as M

    found = []
    for mi in sorted(pkgutil.iter_modules(M.__path__), key=lambda m: m.name):
        try:
            sub = importlib.import_module(f"transformers.models.{mi.name}")
        except Exception:
            continue
        for mj in pkgutil.iter_modules(sub.__path__):
            if not mj.name.startswith("modeling_"):
                continue
            try:
                mod = importlib.import_module(f"transformers.models.{mi.name}.{mj.name}")
            except Exception:
                continue
            for n, c in vars(mod).items():
                if not (inspect.isclass(c) and issubclass(c, nn.Module) and c.__module__ == mod.__name__):
                    continue
                if any(s in n for s in ("DecoderLayer", "Model", "ForCausalLM")):
                    continue
                if n.endswith("Layer") and "moe" not in n.lower():
                    continue  # a decoder layer under another name
                if n.endswith("Experts"):
                    continue  # the experts module itself: its block is the unit
                try:
                    src = inspect.getsource(c.__init__)
                except (OSError, TypeError):
                    continue
                if "self.experts =" in src or "Experts(" in src:
                    found.append((mi.name, mod.__name__, n))
    return sorted(set(found))


def _set_tiny(cfg):
    for key, v in TINY.items():
        if key in cfg.__dict__ or hasattr(type(cfg), key):
            try:
                setattr(cfg, key, list(v) if isinstance(v, list) else v)
            except Exception:
                pass
    if "ffn_config" in cfg.__dict__:  # DBRX keeps its MoE sizes in a sub-config
        fc = cfg.ffn_config
        for key, v in dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2, hidden_size=32).items():
            if isinstance(fc, dict):
                fc[key] = v
            elif hasattr(fc, key):
                setattr(fc, key, v)
    if "layer_types" in cfg.__dict__ and isinstance(cfg.layer_types, list):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers] if hasattr(cfg, "num_hidden_layers") else cfg.layer_types


def tiny_block(model_type, module, cls_name, impl):
    """The block with a tiny config and the experts implementation `impl`."""
    import importlib
    import inspect

    import transformers as tr

    cfg = tr.AutoConfig.for_model(model_type)
    configs = [cfg]
    for sub in ("text_config", "thinker_config", "talker_config", "vision_config"):
        s = getattr(cfg, sub, None)
        if s is not None and hasattr(s, "to_dict"):
            configs.append(s)
            for sub2 in ("text_config",):
                s2 = getattr(s, sub2, None)
                if s2 is not None and hasattr(s2, "to_dict"):
                    configs.append(s2)
    for c in configs:
        _set_tiny(c)
        c._experts_implementation = impl
    cls = getattr(importlib.import_module(module), cls_name)
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    errors = []
    # the block's own config: the text config of a multimodal model first
    for c in reversed(configs):
        for extra in ({}, {"layer_idx": 0}, {"layer_id": 0}):
            kw = {k: v for k, v in extra.items() if k in params}
            try:
                return cls(c, **kw), c
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
    raise RuntimeError("construction failed: " + errors[-1][:300] if errors else "no config")


def randomise(m, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            if p.dim() >= 2:
                scale = 1.0 / math.sqrt(p.shape[-1])
                # routers get a wider spread so that routing is decisive
                if p.dim() == 2 and p.shape[0] <= 16 and any(s in name for s in ("router", "gate", "classifier")):
                    scale *= 3.0
            else:
                scale = 0.1
                if "bias" in name and ("router" in name or "correction" in name):
                    scale = 0.01
            p.copy_(torch.randn(p.shape, generator=g) * scale)


class Outer:
    """Exports only the block's first output (some also return router logits)."""

    @staticmethod
    def wrap(block):
        import torch.nn as nn

        class FirstOutput(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                y = self.m(x)
                return y[0] if isinstance(y, tuple) else y

        return FirstOutput(block).eval()


def export_case(fam, impl, exporter, dtype, out_dir, seed):
    """Exports one case; returns its record (never raises)."""
    import numpy as np
    import torch

    model_type, module, cls_name = fam
    name = f"{cls_name}.{impl}.{exporter}.{'f32' if dtype == 'float32' else 'f16'}"
    rec = dict(case=name, family=cls_name, model_type=model_type, impl=impl, exporter=exporter, dtype=dtype)
    try:
        block, cfg = tiny_block(model_type, module, cls_name, impl)
    except Exception as e:
        rec["status"] = "construction failed"
        rec["reason"] = str(e).splitlines()[0][:300]
        return rec
    randomise(block, seed)
    tdtype = getattr(torch, dtype)
    model = Outer.wrap(block.to(tdtype))
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or 32

    def make_x(S, s):
        g = torch.Generator().manual_seed(s)
        return torch.randn((1, S, d), generator=g).to(tdtype)

    # a traced input on which torch runs (and, for eager loops, that hits every expert is not
    # required: the matrix shows what the exporter writes for a typical input)
    x_trace = make_x(TRACED, seed * 1000)
    try:
        with torch.no_grad():
            y_trace = model(x_trace)
    except Exception as e:
        rec["status"] = "torch forward failed"
        rec["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return rec
    path = os.path.join(out_dir, name + ".onnx")
    t0 = time.time()
    try:
        with torch.no_grad():
            if exporter == "dynamo":
                S = torch.export.Dim("S", min=1, max=4096)
                torch.onnx.export(model, (x_trace,), path, dynamo=True, input_names=["hidden_states"],
                                  output_names=["output"], dynamic_shapes={"x": {1: S}}, opset_version=18,
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(model, (x_trace,), path, dynamo=False, opset_version=int(exporter[2:]),
                                  input_names=["hidden_states"], output_names=["output"],
                                  dynamic_axes={"hidden_states": {1: "S"}, "output": {1: "S"}},
                                  do_constant_folding=True)
    except Exception as e:
        rec["status"] = "export failed"
        rec["reason"] = short_reason(e)
        if os.path.exists(path):
            os.remove(path)
        return rec
    rec["export_s"] = round(time.time() - t0, 2)
    try:
        import onnx

        m = onnx.load(path)
        if m.ir_version > 10:  # ORT 1.31 reads IR <= 13; keep to what older ORT reads too
            m.ir_version = 10
            onnx.save(m, path)
        rec["nodes"] = len(m.graph.node)
    except Exception as e:
        rec["status"] = "export failed"
        rec["reason"] = f"unreadable ONNX: {e}"[:300]
        return rec
    arrays = {}
    for S in LENGTHS:
        x = x_trace if S == TRACED else make_x(S, 7 + S)
        with torch.no_grad():
            y = y_trace if S == TRACED else model(x)
        arrays[f"x_{S}"] = x.numpy()
        arrays[f"y_{S}"] = y.float().numpy().astype(x.numpy().dtype)
    np.savez(os.path.join(out_dir, name + ".npz"), **arrays)
    rec["status"] = "exported"
    rec["bytes"] = os.path.getsize(path)
    return rec


def short_reason(e):
    """The root cause of an exporter's error in one line (the exporters wrap it in a banner)."""
    import re

    while e.__cause__ is not None:
        e = e.__cause__
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"


def impls():
    """The experts implementations of the installed transformers. Before 5.0 a block has one forward
    (its own per-expert loop, or GPT-OSS's loop on CPU), so only "eager" names something real."""
    import transformers

    return IMPLS if int(transformers.__version__.split(".")[0]) >= 5 else ("eager",)


def export_family(fam_key, out_dir, seed):
    import torch

    torch.set_num_threads(1)
    fam = tuple(fam_key.split("|"))
    recs = []
    for impl in impls():
        for exporter in EXPORTERS:
            for dtype in DTYPES:
                try:
                    recs.append(export_case(fam, impl, exporter, dtype, out_dir, seed))
                except Exception as e:  # never lose the family's other cases
                    recs.append(dict(case=f"{fam[2]}.{impl}.{exporter}.{dtype}", family=fam[2], model_type=fam[0], impl=impl,
                                     exporter=exporter, dtype=dtype, status="export failed",
                                     reason=f"{type(e).__name__}: {str(e)[:300]}"))
                print(json.dumps(recs[-1]), flush=True)
    return recs


def cmd_export(a):
    os.makedirs(a.dir, exist_ok=True)
    if a.tiny:  # KEY=VALUE,...: other tiny-config values (e.g. routers with groups: n_group=4,topk_group=2)
        TINY.update({k: int(v) if v.lstrip("-").isdigit() else v for k, v in (kv.split("=") for kv in a.tiny.split(","))})
    if a.family:  # one family, in this process (a worker)
        recs = export_family(a.family, a.dir, a.seed)
        with open(os.path.join(a.dir, "part." + a.family.split("|")[2] + ".json"), "w") as fh:
            json.dump(recs, fh)
        return
    fams = enumerate_blocks()
    only = set(filter(None, a.only.split(",")))
    if only:
        fams = [f for f in fams if f[0] in only or f[2] in only]
    if a.part:  # i/n: every n-th family from the i-th, to split a run over several machines or calls
        i, n = map(int, a.part.split("/"))
        fams = fams[i::n]
    print(f"{len(fams)} MoE block classes", flush=True)
    import torch
    import transformers

    if not os.path.exists(os.path.join(a.dir, "families.json")):
        with open(os.path.join(a.dir, "families.json"), "w") as fh:
            json.dump(dict(torch=torch.__version__, transformers=transformers.__version__, families=[list(f) for f in fams]), fh)
    if a.resume:  # families already exported into this folder are kept
        fams = [f for f in fams if not os.path.exists(os.path.join(a.dir, "part." + f[2] + ".json"))]
    from concurrent.futures import ThreadPoolExecutor

    def run(f):
        key = "|".join(f)
        part = os.path.join(a.dir, "part." + f[2] + ".json")
        try:
            p = subprocess.run([sys.executable, __file__, "export", "--dir", a.dir, "--family", key, "--seed", str(a.seed)]
                               + (["--tiny", a.tiny] if a.tiny else []),
                               capture_output=True, text=True, timeout=a.timeout)
            if os.path.exists(part):
                return json.load(open(part))
            tail = (p.stderr or p.stdout)[-300:]
            return [dict(case=f"{f[2]}.*", family=f[2], model_type=f[0], status="export failed", reason=f"worker died: {tail}")]
        except subprocess.TimeoutExpired:
            return [dict(case=f"{f[2]}.*", family=f[2], model_type=f[0], status="export failed", reason=f"timed out after {a.timeout}s")]

    recs = []
    with ThreadPoolExecutor(a.jobs) as ex:
        for f, r in zip(fams, ex.map(run, fams)):
            recs.extend(r)
            print(f"{f[2]}: " + ", ".join(x.get("status", "?") for x in r), flush=True)
    print(f"{len(recs)} cases", flush=True)


# ---------------------------------------------------------------------------------------------
# check (onnxruntime + the CLI; no torch)
# ---------------------------------------------------------------------------------------------


def rel_err(o, y):
    import numpy as np

    o = o.astype(np.float64)
    y = y.astype(np.float64)
    if not np.isfinite(o).all():
        return float("inf")
    return float(np.abs(o - y).max() / max(np.abs(y).max(), 1e-30))


def run_ort(path, arrays, plugin=None):
    """{S: relative error or 'fails: ...'} at each length."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # an export failing at some length is a result, not noise
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if plugin:
        so.register_custom_ops_library(plugin)
    try:
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        return {"session": "fails: " + str(e).splitlines()[0][:200]}
    iname = sess.get_inputs()[0].name
    res = {}
    for S in LENGTHS:
        try:
            (o,) = sess.run(None, {iname: arrays[f"x_{S}"]})[:1]
            res[str(S)] = rel_err(o, arrays[f"y_{S}"])
        except Exception as e:
            res[str(S)] = "fails: " + str(e).splitlines()[0][:200]
    return res


def ok(res, tol, lengths=LENGTHS):
    return all(isinstance(res.get(str(S)), float) and res[str(S)] <= tol for S in lengths)


def check_case(rec, a):
    import numpy as np
    import onnx

    if rec.get("status") != "exported":
        return rec
    base = os.path.join(a.dir, rec["case"])
    arrays = dict(np.load(base + ".npz"))
    tol = TOL[rec["dtype"]]
    rec["ort"] = run_ort(base + ".onnx", arrays)
    out = os.path.join(a.work, rec["case"] + ".rw.onnx")
    for p in (out, out + ".data"):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.time()
    p = subprocess.run([a.cli, "rewrite", base + ".onnx", out, "--json", "--allow-none"], capture_output=True, text=True, timeout=300)
    rec["rewrite_s"] = round(time.time() - t0, 2)
    rep = None
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            try:
                rep = json.loads(line)
                break
            except ValueError:
                pass
    if p.returncode != 0 or rep is None:
        rec["rewrite"] = "error"
        rec["rewrite_reason"] = (p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout).strip() else f"exit {p.returncode}"
    elif not rep["layers"]:
        rec["rewrite"] = "refused"
        rs = rep.get("rejected") or []
        rec["rewrite_reason"] = (rs[0]["family"] + ": " + rs[0]["reason"])[:300] if rs else "no candidate found"
    else:
        rec["rewrite"] = "rewritten"
        rec["layers"] = len(rep["layers"])
        rec["layer_families"] = sorted({l["family"] for l in rep["layers"]})
        # each layer's router: "fused: <attributes>" or "left: <why>" (None: fusion did not run)
        rec["routers"] = [None if not l.get("router") else ("fused: " if l["router"]["fused"] else "left: ") + l["router"]["detail"] for l in rep["layers"]]
        m = onnx.load(out, load_external_data=False)
        rec["scattermoe_nodes"] = sum(1 for n in m.graph.node if n.op_type == "ScatterMoE")
        rec["rewritten_ort"] = run_ort(out, arrays, a.plugin)
        rec["rewritten_ok"] = ok(rec["rewritten_ort"], tol) and rec["scattermoe_nodes"] == 1
    return rec


def verdict(rec):
    """(short cell text, category) of one case."""
    st = rec.get("status")
    if st != "exported":
        return (f"{st}: {rec.get('reason', '')}", "export failed" if st == "export failed" else st)
    tol = TOL[rec["dtype"]]
    o = rec["ort"]
    traced_ok = ok(o, tol, (TRACED,))
    if not traced_ok:
        v = o.get(str(TRACED), o.get("session"))
        why = v if isinstance(v, str) else f"error {v:.1e}"
        cat = "ORT fails as exported"
        base = f"ORT fails as exported ({why})"
    else:
        cat = None
        base = "ORT ok at " + "/".join(str(S) for S in LENGTHS if ok(o, tol, (S,)))
    rw = rec.get("rewrite")
    if rw == "rewritten":
        if rec.get("rewritten_ok"):
            return (f"**rewritten**, matches at 1/7/{TRACED}; {base}", cat or "rewritten")
        bad = {k: v for k, v in rec["rewritten_ort"].items() if not (isinstance(v, float) and v <= tol)}
        return (f"rewritten but WRONG ({rec['scattermoe_nodes']} nodes, {bad}); {base}", cat or "rewritten wrong")
    return (f"{rw} ({rec.get('rewrite_reason', '')}); {base}", cat or rw)


def cmd_check(a):
    # the families enumerated at export time, and each one's cases (one part file per family, so
    # that exports made in several runs or on several machines merge)
    info = json.load(open(os.path.join(a.dir, "families.json")))
    info["cases"] = []
    for f in info["families"]:
        part = os.path.join(a.dir, "part." + f[2] + ".json")
        if os.path.exists(part):
            info["cases"].extend(json.load(open(part)))
        else:
            info["cases"].append(dict(case=f"{f[2]}.*", family=f[2], model_type=f[0], status="not exported", reason="no export run"))
    os.makedirs(a.work, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    if a.md_only:
        recs = json.load(open(os.path.join(a.work, "results.json")))["cases"]
        write_md(info, recs, a)
        return
    with ThreadPoolExecutor(a.jobs) as ex:
        recs = list(ex.map(lambda r: check_case(dict(r), a), info["cases"]))
    with open(os.path.join(a.work, "results.json"), "w") as fh:
        json.dump(dict(info, cases=recs), fh, indent=1)
    write_md(info, recs, a)


def router_lines(done):
    """The routers of the rewritten cases (router fusion, docs/rewriter.md): how many were fused into
    TopKRouter, and why the others stay ONNX ops, one line per reason."""
    from collections import Counter

    outcomes = Counter(x or "not tried" for r in done for x in (r.get("routers") or []))
    if not outcomes:
        return []
    fused = sum(v for k, v in outcomes.items() if k.startswith("fused"))
    lines = ["## Routers", "", f"Of the {sum(outcomes.values())} rewritten layers' routers, {fused} became one TopKRouter node "
             "(the rewrite's default; each proven on its own); the others stay ONNX ops:", "",
             "| router | layers |", "|---|---|"]
    for k, v in sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {k.replace('|', '/')} | {v} |")
    return lines + [""]


def write_md(info, recs, a):
    from collections import Counter

    cats = Counter()
    for r in recs:
        cats[verdict(r)[1]] += 1
    base = Counter()
    if a.baseline:  # another rewriter's results.json over the same exports (e.g. before a change)
        for r in json.load(open(a.baseline))["cases"]:
            base[verdict(r)[1]] += 1
    lines = [
        "# The rewriter over transformers' MoE blocks",
        "",
        f"Every MoE block class in transformers {info['transformers']} (torch {info['torch']}), enumerated by",
        "`models/matrix.py` (a class whose `__init__` builds an experts module), with a tiny config (d=32,",
        "E=4, k=2), seeded weights, " + ("each experts implementation (`config._experts_implementation`), each"
                                          if int(info["transformers"].split(".")[0]) >= 5 else
                                          "its one forward (before transformers 5 a block has no experts implementations), each"),
        "exporter (TorchScript opset 17 and 18, dynamo at opset 18) and dtype; the export is run in ONNX",
        f"Runtime (CPU) at 1, 7 and {TRACED} (traced) tokens against torch, then rewritten by",
        "`scattermoe rewrite` and the rewritten model run with the plugin at the same lengths (tolerance",
        "f32 1e-4, f16 1e-2; a rewrite counts only with one ScatterMoE node). Models whose experts sit",
        "only in the decoder layer (Gemma 4, DiffusionGemma) have no block class to enumerate: they are",
        "covered by whole-model fixtures instead (docs/rewriter.md, \"Fixtures\").",
        "",
        "Regenerate (export needs torch + transformers; check needs the built CLI and plugin):",
        "",
        "```sh",
        ("python models/matrix.py export --dir /tmp/matrix --jobs 8" if int(info["transformers"].split(".")[0]) >= 5 else
         f"pip install --target /tmp/tf-{info['transformers']} transformers=={info['transformers']}   # beside torch {info['torch'].split('+')[0]}\n"
         f"PYTHONPATH=/tmp/tf-{info['transformers']} python models/matrix.py export --dir /tmp/matrix --jobs 8"),
        "python models/matrix.py check --dir /tmp/matrix --cli target/release/scattermoe \\",
        f"    --plugin target/release/libscattermoe_ort.so --md {os.path.relpath(a.md) if not os.path.isabs(a.md) else a.md} \\",
        "    [--baseline OTHER/results.json --baseline-name NAME]   # a second count column",
        "```",
        "",
    ] + ([a.note, ""] if a.note else []) + [
        "## Counts",
        "",
        "| outcome | cases |" + (f" {a.baseline_name} |" if a.baseline else ""),
        "|---|---|" + ("---|" if a.baseline else ""),
    ]
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v} |" + (f" {base.get(k, 0)} |" if a.baseline else ""))
    for k, v in base.items():
        if a.baseline and k not in cats:
            lines.append(f"| {k} | 0 | {v} |")
    runs = [r for r in recs if r.get("status") == "exported" and ok(r["ort"], TOL[r["dtype"]], (TRACED,))]
    done = [r for r in runs if r.get("rewritten_ok")]
    lines += ["", f"Exports that ONNX Runtime runs correctly at the traced length: {len(runs)}; rewritten and "
              f"matching torch at 1, 7 and {TRACED} with one ScatterMoE node: {len(done)}.", "",
              "## Wrong rewrites", ""] + [f"- {r['case']}: {verdict(r)[0]}" for r in recs if verdict(r)[1] == "rewritten wrong"] + [
              ""] + router_lines(done) + [
              "## Families", "", f"{len(info['families'])} block classes: " +
              ", ".join(f"`{f[2]}`" for f in info["families"]) + ".", "", "## Cases", "",
              "| family | implementation | exporter | dtype | outcome |", "|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (r["family"], r.get("impl", ""), r.get("exporter", ""), r.get("dtype", ""))):
        cell = verdict(r)[0]
        if r.get("rewritten_ok") and r.get("routers"):
            cell += "; router " + ", ".join(sorted({x or "not tried" for x in r["routers"]}))
        cell = cell.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['family']} | {r.get('impl', '*')} | {r.get('exporter', '*')} | {r.get('dtype', '*')} | {cell} |")
    with open(a.md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(ln for ln in lines if ln.startswith("| ") and "|---" not in ln and ln.count("|") <= 4))


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="cmd", required=True)
    sp.add_parser("list")
    e = sp.add_parser("export")
    e.add_argument("--dir", required=True)
    e.add_argument("--jobs", type=int, default=2)
    e.add_argument("--only", default="")
    e.add_argument("--family", default="")
    e.add_argument("--part", default="")
    e.add_argument("--resume", action="store_true")
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--timeout", type=int, default=900)
    e.add_argument("--tiny", default="", help="KEY=VALUE,... overriding the tiny config (set where the family's config has the key)")
    c = sp.add_parser("check")
    c.add_argument("--dir", required=True)
    c.add_argument("--work", default="")
    c.add_argument("--cli", default="target/release/scattermoe")
    c.add_argument("--plugin", default="target/release/libscattermoe_ort.so")
    c.add_argument("--md", default="docs/rewriter-matrix.md")
    c.add_argument("--jobs", type=int, default=2)
    c.add_argument("--baseline", default="", help="results.json of another rewriter over the same exports")
    c.add_argument("--baseline-name", default="baseline")
    c.add_argument("--note", default="", help="a paragraph under the commands: what made this table (revision, ONNX Runtime, machine)")
    c.add_argument("--md-only", action="store_true", help="rewrite the table from --work's results.json")
    a = ap.parse_args()
    if a.cmd == "list":
        fams = enumerate_blocks()
        for f in fams:
            print(f"{f[0]:28s} {f[2]}")
        print(f"{len(fams)} MoE block classes")
    elif a.cmd == "export":
        cmd_export(a)
    else:
        a.work = a.work or os.path.join(a.dir, "check")
        cmd_check(a)


if __name__ == "__main__":
    main()
