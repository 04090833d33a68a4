//! Cascade's data layer: the documented on-disk format ([`format`]), the
//! fetchers for MovieLens-100K and all-MiniLM-L6-v2 ([`fetch`]), and the
//! seeded splits the evaluation protocols use ([`split`]).

pub mod fetch;
pub mod format;
pub mod split;
pub mod synthetic;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use format::{Dataset, Interaction, Item, User};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}:{line}: {msg}", path.display())]
    Row {
        path: PathBuf,
        line: u64,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: missing file", .0.display())]
    Missing(PathBuf),
    #[error("{what}: sha256 mismatch: expected {expected}, got {actual}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("fetch {what}: {msg}")]
    Fetch { what: String, msg: String },
}

impl DataError {
    pub fn row(path: &Path, line: u64, msg: impl Into<String>) -> Self {
        Self::Row {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    fn csv(path: &Path) -> impl Fn(csv::Error) -> Self + '_ {
        move |e| Self::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        }
    }
}

/// Fill a fresh temporary directory next to `dest` with `fill`, then rename
/// it onto `dest`. A failure part-way leaves `dest` untouched and no debris:
/// the temporary directory is removed on drop.
pub fn atomic_dir<E: From<DataError>>(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(parent)
        .map_err(|e| DataError::io(parent, e))?;
    fill(tmp.path())?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| DataError::io(dest, e))?;
    }
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, dest).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp_path);
        DataError::io(dest, e)
    })?;
    Ok(())
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
