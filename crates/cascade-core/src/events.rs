//! Accepted user–item events: an append-only, fsync'd log on disk and an
//! in-memory overlay per user. The store is keyed by IDs, not model indices,
//! so it outlives model versions: a reload keeps every accepted event.
//!
//! The log is JSON lines, each followed by a tab and the CRC-32 of the JSON
//! (lines without one, written before checksums, are read as they are). An
//! append writes whole lines and is acknowledged
//! only after `fsync`; a failed append (disk full, I/O error) is rolled back
//! by truncating to the last good length, so no partial line is ever left
//! for the next append to be glued onto. On start-up an unterminated final
//! line (a crash mid-append: never acknowledged) is cut by bytes.
//!
//! Compaction bounds start-up: once the log passes a size, the per-user
//! state is written to `<log>.snapshot` (atomically) and the log is rotated
//! to `<log>.<n>`, kept whole for retraining but no longer replayed. Start-up
//! reads the snapshot, then replays the current log. The state is a set per
//! user, so replaying an event the snapshot already holds changes nothing:
//! a crash between the snapshot and the rotation loses nothing.
//!
//! In memory, item IDs are interned once and each user's items are 4-byte
//! indices, deduplicated by set: about 16 bytes per distinct (user, item)
//! pair where strings per user took about 64 (measured in
//! `tests/event_log_startup.rs`; docs/reliability.md). Nothing is evicted,
//! because a forgotten event would let an already-seen item be served
//! again; the memory bound is the number of distinct pairs.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::EngineError;

/// One user–item interaction reported to `record_events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub user_id: String,
    pub item_id: String,
    /// What happened (`view`, `rating`, `click`, …); free text, not interpreted yet.
    pub kind: String,
    pub timestamp: i64,
}

/// Item IDs per user in arrival order (deduplicated), plus the durable log.
#[derive(Default)]
pub struct EventStore {
    by_user: RwLock<State>,
    log: Option<(PathBuf, Mutex<LogFile>)>,
}

/// Log size past which an append compacts (see the module docs).
pub const DEFAULT_COMPACT_BYTES: u64 = 64 << 20;

/// The per-user state (see the module docs).
#[derive(Default)]
struct State {
    items: Interned,
    users: HashMap<Box<str>, UserItems, Hasher>,
}

/// Item IDs, each stored once, named by a `u32`.
#[derive(Default)]
struct Interned {
    ids: Vec<Box<str>>,
    index: HashMap<Box<str>, u32, Hasher>,
}

/// A fast hasher, seeded per process (IDs come from clients): the state is
/// rebuilt from millions of events at start-up.
type Hasher = foldhash::fast::RandomState;

impl Interned {
    /// `None` once 2^32 IDs are held.
    fn get_or_insert(&mut self, id: &str) -> Option<u32> {
        if let Some(&i) = self.index.get(id) {
            return Some(i);
        }
        let i = u32::try_from(self.ids.len()).ok()?;
        self.ids.push(id.into());
        self.index.insert(id.into(), i);
        Some(i)
    }
}

/// A user's items in arrival order; past [`SET_FROM`] items a set answers
/// "seen already?" instead of a scan.
#[derive(Default)]
struct UserItems {
    order: Vec<u32>,
    // Boxed: most users never need a set, and `None` then costs 8 bytes
    // where an unboxed one would cost 48.
    #[allow(clippy::box_collection)]
    set: Option<Box<HashSet<u32, Hasher>>>,
}

const SET_FROM: usize = 32;

impl UserItems {
    fn insert(&mut self, item: u32) {
        if self.set.is_none() && self.order.len() >= SET_FROM {
            self.set = Some(Box::new(self.order.iter().copied().collect()));
        }
        let new = match &mut self.set {
            Some(set) => set.insert(item),
            None => !self.order.contains(&item),
        };
        if new {
            self.order.push(item);
        }
    }
}

impl State {
    /// Room for `n` more distinct item IDs (indices are `u32`).
    fn has_room(&self, n: usize) -> bool {
        self.items.ids.len().saturating_add(n) <= u32::MAX as usize
    }

    /// Callers check [`has_room`](Self::has_room) first; an item past it
    /// is not remembered.
    fn remember(&mut self, user_id: &str, item_id: &str) {
        let Some(item) = self.items.get_or_insert(item_id) else {
            return;
        };
        match self.users.get_mut(user_id) {
            Some(u) => u.insert(item),
            None => {
                let mut u = UserItems::default();
                u.insert(item);
                self.users.insert(user_id.into(), u);
            }
        }
    }

    fn items(&self, user_id: &str) -> Vec<String> {
        self.users.get(user_id).map_or_else(Vec::new, |u| {
            u.order
                .iter()
                .map(|&i| self.items.ids[i as usize].to_string())
                .collect()
        })
    }
}

/// The state as the snapshot's `{"users": {user: [item, …]}}`, written
/// from the interned form and read into it, without a map of strings in
/// between.
impl Serialize for State {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Items<'a>(&'a State, &'a UserItems);
        impl Serialize for Items<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.1.order.iter().map(|&i| &*self.0.items.ids[i as usize]))
            }
        }
        struct ByUser<'a>(&'a State);
        impl Serialize for ByUser<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(
                    self.0
                        .users
                        .iter()
                        .map(|(u, items)| (u, Items(self.0, items))),
                )
            }
        }
        let mut st = s.serialize_struct("Snapshot", 1)?;
        st.serialize_field("users", &ByUser(self))?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
        use std::fmt;
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = State;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event snapshot object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<State, A::Error> {
                let mut state = State::default();
                while let Some(key) = m.next_key::<String>()? {
                    if key == "users" {
                        m.next_value_seed(ByUser(&mut state))?;
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(state)
            }
        }
        struct ByUser<'a>(&'a mut State);
        impl<'de> DeserializeSeed<'de> for ByUser<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_map(self)
            }
        }
        impl<'de> Visitor<'de> for ByUser<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of user IDs to item ID lists")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
                while let Some(user) = m.next_key::<String>()? {
                    let State { items, users } = &mut *self.0;
                    let u = users.entry(user.into_boxed_str()).or_default();
                    m.next_value_seed(Items(items, u))?;
                }
                Ok(())
            }
        }
        /// One user's list, interned as it is read (no string per item).
        struct Items<'a>(&'a mut Interned, &'a mut UserItems);
        impl<'de> DeserializeSeed<'de> for Items<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_seq(self)
            }
        }
        impl<'de> Visitor<'de> for Items<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of item IDs")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
                while let Some(i) = s.next_element_seed(Item(self.0))? {
                    let i = i.ok_or_else(|| serde::de::Error::custom("more than 2^32 item IDs"))?;
                    // Written deduplicated: no check (the set is built on
                    // the user's next event).
                    self.1.order.push(i);
                }
                Ok(())
            }
        }
        struct Item<'a>(&'a mut Interned);
        impl<'de> DeserializeSeed<'de> for Item<'_> {
            type Value = Option<u32>;
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Option<u32>, D::Error> {
                d.deserialize_str(self)
            }
        }
        impl<'de> Visitor<'de> for Item<'_> {
            type Value = Option<u32>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an item ID")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<u32>, E> {
                Ok(self.0.get_or_insert(v))
            }
        }
        d.deserialize_map(Top)
    }
}

/// The log opened for appending, created if missing.
fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// `<log><suffix>`, beside the log.
fn beside(log: &Path, suffix: &str) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// One log line: the event as JSON, a tab, its CRC-32 in hex, a newline.
/// (JSON escapes tabs inside strings, so the last tab always splits.)
pub fn log_line(ev: &Event) -> Result<String, serde_json::Error> {
    let json = serde_json::to_string(ev)?;
    let crc = crc32fast::hash(json.as_bytes());
    Ok(format!("{json}\t{crc:08x}\n"))
}

/// Read one line (without its newline): checksum first, then the JSON.
fn parse_line(line: &[u8]) -> Result<Event, String> {
    let line = std::str::from_utf8(line).map_err(|e| e.to_string())?;
    let json = match line.rsplit_once('\t') {
        Some((json, crc)) => {
            let want = u32::from_str_radix(crc.trim_end(), 16)
                .map_err(|_| format!("bad checksum field {crc:?}"))?;
            let got = crc32fast::hash(json.as_bytes());
            if got != want {
                return Err(format!(
                    "checksum mismatch (stored {want:08x}, computed {got:08x})"
                ));
            }
            json
        }
        // Written before lines carried a checksum.
        None => line,
    };
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// The open log and the length of its acknowledged content.
struct LogFile {
    file: std::fs::File,
    good_len: u64,
    /// Compact once the log is this long.
    compact_at: u64,
    /// A rollback failed: the file may end in a partial line, so cut it
    /// back to `good_len` before anything else is appended.
    dirty: bool,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

impl EventStore {
    /// A store with no log: events live until the process ends.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Open (creating if needed) the append-only log at `path` and replay it.
    /// An unterminated final line (a crash mid-append, never acknowledged)
    /// is cut off with a warning; any other bad line is an error naming the
    /// line. Returns (store, replayed).
    pub fn open(path: &Path) -> Result<(Self, usize), EngineError> {
        Self::open_with(path, DEFAULT_COMPACT_BYTES)
    }

    /// [`open`](Self::open), compacting whenever the log passes `compact_at` bytes.
    pub fn open_with(path: &Path, compact_at: u64) -> Result<(Self, usize), EngineError> {
        let err = |msg: String| EngineError::EventLog {
            path: path.to_path_buf(),
            msg,
        };
        let store = Self::default();
        let snap = beside(path, ".snapshot");
        match std::fs::read(&snap) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| EngineError::EventLog {
                        path: snap.clone(),
                        msg: format!("unreadable snapshot: {e}"),
                    })?;
                tracing::info!("{}: {} users restored", snap.display(), state.users.len());
                *store.by_user.write().unwrap_or_else(|p| p.into_inner()) = state;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EngineError::EventLog {
                    path: snap,
                    msg: e.to_string(),
                })
            }
        }
        let mut replayed = 0;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        // Everything after the last newline was never acknowledged.
        let good_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        {
            let mut state = store.by_user.write().unwrap_or_else(|p| p.into_inner());
            for (n, line) in bytes[..good_len].split(|&b| b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let ev = parse_line(line).map_err(|e| err(format!("line {}: {e}", n + 1)))?;
                state.remember(&ev.user_id, &ev.item_id);
                replayed += 1;
            }
        }
        let file = open_append(path).map_err(|e| err(e.to_string()))?;
        if good_len < bytes.len() {
            tracing::warn!(
                "{}: cutting {} bytes of an unterminated final line (an append that never completed)",
                path.display(),
                bytes.len() - good_len
            );
            file.set_len(good_len as u64)
                .and_then(|_| file.sync_data())
                .map_err(|e| err(e.to_string()))?;
        }
        let log = LogFile {
            file,
            good_len: good_len as u64,
            compact_at,
            dirty: false,
        };
        Ok((
            Self {
                log: Some((path.to_path_buf(), Mutex::new(log))),
                ..store
            },
            replayed,
        ))
    }

    /// Append already-validated events to the log (flushed to disk before
    /// returning), then make them visible. If the write fails, the log is
    /// cut back to what it held before and nothing becomes visible.
    pub fn append(&self, events: &[Event]) -> Result<(), EngineError> {
        if !read(&self.by_user).has_room(events.len()) {
            return Err(EngineError::EventLog {
                path: self.log.as_ref().map(|l| l.0.clone()).unwrap_or_default(),
                msg: "the event store holds 2^32 distinct item IDs; no more fit".into(),
            });
        }
        let remember_all = || {
            let mut state = self.by_user.write().unwrap_or_else(|p| p.into_inner());
            for ev in events {
                state.remember(&ev.user_id, &ev.item_id);
            }
        };
        let Some((path, log)) = &self.log else {
            remember_all();
            return Ok(());
        };
        let err = |msg: String| EngineError::EventLog {
            path: path.clone(),
            msg,
        };
        let mut buf = String::new();
        for ev in events {
            buf.push_str(&log_line(ev).map_err(|e| err(e.to_string()))?);
        }
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        let good = log.good_len;
        if log.dirty {
            log.file
                .set_len(good)
                .map_err(|e| err(format!("restoring the log to {good} bytes: {e}")))?;
            log.dirty = false;
        }
        let written = log
            .file
            .write_all(buf.as_bytes())
            .and_then(|_| log.file.sync_data());
        if let Err(e) = written {
            // Roll back the partial write; if even that fails, the next
            // append retries it before writing.
            let rolled = log.file.set_len(good).and_then(|_| log.file.sync_data());
            log.dirty = rolled.is_err();
            return Err(err(e.to_string()));
        }
        log.good_len = good + buf.len() as u64;
        remember_all();
        if log.good_len >= log.compact_at {
            // The events are durable already: a failed compaction is logged
            // and retried on a later append, not the caller's error. Appends
            // wait while it runs (3.5 s at 10M events, docs/reliability.md).
            if let Err(e) = self.compact_locked(path, &mut log) {
                tracing::warn!("compacting the event log: {e}");
            }
        }
        Ok(())
    }

    /// Snapshot the per-user state and rotate the log (see the module docs).
    pub fn compact(&self) -> Result<(), EngineError> {
        match &self.log {
            Some((path, log)) => {
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                self.compact_locked(path, &mut log)
            }
            None => Ok(()),
        }
    }

    fn compact_locked(&self, path: &Path, log: &mut LogFile) -> Result<(), EngineError> {
        let err = |p: &Path, e: std::io::Error| EngineError::EventLog {
            path: p.to_path_buf(),
            msg: e.to_string(),
        };
        let t0 = std::time::Instant::now();
        let snap = beside(path, ".snapshot");
        let tmp = beside(path, ".snapshot.tmp");
        let bytes =
            serde_json::to_vec(&*read(&self.by_user)).map_err(|e| EngineError::EventLog {
                path: snap.clone(),
                msg: e.to_string(),
            })?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let sync_dir = || std::fs::File::open(dir).and_then(|d| d.sync_all());
        // 1. The snapshot, whole or not at all.
        std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &snap))
            .and_then(|_| sync_dir())
            .map_err(|e| err(&snap, e))?;
        // 2. Rotate: the log so far is kept for retraining, not replayed.
        let mut n = 1;
        while beside(path, &format!(".{n}")).exists() {
            n += 1;
        }
        let archive = beside(path, &format!(".{n}"));
        std::fs::rename(path, &archive).map_err(|e| err(&archive, e))?;
        log.file = open_append(path).map_err(|e| err(path, e))?;
        sync_dir().map_err(|e| err(path, e))?;
        log.good_len = 0;
        log.dirty = false;
        tracing::info!(
            "event log compacted in {:.0} ms: snapshot {} ({} bytes), log so far kept as {}",
            t0.elapsed().as_secs_f64() * 1e3,
            snap.display(),
            bytes.len(),
            archive.display()
        );
        Ok(())
    }

    /// The user's recorded item IDs, oldest first.
    pub fn items(&self, user_id: &str) -> Vec<String> {
        read(&self.by_user).items(user_id)
    }

    /// How many distinct items the user has recorded: a generation number
    /// that changes whenever the user's state does (cache keys use it).
    pub fn generation(&self, user_id: &str) -> usize {
        read(&self.by_user)
            .users
            .get(user_id)
            .map_or(0, |u| u.order.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory and the log path inside it.
    fn tmp_log() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        (dir, path)
    }

    fn ev(user: &str, item: &str) -> Event {
        Event {
            user_id: user.into(),
            item_id: item.into(),
            kind: "view".into(),
            timestamp: 1,
        }
    }

    #[test]
    fn items_keep_arrival_order_and_repeats_are_dropped_past_the_set_threshold() {
        let (_dir, path) = tmp_log();
        let (store, _) = EventStore::open_with(&path, u64::MAX).unwrap();
        // 100 distinct items, each recorded three times in a shuffled
        // order: the first arrival of each counts, once.
        let order: Vec<usize> = (0..300).map(|n| (n * 37) % 100).collect();
        for chunk in order.chunks(7) {
            let evs: Vec<Event> = chunk
                .iter()
                .map(|i| ev("heavy", &format!("i{i}")))
                .collect();
            store.append(&evs).unwrap();
        }
        store
            .append(&[ev("light", "i5"), ev("light", "i5")])
            .unwrap();
        let mut want: Vec<String> = Vec::new();
        for i in &order {
            let id = format!("i{i}");
            if !want.contains(&id) {
                want.push(id);
            }
        }
        assert_eq!(want.len(), 100);
        assert_eq!(store.items("heavy"), want);
        assert_eq!(store.generation("heavy"), 100);
        assert_eq!(store.items("light"), ["i5"]);
        assert!(store.items("nobody").is_empty());
        // The snapshot round-trips the same state.
        store.compact().unwrap();
        drop(store);
        let (store, replayed) = EventStore::open(&path).unwrap();
        assert_eq!(replayed, 0);
        assert_eq!(store.items("heavy"), want);
        assert_eq!(store.items("light"), ["i5"]);
    }

    #[test]
    fn a_torn_tail_is_cut_by_bytes_even_mid_utf8() {
        let (_dir, path) = tmp_log();
        let (store, _) = EventStore::open(&path).unwrap();
        store.append(&[ev("ü1", "i1")]).unwrap();
        drop(store);
        let good = std::fs::read(&path).unwrap();
        // A crash mid-append: half of a line, ending inside a two-byte "é".
        let mut torn = good.clone();
        let line = serde_json::to_string(&ev("é2", "i2")).unwrap().into_bytes();
        let cut = line.iter().position(|&b| b == 0xC3).unwrap() + 1;
        torn.extend_from_slice(&line[..cut]);
        std::fs::write(&path, &torn).unwrap();

        let (store, replayed) = EventStore::open(&path).unwrap();
        assert_eq!(replayed, 1);
        assert_eq!(std::fs::read(&path).unwrap(), good, "torn bytes not cut");
        store.append(&[ev("u3", "i3")]).unwrap();
        drop(store);
        let (store, replayed) = EventStore::open(&path).unwrap();
        assert_eq!(replayed, 2);
        assert_eq!(store.items("ü1"), ["i1"]);
        assert_eq!(store.items("u3"), ["i3"]);
        assert!(
            store.items("é2").is_empty(),
            "an unacknowledged event came back"
        );
    }

    #[test]
    fn an_unterminated_complete_line_is_not_glued_to_the_next_append() {
        let (_dir, path) = tmp_log();
        // Valid JSON, but its newline never reached the disk.
        let line = serde_json::to_string(&ev("u1", "i1")).unwrap();
        std::fs::write(&path, &line).unwrap();
        let (store, replayed) = EventStore::open(&path).unwrap();
        assert_eq!(replayed, 0);
        store.append(&[ev("u2", "i2")]).unwrap();
        drop(store);
        let (store, replayed) = EventStore::open(&path).unwrap();
        assert_eq!(replayed, 1);
        assert_eq!(store.items("u2"), ["i2"]);
    }

    #[test]
    fn compaction_snapshots_the_state_and_rotates_the_log() {
        let (_dir, path) = tmp_log();
        // Compact whenever the log passes 300 bytes: about every 4 events.
        let (store, _) = EventStore::open_with(&path, 300).unwrap();
        for n in 0..20 {
            store
                .append(&[ev(&format!("u{}", n % 3), &format!("i{n}"))])
                .unwrap();
        }
        let want: Vec<Vec<String>> = (0..3).map(|u| store.items(&format!("u{u}"))).collect();
        assert_eq!(want[0], ["i0", "i3", "i6", "i9", "i12", "i15", "i18"]);
        drop(store);
        let archives: Vec<PathBuf> = (1..)
            .map(|n| beside(&path, &format!(".{n}")))
            .take_while(|p| p.exists())
            .collect();
        assert!(archives.len() >= 3, "{archives:?}");
        assert!(beside(&path, ".snapshot").exists());
        // Every event is kept, in the archives or the current log.
        let lines: usize = archives
            .iter()
            .chain([&path])
            .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
            .sum();
        assert_eq!(lines, 20);
        // Start-up reads the snapshot and only the current log.
        let (store, replayed) = EventStore::open(&path).unwrap();
        assert!(replayed < 5, "{replayed}");
        for (u, items) in want.iter().enumerate() {
            assert_eq!(&store.items(&format!("u{u}")), items);
        }
    }

    #[test]
    fn a_crash_between_snapshot_and_rotation_loses_and_repeats_nothing() {
        let (_dir, path) = tmp_log();
        let (store, _) = EventStore::open_with(&path, u64::MAX).unwrap();
        store.append(&[ev("u1", "i1"), ev("u1", "i2")]).unwrap();
        store.compact().unwrap();
        store.append(&[ev("u1", "i3")]).unwrap();
        drop(store);
        // As if the rotation never happened: the snapshot's events are also
        // still in the current log, in front of the newer one.
        let old = std::fs::read(beside(&path, ".1")).unwrap();
        let new = std::fs::read(&path).unwrap();
        std::fs::write(&path, [old, new].concat()).unwrap();
        let (store, replayed) = EventStore::open(&path).unwrap();
        assert_eq!(replayed, 3);
        assert_eq!(store.items("u1"), ["i1", "i2", "i3"]);
    }

    #[test]
    fn a_changed_byte_inside_a_line_fails_its_checksum() {
        let (_dir, path) = tmp_log();
        let (store, _) = EventStore::open(&path).unwrap();
        store
            .append(&[ev("u1", "i1"), ev("u2", "i2"), ev("u3", "i3")])
            .unwrap();
        drop(store);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(good.iter().filter(|&&b| b == b'\t').count(), 3);
        // "i2" becomes "i7": still valid JSON, so only the checksum sees it.
        let text = String::from_utf8(good.clone()).unwrap();
        std::fs::write(&path, text.replacen("\"i2\"", "\"i7\"", 1)).unwrap();
        let e = EventStore::open(&path).err().expect("must refuse");
        assert!(e.to_string().contains("line 2: checksum mismatch"), "{e}");
        // Lines from before checksums still replay.
        let legacy = serde_json::to_string(&ev("u9", "i9")).unwrap() + "\n";
        std::fs::write(&path, [legacy.into_bytes(), good].concat()).unwrap();
        let (store, replayed) = EventStore::open(&path).unwrap();
        assert_eq!(replayed, 4);
        assert_eq!(store.items("u9"), ["i9"]);
    }

    #[test]
    fn a_bad_line_inside_the_log_names_its_line() {
        let (_dir, path) = tmp_log();
        let good = serde_json::to_string(&ev("u1", "i1")).unwrap();
        std::fs::write(&path, format!("{good}\n{{oops\n{good}\n")).unwrap();
        let e = EventStore::open(&path).err().expect("must refuse");
        assert!(e.to_string().contains("line 2"), "{e}");
        std::fs::write(&path, [good.as_bytes(), b"\n\xff\xfe\n"].concat()).unwrap();
        let e = EventStore::open(&path).err().expect("must refuse");
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
