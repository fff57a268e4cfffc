//! Unit tests of the canonical form and the config reader, and end-to-end checks of every
//! format against checkpoints that `scripts/quantize-formats.py` (an independent numpy
//! quantizer and packer) writes from the shared reference models. Those need the project's
//! venv (`scripts/python-env.sh`: numpy, safetensors) and fail, not skip, without it.

use super::*;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use sirocco_testkit::{python, ref_model, repo_root};
use std::process::Command;

/// Deterministic pseudo-random values in [-1, 1) (a 64-bit LCG).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

// ---------------------------------------------------------------- canonical form

#[test]
fn quantize_rtn_round_trip_error_is_at_most_half_a_step() {
    let (n, k) = (12, 64);
    for bits in [4u8, 8] {
        for symmetric in [true, false] {
            for group in [16, 32, k] {
                let mut w = values(n * k, bits as u64 * 31 + group as u64);
                // One row with a wide range, one all positive, one all zero.
                w[..k].iter_mut().for_each(|v| *v *= 50.0);
                w[k..2 * k].iter_mut().for_each(|v| *v = v.abs() + 0.5);
                w[2 * k..3 * k].iter_mut().for_each(|v| *v = 0.0);
                let t = QuantizedTensor::quantize_rtn(&w, n, k, bits, group, symmetric);
                t.validate("rtn").unwrap();
                assert_eq!((t.n, t.k, t.group_size, t.bits), (n, k, group, bits));
                let d = t.dequantize();
                let gpr = k / group;
                for i in 0..n {
                    for j in 0..k {
                        let g = i * gpr + j / group;
                        let bound = t.scales[g] * 0.5 * (1.0 + 1e-5) + 1e-7;
                        let e = (w[i * k + j] - d[i * k + j]).abs();
                        assert!(
                            e <= bound,
                            "bits {bits} sym {symmetric} group {group}: w[{i}][{j}] = {} -> {}, error {e} > {bound}",
                            w[i * k + j],
                            d[i * k + j]
                        );
                    }
                    if symmetric {
                        let half = 1u8 << (bits - 1);
                        for g in 0..gpr {
                            assert_eq!(t.zeros[i * gpr + g], f32::from(half));
                            let amax = w[i * k + g * group..i * k + (g + 1) * group]
                                .iter()
                                .fold(0f32, |m, v| m.max(v.abs()));
                            assert_eq!(t.scales[i * gpr + g], amax / (half - 1) as f32);
                        }
                    }
                }
                // The all-zero row dequantizes to exact zeros.
                assert!(d[2 * k..3 * k].iter().all(|&v| v == 0.0));
            }
        }
    }
}

#[test]
fn slices_match_the_dequantized_blocks_and_refuse_to_split_groups() {
    let (n, k, g) = (6, 64, 16);
    let w = values(n * k, 7);
    let t = QuantizedTensor::quantize_rtn(&w, n, k, 4, g, false);
    let d = t.dequantize();
    let rows = t.slice_rows(2..5).unwrap();
    rows.validate("rows").unwrap();
    assert_eq!(rows.dequantize(), d[2 * k..5 * k]);
    let cols = t.slice_cols(16..48).unwrap();
    cols.validate("cols").unwrap();
    let want: Vec<f32> = (0..n).flat_map(|i| d[i * k + 16..i * k + 48].to_vec()).collect();
    assert_eq!(cols.dequantize(), want);

    let e = err_of(t.slice_cols(0..24));
    assert!(e.contains("would split a quantization group"), "{e}");
    assert!(e.contains("tensor-parallel degree"), "{e}");
    let e = err_of(t.slice_cols(8..32));
    assert!(e.contains("would split a quantization group"), "{e}");
    assert!(t.slice_cols(0..80).is_err());
    assert!(t.slice_rows(4..7).is_err());

    // Per channel: any column range, per channel again.
    let pc = QuantizedTensor::quantize_rtn(&w, n, k, 8, k, true);
    let s = pc.slice_cols(5..29).unwrap();
    s.validate("per channel").unwrap();
    assert_eq!(s.group_size, 24);
    let pd = pc.dequantize();
    let want: Vec<f32> = (0..n).flat_map(|i| pd[i * k + 5..i * k + 29].to_vec()).collect();
    assert_eq!(s.dequantize(), want);
}

#[test]
fn stacked_rows_dequantize_to_the_stacked_weights() {
    let (k, g) = (64, 32);
    let a = QuantizedTensor::quantize_rtn(&values(3 * k, 1), 3, k, 4, g, true);
    let b = QuantizedTensor::quantize_rtn(&values(5 * k, 2), 5, k, 4, g, true);
    let ab = QuantizedTensor::concat_rows(&[a.clone(), b.clone()]).unwrap();
    ab.validate("ab").unwrap();
    assert_eq!(ab.n, 8);
    assert_eq!(ab.dequantize(), [a.dequantize(), b.dequantize()].concat());
    let other = QuantizedTensor::quantize_rtn(&values(2 * k, 3), 2, k, 8, g, true);
    assert!(err_of(QuantizedTensor::concat_rows(&[a, other])).contains("cannot stack"));
    assert!(QuantizedTensor::concat_rows(&[]).is_err());
}

#[test]
fn validate_names_the_tensor_and_the_problem() {
    let t = QuantizedTensor::quantize_rtn(&values(4 * 32, 3), 4, 32, 4, 16, true);
    let mut bad = t.clone();
    bad.q[5] = 16;
    let e = err_of(bad.validate("layers.0.q_proj"));
    assert!(e.contains("layers.0.q_proj") && e.contains("q[5] = 16"), "{e}");
    let mut bad = t.clone();
    bad.zeros.pop();
    let e = err_of(bad.validate("x"));
    assert!(e.contains("zeros") && e.contains("expected"), "{e}");
    let mut bad = t.clone();
    bad.group_size = 12;
    assert!(err_of(bad.validate("x")).contains("does not divide"));
    let mut bad = t.clone();
    bad.bits = 3;
    assert!(err_of(bad.validate("x")).contains("bits = 3"));
    let mut bad = t;
    bad.scales[0] = f32::NAN;
    assert!(err_of(bad.validate("x")).contains("not finite"));
}

// ---------------------------------------------------------------- config

fn scheme(qc: Value) -> anyhow::Result<Option<QuantScheme>> {
    read_quantization(&json!({ "hidden_size": 64, "quantization_config": qc }))
}

fn ct_config(weights: Value, format: &str) -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": null}},
        "ignore": ["lm_head", "re:.*mlp\\.down_proj$", "model.layers.1.self_attn.o_proj"],
    })
}

#[test]
fn reads_supported_configs() {
    assert_eq!(read_quantization(&json!({"hidden_size": 64})).unwrap(), None);
    let s = scheme(json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true, "sym": true}))
        .unwrap()
        .unwrap();
    assert_eq!(
        s.format,
        QuantFormat::Gptq {
            desc_act: true,
            zero_minus_one: true
        }
    );
    assert_eq!((s.bits, s.granularity), (4, Granularity::Group(128)));
    assert!(s.is_quantized("model.layers.0.mlp.down_proj") && !s.is_quantized("lm_head"));
    let s = scheme(json!({"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}))
        .unwrap()
        .unwrap();
    assert_eq!(s.granularity, Granularity::Channel);
    assert_eq!(s.group_size_for(96), 96);
    assert!(matches!(
        s.format,
        QuantFormat::Gptq {
            zero_minus_one: false,
            ..
        }
    ));

    let s = scheme(
        json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
                          "version": "GEMM", "modules_to_not_convert": ["visual"]}),
    )
    .unwrap()
    .unwrap();
    assert_eq!(s.format, QuantFormat::AwqGemm);
    assert!(!s.is_quantized("model.visual.blocks.0.proj") && s.is_quantized("model.layers.3.mlp.up_proj"));

    let w = json!({"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group", "group_size": 32});
    let s = scheme(ct_config(w, "pack-quantized")).unwrap().unwrap();
    assert_eq!(
        (s.format.clone(), s.granularity),
        (QuantFormat::CtPackQuantized, Granularity::Group(32))
    );
    assert!(!s.activations_quantized);
    assert!(!s.is_quantized("lm_head"));
    assert!(!s.is_quantized("model.layers.0.mlp.down_proj"));
    assert!(s.is_quantized("model.layers.0.mlp.down_proj_x") && s.is_quantized("model.layers.0.mlp.gate_proj"));
    assert!(!s.is_quantized("model.layers.1.self_attn.o_proj") && s.is_quantized("model.layers.2.self_attn.o_proj"));

    let mut qc = ct_config(
        json!({"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"}),
        "int-quantized",
    );
    qc["config_groups"]["group_0"]["input_activations"] =
        json!({"num_bits": 8, "type": "int", "strategy": "token", "dynamic": true});
    let s = scheme(qc).unwrap().unwrap();
    assert_eq!((s.format.clone(), s.bits), (QuantFormat::CtIntQuantized, 8));
    assert!(s.activations_quantized);
}

#[test]
fn refuses_unsupported_configs_by_name() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true}),
            "quant_method = \"bitsandbytes\"",
        ),
        (json!({"bits": 4}), "no `quant_method`"),
        (
            json!({"quant_method": "gptq", "bits": 3, "group_size": 128}),
            "bits = 3",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 0}),
            "group_size = 0",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}),
            "checkpoint_format = \"marlin\"",
        ),
        (
            json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv", "zero_point": true}),
            "version = \"gemv\"",
        ),
        (
            json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv_fast"}),
            "\"gemv_fast\"",
        ),
        (json!({"quant_method": "awq", "bits": 8, "group_size": 128}), "bits = 8"),
        (
            json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": false}),
            "zero_point = false",
        ),
        (
            ct_config(
                json!({"num_bits": 8, "type": "float", "strategy": "channel"}),
                "float-quantized",
            ),
            "type = \"float\"",
        ),
        (
            ct_config(
                json!({"num_bits": 4, "type": "int", "strategy": "channel"}),
                "marlin-24",
            ),
            "format = \"marlin-24\"",
        ),
        (
            ct_config(
                json!({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "actorder": "group"}),
                "pack-quantized",
            ),
            "actorder = \"group\"",
        ),
        (
            ct_config(
                json!({"num_bits": 2, "type": "int", "strategy": "channel"}),
                "pack-quantized",
            ),
            "num_bits = 2",
        ),
        (
            ct_config(
                json!({"num_bits": 4, "type": "int", "strategy": "block"}),
                "pack-quantized",
            ),
            "strategy = \"block\"",
        ),
    ];
    for (qc, want) in cases {
        let e = err_of(scheme(qc.clone()));
        assert!(e.contains(want), "config {qc}: error {e:?} does not contain {want:?}");
    }
    let mut two = ct_config(
        json!({"num_bits": 4, "type": "int", "strategy": "channel"}),
        "pack-quantized",
    );
    two["config_groups"]["group_1"] = two["config_groups"]["group_0"].clone();
    assert!(err_of(scheme(two)).contains("2 groups"));
    let mut kv = ct_config(
        json!({"num_bits": 4, "type": "int", "strategy": "channel"}),
        "pack-quantized",
    );
    kv["kv_cache_scheme"] = json!({"num_bits": 8, "type": "float"});
    assert!(err_of(scheme(kv)).contains("kv_cache_scheme"));
    let mut re = ct_config(
        json!({"num_bits": 4, "type": "int", "strategy": "channel"}),
        "pack-quantized",
    );
    re["ignore"] = json!(["re:.*(gate|up)_proj"]);
    assert!(err_of(scheme(re)).contains("regex feature"));
}

// ---------------------------------------------------------------- loader errors, by hand

struct Owned(Vec<(String, Dtype, Vec<usize>, Vec<u8>)>);

impl Owned {
    fn bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = self
            .0
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }
}

fn i32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()
}

/// A GPTQ 4-bit [n=8, k=16] linear, group 8: codes q[i][j] = (i + j) % 16, v1 zeros 8.
fn gptq_tensors() -> Owned {
    let (n, k) = (8, 16);
    let mut qweight = vec![0u32; 2 * n];
    for j in 0..k {
        for i in 0..n {
            qweight[(j / 8) * n + i] |= (((i + j) % 16) as u32) << (4 * (j % 8));
        }
    }
    let qzeros = vec![0x7777_7777u32; 2]; // stored 7 = zero 8 (v1)
    let scales: Vec<f32> = (0..2 * n).map(|x| 0.5 + x as f32 / 16.0).collect();
    Owned(vec![
        ("l.qweight".into(), Dtype::I32, vec![2, n], i32_bytes(&qweight)),
        ("l.qzeros".into(), Dtype::I32, vec![2, 1], i32_bytes(&qzeros)),
        ("l.scales".into(), Dtype::F16, vec![2, n], f16_bytes(&scales)),
    ])
}

fn gptq_scheme(group: i64) -> QuantScheme {
    scheme(json!({"quant_method": "gptq", "bits": 4, "group_size": group, "sym": true}))
        .unwrap()
        .unwrap()
}

#[test]
fn gptq_by_hand_and_its_errors() {
    let bytes = gptq_tensors().bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = load_quantized(&st, "l", &gptq_scheme(8), 8, 16).unwrap();
    for i in 0..8 {
        for j in 0..16 {
            assert_eq!(t.q[i * 16 + j] as usize, (i + j) % 16);
        }
        for g in 0..2 {
            assert_eq!(t.zeros[i * 2 + g], 8.0);
            // scales [groups, n] → canonical [n, groups]
            assert_eq!(t.scales[i * 2 + g], 0.5 + (g * 8 + i) as f32 / 16.0);
        }
    }

    // Group size that does not divide k.
    let e = err_of(load_quantized(&st, "l", &gptq_scheme(6), 8, 16));
    assert!(e.contains("group_size 6 does not divide"), "{e}");
    // Shape from config.json that disagrees with the tensors.
    let e = err_of(load_quantized(&st, "l", &gptq_scheme(8), 16, 16));
    assert!(e.contains("`l.qweight` has shape [2, 8], expected [2, 16]"), "{e}");
    // Missing tensor.
    let e = err_of(load_quantized(&st, "m", &gptq_scheme(8), 8, 16));
    assert!(e.contains("no tensor `m.qweight`"), "{e}");

    // Wrong dtype.
    let mut o = gptq_tensors();
    o.0[2].1 = Dtype::I16;
    let bytes = o.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let e = err_of(load_quantized(&st, "l", &gptq_scheme(8), 8, 16));
    assert!(e.contains("`l.scales` is stored as I16"), "{e}");

    // v1 stored zero 15 = zero 16: not representable in 4 bits.
    let mut o = gptq_tensors();
    o.0[1].3 = i32_bytes(&[0x7777_777f, 0x7777_7777]);
    let bytes = o.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let e = err_of(load_quantized(&st, "l", &gptq_scheme(8), 8, 16));
    assert!(
        e.contains("`l.qzeros`") && e.contains("zero point 16") && e.contains("gptq_v2"),
        "{e}"
    );

    // A g_idx that is not a group partition of the right sizes.
    let mut o = gptq_tensors();
    let g_idx: Vec<u32> = (0..16).map(|j| u32::from(j < 4)).collect();
    o.0.push(("l.g_idx".into(), Dtype::I32, vec![16], i32_bytes(&g_idx)));
    let bytes = o.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let e = err_of(load_quantized(&st, "l", &gptq_scheme(8), 8, 16));
    assert!(
        e.contains("`l.g_idx`") && e.contains("group 0 has 12 input columns"),
        "{e}"
    );

    // A real permutation: refused by load_quantized, permuted by load_quantized_act_order.
    let mut o = gptq_tensors();
    let g_idx: Vec<u32> = (0..16).map(|j| (j % 2) as u32).collect();
    o.0.push(("l.g_idx".into(), Dtype::I32, vec![16], i32_bytes(&g_idx)));
    let bytes = o.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let e = err_of(load_quantized(&st, "l", &gptq_scheme(8), 8, 16));
    assert!(e.contains("act-order") && e.contains("load_quantized_act_order"), "{e}");
    let (t, perm) = load_quantized_act_order(&st, "l", &gptq_scheme(8), 8, 16).unwrap();
    let perm = perm.unwrap();
    assert_eq!(perm, [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]);
    for i in 0..8 {
        for (p, &j) in perm.iter().enumerate() {
            assert_eq!(t.q[i * 16 + p] as usize, (i + j as usize) % 16);
        }
    }
}

#[test]
fn awq_pack_order_by_hand() {
    // One word per row holding nibbles 0..7 in storage order: output column o of the block
    // is in nibble [0, 4, 1, 5, 2, 6, 3, 7][o] (AutoAWQ packs columns [0, 2, 4, 6, 1, 3, 5, 7]).
    let (n, k) = (8, 4);
    let word = 0x7654_3210u32;
    let o = Owned(vec![
        ("a.qweight".into(), Dtype::I32, vec![k, 1], i32_bytes(&[word; 4])),
        ("a.qzeros".into(), Dtype::I32, vec![1, 1], i32_bytes(&[word])),
        (
            "a.scales".into(),
            Dtype::F32,
            vec![1, n],
            (0..n).flat_map(|x| (x as f32).to_le_bytes()).collect(),
        ),
    ]);
    let bytes = o.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let s = scheme(json!({"quant_method": "awq", "bits": 4, "group_size": -1, "version": "gemm"}))
        .unwrap()
        .unwrap();
    let t = load_quantized(&st, "a", &s, n, k).unwrap();
    let want = [0u8, 4, 1, 5, 2, 6, 3, 7];
    for (i, &w) in want.iter().enumerate() {
        assert!(t.q[i * k..(i + 1) * k].iter().all(|&q| q == w));
        assert_eq!(t.zeros[i], f32::from(w));
        assert_eq!(t.scales[i], i as f32);
    }
}

#[test]
fn ct_int8_with_bf16_scales_and_zero_points() {
    let (n, k) = (2, 4);
    let w: Vec<u8> = [-128i8, -1, 0, 127, 5, 6, 7, 8].iter().map(|&x| x as u8).collect();
    let scales: Vec<u8> = [0.25f32, 3.0]
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect();
    let o = Owned(vec![
        ("c.weight".into(), Dtype::I8, vec![n, k], w),
        ("c.weight_scale".into(), Dtype::BF16, vec![n, 1], scales),
        (
            "c.weight_zero_point".into(),
            Dtype::I8,
            vec![n, 1],
            vec![0u8, (-3i8) as u8],
        ),
    ]);
    let bytes = o.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let s = scheme(ct_config(
        json!({"num_bits": 8, "type": "int", "symmetric": false, "strategy": "channel"}),
        "int-quantized",
    ))
    .unwrap()
    .unwrap();
    let t = load_quantized(&st, "c", &s, n, k).unwrap();
    assert_eq!(t.dequantize(), [-32.0, -0.25, 0.0, 31.75, 24.0, 27.0, 30.0, 33.0]);
    // int8 weight stored as i32: refused by name.
    let o = Owned(vec![("c.weight".into(), Dtype::I32, vec![n, k], vec![0; 32])]);
    let bytes = o.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let e = err_of(load_quantized(&st, "c", &s, n, k));
    assert!(e.contains("`c.weight` is stored as I32"), "{e}");
}

// ---------------------------------------------------------------- against the numpy tool

/// Runs the tool on reference model `model`, loads every quantized linear it wrote and
/// checks that it dequantizes exactly to the tool's reference weights.
fn check_format(model: &str, args: &[&str]) {
    let src = ref_model(model);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(python())
        .arg(repo_root().join("scripts/quantize-formats.py"))
        .arg(&src)
        .arg(dir.path())
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "quantize-formats.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    let scheme = read_quantization(&config).unwrap().expect("quantization_config");
    let act_order = matches!(scheme.format, QuantFormat::Gptq { desc_act: true, .. });
    let ck = crate::weights::Checkpoint::open(dir.path()).unwrap();
    let ref_bytes = std::fs::read(dir.path().join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&ref_bytes).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    assert_eq!(reference.len(), 7 * layers, "{args:?}: one reference per linear");

    for (name, view) in reference.tensors() {
        let prefix = name.strip_suffix(".weight").unwrap();
        assert!(scheme.is_quantized(prefix), "{prefix} should be quantized");
        let (n, k) = (view.shape()[0], view.shape()[1]);
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let (t, perm) = load_quantized_act_order(&ck, prefix, &scheme, n, k)
            .unwrap_or_else(|e| panic!("{args:?}: {prefix}: {e:#}"));
        let got = t.dequantize();
        let perm = match perm {
            Some(p) => {
                assert!(act_order, "{args:?}: {prefix}: a permutation without desc_act");
                let e = err_of(load_quantized(&ck, prefix, &scheme, n, k));
                assert!(e.contains("load_quantized_act_order"), "{e}");
                let mut sorted = p.clone();
                sorted.sort_unstable();
                assert!(sorted.iter().enumerate().all(|(a, &b)| a == b as usize));
                p
            }
            None => {
                // Act order with static groups keeps the groups contiguous.
                let static_groups = config["quantization_config"]["static_groups"] == true;
                assert!(
                    !act_order || static_groups,
                    "{args:?}: {prefix}: desc_act but a trivial g_idx"
                );
                (0..k as u32).collect()
            }
        };
        for i in 0..n {
            for (p, &j) in perm.iter().enumerate() {
                let (g, w) = (got[i * k + p], want[i * k + j as usize]);
                assert!(
                    g == w,
                    "{args:?}: {prefix}[{i}][{j}]: loaded {g}, reference {w} (canonical column {p})"
                );
            }
        }
        // Tensor parallelism over 2 ranks: halves of the rows and, group-aligned, columns.
        let rows = t.slice_rows(0..n / 2).unwrap().dequantize();
        assert_eq!(rows, got[..(n / 2) * k]);
        if (k / 2).is_multiple_of(t.group_size) || t.group_size == k {
            let cols = t.slice_cols(k / 2..k).unwrap().dequantize();
            let want: Vec<f32> = (0..n).flat_map(|i| got[i * k + k / 2..(i + 1) * k].to_vec()).collect();
            assert_eq!(cols, want);
        }
    }
    // The float tensors are kept.
    assert!(!scheme.is_quantized("lm_head"));
    for name in ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"] {
        let t = ck.raw(name).unwrap_or_else(|| panic!("{args:?}: {name} missing"));
        assert_eq!(t.dtype, Dtype::F32, "{name}");
    }
}

#[test]
fn quantized_gptq_matches_the_tool() {
    check_format("tiny", &["--format", "gptq"]);
    check_format(
        "odd",
        &["--format", "gptq", "--bits", "8", "--asym", "--group-size", "32"],
    );
    check_format("odd", &["--format", "gptq", "--group-size", "-1"]);
}

#[test]
fn quantized_gptq_desc_act_matches_the_tool() {
    check_format("tiny", &["--format", "gptq-desc-act"]);
    check_format("odd", &["--format", "gptq-desc-act", "--sym", "--group-size", "32"]);
}

#[test]
fn quantized_gptq_calibrated_matches_the_tool() {
    // Codes from the tool's GPTQ (calibrated on arbitrary token ids): act order as a
    // g_idx permutation, and with static groups (desc_act, trivial g_idx).
    let dir = tempfile::tempdir().unwrap();
    let cal = sirocco_testkit::arbitrary_calibration(dir.path(), 4, 40);
    let cal = cal.to_str().unwrap();
    check_format("odd", &["--format", "gptq-desc-act", "--gptq-calibration", cal]);
    check_format(
        "odd",
        &[
            "--format",
            "gptq",
            "--group-size",
            "32",
            "--gptq-calibration",
            cal,
            "--act-order",
        ],
    );
    check_format(
        "odd",
        &[
            "--format",
            "ct-w4a16",
            "--asym",
            "--group-size",
            "16",
            "--gptq-calibration",
            cal,
            "--act-order",
        ],
    );
}

#[test]
fn quantized_awq_matches_the_tool() {
    check_format("tiny", &["--format", "awq"]);
    check_format("odd", &["--format", "awq", "--group-size", "16"]);
}

#[test]
fn quantized_ct_w4a16_matches_the_tool() {
    check_format("tiny", &["--format", "ct-w4a16"]);
    check_format("odd", &["--format", "ct-w4a16", "--asym", "--group-size", "16"]);
    check_format(
        "odd",
        &["--format", "ct-w4a16", "--bits", "8", "--asym", "--group-size", "-1"],
    );
}

#[test]
fn quantized_ct_int8_matches_the_tool() {
    check_format("tiny", &["--format", "ct-int8"]);
    check_format("odd", &["--format", "ct-int8", "--asym", "--group-size", "32"]);
}

/// A row-parallel rank gets the act-order groups that read only its input features,
/// renumbered from its first feature; a group that reads two ranks' features refuses.
#[test]
fn act_order_shares_follow_the_ranks_features() {
    let (n, k, gs) = (3, 16, 4);
    let w = values(n * k, 5);
    let t = QuantizedTensor::quantize_rtn(&w, n, k, 4, gs, false);
    // Groups 0 and 2 read features 8..16 (reversed), groups 1 and 3 features 0..8.
    let perm: Vec<u32> = [15, 14, 13, 12, 0, 2, 4, 6, 11, 10, 9, 8, 1, 3, 5, 7].to_vec();
    let (low, low_perm) = act_order_share(&t, &perm, 0..8).unwrap();
    assert_eq!(low_perm, [0, 2, 4, 6, 1, 3, 5, 7]);
    assert_eq!(low.k, 8);
    let (high, high_perm) = act_order_share(&t, &perm, 8..16).unwrap();
    assert_eq!(high_perm, [7, 6, 5, 4, 3, 2, 1, 0]);
    // Each share's columns are the selected groups' columns, scales and zeros.
    let gpr = k / gs;
    for i in 0..n {
        for (local, g) in [(0, 1), (1, 3)] {
            assert_eq!(
                low.q[i * 8 + local * gs..i * 8 + (local + 1) * gs],
                t.q[i * k + g * gs..i * k + (g + 1) * gs]
            );
            assert_eq!(low.scales[i * 2 + local], t.scales[i * gpr + g]);
            assert_eq!(low.zeros[i * 2 + local], t.zeros[i * gpr + g]);
        }
    }
    assert_eq!(high.dequantize().len(), n * 8);
    assert!(act_order_share(&t, &perm, 0..4).is_none());
}
