//! What a hostile or careless client sends, over the wire to a real server:
//! each is refused with INVALID_ARGUMENT naming what is wrong (or closed
//! when its bound passes), and the server goes on answering.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use cascade_proto::pb::{Event, RecordEventsRequest, RetrieveRequest};
use cascade_server::{Admission, Backend, Role};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

mod support;
use support::*;

fn with_timeout<T>(msg: T, header: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("grpc-timeout", header.parse().unwrap());
    r
}

/// How many items a Predict for `user` returned.
async fn served(
    client: &mut cascade_proto::pb::cascade_client::CascadeClient<tonic::transport::Channel>,
    user: &str,
    k: u32,
) -> usize {
    let resp = client.predict(predict_req(user, k)).await.unwrap();
    resp.into_inner().items.len()
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
    assert_eq!(served(&mut client, "u1", 3).await, 3);
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

/// Read until the server closes the connection; how long that took.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
    use tokio::io::AsyncReadExt;
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// A raw HTTP/2 connection (the h2 crate), to send what tonic never would.
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(conn))
}

fn grpc_call(rpc: &str, timeout: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost/cascade.v1.Cascade/{rpc}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", t);
    }
    b.body(()).unwrap()
}

/// The grpc-status of an answer: in its headers (trailers-only) or trailers.
async fn grpc_status(resp: h2::client::ResponseFuture) -> String {
    let resp = resp.await.unwrap();
    if let Some(s) = resp.headers().get("grpc-status") {
        return s.to_str().unwrap().to_string();
    }
    let mut body = resp.into_body();
    while let Some(d) = body.data().await {
        let n = d.unwrap().len();
        let _ = body.flow_control().release_capacity(n);
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    trailers["grpc-status"].to_str().unwrap().to_string()
}

/// One GetModelInfo (an empty message) over a raw HTTP/2 connection.
async fn model_info_ok(h2: &mut h2::client::SendRequest<bytes::Bytes>) {
    let (resp, mut body) = h2
        .send_request(grpc_call("GetModelInfo", None), false)
        .unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    assert_eq!(grpc_status(resp).await, "0");
}

fn observed() -> (
    Arc<cascade_server::ServerMetrics>,
    cascade_server::Telemetry,
) {
    let registry = prometheus::Registry::new();
    let m = cascade_server::ServerMetrics::register(&registry).unwrap();
    (m.clone(), cascade_server::Telemetry::new(Some(m), None))
}

async fn start_bounded(
    connections: cascade_server::Connections,
) -> (
    Running,
    std::net::SocketAddr,
    Arc<cascade_server::ServerMetrics>,
) {
    let listener = cascade_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (metrics, telemetry) = observed();
    let server = start_with(
        listener,
        Backend::Local(handle(shared_artifact())),
        Role::All,
        Admission::new(64),
        telemetry,
        connections,
    );
    (server, addr, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_trickling_and_idle_connections_are_closed_by_their_bounds() {
    use tokio::io::AsyncWriteExt;
    let (server, addr, metrics) = start_bounded(cascade_server::Connections {
        handshake_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(800),
        keepalive_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    // Never speaks; stops halfway through the preface.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Sends the preface and SETTINGS, then a HEADERS frame a byte at a time.
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    trickle
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (mut trickle_rd, mut trickle_wr) = trickle.into_split();
    let dribble = tokio::spawn(async move {
        for b in b"\0\0\x40\x01\x04\0\0\0\x01"
            .iter()
            .chain([0x83u8; 64].iter())
        {
            if trickle_wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A well-behaved client: one call, then nothing.
    let (mut h2, conn) = h2_connect(addr).await;
    model_info_ok(&mut h2).await;
    let last_call = Instant::now();

    let t = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(t >= Duration::from_millis(300), "silent closed after {t:?}");
    closed_within(&mut partial, Duration::from_secs(5)).await;
    let mut buf = Vec::new();
    let trickled = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        let _ = trickle_rd.read_to_end(&mut buf).await;
    })
    .await;
    assert!(trickled.is_ok(), "the header trickler is still connected");
    // The idle client got a GOAWAY and its connection ended cleanly, and
    // not before it had been idle for the bound.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle connection was not closed")
        .unwrap()
        .unwrap();
    let idle = last_call.elapsed();
    assert!(idle >= Duration::from_millis(700), "closed after {idle:?}");
    dribble.abort();

    let closed = |why: &str| metrics.connections_closed.with_label_values(&[why]).get();
    // The server counts a close just after the peer sees it.
    until("the closes counted", Duration::from_secs(2), || {
        closed("handshake_timeout") == 2 && closed("idle_timeout") == 2
    })
    .await;
    // The server goes on serving new connections.
    let mut client = server.client().await;
    assert_eq!(served(&mut client, "u1", 2).await, 2);
    until(
        "only the client's connection open",
        Duration::from_secs(2),
        || metrics.connections_open.get() == 1,
    )
    .await;
    drop(client);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_comes_is_deadline_exceeded() {
    let (server, addr, metrics) = start_bounded(cascade_server::Connections {
        request_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let (mut h2, _conn) = h2_connect(addr).await;
    // Headers sent, body never: the caller's deadline, then the server's
    // bound for a caller that sent none. Both are DEADLINE_EXCEEDED (4),
    // not CANCELLED.
    for (timeout, at_least) in [(Some("200m"), 150), (None, 450)] {
        let t0 = Instant::now();
        let (resp, _body) = h2
            .send_request(grpc_call("Predict", timeout), false)
            .unwrap();
        assert_eq!(grpc_status(resp).await, "4", "{timeout:?}");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(at_least) && took < Duration::from_secs(5),
            "{timeout:?}: {took:?}"
        );
    }
    let exceeded = metrics
        .handled
        .with_label_values(&["unary", "cascade.v1.Cascade", "Predict", "DeadlineExceeded"])
        .get();
    assert_eq!(exceeded, 2);
    // Requests whose deadline passes around their model work: answered or
    // DEADLINE_EXCEEDED, never anything else. (Raw HTTP/2: tonic's client
    // would race the server with a timer of its own.)
    let msg = prost::Message::encode_to_vec(&cascade_proto::pb::RankRequest {
        user_id: "u1".into(),
        item_ids: (0..120).map(|i| format!("i{i}")).collect(),
        ..Default::default()
    });
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let frame = bytes::Bytes::from(frame);
    let mut seen = std::collections::BTreeMap::new();
    for t in ["100u", "300u", "1m", "2m", "5m"].repeat(6) {
        let (resp, mut body) = h2.send_request(grpc_call("Rank", Some(t)), false).unwrap();
        body.send_data(frame.clone(), true).unwrap();
        *seen.entry(grpc_status(resp).await).or_insert(0) += 1;
    }
    assert!(
        seen.keys().all(|k| k == "0" || k == "4"),
        "codes seen: {seen:?}"
    );
    assert_eq!(seen.values().sum::<i32>(), 30);
    println!("Rank at 0.1-5 ms deadlines, grpc-status counts: {seen:?}");
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_once() {
    let (server, addr, metrics) = start_bounded(cascade_server::Connections {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
    until("both connections accepted", Duration::from_secs(5), || {
        metrics.connections_open.get() == 2
    })
    .await;
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    closed_within(&mut c, Duration::from_secs(2)).await;
    assert_eq!(
        metrics
            .connections_closed
            .with_label_values(&["limit"])
            .get(),
        1
    );
    // A slot frees when a peer leaves.
    drop(a);
    until(
        "the closed connection's slot is free",
        Duration::from_secs(5),
        || metrics.connections_open.get() == 1,
    )
    .await;
    let mut client = server.client().await;
    assert!(client.predict(predict_req("u1", 2)).await.is_ok());
    drop(client);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_gets_a_goaway_and_its_client_reconnects() {
    let (server, addr, metrics) = start_bounded(cascade_server::Connections {
        max_age: Some(Duration::from_millis(600)),
        max_age_grace: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let (mut h2, conn) = h2_connect(addr).await;
    let t0 = Instant::now();
    model_info_ok(&mut h2).await;
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the old connection was not closed")
        .unwrap()
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let aged = || {
        metrics
            .connections_closed
            .with_label_values(&["max_age"])
            .get()
    };
    until("the close counted", Duration::from_secs(2), || aged() == 1).await;
    // tonic's channel reconnects after the GOAWAY: calls keep succeeding.
    let mut client = server.client().await;
    let until_t = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until_t {
        client.predict(predict_req("u1", 2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(aged() >= 2, "{}", aged());
    drop(client);
    server.shut().await;
}

#[path = "../../cascade-core/tests/support/corrupt.rs"]
mod corrupt;
use corrupt::corrupt_copy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_version_is_failed_precondition_naming_its_file_not_a_path() {
    use cascade_proto::pb::ReloadModelRequest;
    let root = tempfile::tempdir().unwrap();
    let good = corrupt_copy(shared_artifact(), root.path(), "000000000001-good", |_| {});
    corrupt_copy(shared_artifact(), root.path(), "000000000002-bad", |b| {
        b.truncate(b.len() / 2)
    });
    let server = start(Backend::Local(handle(&good)), Role::All, Admission::new(8)).await;
    let mut client = server.client().await;
    let root_path = root.path().display().to_string();
    let e = client
        .reload_model(ReloadModelRequest {
            version: "000000000002-bad".into(),
        })
        .await
        .expect_err("a corrupt version");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("000000000002-bad"), "{}", e.message());
    assert!(e.message().contains("items.hnsw.graph"), "{}", e.message());
    assert!(!e.message().contains(&root_path), "{}", e.message());
    let e = client
        .reload_model(ReloadModelRequest {
            version: "nope".into(),
        })
        .await
        .expect_err("an unknown version");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(!e.message().contains(&root_path), "{}", e.message());
    // The good version goes on serving.
    assert_eq!(served(&mut client, "u1", 2).await, 2);
    drop(client);
    server.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_gate_each_rpc_by_scope_and_leave_health_open() {
    use cascade_proto::pb::{GetModelInfoRequest, ReloadModelRequest};
    let (predict_key, predict_line) = cascade_server::ApiKeys::generate("predict", "web");
    let (admin_key, admin_line) = cascade_server::ApiKeys::generate("predict,events,admin", "ops");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, format!("{predict_line}\n{admin_line}\n")).unwrap();
    let listener = cascade_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = cascade_server::ServeOptions {
        role: Role::All,
        device: "cpu".into(),
        admission: Admission::new(8),
        workers: 2,
        telemetry: Default::default(),
        connections: Default::default(),
        api_keys: Some(cascade_server::ApiKeys::load(&file).unwrap()),
    };
    let task = tokio::spawn(cascade_server::serve(
        Backend::Local(handle(shared_artifact())),
        opts,
        listener,
        async {
            let _ = stop_rx.await;
        },
    ));
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with_key = |key: &str| {
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        }
    };
    use cascade_proto::pb::cascade_client::CascadeClient;
    let mut anonymous = CascadeClient::new(channel.clone());
    let mut web = CascadeClient::with_interceptor(channel.clone(), with_key(&predict_key));
    let mut ops = CascadeClient::with_interceptor(channel.clone(), with_key(&admin_key));
    let mut forged = CascadeClient::with_interceptor(channel.clone(), with_key("csk_forged"));

    let e = anonymous.predict(predict_req("u1", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = forged
        .get_model_info(GetModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // The digest in the file is no key.
    let digest = predict_line.split_whitespace().nth(1).unwrap().to_string();
    let mut by_digest = CascadeClient::with_interceptor(channel.clone(), with_key(&digest));
    let e = by_digest.predict(predict_req("u1", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    assert_eq!(
        web.predict(predict_req("u1", 2))
            .await
            .unwrap()
            .into_inner()
            .items
            .len(),
        2
    );
    let e = web.record_events(viewed("u1", "i3")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = web
        .reload_model(ReloadModelRequest {
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(ops.record_events(viewed("u1", "i3")).await.is_ok());
    assert!(ops
        .reload_model(ReloadModelRequest {
            version: String::new()
        })
        .await
        .is_ok());
    // Probes need no key.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: cascade_server::READINESS_SERVICE.into(),
        })
        .await
        .unwrap();
    assert_eq!(h.into_inner().status, 1);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
