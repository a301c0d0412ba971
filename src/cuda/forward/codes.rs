//! The codes the kernels' parameters take (element and index type names in entry points, GLU
//! layout and capacity order codes) and the bound on a grouped GEMM's work units: what every
//! launch module lays out the same way.

use crate::spec::{CapacityOrder, ElemType, GluLayout, IndexType, QuantFormat};

pub(super) fn tname(t: ElemType) -> &'static str {
    match t {
        ElemType::F32 => "f32",
        ElemType::F16 => "f16",
        ElemType::BF16 => "bf16",
    }
}

pub(super) fn iname(i: IndexType) -> &'static str {
    match i {
        IndexType::I32 => "i32",
        IndexType::I64 => "i64",
    }
}

pub(super) fn glu_code(l: GluLayout) -> i32 {
    match l {
        GluLayout::GateUp => 0,
        GluLayout::UpGate => 1,
        GluLayout::Interleaved => 2,
    }
}

pub(super) fn order_code(o: CapacityOrder) -> i32 {
    match o {
        CapacityOrder::SlotMajor => 0,
        CapacityOrder::TokenMajor => 1,
    }
}

/// A bound on a GEMM's work units, whatever the routing (kernels/grouped_gemm.cu's header, "Grid"):
/// tiles of `tile` = (BM rows, BN rows of W), or, with `cluster` CTAs sharing W, groups of
/// `cluster` M tiles of one expert. Each expert with rows has ceil(rows / (BM cluster)) groups, at
/// most rows / (BM cluster) + 1, hence the `min(E, N_assign)` term; times the column tiles of the
/// output (BN / 2 outputs per tile when gated).
pub(super) fn work_units(tile: (usize, usize), cluster: usize, n_assign: usize, experts: usize, n: usize, gated: bool) -> usize {
    let (bm, bn) = tile;
    let (nout, bno) = if gated { (n / 2, bn / 2) } else { (n, bn) };
    (n_assign.div_ceil(bm * cluster) + experts.min(n_assign)) * nout.div_ceil(bno)
}

/// A format's name in the quantized kernels' entry points (`catalogue::QUANT_FORMATS`).
pub const fn format_name(f: QuantFormat) -> &'static str {
    match f {
        QuantFormat::Fp8E4M3Fn => "fp8",
        QuantFormat::Int8 => "u8",
        QuantFormat::Int4 => "u4",
    }
}
