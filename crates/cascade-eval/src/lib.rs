//! Quality measured on the served path: the temporal protocol.
//!
//! This crate joins training and serving (it trains an artifact, then asks
//! the engine), so neither of them has to depend on the other.
//!
//! Per user, the last `holdout` share of their interactions by timestamp is
//! held out (what a deployed recommender faces: it predicts the future from
//! the past), and a `new_users` share of users is held out entirely. The
//! ordinary offline pipeline ([`train_artifact`]: evaluate, refit on all it
//! is given, index) builds an artifact from the rest; then every number comes
//! from an [`Engine`] loaded from that artifact, through the code `cascade
//! serve` runs:
//!
//! * the full cascade: [`Engine::predict`] (Bloom-filtered HNSW, popularity
//!   fill, batched ranker, top-k);
//! * the retriever alone: [`Engine::retrieve`] (the same HNSW walk, best first);
//! * popularity: [`Engine::predict`] for a user with no personal signal,
//!   with the user's own training items as `exclude_item_ids`;
//! * new users: their first `new_user_events` interactions are recorded
//!   with [`Engine::record_events`], the rest are the truth; the cascade
//!   answers through the unknown-user slot, popularity as above.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use cascade_data::{Dataset, Interaction};
use cascade_train::eval::Ranking;
use cascade_train::metrics::{self, TopK};
use cascade_train::pipeline::{train_artifact, RunOptions};
use cascade_train::train::TrainConfig;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use cascade_core::{Engine, EngineError, Event, PersonalizedBy, PredictRequest, ScoredItem};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Train(#[from] cascade_train::TrainError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Knobs of the temporal protocol.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TemporalConfig {
    /// Share of each user's interactions held out, the latest by timestamp.
    pub holdout: f64,
    /// Share of users held out entirely (served as new users).
    pub new_users: f64,
    /// Interactions a new user records as events before being asked; the rest are the truth.
    pub new_user_events: usize,
    /// Items per answer.
    pub k: usize,
    pub seed: u64,
}

impl Default for TemporalConfig {
    fn default() -> Self {
        Self {
            holdout: 0.1,
            new_users: 0.1,
            new_user_events: 5,
            k: 10,
            seed: 2026,
        }
    }
}

/// One method's numbers on the temporal protocol.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ServedRanking {
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
    pub hit_at_10: f64,
    /// Distinct items recommended over all users / catalogue size.
    pub coverage_at_10: f64,
    /// Returned items the user had already interacted with (must be 0).
    pub already_interacted: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemporalReport {
    pub config: TemporalConfig,
    pub users_evaluated: usize,
    pub train_interactions: usize,
    pub test_interactions: usize,
    pub popularity: ServedRanking,
    pub two_tower: ServedRanking,
    pub cascade: ServedRanking,
    pub new_users_evaluated: usize,
    pub new_users_popularity: ServedRanking,
    pub new_users_two_tower: ServedRanking,
    pub new_users_cascade: ServedRanking,
    /// New-user answers that were personalised by their events (should be all).
    pub new_users_personalized: usize,
    /// The random-split evaluation inside the artifact's own training run.
    pub artifact_metrics: serde_json::Value,
    pub train_seconds: f64,
    pub serve_seconds: f64,
}

/// Accumulates one method's answers (item indices of the dataset).
#[derive(Default)]
struct Tally {
    per_user: Vec<TopK>,
    items: HashSet<u32>,
    already: usize,
}

impl Tally {
    fn add(&mut self, answer: &[u32], truth: &HashSet<u32>, had: &HashSet<u32>, k: usize) {
        self.per_user.push(metrics::top_k(answer, truth, k));
        self.already += answer.iter().filter(|i| had.contains(*i)).count();
        self.items.extend(answer.iter().copied());
    }

    fn finish(&self, num_items: usize) -> ServedRanking {
        let r: Ranking = metrics::mean(&self.per_user).into();
        ServedRanking {
            recall_at_10: r.recall_at_10,
            ndcg_at_10: r.ndcg_at_10,
            hit_at_10: r.hit_at_10,
            coverage_at_10: self.items.len() as f64 / num_items.max(1) as f64,
            already_interacted: self.already,
        }
    }
}

/// The split: which users are new, and per remaining user which interaction
/// indices train and which are held out.
struct TemporalSplit {
    /// Per user: interaction indices in time order (timestamp, then item).
    by_user: Vec<Vec<usize>>,
    new_users: Vec<usize>,
    train: Vec<usize>,
    test: Vec<Vec<usize>>,
}

fn split(ds: &Dataset, cfg: &TemporalConfig) -> TemporalSplit {
    let mut by_user: Vec<Vec<usize>> = vec![Vec::new(); ds.users.len()];
    for (i, x) in ds.interactions.iter().enumerate() {
        by_user[x.user as usize].push(i);
    }
    for v in &mut by_user {
        let key = |i: &usize| (ds.interactions[*i].timestamp, ds.interactions[*i].item);
        v.sort_by_key(key);
    }
    // New users need events and something left to predict.
    let mut eligible: Vec<usize> = (0..ds.users.len())
        .filter(|&u| by_user[u].len() > cfg.new_user_events)
        .collect();
    eligible.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
    let n_new = ((ds.users.len() as f64) * cfg.new_users).round() as usize;
    let mut new_users: Vec<usize> = eligible.into_iter().take(n_new).collect();
    new_users.sort_unstable();
    let is_new: HashSet<usize> = new_users.iter().copied().collect();
    let mut train = Vec::new();
    let mut test = vec![Vec::new(); ds.users.len()];
    for (u, idx) in by_user.iter().enumerate() {
        if is_new.contains(&u) {
            continue;
        }
        let n = idx.len();
        let n_test = if n >= 2 {
            ((n as f64 * cfg.holdout).ceil() as usize).clamp(1, n - 1)
        } else {
            0
        };
        train.extend_from_slice(&idx[..n - n_test]);
        test[u] = idx[n - n_test..].to_vec();
    }
    train.sort_unstable();
    TemporalSplit {
        by_user,
        new_users,
        train,
        test,
    }
}

/// The dataset the artifact is built from: new users removed (their
/// interactions with them), every other user's held-out interactions removed.
fn training_dataset(ds: &Dataset, s: &TemporalSplit) -> Dataset {
    let is_new: HashSet<usize> = s.new_users.iter().copied().collect();
    let mut remap = vec![u32::MAX; ds.users.len()];
    let mut users = Vec::new();
    for (u, user) in ds.users.iter().enumerate() {
        if !is_new.contains(&u) {
            remap[u] = users.len() as u32;
            users.push(user.clone());
        }
    }
    let interactions: Vec<Interaction> = s
        .train
        .iter()
        .map(|&i| {
            let x = &ds.interactions[i];
            Interaction {
                user: remap[x.user as usize],
                ..*x
            }
        })
        .collect();
    Dataset {
        items: ds.items.clone(),
        users,
        user_feature_names: ds.user_feature_names.clone(),
        interactions,
        checksum: format!("temporal-{}", ds.checksum),
    }
}

/// Answer items as dataset item indices (an answer only holds known items).
fn indices(r: &[ScoredItem], index: &HashMap<&str, u32>) -> Vec<u32> {
    r.iter()
        .filter_map(|i| index.get(i.item_id.as_str()).copied())
        .collect()
}

/// Run the temporal protocol on `ds`; the artifact is written under `work`.
pub fn temporal_protocol(
    ds: &Dataset,
    text: &[Vec<f32>],
    train_cfg: &TrainConfig,
    opts: &RunOptions,
    cfg: &TemporalConfig,
    work: &Path,
    dev: &Device,
) -> Result<TemporalReport, EvalError> {
    let s = split(ds, cfg);
    let train_ds = training_dataset(ds, &s);
    let t0 = Instant::now();
    let opts = RunOptions {
        with_rating: false,
        ..*opts
    };
    let (_, dir, manifest) = train_artifact(work, &train_ds, text, train_cfg, &opts, dev)?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let engine = Engine::load(&dir, dev)?;
    let item_id = |i: u32| ds.items[i as usize].id.clone();
    let index: HashMap<&str, u32> = ds
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.id.as_str(), i as u32))
        .collect();
    let ix = |r: &[ScoredItem]| indices(r, &index);
    let k = cfg.k;
    let popular_except = |had: &HashSet<u32>| {
        engine.predict(&PredictRequest {
            user_id: "\u{1}temporal-popularity".into(),
            num_results: k,
            exclude_item_ids: had.iter().map(|&i| item_id(i)).collect(),
            ..Default::default()
        })
    };

    let (mut pop, mut tt, mut cas) = (Tally::default(), Tally::default(), Tally::default());
    let mut users_evaluated = 0;
    let mut had: Vec<HashSet<u32>> = vec![HashSet::new(); ds.users.len()];
    for &i in &s.train {
        let x = &ds.interactions[i];
        had[x.user as usize].insert(x.item);
    }
    for (u, test) in s.test.iter().enumerate() {
        let truth: HashSet<u32> = test
            .iter()
            .map(|&i| ds.interactions[i].item)
            .filter(|i| !had[u].contains(i))
            .collect();
        if truth.is_empty() {
            continue;
        }
        users_evaluated += 1;
        let user = &ds.users[u].id;
        let answer = engine.predict(&PredictRequest {
            user_id: user.clone(),
            num_results: k,
            ..Default::default()
        })?;
        cas.add(&ix(&answer.items), &truth, &had[u], k);
        tt.add(
            &ix(&engine.retrieve(user, k, &[])?.items),
            &truth,
            &had[u],
            k,
        );
        pop.add(&ix(&popular_except(&had[u])?.items), &truth, &had[u], k);
    }

    // New users: their first interactions arrive as events.
    let (mut npop, mut ntt, mut ncas) = (Tally::default(), Tally::default(), Tally::default());
    let mut personalized = 0;
    let mut new_evaluated = 0;
    for &u in &s.new_users {
        let idx = &s.by_user[u];
        let (first, later) = idx.split_at(cfg.new_user_events.min(idx.len()));
        let user = format!("temporal-new-{}", ds.users[u].id);
        let events: Vec<Event> = first
            .iter()
            .map(|&i| Event {
                user_id: user.clone(),
                item_id: item_id(ds.interactions[i].item),
                kind: "rating".into(),
                timestamp: ds.interactions[i].timestamp,
            })
            .collect();
        let seen: HashSet<u32> = first.iter().map(|&i| ds.interactions[i].item).collect();
        let truth: HashSet<u32> = later
            .iter()
            .map(|&i| ds.interactions[i].item)
            .filter(|i| !seen.contains(i))
            .collect();
        if events.is_empty() || truth.is_empty() {
            continue;
        }
        engine.record_events(&events)?;
        new_evaluated += 1;
        let answer = engine.predict(&PredictRequest {
            user_id: user.clone(),
            num_results: k,
            ..Default::default()
        })?;
        if answer.personalized_by == PersonalizedBy::Events {
            personalized += 1;
        }
        ncas.add(&ix(&answer.items), &truth, &seen, k);
        ntt.add(
            &ix(&engine.retrieve(&user, k, &[])?.items),
            &truth,
            &seen,
            k,
        );
        npop.add(&ix(&popular_except(&seen)?.items), &truth, &seen, k);
    }
    let n = ds.items.len();
    Ok(TemporalReport {
        config: *cfg,
        users_evaluated,
        train_interactions: s.train.len(),
        test_interactions: s.test.iter().map(Vec::len).sum(),
        popularity: pop.finish(n),
        two_tower: tt.finish(n),
        cascade: cas.finish(n),
        new_users_evaluated: new_evaluated,
        new_users_popularity: npop.finish(n),
        new_users_two_tower: ntt.finish(n),
        new_users_cascade: ncas.finish(n),
        new_users_personalized: personalized,
        artifact_metrics: manifest.metrics.clone(),
        train_seconds,
        serve_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// The report as a table.
pub fn table(r: &TemporalReport) -> String {
    let row = |name: &str, m: &ServedRanking| {
        format!(
            "| {name} | {:.4} | {:.4} | {:.4} | {:.4} | {} |\n",
            m.recall_at_10, m.ndcg_at_10, m.hit_at_10, m.coverage_at_10, m.already_interacted
        )
    };
    let mut s = format!(
        "temporal protocol: last {:.0} % of each user's interactions held out, {} users; served by Engine::predict\n\n",
        r.config.holdout * 100.0,
        r.users_evaluated
    );
    s.push_str("| method | Recall@10 | NDCG@10 | Hit@10 | coverage@10 | already interacted |\n");
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    s.push_str(&row("popularity", &r.popularity));
    s.push_str(&row("two-tower retriever alone", &r.two_tower));
    s.push_str(&row("full cascade", &r.cascade));
    s.push_str(&format!(
        "\nnew users ({} held out entirely; first {} interactions recorded as events, the rest predicted; {} of them personalised by events)\n\n",
        r.new_users_evaluated, r.config.new_user_events, r.new_users_personalized
    ));
    s.push_str("| method | Recall@10 | NDCG@10 | Hit@10 | coverage@10 | already interacted |\n");
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    s.push_str(&row("popularity", &r.new_users_popularity));
    s.push_str(&row("two-tower retriever alone", &r.new_users_two_tower));
    s.push_str(&row("full cascade", &r.new_users_cascade));
    s
}
