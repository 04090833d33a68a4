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

use cascade_server::pb::cascade_client::CascadeClient;
use cascade_server::pb::{PredictRequest, RankRequest, RetrieveRequest};
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

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    first_done: Option<Instant>,
    last_done: Option<Instant>,
}

/// One open-loop run. Requests still outstanding 10 s after the schedule
/// ends are counted as `generator_timeout`.
pub async fn run(cfg: RunConfig, work: Arc<Workload>) -> Result<RunReport, BenchError> {
    if cfg.rate <= 0.0 || cfg.connections == 0 {
        return Err(BenchError::Config(
            "rate and connections must be positive".into(),
        ));
    }
    let mut clients = Vec::new();
    for _ in 0..cfg.connections {
        let ep = Endpoint::from_shared(cfg.endpoint.clone()).map_err(|e| BenchError::Endpoint {
            url: cfg.endpoint.clone(),
            msg: e.to_string(),
        })?;
        let ch: Channel =
            ep.tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| BenchError::Endpoint {
                    url: cfg.endpoint.clone(),
                    msg: e.to_string(),
                })?;
        clients.push(CascadeClient::new(ch));
    }
    let hist = Arc::new(Mutex::new(histogram()?));
    let server_hist = Arc::new(Mutex::new(
        STAGES
            .iter()
            .map(|_| histogram())
            .collect::<Result<Vec<_>, _>>()?,
    ));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    // The schedule runs on its own OS thread: std's sleep wakes within tens
    // of microseconds, Tokio's timer only to the millisecond, and every late
    // wake-up would count as server latency.
    let rt = tokio::runtime::Handle::current();
    let lag = Arc::new(Mutex::new(histogram()?));
    let schedule = {
        let (hist, server_hist, tally, lag, work) = (
            hist.clone(),
            server_hist.clone(),
            tally.clone(),
            lag.clone(),
            work.clone(),
        );
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let mut tasks = Vec::new();
            let mut at = start;
            let mut n = 0usize;
            let mut sent = 0u64;
            while at < end {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let measured = at >= measure_from;
                sent += u64::from(measured);
                let mut client = clients[n % clients.len()].clone();
                n += 1;
                let user = work.user(&mut rng, cfg.cold_share);
                let items = match cfg.rpc {
                    Rpc::Rank => work.items(&mut rng, cfg.rank_items),
                    _ => Vec::new(),
                };
                let (hist, server_hist, tally) = (hist.clone(), server_hist.clone(), tally.clone());
                let (rpc, k, deadline, intended) = (cfg.rpc, cfg.k, cfg.deadline, at);
                if measured {
                    let late = (Instant::now() - at).as_micros().max(1) as u64;
                    let _ = lag
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(late.min(60_000_000));
                }
                tasks.push(rt.spawn(async move {
                    let result: Result<Option<[u64; 5]>, tonic::Status> = match rpc {
                        Rpc::Predict => {
                            let mut r = tonic::Request::new(PredictRequest {
                                user_id: user,
                                num_results: k,
                                ..Default::default()
                            });
                            if let Some(d) = deadline {
                                r.set_timeout(d);
                            }
                            client.predict(r).await.map(|r| {
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
                            let mut r = tonic::Request::new(RankRequest {
                                user_id: user,
                                item_ids: items,
                                context: None,
                            });
                            if let Some(d) = deadline {
                                r.set_timeout(d);
                            }
                            client.rank(r).await.map(|_| None)
                        }
                        Rpc::Retrieve => {
                            let mut r = tonic::Request::new(RetrieveRequest {
                                user_id: user,
                                ..Default::default()
                            });
                            if let Some(d) = deadline {
                                r.set_timeout(d);
                            }
                            client.retrieve(r).await.map(|_| None)
                        }
                    };
                    let done = Instant::now();
                    if !measured {
                        return;
                    }
                    let us = (done - intended).as_micros().max(1) as u64;
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    t.first_done.get_or_insert(done);
                    t.last_done = Some(done);
                    match result {
                        Ok(server_us) => {
                            t.ok += 1;
                            drop(t);
                            let _ = hist
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .record(us.min(60_000_000));
                            if let Some(stages) = server_us {
                                let mut hs = server_hist.lock().unwrap_or_else(|p| p.into_inner());
                                for (h, v) in hs.iter_mut().zip(stages) {
                                    let _ = h.record(v.clamp(1, 60_000_000));
                                }
                            }
                        }
                        Err(e) => {
                            *t.errors.entry(format!("{:?}", e.code())).or_default() += 1;
                        }
                    }
                }));
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
    let (sent, tasks) = schedule
        .await
        .map_err(|e| BenchError::Config(format!("schedule thread: {e}")))?;
    let grace = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut left = 0u64;
    for mut t in tasks {
        if tokio::time::timeout_at(grace, &mut t).await.is_err() {
            t.abort();
            left += 1;
        }
    }
    if left > 0 {
        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
        *t.errors.entry("generator_timeout".into()).or_default() += left;
    }
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let h = hist.lock().unwrap_or_else(|p| p.into_inner());
    let sh = server_hist.lock().unwrap_or_else(|p| p.into_inner());
    let lag = lag.lock().unwrap_or_else(|p| p.into_inner());
    let span = cfg.duration.as_secs_f64().max(1e-9);
    Ok(RunReport {
        offered_rps: sent as f64 / span,
        achieved_rps: t.ok as f64 / span,
        sent,
        ok: t.ok,
        errors: t.errors.clone(),
        latency_ms: latency(&h),
        send_lag_ms: latency(&lag),
        server_total_ms: sh.last().filter(|h| !h.is_empty()).map(latency),
        server_stages_ms: STAGES
            .iter()
            .zip(sh.iter())
            .filter(|(_, h)| !h.is_empty())
            .map(|(n, h)| (n.to_string(), latency(h)))
            .collect(),
        config: cfg,
    })
}

/// A fixed-width table of runs.
pub fn table(reports: &[RunReport]) -> String {
    let mut s = format!(
        "{:<9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}  errors\n",
        "rpc",
        "offered",
        "achieved",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "srv p50",
        "srv p99"
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
            "{:<9} {:>9.1} {:>9.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8} {:>10}  {errors}\n",
            format!("{:?}", r.config.rpc).to_lowercase(),
            r.offered_rps,
            r.achieved_rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            sp50,
            sp99,
        ));
    }
    s
}
