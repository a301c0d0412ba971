//! Regressions of the hardening review: nothing outside the model's folder is read, no file of
//! the user's is replaced without --force (and never a non-regular file), nothing half-written
//! survives any exit, and no input aborts, hangs or over-allocates the process. Each test
//! reproduces one finding of the review.

mod common;

use std::ffi::CString;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scattermoe::onnx::{self, SaveOptions};

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_scattermoe")
}

/// Runs the CLI with a deadline (a hang is a failure, not a stuck test): (exit code, stderr).
fn cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(exe());
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("scattermoe {args:?} still running after 60 s (hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(args: &[&str]) -> (i32, String) {
    cli_env(args, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

fn no_temporaries(dir: &Path) {
    let left: Vec<String> = names(dir).into_iter().filter(|n| n.contains(".tmp")).collect();
    assert!(left.is_empty(), "temporary files left in {}: {left:?}", dir.display());
}

/// `dir/name.onnx` with every initializer in external data `dir/<data>` (fixture qwen3_moe).
fn external_model(dir: &Path, name: &str) -> PathBuf {
    let m = onnx::load(&common::models_dir().join("qwen3_moe.onnx")).unwrap();
    let p = dir.join(name);
    onnx::save(m, &p, &SaveOptions { external_threshold: Some(0), ..Default::default() }).unwrap();
    p
}

/// Rewrites the model's external-data location of every tensor to `location`.
fn relocate(model: &Path, location: &str) {
    use scattermoe::onnx::proto::Message;
    let mut proto = scattermoe::onnx::proto::ModelProto::parse_from_bytes(&std::fs::read(model).unwrap()).unwrap();
    for t in proto.graph.mut_or_insert_default().initializer.iter_mut() {
        for e in t.external_data.iter_mut().filter(|e| e.key == "location") {
            e.value = location.into();
        }
    }
    std::fs::write(model, proto.write_to_bytes().unwrap()).unwrap();
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", p.display());
}

#[test]
fn external_data_through_symlinks_out_of_the_folder_or_not_a_file_is_refused() {
    let root = common::scratch("hard-ext");
    let model_dir = root.join("model");
    let outside = root.join("outside");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let input = external_model(&model_dir, "m.onnx");
    // The real bytes now live outside the model's folder.
    std::fs::rename(model_dir.join("m.onnx.data"), outside.join("secret.bin")).unwrap();
    let out = root.join("out.onnx");
    let cases: Vec<(&str, Box<dyn Fn()>, &str)> = vec![
        ("symlink to a file outside", Box::new(|| symlink(outside.join("secret.bin"), model_dir.join("link.bin")).unwrap()), "outside the model's directory"),
        ("symlink to a folder outside", Box::new(|| symlink(&outside, model_dir.join("link.bin")).unwrap()), "outside the model's directory"),
        ("relative symlink escaping", Box::new(|| symlink("../outside/secret.bin", model_dir.join("link.bin")).unwrap()), "outside the model's directory"),
        ("a folder", Box::new(|| std::fs::create_dir(model_dir.join("link.bin")).unwrap()), "a directory, not a regular file"),
        ("a FIFO", Box::new(|| mkfifo(&model_dir.join("link.bin"))), "a FIFO (named pipe), not a regular file"),
    ];
    relocate(&input, "link.bin");
    for (what, make, want) in cases {
        let l = model_dir.join("link.bin");
        let _ = std::fs::remove_file(&l).or_else(|_| std::fs::remove_dir(&l));
        make();
        let (code, err) = cli(&["rewrite", s(&input), s(&out)]);
        assert_eq!(code, 1, "{what}: {err}");
        assert!(err.contains("link.bin") && err.contains(want), "{what}: {err}");
        assert!(!out.exists() && !root.join("out.onnx.data").exists(), "{what}: output written");
        no_temporaries(&root);
    }
    // A symlink that stays inside the folder is followed, as ONNX Runtime does.
    let l = model_dir.join("link.bin");
    let _ = std::fs::remove_file(&l).or_else(|_| std::fs::remove_dir(&l));
    std::fs::rename(outside.join("secret.bin"), model_dir.join("real.bin")).unwrap();
    symlink("real.bin", &l).unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&out)]);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_inputs_data_file_named_out_data_is_never_replaced() {
    let dir = common::scratch("hard-indata");
    // in.onnx keeps its weights in out.onnx.data: writing out.onnx must not replace them.
    let input = external_model(&dir, "in.onnx");
    std::fs::rename(dir.join("in.onnx.data"), dir.join("out.onnx.data")).unwrap();
    relocate(&input, "out.onnx.data");
    let before = std::fs::read(dir.join("out.onnx.data")).unwrap();
    for force in [false, true] {
        let out = dir.join("out.onnx");
        let mut args = vec!["rewrite", s(&input), s(&out)];
        if force {
            args.push("--force");
        }
        let (code, err) = cli(&args);
        assert_eq!(code, 1, "force={force}: {err}");
        assert!(err.contains("is the input's file"), "{err}");
        assert_eq!(std::fs::read(dir.join("out.onnx.data")).unwrap(), before, "the input's data changed");
        assert!(!dir.join("out.onnx").exists());
    }
    // OUT is the input itself (also through a hard link).
    std::fs::hard_link(&input, dir.join("alias.onnx")).unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&dir.join("alias.onnx")), "--force"]);
    assert_eq!(code, 1);
    assert!(err.contains("is the input's file"), "{err}");
    no_temporaries(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_existing_out_data_needs_force_and_non_regular_files_are_never_replaced() {
    let dir = common::scratch("hard-outdata");
    let input = common::models_dir().join("mixtral.onnx");
    let out = dir.join("out.onnx");
    std::fs::write(dir.join("out.onnx.data"), b"keep me").unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&out)]);
    assert_eq!(code, 1);
    assert!(err.contains("out.onnx.data") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(dir.join("out.onnx.data")).unwrap(), b"keep me");
    std::fs::remove_file(dir.join("out.onnx.data")).unwrap();
    // A FIFO at OUT is never replaced, even with --force (nor opened: that would block).
    mkfifo(&out);
    let (code, err) = cli(&["rewrite", s(&input), s(&out), "--force"]);
    assert_eq!(code, 1);
    assert!(err.contains("FIFO") && err.contains("never replaced"), "{err}");
    assert!(std::fs::symlink_metadata(&out).unwrap().file_type().is_fifo_like());
    std::fs::remove_file(&out).unwrap();
    // Nor a symlink to a device.
    symlink("/dev/null", &out).unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&out), "--force"]);
    assert_eq!(code, 1);
    assert!(err.contains("character device"), "{err}");
    assert!(std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
    no_temporaries(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn output_problems_are_found_before_any_work() {
    let dir = common::scratch("hard-order");
    let input = common::models_dir().join("mixtral.onnx");
    let cases = [
        (dir.join("missing").join("out.onnx"), "does not exist"),
        (dir.join("folder"), "is a directory"),
    ];
    std::fs::create_dir(dir.join("folder")).unwrap();
    for (out, want) in &cases {
        let (code, err) = cli(&["rewrite", s(&input), s(out), "--force"]);
        assert_eq!(code, 1);
        assert!(err.contains(want), "{err}");
        // the rewrite did not run: no success line before the error
        assert!(!err.contains("replaced"), "work done before the check: {err}");
    }
    // An unwritable folder (root can write anywhere: checked only when not root).
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let (code, err) = cli(&["rewrite", s(&input), s(&ro.join("o.onnx"))]);
        assert_eq!(code, 1);
        assert!(err.contains("not writable") && !err.contains("replaced"), "{err}");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // --verify without ONNX Runtime fails before the rewrite and before any weight is written.
    let out = dir.join("v.onnx");
    let (code, err) = cli_env(&["rewrite", s(&input), s(&out), "--verify"], &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")]);
    assert_eq!(code, 1);
    assert!(err.contains("--verify needs ONNX Runtime") && !err.contains("replaced"), "{err}");
    assert!(!out.exists());
    assert_eq!(names(&dir), ["folder"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn huge_verify_lengths_are_refused_not_aborted() {
    let dir = common::scratch("hard-lengths");
    let input = common::models_dir().join("mixtral.onnx");
    let out = dir.join("out.onnx");
    for lengths in ["100000000", "1,18446744073709551615"] {
        let (code, err) = cli(&["rewrite", s(&input), s(&out), "--verify", "--lengths", lengths]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("--lengths") && err.contains("at most 65536"), "{err}");
    }
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_and_sigint_during_a_save_leave_no_temporary_folder() {
    let dir = common::scratch("hard-signal");
    let input = common::models_dir().join("mixtral.onnx");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let out = dir.join("out.onnx");
        // --verify keeps the finished model in the temporary folder while ORT runs both models.
        let mut child = Command::new(exe())
            .args(["rewrite", s(&input), s(&out), "--verify", "--lengths", "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,64,256,1024"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let tmp = dir.join(format!(".out.onnx.tmp{}", child.id()));
        while !tmp.join("out.onnx").exists() {
            assert!(start.elapsed() < Duration::from_secs(60), "no temporary model appeared");
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(child.try_wait().unwrap().is_none(), "the save ended before the signal could be sent");
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "signal {sig}: {status:?}");
        assert!(names(&dir).is_empty(), "signal {sig}: left {:?}", names(&dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_left_over_temporary_folder_of_a_killed_run_is_removed() {
    let dir = common::scratch("hard-leftover");
    let input = common::models_dir().join("loop_where.onnx");
    // pid 4194304 is above Linux's largest pid (2^22): no process has it.
    let stale = dir.join(".out.onnx.tmp4194304");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("out.onnx"), b"half a model").unwrap();
    std::fs::write(stale.join("out.onnx.data"), b"half the weights").unwrap();
    // One holding a file of the user's is only reported.
    let foreign = dir.join(".out.onnx.tmp4194305");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&dir.join("out.onnx"))]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("removed") && err.contains(".out.onnx.tmp4194304"), "{err}");
    assert!(err.contains(".out.onnx.tmp4194305") && err.contains("by hand"), "{err}");
    assert!(!stale.exists());
    assert_eq!(std::fs::read(foreign.join("notes.txt")).unwrap(), b"mine");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_graph_with_no_outputs_is_refused_before_anything_changes() {
    use scattermoe::onnx::proto::Message;
    let dir = common::scratch("hard-nooutputs");
    let mut proto = scattermoe::onnx::proto::ModelProto::parse_from_bytes(&std::fs::read(common::models_dir().join("mixtral.onnx")).unwrap()).unwrap();
    proto.graph.mut_or_insert_default().output.clear();
    let input = dir.join("in.onnx");
    std::fs::write(&input, proto.write_to_bytes().unwrap()).unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&dir.join("out.onnx"))]);
    assert_eq!(code, 1);
    assert!(err.contains("no outputs") && !err.contains("replaced"), "{err}");
    assert_eq!(names(&dir), ["in.onnx"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_ai_scattermoe_import_of_another_version_is_replaced_and_the_output_loads() {
    use scattermoe::onnx::proto::{Message, ModelProto, OperatorSetIdProto};
    let dir = common::scratch("hard-opset");
    let mut proto = ModelProto::parse_from_bytes(&std::fs::read(common::models_dir().join("mixtral.onnx")).unwrap()).unwrap();
    let mut o = OperatorSetIdProto::new();
    o.domain = scattermoe::spec::DOMAIN.into();
    o.version = 7;
    proto.opset_import.push(o);
    let input = dir.join("in.onnx");
    std::fs::write(&input, proto.write_to_bytes().unwrap()).unwrap();
    let out = dir.join("out.onnx");
    // --verify loads the output in ONNX Runtime with the plugin: it fails on a version-7 import.
    let (code, err) = cli(&["rewrite", s(&input), s(&out), "--verify"]);
    assert_eq!(code, 0, "{err}");
    let back = onnx::load(&out).unwrap();
    let imports: Vec<i64> = back.proto.opset_import.iter().filter(|o| o.domain == scattermoe::spec::DOMAIN).map(|o| o.version).collect();
    assert_eq!(imports, [scattermoe::spec::OPSET_VERSION]);
    // With nodes of that other version already in the model, the rewrite is refused.
    let rewritten = std::fs::read(&out).unwrap();
    let mut proto = ModelProto::parse_from_bytes(&rewritten).unwrap();
    proto.opset_import.iter_mut().filter(|o| o.domain == scattermoe::spec::DOMAIN).for_each(|o| o.version = 7);
    std::fs::write(&input, proto.write_to_bytes().unwrap()).unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&dir.join("again.onnx"))]);
    assert_eq!(code, 1);
    assert!(err.contains("version 7") && err.contains("knows version 1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn impossible_shapes_are_errors_not_wrapped_sizes() {
    use scattermoe::onnx::proto::{Message, ModelProto};
    use scattermoe::onnx::tensor::{make_tensor, tensor_bytes, FLOAT};
    // 2^61 * 8 * 1 floats: the element count wraps to 0 in plain arithmetic, so empty data "fit".
    let t = make_tensor("huge", FLOAT, &[1 << 61, 8, 1], vec![]);
    let e = tensor_bytes(&t, None).unwrap_err().to_string();
    assert!(e.contains("'huge'") && e.contains("more bytes than can be addressed"), "{e}");
    let t = make_tensor("neg", FLOAT, &[-2, 3], vec![]);
    assert!(tensor_bytes(&t, None).unwrap_err().to_string().contains("negative dimension"));
    // The loader refuses such an initializer up front.
    let dir = common::scratch("hard-dims");
    let mut proto = ModelProto::parse_from_bytes(&std::fs::read(common::models_dir().join("mixtral.onnx")).unwrap()).unwrap();
    proto.graph.mut_or_insert_default().initializer.push(make_tensor("huge", FLOAT, &[1 << 61, 8, 1], vec![]));
    let input = dir.join("in.onnx");
    std::fs::write(&input, proto.write_to_bytes().unwrap()).unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&dir.join("out.onnx"))]);
    assert_eq!(code, 1);
    assert!(err.contains("'huge'") && err.contains("more bytes than can be addressed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn contract_nodes_with_unknown_or_mistyped_attributes_are_refused() {
    use scattermoe::onnx::proto::{attribute_proto::AttributeType, AttributeProto, Message, ModelProto};
    let dir = common::scratch("hard-attrs");
    let first = dir.join("first.onnx");
    let (code, err) = cli(&["rewrite", s(&common::models_dir().join("mixtral.onnx")), s(&first)]);
    assert_eq!(code, 0, "{err}");
    let base = ModelProto::parse_from_bytes(&std::fs::read(&first).unwrap()).unwrap();
    let edit = |f: &dyn Fn(&mut AttributeProto)| {
        let mut p = base.clone();
        let n = p.graph.mut_or_insert_default().node.iter_mut().find(|n| n.op_type == "ScatterMoE").unwrap();
        let mut a = AttributeProto::new();
        f(&mut a);
        n.attribute.retain(|x| x.name != a.name);
        n.attribute.push(a);
        let input = dir.join("in.onnx");
        std::fs::write(&input, p.write_to_bytes().unwrap()).unwrap();
        cli(&["rewrite", s(&input), s(&dir.join("out.onnx")), "--force"])
    };
    let (code, err) = edit(&|a| {
        a.name = "activaton".into();
        a.type_ = AttributeType::STRING.into();
        a.s = b"silu".to_vec();
    });
    assert_eq!(code, 1);
    assert!(err.contains("unknown attribute 'activaton'"), "{err}");
    let (code, err) = edit(&|a| {
        a.name = "gated".into();
        a.type_ = AttributeType::FLOAT.into();
        a.f = 1.0;
    });
    assert_eq!(code, 1);
    assert!(err.contains("attribute 'gated' must be INT, got FLOAT"), "{err}");
    assert!(!dir.join("out.onnx").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_reading_its_own_output_is_an_error_not_a_stack_overflow() {
    // Found by fuzz/mutate_cli.py (seed 20261207, run 4619): the expression walker followed the
    // self-loop until the stack overflowed (exit 134).
    use scattermoe::onnx::proto::{Message, ModelProto};
    let dir = common::scratch("hard-cycle");
    let mut proto = ModelProto::parse_from_bytes(&std::fs::read(common::models_dir().join("dense_bmm.onnx")).unwrap()).unwrap();
    let g = proto.graph.mut_or_insert_default();
    let n = g.node.iter_mut().rev().find(|n| n.op_type == "Mul").unwrap();
    n.input[0] = n.output[0].clone();
    let input = dir.join("in.onnx");
    std::fs::write(&input, proto.write_to_bytes().unwrap()).unwrap();
    let (code, err) = cli(&["rewrite", s(&input), s(&dir.join("out.onnx"))]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cycle") && err.contains("consumes its own output"), "{err}");
    assert_eq!(names(&dir), ["in.onnx"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_huge_constant_in_a_shape_idiom_is_not_materialised() {
    // Found by fuzz/ci.sh's rewrite target: mixtral_bmm's repeat counts are OneHot([1], 3, [1, k]);
    // with the depth 3 changed to 2^31 the shape evaluator built a vector of 2^31 entries per
    // try (24 GB, then the kernel's OOM kill). Under an 8 GiB address-space limit the rewrite must
    // end on its own: the layer left as is (exit 3) or rewritten, never killed or aborted.
    use scattermoe::onnx::proto::{Message, ModelProto};
    use std::os::unix::process::CommandExt;
    let dir = common::scratch("hard-onehot");
    let mut proto = ModelProto::parse_from_bytes(&std::fs::read(common::models_dir().join("mixtral_bmm.onnx")).unwrap()).unwrap();
    let g = proto.graph.mut_or_insert_default();
    let depth = g.node.iter().find(|n| n.op_type == "OneHot").unwrap().input[1].clone();
    let c = g.node.iter_mut().find(|n| n.output[0] == depth && n.op_type == "Constant").unwrap();
    let t = c.attribute[0].t.as_mut().unwrap();
    assert_eq!(t.raw_data, 3i64.to_le_bytes(), "the fixture's OneHot depth moved");
    t.raw_data = 0x7f96_9801i64.to_le_bytes().to_vec();
    let input = dir.join("in.onnx");
    std::fs::write(&input, proto.write_to_bytes().unwrap()).unwrap();
    let mut cmd = Command::new(exe());
    cmd.args(["rewrite", "--no-prove", s(&input), s(&dir.join("out.onnx"))]).stdout(Stdio::null()).stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 8 << 30, rlim_max: 8 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0 | 3)), "exit {:?}: {err}", out.status);
    no_temporaries(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_initializer_whose_data_does_not_fill_its_shape_is_refused_at_load() {
    // Found by fuzz/mutate_cli.py (seed 20261214, run 5704): dense_bmm's router weight relabelled
    // [32, 2^31] over its 512 bytes. ONNX Runtime refuses the model; the proof sized its draws by
    // the shape and ran past the 60 s limit. Now the loader names the tensor.
    use scattermoe::onnx::proto::{Message, ModelProto};
    use scattermoe::onnx::tensor::{make_tensor, FLOAT};
    let dir = common::scratch("hard-stored");
    let base = ModelProto::parse_from_bytes(&std::fs::read(common::models_dir().join("dense_bmm.onnx")).unwrap()).unwrap();
    let write = |p: &ModelProto| {
        let input = dir.join("in.onnx");
        std::fs::write(&input, p.write_to_bytes().unwrap()).unwrap();
        cli(&["rewrite", s(&input), s(&dir.join("out.onnx")), "--force"])
    };
    let mut p = base.clone();
    let t = p.graph.mut_or_insert_default().initializer.iter_mut().find(|t| t.dims.len() == 2 && !t.raw_data.is_empty()).unwrap();
    let (name, bytes) = (t.name.clone(), t.raw_data.len());
    t.dims[1] = 1 << 31;
    let (code, err) = write(&p);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("tensor '{name}': raw_data holds {bytes} bytes")), "{err}");
    // typed entries too: 3 floats for a shape of 4
    let mut p = base.clone();
    p.graph.mut_or_insert_default().initializer.push(make_tensor("short", FLOAT, &[4], vec![]));
    p.graph.mut_or_insert_default().initializer.last_mut().unwrap().float_data = vec![1.0, 2.0, 3.0];
    let (code, err) = write(&p);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tensor 'short': holds 3 elements, its shape [4] needs 4"), "{err}");
    assert!(!dir.join("out.onnx").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
