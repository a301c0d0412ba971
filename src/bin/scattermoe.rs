//! `scattermoe rewrite IN.onnx OUT.onnx [--force] [--report] [--json] [--verify] [--no-prove] [--target onnxruntime|tensorrt]`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};

use scattermoe::onnx::{self, SaveOptions};
use scattermoe::rewrite;

#[derive(Parser)]
#[command(name = "scattermoe", version, about = "ScatterMoE for ONNX models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replace every recognised Mixture-of-Experts subgraph with one ai.scattermoe::ScatterMoE node.
    Rewrite {
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
        /// print the report as JSON on stdout (implies --report)
        #[arg(long)]
        json: bool,
        /// run original and rewritten models in ONNX Runtime (CPU, with libscattermoe_ort.so) on
        /// random inputs and write nothing unless they match
        #[arg(long)]
        verify: bool,
        /// write candidates without proving each numerically first (by default every candidate
        /// is run in ONNX Runtime against the nodes it replaces, and left as is on a mismatch;
        /// with this flag the report says "not proven")
        #[arg(long)]
        no_prove: bool,
        /// token counts for --verify (default: 1, a prime, and 16, the generator's traced length)
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 13, 16])]
        lengths: Vec<usize>,
        /// the runtime the nodes are written for: tensorrt adds what TensorRT's ONNX parser needs
        /// to map each node to the plugin in libscattermoe_trt.so (docs/tensorrt.md); the model
        /// still runs in ONNX Runtime with libscattermoe_ort.so
        #[arg(long, value_enum, default_value_t = TargetArg::Onnxruntime)]
        target: TargetArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    Onnxruntime,
    Tensorrt,
}

/// The most tokens one `--verify` length may ask for: its random inputs are allocated per token,
/// and a model's largest test batches stay far below this.
const MAX_VERIFY_TOKENS: usize = 1 << 16;
/// The most lengths one `--verify` may run.
const MAX_VERIFY_LENGTHS: usize = 64;

fn check_lengths(lengths: &[usize]) -> Result<()> {
    if lengths.is_empty() {
        bail!("--lengths is empty: give at least one token count");
    }
    if lengths.len() > MAX_VERIFY_LENGTHS {
        bail!("--lengths gives {} token counts; at most {MAX_VERIFY_LENGTHS} are run", lengths.len());
    }
    if let Some(&n) = lengths.iter().find(|&&n| n > MAX_VERIFY_TOKENS) {
        bail!("--lengths {n} is more tokens than --verify runs (at most {MAX_VERIFY_TOKENS}); choose a smaller count");
    }
    Ok(())
}

/// Nodes of the contract already in the input (a model rewritten before): every attribute must be
/// one the op defines, of its type, as ONNX's checker treats a registered schema. ONNX Runtime's
/// custom-op API gives a kernel no list of a node's attributes, so the plugin itself can only
/// check the types of the attributes it knows (docs/hardening.md).
fn check_contract_attributes(graph: &onnx::proto::GraphProto) -> Result<()> {
    use onnx::proto::attribute_proto::AttributeType;
    use scattermoe::spec::{self, AttrDefault, AttrDesc};
    for n in graph.node.iter().filter(|n| n.domain == spec::DOMAIN) {
        let attrs: &[AttrDesc] = match n.op_type.as_str() {
            spec::scatter_moe::NAME => &spec::scatter_moe::ATTRS,
            spec::parallel_linear::NAME => &spec::parallel_linear::ATTRS,
            spec::capacity_mask::NAME => &spec::capacity_mask::ATTRS,
            other => bail!("node '{}' is {}::{other}, which is not an op of the contract", n.name, spec::DOMAIN),
        };
        for a in &n.attribute {
            // What the TensorRT target adds for TensorRT's ONNX parser; ONNX Runtime ignores it.
            if a.name == scattermoe::trt::PARSER_ATTR_VERSION || a.name == scattermoe::trt::PARSER_ATTR_NAMESPACE {
                continue;
            }
            let Some(d) = attrs.iter().find(|d| d.name == a.name) else {
                let known: Vec<&str> = attrs.iter().map(|d| d.name).collect();
                bail!("node '{}' ({}): unknown attribute '{}' (the op defines: {})", n.name, n.op_type, a.name, known.join(", "));
            };
            let want = match d.default {
                AttrDefault::Int(_) => AttributeType::INT,
                AttrDefault::Float(_) => AttributeType::FLOAT,
                AttrDefault::Str(_) => AttributeType::STRING,
            };
            let got = a.type_.enum_value_or_default();
            if got != want {
                bail!("node '{}' ({}): attribute '{}' must be {want:?}, got {got:?}", n.name, n.op_type, a.name);
            }
        }
    }
    Ok(())
}

/// The proof and `--verify` need ONNX Runtime and the plugin: checked before the rewrite, not
/// after the weights were written.
fn check_runtime(verify: bool, prove: bool) -> Result<()> {
    if !verify && !prove {
        return Ok(());
    }
    let install = "install it (`python3 -m pip install onnxruntime`, or set ORT_DYLIB_PATH to libonnxruntime.so)";
    let needs = match (verify, prove) {
        (true, _) => "--verify needs".to_string(),
        _ => format!("every rewrite is proven in ONNX Runtime before it is written ({install}, or pass --no-prove to write unproven rewrites), and that needs"),
    };
    let plugin = scattermoe::ort_ops::runtime::plugin_path().map_err(|e| anyhow::anyhow!("{needs} the plugin library: {e:#}"))?;
    if !plugin.is_file() {
        bail!("{needs} the plugin library, but {} is not a file", plugin.display());
    }
    scattermoe::ort_ops::runtime::environment().map_err(|e| anyhow::anyhow!("{needs} ONNX Runtime: {e:#}"))?;
    Ok(())
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

fn main() -> ExitCode {
    install_signal_cleanup();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Rewrite { input, output, force, report, json, verify, no_prove, lengths, target } => {
            // Every check before any work: the arguments, the input, the destination, and (for
            // the proof and --verify) that ONNX Runtime and the plugin load.
            if verify {
                check_lengths(&lengths)?;
            }
            let mut model = onnx::load(&input)?;
            onnx::output::check_output(&output, force, &model.input_files())?;
            if model.graph().output.is_empty() {
                bail!("{} has a graph with no outputs: nothing it computes can be kept, so it is not rewritten", input.display());
            }
            model.check_opset_compatible(scattermoe::spec::DOMAIN, scattermoe::spec::OPSET_VERSION)?;
            check_contract_attributes(model.graph())?;
            check_runtime(verify, !no_prove)?;
            let original_proto = if verify { Some(model.proto.clone()) } else { None };
            let target = match target {
                TargetArg::Onnxruntime => rewrite::Target::OnnxRuntime,
                TargetArg::Tensorrt => rewrite::Target::TensorRt,
            };
            let rep = rewrite::rewrite_with(&mut model, &rewrite::RewriteOptions { target, prove: !no_prove })?;
            if json {
                println!("{}", rep.json());
            } else if report {
                print!("{}", rep.text());
            } else {
                let n = rep.layers.len();
                eprintln!(
                    "{} MoE layer{} replaced ({} nodes -> {}){}",
                    n,
                    if n == 1 { "" } else { "s" },
                    rep.nodes_before,
                    rep.nodes_after,
                    if rep.rejected.is_empty() { String::new() } else { format!(", {} candidate(s) left as is (see --report)", rep.rejected.len()) }
                );
            }
            let failed = std::cell::Cell::new(false);
            let check = |tmp: &std::path::Path| -> Result<()> {
                let proto = original_proto.as_ref().unwrap();
                let v = rewrite::verify::verify(&input, proto, tmp, &lengths)?;
                eprint!("{}", v.text());
                if !v.passed() {
                    failed.set(true);
                    bail!("verification failed: nothing written");
                }
                eprintln!("verified: the rewritten model matches the original");
                Ok(())
            };
            let opts = SaveOptions { force, ..Default::default() };
            onnx::save_checked(model, &output, &opts, if verify { Some(&check) } else { None })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
