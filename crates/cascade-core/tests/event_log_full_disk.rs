//! A full disk during `record_events`: the failed append is refused, the log
//! is rolled back to its last acknowledged line, later appends (once there is
//! room) are not glued onto a partial line, and a restart replays exactly the
//! acknowledged events.
//!
//! The disk fills for real: the kernel refuses writes past this process's
//! file-size limit (`RLIMIT_FSIZE`, the short write then `EFBIG` that a full
//! disk gives as a short write then `ENOSPC`). It is its own test binary
//! because the limit and the ignored `SIGXFSZ` apply to the whole process.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use cascade_core::{Event, EventStore};

fn set_file_size_limit(bytes: u64) {
    // With a handler installed, a write past the limit fails with EFBIG
    // instead of SIGXFSZ ending the process: what a full disk looks like.
    let hit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGXFSZ, hit).unwrap();
    rlimit::setrlimit(rlimit::Resource::FSIZE, bytes, rlimit::INFINITY).unwrap();
}

fn batch(n: usize, from: usize) -> Vec<Event> {
    (from..from + n)
        .map(|i| Event {
            user_id: format!("user-{i}"),
            item_id: format!("item-{}", i % 7),
            kind: "view".into(),
            timestamp: 1_700_000_000 + i as i64,
        })
        .collect()
}

#[test]
fn a_full_disk_loses_no_acknowledged_event_and_corrupts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.log");
    let (store, _) = EventStore::open(&path).unwrap();
    set_file_size_limit(4096);
    let mut acked = 0;
    let mut refused = 0;
    let mut next = 0;
    for _ in 0..40 {
        let b = batch(5, next);
        next += 5;
        match store.append(&b) {
            Ok(()) => acked += b.len(),
            Err(e) => {
                refused += 1;
                assert!(e.to_string().contains("events.log"), "{e}");
            }
        }
    }
    assert!(acked > 0 && refused > 0, "acked {acked}, refused {refused}");
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len <= 4096, "{len}");
    // Room again: the next append lands on a clean line.
    set_file_size_limit(u64::MAX);
    store.append(&batch(2, next)).unwrap();
    acked += 2;
    drop(store);

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'));
    assert_eq!(text.lines().count(), acked, "{text}");
    let (again, replayed) = EventStore::open(&path).unwrap();
    assert_eq!(replayed, acked);
    assert_eq!(again.items(&format!("user-{next}")).len(), 1);
}
