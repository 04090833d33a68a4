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
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap};
use tonic::{Code, Status};

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
    /// Requests whose message did not decode: refused by the codec before
    /// any handler, so absent from the `grpc_server_*` series. Brought up
    /// to date from [`cascade_proto::codec::decode_failures`] at each scrape.
    pub decode_failures: IntCounter,
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
                "Requests refused INVALID_ARGUMENT because their message did not decode (not in grpc_server_*).",
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
        m.build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("CASCADE_GIT_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        Ok(Arc::new(m))
    }
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
fn server_fault(c: Code) -> bool {
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

/// Where spans go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(format!(
                "unsupported OTLP protocol {other:?} (expected grpc or http/protobuf)"
            )),
        }
    }
}

/// Trace export settings; the `OTEL_*` variables the SDK reads itself
/// (sampler, resource attributes, headers, timeouts, signal endpoints) apply too.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// OTLP endpoint (as `OTEL_EXPORTER_OTLP_ENDPOINT`: for http/protobuf the
    /// `/v1/traces` path is appended). `None`: the exporter reads
    /// `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` itself, and tracing stays off
    /// when neither is set.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: String,
    /// Overrides `OTEL_TRACES_SAMPLER`: parent-based, this share of new traces.
    pub sample_ratio: Option<f64>,
    /// Extra resource attributes (the role).
    pub attributes: Vec<(String, String)>,
}

fn env_set(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| !v.trim().is_empty())
}

impl TraceConfig {
    /// Whether anything asks for trace export (`OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none` turn it off).
    pub fn enabled(&self) -> bool {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
            || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v == "none")
        {
            return false;
        }
        self.endpoint.is_some()
            || env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    }

    /// The tracer provider, or `None` when tracing is off. Spans queue in
    /// the SDK's batch processor (its own thread; a full queue drops spans
    /// rather than wait) and are sent from a one-thread runtime of their own,
    /// so export never takes time from request work and shutting down does
    /// not depend on the serving runtime. Shut it down at exit to flush.
    pub fn provider(&self) -> Result<Option<SdkTracerProvider>, TelemetryError> {
        use opentelemetry_otlp::WithExportConfig;
        if !self.enabled() {
            return Ok(None);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cascade-otlp")
            .enable_all()
            .build()
            .map_err(|e| TelemetryError::Exporter(format!("export runtime: {e}")))?;
        // The exporter's connection tasks belong on the export runtime.
        let entered = rt.enter();
        let exporter = match self.protocol {
            OtlpProtocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
            }
            OtlpProtocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')));
                }
                b.build()
            }
        }
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        drop(entered);
        let exporter = OnRuntime {
            inner: Arc::new(exporter),
            rt: RuntimeOwner(Some(rt)),
        };
        let mut resource = opentelemetry_sdk::Resource::builder();
        if !env_set("OTEL_SERVICE_NAME") {
            resource = resource.with_service_name(self.service_name.clone());
        }
        resource = resource.with_attributes(
            std::iter::once(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).chain(
                self.attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            ),
        );
        let mut b = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build());
        if let Some(r) = self.sample_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(TelemetryError::Config(format!(
                    "trace sample ratio must be in 0..=1, got {r}"
                )));
            }
            b = b.with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
                opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(r),
            )));
        }
        Ok(Some(b.build()))
    }
}

/// Owns the export runtime; dropping it never blocks (it may happen inside
/// another runtime, where a blocking shutdown would panic).
#[derive(Debug)]
struct RuntimeOwner(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeOwner {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// An exporter whose network work runs on the export runtime, called from
/// the batch processor's plain thread.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    rt: RuntimeOwner,
}

impl<E> opentelemetry_sdk::trace::SpanExporter for OnRuntime<E>
where
    E: opentelemetry_sdk::trace::SpanExporter + Send + Sync + 'static,
{
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        use opentelemetry_sdk::error::OTelSdkError;
        let inner = self.inner.clone();
        let task = self
            .rt
            .0
            .as_ref()
            .map(|rt| rt.spawn(async move { inner.export(batch).await }));
        async move {
            match task {
                Some(t) => t
                    .await
                    .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string()))),
                None => Err(OTelSdkError::AlreadyShutdown),
            }
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        let _in = self.rt.0.as_ref().map(|rt| rt.enter());
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called while building the provider, before any export holds a share.
        if let Some(e) = Arc::get_mut(&mut self.inner) {
            e.set_resource(resource);
        }
    }
}

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
    pub(crate) fn begin(&self, rpc: &'static str, meta: &MetadataMap) -> RpcScope {
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

/// One RPC being observed; finish it with [`RpcScope::finish`]. Dropped
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
    /// Record the outcome and the stages, then hand the result back.
    pub fn finish<T>(
        mut self,
        out: Result<(T, Vec<StageSpan>), Status>,
    ) -> Result<tonic::Response<T>, Status> {
        self.done = true;
        let (code, stages) = match &out {
            Ok((_, s)) => (Code::Ok, s.as_slice()),
            Err(s) => (s.code(), &[][..]),
        };
        if let Some(m) = &self.tel.metrics {
            for s in stages {
                m.stage
                    .with_label_values(&[s.stage.name()])
                    .observe(s.duration.as_secs_f64());
            }
        }
        self.tel
            .stage_spans(&self.cx, (self.started, self.wall), stages);
        let msg = out.as_ref().err().map(|s| s.message().to_string());
        self.record(code, msg.as_deref());
        out.map(|(t, _)| tonic::Response::new(t))
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

struct MetaGet<'a>(&'a MetadataMap);

impl Extractor for MetaGet<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
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

/// Serve `registry` as Prometheus text on `GET /metrics` until `shutdown`;
/// `before_scrape` refreshes sampled gauges first.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Registry,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    let scrape = move || {
        let registry = registry.clone();
        let before = before_scrape.clone();
        async move {
            before();
            let encoder = prometheus::TextEncoder::new();
            match encoder.encode_to_string(&registry.gather()) {
                Ok(body) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                    body,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    e.to_string(),
                ),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_through_grpc_metadata() {
        let mut meta = MetadataMap::new();
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
    fn codes_use_go_names_and_semconv_error_rules() {
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::ResourceExhausted), "ResourceExhausted");
        assert!(server_fault(Code::Internal) && server_fault(Code::DeadlineExceeded));
        assert!(!server_fault(Code::InvalidArgument) && !server_fault(Code::ResourceExhausted));
    }

    #[test]
    fn protocols_parse() {
        assert_eq!("grpc".parse(), Ok(OtlpProtocol::Grpc));
        assert_eq!("http/protobuf".parse(), Ok(OtlpProtocol::HttpProtobuf));
        assert!("http/json".parse::<OtlpProtocol>().is_err());
    }
}
