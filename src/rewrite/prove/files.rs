//! The proof models on disk: a scratch directory (kept with `SCATTERMOE_KEEP_PROOF=1`), the
//! models' inputs and output, the initializers they read (external data linked or copied in), the
//! stacked tensors of the replacement written into one data file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{
    tensor_shape_proto, type_proto, GraphProto, Message, ModelProto, NodeProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

use super::shape::Shape;
use crate::onnx::graph::{node_inputs_with_subgraphs, GraphIndex};
use crate::onnx::tensor::{external_ref, is_external, ExternalStore};
use crate::onnx::PendingTensor;
use crate::spec;

/// A removed-on-drop scratch directory for the two proof models.
pub(super) struct Scratch(pub(super) PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        // SCATTERMOE_KEEP_PROOF=1 keeps the two models of every proof for inspection
        if std::env::var_os("SCATTERMOE_KEEP_PROOF").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("proof models kept in {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn scratch() -> Result<Scratch> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!("scattermoe-prove-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(Scratch(d))
}

pub(super) fn value_info(name: &str, elem: i32, shape: Option<&Shape>) -> ValueInfoProto {
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = elem;
    if let Some(s) = shape {
        let mut sp = TensorShapeProto::new();
        for d in s {
            let mut x = tensor_shape_proto::Dimension::new();
            if d.t == 0 {
                x.set_dim_value(d.c);
            } else {
                x.set_dim_param(if d.c == 1 { "T".to_string() } else { format!("T_{}", d.c) });
            }
            sp.dim.push(x);
        }
        tt.shape = Some(sp).into();
    }
    let mut t = TypeProto::new();
    t.value = Some(type_proto::Value::TensorType(tt));
    let mut vi = ValueInfoProto::new();
    vi.name = name.to_string();
    vi.type_ = Some(t).into();
    vi
}

/// Initializers the nodes read, as stored (external ones keep their location: the scratch
/// directory links or copies the model's data files).
pub(super) fn initializers_for<'a>(g: &GraphIndex<'a>, nodes: &[NodeProto]) -> Vec<&'a TensorProto> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in nodes {
        for v in node_inputs_with_subgraphs(n) {
            if let Some(t) = g.initializers.get(v) {
                if !g.graph_inputs.contains(v) && seen.insert(v.to_string()) {
                    out.push(*t);
                }
            }
        }
    }
    out
}

pub(super) fn link_external(dir: &Path, ext: &ExternalStore, inits: &[&TensorProto]) -> Result<()> {
    for t in inits.iter().filter(|t| is_external(t)) {
        let r = external_ref(t)?;
        let at = dir.join(&r.location);
        if at.exists() {
            continue;
        }
        if let Some(p) = at.parent() {
            std::fs::create_dir_all(p)?;
        }
        let src = std::fs::canonicalize(ext.base().join(&r.location)).with_context(|| format!("external data of '{}'", t.name))?;
        // ONNX Runtime resolves symbolic links and refuses data outside the model's directory: a
        // hard link (free on the same file system), else a copy
        if std::fs::hard_link(&src, &at).is_err() {
            std::fs::copy(&src, &at).with_context(|| format!("cannot copy {} into {}", src.display(), dir.display()))?;
        }
    }
    Ok(())
}

/// Writes the pending (stacked) tensors into one data file of the scratch directory.
pub(super) fn materialise(dir: &Path, ext: &ExternalStore, pending: &[PendingTensor]) -> Result<Vec<TensorProto>> {
    use std::io::Write;
    let name = "scattermoe_proof_stacked.data";
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(name))?);
    let mut offset = 0usize;
    let mut out = Vec::new();
    for p in pending {
        let mut len = 0usize;
        (p.produce)(ext, &mut |b: &[u8]| {
            len += b.len();
            f.write_all(b)?;
            Ok(())
        })?;
        if len != p.byte_len() {
            bail!("stacked tensor '{}' produced {len} bytes, expected {}", p.name, p.byte_len());
        }
        let mut t = TensorProto::new();
        t.name = p.name.clone();
        t.data_type = p.data_type;
        t.dims = p.dims.clone();
        t.data_location = DataLocation::EXTERNAL.into();
        for (k, v) in [("location", name.to_string()), ("offset", offset.to_string()), ("length", len.to_string())] {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v;
            t.external_data.push(e);
        }
        out.push(t);
        offset += len;
    }
    f.flush()?;
    Ok(out)
}

pub(super) struct Side {
    pub(super) path: PathBuf,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn write_side(
    dir: &Path,
    file: &str,
    base: &ModelProto,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: &[ValueInfoProto],
    output: ValueInfoProto,
    extra_opset: bool,
) -> Result<Side> {
    write_side_outputs(dir, file, base, nodes, inits, inputs, vec![output], extra_opset)
}

/// [`write_side`] for a model of several outputs (a router's weights and indices).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_side_outputs(
    dir: &Path,
    file: &str,
    base: &ModelProto,
    nodes: Vec<NodeProto>,
    mut inits: Vec<TensorProto>,
    inputs: &[ValueInfoProto],
    outputs: Vec<ValueInfoProto>,
    extra_opset: bool,
) -> Result<Side> {
    let mut m = ModelProto::new();
    m.ir_version = base.ir_version;
    m.opset_import = base.opset_import.clone();
    if extra_opset && !m.opset_import.iter().any(|o| o.domain == spec::DOMAIN) {
        let mut o = onnx_protobuf::OperatorSetIdProto::new();
        o.domain = spec::DOMAIN.into();
        o.version = spec::OPSET_VERSION;
        m.opset_import.push(o);
    }
    let mut g = GraphProto::new();
    g.name = "proof".into();
    g.node = nodes;
    g.initializer.append(&mut inits);
    g.input = inputs.to_vec();
    g.output = outputs;
    // zero-valued attributes (the op's `gated = 0`) written with their value, as `onnx::save` does:
    // ONNX Runtime refuses a custom-op attribute without one
    crate::onnx::io::write_zero_attribute_values(&mut g);
    m.graph = Some(g).into();
    let path = dir.join(file);
    std::fs::write(&path, m.write_to_bytes()?)?;
    Ok(Side { path })
}
