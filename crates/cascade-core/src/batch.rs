//! Dynamic batching across requests, on dedicated OS threads.
//!
//! Requests put their rows on a bounded queue; a worker takes the first job,
//! packs more until the row budget is reached or the queue delay has passed,
//! runs one forward for all of them and hands each job its slice. A full
//! queue refuses at once (`Overloaded`); jobs whose caller has gone or whose
//! deadline has passed are dropped before the forward. A panic in a forward
//! fails that batch's jobs, not the worker or the server.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::metrics::EngineMetrics;
use crate::EngineError;

/// Batching knobs (Triton's `max_batch_size` / `max_queue_delay_microseconds`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    /// Rows packed into one forward at most (a single larger job still runs whole).
    pub max_rows: usize,
    /// How long a worker holding a job waits for more before running; zero
    /// packs only what is already queued.
    pub max_delay: Duration,
    /// Worker threads (each runs its own forwards); 0 runs each job on its
    /// caller's thread, unbatched (on CPU the ranker's cost is per row, so
    /// batching buys nothing there and the hand-off to a worker and back
    /// costs two thread switches per request).
    pub threads: usize,
    /// Jobs waiting at most; beyond it requests are refused with RESOURCE_EXHAUSTED.
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_rows: 4096,
            max_delay: Duration::ZERO,
            threads: 1,
            queue: 1024,
        }
    }
}

/// When a request's work is no longer wanted: its deadline, or its caller
/// going away (the gRPC handler's future was dropped).
#[derive(Debug, Clone, Default)]
pub struct CallCtx {
    pub expires: Option<Instant>,
    pub cancelled: Arc<AtomicBool>,
}

impl CallCtx {
    pub fn with_deadline(expires: Option<Instant>) -> Self {
        Self {
            expires,
            ..Default::default()
        }
    }

    /// Why this call's work should stop now, if it should.
    pub fn check(&self) -> Result<(), EngineError> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }
        if self.expires.is_some_and(|t| Instant::now() >= t) {
            return Err(EngineError::DeadlineExceeded);
        }
        Ok(())
    }

    /// Marks the call cancelled when dropped, unless disarmed: a handler
    /// holds one so that abandoning its future abandons the queued work.
    pub fn guard(&self) -> CancelOnDrop {
        CancelOnDrop(Some(self.cancelled.clone()))
    }
}

pub struct CancelOnDrop(Option<Arc<AtomicBool>>);

impl CancelOnDrop {
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            f.store(true, Ordering::Relaxed);
        }
    }
}

/// Something with a row count.
pub trait Rows {
    fn rows(&self) -> usize;
}

struct Job<I, O> {
    input: I,
    ctx: CallCtx,
    queued: Instant,
    reply: Sender<Result<(O, BatchRun), EngineError>>,
}

/// How a job's forward went, measured once by the worker: the caller's stage
/// spans and the stage histograms are built from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchRun {
    /// When the job entered the queue.
    pub queued: Instant,
    /// When the forward holding it started (queue wait = `started - queued`).
    pub started: Instant,
    /// How long that forward took.
    pub forward: Duration,
    /// Rows in that forward (this job's and its batch-mates').
    pub rows: u32,
    /// Jobs in that forward.
    pub jobs: u32,
}

impl BatchRun {
    pub fn queue_wait(&self) -> Duration {
        self.started.saturating_duration_since(self.queued)
    }
}

/// Counters the metrics layer reads.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub dropped: AtomicU64,
    pub panics: AtomicU64,
    /// Forwards by rows: bucket `b` counts batches of `2^(b-1) < rows <= 2^b` rows.
    pub rows_hist: [AtomicU64; 20],
    /// Forwards by jobs packed together, same bucketing.
    pub jobs_hist: [AtomicU64; 20],
}

/// The power-of-two bucket of `n` (1 → 0, 2 → 1, 3..=4 → 2, …), capped at 19.
pub fn bucket(n: usize) -> usize {
    (usize::BITS - n.saturating_sub(1).leading_zeros()).min(19) as usize
}

impl BatchStats {
    /// "rows<=2^b: count" for non-empty buckets, for logs.
    pub fn describe(&self) -> String {
        let b = self.batches.load(Ordering::Relaxed);
        let r = self.rows.load(Ordering::Relaxed);
        let hist = |h: &[AtomicU64; 20]| -> String {
            h.iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let c = c.load(Ordering::Relaxed);
                    (c > 0).then(|| format!("<={}:{c}", 1usize << i))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "{b} forwards, {r} rows ({:.1} per forward); rows per forward {}; requests per forward {}",
            r as f64 / b.max(1) as f64,
            hist(&self.rows_hist),
            hist(&self.jobs_hist)
        )
    }
}

/// The forward the workers run: one output per input, in order.
pub type BatchFn<I, O> = dyn Fn(&[&I]) -> Result<Vec<O>, EngineError> + Send + Sync;

pub struct Batcher<I, O> {
    tx: Option<Sender<Job<I, O>>>,
    workers: Vec<JoinHandle<()>>,
    /// Set when jobs run on their callers' threads (`threads == 0`).
    inline: Option<(Arc<BatchFn<I, O>>, EngineMetrics)>,
    pub stats: Arc<BatchStats>,
}

impl<I: Rows + Send + 'static, O: Send + 'static> Batcher<I, O> {
    pub fn spawn(name: &str, cfg: BatchConfig, run: Arc<BatchFn<I, O>>) -> std::io::Result<Self> {
        Self::spawn_with(name, cfg, run, EngineMetrics::default())
    }

    /// As [`Batcher::spawn`], counting into `metrics`.
    pub fn spawn_with(
        name: &str,
        cfg: BatchConfig,
        run: Arc<BatchFn<I, O>>,
        metrics: EngineMetrics,
    ) -> std::io::Result<Self> {
        let stats = Arc::new(BatchStats::default());
        if cfg.threads == 0 {
            return Ok(Self {
                tx: None,
                workers: Vec::new(),
                inline: Some((run, metrics)),
                stats,
            });
        }
        let (tx, rx) = bounded::<Job<I, O>>(cfg.queue.max(1));
        let mut workers = Vec::new();
        for n in 0..cfg.threads {
            let rx = rx.clone();
            let run = run.clone();
            let stats = stats.clone();
            let metrics = metrics.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{n}"))
                    .spawn(move || worker(rx, cfg, &*run, &stats, &metrics))?,
            );
        }
        Ok(Self {
            tx: Some(tx),
            workers,
            inline: None,
            stats,
        })
    }

    /// Jobs waiting for a worker now.
    pub fn queue_depth(&self) -> usize {
        self.tx.as_ref().map_or(0, Sender::len)
    }

    /// Queue `input` and wait for its output (blocking the calling thread,
    /// which must not be an async worker). Returns the output and how its
    /// forward went.
    pub fn run(&self, input: I, ctx: &CallCtx) -> Result<(O, BatchRun), EngineError> {
        ctx.check()?;
        let queued = Instant::now();
        if let Some((run, metrics)) = &self.inline {
            let (outs, f) =
                forward(&[&input], &**run, &self.stats, metrics).map_err(EngineError::Internal)?;
            let out = outs.into_iter().next().ok_or_else(|| {
                EngineError::Internal("the ranking forward returned nothing".into())
            })?;
            return Ok((out, f.run(queued)));
        }
        let (reply, rx) = bounded(1);
        let job = Job {
            input,
            ctx: ctx.clone(),
            queued,
            reply,
        };
        let tx = self.tx.as_ref().ok_or(EngineError::Cancelled)?;
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(EngineError::Overloaded("ranking queue is full".into()))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(EngineError::Internal("ranking workers stopped".into()))
            }
        }
        match ctx.expires {
            Some(t) => rx.recv_deadline(t).map_err(|e| match e {
                RecvTimeoutError::Timeout => EngineError::DeadlineExceeded,
                RecvTimeoutError::Disconnected => EngineError::Cancelled,
            })?,
            None => rx
                .recv()
                .map_err(|_| EngineError::Internal("ranking worker dropped a job".into()))?,
        }
    }
}

impl<I, O> Drop for Batcher<I, O> {
    fn drop(&mut self) {
        // Closing the queue ends the workers once it is empty; they are not
        // joined here so that dropping an old model version never blocks.
        self.tx = None;
        self.workers.clear();
    }
}

fn worker<I: Rows, O>(
    rx: Receiver<Job<I, O>>,
    cfg: BatchConfig,
    run: &BatchFn<I, O>,
    stats: &BatchStats,
    metrics: &EngineMetrics,
) {
    let mut carry: Option<Job<I, O>> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // queue closed: this model version is gone
            },
        };
        let mut rows = first.input.rows();
        let mut jobs = vec![first];
        let until = Instant::now() + cfg.max_delay;
        while rows < cfg.max_rows {
            let next = if cfg.max_delay.is_zero() {
                rx.try_recv().ok()
            } else {
                rx.recv_deadline(until).ok()
            };
            let Some(j) = next else { break };
            if rows + j.input.rows() > cfg.max_rows {
                carry = Some(j);
                break;
            }
            rows += j.input.rows();
            jobs.push(j);
        }
        jobs.retain(|j| match j.ctx.check() {
            Ok(()) => true,
            Err(e) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics.rank_jobs_dropped.inc();
                let _ = j.reply.send(Err(e));
                false
            }
        });
        if jobs.is_empty() {
            continue;
        }
        let inputs: Vec<&I> = jobs.iter().map(|j| &j.input).collect();
        match forward(&inputs, run, stats, metrics) {
            Ok((outs, f)) => {
                for (j, o) in jobs.into_iter().zip(outs) {
                    let _ = j.reply.send(Ok((o, f.run(j.queued))));
                }
            }
            Err(msg) => {
                for j in jobs {
                    let _ = j.reply.send(Err(EngineError::Internal(msg.clone())));
                }
            }
        }
    }
}

/// How one forward went, shared by the jobs in it.
#[derive(Debug, Clone, Copy)]
struct Forward {
    started: Instant,
    took: Duration,
    rows: u32,
    jobs: u32,
}

impl Forward {
    /// The run record of a job queued at `queued`.
    fn run(&self, queued: Instant) -> BatchRun {
        BatchRun {
            queued,
            started: self.started,
            forward: self.took,
            rows: self.rows,
            jobs: self.jobs,
        }
    }
}

/// One forward over `inputs`, counted in the stats and metrics: one output
/// per input, in order, or the message every job of the batch fails with (a
/// panic inside `run` is caught here and fails only this batch).
fn forward<I: Rows, O>(
    inputs: &[&I],
    run: &BatchFn<I, O>,
    stats: &BatchStats,
    metrics: &EngineMetrics,
) -> Result<(Vec<O>, Forward), String> {
    let started = Instant::now();
    let out = catch_unwind(AssertUnwindSafe(|| run(inputs)));
    let took = started.elapsed();
    let batch_rows: usize = inputs.iter().map(|i| i.rows()).sum();
    metrics.batch_rows.observe(batch_rows as f64);
    metrics.batch_requests.observe(inputs.len() as f64);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.rows.fetch_add(batch_rows as u64, Ordering::Relaxed);
    stats.rows_hist[bucket(batch_rows)].fetch_add(1, Ordering::Relaxed);
    stats.jobs_hist[bucket(inputs.len())].fetch_add(1, Ordering::Relaxed);
    let f = Forward {
        started,
        took,
        rows: batch_rows as u32,
        jobs: inputs.len() as u32,
    };
    match out {
        Ok(Ok(outs)) if outs.len() == inputs.len() => Ok((outs, f)),
        Ok(Ok(outs)) => {
            metrics.rank_batch_failures.inc();
            Err(format!(
                "batch returned {} outputs for {} jobs",
                outs.len(),
                inputs.len()
            ))
        }
        Ok(Err(e)) => {
            metrics.rank_batch_failures.inc();
            Err(e.to_string())
        }
        Err(panic) => {
            stats.panics.fetch_add(1, Ordering::Relaxed);
            metrics.rank_batch_failures.inc();
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(
                "a ranking batch panicked ({what}); its requests fail, the worker goes on"
            );
            Err("the ranking batch failed".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Rows for Vec<u32> {
        fn rows(&self) -> usize {
            self.len()
        }
    }

    /// Doubles every value; panics on 666.
    fn doubler() -> Arc<BatchFn<Vec<u32>, Vec<u32>>> {
        Arc::new(|inputs: &[&Vec<u32>]| {
            if inputs.iter().any(|v| v.contains(&666)) {
                panic!("poisoned input");
            }
            Ok(inputs
                .iter()
                .map(|v| v.iter().map(|x| x * 2).collect())
                .collect())
        })
    }

    #[test]
    fn buckets_are_powers_of_two() {
        let got: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 200, 4096, usize::MAX]
            .iter()
            .map(|&n| bucket(n))
            .collect();
        assert_eq!(got, vec![0, 1, 2, 2, 3, 3, 4, 8, 12, 19]);
    }

    #[test]
    fn outputs_go_back_to_their_own_callers() {
        let b = Arc::new(Batcher::spawn("t", BatchConfig::default(), doubler()).unwrap());
        let handles: Vec<_> = (0..16u32)
            .map(|n| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let v: Vec<u32> = (0..n + 1).map(|i| i + n * 100).collect();
                    let (out, _) = b.run(v.clone(), &CallCtx::default()).unwrap();
                    assert_eq!(out, v.iter().map(|x| x * 2).collect::<Vec<_>>());
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(b.stats.rows.load(Ordering::Relaxed), (1..=16).sum::<u64>());
    }

    #[test]
    fn concurrent_jobs_share_a_batch_within_the_delay() {
        let cfg = BatchConfig {
            max_delay: Duration::from_millis(200),
            ..Default::default()
        };
        let b = Arc::new(Batcher::spawn("t", cfg, doubler()).unwrap());
        let handles: Vec<_> = (0..4u32)
            .map(|n| {
                let b = b.clone();
                std::thread::spawn(move || b.run(vec![n], &CallCtx::default()).unwrap())
            })
            .collect();
        let (outs, runs): (Vec<Vec<u32>>, Vec<BatchRun>) =
            handles.into_iter().map(|h| h.join().unwrap()).unzip();
        assert_eq!(outs, vec![vec![0], vec![2], vec![4], vec![6]]);
        // Each job learns the forward it shared: its batch-mates counted, one row each.
        assert!(runs.iter().any(|r| r.jobs > 1), "{runs:?}");
        assert!(runs
            .iter()
            .all(|r| r.rows == r.jobs && r.started >= r.queued));
        // Four jobs arrived well within 200 ms of the first: fewer forwards than jobs.
        assert!(b.stats.batches.load(Ordering::Relaxed) < 4);
        let multi: u64 = b.stats.jobs_hist[1..]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        assert!(multi >= 1, "{}", b.stats.describe());
    }

    #[test]
    fn row_budget_splits_batches() {
        let cfg = BatchConfig {
            max_rows: 3,
            max_delay: Duration::from_millis(100),
            ..Default::default()
        };
        let b = Arc::new(Batcher::spawn("t", cfg, doubler()).unwrap());
        let handles: Vec<_> = (0..6u32)
            .map(|n| {
                let b = b.clone();
                std::thread::spawn(move || b.run(vec![n, n], &CallCtx::default()).unwrap().0)
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().len(), 2);
        }
        // Two-row jobs under a three-row budget: one job per forward.
        assert_eq!(b.stats.batches.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_panicking_batch_fails_its_jobs_and_the_worker_survives() {
        let b = Batcher::spawn("t", BatchConfig::default(), doubler()).unwrap();
        let e = b.run(vec![1, 666], &CallCtx::default()).unwrap_err();
        assert!(matches!(e, EngineError::Internal(_)), "{e:?}");
        assert_eq!(b.stats.panics.load(Ordering::Relaxed), 1);
        // The same (only) worker answers the next job.
        assert_eq!(b.run(vec![4], &CallCtx::default()).unwrap().0, vec![8]);
    }

    #[test]
    fn expired_and_cancelled_jobs_are_not_run() {
        let b = Batcher::spawn("t", BatchConfig::default(), doubler()).unwrap();
        let past = CallCtx::with_deadline(Some(Instant::now() - Duration::from_millis(1)));
        assert!(matches!(
            b.run(vec![1], &past),
            Err(EngineError::DeadlineExceeded)
        ));
        let gone = CallCtx::default();
        drop(gone.guard());
        assert!(matches!(b.run(vec![1], &gone), Err(EngineError::Cancelled)));
        assert_eq!(b.stats.rows.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        // One worker held inside a forward, a one-slot queue: the third job is refused.
        let (started_tx, started) = bounded::<()>(4);
        let (release, release_rx) = bounded::<()>(4);
        let held: Arc<BatchFn<Vec<u32>, Vec<u32>>> = Arc::new(move |inputs: &[&Vec<u32>]| {
            let _ = started_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(10));
            Ok(inputs.iter().map(|v| (*v).clone()).collect())
        });
        let cfg = BatchConfig {
            queue: 1,
            max_rows: 1,
            ..Default::default()
        };
        let b = Arc::new(Batcher::spawn("t", cfg, held).unwrap());
        let run = |v: u32| {
            let b = b.clone();
            std::thread::spawn(move || b.run(vec![v], &CallCtx::default()))
        };
        let first = run(1);
        started.recv().unwrap(); // the worker holds job 1
        let second = run(2);
        let t0 = Instant::now();
        while b.queue_depth() < 1 {
            assert!(t0.elapsed() < Duration::from_secs(10), "job 2 never queued");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(matches!(
            b.run(vec![3], &CallCtx::default()),
            Err(EngineError::Overloaded(_))
        ));
        release.send(()).unwrap();
        release.send(()).unwrap();
        assert_eq!(first.join().unwrap().unwrap().0, vec![1]);
        assert_eq!(second.join().unwrap().unwrap().0, vec![2]);
    }

    #[test]
    fn with_no_threads_jobs_run_on_their_callers_thread() {
        let cfg = BatchConfig {
            threads: 0,
            ..BatchConfig::default()
        };
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let double = doubler();
        let run: Arc<BatchFn<Vec<u32>, Vec<u32>>> = Arc::new(move |inputs: &[&Vec<u32>]| {
            record.lock().unwrap().push(std::thread::current().id());
            double(inputs)
        });
        let b = Batcher::spawn("t", cfg, run).unwrap();
        let (out, r) = b.run(vec![1, 2, 3], &CallCtx::default()).unwrap();
        assert_eq!(out, vec![2, 4, 6]);
        assert_eq!((r.rows, r.jobs), (3, 1));
        assert_eq!(*seen.lock().unwrap(), vec![std::thread::current().id()]);
        assert_eq!(b.queue_depth(), 0);
        // A panic fails the job, not the caller; expired jobs are dropped.
        assert!(matches!(
            b.run(vec![666], &CallCtx::default()),
            Err(EngineError::Internal(_))
        ));
        assert_eq!(b.stats.panics.load(Ordering::Relaxed), 1);
        let past = CallCtx::with_deadline(Some(Instant::now()));
        assert!(matches!(
            b.run(vec![1], &past),
            Err(EngineError::DeadlineExceeded)
        ));
        assert_eq!(b.stats.batches.load(Ordering::Relaxed), 2);
    }
}
