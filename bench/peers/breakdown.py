"""Where the device time of our kernels goes: routing / GEMM1 / GEMM2 / combine of the "kernels" column.

Method: one CUDA graph per part, as tests/gpu/bench_forward.py times its stages. The graph of a part holds
that part's launches alone for each of the input sets (routing: every routing launch, count + scan +
scatter or the one-block kernel; G1: the first grouped GEMM with the activation; G2: the second; combine:
the weighted sum into Y), and is replayed between CUDA events like the graph columns (timing.graph_ms):
median replay time / number of sets, in microseconds. Nothing is host-timed, and no profiler runs.

The parts read what the full forwards of the same sets left in their buffers (the column's check and
timed runs come first): G1 and G2 run on each set's own routing, so the tiles and rows per expert are
those of the measured layer. The scratch H and O are shared by the sets (as in the timed forwards; each
forward is complete before the next starts on the stream), so a part replayed alone reads the values the
previous replay left: the same shapes, other numbers, which a GEMM's time does not depend on.

A part timed alone starts on an idle device and ends without the next launch queued behind it, so the
four parts add up to a little more than the whole forward's graph time ("kernels (graph)"): the
difference is the overlap of one part's tail with the next part's launch; the table shows both.
"""

PARTS = (("route", "routing"), ("g1", "G1"), ("g2", "G2"), ("comb", "comb"))


def parts_us(forward, n_sets, graph_ms, budget_s):
    """forward(set index, stages) runs one part of one set's forward. Returns {part: us per forward}."""
    out = {}
    for stage, name in PARTS:
        fns = [lambda i=i, stage=stage: forward(i, (stage,)) for i in range(n_sets)]
        out[name] = graph_ms(fns, budget_s) * 1e3
    return out


def cell(parts):
    """'routing/G1/G2/comb' in whole microseconds (one decimal under 10 us), or '-'."""
    if not parts or any(not isinstance(parts.get(n), (int, float)) for _, n in PARTS):
        return "-"
    return "/".join(f"{parts[n]:.1f}" if parts[n] < 10 else f"{parts[n]:.0f}" for _, n in PARTS)
