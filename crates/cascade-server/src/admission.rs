//! Admission: the one place that decides whether a request may start.
//!
//! A tower layer in front of the gRPC service holds one permit per admitted
//! request until its response is ready; a request that finds none is refused
//! at once with `RESOURCE_EXHAUSTED` (load shedding), never queued without
//! bound. Only the request RPCs are admitted this way: `GetModelInfo` and
//! `ReloadModel` (an operator's call, slow by nature) always pass.
//!
//! Behind admission, two bounded waits remain and both answer in time:
//! model work waits (asynchronously, within the caller's deadline) for one of
//! the CPU worker slots (`workers`), and ranking jobs queue for the ranking
//! threads, whose full queue is also `RESOURCE_EXHAUSTED`.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::Status;

/// The RPCs that take an in-flight permit.
const ADMITTED: [&str; 4] = ["Predict", "Rank", "Retrieve", "RecordEvents"];

fn admitted(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|m| ADMITTED.contains(&m))
}

/// The in-flight limit, shared by every connection. Cloning shares it.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Requests holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.limit.saturating_sub(self.permits.available_permits())
    }

    /// The permits themselves (tests saturate them).
    pub fn limiter(&self) -> Arc<Semaphore> {
        self.permits.clone()
    }
}

impl crate::gate::Gate for Admission {
    /// Held until the response is ready.
    type Pass = Option<tokio::sync::OwnedSemaphorePermit>;

    fn check(&self, path: &str, _headers: &http::HeaderMap) -> Result<Self::Pass, Status> {
        if !admitted(path) {
            return Ok(None);
        }
        self.permits
            .clone()
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "overloaded: {} requests already in flight",
                    self.limit
                ))
            })
    }
}

impl<S> tower::Layer<S> for Admission {
    type Service = crate::gate::Gated<S, Admission>;
    fn layer(&self, inner: S) -> Self::Service {
        crate::gate::Gated::new(inner, self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rpcs_are_admitted_and_operator_rpcs_pass() {
        assert!(admitted("/cascade.v1.Cascade/Predict"));
        assert!(admitted("/cascade.v1.Cascade/RecordEvents"));
        assert!(!admitted("/cascade.v1.Cascade/ReloadModel"));
        assert!(!admitted("/cascade.v1.Cascade/GetModelInfo"));
        assert!(!admitted("/grpc.health.v1.Health/Check"));
    }

    #[test]
    fn in_flight_counts_held_permits() {
        let a = Admission::new(3);
        let p = a.limiter().try_acquire_owned().unwrap();
        assert_eq!((a.in_flight(), a.limit()), (1, 3));
        drop(p);
        assert_eq!(a.in_flight(), 0);
    }
}
