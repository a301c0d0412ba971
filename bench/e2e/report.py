"""OUT/e2e.md (tables), e2e.json (every result) and e2e.png (chart) from DIR/results/*.json."""

import glob
import json
import math
import os

LABEL = {"export": "export as written (ORT)", "rewritten": "export + scattermoe rewrite (ORT + op library)",
         "builder": "onnxruntime-genai builder (ORT, com.microsoft.MoE)", "builder_rw": "builder + scattermoe rewrite (ORT + op library)",
         "torch": "transformers in torch"}
ORDER = ("export", "rewritten", "builder", "builder_rw", "torch")


def phases(res):
    ph = res["phases"]
    out = [("prefill", f"prefill 1x{ph['prefill']}")]
    out += [(f"decode_b{b}", f"decode b{b}") for b in ph["batches"]]
    out += [(f"decode_b{b}_graph", f"decode b{b}, CUDA graph") for b in ph["batches"]]
    return out


def _ms(rec, key):
    v = rec.get(key) if rec else None
    return v["ms"] if isinstance(v, dict) and isinstance(v.get("ms"), (int, float)) else None


def _base(res, key):
    """The export as written's time for a phase (its plain decode for a CUDA-graph row: it has none)."""
    ex = res["columns"].get("export")
    return _ms(ex, key) or _ms(ex, key.replace("_graph", ""))


def tokens_per_s(res, key, ms):
    ph = res["phases"]
    if key == "prefill":
        return ph["prefill"] * 1e3 / ms
    b = int(key.split("_b")[1].split("_")[0])
    return b * 1e3 / ms


def model_tables(res):
    cols = [c for c in ORDER if c in res["columns"]]
    ph = phases(res)
    ph = [(k, t) for k, t in ph if any(_ms(res["columns"][c], k) for c in cols)]
    head = "| column | " + " | ".join(t for _, t in ph) + " |"
    sep = "|---|" + "---:|" * len(ph)
    title = f"## {res['model']} ({res['layers']} of {res['full_depth']} layers), {res['dtype']}, {res['device']}"
    lines = [title, "", f"ONNX Runtime {res['onnxruntime']}, torch {res['torch']}. Time (ms per prefill, ms per decode step; "
             "in brackets the export as written's time over this one: above 1 is faster; for a CUDA-graph row, over the "
             "export's plain decode, which has no graph row).", "", head, sep]
    for c in cols:
        r = res["columns"][c]
        if "error" in r or "not_runnable" in r:
            lines.append(f"| {LABEL[c]} | " + " | ".join("failed" if "error" in r else "not runnable" for _ in ph) + " |")
            continue
        cells = []
        for k, _ in ph:
            ms, base = _ms(r, k), _base(res, k)
            cells.append("-" if ms is None else (f"{ms:.3f} ({base / ms:.2f}x)" if base else f"{ms:.3f}"))
        lines.append(f"| {LABEL[c]} | " + " | ".join(cells) + " |")
    lines += ["", "Tokens per second:", "", head, sep]
    for c in cols:
        r = res["columns"][c]
        cells = [("-" if _ms(r, k) is None else f"{tokens_per_s(res, k, _ms(r, k)):.1f}") for k, _ in ph]
        lines.append(f"| {LABEL[c]} | " + " | ".join(cells) + " |")
    dec = [(k, t) for k, t in ph if k != "prefill"]
    lines += ["", "MoE share of the decode step (1 - time without the MoE blocks / time with them):", "",
              "| column | " + " | ".join(t for _, t in dec) + " |", "|---|" + "---:|" * len(dec)]
    for c in cols:
        sh = res["columns"][c].get("moe_share", {})
        lines.append(f"| {LABEL[c]} | " + " | ".join(f"{100 * sh[k]:.0f}%" if k in sh else "-" for k, _ in dec) + " |")
    if any(res["columns"][c].get("mem_gib", {}).get("prefill") is not None for c in cols):
        mk = [k for k, _ in ph if not k.endswith("_graph")]
        lines += ["", "Device memory after each phase, GiB (ORT: in use by the process above the level before the session "
                  "opened, the arena keeping its high-water mark, so each is the peak so far; phases run decode b1, "
                  "decode at the larger batch, prefill; torch: max_memory_allocated):", "",
                  "| column | " + " | ".join(t for k, t in ph if k in mk) + " |", "|---|" + "---:|" * len(mk)]
        for c in cols:
            m = res["columns"][c].get("mem_gib", {})
            lines.append(f"| {LABEL[c]} | " + " | ".join(f"{m[k]:.2f}" if m.get(k) is not None else "-" for k in mk) + " |")
    pairs = [("rewritten", "export"), ("builder_rw", "builder")]
    rows = []
    for got, ref in pairs:
        if got in res["columns"] and ref in res["columns"]:
            cells = []
            for k, _ in ph:
                a, b = _ms(res["columns"][ref], k), _ms(res["columns"][got], k)
                cells.append(f"{a / b:.2f}x" if a and b else "-")
            rows.append(f"| {got} over {ref} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "Speed-up of each rewritten model over its own original (same phase, same graph mode):", "", head, sep] + rows
    lines += ["", "Checks (check.py): every column is fed the first column's greedy tokens (teacher forcing) for "
              f"{res['phases'].get('greedy', 32)} steps after a {res['phases'].get('check_prompt', 32)}-token prompt. At each row "
              "(the prompt's last position, then each step) the logits must agree within the tolerance (of the reference's "
              "largest logit) and the greedy picks must be the same, except at a tie (the reference's margin between the two "
              "picks below the tolerance of its largest logit); per MoE layer, at every position, the block's output must agree "
              "within the tolerance and the router must choose the same experts, except at a routing tie (the reference's k-th "
              "and (k+1)-th scores closer than the tolerance of its largest score), which sets that position apart in later "
              "layers and its row. The rewritten models are gated; each original against torch shows the export's (or the "
              "builder's) fidelity, not gated:", "",
              "| pair | verdict | greedy picks | max relative logit error | per MoE layer: max relative output error (routing ties) | tolerance |",
              "|---|---|---|---:|---|---:|"]
    for k, c in res["checks"].items():
        if c.get("not_checked"):
            lines.append(f"| {k} | not checked | | | | {c['tol']:g} |")
            lines.append(f"|  | {c['why']} | | | | |")
            continue
        verdict = ("ok" if c["ok"] else "FAILED") if c.get("gate") else ("same" if c["ok"] else "differs (not gated)")
        ties, bad, rties = c.get("ties") or [], c.get("mismatches") or [], c.get("routing_tie_steps") or []
        if c.get("tokens_equal"):
            tok = f"identical at all {c['steps']} rows"
        else:
            tok = f"{len(bad)} different, {len(ties)} at ties, of {c['steps']} rows"
        if rties:
            tok += f"; {len(rties)} row(s) at a routing tie"
        if c.get("note"):
            tok += f" ({c['note']})"
        lay = "; ".join(f"L{x['layer']} {x['max_rel_err']:.2g}" + (f" ({x['routing_ties']})" if x["routing_ties"] else "")
                        for x in c.get("layers") or []) or "not read"
        lines.append(f"| {k} | {verdict} | {tok} | {_g(c['max_rel_err'])} | {lay} | {c['tol']:g} |")
        if c.get("why"):
            lines.append(f"|  | {c['why']} | | | | |")
        if c.get("why_original"):
            lines.append(f"|  | against its original: {c['why_original']} | | | | |")
    notes = []
    for c in cols:
        r = res["columns"][c]
        if "error" in r:
            notes.append(f"{c}: failed: {r['error']}")
        if r.get("not_runnable"):
            notes.append(f"{c}: {r['not_runnable']}")
        if r.get("checking_copy_logits_diff"):
            notes.append(f"{c}: its checking copy's logits differ from the timed session's by {r['checking_copy_logits_diff']:.2g} "
                         "of the largest (the same graph with extra outputs)")
        if r.get("prefill_chunk"):
            notes.append(f"{c}: prompts run {r['prefill_chunk']} positions per run at batch 1 (the batched_mm export gathers every "
                         "assignment's expert weights; columns.batched_mm_token_limit)")
        if r.get("graph_note"):
            notes.append(f"{c}: CUDA graph: {r['graph_note']}")
        for k in sorted(x for x in r if x.endswith("_graph") and isinstance(r[x], dict) and "same_picks" in r[x]):
            same, total = r[k]["same_picks"]
            verdict = "the same" if same == total else "DIFFERENT: this row's time is not of the same computation"
            notes.append(f"{c}: {k}: greedy picks {verdict} as without the graph ({same} of {total})")
        if r.get("experts_implementation"):
            notes.append(f"{c}: experts implementation {r['experts_implementation']}")
    for k, v in res.get("notes", {}).items():
        notes.append(f"{k}: {v}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return lines


def chart(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, res in zip(axes[0], results):
        cols = [c for c in ORDER if c in res["columns"] and "error" not in res["columns"][c] and "not_runnable" not in res["columns"][c]]
        ph = [(k, t) for k, t in phases(res) if any(_ms(res["columns"][c], k) for c in cols)]
        w = 0.8 / max(1, len(cols))
        for i, c in enumerate(cols):
            xs, ys = [], []
            for j, (k, _) in enumerate(ph):
                ms, base = _ms(res["columns"][c], k), _base(res, k)
                if ms and base:
                    xs.append(j + (i - (len(cols) - 1) / 2) * w)
                    ys.append(base / ms)
            ax.bar(xs, ys, width=w, label=c)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(ph)))
        ax.set_xticklabels([t.replace(", ", "\n") for _, t in ph], fontsize=8)
        ax.set_ylabel("speed-up over the export as written")
        ax.set_title(f"{res['model']} ({res['layers']} layers) {res['dtype']}\n{res['device']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(work, out, log=print):
    files = sorted(glob.glob(os.path.join(work, "results", "*.json")))
    results = [json.load(open(f)) for f in files]
    if not results:
        log("report: no results")
        return None
    os.makedirs(out, exist_ok=True)
    lines = ["# End-to-end: whole MoE language models", "",
             "Made by `bench/e2e/e2e.py` (device calls: `bench/e2e/run.sh`). Random seeded weights at the dimensions named, "
             "few layers: per-layer costs (attention, MoE) scale with depth, the embedding and LM head do not, so at "
             "full depth each column's step approaches its per-layer time times the depth ratio and the ratios between "
             "columns move toward the ratio of their per-layer parts. Prefill: one prompt; decode: greedy steps from a "
             "prompt, IO binding, the next token chosen on the device.", ""]
    for res in results:
        lines += model_tables(res) + [""]
    with open(os.path.join(out, "e2e.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "e2e.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=_num)
    try:
        chart(os.path.join(out, "e2e.png"), results)
    except ImportError as e:
        log(f"report: no chart ({e})")
    log(f"report: {os.path.join(out, 'e2e.md')} ({len(results)} model(s))")
    return results


def _g(x):
    return "-" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.3g}"


def _num(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x
