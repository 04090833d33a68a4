//! `cascade serve` after its flags are parsed: one function, [`run`], owns
//! the wiring (runtime, metrics registry, trace export, the model or the
//! gateway, the scrape endpoint, the listener, the drain). The binary only
//! turns flags into a [`ServeConfig`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_core::{BatchConfig, EngineConfig, EngineHandle, EngineMetrics, EventStore};

use crate::{
    bind, serve, Admission, Backend, Connections, Role, ServeOptions, ServerError, ServerMetrics,
    Telemetry, TraceConfig,
};

/// How the gateway finds the stage pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// Watch the endpoint Services' EndpointSlices and balance over ready pods.
    Kube,
    /// Connect to the URL (one DNS lookup, one connection).
    Dns,
    /// Kube inside a cluster (`KUBERNETES_SERVICE_HOST` set), else DNS.
    Auto,
}

/// The model this process serves (roles `all`, `retrieval`, `ranker`).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Artifact root holding versions (the newest is served), or one version.
    pub artifact: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Append-only log of accepted events, replayed at start-up.
    pub event_log: PathBuf,
    /// Compact the log past this many bytes.
    pub event_log_compact_bytes: u64,
    pub batch: BatchConfig,
    pub user_cache: u64,
    /// Retrieval's path for every version (`None`: each artifact's
    /// `exact_below` decides).
    pub search_path: Option<cascade_core::SearchPath>,
    /// Poll the root for newer versions this often.
    pub watch: Option<Duration>,
}

/// The other stages, for role `gateway`.
#[derive(Debug, Clone)]
pub struct StagesConfig {
    pub retrieval: String,
    pub ranker: String,
    pub discovery: Discovery,
}

/// Everything `cascade serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub role: Role,
    /// Required for every role but `gateway`.
    pub model: Option<ModelConfig>,
    /// Required for role `gateway`.
    pub stages: Option<StagesConfig>,
    /// Requests in flight at most; more are refused with RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Requests doing model work at once (see [`crate::default_workers`]).
    pub workers: usize,
    pub connections: Connections,
    /// A keys file the `cascade.v1.Cascade` RPCs then require (see [`crate::auth`]).
    pub api_keys_file: Option<PathBuf>,
    /// Prometheus scrape address; `None` turns metrics off.
    pub metrics_addr: Option<SocketAddr>,
    pub trace: TraceConfig,
}

/// Serve until `shutdown` resolves, then drain and return.
pub fn run(cfg: ServeConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServerError::Setup(format!("runtime: {e}")))?;
    // The gateway's lazy channels and the trace exporter spawn their tasks
    // on the runtime.
    let _in_runtime = rt.enter();
    let api_keys = match &cfg.api_keys_file {
        Some(p) => {
            let keys = crate::ApiKeys::load(p)
                .map_err(|e| ServerError::Setup(format!("--api-keys-file: {e}")))?;
            tracing::info!(
                "API keys from {} required on cascade.v1.Cascade",
                p.display()
            );
            Some(keys)
        }
        None => None,
    };
    let registry = prometheus::Registry::new();
    let (engine_metrics, server_metrics) = if cfg.metrics_addr.is_some() {
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        (
            EngineMetrics::register(&registry)?,
            Some(ServerMetrics::register(&registry)?),
        )
    } else {
        (EngineMetrics::default(), None)
    };
    let provider = cfg.trace.provider()?;
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP ({:?})", cfg.trace.protocol);
    }
    let telemetry = Telemetry::new(server_metrics.clone(), provider.as_ref());
    let (backend, device) = match (cfg.role, &cfg.stages, &cfg.model) {
        (Role::Gateway, Some(s), _) => (rt.block_on(gateway(s))?, "remote".to_string()),
        (Role::Gateway, None, _) => {
            return Err(ServerError::Setup(
                "--role gateway needs --retrieval-endpoint and --ranker-endpoint".into(),
            ))
        }
        (_, _, Some(m)) => local(m, engine_metrics)?,
        (role, _, None) => {
            return Err(ServerError::Setup(format!(
                "--role {} needs a model",
                role.as_str()
            )))
        }
    };
    let local = match &backend {
        Backend::Local(h) => Some(h.clone()),
        Backend::Gateway(_) => None,
    };
    let before_scrape = scrape_refresh(server_metrics, local.clone(), cfg.role, device.clone());
    let opts = ServeOptions {
        role: cfg.role,
        device,
        admission: Admission::new(cfg.max_in_flight),
        workers: cfg.workers,
        telemetry,
        connections: cfg.connections,
        api_keys,
    };
    rt.block_on(async move {
        if let Some(addr) = cfg.metrics_addr {
            let listener = bind(addr).await?;
            let at = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            tracing::info!("metrics on http://{at}/metrics");
            // Runs until the process exits: scrapes keep working while draining.
            tokio::spawn(crate::telemetry::serve_metrics(
                listener,
                registry,
                before_scrape,
                std::future::pending(),
            ));
        }
        let listener = bind(cfg.listen).await?;
        if let Ok(at) = listener.local_addr() {
            tracing::info!("serving cascade.v1 (--role {}) on {at}", cfg.role.as_str());
        }
        serve(backend, opts, listener, shutdown).await?;
        if let Some(p) = provider {
            // Flush the spans still queued before the runtime goes.
            let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        }
        Ok::<_, ServerError>(())
    })?;
    if let Some(h) = local {
        tracing::info!("ranking batches: {}", h.current().batch_stats().describe());
    }
    tracing::info!("drained; exiting");
    Ok(())
}

async fn gateway(s: &StagesConfig) -> Result<Backend, ServerError> {
    let kube = match s.discovery {
        Discovery::Kube => true,
        Discovery::Dns => false,
        Discovery::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    };
    let g = if kube {
        let g = crate::discovery::in_cluster_gateway(&s.retrieval, &s.ranker).await?;
        tracing::info!(
            "gateway to the ready pods behind {} and {} (EndpointSlice watch)",
            s.retrieval,
            s.ranker
        );
        g
    } else {
        let g = crate::Gateway::new(&s.retrieval, &s.ranker)?;
        tracing::info!(
            "gateway to retrieval {} and ranker {}",
            s.retrieval,
            s.ranker
        );
        g
    };
    Ok(Backend::from(g))
}

/// Open the event log, load and warm the newest version, start the watcher.
fn local(m: &ModelConfig, metrics: EngineMetrics) -> Result<(Backend, String), ServerError> {
    let dev = cascade_model::select_device(&m.device)
        .map_err(|e| ServerError::Setup(format!("--device {}: {e}", m.device)))?;
    let device = cascade_model::device_name(&dev);
    if let Some(parent) = m.event_log.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| ServerError::Setup(format!("creating {}: {e}", parent.display())))?;
    }
    let (events, replayed) = EventStore::open_with(&m.event_log, m.event_log_compact_bytes)?;
    tracing::info!("replayed {replayed} events from {}", m.event_log.display());
    let cfg = EngineConfig {
        batch: m.batch,
        user_cache: m.user_cache,
        metrics,
        search_path: m.search_path,
    };
    let t0 = Instant::now();
    let handle = Arc::new(
        EngineHandle::open(&m.artifact, &dev, cfg, Arc::new(events)).map_err(|source| {
            ServerError::Load {
                artifact: m.artifact.clone(),
                source,
            }
        })?,
    );
    let engine = handle.current();
    tracing::info!(
        "loaded and warmed {} from {} on {device} in {:.1}s",
        engine.model_version(),
        engine.dir().display(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(every) = m.watch {
        handle
            .watch(every)
            .map_err(|e| ServerError::Setup(format!("starting the version watcher: {e}")))?;
        tracing::info!(
            "watching {} every {}s for new versions",
            handle.root().display(),
            every.as_secs_f64()
        );
    }
    Ok((Backend::Local(handle), device))
}

/// Gauges sampled when Prometheus scrapes rather than on every request.
fn scrape_refresh(
    metrics: Option<Arc<ServerMetrics>>,
    local: Option<Arc<EngineHandle>>,
    role: Role,
    device: String,
) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        let Some(m) = &metrics else { return };
        let refused = cascade_proto::codec::decode_failures();
        m.decode_failures
            .inc_by(refused.saturating_sub(m.decode_failures.get()));
        let Some(h) = &local else { return };
        let engine = h.current();
        m.rank_queue_depth.set(engine.rank_queue_depth() as i64);
        m.model_info.reset();
        m.model_info
            .with_label_values(&[engine.model_version(), device.as_str(), role.as_str()])
            .set(1);
    })
}
