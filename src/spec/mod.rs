//! The op contract: the one place that says what the scattered ops are.
//!
//! Domain, version, op names, inputs, outputs, attributes (names, defaults, allowed values),
//! element types, shape rules and every error message live here. The rewriter's emitter, the CPU
//! reference, the ONNX Runtime kernels and the TensorRT plugin read this module; none of them
//! re-declares an attribute name or a shape rule. `docs/op-spec.md` is its human-readable twin:
//! change both together.
//!
//! This file holds what the ops share: domain and version, element types, errors, ports, attribute
//! sources and the checks every op starts with. Each op's inputs, attributes and shape rules are in
//! its own file; the allowed values of string attributes are in [`values`], one table each.

use std::fmt;

pub mod capacity_mask;
pub mod parallel_linear;
pub mod quant;
pub mod scatter_moe;
pub mod topk_router;
mod values;

pub use quant::{Quant, QuantAttrs, QuantFormat, ScaleLayout};
pub use values::{Activation, AllowedValue, CapacityOrder, GluLayout, GroupScore, Scoring, TieBreak, WeightsFrom};

/// ONNX domain of every op in this crate.
pub const DOMAIN: &str = "ai.scattermoe";
/// Opset version of [`DOMAIN`] that this crate implements.
pub const OPSET_VERSION: i64 = 1;

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

/// Declares an element type set from its table: a row per type gives the variant, its
/// `TensorProto.DataType` code, its size in bytes and its name. `ALL`, the conversions and the
/// "supported: ..." lists of error messages all come from the table.
macro_rules! element_types {
    (
        $(#[$meta:meta])*
        pub enum $ty:ident { $( $variant:ident = ($code:literal, $bytes:literal, $name:literal), )+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $ty { $( $variant, )+ }

        impl $ty {
            pub const ALL: [$ty; [$($ty::$variant),+].len()] = [$($ty::$variant),+];
            /// The names, in table order, as error messages list them.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// `TensorProto.DataType` code.
            pub const fn onnx_code(self) -> i32 {
                match self { $( $ty::$variant => $code, )+ }
            }

            pub fn from_onnx_code(code: i32) -> Option<Self> {
                Self::ALL.into_iter().find(|t| t.onnx_code() == code)
            }

            pub const fn size_bytes(self) -> usize {
                match self { $( $ty::$variant => $bytes, )+ }
            }

            pub const fn name(self) -> &'static str {
                match self { $( $ty::$variant => $name, )+ }
            }
        }
    };
}

element_types! {
    /// Floating element type of activations, weights, biases and routing weights (`T`).
    pub enum ElemType {
        F32 = (1, 4, "float32"),
        F16 = (10, 2, "float16"),
        BF16 = (16, 2, "bfloat16"),
    }
}

element_types! {
    /// Integer element type of routing indices (`I`).
    pub enum IndexType {
        I32 = (6, 4, "int32"),
        I64 = (7, 8, "int64"),
    }
}

/// Name of any ONNX element type code, for error messages.
pub fn onnx_type_name(code: i32) -> &'static str {
    match code {
        0 => "undefined",
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        16 => "bfloat16",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        _ => "an unsupported type",
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A violation of the contract, naming the op and the problem. Its `Display` is the message users
/// see, from ONNX Runtime, TensorRT or the rewriter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub op: &'static str,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.message)
    }
}

impl std::error::Error for SpecError {}

fn err<T>(op: &'static str, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError { op, message: message.into() })
}

// ---------------------------------------------------------------------------------------------
// Inputs and outputs
// ---------------------------------------------------------------------------------------------

/// What an input or output accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortType {
    /// The op's float type `T`.
    Float,
    /// An expert weight: `T`, or quantized (float8e4m3fn, uint8; see [`quant`]).
    Weight,
    /// `T` or float32: a quantized weight's scale, the router's selection bias.
    Scale,
    /// A quantized weight's zero point: uint8.
    ZeroPoint,
    /// Routing indices `I` (int32 or int64).
    Index,
    /// Always int64.
    Int64,
    /// Always bool (outputs only).
    Bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    pub ty: PortType,
    pub optional: bool,
    /// The smallest rank the input may have (0 for scalars).
    pub min_rank: usize,
}

const fn port(name: &'static str, ty: PortType, optional: bool, min_rank: usize) -> Port {
    Port { name, ty, optional, min_rank }
}

/// Before run time a runtime may report an input whose shape it does not know as rank 0 (ONNX
/// Runtime before 1.24 does, at kernel creation). Where the contract needs rank >= 1, such a shape
/// means "unknown": it becomes `min_rank` symbolic dimensions, so only what is known is checked
/// then, and everything at run time.
pub fn unknown_ranks_as_symbolic(ports: &[Port], shapes: &mut [Option<Vec<Dim>>]) {
    for (p, s) in ports.iter().zip(shapes.iter_mut()) {
        if let Some(s) = s {
            if s.is_empty() && p.min_rank > 0 {
                *s = vec![None; p.min_rank];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------------------------

/// Where attribute values come from (an ONNX node, ORT's kernel info, TensorRT plugin fields).
/// `None` means the attribute is absent, so its default applies.
pub trait AttrSource {
    fn int(&self, name: &str) -> Option<i64>;
    fn float(&self, name: &str) -> Option<f32>;
    fn string(&self, name: &str) -> Option<String>;
    /// A list of ints (`block_size`).
    fn ints(&self, name: &str) -> Option<Vec<i64>>;
}

/// An attribute's name, type and default, for emitters and plugin fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttrDefault {
    Int(i64),
    Float(f32),
    Str(&'static str),
    /// A list of ints; an empty default means the attribute is absent unless given.
    Ints(&'static [i64]),
}

#[derive(Debug, Clone, Copy)]
pub struct AttrDesc {
    pub name: &'static str,
    pub default: AttrDefault,
}

fn read_bool(op: &'static str, src: &dyn AttrSource, name: &str, default: bool) -> Result<bool, SpecError> {
    match src.int(name) {
        None => Ok(default),
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(v) => err(op, format!("attribute '{name}' must be 0 or 1, got {v}")),
    }
}


// ---------------------------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------------------------

/// One dimension: known, or symbolic (only at session creation / engine build time).
pub type Dim = Option<u64>;

/// A shape whose dimensions may be symbolic. At run time every dimension is known.
pub type Shape = [Dim];

fn fmt_shape(s: &Shape) -> String {
    let parts: Vec<String> = s.iter().map(|d| d.map_or_else(|| "?".to_string(), |v| v.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

/// Product of leading dimensions (all but the last), or None if one is symbolic.
fn leading_product(s: &Shape) -> Dim {
    s[..s.len() - 1].iter().try_fold(1u64, |acc, d| d.map(|v| acc * v))
}

/// Checks that two dims agree when both are known; returns the known one.
fn unify(op: &'static str, a: Dim, b: Dim, what: impl FnOnce() -> String) -> Result<Dim, SpecError> {
    match (a, b) {
        (Some(x), Some(y)) if x != y => err(op, what()),
        (Some(x), _) | (_, Some(x)) => Ok(Some(x)),
        _ => Ok(None),
    }
}

fn check_rank(op: &'static str, input: &str, s: &Shape, rank: usize) -> Result<(), SpecError> {
    if s.len() != rank {
        return err(op, format!("input '{input}' must have rank {rank}, got shape {}", fmt_shape(s)));
    }
    Ok(())
}

fn check_min_rank(op: &'static str, input: &str, s: &Shape, rank: usize) -> Result<(), SpecError> {
    if s.len() < rank {
        return err(op, format!("input '{input}' must have rank >= {rank}, got shape {}", fmt_shape(s)));
    }
    Ok(())
}

fn check_positive(op: &'static str, input: &str, s: &Shape, axis: usize, what: &str) -> Result<(), SpecError> {
    if s[axis] == Some(0) {
        return err(op, format!("input '{input}' has {what} = 0 (shape {}); it must be at least 1", fmt_shape(s)));
    }
    Ok(())
}

/// The element types a node's inputs were given, by position (`None`: the input is absent).
pub type InputTypes<'a> = &'a [Option<i32>];

/// Checks every present input's element type against the ports: all `Float` ports, and `Weight`
/// ports in `T`, must share one of f32/f16/bf16; a `Weight` may instead be quantized
/// (float8e4m3fn or uint8, see [`quant`]); `Scale` ports are `T` or float32, `ZeroPoint` ports
/// uint8, `Index` ports int32/int64, `Int64` ports int64. Returns (T, I).
pub fn check_types(op: &'static str, ports: &[Port], types: InputTypes) -> Result<(ElemType, IndexType), SpecError> {
    let mut t: Option<(ElemType, &str)> = None;
    let mut i: Option<IndexType> = None;
    for (p, ty) in ports.iter().zip(types.iter()) {
        let Some(code) = *ty else { continue };
        match p.ty {
            PortType::Float | PortType::Weight => {
                let Some(et) = ElemType::from_onnx_code(code) else {
                    if p.ty == PortType::Weight {
                        if QuantFormat::from_type(code, 8).is_some() {
                            continue;
                        }
                        return err(op, format!(
                            "input '{}' has element type {}; supported: {} (T), {}, {} (quantized)",
                            p.name, onnx_type_name(code), ElemType::NAMES.join(", "), onnx_type_name(quant::FLOAT8E4M3FN), onnx_type_name(quant::UINT8)
                        ));
                    }
                    return err(op, format!(
                        "input '{}' has element type {}; supported: {}",
                        p.name, onnx_type_name(code), ElemType::NAMES.join(", ")
                    ));
                };
                match t {
                    None => t = Some((et, p.name)),
                    Some((t0, n0)) if t0 != et => {
                        return err(op, format!(
                            "input '{}' is {} but input '{n0}' is {}; all float inputs must share one element type",
                            p.name, et.name(), t0.name()
                        ))
                    }
                    _ => {}
                }
            }
            // checked against T below, once T is known
            PortType::Scale => {}
            PortType::ZeroPoint => {
                if code != quant::UINT8 {
                    return err(op, format!("input '{}' has element type {}; it must be uint8", p.name, onnx_type_name(code)));
                }
            }
            PortType::Index => match IndexType::from_onnx_code(code) {
                Some(it) => i = Some(it),
                None => {
                    return err(op, format!(
                        "input '{}' has element type {}; supported: {}",
                        p.name, onnx_type_name(code), IndexType::NAMES.join(", ")
                    ))
                }
            },
            PortType::Bool => {
                if code != 9 {
                    return err(op, format!("input '{}' has element type {}; it must be bool", p.name, onnx_type_name(code)));
                }
            }
            PortType::Int64 => {
                if code != 7 {
                    return err(op, format!("input '{}' has element type {}; it must be int64", p.name, onnx_type_name(code)));
                }
            }
        }
    }
    for (p, ty) in ports.iter().zip(types.iter()) {
        let (PortType::Scale, Some(code)) = (p.ty, *ty) else { continue };
        let ok = match (ElemType::from_onnx_code(code), t) {
            (Some(ElemType::F32), _) => true,
            (Some(s), Some((t0, _))) => s == t0,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !ok {
            let t_name = t.map_or_else(String::new, |(t0, n0)| format!(" ({}, the type of '{n0}')", t0.name()));
            let what = if p.name.ends_with("scale") { "a scale" } else { "it" };
            return err(op, format!("input '{}' has element type {}; {what} must be float32 or T{t_name}", p.name, onnx_type_name(code)));
        }
    }
    let t = t.map(|x| x.0).unwrap_or(ElemType::F32);
    Ok((t, i.unwrap_or(IndexType::I64)))
}

fn check_arity(op: &'static str, ports: &[Port], given: usize) -> Result<(), SpecError> {
    let required = ports.iter().filter(|p| !p.optional).count();
    if given < required || given > ports.len() {
        return err(op, format!("expects {required} to {} inputs, got {given}", ports.len()));
    }
    Ok(())
}

/// What every op's check starts with: the number of inputs, the required ones present
/// (`shapes[i]` is None for an absent input), and their element types (see [`check_types`]).
fn check_inputs(op: &'static str, ports: &[Port], types: InputTypes, shapes: &[Option<&Shape>]) -> Result<(ElemType, IndexType), SpecError> {
    check_arity(op, ports, shapes.len())?;
    for (p, shape) in ports.iter().zip(shapes) {
        if !p.optional && shape.is_none() {
            return err(op, format!("input '{}' is required", p.name));
        }
    }
    check_types(op, ports, types)
}

/// Which of the routing index checks failed, for [`index_out_of_range`].
pub fn index_out_of_range(op: &'static str, input: &str, value: i64, token: usize, slot: usize, experts: usize) -> SpecError {
    SpecError {
        op,
        message: format!(
            "input '{input}' holds {value} at [{token}, {slot}], outside [0, {experts}) (the number of experts)"
        ),
    }
}

#[cfg(test)]
mod quant_tests;
#[cfg(test)]
mod tests;
