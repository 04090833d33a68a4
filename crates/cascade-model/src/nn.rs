//! The trainable models: two-tower retriever, DeepFM-style multi-task ranker,
//! and the plain BPR matrix factorisation baseline. Training loops live in
//! `cascade-train`; these types only own parameters and forward passes, so the
//! server can load exactly the same code path from safetensors.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear, linear_no_bias, Embedding, Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::encoder::l2_normalize;
use crate::ModelError;

/// Shapes of the feature space, shared by both models and stored in the artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDims {
    pub num_users: usize,
    pub num_items: usize,
    /// Vocabulary size per user categorical column (index 0 = missing/unknown).
    pub user_cat_vocab: Vec<usize>,
    pub num_genres: usize,
    pub num_year_buckets: usize,
    pub text_dim: usize,
    /// Length of the recent-history window pooled by the user tower.
    pub history_len: usize,
}

impl FeatureDims {
    pub fn user_cat_total(&self) -> usize {
        self.user_cat_vocab.iter().sum::<usize>().max(1)
    }
}

/// User-side inputs for a batch of `B` users.
pub struct UserInputs {
    /// `[B]` u32 user indices (`num_users` = the unknown user).
    pub ids: Tensor,
    /// `[B, C]` u32 indices into the shared categorical table (already offset per column).
    pub cats: Option<Tensor>,
    /// `[B, L]` u32 item indices of recent history (padding rows use weight 0).
    pub hist: Tensor,
    /// `[B, L]` f32 pooling weights (1/len for real entries, 0 for padding).
    pub hist_w: Tensor,
}

/// Item-side inputs for `N` items.
pub struct ItemInputs {
    /// `[N]` u32 item indices.
    pub ids: Tensor,
    /// `[N, G]` f32 row-normalised genre multi-hot.
    pub genres: Tensor,
    /// `[N]` u32 year bucket.
    pub year: Tensor,
    /// `[N, text_dim]` f32 MiniLM embeddings.
    pub text: Tensor,
}

impl ItemInputs {
    /// Select rows `idx` (`[M]` u32) of every item tensor.
    pub fn select(&self, idx: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            ids: self.ids.index_select(idx, 0)?,
            genres: self.genres.index_select(idx, 0)?,
            year: self.year.index_select(idx, 0)?,
            text: self.text.index_select(idx, 0)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwoTowerConfig {
    pub dim: usize,
    pub hidden: usize,
    /// Softmax temperature over cosine scores.
    pub temperature: f64,
}

impl Default for TwoTowerConfig {
    fn default() -> Self {
        Self {
            dim: 64,
            hidden: 128,
            temperature: 0.07,
        }
    }
}

pub struct TwoTower {
    pub cfg: TwoTowerConfig,
    user_id: Embedding,
    user_cat: Embedding,
    hist: Embedding,
    user_l1: Linear,
    user_l2: Linear,
    item_id: Embedding,
    text_proj: Linear,
    genre: Linear,
    year: Embedding,
    item_l1: Linear,
    item_l2: Linear,
}

fn pooled_cats(
    table: &Embedding,
    cats: &Option<Tensor>,
    b: usize,
    d: usize,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    match cats {
        Some(c) => table.forward(c)?.sum(1),
        None => Tensor::zeros((b, d), DType::F32, dev),
    }
}

impl TwoTower {
    pub fn new(
        vb: VarBuilder,
        dims: &FeatureDims,
        cfg: &TwoTowerConfig,
    ) -> candle_core::Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            cfg: cfg.clone(),
            user_id: embedding(dims.num_users + 1, d, vb.pp("user_id_emb"))?,
            user_cat: embedding(dims.user_cat_total(), d, vb.pp("user_cat_emb"))?,
            hist: embedding(dims.num_items, d, vb.pp("hist_emb"))?,
            user_l1: linear(3 * d, cfg.hidden, vb.pp("user_l1"))?,
            user_l2: linear(cfg.hidden, d, vb.pp("user_l2"))?,
            item_id: embedding(dims.num_items, d, vb.pp("item_id_emb"))?,
            text_proj: linear(dims.text_dim, d, vb.pp("text_proj"))?,
            genre: linear_no_bias(dims.num_genres.max(1), d, vb.pp("genre_proj"))?,
            year: embedding(dims.num_year_buckets.max(1), d, vb.pp("year_emb"))?,
            item_l1: linear(4 * d, cfg.hidden, vb.pp("item_l1"))?,
            item_l2: linear(cfg.hidden, d, vb.pp("item_l2"))?,
        })
    }

    /// `[B, dim]` L2-normalised user vectors.
    pub fn user(&self, u: &UserInputs) -> candle_core::Result<Tensor> {
        let (b, d) = (u.ids.dim(0)?, self.cfg.dim);
        let id = self.user_id.forward(&u.ids)?;
        let cats = pooled_cats(&self.user_cat, &u.cats, b, d, u.ids.device())?;
        // Weighted mean of the history rows as a batched [1, L] x [L, D]
        // product: a sum over the middle axis is a strided reduction in
        // Candle's CPU backend, several times slower forward and backward.
        let hist = u
            .hist_w
            .unsqueeze(1)?
            .matmul(&self.hist.forward(&u.hist)?)?
            .squeeze(1)?;
        let x = Tensor::cat(&[id, cats, hist], 1)?;
        l2_normalize(&self.user_l2.forward(&self.user_l1.forward(&x)?.relu()?)?)
    }

    /// `[N, dim]` L2-normalised item vectors.
    pub fn item(&self, it: &ItemInputs) -> candle_core::Result<Tensor> {
        let x = Tensor::cat(
            &[
                self.item_id.forward(&it.ids)?,
                self.text_proj.forward(&it.text)?,
                self.genre.forward(&it.genres)?,
                self.year.forward(&it.year)?,
            ],
            1,
        )?;
        l2_normalize(&self.item_l2.forward(&self.item_l1.forward(&x)?.relu()?)?)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankerConfig {
    /// Per-field embedding width.
    pub field_dim: usize,
    pub hidden: [usize; 2],
}

impl Default for RankerConfig {
    fn default() -> Self {
        Self {
            field_dim: 16,
            hidden: [128, 64],
        }
    }
}

/// Ranker outputs for a batch of (user, item) pairs.
pub struct RankerOut {
    /// `[B]` predicted rating.
    pub rating: Tensor,
    /// `[B]` engagement logit (will this user interact with this item?).
    pub engage: Tensor,
}

/// DeepFM-style multi-task ranker. Fields: user ID, each user categorical,
/// item ID, genres, year, projected MiniLM text, and the two-tower score.
/// Rating = global mean + user/item biases + FM pairwise term + deep head;
/// engagement = item engagement bias + deep head. See `docs/models.md`.
pub struct Ranker {
    pub cfg: RankerConfig,
    pub global_mean: f32,
    pub(crate) n_cat_cols: usize,
    pub(crate) user_id: Embedding,
    pub(crate) user_cat: Embedding,
    pub(crate) item_id: Embedding,
    pub(crate) genre: Linear,
    pub(crate) year: Embedding,
    pub(crate) text: Linear,
    pub(crate) tt: Linear,
    pub(crate) user_bias: Embedding,
    pub(crate) item_bias: Embedding,
    pub(crate) item_engage_bias: Embedding,
    pub(crate) l1: Linear,
    pub(crate) l2: Linear,
    pub(crate) head: Linear,
}

pub struct PairInputs<'a> {
    pub user: &'a UserInputs,
    pub item: &'a ItemInputs,
    /// `[B, 1]` two-tower score of each pair.
    pub tt_score: &'a Tensor,
}

impl Ranker {
    pub fn new(
        vb: VarBuilder,
        dims: &FeatureDims,
        cfg: &RankerConfig,
        global_mean: f32,
    ) -> candle_core::Result<Self> {
        let k = cfg.field_dim;
        let n_fields = 6 + dims.user_cat_vocab.len();
        Ok(Self {
            cfg: cfg.clone(),
            global_mean,
            n_cat_cols: dims.user_cat_vocab.len(),
            user_id: embedding(dims.num_users + 1, k, vb.pp("user_id_emb"))?,
            user_cat: embedding(dims.user_cat_total(), k, vb.pp("user_cat_emb"))?,
            item_id: embedding(dims.num_items, k, vb.pp("item_id_emb"))?,
            genre: linear_no_bias(dims.num_genres.max(1), k, vb.pp("genre_proj"))?,
            year: embedding(dims.num_year_buckets.max(1), k, vb.pp("year_emb"))?,
            text: linear_no_bias(dims.text_dim, k, vb.pp("text_proj"))?,
            tt: linear_no_bias(1, k, vb.pp("tt_proj"))?,
            user_bias: embedding(dims.num_users + 1, 1, vb.pp("user_bias_emb"))?,
            item_bias: embedding(dims.num_items, 1, vb.pp("item_bias_emb"))?,
            item_engage_bias: embedding(dims.num_items, 1, vb.pp("item_engage_bias_emb"))?,
            l1: linear(n_fields * k, cfg.hidden[0], vb.pp("deep_l1"))?,
            l2: linear(cfg.hidden[0], cfg.hidden[1], vb.pp("deep_l2"))?,
            head: linear(cfg.hidden[1], 2, vb.pp("head"))?,
        })
    }

    pub fn forward(&self, p: &PairInputs) -> candle_core::Result<RankerOut> {
        let u = p.user;
        let b = u.ids.dim(0)?;
        let mut fields = vec![self.user_id.forward(&u.ids)?.unsqueeze(1)?];
        if let (Some(c), true) = (&u.cats, self.n_cat_cols > 0) {
            fields.push(self.user_cat.forward(c)?); // [B, C, k]
        }
        for f in [
            self.item_id.forward(&p.item.ids)?,
            self.genre.forward(&p.item.genres)?,
            self.year.forward(&p.item.year)?,
            self.text.forward(&p.item.text)?,
            self.tt.forward(p.tt_score)?,
        ] {
            fields.push(f.unsqueeze(1)?);
        }
        let v = Tensor::cat(&fields, 1)?; // [B, F, k]
        let sum = v.sum(1)?;
        let fm = ((sum.sqr()? - v.sqr()?.sum(1)?)? * 0.5)?.sum(1)?; // [B]
        let deep = self.head.forward(
            &self
                .l2
                .forward(&self.l1.forward(&v.reshape((b, ()))?)?.relu()?)?
                .relu()?,
        )?; // [B, 2]
        let ub = self.user_bias.forward(&u.ids)?.squeeze(1)?;
        let ib = self.item_bias.forward(&p.item.ids)?.squeeze(1)?;
        let rating = (((deep.narrow(1, 0, 1)?.squeeze(1)? + fm)? + ub)? + ib)?
            .affine(1.0, self.global_mean as f64)?;
        let engage = (deep.narrow(1, 1, 1)?.squeeze(1)?
            + self.item_engage_bias.forward(&p.item.ids)?.squeeze(1)?)?;
        Ok(RankerOut { rating, engage })
    }
}

/// Plain matrix factorisation trained with BPR: the baseline row of the table.
pub struct BprMf {
    pub user: Embedding,
    pub item: Embedding,
}

impl BprMf {
    pub fn new(
        vb: VarBuilder,
        num_users: usize,
        num_items: usize,
        dim: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            user: embedding(num_users, dim, vb.pp("user_emb"))?,
            item: embedding(num_items, dim, vb.pp("item_emb"))?,
        })
    }
    /// `[B]` scores of (user, item) pairs.
    pub fn score(&self, users: &Tensor, items: &Tensor) -> candle_core::Result<Tensor> {
        (self.user.forward(users)? * self.item.forward(items)?)?.sum(D::Minus1)
    }
}

/// Re-initialise every variable from a seeded stream so training is
/// reproducible (Candle's CPU RNG cannot be seeded). Embeddings get N(0, 0.05²)
/// (tables named `*_emb`), linear weights Kaiming-uniform, biases zero; bias
/// embeddings start at zero.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<(), ModelError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| ModelError::Invalid("varmap lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // splitmix64: small, fast, good enough for initialisation
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    };
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = if name.contains("bias_emb") || name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains("_emb") {
            // Box-Muller
            (0..n)
                .map(|_| {
                    let (a, b) = (next().max(1e-12), next());
                    ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos() * 0.05) as f32
                })
                .collect()
        } else {
            let fan_in = *dims.last().unwrap_or(&1) as f64;
            let bound = 1.0 / fan_in.sqrt();
            (0..n)
                .map(|_| ((next() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(vals, dims.as_slice(), var.device())?)?;
    }
    Ok(())
}
