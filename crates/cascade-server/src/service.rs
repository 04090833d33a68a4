//! The `cascade.v1.Cascade` handlers: each is role check → deadline →
//! core (in process) or the other stages (gateway) → convert. Observation
//! ([`crate::telemetry::ObserveLayer`]) and admission ([`crate::Admission`])
//! wrap the service as tower layers, so no handler does either.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_core::{CallCtx, Engine, EngineError, EngineHandle, StageSpan};
use cascade_proto::convert::{self, RankArgs, RetrieveArgs};
use cascade_proto::pb;
use cascade_proto::pb::cascade_server::Cascade;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::deadline::{deadline_exceeded, grpc_timeout, MIN_BUDGET};
use crate::telemetry::observe::{Stages, TraceCx};
use crate::{to_status, Gateway, Role, Telemetry};

/// What answers the requests: a model in process, or the other stages.
#[derive(Clone)]
pub enum Backend {
    Local(Arc<EngineHandle>),
    Gateway(Box<Gateway>),
}

impl From<Gateway> for Backend {
    fn from(g: Gateway) -> Self {
        Backend::Gateway(Box::new(g))
    }
}

pub struct CascadeService {
    backend: Backend,
    role: Role,
    device: String,
    /// Requests doing CPU work on blocking threads at once. Admitted requests
    /// beyond it wait here (asynchronously, within their deadline) rather
    /// than as runnable threads: dozens of threads retrieving at once on a
    /// few cores starve the ranking threads and every request slows.
    workers: Arc<Semaphore>,
    tel: Telemetry,
}

/// Default for `workers`: two per core, so one request can retrieve while
/// another waits for its ranking batch.
pub fn default_workers() -> usize {
    2 * std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// An answer with the engine's stage records attached for the observation layer.
fn staged<T>(msg: T, stages: Vec<StageSpan>) -> Response<T> {
    let mut r = Response::new(msg);
    r.extensions_mut().insert(Stages(stages));
    r
}

/// A core answer that carries its stage records.
trait WithStages {
    fn take_stages(&mut self) -> Vec<StageSpan>;
}

impl WithStages for cascade_core::PredictResponse {
    fn take_stages(&mut self) -> Vec<StageSpan> {
        std::mem::take(&mut self.stages)
    }
}

impl WithStages for cascade_core::RankResponse {
    fn take_stages(&mut self) -> Vec<StageSpan> {
        std::mem::take(&mut self.stages)
    }
}

/// A core answer converted to its message, its stages moved to the extension.
fn answer<C: WithStages, P: From<C>>(mut core: C) -> Response<P> {
    let stages = core.take_stages();
    staged(P::from(core), stages)
}

/// What every handler reads from its request: the caller's remaining time
/// and the trace context the observation layer opened.
fn call_of<T>(req: &Request<T>) -> Result<(Option<Duration>, opentelemetry::Context), Status> {
    let cx = req
        .extensions()
        .get::<TraceCx>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    Ok((grpc_timeout(req.metadata())?, cx))
}

impl CascadeService {
    pub fn new(backend: Backend, role: Role, device: String) -> Self {
        Self {
            backend,
            role,
            device,
            workers: Arc::new(Semaphore::new(default_workers())),
            tel: Telemetry::default(),
        }
    }

    /// At most `n` requests doing model work at once (see [`default_workers`]).
    pub fn with_workers(mut self, n: usize) -> Self {
        self.workers = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    /// Telemetry for what handlers record themselves (the gateway's client
    /// calls, model reloads); per-RPC observation is the layer's.
    pub fn with_telemetry(mut self, tel: Telemetry) -> Self {
        let tel = tel.with_role(self.role.as_str(), &self.device);
        if let Backend::Gateway(g) = &mut self.backend {
            g.set_telemetry(tel.clone());
        }
        self.tel = tel;
        self
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
pub(crate) fn worker_failed(e: tokio::task::JoinError) -> Status {
    tracing::error!("a request's model work failed: {e}");
    Status::internal("internal error while serving the request")
}

#[tonic::async_trait]
impl Cascade for CascadeService {
    async fn predict(
        &self,
        req: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        self.serves("Predict", &[Role::Gateway])?;
        let (deadline, cx) = call_of(&req)?;
        if let Backend::Gateway(g) = &self.backend {
            let (resp, stages) = g.predict(req.into_inner(), deadline, &cx).await?;
            return Ok(staged(resp, stages));
        }
        let r = cascade_core::PredictRequest::from(req.into_inner());
        let resp = self
            .blocking(deadline, move |e, ctx| e.predict_with(&r, ctx))
            .await?;
        Ok(answer(resp))
    }

    async fn rank(
        &self,
        req: Request<pb::RankRequest>,
    ) -> Result<Response<pb::ScoredItems>, Status> {
        self.serves("Rank", &[Role::Ranker, Role::Gateway])?;
        let (deadline, cx) = call_of(&req)?;
        if let Backend::Gateway(g) = &self.backend {
            return Ok(Response::new(
                g.rank(req.into_inner(), deadline, &cx).await?,
            ));
        }
        let r = RankArgs::from(req.into_inner());
        let resp = self
            .blocking(deadline, move |e, ctx| {
                e.rank_with(&r.user_id, &r.item_ids, &r.context_item_ids, ctx)
            })
            .await?;
        Ok(answer(resp))
    }

    async fn retrieve(
        &self,
        req: Request<pb::RetrieveRequest>,
    ) -> Result<Response<pb::ScoredItems>, Status> {
        self.serves("Retrieve", &[Role::Retrieval, Role::Gateway])?;
        let (deadline, cx) = call_of(&req)?;
        if let Backend::Gateway(g) = &self.backend {
            return Ok(Response::new(
                g.retrieve(req.into_inner(), deadline, &cx).await?,
            ));
        }
        let r = RetrieveArgs::from(req.into_inner());
        let resp = self
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
        Ok(answer(resp))
    }

    async fn record_events(
        &self,
        req: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsResponse>, Status> {
        let (deadline, cx) = call_of(&req)?;
        if let Backend::Gateway(g) = &self.backend {
            let resp = g.record_events(req.into_inner(), deadline, &cx).await?;
            return Ok(Response::new(resp));
        }
        let events = convert::events(req.into_inner());
        // Blocking pool: the log append waits for the disk.
        let accepted = self
            .blocking(deadline, move |e, _| e.record_events(&events))
            .await?;
        Ok(Response::new(pb::RecordEventsResponse {
            accepted: accepted as u32,
        }))
    }

    async fn get_model_info(
        &self,
        req: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let (deadline, cx) = call_of(&req)?;
        if let Backend::Gateway(g) = &self.backend {
            let mut info = g.model_info(deadline, &cx).await?;
            info.role = self.role.as_str().into();
            return Ok(Response::new(info));
        }
        let engine = self.local()?.current();
        let (users, items, dim) = engine.shape();
        Ok(Response::new(pb::ModelInfo {
            model_version: engine.model_version().to_string(),
            num_users: users as u32,
            num_items: items as u32,
            embedding_dim: dim as u32,
            device: self.device.clone(),
            artifact_dir: engine.dir().display().to_string(),
            role: self.role.as_str().into(),
        }))
    }

    async fn reload_model(
        &self,
        req: Request<pb::ReloadModelRequest>,
    ) -> Result<Response<pb::ReloadModelResponse>, Status> {
        let (_, cx) = call_of(&req)?;
        if let Backend::Gateway(g) = &self.backend {
            return Ok(Response::new(g.reload(req.into_inner(), &cx).await?));
        }
        let handle = self.local()?.clone();
        let version = req.into_inner().version;
        // Loading and warming take a while: off the async workers (and, by
        // the admission layer, outside the in-flight limit).
        let r = tokio::task::spawn_blocking(move || {
            handle.reload(Some(version.as_str()).filter(|v| !v.is_empty()))
        })
        .await
        .map_err(worker_failed)
        .and_then(|r| r.map_err(to_status));
        if let Some(m) = &self.tel.metrics {
            let result = match &r {
                Ok(r) if r.swapped => "swapped",
                Ok(_) => "unchanged",
                Err(_) => "failed",
            };
            m.reloads.with_label_values(&[result]).inc();
        }
        Ok(Response::new(r?.into()))
    }
}
