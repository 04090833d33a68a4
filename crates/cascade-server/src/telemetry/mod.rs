//! Traces and metrics for every RPC, from one set of measurements.
//!
//! Each RPC gets an [`RpcScope`]: it extracts the caller's W3C trace context,
//! opens the OpenTelemetry SERVER span (RPC semantic conventions), counts the
//! request in the `grpc_server_*` Prometheus series (the go-grpc-prometheus
//! names SREs already chart), and on completion turns the engine's
//! [`StageSpan`] records into child spans *and* stage-duration histogram
//! observations, so the response's timings, the spans and the histograms
//! agree. The gateway's downstream calls get CLIENT spans whose context is
//! injected as `traceparent`, so one trace runs through all three services.
//!
//! Tracing is off unless an OTLP endpoint is configured; spans go through a
//! bounded batch queue that drops rather than blocks, so export can never
//! slow or fail a request. Metrics are off when no registry is given.
//!
//! By concern: [`metrics`] (the Prometheus series), [`otlp`] (trace export
//! set-up), [`observe`] (the per-RPC observation: a tower layer around the
//! service, and the gateway's client calls), [`scrape`] (the `/metrics`
//! HTTP endpoint).

pub mod metrics;
pub mod observe;
pub mod otlp;
pub mod scrape;

pub use metrics::ServerMetrics;
pub use observe::{ObserveLayer, Telemetry, TraceCx};
pub use otlp::{OtlpProtocol, TraceConfig};
pub use scrape::serve_metrics;

use tonic::Code;

/// The gRPC service every span and series names.
pub const SERVICE: &str = "cascade.v1.Cascade";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("{0}")]
    Config(String),
}

/// Go's names for gRPC codes, as go-grpc-prometheus labels them.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// RPC semantic conventions: a server span is an error only for codes that
/// mean the server failed; a client span for any code but OK.
pub(crate) fn server_fault(c: Code) -> bool {
    matches!(
        c,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_use_go_names_and_semconv_error_rules() {
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::ResourceExhausted), "ResourceExhausted");
        assert!(server_fault(Code::Internal) && server_fault(Code::DeadlineExceeded));
        assert!(!server_fault(Code::InvalidArgument) && !server_fault(Code::ResourceExhausted));
    }
}
