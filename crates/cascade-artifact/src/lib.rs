//! The model artifact: what training writes and serving reads.
//!
//! Both sides depend on this crate and on nothing of each other: the format
//! (file names, [`manifest::Manifest`], [`ServingConfig`]), the loader
//! ([`Artifact::load`]), the feature space the models were trained on
//! ([`features::FeatureSpace`], [`features::Tables`]) and the cascade's final
//! ordering ([`CascadeWeights::score`]) live here once, so the evaluation
//! that chose the weights and the engine that serves them cannot drift apart.

pub mod features;
pub mod manifest;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use cascade_data::Item;
use cascade_model::nn::{Ranker, RankerConfig, TwoTower, TwoTowerConfig};
use cascade_retrieval::{IndexParams, ItemIndex};
use serde::{Deserialize, Serialize};

use crate::features::{FeatureSpace, Tables};
use crate::manifest::Manifest;

pub use manifest::{latest_version, FORMAT_VERSION, MANIFEST};

/// Item and user two-tower vectors and item text embeddings.
pub const VECTORS_FILE: &str = "vectors.safetensors";
pub const FEATURES_FILE: &str = "features.json";
pub const SERVING_FILE: &str = "serving.json";
/// The full training configuration, for provenance only: serving never reads it.
pub const TRAIN_FILE: &str = "train.json";
pub const TWO_TOWER_FILE: &str = "two_tower.safetensors";
pub const RANKER_FILE: &str = "ranker.safetensors";
pub const ITEMS_FILE: &str = "items.csv";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Data(#[from] cascade_data::DataError),
    #[error(transparent)]
    Model(#[from] cascade_model::ModelError),
    #[error(transparent)]
    Index(#[from] cascade_retrieval::IndexError),
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

impl ArtifactError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How the cascade orders candidates:
/// `engage + rating · (predicted rating − mean) + retrieval · two-tower score`.
/// Both weights are chosen on validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CascadeWeights {
    pub rating: f32,
    pub retrieval: f32,
}

impl CascadeWeights {
    /// The final score of one candidate. The evaluation that chose the
    /// weights and the engine that serves them both call this.
    #[inline]
    pub fn score(&self, engage: f32, rating: f32, mean_rating: f32, retrieval: f32) -> f32 {
        engage + self.rating * (rating - mean_rating) + self.retrieval * retrieval
    }
}

/// What serving needs besides the weights: the two models' shapes, the
/// cascade's weights and its default candidate count. Every field has a
/// default so that a field added later leaves older artifacts loadable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServingConfig {
    pub two_tower: TwoTowerConfig,
    pub ranker: RankerConfig,
    pub cascade_weights: CascadeWeights,
    /// Retrieved candidates the ranker reorders when a request names none.
    pub candidates: usize,
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            two_tower: TwoTowerConfig::default(),
            ranker: RankerConfig::default(),
            cascade_weights: CascadeWeights::default(),
            candidates: 200,
        }
    }
}

impl ServingConfig {
    /// Parse `serving.json` as written by an artifact of `format_version`.
    /// Format 3 nested the model shapes inside the whole training
    /// configuration (`train.two_tower`, `train.ranker`); they are lifted out.
    pub fn parse(text: &str, format_version: u32) -> Result<Self, serde_json::Error> {
        if format_version >= 4 {
            return serde_json::from_str(text);
        }
        #[derive(Deserialize)]
        struct V3 {
            train: V3Train,
            cascade_weights: CascadeWeights,
            candidates: usize,
        }
        #[derive(Deserialize)]
        struct V3Train {
            two_tower: TwoTowerConfig,
            ranker: RankerConfig,
        }
        let v: V3 = serde_json::from_str(text)?;
        Ok(Self {
            two_tower: v.train.two_tower,
            ranker: v.train.ranker,
            cascade_weights: v.cascade_weights,
            candidates: v.candidates,
        })
    }
}

/// A verified artifact, loaded for one device.
pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub space: FeatureSpace,
    pub serving: ServingConfig,
    pub two_tower: TwoTower,
    pub ranker: Ranker,
    /// The catalogue in index order (`items.csv`).
    pub items: Vec<Item>,
    /// Item two-tower vectors in index order (what the HNSW index holds).
    pub item_vectors: Vec<Vec<f32>>,
    /// Item and user feature tensors on the device the artifact was loaded for.
    pub tables: Tables,
    pub index: ItemIndex,
}

impl Artifact {
    /// Verify checksums and dimensions, then load every part, each file read
    /// once. Any mismatch is an error.
    pub fn load(dir: &Path, dev: &Device) -> Result<Self, ArtifactError> {
        let manifest = Manifest::verify(dir)?;
        let corrupt = |msg: String| ArtifactError::Corrupt {
            path: dir.to_path_buf(),
            msg,
        };
        // Every part the loader needs must be listed (and therefore checksummed).
        let required = [
            FEATURES_FILE,
            SERVING_FILE,
            TWO_TOWER_FILE,
            RANKER_FILE,
            VECTORS_FILE,
            ITEMS_FILE,
            "items.hnsw.graph",
            "items.hnsw.data",
        ];
        if let Some(missing) = required.iter().find(|f| !manifest.files.contains_key(**f)) {
            return Err(corrupt(format!(
                "manifest does not list {missing} (an artifact from another build?)"
            )));
        }
        let read = |name: &str| -> Result<String, ArtifactError> {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| ArtifactError::io(&dir.join(name), e))
        };
        let space: FeatureSpace = serde_json::from_str(&read(FEATURES_FILE)?)
            .map_err(|e| corrupt(format!("{FEATURES_FILE}: {e}")))?;
        let serving = ServingConfig::parse(&read(SERVING_FILE)?, manifest.format_version)
            .map_err(|e| corrupt(format!("{SERVING_FILE}: {e}")))?;
        if space.dims.num_items != manifest.num_items
            || space.dims.num_users != manifest.num_users
            || serving.two_tower.dim != manifest.embedding_dim
            || space.dims.text_dim != manifest.text_dim
        {
            return Err(corrupt(format!(
                "{FEATURES_FILE} / {SERVING_FILE} dimensions disagree with {MANIFEST}"
            )));
        }
        // Read, not memory-mapped: mapping is `unsafe`, and every tensor is
        // copied out of the file anyway.
        let load_vb = |name: &str| -> Result<VarBuilder<'static>, ArtifactError> {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| ArtifactError::io(&path, e))?;
            Ok(VarBuilder::from_buffered_safetensors(
                bytes,
                DType::F32,
                dev,
            )?)
        };
        let two_tower = TwoTower::new(load_vb(TWO_TOWER_FILE)?, &space.dims, &serving.two_tower)
            .map_err(|e| corrupt(format!("{TWO_TOWER_FILE}: {e}")))?;
        let ranker = Ranker::new(
            load_vb(RANKER_FILE)?,
            &space.dims,
            &serving.ranker,
            space.global_mean_rating,
        )
        .map_err(|e| corrupt(format!("{RANKER_FILE}: {e}")))?;
        let tensors = candle_core::safetensors::load(dir.join(VECTORS_FILE), &Device::Cpu)?;
        let matrix = |name: &str, cols: usize| -> Result<Vec<Vec<f32>>, ArtifactError> {
            let t: &Tensor = tensors
                .get(name)
                .ok_or_else(|| corrupt(format!("{VECTORS_FILE} lacks `{name}`")))?;
            if t.dims() != [manifest.num_items, cols] {
                return Err(corrupt(format!(
                    "`{name}` in {VECTORS_FILE} has shape {:?}, {MANIFEST} says [{}, {cols}]",
                    t.dims(),
                    manifest.num_items,
                )));
            }
            Ok(t.to_vec2()?)
        };
        let item_vectors = matrix("item_two_tower", manifest.embedding_dim)?;
        let item_text = matrix("item_text", manifest.text_dim)?;
        let (items, _) = cascade_data::format::read_items(&dir.join(ITEMS_FILE))?;
        if items.len() != manifest.num_items {
            return Err(corrupt(format!(
                "{ITEMS_FILE} lists {} items, {MANIFEST} says {}",
                items.len(),
                manifest.num_items
            )));
        }
        let tables = Tables::build(&space, &items, &item_text, dev)?;
        let params = IndexParams {
            max_nb_connection: manifest.hnsw.max_nb_connection,
            ef_construction: manifest.hnsw.ef_construction,
            max_layer: manifest.hnsw.max_layer,
            ef_search: manifest.hnsw.ef_search,
            exact_below: manifest.hnsw.exact_below,
        };
        let mut index = ItemIndex::load(dir, params)?;
        if index.len != manifest.num_items || index.dim != manifest.embedding_dim {
            return Err(corrupt(format!(
                "HNSW holds {} vectors of dim {}, {MANIFEST} says {} of {}",
                index.len, index.dim, manifest.num_items, manifest.embedding_dim
            )));
        }
        index.choose_path(&item_vectors, None)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            space,
            serving,
            two_tower,
            ranker,
            items,
            item_vectors,
            tables,
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_engagement_plus_weighted_rating_and_retrieval() {
        let w = CascadeWeights {
            rating: 0.5,
            retrieval: 10.0,
        };
        // 1.0 + 0.5 * (4.5 - 3.5) + 10 * 0.2 = 3.5
        assert!((w.score(1.0, 4.5, 3.5, 0.2) - 3.5).abs() < 1e-6);
        assert_eq!(CascadeWeights::default().score(-0.25, 5.0, 1.0, 0.9), -0.25);
    }

    #[test]
    fn a_format_3_serving_config_is_lifted_out_of_the_training_config() {
        let v3 = r#"{"train": {"seed": 1, "tt_epochs": 7, "progress": false,
            "two_tower": {"dim": 32, "hidden": 48, "temperature": 0.1},
            "ranker": {"field_dim": 8, "hidden": [16, 8]}},
            "cascade_weights": {"rating": 0.25, "retrieval": 5.0}, "candidates": 50}"#;
        let s = ServingConfig::parse(v3, 3).unwrap();
        assert_eq!(s.two_tower.dim, 32);
        assert_eq!(s.two_tower.hidden, 48);
        assert_eq!(s.ranker.hidden, [16, 8]);
        assert_eq!(s.cascade_weights.retrieval, 5.0);
        assert_eq!(s.candidates, 50);
        // Read as format 4 the nested shapes would be missed and silently
        // defaulted: the manifest's version, not the text, decides the layout.
        let as4 = ServingConfig::parse(v3, 4).unwrap();
        assert_eq!(as4.two_tower, TwoTowerConfig::default());
        assert_ne!(as4.two_tower, s.two_tower);
    }

    #[test]
    fn a_format_4_serving_config_missing_a_field_takes_its_default() {
        let s = ServingConfig::parse(r#"{"candidates": 300}"#, 4).unwrap();
        assert_eq!(s.candidates, 300);
        assert_eq!(s.ranker, RankerConfig::default());
        // Unknown fields (from a newer writer) are ignored, not fatal.
        let s = ServingConfig::parse(r#"{"candidates": 9, "new_knob": true}"#, 4).unwrap();
        assert_eq!(s.candidates, 9);
    }
}
