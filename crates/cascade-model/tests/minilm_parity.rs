//! Candle's MiniLM output against vectors from the reference
//! sentence-transformers implementation (see the fixture's `produced_by`).
//! Needs the model files: `cascade fetch minilm` (scripts/test.sh does it);
//! `CASCADE_MINILM` points elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::PathBuf;

use cascade_model::encoder::TextEncoder;
use cascade_model::Device;

#[test]
fn candle_minilm_matches_sentence_transformers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::var_os("CASCADE_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("data/minilm"));
    assert!(
        dir.join("model.safetensors").exists(),
        "MiniLM not found in {}: run `cascade fetch minilm` (scripts/test.sh does)",
        dir.display()
    );
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let sentences: Vec<String> = serde_json::from_value(fixture["sentences"].clone()).unwrap();
    let reference: Vec<Vec<f32>> = serde_json::from_value(fixture["vectors"].clone()).unwrap();
    let enc = TextEncoder::load(&dir, &Device::Cpu).unwrap();
    // Batched with padding (the sentences differ in length), as training embeds them.
    let got = enc
        .embed_batch(&sentences)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // And one at a time: padding must not change a sentence's vector.
    let single = enc
        .embed_batch(&sentences[..1])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
        assert_eq!(g.len(), 384);
        let cos: f32 = g.iter().zip(r).map(|(a, b)| a * b).sum::<f32>()
            / (g.iter().map(|a| a * a).sum::<f32>().sqrt()
                * r.iter().map(|a| a * a).sum::<f32>().sqrt());
        assert!(cos >= 0.999, "sentence {i}: cosine {cos}");
        let norm: f32 = g.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "sentence {i} not L2-normalised: {norm}"
        );
    }
    let cos0: f32 = single[0].iter().zip(&got[0]).map(|(a, b)| a * b).sum();
    assert!(cos0 > 0.9999, "padding changed the vector: {cos0}");
    // Different sentences give clearly different vectors (the test can fail on a constant encoder).
    let cross: f32 = got[0].iter().zip(&got[2]).map(|(a, b)| a * b).sum();
    assert!(cross < 0.8, "unrelated sentences too similar: {cross}");
}
