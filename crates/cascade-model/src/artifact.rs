//! The artifact directory the server loads: `manifest.json` plus files, each
//! pinned by sha256 in the manifest. Loading refuses any mismatch.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ModelError;

pub const MANIFEST: &str = "manifest.json";
/// Bumped whenever the layout or a file's meaning changes.
pub const FORMAT_VERSION: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HnswParams {
    pub max_nb_connection: usize,
    pub ef_construction: usize,
    pub max_layer: usize,
    pub ef_search: usize,
    pub distance: String,
    /// Recall@100 of the index against exact search, measured at build time.
    pub recall_at_100: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model_version: String,
    pub created_unix: u64,
    pub dataset_checksum: String,
    pub num_users: usize,
    pub num_items: usize,
    pub embedding_dim: usize,
    pub text_dim: usize,
    pub text_model: String,
    pub hnsw: HnswParams,
    /// Evaluation metrics of the models in this artifact (see `docs/quality.md`).
    pub metrics: serde_json::Value,
    /// Relative path → sha256 of every other file in the directory.
    pub files: BTreeMap<String, String>,
}

pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl Manifest {
    /// Hash every regular file under `dir` (except the manifest) into `files`, then write `manifest.json`.
    pub fn seal(mut self, dir: &Path) -> Result<Self, ModelError> {
        self.files.clear();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).map_err(|e| ModelError::io(&d, e))? {
                let entry = entry.map_err(|e| ModelError::io(&d, e))?;
                let p = entry.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p
                        .strip_prefix(dir)
                        .map_err(|_| ModelError::Invalid("path outside artifact".into()))?;
                    let rel = rel.to_string_lossy().replace('\\', "/");
                    if rel != MANIFEST {
                        self.files.insert(rel, sha256_file(&p)?);
                    }
                }
            }
        }
        let path = dir.join(MANIFEST);
        let text =
            serde_json::to_string_pretty(&self).map_err(|e| ModelError::Invalid(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
        Ok(self)
    }

    /// Read and fully verify an artifact directory: format version, every
    /// listed file present with its sha256, no unlisted files.
    pub fn verify(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
            path: path.clone(),
            msg: format!("unreadable manifest: {e}"),
        })?;
        if m.format_version != FORMAT_VERSION {
            return Err(ModelError::Corrupt {
                path,
                msg: format!(
                    "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                    m.format_version
                ),
            });
        }
        for (rel, want) in &m.files {
            let p = dir.join(rel);
            if !p.exists() {
                return Err(ModelError::Corrupt {
                    path: p,
                    msg: "listed in manifest but missing".into(),
                });
            }
            let got = sha256_file(&p)?;
            if &got != want {
                return Err(ModelError::Corrupt {
                    path: p,
                    msg: format!("sha256 {got} does not match manifest {want}"),
                });
            }
        }
        Ok(m)
    }
}

/// The newest artifact version under `root` (directories sorted by name; versions are zero-padded timestamps).
pub fn latest_version(root: &Path) -> Result<PathBuf, ModelError> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| ModelError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(MANIFEST).exists())
        .collect();
    dirs.sort();
    dirs.pop().ok_or_else(|| {
        ModelError::Invalid(format!(
            "no artifact (a directory with {MANIFEST}) under {}",
            root.display()
        ))
    })
}
