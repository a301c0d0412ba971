"""The table, JSON and chart of one run (numpy + matplotlib only; torch-free).

The main table ends with three derived columns: our op through ORT and our kernels in a CUDA graph as
multiples of the floor ("ours/ORT / floor", "kernels (graph) / floor"), and the kernels' device time by
part ("routing/G1/G2/comb us", breakdown.py). Close rows (close_pairs) are re-timed by --repeat-close;
repeats_table shows both passes.
"""
import json
import math

from . import breakdown

# key, table header, how it is timed ("host" / "graph" / None for the floor)
COLUMNS = [
    ("floor", "floor", None),
    ("ours/ORT", "ours/ORT", "host"),
    ("ours/ORT+router", "ours/ORT +router", "host"),
    ("exported/ORT", "exported/ORT", "host"),
    ("ORT MoE", "ORT MoE", "host"),
    ("grouped_mm", "grouped_mm", "host"),
    ("Triton", "Triton", "host"),
    ("vLLM", "vLLM fused_moe", "host"),
    ("kernels", "kernels", "host"),
    ("kernels/graph", "kernels (graph)", "graph"),
    ("grouped_mm/graph", "grouped_mm (graph)", "graph"),
    ("Triton/graph", "Triton (graph)", "graph"),
    ("vLLM/graph", "vLLM fused_moe (graph)", "graph"),
]
ERROR_COLUMNS = ["ours/ORT", "ours/ORT+router", "exported/ORT", "ORT MoE", "grouped_mm", "Triton", "vLLM", "kernels"]
# the quantized columns (bench/peers/quant_bench.py), with bf16 ours beside them
QUANT_COLUMNS = [
    ("floor fp8", "floor fp8", None),
    ("floor int4", "floor int4", None),
    ("ours/ORT", "ours bf16/ORT", "host"),
    ("ours fp8/ORT", "ours fp8/ORT", "host"),
    ("ours int4/ORT", "ours int4/ORT", "host"),
    ("ours int8/ORT", "ours int8/ORT", "host"),
    ("QMoE int4", "QMoE int4", "host"),
    ("QMoE int8", "QMoE int8", "host"),
    ("kernels fp8", "kernels fp8", "host"),
    ("kernels int4", "kernels int4", "host"),
    ("kernels/graph", "kernels bf16 (graph)", "graph"),
    ("kernels fp8/graph", "kernels fp8 (graph)", "graph"),
    ("kernels int4/graph", "kernels int4 (graph)", "graph"),
]
QUANT_ERROR_COLUMNS = ["ours fp8/ORT", "ours int4/ORT", "ours int8/ORT", "QMoE int4", "QMoE int8", "kernels fp8", "kernels int4"]


def fastest(row, how, columns=None):
    cands = [(row[k], k) for k, _, h in (columns or COLUMNS) if h == how and isinstance(row.get(k), (int, float))]
    return min(cands)[1].replace("/graph", "") if cands else "-"


def _cell(v, fmt):
    return fmt.format(v) if isinstance(v, (int, float)) and not math.isnan(v) else "-"


# (key, header) of the ratios to the floor in the main table
FLOOR_RATIOS = [("ours/ORT", "ours/ORT / floor"), ("kernels/graph", "kernels (graph) / floor")]
PARTS_HEADER = "routing/G1/G2/comb us"
# the GEMM kernels our op chose for the row (the library's choice, as the Python host mirrors it)
CFGS_HEADER = "G1/G2 kernel"


def floor_ratio(row, key):
    v, fl = row.get(key), row.get("floor")
    ok = isinstance(v, (int, float)) and isinstance(fl, (int, float)) and fl > 0
    return f"{v / fl:.2f}x" if ok else "-"


def table(rows, columns=None):
    main = columns is None
    columns = columns or COLUMNS
    head = ["shape", "tokens"] + [h for _, h, _ in columns] + ["fastest (host)", "fastest (graph)"]
    if main:
        head += [h for _, h in FLOOR_RATIOS] + [PARTS_HEADER, CFGS_HEADER]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(columns) + 1) + "---|---|" + "---:|" * (len(head) - len(columns) - 4)]
    for r in rows:
        cells = [r["shape"], str(r["tokens"])] + [_cell(r.get(k), "{:.3f}") for k, _, _ in columns]
        cells += [fastest(r, "host", columns), fastest(r, "graph", columns)]
        if main:
            cells += [floor_ratio(r, k) for k, _ in FLOOR_RATIOS] + [breakdown.cell(r.get("kernels_parts")), r.get("kernels_cfgs") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ours: the column each timing kind compares; the columns that are ours too (not peers of it)
OURS = {"host": "ours/ORT", "graph": "kernels/graph"}
OURS_TOO = {"ours/ORT", "ours/ORT+router", "kernels", "kernels/graph"}


def close_pairs(row, tol=0.05):
    """[(ours key, peer key, ratio ours / peer)] for each timing kind where the fastest peer column is within
    tol of ours (either side): the rows whose winner a second timing could change."""
    out = []
    for how, ours in OURS.items():
        mine = row.get(ours)
        peers = [(row[k], k) for k, _, h in COLUMNS if h == how and k not in OURS_TOO and isinstance(row.get(k), (int, float))]
        if not isinstance(mine, (int, float)) or not peers:
            continue
        best, key = min(peers)
        if abs(mine / best - 1) <= tol:
            out.append((ours, key, mine / best))
    return out


def repeats_table(rows):
    """The close rows and their second pass (row["repeat"]: {key: ms}), ours / peer and the ratio."""
    lines = ["| shape | tokens | ours / peer | pass 1 (ms) | ratio | pass 2 (ms) | ratio |", "|---|---:|---|---:|---:|---:|---:|"]
    n = 0
    for r in rows:
        rep = r.get("repeat") or {}
        for ours, peer, ratio in r.get("close", []):
            a, b = rep.get(ours), rep.get(peer)
            second = (f"{a:.3f} / {b:.3f}", f"{a / b:.3f}") if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ("-", "-")
            lines.append(f"| {r['shape']} | {r['tokens']} | {ours} / {peer} | {r[ours]:.3f} / {r[peer]:.3f} | {ratio:.3f} | "
                         f"{second[0]} | {second[1]} |")
            n += 1
    return "\n".join(lines) if n else ""


def error_table(rows, columns=None):
    columns = columns or ERROR_COLUMNS
    head = ["shape", "tokens", "experts hit"] + columns
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["shape"], str(r["tokens"]), str(r.get("experts_hit", "-"))]
        cells += [_cell(r.get(k + "_err"), "{:.1e}") for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows):
    """Why a cell is '-': one line per (shape, column, reason)."""
    seen, out = set(), []
    for r in rows:
        for k, why in sorted(r.get("notes", {}).items()):
            key = (r["shape"], k, why)
            if key not in seen:
                seen.add(key)
                out.append(f"- {r['shape']} {k} (from {r['tokens']} tokens): {why}")
    return "\n".join(out)


def vllm_configs(rows):
    """The tile configuration vLLM's fused_moe ran each row with (its tuned file for the shape and GPU, or
    its default heuristic), one line per run of equal rows."""
    out, last = [], None
    for r in rows:
        c = r.get("vllm_config")
        if c and (r["shape"], c) != last:
            out.append(f"- {r['shape']} from {r['tokens']} tokens: {c}")
        last = (r["shape"], c) if c else None
    return "\n".join(out)


def write_json(path, meta, rows):
    with open(path, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def chart(path, rows, shapes, title_of):
    """One log-log panel per shape: ms vs tokens; solid host-timed, dashed graph-timed, dotted floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(shapes))
    nrows = -(-len(shapes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 5.2 * nrows), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    colors = {}
    for ax, shape in zip(axes.flat, shapes):
        rs = [r for r in rows if r["shape"] == shape]
        drawn = set()
        for key, label, how in COLUMNS + QUANT_COLUMNS:
            if key in drawn:
                continue
            drawn.add(key)
            pts = [(r["tokens"], r[key]) for r in rs if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            base = key.split("/graph")[0]
            color = colors.setdefault(base, f"C{len(colors) % 10}") if how else {"floor fp8": "dimgray", "floor int4": "silver"}.get(key, "black")
            style = {"host": "-", "graph": "--", None: ":"}[how]
            ax.plot(*zip(*pts), style, marker="o" if how else None, ms=3.5, color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms per layer forward (median)")
        ax.set_title(title_of(shape), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
