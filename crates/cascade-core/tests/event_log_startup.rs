//! By hand: how long start-up takes to rebuild the per-user event state
//! from a large log, and from a snapshot after compaction.
//!
//! ```bash
//! CASCADE_EVENTS=10000000 cargo test -p cascade-core --test event_log_startup -- --ignored --nocapture
//! ```
//! `CASCADE_EVENTS` events (default 1,000,000) by `CASCADE_EVENT_USERS`
//! users (default 100,000) over 1,682 items; results in docs/reliability.md.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::io::Write;
use std::time::Instant;

use cascade_core::EventStore;

/// This process's resident memory, from /proc (Linux).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "a measurement, run by hand"]
fn start_up_time_of_a_large_event_log() {
    let (events, users) = (
        env("CASCADE_EVENTS", 1_000_000),
        env("CASCADE_EVENT_USERS", 100_000),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for n in 0..events {
            let ev = cascade_core::Event {
                user_id: format!("user-{}", n.wrapping_mul(2_654_435_761) % users),
                item_id: (n.wrapping_mul(40_503) % 1682 + 1).to_string(),
                kind: "view".into(),
                timestamp: 1_700_000_000 + n as i64,
            };
            w.write_all(cascade_core::events::log_line(&ev).unwrap().as_bytes())
                .unwrap();
        }
    }
    let log_bytes = std::fs::metadata(&path).unwrap().len();
    let rss0 = rss_mib();
    let t0 = Instant::now();
    let (store, replayed) = EventStore::open_with(&path, u64::MAX).unwrap();
    let replay_s = t0.elapsed().as_secs_f64();
    let state_mib = rss_mib() - rss0;
    let pairs: usize = (0..users)
        .map(|u| store.items(&format!("user-{u}")).len())
        .sum();
    assert_eq!(replayed, events);
    let t1 = Instant::now();
    store.compact().unwrap();
    let compact_s = t1.elapsed().as_secs_f64();
    let probe = store.items("user-7");
    drop(store);
    let snap_bytes = std::fs::metadata(dir.path().join("events.log.snapshot"))
        .unwrap()
        .len();
    let t2 = Instant::now();
    let (store, replayed) = EventStore::open(&path).unwrap();
    let snapshot_s = t2.elapsed().as_secs_f64();
    assert_eq!(replayed, 0);
    assert_eq!(store.items("user-7"), probe);
    drop(store);
    // The worst case the default threshold allows: the snapshot plus a log
    // that has grown to just under the compaction size.
    let mut tail = 0usize;
    {
        let mut w = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap(),
        );
        let mut written = 0u64;
        loop {
            let n = events + tail;
            let ev = cascade_core::Event {
                user_id: format!("user-{}", n.wrapping_mul(2_654_435_761) % users),
                item_id: (n.wrapping_mul(40_503) % 1682 + 1).to_string(),
                kind: "view".into(),
                timestamp: 1_700_000_000 + n as i64,
            };
            let line = cascade_core::events::log_line(&ev).unwrap();
            if written + line.len() as u64 >= cascade_core::events::DEFAULT_COMPACT_BYTES {
                break;
            }
            w.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            tail += 1;
        }
    }
    let t3 = Instant::now();
    let (_store, replayed) = EventStore::open(&path).unwrap();
    let worst_s = t3.elapsed().as_secs_f64();
    assert_eq!(replayed, tail);
    println!(
        "{events} events, {users} users, {pairs} distinct (user, item) pairs: state {state_mib:.0} MiB \
         ({:.1} bytes per pair)",
        state_mib * (1 << 20) as f64 / pairs as f64
    );
    println!(
        "{events} events, {users} users: replaying the {:.0} MiB log {replay_s:.2} s; \
         compaction {compact_s:.2} s; start-up from the {:.0} MiB snapshot {snapshot_s:.2} s",
        log_bytes as f64 / (1 << 20) as f64,
        snap_bytes as f64 / (1 << 20) as f64,
    );
    println!(
        "worst case at the default threshold: the snapshot plus a log of {tail} events \
         just under {} MiB: start-up {worst_s:.2} s",
        cascade_core::events::DEFAULT_COMPACT_BYTES >> 20
    );
}
