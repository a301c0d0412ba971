//! Quantized expert weights (docs/op-spec.md, "Quantized expert weights"): the formats a weight
//! input may be stored in, the attributes that describe them (`weight_bits`, `block_size`), and the
//! checks of one weight with its scale and zero point. `ScatterMoE` runs them for `w_in` and
//! `w_out`, `ParallelLinear` for `W`; what they find is a [`Quant`] per weight, in the op's `Dims`,
//! which every implementation reads instead of looking at element types itself.
//!
//! A weight `Q` of logical shape `[E, out, in]` holds codes `q`; with `s` and `z` the scale and
//! zero point of the block holding `(o, i)`, its value is `(q - z) * s`, computed in float32.

use super::{err, fmt_shape, onnx_type_name, AttrDefault, AttrDesc, AttrSource, Dim, ElemType, Shape, SpecError};

pub const ATTR_WEIGHT_BITS: &str = "weight_bits";
pub const ATTR_BLOCK_SIZE: &str = "block_size";

/// The attribute descriptors, appended to each op's own (`block_size` has no default: absent).
pub const ATTRS: [AttrDesc; 2] = [
    AttrDesc { name: ATTR_WEIGHT_BITS, default: AttrDefault::Int(QuantAttrs::DEFAULT.weight_bits as i64) },
    AttrDesc { name: ATTR_BLOCK_SIZE, default: AttrDefault::Ints(&[]) },
];

/// ONNX `TensorProto.DataType` of fp8 e4m3fn codes (FLOAT8E4M3FN).
pub const FLOAT8E4M3FN: i32 = 17;
/// ONNX `TensorProto.DataType` of 8-bit and packed 4-bit integer codes (UINT8).
pub const UINT8: i32 = 2;

/// How a quantized weight stores its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// float8e4m3fn: the code is the e4m3fn value (1 sign, 4 exponent bits of bias 7, 3 mantissa
    /// bits; no infinities, 0x7f and 0xff are NaN); no zero point.
    Fp8E4M3Fn,
    /// uint8 with `weight_bits = 8`: the code is the byte; zero point 128 unless given.
    Int8,
    /// uint8 with `weight_bits = 4`: two codes a byte along `in` (bits 0-3 the even index, bits
    /// 4-7 the odd one), rows of `ceil(in / 2)` bytes; zero point 8 unless given.
    Int4,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 3] = [QuantFormat::Fp8E4M3Fn, QuantFormat::Int8, QuantFormat::Int4];

    /// The format of a weight of ONNX element type `code`, or None for any other type (a weight
    /// in `T`, or an error). `weight_bits` tells uint8's two formats apart.
    pub const fn from_type(code: i32, weight_bits: u8) -> Option<Self> {
        match code {
            FLOAT8E4M3FN => Some(QuantFormat::Fp8E4M3Fn),
            UINT8 if weight_bits == 4 => Some(QuantFormat::Int4),
            UINT8 => Some(QuantFormat::Int8),
            _ => None,
        }
    }

    /// The ONNX element type of the stored weight.
    pub const fn onnx_code(self) -> i32 {
        match self {
            QuantFormat::Fp8E4M3Fn => FLOAT8E4M3FN,
            QuantFormat::Int8 | QuantFormat::Int4 => UINT8,
        }
    }

    /// Bits per code.
    pub const fn bits(self) -> u32 {
        match self {
            QuantFormat::Fp8E4M3Fn | QuantFormat::Int8 => 8,
            QuantFormat::Int4 => 4,
        }
    }

    /// The zero point of a block when the node gives no zero-point input; None for fp8, which
    /// takes none.
    pub const fn default_zero_point(self) -> Option<u8> {
        match self {
            QuantFormat::Fp8E4M3Fn => None,
            QuantFormat::Int8 => Some(128),
            QuantFormat::Int4 => Some(8),
        }
    }

    /// The stored length of a row of `in_` logical values (`ceil(in / 2)` bytes for 4-bit).
    pub const fn stored_in(self, in_: u64) -> u64 {
        match self {
            QuantFormat::Int4 => in_.div_ceil(2),
            _ => in_,
        }
    }

    /// How error messages name the format.
    pub const fn name(self) -> &'static str {
        match self {
            QuantFormat::Fp8E4M3Fn => "float8e4m3fn",
            QuantFormat::Int8 => "uint8 (weight_bits = 8)",
            QuantFormat::Int4 => "uint8 (weight_bits = 4)",
        }
    }
}

/// Which elements of one expert's `[out, in]` matrix share a scale (and zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleLayout {
    /// A rank-2 scale `[E, out]`: one per output channel (the block is `1 x in`).
    PerChannel,
    /// A rank-3 scale `[E, ceil(out / block_out), ceil(in / block_in)]`: blocks of
    /// `block_out x block_in` (`[1, g]` group-wise along `in`, `[128, 128]` 2-D blocks); the last
    /// block of a row or column may be partial.
    Blocks { block_out: u64, block_in: u64 },
}

/// A quantized weight, as the checks found it: everything an implementation needs to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quant {
    pub format: QuantFormat,
    pub layout: ScaleLayout,
    /// The scale's element type: `T` or float32.
    pub scale: ElemType,
    /// Whether the zero-point input is given (else [`QuantFormat::default_zero_point`]).
    pub zero_point: bool,
}

impl Quant {
    /// `(block_out, block_in)` for a matrix `in_` wide: a per-channel scale's block is `1 x in`.
    pub const fn block(&self, in_: u64) -> (u64, u64) {
        match self.layout {
            ScaleLayout::PerChannel => (1, if in_ == 0 { 1 } else { in_ }),
            ScaleLayout::Blocks { block_out, block_in } => (block_out, block_in),
        }
    }

    /// The scale's (and zero point's) shape for a weight of logical shape `[experts, out, in_]`.
    pub fn scale_shape(&self, experts: u64, out: u64, in_: u64) -> Vec<u64> {
        match self.layout {
            ScaleLayout::PerChannel => vec![experts, out],
            ScaleLayout::Blocks { block_out, block_in } => vec![experts, out.div_ceil(block_out), in_.div_ceil(block_in)],
        }
    }

    /// The stored shape of a weight of logical shape `[experts, out, in_]`.
    pub const fn stored_shape(&self, experts: u64, out: u64, in_: u64) -> [u64; 3] {
        [experts, out, self.format.stored_in(in_)]
    }
}

/// The attributes of a node's quantized weights (the same for every quantized weight of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantAttrs {
    /// 4 or 8: which format a uint8 weight is (read only for uint8 weights).
    pub weight_bits: u8,
    /// `[block_out, block_in]`, needed by a rank-3 scale.
    pub block_size: Option<[u64; 2]>,
}

impl Default for QuantAttrs {
    fn default() -> Self {
        QuantAttrs::DEFAULT
    }
}

impl QuantAttrs {
    pub const DEFAULT: QuantAttrs = QuantAttrs { weight_bits: 8, block_size: None };

    pub fn parse(op: &'static str, src: &dyn AttrSource) -> Result<Self, SpecError> {
        let weight_bits = match src.int(ATTR_WEIGHT_BITS) {
            None => QuantAttrs::DEFAULT.weight_bits,
            Some(b @ (4 | 8)) => b as u8,
            Some(b) => return err(op, format!("attribute '{ATTR_WEIGHT_BITS}' must be 4 or 8, got {b}")),
        };
        let block_size = match src.ints(ATTR_BLOCK_SIZE) {
            None => None,
            Some(v) => match v.as_slice() {
                &[o, i] if o >= 1 && i >= 1 => Some([o as u64, i as u64]),
                _ => return err(op, format!("attribute '{ATTR_BLOCK_SIZE}' must be two positive integers [block_out, block_in], got {v:?}")),
            },
        };
        Ok(QuantAttrs { weight_bits, block_size })
    }
}

/// One weight input of a node with its optional scale and zero point: their names, element
/// types (None: not known yet) and shapes (None: the input is absent).
pub(super) struct WeightPorts<'a> {
    pub name: &'static str,
    pub scale_name: &'static str,
    pub zero_name: &'static str,
    pub ty: Option<i32>,
    pub shape: &'a Shape,
    pub scale: Option<(Option<i32>, &'a Shape)>,
    pub zero: Option<(Option<i32>, &'a Shape)>,
}

impl WeightPorts<'_> {
    /// The weight's format as its element type tells (None: in `T`, or the type is not known).
    pub fn format(&self, attrs: &QuantAttrs) -> Option<QuantFormat> {
        self.ty.and_then(|t| QuantFormat::from_type(t, attrs.weight_bits))
    }

    /// Whether the stored last dimension may differ from the logical `in` (a 4-bit weight, or a
    /// weight of a type not known yet that comes with a scale).
    pub fn may_be_packed(&self, attrs: &QuantAttrs) -> bool {
        match self.ty {
            Some(_) => self.format(attrs) == Some(QuantFormat::Int4),
            None => self.scale.is_some() || self.zero.is_some(),
        }
    }
}

/// Checks the stored last dimension of a 4-bit weight against its logical `in_` (`in_name` is the
/// contract's name of that size, e.g. `d`).
pub(super) fn check_packed_in(op: &'static str, w: &WeightPorts, attrs: &QuantAttrs, in_name: &str, in_: Dim) -> Result<(), SpecError> {
    let (Some(QuantFormat::Int4), Some(in_), Some(stored)) = (w.format(attrs), in_, w.shape[2]) else { return Ok(()) };
    if stored != in_.div_ceil(2) {
        return err(
            op,
            format!(
                "input '{}' {} is 4-bit (weight_bits = 4): its last dimension must be ceil({in_name} / 2) = {} for {in_name} = {in_}, got {stored}",
                w.name,
                fmt_shape(w.shape),
                in_.div_ceil(2)
            ),
        );
    }
    Ok(())
}

/// Checks a weight's scale and zero point against its format and logical shape `[experts, out,
/// in_]` (named `out_name`, `in_name` in messages), for a node of float type `t`. Returns the
/// weight's [`Quant`] (None for a weight in `T`, or one whose type is not known yet).
#[allow(clippy::too_many_arguments)]
pub(super) fn check_weight(
    op: &'static str,
    attrs: &QuantAttrs,
    t: ElemType,
    w: &WeightPorts,
    experts: Dim,
    (out_name, out): (&str, Dim),
    (in_name, in_): (&str, Dim),
) -> Result<Option<Quant>, SpecError> {
    let Some(ty) = w.ty else {
        // Before run time a runtime may not know the types yet: the run-time check tells.
        return Ok(None);
    };
    let Some(format) = w.format(attrs) else {
        // A weight in T (check_types refused every other type).
        for (given, name) in [(w.scale.is_some(), w.scale_name), (w.zero.is_some(), w.zero_name)] {
            if given {
                return err(
                    op,
                    format!(
                        "input '{name}' is given but input '{}' is {}, not quantized (a scale or zero point goes with a float8e4m3fn or uint8 weight)",
                        w.name,
                        onnx_type_name(ty)
                    ),
                );
            }
        }
        return Ok(None);
    };
    let Some((scale_ty, scale)) = w.scale else {
        return err(op, format!("input '{}' is {} and needs input '{}'", w.name, onnx_type_name(ty), w.scale_name));
    };
    if w.zero.is_some() && format.default_zero_point().is_none() {
        return err(op, format!("input '{}' is given but input '{}' is {}, which has no zero point", w.zero_name, w.name, onnx_type_name(ty)));
    }
    let layout = match scale.len() {
        2 => ScaleLayout::PerChannel,
        3 => match attrs.block_size {
            Some([block_out, block_in]) => ScaleLayout::Blocks { block_out, block_in },
            None => {
                return err(op, format!("input '{}' has rank 3 (block scales) and needs attribute '{ATTR_BLOCK_SIZE}' = [block_out, block_in]", w.scale_name))
            }
        },
        _ => {
            return err(
                op,
                format!(
                    "input '{}' must have rank 2 ([E, {out_name}]: one scale per output channel) or 3 ([E, ceil({out_name} / block_out), \
                 ceil({in_name} / block_in)]: block scales), got shape {}",
                    w.scale_name,
                    fmt_shape(scale)
                ),
            )
        }
    };
    // The shape the scale must have, as far as the sizes are known.
    let want: Vec<Dim> = match layout {
        ScaleLayout::PerChannel => vec![experts, out],
        ScaleLayout::Blocks { block_out, block_in } => vec![experts, out.map(|o| o.div_ceil(block_out)), in_.map(|i| i.div_ceil(block_in))],
    };
    if scale.iter().zip(&want).any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if a != b)) {
        let (form, what) = match layout {
            ScaleLayout::PerChannel => (format!("[E, {out_name}]"), "one scale per output channel".to_string()),
            ScaleLayout::Blocks { block_out, block_in } => {
                (format!("[E, ceil({out_name} / {block_out}), ceil({in_name} / {block_in})]"), format!("block_size [{block_out}, {block_in}]"))
            }
        };
        return err(op, format!("input '{}' {} must be {form} = {} ({what})", w.scale_name, fmt_shape(scale), fmt_shape(&want)));
    }
    if let Some((_, z)) = w.zero {
        if z.len() != scale.len() || z.iter().zip(scale).any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if a != b)) {
            return err(op, format!("input '{}' {} must have the shape of '{}' {}", w.zero_name, fmt_shape(z), w.scale_name, fmt_shape(scale)));
        }
    }
    // check_types accepted the scale as T or float32; a type not known yet reads as T.
    let scale = scale_ty.and_then(ElemType::from_onnx_code).unwrap_or(t);
    Ok(Some(Quant { format, layout, scale, zero_point: w.zero.is_some() }))
}
