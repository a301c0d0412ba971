//! The work shared by the ops: gather rows in grouped order, and cut a per-expert product into
//! blocks (expert, column range) that run in parallel, so one busy expert still uses every core.

use super::element::Element;
use super::gemm::{matmul_nt, MatMut, MatRef};
use super::panels::PackedWeights;
use super::tile::{Epilogue, OutBlock, RowTiles, MR};
use super::pool::Pool;
use super::quant::Weight;
use super::routing::Routing;
use std::ops::Range;

/// Columns per block: small enough to give every core work when one expert has all the tokens,
/// large enough that a block's weight rows stream efficiently.
const BLOCK_COLS: usize = 64;

/// One block of a grouped product: expert `e`'s rows `rows` (grouped positions), columns `cols`.
pub struct Block {
    pub e: usize,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

/// The blocks of a product `width` columns wide over every expert that has rows.
pub fn blocks(routing: &Routing, width: usize) -> Vec<Block> {
    blocks_by(routing, width, &|_| BLOCK_COLS)
}

/// Blocks of `per_block(rows)` units (columns, or panels of packed weights) out of `width`, for
/// every expert that has rows (`rows` of them).
pub fn blocks_by(routing: &Routing, width: usize, per_block: &dyn Fn(usize) -> usize) -> Vec<Block> {
    let experts = routing.offsets.len() - 1;
    let mut out = Vec::new();
    for e in 0..experts {
        let rows = routing.offsets[e]..routing.offsets[e + 1];
        if rows.is_empty() {
            continue;
        }
        let per_block = per_block(rows.len());
        assert!(per_block > 0);
        let mut c = 0;
        while c < width {
            let end = (c + per_block).min(width);
            out.push(Block { e, rows: rows.clone(), cols: c..end });
            c = end;
        }
    }
    out
}

/// A buffer that parallel tasks write in disjoint blocks.
pub struct Shared {
    ptr: *mut f32,
    len: usize,
    stride: usize,
}

// SAFETY: tasks only write through `block`, and the blocks they are given do not overlap.
unsafe impl Sync for Shared {}

impl Shared {
    /// `buf` seen as rows of `stride` values.
    pub fn new(buf: &mut [f32], stride: usize) -> Self {
        Shared { ptr: buf.as_mut_ptr(), len: buf.len(), stride }
    }

    /// The buffer's first value, for blocks addressed by hand ([`OutBlock`]).
    fn base(&self) -> *mut f32 {
        self.ptr
    }

    /// `n` values from the start of row `i`.
    ///
    /// # Safety
    /// No two tasks may hold overlapping ranges.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, i: usize, n: usize) -> &mut [f32] {
        assert!(i * self.stride + n <= self.len, "rows outside the buffer");
        std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride), n)
    }

    /// Row `i` as a slice of `w` values.
    ///
    /// # Safety
    /// No two tasks may hold the same row.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, w: usize) -> &mut [f32] {
        assert!((i + 1) * w <= self.len, "row outside the buffer");
        std::slice::from_raw_parts_mut(self.ptr.add(i * w), w)
    }

    /// The block `rows` x `cols`.
    ///
    /// # Safety
    /// No two live blocks may overlap, and the buffer must outlive them.
    pub unsafe fn block(&self, rows: &Range<usize>, cols: &Range<usize>) -> MatMut {
        assert!(rows.end * self.stride <= self.len && cols.end <= self.stride, "block outside the buffer");
        MatMut { ptr: self.ptr.add(rows.start * self.stride + cols.start), rows: rows.len(), cols: cols.len(), stride: self.stride }
    }
}

/// Gathers rows of `src` (width `k`) as f32 in parallel into `a` (`rows` x `k`): row `i` of `a`
/// is `src[row_of(i)]`.
pub fn gather_rows<E: Element>(pool: &dyn Pool, src: &[E], k: usize, a: &mut [f32], row_of: &(dyn Fn(usize) -> usize + Sync)) {
    let rows = a.len().checked_div(k).unwrap_or(0);
    let shared = Shared::new(a, k.max(1));
    const CHUNK: usize = 64;
    pool.for_each(rows.div_ceil(CHUNK), &|c| {
        for i in c * CHUNK..((c + 1) * CHUNK).min(rows) {
            let r = row_of(i);
            // SAFETY: row i belongs to chunk c only.
            let dst = unsafe { shared.row(i, k) };
            for (d, s) in dst.iter_mut().zip(&src[r * k..(r + 1) * k]) {
                *d = s.to_f32();
            }
        }
    });
}

/// `out = a · w[e][rows]ᵀ (+ b[rows])` for the weight rows `w_rows` of expert `e`'s matrix of
/// `w` (`[n, k]` each, torch.nn.Linear layout) and its bias `b` ([n]); `a` is [m, k]. Those rows
/// only are converted to f32 (dequantized, for a quantized weight) before the product.
///
/// # Safety
/// As [`matmul_nt`]: `out` is a block no other thread touches.
#[allow(clippy::too_many_arguments)]
pub unsafe fn linear_rows<E: Element>(a: MatRef, w: &Weight<E>, e: usize, n: usize, b: Option<&[E]>, w_rows: Range<usize>, out: &MatMut) {
    let k = a.cols;
    let wf = w.rows_f32(e, w_rows.clone(), n, k);
    matmul_nt(a, MatRef::new(&wf, w_rows.len(), k, k), out, false);
    if let Some(b) = b {
        for i in 0..out.rows {
            for (j, r) in w_rows.clone().enumerate() {
                *out.ptr.add(i * out.stride + j) += b[r].to_f32();
            }
        }
    }
}

/// Row offsets of each expert's rows in [`RowTiles`] buffers: expert `e`'s tiles start at row
/// `tiled[e]`, its row count rounded up to whole tiles (length E + 1).
pub fn tile_offsets(routing: &Routing) -> Vec<usize> {
    let mut tiled = vec![0];
    for w in routing.offsets.windows(2) {
        tiled.push(tiled.last().unwrap() + (w[1] - w[0]).div_ceil(MR) * MR);
    }
    tiled
}

/// [`gather_rows`] into [`RowTiles`] layout: grouped row `i` (of expert `e`) is `src[row_of(i)]`,
/// stored in `a` (`tiled[E]` rows of width `k`) at row `tiled[e] + i - offsets[e]`.
pub fn gather_tiles<E: Element>(pool: &dyn Pool, src: &[E], k: usize, routing: &Routing, tiled: &[usize], a: &mut [f32], row_of: &(dyn Fn(usize) -> usize + Sync)) {
    assert_eq!(a.len(), tiled.last().unwrap() * k, "gather_tiles: buffer size");
    let shared = Shared::new(a, k.max(1));
    // One task per tile: tiles are disjoint in `a`.
    let tiles: Vec<(usize, Range<usize>)> = routing
        .offsets
        .windows(2)
        .enumerate()
        .flat_map(|(e, w)| (w[0]..w[1]).step_by(MR).map(move |r| (tiled[e] + r - w[0], r..(r + MR).min(w[1]))))
        .collect();
    pool.for_each(tiles.len(), &|t| {
        let (at, rows) = &tiles[t];
        // SAFETY: tile t's rows belong to task t only.
        let dst = unsafe { shared.rows(*at, MR * k) };
        for (lane, i) in rows.clone().enumerate() {
            let r = row_of(i);
            for (c, s) in src[r * k..(r + 1) * k].iter().enumerate() {
                dst[c * MR + lane] = s.to_f32();
            }
        }
    });
}

/// Where [`packed_product`] writes.
pub enum Dest<'a> {
    /// Row-major, one row per grouped row.
    Rows(&'a mut [f32]),
    /// [`RowTiles`] at the rows of [`tile_offsets`], for a product that reads them next.
    Tiles(&'a mut [f32]),
}

/// `out = epi(a · W[e]ᵀ + b[e])` over packed weights for every expert's rows, `a` being the
/// [`RowTiles`] (at `tiled`) of the grouped rows, `pw.k()` wide; `out` is `pw.width()` wide. In
/// blocks (expert, panels) on `pool`.
pub fn packed_product(pool: &dyn Pool, routing: &Routing, tiled: &[usize], a: &[f32], pw: &PackedWeights, epi: Epilogue, out: Dest) {
    let (k, width) = (pw.k(), pw.width());
    let (buf, tiles) = match out {
        Dest::Rows(b) => (b, false),
        Dest::Tiles(b) => (b, true),
    };
    let rows_needed = if tiles { *tiled.last().unwrap() } else { *routing.offsets.last().unwrap() };
    assert!(buf.len() >= rows_needed * width, "packed_product: output buffer too small");
    let out = Shared::new(buf, width);
    let work = blocks_by(routing, pw.panels(), &|rows| pw.task_panels(rows));
    pool.for_each(work.len(), &|i| {
        let Block { e, rows: r, cols: panels } = &work[i];
        let a_e = RowTiles::new(&a[tiled[*e] * k..tiled[e + 1] * k], r.len(), k);
        let cols = pw.columns_of(panels);
        // SAFETY: blocks of different tasks do not overlap, and lie inside the buffer (checked).
        unsafe {
            let dst = if tiles {
                OutBlock::tiles(out.base().add(tiled[*e] * width), r.len(), cols.start, cols.len(), width)
            } else {
                OutBlock::rows(out.base().add(r.start * width + cols.start), r.len(), cols.len(), width)
            };
            pw.product(*e, panels.clone(), a_e, epi, &dst);
        }
    });
}

/// An output of element type `E` that parallel tasks write row by row, each row by one task.
pub struct SharedOut<E> {
    ptr: *mut E,
    len: usize,
}

// SAFETY: tasks write disjoint rows only.
unsafe impl<E: Send> Sync for SharedOut<E> {}

impl<E> SharedOut<E> {
    pub fn new(buf: &mut [E]) -> Self {
        SharedOut { ptr: buf.as_mut_ptr(), len: buf.len() }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Row `r` of width `w`.
    ///
    /// # Safety
    /// No two tasks may hold the same row.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn row(&self, r: usize, w: usize) -> &mut [E] {
        assert!((r + 1) * w <= self.len, "row outside the buffer");
        std::slice::from_raw_parts_mut(self.ptr.add(r * w), w)
    }
}
