//! Candle models for Cascade and the artifact manifest they are shipped in.

pub mod artifact;
pub mod encoder;
pub mod nn;
pub mod ops;

use std::path::{Path, PathBuf};

pub use candle_core::Device;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt artifact: {}: {msg}", path.display())]
    Corrupt { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Parse `cpu`, `cuda` or `cuda:N`. Without the `cuda` feature, or when no GPU
/// is usable, CUDA requests fall back to the CPU with a warning.
pub fn select_device(spec: &str) -> Result<Device, ModelError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()
                .map_err(|_| ModelError::Invalid(format!("bad device {s:?}: expected cuda:N")))?
                .unwrap_or(0);
            match Device::new_cuda(ordinal) {
                Ok(d) => Ok(d),
                Err(e) => {
                    tracing::warn!("device {s} unusable ({e}); falling back to CPU");
                    Ok(Device::Cpu)
                }
            }
        }
        other => Err(ModelError::Invalid(format!(
            "unknown device {other:?}: expected cpu, cuda or cuda:N"
        ))),
    }
}
