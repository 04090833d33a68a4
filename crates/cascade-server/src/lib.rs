//! Cascade's gRPC surface: thin tonic handlers over [`cascade_core`],
//! `grpc.health.v1` and server reflection (v1 and v1alpha), in one of four
//! roles: `all` (every stage in process), `retrieval`, `ranker`, or `gateway`
//! (validation and merge, calling the other two over gRPC with the remaining
//! deadline).
//!
//! Where each concern lives: [`service`] (the handlers: role check →
//! deadline → core or the other stages → convert), [`admission`] (the
//! in-flight limit, a tower layer), [`telemetry`] (observation, a tower
//! layer; metrics; OTLP; the scrape endpoint), [`deadline`] (`grpc-timeout`),
//! [`serve`] (the stack on a listener, health, reflection, connection bounds,
//! drain), [`run`] (`cascade serve`'s wiring from a [`ServeConfig`]), [`gateway`] and [`discovery`] (the split roles).
//!
//! Model work runs on Tokio's blocking pool and the ranking threads, never on
//! the async workers; every engine error maps to a gRPC status in one place
//! ([`to_status`]).

pub mod admission;
pub mod auth;
pub mod deadline;
pub mod discovery;
pub mod gate;
mod gateway;
mod listen;
pub mod run;
pub mod serve;
pub mod service;
pub mod telemetry;

pub use admission::Admission;
pub use auth::{ApiKeys, KeysError};
pub use deadline::grpc_timeout;
pub use gateway::{stage_endpoint, Gateway};
pub use listen::MAX_HEADER_LIST_BYTES;
pub use run::{run, Discovery, ModelConfig, ServeConfig, StagesConfig};
pub use serve::{bind, serve, Connections, ServeOptions};
pub use service::{default_workers, Backend, CascadeService};
pub use telemetry::{ServerMetrics, Telemetry, TraceConfig};

use std::net::SocketAddr;

use cascade_core::EngineError;
use tonic::Status;

/// Requests larger than this are refused by the codec (tonic answers OUT_OF_RANGE).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The health service name that reports readiness.
pub const READINESS_SERVICE: &str = "cascade.v1.Cascade";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("endpoint {url:?}: {msg}")]
    Endpoint { url: String, msg: String },
    #[error("pod discovery: {0}")]
    Discovery(String),
    #[error("loading a model from {}: {source}", artifact.display())]
    Load {
        artifact: std::path::PathBuf,
        source: EngineError,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("{0}")]
    Setup(String),
}

/// Which stages this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    All,
    Gateway,
    Retrieval,
    Ranker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Gateway => "gateway",
            Role::Retrieval => "retrieval",
            Role::Ranker => "ranker",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Role::All),
            "gateway" => Ok(Role::Gateway),
            "retrieval" => Ok(Role::Retrieval),
            "ranker" => Ok(Role::Ranker),
            _ => Err(format!(
                "unknown role {s:?} (expected all, gateway, retrieval or ranker)"
            )),
        }
    }
}

/// The one mapping from engine errors to gRPC status codes. Every variant
/// is named (no wildcard), so a new one must choose its code. Faults on the
/// server's side go to the log in full; the caller gets a message without
/// paths or library text.
pub fn to_status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument { field, msg } => {
            Status::invalid_argument(format!("{field}: {msg}"))
        }
        EngineError::Overloaded(m) => Status::resource_exhausted(m),
        EngineError::DeadlineExceeded => deadline::deadline_exceeded(),
        EngineError::Cancelled => Status::cancelled("the caller went away"),
        EngineError::NotFound(m) => Status::not_found(m),
        e @ EngineError::Unservable { .. } => Status::failed_precondition(e.to_string()),
        e @ EngineError::EventLog { .. } => {
            // Nothing was acknowledged: the caller may retry.
            tracing::error!("{e}");
            Status::unavailable("the events could not be stored (details in the server log)")
        }
        e @ (EngineError::Internal(_)
        | EngineError::Load(_)
        | EngineError::Data(_)
        | EngineError::Candle(_)) => {
            tracing::error!("{e}");
            Status::internal("internal error while serving the request (details in the server log)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_error_class_has_its_code() {
        use tonic::Code;
        let cases = [
            (
                EngineError::InvalidArgument {
                    field: "user_id",
                    msg: "x".into(),
                },
                Code::InvalidArgument,
            ),
            (EngineError::Overloaded("q".into()), Code::ResourceExhausted),
            (EngineError::DeadlineExceeded, Code::DeadlineExceeded),
            (EngineError::Cancelled, Code::Cancelled),
            (EngineError::NotFound("v".into()), Code::NotFound),
            (
                EngineError::Unservable {
                    version: "v1".into(),
                    msg: "m".into(),
                },
                Code::FailedPrecondition,
            ),
            (EngineError::Internal("p".into()), Code::Internal),
            (
                EngineError::EventLog {
                    path: "/p".into(),
                    msg: "No space left on device".into(),
                },
                Code::Unavailable,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(to_status(e).code(), code);
        }
        // Server faults reach the caller without paths or library text.
        for e in [
            EngineError::Internal("reading /srv/secret/ranker.safetensors".into()),
            EngineError::EventLog {
                path: "/srv/secret/events.log".into(),
                msg: "No space left on device (os error 28)".into(),
            },
            EngineError::Candle(candle_core::Error::Msg(
                "/srv/secret: shape mismatch".into(),
            )),
        ] {
            let s = to_status(e);
            assert!(!s.message().contains("/srv/secret"), "{}", s.message());
            assert!(!s.message().contains("os error"), "{}", s.message());
        }
    }

    #[test]
    fn roles_parse() {
        for r in [Role::All, Role::Gateway, Role::Retrieval, Role::Ranker] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("both".parse::<Role>().is_err());
    }
}
