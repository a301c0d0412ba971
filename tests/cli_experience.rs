//! The CLI as a user meets it: `inspect`, the exit status when no MoE layer is replaced,
//! ONNX Runtime found without ORT_DYLIB_PATH, real inputs for --verify, --lengths' syntax, the
//! JSON report, and the progress display (on a terminal only). Exact messages and exit codes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_scattermoe")
}

/// (exit code, stdout, stderr) of the CLI with `env` set (a value of None removes the variable).
fn cli_env(args: &[&str], env: &[(&str, Option<&str>)]) -> (i32, String, String) {
    let mut c = Command::new(exe());
    c.args(args);
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn cli(args: &[&str]) -> (i32, String, String) {
    cli_env(args, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fixture(name: &str) -> PathBuf {
    common::models_dir().join(format!("{name}.onnx"))
}

/// The capacity fixture cut after its router's softmax: a model with no MoE layer.
fn router_only(dir: &Path) -> PathBuf {
    let mut m = scattermoe::onnx::load(&fixture("capacity_einsum")).unwrap();
    let g = m.proto.graph.mut_or_insert_default();
    let sm = g.node.iter().position(|n| n.op_type == "Softmax").unwrap();
    let out_name = g.node[sm].output[0].clone();
    g.node.truncate(sm + 1);
    g.output[0].name = out_name;
    if let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) =
        g.output[0].type_.mut_or_insert_default().value.as_mut()
    {
        if let Some(last) = tt.shape.mut_or_insert_default().dim.last_mut() {
            last.set_dim_value(4);
        }
    }
    let p = dir.join("router.onnx");
    scattermoe::onnx::save(m, &p, &Default::default()).unwrap();
    p
}

/// Mixtral with one expert's SiLU turned into tanh: a candidate the proof rejects.
fn wrong_expert(dir: &Path) -> PathBuf {
    let mut m = scattermoe::onnx::load(&fixture("mixtral")).unwrap();
    let g = m.proto.graph.mut_or_insert_default();
    let i = g.node.iter().position(|n| n.op_type == "Sigmoid").unwrap();
    g.node[i].op_type = "Tanh".into();
    let p = dir.join("tanh.onnx");
    scattermoe::onnx::save(m, &p, &Default::default()).unwrap();
    p
}

#[test]
fn inspect_lists_every_candidate_and_writes_nothing() {
    let dir = common::scratch("cli-inspect");
    let before: Vec<_> = std::fs::read_dir(common::models_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let (code, out, err) = cli(&["inspect", s(&fixture("mixtral"))]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "hf_loop candidate ending at /m/experts/Add_23_output_0: E=8 k=2 d=32 f=64 float32: would rewrite (proven)\n\
         1 of 1 candidate would be rewritten\n"
    );
    let (code, out, _) = cli(&["inspect", s(&fixture("gpt_oss")), "--no-prove"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("hf_loop candidate ending at /m/experts/Add_19_output_0: E=4 k=2 d=32 f=32 float32: would rewrite (not proven: --no-prove)\n"), "{out}");
    // a candidate the proof rejects: described, with the reason, and exit 3
    let tanh = wrong_expert(&dir);
    let (code, out, err) = cli(&["inspect", s(&tanh)]);
    assert_eq!(code, 3, "{out}{err}");
    // the rule itself refuses it, before reading the shapes (a candidate refused by the proof
    // keeps them: report.rs's unit test)
    assert!(
        out.starts_with("hf_loop candidate ending at /m/experts/Add_23_output_0: E=? k=? d=? f=? (the rule stopped before the shapes were read): left as is: iteration 0"),
        "{out}"
    );
    assert!(
        out.contains("the gated activation is not act(gate) * up"),
        "{out}"
    );
    assert!(
        out.ends_with("0 of 1 candidate would be rewritten\n"),
        "{out}"
    );
    assert_eq!(
        err,
        format!(
            "no MoE layer would be replaced in {}: 1 candidate found, each left as is (exit status 3; --allow-none accepts this)\n",
            tanh.display()
        )
    );
    let (code, _, _) = cli(&["inspect", s(&tanh), "--allow-none"]);
    assert_eq!(code, 0);
    // JSON: every field, through serde
    let (code, out, _) = cli(&["inspect", s(&tanh), "--json", "--allow-none"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["would_rewrite"], 0);
    assert_eq!(v["proven"], true);
    let c = &v["candidates"][0];
    assert_eq!(
        (
            c["family"].as_str(),
            c["at"].as_str(),
            c["rewrite"].as_bool()
        ),
        (
            Some("hf_loop"),
            Some("/m/experts/Add_23_output_0"),
            Some(false)
        )
    );
    assert!(
        c["experts"].is_null() && c["d"].is_null() && c["elem_type"].is_null(),
        "{c}"
    );
    assert!(
        c["reason"].as_str().unwrap().starts_with("iteration 0"),
        "{c}"
    );
    let (_, out, _) = cli(&["inspect", s(&fixture("mixtral")), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["would_rewrite"], 1);
    let c = &v["candidates"][0];
    assert_eq!(
        (
            c["experts"].as_u64(),
            c["k"].as_u64(),
            c["d"].as_u64(),
            c["f"].as_u64()
        ),
        (Some(8), Some(2), Some(32), Some(64))
    );
    assert_eq!(
        (
            c["elem_type"].as_str(),
            c["rewrite"].as_bool(),
            c["reason"].is_null()
        ),
        (Some("float32"), Some(true), true)
    );
    // nothing written anywhere
    let after: Vec<_> = std::fs::read_dir(common::models_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "only the mutated input"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_moe_layer_exits_3_and_writes_nothing_unless_allowed() {
    let dir = common::scratch("cli-nomoe");
    let input = router_only(&dir);
    let out = dir.join("out.onnx");
    let (code, stdout, err) = cli(&["rewrite", s(&input), s(&out)]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(stdout, "");
    assert_eq!(err, format!("no MoE layer found in {}: nothing written (exit status 3; --allow-none accepts this)\n", input.display()));
    assert!(!out.exists());
    let (code, _, err) = cli(&["inspect", s(&input)]);
    assert_eq!(code, 3);
    assert_eq!(
        err,
        format!(
            "no MoE layer found in {} (exit status 3; --allow-none accepts this)\n",
            input.display()
        )
    );
    // accepted: the model is written unchanged
    let (code, stdout, err) = cli(&["rewrite", s(&input), s(&out), "--allow-none", "--report"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.starts_with("no MoE layer was replaced\n"),
        "{stdout}"
    );
    let a = scattermoe::onnx::load(&input).unwrap();
    let b = scattermoe::onnx::load(&out).unwrap();
    assert_eq!(a.graph().node.len(), b.graph().node.len());
    // every candidate rejected is "no layer replaced" too
    let tanh = wrong_expert(&dir);
    let (code, _, err) = cli(&["rewrite", s(&tanh), s(&dir.join("t.onnx"))]);
    assert_eq!(code, 3);
    assert!(
        err.contains("no MoE layer replaced in")
            && err.contains("1 candidate found, each left as is (see --report): nothing written"),
        "{err}"
    );
    assert!(!dir.join("t.onnx").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `bin` folder of a project venv with onnxruntime 1.20.1 (scripts/setup-python.sh), if any.
fn venv_ort120() -> Option<PathBuf> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-ort120/bin");
    bin.join("python3").exists().then_some(bin)
}

#[test]
fn verify_finds_onnx_runtime_in_the_active_python_without_ort_dylib_path() {
    let Some(bin) = venv_ort120() else {
        eprintln!("skipped: .venv-ort120 is missing (scripts/setup-python.sh creates it)");
        return;
    };
    let dir = common::scratch("cli-ortfind");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let input = fixture("mixtral");
    // unset, and set but empty (which used to name the CLI itself as "not ONNX Runtime")
    for (i, ort) in [None, Some("")].into_iter().enumerate() {
        let out = dir.join(format!("o{i}.onnx"));
        let (code, _, err) = cli_env(
            &["rewrite", s(&input), s(&out), "--verify"],
            &[("ORT_DYLIB_PATH", ort), ("PATH", Some(&path))],
        );
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains(&format!(
                "verifying with ONNX Runtime {}",
                bin.parent().unwrap().display()
            )),
            "{err}"
        );
        assert!(
            err.contains("libonnxruntime.so.1.20.1\n") && err.contains("verified"),
            "{err}"
        );
        assert!(!err.contains("not ONNX Runtime"), "{err}");
    }
    // an explicit ORT_DYLIB_PATH wins, and a wrong one is an error before any work
    let out = dir.join("x.onnx");
    let (code, _, err) = cli_env(
        &["rewrite", s(&input), s(&out), "--verify"],
        &[
            ("ORT_DYLIB_PATH", Some("/nonexistent/libonnxruntime.so")),
            ("PATH", Some(&path)),
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "error: --verify needs ONNX Runtime: ORT_DYLIB_PATH is /nonexistent/libonnxruntime.so, which is not a file: point it at libonnxruntime.so, or unset it\n"
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// One array for an .npz: name, numpy descr, shape, little-endian bytes.
type NpyArray<'a> = (&'a str, &'a str, &'a [usize], Vec<u8>);

/// Writes `arrays` as an uncompressed .npz.
fn write_npz(path: &Path, arrays: &[NpyArray]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, descr, shape, data) in arrays {
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        let tuple = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        z.start_file(
            format!("{name}.npy"),
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        z.write_all(b"\x93NUMPY\x01\x00").unwrap();
        z.write_all(&(h.len() as u16).to_le_bytes()).unwrap();
        z.write_all(h.as_bytes()).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn verify_runs_both_models_on_real_inputs_from_an_npz() {
    let dir = common::scratch("cli-npz");
    let input = fixture("mixtral");
    // the fixture's own 16-token input (a traced per-expert loop runs only when every expert gets a token)
    let fixture_arrays = scattermoe::npz::read(&common::models_dir().join("mixtral.npz")).unwrap();
    let x = fixture_arrays
        .iter()
        .find(|a| a.name == "x_16")
        .unwrap()
        .data
        .clone();
    let good = dir.join("good.npz");
    write_npz(&good, &[("hidden_states", "<f4", &[1, 16, 32], x.clone())]);
    let out = dir.join("out.onnx");
    let (code, _, err) = cli(&[
        "rewrite",
        s(&input),
        s(&out),
        "--verify",
        "--inputs",
        s(&good),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "inputs from {}: max relative error",
            good.display()
        )),
        "{err}"
    );
    assert!(
        err.ends_with("verified: the rewritten model matches the original\n"),
        "{err}"
    );
    // a wrong file is refused before any work, with what is wrong
    let x64: Vec<u8> = (0..16 * 32)
        .flat_map(|i| (i as f64).to_le_bytes())
        .collect();
    let cases: Vec<(&str, Vec<NpyArray>, String)> = vec![
        (
            "name",
            vec![("hidden", "<f4", &[1, 16, 32], x.clone())],
            "holds 'hidden', which is not an input of the model (its inputs: hidden_states)".into(),
        ),
        (
            "dtype",
            vec![("hidden_states", "<f8", &[1, 16, 32], x64)],
            "input 'hidden_states' is float32 in the model, but".into(),
        ),
        (
            "rank",
            vec![("hidden_states", "<f4", &[16, 32], x.clone())],
            "input 'hidden_states' has shape [1, ?, 32] in the model, but".into(),
        ),
    ];
    for (what, arrays, want) in cases {
        let p = dir.join(format!("{what}.npz"));
        write_npz(&p, &arrays);
        let o = dir.join(format!("{what}.onnx"));
        let (code, _, err) = cli(&["rewrite", s(&input), s(&o), "--verify", "--inputs", s(&p)]);
        assert_eq!(code, 1, "{what}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(&want),
            "{what}: {err}"
        );
        assert!(
            !err.contains("replaced"),
            "{what}: work done before the check: {err}"
        );
        assert!(!o.exists());
    }
    let p = dir.join("text.npz");
    std::fs::write(&p, b"not a zip").unwrap();
    let (code, _, err) = cli(&[
        "rewrite",
        s(&input),
        s(&dir.join("t.onnx")),
        "--verify",
        "--inputs",
        s(&p),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "error: {} is not an .npz archive (np.savez)",
            p.display()
        )),
        "{err}"
    );
    // --inputs needs --verify, and replaces --lengths
    let (code, _, err) = cli(&["rewrite", s(&input), s(&out), "--inputs", s(&good)]);
    assert_eq!(code, 2);
    assert!(
        err.contains("the following required arguments were not provided:\n  --verify"),
        "{err}"
    );
    let (code, _, err) = cli(&[
        "rewrite",
        s(&input),
        s(&out),
        "--verify",
        "--inputs",
        s(&good),
        "--lengths",
        "3",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "error: the argument '--inputs <FILE.npz>' cannot be used with '--lengths <N,N,...>'"
        ),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lengths_help_shows_the_syntax_it_takes() {
    let (code, out, _) = cli(&["rewrite", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--lengths <N,N,...>  token counts for --verify, comma-separated"),
        "{out}"
    );
    assert!(out.contains("[default: 1,13,16]"), "{out}");
    assert!(out.contains("Exit status: 0 done; 1 error (nothing written); 2 bad arguments; 3 no MoE layer replaced"), "{out}");
    let dir = common::scratch("cli-lengths");
    let (code, _, err) = cli(&[
        "rewrite",
        s(&fixture("mixtral")),
        s(&dir.join("o.onnx")),
        "--verify",
        "--lengths",
        "7,16",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("tokens 7: max relative error")
            && err.contains("tokens 16: max relative error"),
        "{err}"
    );
    let (code, _, err) = cli(&[
        "rewrite",
        s(&fixture("mixtral")),
        s(&dir.join("p.onnx")),
        "--verify",
        "--lengths",
        "7 16",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value '7 16' for '--lengths <N,N,...>'"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_json_report_parses_and_carries_the_proof() {
    let dir = common::scratch("cli-json");
    let (code, out, err) = cli(&[
        "rewrite",
        s(&fixture("qwen3_moe")),
        s(&dir.join("o.onnx")),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let l = &v["layers"][0];
    assert_eq!(
        (
            l["family"].as_str(),
            l["experts"].as_u64(),
            l["gated"].as_bool()
        ),
        (Some("hf_loop"), Some(8), Some(true))
    );
    // the traced export fails at 1 token: the proof compares at the others
    assert!(
        l["proof"]["tokens"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(16)),
        "{l}"
    );
    assert!(l["proof"]["cases"].as_u64().unwrap() > 0, "{l}");
    assert!(
        l["proof"]["max_rel_err"].as_f64().unwrap() <= l["proof"]["tolerance"].as_f64().unwrap()
    );
    assert!(v["rejected"].as_array().unwrap().is_empty());
    assert!(v["nodes_after"].as_u64().unwrap() < v["nodes_before"].as_u64().unwrap());
    // no progress display with --json (or off a terminal): stderr holds no bar
    assert!(!err.contains("ETA"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `script` runs the CLI on a pseudo-terminal (util-linux), where the progress display is drawn.
#[test]
fn progress_is_drawn_on_a_terminal_for_every_step_and_not_with_quiet() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` is not installed");
        return;
    }
    let dir = common::scratch("cli-progress");
    let run = |extra: &str, out: &str| -> String {
        let cmd = format!(
            "{} rewrite {} {} --verify {extra}",
            exe(),
            s(&fixture("mixtral")),
            s(&dir.join(out))
        );
        let o = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        String::from_utf8_lossy(&o.stdout).into()
    };
    let shown = run("", "a.onnx");
    for step in [
        "   load [",
        "  match [",
        "  prove [",
        "   save [",
        " verify [",
    ] {
        assert!(shown.contains(step), "{step} not drawn: {shown:?}");
    }
    assert!(
        shown.contains("ETA") && shown.contains("done in"),
        "{shown:?}"
    );
    let quiet = run("--quiet", "b.onnx");
    assert!(
        !quiet.contains("ETA") && quiet.contains("verified"),
        "{quiet:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
