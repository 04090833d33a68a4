//! Training learns planted structure, is deterministic, and its artifact
//! round-trips and refuses corruption.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use candle_core::Device;
use cascade_artifact::Artifact;
use cascade_data::synthetic::planted;
use cascade_data::Dataset;
use cascade_retrieval::IndexParams;
use cascade_train::pipeline;
use cascade_train::train::TrainConfig;

fn small_cfg() -> TrainConfig {
    TrainConfig {
        tt_epochs: 20,
        tt_batch: 256,
        ranker_epochs: 12,
        ranker_batch: 256,
        bpr_epochs: 30,
        hard_negative_pool: 30,
        history_len: 20,
        progress: false,
        ..Default::default()
    }
}

/// Deterministic pseudo-text vectors (no text model in this test).
fn fake_text(ds: &Dataset) -> Vec<Vec<f32>> {
    (0..ds.items.len())
        .map(|i| {
            (0..8)
                .map(|j| (((i * 31 + j * 17) % 13) as f32 / 13.0) - 0.5)
                .collect()
        })
        .collect()
}

#[test]
fn learns_planted_structure_and_is_deterministic() {
    let ds = planted(240, 300, 6, 30, 1);
    let text = fake_text(&ds);
    let cfg = small_cfg();
    let (report, _) = pipeline::evaluate(&ds, &text, &cfg, 50, true, &Device::Cpu).unwrap();
    let r = &report.ranking;
    let random_recall = 10.0 / 300.0;
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&pipeline::summary(&report)).unwrap()
    );
    assert!(
        r.two_tower.recall_at_10 > 2.0 * r.popularity.recall_at_10,
        "two-tower {:?} vs popularity {:?}",
        r.two_tower,
        r.popularity
    );
    assert!(
        r.two_tower.recall_at_10 > 3.0 * random_recall,
        "two-tower {:?}",
        r.two_tower
    );
    assert!(
        r.cascade.ndcg_at_10 > 2.0 * r.popularity.ndcg_at_10,
        "cascade {:?} vs popularity {:?}",
        r.cascade,
        r.popularity
    );
    assert!(
        r.bpr.recall_at_10 > r.popularity.recall_at_10,
        "bpr {:?}",
        r.bpr
    );

    // Rating head: clearly better than predicting the mean.
    let ratings: Vec<f32> = ds.interactions.iter().map(|x| x.rating).collect();
    let mean = ratings.iter().sum::<f32>() / ratings.len() as f32;
    let std = (ratings.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / ratings.len() as f32)
        .sqrt() as f64;
    let rmse = report.rating.as_ref().unwrap().rmse;
    assert!(rmse < 0.8 * std, "rmse {rmse} vs mean-predictor ~{std}");

    // Same seed, same numbers.
    let (again, _) = pipeline::evaluate(&ds, &text, &cfg, 50, false, &Device::Cpu).unwrap();
    assert_eq!(
        pipeline::summary(&again)["two_tower"],
        pipeline::summary(&report)["two_tower"]
    );
    assert_eq!(
        pipeline::summary(&again)["cascade"],
        pipeline::summary(&report)["cascade"]
    );
}

#[test]
fn artifact_round_trip_and_corruption() {
    let ds = planted(60, 90, 3, 15, 2);
    let text = fake_text(&ds);
    let cfg = TrainConfig {
        tt_epochs: 2,
        ranker_epochs: 2,
        bpr_epochs: 2,
        ..small_cfg()
    };
    let (report, models) = pipeline::evaluate(&ds, &text, &cfg, 20, false, &Device::Cpu).unwrap();
    let root = tempfile::tempdir().unwrap();
    let shipped = pipeline::Shipped::for_models(&cfg, &models, 20);
    let (dir, manifest) = pipeline::write_artifact(
        root.path(),
        &ds,
        &text,
        &models,
        &report,
        &shipped,
        IndexParams::default(),
    )
    .unwrap();
    assert!(manifest.files.contains_key("ranker.safetensors"));
    assert!(manifest.files.contains_key("items.hnsw.graph"));
    assert!(dir.join("loss_curves.svg").exists());
    // no temporary directories left beside the artifact
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);

    // The cross-device harness, CPU against CPU: the plain forward agrees
    // with itself exactly and the factorized serving path within f32 noise;
    // the throughput table covers every batch size.
    let l = cascade_train::devices::LoadedRanker::load(&dir, &Device::Cpu).unwrap();
    let l2 = cascade_train::devices::LoadedRanker::load(&dir, &Device::Cpu).unwrap();
    let agree = cascade_train::devices::ranker_agreement(&l, &l2, 300, 9).unwrap();
    assert_eq!(agree.len(), 4);
    assert_eq!(agree[0].rel_err, 0.0);
    assert_eq!(agree[1].rel_err, 0.0);
    assert!(
        agree.iter().all(|a| a.rel_err < 1e-5 && a.values == 300),
        "{agree:?}"
    );
    let tp = cascade_train::devices::ranker_throughput(&l, &[1, 64, 1024], 10).unwrap();
    assert_eq!(
        tp.iter().map(|t| t.batch).collect::<Vec<_>>(),
        vec![1, 64, 1024]
    );
    assert!(tp
        .iter()
        .all(|t| t.rows_per_s > 0.0 && t.gflops > 0.0 && t.median_ms <= t.p90_ms));

    let a = Artifact::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(a.manifest, manifest);
    assert_eq!(a.item_vectors.len(), 90);
    let flat: Vec<f32> = a.item_vectors.iter().flatten().copied().collect();
    assert_eq!(flat, models.item_vecs);
    let hits = a.index.search(&a.item_vectors[5], 1, None);
    assert_eq!(hits[0].item, 5, "an item is its own nearest neighbour");
    assert_eq!(
        cascade_artifact::manifest::latest_version(root.path()).unwrap(),
        dir
    );

    // Re-indexing with other parameters gives a new, verifiable version.
    let params = IndexParams {
        max_nb_connection: 8,
        ef_construction: 50,
        ..IndexParams::default()
    };
    std::thread::sleep(std::time::Duration::from_millis(1100)); // versions are per second
    let (dir2, m2) = pipeline::reindex(&dir, root.path(), params).unwrap();
    assert_ne!(dir2, dir);
    assert_eq!(
        (m2.hnsw.max_nb_connection, m2.hnsw.ef_construction),
        (8, 50)
    );
    assert_eq!(
        m2.files["ranker.safetensors"],
        manifest.files["ranker.safetensors"]
    );
    let b = Artifact::load(&dir2, &Device::Cpu).unwrap();
    assert_eq!(b.index.search(&b.item_vectors[5], 1, None)[0].item, 5);
    assert_eq!(
        cascade_artifact::manifest::latest_version(root.path()).unwrap(),
        dir2
    );

    // Flip one byte of the ranker weights: refused, naming the file.
    let victim = dir.join("ranker.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let e = Artifact::load(&dir, &Device::Cpu)
        .err()
        .expect("corrupt artifact must not load")
        .to_string();
    assert!(
        e.contains("ranker.safetensors") && e.contains("sha256"),
        "{e}"
    );
    bytes[n - 3] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    Artifact::load(&dir, &Device::Cpu).unwrap();

    // A missing file is refused.
    let graph = dir.join("items.hnsw.graph");
    let saved = std::fs::read(&graph).unwrap();
    std::fs::remove_file(&graph).unwrap();
    let e = Artifact::load(&dir, &Device::Cpu)
        .err()
        .expect("missing file")
        .to_string();
    assert!(
        e.contains("items.hnsw.graph") && e.contains("missing"),
        "{e}"
    );
    std::fs::write(&graph, saved).unwrap();

    // A manifest from another format version is refused.
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    let current = format!(
        "\"format_version\": {}",
        cascade_artifact::manifest::FORMAT_VERSION
    );
    assert!(text.contains(&current), "{text}");
    std::fs::write(&mpath, text.replace(&current, "\"format_version\": 99")).unwrap();
    let e = Artifact::load(&dir, &Device::Cpu)
        .err()
        .expect("wrong version")
        .to_string();
    assert!(e.contains("format_version 99"), "{e}");
    assert!(
        e.contains("rebuild"),
        "the refusal says how to recover: {e}"
    );

    // An artifact written before serving.json and train.json were split
    // (format 3: the whole training config nested in serving.json) still
    // loads, with the same serving settings.
    std::fs::write(&mpath, &text).unwrap();
    let before = Artifact::load(&dir, &Device::Cpu).unwrap().serving;
    assert_eq!(before, shipped.serving);
    let v3 = serde_json::json!({
        "train": serde_json::to_value(&shipped.train).unwrap(),
        "cascade_weights": shipped.serving.cascade_weights,
        "candidates": shipped.serving.candidates,
    });
    std::fs::write(dir.join("serving.json"), v3.to_string()).unwrap();
    std::fs::remove_file(dir.join("train.json")).unwrap();
    let mut old = manifest.clone();
    old.format_version = 3;
    old.seal(&dir).unwrap();
    let a3 = Artifact::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(a3.manifest.format_version, 3);
    assert_eq!(a3.serving, before);
    assert_eq!(a3.item_vectors, a.item_vectors);
}

#[test]
fn trains_without_user_features_genres_or_years() {
    // A bare catalogue: no users.csv columns, no genres, no years.
    let mut ds = planted(40, 60, 3, 12, 3);
    ds.user_feature_names.clear();
    for u in &mut ds.users {
        u.features.clear();
    }
    for it in &mut ds.items {
        it.genres.clear();
        it.year = None;
    }
    let text = fake_text(&ds);
    let cfg = TrainConfig {
        tt_epochs: 3,
        ranker_epochs: 3,
        bpr_epochs: 3,
        ..small_cfg()
    };
    let (report, models) = pipeline::evaluate(&ds, &text, &cfg, 20, true, &Device::Cpu).unwrap();
    assert_eq!(models.space.dims.user_cat_vocab.len(), 0);
    assert_eq!(models.space.dims.num_genres, 0);
    assert!(report.rating.unwrap().rmse.is_finite());
    assert!(report.ranking.two_tower.recall_at_10.is_finite());
}

#[test]
fn the_artifact_is_refit_on_every_interaction_with_the_chosen_epochs() {
    let ds = planted(60, 90, 3, 15, 4);
    let text = fake_text(&ds);
    let cfg = TrainConfig {
        tt_epochs: 6,
        ranker_epochs: 5,
        bpr_epochs: 2,
        patience: 2,
        ..small_cfg()
    };
    let root = tempfile::tempdir().unwrap();
    let opts = pipeline::RunOptions {
        candidates: 20,
        with_rating: false,
        index: IndexParams::default(),
    };
    let (report, dir, manifest) =
        pipeline::train_artifact(root.path(), &ds, &text, &cfg, &opts, &Device::Cpu).unwrap();
    // The evaluation models stopped where validation said; the refit runs
    // exactly those epochs (best epoch + 1) on all interactions.
    let curves = &report.ranking.curves;
    let served = &manifest.metrics["served_models"];
    assert_eq!(served["data"], "all interactions");
    assert_eq!(served["interactions"], ds.interactions.len());
    assert_eq!(served["validation"], 0);
    assert_eq!(served["two_tower_epochs"], curves[0].best_epoch + 1);
    assert_eq!(served["ranker_epochs"], curves[1].best_epoch + 1);
    assert!(report.refit_seconds > 0.0);

    // Seen sets, histories and popularity cover every interaction.
    let a = Artifact::load(&dir, &Device::Cpu).unwrap();
    let pop: u32 = a.space.item_popularity.iter().sum();
    assert_eq!(pop as usize, ds.interactions.len());
    let mut pairs = std::collections::HashSet::new();
    for x in &ds.interactions {
        pairs.insert((x.user, x.item));
        assert!(
            a.space.user_seen[x.user as usize].contains(&x.item),
            "user {} item {} missing from the served seen set",
            x.user,
            x.item
        );
    }
    let seen: usize = a.space.user_seen.iter().map(Vec::len).sum();
    assert_eq!(seen, pairs.len());
    // The training record holds the refit's epochs, the serving config the
    // evaluation's cascade weights.
    let train: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
    assert_eq!(train.tt_epochs, curves[0].best_epoch + 1);
    assert_eq!(a.serving.cascade_weights, report.ranking.cascade_weights);
}

/// A small planted dataset with every interaction in training and no
/// validation rows: what a refit trains on.
struct RefitFixture {
    space: cascade_artifact::features::FeatureSpace,
    tables: cascade_artifact::features::Tables,
    pairs: Vec<(u32, u32)>,
    empty: Vec<std::collections::HashSet<u32>>,
}

impl RefitFixture {
    fn new(users: usize, items: usize) -> Self {
        use cascade_artifact::features::{FeatureSpace, Tables};
        let ds = planted(users, items, 2, 10, 6);
        let text = fake_text(&ds);
        let all: Vec<usize> = (0..ds.interactions.len()).collect();
        let space = FeatureSpace::build(&ds, &all, 8, 20);
        let tables = Tables::build(&space, &ds.items, &text, &Device::Cpu).unwrap();
        let pairs = ds.interactions.iter().map(|x| (x.user, x.item)).collect();
        let empty = vec![std::collections::HashSet::new(); ds.users.len()];
        Self {
            space,
            tables,
            pairs,
            empty,
        }
    }

    /// Train the two-tower for `epochs` under `schedule`.
    fn train(
        &self,
        epochs: usize,
        schedule: cascade_train::train::Schedule,
    ) -> Result<cascade_train::train::TrainedTwoTower, cascade_train::TrainError> {
        let holdout = cascade_train::train::Holdout {
            seen: &self.empty,
            relevant: &self.empty,
        };
        let cfg = TrainConfig {
            tt_epochs: epochs,
            patience: 1,
            ..small_cfg()
        };
        cascade_train::train::train_two_tower(
            &self.space,
            &self.tables,
            &self.pairs,
            &holdout,
            &cfg,
            schedule,
            &Device::Cpu,
        )
    }

    /// The user tower's outputs for every user.
    fn users(&self, t: &cascade_train::train::TrainedTwoTower) -> candle_core::Tensor {
        cascade_train::train::tower_embeddings(&t.model, &self.tables, &Device::Cpu)
            .unwrap()
            .0
    }
}

const EARLY: cascade_train::train::Schedule = cascade_train::train::Schedule::EarlyStop {
    patience: 1,
    publish: None,
};

/// Max absolute difference between two tensors.
fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn without_validation_every_epoch_runs_and_the_last_is_kept() {
    let f = RefitFixture::new(30, 40);
    let t = f.train(4, EARLY).unwrap();
    assert_eq!(
        t.curve.train_loss.len(),
        4,
        "patience must not stop a refit"
    );
    assert_eq!(t.curve.best_epoch, 3);
    assert!(t.curve.valid_metric.is_empty());
    // The weights are the last epoch's, not epoch 0's: a rerun of four
    // epochs reproduces them exactly, a one-epoch run from the same seed
    // (epoch 0's weights) does not.
    let u = f.users(&t);
    assert_eq!(max_diff(&u, &f.users(&f.train(4, EARLY).unwrap())), 0.0);
    assert!(
        max_diff(&u, &f.users(&f.train(1, EARLY).unwrap())) > 1e-3,
        "four epochs kept epoch 0's weights"
    );
}

#[test]
fn a_refit_following_a_choice_keeps_exactly_that_epochs_weights() {
    use cascade_train::train::{EpochChoice, Schedule};
    let f = RefitFixture::new(30, 40);
    // The choice (epoch 2) arrives from another thread while the follower
    // trains, after a "best so far" of epoch 1, as an evaluation lane sends it.
    let choice = EpochChoice::default();
    let followed = std::thread::scope(|s| {
        s.spawn(|| {
            choice.best_so_far(1);
            std::thread::sleep(std::time::Duration::from_millis(50));
            choice.choose(2);
        });
        f.train(6, Schedule::Follow(&choice)).unwrap()
    });
    assert_eq!(followed.curve.best_epoch, 2);
    assert_eq!(followed.curve.train_loss.len(), 3, "the shipped epochs");
    let u = f.users(&followed);
    // Same weights as a plain three-epoch run, not the two- or four-epoch one.
    let plain = |epochs| f.users(&f.train(epochs, EARLY).unwrap());
    assert_eq!(max_diff(&u, &plain(3)), 0.0);
    assert!(max_diff(&u, &plain(2)) > 1e-4);
    assert!(max_diff(&u, &plain(4)) > 1e-4);
}

#[test]
fn a_refit_whose_evaluation_failed_stops_with_an_error() {
    use cascade_train::train::{EpochChoice, Schedule};
    let f = RefitFixture::new(20, 30);
    let choice = EpochChoice::default();
    choice.cancel();
    let err = f
        .train(3, Schedule::Follow(&choice))
        .err()
        .expect("a cancelled choice must not leave the refit waiting");
    assert!(err.to_string().contains("stopped before choosing"), "{err}");
}
