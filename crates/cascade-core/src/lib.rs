//! Cascade's request pipeline, in process: user state → retrieval (HNSW with
//! the user's seen-set Bloom filter and request exclusions applied inside the
//! graph walk, popularity filling any shortfall) → ranking → top-k.
//!
//! This is the core the gRPC handlers will stay thin over; it has no network
//! code. Every request-path failure is an [`EngineError`], never a panic.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use cascade_data::Item;
use cascade_model::nn::PairInputs;
use cascade_train::eval::CascadeWeights;
use cascade_train::features::Tables;
use cascade_train::pipeline::{Artifact, VECTORS_FILE};
use fastbloom::BloomFilter;

/// False-positive rate the per-user seen-set filters are sized for: about one
/// in a hundred unseen items is wrongly skipped, never a seen one shown.
pub const SEEN_FILTER_FP_RATE: f64 = 0.01;
/// Upper bound on `num_results`.
pub const MAX_RESULTS: usize = 1000;
/// Upper bound on `num_candidates`.
pub const MAX_CANDIDATES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed; `field` names the offending field.
    #[error("invalid `{field}`: {msg}")]
    InvalidArgument { field: &'static str, msg: String },
    #[error("loading artifact: {0}")]
    Load(#[from] cascade_train::TrainError),
    #[error("loading artifact: {0}")]
    Data(#[from] cascade_data::DataError),
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
}

fn invalid(field: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument {
        field,
        msg: msg.into(),
    }
}

#[derive(Debug, Clone)]
pub struct PredictRequest {
    pub user_id: String,
    /// Items to return, 1..=[`MAX_RESULTS`].
    pub num_results: usize,
    /// Retrieved candidates to rank, `num_results`..=[`MAX_CANDIDATES`]; 0 means the artifact's default.
    pub num_candidates: usize,
    /// Never returned. Unknown IDs are ignored (they cannot be returned anyway).
    pub exclude_item_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScoredItem {
    pub item_id: String,
    pub title: String,
    /// The cascade's ordering score (higher is better); on the cold-start
    /// path, the item's training interaction count.
    pub score: f32,
    /// Two-tower cosine between user and item (NaN on the cold-start path).
    pub retrieval_score: f32,
    /// The ranker's rating head (NaN on the cold-start path).
    pub predicted_rating: f32,
}

/// Microseconds spent per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub user_state_us: u64,
    pub retrieval_us: u64,
    pub ranking_us: u64,
    pub total_us: u64,
}

#[derive(Debug, Clone)]
pub struct PredictResponse {
    pub items: Vec<ScoredItem>,
    /// True when the user is unknown and popularity answered.
    pub cold_start: bool,
    pub model_version: String,
    pub timings: StageTimings,
}

pub struct Engine {
    artifact: Artifact,
    tables: Tables,
    items: Vec<Item>,
    user_index: HashMap<String, u32>,
    item_index: HashMap<String, u32>,
    seen: Vec<BloomFilter>,
    /// Item indices by training popularity, most popular first (ties: lower index).
    popular: Vec<u32>,
    weights: CascadeWeights,
    device: Device,
}

impl Engine {
    /// Load and verify an artifact directory and build the serving state.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EngineError> {
        let artifact = Artifact::load(dir, device)?;
        let (items, item_index) = cascade_data::format::read_items(&dir.join("items.csv"))?;
        let vectors = candle_core::safetensors::load(dir.join(VECTORS_FILE), &Device::Cpu)?;
        let text: Vec<Vec<f32>> = vectors
            .get("item_text")
            .ok_or_else(|| invalid("artifact", format!("{VECTORS_FILE} lacks item_text")))?
            .to_vec2()?;
        let tables = Tables::build(&artifact.space, &items, &text, device)?;
        let space = &artifact.space;
        let user_index = space
            .user_ids
            .iter()
            .enumerate()
            .map(|(i, u)| (u.clone(), i as u32))
            .collect();
        let seen = space
            .user_seen
            .iter()
            .map(|s| {
                let mut f = BloomFilter::with_false_pos(SEEN_FILTER_FP_RATE)
                    .seed(&0x5eed)
                    .expected_items(s.len().max(16));
                for i in s {
                    f.insert(i);
                }
                f
            })
            .collect();
        let mut popular: Vec<u32> = (0..items.len() as u32).collect();
        popular.sort_by(|&a, &b| {
            space.item_popularity[b as usize]
                .cmp(&space.item_popularity[a as usize])
                .then(a.cmp(&b))
        });
        let weights = artifact.serving.cascade_weights;
        Ok(Self {
            artifact,
            tables,
            items,
            user_index,
            item_index,
            seen,
            popular,
            weights,
            device: device.clone(),
        })
    }

    /// (users, items, embedding dimension) of the loaded model.
    pub fn shape(&self) -> (usize, usize, usize) {
        let m = &self.artifact.manifest;
        (m.num_users, m.num_items, m.embedding_dim)
    }

    pub fn model_version(&self) -> &str {
        &self.artifact.manifest.model_version
    }

    pub fn predict(&self, req: &PredictRequest) -> Result<PredictResponse, EngineError> {
        let t0 = Instant::now();
        if req.user_id.trim().is_empty() {
            return Err(invalid("user_id", "must not be empty"));
        }
        if req.num_results == 0 || req.num_results > MAX_RESULTS {
            return Err(invalid(
                "num_results",
                format!("must be in 1..={MAX_RESULTS}, got {}", req.num_results),
            ));
        }
        let n_cand = if req.num_candidates == 0 {
            self.artifact.serving.candidates
        } else {
            req.num_candidates
        };
        if n_cand > MAX_CANDIDATES {
            return Err(invalid(
                "num_candidates",
                format!("must be at most {MAX_CANDIDATES}, got {n_cand}"),
            ));
        }
        let n_cand = n_cand.max(req.num_results);
        let exclude: HashSet<u32> = req
            .exclude_item_ids
            .iter()
            .filter_map(|id| self.item_index.get(id).copied())
            .collect();

        let Some(&u) = self.user_index.get(&req.user_id) else {
            // Cold start: the most popular items not excluded.
            let items = self
                .popular
                .iter()
                .filter(|i| !exclude.contains(i))
                .take(req.num_results)
                .map(|&i| {
                    self.scored(
                        i,
                        self.artifact.space.item_popularity[i as usize] as f32,
                        f32::NAN,
                        f32::NAN,
                    )
                })
                .collect();
            let total_us = t0.elapsed().as_micros() as u64;
            return Ok(PredictResponse {
                items,
                cold_start: true,
                model_version: self.model_version().to_string(),
                timings: StageTimings {
                    total_us,
                    ..Default::default()
                },
            });
        };

        // User state: the user tower over features and recent history.
        let uidx = Tensor::new(&[u], &self.device)?;
        let user_vec: Vec<f32> = self
            .artifact
            .two_tower
            .user(&self.tables.users(&uidx)?)?
            .flatten_all()?
            .to_vec1()?;
        let t_user = t0.elapsed();

        // Retrieval: the seen-set filter and exclusions are the HNSW search predicate.
        let seen = &self.seen[u as usize];
        let keep = |i: usize| !exclude.contains(&(i as u32)) && !seen.contains(&(i as u32));
        let mut cands: Vec<u32> = self
            .artifact
            .index
            .search(&user_vec, n_cand, Some(&keep))
            .iter()
            .map(|h| h.item as u32)
            .collect();
        if cands.len() < req.num_results {
            let have: HashSet<u32> = cands.iter().copied().collect();
            let fill: Vec<u32> = self
                .popular
                .iter()
                .copied()
                .filter(|&i| keep(i as usize) && !have.contains(&i))
                .take(req.num_results - cands.len())
                .collect();
            cands.extend(fill);
        }
        let t_retr = t0.elapsed();

        // Ranking: one batched forward over all candidates.
        let n = cands.len();
        let mut items = Vec::with_capacity(n);
        if n > 0 {
            let tt: Vec<f32> = cands
                .iter()
                .map(|&i| {
                    self.artifact.item_vectors[i as usize]
                        .iter()
                        .zip(&user_vec)
                        .map(|(a, b)| a * b)
                        .sum()
                })
                .collect();
            let users = self
                .tables
                .users(&Tensor::from_vec(vec![u; n], n, &self.device)?)?;
            let item_in =
                self.tables
                    .items
                    .select(&Tensor::from_vec(cands.clone(), n, &self.device)?)?;
            let tt_t = Tensor::from_vec(tt.clone(), (n, 1), &self.device)?;
            let out = self.artifact.ranker.forward(&PairInputs {
                user: &users,
                item: &item_in,
                tt_score: &tt_t,
            })?;
            let rating: Vec<f32> = out.rating.to_vec1()?;
            let engage: Vec<f32> = out.engage.to_vec1()?;
            let mean = self.artifact.space.global_mean_rating;
            for j in 0..n {
                let score = engage[j]
                    + self.weights.rating * (rating[j] - mean)
                    + self.weights.retrieval * tt[j];
                items.push((cands[j], score, tt[j], rating[j]));
            }
            // Best first; ties broken by item index so results are deterministic.
            items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            items.truncate(req.num_results);
        }
        let t_rank = t0.elapsed();
        Ok(PredictResponse {
            items: items
                .into_iter()
                .map(|(i, s, t, r)| self.scored(i, s, t, r))
                .collect(),
            cold_start: false,
            model_version: self.model_version().to_string(),
            timings: StageTimings {
                user_state_us: t_user.as_micros() as u64,
                retrieval_us: (t_retr - t_user).as_micros() as u64,
                ranking_us: (t_rank - t_retr).as_micros() as u64,
                total_us: t_rank.as_micros() as u64,
            },
        })
    }

    fn scored(
        &self,
        i: u32,
        score: f32,
        retrieval_score: f32,
        predicted_rating: f32,
    ) -> ScoredItem {
        let it = &self.items[i as usize];
        let title = match it.year {
            Some(y) => format!("{} ({y})", it.title),
            None => it.title.clone(),
        };
        ScoredItem {
            item_id: it.id.clone(),
            title,
            score,
            retrieval_score,
            predicted_rating,
        }
    }

    /// Items the user interacted with in training (for tests and tools).
    pub fn training_items(&self, user_id: &str) -> Option<Vec<String>> {
        let u = *self.user_index.get(user_id)?;
        Some(
            self.artifact.space.user_seen[u as usize]
                .iter()
                .map(|&i| self.items[i as usize].id.clone())
                .collect(),
        )
    }
}
