//! One rewrite of a model file, from the checks to the save: what `scattermoe rewrite` runs and
//! what the Python package's `scattermoe.rewrite()` runs, so both check, refuse and write alike.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::checks;
use crate::onnx::{self, SaveOptions};
use crate::progress::Progress;
use crate::rewrite::{self, verify::VerifyReport, Report, Target};

/// What to rewrite, and how.
pub struct Request<'a> {
    pub input: &'a Path,
    pub output: &'a Path,
    /// replace OUTPUT (and OUTPUT.data) when they exist
    pub force: bool,
    /// run both models in ONNX Runtime and write nothing unless they match
    pub verify: bool,
    /// prove every candidate before it is written
    pub prove: bool,
    pub target: Target,
    /// token counts for `verify` (random inputs)
    pub lengths: &'a [usize],
    /// real inputs for `verify` (a NumPy .npz), in place of `lengths`
    pub inputs: Option<&'a Path>,
    /// write the model unchanged when no layer is replaced (else nothing is written)
    pub allow_none: bool,
    /// replace each layer's ONNX router by one TopKRouter node where it computes exactly that op
    pub fuse_router: bool,
}

/// What happened.
pub struct Outcome {
    pub report: Report,
    pub verify: Option<VerifyReport>,
    /// false only when no layer was replaced and `allow_none` was off
    pub written: bool,
}

/// Called as the rewrite goes: with the report before anything is written, with ONNX
/// Runtime's path and the comparison when `verify` ran.
pub trait Listener {
    fn report(&self, _: &Report) {}
    fn verify(&self, _ort: Option<&Path>, _: &VerifyReport) {}
}

/// Listens to nothing.
pub struct Quiet;
impl Listener for Quiet {}

/// Checks everything first (the arguments, the input, the destination, and for the proof and
/// `verify` that ONNX Runtime and the plugin load), then rewrites, verifies and saves.
pub fn rewrite_file(req: &Request, progress: &dyn Progress, listen: &dyn Listener) -> Result<Outcome> {
    let given = match req.inputs {
        Some(p) => Some(crate::npz::read(p)?),
        None => {
            if req.verify {
                checks::check_lengths(req.lengths)?;
            }
            None
        }
    };
    let mut model = onnx::load_with_progress(req.input, progress)?;
    onnx::output::check_output(req.output, req.force, &model.input_files())?;
    check_graph(&model, req.input)?;
    let source = req.inputs.map(|p| p.display().to_string()).unwrap_or_default();
    if let Some(arrays) = &given {
        rewrite::verify::check_given(&model.proto, arrays, &source)?;
    }
    let ort: Option<PathBuf> = checks::check_runtime(req.verify, req.prove)?;
    let original_proto = if req.verify { Some(model.proto.clone()) } else { None };
    let opts = rewrite::RewriteOptions { target: req.target, prove: req.prove, fuse_router: req.fuse_router };
    let report = rewrite::rewrite_with_progress(&mut model, &opts, progress)?;
    listen.report(&report);
    if report.layers.is_empty() && !req.allow_none {
        return Ok(Outcome { report, verify: None, written: false });
    }
    let feed = match given {
        Some(arrays) => rewrite::verify::Feed::Given { source, arrays },
        None => rewrite::verify::Feed::Random(req.lengths),
    };
    let verified = std::cell::RefCell::new(None);
    let check = |tmp: &Path| -> Result<()> {
        let proto = original_proto.as_ref().expect("kept for verify");
        let v = rewrite::verify::verify_with(req.input, proto, tmp, &feed, progress)?;
        listen.verify(ort.as_deref(), &v);
        let passed = v.passed();
        *verified.borrow_mut() = Some(v);
        if !passed {
            bail!("verification failed: nothing written");
        }
        Ok(())
    };
    let save = SaveOptions { force: req.force, ..Default::default() };
    onnx::save_with_progress(model, req.output, &save, if req.verify { Some(&check) } else { None }, progress)?;
    Ok(Outcome { report, verify: verified.into_inner(), written: true })
}

/// The checks of the graph every command runs before any work.
pub fn check_graph(model: &onnx::Model, input: &Path) -> Result<()> {
    if model.graph().output.is_empty() {
        bail!("{} has a graph with no outputs: nothing it computes can be kept, so it is not rewritten", input.display());
    }
    model.check_opset_compatible(crate::spec::DOMAIN, crate::spec::OPSET_VERSION)?;
    checks::check_contract_attributes(model.graph())
}
