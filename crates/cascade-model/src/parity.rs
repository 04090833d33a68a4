//! Cross-device checks: the same computation on two devices must agree, and
//! the encoder's pooling must not depend on where it runs. `cascade
//! gpu-check` uses these on a GPU host; the tests run them CPU against CPU.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use serde::Serialize;

use crate::ModelError;

/// How far two outputs are apart: `max |a - b| / max |a|` (norm-wise, so
/// values near zero cannot inflate it), plus the largest absolute difference.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub what: String,
    pub values: usize,
    pub max_abs_err: f64,
    pub rel_err: f64,
}

pub fn agreement(what: &str, reference: &[f32], other: &[f32]) -> Result<Agreement, ModelError> {
    if reference.len() != other.len() {
        return Err(ModelError::Invalid(format!(
            "{what}: {} values against {}",
            reference.len(),
            other.len()
        )));
    }
    let scale = reference
        .iter()
        .map(|v| v.abs() as f64)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let max_abs = reference
        .iter()
        .zip(other)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        );
    Ok(Agreement {
        what: what.into(),
        values: reference.len(),
        max_abs_err: max_abs,
        rel_err: max_abs / scale,
    })
}

/// all-MiniLM-L6-v2's shape (the weights are not needed to compare devices).
pub fn minilm_config() -> Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
        "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "position_embedding_type": "absolute", "use_cache": true, "classifier_dropout": null,
        "model_type": "bert"
    }))
    .unwrap_or_default()
}

/// Mean pooling over the attention mask, then L2 — the encoder's output step.
pub fn pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&m)?.sum(1)?;
    let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    crate::encoder::l2_normalize(&summed.broadcast_div(&counts)?)
}

/// The MiniLM-shaped encoder with random weights on `a` and, with the very
/// same weights, on `b`; both embed the same random token batch
/// (`batch` × `len`, with padding in every other row). Returns their agreement.
pub fn encoder_agreement(
    a: &Device,
    b: &Device,
    batch: usize,
    len: usize,
    seed: u64,
) -> Result<Agreement, ModelError> {
    let cfg = minilm_config();
    let vm = VarMap::new();
    BertModel::load(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg)?;
    crate::nn::seeded_init(&vm, seed)?;
    let weights: std::collections::HashMap<String, Tensor> = vm
        .data()
        .lock()
        .map_err(|_| ModelError::Invalid("varmap lock poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let mut state = seed | 1;
    let mut next = move |m: u32| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % m as u64) as u32
    };
    let ids: Vec<u32> = (0..batch * len).map(|_| 1000 + next(28_000)).collect();
    let mask: Vec<u32> = (0..batch)
        .flat_map(|r| (0..len).map(move |t| u32::from(r % 2 == 0 || t < len / 2)))
        .collect();
    let run = |dev: &Device| -> Result<Vec<f32>, ModelError> {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, dev);
        let model = BertModel::load(vb, &cfg)?;
        let ids = Tensor::from_vec(ids.clone(), (batch, len), dev)?;
        let types = ids.zeros_like()?;
        let mask = Tensor::from_vec(mask.clone(), (batch, len), dev)?;
        let hidden = model.forward(&ids, &types, Some(&mask))?;
        Ok(pool(&hidden, &mask)?.flatten_all()?.to_vec1()?)
    };
    agreement(
        &format!("MiniLM-shaped encoder, {batch}x{len} tokens"),
        &run(a)?,
        &run(b)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_is_norm_wise_and_catches_differences() {
        let a = [1.0f32, -2.0, 0.0, 4.0];
        let same = agreement("x", &a, &a).unwrap();
        assert_eq!((same.max_abs_err, same.rel_err), (0.0, 0.0));
        let off = agreement("x", &a, &[1.0, -2.0, 0.001, 4.0]).unwrap();
        assert!((off.rel_err - 0.001 / 4.0).abs() < 1e-9, "{off:?}");
        assert!(agreement("x", &a, &[1.0, f32::NAN, 0.0, 4.0])
            .unwrap()
            .rel_err
            .is_infinite());
        assert!(agreement("x", &a, &a[..2]).is_err());
    }

    #[test]
    fn encoder_runs_the_same_on_one_device_twice() {
        // CPU against CPU: the harness itself (weights copied, padding
        // masked, pooling) must give identical results; on a GPU host the
        // same call compares CPU with CUDA.
        let r = encoder_agreement(&Device::Cpu, &Device::Cpu, 4, 16, 3).unwrap();
        assert_eq!(r.values, 4 * 384);
        assert_eq!(r.max_abs_err, 0.0);
    }
}
