//! Peak memory of a rewrite of a model far larger than one layer: a stack of DBRX-style layers
//! (the fixture's graph, widened) with its weights in external data, rewritten by the CLI in a
//! child process whose peak RSS is read from getrusage. DBRX keeps gate, up and down projections
//! as separate [E, f, d] stacks and uses the down projection untransposed, so every layer's
//! weights go through the stacking path (new tensors produced one at a time while saving).
//!
//! Ignored by default (it writes about 2 x 9 GiB): `cargo test --release --test rewrite_big -- --ignored --nocapture`.
//! SCATTERMOE_BIG_D / _F / _LAYERS change the size (defaults 4096, 8192, 6: 9 GiB of f32 weights).

mod common;

use std::io::Write;

use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{Message, StringStringEntryProto, TensorProto};
use scattermoe::onnx::tensor::{make_i64, tensor_i64};

fn env_or(name: &str, v: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(v)
}

/// Writes `n` f32 values of a small pseudo-random pattern to `w`; returns bytes written.
fn fill(w: &mut impl Write, n: usize, block: &[u8]) -> usize {
    let mut left = n * 4;
    while left > 0 {
        let c = left.min(block.len());
        w.write_all(&block[..c]).unwrap();
        left -= c;
    }
    n * 4
}

#[test]
#[ignore]
fn nine_gib_of_external_weights_rewrite_within_one_gib_plus_one_layer() {
    let (d, f, layers) = (env_or("SCATTERMOE_BIG_D", 4096), env_or("SCATTERMOE_BIG_F", 8192), env_or("SCATTERMOE_BIG_LAYERS", 6));
    stack(d, f, layers, "big");
}

/// A deep stack of small layers, every one proven: the shapes the proof reads for layer 40 are
/// told through the 39 layers before it (they once were not: their depth exceeded the shape
/// walk's, and the layers past the second were left).
#[test]
fn a_48_layer_stack_has_every_layer_proven_and_replaced() {
    stack(64, 128, 48, "deep");
}

fn stack(d: usize, f: usize, layers: usize, tag: &str) {
    let dir = common::scratch(tag);
    let base = scattermoe::onnx::load(&common::models_dir().join("dbrx.onnx")).unwrap().proto;
    let g0 = base.graph.clone().unwrap();
    let e = 4usize;
    // a 16 MiB block of small values, repeated
    let mut st = 0x2545_F491_4F6C_DD1Du64;
    let block: Vec<u8> = (0..(4 << 20))
        .flat_map(|_| {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            (((st >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02).to_le_bytes()
        })
        .collect();

    let data_name = "big.onnx.data";
    let mut data = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(dir.join(data_name)).unwrap());
    let mut offset = 0usize;
    let mut m = base.clone();
    let g = m.graph.mut_or_insert_default();
    g.node.clear();
    g.initializer.clear();
    let name = |l: usize, v: &str| -> String {
        match v {
            "" => String::new(),
            "hidden_states" if l == 0 => v.into(),
            "hidden_states" => format!("L{}/output", l - 1),
            "output" if l == layers - 1 => v.into(),
            _ => format!("L{l}/{v}"),
        }
    };
    for l in 0..layers {
        for n in &g0.node {
            let mut n = n.clone();
            n.name = format!("L{l}/{}", n.name);
            n.input = n.input.iter().map(|v| name(l, v)).collect();
            n.output = n.output.iter().map(|v| name(l, v)).collect();
            if n.op_type == "Constant" {
                for a in n.attribute.iter_mut() {
                    if let Some(t) = a.t.as_mut() {
                        match tensor_i64(t, None).ok().as_deref() {
                            Some([-1, 32]) => *t = make_i64("", &[2], &[-1, d as i64]),
                            Some([32]) if t.dims == [1] => *t = make_i64("", &[1], &[d as i64]),
                            _ => {}
                        }
                    }
                }
            }
            g.node.push(n);
        }
        for t0 in &g0.initializer {
            let dims: Vec<i64> = match t0.dims.as_slice() {
                [32, 4] => vec![d as i64, e as i64],
                [4, 48, 32] => vec![e as i64, f as i64, d as i64],
                other => panic!("unexpected initializer shape {other:?}"),
            };
            let n: usize = dims.iter().product::<i64>() as usize;
            let mut t = TensorProto::new();
            t.name = name(l, &t0.name);
            t.data_type = 1;
            t.dims = dims;
            t.data_location = DataLocation::EXTERNAL.into();
            let len = fill(&mut data, n, &block);
            for (k, v) in [("location", data_name.to_string()), ("offset", offset.to_string()), ("length", len.to_string())] {
                let mut ent = StringStringEntryProto::new();
                ent.key = k.into();
                ent.value = v;
                t.external_data.push(ent);
            }
            offset += len;
            g.initializer.push(t);
        }
    }
    data.flush().unwrap();
    drop(data);
    for v in g.input.iter_mut().chain(g.output.iter_mut()) {
        if let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) = v.type_.mut_or_insert_default().value.as_mut() {
            if let Some(last) = tt.shape.mut_or_insert_default().dim.last_mut() {
                last.set_dim_value(d as i64);
            }
        }
    }
    std::fs::write(dir.join("big.onnx"), m.write_to_bytes().unwrap()).unwrap();
    let layer_bytes = 3 * e * f * d * 4;
    println!("model: {layers} layers, d={d} f={f} E={e}, {:.2} GiB external data, {:.0} MiB of experts per layer", offset as f64 / (1u64 << 30) as f64, layer_bytes as f64 / (1u64 << 20) as f64);

    let t0 = std::time::Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scattermoe"))
        .args(["rewrite", dir.join("big.onnx").to_str().unwrap(), dir.join("out.onnx").to_str().unwrap(), "--report"])
        .output()
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let peak = ru.ru_maxrss as usize * 1024;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("replaced hf_loop layer").count(), layers, "{stdout}");
    let out_data = std::fs::metadata(dir.join("out.onnx.data")).unwrap().len();
    println!(
        "rewrite: {secs:.1} s, peak RSS {:.0} MiB (bound: 1024 MiB + one layer's experts = {:.0} MiB), output data {:.2} GiB",
        peak as f64 / (1u64 << 20) as f64,
        (1024 + layer_bytes / (1 << 20)) as f64,
        out_data as f64 / (1u64 << 30) as f64
    );
    if std::env::var_os("SCATTERMOE_BIG_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(peak < (1 << 30) + layer_bytes, "peak RSS {peak} bytes");
}
