//! all-MiniLM-L6-v2 through Candle's BERT: mean pooling over the attention
//! mask, then L2 normalisation — the same three steps sentence-transformers runs.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::ModelError;

/// sentence-transformers' `max_seq_length` for all-MiniLM-L6-v2.
pub const MAX_TOKENS: usize = 256;

pub struct TextEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    pub dim: usize,
}

impl TextEncoder {
    /// Load from a directory holding `config.json`, `tokenizer.json`, `model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let cfg_text =
            std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let config: Config = serde_json::from_str(&cfg_text)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", cfg_path.display())))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", tok_path.display())))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Invalid(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let weights = dir.join("model.safetensors");
        // Read, not memory-mapped: mapping is `unsafe` (another process could
        // change the file under us) and saves nothing, every tensor is copied
        // out of it anyway.
        let bytes = std::fs::read(&weights).map_err(|e| ModelError::io(&weights, e))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)?;
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            dim: config.hidden_size,
        })
    }

    /// Embed one batch: returns `[n, dim]`, rows L2-normalised.
    pub fn embed_batch(&self, texts: &[String]) -> Result<Tensor, ModelError> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Invalid(format!("tokenize: {e}")))?;
        let n = enc.len();
        let len = enc.first().map(|e| e.get_ids().len()).unwrap_or(0);
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        let mut types = Vec::with_capacity(n * len);
        for e in &enc {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
            types.extend_from_slice(e.get_type_ids());
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let types = Tensor::from_vec(types, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // [n, len, dim]
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [n, len, 1]
        let summed = hidden.broadcast_mul(&m)?.sum(1)?; // [n, dim]
        let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?; // [n, 1]
        let mean = summed.broadcast_div(&counts)?;
        Ok(l2_normalize(&mean)?)
    }

    /// Embed many texts in length-sorted batches (less padding), in input order.
    pub fn embed_all(
        &self,
        texts: &[String],
        batch: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(batch.max(1)) {
            let batch_texts: Vec<String> = chunk.iter().map(|&i| texts[i].clone()).collect();
            let rows = self.embed_batch(&batch_texts)?.to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(rows) {
                out[i] = row;
            }
            progress(chunk.len());
        }
        Ok(out)
    }
}

/// Row-wise L2 normalisation with sentence-transformers' epsilon.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}
