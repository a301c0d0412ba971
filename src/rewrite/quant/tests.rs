//! The op's quantized inputs laid out from DequantizeLinear nodes: every weight value the op's
//! definition gives (docs/op-spec.md: `(q - z) * s` of the block) equals the value
//! DequantizeLinear's definition gives (`(x - zero_point) * scale`), both evaluated here from the
//! bytes, independently of the layout code; and the forms the op cannot hold are errors.

use super::*;
use crate::onnx::graph::{attr_int, make_node};
use crate::onnx::tensor::{make_tensor, ExternalStore};
use crate::rewrite::dequant::{INT4, INT8, UINT4, UINT8};
use crate::rewrite::expr::{ERef, WSrc};
use onnx_protobuf::{GraphProto, TensorProto};

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed >> 11
}

/// Codes of `ty` (one element a value: int4/uint4 packed two a byte over the flattened tensor).
fn codes(name: &str, ty: i32, dims: &[i64], seed: &mut u64) -> (TensorProto, Vec<i64>) {
    let n: i64 = dims.iter().product();
    let (lo, span) = match ty {
        INT8 => (-128, 256),
        UINT8 => (0, 256),
        INT4 => (-8, 16),
        _ => (0, 16),
    };
    let vals: Vec<i64> = (0..n).map(|_| lo + (rng(seed) % span) as i64).collect();
    let raw = if matches!(ty, INT4 | UINT4) {
        let mut b = vec![0u8; (n as usize).div_ceil(2)];
        for (j, v) in vals.iter().enumerate() {
            b[j / 2] |= ((*v as u8) & 15) << (4 * (j % 2));
        }
        b
    } else {
        vals.iter().map(|&v| v as u8).collect()
    };
    (make_tensor(name, ty, dims, raw), vals)
}

fn floats(name: &str, dims: &[i64], seed: &mut u64) -> (TensorProto, Vec<f32>) {
    let n: i64 = dims.iter().product();
    let vals: Vec<f32> = (0..n).map(|_| 0.01 + (rng(seed) % 1000) as f32 * 1e-4).collect();
    (make_tensor(name, 1, dims, vals.iter().flat_map(|v| v.to_le_bytes()).collect()), vals)
}

/// One DequantizeLinear weight `v` of codes `dims`: the graph's tensors and every value by
/// DequantizeLinear's definition (index: the codes' flat index).
struct Dq {
    inits: Vec<TensorProto>,
    node: onnx_protobuf::NodeProto,
    values: Vec<f64>,
}

/// `gran`: None per tensor, Some((axis, 0)) per axis, Some((axis, block)) blocked.
fn dq(v: &str, ty: i32, dims: &[i64], gran: Option<(usize, i64)>, zero: bool, seed: &mut u64) -> Dq {
    let (c, q) = codes(&format!("{v}_q"), ty, dims, seed);
    let sdims: Vec<i64> = match gran {
        None => vec![],
        Some((a, 0)) => vec![dims[a]],
        Some((a, b)) => dims.iter().enumerate().map(|(j, &d)| if j == a { (d + b - 1) / b } else { d }).collect(),
    };
    let (s, sv) = floats(&format!("{v}_s"), &sdims, seed);
    let (z, zv) = if zero { codes(&format!("{v}_z"), ty, &sdims, seed) } else { (TensorProto::new(), vec![0; sv.len()]) };
    let mut ins = vec![c.name.clone(), s.name.clone()];
    if zero {
        ins.push(z.name.clone());
    }
    let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
    let mut node = make_node("DequantizeLinear", "", &format!("{v}_dq"), &refs, &[v]);
    match gran {
        Some((a, 0)) => node.attribute.push(attr_int("axis", a as i64)),
        Some((a, b)) => {
            node.attribute.push(attr_int("axis", a as i64));
            node.attribute.push(attr_int("block_size", b));
        }
        None => {}
    }
    // the scale index of every code, by the definition
    let strides: Vec<usize> = (0..dims.len()).map(|j| dims[j + 1..].iter().product::<i64>() as usize).collect();
    let values = (0..q.len())
        .map(|flat| {
            let coord: Vec<usize> = strides.iter().enumerate().map(|(j, &st)| (flat / st) % dims[j] as usize).collect();
            let si = match gran {
                None => 0,
                Some((a, 0)) => coord[a],
                Some((a, b)) => coord.iter().enumerate().fold(0, |acc, (j, &c)| acc * sdims[j] as usize + if j == a { c / b as usize } else { c }),
            };
            (q[flat] - zv[si]) as f64 * sv[si] as f64
        })
        .collect();
    let mut inits = vec![c, s];
    if zero {
        inits.push(z);
    }
    Dq { inits, node, values }
}

/// Bytes a QTensor holds (produced, or an initializer of `g`).
fn bytes(t: &QTensor, g: &GraphProto) -> Vec<u8> {
    match t {
        QTensor::Existing(n) => g.initializer.iter().find(|x| &x.name == n).unwrap().raw_data.clone(),
        QTensor::New { produce, .. } => {
            let ext = ExternalStore::new(std::path::Path::new("."));
            let mut out = Vec::new();
            produce(&ext, &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            out
        }
    }
}

/// W[e, o, i] by the op's definition from the QWeight's bytes.
fn op_value(w: &QWeight, g: &GraphProto, block: Option<[i64; 2]>, e_count: usize, out: usize, inp: usize) -> Vec<f64> {
    let c = bytes(&w.codes, g);
    let s: Vec<f32> = bytes(&w.scale, g).chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let z = w.zero_point.as_ref().map(|z| bytes(z, g));
    let stored = if w.format == OpFormat::Int4 { inp.div_ceil(2) } else { inp };
    let (bo, bi) = match (w.blocked, block) {
        (true, Some([o, i])) => (o as usize, i as usize),
        _ => (1, inp),
    };
    let (rows, cols) = (out.div_ceil(bo), inp.div_ceil(bi));
    let mut v = Vec::new();
    for e in 0..e_count {
        for o in 0..out {
            for i in 0..inp {
                let byte = c[(e * out + o) * stored + if w.format == OpFormat::Int4 { i / 2 } else { i }];
                let q = if w.format == OpFormat::Int4 { (byte >> (4 * (i % 2))) & 15 } else { byte };
                let si = if w.blocked { (e * rows + o / bo) * cols + i / bi } else { e * out + o };
                let zp = z.as_ref().map_or(if w.format == OpFormat::Int4 { 8 } else { 128 }, |z| z[si]);
                v.push((q as f64 - zp as f64) * s[si] as f64);
            }
        }
    }
    v
}

fn graph(parts: &[&Dq]) -> GraphProto {
    let mut g = GraphProto::new();
    for p in parts {
        g.initializer.extend(p.inits.iter().cloned());
        g.node.push(p.node.clone());
    }
    g
}

#[test]
fn per_expert_matrices_stored_transposed_with_int8_channel_scales() {
    // MatMul weights [in, out] per expert, per-axis scale along the output (axis 1)
    let mut seed = 7;
    let (e_count, out, inp) = (3usize, 5usize, 6usize);
    let ws: Vec<Dq> = (0..e_count).map(|e| dq(&format!("w{e}"), INT8, &[inp as i64, out as i64], Some((1, 0)), e == 1, &mut seed)).collect();
    let g = graph(&ws.iter().collect::<Vec<_>>());
    let gi = GraphIndex::new(&g, None).unwrap();
    let parts: Vec<Vec<WSrc>> = (0..e_count).map(|e| vec![WSrc { init: format!("w{e}"), index: None, transposed: true, out, inp }]).collect();
    let lq = plan(&gi, &parts, &[], 1).unwrap().unwrap();
    let w = lq.w_in.as_ref().unwrap();
    assert!(!w.blocked && w.format == OpFormat::Int8 && w.zero_point.is_some() && lq.weight_bits == 8);
    let got = op_value(w, &g, lq.block_size, e_count, out, inp);
    for e in 0..e_count {
        for o in 0..out {
            for i in 0..inp {
                assert_eq!(got[(e * out + o) * inp + i], ws[e].values[i * out + o], "expert {e} ({o}, {i})");
            }
        }
    }
}

#[test]
fn int4_and_uint4_stacks_blocked_along_an_odd_input_with_zero_points() {
    for ty in [INT4, UINT4] {
        let mut seed = 11 + ty as u64;
        // [E, out, in] stacks, in = 9 (a partial last block of 4 and an odd byte row)
        let (e_count, out, inp) = (2usize, 3usize, 9usize);
        let w = dq("w", ty, &[e_count as i64, out as i64, inp as i64], Some((2, 4)), true, &mut seed);
        let v = dq("v", ty, &[e_count as i64, inp as i64, out as i64], Some((1, 4)), false, &mut seed);
        let g = graph(&[&w, &v]);
        let gi = GraphIndex::new(&g, None).unwrap();
        let w_in: Vec<Vec<WSrc>> =
            (0..e_count).map(|e| vec![WSrc { init: "w".into(), index: Some(ERef::Const(e as i64)), transposed: false, out, inp }]).collect();
        // the second projection stored [E, in, out]: its input blocks run along axis 1
        let w_out: Vec<WSrc> = (0..e_count).map(|e| WSrc { init: "v".into(), index: Some(ERef::Const(e as i64)), transposed: true, out, inp }).collect();
        let lq = plan(&gi, &w_in, &w_out, 1).unwrap().unwrap();
        assert_eq!((lq.weight_bits, lq.block_size), (4, Some([1, 4])));
        let a = lq.w_in.as_ref().unwrap();
        assert!(a.blocked && a.format == OpFormat::Int4);
        assert_eq!(op_value(a, &g, lq.block_size, e_count, out, inp), w.values);
        let b = lq.w_out.as_ref().unwrap();
        // without a zero point, int4 keeps the op's default (8 after the shift), uint4 gives 0s
        assert_eq!(b.zero_point.is_some(), ty == UINT4);
        let got = op_value(b, &g, lq.block_size, e_count, out, inp);
        for e in 0..e_count {
            for o in 0..out {
                for i in 0..inp {
                    assert_eq!(got[(e * out + o) * inp + i], v.values[(e * inp + i) * out + o]);
                }
            }
        }
    }
}

#[test]
fn a_node_of_4_bit_and_8_bit_weights_holds_both_as_8_bit_codes() {
    let mut seed = 5;
    let w = dq("w", INT4, &[2, 4, 6], Some((2, 2)), false, &mut seed);
    let v = dq("v", UINT8, &[2, 6, 4], None, false, &mut seed);
    let g = graph(&[&w, &v]);
    let gi = GraphIndex::new(&g, None).unwrap();
    let w_in: Vec<Vec<WSrc>> = (0..2).map(|e| vec![WSrc { init: "w".into(), index: Some(ERef::Const(e)), transposed: false, out: 4, inp: 6 }]).collect();
    let w_out: Vec<WSrc> = (0..2).map(|e| WSrc { init: "v".into(), index: Some(ERef::Const(e)), transposed: false, out: 6, inp: 4 }).collect();
    let lq = plan(&gi, &w_in, &w_out, 1).unwrap().unwrap();
    assert_eq!(lq.weight_bits, 8);
    let a = lq.w_in.as_ref().unwrap();
    assert!(a.format == OpFormat::Int8 && a.zero_point.is_some(), "the int4 codes' zero point (8) is not 8-bit's default");
    assert_eq!(op_value(a, &g, lq.block_size, 2, 4, 6), w.values);
    let b = lq.w_out.as_ref().unwrap();
    assert!(!b.blocked && b.zero_point.is_some(), "uint8 without a zero point reads 0, not 128");
    assert_eq!(op_value(b, &g, lq.block_size, 2, 6, 4), v.values);
}

#[test]
fn forms_the_op_cannot_hold_are_errors() {
    let mut seed = 3;
    let one = |v: &Dq, name: &str, out: usize, inp: usize| -> Result<Option<LayerQuant>, String> {
        let g = graph(&[v]);
        let gi = GraphIndex::new(&g, None).unwrap();
        let parts: Vec<Vec<WSrc>> = (0..2).map(|e| vec![WSrc { init: name.into(), index: Some(ERef::Const(e)), transposed: false, out, inp }]).collect();
        plan(&gi, &parts, &[], 1)
    };
    let err = one(&dq("w", INT8, &[2, 4, 6], Some((2, 0)), true, &mut seed), "w", 4, 6).unwrap_err();
    assert!(err.contains("one scale per input channel"), "{err}");
    let err = one(&dq("w", INT8, &[2, 4, 6], Some((1, 8)), false, &mut seed), "w", 4, 6).unwrap_err();
    assert!(err.contains("one scale per input channel"), "{err}");
    let err = one(&dq("w", INT8, &[2, 4, 6], Some((0, 2)), false, &mut seed), "w", 4, 6).unwrap_err();
    assert!(err.contains("expert axis"), "{err}");
    // blocks along the input in one projection and along the output in the other: no common block
    let w = dq("w", INT8, &[2, 4, 8], Some((2, 4)), false, &mut seed);
    let v = dq("v", INT8, &[2, 8, 4], Some((1, 4)), false, &mut seed);
    let g = graph(&[&w, &v]);
    let gi = GraphIndex::new(&g, None).unwrap();
    let w_in: Vec<Vec<WSrc>> = (0..2).map(|e| vec![WSrc { init: "w".into(), index: Some(ERef::Const(e)), transposed: false, out: 4, inp: 8 }]).collect();
    let w_out: Vec<WSrc> = (0..2).map(|e| WSrc { init: "v".into(), index: Some(ERef::Const(e)), transposed: false, out: 8, inp: 4 }).collect();
    let err = plan(&gi, &w_in, &w_out, 1).unwrap_err();
    assert!(err.contains("no common block"), "{err}");
    // one expert's weight dequantized and another's not
    let mut g = graph(&[&dq("w", INT8, &[4, 6], None, false, &mut seed)]);
    g.initializer.push(floats("f", &[4, 6], &mut seed).0);
    let gi = GraphIndex::new(&g, None).unwrap();
    let parts = vec![
        vec![WSrc { init: "w".into(), index: None, transposed: false, out: 4, inp: 6 }],
        vec![WSrc { init: "f".into(), index: None, transposed: false, out: 4, inp: 6 }],
    ];
    let err = plan(&gi, &parts, &[], 1).unwrap_err();
    assert!(err.contains("some experts' weights are dequantized"), "{err}");
    // float32 weights into a float16 product are fine; float16 ones into a float32 product are not
    let mut d = dq("h", INT8, &[2, 4, 6], None, false, &mut seed);
    d.inits[1] = make_tensor("h_s", 10, &[], half::f16::from_f32(0.5).to_le_bytes().to_vec());
    let err = one(&d, "h", 4, 6).unwrap_err();
    assert!(err.contains("float16 weights while the experts compute in float32"), "{err}");
}

#[test]
fn gate_and_up_weights_share_no_block() {
    let mut seed = 9;
    // gate and up as two [E, 3, 8] stacks blocked [2 rows]: a block would span both
    let a = dq("a", INT8, &[2, 3, 8], Some((1, 2)), false, &mut seed);
    let b = dq("b", INT8, &[2, 3, 8], Some((1, 2)), false, &mut seed);
    let g = graph(&[&a, &b]);
    let gi = GraphIndex::new(&g, None).unwrap();
    let parts: Vec<Vec<WSrc>> = (0..2)
        .map(|e| ["a", "b"].iter().map(|n| WSrc { init: n.to_string(), index: Some(ERef::Const(e)), transposed: false, out: 3, inp: 8 }).collect())
        .collect();
    let err = plan(&gi, &parts, &[], 1).unwrap_err();
    assert!(err.contains("span two of an expert's weights"), "{err}");
}

#[test]
fn int4_codes_are_read_from_raw_bytes_and_from_int32_data() {
    let mut seed = 1;
    let (t, vals) = codes("q", INT4, &[3, 3], &mut seed);
    let got: Vec<i64> = crate::rewrite::dequant::code_values(&t, None).unwrap().iter().map(|&b| b as i8 as i64).collect();
    assert_eq!(got, vals);
    let mut t2 = TensorProto::new();
    t2.name = "q2".into();
    t2.data_type = INT4;
    t2.dims = vec![3, 3];
    t2.int32_data = vals.iter().map(|&v| v as i32).collect();
    let got: Vec<i64> = crate::rewrite::dequant::code_values(&t2, None).unwrap().iter().map(|&b| b as i8 as i64).collect();
    assert_eq!(got, vals);
    for (ty, v, want) in [(INT8, -128i64, 0u8), (INT8, 127, 255), (INT4, -8, 0), (INT4, 7, 15), (UINT8, 200, 200), (UINT4, 9, 9)] {
        assert_eq!(crate::rewrite::dequant::unsigned_code(ty, v as i8 as u8 & if ty == UINT4 { 15 } else { 255 }), want, "{ty} {v}");
    }
}
