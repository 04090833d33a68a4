//! Accepted user–item events: an append-only, fsync'd log on disk and an
//! in-memory overlay per user. The store is keyed by IDs, not model indices,
//! so it outlives model versions: a reload keeps every accepted event.

use std::collections::HashMap;
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
    by_user: RwLock<HashMap<String, Vec<String>>>,
    log: Option<(PathBuf, Mutex<std::fs::File>)>,
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
    /// A torn final line (a crash mid-append) is cut off with a warning; any
    /// other bad line is an error naming the line. Returns (store, replayed).
    pub fn open(path: &Path) -> Result<(Self, usize), EngineError> {
        let err = |msg: String| EngineError::EventLog {
            path: path.to_path_buf(),
            msg,
        };
        let store = Self::default();
        let mut replayed = 0;
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let lines: Vec<&str> = text.split('\n').collect();
            for (n, line) in lines.iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Event>(line) {
                    Ok(ev) => {
                        store.remember(&ev.user_id, &ev.item_id);
                        replayed += 1;
                    }
                    Err(_) if n + 1 == lines.len() => {
                        // Cut it off so the next append starts on a clean line.
                        tracing::warn!("{}: dropping a torn final line", path.display());
                        let keep = text.rfind('\n').map(|p| p + 1).unwrap_or(0) as u64;
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(path)
                            .and_then(|f| f.set_len(keep))
                            .map_err(|e| err(e.to_string()))?;
                    }
                    Err(e) => return Err(err(format!("line {}: {e}", n + 1))),
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        Ok((
            Self {
                log: Some((path.to_path_buf(), Mutex::new(file))),
                ..store
            },
            replayed,
        ))
    }

    fn remember(&self, user_id: &str, item_id: &str) {
        let mut m = self.by_user.write().unwrap_or_else(|p| p.into_inner());
        let v = m.entry(user_id.to_string()).or_default();
        if !v.iter().any(|i| i == item_id) {
            v.push(item_id.to_string());
        }
    }

    /// Append already-validated events to the log (flushed to disk before
    /// returning), then make them visible. Nothing is visible if the write fails.
    pub fn append(&self, events: &[Event]) -> Result<(), EngineError> {
        if let Some((path, log)) = &self.log {
            let mut buf = String::new();
            for ev in events {
                let line = serde_json::to_string(ev).map_err(|e| EngineError::EventLog {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
                buf.push_str(&line);
                buf.push('\n');
            }
            let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(buf.as_bytes())
                .and_then(|_| f.sync_data())
                .map_err(|e| EngineError::EventLog {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
        }
        for ev in events {
            self.remember(&ev.user_id, &ev.item_id);
        }
        Ok(())
    }

    /// The user's recorded item IDs, oldest first.
    pub fn items(&self, user_id: &str) -> Vec<String> {
        read(&self.by_user)
            .get(user_id)
            .cloned()
            .unwrap_or_default()
    }

    /// How many distinct items the user has recorded: a generation number
    /// that changes whenever the user's state does (cache keys use it).
    pub fn generation(&self, user_id: &str) -> usize {
        read(&self.by_user).get(user_id).map_or(0, Vec::len)
    }
}
