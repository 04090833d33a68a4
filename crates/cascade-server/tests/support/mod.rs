//! Shared by the gRPC test binaries: a small trained artifact and real
//! servers on ephemeral ports.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use cascade_core::{Engine, EngineHandle};
use cascade_data::synthetic::planted;
use cascade_proto::pb::cascade_client::CascadeClient;
use cascade_proto::pb::{Event, PredictRequest, RecordEventsRequest};
use cascade_retrieval::IndexParams;
use cascade_server::{Admission, Backend, Role, ServeOptions};
use cascade_train::pipeline;
use cascade_train::train::TrainConfig;

/// One "view" event of `item` by `user`.
pub fn viewed(user: &str, item: &str) -> RecordEventsRequest {
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
pub fn predict_req(user: &str, k: u32) -> PredictRequest {
    PredictRequest {
        user_id: user.into(),
        num_results: k,
        ..Default::default()
    }
}

/// One artifact for the whole test binary, trained on first use, for tests
/// that only read it (each still starts its own server). It lives in
/// cargo's scratch directory for integration tests.
pub fn shared_artifact() -> &'static std::path::Path {
    static ARTIFACT: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    let (_, dir) = ARTIFACT.get_or_init(|| {
        let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let dir = trained(root.path());
        (root, dir)
    });
    dir
}

/// A server on the shared artifact (its own engine and in-memory events).
pub async fn start_shared(admission: Admission) -> Running {
    start(
        Backend::Local(handle(shared_artifact())),
        Role::All,
        admission,
    )
    .await
}

/// Poll `cond` every 10 ms until it holds; fail after `limit`.
pub async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Train a small artifact with planted structure under `root`.
pub fn trained(root: &std::path::Path) -> std::path::PathBuf {
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

pub fn handle(dir: &std::path::Path) -> Arc<EngineHandle> {
    let engine = Engine::load(dir, &Device::Cpu).unwrap();
    Arc::new(EngineHandle::from_engine(
        engine,
        &Device::Cpu,
        Default::default(),
    ))
}

/// A real server on an ephemeral port.
pub struct Running {
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), cascade_server::ServerError>>,
}

pub async fn start(backend: Backend, role: Role, admission: Admission) -> Running {
    start_observed(backend, role, admission, Default::default()).await
}

pub async fn start_observed(
    backend: Backend,
    role: Role,
    admission: Admission,
    telemetry: cascade_server::Telemetry,
) -> Running {
    let listener = cascade_server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    start_on(listener, backend, role, admission, telemetry)
}

pub fn start_on(
    listener: tokio::net::TcpListener,
    backend: Backend,
    role: Role,
    admission: Admission,
    telemetry: cascade_server::Telemetry,
) -> Running {
    start_with(
        listener,
        backend,
        role,
        admission,
        telemetry,
        Default::default(),
    )
}

pub fn start_with(
    listener: tokio::net::TcpListener,
    backend: Backend,
    role: Role,
    admission: Admission,
    telemetry: cascade_server::Telemetry,
    connections: cascade_server::Connections,
) -> Running {
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        role,
        device: "cpu".into(),
        admission,
        workers: cascade_server::default_workers(),
        telemetry,
        connections,
        api_keys: None,
    };
    let task = tokio::spawn(cascade_server::serve(backend, opts, listener, async {
        let _ = stop_rx.await;
    }));
    Running { url, stop, task }
}

impl Running {
    pub async fn client(&self) -> CascadeClient<tonic::transport::Channel> {
        CascadeClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn shut(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not drain")
            .unwrap()
            .unwrap();
    }
}

/// Sends bytes as they are: a client that does not speak protobuf well.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;
pub struct Raw;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let v = src.copy_to_bytes(src.remaining()).to_vec();
        Ok(Some(v))
    }
}

/// A gRPC client that sends raw bytes to `cascade.v1.Cascade` methods.
pub struct RawClient(tonic::client::Grpc<tonic::transport::Channel>);

impl RawClient {
    pub async fn connect(url: &str) -> Self {
        let channel = tonic::transport::Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self(tonic::client::Grpc::new(channel))
    }

    /// Call `rpc` (e.g. "Predict") with `bytes` as the request message.
    pub async fn call(&mut self, rpc: &str, bytes: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
        self.0
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = format!("/cascade.v1.Cascade/{rpc}").parse().unwrap();
        self.0
            .unary(tonic::Request::new(bytes), path, RawCodec)
            .await
            .map(tonic::Response::into_inner)
    }
}
