//! The in-process pipeline on a trained artifact with planted structure:
//! seen and excluded items never come back, planted taste shows in the top-k,
//! unknown users take the popularity path, bad requests name their field.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::HashSet;

use candle_core::Device;
use cascade_core::{Engine, EngineError, PersonalizedBy, PredictRequest};
use cascade_data::synthetic::planted;
use cascade_retrieval::IndexParams;
use cascade_train::pipeline;
use cascade_train::train::TrainConfig;

const CLUSTERS: usize = 4;

fn engine() -> (tempfile::TempDir, Engine) {
    let (root, dir) = artifact();
    let engine = Engine::load(&dir, &Device::Cpu).unwrap();
    (root, engine)
}

/// The planted catalogue and its pseudo-text vectors.
fn planted_data() -> (cascade_data::Dataset, Vec<Vec<f32>>) {
    let ds = planted(120, 160, CLUSTERS, 25, 9);
    let text: Vec<Vec<f32>> = (0..ds.items.len())
        .map(|i| {
            (0..8)
                .map(|j| (((i * 7 + j * 3) % 11) as f32 / 11.0) - 0.5)
                .collect()
        })
        .collect();
    (ds, text)
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        tt_epochs: 15,
        tt_batch: 256,
        ranker_epochs: 8,
        ranker_batch: 256,
        bpr_epochs: 2,
        hard_negative_pool: 30,
        history_len: 20,
        // This catalogue gives the unknown-user slot a few dozen steps in
        // all; a larger share of dropped rows lets it learn in that time.
        user_dropout: 0.3,
        progress: false,
        ..Default::default()
    }
}

fn run_opts() -> pipeline::RunOptions {
    pipeline::RunOptions {
        candidates: 40,
        with_rating: false,
        index: IndexParams::default(),
    }
}

fn artifact() -> (tempfile::TempDir, std::path::PathBuf) {
    let (ds, text) = planted_data();
    let root = tempfile::tempdir().unwrap();
    let (_, dir, _) = pipeline::train_artifact(
        root.path(),
        &ds,
        &text,
        &train_cfg(),
        &run_opts(),
        &Device::Cpu,
    )
    .unwrap();
    (root, dir)
}

/// One "view" event of `item` by `user`.
fn viewed(user: &str, item: &str) -> cascade_core::Event {
    cascade_core::Event {
        user_id: user.into(),
        item_id: item.into(),
        kind: "view".into(),
        timestamp: 1,
    }
}

fn req(user: &str, k: usize) -> PredictRequest {
    PredictRequest {
        user_id: user.into(),
        num_results: k,
        ..Default::default()
    }
}

#[test]
fn pipeline_behaviour() {
    let (_root, e) = engine();

    // Known user: k results, best first, none seen in training, none excluded.
    let user = "u5"; // cluster 5 % 4 = 1
    let seen: HashSet<String> = e.training_items(user).unwrap().into_iter().collect();
    assert!(!seen.is_empty());
    let first = e.predict(&req(user, 10)).unwrap();
    assert!(!first.cold_start);
    assert_eq!(first.items.len(), 10);
    assert!(
        first.items.windows(2).all(|w| w[0].score >= w[1].score),
        "not sorted"
    );
    assert!(
        first.items.iter().all(|it| !seen.contains(&it.item_id)),
        "a seen item came back"
    );
    // Planted taste: items of the user's cluster (id % 4 == 1) dominate.
    let in_cluster = first
        .items
        .iter()
        .filter(|it| it.item_id[1..].parse::<usize>().unwrap() % CLUSTERS == 1)
        .count();
    assert!(
        in_cluster >= 7,
        "only {in_cluster}/10 from the user's cluster: {:?}",
        first.items
    );

    // Exclusions apply; deterministic for the same request.
    let excluded: Vec<String> = first
        .items
        .iter()
        .take(3)
        .map(|it| it.item_id.clone())
        .collect();
    let second = e
        .predict(&PredictRequest {
            exclude_item_ids: excluded.clone(),
            ..req(user, 10)
        })
        .unwrap();
    assert!(second
        .items
        .iter()
        .all(|it| !excluded.contains(&it.item_id)));
    assert_eq!(second.items[0].item_id, first.items[3].item_id);
    assert_eq!(e.predict(&req(user, 10)).unwrap().items, first.items);

    // Asking for more than the candidates retrieved: popularity fills, still no seen items.
    let many = e
        .predict(&PredictRequest {
            num_candidates: 5,
            ..req(user, 60)
        })
        .unwrap();
    assert_eq!(many.items.len(), 60);
    assert!(many.items.iter().all(|it| !seen.contains(&it.item_id)));
    let distinct: HashSet<&String> = many.items.iter().map(|it| &it.item_id).collect();
    assert_eq!(distinct.len(), 60);

    // Unknown user: cold start, most popular first.
    let cold = e.predict(&req("nobody", 5)).unwrap();
    assert!(cold.cold_start);
    assert_eq!(cold.items.len(), 5);
    assert!(cold.items.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(cold
        .items
        .iter()
        .all(|it| it.retrieval_score.is_nan() && it.predicted_rating.is_nan()));

    // Caller-supplied candidates: only those are ranked, exclusions still apply.
    let given: Vec<String> = ["i2", "i5", "i9", "i13", "i6"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let only = e
        .predict(&PredictRequest {
            candidate_item_ids: given.clone(),
            exclude_item_ids: vec!["i9".into()],
            ..req(user, 10)
        })
        .unwrap();
    let got: HashSet<String> = only.items.iter().map(|it| it.item_id.clone()).collect();
    let want: HashSet<String> = ["i2", "i5", "i13", "i6"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
    assert!(matches!(
        e.predict(&PredictRequest {
            candidate_item_ids: vec!["zzz".into()],
            ..req(user, 3)
        }),
        Err(EngineError::InvalidArgument {
            field: "candidate_item_ids",
            ..
        })
    ));

    // Rank scores given items in input order, consistent with Predict.
    let top: Vec<String> = first
        .items
        .iter()
        .take(5)
        .map(|it| it.item_id.clone())
        .rev()
        .collect();
    let ranked = e.rank(user, &top).unwrap();
    assert_eq!(
        ranked
            .items
            .iter()
            .map(|it| it.item_id.clone())
            .collect::<Vec<_>>(),
        top
    );
    for it in &ranked.items {
        let p = first
            .items
            .iter()
            .find(|x| x.item_id == it.item_id)
            .unwrap();
        assert!(
            (p.score - it.score).abs() < 1e-4,
            "{} vs {}",
            p.score,
            it.score
        );
    }
    match e.rank(user, &["i1".to_string(), "no-such-item".to_string()]) {
        Err(EngineError::InvalidArgument { field, msg }) => {
            assert!(field == "item_ids" && msg.contains("no-such-item"))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        e.rank(user, &[]),
        Err(EngineError::InvalidArgument {
            field: "item_ids",
            ..
        })
    ));
    assert!(e.rank("nobody", &top).unwrap().cold_start);

    // Retrieve alone: unseen candidates, best first by two-tower score.
    let r = e.retrieve(user, 20, &[]).unwrap();
    assert_eq!(r.items.len(), 20);
    assert!(r.items.iter().all(|it| !seen.contains(&it.item_id)));
    assert!(r
        .items
        .windows(2)
        .all(|w| w[0].retrieval_score >= w[1].retrieval_score));

    // Bad requests name the field.
    for (r, field) in [
        (req("", 10), "user_id"),
        (req(user, 0), "num_results"),
        (req(user, 5000), "num_results"),
        (
            PredictRequest {
                num_candidates: 1_000_000,
                ..req(user, 10)
            },
            "num_candidates",
        ),
    ] {
        match e.predict(&r) {
            Err(EngineError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
}

#[test]
fn recorded_events_take_effect_and_survive_restart() {
    let (root, mut e) = engine();
    let log = root.path().join("events.log");
    assert_eq!(e.open_event_log(&log).unwrap(), 0);
    let user = "u2";
    let top = e.predict(&req(user, 5)).unwrap().items[0].item_id.clone();
    let ev = |item: &str| viewed(user, item);
    assert_eq!(e.record_events(&[ev(&top)]).unwrap(), 1);
    // The very next Predict no longer returns it.
    assert!(e
        .predict(&req(user, 5))
        .unwrap()
        .items
        .iter()
        .all(|it| it.item_id != top));
    // A bad event rejects the batch and changes nothing.
    assert!(matches!(
        e.record_events(&[ev("i1"), ev("no-such")]),
        Err(EngineError::InvalidArgument {
            field: "events.item_id",
            ..
        })
    ));
    assert!(matches!(
        e.record_events(&[]),
        Err(EngineError::InvalidArgument {
            field: "events",
            ..
        })
    ));
    // Events for an unknown user shape their cold-start answer too.
    let cold_top = e.predict(&req("newcomer", 1)).unwrap().items[0]
        .item_id
        .clone();
    e.record_events(&[viewed("newcomer", &cold_top)]).unwrap();
    assert_ne!(
        e.predict(&req("newcomer", 1)).unwrap().items[0].item_id,
        cold_top
    );

    // Restart: a fresh engine replaying the log still excludes both.
    let dir = cascade_artifact::manifest::latest_version(root.path()).unwrap();
    drop(e);
    // A crash mid-append leaves a torn last line: skipped, not fatal.
    let mut text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 2, "only accepted events are logged");
    text.push_str("{\"user_id\":\"u2\",\"item");
    std::fs::write(&log, text).unwrap();
    let mut again = Engine::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(again.open_event_log(&log).unwrap(), 2);
    assert!(again
        .predict(&req(user, 5))
        .unwrap()
        .items
        .iter()
        .all(|it| it.item_id != top));
    assert_ne!(
        again.predict(&req("newcomer", 1)).unwrap().items[0].item_id,
        cold_top
    );
    // The torn tail was cut, so later appends replay cleanly.
    again.record_events(&[ev("i3")]).unwrap();
    drop(again);
    let mut third = Engine::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(third.open_event_log(&log).unwrap(), 3);
}

#[test]
fn context_personalises_an_unknown_user_and_is_never_returned() {
    let (_root, e) = engine();
    let cluster = |id: &str| id[1..].parse::<usize>().unwrap() % CLUSTERS;
    // An anonymous user looking at three cluster-1 items: the user tower
    // pools them through the unknown-user slot; not a cold start.
    let context: Vec<String> = ["i1", "i5", "i9"].map(String::from).to_vec();
    let steered = e
        .predict(&PredictRequest {
            context_item_ids: context.clone(),
            ..req("anonymous", 10)
        })
        .unwrap();
    assert!(!steered.cold_start);
    assert_eq!(steered.personalized_by, PersonalizedBy::Context);
    assert!(steered.items.iter().all(|it| !it.predicted_rating.is_nan()));
    assert_eq!(steered.items.len(), 10);
    assert!(steered
        .items
        .iter()
        .all(|it| !context.contains(&it.item_id)));
    assert!(steered.items.iter().all(|it| !it.retrieval_score.is_nan()));
    let in_cluster = steered
        .items
        .iter()
        .filter(|it| cluster(&it.item_id) == 1)
        .count();
    assert!(
        in_cluster >= 7,
        "{in_cluster}/10 from the context's cluster"
    );
    // Without context the same user gets popularity, which is flat across clusters.
    let plain = e.predict(&req("anonymous", 10)).unwrap();
    assert!(plain.cold_start);
    assert_eq!(plain.personalized_by, PersonalizedBy::Popularity);
    assert!(plain.items.iter().all(|it| it.retrieval_score.is_nan()));
    assert_ne!(
        plain.items.iter().map(|it| &it.item_id).collect::<Vec<_>>(),
        steered
            .items
            .iter()
            .map(|it| &it.item_id)
            .collect::<Vec<_>>()
    );
    // Unknown context IDs are ignored; too many are rejected, naming the field.
    let unknown = e
        .predict(&PredictRequest {
            context_item_ids: vec!["no-such".into()],
            ..req("anonymous", 10)
        })
        .unwrap();
    let ids = |r: &cascade_core::PredictResponse| -> Vec<String> {
        r.items.iter().map(|it| it.item_id.clone()).collect()
    };
    assert_eq!(ids(&unknown), ids(&plain));
    let e2 = e
        .predict(&PredictRequest {
            context_item_ids: vec!["i1".into(); cascade_core::MAX_CONTEXT + 1],
            ..req("anonymous", 10)
        })
        .unwrap_err();
    assert!(matches!(
        e2,
        EngineError::InvalidArgument {
            field: "context.item_ids",
            ..
        }
    ));
    // A known user's context items are not returned either.
    let known = e
        .predict(&PredictRequest {
            context_item_ids: context.clone(),
            ..req("u2", 20)
        })
        .unwrap();
    assert!(!known.cold_start);
    assert_eq!(known.personalized_by, PersonalizedBy::History);
    assert!(known.items.iter().all(|it| !context.contains(&it.item_id)));
}

#[test]
fn every_item_as_a_one_item_context_answers_in_full() {
    let (_root, e) = engine();
    let (_, n_items, _) = e.shape();
    for i in 0..n_items {
        let id = format!("i{i}");
        let r = e
            .predict(&PredictRequest {
                context_item_ids: vec![id.clone()],
                ..req("someone-new", 10)
            })
            .unwrap_or_else(|err| panic!("context {id}: {err}"));
        assert_eq!(r.items.len(), 10, "context {id}");
        assert!(r.items.iter().all(|it| it.item_id != id), "context {id}");
        assert_eq!(r.personalized_by, PersonalizedBy::Context);
    }
    // Known and unknown context IDs mixed, duplicates included.
    let r = e
        .predict(&PredictRequest {
            context_item_ids: ["nope", "i3", "i3", "also-nope", "i8"]
                .map(String::from)
                .to_vec(),
            ..req("someone-new", 10)
        })
        .unwrap();
    assert_eq!(r.items.len(), 10);
    assert!(r
        .items
        .iter()
        .all(|it| it.item_id != "i3" && it.item_id != "i8"));
}

#[test]
fn a_new_user_with_events_is_personalised_by_them() {
    let (_root, e) = engine();
    let cluster = |id: &str| id[1..].parse::<usize>().unwrap() % CLUSTERS;
    let popular = e.predict(&req("newbie", 10)).unwrap();
    assert!(popular.cold_start);
    // Four views of cluster-2 items.
    let viewed_items = ["i2", "i6", "i10", "i14"];
    let events: Vec<_> = viewed_items.iter().map(|i| viewed("newbie", i)).collect();
    e.record_events(&events).unwrap();
    let r = e.predict(&req("newbie", 10)).unwrap();
    assert!(!r.cold_start);
    assert_eq!(r.personalized_by, PersonalizedBy::Events);
    assert_eq!(r.items.len(), 10);
    assert!(r
        .items
        .iter()
        .all(|it| !viewed_items.contains(&it.item_id.as_str())));
    let ids = |r: &cascade_core::PredictResponse| -> Vec<String> {
        r.items.iter().map(|it| it.item_id.clone()).collect()
    };
    let popular_rest: Vec<String> = ids(&popular)
        .into_iter()
        .filter(|i| !viewed_items.contains(&i.as_str()))
        .collect();
    assert_ne!(ids(&r), popular_rest, "the events were ignored");
    let in_cluster = r
        .items
        .iter()
        .filter(|it| cluster(&it.item_id) == 2)
        .count();
    assert!(
        in_cluster >= 7,
        "{in_cluster}/10 from the events' cluster: {:?}",
        ids(&r)
    );
    // Rank and Retrieve use the same signal.
    assert_eq!(
        e.rank("newbie", &ids(&r)).unwrap().personalized_by,
        PersonalizedBy::Events
    );
    let got = e.retrieve("newbie", 20, &[]).unwrap();
    assert!(!got.cold_start);
    assert!(got
        .items
        .iter()
        .all(|it| !viewed_items.contains(&it.item_id.as_str())));
}

#[test]
fn user_state_is_cached_until_the_user_records_an_event() {
    let (_root, e) = engine();
    let first = e.predict(&req("u7", 5)).unwrap();
    assert!(!first.user_cache_hit);
    let again = e.predict(&req("u7", 5)).unwrap();
    assert!(again.user_cache_hit);
    assert_eq!(again.items, first.items);
    e.record_events(&[viewed("u7", &first.items[0].item_id)])
        .unwrap();
    let after = e.predict(&req("u7", 5)).unwrap();
    assert!(
        !after.user_cache_hit,
        "a new event must not be served from a stale cache entry"
    );
    assert!(after
        .items
        .iter()
        .all(|it| it.item_id != first.items[0].item_id));
    assert!(e.predict(&req("u7", 5)).unwrap().user_cache_hit);
}

#[test]
fn reload_names_only_versions_under_the_root() {
    let (root, e) = engine();
    let version = e.model_version().to_string();
    let h = cascade_core::EngineHandle::from_engine(e, &Device::Cpu, Default::default());
    assert_eq!(h.root(), root.path());
    // The newest version is the one serving: nothing to swap.
    let r = h.reload(None).unwrap();
    assert!(!r.swapped);
    assert_eq!(r.model_version, version);
    for bad in ["no-such-version", "..", "../etc", "a/b"] {
        match h.reload(Some(bad)) {
            Err(EngineError::NotFound(m)) => {
                assert!(!m.contains(&root.path().display().to_string()), "{m}")
            }
            other => panic!("{bad}: {:?}", other.map(|r| r.model_version)),
        }
    }
    assert_eq!(h.current().model_version(), version);
}

#[path = "support/corrupt.rs"]
mod corrupt;
use corrupt::corrupt_copy;

#[test]
fn a_corrupt_version_is_an_error_and_the_watcher_keeps_polling() {
    let (root, e) = engine();
    let good = e.dir().to_path_buf();
    let version = e.model_version().to_string();
    let h = std::sync::Arc::new(cascade_core::EngineHandle::from_engine(
        e,
        &Device::Cpu,
        Default::default(),
    ));
    type Corruption = (&'static str, fn(&mut Vec<u8>));
    let corruptions: [Corruption; 4] = [
        ("truncated", |b| b.truncate(b.len() / 2)),
        ("zeroed", |b| {
            let n = b.len();
            b[n / 4..n / 2].fill(0);
        }),
        ("ones", |b| {
            let n = b.len();
            b[16..n / 2].fill(0xff);
        }),
        ("header", |b| {
            let n = 64.min(b.len());
            b[..n].fill(0x7f);
        }),
    ];
    for (i, (what, corrupt)) in corruptions.iter().enumerate() {
        let name = format!("99999999999{i}-bad");
        corrupt_copy(&good, root.path(), &name, corrupt);
        match h.reload(Some(&name)) {
            // Refused as unservable, naming the file inside the version and
            // no server path.
            Err(EngineError::Unservable { version: v, msg }) => {
                assert_eq!(v, name, "{what}");
                assert!(msg.contains("items.hnsw.graph"), "{what}: {msg}");
                assert!(!msg.contains("panicked"), "{what}: {msg}");
                let root_path = root.path().display().to_string();
                assert!(!msg.contains(&root_path), "{what}: {msg}");
            }
            Err(e) => panic!("{what}: {e:?}"),
            // A corruption hnsw_rs cannot see must still serve.
            Ok(_) => {
                h.current().predict(&req("u1", 5)).unwrap();
                h.reload(good.file_name().unwrap().to_str()).unwrap();
            }
        }
        assert_eq!(h.current().model_version(), version, "{what}");
    }
    // The watcher meets the newest (bad) version first, then a good one
    // dropped later: it must survive the first and serve the second.
    let bad = corrupt_copy(&good, root.path(), "999999999998-bad", |b| {
        b.truncate(b.len() / 2)
    });
    assert!(h.reload(bad.file_name().unwrap().to_str()).is_err());
    let watcher = h.watch(std::time::Duration::from_millis(50)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(h.current().model_version(), version);
    let (newer, m) = pipeline::reindex(&good, root.path(), IndexParams::default()).unwrap();
    std::fs::rename(&newer, root.path().join("999999999999-good")).unwrap();
    let t0 = std::time::Instant::now();
    while h.current().model_version() == version {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30) && !watcher.is_finished(),
            "the watcher did not pick up the good version"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(h.current().model_version(), m.model_version);
}

#[test]
fn a_synthetic_catalogue_serves_like_a_trained_one() {
    let root = tempfile::tempdir().unwrap();
    let cfg = cascade_train::synth::SynthConfig {
        items: 3000,
        users: 200,
        per_user: 15,
        clusters: 16,
        dim: 32,
        text_dim: 8,
        candidates: 100,
        seed: 5,
        index: IndexParams::default(),
    };
    let (dir, manifest, report) = cascade_train::synth::synth_artifact(root.path(), &cfg).unwrap();
    assert_eq!((manifest.num_items, manifest.num_users), (3000, 200));
    assert!(report.hnsw_recall_at_100 > 0.8, "{report:?}");
    assert!(report.artifact_bytes > 3000 * 32 * 4);
    let e = Engine::load(&dir, &Device::Cpu).unwrap();
    let seen: HashSet<String> = e.training_items("u4").unwrap().into_iter().collect();
    assert_eq!(seen.len(), 15);
    let r = e.predict(&req("u4", 20)).unwrap();
    assert!(!r.cold_start);
    assert_eq!(r.items.len(), 20);
    assert!(r.items.iter().all(|it| !seen.contains(&it.item_id)));
    assert!(r.items.windows(2).all(|w| w[0].score >= w[1].score));
    // Retrieval really searched the clustered catalogue: the returned items'
    // retrieval scores are the top of the two-tower ordering.
    let retrieved = e.retrieve("u4", 100, &[]).unwrap();
    assert!(retrieved
        .items
        .windows(2)
        .all(|w| w[0].score >= w[1].score - 1e-6));
    assert!(e.predict(&req("stranger", 5)).unwrap().cold_start);
}

/// Every Predict stage is recorded once, in pipeline order, back to back
/// where they run on one thread; the response's timings are derived from
/// them; the registered counters move with what the requests did.
#[test]
fn stages_and_counters_follow_the_requests() {
    use cascade_core::{CacheUse, EngineConfig, EngineMetrics, Stage, StageTimings};
    let (_root, dir) = artifact();
    let registry = prometheus::Registry::new();
    let cfg = EngineConfig {
        metrics: EngineMetrics::register(&registry).unwrap(),
        ..Default::default()
    };
    let events = std::sync::Arc::new(cascade_core::EventStore::in_memory());
    let e = Engine::load_with(&dir, &Device::Cpu, cfg.clone(), events).unwrap();
    let r = e.predict(&req("u3", 5)).unwrap();
    let names: Vec<&str> = r.stages.iter().map(|s| s.stage.name()).collect();
    assert_eq!(
        names,
        [
            "user_state",
            "retrieval",
            "feature_assembly",
            "rank_queue",
            "rank_forward",
            "merge"
        ]
    );
    assert_eq!(
        r.stages[0].stage,
        Stage::UserState {
            cache: CacheUse::Miss
        }
    );
    // Same-thread stages are contiguous; the queue starts where features end.
    assert_eq!(r.stages[0].end(), r.stages[1].start);
    assert_eq!(r.stages[1].end(), r.stages[2].start);
    assert!(r.stages[3].start >= r.stages[2].end());
    assert!(r.stages[4].start >= r.stages[3].end());
    assert!(r.stages[5].start >= r.stages[4].end());
    let Stage::Retrieval {
        candidates,
        bloom_checked,
        bloom_rejected,
        ..
    } = r.stages[1].stage
    else {
        panic!("{:?}", r.stages[1]);
    };
    assert_eq!(candidates, 40);
    // u3 has training interactions: the walk met some and the filter dropped them.
    assert!(bloom_checked > candidates && bloom_rejected > 0, "{r:?}");
    let Stage::RankForward {
        batch_rows,
        batch_requests,
    } = r.stages[4].stage
    else {
        panic!("{:?}", r.stages[4]);
    };
    assert_eq!((batch_rows, batch_requests), (40, 1));
    let total = std::time::Duration::from_micros(r.timings.total_us);
    assert_eq!(
        StageTimings::from_spans(&r.stages, total),
        r.timings,
        "timings must be the spans' sums"
    );
    assert!(r.timings.ranking_us >= r.timings.rank_queue_us);

    assert!(e.predict(&req("u3", 5)).unwrap().user_cache_hit);
    let cold = e.predict(&req("nobody", 5)).unwrap();
    let cold_names: Vec<&str> = cold.stages.iter().map(|s| s.stage.name()).collect();
    assert_eq!(cold_names, ["retrieval", "merge"]);
    e.record_events(&[viewed("u3", &r.items[0].item_id)])
        .unwrap();

    let m = &cfg.metrics;
    assert_eq!(m.user_cache.with_label_values(&["miss"]).get(), 1);
    assert_eq!(m.user_cache.with_label_values(&["hit"]).get(), 1);
    assert_eq!(
        m.bloom_rejected.get(),
        2 * u64::from(bloom_rejected),
        "two identical retrievals"
    );
    assert_eq!(m.batch_rows.get_sample_count(), 2);
    assert_eq!(m.batch_rows.get_sample_sum(), 80.0);
    assert_eq!(m.events_recorded.get(), 1);
    let families = registry.gather();
    assert!(families
        .iter()
        .any(|f| f.name() == "cascade_bloom_rejected_total"));
}

/// The temporal protocol answers through `Engine::predict` on an artifact
/// built without the held-out data: nobody is shown what they already have,
/// new users are personalised by their events, and the planted taste makes
/// the cascade beat popularity (which is flat across clusters here).
#[test]
fn temporal_protocol_is_measured_on_the_served_path() {
    let (ds, text) = planted_data();
    let (cfg, opts) = (train_cfg(), run_opts());
    let tcfg = cascade_eval::TemporalConfig {
        new_users: 0.2,
        ..Default::default()
    };
    let work = tempfile::tempdir().unwrap();
    let r =
        cascade_eval::temporal_protocol(&ds, &text, &cfg, &opts, &tcfg, work.path(), &Device::Cpu)
            .unwrap();
    assert_eq!(r.users_evaluated, 96, "every user left holds out something");
    assert_eq!(r.new_users_evaluated, 24);
    assert_eq!(r.new_users_personalized, 24);
    assert_eq!(r.train_interactions + r.test_interactions, 96 * 25);
    for m in [
        &r.popularity,
        &r.two_tower,
        &r.cascade,
        &r.new_users_popularity,
        &r.new_users_two_tower,
        &r.new_users_cascade,
    ] {
        assert_eq!(m.already_interacted, 0, "{r:#?}");
    }
    assert!(
        r.cascade.ndcg_at_10 > 1.5 * r.popularity.ndcg_at_10,
        "{r:#?}"
    );
    assert!(
        r.new_users_cascade.ndcg_at_10 > 1.5 * r.new_users_popularity.ndcg_at_10,
        "{r:#?}"
    );
    assert!(r.cascade.coverage_at_10 > r.popularity.coverage_at_10);
}

/// The exact scan (the path for catalogues this small) answers every user of
/// the fixture exactly as the HNSW walk does: the same items in the same
/// order with bit-identical scores, for the default answer and for every
/// candidate, and for an unknown user personalised by context.
#[test]
fn the_exact_scan_answers_as_the_graph_walk_for_every_user() {
    use cascade_core::{EngineConfig, Stage};
    use cascade_retrieval::SearchPath;
    let (_root, dir) = artifact();
    let load = |path| {
        let cfg = EngineConfig {
            search_path: Some(path),
            ..Default::default()
        };
        let events = std::sync::Arc::new(cascade_core::EventStore::in_memory());
        Engine::load_with(&dir, &Device::Cpu, cfg, events).unwrap()
    };
    let (exact, walk) = (load(SearchPath::Exact), load(SearchPath::Hnsw));
    let (_, items, _) = exact.shape();
    let mut requests: Vec<PredictRequest> = Vec::new();
    for n in 0..120 {
        requests.push(req(&format!("u{n}"), 10));
        requests.push(req(&format!("u{n}"), 40));
    }
    requests.push(PredictRequest {
        context_item_ids: vec!["i7".into(), "i90".into()],
        ..req("nobody", 40)
    });
    for r in &requests {
        let (a, b) = (exact.predict(r).unwrap(), walk.predict(r).unwrap());
        assert!(!a.cold_start, "{}", r.user_id);
        assert_eq!(a.items.len(), r.num_results);
        assert_eq!(b.items.len(), r.num_results);
        let Stage::Retrieval { bloom_checked, .. } = a.stages[1].stage else {
            panic!("{:?}", a.stages);
        };
        if r.context_item_ids.is_empty() {
            // Asked best first until the candidates are full, not per item.
            assert!(
                (40..items).contains(&(bloom_checked as usize)),
                "{bloom_checked} checks"
            );
        }
        for (x, y) in a.items.iter().zip(&b.items) {
            assert_eq!(x.item_id, y.item_id, "{}: {a:?} vs {b:?}", r.user_id);
            assert_eq!(x.score.to_bits(), y.score.to_bits());
            assert_eq!(x.retrieval_score.to_bits(), y.retrieval_score.to_bits());
            assert_eq!(x.predicted_rating.to_bits(), y.predicted_rating.to_bits());
        }
    }
}
