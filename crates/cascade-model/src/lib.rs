//! Candle models for Cascade (the artifact they are shipped in is `cascade-artifact`).

pub mod encoder;
pub mod nn;
pub mod ops;
pub mod parity;
pub mod serving;

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

/// The device as users write it: `cpu` or `cuda:N` (what `--device` accepts,
/// and what GetModelInfo and logs report).
pub fn device_name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_round_trip_on_cpu() {
        let d = select_device("cpu").unwrap();
        assert_eq!(device_name(&d), "cpu");
        assert!(select_device("tpu").is_err());
        assert!(select_device("cuda:x").is_err());
    }
}
