"""The files of a run: NAME.json (meta + rows), NAME.md (the tables, the repeats, why cells are "-") and
NAME.png (one panel per layer; not with chart=False: the device run leaves charts to --render, since a
call returns at most 8 files); and --render, which merges earlier runs' JSON into them.

Repeats: a row's "close" pairs (report.close_pairs) and "repeat" times come from the run's own second pass
(--repeat-close), or, rendering, from later runs named by --render-repeats (a second device call timing the
close rows again): their cells become the "repeat" of the rendered row, whose own cells stay as the first
pass measured them."""
import json
import os

from . import report
from .layers import SHAPES


def title(shape):
    return f"{shape}: {SHAPES[shape].describe()}" if shape in SHAPES else shape


def short(e):
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def write_outputs(out, name, meta, rows, shapes, chart=True):
    os.makedirs(out, exist_ok=True)
    report.write_json(os.path.join(out, name + ".json"), meta, rows)
    md = ["## Time per layer forward (ms, median)", "", report.table(rows), "",
          "## Relative error vs float32 torch on the same routing (max|y-ref|/max|ref|)", "", report.error_table(rows)]
    reps = report.repeats_table(rows)
    if reps:
        md += ["", "## Repeats of the close rows (ours and the fastest peer within 5%, timed again)", "", reps]
    plain = {k for k, _, _ in report.COLUMNS}
    if any(k in r for r in rows for k, _, _ in report.QUANT_COLUMNS[2:] if k not in plain):
        md += ["", "## Quantized weights: time per layer forward (ms, median)", "", report.table(rows, report.QUANT_COLUMNS), "",
               "## Quantized weights: relative error vs float32 torch of the bf16 layer (the quantization's error)", "",
               report.error_table(rows, report.QUANT_ERROR_COLUMNS)]
    cfg = report.vllm_configs(rows)
    if cfg:
        md += ["", "## vLLM fused_moe's tile configuration", "", cfg]
    why = report.notes(rows)
    if why:
        md += ["", "## Not measured", "", why]
    text = "\n".join(md)
    print("\n" + text, flush=True)
    with open(os.path.join(out, name + ".md"), "w") as fh:
        fh.write(text + "\n")
    if not chart:
        return
    try:
        report.chart(os.path.join(out, name + ".png"), rows, shapes, title)
    except Exception as e:  # noqa: BLE001 - matplotlib may be absent on the device
        print(f"chart not written: {short(e)}", flush=True)


def render(args):
    """Tables and chart from earlier runs (a device call is time-boxed, so one table may take several runs)."""
    meta, merged = {"runs": []}, {}
    for path in args.render:
        with open(path) as fh:
            run = json.load(fh)
        meta["runs"].append(run.get("meta", {}))
        for row in run["rows"]:
            key = (row["shape"], row["tokens"])
            have = merged.setdefault(key, {"notes": {}})
            notes = {**have["notes"], **row.get("notes", {})}
            row = dict(row)
            for k in ("close", "repeat"):  # a run without --repeat-close does not undo another's repeats
                if not row.get(k):
                    row.pop(k, None)
            if "mem_gb" in row and "mem_gb" in have:  # the most any run of this row needed
                row["mem_gb"] = {k: max(v, have["mem_gb"].get(k, 0)) for k, v in row["mem_gb"].items()}
            have.update(row)
            have["notes"] = {c: why for c, why in notes.items() if c not in have}  # a measured cell needs no why
    for path in getattr(args, "render_repeats", None) or []:
        with open(path) as fh:
            run = json.load(fh)
        meta["runs"].append(dict(run.get("meta", {}), repeats_of_close_rows=True))
        for row in run["rows"]:
            have = merged.get((row["shape"], row["tokens"]))
            if have is None:
                continue
            have["close"] = report.close_pairs(have, getattr(args, "close", 0.05))
            rep = {k: row[k] for pair in have["close"] for k in pair[:2] if isinstance(row.get(k), (int, float))}
            if rep:
                have["repeat"] = rep
    order = {s: i for i, s in enumerate(SHAPES)}
    rows = [merged[k] for k in sorted(merged, key=lambda k: (order.get(k[0], 99), k[1]))]
    write_outputs(args.out, args.name, meta, rows, list(dict.fromkeys(r["shape"] for r in rows)))
    return 0
