//! Cascade's request pipeline, in process: user state (behind a bounded
//! cache) → retrieval (HNSW with the user's seen-set Bloom filter and request
//! exclusions applied inside the graph walk, popularity filling any shortfall)
//! → ranking (a dynamic batching queue in front of the Candle ranker on
//! dedicated threads) → top-k.
//!
//! This is the core the gRPC handlers stay thin over; it has no network code.
//! Every request-path failure is an [`EngineError`], never a panic.

pub mod batch;
mod engine;
pub mod events;
mod handle;

pub use batch::{BatchConfig, CallCtx};
pub use engine::{Engine, EngineConfig};
pub use events::{Event, EventStore};
pub use handle::{EngineHandle, Reloaded};

/// False-positive rate the per-user seen-set filters are sized for: about one
/// in a hundred unseen items is wrongly skipped, never a seen one shown.
pub const SEEN_FILTER_FP_RATE: f64 = 0.01;
/// Upper bound on `num_results`.
pub const MAX_RESULTS: usize = 1000;
/// Upper bound on `num_candidates`, `candidate_item_ids`, `item_ids` and events per call.
pub const MAX_CANDIDATES: usize = 10_000;
/// Upper bound on context item IDs.
pub const MAX_CONTEXT: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed; `field` names the offending field.
    #[error("invalid `{field}`: {msg}")]
    InvalidArgument { field: &'static str, msg: String },
    /// Bounded work is full; the caller should back off and retry.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The caller's deadline passed; the work was abandoned.
    #[error("deadline exceeded; the request was abandoned")]
    DeadlineExceeded,
    /// The caller went away; the work was abandoned.
    #[error("cancelled by the caller")]
    Cancelled,
    /// A failure inside the server (a model error, a panicking batch).
    #[error("internal: {0}")]
    Internal(String),
    /// A named model version does not exist under the artifact root.
    #[error("not found: {0}")]
    NotFound(String),
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

pub(crate) fn invalid(field: &'static str, msg: impl Into<String>) -> EngineError {
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
    /// Items the user is engaging with right now (the page they are on, the
    /// cart). For known users they lead the recent history the user tower
    /// pools; for unknown users they steer retrieval away from plain
    /// popularity. Never returned. At most [`MAX_CONTEXT`]; unknown IDs are ignored.
    pub context_item_ids: Vec<String>,
}

impl PredictRequest {
    /// Checks that need no model: the gateway runs them before any downstream call.
    pub fn validate(&self) -> Result<(), EngineError> {
        check_user(&self.user_id)?;
        if self.num_results == 0 || self.num_results > MAX_RESULTS {
            return Err(invalid(
                "num_results",
                format!("must be in 1..={MAX_RESULTS}, got {}", self.num_results),
            ));
        }
        if self.num_candidates > MAX_CANDIDATES {
            return Err(invalid(
                "num_candidates",
                format!(
                    "must be at most {MAX_CANDIDATES}, got {}",
                    self.num_candidates
                ),
            ));
        }
        if self.candidate_item_ids.len() > MAX_CANDIDATES {
            return Err(invalid(
                "candidate_item_ids",
                format!(
                    "at most {MAX_CANDIDATES} IDs, got {}",
                    self.candidate_item_ids.len()
                ),
            ));
        }
        check_context(&self.context_item_ids)
    }
}

pub(crate) fn check_context(ids: &[String]) -> Result<(), EngineError> {
    if ids.len() > MAX_CONTEXT {
        return Err(invalid(
            "context.item_ids",
            format!("at most {MAX_CONTEXT} IDs, got {}", ids.len()),
        ));
    }
    Ok(())
}

pub(crate) fn check_user(user_id: &str) -> Result<(), EngineError> {
    if user_id.trim().is_empty() {
        return Err(invalid("user_id", "must not be empty"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScoredItem {
    pub item_id: String,
    pub title: String,
    /// The cascade's ordering score (higher is better); on the cold-start
    /// path, the item's training interaction count, or its similarity to the
    /// context items when context steered retrieval.
    pub score: f32,
    /// Two-tower score between user (or context) and item (NaN when popularity answered).
    pub retrieval_score: f32,
    /// The ranker's rating head (NaN on the cold-start path).
    pub predicted_rating: f32,
}

/// Microseconds spent per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub user_state_us: u64,
    pub retrieval_us: u64,
    /// Ranking, including `rank_queue_us` spent waiting for a batch.
    pub ranking_us: u64,
    pub rank_queue_us: u64,
    pub total_us: u64,
}

#[derive(Debug, Clone)]
pub struct PredictResponse {
    pub items: Vec<ScoredItem>,
    /// True when the user is unknown and popularity (or context) answered.
    pub cold_start: bool,
    pub model_version: String,
    pub timings: StageTimings,
    /// Whether the user's state came from the cache.
    pub user_cache_hit: bool,
}

/// Items scored for one user, without per-stage timings (Rank, Retrieve).
#[derive(Debug, Clone)]
pub struct RankResponse {
    pub items: Vec<ScoredItem>,
    pub cold_start: bool,
    pub model_version: String,
}
