//! Cascade's request pipeline, in process: user state → retrieval (HNSW with
//! the user's seen-set Bloom filter and request exclusions applied inside the
//! graph walk, popularity filling any shortfall) → ranking → top-k.
//!
//! This is the core the gRPC handlers will stay thin over; it has no network
//! code. Every request-path failure is an [`EngineError`], never a panic.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

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
    #[error("event log {}: {msg}", path.display())]
    EventLog {
        path: std::path::PathBuf,
        msg: String,
    },
}

fn invalid(field: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument {
        field,
        msg: msg.into(),
    }
}

#[derive(Debug, Clone, Default)]
pub struct PredictRequest {
    pub user_id: String,
    /// Items to return, 1..=[`MAX_RESULTS`].
    pub num_results: usize,
    /// Retrieved candidates to rank, `num_results`..=[`MAX_CANDIDATES`]; 0 means the artifact's default.
    pub num_candidates: usize,
    /// Never returned. Unknown IDs are ignored (they cannot be returned anyway).
    pub exclude_item_ids: Vec<String>,
    /// When non-empty, retrieval is skipped and only these items are ranked
    /// (minus `exclude_item_ids`; the seen-set filter is not applied: the
    /// caller chose them). At most [`MAX_CANDIDATES`]; unknown IDs are rejected.
    pub candidate_item_ids: Vec<String>,
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

/// Items scored for one user, without per-stage timings (Rank, Retrieve).
#[derive(Debug, Clone)]
pub struct RankResponse {
    pub items: Vec<ScoredItem>,
    pub cold_start: bool,
    pub model_version: String,
}

/// One item's scores: the ordering score, the two-tower score, the rating head.
#[derive(Debug, Clone, Copy)]
struct Scores {
    score: f32,
    retrieval: f32,
    rating: f32,
}

fn check_user(user_id: &str) -> Result<(), EngineError> {
    if user_id.trim().is_empty() {
        return Err(invalid("user_id", "must not be empty"));
    }
    Ok(())
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
    /// Items from accepted events, per user ID, in arrival order: they join
    /// the user's seen set and recent history on the next request.
    recorded: RwLock<HashMap<String, Vec<u32>>>,
    /// The durable event log (path, file), when one is open.
    log: Option<(std::path::PathBuf, Mutex<std::fs::File>)>,
}

/// One user–item interaction reported to `record_events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub user_id: String,
    pub item_id: String,
    /// What happened (`view`, `rating`, `click`, …); free text, not interpreted yet.
    pub kind: String,
    pub timestamp: i64,
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
            recorded: RwLock::new(HashMap::new()),
            log: None,
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
        check_user(&req.user_id)?;
        if req.num_results == 0 || req.num_results > MAX_RESULTS {
            return Err(invalid(
                "num_results",
                format!("must be in 1..={MAX_RESULTS}, got {}", req.num_results),
            ));
        }
        let n_cand = self.candidates(req.num_candidates)?.max(req.num_results);
        let exclude = self.known_items(&req.exclude_item_ids);
        let given = self.given_candidates(&req.candidate_item_ids, &exclude)?;
        let recorded = self.recorded_items(&req.user_id);
        // Retrieval never returns what the user interacted with since the artifact was built.
        let exclude_seen: HashSet<u32> = exclude.iter().chain(&recorded).copied().collect();

        let Some(&u) = self.user_index.get(&req.user_id) else {
            let mut cold = self.cold(&exclude_seen, req.num_results, t0);
            if let Some(ids) = given {
                let mut items: Vec<u32> = ids;
                items.sort_by(|&a, &b| {
                    self.artifact.space.item_popularity[b as usize]
                        .cmp(&self.artifact.space.item_popularity[a as usize])
                        .then(a.cmp(&b))
                });
                items.truncate(req.num_results);
                cold.items = items
                    .into_iter()
                    .map(|i| self.scored(i, self.popularity_scores(i)))
                    .collect();
            }
            return Ok(cold);
        };
        let user_vec = self.user_vector(u, &recorded)?;
        let t_user = t0.elapsed();
        let ids: Vec<u32> = match given {
            Some(ids) => ids,
            None => self
                .retrieve_for(u, &user_vec, n_cand, req.num_results, &exclude_seen)
                .into_iter()
                .map(|c| c.0)
                .collect(),
        };
        let t_retr = t0.elapsed();
        let mut items: Vec<(u32, Scores)> = ids
            .iter()
            .copied()
            .zip(self.rank_items(u, &user_vec, &ids)?)
            .collect();
        // Best first; ties broken by item index so results are deterministic.
        items.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
        items.truncate(req.num_results);
        let t_rank = t0.elapsed();
        Ok(PredictResponse {
            items: items
                .into_iter()
                .map(|(i, sc)| self.scored(i, sc))
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

    /// Score the given items for the user, in input order (the load testers'
    /// endpoint). Unknown item IDs are rejected, naming the first one.
    pub fn rank(&self, user_id: &str, item_ids: &[String]) -> Result<RankResponse, EngineError> {
        check_user(user_id)?;
        if item_ids.is_empty() || item_ids.len() > MAX_CANDIDATES {
            return Err(invalid(
                "item_ids",
                format!("must hold 1..={MAX_CANDIDATES} IDs, got {}", item_ids.len()),
            ));
        }
        let mut ids = Vec::with_capacity(item_ids.len());
        for id in item_ids {
            match self.item_index.get(id) {
                Some(&i) => ids.push(i),
                None => return Err(invalid("item_ids", format!("unknown item {id:?}"))),
            }
        }
        let (scores, cold_start) = match self.user_index.get(user_id) {
            Some(&u) => (
                self.rank_items(
                    u,
                    &self.user_vector(u, &self.recorded_items(user_id))?,
                    &ids,
                )?,
                false,
            ),
            None => (
                ids.iter().map(|&i| self.popularity_scores(i)).collect(),
                true,
            ),
        };
        Ok(RankResponse {
            items: ids
                .iter()
                .zip(scores)
                .map(|(&i, sc)| self.scored(i, sc))
                .collect(),
            cold_start,
            model_version: self.model_version().to_string(),
        })
    }

    /// Retrieval alone: candidates by two-tower score (seen and excluded items
    /// filtered in the search, popularity filling any shortfall), best first.
    pub fn retrieve(
        &self,
        user_id: &str,
        num_candidates: usize,
        exclude_item_ids: &[String],
    ) -> Result<RankResponse, EngineError> {
        check_user(user_id)?;
        let n = self.candidates(num_candidates)?;
        let recorded = self.recorded_items(user_id);
        let mut exclude = self.known_items(exclude_item_ids);
        exclude.extend(recorded.iter().copied());
        let Some(&u) = self.user_index.get(user_id) else {
            let cold = self.cold(&exclude, n, Instant::now());
            return Ok(RankResponse {
                items: cold.items,
                cold_start: true,
                model_version: cold.model_version,
            });
        };
        let user_vec = self.user_vector(u, &recorded)?;
        let items = self
            .retrieve_for(u, &user_vec, n, n, &exclude)
            .into_iter()
            .map(|(i, tt)| {
                self.scored(
                    i,
                    Scores {
                        score: tt,
                        retrieval: tt,
                        rating: f32::NAN,
                    },
                )
            })
            .collect();
        Ok(RankResponse {
            items,
            cold_start: false,
            model_version: self.model_version().to_string(),
        })
    }

    fn candidates(&self, requested: usize) -> Result<usize, EngineError> {
        let n = if requested == 0 {
            self.artifact.serving.candidates
        } else {
            requested
        };
        if n > MAX_CANDIDATES {
            return Err(invalid(
                "num_candidates",
                format!("must be at most {MAX_CANDIDATES}, got {n}"),
            ));
        }
        Ok(n)
    }

    /// Caller-supplied candidates as item indices (deduplicated, order kept,
    /// exclusions removed); `None` when the caller supplied none.
    fn given_candidates(
        &self,
        ids: &[String],
        exclude: &HashSet<u32>,
    ) -> Result<Option<Vec<u32>>, EngineError> {
        if ids.is_empty() {
            return Ok(None);
        }
        if ids.len() > MAX_CANDIDATES {
            return Err(invalid(
                "candidate_item_ids",
                format!("at most {MAX_CANDIDATES} IDs, got {}", ids.len()),
            ));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let &i = self
                .item_index
                .get(id)
                .ok_or_else(|| invalid("candidate_item_ids", format!("unknown item {id:?}")))?;
            if !exclude.contains(&i) && seen.insert(i) {
                out.push(i);
            }
        }
        Ok(Some(out))
    }

    fn known_items(&self, ids: &[String]) -> HashSet<u32> {
        ids.iter()
            .filter_map(|id| self.item_index.get(id).copied())
            .collect()
    }

    fn popularity_scores(&self, i: u32) -> Scores {
        Scores {
            score: self.artifact.space.item_popularity[i as usize] as f32,
            retrieval: f32::NAN,
            rating: f32::NAN,
        }
    }

    /// Cold start: the most popular items not excluded.
    fn cold(&self, exclude: &HashSet<u32>, n: usize, t0: Instant) -> PredictResponse {
        let items = self
            .popular
            .iter()
            .filter(|i| !exclude.contains(i))
            .take(n)
            .map(|&i| self.scored(i, self.popularity_scores(i)))
            .collect();
        PredictResponse {
            items,
            cold_start: true,
            model_version: self.model_version().to_string(),
            timings: StageTimings {
                total_us: t0.elapsed().as_micros() as u64,
                ..Default::default()
            },
        }
    }

    /// The user tower over the user's features and recent history; `recent`
    /// (recorded since the artifact was built, oldest first) leads the history.
    fn user_vector(&self, u: u32, recent: &[u32]) -> Result<Vec<f32>, EngineError> {
        let uidx = Tensor::new(&[u], &self.device)?;
        let mut inputs = self.tables.users(&uidx)?;
        if !recent.is_empty() {
            let space = &self.artifact.space;
            let len = space.dims.history_len.max(1);
            let mut hist: Vec<u32> = recent.iter().rev().copied().collect();
            hist.extend(
                space.user_history[u as usize]
                    .iter()
                    .copied()
                    .filter(|i| !recent.contains(i)),
            );
            hist.truncate(len);
            let n = hist.len();
            let mut weights = vec![1.0 / n as f32; n];
            hist.resize(len, 0);
            weights.resize(len, 0.0);
            inputs.hist = Tensor::from_vec(hist, (1, len), &self.device)?;
            inputs.hist_w = Tensor::from_vec(weights, (1, len), &self.device)?;
        }
        Ok(self
            .artifact
            .two_tower
            .user(&inputs)?
            .flatten_all()?
            .to_vec1()?)
    }

    fn recorded_items(&self, user_id: &str) -> Vec<u32> {
        match self.recorded.read() {
            Ok(m) => m.get(user_id).cloned().unwrap_or_default(),
            Err(poisoned) => poisoned
                .into_inner()
                .get(user_id)
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// Open (creating if needed) the append-only event log at `path` and
    /// replay it. A torn final line (a crash mid-append) is skipped with a
    /// warning; any other bad line is an error naming the line.
    pub fn open_event_log(&mut self, path: &Path) -> Result<usize, EngineError> {
        let err = |msg: String| EngineError::EventLog {
            path: path.to_path_buf(),
            msg,
        };
        let mut replayed = 0;
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let lines: Vec<&str> = text.split('\n').collect();
            for (n, line) in lines.iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Event>(line) {
                    Ok(ev) => {
                        if let Some(&i) = self.item_index.get(&ev.item_id) {
                            self.remember(&ev.user_id, i);
                            replayed += 1;
                        }
                    }
                    Err(_) if n + 1 == lines.len() => {
                        // Cut it off so the next append starts on a clean line.
                        tracing::warn!("{}: dropping a torn final line", path.display());
                        let keep = text.rfind('\n').map(|p| p + 1).unwrap_or(0) as u64;
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(path)
                            .and_then(|f| f.set_len(keep))
                            .map_err(|e| err(e.to_string()))?;
                    }
                    Err(e) => return Err(err(format!("line {}: {e}", n + 1))),
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        self.log = Some((path.to_path_buf(), Mutex::new(file)));
        Ok(replayed)
    }

    fn remember(&self, user_id: &str, item: u32) {
        let mut m = match self.recorded.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let v = m.entry(user_id.to_string()).or_default();
        if !v.contains(&item) {
            v.push(item);
        }
    }

    /// Validate and accept events: durably appended to the log (when open,
    /// flushed to disk before returning), then visible to the user's next
    /// request. All-or-nothing: one bad event rejects the batch.
    pub fn record_events(&self, events: &[Event]) -> Result<usize, EngineError> {
        if events.is_empty() {
            return Err(invalid("events", "must not be empty"));
        }
        if events.len() > MAX_CANDIDATES {
            return Err(invalid(
                "events",
                format!("at most {MAX_CANDIDATES} per call, got {}", events.len()),
            ));
        }
        let mut items = Vec::with_capacity(events.len());
        for (n, ev) in events.iter().enumerate() {
            check_user(&ev.user_id)
                .map_err(|_| invalid("events.user_id", format!("event {n}: must not be empty")))?;
            let &i = self.item_index.get(&ev.item_id).ok_or_else(|| {
                invalid(
                    "events.item_id",
                    format!("event {n}: unknown item {:?}", ev.item_id),
                )
            })?;
            items.push(i);
        }
        if let Some((path, log)) = &self.log {
            let mut buf = String::new();
            for ev in events {
                buf.push_str(
                    &serde_json::to_string(ev).map_err(|e| invalid("events", e.to_string()))?,
                );
                buf.push('\n');
            }
            let mut f = match log.lock() {
                Ok(f) => f,
                Err(poisoned) => poisoned.into_inner(),
            };
            use std::io::Write;
            f.write_all(buf.as_bytes())
                .and_then(|_| f.sync_data())
                .map_err(|e| EngineError::EventLog {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
        }
        for (ev, i) in events.iter().zip(items) {
            self.remember(&ev.user_id, i);
        }
        Ok(events.len())
    }

    /// HNSW top-`n` with the seen-set filter and exclusions as the search
    /// predicate; popularity fills up to `min_len`. Returns (item, two-tower score).
    fn retrieve_for(
        &self,
        u: u32,
        user_vec: &[f32],
        n: usize,
        min_len: usize,
        exclude: &HashSet<u32>,
    ) -> Vec<(u32, f32)> {
        let seen = &self.seen[u as usize];
        let keep = |i: usize| !exclude.contains(&(i as u32)) && !seen.contains(&(i as u32));
        let mut cands: Vec<(u32, f32)> = self
            .artifact
            .index
            .search(user_vec, n, Some(&keep))
            .iter()
            .map(|h| (h.item as u32, h.score))
            .collect();
        if cands.len() < min_len {
            let have: HashSet<u32> = cands.iter().map(|c| c.0).collect();
            let fill: Vec<(u32, f32)> = self
                .popular
                .iter()
                .copied()
                .filter(|&i| keep(i as usize) && !have.contains(&i))
                .take(min_len - cands.len())
                .map(|i| (i, self.tt(user_vec, i)))
                .collect();
            cands.extend(fill);
        }
        cands
    }

    fn tt(&self, user_vec: &[f32], i: u32) -> f32 {
        self.artifact.item_vectors[i as usize]
            .iter()
            .zip(user_vec)
            .map(|(a, b)| a * b)
            .sum()
    }

    /// One batched ranker forward over `items` for user `u`, in input order.
    fn rank_items(
        &self,
        u: u32,
        user_vec: &[f32],
        items: &[u32],
    ) -> Result<Vec<Scores>, EngineError> {
        let n = items.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let tt: Vec<f32> = items.iter().map(|&i| self.tt(user_vec, i)).collect();
        let users = self
            .tables
            .users(&Tensor::from_vec(vec![u; n], n, &self.device)?)?;
        let item_in =
            self.tables
                .items
                .select(&Tensor::from_vec(items.to_vec(), n, &self.device)?)?;
        let tt_t = Tensor::from_vec(tt.clone(), (n, 1), &self.device)?;
        let out = self.artifact.ranker.forward(&PairInputs {
            user: &users,
            item: &item_in,
            tt_score: &tt_t,
        })?;
        let rating: Vec<f32> = out.rating.to_vec1()?;
        let engage: Vec<f32> = out.engage.to_vec1()?;
        let mean = self.artifact.space.global_mean_rating;
        Ok((0..n)
            .map(|j| Scores {
                score: engage[j]
                    + self.weights.rating * (rating[j] - mean)
                    + self.weights.retrieval * tt[j],
                retrieval: tt[j],
                rating: rating[j],
            })
            .collect())
    }

    fn scored(&self, i: u32, sc: Scores) -> ScoredItem {
        let it = &self.items[i as usize];
        let title = match it.year {
            Some(y) => format!("{} ({y})", it.title),
            None => it.title.clone(),
        };
        ScoredItem {
            item_id: it.id.clone(),
            title,
            score: sc.score,
            retrieval_score: sc.retrieval,
            predicted_rating: sc.rating,
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
