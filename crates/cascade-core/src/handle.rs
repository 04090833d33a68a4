//! The serving model version, swappable under load.
//!
//! A reload loads the new version beside the old one, warms it, then swaps
//! one pointer. Requests hold an `Arc` to the version they started with, so
//! they finish on it; the old version (and its ranking threads) goes away
//! when the last of them ends. Accepted events live in one store shared by
//! every version, so a reload loses none.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use candle_core::Device;

use crate::engine::{Engine, EngineConfig};
use crate::events::EventStore;
use crate::EngineError;

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub struct Reloaded {
    pub model_version: String,
    pub previous_version: String,
    /// False when the requested version was already serving.
    pub swapped: bool,
    pub load_time: Duration,
}

pub struct EngineHandle {
    current: ArcSwap<Engine>,
    /// Where versions live: `ReloadModel` and the watcher only load from here.
    root: PathBuf,
    device: Device,
    cfg: EngineConfig,
    events: Arc<EventStore>,
    /// One reload at a time; requests never take it.
    reloading: Mutex<()>,
}

impl EngineHandle {
    /// Load the newest version under `root` (or `root` itself when it is a
    /// version directory), warm it, and serve it.
    pub fn open(
        root: &Path,
        device: &Device,
        cfg: EngineConfig,
        events: Arc<EventStore>,
    ) -> Result<Self, EngineError> {
        let dir = resolve(root, None)?;
        let engine = load_warm(&dir, device, cfg.clone(), events)?;
        Ok(Self::from_engine(engine, device, cfg))
    }

    /// Wrap an already loaded engine; reloads look beside it (in its parent
    /// directory) and share its event store.
    pub fn from_engine(engine: Engine, device: &Device, cfg: EngineConfig) -> Self {
        let root = engine
            .dir()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let events = engine.events().clone();
        Self {
            current: ArcSwap::from_pointee(engine),
            root,
            device: device.clone(),
            cfg,
            events,
            reloading: Mutex::new(()),
        }
    }

    /// The version serving now; hold it for the whole request.
    pub fn current(&self) -> Arc<Engine> {
        self.current.load_full()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Load `version` (a directory name under the root; `None` = the newest),
    /// warm it, and swap it in. Loading the version already serving is a no-op.
    pub fn reload(&self, version: Option<&str>) -> Result<Reloaded, EngineError> {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        let dir = resolve(&self.root, version)?;
        let old = self.current();
        let previous_version = old.model_version().to_string();
        if same_dir(old.dir(), &dir) {
            return Ok(Reloaded {
                model_version: previous_version.clone(),
                previous_version,
                swapped: false,
                load_time: t0.elapsed(),
            });
        }
        let new = load_warm(&dir, &self.device, self.cfg.clone(), self.events.clone())?;
        let model_version = new.model_version().to_string();
        self.current.store(Arc::new(new));
        tracing::info!(
            "model {model_version} from {} now serving (was {previous_version}); loaded and warmed in {:.0} ms",
            dir.display(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(Reloaded {
            model_version,
            previous_version,
            swapped: true,
            load_time: t0.elapsed(),
        })
    }

    /// Poll the root every `every` and reload when a newer version appears
    /// (TF Serving's file-system poll). A version that fails to load is
    /// logged and skipped until a newer one appears; serving goes on.
    pub fn watch(
        self: &Arc<Self>,
        every: Duration,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("cascade-watch".into())
            .spawn(move || {
                let mut failed: Option<PathBuf> = None;
                loop {
                    std::thread::sleep(every);
                    let Some(h) = weak.upgrade() else { return };
                    let Ok(newest) = cascade_artifact::manifest::latest_version(&h.root) else {
                        continue;
                    };
                    if same_dir(h.current().dir(), &newest) || failed.as_ref() == Some(&newest) {
                        continue;
                    }
                    let name = newest
                        .file_name()
                        .and_then(|n| n.to_str())
                        .map(String::from);
                    match h.reload(name.as_deref()) {
                        Ok(_) => failed = None,
                        Err(e) => {
                            tracing::error!(
                                "not serving {}: {e}; keeping {}",
                                newest.display(),
                                h.current().model_version()
                            );
                            failed = Some(newest);
                        }
                    }
                }
            })
    }
}

/// Load and warm a version, with any panic inside (hnsw_rs asserts on
/// graph files it cannot make sense of, even when their checksums match a
/// bad build's manifest) turned into an error: a bad version must never
/// take the server, or the watcher thread, down with it.
fn load_warm(
    dir: &Path,
    device: &Device,
    cfg: EngineConfig,
    events: Arc<EventStore>,
) -> Result<Engine, EngineError> {
    let load = || {
        let engine = Engine::load_with(dir, device, cfg, events)?;
        engine.warm()?;
        Ok::<_, EngineError>(engine)
    };
    let version = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unservable = |msg: String| EngineError::Unservable {
        version: version.clone(),
        msg,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
        Ok(Ok(engine)) => Ok(engine),
        Ok(Err(e)) => {
            tracing::error!("loading {}: {e}", dir.display());
            // Named relative to the version: no server path reaches the caller.
            let msg = e.to_string().replace(&format!("{}/", dir.display()), "");
            Err(unservable(
                msg.replace(&dir.display().to_string(), &version),
            ))
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("loading {} panicked: {what}", dir.display());
            Err(unservable(
                "its files are inconsistent (details in the server log)".into(),
            ))
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A version directory: `root` itself if it holds a manifest, else the named
/// version under it, else the newest.
fn resolve(root: &Path, version: Option<&str>) -> Result<PathBuf, EngineError> {
    if let Some(v) = version.filter(|v| !v.is_empty()) {
        let bad = v.contains('/') || v.contains('\\') || v == "." || v == "..";
        let dir = root.join(v);
        if bad || !dir.join(cascade_artifact::manifest::MANIFEST).exists() {
            // The root's path is the server's business, not the caller's.
            return Err(EngineError::NotFound(format!(
                "no model version {v:?} under the artifact root"
            )));
        }
        return Ok(dir);
    }
    if root.join(cascade_artifact::manifest::MANIFEST).exists() {
        return Ok(root.to_path_buf());
    }
    cascade_artifact::manifest::latest_version(root).map_err(|e| {
        tracing::warn!("no model version under {}: {e}", root.display());
        EngineError::NotFound("no model version under the artifact root".into())
    })
}
