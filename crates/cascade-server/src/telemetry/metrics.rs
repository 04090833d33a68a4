//! The server-side Prometheus series, named as go-grpc-prometheus names them.

use std::sync::Arc;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::TelemetryError;

/// Latency buckets (seconds): 50 µs to 10 s, with the 18 ms budget as an edge.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.018, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

/// Stage buckets (seconds): finer at the bottom, where most stages live.
fn stage_buckets() -> Vec<f64> {
    vec![
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.018,
        0.05, 0.1, 0.5, 1.0,
    ]
}

/// The server-side Prometheus series (the engine's own are in
/// [`cascade_core::EngineMetrics`]).
pub struct ServerMetrics {
    pub started: IntCounterVec,
    pub handled: IntCounterVec,
    pub handling: HistogramVec,
    pub client_handled: IntCounterVec,
    pub client_handling: HistogramVec,
    pub stage: HistogramVec,
    pub in_flight: IntGauge,
    pub in_flight_limit: IntGauge,
    pub rank_queue_depth: IntGauge,
    pub model_info: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// Requests whose message did not decode, refused by the codec before
    /// any handler. The observation layer counts them in `grpc_server_*`
    /// as `InvalidArgument` with every other client error; this series
    /// isolates them. Brought up to date from
    /// [`cascade_proto::codec::decode_failures`] at each scrape.
    pub decode_failures: IntCounter,
    pub connections_open: IntGauge,
    pub connections_closed: IntCounterVec,
}

impl ServerMetrics {
    pub fn register(registry: &Registry) -> Result<Arc<Self>, TelemetryError> {
        let rpc = ["grpc_type", "grpc_service", "grpc_method"];
        let rpc_code = ["grpc_type", "grpc_service", "grpc_method", "grpc_code"];
        let m = Self {
            started: IntCounterVec::new(
                Opts::new("grpc_server_started_total", "RPCs started on the server."),
                &rpc,
            )?,
            handled: IntCounterVec::new(
                Opts::new(
                    "grpc_server_handled_total",
                    "RPCs completed on the server, by status code.",
                ),
                &rpc_code,
            )?,
            handling: HistogramVec::new(
                HistogramOpts::new(
                    "grpc_server_handling_seconds",
                    "Time from an RPC's arrival to its answer, by status code.",
                )
                .buckets(latency_buckets()),
                &rpc_code,
            )?,
            client_handled: IntCounterVec::new(
                Opts::new(
                    "grpc_client_handled_total",
                    "Downstream RPCs the gateway completed, by status code.",
                ),
                &rpc_code,
            )?,
            client_handling: HistogramVec::new(
                HistogramOpts::new(
                    "grpc_client_handling_seconds",
                    "Downstream RPC time seen by the gateway, by status code.",
                )
                .buckets(latency_buckets()),
                &rpc_code,
            )?,
            stage: HistogramVec::new(
                HistogramOpts::new(
                    "cascade_stage_duration_seconds",
                    "Time per pipeline stage (the same measurements as the response's timings and the trace's stage spans).",
                )
                .buckets(stage_buckets()),
                &["stage"],
            )?,
            in_flight: IntGauge::new(
                "cascade_in_flight_requests",
                "RPCs being handled now.",
            )?,
            in_flight_limit: IntGauge::new(
                "cascade_in_flight_limit",
                "RPCs allowed in flight; beyond it requests get RESOURCE_EXHAUSTED.",
            )?,
            rank_queue_depth: IntGauge::new(
                "cascade_rank_queue_depth",
                "Ranking jobs waiting for a batch (sampled at scrape).",
            )?,
            model_info: IntGaugeVec::new(
                Opts::new(
                    "cascade_model_info",
                    "The model version serving now and where it runs (value 1).",
                ),
                &["version", "device", "role"],
            )?,
            reloads: IntCounterVec::new(
                Opts::new(
                    "cascade_model_reloads_total",
                    "Model reloads by result (swapped, unchanged, failed).",
                ),
                &["result"],
            )?,
            build_info: IntGaugeVec::new(
                Opts::new("cascade_build_info", "The running build (value 1)."),
                &["version", "git_commit"],
            )?,
            decode_failures: IntCounter::new(
                "cascade_grpc_decode_failures_total",
                "Requests refused INVALID_ARGUMENT because their message did not decode (also in grpc_server_handled_total).",
            )?,
            connections_open: IntGauge::new(
                "cascade_connections_open",
                "Connections open on the gRPC port.",
            )?,
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "cascade_connections_closed_total",
                    "Connections on the gRPC port that ended, by reason (peer, error, handshake_timeout, idle_timeout, max_age, drain, drain_timeout, limit).",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.started.clone()))?;
        registry.register(Box::new(m.handled.clone()))?;
        registry.register(Box::new(m.handling.clone()))?;
        registry.register(Box::new(m.client_handled.clone()))?;
        registry.register(Box::new(m.client_handling.clone()))?;
        registry.register(Box::new(m.stage.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.in_flight_limit.clone()))?;
        registry.register(Box::new(m.rank_queue_depth.clone()))?;
        registry.register(Box::new(m.model_info.clone()))?;
        registry.register(Box::new(m.reloads.clone()))?;
        registry.register(Box::new(m.build_info.clone()))?;
        registry.register(Box::new(m.decode_failures.clone()))?;
        registry.register(Box::new(m.connections_open.clone()))?;
        registry.register(Box::new(m.connections_closed.clone()))?;
        m.build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("CASCADE_GIT_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        Ok(Arc::new(m))
    }
}
