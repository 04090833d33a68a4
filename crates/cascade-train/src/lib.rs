//! Cascade's offline pipeline: featurisation, training loops, evaluation
//! protocols and artifact writing.

pub mod devices;
pub mod eval;
pub mod metrics;
pub mod pipeline;
pub mod plot;
pub mod synth;
pub mod train;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Artifact(#[from] cascade_artifact::ArtifactError),
    #[error(transparent)]
    Data(#[from] cascade_data::DataError),
    #[error(transparent)]
    Model(#[from] cascade_model::ModelError),
    #[error(transparent)]
    Index(#[from] cascade_retrieval::IndexError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl TrainError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
