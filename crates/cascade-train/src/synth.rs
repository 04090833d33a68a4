//! A synthetic catalogue at scale: a planted dataset of any size, clustered
//! item vectors, seeded (untrained) tower and ranker weights, and a real HNSW
//! index, written as an ordinary artifact. The server loads it like any
//! other, so retrieval and ranking are exercised at realistic catalogue sizes
//! without training on data we do not have.
//!
//! Item vectors are drawn around `clusters` random unit centres (the cluster
//! of item `i` is `i % clusters`, as in the planted interactions), which is
//! what gives HNSW a realistic, non-uniform geometry. The served user tower
//! is the seeded, untrained one: this artifact is for scale and latency, not
//! quality.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cascade_artifact::manifest::Manifest;
use cascade_data::synthetic::planted;
use cascade_model::nn::{seeded_init, Ranker, TwoTower};
use cascade_retrieval::IndexParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::eval::{Models, RankingReport};
use crate::pipeline::{write_artifact, EvalReport, Shipped};
use crate::train::{TrainConfig, TrainedRanker, TrainedTwoTower};
use crate::TrainError;
use cascade_artifact::features::{FeatureSpace, Tables};
use cascade_artifact::CascadeWeights;

#[derive(Debug, Clone, Serialize)]
pub struct SynthConfig {
    pub items: usize,
    pub users: usize,
    /// Interactions per user (their seen sets and histories).
    pub per_user: usize,
    pub clusters: usize,
    /// Two-tower embedding width.
    pub dim: usize,
    /// Width of the stand-in text embeddings (MiniLM's 384 would dominate
    /// memory at this scale without exercising anything new).
    pub text_dim: usize,
    pub candidates: usize,
    pub seed: u64,
    pub index: IndexParams,
}

#[derive(Debug, Clone, Serialize)]
pub struct SynthReport {
    pub config: SynthConfig,
    pub model_version: String,
    pub generate_seconds: f64,
    /// Index build (and its recall measurement) plus writing the artifact.
    pub write_seconds: f64,
    pub hnsw_build_seconds: f64,
    pub hnsw_recall_at_100: f64,
    pub artifact_bytes: u64,
}

fn unit(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// `n` unit vectors of width `dim`, row `i` near centre `i % clusters`.
fn clustered(n: usize, dim: usize, clusters: usize, spread: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let gauss = |rng: &mut ChaCha8Rng| {
        let (a, b): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f32::consts::PI * b).cos()
    };
    let centres: Vec<Vec<f32>> = (0..clusters.max(1))
        .map(|_| {
            let mut c: Vec<f32> = (0..dim).map(|_| gauss(rng)).collect();
            unit(&mut c);
            c
        })
        .collect();
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = &centres[i % centres.len()];
        let mut v: Vec<f32> = c
            .iter()
            .map(|x| x + spread * gauss(rng) / (dim as f32).sqrt())
            .collect();
        unit(&mut v);
        out.extend(v);
    }
    out
}

/// Generate and write a synthetic artifact version under `root`.
pub fn synth_artifact(
    root: &Path,
    cfg: &SynthConfig,
) -> Result<(PathBuf, Manifest, SynthReport), TrainError> {
    let t0 = Instant::now();
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut ds = planted(cfg.users, cfg.items, cfg.clusters, cfg.per_user, cfg.seed);
    ds.checksum = format!("synth{:03}", cfg.seed % 1000);
    for it in &mut ds.items {
        it.title = format!("Synthetic {}", it.id);
    }
    let text_flat = clustered(cfg.items, cfg.text_dim, cfg.clusters, 0.8, &mut rng);
    let text: Vec<Vec<f32>> = text_flat
        .chunks(cfg.text_dim)
        .map(<[f32]>::to_vec)
        .collect();
    let train = TrainConfig {
        seed: cfg.seed,
        progress: false,
        ..Default::default()
    };
    let mut train = train;
    train.two_tower.dim = cfg.dim;
    let all: Vec<usize> = (0..ds.interactions.len()).collect();
    let space = FeatureSpace::build(&ds, &all, cfg.text_dim, train.history_len);
    let tables = Tables::build(&space, &ds.items, &text, &dev)?;

    let tt_vars = VarMap::new();
    let two_tower = TwoTower::new(
        VarBuilder::from_varmap(&tt_vars, DType::F32, &dev),
        &space.dims,
        &train.two_tower,
    )?;
    seeded_init(&tt_vars, cfg.seed)?;
    let rk_vars = VarMap::new();
    let ranker = Ranker::new(
        VarBuilder::from_varmap(&rk_vars, DType::F32, &dev),
        &space.dims,
        &train.ranker,
        space.global_mean_rating,
    )?;
    seeded_init(&rk_vars, cfg.seed ^ 1)?;

    let item_vecs = clustered(cfg.items, cfg.dim, cfg.clusters, 0.6, &mut rng);
    // The stored user vectors (used to measure HNSW recall, as for a trained
    // artifact) are each user's normalised mean of their items' vectors:
    // what a trained user tower approximates. The seeded user tower that
    // serves requests is untrained, so its queries are arbitrary directions
    // (harder for HNSW: lower recall, longer walks than real traffic).
    let d = cfg.dim;
    let mut user_vecs = vec![0f32; space.dims.num_users * d];
    for x in &ds.interactions {
        let (u, i) = (x.user as usize, x.item as usize);
        for j in 0..d {
            user_vecs[u * d + j] += item_vecs[i * d + j];
        }
    }
    user_vecs.chunks_mut(d).for_each(unit);
    let weights = CascadeWeights {
        rating: 0.25,
        retrieval: 1.0,
    };
    let models = Models {
        trained_on: crate::eval::TrainedOn {
            interactions: ds.interactions.len(),
            data: "synthetic".into(),
            ..Default::default()
        },
        space,
        tables,
        two_tower: TrainedTwoTower {
            varmap: tt_vars,
            model: two_tower,
            curve: Default::default(),
        },
        ranker: TrainedRanker {
            varmap: rk_vars,
            model: ranker,
            curve: Default::default(),
        },
        user_vecs,
        item_vecs,
        cascade_weights: weights,
    };
    // Nothing was evaluated: every metric is zero and `users_evaluated` says so.
    let report = EvalReport {
        dataset_checksum: ds.checksum.clone(),
        num_users: ds.users.len(),
        num_items: ds.items.len(),
        num_interactions: ds.interactions.len(),
        seed: cfg.seed,
        ranking: RankingReport {
            popularity: Default::default(),
            bpr: Default::default(),
            two_tower: Default::default(),
            cascade: Default::default(),
            cascade_weights: weights,
            cascade_candidates: cfg.candidates,
            users_evaluated: 0,
            curves: Vec::new(),
        },
        rating: None,
        seconds: 0.0,
        refit_seconds: 0.0,
    };
    let shipped = Shipped::for_models(&train, &models, cfg.candidates);
    let generate_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (dir, manifest) = write_artifact(root, &ds, &text, &models, &report, &shipped, cfg.index)?;
    let write_seconds = t1.elapsed().as_secs_f64();
    let artifact_bytes = std::fs::read_dir(&dir)
        .map_err(|e| TrainError::io(&dir, e))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let report = SynthReport {
        config: cfg.clone(),
        model_version: manifest.model_version.clone(),
        generate_seconds,
        write_seconds,
        hnsw_build_seconds: manifest.metrics["hnsw_build_seconds"]
            .as_f64()
            .unwrap_or(f64::NAN),
        hnsw_recall_at_100: manifest.hnsw.recall_at_100,
        artifact_bytes,
    };
    Ok((dir, manifest, report))
}
