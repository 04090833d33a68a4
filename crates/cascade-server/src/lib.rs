//! Cascade's gRPC surface: thin tonic handlers over [`cascade_core::Engine`],
//! `grpc.health.v1` and server reflection (v1 and v1alpha).
//!
//! Model work runs on Tokio's blocking pool (dedicated threads), never on the
//! async workers; every engine error maps to a gRPC status in one place.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_core::{Engine, EngineError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

pub mod pb {
    tonic::include_proto!("cascade.v1");
    /// Encoded descriptors for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cascade_descriptor");
}

use pb::cascade_server::{Cascade, CascadeServer};

/// Requests larger than this are refused by the codec (RESOURCE_EXHAUSTED).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

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
}

/// The one mapping from engine errors to gRPC status codes.
pub fn to_status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument { field, msg } => {
            Status::invalid_argument(format!("{field}: {msg}"))
        }
        other => Status::internal(other.to_string()),
    }
}

pub struct CascadeService {
    engine: Arc<Engine>,
    device: String,
    /// Bounds model work in flight; a request that finds no permit is refused
    /// at once with RESOURCE_EXHAUSTED instead of queueing without bound.
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

impl CascadeService {
    pub fn new(engine: Arc<Engine>, device: String, max_in_flight: usize) -> Self {
        Self {
            engine,
            device,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    /// The in-flight limiter (exposed so tests can saturate it).
    pub fn limiter(&self) -> Arc<Semaphore> {
        self.in_flight.clone()
    }
}

fn opt(v: f32) -> Option<f32> {
    (!v.is_nan()).then_some(v)
}

fn to_pb(it: cascade_core::ScoredItem) -> pb::ScoredItem {
    pb::ScoredItem {
        item_id: it.item_id,
        title: it.title,
        score: it.score,
        retrieval_score: opt(it.retrieval_score),
        predicted_rating: opt(it.predicted_rating),
    }
}

fn items_to_pb(r: cascade_core::RankResponse) -> pb::ScoredItems {
    pb::ScoredItems {
        items: r.items.into_iter().map(to_pb).collect(),
        model_version: r.model_version,
        cold_start: r.cold_start,
    }
}

/// Below this much remaining time a request is not started at all.
const MIN_BUDGET: Duration = Duration::from_millis(1);

/// The caller's remaining time, from the `grpc-timeout` request header.
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("deadline expired; the request was abandoned")
}

impl CascadeService {
    /// Run model work on the blocking pool and map its error. With a caller
    /// deadline, work that cannot start in time is skipped and a late result
    /// is dropped: the caller gets DEADLINE_EXCEEDED either way.
    async fn blocking<T: Send + 'static>(
        &self,
        deadline: Option<Duration>,
        f: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, Status> {
        let arrived = Instant::now();
        if deadline.is_some_and(|d| d < MIN_BUDGET) {
            return Err(deadline_exceeded());
        }
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "overloaded: {} requests already in flight",
                self.max_in_flight
            ))
        })?;
        let engine = self.engine.clone();
        let expires = deadline.map(|d| arrived + d);
        // The permit lives until the model work ends, even if the caller left.
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if expires.is_some_and(|t| Instant::now() >= t) {
                return None; // waited too long for a thread: abandon
            }
            Some(f(&engine))
        });
        let joined = match expires {
            Some(t) => tokio::time::timeout_at(t.into(), work)
                .await
                .map_err(|_| deadline_exceeded())?,
            None => work.await,
        };
        joined
            .map_err(|e| Status::internal(format!("model worker failed: {e}")))?
            .ok_or_else(deadline_exceeded)?
            .map_err(to_status)
    }
}

#[tonic::async_trait]
impl Cascade for CascadeService {
    async fn predict(
        &self,
        req: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let deadline = grpc_timeout(req.metadata());
        let r = req.into_inner();
        let core_req = cascade_core::PredictRequest {
            user_id: r.user_id,
            num_results: r.num_results as usize,
            num_candidates: r.num_candidates as usize,
            exclude_item_ids: r.exclude_item_ids,
            candidate_item_ids: r.candidate_item_ids,
        };
        let resp = self
            .blocking(deadline, move |e| e.predict(&core_req))
            .await?;
        Ok(Response::new(pb::PredictResponse {
            items: resp.items.into_iter().map(to_pb).collect(),
            model_version: resp.model_version,
            cold_start: resp.cold_start,
            timings: Some(pb::StageTimings {
                user_state_us: resp.timings.user_state_us,
                retrieval_us: resp.timings.retrieval_us,
                ranking_us: resp.timings.ranking_us,
                total_us: resp.timings.total_us,
            }),
        }))
    }

    async fn rank(
        &self,
        req: Request<pb::RankRequest>,
    ) -> Result<Response<pb::ScoredItems>, Status> {
        let deadline = grpc_timeout(req.metadata());
        let r = req.into_inner();
        let resp = self
            .blocking(deadline, move |e| e.rank(&r.user_id, &r.item_ids))
            .await?;
        Ok(Response::new(items_to_pb(resp)))
    }

    async fn retrieve(
        &self,
        req: Request<pb::RetrieveRequest>,
    ) -> Result<Response<pb::ScoredItems>, Status> {
        let deadline = grpc_timeout(req.metadata());
        let r = req.into_inner();
        let resp = self
            .blocking(deadline, move |e| {
                e.retrieve(&r.user_id, r.num_candidates as usize, &r.exclude_item_ids)
            })
            .await?;
        Ok(Response::new(items_to_pb(resp)))
    }

    async fn record_events(
        &self,
        req: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsResponse>, Status> {
        let deadline = grpc_timeout(req.metadata());
        let events: Vec<cascade_core::Event> = req
            .into_inner()
            .events
            .into_iter()
            .map(|e| cascade_core::Event {
                user_id: e.user_id,
                item_id: e.item_id,
                kind: e.kind,
                timestamp: e.timestamp,
            })
            .collect();
        // Blocking pool: the log append waits for the disk.
        let accepted = self
            .blocking(deadline, move |e| e.record_events(&events))
            .await?;
        Ok(Response::new(pb::RecordEventsResponse {
            accepted: accepted as u32,
        }))
    }

    async fn get_model_info(
        &self,
        _req: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let (users, items, dim) = self.engine.shape();
        Ok(Response::new(pb::ModelInfo {
            model_version: self.engine.model_version().to_string(),
            num_users: users as u32,
            num_items: items as u32,
            embedding_dim: dim as u32,
            device: self.device.clone(),
        }))
    }
}

/// Serve on `listener` until `shutdown` resolves; then readiness turns
/// NOT_SERVING and in-flight requests drain before this returns.
pub async fn serve(
    engine: Arc<Engine>,
    device: String,
    max_in_flight: usize,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<CascadeServer<CascadeService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let service = CascadeServer::new(CascadeService::new(engine, device, max_in_flight))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let drain_reporter = reporter.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: readiness NOT_SERVING, draining in-flight requests");
        drain_reporter
            .set_not_serving::<CascadeServer<CascadeService>>()
            .await;
    };
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Bind `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        let mut m = tonic::metadata::MetadataMap::new();
        for (v, want) in [
            ("2S", Some(Duration::from_secs(2))),
            ("150m", Some(Duration::from_millis(150))),
            ("7u", Some(Duration::from_micros(7))),
            ("3M", Some(Duration::from_secs(180))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5n", Some(Duration::from_nanos(5))),
            ("5x", None),
            ("S", None),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), want, "{v}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
