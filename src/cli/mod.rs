//! The `scattermoe` command line: `rewrite`, `inspect` and `quantize`. It lives in the library so that the
//! binary (src/bin/scattermoe.rs) and the Python package's console script run the same code.
//!
//! Exit status: 0 done; 1 error (nothing written); 2 bad arguments; 3 no MoE layer replaced
//! (nothing written; `--allow-none` accepts it); 130 interrupted (nothing written).

mod bars;
pub mod checks;
pub mod file;
pub mod quantize;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::onnx;
use crate::rewrite;
use bars::Bars;

/// Exit status when no MoE layer was replaced (none found, or every candidate left as is).
pub const EXIT_NO_MOE: u8 = 3;
/// Exit status of an error: nothing was written.
pub const EXIT_ERROR: u8 = 1;

/// What every help page ends with.
const AFTER_HELP: &str = "Exit status: 0 done; 1 error (nothing written); 2 bad arguments; 3 no MoE layer replaced \
(nothing written; --allow-none accepts it); 130 interrupted (nothing written).
ONNX Runtime (for the proof and --verify) is taken from ORT_DYLIB_PATH, else from the onnxruntime package of the \
active python3, else from the project's .venv; the op library from SCATTERMOE_ORT_LIB, else beside this program.";

#[derive(Parser)]
#[command(name = "scattermoe", version, about = "ScatterMoE for ONNX models", after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replace every recognised Mixture-of-Experts subgraph with one ai.scattermoe::ScatterMoE node.
    #[command(after_help = AFTER_HELP)]
    Rewrite(RewriteArgs),
    /// List every MoE candidate of a model (family, E, k, d, f, dtype) and whether `rewrite` would
    /// replace it, or why not; writes nothing.
    #[command(after_help = AFTER_HELP)]
    Inspect(InspectArgs),
    /// Quantize the expert weights of every ScatterMoE and ParallelLinear node (of a rewritten
    /// model): fp8 e4m3fn, 8-bit or 4-bit integers with float32 scales (docs/quantize.md), and
    /// report each node's error on random inputs, run through the CPU op.
    #[command(after_help = QUANTIZE_AFTER_HELP)]
    Quantize(QuantizeArgs),
}

const QUANTIZE_AFTER_HELP: &str = "Exit status: 0 done; 1 error (nothing written); 2 bad arguments; 130 interrupted \
(nothing written).
Defaults: --fp8 and --int8 one scale per output channel, --int4 groups of 128 along the input; integer formats \
take zero points (asymmetric ranges) unless --symmetric. Rounding is to nearest even, saturating.";

#[derive(Args)]
#[command(group(ArgGroup::new("format").required(true).args(["fp8", "int4", "int8"])))]
struct QuantizeArgs {
    /// input model (its ScatterMoE and ParallelLinear nodes' weights must be initializers)
    input: PathBuf,
    /// output model (its external data, when any, is written to OUTPUT.data)
    output: PathBuf,
    /// float8 e4m3fn codes (one scale per output channel unless --block or --group)
    #[arg(long)]
    fp8: bool,
    /// 4-bit integer codes, two a byte along the input (groups of --group, default 128)
    #[arg(long)]
    int4: bool,
    /// 8-bit integer codes (one scale per output channel unless --group or --block)
    #[arg(long)]
    int8: bool,
    /// one scale per N consecutive inputs of a row
    #[arg(long, value_name = "N", conflicts_with = "block", value_parser = clap::value_parser!(u64).range(1..))]
    group: Option<u64>,
    /// one scale per 2-D block of ROWS x COLS (e.g. 128x128, as DeepSeek-V3's and Qwen3's fp8 checkpoints)
    #[arg(long, value_name = "ROWSxCOLS", value_parser = parse_block)]
    block: Option<(u64, u64)>,
    /// one scale per output channel (for --int4 too)
    #[arg(long, conflicts_with_all = ["group", "block"])]
    per_channel: bool,
    /// integer formats without zero points: ranges symmetric around the default zero point (128, 8)
    #[arg(long)]
    symmetric: bool,
    /// token counts of the error report, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_name = "N,N,...")]
    lengths: Vec<usize>,
    /// overwrite OUTPUT if it exists
    #[arg(long)]
    force: bool,
    /// print the report as JSON on stdout (no progress display)
    #[arg(long)]
    json: bool,
    /// no progress display
    #[arg(long, short)]
    quiet: bool,
}

/// `128x128` -> (128, 128).
fn parse_block(s: &str) -> std::result::Result<(u64, u64), String> {
    let bad = || format!("'{s}' is not ROWSxCOLS with both at least 1 (e.g. 128x128)");
    let (r, c) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    match (r.trim().parse::<u64>(), c.trim().parse::<u64>()) {
        (Ok(r), Ok(c)) if r >= 1 && c >= 1 => Ok((r, c)),
        _ => Err(bad()),
    }
}

#[derive(Args)]
struct Common {
    /// write candidates without proving each numerically first (by default every candidate is
    /// run in ONNX Runtime against the nodes it replaces, and left as is on a mismatch; with this
    /// flag the report says "not proven" and ONNX Runtime is not needed)
    #[arg(long)]
    no_prove: bool,
    /// exit 0 when no MoE layer is replaced (default: exit 3 and write nothing)
    #[arg(long)]
    allow_none: bool,
    /// no progress display
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct RewriteArgs {
    /// input model (.onnx; external data beside it is read memory-mapped)
    input: PathBuf,
    /// output model (its external data, when any, is written to OUTPUT.data)
    output: PathBuf,
    /// overwrite OUTPUT if it exists
    #[arg(long)]
    force: bool,
    /// print every MoE layer found and every candidate left as is, with the reason
    #[arg(long)]
    report: bool,
    /// print the report as JSON on stdout (implies --report; no progress display)
    #[arg(long)]
    json: bool,
    /// run original and rewritten models in ONNX Runtime (CPU, with libscattermoe_ort.so) on
    /// random inputs (or --inputs) and write nothing unless they match; ONNX Runtime is found
    /// before the rewrite starts (see below)
    #[arg(long)]
    verify: bool,
    /// token counts for --verify, comma-separated: each dynamic input dimension is set to the
    /// count (default: 1, where traced exports fail; 13, a prime; 16, the fixtures' traced length)
    #[arg(long, value_delimiter = ',', default_value = "1,13,16", value_name = "N,N,...")]
    lengths: Vec<usize>,
    /// real inputs for --verify: a NumPy .npz (np.savez) with one array per graph input, by
    /// name, of the input's dtype; both models run once on them (instead of --lengths)
    #[arg(long, value_name = "FILE.npz", requires = "verify", conflicts_with = "lengths")]
    inputs: Option<PathBuf>,
    /// the runtime the nodes are written for: tensorrt adds what TensorRT's ONNX parser needs
    /// to map each node to the plugin in libscattermoe_trt.so (docs/tensorrt.md); the model
    /// still runs in ONNX Runtime with libscattermoe_ort.so
    #[arg(long, value_enum, default_value_t = TargetArg::Onnxruntime)]
    target: TargetArg,
    /// keep each layer's router as the ONNX nodes it was (by default a router that computes
    /// exactly what ai.scattermoe::TopKRouter computes becomes one such node, proven like the
    /// layer; for A/B benchmarks, or to keep the router in standard ops)
    #[arg(long)]
    keep_router: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct InspectArgs {
    /// the model (.onnx)
    model: PathBuf,
    /// print the candidates as JSON on stdout (no progress display)
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    Onnxruntime,
    Tensorrt,
}

/// On SIGINT, SIGTERM or SIGHUP the temporary folder of a save in progress is removed before the
/// process exits (a guard's Drop does not run when a signal ends the process).
fn install_signal_cleanup() {
    let _ = ctrlc::set_handler(|| {
        onnx::output::remove_temp_dirs();
        eprintln!("interrupted: nothing written");
        // _exit, not exit: ONNX Runtime's threads may be running, and exit's static destructors
        // would tear its state down under them (an abort instead of the documented 130)
        unsafe { libc::_exit(130) };
    });
}

/// Runs the CLI on `args` (the program name first) and returns its exit status.
pub fn main<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    install_signal_cleanup();
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code().clamp(0, 255) as u8;
        }
    };
    let code = match cli.cmd {
        Cmd::Rewrite(a) => run_rewrite(a),
        Cmd::Inspect(a) => run_inspect(a),
        Cmd::Quantize(a) => run_quantize(a),
    };
    let code = code.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        EXIT_ERROR
    });
    use std::io::Write;
    let _ = std::io::stdout().flush();
    code
}

/// The line said when no layer was (or, for `inspect`, would be) replaced.
fn none_replaced(model: &Path, rep: &rewrite::Report, inspect: bool) -> String {
    let n = rep.rejected.len();
    let found = format!("{n} candidate{} found, each left as is", if n == 1 { "" } else { "s" });
    let looks = rep.looks_like_moe.len();
    let what = match (n, inspect) {
        (0, _) if looks > 0 => format!(
            "no MoE layer found in {}: {looks} region{} look{} like MoE but no rule covers {} ({})",
            model.display(),
            if looks == 1 { "" } else { "s" },
            if looks == 1 { "s" } else { "" },
            if looks == 1 { "it" } else { "them" },
            if inspect { "listed above" } else { "see --report" }
        ),
        (0, _) => format!("no MoE layer found in {}", model.display()),
        (_, true) => format!("no MoE layer would be replaced in {}: {found}", model.display()),
        (_, false) => format!("no MoE layer replaced in {}: {found} (see --report)", model.display()),
    };
    format!("{what}{} (exit status {EXIT_NO_MOE}; --allow-none accepts this)", if inspect { "" } else { ": nothing written" })
}

/// `routers: 3 of 4 fused into TopKRouter; 1 left as ONNX nodes (TopK ranks Add, ...)`: the
/// routers' fusion, the reasons grouped; None where fusion did not run.
fn routers_line(rep: &rewrite::Report) -> Option<String> {
    let routers: Vec<&rewrite::RouterReport> = rep.layers.iter().filter_map(|l| l.router.as_ref()).collect();
    if routers.is_empty() {
        return None;
    }
    let fused = routers.iter().filter(|r| r.fused).count();
    let mut why: Vec<(&str, usize)> = Vec::new();
    for r in routers.iter().filter(|r| !r.fused) {
        match why.iter_mut().find(|(w, _)| *w == r.detail) {
            Some((_, c)) => *c += 1,
            None => why.push((&r.detail, 1)),
        }
    }
    let left: Vec<String> = why.iter().map(|(w, c)| if *c == 1 { w.to_string() } else { format!("{c}x {w}") }).collect();
    let mut line = format!("routers: {fused} of {} fused into TopKRouter", routers.len());
    if !left.is_empty() {
        line += &format!("; {} left as ONNX nodes ({})", routers.len() - fused, left.join("; "));
    }
    Some(line)
}

/// The CLI's listener: the report (as asked) before the save, the comparison after --verify.
struct Say {
    json: bool,
    report: bool,
}

impl file::Listener for Say {
    fn report(&self, rep: &rewrite::Report) {
        if self.json {
            println!("{}", rep.json());
        } else if self.report {
            print!("{}", rep.text());
        } else if !rep.layers.is_empty() {
            let n = rep.layers.len();
            let n_left = rep.rejected.len() + rep.looks_like_moe.len();
            let left = if n_left == 0 { String::new() } else { format!(", {n_left} candidate(s) left as is (see --report)") };
            eprintln!("{n} MoE layer{} replaced ({} nodes -> {}){left}", if n == 1 { "" } else { "s" }, rep.nodes_before, rep.nodes_after);
            if let Some(line) = routers_line(rep) {
                eprintln!("{line}");
            }
        }
    }

    fn verify(&self, ort: Option<&Path>, v: &rewrite::verify::VerifyReport) {
        if let Some(ort) = ort {
            eprintln!("verifying with ONNX Runtime {}", ort.display());
        }
        eprint!("{}", v.text());
        if v.passed() {
            eprintln!("verified: the rewritten model matches the original");
        }
    }
}

fn run_rewrite(a: RewriteArgs) -> Result<u8> {
    let RewriteArgs { input, output, force, report, json, verify, lengths, inputs, target, keep_router, common } = a;
    let bars = Bars::new(!common.quiet && !json);
    let target = match target {
        TargetArg::Onnxruntime => rewrite::Target::OnnxRuntime,
        TargetArg::Tensorrt => rewrite::Target::TensorRt,
    };
    let req = file::Request {
        input: &input,
        output: &output,
        force,
        verify,
        prove: !common.no_prove,
        target,
        lengths: &lengths,
        inputs: inputs.as_deref(),
        allow_none: common.allow_none,
        fuse_router: !keep_router,
    };
    let out = file::rewrite_file(&req, &bars, &Say { json, report })?;
    if !out.written {
        eprintln!("{}", none_replaced(&input, &out.report, false));
        return Ok(EXIT_NO_MOE);
    }
    Ok(0)
}

fn run_quantize(a: QuantizeArgs) -> Result<u8> {
    use crate::spec::{QuantFormat, ScaleLayout};
    let format = match (a.fp8, a.int4) {
        (true, _) => QuantFormat::Fp8E4M3Fn,
        (_, true) => QuantFormat::Int4,
        _ => QuantFormat::Int8,
    };
    if a.symmetric && format == QuantFormat::Fp8E4M3Fn {
        eprintln!("error: --symmetric is for the integer formats (--int4, --int8): fp8 takes no zero point");
        return Ok(2);
    }
    let layout = match (a.group, a.block, a.per_channel) {
        (Some(g), _, _) => ScaleLayout::Blocks { block_out: 1, block_in: g },
        (_, Some((r, c)), _) => ScaleLayout::Blocks { block_out: r, block_in: c },
        (None, None, false) if format == QuantFormat::Int4 => ScaleLayout::Blocks { block_out: 1, block_in: 128 },
        _ => ScaleLayout::PerChannel,
    };
    let opts = quantize::Options { format, layout, zero_point: !a.symmetric, lengths: a.lengths, force: a.force };
    let bars = Bars::new(!a.quiet && !a.json);
    let reports = quantize::quantize_file(&a.input, &a.output, &opts, &bars)?;
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            output: String,
            format: String,
            nodes: &'a [quantize::NodeReport],
        }
        println!("{}", serde_json::to_string(&Out { output: a.output.display().to_string(), format: opts.describe(), nodes: &reports })?);
    } else {
        for r in &reports {
            println!("{}", r.text());
        }
        let worst = reports.iter().map(quantize::NodeReport::worst).fold(0.0, f64::max);
        eprintln!(
            "{} node{} quantized ({}); largest relative error {worst:.2e}; written to {}",
            reports.len(),
            if reports.len() == 1 { "" } else { "s" },
            opts.describe(),
            a.output.display()
        );
    }
    Ok(0)
}

fn run_inspect(a: InspectArgs) -> Result<u8> {
    let InspectArgs { model: path, json, common } = a;
    let bars = Bars::new(!common.quiet && !json);
    let mut model = onnx::load_with_progress(&path, &bars)?;
    file::check_graph(&model, &path)?;
    checks::check_runtime(false, !common.no_prove)?;
    // the candidates are the same with or without the router fused: no router proofs to wait for
    let opts = rewrite::RewriteOptions { target: rewrite::Target::OnnxRuntime, prove: !common.no_prove, fuse_router: false };
    let rep = rewrite::rewrite_with_progress(&mut model, &opts, &bars)?;
    let candidates = rep.candidates();
    let would = candidates.iter().filter(|c| c.rewrite).count();
    if json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            model: String,
            proven: bool,
            would_rewrite: usize,
            candidates: &'a [rewrite::report::Candidate],
        }
        let out = Out { model: path.display().to_string(), proven: !common.no_prove, would_rewrite: would, candidates: &candidates };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for c in &candidates {
            println!("{}", c.text(!common.no_prove));
        }
        println!("{would} of {} candidate{} would be rewritten", candidates.len(), if candidates.len() == 1 { "" } else { "s" });
    }
    if would == 0 && !common.allow_none {
        eprintln!("{}", none_replaced(&path, &rep, true));
        return Ok(EXIT_NO_MOE);
    }
    Ok(0)
}
