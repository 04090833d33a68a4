//! A real tonic server and client over TCP: Predict, validation errors as
//! INVALID_ARGUMENT naming the field, GetModelInfo, health, deadlines,
//! overload, reloads under load, split roles, graceful shutdown, traces and
//! metrics. Tests that only read the model share one artifact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use cascade_core::{BatchConfig, Engine, EngineConfig, EngineHandle, EventStore};
use cascade_proto::pb::cascade_client::CascadeClient;
use cascade_proto::pb::{
    Context, GetModelInfoRequest, PredictRequest, RankRequest, ReloadModelRequest, RetrieveRequest,
};
use cascade_retrieval::IndexParams;
use cascade_server::{Admission, Backend, Role};
use cascade_train::pipeline;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

mod support;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_users_get_history_answers_and_new_users_popularity() {
    let server = start_shared(Admission::new(64)).await;
    let mut client = server.client().await;
    let resp = client
        .predict(predict_req("u3", 7))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.items.len(), 7);
    assert_eq!(
        resp.model_version,
        handle(shared_artifact()).current().model_version()
    );
    assert!(!resp.cold_start);
    assert_eq!(
        resp.personalized_by,
        cascade_proto::pb::PersonalizedBy::History as i32
    );
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
    assert_eq!(
        cold.personalized_by,
        cascade_proto::pb::PersonalizedBy::Popularity as i32
    );
    assert!(cold.items.iter().all(|it| it.retrieval_score.is_none()));
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_predict_requests_are_invalid_argument_naming_the_field() {
    let server = start_shared(Admission::new(64)).await;
    let mut client = server.client().await;
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
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_keeps_input_order_and_refuses_unknown_items() {
    let server = start_shared(Admission::new(64)).await;
    let mut client = server.client().await;
    let top = client
        .predict(predict_req("u3", 7))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = top
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
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_model_info_and_health_describe_the_served_model() {
    let server = start_shared(Admission::new(64)).await;
    let mut client = server.client().await;
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

    let channel = tonic::transport::Channel::from_shared(server.url.clone())
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
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_event_is_excluded_from_the_next_predict() {
    let server = start_shared(Admission::new(64)).await;
    let mut client = server.client().await;
    let before = client
        .predict(predict_req("u3", 7))
        .await
        .unwrap()
        .into_inner();
    let first = before.items[0].item_id.clone();
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
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadlines_are_refused() {
    let server = start_shared(Admission::new(64)).await;
    let mut client = server.client().await;
    // Over the wire the server answers DEADLINE_EXCEEDED, whether its
    // handler or its observation layer's timer fires first. tonic's client
    // also enforces the grpc-timeout it sends and may give up first with
    // its own CANCELLED "Timeout expired": that one carries the client's
    // transport error as its source, which nothing from the server does.
    for _ in 0..20 {
        let mut late = tonic::Request::new(predict_req("u3", 3));
        late.set_timeout(std::time::Duration::from_micros(1));
        let e = client.predict(late).await.expect_err("expired");
        let from_client = e.code() == tonic::Code::Cancelled
            && std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("transport"));
        assert!(
            e.code() == tonic::Code::DeadlineExceeded || from_client,
            "{e:?}"
        );
    }
    let mut ok = tonic::Request::new(predict_req("u3", 3));
    ok.set_timeout(std::time::Duration::from_secs(30));
    assert_eq!(
        client.predict(ok).await.unwrap().into_inner().items.len(),
        3
    );

    // The handler's deadline check, without the transport in between.
    let svc = cascade_server::CascadeService::new(
        Backend::Local(handle(shared_artifact())),
        Role::All,
        "cpu".into(),
    );
    let mut expired = tonic::Request::new(predict_req("u3", 3));
    expired
        .metadata_mut()
        .insert("grpc-timeout", "1u".parse().unwrap());
    let e = cascade_proto::pb::cascade_server::Cascade::predict(&svc, expired)
        .await
        .expect_err("expired");
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_operator_rpcs_pass() {
    // With every in-flight permit taken, request RPCs are refused at once by
    // the admission layer; operator RPCs pass.
    let admission = Admission::new(1);
    let server = start_shared(admission.clone()).await;
    let mut c = server.client().await;
    let held = admission.limiter().try_acquire_owned().unwrap();
    let e = c
        .predict(predict_req("u3", 3))
        .await
        .expect_err("overloaded");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("in flight"), "{}", e.message());
    c.get_model_info(GetModelInfoRequest {}).await.unwrap();
    drop(held);
    assert_eq!(
        c.predict(predict_req("u3", 3))
            .await
            .unwrap()
            .into_inner()
            .items
            .len(),
        3
    );
    assert_eq!(
        admission.in_flight(),
        0,
        "the permit is returned with the answer"
    );
    server.shut().await;
}

/// Steady Predict load from `workers` clients until `stop`; returns
/// (ok, failures as "code: message", model versions seen).
fn load(
    url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(usize, Vec<String>, std::collections::BTreeSet<String>)> {
    tokio::spawn(async move {
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
    let server = start(Backend::Local(h.clone()), Role::All, Admission::new(256)).await;
    let mut client = server.client().await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let traffic = load(server.url.clone(), 4, stop.clone(), ok.clone());
    // Each swap happens under traffic: wait for some answers before it.
    let answered = |n: usize| {
        let ok = ok.clone();
        move || ok.load(Ordering::Relaxed) >= n
    };
    until("traffic", Duration::from_secs(30), answered(10)).await;
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
        let seen = ok.load(Ordering::Relaxed);
        until(
            "traffic after the swap",
            Duration::from_secs(30),
            answered(seen + 10),
        )
        .await;
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
    let dir = shared_artifact().to_path_buf();
    let all = start(Backend::Local(handle(&dir)), Role::All, Admission::new(64)).await;
    let retrieval = start(
        Backend::Local(handle(&dir)),
        Role::Retrieval,
        Admission::new(64),
    )
    .await;
    let ranker = start(
        Backend::Local(handle(&dir)),
        Role::Ranker,
        Admission::new(64),
    )
    .await;
    let gw = cascade_server::Gateway::new(&retrieval.url, &ranker.url).unwrap();
    let gateway = start(gw.into(), Role::Gateway, Admission::new(64)).await;
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
        let ids = |r: &cascade_proto::pb::PredictResponse| -> Vec<String> {
            r.items.iter().map(|it| it.item_id.clone()).collect()
        };
        assert_eq!(ids(&got), ids(&want), "{req:?}");
        assert_eq!(got.cold_start, want.cold_start, "{req:?}");
        assert_eq!(got.personalized_by, want.personalized_by, "{req:?}");
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
    );
    let mut expired = tonic::Request::new(predict_req("u3", 3));
    expired
        .metadata_mut()
        .insert("grpc-timeout", "1u".parse().unwrap());
    let e = cascade_proto::pb::cascade_server::Cascade::predict(&svc, expired)
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
    let dir = shared_artifact().to_path_buf();
    // A long batching delay holds each Predict in the ranking queue, so
    // requests are surely in flight when shutdown starts.
    let cfg = EngineConfig {
        batch: BatchConfig {
            max_delay: Duration::from_millis(500),
            ..Default::default()
        },
        ..Default::default()
    };
    let engine = Engine::load_with(
        &dir,
        &Device::Cpu,
        cfg.clone(),
        Arc::new(EventStore::in_memory()),
    )
    .unwrap();
    let h = Arc::new(EngineHandle::from_engine(engine, &Device::Cpu, cfg));
    let admission = Admission::new(256);
    let server = start(Backend::Local(h), Role::All, admission.clone()).await;
    let mut calls = Vec::new();
    for u in 0..3 {
        let mut c = server.client().await;
        calls.push(tokio::spawn(async move {
            c.predict(predict_req(&format!("u{u}"), 5)).await
        }));
    }
    until("three requests in flight", Duration::from_secs(10), || {
        admission.in_flight() == 3
    })
    .await;
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
    let dir = shared_artifact().to_path_buf();
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
    let server = start(Backend::Local(h), Role::All, Admission::new(64)).await;
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
    let server = start(Backend::Local(h), Role::All, Admission::new(64)).await;
    let mut c = server.client().await;
    let after = c.predict(predict_req("u9", 5)).await.unwrap().into_inner();
    assert!(after.items.iter().all(|it| it.item_id != top));
    server.shut().await;
}

// ---------------------------------------------------------------- telemetry

mod otlp {
    //! OTLP receivers the tests export to: the collector's gRPC TraceService
    //! and the HTTP/protobuf `POST /v1/traces` endpoint.
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::Span;

    /// A received span with its service's name.
    #[derive(Debug, Clone)]
    pub struct Got {
        pub service: String,
        pub span: Span,
    }

    impl Got {
        pub fn attr(&self, key: &str) -> Option<Value> {
            self.span
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
        }
        pub fn micros(&self) -> u64 {
            (self.span.end_time_unix_nano - self.span.start_time_unix_nano) / 1000
        }
    }

    #[derive(Clone, Default)]
    pub struct Sink(pub Arc<Mutex<Vec<Got>>>);

    impl Sink {
        fn take(&self, req: ExportTraceServiceRequest) {
            let mut all = self.0.lock().unwrap();
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.clone()?.value)
                    .map(|v| match v {
                        Value::StringValue(s) => s,
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        all.push(Got {
                            service: service.clone(),
                            span,
                        });
                    }
                }
            }
        }
        pub fn spans(&self) -> Vec<Got> {
            self.0.lock().unwrap().clone()
        }
    }

    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.take(req.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// An OTLP/gRPC receiver on an ephemeral port: (endpoint, sink).
    pub async fn grpc() -> (String, Sink) {
        let sink = Sink::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let svc = TraceServiceServer::new(sink.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (url, sink)
    }

    /// An OTLP/HTTP (protobuf) receiver on an ephemeral port: (endpoint, sink).
    pub async fn http() -> (String, Sink) {
        use prost::Message;
        let sink = Sink::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let s = sink.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let s = s.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(req) => {
                            s.take(req);
                            (axum::http::StatusCode::OK, Vec::new())
                        }
                        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, sink)
    }
}

fn tracer(
    endpoint: &str,
    protocol: cascade_server::telemetry::OtlpProtocol,
    service: &str,
) -> opentelemetry_sdk::trace::SdkTracerProvider {
    cascade_server::TraceConfig {
        endpoint: Some(endpoint.into()),
        protocol,
        service_name: service.into(),
        sample_ratio: None,
        attributes: vec![],
    }
    .provider()
    .unwrap()
    .expect("an endpoint turns tracing on")
}

async fn flush(providers: &[&opentelemetry_sdk::trace::SdkTracerProvider]) {
    for p in providers {
        let p = (*p).clone();
        tokio::task::spawn_blocking(move || p.force_flush().unwrap())
            .await
            .unwrap();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One Predict through gateway + retrieval + ranker, each exporting to the
/// same OTLP receiver as its own service: one trace, continuing the caller's
/// `traceparent`, with every parent link right; then a call without one
/// starts a fresh trace that still spans the three services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_gateway_retrieval_and_ranker() {
    use cascade_server::telemetry::OtlpProtocol::Grpc;
    use cascade_server::Telemetry;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let dir = shared_artifact().to_path_buf();
    let (endpoint, sink) = otlp::grpc().await;
    let p_retrieval = tracer(&endpoint, Grpc, "cascade-retrieval");
    let p_ranker = tracer(&endpoint, Grpc, "cascade-ranker");
    let p_gateway = tracer(&endpoint, Grpc, "cascade-gateway");
    let gw_registry = prometheus::Registry::new();
    let gw_metrics = cascade_server::ServerMetrics::register(&gw_registry).unwrap();
    let retrieval = start_observed(
        Backend::Local(handle(&dir)),
        Role::Retrieval,
        Admission::new(64),
        Telemetry::new(None, Some(&p_retrieval)),
    )
    .await;
    let ranker = start_observed(
        Backend::Local(handle(&dir)),
        Role::Ranker,
        Admission::new(64),
        Telemetry::new(None, Some(&p_ranker)),
    )
    .await;
    let gw = cascade_server::Gateway::new(&retrieval.url, &ranker.url).unwrap();
    let gateway = start_observed(
        gw.into(),
        Role::Gateway,
        Admission::new(64),
        Telemetry::new(Some(gw_metrics.clone()), Some(&p_gateway)),
    )
    .await;
    let mut g = gateway.client().await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(predict_req("u3", 5));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01")
            .parse()
            .unwrap(),
    );
    let resp = g.predict(req).await.unwrap().into_inner();
    assert_eq!(resp.items.len(), 5);
    flush(&[&p_gateway, &p_retrieval, &p_ranker]).await;

    let spans = sink.spans();
    let named = |service: &str, name: &str| -> otlp::Got {
        let hits: Vec<&otlp::Got> = spans
            .iter()
            .filter(|s| s.service == service && s.span.name == name)
            .collect();
        assert_eq!(hits.len(), 1, "{service} {name}: {spans:#?}");
        hits[0].clone()
    };
    assert!(
        spans.iter().all(|s| hex(&s.span.trace_id) == caller_trace),
        "every span continues the caller's trace: {spans:#?}"
    );
    let server = named("cascade-gateway", "cascade.v1.Cascade/Predict");
    assert_eq!(hex(&server.span.parent_span_id), caller_span);
    assert_eq!(server.span.kind, SpanKind::Server as i32);
    assert_eq!(
        server.attr("rpc.system"),
        Some(Value::StringValue("grpc".into()))
    );
    assert_eq!(
        server.attr("rpc.method"),
        Some(Value::StringValue("Predict".into()))
    );
    assert_eq!(
        server.attr("rpc.grpc.status_code"),
        Some(Value::IntValue(0))
    );
    let merge = named("cascade-gateway", "cascade.merge");
    assert_eq!(merge.span.parent_span_id, server.span.span_id);
    for (rpc, service, stages) in [
        (
            "Retrieve",
            "cascade-retrieval",
            &["cascade.user_state", "cascade.retrieval"][..],
        ),
        (
            "Rank",
            "cascade-ranker",
            &[
                "cascade.user_state",
                "cascade.feature_assembly",
                "cascade.rank_queue",
                "cascade.rank_forward",
                "cascade.merge",
            ][..],
        ),
    ] {
        let name = format!("cascade.v1.Cascade/{rpc}");
        let client = named("cascade-gateway", &name);
        assert_eq!(client.span.kind, SpanKind::Client as i32);
        assert_eq!(client.span.parent_span_id, server.span.span_id, "{rpc}");
        let downstream = named(service, &name);
        assert_eq!(downstream.span.kind, SpanKind::Server as i32);
        assert_eq!(
            downstream.span.parent_span_id, client.span.span_id,
            "{service}'s server span hangs off the gateway's client span"
        );
        for stage in stages {
            let st = named(service, stage);
            assert_eq!(st.span.parent_span_id, downstream.span.span_id, "{stage}");
            assert!(
                st.span.start_time_unix_nano >= downstream.span.start_time_unix_nano
                    && st.span.end_time_unix_nano <= downstream.span.end_time_unix_nano,
                "{stage} lies inside its RPC"
            );
        }
    }
    let fwd = named("cascade-ranker", "cascade.rank_forward");
    assert_eq!(fwd.attr("cascade.batch.rows"), Some(Value::IntValue(30)));
    assert_eq!(
        fwd.attr("cascade.device"),
        Some(Value::StringValue("cpu".into()))
    );
    let client_ok = |rpc: &str| {
        gw_metrics
            .client_handled
            .with_label_values(&["unary", "cascade.v1.Cascade", rpc, "OK"])
            .get()
    };
    assert_eq!((client_ok("Retrieve"), client_ok("Rank")), (1, 1));

    // No caller context: the gateway starts the trace, the stages join it.
    let before = sink.spans().len();
    g.predict(predict_req("u4", 5)).await.unwrap();
    flush(&[&p_gateway, &p_retrieval, &p_ranker]).await;
    let fresh: Vec<otlp::Got> = sink.spans().split_off(before);
    let root_span = fresh
        .iter()
        .find(|s| s.span.name == "cascade.v1.Cascade/Predict")
        .expect("gateway server span");
    assert!(
        root_span.span.parent_span_id.is_empty(),
        "a new trace's root"
    );
    let services: std::collections::BTreeSet<&str> =
        fresh.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["cascade-gateway", "cascade-ranker", "cascade-retrieval"]
    );
    assert!(fresh
        .iter()
        .all(|s| s.span.trace_id == root_span.span.trace_id));
    assert_ne!(hex(&root_span.span.trace_id), caller_trace);
    gateway.shut().await;
    retrieval.shut().await;
    ranker.shut().await;
}

/// All-in-one over OTLP/HTTP: the response's stage timings, the exported
/// stage spans and the Prometheus stage histograms are the same numbers;
/// the per-RPC series count what happened, by code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings_spans_and_histograms_agree() {
    use cascade_server::telemetry::OtlpProtocol::HttpProtobuf;
    let dir = shared_artifact().to_path_buf();
    let (endpoint, sink) = otlp::http().await;
    let provider = tracer(&endpoint, HttpProtobuf, "cascade-all");
    let registry = prometheus::Registry::new();
    let metrics = cascade_server::ServerMetrics::register(&registry).unwrap();
    let server = start_observed(
        Backend::Local(handle(&dir)),
        Role::All,
        Admission::new(64),
        cascade_server::Telemetry::new(Some(metrics.clone()), Some(&provider)),
    )
    .await;
    let mut c = server.client().await;
    let resp = c.predict(predict_req("u5", 5)).await.unwrap().into_inner();
    let bad = c.predict(predict_req("u5", 0)).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    flush(&[&provider]).await;
    let t = resp.timings.unwrap();
    let spans = sink.spans();
    let stage = |name: &str| {
        spans
            .iter()
            .find(|s| s.span.name == format!("cascade.{name}"))
            .unwrap_or_else(|| panic!("no {name} span: {spans:#?}"))
            .clone()
    };
    assert!(spans.iter().all(|s| s.service == "cascade-all"));
    assert_eq!(stage("user_state").micros(), t.user_state_us);
    assert_eq!(stage("retrieval").micros(), t.retrieval_us);
    assert_eq!(stage("rank_queue").micros(), t.rank_queue_us);
    for name in ["user_state", "retrieval", "rank_queue", "rank_forward"] {
        let h = metrics.stage.with_label_values(&[name]);
        assert_eq!(h.get_sample_count(), 1, "{name}");
        let span_ns = {
            let s = stage(name).span;
            s.end_time_unix_nano - s.start_time_unix_nano
        };
        assert!(
            (h.get_sample_sum() - span_ns as f64 / 1e9).abs() < 2e-9,
            "{name}: histogram {} s vs span {span_ns} ns",
            h.get_sample_sum()
        );
    }
    let handled = |code: &str| {
        metrics
            .handled
            .with_label_values(&["unary", "cascade.v1.Cascade", "Predict", code])
            .get()
    };
    assert_eq!((handled("OK"), handled("InvalidArgument")), (1, 1));
    let bad_span = spans
        .iter()
        .filter(|s| s.span.name == "cascade.v1.Cascade/Predict")
        .find(|s| {
            s.attr("rpc.grpc.status_code")
                == Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(3))
        })
        .expect("the rejected call has its span");
    // Semantic conventions: a caller's mistake is not a server error.
    assert_eq!(bad_span.span.status.as_ref().map_or(0, |s| s.code), 0);
    assert_eq!(metrics.in_flight.get(), 0);
    server.shut().await;
}
