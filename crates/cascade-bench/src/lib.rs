//! `cascade bench`: open-loop load against a running Cascade server.
//!
//! Requests are issued on a fixed schedule (constant or Poisson arrivals)
//! whatever the server does, and each latency is measured from the request's
//! *intended* send time, so a stalled server cannot hide its stall by slowing
//! the generator down (coordinated omission). The warm-up is excluded; every
//! run ends by itself.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod audit;
pub mod plot;

use cascade_proto::pb::cascade_client::CascadeClient;
use cascade_proto::pb::{PredictRequest, RankRequest, RetrieveRequest};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{}: {msg}", path.display())]
    Artifact {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("endpoint {url}: {msg}")]
    Endpoint { url: String, msg: String },
    #[error("{0}")]
    Config(String),
}

/// Which RPC to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rpc {
    Predict,
    Rank,
    Retrieve,
}

impl std::str::FromStr for Rpc {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "predict" => Ok(Rpc::Predict),
            "rank" => Ok(Rpc::Rank),
            "retrieve" => Ok(Rpc::Retrieve),
            _ => Err(format!("unknown rpc {s:?}: predict, rank or retrieve")),
        }
    }
}

/// Users and items to draw requests from, read from an artifact.
pub struct Workload {
    users: Vec<String>,
    /// Cumulative training activity, for drawing users by activity.
    cumulative: Vec<u64>,
    items: Vec<String>,
}

#[derive(Deserialize)]
struct Space {
    item_ids: Vec<String>,
    user_ids: Vec<String>,
    user_seen: Vec<Vec<u32>>,
}

impl Workload {
    /// From an artifact version directory's `features.json`.
    pub fn from_artifact(dir: &Path) -> Result<Self, BenchError> {
        let path = dir.join("features.json");
        let err = |msg: String| BenchError::Artifact {
            path: path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let s: Space = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if s.user_ids.is_empty() || s.item_ids.is_empty() {
            return Err(err("no users or no items".into()));
        }
        let mut acc = 0u64;
        let cumulative = s
            .user_seen
            .iter()
            .map(|v| {
                acc += v.len().max(1) as u64;
                acc
            })
            .collect();
        Ok(Self {
            users: s.user_ids,
            cumulative,
            items: s.item_ids,
        })
    }

    fn user(&self, rng: &mut ChaCha8Rng, cold_share: f64) -> String {
        if cold_share > 0.0 && rng.random::<f64>() < cold_share {
            return format!("bench-cold-{}", rng.random::<u32>());
        }
        let total = *self.cumulative.last().unwrap_or(&1);
        let x = rng.random_range(0..total.max(1));
        let i = self.cumulative.partition_point(|&c| c <= x);
        self.users[i.min(self.users.len() - 1)].clone()
    }

    fn items(&self, rng: &mut ChaCha8Rng, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| self.items[rng.random_range(0..self.items.len())].clone())
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub endpoint: String,
    pub rpc: Rpc,
    /// Offered requests per second.
    pub rate: f64,
    /// Poisson arrivals instead of evenly spaced ones.
    pub poisson: bool,
    pub warmup: Duration,
    pub duration: Duration,
    /// gRPC connections (HTTP/2), requests spread round-robin.
    pub connections: usize,
    /// Predict's `num_results`.
    pub k: u32,
    /// Rank's item count per request.
    pub rank_items: usize,
    /// Share of requests from users the model has never seen.
    pub cold_share: f64,
    /// Deadline sent with each request.
    pub deadline: Option<Duration>,
    pub seed: u64,
    /// Closed loop with this many callers in flight (the rate is then ignored).
    pub concurrency: Option<usize>,
}

/// One measured second of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub t: u64,
    pub ok: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub config: RunConfig,
    pub offered_rps: f64,
    pub achieved_rps: f64,
    /// Measured requests (warm-up excluded) and how they ended.
    pub sent: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// From each request's intended send time to its response.
    pub latency_ms: Latency,
    /// How late the generator sent requests against their schedule (its own
    /// share of `latency_ms`, e.g. when it competes for the server's cores).
    pub send_lag_ms: Latency,
    /// The server's own `total_us` (Predict only), for the network + queueing share.
    pub server_total_ms: Option<Latency>,
    /// The server's per-stage timings (Predict only): user_state, retrieval,
    /// ranking, rank_queue.
    pub server_stages_ms: BTreeMap<String, Latency>,
    /// Per measured second, by intended send time.
    pub timeline: Vec<Second>,
    /// CPU the generator itself used over the run (warm-up included), in
    /// cores: its share of a machine it shares with the server it measures.
    pub generator_cpu_cores: f64,
}

const STAGES: [&str; 5] = ["user_state", "retrieval", "ranking", "rank_queue", "total"];

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |v: u64| v as f64 / 1e3;
    Latency {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        mean: h.mean() / 1e3,
    }
}

fn histogram() -> Result<Histogram<u64>, BenchError> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| BenchError::Config(e.to_string()))
}

/// Everything one run records, shared by the request tasks.
struct Recorder {
    hist: Histogram<u64>,
    stages: Vec<Histogram<u64>>,
    lag: Histogram<u64>,
    /// One histogram per measured second (by intended send time).
    seconds: Vec<(Histogram<u64>, u64)>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    fn new(seconds: usize) -> Result<Self, BenchError> {
        Ok(Self {
            hist: histogram()?,
            stages: STAGES
                .iter()
                .map(|_| histogram())
                .collect::<Result<_, _>>()?,
            lag: histogram()?,
            seconds: (0..seconds)
                .map(|_| histogram().map(|h| (h, 0)))
                .collect::<Result<_, _>>()?,
            ok: 0,
            errors: BTreeMap::new(),
        })
    }

    fn record(&mut self, second: usize, us: u64, result: Result<Option<[u64; 5]>, tonic::Status>) {
        let us = us.clamp(1, 60_000_000);
        match result {
            Ok(stages) => {
                self.ok += 1;
                let _ = self.hist.record(us);
                if let Some((h, _)) = self.seconds.get_mut(second) {
                    let _ = h.record(us);
                }
                for (h, v) in self.stages.iter_mut().zip(stages.unwrap_or_default()) {
                    if v > 0 {
                        let _ = h.record(v.min(60_000_000));
                    }
                }
            }
            Err(e) => {
                *self.errors.entry(format!("{:?}", e.code())).or_default() += 1;
                if let Some((_, errs)) = self.seconds.get_mut(second) {
                    *errs += 1;
                }
            }
        }
    }

    fn report(&self, config: RunConfig, sent: u64) -> RunReport {
        let span = config.duration.as_secs_f64().max(1e-9);
        RunReport {
            offered_rps: if config.concurrency.is_some() {
                (self.ok + self.errors.values().sum::<u64>()) as f64 / span
            } else {
                sent as f64 / span
            },
            achieved_rps: self.ok as f64 / span,
            sent,
            ok: self.ok,
            errors: self.errors.clone(),
            latency_ms: latency(&self.hist),
            send_lag_ms: latency(&self.lag),
            server_total_ms: self.stages.last().filter(|h| !h.is_empty()).map(latency),
            server_stages_ms: STAGES
                .iter()
                .zip(&self.stages)
                .filter(|(_, h)| !h.is_empty())
                .map(|(n, h)| (n.to_string(), latency(h)))
                .collect(),
            timeline: self
                .seconds
                .iter()
                .enumerate()
                .map(|(t, (h, errors))| Second {
                    t: t as u64,
                    ok: h.len(),
                    errors: *errors,
                    p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
                    p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
                    max_ms: h.max() as f64 / 1e3,
                })
                .collect(),
            generator_cpu_cores: 0.0,
            config,
        }
    }
}

/// Process CPU time from a start point, in cores (CPU seconds per second).
struct CpuMeter {
    cpu: cpu_time::ProcessTime,
    wall: Instant,
}

impl CpuMeter {
    fn start() -> Self {
        Self {
            cpu: cpu_time::ProcessTime::now(),
            wall: Instant::now(),
        }
    }

    fn cores(&self) -> f64 {
        self.cpu.elapsed().as_secs_f64() / self.wall.elapsed().as_secs_f64().max(1e-9)
    }
}

/// One request as the generator draws it.
struct Call {
    rpc: Rpc,
    user: String,
    items: Vec<String>,
    k: u32,
    deadline: Option<Duration>,
}

impl Call {
    fn draw(cfg: &RunConfig, work: &Workload, rng: &mut ChaCha8Rng) -> Self {
        Self {
            rpc: cfg.rpc,
            user: work.user(rng, cfg.cold_share),
            items: match cfg.rpc {
                Rpc::Rank => work.items(rng, cfg.rank_items),
                _ => Vec::new(),
            },
            k: cfg.k,
            deadline: cfg.deadline,
        }
    }

    /// Send it; on success, the server's per-stage timings (Predict only).
    async fn send(
        self,
        mut client: CascadeClient<Channel>,
    ) -> Result<Option<[u64; 5]>, tonic::Status> {
        fn req<T>(m: T, d: Option<Duration>) -> tonic::Request<T> {
            let mut r = tonic::Request::new(m);
            if let Some(d) = d {
                r.set_timeout(d);
            }
            r
        }
        match self.rpc {
            Rpc::Predict => {
                let r = PredictRequest {
                    user_id: self.user,
                    num_results: self.k,
                    ..Default::default()
                };
                client.predict(req(r, self.deadline)).await.map(|r| {
                    r.into_inner().timings.map(|t| {
                        [
                            t.user_state_us,
                            t.retrieval_us,
                            t.ranking_us,
                            t.rank_queue_us,
                            t.total_us,
                        ]
                    })
                })
            }
            Rpc::Rank => {
                let r = RankRequest {
                    user_id: self.user,
                    item_ids: self.items,
                    context: None,
                };
                client.rank(req(r, self.deadline)).await.map(|_| None)
            }
            Rpc::Retrieve => {
                let r = RetrieveRequest {
                    user_id: self.user,
                    ..Default::default()
                };
                client.retrieve(req(r, self.deadline)).await.map(|_| None)
            }
        }
    }
}

fn lock(r: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

async fn connect(cfg: &RunConfig) -> Result<Vec<CascadeClient<Channel>>, BenchError> {
    let err = |e: String| BenchError::Endpoint {
        url: cfg.endpoint.clone(),
        msg: e,
    };
    let mut clients = Vec::new();
    for _ in 0..cfg.connections.max(1) {
        let ep = Endpoint::from_shared(cfg.endpoint.clone()).map_err(|e| err(e.to_string()))?;
        let ch = ep
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| err(e.to_string()))?;
        clients.push(CascadeClient::new(ch));
    }
    Ok(clients)
}

/// One run: open loop at `cfg.rate`, or closed loop when `cfg.concurrency`
/// is set. Requests still outstanding 10 s after the schedule ends are
/// counted as `generator_timeout`.
pub async fn run(cfg: RunConfig, work: Arc<Workload>) -> Result<RunReport, BenchError> {
    if cfg.concurrency.is_none() && cfg.rate <= 0.0 {
        return Err(BenchError::Config("the rate must be positive".into()));
    }
    let clients = connect(&cfg).await?;
    let meter = CpuMeter::start();
    let seconds = cfg.duration.as_secs_f64().ceil() as usize;
    let rec = Arc::new(Mutex::new(Recorder::new(seconds)?));
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let second_of =
        move |t: Instant| (t.saturating_duration_since(measure_from)).as_secs() as usize;
    if let Some(n) = cfg.concurrency {
        // Closed loop: `n` callers, each sending its next request when the
        // previous one returns. Latency is from the actual send.
        let mut tasks = Vec::new();
        for w in 0..n.max(1) {
            let (rec, work, cfg) = (rec.clone(), work.clone(), cfg.clone());
            let client = clients[w % clients.len()].clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (w as u64) << 32);
                tokio::time::sleep_until(start.into()).await;
                let mut sent = 0u64;
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let call = Call::draw(&cfg, &work, &mut rng);
                    let result = call.send(client.clone()).await;
                    if t >= measure_from {
                        sent += 1;
                        let us = t.elapsed().as_micros() as u64;
                        lock(&rec).record(second_of(t), us, result);
                    }
                }
                sent
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t
                .await
                .map_err(|e| BenchError::Config(format!("caller task: {e}")))?;
        }
        let mut r = lock(&rec).report(cfg, sent);
        r.generator_cpu_cores = meter.cores();
        return Ok(r);
    }
    // Open loop. The schedule runs on its own OS thread: std's sleep wakes
    // within tens of microseconds, Tokio's timer only to the millisecond, and
    // every late wake-up would count as server latency.
    let rt = tokio::runtime::Handle::current();
    let schedule = {
        let (rec, work, cfg) = (rec.clone(), work.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
            // Finished requests are reaped as the schedule goes: a task's
            // memory lives until it is joined, and holding every handle to
            // the end grew the generator by ~3.6 KB per request sent.
            let mut tasks = tokio::task::JoinSet::new();
            let mut at = start;
            let mut n = 0usize;
            let mut sent = 0u64;
            while at < end {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let measured = at >= measure_from;
                let call = Call::draw(&cfg, &work, &mut rng);
                let client = clients[n % clients.len()].clone();
                n += 1;
                if measured {
                    sent += 1;
                    let late = (Instant::now() - at).as_micros().max(1) as u64;
                    let _ = lock(&rec).lag.record(late.min(60_000_000));
                }
                let (rec, intended) = (rec.clone(), at);
                tasks.spawn_on(
                    async move {
                        let result = call.send(client).await;
                        if measured {
                            let us = intended.elapsed().as_micros() as u64;
                            lock(&rec).record(second_of(intended), us, result);
                        }
                    },
                    &rt,
                );
                while tasks.try_join_next().is_some() {}
                at += if cfg.poisson {
                    // Exponential gaps with mean 1/rate.
                    let u: f64 = rng.random_range(f64::EPSILON..1.0);
                    Duration::from_secs_f64(-u.ln() / cfg.rate)
                } else {
                    Duration::from_secs_f64(1.0 / cfg.rate)
                };
            }
            (sent, tasks)
        })
    };
    let (sent, mut tasks) = schedule
        .await
        .map_err(|e| BenchError::Config(format!("schedule thread: {e}")))?;
    let grace = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(_)) = tokio::time::timeout_at(grace, tasks.join_next()).await {}
    let left = tasks.len() as u64;
    tasks.abort_all();
    let mut r = lock(&rec);
    if left > 0 {
        *r.errors.entry("generator_timeout".into()).or_default() += left;
    }
    let mut report = r.report(cfg, sent);
    report.generator_cpu_cores = meter.cores();
    Ok(report)
}

/// A rate sweep: the highest offered rate whose run stayed within budget.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub budget_p99_ms: f64,
    /// The highest offered rate with p99 within budget, no errors, and at
    /// least 95 % of the offered rate achieved.
    pub max_rate_within_budget: Option<f64>,
    pub runs: Vec<RunReport>,
}

/// Whether a run counts as within `budget_ms`.
pub fn within_budget(r: &RunReport, budget_ms: f64) -> bool {
    r.errors.is_empty() && r.latency_ms.p99 <= budget_ms && r.achieved_rps >= 0.95 * r.offered_rps
}

/// Raise the rate from `base.rate` by `factor` until a run leaves the budget
/// or `max_rate` is passed; `on_run` sees each run as it ends.
pub async fn sweep(
    base: RunConfig,
    work: Arc<Workload>,
    budget_ms: f64,
    factor: f64,
    max_rate: f64,
    mut on_run: impl FnMut(&RunReport),
) -> Result<Sweep, BenchError> {
    if factor <= 1.0 {
        return Err(BenchError::Config("the sweep factor must exceed 1".into()));
    }
    let mut runs = Vec::new();
    let mut best = None;
    let mut rate = base.rate;
    while rate <= max_rate {
        let r = run(
            RunConfig {
                rate,
                ..base.clone()
            },
            work.clone(),
        )
        .await?;
        on_run(&r);
        let ok = within_budget(&r, budget_ms);
        runs.push(r);
        if !ok {
            break;
        }
        best = Some(rate);
        rate = (rate * factor).round();
    }
    Ok(Sweep {
        budget_p99_ms: budget_ms,
        max_rate_within_budget: best,
        runs,
    })
}

/// A fixed-width table of runs.
pub fn table(reports: &[RunReport]) -> String {
    let mut s = format!(
        "{:<14} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>8}  errors\n",
        "rpc",
        "offered",
        "achieved",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "srv p50",
        "srv p99",
        "gen cpu"
    );
    for r in reports {
        let l = &r.latency_ms;
        let (sp50, sp99) = r
            .server_total_ms
            .as_ref()
            .map_or(("-".into(), "-".into()), |s| {
                (format!("{:.3}", s.p50), format!("{:.3}", s.p99))
            });
        let errors = if r.errors.is_empty() {
            "none".to_string()
        } else {
            r.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        s.push_str(&format!(
            "{:<14} {:>9.1} {:>9.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8} {:>10} {:>8.2}  {errors}\n",
            match r.config.concurrency {
                Some(c) => format!("{:?} c={c}", r.config.rpc).to_lowercase(),
                None => format!("{:?}", r.config.rpc).to_lowercase(),
            },
            r.offered_rps,
            r.achieved_rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            sp50,
            sp99,
            r.generator_cpu_cores,
        ));
    }
    s
}
