//! The register tile's shape and what it reads and writes, shared by the arithmetic ([`super::avx2`])
//! and the packed weights that feed it ([`super::panels`]).

use crate::spec::scatter_moe::Attrs;

/// Columns of a panel: two AVX registers of f32.
pub const NR: usize = 16;
/// Rows of a register tile: 6 rows x 2 registers = 12 accumulators, plus the two panel registers
/// and one broadcast, fills the 16 AVX registers without spilling.
pub const MR: usize = 6;

/// What a product makes of its sums (bias added): the epilogue of the register tile.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// The sums themselves (a linear layer).
    Linear,
    /// `act(a)` lane by lane: a non-gated expert's hidden units.
    Act(&'a Attrs),
    /// Lanes 0..8 gate, 8..16 up ([`super::panels::Columns::Glu`]): 8 hidden units `glu(gate, up)` per panel.
    Glu(&'a Attrs),
}

/// The token rows of one expert as the register tile reads them: tiles of [`MR`] rows, each
/// stored column by column (`MR` values per column, the last tile's unused ones never read), so
/// a tile broadcasts every row's value of a column from one pointer, and reads its rows as one
/// sequential stream.
#[derive(Clone, Copy)]
pub struct RowTiles<'a> {
    /// Tile `t` at `t * MR * k`: value (row `i`, column `c`) at `(i / MR) * MR * k + c * MR + i % MR`.
    pub data: &'a [f32],
    pub rows: usize,
    pub k: usize,
}

impl<'a> RowTiles<'a> {
    pub fn new(data: &'a [f32], rows: usize, k: usize) -> Self {
        assert!(data.len() >= rows.div_ceil(MR) * MR * k, "RowTiles: buffer too small");
        RowTiles { data, rows, k }
    }
}

/// Where a product's values go: value (row `i`, column `j`) of the block at
/// `ptr + (i / MR) * tile + (i % MR) * row + j * col`, which describes both a row-major block
/// (`row` = its stride, `tile` = MR rows, `col` = 1) and a block of [`RowTiles`] (`row` = 1,
/// `col` = MR), the layout the next product reads.
pub struct OutBlock {
    pub ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    pub tile: usize,
    pub row: usize,
    pub col: usize,
}

impl OutBlock {
    /// `rows` x `cols` at `ptr` in a row-major buffer of row stride `stride`.
    pub fn rows(ptr: *mut f32, rows: usize, cols: usize, stride: usize) -> Self {
        OutBlock { ptr, rows, cols, tile: MR * stride, row: stride, col: 1 }
    }

    /// Columns `c0..c0 + cols` of the rows of a [`RowTiles`] buffer `width` columns wide whose
    /// first tile is at `tiles`.
    pub fn tiles(tiles: *mut f32, rows: usize, c0: usize, cols: usize, width: usize) -> Self {
        OutBlock { ptr: tiles.wrapping_add(c0 * MR), rows, cols, tile: MR * width, row: 1, col: MR }
    }

    /// Where row `i`'s first value goes.
    pub(super) fn row_ptr(&self, i: usize) -> *mut f32 {
        self.ptr.wrapping_add((i / MR) * self.tile + (i % MR) * self.row)
    }
}
