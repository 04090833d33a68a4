//! A real tonic server and client over TCP: Predict, validation errors as
//! INVALID_ARGUMENT naming the field, GetModelInfo, health, graceful shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use cascade_core::{BatchConfig, Engine, EngineConfig, EngineHandle, EventStore};
use cascade_data::synthetic::planted;
use cascade_retrieval::IndexParams;
use cascade_server::pb::cascade_client::CascadeClient;
use cascade_server::pb::{
    Context, Event, GetModelInfoRequest, PredictRequest, RankRequest, RecordEventsRequest,
    ReloadModelRequest, RetrieveRequest,
};
use cascade_server::{Backend, Role, ServeOptions};
use cascade_train::pipeline;
use cascade_train::train::TrainConfig;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// One "view" event of `item` by `user`.
fn viewed(user: &str, item: &str) -> RecordEventsRequest {
    RecordEventsRequest {
        events: vec![Event {
            user_id: user.into(),
            item_id: item.into(),
            kind: "view".into(),
            timestamp: 1,
        }],
    }
}

/// A Predict request for `user` with `k` results and defaults elsewhere.
fn predict_req(user: &str, k: u32) -> PredictRequest {
    PredictRequest {
        user_id: user.into(),
        num_results: k,
        ..Default::default()
    }
}

/// Train a small artifact with planted structure under `root`.
fn trained(root: &std::path::Path) -> std::path::PathBuf {
    let ds = planted(80, 120, 4, 20, 4);
    let text: Vec<Vec<f32>> = (0..ds.items.len())
        .map(|i| (0..8).map(|j| ((i + j) % 5) as f32 / 5.0 - 0.5).collect())
        .collect();
    let cfg = TrainConfig {
        tt_epochs: 5,
        tt_batch: 256,
        ranker_epochs: 3,
        ranker_batch: 256,
        bpr_epochs: 1,
        hard_negative_pool: 20,
        history_len: 10,
        progress: false,
        ..Default::default()
    };
    let opts = pipeline::RunOptions {
        candidates: 30,
        with_rating: false,
        index: IndexParams::default(),
    };
    pipeline::train_artifact(root, &ds, &text, &cfg, &opts, &Device::Cpu)
        .unwrap()
        .1
}

fn handle(dir: &std::path::Path) -> Arc<EngineHandle> {
    let engine = Engine::load(dir, &Device::Cpu).unwrap();
    Arc::new(EngineHandle::from_engine(
        engine,
        &Device::Cpu,
        Default::default(),
    ))
}

/// A real server on an ephemeral port.
struct Running {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), cascade_server::ServerError>>,
}

async fn start(backend: Backend, role: Role, max_in_flight: usize) -> Running {
    let listener = cascade_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        role,
        device: "cpu".into(),
        max_in_flight,
        workers: cascade_server::default_workers(),
    };
    let task = tokio::spawn(cascade_server::serve(backend, opts, listener, async {
        let _ = stop_rx.await;
    }));
    Running { url, stop, task }
}

impl Running {
    async fn client(&self) -> CascadeClient<tonic::transport::Channel> {
        CascadeClient::connect(self.url.clone()).await.unwrap()
    }

    async fn shut(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not drain")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_round_trip() {
    let root = tempfile::tempdir().unwrap();
    let h = handle(&trained(root.path()));
    let version = h.current().model_version().to_string();
    let server = start(Backend::Local(h.clone()), Role::All, 64).await;
    let url = server.url.clone();
    let mut client = server.client().await;
    let resp = client
        .predict(predict_req("u3", 7))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.items.len(), 7);
    assert_eq!(resp.model_version, version);
    assert!(!resp.cold_start);
    assert!(resp.items.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(resp
        .items
        .iter()
        .all(|it| it.retrieval_score.is_some() && it.predicted_rating.is_some()));
    assert!(resp.timings.unwrap().total_us > 0);

    let cold = client
        .predict(predict_req("someone-new", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(cold.cold_start);
    assert!(cold.items.iter().all(|it| it.retrieval_score.is_none()));

    for (req, field) in [
        (
            PredictRequest {
                user_id: String::new(),
                num_results: 5,
                ..Default::default()
            },
            "user_id",
        ),
        (predict_req("u3", 0), "num_results"),
        (
            PredictRequest {
                user_id: "u3".into(),
                num_results: 5,
                num_candidates: 99_999,
                ..Default::default()
            },
            "num_candidates",
        ),
    ] {
        let e = client.predict(req).await.expect_err("must be rejected");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }

    // Rank: input order; an unknown item is rejected naming the field.
    let ids: Vec<String> = resp
        .items
        .iter()
        .rev()
        .map(|it| it.item_id.clone())
        .collect();
    let ranked = client
        .rank(RankRequest {
            user_id: "u3".into(),
            item_ids: ids.clone(),
            context: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ranked
            .items
            .iter()
            .map(|it| it.item_id.clone())
            .collect::<Vec<_>>(),
        ids
    );
    let e = client
        .rank(RankRequest {
            user_id: "u3".into(),
            item_ids: vec!["nope".into()],
            context: None,
        })
        .await
        .expect_err("unknown item");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("item_ids") && e.message().contains("nope"),
        "{}",
        e.message()
    );

    let retrieved = client
        .retrieve(RetrieveRequest {
            user_id: "u3".into(),
            num_candidates: 15,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retrieved.items.len(), 15);

    let info = client
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.num_users, info.num_items, info.embedding_dim),
        (80, 120, 64)
    );
    assert_eq!(info.device, "cpu");

    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "cascade.v1.Cascade"] {
        let s = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, ServingStatus::Serving as i32, "{service:?}");
    }

    // RecordEvents: the next Predict excludes the item.
    let first = resp.items[0].item_id.clone();
    let rec = client
        .record_events(viewed("u3", &first))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rec.accepted, 1);
    let after = client
        .predict(predict_req("u3", 7))
        .await
        .unwrap()
        .into_inner();
    assert!(after.items.iter().all(|it| it.item_id != first));
    let e = client
        .record_events(viewed("u3", "nope"))
        .await
        .expect_err("unknown item");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("events.item_id"), "{}", e.message());

    // Deadlines over the wire: an expired deadline fails. Whether the
    // handler (DEADLINE_EXCEEDED) or tonic's transport timer (CANCELLED,
    // "Timeout expired") answers first depends on when the request body
    // arrives, so both are accepted here; the handler's own answer is checked
    // deterministically below.
    let mut late = tonic::Request::new(predict_req("u3", 3));
    late.set_timeout(std::time::Duration::from_micros(1));
    let e = client.predict(late).await.expect_err("expired");
    assert!(
        e.code() == tonic::Code::DeadlineExceeded
            || (e.code() == tonic::Code::Cancelled && e.message().contains("Timeout expired")),
        "{e:?}"
    );
    let mut ok = tonic::Request::new(predict_req("u3", 3));
    ok.set_timeout(std::time::Duration::from_secs(30));
    assert_eq!(
        client.predict(ok).await.unwrap().into_inner().items.len(),
        3
    );

    // Overload: with every in-flight permit taken, requests are refused at once.
    let svc = cascade_server::CascadeService::new(Backend::Local(h), Role::All, "cpu".into(), 1);
    // The handler's deadline check, without the transport in between.
    let mut expired = tonic::Request::new(predict_req("u3", 3));
    expired
        .metadata_mut()
        .insert("grpc-timeout", "1u".parse().unwrap());
    let e = cascade_server::pb::cascade_server::Cascade::predict(&svc, expired)
        .await
        .expect_err("expired");
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    let held = svc.limiter().try_acquire_owned().unwrap();
    let req = || tonic::Request::new(predict_req("u3", 3));
    let e = cascade_server::pb::cascade_server::Cascade::predict(&svc, req())
        .await
        .expect_err("overloaded");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    drop(held);
    cascade_server::pb::cascade_server::Cascade::predict(&svc, req())
        .await
        .unwrap();

    server.shut().await;
}

/// Steady Predict load from `workers` clients until `stop`; returns
/// (ok, failures as "code: message", model versions seen).
fn load(
    url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>, std::collections::BTreeSet<String>)> {
    tokio::spawn(async move {
        let ok = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (url, stop, ok) = (url.clone(), stop.clone(), ok.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = CascadeClient::connect(url).await.unwrap();
                let mut failures = Vec::new();
                let mut versions = std::collections::BTreeSet::new();
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    n += workers;
                    match client
                        .predict(predict_req(&format!("u{}", n % 80), 5))
                        .await
                    {
                        Ok(r) => {
                            let r = r.into_inner();
                            assert_eq!(r.items.len(), 5);
                            versions.insert(r.model_version);
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (failures, versions)
            }));
        }
        let mut failures = Vec::new();
        let mut versions = std::collections::BTreeSet::new();
        for t in tasks {
            let (f, v) = t.await.unwrap();
            failures.extend(f);
            versions.extend(v);
        }
        (ok.load(Ordering::Relaxed), failures, versions)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request() {
    let root = tempfile::tempdir().unwrap();
    let first = trained(root.path());
    let h = handle(&first);
    let v1 = h.current().model_version().to_string();
    // A second version: the same models with another HNSW build.
    let params = IndexParams {
        ef_search: 64,
        ..IndexParams::default()
    };
    let (second, m2) = pipeline::reindex(&first, root.path(), params).unwrap();
    let v2 = m2.model_version.clone();
    assert_ne!(v1, v2);
    let server = start(Backend::Local(h.clone()), Role::All, 256).await;
    let mut client = server.client().await;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(server.url.clone(), 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir_name = |p: &std::path::Path| p.file_name().unwrap().to_str().unwrap().to_string();
    for (target, want) in [(dir_name(&second), &v2), (dir_name(&first), &v1)] {
        let r = client
            .reload_model(ReloadModelRequest { version: target })
            .await
            .unwrap()
            .into_inner();
        assert!(r.swapped);
        assert_eq!(&r.model_version, want);
        let info = client
            .get_model_info(GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&info.model_version, want);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Reloading what is serving is a no-op; an unknown version is NOT_FOUND
    // and leaves the serving version alone.
    let same = client
        .reload_model(ReloadModelRequest {
            version: dir_name(&first),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!same.swapped);
    let e = client
        .reload_model(ReloadModelRequest {
            version: "../elsewhere".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    stop.store(true, Ordering::Relaxed);
    let (ok, failures, versions) = traffic.await.unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok > 20, "only {ok} requests completed");
    assert!(
        versions.contains(&v1) && versions.contains(&v2),
        "{versions:?}"
    );

    // --watch: a version written later is picked up without a call.
    let _watcher = h.watch(Duration::from_millis(100)).unwrap();
    let (_, m3) = pipeline::reindex(&first, root.path(), IndexParams::default()).unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let info = client
            .get_model_info(GetModelInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        if info.model_version == m3.model_version {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "watcher never swapped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_roles_return_what_all_returns() {
    let root = tempfile::tempdir().unwrap();
    let dir = trained(root.path());
    let all = start(Backend::Local(handle(&dir)), Role::All, 64).await;
    let retrieval = start(Backend::Local(handle(&dir)), Role::Retrieval, 64).await;
    let ranker = start(Backend::Local(handle(&dir)), Role::Ranker, 64).await;
    let gw = cascade_server::Gateway::new(&retrieval.url, &ranker.url).unwrap();
    let gateway = start(gw.into(), Role::Gateway, 64).await;
    let mut a = all.client().await;
    let mut g = gateway.client().await;

    let ctx = |ids: &[&str]| {
        Some(Context {
            item_ids: ids.iter().map(|s| s.to_string()).collect(),
        })
    };
    let mut cases: Vec<PredictRequest> =
        (0..12).map(|u| predict_req(&format!("u{u}"), 10)).collect();
    cases.extend([
        predict_req("stranger", 8),
        PredictRequest {
            exclude_item_ids: vec!["i1".into(), "i5".into(), "no-such".into()],
            ..predict_req("u1", 10)
        },
        PredictRequest {
            candidate_item_ids: ["i3", "i7", "i3", "i11", "i2", "i40"]
                .map(String::from)
                .to_vec(),
            exclude_item_ids: vec!["i7".into()],
            ..predict_req("u2", 4)
        },
        PredictRequest {
            candidate_item_ids: ["i3", "i7", "i11", "i2"].map(String::from).to_vec(),
            ..predict_req("stranger", 3)
        },
        PredictRequest {
            context: ctx(&["i1", "i5", "i9"]),
            ..predict_req("stranger", 10)
        },
        PredictRequest {
            context: ctx(&["i2", "i6"]),
            ..predict_req("u4", 10)
        },
        // More results than the model's 30 default candidates.
        predict_req("u5", 45),
        PredictRequest {
            num_candidates: 50,
            ..predict_req("u6", 20)
        },
    ]);
    for req in cases {
        let want = a.predict(req.clone()).await.unwrap().into_inner();
        let got = g.predict(req.clone()).await.unwrap().into_inner();
        let ids = |r: &cascade_server::pb::PredictResponse| -> Vec<String> {
            r.items.iter().map(|it| it.item_id.clone()).collect()
        };
        assert_eq!(ids(&got), ids(&want), "{req:?}");
        assert_eq!(got.cold_start, want.cold_start, "{req:?}");
        assert_eq!(got.model_version, want.model_version);
        for (x, y) in got.items.iter().zip(&want.items) {
            assert!(
                (x.score - y.score).abs() <= 1e-5 * y.score.abs().max(1.0),
                "{req:?}"
            );
        }
        assert!(!want.items.is_empty());
    }

    // Bad input is rejected by the gateway naming the caller's field.
    for (req, field) in [
        (predict_req("u1", 0), "num_results"),
        (predict_req("", 3), "user_id"),
        (
            PredictRequest {
                candidate_item_ids: vec!["i1".into(), "no-such".into()],
                ..predict_req("u1", 3)
            },
            "candidate_item_ids",
        ),
    ] {
        let e = g.predict(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    // An expired deadline is not forwarded.
    let svc = cascade_server::CascadeService::new(
        cascade_server::Gateway::new(&retrieval.url, &ranker.url)
            .unwrap()
            .into(),
        Role::Gateway,
        "remote".into(),
        8,
    );
    let mut expired = tonic::Request::new(predict_req("u3", 3));
    expired
        .metadata_mut()
        .insert("grpc-timeout", "1u".parse().unwrap());
    let e = cascade_server::pb::cascade_server::Cascade::predict(&svc, expired)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);

    // Events through the gateway reach both stages: the next Predict skips the item.
    let top = g
        .predict(predict_req("u8", 5))
        .await
        .unwrap()
        .into_inner()
        .items[0]
        .item_id
        .clone();
    g.record_events(viewed("u8", &top)).await.unwrap();
    let after = g.predict(predict_req("u8", 5)).await.unwrap().into_inner();
    assert!(after.items.iter().all(|it| it.item_id != top));

    // A stage answers only its own calls.
    let mut r = retrieval.client().await;
    let e = r.predict(predict_req("u1", 3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    let info = g
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.role, "gateway");

    for s in [gateway, all, retrieval, ranker] {
        s.shut().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    let root = tempfile::tempdir().unwrap();
    let dir = trained(root.path());
    // A long batching delay holds each Predict in the ranking queue, so
    // requests are surely in flight when shutdown starts.
    let cfg = EngineConfig {
        batch: BatchConfig {
            max_delay: Duration::from_millis(500),
            ..Default::default()
        },
        ..Default::default()
    };
    let engine =
        Engine::load_with(&dir, &Device::Cpu, cfg, Arc::new(EventStore::in_memory())).unwrap();
    let h = Arc::new(EngineHandle::from_engine(engine, &Device::Cpu, cfg));
    let server = start(Backend::Local(h), Role::All, 256).await;
    let mut calls = Vec::new();
    for u in 0..3 {
        let mut c = server.client().await;
        calls.push(tokio::spawn(async move {
            c.predict(predict_req(&format!("u{u}"), 5)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let url = server.url.clone();
    server.shut().await;
    for c in calls {
        let r = c.await.unwrap().expect("an in-flight request was cut off");
        assert_eq!(r.into_inner().items.len(), 5);
    }
    assert!(
        CascadeClient::connect(url).await.is_err(),
        "still accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_server_restart_and_oversized_requests_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = trained(root.path());
    let log = root.path().join("events.log");
    let serving = |log: &std::path::Path| {
        let (events, replayed) = EventStore::open(log).unwrap();
        let engine =
            Engine::load_with(&dir, &Device::Cpu, Default::default(), Arc::new(events)).unwrap();
        (
            Arc::new(EngineHandle::from_engine(
                engine,
                &Device::Cpu,
                Default::default(),
            )),
            replayed,
        )
    };
    let (h, replayed) = serving(&log);
    assert_eq!(replayed, 0);
    let server = start(Backend::Local(h), Role::All, 64).await;
    let mut c = server.client().await;
    let top = c
        .predict(predict_req("u9", 5))
        .await
        .unwrap()
        .into_inner()
        .items[0]
        .item_id
        .clone();
    c.record_events(viewed("u9", &top)).await.unwrap();
    // More than the 4 MiB cap: refused by the codec, the server lives on.
    let huge = PredictRequest {
        exclude_item_ids: vec!["x".repeat(1024); 5 * 1024],
        ..predict_req("u9", 5)
    };
    let e = c.predict(huge).await.unwrap_err();
    // Tonic's codec answers OUT_OF_RANGE (documented in the proto).
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
    assert!(c.predict(predict_req("u9", 5)).await.is_ok());
    server.shut().await;

    // A new process on the same log: the event is replayed and still applies.
    let (h, replayed) = serving(&log);
    assert_eq!(replayed, 1);
    let server = start(Backend::Local(h), Role::All, 64).await;
    let mut c = server.client().await;
    let after = c.predict(predict_req("u9", 5)).await.unwrap().into_inner();
    assert!(after.items.iter().all(|it| it.item_id != top));
    server.shut().await;
}
