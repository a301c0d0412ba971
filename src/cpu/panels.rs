//! Expert weights packed once into column panels for the AVX2 register tile ([`super::avx2`]).
//!
//! ONNX Runtime's MatMul packs constant weights when the session is created; a product that
//! repacks them on every call (the `gemm` crate) or reads them in torch's row-major layout loses to
//! it. When a node's weights are constant initializers, the CPU kernel packs them here once: each
//! expert's matrix becomes panels of [`NR`] output columns, a panel being lines of [`NR`]
//! contiguous f32 (one cache line per inner index), so the register tile reads a line with two
//! aligned loads.
//!
//! The inner dimension is cut into blocks of [`KC`]: one panel's block (16 KiB) stays in L1 while
//! every row tile of the task passes over it, with each tile's slice of the token rows coming from
//! L2. Blocks are stored block-major (`[expert][k block][panel][line]`), so the panels a task reads
//! for one block lie back to back, and the first tile streams them from memory in one run that
//! its prefetches can follow.
//!
//! A gated first projection pairs rows: a panel holds the gate rows of 8 hidden units in lanes
//! 0..8 and their up rows in lanes 8..16 (whatever `glu_layout` says), so the epilogue forms the
//! GLU in registers and the `2f`-wide pre-activation never reaches memory.

use super::avx2;
use super::tile::{Epilogue, OutBlock, RowTiles, MR, NR};
use super::element::Element;
use crate::spec::GluLayout;
use std::ops::Range;

/// Inner-dimension block: one panel's block is `KC` lines (16 KiB), half a 32 KiB L1.
pub const KC: usize = 256;

/// Weight bytes a task's panels should span at least: enough work per task to amortise its
/// dispatch, few enough that one expert with few rows still splits over every core.
const TASK_BYTES: usize = 128 << 10;

/// Panels a task takes at least when the expert has more than one row tile: every row tile
/// passes over the task's panels, so the token rows (read from L2 or L3 for each task) are
/// reused this many times, while the panels' current inner blocks (16 KiB each) stay in L2.
const TASK_PANELS_MANY_ROWS: usize = 4;

/// Which weight rows a panel's lanes hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    /// Lane `l` of panel `p` is output column `NR * p + l`.
    Plain,
    /// Lanes `l < 8` of panel `p` are the gate rows of hidden units `8p + l`, lanes `8 + l` their
    /// up rows; the rows are found through the layout.
    Glu(GluLayout),
}

/// One cache line of a panel: the `NR` weights of one inner index `l`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; NR]);

/// Zeroed storage for panel lines: an anonymous mapping, which Linux is asked to back with 2 MiB
/// pages. A product streams megabytes of weights, and with 4 KiB pages every 64th line would
/// need a TLB entry of its own (and a page walk: the weights of a layer outnumber the TLB).
struct LineStore {
    map: memmap2::MmapMut,
    len: usize,
}

impl LineStore {
    /// None when the system refuses the memory (the caller then keeps the unpacked path).
    fn zeroed(len: usize) -> Option<Self> {
        let bytes = (len * std::mem::size_of::<Line>()).max(1);
        let map = memmap2::MmapOptions::new().len(bytes).map_anon().ok()?;
        // Only advice: without transparent huge pages the mapping keeps 4 KiB pages.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Some(LineStore { map, len })
    }

    fn lines(&self) -> &[Line] {
        // SAFETY: the mapping is page-aligned (so aligned for Line), `len` lines long, and zeroed
        // memory is a valid Line; it lives as long as self.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<Line>(), self.len) }
    }

    fn lines_mut(&mut self) -> &mut [Line] {
        // SAFETY: as in `lines`, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().cast::<Line>(), self.len) }
    }
}

/// Every expert's weight matrix (and bias) of one projection, in panels.
pub struct PackedWeights {
    /// `[experts][k blocks][panels][lines of the block]`.
    lines: LineStore,
    /// `[experts][panels]`: the bias laid out like the panel's lanes (zero in padding lanes).
    bias: Option<Vec<Line>>,
    experts: usize,
    k: usize,
    /// Weight rows per expert (`n` in `[experts, n, k]`).
    n: usize,
    panels: usize,
    columns: Columns,
}

impl PackedWeights {
    /// Packs `w` (`[experts, n, k]`, torch.nn.Linear's layout) and its bias `b` (`[experts, n]`).
    /// None where the machine lacks AVX2/FMA or the memory: callers keep the unpacked path.
    pub fn new<E: Element>(w: &[E], b: Option<&[E]>, experts: usize, n: usize, k: usize, columns: Columns) -> Option<Self> {
        if !avx2::available() || k == 0 {
            return None;
        }
        assert_eq!(w.len(), experts * n * k, "PackedWeights: weight size");
        assert!(b.is_none_or(|b| b.len() == experts * n), "PackedWeights: bias size");
        if let Columns::Glu(_) = columns {
            assert!(n % 2 == 0, "PackedWeights: a gated projection has 2f rows");
        }
        let width = if let Columns::Glu(_) = columns { n / 2 } else { n };
        let panels = width.div_ceil(lanes_out(columns));
        let mut me = PackedWeights { lines: LineStore::zeroed(experts * panels * k)?, bias: None, experts, k, n, panels, columns };
        let mut bias = b.map(|_| vec![Line([0.0; NR]); experts * panels]);
        for e in 0..experts {
            for p in 0..panels {
                // The panel's source rows (None for padding lanes), read 16 side by side so that
                // each line is written whole, once.
                let rows: [Option<&[E]>; NR] = std::array::from_fn(|lane| me.row_of(p, lane).map(|r| &w[(e * n + r) * k..(e * n + r + 1) * k]));
                for kb in (0..k).step_by(KC) {
                    let (at, kl) = me.block(e, kb, p);
                    for (l, line) in me.lines.lines_mut()[at..at + kl].iter_mut().enumerate() {
                        for (v, row) in line.0.iter_mut().zip(&rows) {
                            *v = row.map_or(0.0, |r| r[kb + l].to_f32());
                        }
                    }
                }
                if let (Some(bias), Some(b)) = (bias.as_mut(), b) {
                    for lane in 0..NR {
                        if let Some(r) = me.row_of(p, lane) {
                            bias[e * panels + p].0[lane] = b[e * n + r].to_f32();
                        }
                    }
                }
            }
        }
        me.bias = bias;
        Some(me)
    }

    /// Where panel `p`'s block of inner indices `kb..` of expert `e` starts (in lines), and its length.
    fn block(&self, e: usize, kb: usize, p: usize) -> (usize, usize) {
        let kl = KC.min(self.k - kb);
        // earlier experts, then the full blocks before kb (every panel), then earlier panels
        ((e * self.k + kb) * self.panels + p * kl, kl)
    }

    /// The weight row lane `lane` of panel `p` holds, or None for a padding lane past the end.
    fn row_of(&self, p: usize, lane: usize) -> Option<usize> {
        match self.columns {
            Columns::Plain => Some(p * NR + lane).filter(|&r| r < self.n),
            Columns::Glu(layout) => {
                let f = self.n / 2;
                let unit = p * (NR / 2) + lane % (NR / 2);
                (unit < f).then(|| {
                    let (gate, up) = layout.rows(unit, f);
                    if lane < NR / 2 { gate } else { up }
                })
            }
        }
    }

    /// Whether this packs a projection of these sizes and layout (the kernel checks every call).
    pub fn fits(&self, experts: usize, n: usize, k: usize, columns: Columns) -> bool {
        (self.experts, self.n, self.k, self.columns) == (experts, n, k, columns)
    }

    /// The inner dimension (input features).
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// Output values per row: `n`, or the `n / 2` hidden units of a gated projection.
    pub fn width(&self) -> usize {
        self.panels_width(self.panels)
    }

    fn panels_width(&self, panels: usize) -> usize {
        let w = if let Columns::Glu(_) = self.columns { self.n / 2 } else { self.n };
        (panels * lanes_out(self.columns)).min(w)
    }

    /// Panels per expert.
    pub fn panels(&self) -> usize {
        self.panels
    }

    /// Panels per parallel task for an expert with `rows` token rows (see [`TASK_BYTES`],
    /// [`TASK_PANELS_MANY_ROWS`]).
    pub fn task_panels(&self, rows: usize) -> usize {
        let by_bytes = TASK_BYTES.div_ceil(self.k.max(1) * NR * 4);
        if rows > MR {
            by_bytes.max(TASK_PANELS_MANY_ROWS)
        } else {
            by_bytes
        }
    }

    /// The output columns panels `panels` write.
    pub fn columns_of(&self, panels: &Range<usize>) -> Range<usize> {
        self.panels_width(panels.start)..self.panels_width(panels.end)
    }

    /// `out = epi(a · W[e]ᵀ + b[e])` for the output columns of `panels`: `a` holds expert `e`'s
    /// `m` token rows of `k` values, `out` is `m` x `columns_of(panels).len()`.
    ///
    /// # Safety
    /// `out` must describe writable memory that no other thread touches during the call.
    pub unsafe fn product(&self, e: usize, panels: Range<usize>, a: RowTiles, epi: Epilogue, out: &OutBlock) {
        assert!(e < self.experts && panels.end <= self.panels && a.k == self.k, "PackedWeights::product: out of range");
        assert!(out.rows == a.rows && out.cols == self.columns_of(&panels).len(), "PackedWeights::product: output block has the wrong shape");
        assert_eq!(matches!(epi, Epilogue::Glu(_)), matches!(self.columns, Columns::Glu(_)), "PackedWeights::product: epilogue and panel layout differ");
        // SAFETY: `new` only builds this where AVX2 and FMA are available.
        self.product_avx2(e, panels, a, epi, out)
    }

    #[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
    unsafe fn product_avx2(&self, e: usize, panels: Range<usize>, a: RowTiles, epi: Epilogue, out: &OutBlock) {
        let lanes = lanes_out(self.columns);
        let width = self.width();
        let (m, k) = (a.rows, self.k);
        let tiles = m.div_ceil(MR);
        // One accumulator tile per (row tile, panel), carried from one inner block to the next.
        let mut acc = vec![[[0f32; NR]; MR]; tiles * panels.len()];
        for kb in (0..k).step_by(KC) {
            let last = kb + KC >= k;
            for (pi, p) in panels.clone().enumerate() {
                let (at, kl) = self.block(e, kb, p);
                let panel = self.lines.lines().as_ptr().add(at).cast::<f32>();
                let bias = self.bias.as_ref().map(|b| &b[e * self.panels + p].0);
                let valid = lanes.min(width - p * lanes);
                for t in 0..tiles {
                    let mr = MR.min(m - t * MR);
                    let rows = a.data.as_ptr().add(t * MR * k + kb * MR);
                    let tile = &mut acc[t * panels.len() + pi];
                    // The first row tile reads the block from memory: it prefetches ahead.
                    avx2::tile(mr, kl, rows, panel, tile, kb > 0, t == 0);
                    if !last {
                        continue;
                    }
                    avx2::finish_tile(epi, tile, mr, bias, valid, out, t * MR, pi * lanes);
                }
            }
        }
    }
}

/// Output values one panel makes.
fn lanes_out(columns: Columns) -> usize {
    match columns {
        Columns::Plain => NR,
        Columns::Glu(_) => NR / 2,
    }
}
