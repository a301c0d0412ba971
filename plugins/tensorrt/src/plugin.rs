//! One plugin's state and every decision TensorRT asks a plugin for before it runs: output types
//! and shapes, the type and format rules, the checks of a build configuration and of new shapes,
//! the workspace size and the fields to serialise. Each is the contract's rule (`scattermoe::spec`)
//! or the device ops' size (`scattermoe::cuda::ops`) applied to TensorRT's descriptions.
//!
//! Optional inputs: TensorRT passes a plugin its inputs by position, and its ONNX parser cannot
//! pass an absent input in the middle; `scattermoe rewrite --target tensorrt` writes zero biases
//! where a later optional input (`capacity`) is present, so inputs keep the contract's positions.

use crate::bridge::{DimRef, Field, Op, OutputShape, Range, TensorDesc};
use crate::codes::{data_type, onnx_code, trt_elem};
use crate::fields::{Fields, Value};
use scattermoe::cuda::ops::{check_quantized_on_gpu, LinearCall, MaskCall, MoeCall, Runner};
use scattermoe::reference::{LinearSizes, MoeSizes};
use scattermoe::spec::{self, capacity_mask, parallel_linear, scatter_moe, AttrSource, Dim, ElemType, IndexType, PortType, SpecError};

/// An op's validated attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attrs {
    Moe(scatter_moe::Attrs),
    Linear(parallel_linear::Attrs),
    Mask(capacity_mask::Attrs),
}

impl Attrs {
    pub fn parse(op: Op, src: &dyn AttrSource) -> Result<Attrs, SpecError> {
        Ok(match op {
            Op::ScatterMoE => Attrs::Moe(scatter_moe::Attrs::parse(src)?),
            Op::ParallelLinear => Attrs::Linear(parallel_linear::Attrs::parse(src)?),
            _ => Attrs::Mask(capacity_mask::Attrs::parse(src)?),
        })
    }

    pub fn op(&self) -> Op {
        match self {
            Attrs::Moe(_) => Op::ScatterMoE,
            Attrs::Linear(_) => Op::ParallelLinear,
            Attrs::Mask(_) => Op::CapacityMask,
        }
    }

    /// The value of attribute `name` (one of the op's `ATTRS`).
    pub fn value(&self, name: &str) -> Option<Value> {
        use Value::*;
        Some(match self {
            Attrs::Moe(a) => match name {
                scatter_moe::ATTR_ACTIVATION => Str(a.activation.name().into()),
                scatter_moe::ATTR_GATED => Int(a.gated as i64),
                scatter_moe::ATTR_GLU_LAYOUT => Str(a.glu_layout.name().into()),
                scatter_moe::ATTR_ALPHA => Float(a.alpha),
                scatter_moe::ATTR_LIMIT => Float(a.limit),
                scatter_moe::ATTR_CAPACITY_ORDER => Str(a.capacity_order.name().into()),
                scatter_moe::ATTR_WEIGHT_BITS => Int(a.quant.weight_bits as i64),
                scatter_moe::ATTR_BLOCK_SIZE => Ints(a.quant.block_size?.iter().map(|&v| v as i64).collect()),
                _ => return None,
            },
            Attrs::Linear(a) => match name {
                parallel_linear::ATTR_GROUPED_IN => Int(a.grouped_in as i64),
                parallel_linear::ATTR_GROUPED_OUT => Int(a.grouped_out as i64),
                parallel_linear::ATTR_WEIGHT_BITS => Int(a.quant.weight_bits as i64),
                parallel_linear::ATTR_BLOCK_SIZE => Ints(a.quant.block_size?.iter().map(|&v| v as i64).collect()),
                _ => return None,
            },
            Attrs::Mask(a) => match name {
                capacity_mask::ATTR_NUM_EXPERTS => Int(a.num_experts as i64),
                capacity_mask::ATTR_CAPACITY_ORDER => Str(a.capacity_order.name().into()),
                _ => return None,
            },
        })
    }

    /// Every attribute of the op with its value, in `ATTRS` order; one without a default that the
    /// node does not give (`block_size`) is left out.
    pub fn values(&self) -> Vec<(&'static str, Value)> {
        self.op().attrs().iter().filter_map(|a| Some((a.name, self.value(a.name)?))).collect()
    }
}

/// One plugin object's state: the op's attributes and what it keeps between runs.
pub struct Plugin {
    attrs: Attrs,
    /// the device op's runner: the checks of bad routing indices (per plugin object: TensorRT
    /// clones one per execution context); their pinned memory is made on the first run
    runner: Runner,
    /// inputs of the last configuration (for messages)
    nb_inputs: usize,
}

/// A plugin from fields; an error names the op and the offending field.
pub fn create_plugin(op: Op, fields: &[Field]) -> Result<Box<Plugin>, SpecError> {
    let src = Fields::new(op, fields)?;
    let attrs = Attrs::parse(op, &src)?;
    Ok(Box::new(Plugin::new(attrs)))
}

fn known(d: &[i64]) -> Vec<Dim> {
    d.iter().map(|&v| (v >= 0).then_some(v as u64)).collect()
}

fn err(op: &'static str, message: impl Into<String>) -> SpecError {
    SpecError { op, message: message.into() }
}

impl Plugin {
    pub fn new(attrs: Attrs) -> Plugin {
        Plugin { attrs, runner: Runner::default(), nb_inputs: 0 }
    }

    pub fn attrs(&self) -> &Attrs {
        &self.attrs
    }

    pub fn clone_plugin(&self) -> Box<Plugin> {
        Box::new(Plugin { nb_inputs: self.nb_inputs, ..Plugin::new(self.attrs) })
    }

    pub fn op(&self) -> Op {
        self.attrs.op()
    }

    fn name(&self) -> &'static str {
        self.op().name()
    }

    pub fn nb_outputs(&self) -> i32 {
        self.op().outputs().len() as i32
    }

    /// The contract's check of one call: `types` TensorRT codes (None: not known), `shapes` with
    /// None for dimensions not known yet.
    fn check(&self, types: &[Option<i32>], shapes: &[Vec<Dim>]) -> Result<(), SpecError> {
        let types: Vec<Option<i32>> = types.iter().map(|t| t.map(onnx_code)).collect();
        let refs: Vec<Option<&[Dim]>> = shapes.iter().map(|s| Some(s.as_slice())).collect();
        // the contract, then what the device path refuses (a quantized weight with T = float32)
        match &self.attrs {
            Attrs::Moe(a) => {
                let (t, _, d) = scatter_moe::check(a, &types, &refs)?;
                check_quantized_on_gpu(scatter_moe::NAME, t, &[("w_in", d.w_in), ("w_out", d.w_out)])
            }
            Attrs::Linear(a) => {
                let (t, _, d) = parallel_linear::check(a, &types, &refs)?;
                check_quantized_on_gpu(parallel_linear::NAME, t, &[("W", d.w)])
            }
            Attrs::Mask(_) => capacity_mask::check(&types, &refs).map(drop),
        }
    }

    fn check_descs(&self, inputs: &[TensorDesc]) -> Result<(), SpecError> {
        let types: Vec<Option<i32>> = inputs.iter().map(|d| Some(d.data_type)).collect();
        let shapes: Vec<Vec<Dim>> = inputs.iter().map(|d| known(&d.dims)).collect();
        self.check(&types, &shapes)
    }

    fn check_outputs(&self, outputs: usize) -> Result<(), SpecError> {
        if outputs != self.op().outputs().len() {
            return Err(err(self.name(), format!("has {} output(s), got {outputs}", self.op().outputs().len())));
        }
        Ok(())
    }

    pub fn output_types(&self, input_types: &[i32]) -> Result<Vec<i32>, SpecError> {
        let op = self.name();
        let types: Vec<Option<i32>> = input_types.iter().map(|&t| Some(onnx_code(t))).collect();
        let ports = self.op().inputs();
        if input_types.len() > ports.len() {
            return Err(err(op, format!("expects at most {} inputs, got {}", ports.len(), input_types.len())));
        }
        let (t, _) = spec::check_types(op, ports, &types)?;
        Ok(self
            .op()
            .outputs()
            .iter()
            .map(|p| match p.ty {
                PortType::Bool => data_type::BOOL,
                PortType::Int64 => data_type::INT64,
                _ => trt_elem(t),
            })
            .collect())
    }

    pub fn output_shapes(&self, inputs: &[TensorDesc]) -> Result<Vec<OutputShape>, SpecError> {
        let shapes: Vec<Vec<Dim>> = inputs.iter().map(|d| known(&d.dims)).collect();
        self.check(&vec![None; inputs.len()], &shapes)?;
        let refs = |input: usize| -> Vec<DimRef> {
            (0..inputs[input].dims.len()).map(|a| DimRef { input: input as i32, axis: a as i32 }).collect()
        };
        let dims = match &self.attrs {
            Attrs::Moe(_) => scatter_moe::output_shape(&refs(scatter_moe::X)),
            Attrs::Linear(a) => {
                use parallel_linear::*;
                let has_gates = inputs.len() > GATES;
                let d_out = DimRef { input: W as i32, axis: 1 };
                output_shape(a, &refs(ROUTING_INDICES), d_out, has_gates, |_| DimRef { input: ROUTING_INDICES as i32, axis: -1 })
            }
            Attrs::Mask(_) => refs(capacity_mask::ROUTING_INDICES),
        };
        Ok(vec![OutputShape { dims }])
    }

    pub fn supports_format(&self, pos: i32, in_out: &[TensorDesc], nb_inputs: i32) -> bool {
        let (ins, outs) = (self.op().inputs(), self.op().outputs());
        let (pos, nb_inputs) = (pos as usize, nb_inputs as usize);
        if pos >= in_out.len() || nb_inputs > ins.len() {
            return false;
        }
        let port = |i: usize| if i < nb_inputs { ins.get(i) } else { outs.get(i - nb_inputs) };
        let Some(p) = port(pos) else { return false };
        let d = &in_out[pos];
        if !d.linear {
            return false;
        }
        let t = d.data_type;
        // T: the type of the first float input (X, always position 0 where there is one)
        let first = (0..pos).find(|&i| port(i).is_some_and(|q| q.ty == PortType::Float));
        let is_t = |t: i32| matches!(t, data_type::FLOAT | data_type::HALF | data_type::BF16) && first.is_none_or(|i| in_out[i].data_type == t);
        match p.ty {
            // every float input and output shares the type of the first one
            PortType::Float => is_t(t),
            // a weight in T, or quantized: fp8 e4m3fn, or uint8 (8-bit or packed 4-bit codes)
            // (the device op refuses a quantized weight with T = float32, by name)
            PortType::Weight => is_t(t) || matches!(t, data_type::FP8 | data_type::UINT8),
            // a quantized weight's scale: T or float32
            PortType::Scale => t == data_type::FLOAT || is_t(t),
            PortType::ZeroPoint => t == data_type::UINT8,
            PortType::Index => matches!(t, data_type::INT32 | data_type::INT64),
            PortType::Int64 => t == data_type::INT64,
            PortType::Bool => t == data_type::BOOL,
        }
    }

    pub fn configure(&mut self, inputs: &[Range], outputs: &[Range]) -> Result<(), SpecError> {
        let descs: Vec<TensorDesc> = inputs.iter().map(|r| r.desc.clone()).collect();
        self.check_descs(&descs)?;
        self.check_outputs(outputs.len())?;
        self.nb_inputs = inputs.len();
        Ok(())
    }

    pub fn on_shape_change(&mut self, inputs: &[TensorDesc], outputs: &[TensorDesc]) -> Result<(), SpecError> {
        self.check_descs(inputs)?;
        self.check_outputs(outputs.len())?;
        self.nb_inputs = inputs.len();
        Ok(())
    }

    pub fn workspace_size(&self, inputs: &[Range], _outputs: &[Range]) -> Result<usize, SpecError> {
        let op = self.name();
        let dim = |i: usize, axis: isize| -> usize {
            let Some(r) = inputs.get(i) else { return 0 };
            let n = r.max.len() as isize;
            let a = if axis < 0 { n + axis } else { axis };
            if a < 0 || a >= n {
                return 0;
            }
            r.max[a as usize].max(0) as usize
        };
        let leading = |i: usize| -> usize {
            inputs.get(i).map_or(0, |r| r.max.iter().take(r.max.len().saturating_sub(1)).map(|&v| v.max(0) as usize).product())
        };
        let elem = |i: usize| -> Result<ElemType, SpecError> {
            let t = inputs.get(i).map_or(-1, |r| r.desc.data_type);
            ElemType::from_onnx_code(onnx_code(t))
                .ok_or_else(|| err(op, format!("input {i} has element type {}", spec::onnx_type_name(onnx_code(t)))))
        };
        // The plan grows with every size: the largest shapes bound every run of the profile.
        Ok(match &self.attrs {
            Attrs::Moe(a) => {
                use scatter_moe::*;
                // f from w_in's rows (w_out's last dimension is ceil(f / 2) bytes when 4-bit)
                let n = dim(W_IN, 1);
                let s = MoeSizes {
                    tokens: leading(X).max(leading(ROUTING_INDICES)),
                    k: dim(ROUTING_INDICES, -1),
                    experts: dim(W_IN, 0),
                    d: dim(X, -1),
                    f: if a.gated { n / 2 } else { n },
                };
                // the workspace holds routing and T buffers only: the weights' format does not size it
                MoeCall { elem: elem(X)?, it: IndexType::I64, sizes: s, capacity: inputs.len() > CAPACITY, w_in: None, w_out: None }.workspace_bytes()
            }
            Attrs::Linear(_) => {
                use parallel_linear::*;
                let s = LinearSizes {
                    tokens: leading(ROUTING_INDICES),
                    k: dim(ROUTING_INDICES, -1),
                    experts: dim(W, 0),
                    d_in: dim(X, -1),
                    d_out: dim(W, 1),
                };
                LinearCall { elem: elem(X)?, it: IndexType::I64, sizes: s, gates: inputs.len() > GATES, w: None }.workspace_bytes()
            }
            Attrs::Mask(a) => {
                let ri = capacity_mask::ROUTING_INDICES;
                MaskCall { it: IndexType::I64, tokens: leading(ri), k: dim(ri, -1), experts: a.num_experts }.workspace_bytes()
            }
        })
    }

    pub fn fields_to_serialize(&self) -> Vec<Field> {
        self.attrs.values().iter().map(|(n, v)| v.field(n)).collect()
    }
}

mod enqueue;
