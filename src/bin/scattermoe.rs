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

fn main() -> ExitCode {
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
            if output.exists() && !force {
                bail!("{} exists; pass --force to overwrite it", output.display());
            }
            if input.canonicalize().ok().is_some_and(|i| output.canonicalize().ok() == Some(i)) {
                bail!("the output must not be the input file");
            }
            if (!no_prove || verify) && scattermoe::ort::runtime::environment().is_err() {
                let why = scattermoe::ort::runtime::environment().err().map(|e| format!("{e:#}")).unwrap_or_default();
                bail!(
                    "every rewrite is proven in ONNX Runtime before it is written, and ONNX Runtime was not found ({why}). \
                     Install it (`python3 -m pip install onnxruntime`, or set ORT_DYLIB_PATH to libonnxruntime.so), \
                     or pass --no-prove to write unproven rewrites"
                );
            }
            let mut model = onnx::load(&input)?;
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
