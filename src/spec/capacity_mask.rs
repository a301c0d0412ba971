//! `CapacityMask`: which assignments `ScatterMoE` keeps under a capacity, for models that treat
//! dropped tokens specially (Switch passes them through scaled by their router probability).

use super::values::read_enum;
use super::*;

pub const NAME: &str = "CapacityMask";

pub const ROUTING_INDICES: usize = 0;
pub const CAPACITY: usize = 1;
pub const INPUTS: [Port; 2] =
    [port("routing_indices", PortType::Index, false, 2), port("capacity", PortType::Int64, false, 0)];
/// bool, shape of `routing_indices`
pub const OUTPUTS: [Port; 1] = [port("kept", PortType::Bool, false, 2)];

pub const ATTR_NUM_EXPERTS: &str = "num_experts";
pub const ATTR_CAPACITY_ORDER: &str = scatter_moe::ATTR_CAPACITY_ORDER;
pub const ATTRS: [AttrDesc; 2] = [
    AttrDesc { name: ATTR_NUM_EXPERTS, default: AttrDefault::Int(0) },
    AttrDesc { name: ATTR_CAPACITY_ORDER, default: AttrDefault::Str(scatter_moe::Attrs::DEFAULT.capacity_order.name()) },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub num_experts: usize,
    pub capacity_order: CapacityOrder,
}

impl Attrs {
    pub fn parse(src: &dyn AttrSource) -> Result<Self, SpecError> {
        let num_experts = match src.int(ATTR_NUM_EXPERTS) {
            // Expert ids are int32 or int64 tensors held as u32 by the kernels: beyond
            // i32::MAX no index tensor could name them all.
            Some(e) if (1..=i32::MAX as i64).contains(&e) => e as usize,
            Some(e) => return err(NAME, format!("attribute 'num_experts' must be in [1, {}], got {e}", i32::MAX)),
            None => return err(NAME, "attribute 'num_experts' is required"),
        };
        let capacity_order = read_enum(NAME, src, ATTR_CAPACITY_ORDER, scatter_moe::Attrs::DEFAULT.capacity_order)?;
        Ok(Attrs { num_experts, capacity_order })
    }
}

/// Checks inputs; returns the index type.
pub fn check(types: InputTypes, shapes: &[Option<&Shape>]) -> Result<IndexType, SpecError> {
    let (_, it) = check_inputs(NAME, &INPUTS, types, shapes)?;
    let ri = shapes[ROUTING_INDICES].unwrap();
    check_min_rank(NAME, "routing_indices", ri, 2)?;
    check_positive(NAME, "routing_indices", ri, ri.len() - 1, "k (last dimension)")?;
    let c = shapes[CAPACITY].unwrap();
    let count = c.iter().try_fold(1u64, |acc, d| d.map(|v| acc * v));
    if c.len() > 1 || count.is_some_and(|n| n != 1) {
        return err(NAME, format!("input 'capacity' must be a scalar (shape []) or a 1-D tensor of one element (shape [1]), got shape {}", fmt_shape(c)));
    }
    Ok(it)
}

pub fn check_capacity(value: i64) -> Result<usize, SpecError> {
    if value < 0 {
        return err(NAME, format!("input 'capacity' must be >= 0, got {value}"));
    }
    Ok(value as usize)
}
