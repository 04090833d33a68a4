//! Pod discovery for the gateway: watch a stage Service's EndpointSlices and
//! keep a load-balanced gRPC channel pointed at exactly its ready pods.
//!
//! A Kubernetes ClusterIP would pin each long-lived HTTP/2 connection to one
//! pod, and DNS for a headless Service is read once per connection; either
//! way new pods get no traffic. Here the gateway follows the API server: a
//! pod that turns ready is added to the channel, a terminating or unready one
//! is removed as soon as its EndpointSlice changes (a watch event, well under
//! a second), and the balancer spreads requests over what is left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

/// The Service port (by name) the gateway sends gRPC to; the Helm chart's
/// stage Services name theirs the same (checked by scripts/check-chart.py).
pub const STAGE_PORT_NAME: &str = "grpc";

/// The ready addresses an EndpointSlice names for `port_name` (or its only
/// port: a single-port Service need not name it; with several, another port
/// such as metrics must never be taken for gRPC). An endpoint whose `ready`
/// condition is unset counts as ready, as the API specifies; terminating
/// endpoints are not ready.
pub fn ready_addresses(slice: &EndpointSlice, port_name: &str) -> BTreeSet<SocketAddr> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(port_name))
        .or(match ports {
            [only] => Some(only),
            _ => None,
        })
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    let Some(port) = port else {
        return BTreeSet::new();
    };
    slice
        .endpoints
        .iter()
        .filter(|e| {
            let c = e.conditions.as_ref();
            c.and_then(|c| c.ready) != Some(false) && c.and_then(|c| c.terminating) != Some(true)
        })
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Slices by name, rebuilt from watch events; a relist replaces them whole.
#[derive(Debug, Default)]
struct Slices {
    live: BTreeMap<String, BTreeSet<SocketAddr>>,
    relisting: Option<BTreeMap<String, BTreeSet<SocketAddr>>>,
}

impl Slices {
    /// Apply one event; returns the ready set when it may have changed.
    fn apply(
        &mut self,
        ev: watcher::Event<EndpointSlice>,
        port: &str,
    ) -> Option<BTreeSet<SocketAddr>> {
        let key = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        match ev {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                return None;
            }
            watcher::Event::InitApply(s) => {
                if let Some(r) = &mut self.relisting {
                    r.insert(key(&s), ready_addresses(&s, port));
                }
                return None;
            }
            watcher::Event::InitDone => {
                self.live = self.relisting.take().unwrap_or_default();
            }
            watcher::Event::Apply(s) => {
                self.live.insert(key(&s), ready_addresses(&s, port));
            }
            watcher::Event::Delete(s) => {
                self.live.remove(&key(&s));
            }
        }
        Some(self.live.values().flatten().copied().collect())
    }
}

/// A channel balanced over the ready pods of `service` in `namespace`, and a
/// view of the addresses it currently uses. The watch runs until the
/// channel's last clone is dropped; API errors are retried with backoff and
/// the last known pods keep serving meanwhile.
pub fn watch_service(
    client: Client,
    namespace: &str,
    service: &str,
    port_name: &str,
    endpoint: impl Fn(SocketAddr) -> Result<Endpoint, tonic::transport::Error> + Send + Sync + 'static,
) -> (Channel, watch::Receiver<BTreeSet<SocketAddr>>) {
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
    let (seen_tx, seen_rx) = watch::channel(BTreeSet::new());
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let port = port_name.to_string();
    let service = service.to_string();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(watcher(
            api, cfg
        )));
        let mut slices = Slices::default();
        let mut current: BTreeSet<SocketAddr> = BTreeSet::new();
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!("watching EndpointSlices of {service}: {e}");
                    continue;
                }
            };
            let Some(ready) = slices.apply(ev, &port) else {
                continue;
            };
            if !sync(&changes, &mut current, ready, &endpoint).await {
                return; // the channel is gone
            }
            tracing::info!("{service}: {} ready pod(s): {:?}", current.len(), current);
            seen_tx.send_replace(current.clone());
        }
    });
    (channel, seen_rx)
}

/// Move the balancer from `current` to `ready`; false once nobody listens.
async fn sync(
    changes: &mpsc::Sender<Change<SocketAddr, Endpoint>>,
    current: &mut BTreeSet<SocketAddr>,
    ready: BTreeSet<SocketAddr>,
    endpoint: &impl Fn(SocketAddr) -> Result<Endpoint, tonic::transport::Error>,
) -> bool {
    for gone in current.difference(&ready) {
        if changes.send(Change::Remove(*gone)).await.is_err() {
            return false;
        }
    }
    let mut now = current
        .intersection(&ready)
        .copied()
        .collect::<BTreeSet<_>>();
    for new in ready.difference(current) {
        let ep = match endpoint(*new) {
            Ok(ep) => ep,
            Err(e) => {
                tracing::warn!("skipping endpoint {new}: {e}");
                continue;
            }
        };
        if changes.send(Change::Insert(*new, ep)).await.is_err() {
            return false;
        }
        now.insert(*new);
    }
    *current = now;
    true
}

/// A gateway whose retrieval and ranker channels follow the ready pods of
/// the Services named in the two URLs, in this pod's namespace (in-cluster
/// configuration: the pod's service account needs list/watch on
/// endpointslices). Call inside a Tokio runtime.
pub async fn in_cluster_gateway(
    retrieval_url: &str,
    ranker_url: &str,
) -> Result<crate::Gateway, crate::ServerError> {
    use crate::ServerError::Discovery;
    let client = Client::try_default()
        .await
        .map_err(|e| Discovery(format!("no Kubernetes client configuration: {e}")))?;
    let ns =
        pod_namespace().ok_or_else(|| Discovery("unknown namespace (set POD_NAMESPACE)".into()))?;
    fn svc(url: &str) -> Result<&str, crate::ServerError> {
        service_of(url)
            .ok_or_else(|| crate::ServerError::Discovery(format!("{url:?} names no Service")))
    }
    let (retrieval, _) = watch_service(
        client.clone(),
        &ns,
        svc(retrieval_url)?,
        STAGE_PORT_NAME,
        crate::stage_endpoint,
    );
    let (ranker, _) = watch_service(
        client,
        &ns,
        svc(ranker_url)?,
        STAGE_PORT_NAME,
        crate::stage_endpoint,
    );
    Ok(crate::Gateway::from_channels(retrieval, ranker))
}

/// The namespace this pod runs in (`POD_NAMESPACE`, else the service
/// account's namespace file), when running in a cluster.
pub fn pod_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_string())
        })
}

/// The Service name in a stage URL (`http://name:port`, `http://name.ns.svc:port`).
pub fn service_of(url: &str) -> Option<&str> {
    let host = url.split("://").nth(1)?.split([':', '/']).next()?;
    let name = host.split('.').next()?;
    (!name.is_empty() && name.parse::<IpAddr>().is_err() && host.parse::<IpAddr>().is_err())
        .then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint as Ep, EndpointConditions, EndpointPort};

    pub(crate) fn slice(
        name: &str,
        port: i32,
        eps: &[(&str, Option<bool>, bool)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![
                EndpointPort {
                    name: Some("metrics".into()),
                    port: Some(9464),
                    ..Default::default()
                },
                EndpointPort {
                    name: Some("grpc".into()),
                    port: Some(port),
                    ..Default::default()
                },
            ]),
            endpoints: eps
                .iter()
                .map(|(ip, ready, terminating)| Ep {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        terminating: Some(*terminating),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn ready_addresses_follow_the_conditions_and_the_named_port() {
        let s = slice(
            "a",
            50051,
            &[
                ("10.0.0.1", Some(true), false),
                ("10.0.0.2", None, false),
                ("10.0.0.3", Some(false), false),
                ("10.0.0.4", Some(true), true),
                ("not-an-ip", Some(true), false),
            ],
        );
        let got: Vec<String> = ready_addresses(&s, "grpc")
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["10.0.0.1:50051", "10.0.0.2:50051"]);
    }

    #[test]
    fn only_the_named_port_or_a_single_port_is_used() {
        let mut s = slice("a", 50051, &[("10.0.0.1", Some(true), false)]);
        let port = |s: &EndpointSlice| {
            ready_addresses(s, "grpc")
                .iter()
                .map(|a| a.port())
                .collect::<Vec<_>>()
        };
        assert_eq!(port(&s), [50051]);
        // Named otherwise: the metrics port must not be taken for gRPC.
        s.ports.as_mut().unwrap()[1].name = Some("http".into());
        assert!(port(&s).is_empty());
        // One unnamed port: that is the one.
        s.ports.as_mut().unwrap().remove(0);
        s.ports.as_mut().unwrap()[0].name = None;
        assert_eq!(port(&s), [50051]);
    }

    #[test]
    fn a_relist_replaces_what_was_known() {
        let mut s = Slices::default();
        let one = slice("a", 1, &[("10.0.0.1", Some(true), false)]);
        let two = slice("b", 1, &[("10.0.0.2", Some(true), false)]);
        assert_eq!(
            s.apply(watcher::Event::Apply(one.clone()), "grpc")
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            s.apply(watcher::Event::Apply(two), "grpc").unwrap().len(),
            2
        );
        assert!(s.apply(watcher::Event::Init, "grpc").is_none());
        assert!(s.apply(watcher::Event::InitApply(one), "grpc").is_none());
        let after = s.apply(watcher::Event::InitDone, "grpc").unwrap();
        assert_eq!(after.len(), 1, "slice b vanished during the relist");
    }

    #[test]
    fn service_names_come_from_stage_urls() {
        assert_eq!(
            service_of("http://rec-cascade-ranker:50051"),
            Some("rec-cascade-ranker")
        );
        assert_eq!(
            service_of("http://rec-cascade-ranker.prod.svc:50051"),
            Some("rec-cascade-ranker")
        );
        assert_eq!(service_of("http://127.0.0.1:50051"), None);
        assert_eq!(service_of("ranker:1"), None);
    }
}
