//! Loading and saving models: the protobuf itself in memory, external data memory-mapped on load
//! and streamed on save; the output appears only once it is complete (temp file + rename).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{Message, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto};

use super::output::{check_output, check_targets, input_files, TempDir};
use crate::progress::{Progress, Silent, Unit};

use super::tensor::{check_stored_size, elem_size, is_external, numel, tensor_bytes, ExternalStore};

/// Writes a tensor's bytes, in order, to the sink it is given.
pub type Producer = Box<dyn Fn(&ExternalStore, &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>>;

/// A tensor the rewrite adds, produced only while saving, piece by piece (so stacking the experts
/// of a large model holds one expert's rows in memory at a time).
pub struct PendingTensor {
    pub name: String,
    pub data_type: i32,
    pub dims: Vec<i64>,
    /// Writes the tensor's bytes, in order, to the sink (in as many pieces as it likes).
    pub produce: Producer,
}

impl PendingTensor {
    pub fn byte_len(&self) -> usize {
        elem_size(self.data_type).unwrap_or(1).saturating_mul(numel(&self.dims))
    }
}

/// A loaded model: the protobuf, the external data it refers to, and tensors to add on save.
pub struct Model {
    pub proto: ModelProto,
    pub ext: ExternalStore,
    pub pending: Vec<PendingTensor>,
    pub path: PathBuf,
}

impl Model {
    pub fn graph(&self) -> &onnx_protobuf::GraphProto {
        &self.proto.graph
    }

    /// Opset version imported for `domain` ("" or "ai.onnx" for the default domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let want = if domain == "ai.onnx" { "" } else { domain };
        self.proto.opset_import.iter().find(|o| o.domain == want || (want.is_empty() && o.domain == "ai.onnx")).map(|o| o.version)
    }

    /// Imports `domain` at `version`: added when absent; an import of another version is set to
    /// `version` (the nodes written need it, and ONNX allows one version per domain). Nodes of
    /// another version that were already in the model are refused up front by
    /// [`Model::check_opset_compatible`].
    pub fn ensure_opset(&mut self, domain: &str, version: i64) {
        self.proto.opset_import.retain(|o| o.domain != domain || o.version == version);
        if !self.proto.opset_import.iter().any(|o| o.domain == domain) {
            let mut o = OperatorSetIdProto::new();
            o.domain = domain.to_string();
            o.version = version;
            self.proto.opset_import.push(o);
        }
    }

    /// An error when the model imports `domain` at a version other than `version` and has nodes
    /// of that domain (they were written for another version: rewriting would relabel them).
    pub fn check_opset_compatible(&self, domain: &str, version: i64) -> Result<()> {
        let Some(other) = self.proto.opset_import.iter().find(|o| o.domain == domain && o.version != version) else {
            return Ok(());
        };
        let mut nodes = self.proto.graph.node.iter().filter(|n| n.domain == domain);
        if let Some(n) = nodes.next() {
            bail!(
                "{} imports {domain} version {} and has {domain} nodes ('{}'); this build knows version {version} only",
                self.path.display(),
                other.version,
                n.name
            );
        }
        Ok(())
    }

    /// The input model and every external-data file it reads.
    pub fn input_files(&self) -> Vec<PathBuf> {
        input_files(&self.path, &self.proto, self.ext.base())
    }

    pub fn has_external_data(&self) -> bool {
        self.proto.graph.initializer.iter().any(is_external)
    }
}

/// Reads a model. Corrupt, truncated or non-ONNX files give an error naming the file and the problem.
pub fn load(path: &Path) -> Result<Model> {
    load_with_progress(path, &Silent)
}

/// [`load`], reporting the bytes of the model file read (step "load"; the protobuf is parsed
/// and the external data checked once it is read).
pub fn load_with_progress(path: &Path, progress: &dyn Progress) -> Result<Model> {
    use std::io::Read;
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::with_capacity(meta.len().min(isize::MAX as u64) as usize);
    progress.begin("load", Some(meta.len()), Unit::Bytes);
    let mut chunk = vec![0u8; COPY_CHUNK];
    loop {
        let n = f.read(&mut chunk).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        progress.advance(n as u64);
    }
    progress.note("parsing");
    let model = load_bytes(&bytes, path);
    progress.end();
    model
}

/// Reads a model from its serialized `bytes`, as if loaded from `path` (whose folder holds its
/// external data). The whole loader minus the file read: what the fuzz targets drive.
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<Model> {
    if bytes.is_empty() {
        bail!("{} is empty, not an ONNX model", path.display());
    }
    let proto = ModelProto::parse_from_bytes(bytes).map_err(|e| {
        anyhow!("{} is not a valid ONNX model: the protobuf does not parse ({e}); the file is corrupt, truncated, or not ONNX", path.display())
    })?;
    if proto.ir_version <= 0 || proto.graph.is_none() || proto.opset_import.is_empty() {
        bail!(
            "{} is not an ONNX model: it parses as protobuf but has {} (corrupt, truncated, or another format)",
            path.display(),
            if proto.ir_version <= 0 { "no IR version" } else if proto.graph.is_none() { "no graph" } else { "no opset imports" }
        );
    }
    let opset = proto.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(1, |o| o.version);
    super::arity::check(&proto.graph, opset).with_context(|| format!("{}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
    let model = Model { proto, ext: ExternalStore::new(&base), pending: Vec::new(), path: path.to_path_buf() };
    // Check sizes and external data up front: an impossible shape, or a truncated, missing or
    // refused data file, is an error now, not mid-save.
    for t in &model.proto.graph.initializer {
        check_stored_size(t).with_context(|| format!("{}: initializer", path.display()))?;
        if is_external(t) {
            model.ext.bytes(t).with_context(|| format!("{}: external data", path.display()))?;
        }
    }
    for n in model.proto.graph.node.iter().filter(|n| n.op_type == "Constant" && (n.domain.is_empty() || n.domain == "ai.onnx")) {
        for t in n.attribute.iter().filter_map(|a| a.t.as_ref()) {
            check_stored_size(t).with_context(|| format!("{}: node '{}' (Constant)", path.display(), n.name))?;
        }
    }
    Ok(model)
}

/// How to save.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Replace an existing output file.
    pub force: bool,
    /// Write every initializer of at least this many bytes to external data. `None`: external
    /// data exactly when the input had some or the model would exceed protobuf's 2 GiB.
    pub external_threshold: Option<usize>,
}

const ALIGN: u64 = 4096;
const COPY_CHUNK: usize = 16 << 20;
const INLINE_LIMIT: usize = 1 << 30;

/// Writes `model` to `out` (and `out`'s external data file `<name>.data` when needed). Nothing
/// appears at `out` unless the whole save succeeds.
pub fn save(model: Model, out: &Path, opts: &SaveOptions) -> Result<()> {
    save_checked(model, out, opts, None)
}

/// A check run on the finished model (at a temporary path in the destination directory, its
/// external data beside it) before it is moved to `out`; an error leaves no output.
pub type PreCommit<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// [`save`], with a check before the output is committed.
pub fn save_checked(model: Model, out: &Path, opts: &SaveOptions, check: Option<PreCommit>) -> Result<()> {
    save_with_progress(model, out, opts, check, &Silent)
}

/// [`save_checked`], reporting the bytes of weights written (step "save").
pub fn save_with_progress(mut model: Model, out: &Path, opts: &SaveOptions, check: Option<PreCommit>, progress: &dyn Progress) -> Result<()> {
    // Every check of the destination first (again, for library callers; the CLI ran them before
    // the rewrite): nothing is written unless all pass.
    let inputs = model.input_files();
    let paths = check_output(out, opts.force, &inputs)?;
    let (out_name, data_name, data_final) = (paths.name.clone(), paths.data_name.clone(), paths.data());
    let tmp = TempDir::create(paths.temp_dir())?;
    let tmp = (tmp.path().to_path_buf(), tmp);
    let data_tmp = tmp.0.join(&data_name);
    let onnx_tmp = tmp.0.join(&out_name);
    let pending_total = model.pending.iter().try_fold(0usize, |a, p| a.checked_add(p.byte_len()));
    if pending_total.is_none_or(|b| b > isize::MAX as usize) {
        bail!("the tensors to add have more bytes than can be addressed");
    }

    let pending_bytes: usize = model.pending.iter().map(PendingTensor::byte_len).sum();
    let inline_bytes: usize = model.proto.graph.initializer.iter().filter(|t| !is_external(t)).map(|t| t.raw_data.len()).sum();
    let threshold = match opts.external_threshold {
        Some(t) => Some(t),
        None if model.has_external_data() || pending_bytes + inline_bytes > INLINE_LIMIT => Some(1024),
        None => None,
    };

    let mut writer: Option<(BufWriter<File>, u64)> = None;
    if threshold.is_some() {
        let f = File::create(&data_tmp).with_context(|| format!("cannot create {}", data_tmp.display()))?;
        writer = Some((BufWriter::with_capacity(1 << 20, f), 0));
    }
    let has_data = writer.is_some();

    fn write_ext(w: &mut (BufWriter<File>, u64), t: &mut TensorProto, bytes: &[u8], location: &str, ext: Option<&ExternalStore>) -> Result<()> {
        let pad = (ALIGN - w.1 % ALIGN) % ALIGN;
        if pad > 0 && bytes.len() as u64 >= ALIGN {
            w.0.write_all(&vec![0u8; pad as usize])?;
            w.1 += pad;
        }
        let offset = w.1;
        // in chunks, releasing each from memory once written (when it is memory-mapped input)
        for chunk in bytes.chunks(COPY_CHUNK) {
            w.0.write_all(chunk)?;
            if let Some(ext) = ext {
                ext.release(chunk);
            }
        }
        w.1 += bytes.len() as u64;
        t.raw_data.clear();
        t.float_data.clear();
        t.int32_data.clear();
        t.int64_data.clear();
        t.double_data.clear();
        t.uint64_data.clear();
        t.data_location = DataLocation::EXTERNAL.into();
        t.external_data.clear();
        for (k, v) in [("location", location.to_string()), ("offset", offset.to_string()), ("length", bytes.len().to_string())] {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v;
            t.external_data.push(e);
        }
        Ok(())
    }

    // Progress: bytes of weights written so far.
    let ext = &model.ext;
    let total_bytes: usize = model
        .proto
        .graph
        .initializer
        .iter()
        .map(|t| if is_external(t) { ext.bytes(t).map(|b| b.len()).unwrap_or(0) } else { t.raw_data.len() })
        .sum::<usize>()
        + pending_bytes;
    progress.begin("save", Some(total_bytes as u64), Unit::Bytes);
    let show = |n: usize| progress.advance(n as u64);

    // Existing initializers: external ones are copied from the memory map, large inline ones move out.
    for t in model.proto.graph.mut_or_insert_default().initializer.iter_mut() {
        let external = is_external(t);
        let size = if external { ext.bytes(t)?.len() } else { t.raw_data.len() };
        show(size);
        match (&mut writer, threshold) {
            (Some(w), Some(th)) if external || size >= th => {
                if external {
                    let bytes: &[u8] = ext.bytes(t)?;
                    write_ext(w, t, bytes, &data_name, Some(ext)).with_context(|| format!("writing {}", data_final.display()))?;
                } else {
                    let bytes = std::mem::take(&mut t.raw_data);
                    let bytes = if bytes.is_empty() { tensor_bytes(t, None)?.into_owned() } else { bytes };
                    write_ext(w, t, &bytes, &data_name, None).with_context(|| format!("writing {}", data_final.display()))?;
                }
            }
            _ if external => {
                let bytes = ext.bytes(t)?.to_vec();
                t.data_location = DataLocation::DEFAULT.into();
                t.external_data.clear();
                t.raw_data = bytes;
            }
            _ => {}
        }
    }
    // New tensors, produced one at a time.
    let pending = std::mem::take(&mut model.pending);
    for p in pending {
        let mut t = TensorProto::new();
        t.name = p.name.clone();
        t.data_type = p.data_type;
        t.dims = p.dims.clone();
        let want = p.byte_len();
        let mut written = 0usize;
        match (&mut writer, threshold) {
            (Some(w), Some(th)) if want >= th => {
                // streamed straight into the data file: one piece (one expert's rows) at a time
                let pad = (ALIGN - w.1 % ALIGN) % ALIGN;
                if pad > 0 && want as u64 >= ALIGN {
                    w.0.write_all(&vec![0u8; pad as usize])?;
                    w.1 += pad;
                }
                let offset = w.1;
                let file = &mut w.0;
                (p.produce)(ext, &mut |b: &[u8]| {
                    file.write_all(b)?;
                    written += b.len();
                    show(b.len());
                    Ok(())
                })
                .with_context(|| format!("building tensor '{}'", p.name))?;
                w.1 += written as u64;
                t.data_location = DataLocation::EXTERNAL.into();
                for (k, v) in [("location", data_name.clone()), ("offset", offset.to_string()), ("length", written.to_string())] {
                    let mut e = StringStringEntryProto::new();
                    e.key = k.into();
                    e.value = v;
                    t.external_data.push(e);
                }
            }
            _ => {
                let mut buf = Vec::with_capacity(want);
                (p.produce)(ext, &mut |b: &[u8]| {
                    buf.extend_from_slice(b);
                    show(b.len());
                    Ok(())
                })
                .with_context(|| format!("building tensor '{}'", p.name))?;
                written = buf.len();
                t.raw_data = buf;
            }
        }
        if written != want {
            bail!("internal error: tensor '{}' produced {written} bytes, expected {want}", p.name);
        }
        model.proto.graph.mut_or_insert_default().initializer.push(t);
    }
    if let Some((mut w, _)) = writer {
        w.flush()?;
        w.get_ref().sync_all().ok();
    }

    {
        let f = File::create(&onnx_tmp).with_context(|| format!("cannot create {}", onnx_tmp.display()))?;
        let mut w = BufWriter::new(f);
        if let Some(g) = model.proto.graph.as_mut() {
            write_zero_attribute_values(g);
        }
        model.proto.write_to_writer(&mut w).map_err(|e| anyhow!("cannot serialise the model: {e}"))?;
        w.flush()?;
    }
    progress.end();
    if let Some(check) = check {
        check(&onnx_tmp)?;
    }
    // Re-checked at commit: the destination may have changed while the model was written.
    check_targets(out, opts.force, &inputs)?;
    if has_data {
        fs::rename(&data_tmp, &data_final).with_context(|| format!("cannot move {} to {}", data_tmp.display(), data_final.display()))?;
    }
    fs::rename(&onnx_tmp, out).with_context(|| format!("cannot move {} to {}", onnx_tmp.display(), out.display()))?;
    drop(tmp.1);
    Ok(())
}

/// ONNX's schema is proto2: an attribute's value field is either present or absent, and ONNX
/// Runtime reads an int attribute whose `i` is absent as having no value (its custom-op attribute
/// API refuses it, so a node with `gated = 0` would not load). The generated types follow proto3
/// rules and skip zero scalars when writing, so zero values of int, float and string attributes are
/// written explicitly, as the unknown field with the value's field number (`f` = 2, `i` = 3, `s` = 4).
pub(crate) fn write_zero_attribute_values(g: &mut onnx_protobuf::GraphProto) {
    use onnx_protobuf::attribute_proto::AttributeType;
    for n in &mut g.node {
        for a in &mut n.attribute {
            let ty = a.type_.enum_value_or_default();
            let (f, i, s_empty) = (a.f, a.i, a.s.is_empty());
            let u = a.special_fields.mut_unknown_fields();
            match ty {
                AttributeType::INT if i == 0 && u.get(3).is_none() => u.add_varint(3, 0),
                AttributeType::FLOAT if f == 0.0 && u.get(2).is_none() => u.add_fixed32(2, f.to_bits()),
                AttributeType::STRING if s_empty && u.get(4).is_none() => u.add_length_delimited(4, Vec::new()),
                _ => {}
            }
            if let Some(sub) = a.g.as_mut() {
                write_zero_attribute_values(sub);
            }
            for sub in &mut a.graphs {
                write_zero_attribute_values(sub);
            }
        }
    }
}
