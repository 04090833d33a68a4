//! Serving on a listener: the service stack (observation → admission →
//! handlers), health, reflection, connection bounds and the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use cascade_proto::pb;
use cascade_proto::pb::cascade_server::CascadeServer;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tower::Layer;

use crate::service::{Backend, CascadeService};
use crate::telemetry::ObserveLayer;
use crate::{Admission, Role, ServerError, Telemetry, MAX_MESSAGE_BYTES};

/// How to serve.
pub struct ServeOptions {
    pub role: Role,
    /// Reported by GetModelInfo ("cpu", "cuda:0", or "remote" for a gateway).
    pub device: String,
    /// The in-flight limit (share one to observe or saturate it from outside).
    pub admission: Admission,
    /// Requests doing model work on blocking threads at once (see [`crate::default_workers`]).
    pub workers: usize,
    /// Traces and metrics (default: both off).
    pub telemetry: Telemetry,
    /// Connection keepalive, age and drain bounds.
    pub connections: Connections,
    /// API keys the `cascade.v1.Cascade` RPCs require (`None`: open).
    pub api_keys: Option<crate::ApiKeys>,
}

/// What bounds a connection's life and a request's time (enforced by
/// [`crate::listen`] and the observation layer; `docs/reliability.md`).
#[derive(Debug, Clone, Copy)]
pub struct Connections {
    /// HTTP/2 PING every this long on a quiet connection (also the TCP keepalive)…
    pub keepalive_interval: Duration,
    /// …and the connection is closed if the PING is not answered in this.
    pub keepalive_timeout: Duration,
    /// A connection must send the HTTP/2 preface within this, or it is dropped.
    pub handshake_timeout: Duration,
    /// A connection with no request in flight for this long gets a GOAWAY.
    /// A request counts once its headers are complete, so a peer trickling
    /// headers is idle too.
    pub idle_timeout: Duration,
    /// Close a connection (GOAWAY, then `max_age_grace` for its requests)
    /// after this long; `None` keeps it open while it is alive. Clients
    /// reconnect, which also rebalances them across replicas behind an L4
    /// load balancer.
    pub max_age: Option<Duration>,
    pub max_age_grace: Duration,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection (announced in SETTINGS).
    pub max_streams: u32,
    /// A request that sends no `grpc-timeout` gets this deadline, so a body
    /// that never arrives cannot hold an in-flight slot for ever.
    pub request_timeout: Duration,
    /// After shutdown starts, wait at most this long for requests in flight;
    /// then the remaining connections are cut and `serve` returns.
    pub drain_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_age: Some(Duration::from_secs(1800)),
            max_age_grace: Duration::from_secs(30),
            max_connections: 10_000,
            max_streams: 1024,
            request_timeout: Duration::from_secs(60),
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
    let admission = opts.admission;
    let observe = ObserveLayer::new(
        opts.telemetry
            .clone()
            .with_role(opts.role.as_str(), &opts.device),
        opts.connections.request_timeout,
    );
    let svc = CascadeService::new(backend, opts.role, opts.device)
        .with_workers(opts.workers)
        .with_telemetry(opts.telemetry.clone());
    if let Some(m) = &opts.telemetry.metrics {
        m.in_flight_limit.set(admission.limit() as i64);
    }
    let grpc = CascadeServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Observe outermost, so refused requests are counted and traced too;
    // keys before admission, so a caller without one takes no slot.
    let service = observe
        .layer(crate::auth::MaybeApiKeys(opts.api_keys.clone()).layer(admission.layer(grpc)));
    let c = opts.connections;
    let drain_reporter = reporter.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: readiness NOT_SERVING, draining in-flight requests");
        drain_reporter
            .set_not_serving::<CascadeServer<CascadeService>>()
            .await;
    };
    let routes = Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .prepare();
    let cut =
        crate::listen::serve_routes(listener, routes, c, opts.telemetry.metrics, shutdown).await;
    if cut > 0 {
        tracing::warn!(
            "drain timeout ({:.0} s) passed: cut {cut} connections ({} requests still in flight)",
            c.drain_timeout.as_secs_f64(),
            admission.in_flight()
        );
    }
    Ok(())
}

/// Bind `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}
