"""Every column of one prepared model: the check's trace, then decode at each batch, then prefill; the
CUDA-graph decode rows; the check's per-layer trace (a checking copy); the MoE share. Writes
DIR/results/<model>-<dtype>.json (and a copy in OUT).

The check's tokens: the first column that runs (the export as written, else the builder's model, else
torch) decodes greedily; every column, that one's checking copy included, is fed its tokens (teacher
forcing), so that every row of every column follows the same history (check.py).
"""

import json
import os
import shutil
import time
import traceback

import check
import columns as C
import configs
import export
import measure
import ortrun
import probe

# pairs checked: (reference, other, gated, label). The gated pairs are what a rewrite must preserve; the
# others show each original's fidelity to transformers in torch (other arithmetic: not gated)
PAIRS = (("torch", "export", False, "export vs torch"), ("export", "rewritten", True, "rewritten vs export"),
         ("builder", "builder_rw", True, "builder_rw vs builder"), ("torch", "builder", False, "builder vs torch"))
# A gated pair whose reference itself differs from transformers in torch (its fidelity pair failed) is
# also checked against torch: where ONNX Runtime's run of the original deviates from the model it was
# exported from, the rewritten model matching that model in full (logits, picks, every MoE layer) is
# correct, and the pair passes saying so (H100, Mixtral float16: the export as written differed from
# torch by 0.87 at one prompt position of MoE layer 0 with the same experts chosen, and the rewritten
# model by exactly the same amount from the export). (gated pair, its reference's fidelity pair, label)
SOURCE_FALLBACK = (("rewritten vs export", "export vs torch", "rewritten vs torch"),
                   ("builder_rw vs builder", "builder vs torch", "builder_rw vs torch"))
# the rewrite report of each original/rewritten pair (per-layer readings: probe.layer_map)
REPORTS = (("export", "rewritten", "rewrite.json"), ("builder", "builder_rw", "rewrite_builder.json"))


def _short(e):
    return " ".join(f"{type(e).__name__}: {e}".split())[:600]


def prompts(cfg, ph, seed, device):
    """Token ids, the same for every column: the check's prompt [1, check], each decode batch's prompt
    [B, prompt], the prefill prompt [1, prefill]."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)

    def ids(b, s):
        return torch.tensor(rng.integers(0, cfg.vocab_size - 4, (b, s)), dtype=torch.int64, device=device)

    return dict(check=ids(1, ph["check_prompt"]), decode={b: ids(b, ph["prompt"]) for b in ph["batches"]},
                prefill=ids(1, ph["prefill"]))


def _mem(dev, base, col):
    if dev.kind != "cuda":
        return None
    if isinstance(col, C.TorchColumn):
        return round(dev.torch.cuda.max_memory_allocated() / 2**30, 3)
    return round((dev.used() - base) / 2**30, 3)


def decode_rows(dev, col, pr, ph, suffix="", tokens=None):
    """{decode_b<B><suffix>: timing} for each batch, each from its prompt's prefill (untimed). `tokens`:
    a dict that takes each batch's greedy picks [B, steps] of one more pass after the timing (none
    when None): what the CUDA-graph rows are checked against."""
    out = {}
    for b in ph["batches"]:
        with dev.ctx():  # the first token read on the stream that computed the prompt's logits
            logits, state = col.prefill(pr["decode"][b])
            first = logits.argmax(-1, keepdim=True)
        dev.sync()  # torch's decode steps run on its default stream
        dec = col.decoder(state, first, ph["prompt"] + ph["steps"] + 1)
        out[f"decode_b{b}{suffix}"] = measure.time_decode(dev, dec, ph["steps"], ph["repeats"], ph["warmup"])
        if tokens is not None:
            tokens[b] = measure.greedy_picks(dev, dec, ph["steps"])
        del dec, state, logits
    return out


def graph_check(rows, plain, graph):
    """Each CUDA-graph decode row gets `same_picks`: how many of its greedy picks (per sequence and step)
    equal those of the same session kind without the graph, from the same prompt."""
    for b, g in graph.items():
        p = plain.get(b)
        key = f"decode_b{b}_graph"
        if p is not None and key in rows:
            rows[key]["same_picks"] = [int((g == p).sum()), int(g.size)]


def open_column(a, ort, dev, name, p, cfg, graph=False, path_key=None, path=None, extras=()):
    if name == "torch":
        import torchrun

        return C.TorchColumn(a.model, a.tiny, a.dtype, a.seed, dev, torchrun.fastest_impl())
    lib = a.lib if (name in C.USES_LIB) else None
    limit = 0
    if name == "export":
        import torch

        limit = C.batched_mm_token_limit(cfg, torch.tensor([], dtype=getattr(torch, a.dtype)).element_size(), a.gather_budget_gib * 2**30)
    kind = C.KIND.get(name) or ("genai" if "builder" in name else "hf")
    return C.OrtColumn(ort, dev, path or p[path_key or name], kind, lib, a.threads, graph=graph, token_limit=limit,
                       head_dim=configs.past_shape(cfg, 1, 0)[3], extras=extras)


def measure_column(a, ort, dev, name, p, cfg, ph, pr, traces, log, checking=None):
    rec = dict(column=name)
    dev.settle()
    base = dev.used()
    t0 = time.time()
    col = open_column(a, ort, dev, name, p, cfg)
    rec["open_s"] = round(time.time() - t0, 2)
    if dev.kind == "cuda":  # torch's peak from here: the model as it runs, not its float32 construction
        dev.settle()
        dev.torch.cuda.reset_peak_memory_stats()
    if isinstance(col, C.OrtColumn) and col.token_limit and col.chunk(1) < ph["prefill"]:
        rec["prefill_chunk"] = col.chunk(1)
    if name == "torch":
        rec["experts_implementation"] = col.impl
    force = traces["lead"]["fed"] if "lead" in traces else None  # the lead column's tokens (teacher forcing)
    if name == "torch" and not a.no_layers:
        col.tap_on()
    traces[name] = measure.greedy_trace(col, dev, pr["check"], ph["greedy"], force=force)
    if name == "torch":
        col.tap_off()
    traces.setdefault("lead", traces[name])
    rec["mem_gib"] = {}
    tried = dev.kind == "cuda" and not a.no_graph and name != "torch"  # CUDA-graph rows are tried
    graph_why = ortrun.cuda_graph_reason(C.KIND[name]) if tried else None  # why this column has none
    graph_rows = tried and not graph_why
    plain_picks = {} if graph_rows else None  # what the graph rows are checked against
    for k, v in decode_rows(dev, col, pr, ph, tokens=plain_picks).items():
        rec[k] = v
        rec["mem_gib"][k] = _mem(dev, base, col)
    rec["prefill"] = measure.time_prefill(dev, lambda: col.prefill(pr["prefill"]), ph["repeats"])
    rec["mem_gib"]["prefill"] = _mem(dev, base, col)
    if name == "torch":  # the MoE share: the same model with its MoE blocks swapped for an identity
        col.cut()
        rec["nomoe"] = decode_rows(dev, col, pr, ph)
        col.uncut()
    col.close()
    del col
    log(f"  {name}: " + ", ".join(f"{k} {v['ms']:.3f} ms" for k, v in rec.items() if isinstance(v, dict) and "ms" in v))
    if checking:  # the same model with per-layer outputs, traced on the same tokens
        dev.settle()
        path, extras = checking
        chk = open_column(a, ort, dev, name, p, cfg, path=path, extras=extras)
        t = measure.greedy_trace(chk, dev, pr["check"], ph["greedy"], force=traces["lead"]["fed"])
        chk.close()
        del chk
        traces[name]["extras"] = t["extras"]
        la, lb = traces[name]["logits"], t["logits"]
        rec["checking_copy_logits_diff"] = float(abs(la - lb).max() / max(abs(la).max(), 1e-30))
    if graph_why:
        rec["graph_note"] = graph_why
    elif graph_rows:
        try:
            dev.settle()
            g = open_column(a, ort, dev, name, p, cfg, graph=True)
            graph_picks = {}
            rows = decode_rows(dev, g, pr, ph, suffix="_graph", tokens=graph_picks)
            graph_check(rows, plain_picks, graph_picks)
            rec.update(rows)
            g.close()
            del g
        except Exception as e:  # noqa: BLE001 - a graph that does not capture is a result
            rec["graph_note"] = f"capture failed: {_short(e)}"
            traceback.print_exc()
    return rec


def nomoe_rows(a, ort, dev, p, cfg, ph, pr, key, graph, cache):
    """Decode timings of the model without MoE blocks (cached per file and graph mode)."""
    ck = (key, graph)
    if ck not in cache:
        dev.settle()
        col = open_column(a, ort, dev, key, p, cfg, graph=graph, path_key=key)
        cache[ck] = decode_rows(dev, col, pr, ph, suffix="_graph" if graph else "")
        col.close()
    return cache[ck]


def moe_share(rec, nomoe):
    out = {}
    for k, v in nomoe.items():
        if isinstance(rec.get(k), dict) and rec[k].get("ms"):
            out[k] = round(1.0 - v["ms"] / rec[k]["ms"], 4)
    return out


def run(a, name, dtype, ph, tol, log):
    import torch

    ort = ortrun.load_ort()
    a.model = name
    p = export.paths(a.work, name, dtype)
    prep = json.load(open(p["prepared"]))
    cfg = configs.hf_config(name, a.tiny, "batched_mm")
    dev = measure.Device(a.device)
    pr = prompts(cfg, ph, a.seed, a.device)
    res = dict(model=name, dtype=dtype, tiny=a.tiny, device=_device_name(dev), onnxruntime=ort.__version__, torch=torch.__version__,
               phases={k: list(v) if isinstance(v, tuple) else v for k, v in ph.items()}, layers=cfg.num_hidden_layers,
               full_depth=configs.MODELS[name]["full_depth"], columns={}, notes=dict(prep.get("notes", {})), checks={},
               prepared={k: v for k, v in prep.items() if k != "notes"})
    traces, cache = {}, {}
    wanted = [c for c in a.columns.split(",") if c]
    checking = {} if a.no_layers else checking_copies(p, res["notes"], log)
    log(f"{name} {dtype} on {res['device']}: columns {', '.join(wanted)}")
    for col in wanted:
        if col.startswith("builder") and ("builder" in res["notes"] or not os.path.exists(p[col])):
            res["notes"].setdefault(col, res["notes"].get("builder") or "not run: no builder model (GPT-OSS dimensions only)")
            continue
        try:
            rec = measure_column(a, ort, dev, col, p, cfg, ph, pr, traces, log, checking.get(col))
            if col != "torch":
                key = C.NOMOE[col]
                rec["nomoe"] = nomoe_rows(a, ort, dev, p, cfg, ph, pr, key, False, cache)
                if any(k.endswith("_graph") for k in rec):
                    rec["nomoe"].update(nomoe_rows(a, ort, dev, p, cfg, ph, pr, key, True, cache))
            rec["moe_share"] = moe_share(rec, rec.get("nomoe", {}))
            res["columns"][col] = rec
            _save(a, res)  # a call cut short by its time limit still returns the columns it measured
        except Exception as e:  # noqa: BLE001 - a column that fails is reported; the others go on
            why = ortrun.not_runnable(e, ort.__version__, dtype)
            if why:  # the graph does not load in this ONNX Runtime: said in one line, naming the node
                res["columns"][col] = dict(column=col, not_runnable=why)
                log(f"  {col}: {why}")
            else:
                traceback.print_exc()
                res["columns"][col] = dict(column=col, error=_short(e))
                log(f"  {col}: FAILED {_short(e)}")
    for col, t in traces.items():
        if t.get("extras") and "layers" not in t:
            try:
                t["layers"] = probe.stack(t["extras"], ph["check_prompt"])
            except (KeyError, ValueError) as e:  # the check runs end to end without this column's per-layer readings
                res["notes"][f"per-layer {col}"] = f"not read: {_short(e)}"
    res["checks"] = checks(traces, tol, res["columns"])
    gated = [c for c in res["checks"].values() if c.get("gate") and not c.get("not_checked")]
    res["checks_ok"] = bool(gated) and all(c["ok"] for c in gated)
    if not gated:
        res["notes"]["check"] = "no rewritten model was checked against its original: " + ("; ".join(
            f"{k}: {c['why']}" for k, c in res["checks"].items() if c.get("gate")) or "no pair ran")
        log(f"  check: {res['notes']['check']}")
    for k, c in res["checks"].items():
        if c.get("not_checked"):
            log(f"  check {k}: not checked: {c['why']}")
            continue
        lay = ", ".join(f"L{x['layer']} {x['max_rel_err']:.2g}" for x in c.get("layers") or [])
        log(f"  check {k}: {'ok' if c['ok'] else 'FAILED: ' + c['why']} (max rel err {c['max_rel_err']:.3g}, tol {c['tol']:g}; "
            f"ties {len(c['ties'])} token, {len(c['routing_tie_steps'])} routing; per layer {lay or 'not read'})")
    _save(a, res)
    if a.device == "cuda" and not a.keep:
        shutil.rmtree(p["root"], ignore_errors=True)  # the device's disk holds one model's files at a time
    return res


def _save(a, res):
    """DIR/results/<model>-<dtype>.json, and its copy OUT/e2e-<model>-<dtype>.json."""
    os.makedirs(os.path.join(a.work, "results"), exist_ok=True)
    path = os.path.join(a.work, "results", f"{res['model']}-{res['dtype']}.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    os.makedirs(a.out, exist_ok=True)
    shutil.copy(path, os.path.join(a.out, f"e2e-{res['model']}-{res['dtype']}.json"))


def checking_copies(p, notes, log):
    """{column: (checking copy path, its extra outputs)} for each original/rewritten pair prepared."""
    out = {}
    for orig, rw, rep in REPORTS:
        report = os.path.join(p["root"], rep)
        if not (os.path.exists(p[orig]) and os.path.exists(p[rw]) and os.path.exists(report)):
            continue
        try:
            layers = probe.layer_map(p[rw], p[orig], json.load(open(report)))
            for c in (orig, rw):
                out[c] = (probe.checking_copy(p[c], layers), probe.names(len(layers)))
        except Exception as e:  # noqa: BLE001 - the check runs end to end without per-layer readings
            notes[f"per-layer {orig}/{rw}"] = "not read: " + _short(e)
            log(f"  per-layer readings of {orig}/{rw} not available: {_short(e)}")
    return out


def checks(traces, tol, columns):
    """The PAIRS' records (check.compare). A gated pair of which a column did not load in this ONNX Runtime
    (columns[c]['not_runnable']) is not checked and says why; one of which a column failed otherwise fails."""
    out = {}
    for ref, got, gate, key in PAIRS:
        if ref in traces and got in traces:
            out[key] = dict(check.compare(traces[ref], traces[got], tol), gate=gate)
        elif gate and ref in columns and got in columns:
            lost = [c for c in (ref, got) if c not in traces]
            skip = all(columns[c].get("not_runnable") for c in lost) and ref in lost
            if skip:
                why = f"{' and '.join(lost)} not runnable by this ONNX Runtime (notes)"
            else:
                why = "; ".join(f"{c} {columns[c].get('not_runnable') or 'did not run: ' + columns[c].get('error', '')}" for c in lost)
            out[key] = dict(ok=skip, gate=True, not_checked=skip, why=why, max_rel_err=float("nan"), tol=tol, steps=0, tokens_equal=False,
                            ties=[], mismatches=[], routing_tie_steps=[], layers=None)
    for key, fidelity, label in SOURCE_FALLBACK:
        c, f = out.get(key), out.get(fidelity)
        if not c or c["ok"] or c.get("not_checked") or not f or f["ok"]:
            continue
        got = next(g for r, g, _, k in PAIRS if k == key)
        src = dict(check.compare(traces["torch"], traces[got], tol), gate=False)
        out[label] = src
        if src["ok"]:
            c["ok"] = True
            c["note"] = (f"differs from its original, which differs from transformers in torch ({fidelity}); "
                         f"matches torch in full ({label})")
            c["why_original"], c["why"] = c["why"], ""
    return out


def _device_name(dev):
    if dev.kind == "cuda":
        return dev.torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"
