//! The workspace of one forward: byte offsets of its sections (routing, offsets, sorted indices,
//! positions, error words, capacity, kept mask, hidden activations, expert outputs), each
//! [`ALIGN`]-byte aligned, and its total size.

use super::{ALIGN, ROUTING_CHUNK};
use crate::reference::{LinearSizes, MoeSizes};
use crate::spec::ElemType;

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Byte offsets of the workspace sections (each 256-byte aligned) and the total size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// routing counts, scattermoe_routing_workspace_bytes(T, k, E)
    pub routing: usize,
    /// expert_offsets, int32 [E + 1]
    pub offsets: usize,
    /// sorted_idx, int32 [N]
    pub sorted_idx: usize,
    /// pos, int32 [N]
    pub pos: usize,
    /// error words, int32 [2]
    pub error: usize,
    /// capacity, int64 [1] (when given)
    pub capacity: Option<usize>,
    /// kept mask, uint8 [N] (ScatterMoE with capacity)
    pub kept: Option<usize>,
    /// hidden activations H, T [N, f] (ScatterMoE)
    pub hidden: Option<usize>,
    /// expert outputs O, T [N, d] (ScatterMoE; ParallelLinear with gates)
    pub out: Option<usize>,
    pub bytes: usize,
}

/// The routing workspace of kernels/common.cuh: 4 * (2 * nb * E + nb + 64) bytes.
pub fn routing_workspace_bytes(tokens: usize, k: usize, experts: usize) -> usize {
    let nb = (tokens * k).div_ceil(ROUTING_CHUNK);
    4 * (2 * nb * experts + nb + 64)
}

struct Layout {
    at: usize,
}

impl Layout {
    fn take(&mut self, bytes: usize) -> usize {
        let o = self.at;
        self.at += align(bytes.max(1));
        o
    }
}

fn routing_plan(tokens: usize, k: usize, experts: usize, capacity: bool) -> (Plan, Layout) {
    let n = tokens * k;
    let mut l = Layout { at: 0 };
    let plan = Plan {
        routing: l.take(routing_workspace_bytes(tokens, k, experts)),
        offsets: l.take(4 * (experts + 1)),
        sorted_idx: l.take(4 * n),
        pos: l.take(4 * n),
        error: l.take(8),
        capacity: capacity.then(|| l.take(8)),
        ..Plan::default()
    };
    (plan, l)
}

impl Plan {
    /// `ScatterMoE`: routing, H [N, f] and O [N, d] in `elem`, the kept mask with a capacity.
    pub fn scatter_moe(s: MoeSizes, elem: ElemType, capacity: bool) -> Plan {
        let n = s.tokens * s.k;
        let (mut p, mut l) = routing_plan(s.tokens, s.k, s.experts, capacity);
        p.kept = capacity.then(|| l.take(n));
        p.hidden = Some(l.take(n * s.f * elem.size_bytes()));
        p.out = Some(l.take(n * s.d * elem.size_bytes()));
        p.bytes = l.at;
        p
    }

    /// `ParallelLinear`: routing, and O [N, d_out] when gates combine over k.
    pub fn parallel_linear(s: LinearSizes, elem: ElemType, gates: bool) -> Plan {
        let n = s.tokens * s.k;
        let (mut p, mut l) = routing_plan(s.tokens, s.k, s.experts, false);
        p.out = gates.then(|| l.take(n * s.d_out * elem.size_bytes()));
        p.bytes = l.at;
        p
    }

    /// `CapacityMask`: routing with the capacity; the kept mask is the op's output.
    pub fn capacity_mask(tokens: usize, k: usize, experts: usize) -> Plan {
        let (mut p, l) = routing_plan(tokens, k, experts, true);
        p.bytes = l.at;
        p
    }
}
