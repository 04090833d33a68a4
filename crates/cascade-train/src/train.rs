//! Training loops (Candle autograd, AdamW). Each model supplies one epoch's
//! pass and a validation metric; [`run_epochs`] is the one loop around them.
//! Every run is seeded end to end — parameter init, shuffling and negative
//! sampling — and keeps either its best validation epoch (early stopping with
//! patience) or, for a refit without validation, the epoch that the
//! evaluation run of the same model chose ([`Schedule::Follow`]).

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use cascade_model::nn::{
    BprMf, PairInputs, Ranker, RankerConfig, TwoTower, TwoTowerConfig, UserInputs,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::metrics::{self, top_indices};
use crate::TrainError;
use cascade_artifact::features::{FeatureSpace, Tables};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub seed: u64,
    pub two_tower: TwoTowerConfig,
    pub tt_epochs: usize,
    pub tt_batch: usize,
    pub tt_lr: f64,
    pub ranker: RankerConfig,
    pub ranker_epochs: usize,
    pub ranker_batch: usize,
    pub ranker_lr: f64,
    pub ranker_weight_decay: f64,
    /// Hard negatives for the ranker come from each user's top-`hard_negative_pool` retrieved items.
    pub hard_negative_pool: usize,
    pub bpr_dim: usize,
    pub bpr_epochs: usize,
    pub bpr_lr: f64,
    pub bpr_l2: f64,
    pub patience: usize,
    pub history_len: usize,
    /// Share of training rows whose user ID and features are replaced by the
    /// unknown user's (history kept): trains the unknown-user slot that
    /// serves users the model never saw, from their events and context.
    #[serde(default)]
    pub user_dropout: f64,
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 2026,
            two_tower: TwoTowerConfig::default(),
            tt_epochs: 30,
            tt_batch: 2048,
            tt_lr: 3e-3,
            ranker: RankerConfig::default(),
            ranker_epochs: 20,
            ranker_batch: 1024,
            ranker_lr: 2e-3,
            ranker_weight_decay: 0.05,
            hard_negative_pool: 100,
            bpr_dim: 64,
            bpr_epochs: 60,
            bpr_lr: 5e-3,
            bpr_l2: 1e-4,
            patience: 3,
            history_len: 20,
            user_dropout: 0.1,
            progress: true,
        }
    }
}

/// Loss and validation metric per epoch, for the plot and the metrics JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Curve {
    pub model: String,
    pub train_loss: Vec<f64>,
    pub valid_metric: Vec<f64>,
    pub valid_metric_name: String,
    pub best_epoch: usize,
    /// Wall time of the whole loop, validation included.
    pub seconds: f64,
}

/// Held-out interactions used for early stopping.
pub struct Holdout<'a> {
    /// Per user: items to exclude from ranking (their training items).
    pub seen: &'a [HashSet<u32>],
    /// Per user: held-out items.
    pub relevant: &'a [HashSet<u32>],
}

impl Holdout<'_> {
    /// Whether any user has held-out items (a refit on all data has none).
    pub fn is_usable(&self) -> bool {
        self.relevant.iter().any(|r| !r.is_empty())
    }
}

fn finish(pb: &ProgressBar, curve: &mut Curve, t0: Instant, how: String) {
    pb.finish_and_clear();
    curve.seconds = t0.elapsed().as_secs_f64();
    tracing::info!(
        "{}: {} epochs in {:.1}s ({how} {})",
        curve.model,
        curve.train_loss.len(),
        curve.seconds,
        curve.best_epoch
    );
}

/// The epoch an evaluation run chose, shared with the refit that follows it.
///
/// A refit without validation trained for `k` epochs is, step for step, the
/// first `k` epochs of a longer one (same seed, same shuffles, constant
/// learning rate), so the refit can run on another core at the same time as
/// the evaluation and keep epoch `k`'s weights once `k` is known, instead of
/// waiting for it and then training again from scratch.
#[derive(Debug, Default)]
pub struct EpochChoice {
    state: Mutex<ChoiceState>,
    changed: Condvar,
}

#[derive(Debug, Default, Clone, Copy)]
struct ChoiceState {
    /// The best epoch so far: the final choice is never earlier, so a
    /// follower can drop weights of earlier epochs.
    floor: usize,
    chosen: Option<usize>,
    cancelled: bool,
}

impl EpochChoice {
    fn update(&self, f: impl FnOnce(&mut ChoiceState)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        self.changed.notify_all();
    }

    fn peek(&self) -> ChoiceState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validation improved at `epoch`.
    pub fn best_so_far(&self, epoch: usize) {
        self.update(|s| s.floor = s.floor.max(epoch));
    }

    /// The run finished and keeps `epoch`.
    pub fn choose(&self, epoch: usize) {
        self.update(|s| {
            s.floor = s.floor.max(epoch);
            s.chosen = Some(epoch);
        });
    }

    /// No choice will come (the run failed or ended): followers still
    /// waiting stop with an error. A choice already made stands.
    pub fn cancel(&self) {
        self.update(|s| s.cancelled = true);
    }

    /// Block until the run chose (or failed).
    fn wait(&self) -> Result<usize, TrainError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = st.chosen {
                return Ok(c);
            }
            if st.cancelled {
                return Err(cancelled());
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn cancelled() -> TrainError {
    TrainError::Invalid(
        "the evaluation run this refit follows stopped before choosing an epoch".into(),
    )
}

/// How a training run decides how long to train and which weights to keep.
#[derive(Debug, Clone, Copy)]
pub enum Schedule<'a> {
    /// Validate after every epoch, stop after `patience` epochs without
    /// improvement and keep the best epoch, telling `publish` as it goes.
    /// Without validation data every epoch runs and the last is kept.
    EarlyStop {
        patience: usize,
        publish: Option<&'a EpochChoice>,
    },
    /// A refit: no validation; train until the followed run has chosen its
    /// epoch and keep that epoch's weights.
    Follow(&'a EpochChoice),
}

/// What [`run_epochs`] reports and how it compares validation values.
struct LoopSpec<'a> {
    name: &'static str,
    metric_name: &'static str,
    higher_is_better: bool,
    epochs: usize,
    steps_per_epoch: usize,
    progress: bool,
    /// Whether `validate` means anything (there are held-out rows).
    validates: bool,
    schedule: Schedule<'a>,
}

/// The one training loop: `epoch` runs one pass over the data and returns its
/// mean loss, `validate` returns the validation metric; the schedule decides
/// when to stop and which epoch's weights `varmap` ends with.
fn run_epochs(
    spec: LoopSpec,
    varmap: &VarMap,
    mut epoch: impl FnMut(&ProgressBar) -> Result<f64, TrainError>,
    mut validate: impl FnMut() -> Result<f64, TrainError>,
) -> Result<Curve, TrainError> {
    let pb = progress(
        spec.progress,
        (spec.steps_per_epoch * spec.epochs) as u64,
        spec.name,
    );
    let t0 = Instant::now();
    let mut curve = Curve {
        model: spec.name.into(),
        valid_metric_name: spec.metric_name.into(),
        ..Default::default()
    };
    let how = match spec.schedule {
        Schedule::EarlyStop { patience, publish } => {
            // The best validation value, its epoch and its weights.
            let mut best: Option<(f64, usize, Weights)> = None;
            let mut since_best = 0;
            for e in 0..spec.epochs {
                let loss = epoch(&pb)?;
                curve.train_loss.push(loss);
                if !spec.validates {
                    // Nothing to stop on: validating nothing would score every
                    // epoch 0 and silently keep epoch 0.
                    curve.best_epoch = e;
                    pb.set_message(format!("epoch {e} loss {loss:.4}"));
                    continue;
                }
                let v = validate()?;
                curve.valid_metric.push(v);
                pb.set_message(format!(
                    "epoch {e} loss {loss:.4} {} {v:.4}",
                    spec.metric_name
                ));
                let better =
                    best.as_ref()
                        .is_none_or(|&(b, _, _)| if spec.higher_is_better { v > b } else { v < b });
                if better {
                    best = Some((v, e, snapshot(varmap)?));
                    since_best = 0;
                    if let Some(p) = publish {
                        p.best_so_far(e);
                    }
                } else {
                    since_best += 1;
                    if since_best >= patience {
                        break;
                    }
                }
            }
            if let Some((_, e, weights)) = best {
                restore(varmap, &weights)?;
                curve.best_epoch = e;
            }
            if let Some(p) = publish {
                p.choose(curve.best_epoch);
            }
            "best epoch".to_string()
        }
        Schedule::Follow(choice) => {
            let mut kept: Vec<(usize, Weights)> = Vec::new();
            for e in 0..spec.epochs {
                let st = choice.peek();
                match st.chosen {
                    Some(c) if e > c => break,
                    None if st.cancelled => return Err(cancelled()),
                    _ => {}
                }
                let loss = epoch(&pb)?;
                curve.train_loss.push(loss);
                pb.set_message(format!("epoch {e} loss {loss:.4}"));
                kept.retain(|(k, _)| *k >= st.floor);
                kept.push((e, snapshot(varmap)?));
            }
            let c = choice.wait()?;
            let (_, snap) = kept.iter().find(|(k, _)| *k == c).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "{}: the evaluation chose epoch {c}, past this refit's {} epochs",
                    spec.name, spec.epochs
                ))
            })?;
            restore(varmap, snap)?;
            let ran = curve.train_loss.len();
            curve.train_loss.truncate(c + 1);
            curve.best_epoch = c;
            format!("refit: ran {ran}, kept the evaluation's epoch")
        }
    };
    finish(&pb, &mut curve, t0, how);
    Ok(curve)
}

/// A progress bar in the project's style, or a hidden one.
pub fn progress(show: bool, steps: u64, name: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(steps);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(name.to_string());
    pb
}

/// A copy of every variable of a model, by name.
type Weights = Vec<(String, Tensor)>;

fn snapshot(vm: &VarMap) -> Result<Weights, TrainError> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| TrainError::Invalid("varmap lock poisoned".into()))?;
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

fn restore(vm: &VarMap, snap: &[(String, Tensor)]) -> Result<(), TrainError> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| TrainError::Invalid("varmap lock poisoned".into()))?;
    for (k, t) in snap {
        if let Some(v) = data.get(k) {
            v.set(t)?;
        }
    }
    Ok(())
}

/// Mean Recall@10 over users with held-out items, ranking all unseen items by `scores` (row-major `[users, items]`).
pub fn recall_at_10(scores: &[f32], n_items: usize, h: &Holdout) -> f64 {
    let mut per_user = Vec::new();
    let mut row = vec![0f32; n_items];
    for (u, rel) in h.relevant.iter().enumerate() {
        if rel.is_empty() {
            continue;
        }
        row.copy_from_slice(&scores[u * n_items..(u + 1) * n_items]);
        for &s in &h.seen[u] {
            row[s as usize] = f32::NEG_INFINITY;
        }
        per_user.push(metrics::top_k(&top_indices(&row, 10), rel, 10));
    }
    metrics::mean(&per_user).recall
}

/// Row indices for the user ID/features of `users`: each is, with
/// probability `p`, the unknown user (`num_users`).
fn dropped_ids(users: &[u32], num_users: usize, p: f64, rng: &mut ChaCha8Rng) -> Vec<u32> {
    users
        .iter()
        .map(|&u| {
            if p > 0.0 && rng.random_bool(p.min(1.0)) {
                num_users as u32
            } else {
                u
            }
        })
        .collect()
}

/// User tower inputs for a training batch. A `p` share of rows become the
/// unknown user (ID and features) with only the most recent 1..=all items
/// of their history, drawn uniformly: a user the model never saw arrives with
/// a handful of events, and the slot must learn to serve them from those.
fn dropout_users(
    space: &FeatureSpace,
    tables: &Tables,
    users: &[u32],
    p: f64,
    rng: &mut ChaCha8Rng,
    dev: &Device,
) -> Result<UserInputs, TrainError> {
    let ids = dropped_ids(users, space.dims.num_users, p, rng);
    let l = space.dims.history_len.max(1);
    let n = users.len();
    let mut hist = vec![0u32; n * l];
    let mut hist_w = vec![0f32; n * l];
    for (r, (&u, &id)) in users.iter().zip(&ids).enumerate() {
        let h = &space.user_history[u as usize];
        let len = if id != u && h.len() > 1 {
            rng.random_range(1..=h.len())
        } else {
            h.len()
        };
        for (j, &it) in h.iter().take(len).enumerate() {
            hist[r * l + j] = it;
            hist_w[r * l + j] = 1.0 / len as f32;
        }
    }
    let id_idx = Tensor::from_vec(ids, n, dev)?;
    Ok(UserInputs {
        ids: tables.user_ids.index_select(&id_idx, 0)?,
        cats: tables
            .user_cats
            .as_ref()
            .map(|c| c.index_select(&id_idx, 0))
            .transpose()?,
        hist: Tensor::from_vec(hist, (n, l), dev)?,
        hist_w: Tensor::from_vec(hist_w, (n, l), dev)?,
    })
}

pub struct TrainedTwoTower {
    pub varmap: VarMap,
    pub model: TwoTower,
    pub curve: Curve,
}

/// All users' and all items' tower outputs: `([users, dim], [items, dim])`.
pub fn tower_embeddings(
    model: &TwoTower,
    tables: &Tables,
    dev: &Device,
) -> Result<(Tensor, Tensor), TrainError> {
    let all = Tensor::arange(0u32, tables.num_users as u32, dev)?;
    Ok((
        model.user(&tables.users(&all)?)?,
        model.item(&tables.items)?,
    ))
}

/// Two-tower retriever with a softmax over the full catalogue (every item is a
/// negative; exact rather than sampled while the catalogue fits one matmul).
pub fn train_two_tower(
    space: &FeatureSpace,
    tables: &Tables,
    train: &[(u32, u32)],
    holdout: &Holdout,
    cfg: &TrainConfig,
    schedule: Schedule,
    dev: &Device,
) -> Result<TrainedTwoTower, TrainError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let model = TwoTower::new(vb, &space.dims, &cfg.two_tower)?;
    cascade_model::nn::seeded_init(&varmap, cfg.seed)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: cfg.tt_lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1));
    let mut order: Vec<usize> = (0..train.len()).collect();
    let inv_t = 1.0 / cfg.two_tower.temperature;
    let spec = LoopSpec {
        name: "two_tower",
        metric_name: "valid Recall@10",
        higher_is_better: true,
        epochs: cfg.tt_epochs,
        steps_per_epoch: train.len().div_ceil(cfg.tt_batch),
        progress: cfg.progress,
        validates: holdout.is_usable(),
        schedule,
    };
    let epoch = |pb: &ProgressBar| -> Result<f64, TrainError> {
        order.shuffle(&mut rng);
        let mut total = 0.0;
        for chunk in order.chunks(cfg.tt_batch) {
            let users: Vec<u32> = chunk.iter().map(|&i| train[i].0).collect();
            let items: Vec<u32> = chunk.iter().map(|&i| train[i].1).collect();
            let inputs = dropout_users(space, tables, &users, cfg.user_dropout, &mut rng, dev)?;
            let target = Tensor::from_vec(items, chunk.len(), dev)?;
            // The temperature scales the [batch, dim] user side, not the
            // [batch, items] logits: the same logits for a fraction of the work.
            let u = (model.user(&inputs)? * inv_t)?;
            let v = model.item(&tables.items)?;
            let logits = u.matmul(&v.t()?)?;
            let loss = cascade_model::ops::cross_entropy(&logits, &target)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? as f64;
            pb.inc(1);
        }
        Ok(total / chunks_of(train.len(), cfg.tt_batch))
    };
    let validate = || -> Result<f64, TrainError> {
        let (u, v) = tower_embeddings(&model, tables, dev)?;
        let scores: Vec<f32> = u.matmul(&v.t()?)?.flatten_all()?.to_vec1()?;
        Ok(recall_at_10(&scores, space.dims.num_items, holdout))
    };
    let curve = run_epochs(spec, &varmap, epoch, validate)?;
    Ok(TrainedTwoTower {
        varmap,
        model,
        curve,
    })
}

pub struct TrainedRanker {
    pub varmap: VarMap,
    pub model: Ranker,
    pub curve: Curve,
}

/// Inputs for ranker training beyond the features.
pub struct RankerData<'a> {
    /// Training (user, item, rating) triples.
    pub train: &'a [(u32, u32, f32)],
    /// Per user: items interacted with in training (never sampled as negatives).
    pub seen: &'a [HashSet<u32>],
    /// Per user: the retriever's top unseen items, the pool of hard negatives.
    pub hard_pool: &'a [Vec<u32>],
    /// Two-tower user and item vectors (row-major, `dim` wide) for the score feature.
    pub user_vecs: &'a [f32],
    pub item_vecs: &'a [f32],
    pub dim: usize,
}

impl RankerData<'_> {
    pub fn tt_score(&self, u: u32, i: u32) -> f32 {
        let (a, b) = (u as usize * self.dim, i as usize * self.dim);
        self.user_vecs[a..a + self.dim]
            .iter()
            .zip(&self.item_vecs[b..b + self.dim])
            .map(|(x, y)| x * y)
            .sum()
    }

    /// Each positive with one hard negative (from the retriever's pool) and one uniform negative.
    fn rows(
        &self,
        positives: &[(u32, u32, f32)],
        n_items: usize,
        rng: &mut ChaCha8Rng,
    ) -> (Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>) {
        let b = positives.len();
        let (mut us, mut is, mut labels) = (
            Vec::with_capacity(3 * b),
            Vec::with_capacity(3 * b),
            Vec::with_capacity(3 * b),
        );
        for &(u, i, _) in positives {
            us.push(u);
            is.push(i);
            labels.push(1.0);
        }
        for &(u, _, _) in positives {
            let pool = &self.hard_pool[u as usize];
            let neg = if pool.is_empty() {
                rng.random_range(0..n_items as u32)
            } else {
                pool[rng.random_range(0..pool.len())]
            };
            us.push(u);
            is.push(neg);
            labels.push(0.0);
        }
        for &(u, _, _) in positives {
            let mut neg = rng.random_range(0..n_items as u32);
            for _ in 0..10 {
                if !self.seen[u as usize].contains(&neg) {
                    break;
                }
                neg = rng.random_range(0..n_items as u32);
            }
            us.push(u);
            is.push(neg);
            labels.push(0.0);
        }
        let tt = us
            .iter()
            .zip(&is)
            .map(|(&u, &i)| self.tt_score(u, i))
            .collect();
        (us, is, tt, labels)
    }
}

/// One ranker step's loss: MSE on the positives' ratings + BCE on engagement.
/// `id_rows` are the rows' user ID/feature rows (see [`dropped_ids`]).
fn ranker_loss(
    model: &Ranker,
    tables: &Tables,
    rows: &(Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>),
    id_rows: &[u32],
    ratings: &[f32],
    dev: &Device,
) -> Result<(Tensor, Tensor), TrainError> {
    let n = rows.0.len();
    let b = ratings.len();
    let uidx = Tensor::from_vec(rows.0.clone(), n, dev)?;
    let iidx = Tensor::from_vec(rows.1.clone(), n, dev)?;
    let tt = Tensor::from_vec(rows.2.clone(), (n, 1), dev)?;
    let labels = Tensor::from_vec(rows.3.clone(), n, dev)?;
    let users = tables.users_split(&Tensor::new(id_rows, dev)?, &uidx)?;
    let items = tables.items.select(&iidx)?;
    let out = model.forward(&PairInputs {
        user: &users,
        item: &items,
        tt_score: &tt,
    })?;
    let target = Tensor::from_vec(ratings.to_vec(), b, dev)?;
    let mse = candle_nn::loss::mse(&out.rating.narrow(0, 0, b)?, &target)?;
    let bce = candle_nn::loss::binary_cross_entropy_with_logit(&out.engage, &labels)?;
    Ok((mse, bce))
}

pub fn train_ranker(
    space: &FeatureSpace,
    tables: &Tables,
    data: &RankerData,
    valid: &[(u32, u32, f32)],
    cfg: &TrainConfig,
    schedule: Schedule,
    dev: &Device,
) -> Result<TrainedRanker, TrainError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let model = Ranker::new(vb, &space.dims, &cfg.ranker, space.global_mean_rating)?;
    cascade_model::nn::seeded_init(&varmap, cfg.seed.wrapping_add(7))?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: cfg.ranker_lr,
            weight_decay: cfg.ranker_weight_decay,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(2));
    // A fixed validation batch (negatives drawn once) so epochs are comparable.
    let mut vrng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(3));
    let vrows = data.rows(valid, space.dims.num_items, &mut vrng);
    let vratings: Vec<f32> = valid.iter().map(|x| x.2).collect();
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let spec = LoopSpec {
        name: "ranker",
        metric_name: "valid MSE + BCE",
        higher_is_better: false,
        epochs: cfg.ranker_epochs,
        steps_per_epoch: data.train.len().div_ceil(cfg.ranker_batch),
        progress: cfg.progress,
        validates: !valid.is_empty(),
        schedule,
    };
    let epoch = |pb: &ProgressBar| -> Result<f64, TrainError> {
        order.shuffle(&mut rng);
        let mut total = 0.0;
        for chunk in order.chunks(cfg.ranker_batch) {
            let pos: Vec<(u32, u32, f32)> = chunk.iter().map(|&i| data.train[i]).collect();
            let ratings: Vec<f32> = pos.iter().map(|x| x.2).collect();
            let rows = data.rows(&pos, space.dims.num_items, &mut rng);
            let ids = dropped_ids(&rows.0, space.dims.num_users, cfg.user_dropout, &mut rng);
            let (mse, bce) = ranker_loss(&model, tables, &rows, &ids, &ratings, dev)?;
            let loss = (mse + bce)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? as f64;
            pb.inc(1);
        }
        Ok(total / chunks_of(data.train.len(), cfg.ranker_batch))
    };
    let validate = || -> Result<f64, TrainError> {
        let (mse, bce) = ranker_loss(&model, tables, &vrows, &vrows.0, &vratings, dev)?;
        Ok((mse.to_scalar::<f32>()? + bce.to_scalar::<f32>()?) as f64)
    };
    let curve = run_epochs(spec, &varmap, epoch, validate)?;
    Ok(TrainedRanker {
        varmap,
        model,
        curve,
    })
}

/// Score (user, item) pairs with the ranker: `(rating, engagement logit)`.
pub fn ranker_scores(
    model: &Ranker,
    tables: &Tables,
    data: &RankerData,
    pairs: &[(u32, u32)],
    dev: &Device,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let (mut rating, mut engage) = (
        Vec::with_capacity(pairs.len()),
        Vec::with_capacity(pairs.len()),
    );
    for chunk in pairs.chunks(8192) {
        let n = chunk.len();
        let uidx = Tensor::from_vec(chunk.iter().map(|p| p.0).collect::<Vec<_>>(), n, dev)?;
        let iidx = Tensor::from_vec(chunk.iter().map(|p| p.1).collect::<Vec<_>>(), n, dev)?;
        let tt = Tensor::from_vec(
            chunk
                .iter()
                .map(|p| data.tt_score(p.0, p.1))
                .collect::<Vec<_>>(),
            (n, 1),
            dev,
        )?;
        let users = tables.users(&uidx)?;
        let items = tables.items.select(&iidx)?;
        let out = model.forward(&PairInputs {
            user: &users,
            item: &items,
            tt_score: &tt,
        })?;
        rating.extend(out.rating.to_vec1::<f32>()?);
        engage.extend(out.engage.to_vec1::<f32>()?);
    }
    Ok((rating, engage))
}

pub struct TrainedBpr {
    pub varmap: VarMap,
    pub model: BprMf,
    pub curve: Curve,
}

/// Plain MF with the BPR loss and uniform negatives — the baseline row.
pub fn train_bpr(
    space: &FeatureSpace,
    train: &[(u32, u32)],
    seen: &[HashSet<u32>],
    holdout: &Holdout,
    cfg: &TrainConfig,
    dev: &Device,
) -> Result<TrainedBpr, TrainError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let (nu, ni) = (space.dims.num_users, space.dims.num_items);
    let model = BprMf::new(vb, nu, ni, cfg.bpr_dim)?;
    cascade_model::nn::seeded_init(&varmap, cfg.seed.wrapping_add(11))?;
    let vars: Vec<Var> = varmap.all_vars();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: cfg.bpr_lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(4));
    let mut order: Vec<usize> = (0..train.len()).collect();
    let batch = 2048;
    let spec = LoopSpec {
        name: "bpr",
        metric_name: "valid Recall@10",
        higher_is_better: true,
        epochs: cfg.bpr_epochs,
        steps_per_epoch: train.len().div_ceil(batch),
        progress: cfg.progress,
        validates: holdout.is_usable(),
        schedule: Schedule::EarlyStop {
            patience: cfg.patience,
            publish: None,
        },
    };
    let epoch = |pb: &ProgressBar| -> Result<f64, TrainError> {
        order.shuffle(&mut rng);
        let mut total = 0.0;
        for chunk in order.chunks(batch) {
            let n = chunk.len();
            let users: Vec<u32> = chunk.iter().map(|&i| train[i].0).collect();
            let pos: Vec<u32> = chunk.iter().map(|&i| train[i].1).collect();
            let neg: Vec<u32> = users
                .iter()
                .map(|&u| {
                    let mut j = rng.random_range(0..ni as u32);
                    while seen[u as usize].contains(&j) {
                        j = rng.random_range(0..ni as u32);
                    }
                    j
                })
                .collect();
            let (u, p, q) = (
                Tensor::from_vec(users, n, dev)?,
                Tensor::from_vec(pos, n, dev)?,
                Tensor::from_vec(neg, n, dev)?,
            );
            let diff = (model.score(&u, &p)? - model.score(&u, &q)?)?;
            let bpr = candle_nn::ops::sigmoid(&diff)?
                .clamp(1e-10, 1.0)?
                .log()?
                .mean_all()?
                .neg()?;
            let reg = ((model.user.forward_sq(&u)? + model_item_sq(&model, &p)?)?
                + model_item_sq(&model, &q)?)?;
            let loss = (bpr + (reg * cfg.bpr_l2)?)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? as f64;
            pb.inc(1);
        }
        Ok(total / chunks_of(train.len(), batch))
    };
    let validate = || -> Result<f64, TrainError> {
        let ue = model.user.embeddings();
        let ie = model.item.embeddings();
        let scores: Vec<f32> = ue.matmul(&ie.t()?)?.flatten_all()?.to_vec1()?;
        Ok(recall_at_10(&scores, ni, holdout))
    };
    let curve = run_epochs(spec, &varmap, epoch, validate)?;
    Ok(TrainedBpr {
        varmap,
        model,
        curve,
    })
}

/// Batches in an epoch of `n` rows, as a divisor for the mean batch loss.
fn chunks_of(n: usize, batch: usize) -> f64 {
    n.div_ceil(batch.max(1)).max(1) as f64
}

/// Squared L2 norm of the gathered rows, summed over the row and averaged over the batch.
trait SqNorm {
    fn forward_sq(&self, idx: &Tensor) -> candle_core::Result<Tensor>;
}
impl SqNorm for candle_nn::Embedding {
    fn forward_sq(&self, idx: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::Module;
        self.forward(idx)?.sqr()?.sum(1)?.mean_all()
    }
}
fn model_item_sq(m: &BprMf, idx: &Tensor) -> candle_core::Result<Tensor> {
    m.item.forward_sq(idx)
}
