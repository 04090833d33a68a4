//! A real tonic server and client over TCP: Predict, validation errors as
//! INVALID_ARGUMENT naming the field, GetModelInfo, health, graceful shutdown.

use std::sync::Arc;

use candle_core::Device;
use cascade_core::Engine;
use cascade_data::synthetic::planted;
use cascade_retrieval::IndexParams;
use cascade_server::pb::cascade_client::CascadeClient;
use cascade_server::pb::{
    Event, GetModelInfoRequest, PredictRequest, RankRequest, RecordEventsRequest, RetrieveRequest,
};
use cascade_train::pipeline;
use cascade_train::train::TrainConfig;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A Predict request for `user` with `k` results and defaults elsewhere.
fn predict_req(user: &str, k: u32) -> PredictRequest {
    PredictRequest {
        user_id: user.into(),
        num_results: k,
        ..Default::default()
    }
}

fn engine(root: &std::path::Path) -> Engine {
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
    let (_, dir, _) =
        pipeline::train_artifact(root, &ds, &text, &cfg, &opts, &Device::Cpu).unwrap();
    Engine::load(&dir, &Device::Cpu).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_round_trip() {
    let root = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine(root.path()));
    let version = engine.model_version().to_string();
    let listener = cascade_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cascade_server::serve(
        engine.clone(),
        "cpu".into(),
        64,
        listener,
        async {
            let _ = stop_rx.await;
        },
    ));

    let url = format!("http://{addr}");
    let mut client = CascadeClient::connect(url.clone()).await.unwrap();
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
            exclude_item_ids: vec![],
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
        .record_events(RecordEventsRequest {
            events: vec![Event {
                user_id: "u3".into(),
                item_id: first.clone(),
                kind: "view".into(),
                timestamp: 1,
            }],
        })
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
        .record_events(RecordEventsRequest {
            events: vec![Event {
                user_id: "u3".into(),
                item_id: "nope".into(),
                kind: "view".into(),
                timestamp: 1,
            }],
        })
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
    let svc = cascade_server::CascadeService::new(engine, "cpu".into(), 1);
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

    stop_tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("server did not drain")
        .unwrap()
        .unwrap();
}
