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
pub mod metrics;

pub use batch::{BatchConfig, BatchRun, CallCtx};
pub use cascade_retrieval::SearchPath;
pub use engine::{Engine, EngineConfig};
pub use events::{Event, EventStore};
pub use handle::{EngineHandle, Reloaded};
pub use metrics::EngineMetrics;

/// False-positive rate the per-user seen-set filters are sized for: about one
/// in a hundred unseen items is wrongly skipped, never a seen one shown.
pub const SEEN_FILTER_FP_RATE: f64 = 0.01;
/// Upper bound on `num_results`.
pub const MAX_RESULTS: usize = 1000;
/// Upper bound on `num_candidates`, `candidate_item_ids`, `item_ids` and events per call.
pub const MAX_CANDIDATES: usize = 10_000;
/// Upper bound on context item IDs.
pub const MAX_CONTEXT: usize = 100;
/// Longest user or item ID accepted, in bytes: IDs are keys, not payloads,
/// and every accepted event's IDs are written to the log and kept in memory.
pub const MAX_ID_BYTES: usize = 256;
/// Longest event `kind`, in bytes.
pub const MAX_KIND_BYTES: usize = 64;
/// Latest event timestamp accepted: the end of year 9999, in seconds since
/// the Unix epoch (earliest: 0).
pub const MAX_TIMESTAMP: i64 = 253_402_300_799;

use std::time::{Duration, Instant};

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
    /// A model version exists but cannot be served (corrupt, incomplete or
    /// from another format); `msg` names files relative to the version.
    #[error("version {version} cannot be served: {msg}")]
    Unservable { version: String, msg: String },
    #[error("loading artifact: {0}")]
    Load(#[from] cascade_artifact::ArtifactError),
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
        check_ids("candidate_item_ids", &self.candidate_item_ids)?;
        check_ids("exclude_item_ids", &self.exclude_item_ids)?;
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
    check_ids("context.item_ids", ids)
}

/// What is wrong with an ID, if anything.
fn id_problem(id: &str) -> Option<String> {
    if id.trim().is_empty() {
        Some("must not be empty".into())
    } else if id.len() > MAX_ID_BYTES {
        Some(format!("at most {MAX_ID_BYTES} bytes, got {}", id.len()))
    } else {
        None
    }
}

pub(crate) fn check_user(user_id: &str) -> Result<(), EngineError> {
    id_problem(user_id).map_or(Ok(()), |p| Err(invalid("user_id", p)))
}

/// Every ID of a list is at most [`MAX_ID_BYTES`] (empty ones are simply unknown).
pub(crate) fn check_ids(field: &'static str, ids: &[String]) -> Result<(), EngineError> {
    match ids.iter().position(|id| id.len() > MAX_ID_BYTES) {
        Some(n) => Err(invalid(
            field,
            format!("ID {n}: at most {MAX_ID_BYTES} bytes, got {}", ids[n].len()),
        )),
        None => Ok(()),
    }
}

/// One event's fields, before anything is written; `n` is its position.
pub(crate) fn check_event(n: usize, ev: &Event) -> Result<(), EngineError> {
    if let Some(p) = id_problem(&ev.user_id) {
        return Err(invalid("events.user_id", format!("event {n}: {p}")));
    }
    if let Some(p) = id_problem(&ev.item_id) {
        return Err(invalid("events.item_id", format!("event {n}: {p}")));
    }
    if ev.kind.len() > MAX_KIND_BYTES {
        return Err(invalid(
            "events.kind",
            format!(
                "event {n}: at most {MAX_KIND_BYTES} bytes, got {}",
                ev.kind.len()
            ),
        ));
    }
    if !(0..=MAX_TIMESTAMP).contains(&ev.timestamp) {
        return Err(invalid(
            "events.timestamp",
            format!(
                "event {n}: seconds since the Unix epoch in 0..={MAX_TIMESTAMP}, got {}",
                ev.timestamp
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScoredItem {
    pub item_id: String,
    pub title: String,
    /// The cascade's ordering score (higher is better); on the cold-start
    /// path, the item's interaction count in the data the artifact was built from.
    pub score: f32,
    /// Two-tower score between user and item (NaN when popularity answered).
    pub retrieval_score: f32,
    /// The ranker's rating head (NaN on the cold-start path).
    pub predicted_rating: f32,
}

/// Whether a request's user state came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    Hit,
    Miss,
    /// Request context makes the state request-specific: computed, not cached.
    Bypass,
}

impl CacheUse {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheUse::Hit => "hit",
            CacheUse::Miss => "miss",
            CacheUse::Bypass => "bypass",
        }
    }
}

/// A pipeline step and what it did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    /// The user tower's output for the user (cached or computed).
    UserState { cache: CacheUse },
    /// Candidate generation: the HNSW walk with the seen-set Bloom filter and
    /// exclusions as its predicate, then popularity filling any shortfall
    /// (popularity alone when there is no personal signal).
    Retrieval {
        candidates: u32,
        bloom_checked: u32,
        bloom_rejected: u32,
        popularity_fill: u32,
        cold_start: bool,
    },
    /// Two-tower scores and ranker rows for the candidates.
    FeatureAssembly { rows: u32 },
    /// Waiting in the dynamic batching queue.
    RankQueue,
    /// The ranker forward this request's rows ran in (shared with its batch-mates).
    RankForward {
        batch_rows: u32,
        batch_requests: u32,
    },
    /// Ordering, exclusions and the top-k cut.
    Merge { results: u32 },
}

impl Stage {
    /// Retrieval with no personal signal: popularity.
    pub fn cold_retrieval(candidates: usize) -> Self {
        Stage::Retrieval {
            candidates: candidates as u32,
            bloom_checked: 0,
            bloom_rejected: 0,
            popularity_fill: 0,
            cold_start: true,
        }
    }

    /// The `stage` label and span name suffix.
    pub fn name(&self) -> &'static str {
        match self {
            Stage::UserState { .. } => "user_state",
            Stage::Retrieval { .. } => "retrieval",
            Stage::FeatureAssembly { .. } => "feature_assembly",
            Stage::RankQueue => "rank_queue",
            Stage::RankForward { .. } => "rank_forward",
            Stage::Merge { .. } => "merge",
        }
    }

    /// Every stage name, for dashboards and tests.
    pub const NAMES: [&'static str; 6] = [
        "user_state",
        "retrieval",
        "feature_assembly",
        "rank_queue",
        "rank_forward",
        "merge",
    ];
}

/// One measured step of one request. The response's stage timings, the
/// trace's stage spans and the stage-duration histograms are all built from
/// these records, so the three always agree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageSpan {
    pub stage: Stage,
    pub start: Instant,
    pub duration: Duration,
}

impl StageSpan {
    pub fn end(&self) -> Instant {
        self.start + self.duration
    }
}

/// Appends stages that follow each other: each starts where the last ended.
#[derive(Debug)]
pub(crate) struct StageClock {
    pub(crate) started: Instant,
    last: Instant,
    pub(crate) spans: Vec<StageSpan>,
}

impl StageClock {
    pub(crate) fn start() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            spans: Vec::with_capacity(6),
        }
    }

    /// Close `stage` now: it ran from the previous mark until now.
    pub(crate) fn mark(&mut self, stage: Stage) {
        let now = Instant::now();
        self.spans.push(StageSpan {
            stage,
            start: self.last,
            duration: now.saturating_duration_since(self.last),
        });
        self.last = now;
    }

    /// Restart the clock (time before this is not part of the next stage).
    pub(crate) fn skip(&mut self) {
        self.last = Instant::now();
    }

    /// A stage measured elsewhere (the batch worker's queue and forward).
    pub(crate) fn push(&mut self, stage: Stage, start: Instant, duration: Duration) {
        self.spans.push(StageSpan {
            stage,
            start,
            duration,
        });
    }
}

/// Microseconds spent per stage (derived from the request's [`StageSpan`]s).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub user_state_us: u64,
    pub retrieval_us: u64,
    /// Ranking, including `rank_queue_us` spent waiting for a batch.
    pub ranking_us: u64,
    pub rank_queue_us: u64,
    pub total_us: u64,
}

impl StageTimings {
    /// The per-stage sums of `spans`; ranking runs from the first ranking
    /// stage's start to the last one's end (hand-offs between threads included).
    pub fn from_spans(spans: &[StageSpan], total: Duration) -> Self {
        let us = |d: Duration| d.as_micros() as u64;
        let sum = |f: fn(&Stage) -> bool| -> Duration {
            spans
                .iter()
                .filter(|s| f(&s.stage))
                .map(|s| s.duration)
                .sum()
        };
        let ranking: Vec<&StageSpan> = spans
            .iter()
            .filter(|s| {
                matches!(
                    s.stage,
                    Stage::FeatureAssembly { .. }
                        | Stage::RankQueue
                        | Stage::RankForward { .. }
                        | Stage::Merge { .. }
                )
            })
            .collect();
        let ranking_us = match (
            ranking.iter().map(|s| s.start).min(),
            ranking.iter().map(|s| s.end()).max(),
        ) {
            (Some(a), Some(b)) => us(b.saturating_duration_since(a)),
            _ => 0,
        };
        Self {
            user_state_us: us(sum(|s| matches!(s, Stage::UserState { .. }))),
            retrieval_us: us(sum(|s| matches!(s, Stage::Retrieval { .. }))),
            ranking_us,
            rank_queue_us: us(sum(|s| matches!(s, Stage::RankQueue))),
            total_us: us(total),
        }
    }
}

/// Which personal signal an answer was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonalizedBy {
    /// The user's interactions in the training data (and any recorded since).
    History,
    /// A user unknown to the model, through their recorded events (and any context).
    Events,
    /// A user unknown to the model with no events, through the request's context items.
    Context,
    /// No personal signal: the most popular items.
    Popularity,
}

impl PersonalizedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            PersonalizedBy::History => "history",
            PersonalizedBy::Events => "events",
            PersonalizedBy::Context => "context",
            PersonalizedBy::Popularity => "popularity",
        }
    }

    /// `cold_start` in the API: no personal signal was available.
    pub fn is_cold_start(self) -> bool {
        self == PersonalizedBy::Popularity
    }
}

#[derive(Debug, Clone)]
pub struct PredictResponse {
    pub items: Vec<ScoredItem>,
    /// True when no personal signal was available (neither training history,
    /// recorded events nor context) and popularity answered.
    pub cold_start: bool,
    pub personalized_by: PersonalizedBy,
    pub model_version: String,
    pub timings: StageTimings,
    /// Whether the user's state came from the cache.
    pub user_cache_hit: bool,
    /// Every stage as measured, in order.
    pub stages: Vec<StageSpan>,
}

/// Items scored for one user, without per-stage timings (Rank, Retrieve).
#[derive(Debug, Clone)]
pub struct RankResponse {
    pub items: Vec<ScoredItem>,
    pub cold_start: bool,
    pub personalized_by: PersonalizedBy,
    pub model_version: String,
    /// Every stage as measured, in order.
    pub stages: Vec<StageSpan>,
}
