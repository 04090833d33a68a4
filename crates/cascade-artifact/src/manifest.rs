//! The artifact directory the server loads: `manifest.json` plus files, each
//! pinned by sha256 in the manifest. Loading refuses any mismatch, and every
//! read stays inside the version directory: manifest paths must be plain
//! relative paths, and symbolic links and unlisted files are refused.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ArtifactError;

pub const MANIFEST: &str = "manifest.json";
/// Bumped whenever the layout or a file's meaning changes.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format this build still reads. Format 3 kept the whole training
/// configuration in `serving.json`; the loader lifts the two model shapes out
/// of it (see [`crate::ServingConfig`]).
pub const OLDEST_READABLE_FORMAT: u32 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HnswParams {
    pub max_nb_connection: usize,
    pub ef_construction: usize,
    pub max_layer: usize,
    pub ef_search: usize,
    pub distance: String,
    /// Recall@100 of the index against exact search, measured at build time.
    pub recall_at_100: f64,
    /// Catalogues with fewer items are served by an exact scan instead of
    /// the graph (artifacts from before this field get the default).
    #[serde(default = "default_exact_below")]
    pub exact_below: usize,
}

fn default_exact_below() -> usize {
    cascade_retrieval::DEFAULT_EXACT_BELOW
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

/// Hex sha256 of a file (one implementation, shared with the dataset checks).
pub fn sha256_file(path: &Path) -> Result<String, ArtifactError> {
    Ok(cascade_data::sha256_file(path)?)
}

impl Manifest {
    /// Hash every regular file under `dir` (except the manifest) into `files`, then write `manifest.json`.
    pub fn seal(mut self, dir: &Path) -> Result<Self, ArtifactError> {
        self.files.clear();
        for (rel, p) in version_files(dir)? {
            if rel != MANIFEST {
                self.files.insert(rel, sha256_file(&p)?);
            }
        }
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(&self)
            .map_err(|e| ArtifactError::Invalid(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| ArtifactError::io(&path, e))?;
        Ok(self)
    }

    /// Read and fully verify an artifact directory: format version, every
    /// listed file present with its sha256, no unlisted files, and nothing
    /// that leads outside the directory (absolute or `..` paths, symlinks).
    pub fn verify(dir: &Path) -> Result<Self, ArtifactError> {
        let path = dir.join(MANIFEST);
        let corrupt = |path: &Path, msg: String| ArtifactError::Corrupt {
            path: path.to_path_buf(),
            msg,
        };
        // Every file of the version, walked without following links: any
        // symlink, or any file the manifest does not pin, is refused.
        let present: BTreeMap<String, PathBuf> = version_files(dir)?.into_iter().collect();
        let text = std::fs::read_to_string(&path).map_err(|e| ArtifactError::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| corrupt(&path, format!("unreadable manifest: {e}")))?;
        if !(OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&m.format_version) {
            return Err(corrupt(
                &path,
                format!(
                    "format_version {} is not supported (this build reads \
                     {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}); rebuild the artifact \
                     with this build's `cascade train` (or `cascade synth`)",
                    m.format_version
                ),
            ));
        }
        for (rel, want) in &m.files {
            if !plain_relative(rel) {
                return Err(corrupt(
                    &path,
                    format!("lists {rel:?}: only plain paths inside the version are allowed"),
                ));
            }
            let Some(p) = present.get(rel) else {
                return Err(corrupt(
                    &dir.join(rel),
                    "listed in manifest but missing".into(),
                ));
            };
            let got = sha256_file(p)?;
            if &got != want {
                return Err(corrupt(
                    p,
                    format!("sha256 {got} does not match manifest {want}"),
                ));
            }
        }
        if let Some((rel, p)) = present
            .iter()
            .find(|(rel, _)| rel.as_str() != MANIFEST && !m.files.contains_key(*rel))
        {
            return Err(corrupt(p, format!("{rel:?} is not listed in the manifest")));
        }
        Ok(m)
    }
}

/// Whether a manifest path names a file inside the version: relative, with
/// no `..`, `.`, root or drive components.
fn plain_relative(rel: &str) -> bool {
    !rel.is_empty()
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Every regular file under `dir` as (`/`-separated relative path, path),
/// without following links: a symbolic link anywhere is an error.
fn version_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ArtifactError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| ArtifactError::io(&d, e))? {
            let entry = entry.map_err(|e| ArtifactError::io(&d, e))?;
            let p = entry.path();
            let kind = entry.file_type().map_err(|e| ArtifactError::io(&p, e))?;
            if kind.is_symlink() {
                return Err(ArtifactError::Corrupt {
                    path: p,
                    msg: "symbolic links are not allowed in a version".into(),
                });
            }
            if kind.is_dir() {
                stack.push(p);
            } else if kind.is_file() {
                let rel = p
                    .strip_prefix(dir)
                    .map_err(|_| ArtifactError::Invalid("path outside artifact".into()))?;
                out.push((rel.to_string_lossy().replace('\\', "/"), p));
            }
        }
    }
    Ok(out)
}

/// The newest artifact version under `root` (directories sorted by name; versions are zero-padded timestamps).
pub fn latest_version(root: &Path) -> Result<PathBuf, ArtifactError> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| ArtifactError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(MANIFEST).exists())
        .collect();
    dirs.sort();
    dirs.pop().ok_or_else(|| {
        ArtifactError::Invalid(format!(
            "no artifact (a directory with {MANIFEST}) under {}",
            root.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed version with two files, one in a subdirectory.
    fn sealed() -> (tempfile::TempDir, Manifest) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a.bin"), b"weights").unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        std::fs::write(t.path().join("sub/b.txt"), b"items").unwrap();
        let m: Manifest = serde_json::from_value(serde_json::json!({
            "format_version": FORMAT_VERSION, "model_version": "v", "created_unix": 0,
            "dataset_checksum": "", "num_users": 0, "num_items": 0, "embedding_dim": 0,
            "text_dim": 0, "text_model": "", "metrics": null, "files": {},
            "hnsw": {"max_nb_connection": 0, "ef_construction": 0, "max_layer": 0,
                     "ef_search": 0, "distance": "", "recall_at_100": 0.0},
        }))
        .unwrap();
        let m = m.seal(t.path()).unwrap();
        (t, m)
    }

    fn refused(dir: &Path, names: &str) {
        let e = Manifest::verify(dir)
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains(names), "{names}: {e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Any bytes as `manifest.json`, or a valid one with any byte
        /// changed: refused with an error, never a panic.
        #[test]
        fn any_manifest_bytes_are_refused_not_panicked_on(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let (t, _) = sealed();
            let path = t.path().join(MANIFEST);
            let mut good = std::fs::read(&path).unwrap();
            let i = at.index(good.len());
            let changed = good[i] != byte;
            good[i] = byte;
            std::fs::write(&path, &good).unwrap();
            let r = Manifest::verify(t.path());
            // A changed byte may still be valid JSON naming the same files
            // (a digit of created_unix): then it verifies, which is fine.
            proptest::prop_assert!(r.is_ok() || changed);
            std::fs::write(&path, &junk).unwrap();
            proptest::prop_assert!(Manifest::verify(t.path()).is_err());
        }
    }

    #[test]
    fn a_sealed_version_verifies() {
        let (t, m) = sealed();
        assert_eq!(m.files.len(), 2);
        assert!(m.files.contains_key("sub/b.txt"));
        assert_eq!(Manifest::verify(t.path()).unwrap(), m);
    }

    #[test]
    fn paths_outside_the_version_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        let secret = outside.path().join("secret").to_string_lossy().into_owned();
        for rel in [
            secret.as_str(),
            "../secret",
            "sub/../../secret",
            "./a.bin",
            "",
        ] {
            let (t, mut m) = sealed();
            m.files.insert(
                rel.to_string(),
                sha256_file(&outside.path().join("secret")).unwrap(),
            );
            std::fs::write(t.path().join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
            refused(t.path(), "only plain paths");
        }
    }

    #[test]
    fn symlinks_and_unlisted_files_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"weights").unwrap();
        // A listed file replaced by a link to a file with the same bytes.
        let (t, _) = sealed();
        std::fs::remove_file(t.path().join("a.bin")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), t.path().join("a.bin")).unwrap();
        refused(t.path(), "symbolic link");
        // A linked directory.
        let (t, _) = sealed();
        std::os::unix::fs::symlink(outside.path(), t.path().join("extra")).unwrap();
        refused(t.path(), "symbolic link");
        // A file nobody pinned.
        let (t, _) = sealed();
        std::fs::write(t.path().join("sub/planted.bin"), b"?").unwrap();
        refused(t.path(), "not listed");
    }
}
