//! What a hostile or careless client sends, over the wire to a real server:
//! each is refused with INVALID_ARGUMENT naming what is wrong, and the
//! server goes on answering.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use cascade_proto::pb::{Event, RecordEventsRequest, RetrieveRequest};
use cascade_server::{Admission, Backend, Role};
use tonic::Code;

mod support;
use support::*;

fn with_timeout<T>(msg: T, header: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("grpc-timeout", header.parse().unwrap());
    r
}

fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, names: &str) {
    let e = r.expect_err("must be refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(names), "{names}: {}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_timeouts_are_refused_not_panicked_on() {
    let server = start(
        Backend::Local(handle(shared_artifact())),
        Role::All,
        Admission::new(64),
    )
    .await;
    let mut client = server.client().await;
    // u64::MAX seconds once overflowed `Instant + Duration` on the request path.
    for header in ["18446744073709551615S", "123456789m", "10", "5x", "-1S"] {
        refused(
            client
                .predict(with_timeout(predict_req("u1", 3), header))
                .await,
            Code::InvalidArgument,
            "grpc-timeout",
        );
        refused(
            client
                .record_events(with_timeout(viewed("u1", "i1"), header))
                .await,
            Code::InvalidArgument,
            "grpc-timeout",
        );
    }
    // The longest deadline the spec allows is served.
    let ok = client
        .predict(with_timeout(predict_req("u1", 3), "99999999H"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.items.len(), 3);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_out_of_range_fields_name_their_field() {
    let server = start(
        Backend::Local(handle(shared_artifact())),
        Role::All,
        Admission::new(64),
    )
    .await;
    let mut client = server.client().await;
    let long = "x".repeat(257);
    refused(
        client.predict(predict_req(&long, 3)).await,
        Code::InvalidArgument,
        "user_id",
    );
    let mut p = predict_req("u1", 3);
    p.exclude_item_ids = vec!["i1".into(), long.clone()];
    refused(
        client.predict(p).await,
        Code::InvalidArgument,
        "exclude_item_ids",
    );
    refused(
        client
            .retrieve(RetrieveRequest {
                user_id: "u1".into(),
                num_candidates: 10,
                exclude_item_ids: vec![long.clone()],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "exclude_item_ids",
    );
    let event = |user: &str, kind: &str, timestamp: i64| RecordEventsRequest {
        events: vec![Event {
            user_id: user.into(),
            item_id: "i1".into(),
            kind: kind.into(),
            timestamp,
        }],
    };
    for (req, field) in [
        (event(&long, "view", 1), "events.user_id"),
        (event("u1", &"k".repeat(65), 1), "events.kind"),
        (event("u1", "view", -1), "events.timestamp"),
        (event("u1", "view", i64::MAX), "events.timestamp"),
    ] {
        refused(
            client.record_events(req).await,
            Code::InvalidArgument,
            field,
        );
    }
    // At the limits: accepted.
    let at_limit = event(&"y".repeat(256), &"k".repeat(64), 253_402_300_799);
    assert_eq!(
        client
            .record_events(at_limit)
            .await
            .unwrap()
            .into_inner()
            .accepted,
        1
    );
    assert_eq!(
        client
            .predict(predict_req("u1", 3))
            .await
            .unwrap()
            .into_inner()
            .items
            .len(),
        3
    );
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_hold_the_drain_past_its_bound() {
    use tokio::io::AsyncWriteExt;
    let listener = cascade_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = cascade_server::Connections {
        drain_timeout: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let server = start_with(
        listener,
        Backend::Local(handle(shared_artifact())),
        Role::All,
        Admission::new(64),
        Default::default(),
        connections,
    );
    let mut client = server.client().await;
    client.predict(predict_req("u1", 3)).await.unwrap();
    // One peer that connected and never spoke, one that stopped halfway
    // through the HTTP/2 preface: neither will ever answer a GOAWAY.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let t0 = std::time::Instant::now();
    server.shut().await;
    let took = t0.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_the_clients_error_and_are_counted() {
    let registry = prometheus::Registry::new();
    let metrics = cascade_server::ServerMetrics::register(&registry).unwrap();
    let server = start_observed(
        Backend::Local(handle(shared_artifact())),
        Role::All,
        Admission::new(64),
        cascade_server::Telemetry::new(Some(metrics.clone()), None),
    )
    .await;
    let mut raw = RawClient::connect(&server.url).await;
    let before = cascade_proto::codec::decode_failures();
    let bad: [&[u8]; 3] = [
        &[0x0a, 0x02, 0xff, 0xfe], // user_id: two bytes that are not UTF-8
        &[0x0a, 0x64, 0x61],       // user_id: claims 100 bytes, has 1
        &[0xff],                   // a tag whose varint never ends
    ];
    for rpc in ["Predict", "Rank", "Retrieve", "RecordEvents"] {
        for bytes in bad {
            let r = raw.call(rpc, bytes.to_vec()).await;
            refused(r, Code::InvalidArgument, "does not decode");
        }
    }
    assert!(cascade_proto::codec::decode_failures() >= before + 12);
    // The observation layer sees them too: each RPC's InvalidArgument count.
    for rpc in ["Predict", "Rank", "Retrieve", "RecordEvents"] {
        let n = metrics
            .handled
            .with_label_values(&["unary", "cascade.v1.Cascade", rpc, "InvalidArgument"])
            .get();
        assert_eq!(n, 3, "{rpc}");
    }
    // Well-formed bytes still work on the same connection.
    let ok = server.client().await.predict(predict_req("u1", 2)).await;
    assert_eq!(ok.unwrap().into_inner().items.len(), 2);
    server.shut().await;
}
