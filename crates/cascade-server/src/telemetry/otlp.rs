//! Trace export: the OTLP exporter on a runtime of its own, so export never
//! takes time from request work.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::TelemetryError;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_parse() {
        assert_eq!("grpc".parse(), Ok(OtlpProtocol::Grpc));
        assert_eq!("http/protobuf".parse(), Ok(OtlpProtocol::HttpProtobuf));
        assert!("http/json".parse::<OtlpProtocol>().is_err());
    }
}
