//! Cascade's gRPC surface: thin tonic handlers over [`cascade_core`],
//! `grpc.health.v1` and server reflection (v1 and v1alpha), in one of four
//! roles: `all` (every stage in process), `retrieval`, `ranker`, or `gateway`
//! (validation and merge, calling the other two over gRPC with the remaining
//! deadline).
//!
//! Model work runs on Tokio's blocking pool and the ranking threads, never on
//! the async workers; every engine error maps to a gRPC status in one place.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_core::{CallCtx, Engine, EngineError, EngineHandle, StageSpan};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

pub mod discovery;
mod gateway;
pub mod telemetry;
pub use gateway::{stage_endpoint, Gateway};
pub use telemetry::{ServerMetrics, Telemetry, TraceConfig};

impl From<Gateway> for Backend {
    fn from(g: Gateway) -> Self {
        Backend::Gateway(Box::new(g))
    }
}

use cascade_proto::convert::{self, RankArgs, RetrieveArgs};
use cascade_proto::pb;
use pb::cascade_server::{Cascade, CascadeServer};

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

/// The one mapping from engine errors to gRPC status codes.
pub fn to_status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument { field, msg } => {
            Status::invalid_argument(format!("{field}: {msg}"))
        }
        EngineError::Overloaded(m) => Status::resource_exhausted(m),
        EngineError::DeadlineExceeded => deadline_exceeded(),
        EngineError::Cancelled => Status::cancelled("the caller went away"),
        EngineError::NotFound(m) => Status::not_found(m),
        other => Status::internal(other.to_string()),
    }
}

/// What answers the requests: a model in process, or the other stages.
#[derive(Clone)]
pub enum Backend {
    Local(Arc<EngineHandle>),
    Gateway(Box<Gateway>),
}

pub struct CascadeService {
    backend: Backend,
    role: Role,
    device: String,
    /// Bounds work in flight; a request that finds no permit is refused at
    /// once with RESOURCE_EXHAUSTED instead of queueing without bound.
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// Requests doing CPU work on blocking threads at once. Admitted requests
    /// beyond it wait here (asynchronously, bounded by the in-flight limit)
    /// rather than as runnable threads: dozens of threads retrieving at once
    /// on a few cores starve the ranking threads and every request slows.
    workers: Arc<Semaphore>,
    tel: Telemetry,
}

impl CascadeService {
    pub fn new(backend: Backend, role: Role, device: String, max_in_flight: usize) -> Self {
        Self::with_workers(backend, role, device, max_in_flight, default_workers())
    }

    /// Observe every RPC with `tel` (and the gateway's downstream calls).
    pub fn with_telemetry(mut self, tel: Telemetry) -> Self {
        let tel = tel.with_role(self.role.as_str(), &self.device);
        if let Some(m) = &tel.metrics {
            m.in_flight_limit.set(self.max_in_flight as i64);
        }
        if let Backend::Gateway(g) = &mut self.backend {
            g.set_telemetry(tel.clone());
        }
        self.tel = tel;
        self
    }

    pub fn with_workers(
        backend: Backend,
        role: Role,
        device: String,
        max_in_flight: usize,
        workers: usize,
    ) -> Self {
        Self {
            backend,
            role,
            device,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            workers: Arc::new(Semaphore::new(workers.max(1))),
            tel: Telemetry::default(),
        }
    }

    /// The in-flight limiter (exposed so tests can saturate it).
    pub fn limiter(&self) -> Arc<Semaphore> {
        self.in_flight.clone()
    }

    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.in_flight.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "overloaded: {} requests already in flight",
                self.max_in_flight
            ))
        })
    }

    fn serves(&self, rpc: &str, roles: &[Role]) -> Result<(), Status> {
        if self.role == Role::All || roles.contains(&self.role) {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "{rpc} is not served by a --role {} server",
                self.role.as_str()
            )))
        }
    }

    fn local(&self) -> Result<&Arc<EngineHandle>, Status> {
        match &self.backend {
            Backend::Local(h) => Ok(h),
            Backend::Gateway(_) => Err(Status::internal("no local model in this role")),
        }
    }

    /// Run model work on the blocking pool against the version serving now
    /// and map its error. Work that cannot start before the deadline is
    /// skipped, queued ranking rows of a caller that left are dropped, and a
    /// late result is discarded: the caller gets DEADLINE_EXCEEDED.
    async fn blocking<T: Send + 'static>(
        &self,
        deadline: Option<Duration>,
        f: impl FnOnce(&Engine, &CallCtx) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, Status> {
        let arrived = Instant::now();
        if deadline.is_some_and(|d| d < MIN_BUDGET) {
            return Err(deadline_exceeded());
        }
        let permit = self.permit()?;
        let expires = deadline.map(|d| arrived + d);
        let slot = match expires {
            Some(t) => tokio::time::timeout_at(t.into(), self.workers.clone().acquire_owned())
                .await
                .map_err(|_| deadline_exceeded())?,
            None => self.workers.clone().acquire_owned().await,
        }
        .map_err(|_| Status::unavailable("shutting down"))?;
        // The request finishes on the version it started with, even across a reload.
        let engine = self.local()?.current();
        let ctx = CallCtx::with_deadline(expires);
        let guard = ctx.guard();
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _slot = slot;
            ctx.check()?;
            f(&engine, &ctx)
        });
        let joined = match expires {
            Some(t) => tokio::time::timeout_at(t.into(), work)
                .await
                .map_err(|_| deadline_exceeded())?,
            None => work.await,
        };
        guard.disarm();
        joined.map_err(worker_failed)?.map_err(to_status)
    }
}

/// A request's blocking task died (a panic): the details go to the log, the
/// caller gets a generic INTERNAL (a panic message is no part of the API).
fn worker_failed(e: tokio::task::JoinError) -> Status {
    tracing::error!("a request's model work failed: {e}");
    Status::internal("internal error while serving the request")
}

/// Default for `workers`: two per core, so one request can retrieve while
/// another waits for its ranking batch.
pub fn default_workers() -> usize {
    2 * std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Below this much remaining time a request is not started at all.
pub(crate) const MIN_BUDGET: Duration = Duration::from_millis(1);

/// The caller's remaining time, from the `grpc-timeout` request header.
///
/// The gRPC spec allows at most 8 digits and a unit (`H M S m u n`): so the
/// longest deadline is 99,999,999 hours, which an `Instant` can always add.
/// Anything else (more digits, no unit, not ASCII) is the client's error:
/// `INVALID_ARGUMENT` naming the header, never a panic further on.
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, Status> {
    let Some(raw) = meta.get("grpc-timeout") else {
        return Ok(None);
    };
    parse_grpc_timeout(raw.as_bytes()).map(Some).ok_or_else(|| {
        Status::invalid_argument(format!(
            "grpc-timeout header {:?}: expected 1 to 8 digits and a unit (H, M, S, m, u or n)",
            String::from_utf8_lossy(raw.as_bytes())
        ))
    })
}

fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: no overflow in u64, nor in the multiplications below.
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("deadline expired; the request was abandoned")
}

type Staged<T> = Result<(T, Vec<StageSpan>), Status>;

impl CascadeService {
    async fn predict_inner(
        &self,
        req: Request<pb::PredictRequest>,
        cx: &opentelemetry::Context,
    ) -> Staged<pb::PredictResponse> {
        self.serves("Predict", &[Role::Gateway])?;
        let deadline = grpc_timeout(req.metadata())?;
        if let Backend::Gateway(g) = &self.backend {
            let _permit = self.permit()?;
            return g.predict(req.into_inner(), deadline, cx).await;
        }
        let r = cascade_core::PredictRequest::from(req.into_inner());
        let mut resp = self
            .blocking(deadline, move |e, ctx| e.predict_with(&r, ctx))
            .await?;
        let stages = std::mem::take(&mut resp.stages);
        Ok((resp.into(), stages))
    }

    async fn rank_inner(
        &self,
        req: Request<pb::RankRequest>,
        cx: &opentelemetry::Context,
    ) -> Staged<pb::ScoredItems> {
        self.serves("Rank", &[Role::Ranker, Role::Gateway])?;
        let deadline = grpc_timeout(req.metadata())?;
        if let Backend::Gateway(g) = &self.backend {
            let _permit = self.permit()?;
            return Ok((g.rank(req.into_inner(), deadline, cx).await?, Vec::new()));
        }
        let r = RankArgs::from(req.into_inner());
        let mut resp = self
            .blocking(deadline, move |e, ctx| {
                e.rank_with(&r.user_id, &r.item_ids, &r.context_item_ids, ctx)
            })
            .await?;
        let stages = std::mem::take(&mut resp.stages);
        Ok((resp.into(), stages))
    }

    async fn retrieve_inner(
        &self,
        req: Request<pb::RetrieveRequest>,
        cx: &opentelemetry::Context,
    ) -> Staged<pb::ScoredItems> {
        self.serves("Retrieve", &[Role::Retrieval, Role::Gateway])?;
        let deadline = grpc_timeout(req.metadata())?;
        if let Backend::Gateway(g) = &self.backend {
            let _permit = self.permit()?;
            return Ok((
                g.retrieve(req.into_inner(), deadline, cx).await?,
                Vec::new(),
            ));
        }
        let r = RetrieveArgs::from(req.into_inner());
        let mut resp = self
            .blocking(deadline, move |e, _| {
                e.retrieve_with(
                    &r.user_id,
                    r.num_candidates,
                    r.min_candidates,
                    &r.exclude_item_ids,
                    &r.context_item_ids,
                )
            })
            .await?;
        let stages = std::mem::take(&mut resp.stages);
        Ok((resp.into(), stages))
    }

    async fn record_events_inner(
        &self,
        req: Request<pb::RecordEventsRequest>,
        cx: &opentelemetry::Context,
    ) -> Staged<pb::RecordEventsResponse> {
        let deadline = grpc_timeout(req.metadata())?;
        if let Backend::Gateway(g) = &self.backend {
            let _permit = self.permit()?;
            return Ok((
                g.record_events(req.into_inner(), deadline, cx).await?,
                Vec::new(),
            ));
        }
        let events = convert::events(req.into_inner());
        // Blocking pool: the log append waits for the disk.
        let accepted = self
            .blocking(deadline, move |e, _| e.record_events(&events))
            .await?;
        Ok((
            pb::RecordEventsResponse {
                accepted: accepted as u32,
            },
            Vec::new(),
        ))
    }

    async fn get_model_info_inner(
        &self,
        req: Request<pb::GetModelInfoRequest>,
        cx: &opentelemetry::Context,
    ) -> Staged<pb::ModelInfo> {
        if let Backend::Gateway(g) = &self.backend {
            let deadline = grpc_timeout(req.metadata())?;
            let mut info = g.model_info(deadline, cx).await?;
            info.role = self.role.as_str().into();
            return Ok((info, Vec::new()));
        }
        let engine = self.local()?.current();
        let (users, items, dim) = engine.shape();
        Ok((
            pb::ModelInfo {
                model_version: engine.model_version().to_string(),
                num_users: users as u32,
                num_items: items as u32,
                embedding_dim: dim as u32,
                device: self.device.clone(),
                artifact_dir: engine.dir().display().to_string(),
                role: self.role.as_str().into(),
            },
            Vec::new(),
        ))
    }

    async fn reload_model_inner(
        &self,
        req: Request<pb::ReloadModelRequest>,
        cx: &opentelemetry::Context,
    ) -> Staged<pb::ReloadModelResponse> {
        if let Backend::Gateway(g) = &self.backend {
            return Ok((g.reload(req.into_inner(), cx).await?, Vec::new()));
        }
        let handle = self.local()?.clone();
        let version = req.into_inner().version;
        // Loading and warming take a while: off the async workers, and not
        // counted against the in-flight limit that guards request work.
        let r = tokio::task::spawn_blocking(move || {
            handle.reload(Some(version.as_str()).filter(|v| !v.is_empty()))
        })
        .await
        .map_err(worker_failed);
        let r = r.and_then(|r| r.map_err(to_status));
        if let Some(m) = &self.tel.metrics {
            let result = match &r {
                Ok(r) if r.swapped => "swapped",
                Ok(_) => "unchanged",
                Err(_) => "failed",
            };
            m.reloads.with_label_values(&[result]).inc();
        }
        Ok((r?.into(), Vec::new()))
    }
}

/// Each RPC: observe (span, series), run, record the outcome and stages.
#[tonic::async_trait]
impl Cascade for CascadeService {
    async fn predict(
        &self,
        req: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let scope = self.tel.begin("Predict", req.metadata());
        let out = self.predict_inner(req, &scope.cx).await;
        scope.finish(out)
    }

    async fn rank(
        &self,
        req: Request<pb::RankRequest>,
    ) -> Result<Response<pb::ScoredItems>, Status> {
        let scope = self.tel.begin("Rank", req.metadata());
        let out = self.rank_inner(req, &scope.cx).await;
        scope.finish(out)
    }

    async fn retrieve(
        &self,
        req: Request<pb::RetrieveRequest>,
    ) -> Result<Response<pb::ScoredItems>, Status> {
        let scope = self.tel.begin("Retrieve", req.metadata());
        let out = self.retrieve_inner(req, &scope.cx).await;
        scope.finish(out)
    }

    async fn record_events(
        &self,
        req: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsResponse>, Status> {
        let scope = self.tel.begin("RecordEvents", req.metadata());
        let out = self.record_events_inner(req, &scope.cx).await;
        scope.finish(out)
    }

    async fn get_model_info(
        &self,
        req: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let scope = self.tel.begin("GetModelInfo", req.metadata());
        let out = self.get_model_info_inner(req, &scope.cx).await;
        scope.finish(out)
    }

    async fn reload_model(
        &self,
        req: Request<pb::ReloadModelRequest>,
    ) -> Result<Response<pb::ReloadModelResponse>, Status> {
        let scope = self.tel.begin("ReloadModel", req.metadata());
        let out = self.reload_model_inner(req, &scope.cx).await;
        scope.finish(out)
    }
}

/// How to serve.
pub struct ServeOptions {
    pub role: Role,
    /// Reported by GetModelInfo ("cpu", "cuda:0", or "remote" for a gateway).
    pub device: String,
    pub max_in_flight: usize,
    /// Requests doing model work on blocking threads at once (see [`default_workers`]).
    pub workers: usize,
    /// Traces and metrics (default: both off).
    pub telemetry: Telemetry,
    /// Connection keepalive, age and drain bounds.
    pub connections: Connections,
}

/// What bounds a connection's life. tonic 0.14 has no idle or header-read
/// timeout per connection: keepalive finds dead peers, the age bound ends
/// live but idle (or trickling) ones, and the drain bound ends the rest at
/// shutdown.
#[derive(Debug, Clone, Copy)]
pub struct Connections {
    /// HTTP/2 PING every this long on a quiet connection…
    pub keepalive_interval: Duration,
    /// …and the connection is closed if the PING is not answered in this.
    pub keepalive_timeout: Duration,
    /// Close a connection (GOAWAY, then `max_age_grace` for its requests)
    /// after this long; `None` keeps it open while it is alive. Clients
    /// reconnect, which also rebalances them across replicas behind an L4
    /// load balancer.
    pub max_age: Option<Duration>,
    pub max_age_grace: Duration,
    /// After shutdown starts, wait at most this long for requests in flight;
    /// then the remaining connections are cut and `serve` returns.
    pub drain_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            max_age: Some(Duration::from_secs(1800)),
            max_age_grace: Duration::from_secs(30),
            // Below the chart's 45 s grace period minus its 5 s preStop.
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Serve on `listener` until `shutdown` resolves; then readiness turns
/// NOT_SERVING and in-flight requests drain before this returns.
pub async fn serve(
    backend: Backend,
    opts: ServeOptions,
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
    let svc = CascadeService::with_workers(
        backend,
        opts.role,
        opts.device,
        opts.max_in_flight,
        opts.workers,
    )
    .with_telemetry(opts.telemetry);
    let (limiter, max_in_flight) = (svc.limiter(), opts.max_in_flight);
    let service = CascadeServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let c = opts.connections;
    let drain_reporter = reporter.clone();
    let started = Arc::new(tokio::sync::Notify::new());
    let start_drain = started.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: readiness NOT_SERVING, draining in-flight requests");
        drain_reporter
            .set_not_serving::<CascadeServer<CascadeService>>()
            .await;
        start_drain.notify_one();
    };
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(c.keepalive_interval))
        .http2_keepalive_timeout(Some(c.keepalive_timeout))
        .tcp_keepalive(Some(c.keepalive_interval));
    if let Some(age) = c.max_age {
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(c.max_age_grace);
    }
    let server = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        // Small responses must leave at once: without TCP_NODELAY, Nagle's
        // algorithm and the peer's delayed ACK add up to 40 ms to a reply.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    // A graceful shutdown waits for every connection to close, and a silent
    // peer (or one that never answers the GOAWAY) would keep it waiting
    // forever: past the drain bound, stop waiting and cut what is left.
    let bound = async {
        started.notified().await;
        tokio::time::sleep(c.drain_timeout).await;
    };
    tokio::select! {
        done = server => done?,
        _ = bound => {
            let busy = max_in_flight.saturating_sub(limiter.available_permits());
            tracing::warn!(
                "drain timeout ({:.0} s) passed: cutting the remaining connections ({busy} requests still in flight)",
                c.drain_timeout.as_secs_f64()
            );
        }
    }
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
    fn parses_grpc_timeout_per_the_spec() {
        use tonic::Code;
        let mut m = tonic::metadata::MetadataMap::new();
        for (v, want) in [
            ("2S", Some(Duration::from_secs(2))),
            ("150m", Some(Duration::from_millis(150))),
            ("7u", Some(Duration::from_micros(7))),
            ("3M", Some(Duration::from_secs(180))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5n", Some(Duration::from_nanos(5))),
            ("99999999H", Some(Duration::from_secs(99_999_999 * 3600))),
            ("00000001S", Some(Duration::from_secs(1))),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m).unwrap(), want, "{v}");
            // The longest allowed deadline still fits an Instant.
            assert!(Instant::now().checked_add(want.unwrap()).is_some(), "{v}");
        }
        for v in [
            "5x",
            "S",
            "",
            "123456789S",
            "18446744073709551615S",
            "-1S",
            "+1S",
            "1.5S",
            " 1S",
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            let e = grpc_timeout(&m).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{v}");
            assert!(e.message().contains("grpc-timeout"), "{v}: {}", e.message());
        }
        assert_eq!(
            grpc_timeout(&tonic::metadata::MetadataMap::new()).unwrap(),
            None
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]

        /// Any header bytes: a deadline that fits an `Instant`, or none.
        #[test]
        fn any_grpc_timeout_bytes_parse_or_are_refused(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12)) {
            if let Some(d) = parse_grpc_timeout(&v) {
                proptest::prop_assert!(d <= Duration::from_secs(99_999_999 * 3600));
                proptest::prop_assert!(Instant::now().checked_add(d).is_some());
            }
        }

        /// Every well-formed value parses to exactly its duration.
        #[test]
        fn well_formed_grpc_timeouts_parse_exactly(n in 0u64..100_000_000, unit in 0usize..6) {
            let (c, d) = [
                ('H', Duration::from_secs(n * 3600)),
                ('M', Duration::from_secs(n * 60)),
                ('S', Duration::from_secs(n)),
                ('m', Duration::from_millis(n)),
                ('u', Duration::from_micros(n)),
                ('n', Duration::from_nanos(n)),
            ][unit];
            proptest::prop_assert_eq!(parse_grpc_timeout(format!("{n}{c}").as_bytes()), Some(d));
        }
    }

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
            (EngineError::Internal("p".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(to_status(e).code(), code);
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
