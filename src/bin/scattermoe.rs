//! `scattermoe rewrite IN.onnx OUT.onnx [...]` and `scattermoe inspect MODEL [...]`: the CLI
//! itself is `scattermoe::cli` (shared with the Python package's console script).

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(scattermoe::cli::main(std::env::args_os()))
}
