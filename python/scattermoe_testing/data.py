"""Random inputs and routings for the tests and the benchmark (float32 arrays; int64 indices)."""

from __future__ import annotations

import numpy as np

ROUTINGS = ("topk", "empty_expert", "one_expert", "duplicates")


def routing(rng: np.random.Generator, T: int, E: int, k: int, pattern: str = "topk") -> np.ndarray:
    """[T, k] int64 expert indices.

    topk: distinct top-k of random logits, like a real router (k > E falls back to duplicates);
    empty_expert: top-k among all experts but one (some expert gets no token; needs k < E);
    one_expert: every token names one chosen expert among its k (it gets all T tokens);
    duplicates: independent draws, a token may name an expert twice (legal per spec).
    """
    if pattern == "duplicates" or (pattern == "topk" and k > E):
        return rng.integers(0, E, size=(T, k), dtype=np.int64)
    if pattern == "topk":
        logits = rng.standard_normal((T, E))
        return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)
    if pattern == "empty_expert":
        if k >= E:
            raise ValueError("empty_expert needs k < E")
        skip = int(rng.integers(0, E))
        logits = rng.standard_normal((T, E))
        logits[:, skip] = -np.inf
        return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)
    if pattern == "one_expert":
        hot = int(rng.integers(0, E))
        logits = rng.standard_normal((T, E))
        logits[:, hot] = np.inf
        idx = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64) if k <= E else \
            rng.integers(0, E, size=(T, k), dtype=np.int64)
        if k > E:
            idx[:, 0] = hot
        # put the hot expert in a random slot, not always slot 0
        for t in range(T):
            j = int(rng.integers(0, k))
            where = np.nonzero(idx[t] == hot)[0][0]
            idx[t, where], idx[t, j] = idx[t, j], idx[t, where]
        return idx
    raise ValueError(f"routing pattern {pattern!r}")


def routing_weights(rng: np.random.Generator, T: int, k: int, kind: str = "softmax") -> np.ndarray:
    """[T, k] float32: softmax of the chosen logits (like Mixtral / Qwen3), or signed normals."""
    z = rng.standard_normal((T, k))
    if kind == "softmax":
        z = np.exp(z - z.max(axis=1, keepdims=True)) if k else z
        return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    return z.astype(np.float32)


def moe_inputs(rng: np.random.Generator, *, T: int, d: int, f: int, E: int, k: int, gated: int = 1,
               b_in: bool = False, b_out: bool = False, pattern: str = "topk", weights: str = "softmax",
               a_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Feeds for the ScatterMoE / loop models: X [T, d], routing [T, k], weights, optional biases.

    w_in is scaled so that a = w_in . x has std about `a_scale`; w_out so outputs are O(1).
    """
    n = 2 * f if gated else f
    feeds = {
        "X": rng.standard_normal((T, d)).astype(np.float32),
        "routing_weights": routing_weights(rng, T, k, weights),
        "routing_indices": routing(rng, T, E, k, pattern),
        "w_in": (rng.standard_normal((E, n, d)) * (a_scale / np.sqrt(d))).astype(np.float32),
        "w_out": (rng.standard_normal((E, d, f)) / np.sqrt(f)).astype(np.float32),
    }
    if b_in:
        feeds["b_in"] = (0.5 * rng.standard_normal((E, n))).astype(np.float32)
    if b_out:
        feeds["b_out"] = (0.5 * rng.standard_normal((E, d))).astype(np.float32)
    return feeds
