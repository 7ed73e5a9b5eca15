//! Dequantisation of every supported ggml type against gguf-py's, on random
//! blocks (tests/fixtures/dequant.json).

mod common;

use common::{f32s, fixture_json};
use pagoda_models::dequant::dequantize;
use pagoda_models::GgmlType;

fn ggml_type(name: &str) -> GgmlType {
    match name {
        "F32" => GgmlType::F32,
        "F16" => GgmlType::F16,
        "BF16" => GgmlType::BF16,
        "Q4_0" => GgmlType::Q4_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q5_0" => GgmlType::Q5_0,
        "Q5_1" => GgmlType::Q5_1,
        "Q8_0" => GgmlType::Q8_0,
        "Q4_K" => GgmlType::Q4_K,
        "Q6_K" => GgmlType::Q6_K,
        other => panic!("fixture type {other}"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn every_type_matches_gguf_py() {
    let fixture = fixture_json("dequant.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let bytes = hex(case["bytes_hex"].as_str().unwrap());
        let want = f32s(&case["values"]);
        let mut got = vec![0f32; want.len()];
        dequantize(name, ggml_type(name), &bytes, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Same formulas in f32; allow one rounding step of difference.
            assert!((g - w).abs() <= w.abs() * 1e-6 + 1e-9, "{name}[{i}]: {g} vs {w}");
        }
    }
}
