//! Routing on the CPU: validates expert indices, applies capacity, and builds the grouped order
//! (assignments sorted by expert, stable in the flat index t*k + j) the way the GPU kernels do.

use super::element::Indices;
use crate::spec::{index_out_of_range, CapacityOrder, SpecError};

/// Marks an assignment that capacity dropped, in [`Routing::pos`].
pub const DROPPED: u32 = u32::MAX;

/// The grouped order of a call's assignments.
pub struct Routing {
    /// `offsets[e]..offsets[e + 1]` are expert e's rows in grouped order (length E + 1).
    pub offsets: Vec<usize>,
    /// grouped position -> flat assignment index `t * k + j`
    pub order: Vec<u32>,
    /// flat assignment index -> grouped position, or [`DROPPED`]
    pub pos: Vec<u32>,
}

/// Reads every index once, failing on the first outside [0, E) (never indexing with it).
pub fn experts_of(op: &'static str, idx: Indices, k: usize, experts: usize) -> Result<Vec<u32>, SpecError> {
    (0..idx.len())
        .map(|i| {
            let e = idx.get(i);
            // Expert ids are held as u32 (as on the GPU): a count beyond that range only widens
            // what is refused, it never truncates an index.
            let experts = experts.min(u32::MAX as usize);
            if e < 0 || e >= experts as i64 {
                Err(index_out_of_range(op, "routing_indices", e, i / k, i % k, experts))
            } else {
                Ok(e as u32)
            }
        })
        .collect()
}

/// Which assignments fit their expert's capacity: ranked by `order`, an assignment is kept iff
/// fewer than `capacity` earlier ones chose the same expert.
///
/// The per-expert counters are sized by the experts the indices actually name (every index is
/// below `experts`, as [`experts_of`] checked), not by `experts`: an attribute such as
/// `num_experts = 2^40` must not become an allocation.
pub fn capacity_keep(expert: &[u32], k: usize, experts: usize, capacity: usize, order: CapacityOrder) -> Vec<bool> {
    let tokens = if k == 0 { 0 } else { expert.len() / k };
    let named = expert.iter().map(|&e| e as usize + 1).max().unwrap_or(0);
    debug_assert!(named <= experts, "expert index beyond the expert count");
    let mut used = vec![0usize; named.min(experts)];
    let mut keep = vec![false; expert.len()];
    let mut visit = |flat: usize| {
        let e = expert[flat] as usize;
        if used[e] < capacity {
            used[e] += 1;
            keep[flat] = true;
        }
    };
    match order {
        CapacityOrder::SlotMajor => (0..k).for_each(|j| (0..tokens).for_each(|t| visit(t * k + j))),
        CapacityOrder::TokenMajor => (0..expert.len()).for_each(&mut visit),
    }
    keep
}

/// Counting sort of the (kept) assignments by expert.
pub fn group(expert: &[u32], experts: usize, keep: Option<&[bool]>) -> Routing {
    let kept = |i: usize| keep.is_none_or(|k| k[i]);
    let mut offsets = vec![0usize; experts + 1];
    for (i, &e) in expert.iter().enumerate() {
        if kept(i) {
            offsets[e as usize + 1] += 1;
        }
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut order = vec![0u32; offsets[experts]];
    let mut pos = vec![DROPPED; expert.len()];
    for (i, &e) in expert.iter().enumerate() {
        if kept(i) {
            let p = next[e as usize];
            next[e as usize] += 1;
            order[p] = i as u32;
            pos[i] = p as u32;
        }
    }
    Routing { offsets, order, pos }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_order_is_stable_by_flat_index() {
        // T = 3, k = 2: experts [[1, 0], [1, 2], [0, 1]]
        let e = [1, 0, 1, 2, 0, 1];
        let r = group(&e, 3, None);
        assert_eq!(r.offsets, vec![0, 2, 5, 6]);
        assert_eq!(r.order, vec![1, 4, 0, 2, 5, 3]);
        assert_eq!(r.pos, vec![2, 0, 3, 5, 1, 4]);
    }

    #[test]
    fn capacity_orders() {
        // T = 3, k = 2, all to expert 0 but slot 1 of token 0 (expert 1); capacity 2
        let e = [0, 1, 0, 0, 0, 0];
        assert_eq!(capacity_keep(&e, 2, 2, 2, CapacityOrder::SlotMajor), vec![true, true, true, false, false, false]);
        assert_eq!(capacity_keep(&e, 2, 2, 2, CapacityOrder::TokenMajor), vec![true, true, true, false, false, false]);
        let e = [0, 0, 1, 0, 0, 1];
        assert_eq!(capacity_keep(&e, 2, 2, 2, CapacityOrder::SlotMajor), vec![true, false, true, false, true, true]);
        assert_eq!(capacity_keep(&e, 2, 2, 2, CapacityOrder::TokenMajor), vec![true, true, true, false, false, true]);
        let r = group(&e, 2, Some(&capacity_keep(&e, 2, 2, 0, CapacityOrder::SlotMajor)));
        assert!(r.order.is_empty() && r.pos.iter().all(|&p| p == DROPPED));
    }

    #[test]
    fn a_huge_expert_count_allocates_only_for_the_experts_named() {
        // CapacityMask's num_experts is an attribute: 2^40 used to size a Vec (an abort).
        let e = [3u32, 0, 3, 1];
        let keep = capacity_keep(&e, 2, 1 << 40, 1, CapacityOrder::TokenMajor);
        assert_eq!(keep, vec![true, true, false, true]);
        let idx = [0i64, 1 << 33];
        let err = experts_of("CapacityMask", Indices::I64(&idx), 2, 1 << 40).unwrap_err().to_string();
        assert!(err.contains("holds 8589934592"), "{err}");
    }

    #[test]
    fn bad_index_is_named() {
        let idx = [0i64, 3, 1, 8];
        let err = experts_of("ScatterMoE", Indices::I64(&idx), 2, 8).unwrap_err();
        assert_eq!(err.to_string(), "ScatterMoE: input 'routing_indices' holds 8 at [1, 1], outside [0, 8) (the number of experts)");
        let idx = [-1i32];
        assert!(experts_of("ParallelLinear", Indices::I32(&idx), 1, 4).unwrap_err().to_string().contains("holds -1 at [0, 0]"));
    }
}
