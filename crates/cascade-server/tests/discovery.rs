//! The gateway's pod discovery against a mock Kubernetes API server (the
//! `tower-test` pair kube's own tests use): the watcher's list and watch
//! requests are answered with EndpointSlices, and the set of pods the
//! balanced channel uses follows scale-out, a pod turning unready, and
//! scale-in; then the same with real ranker servers behind a real gateway,
//! counting which pod answered each Predict.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use cascade_server::discovery::{watch_service, STAGE_PORT_NAME};
use cascade_server::{Admission, Backend, Role};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::watch;

mod support;
use support::*;

const SERVICE: &str = "rec-cascade-ranker";

fn slice(name: &str, pods: &[(&str, bool)]) -> Value {
    slice_on(name, 50051, pods)
}

fn slice_on(name: &str, port: u16, pods: &[(&str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "prod",
            "resourceVersion": "7",
            "labels": {"kubernetes.io/service-name": SERVICE}
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "metrics", "port": 9464, "protocol": "TCP"},
            {"name": "grpc", "port": port, "protocol": "TCP"}
        ],
        "endpoints": pods.iter().map(|(ip, ready)| json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready, "terminating": !ready}
        })).collect::<Vec<_>>()
    })
}

fn events(evs: &[(&str, Value)]) -> Body {
    let mut out = Vec::new();
    for (kind, obj) in evs {
        out.extend(serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap());
        out.push(b'\n');
    }
    Body::from(out)
}

fn addrs(ips: &[&str]) -> BTreeSet<SocketAddr> {
    ips.iter()
        .map(|ip| format!("{ip}:50051").parse().unwrap())
        .collect()
}

async fn expect(seen: &mut watch::Receiver<BTreeSet<SocketAddr>>, want: BTreeSet<SocketAddr>) {
    // A hang guard, not a speed assertion: the update follows the event at once.
    let got = tokio::time::timeout(Duration::from_secs(20), seen.wait_for(|s| *s == want))
        .await
        .is_ok();
    assert!(got, "pods never became {want:?}; last {:?}", *seen.borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_scale_out_unready_pods_and_scale_in() {
    let (svc, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "prod");
    let (_channel, mut seen) = watch_service(
        client,
        "prod",
        SERVICE,
        "grpc",
        cascade_server::stage_endpoint,
    );

    // The initial list: two ready pods and one still starting.
    let (req, send) = api.next_request().await.expect("list request");
    let uri = req.uri().to_string();
    assert!(
        uri.starts_with("/apis/discovery.k8s.io/v1/namespaces/prod/endpointslices?"),
        "{uri}"
    );
    assert!(
        uri.contains("labelSelector=kubernetes.io%2Fservice-name%3Drec-cascade-ranker"),
        "{uri}"
    );
    assert!(!uri.contains("watch=true"), "{uri}");
    send.send_response(Response::new(list(vec![slice(
        "ranker-a",
        &[("10.0.0.1", true), ("10.0.0.2", true), ("10.0.0.9", false)],
    )])));
    expect(&mut seen, addrs(&["10.0.0.1", "10.0.0.2"])).await;

    // The HPA scales out: the new pod turns ready, a second slice appears.
    let (req, send) = api.next_request().await.expect("watch request");
    assert!(
        req.uri().to_string().contains("watch=true"),
        "{}",
        req.uri()
    );
    send.send_response(Response::new(events(&[
        (
            "MODIFIED",
            slice(
                "ranker-a",
                &[("10.0.0.1", true), ("10.0.0.2", true), ("10.0.0.9", true)],
            ),
        ),
        ("ADDED", slice("ranker-b", &[("10.0.1.4", true)])),
    ])));
    expect(
        &mut seen,
        addrs(&["10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.1.4"]),
    )
    .await;

    // A pod starts terminating: it leaves the balancer on that event.
    let (_, send) = api.next_request().await.expect("re-watch");
    send.send_response(Response::new(events(&[(
        "MODIFIED",
        slice(
            "ranker-a",
            &[("10.0.0.1", true), ("10.0.0.2", false), ("10.0.0.9", true)],
        ),
    )])));
    expect(&mut seen, addrs(&["10.0.0.1", "10.0.0.9", "10.0.1.4"])).await;

    // Scale in: a whole slice goes.
    let (_, send) = api.next_request().await.expect("re-watch");
    send.send_response(Response::new(events(&[(
        "DELETED",
        slice("ranker-b", &[("10.0.1.4", true)]),
    )])));
    expect(&mut seen, addrs(&["10.0.0.1", "10.0.0.9"])).await;
}

fn list(items: Vec<Value>) -> Body {
    let list = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "metadata": {"resourceVersion": "7"},
        "items": items
    });
    Body::from(serde_json::to_vec(&list).unwrap())
}

/// Two loopback addresses listening on one port, as two pods behind one
/// EndpointSlice port would.
async fn two_pod_listeners() -> (u16, tokio::net::TcpListener, tokio::net::TcpListener) {
    for _ in 0..20 {
        let a = cascade_server::bind("127.0.0.2:0".parse().unwrap())
            .await
            .unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = cascade_server::bind(format!("127.0.0.3:{port}").parse().unwrap()).await {
            return (port, a, b);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_balances_predict_over_the_ready_ranker_pods() {
    let root = tempfile::tempdir().unwrap();
    let dir = trained(root.path());
    let retrieval = start(
        Backend::Local(handle(&dir)),
        Role::Retrieval,
        Admission::new(64),
    )
    .await;
    let (port, la, lb) = two_pod_listeners().await;
    let ranker = |listener| {
        let registry = prometheus::Registry::new();
        let m = cascade_server::ServerMetrics::register(&registry).unwrap();
        let tel = cascade_server::Telemetry::new(Some(m.clone()), None);
        let r = start_on(
            listener,
            Backend::Local(handle(&dir)),
            Role::Ranker,
            Admission::new(64),
            tel,
        );
        (r, m)
    };
    let (pod_a, metrics_a) = ranker(la);
    let (pod_b, metrics_b) = ranker(lb);
    let ranked = |m: &cascade_server::ServerMetrics| {
        m.handled
            .with_label_values(&["unary", "cascade.v1.Cascade", "Rank", "OK"])
            .get()
    };

    let (svc, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "prod");
    let (ranker_channel, mut seen) = watch_service(
        client,
        "prod",
        SERVICE,
        STAGE_PORT_NAME,
        cascade_server::stage_endpoint,
    );
    let retrieval_channel = tonic::transport::Endpoint::from_shared(retrieval.url.clone())
        .unwrap()
        .connect_lazy();
    let gw = cascade_server::Gateway::from_channels(retrieval_channel, ranker_channel);
    let gateway = start(gw.into(), Role::Gateway, Admission::new(64)).await;
    let g = gateway.client().await;
    let a = || SocketAddr::from(([127, 0, 0, 2], port));
    let b = || SocketAddr::from(([127, 0, 0, 3], port));
    let predict_n = |n: usize| {
        let mut g = g.clone();
        async move {
            for i in 0..n {
                let r = g.predict(predict_req(&format!("u{}", i % 12), 5)).await;
                let r = r.unwrap_or_else(|e| panic!("Predict {i} failed: {e}"));
                assert_eq!(r.into_inner().items.len(), 5);
            }
        }
    };

    // One ready pod (b still starting): every Predict is ranked on a.
    let (_, send) = api.next_request().await.expect("list request");
    send.send_response(Response::new(list(vec![slice_on(
        "ranker-a",
        port,
        &[("127.0.0.2", true), ("127.0.0.3", false)],
    )])));
    expect(&mut seen, BTreeSet::from([a()])).await;
    predict_n(20).await;
    assert_eq!((ranked(&metrics_a), ranked(&metrics_b)), (20, 0));

    // b turns ready: the balancer starts sending it work.
    let (_, send) = api.next_request().await.expect("watch request");
    send.send_response(Response::new(events(&[(
        "MODIFIED",
        slice_on(
            "ranker-a",
            port,
            &[("127.0.0.2", true), ("127.0.0.3", true)],
        ),
    )])));
    expect(&mut seen, BTreeSet::from([a(), b()])).await;
    let mut sent = 0;
    while ranked(&metrics_b) == 0 && sent < 400 {
        predict_n(10).await;
        sent += 10;
    }
    assert!(ranked(&metrics_b) > 0, "pod b got none of {sent} Predicts");
    assert_eq!(ranked(&metrics_a) + ranked(&metrics_b), 20 + sent as u64);

    // b starts terminating: it gets nothing more, then goes away, and no
    // Predict fails on the way.
    let (_, send) = api.next_request().await.expect("re-watch");
    send.send_response(Response::new(events(&[(
        "MODIFIED",
        slice_on(
            "ranker-a",
            port,
            &[("127.0.0.2", true), ("127.0.0.3", false)],
        ),
    )])));
    expect(&mut seen, BTreeSet::from([a()])).await;
    let (at_a, at_b) = (ranked(&metrics_a), ranked(&metrics_b));
    predict_n(20).await;
    pod_b.shut().await;
    predict_n(20).await;
    assert_eq!(ranked(&metrics_b), at_b);
    assert_eq!(ranked(&metrics_a), at_a + 40);

    gateway.shut().await;
    pod_a.shut().await;
    retrieval.shut().await;
}
