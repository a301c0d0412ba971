"""The benchmark's correctness check: one model's greedy trace against another's (measure.greedy_trace),
both fed the same tokens (teacher forcing), end to end and per MoE layer.

End to end, at each of the trace's rows (the prompt's last position, then each decode step):
  - the logits agree within `tol` (max |a - b| / max |a|);
  - the greedy picks are the same, except at a tie: the reference's margin between its pick and the
    other's is below `tol` of its largest logit (a difference the tolerance allows may swap them).
Per MoE layer, at every position of the trace (from the checking copies' extra outputs, probe.py):
  - the block's output agrees within `tol` (max |a - b| over the position's features / max |a| of the
    layer's outputs);
  - the router chose the same experts, except at a routing tie: the reference's k-th and (k+1)-th
    scores closer than `tol` of its largest score. Two correct float16 graphs differ in their rounding,
    so a later layer's router sees slightly different inputs and may swap two such experts; the block's
    output at that position then differs by the swapped experts' share, and so do that position's
    later layers and logits. Those are reported as routing ties, not failed; everything else is gated.
A failure names the first layer whose output or routing differs beyond that.
"""

import numpy as np

import probe


def compare(ref, got, tol):
    """Record of `got` against `ref` (traces); rec['ok'] the verdict, rec['why'] the reasons it failed."""
    la, lb = ref["logits"], got["logits"]
    n = min(la.shape[0], lb.shape[0])
    same_history = got["fed"] == ref["fed"][: len(got["fed"])]
    if not same_history:  # rows up to the first different token fed are comparable (row i follows tokens 0..i-1)
        n = min(n, next(i for i, (x, y) in enumerate(zip(ref["fed"], got["fed"])) if x != y) + 1)
    layers = compare_layers(ref.get("layers"), got.get("layers"), tol, n)
    row_tie = layers["row_ties"] if layers else set()
    errs, ties, routing_ties, wrong = [], [], [], []
    for i in range(n):
        a, b = la[i].astype(np.float64), lb[i].astype(np.float64)
        scale = max(np.abs(a).max(), 1e-30)
        e = float(np.abs(a - b).max() / scale) if np.isfinite(b).all() else float("inf")
        if i in row_tie:
            routing_ties.append(dict(step=i, rel_err=e))
        else:
            errs.append((e, i))
        pa, pb = ref["picks"][i], got["picks"][i]
        if pa != pb:
            margin = float(a[pa] - a[pb])
            rec = dict(step=i, ref=pa, got=pb, margin=margin, scale=float(scale))
            (ties if margin < tol * scale or i in row_tie else wrong).append(rec)
    worst = max(errs) if errs else (0.0, None)
    rec = dict(steps=n, max_rel_err=worst[0], tol=tol, tokens_equal=not ties and not wrong, ties=ties, mismatches=wrong,
               routing_tie_steps=routing_ties, same_history=same_history, layers=layers["per_layer"] if layers else None)
    why = []
    if not same_history:
        why.append("not fed the reference's tokens")
    if wrong:
        w = wrong[0]
        why.append(f"greedy picks differ at {len(wrong)} step(s), first at step {w['step']} ({w['ref']} vs {w['got']}; the reference's "
                   f"margin there {w['margin']:.4g} of logits up to {w['scale']:.4g}, not a tie below {tol:g} of it)")
    if worst[0] > tol:
        why.append(f"logits differ: max relative error {worst[0]:.3g} > tolerance {tol:g} (step {worst[1]})")
    if layers and layers["why"]:
        why.append(layers["why"])
    elif why and layers:
        why.append("every MoE layer's output and routing within tolerance")
    rec["ok"] = not why
    rec["why"] = "; ".join(why)
    return rec


def compare_layers(ref_log, got_log, tol, rows):
    """Per-layer verdicts from two traces' per-layer readings (probe.stack, with "prompt": the prompt's
    positions), over the positions of the first `rows` rows (row 0: the prompt, whose last position is
    the row's; row i > 0: one position). None when either trace has no per-layer readings."""
    if not ref_log or not got_log:
        return None
    nl = sum(1 for k in ref_log if k.startswith("check/moe_"))
    if nl != sum(1 for k in got_log if k.startswith("check/moe_")):
        return dict(per_layer=[], row_ties=set(), why=f"per-layer readings of {nl} layers against "
                    f"{sum(1 for k in got_log if k.startswith('check/moe_'))}: not the same model")
    P = int(ref_log["prompt"])  # prompt positions; every row after the first is one more position
    T = min(ref_log[probe.MOE.format(0)].shape[0], got_log[probe.MOE.format(0)].shape[0], P + rows - 1)
    excused = np.zeros(T, bool)  # positions a routing tie at this layer or an earlier one has set apart
    per_layer, first_bad = [], None
    for i in range(nl):
        a, b = ref_log[probe.MOE.format(i)][:T], got_log[probe.MOE.format(i)][:T]
        va, ia, ib = ref_log[probe.TOPV.format(i)][:T], ref_log[probe.TOPI.format(i)][:T], got_log[probe.TOPI.format(i)][:T]
        k = va.shape[1] - 1
        flip = np.array([set(x[:k]) != set(y[:k]) for x, y in zip(ia, ib)])
        gap = va[:, k - 1] - va[:, k]
        tie = flip & (gap < tol * max(np.abs(va).max(), 1e-30))
        wrong_route = flip & ~tie & ~excused
        excused |= tie
        err = np.abs(a.astype(np.float64) - b).max(-1) / max(np.abs(a).max(), 1e-30)
        err[~np.isfinite(err)] = np.inf
        kept = np.where(excused, 0.0, err)
        t = int(np.argmax(kept))
        rec = dict(layer=i, max_rel_err=float(kept[t]), position=t, routing_ties=int(tie.sum()), routing_mismatches=int(wrong_route.sum()),
                   positions=int(T))
        per_layer.append(rec)
        if first_bad is None and (rec["max_rel_err"] > tol or wrong_route.any()):
            if wrong_route.any():
                p = int(np.argmax(wrong_route))
                first_bad = (f"MoE layer {i} differs first: its router chose other experts at {int(wrong_route.sum())} position(s), "
                             f"first at position {p} (the reference's k-th/(k+1)-th score gap there {gap[p]:.4g}, not a tie)")
            else:
                first_bad = f"MoE layer {i} differs first: output max relative error {rec['max_rel_err']:.3g} > tolerance {tol:g} at position {t}"
    row_pos = [P - 1 + r for r in range(rows)]
    row_ties = {r for r, p in enumerate(row_pos) if p < T and excused[p]}
    return dict(per_layer=per_layer, row_ties=row_ties, why=first_bad)
