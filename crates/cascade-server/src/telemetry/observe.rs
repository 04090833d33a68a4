//! Per-RPC observation. [`ObserveLayer`] wraps the gRPC service: for each
//! call it extracts the caller's W3C trace context, opens the SERVER span,
//! counts the call in the `grpc_server_*` series, and when the response
//! comes back reads its status (tonic puts an error's `Status` in the
//! response extensions, decode failures included) and the engine's stage
//! records (a [`Stages`] extension the handler attaches) into child spans and
//! stage histograms. Handlers do none of this themselves.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cascade_core::{Stage, StageSpan};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanKind, Status as SpanStatus, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tonic::metadata::{MetadataKey, MetadataMap};
use tonic::{Code, Status};

use super::{code_name, server_fault, ServerMetrics, SERVICE};

/// What a server observes with: either part may be off.
#[derive(Clone, Default)]
pub struct Telemetry {
    pub metrics: Option<Arc<ServerMetrics>>,
    tracer: Option<SdkTracer>,
    role: &'static str,
    device: Arc<str>,
}

impl Telemetry {
    pub fn new(metrics: Option<Arc<ServerMetrics>>, provider: Option<&SdkTracerProvider>) -> Self {
        Self {
            metrics,
            tracer: provider.map(|p| p.tracer("cascade-server")),
            role: "",
            device: Arc::from(""),
        }
    }

    pub(crate) fn with_role(mut self, role: &'static str, device: &str) -> Self {
        self.role = role;
        self.device = Arc::from(device);
        self
    }

    /// Start observing one RPC.
    pub(crate) fn begin(&self, rpc: &'static str, meta: &http::HeaderMap) -> RpcScope {
        let started = Instant::now();
        let wall = SystemTime::now();
        if let Some(m) = &self.metrics {
            m.started.with_label_values(&["unary", SERVICE, rpc]).inc();
            m.in_flight.inc();
        }
        // A caller's context is continued even when this process exports
        // nothing, so the downstream stages still join the caller's trace.
        let parent = if meta.contains_key("traceparent") {
            TraceContextPropagator::new().extract(&MetaGet(meta))
        } else {
            Context::new()
        };
        let cx = match &self.tracer {
            Some(t) => {
                let span = t
                    .span_builder(format!("{SERVICE}/{rpc}"))
                    .with_kind(SpanKind::Server)
                    .with_start_time(wall)
                    .with_attributes([
                        KeyValue::new("rpc.system", "grpc"),
                        KeyValue::new("rpc.service", SERVICE),
                        KeyValue::new("rpc.method", rpc),
                        KeyValue::new("cascade.role", self.role),
                    ])
                    .start_with_context(t, &parent);
                parent.with_span(span)
            }
            None => parent,
        };
        RpcScope {
            tel: self.clone(),
            rpc,
            started,
            wall,
            cx,
            done: false,
        }
    }

    /// Start observing a downstream call made on behalf of `parent`.
    pub(crate) fn client(&self, rpc: &'static str, parent: &Context) -> ClientCall {
        let cx = match &self.tracer {
            Some(t) => {
                let span = t
                    .span_builder(format!("{SERVICE}/{rpc}"))
                    .with_kind(SpanKind::Client)
                    .with_attributes([
                        KeyValue::new("rpc.system", "grpc"),
                        KeyValue::new("rpc.service", SERVICE),
                        KeyValue::new("rpc.method", rpc),
                    ])
                    .start_with_context(t, parent);
                parent.with_span(span)
            }
            None => parent.clone(),
        };
        ClientCall {
            metrics: self.metrics.clone(),
            rpc,
            started: Instant::now(),
            cx,
            done: false,
        }
    }

    fn stage_spans(&self, parent: &Context, anchor: (Instant, SystemTime), stages: &[StageSpan]) {
        let Some(t) = &self.tracer else { return };
        if !parent.span().is_recording() {
            return;
        }
        let at = |i: Instant| -> SystemTime {
            match i.checked_duration_since(anchor.0) {
                Some(d) => anchor.1 + d,
                None => anchor.1 - anchor.0.duration_since(i),
            }
        };
        for s in stages {
            let mut attrs = Vec::with_capacity(5);
            match s.stage {
                Stage::UserState { cache } => {
                    attrs.push(KeyValue::new("cascade.user_cache", cache.as_str()))
                }
                Stage::Retrieval {
                    candidates,
                    bloom_checked,
                    bloom_rejected,
                    popularity_fill,
                    cold_start,
                } => {
                    attrs.push(KeyValue::new("cascade.candidates", i64::from(candidates)));
                    attrs.push(KeyValue::new(
                        "cascade.bloom.checked",
                        i64::from(bloom_checked),
                    ));
                    attrs.push(KeyValue::new(
                        "cascade.bloom.rejected",
                        i64::from(bloom_rejected),
                    ));
                    attrs.push(KeyValue::new(
                        "cascade.popularity_fill",
                        i64::from(popularity_fill),
                    ));
                    attrs.push(KeyValue::new("cascade.cold_start", cold_start));
                }
                Stage::FeatureAssembly { rows } => {
                    attrs.push(KeyValue::new("cascade.rows", i64::from(rows)))
                }
                Stage::RankQueue => {}
                Stage::RankForward {
                    batch_rows,
                    batch_requests,
                } => {
                    attrs.push(KeyValue::new("cascade.batch.rows", i64::from(batch_rows)));
                    attrs.push(KeyValue::new(
                        "cascade.batch.requests",
                        i64::from(batch_requests),
                    ));
                    attrs.push(KeyValue::new("cascade.device", self.device.to_string()));
                }
                Stage::Merge { results } => {
                    attrs.push(KeyValue::new("cascade.results", i64::from(results)))
                }
            }
            let span = t
                .span_builder(Cow::Owned(format!("cascade.{}", s.stage.name())))
                .with_kind(SpanKind::Internal)
                .with_start_time(at(s.start))
                .with_attributes(attrs)
                .start_with_context(t, parent);
            let cx = Context::new().with_span(span);
            cx.span().end_with_timestamp(at(s.end()));
        }
    }
}

/// The engine's stage records of one answer, attached by the handler to its
/// response for [`ObserveLayer`] (which removes them before the response
/// leaves).
#[derive(Clone)]
pub struct Stages(pub Vec<StageSpan>);

/// The RPC's trace context (with its server span when tracing), put in the
/// request extensions by [`ObserveLayer`] so the gateway's downstream calls
/// continue the trace.
#[derive(Clone, Default)]
pub struct TraceCx(pub Context);

/// The RPC names the series and spans use; anything else is `unknown` (a
/// bounded label set, whatever paths clients send).
const RPCS: [&str; 6] = [
    "Predict",
    "Rank",
    "Retrieve",
    "RecordEvents",
    "GetModelInfo",
    "ReloadModel",
];

fn rpc_name(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.into_iter().find(|r| *r == method).unwrap_or("unknown")
}

/// Observe every call of the wrapped gRPC service (see the module docs),
/// and answer DEADLINE_EXCEEDED when its deadline passes, whether or not
/// its body has arrived and its handler started.
#[derive(Clone)]
pub struct ObserveLayer {
    tel: Telemetry,
    /// The deadline of a request that sends no `grpc-timeout`.
    default_deadline: Duration,
}

impl ObserveLayer {
    pub fn new(tel: Telemetry, default_deadline: Duration) -> Self {
        Self {
            tel,
            default_deadline,
        }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;
    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            tel: self.tel.clone(),
            default_deadline: self.default_deadline,
        }
    }
}

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    tel: Telemetry,
    default_deadline: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for Observed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let scope = self.tel.begin(rpc_name(req.uri().path()), req.headers());
        req.extensions_mut().insert(TraceCx(scope.cx.clone()));
        // A malformed header gets no timer of its own here: the handler
        // refuses it at once, and the default bound still applies.
        let deadline =
            crate::deadline::header_deadline(req.headers()).unwrap_or(self.default_deadline);
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Dropped before this resolves (the caller went away), the
            // scope records CANCELLED. The handler answers its own expired
            // deadline; this timer answers for a request whose body never
            // came (so its handler never started).
            let mut resp = match tokio::time::timeout(deadline, fut).await {
                Ok(resp) => resp?,
                Err(_) => crate::deadline::deadline_exceeded().into_http(),
            };
            scope.finish(&mut resp);
            Ok(resp)
        })
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

/// One RPC being observed; [`ObserveLayer`] finishes it. Dropped
/// unfinished (the caller went away and the handler future with it), it is
/// recorded as CANCELLED.
pub(crate) struct RpcScope {
    tel: Telemetry,
    rpc: &'static str,
    started: Instant,
    wall: SystemTime,
    /// The caller's context, with this RPC's server span when tracing.
    pub cx: Context,
    done: bool,
}

impl RpcScope {
    /// Record the outcome and the stages from the response on its way out:
    /// an error's `Status` rides in the extensions (tonic puts it there,
    /// decode failures included), a trailers-only answer without one carries
    /// `grpc-status` in its headers, and anything else is OK with the
    /// handler's [`Stages`] attached.
    fn finish<B>(mut self, resp: &mut http::Response<B>) {
        self.done = true;
        let stages = resp
            .extensions_mut()
            .remove::<Stages>()
            .map(|s| s.0)
            .unwrap_or_default();
        let (code, msg) = match resp.extensions().get::<Status>() {
            Some(s) => (s.code(), Some(s.message().to_string())),
            None => match resp.headers().get("grpc-status") {
                Some(v) => (Code::from_bytes(v.as_bytes()), None),
                None => (Code::Ok, None),
            },
        };
        if let Some(m) = &self.tel.metrics {
            for s in &stages {
                m.stage
                    .with_label_values(&[s.stage.name()])
                    .observe(s.duration.as_secs_f64());
            }
        }
        self.tel
            .stage_spans(&self.cx, (self.started, self.wall), &stages);
        self.record(code, msg.as_deref());
    }

    fn record(&self, code: Code, msg: Option<&str>) {
        let elapsed = self.started.elapsed();
        if let Some(m) = &self.tel.metrics {
            let labels = ["unary", SERVICE, self.rpc, code_name(code)];
            m.handled.with_label_values(&labels).inc();
            m.handling
                .with_label_values(&labels)
                .observe(elapsed.as_secs_f64());
            m.in_flight.dec();
        }
        let span = self.cx.span();
        let sc = span.span_context();
        let (trace_id, span_id) = if sc.is_valid() {
            (sc.trace_id().to_string(), sc.span_id().to_string())
        } else {
            (String::new(), String::new())
        };
        if span.is_recording() {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
            if server_fault(code) {
                span.set_status(SpanStatus::error(msg.unwrap_or_default().to_string()));
            }
            span.end_with_timestamp(self.wall + elapsed);
        }
        if server_fault(code) && code != Code::DeadlineExceeded {
            tracing::warn!(
                rpc = self.rpc,
                code = code_name(code),
                trace_id = %trace_id,
                span_id = %span_id,
                "rpc failed: {}",
                msg.unwrap_or_default()
            );
        } else {
            tracing::debug!(
                rpc = self.rpc,
                code = code_name(code),
                duration_us = elapsed.as_micros() as u64,
                trace_id = %trace_id,
                span_id = %span_id,
                "rpc finished"
            );
        }
    }
}

impl Drop for RpcScope {
    fn drop(&mut self) {
        if !self.done {
            self.record(Code::Cancelled, Some("the caller went away"));
        }
    }
}

/// One downstream call from the gateway: a CLIENT span and the
/// `grpc_client_*` series.
pub(crate) struct ClientCall {
    metrics: Option<Arc<ServerMetrics>>,
    rpc: &'static str,
    started: Instant,
    cx: Context,
    done: bool,
}

impl ClientCall {
    /// Put this call's trace context on the outgoing request.
    pub fn inject(&self, meta: &mut MetadataMap) {
        if self.cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&self.cx, &mut MetaSet(meta));
        }
    }

    /// Record the outcome; returns how long the call took.
    pub fn finish<T>(mut self, out: &Result<T, Status>) -> Duration {
        self.done = true;
        let code = match out {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.record(code, out.as_ref().err().map(|s| s.message()))
    }

    fn record(&self, code: Code, msg: Option<&str>) -> Duration {
        let elapsed = self.started.elapsed();
        if let Some(m) = &self.metrics {
            let labels = ["unary", SERVICE, self.rpc, code_name(code)];
            m.client_handled.with_label_values(&labels).inc();
            m.client_handling
                .with_label_values(&labels)
                .observe(elapsed.as_secs_f64());
        }
        let span = self.cx.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
            if code != Code::Ok {
                span.set_status(SpanStatus::error(msg.unwrap_or_default().to_string()));
            }
            span.end();
        }
        elapsed
    }
}

impl Drop for ClientCall {
    fn drop(&mut self) {
        if !self.done {
            self.record(Code::Cancelled, Some("abandoned"));
        }
    }
}

struct MetaGet<'a>(&'a http::HeaderMap);

impl Extractor for MetaGet<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetaSet<'a>(&'a mut MetadataMap);

impl Injector for MetaSet<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_through_grpc_metadata() {
        let mut meta = http::HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        meta.insert("traceparent", tp.parse().unwrap());
        let cx = TraceContextPropagator::new().extract(&MetaGet(&meta));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetaSet(&mut out));
        assert_eq!(out.get("traceparent").unwrap().to_str().unwrap(), tp);
    }

    #[test]
    fn rpc_labels_are_the_service_methods_or_unknown() {
        assert_eq!(rpc_name("/cascade.v1.Cascade/Predict"), "Predict");
        assert_eq!(rpc_name("/cascade.v1.Cascade/ReloadModel"), "ReloadModel");
        assert_eq!(rpc_name("/cascade.v1.Cascade/DropTables"), "unknown");
        assert_eq!(rpc_name(""), "unknown");
    }
}
