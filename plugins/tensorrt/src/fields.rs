//! Plugin names and fields: the creator's field list (one field per attribute of the contract), the
//! fields TensorRT's ONNX parser passes, and their decoding into the contract's attribute source.

use crate::bridge::{Field, Op};
use crate::codes::{field_type, field_type_name, field_type_size};
use scattermoe::onnx::proto::{attribute_proto::AttributeType, NodeProto};
use scattermoe::spec::{capacity_mask, parallel_linear, scatter_moe, AttrDefault, AttrDesc, AttrSource, Port, SpecError};

/// The plugin version (the op set version, "1") and namespace (the ONNX domain,
/// "ai.scattermoe"): the ones `scattermoe rewrite --target tensorrt` writes on each node.
pub use scattermoe::trt::{plugin_namespace, plugin_version};

impl Op {
    pub const ALL: [Op; 3] = [Op::ScatterMoE, Op::ParallelLinear, Op::CapacityMask];

    pub fn name(self) -> &'static str {
        match self {
            Op::ScatterMoE => scatter_moe::NAME,
            Op::ParallelLinear => parallel_linear::NAME,
            Op::CapacityMask => capacity_mask::NAME,
            _ => "?",
        }
    }

    pub fn attrs(self) -> &'static [AttrDesc] {
        match self {
            Op::ScatterMoE => &scatter_moe::ATTRS,
            Op::ParallelLinear => &parallel_linear::ATTRS,
            Op::CapacityMask => &capacity_mask::ATTRS,
            _ => &[],
        }
    }

    pub fn inputs(self) -> &'static [Port] {
        match self {
            Op::ScatterMoE => &scatter_moe::INPUTS,
            Op::ParallelLinear => &parallel_linear::INPUTS,
            Op::CapacityMask => &capacity_mask::INPUTS,
            _ => &[],
        }
    }

    pub fn outputs(self) -> &'static [Port] {
        match self {
            Op::ScatterMoE => &scatter_moe::OUTPUTS,
            Op::ParallelLinear => &parallel_linear::OUTPUTS,
            Op::CapacityMask => &capacity_mask::OUTPUTS,
            _ => &[],
        }
    }
}

/// The plugin name of `op`: the op's name, which is the ONNX node's op type.
pub fn plugin_name(op: Op) -> String {
    op.name().to_string()
}

/// The field type and length an attribute is written with (the ONNX parser's choice for an
/// attribute of that kind; a string's length counts its NUL).
pub(crate) fn field_kind(d: &AttrDefault) -> i32 {
    match d {
        AttrDefault::Int(_) => field_type::INT32,
        AttrDefault::Float(_) => field_type::FLOAT32,
        AttrDefault::Str(_) => field_type::CHAR,
        AttrDefault::Ints(_) => field_type::INT32,
    }
}

/// The fields a creator lists: one per attribute, with the type and length the parser passes it
/// with, no data.
pub fn field_names(op: Op) -> Vec<Field> {
    op.attrs()
        .iter()
        .map(|a| Field {
            name: a.name.to_string(),
            field_type: field_kind(&a.default),
            length: match a.default {
                AttrDefault::Str(s) => s.len() as i32 + 1,
                AttrDefault::Ints(v) => v.len() as i32,
                _ => 1,
            },
            data: Vec::new(),
        })
        .collect()
}

/// An attribute value, to write as a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f32),
    Str(String),
    Ints(Vec<i64>),
}

impl Value {
    /// The field TensorRT's ONNX parser would pass for an attribute with this value.
    pub fn field(&self, name: &str) -> Field {
        let (field_type, length, data) = match self {
            Value::Int(v) => (field_type::INT32, 1, (*v as i32).to_le_bytes().to_vec()),
            Value::Ints(v) => (field_type::INT32, v.len() as i32, v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect()),
            Value::Float(v) => (field_type::FLOAT32, 1, v.to_le_bytes().to_vec()),
            Value::Str(s) => {
                let mut b = s.as_bytes().to_vec();
                b.push(0);
                (field_type::CHAR, b.len() as i32, b)
            }
        };
        Field { name: name.to_string(), field_type, length, data }
    }
}

/// The fields TensorRT's ONNX parser passes to `createPlugin` for `node` (its `loadFields`): for
/// each field the creator lists, the node's attribute of that name, if any, as kINT32 (INT),
/// kFLOAT32 (FLOAT) or kCHAR with a terminating NUL (STRING). Other attributes (the parser's own
/// `plugin_version` / `plugin_namespace`) are not passed.
pub fn parser_fields(op: Op, node: &NodeProto) -> Vec<Field> {
    let mut out = Vec::new();
    for f in field_names(op) {
        let Some(a) = node.attribute.iter().find(|a| a.name == f.name) else { continue };
        let v = match a.type_.enum_value() {
            Ok(AttributeType::INT) => Value::Int(a.i),
            Ok(AttributeType::FLOAT) => Value::Float(a.f),
            Ok(AttributeType::STRING) => Value::Str(String::from_utf8_lossy(&a.s).into_owned()),
            Ok(AttributeType::INTS) => Value::Ints(a.ints.clone()),
            _ => continue,
        };
        out.push(v.field(&f.name));
    }
    out
}

/// Fields as an attribute source for the contract's parsers, after checking that every field
/// names an attribute of the op and has a type that attribute can be read from.
pub(crate) struct Fields<'a> {
    fields: &'a [Field],
}

pub(crate) fn decode_int(f: &Field) -> Option<i64> {
    let b = &f.data;
    Some(match f.field_type {
        field_type::INT8 => *b.first()? as i8 as i64,
        field_type::INT16 => i16::from_le_bytes(b.get(..2)?.try_into().ok()?) as i64,
        field_type::INT32 => i32::from_le_bytes(b.get(..4)?.try_into().ok()?) as i64,
        field_type::INT64 => i64::from_le_bytes(b.get(..8)?.try_into().ok()?),
        _ => return None,
    })
}

pub(crate) fn decode_float(f: &Field) -> Option<f32> {
    let b = &f.data;
    Some(match f.field_type {
        field_type::FLOAT16 => half::f16::from_le_bytes(b.get(..2)?.try_into().ok()?).to_f32(),
        field_type::BF16 => half::bf16::from_le_bytes(b.get(..2)?.try_into().ok()?).to_f32(),
        field_type::FLOAT32 => f32::from_le_bytes(b.get(..4)?.try_into().ok()?),
        field_type::FLOAT64 => f64::from_le_bytes(b.get(..8)?.try_into().ok()?) as f32,
        _ => return None,
    })
}

/// A list field of `length` integers (kINT32 or kINT64).
pub(crate) fn decode_ints(f: &Field) -> Option<Vec<i64>> {
    let n = usize::try_from(f.length).ok()?;
    let size = match f.field_type {
        field_type::INT32 => 4,
        field_type::INT64 => 8,
        _ => return None,
    };
    let b = f.data.get(..n * size)?;
    Some(
        b.chunks_exact(size)
            .map(|c| if size == 4 { i32::from_le_bytes(c.try_into().unwrap()) as i64 } else { i64::from_le_bytes(c.try_into().unwrap()) })
            .collect(),
    )
}

pub(crate) fn decode_str(f: &Field) -> Option<String> {
    if f.field_type != field_type::CHAR {
        return None;
    }
    let end = f.data.iter().position(|&c| c == 0).unwrap_or(f.data.len());
    String::from_utf8(f.data[..end].to_vec()).ok()
}

impl<'a> Fields<'a> {
    pub(crate) fn new(op: Op, fields: &'a [Field]) -> Result<Self, SpecError> {
        let name = op.name();
        let e = |message: String| SpecError { op: name, message };
        for f in fields {
            let Some(a) = op.attrs().iter().find(|a| a.name == f.name) else {
                let known: Vec<&str> = op.attrs().iter().map(|a| a.name).collect();
                return Err(e(format!("unknown plugin field '{}' (fields: {})", f.name, known.join(", "))));
            };
            let size = field_type_size(f.field_type);
            if f.length < 1 || (size > 0 && f.data.len() < size * f.length as usize) {
                return Err(e(format!("plugin field '{}' holds no value (length {}, {} bytes)", f.name, f.length, f.data.len())));
            }
            let (ok, want) = match a.default {
                AttrDefault::Int(_) => (decode_int(f).is_some() && f.length == 1, "one integer (kINT32 or kINT64)"),
                AttrDefault::Float(_) => (decode_float(f).is_some() && f.length == 1, "one float (kFLOAT32)"),
                AttrDefault::Str(_) => (decode_str(f).is_some(), "a string (kCHAR)"),
                AttrDefault::Ints(_) => (decode_ints(f).is_some(), "integers (kINT32 or kINT64)"),
            };
            if !ok {
                return Err(e(format!(
                    "plugin field '{}' must hold {want}, got {} of length {}",
                    f.name,
                    field_type_name(f.field_type),
                    f.length
                )));
            }
        }
        Ok(Fields { fields })
    }

    fn get(&self, name: &str) -> Option<&Field> {
        self.fields.iter().rev().find(|f| f.name == name)
    }
}

impl AttrSource for Fields<'_> {
    fn int(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(decode_int)
    }
    fn float(&self, name: &str) -> Option<f32> {
        self.get(name).and_then(decode_float)
    }
    fn string(&self, name: &str) -> Option<String> {
        self.get(name).and_then(decode_str)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).and_then(decode_ints)
    }
}
