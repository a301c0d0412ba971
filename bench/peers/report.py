"""The table, JSON and chart of one run (numpy + matplotlib only; torch-free)."""
import json
import math

# key, table header, how it is timed ("host" / "graph" / None for the floor)
COLUMNS = [
    ("floor", "floor", None),
    ("ours/ORT", "ours/ORT", "host"),
    ("ours/ORT+router", "ours/ORT +router", "host"),
    ("exported/ORT", "exported/ORT", "host"),
    ("ORT MoE", "ORT MoE", "host"),
    ("grouped_mm", "grouped_mm", "host"),
    ("Triton", "Triton", "host"),
    ("kernels", "kernels", "host"),
    ("kernels/graph", "kernels (graph)", "graph"),
    ("grouped_mm/graph", "grouped_mm (graph)", "graph"),
    ("Triton/graph", "Triton (graph)", "graph"),
]
ERROR_COLUMNS = ["ours/ORT", "ours/ORT+router", "exported/ORT", "ORT MoE", "grouped_mm", "Triton", "kernels"]


def fastest(row, how):
    cands = [(row[k], k) for k, _, h in COLUMNS if h == how and isinstance(row.get(k), (int, float))]
    return min(cands)[1].replace("/graph", "") if cands else "-"


def _cell(v, fmt):
    return fmt.format(v) if isinstance(v, (int, float)) and not math.isnan(v) else "-"


def table(rows):
    head = ["shape", "tokens"] + [h for _, h, _ in COLUMNS] + ["fastest (host)", "fastest (graph)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 3) + "---|---|"]
    for r in rows:
        cells = [r["shape"], str(r["tokens"])] + [_cell(r.get(k), "{:.3f}") for k, _, _ in COLUMNS]
        lines.append("| " + " | ".join(cells + [fastest(r, "host"), fastest(r, "graph")]) + " |")
    return "\n".join(lines)


def error_table(rows):
    head = ["shape", "tokens", "experts hit"] + ERROR_COLUMNS
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["shape"], str(r["tokens"]), str(r.get("experts_hit", "-"))]
        cells += [_cell(r.get(k + "_err"), "{:.1e}") for k in ERROR_COLUMNS]
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


def write_json(path, meta, rows):
    with open(path, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def chart(path, rows, shapes, title_of):
    """One log-log panel per shape: ms vs tokens; solid host-timed, dashed graph-timed, dotted floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5.2), squeeze=False)
    colors = {}
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape]
        for key, label, how in COLUMNS:
            pts = [(r["tokens"], r[key]) for r in rs if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            base = key.split("/graph")[0]
            color = colors.setdefault(base, f"C{len(colors) % 10}") if how else "black"
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
