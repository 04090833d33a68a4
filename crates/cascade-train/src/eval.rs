//! The two evaluation protocols.
//!
//! * Ranking: per-user random 80/10/10 split; models train on 80 %, stop early
//!   and tune on 10 %, report on 10 % with full ranking over every item the
//!   user has not interacted with in train or validation (RecBole's protocol).
//! * Rating: random 90/10 split of all ratings; the ranker's rating head is
//!   scored by RMSE/MAE on the 10 % (5 % of the 90 % is held back for early stopping).

use std::collections::HashSet;

use candle_core::Device;
use cascade_data::split::{per_user_split, random_split};
use cascade_data::Dataset;
use serde::{Deserialize, Serialize};

use crate::metrics::{self, top_indices, TopK};
use crate::train::{
    self, Curve, EpochChoice, Holdout, RankerData, Schedule, TrainConfig, TrainedRanker,
    TrainedTwoTower,
};
use crate::TrainError;
use cascade_artifact::features::{FeatureSpace, Tables};
use cascade_artifact::CascadeWeights;

pub const K: usize = 10;

/// A retrieved candidate: (item, engagement logit, predicted rating, two-tower score).
type Candidate = (u32, f32, f32, f32);

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
    pub hit_at_10: f64,
}

impl From<TopK> for Ranking {
    fn from(t: TopK) -> Self {
        Self {
            recall_at_10: t.recall,
            ndcg_at_10: t.ndcg,
            hit_at_10: t.hit,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankingReport {
    pub popularity: Ranking,
    pub bpr: Ranking,
    pub two_tower: Ranking,
    pub cascade: Ranking,
    /// The cascade's ordering weights, chosen on validation.
    pub cascade_weights: CascadeWeights,
    pub cascade_candidates: usize,
    pub users_evaluated: usize,
    pub curves: Vec<Curve>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatingReport {
    pub rmse: f64,
    pub mae: f64,
    pub test_ratings: usize,
    pub curves: Vec<Curve>,
}

/// What a set of models was trained on; the artifact's manifest records it
/// (`metrics.served_models`) beside the evaluation numbers, which belong to
/// the models trained on the evaluation split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainedOn {
    /// Interactions the models were fitted on.
    pub interactions: usize,
    /// Interactions held out for early stopping (0 for a refit on all data).
    pub validation: usize,
    /// Epochs the two-tower and the ranker ran (a refit runs the epochs the
    /// evaluation run chose on validation).
    pub two_tower_epochs: usize,
    pub ranker_epochs: usize,
    /// `"evaluation split"`, `"all interactions"` or `"synthetic"`.
    pub data: String,
}

/// The models of one protocol run, kept so `cascade train` can ship them.
pub struct Models {
    pub trained_on: TrainedOn,
    pub space: FeatureSpace,
    pub tables: Tables,
    pub two_tower: TrainedTwoTower,
    pub ranker: TrainedRanker,
    pub user_vecs: Vec<f32>,
    pub item_vecs: Vec<f32>,
    pub cascade_weights: CascadeWeights,
}

fn per_user_sets(ds: &Dataset, idx: &[usize]) -> Vec<HashSet<u32>> {
    let mut v = vec![HashSet::new(); ds.users.len()];
    for &i in idx {
        let x = &ds.interactions[i];
        v[x.user as usize].insert(x.item);
    }
    v
}

fn triples(ds: &Dataset, idx: &[usize]) -> Vec<(u32, u32, f32)> {
    idx.iter()
        .map(|&i| {
            (
                ds.interactions[i].user,
                ds.interactions[i].item,
                ds.interactions[i].rating,
            )
        })
        .collect()
}

/// Mean top-10 metrics when each user's items are ordered by `score_row(u)`.
fn evaluate(
    relevant: &[HashSet<u32>],
    seen: &[HashSet<u32>],
    mut ranked: impl FnMut(usize, &HashSet<u32>) -> Vec<u32>,
) -> Ranking {
    let mut per_user = Vec::new();
    for (u, rel) in relevant.iter().enumerate() {
        if rel.is_empty() {
            continue;
        }
        per_user.push(metrics::top_k(&ranked(u, &seen[u]), rel, K));
    }
    metrics::mean(&per_user).into()
}

fn masked_top(scores: &[f32], seen: &HashSet<u32>, k: usize) -> Vec<u32> {
    let mut row = scores.to_vec();
    for &s in seen {
        row[s as usize] = f32::NEG_INFINITY;
    }
    top_indices(&row, k)
}

/// The epochs an evaluation run chose for each model, which the refit of the
/// shipped models follows (see [`EpochChoice`]).
#[derive(Debug, Default)]
pub struct Chosen {
    pub two_tower: EpochChoice,
    pub ranker: EpochChoice,
}

impl Chosen {
    /// The evaluation failed: the refit stops instead of waiting.
    pub fn cancel(&self) {
        self.two_tower.cancel();
        self.ranker.cancel();
    }
}

/// How [`train_models`] picks each model's epochs.
#[derive(Debug, Clone, Copy)]
pub enum Epochs<'a> {
    /// Early stopping on the validation rows; the choices go to `Chosen` if given.
    Validate(Option<&'a Chosen>),
    /// A refit: keep the epochs the evaluation chose.
    Follow(&'a Chosen),
}

impl<'a> Epochs<'a> {
    fn schedule(self, cfg: &TrainConfig, pick: fn(&Chosen) -> &EpochChoice) -> Schedule<'a> {
        match self {
            Epochs::Validate(publish) => Schedule::EarlyStop {
                patience: cfg.patience,
                publish: publish.map(pick),
            },
            Epochs::Follow(c) => Schedule::Follow(pick(c)),
        }
    }
}

/// Train the two-tower and the ranker on `train` (early stopping on `valid`,
/// or the evaluation's epochs for a refit).
pub fn train_models(
    ds: &Dataset,
    text: &[Vec<f32>],
    train_idx: &[usize],
    valid_idx: &[usize],
    cfg: &TrainConfig,
    epochs: Epochs,
    dev: &Device,
) -> Result<Models, TrainError> {
    let text_dim = text.first().map(Vec::len).unwrap_or(0);
    let space = FeatureSpace::build(ds, train_idx, text_dim, cfg.history_len);
    let tables = Tables::build(&space, &ds.items, text, dev)?;
    let seen = per_user_sets(ds, train_idx);
    let valid_rel = per_user_sets(ds, valid_idx);
    let valid_triples = triples(ds, valid_idx);
    let holdout = Holdout {
        seen: &seen,
        relevant: &valid_rel,
    };
    let train_pairs: Vec<(u32, u32)> = train_idx
        .iter()
        .map(|&i| (ds.interactions[i].user, ds.interactions[i].item))
        .collect();
    let two_tower = train::train_two_tower(
        &space,
        &tables,
        &train_pairs,
        &holdout,
        cfg,
        epochs.schedule(cfg, |c| &c.two_tower),
        dev,
    )?;
    let (u, v) = train::tower_embeddings(&two_tower.model, &tables, dev)?;
    let user_vecs: Vec<f32> = u.flatten_all()?.to_vec1()?;
    let item_vecs: Vec<f32> = v.flatten_all()?.to_vec1()?;
    let scores: Vec<f32> = u.matmul(&v.t()?)?.flatten_all()?.to_vec1()?;
    let n_items = space.dims.num_items;
    let hard_pool: Vec<Vec<u32>> = (0..space.dims.num_users)
        .map(|uix| {
            masked_top(
                &scores[uix * n_items..(uix + 1) * n_items],
                &seen[uix],
                cfg.hard_negative_pool,
            )
        })
        .collect();
    let train_triples = triples(ds, train_idx);
    let data = RankerData {
        train: &train_triples,
        seen: &seen,
        hard_pool: &hard_pool,
        user_vecs: &user_vecs,
        item_vecs: &item_vecs,
        dim: cfg.two_tower.dim,
    };
    let ranker = train::train_ranker(
        &space,
        &tables,
        &data,
        &valid_triples,
        cfg,
        epochs.schedule(cfg, |c| &c.ranker),
        dev,
    )?;
    let trained_on = TrainedOn {
        interactions: train_idx.len(),
        validation: valid_idx.len(),
        two_tower_epochs: two_tower.curve.train_loss.len(),
        ranker_epochs: ranker.curve.train_loss.len(),
        data: if valid_idx.is_empty() {
            "all interactions"
        } else {
            "evaluation split"
        }
        .into(),
    };
    Ok(Models {
        trained_on,
        space,
        tables,
        two_tower,
        ranker,
        user_vecs,
        item_vecs,
        cascade_weights: CascadeWeights::default(),
    })
}

/// Refit the shipped models on every interaction of `ds`: the same
/// training, no validation, keeping the epochs the evaluation run chose on
/// validation (its best epochs, read from `chosen` while it runs beside this
/// one). The seen sets, histories and popularity of the returned feature
/// space cover all interactions too. The caller sets the cascade weights.
pub fn refit_all(
    ds: &Dataset,
    text: &[Vec<f32>],
    cfg: &TrainConfig,
    chosen: &Chosen,
    dev: &Device,
) -> Result<Models, TrainError> {
    let all: Vec<usize> = (0..ds.interactions.len()).collect();
    train_models(ds, text, &all, &[], cfg, Epochs::Follow(chosen), dev)
}

/// The training config a refit ran with: the evaluation's epochs.
pub fn refit_config(cfg: &TrainConfig, refit: &Models) -> TrainConfig {
    TrainConfig {
        tt_epochs: refit.trained_on.two_tower_epochs,
        ranker_epochs: refit.trained_on.ranker_epochs,
        ..cfg.clone()
    }
}

impl Models {
    fn data<'a>(&'a self, seen: &'a [HashSet<u32>], dim: usize) -> RankerData<'a> {
        RankerData {
            train: &[],
            seen,
            hard_pool: &[],
            user_vecs: &self.user_vecs,
            item_vecs: &self.item_vecs,
            dim,
        }
    }

    /// Two-tower scores of every item for user `u`.
    pub fn tt_row(&self, u: usize, dim: usize) -> Vec<f32> {
        let uv = &self.user_vecs[u * dim..(u + 1) * dim];
        self.item_vecs
            .chunks(dim)
            .map(|iv| iv.iter().zip(uv).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// The full cascade's first two steps: retrieve `n` unseen candidates by
    /// two-tower score and score them with the ranker; ordering is left to
    /// [`order_cascade`] so several weightings can be tried cheaply.
    fn cascade_candidates(
        &self,
        users: &[usize],
        seen: &[HashSet<u32>],
        n: usize,
        dim: usize,
        dev: &Device,
    ) -> Result<Vec<Vec<Candidate>>, TrainError> {
        let mut pairs = Vec::new();
        let mut spans = Vec::new();
        for &u in users {
            let cands = masked_top(&self.tt_row(u, dim), &seen[u], n);
            spans.push((u, pairs.len(), cands.len()));
            pairs.extend(cands.into_iter().map(|i| (u as u32, i)));
        }
        let data = self.data(seen, dim);
        let (rating, engage) =
            train::ranker_scores(&self.ranker.model, &self.tables, &data, &pairs, dev)?;
        Ok(spans
            .into_iter()
            .map(|(_, start, len)| {
                (start..start + len)
                    .map(|j| {
                        (
                            pairs[j].1,
                            engage[j],
                            rating[j],
                            data.tt_score(pairs[j].0, pairs[j].1),
                        )
                    })
                    .collect()
            })
            .collect())
    }
}

fn order_cascade(cands: &[Candidate], w: CascadeWeights, mean: f32) -> Vec<u32> {
    let mut v: Vec<(u32, f32)> = cands
        .iter()
        .map(|&(i, e, r, t)| (i, w.score(e, r, mean, t)))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().map(|x| x.0).collect()
}

/// The validation grid for [`CascadeWeights`].
const RATING_WEIGHTS: [f32; 4] = [0.0, 0.25, 0.5, 1.0];
const RETRIEVAL_WEIGHTS: [f32; 5] = [0.0, 2.0, 5.0, 10.0, 20.0];

pub fn ranking_protocol(
    ds: &Dataset,
    text: &[Vec<f32>],
    cfg: &TrainConfig,
    candidates: usize,
    publish: Option<&Chosen>,
    dev: &Device,
) -> Result<(RankingReport, Models), TrainError> {
    let split = per_user_split(&ds.interactions, ds.users.len(), [0.8, 0.1, 0.1], cfg.seed);
    let mut models = train_models(
        ds,
        text,
        &split.train,
        &split.valid,
        cfg,
        Epochs::Validate(publish),
        dev,
    )?;
    let seen_train = per_user_sets(ds, &split.train);
    let valid_rel = per_user_sets(ds, &split.valid);
    let test_rel = per_user_sets(ds, &split.test);
    let seen_test: Vec<HashSet<u32>> = seen_train
        .iter()
        .zip(&valid_rel)
        .map(|(a, b)| a | b)
        .collect();
    let dim = cfg.two_tower.dim;

    // Popularity.
    let pop: Vec<f32> = models
        .space
        .item_popularity
        .iter()
        .map(|&c| c as f32)
        .collect();
    let popularity = evaluate(&test_rel, &seen_test, |_, seen| masked_top(&pop, seen, K));

    // BPR-MF baseline.
    let holdout = Holdout {
        seen: &seen_train,
        relevant: &valid_rel,
    };
    let train_pairs: Vec<(u32, u32)> = split
        .train
        .iter()
        .map(|&i| (ds.interactions[i].user, ds.interactions[i].item))
        .collect();
    let bpr = train::train_bpr(&models.space, &train_pairs, &seen_train, &holdout, cfg, dev)?;
    let bpr_scores: Vec<f32> = bpr
        .model
        .user
        .embeddings()
        .matmul(&bpr.model.item.embeddings().t()?)?
        .flatten_all()?
        .to_vec1()?;
    let n_items = ds.items.len();
    let bpr_rank = evaluate(&test_rel, &seen_test, |u, seen| {
        masked_top(&bpr_scores[u * n_items..(u + 1) * n_items], seen, K)
    });

    // Two-tower alone (exact full ranking).
    let two_tower = evaluate(&test_rel, &seen_test, |u, seen| {
        masked_top(&models.tt_row(u, dim), seen, K)
    });

    // Cascade: choose the rating weight on validation, report on test.
    let mean = models.space.global_mean_rating;
    let valid_users: Vec<usize> = (0..ds.users.len())
        .filter(|&u| !valid_rel[u].is_empty())
        .collect();
    let vc = models.cascade_candidates(&valid_users, &seen_train, candidates, dim, dev)?;
    let mut best = (f64::NEG_INFINITY, CascadeWeights::default());
    let grid = RATING_WEIGHTS.iter().flat_map(|&rating| {
        RETRIEVAL_WEIGHTS
            .iter()
            .map(move |&retrieval| CascadeWeights { rating, retrieval })
    });
    for w in grid {
        let per: Vec<TopK> = valid_users
            .iter()
            .zip(&vc)
            .map(|(&u, c)| metrics::top_k(&order_cascade(c, w, mean), &valid_rel[u], K))
            .collect();
        let ndcg = metrics::mean(&per).ndcg;
        if ndcg > best.0 {
            best = (ndcg, w);
        }
    }
    let w = best.1;
    models.cascade_weights = w;
    let test_users: Vec<usize> = (0..ds.users.len())
        .filter(|&u| !test_rel[u].is_empty())
        .collect();
    let tc = models.cascade_candidates(&test_users, &seen_test, candidates, dim, dev)?;
    let per: Vec<TopK> = test_users
        .iter()
        .zip(&tc)
        .map(|(&u, c)| metrics::top_k(&order_cascade(c, w, mean), &test_rel[u], K))
        .collect();
    let cascade = metrics::mean(&per).into();

    let report = RankingReport {
        popularity,
        bpr: bpr_rank,
        two_tower,
        cascade,
        cascade_weights: w,
        cascade_candidates: candidates,
        users_evaluated: test_users.len(),
        curves: vec![
            models.two_tower.curve.clone(),
            models.ranker.curve.clone(),
            bpr.curve,
        ],
    };
    Ok((report, models))
}

pub fn rating_protocol(
    ds: &Dataset,
    text: &[Vec<f32>],
    cfg: &TrainConfig,
    dev: &Device,
) -> Result<RatingReport, TrainError> {
    let split = random_split(ds.interactions.len(), 0.1, cfg.seed);
    let inner = random_split(split.train.len(), 0.05, cfg.seed.wrapping_add(1));
    let train_idx: Vec<usize> = inner.train.iter().map(|&j| split.train[j]).collect();
    let valid_idx: Vec<usize> = inner.test.iter().map(|&j| split.train[j]).collect();
    let models = train_models(
        ds,
        text,
        &train_idx,
        &valid_idx,
        cfg,
        Epochs::Validate(None),
        dev,
    )?;
    let (lo, hi) = train_idx
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &i| {
            let r = ds.interactions[i].rating;
            (lo.min(r), hi.max(r))
        });
    let pairs: Vec<(u32, u32)> = split
        .test
        .iter()
        .map(|&i| (ds.interactions[i].user, ds.interactions[i].item))
        .collect();
    let truth: Vec<f32> = split
        .test
        .iter()
        .map(|&i| ds.interactions[i].rating)
        .collect();
    let data = models.data(&[], cfg.two_tower.dim);
    let (pred, _) = train::ranker_scores(&models.ranker.model, &models.tables, &data, &pairs, dev)?;
    // Predictions are clipped to the observed rating range, as SVD baselines do.
    let pred: Vec<f32> = pred.into_iter().map(|p| p.clamp(lo, hi)).collect();
    let (rmse, mae) = metrics::rmse_mae(&pred, &truth);
    Ok(RatingReport {
        rmse,
        mae,
        test_ratings: truth.len(),
        curves: vec![models.two_tower.curve, models.ranker.curve],
    })
}
