//! `--role gateway`: validation and merge in this process, retrieval and
//! ranking on other servers over gRPC. Every downstream call carries the
//! caller's remaining time as its `grpc-timeout` and is abandoned when it runs
//! out. The merge follows the in-process Predict step for step, so the split
//! deployment returns the same items as `--role all`.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, Instant};

use cascade_core::{Stage, StageSpan};
use opentelemetry::Context;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::deadline::{deadline_exceeded, MIN_BUDGET};
use crate::telemetry::Telemetry;
use crate::{to_status, ServerError, MAX_MESSAGE_BYTES};
use cascade_proto::pb;
use cascade_proto::pb::cascade_client::CascadeClient;

#[derive(Clone)]
pub struct Gateway {
    retrieval: CascadeClient<Channel>,
    ranker: CascadeClient<Channel>,
    tel: Telemetry,
}

fn client(url: &str) -> Result<CascadeClient<Channel>, ServerError> {
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| ServerError::Endpoint {
        url: url.into(),
        msg: e.to_string(),
    })?;
    // Lazy: the stages may start in any order; calls fail with UNAVAILABLE
    // until the other side is up.
    Ok(over(ep.tcp_nodelay(true).connect_lazy()))
}

fn over(channel: Channel) -> CascadeClient<Channel> {
    CascadeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// How the gateway reaches a stage's pods (see [`crate::discovery`]).
pub fn stage_endpoint(addr: std::net::SocketAddr) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true))
}

/// A downstream request carrying what is left of the caller's deadline.
fn downstream<T>(msg: T, expires: Option<Instant>) -> Result<Request<T>, Status> {
    let mut r = Request::new(msg);
    if let Some(t) = expires {
        let left = t.saturating_duration_since(Instant::now());
        if left < MIN_BUDGET {
            return Err(deadline_exceeded());
        }
        r.set_timeout(left);
    }
    Ok(r)
}

/// Await a downstream call, giving up when the caller's deadline passes.
async fn within<T>(
    expires: Option<Instant>,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    let r = match expires {
        Some(t) => tokio::time::timeout_at(t.into(), call)
            .await
            .map_err(|_| deadline_exceeded())?,
        None => call.await,
    };
    r.map(Response::into_inner)
}

/// The ranker names `item_ids`; the caller sent `candidate_item_ids`.
fn as_candidates(s: Status) -> Status {
    match s.message().strip_prefix("item_ids:") {
        Some(rest) if s.code() == tonic::Code::InvalidArgument => {
            Status::invalid_argument(format!("candidate_item_ids:{rest}"))
        }
        _ => s,
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// One downstream call: what is left of the deadline as its timeout, a
/// CLIENT span whose context travels as `traceparent`, the client series.
/// Returns the answer and how long the call took.
async fn call<T, R, Fut>(
    tel: &Telemetry,
    rpc: &'static str,
    cx: &Context,
    expires: Option<Instant>,
    msg: T,
    send: impl FnOnce(Request<T>) -> Fut,
) -> Result<(R, Duration), Status>
where
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let mut req = downstream(msg, expires)?;
    let c = tel.client(rpc, cx);
    c.inject(req.metadata_mut());
    let out = within(expires, send(req)).await;
    let took = c.finish(&out);
    out.map(|r| (r, took))
}

impl Gateway {
    /// Clients for the retrieval and ranker servers (`http://host:port`).
    pub fn new(retrieval_url: &str, ranker_url: &str) -> Result<Self, ServerError> {
        Ok(Self {
            retrieval: client(retrieval_url)?,
            ranker: client(ranker_url)?,
            tel: Telemetry::default(),
        })
    }

    /// Over given channels (e.g. balanced over pods found by [`crate::discovery`]).
    pub fn from_channels(retrieval: Channel, ranker: Channel) -> Self {
        Self {
            retrieval: over(retrieval),
            ranker: over(ranker),
            tel: Telemetry::default(),
        }
    }

    pub(crate) fn set_telemetry(&mut self, tel: Telemetry) {
        self.tel = tel;
    }

    async fn retrieve_call(
        &self,
        cx: &Context,
        expires: Option<Instant>,
        r: pb::RetrieveRequest,
    ) -> Result<(pb::ScoredItems, Duration), Status> {
        let mut c = self.retrieval.clone();
        call(&self.tel, "Retrieve", cx, expires, r, |q| async move {
            c.retrieve(q).await
        })
        .await
    }

    async fn rank_call(
        &self,
        cx: &Context,
        expires: Option<Instant>,
        r: pb::RankRequest,
    ) -> Result<(pb::ScoredItems, Duration), Status> {
        let mut c = self.ranker.clone();
        call(&self.tel, "Rank", cx, expires, r, |q| async move {
            c.rank(q).await
        })
        .await
    }

    pub async fn predict(
        &self,
        r: pb::PredictRequest,
        deadline: Option<Duration>,
        cx: &Context,
    ) -> Result<(pb::PredictResponse, Vec<StageSpan>), Status> {
        let t0 = Instant::now();
        if deadline.is_some_and(|d| d < MIN_BUDGET) {
            return Err(deadline_exceeded());
        }
        let expires = deadline.map(|d| t0 + d);
        let core = cascade_core::PredictRequest::from(r.clone());
        core.validate().map_err(to_status)?;
        let k = core.num_results;
        let exclude: HashSet<&str> = r.exclude_item_ids.iter().map(String::as_str).collect();
        let mut retrieval_us = 0;
        let mut ranking_us = 0;
        let rank = |item_ids: Vec<String>| pb::RankRequest {
            user_id: r.user_id.clone(),
            item_ids,
            context: r.context.clone(),
        };
        let (mut items, (cold_start, personalized_by), model_version, ranked) =
            if r.candidate_item_ids.is_empty() {
                let (got, took) = self
                    .retrieve_call(
                        cx,
                        expires,
                        pb::RetrieveRequest {
                            user_id: r.user_id.clone(),
                            num_candidates: r.num_candidates,
                            exclude_item_ids: r.exclude_item_ids.clone(),
                            context: r.context.clone(),
                            min_candidates: r.num_results,
                        },
                    )
                    .await?;
                retrieval_us = micros(took);
                if got.cold_start || got.items.is_empty() {
                    // No personal signal: popularity answered, already in final order.
                    let by = (got.cold_start, got.personalized_by);
                    (got.items, by, got.model_version, false)
                } else {
                    let ids = got.items.into_iter().map(|it| it.item_id).collect();
                    let (out, took) = self.rank_call(cx, expires, rank(ids)).await?;
                    ranking_us = micros(took);
                    let by = (out.cold_start, out.personalized_by);
                    (out.items, by, out.model_version, true)
                }
            } else {
                // Deduplicated, order kept; unknown IDs are the ranker's to reject
                // (before exclusions, as in process), exclusions are dropped after.
                let mut seen = HashSet::new();
                let ids: Vec<String> = r
                    .candidate_item_ids
                    .iter()
                    .filter(|id| seen.insert(id.as_str()))
                    .cloned()
                    .collect();
                let (out, took) = self
                    .rank_call(cx, expires, rank(ids))
                    .await
                    .map_err(as_candidates)?;
                ranking_us = micros(took);
                let items = out
                    .items
                    .into_iter()
                    .filter(|it| !exclude.contains(it.item_id.as_str()))
                    .collect();
                let by = (out.cold_start, out.personalized_by);
                (items, by, out.model_version, true)
            };
        let merge_start = Instant::now();
        if ranked {
            // Best first; equal scores keep candidate order (as in process).
            items.sort_by(|a, b| b.score.total_cmp(&a.score));
        }
        items.truncate(k);
        let merge = StageSpan {
            stage: Stage::Merge {
                results: items.len() as u32,
            },
            start: merge_start,
            duration: merge_start.elapsed(),
        };
        Ok((
            pb::PredictResponse {
                items,
                model_version,
                cold_start,
                personalized_by,
                timings: Some(pb::StageTimings {
                    user_state_us: 0,
                    retrieval_us,
                    ranking_us: ranking_us + micros(merge.duration),
                    total_us: micros(t0.elapsed()),
                    rank_queue_us: 0,
                }),
            },
            vec![merge],
        ))
    }

    pub async fn rank(
        &self,
        r: pb::RankRequest,
        deadline: Option<Duration>,
        cx: &Context,
    ) -> Result<pb::ScoredItems, Status> {
        let expires = deadline.map(|d| Instant::now() + d);
        Ok(self.rank_call(cx, expires, r).await?.0)
    }

    pub async fn retrieve(
        &self,
        r: pb::RetrieveRequest,
        deadline: Option<Duration>,
        cx: &Context,
    ) -> Result<pb::ScoredItems, Status> {
        let expires = deadline.map(|d| Instant::now() + d);
        Ok(self.retrieve_call(cx, expires, r).await?.0)
    }

    /// Both stages keep user state, so both record. Each side validates the
    /// same way, so a bad batch is rejected by both; a transport failure on
    /// one side returns its error and the caller's retry is harmless
    /// (recording an item twice changes nothing).
    pub async fn record_events(
        &self,
        r: pb::RecordEventsRequest,
        deadline: Option<Duration>,
        cx: &Context,
    ) -> Result<pb::RecordEventsResponse, Status> {
        let expires = deadline.map(|d| Instant::now() + d);
        let mut retrieval = self.retrieval.clone();
        let mut ranker = self.ranker.clone();
        let (a, b) = tokio::join!(
            call(
                &self.tel,
                "RecordEvents",
                cx,
                expires,
                r.clone(),
                |q| async move { retrieval.record_events(q).await }
            ),
            call(&self.tel, "RecordEvents", cx, expires, r, |q| async move {
                ranker.record_events(q).await
            }),
        );
        let a = a?.0;
        b?;
        Ok(a)
    }

    pub async fn model_info(
        &self,
        deadline: Option<Duration>,
        cx: &Context,
    ) -> Result<pb::ModelInfo, Status> {
        let expires = deadline.map(|d| Instant::now() + d);
        let mut c = self.ranker.clone();
        let msg = pb::GetModelInfoRequest {};
        let (info, _) = call(
            &self.tel,
            "GetModelInfo",
            cx,
            expires,
            msg,
            |q| async move { c.get_model_info(q).await },
        )
        .await?;
        Ok(info)
    }

    /// Reload both stages; the ranker's answer is returned.
    pub async fn reload(
        &self,
        r: pb::ReloadModelRequest,
        cx: &Context,
    ) -> Result<pb::ReloadModelResponse, Status> {
        let mut retrieval = self.retrieval.clone();
        let mut ranker = self.ranker.clone();
        let (a, b) = tokio::join!(
            call(
                &self.tel,
                "ReloadModel",
                cx,
                None,
                r.clone(),
                |q| async move { retrieval.reload_model(q).await }
            ),
            call(&self.tel, "ReloadModel", cx, None, r, |q| async move {
                ranker.reload_model(q).await
            }),
        );
        a?;
        Ok(b?.0)
    }
}
