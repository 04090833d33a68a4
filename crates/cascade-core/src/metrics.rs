//! Prometheus instruments the engine updates from inside the pipeline: ranker
//! batches, the user-state cache, the Bloom filters and the event log.
//!
//! One set is shared by every model version a process serves (it lives in
//! [`crate::EngineConfig`]), so a reload keeps counting into the same series
//! and no counter ever goes back. Labels are bounded: no user or item IDs.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// Rows or requests per ranker forward: powers of two up to the largest
/// `--batch-max-rows` anyone sets.
fn batch_buckets() -> Vec<f64> {
    (0..=14).map(|p| f64::from(1u32 << p)).collect()
}

#[derive(Clone)]
pub struct EngineMetrics {
    /// Rows (candidates) per ranker forward.
    pub batch_rows: Histogram,
    /// Requests packed into one ranker forward.
    pub batch_requests: Histogram,
    /// Ranking jobs answered without running: their caller left or their deadline passed.
    pub rank_jobs_dropped: IntCounter,
    /// Ranker forwards that failed (an error or a caught panic).
    pub rank_batch_failures: IntCounter,
    /// User-state lookups by `result` = hit | miss | bypass (request context
    /// makes the state request-specific, so the cache is not consulted).
    pub user_cache: IntCounterVec,
    /// Items the retrieval predicate looked up in a user's seen-set filter.
    pub bloom_checks: IntCounter,
    /// Of those, items the filter rejected as already seen.
    pub bloom_rejected: IntCounter,
    /// Retrieved candidates that came from popularity because the graph
    /// walk returned too few.
    pub popularity_fill: IntCounter,
    /// Events accepted (durably logged when a log is open).
    pub events_recorded: IntCounter,
    /// Event batches rejected by the log (I/O errors), none of them accepted.
    pub event_log_errors: IntCounter,
}

impl EngineMetrics {
    /// Instruments registered in `registry` (for the server's `/metrics`).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.batch_rows.clone()))?;
        registry.register(Box::new(m.batch_requests.clone()))?;
        registry.register(Box::new(m.rank_jobs_dropped.clone()))?;
        registry.register(Box::new(m.rank_batch_failures.clone()))?;
        registry.register(Box::new(m.user_cache.clone()))?;
        registry.register(Box::new(m.bloom_checks.clone()))?;
        registry.register(Box::new(m.bloom_rejected.clone()))?;
        registry.register(Box::new(m.popularity_fill.clone()))?;
        registry.register(Box::new(m.events_recorded.clone()))?;
        registry.register(Box::new(m.event_log_errors.clone()))?;
        Ok(m)
    }

    /// Instruments nobody scrapes (tools, tests): the same code path, no registry.
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(Self {
            batch_rows: Histogram::with_opts(
                HistogramOpts::new(
                    "cascade_rank_batch_rows",
                    "Candidate rows per ranker forward.",
                )
                .buckets(batch_buckets()),
            )?,
            batch_requests: Histogram::with_opts(
                HistogramOpts::new(
                    "cascade_rank_batch_requests",
                    "Requests packed into one ranker forward by dynamic batching.",
                )
                .buckets(batch_buckets()),
            )?,
            rank_jobs_dropped: IntCounter::new(
                "cascade_rank_jobs_dropped_total",
                "Ranking jobs answered without a forward because their caller left or their deadline passed.",
            )?,
            rank_batch_failures: IntCounter::new(
                "cascade_rank_batch_failures_total",
                "Ranker forwards that failed; their requests got INTERNAL.",
            )?,
            user_cache: IntCounterVec::new(
                Opts::new(
                    "cascade_user_cache_requests_total",
                    "User-state lookups by result (hit, miss, or bypass when request context makes the state request-specific).",
                ),
                &["result"],
            )?,
            bloom_checks: IntCounter::new(
                "cascade_bloom_checks_total",
                "Candidate items looked up in a user's seen-set Bloom filter during retrieval.",
            )?,
            bloom_rejected: IntCounter::new(
                "cascade_bloom_rejected_total",
                "Candidate items the seen-set Bloom filter dropped as already seen.",
            )?,
            popularity_fill: IntCounter::new(
                "cascade_popularity_fill_items_total",
                "Retrieved candidates filled from popularity because the HNSW walk returned too few.",
            )?,
            events_recorded: IntCounter::new(
                "cascade_events_recorded_total",
                "Events accepted by RecordEvents (written to the event log when one is open).",
            )?,
            event_log_errors: IntCounter::new(
                "cascade_event_log_errors_total",
                "RecordEvents batches the event log failed to write; none of their events were accepted.",
            )?,
        })
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        // The names and options above are fixed and valid; construction
        // cannot fail for them (checked by the unit test below).
        match Self::unregistered() {
            Ok(m) => m,
            Err(e) => unreachable!("static metric options rejected: {e}"),
        }
    }
}

impl std::fmt::Debug for EngineMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineMetrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_once_and_refuses_a_duplicate() {
        let r = Registry::new();
        let m = EngineMetrics::register(&r).unwrap();
        m.user_cache.with_label_values(&["hit"]).inc();
        m.batch_rows.observe(200.0);
        let names: Vec<String> = r.gather().iter().map(|f| f.name().to_string()).collect();
        assert!(names.contains(&"cascade_rank_batch_rows".to_string()));
        assert!(names.contains(&"cascade_user_cache_requests_total".to_string()));
        assert!(EngineMetrics::register(&r).is_err());
    }
}
