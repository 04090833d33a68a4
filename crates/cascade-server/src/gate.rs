//! One shape for the checks made before a request reaches the gRPC
//! service (API keys, admission): a refused request is answered at once
//! with the check's status and never reaches a handler.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;

/// A check on a request's path and headers.
pub trait Gate: Clone + Send + Sync + 'static {
    /// What a passed request holds until its response is ready (a permit).
    type Pass: Send + 'static;
    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<Self::Pass, Status>;
}

/// A service behind a [`Gate`].
#[derive(Clone)]
pub struct Gated<S, G> {
    inner: S,
    gate: G,
}

impl<S, G> Gated<S, G> {
    pub(crate) fn new(inner: S, gate: G) -> Self {
        Self { inner, gate }
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, G, B> tower::Service<http::Request<B>> for Gated<S, G>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    G: Gate,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.gate.check(req.uri().path(), req.headers()) {
            Ok(pass) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let resp = fut.await;
                    drop(pass);
                    resp
                })
            }
            Err(refused) => Box::pin(std::future::ready(Ok(refused.into_http()))),
        }
    }
}

impl<S: tonic::server::NamedService, G> tonic::server::NamedService for Gated<S, G> {
    const NAME: &'static str = S::NAME;
}
