//! Over-the-wire mutation fuzzing. Valid request messages for every RPC are
//! mutated (bit flips, truncation, inserted and overwritten bytes, spliced
//! slices) and sent as raw bytes to a real server. The server must answer
//! each one with a status that names the client's error or with a real
//! answer: never INTERNAL or UNKNOWN (a panic or an unmapped failure), and it
//! must still serve afterwards.
//!
//! `CASCADE_FUZZ_REQUESTS` sets how many are sent (CI: the default 2,000; by
//! hand: 200,000, see docs/reliability.md). `CASCADE_FUZZ_REPORT=path` writes
//! the per-status counts as JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;

use cascade_proto::pb::{
    Context, Event, PredictRequest, RankRequest, RecordEventsRequest, RetrieveRequest,
};
use cascade_server::{Admission, Backend, Role};
use prost::Message;

mod support;
use support::*;

/// xorshift64*: deterministic, and enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four random edits of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(6) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 => b.truncate(at),
            2 => b.insert(at, rng.next() as u8),
            3 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = [0x00, 0x7f, 0x80, 0xff][rng.below(4)];
            }
            4 if at < b.len() => {
                let end = (at + 1 + rng.below(8)).min(b.len());
                let piece = b[at..end].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, piece);
            }
            _ => b.extend((0..rng.below(6)).map(|_| rng.next() as u8)),
        }
    }
    b
}

/// A valid request for each RPC: the mutation seeds.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let context = Some(Context {
        item_ids: vec!["i2".into(), "i3".into()],
    });
    vec![
        (
            "Predict",
            PredictRequest {
                user_id: "u1".into(),
                num_results: 5,
                num_candidates: 20,
                exclude_item_ids: vec!["i1".into()],
                candidate_item_ids: vec![],
                context: context.clone(),
            }
            .encode_to_vec(),
        ),
        (
            "Rank",
            RankRequest {
                user_id: "u2".into(),
                item_ids: vec!["i1".into(), "i4".into(), "i9".into()],
                context: context.clone(),
            }
            .encode_to_vec(),
        ),
        (
            "Retrieve",
            RetrieveRequest {
                user_id: "u3".into(),
                num_candidates: 10,
                min_candidates: 5,
                exclude_item_ids: vec!["i7".into()],
                context,
            }
            .encode_to_vec(),
        ),
        (
            "RecordEvents",
            RecordEventsRequest {
                events: vec![Event {
                    user_id: "u4".into(),
                    item_id: "i5".into(),
                    kind: "view".into(),
                    timestamp: 1_700_000_000,
                }],
            }
            .encode_to_vec(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_fault_the_server() {
    let total: usize = std::env::var("CASCADE_FUZZ_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let root = tempfile::tempdir().unwrap();
    let server = start(
        Backend::Local(handle(&trained(root.path()))),
        Role::All,
        Admission::new(512),
    )
    .await;
    let seeds = seeds();
    let lanes = 8;
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (url, seeds) = (server.url.clone(), seeds.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (lane as u64 + 1));
            let mut raw = RawClient::connect(&url).await;
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            let mut faults = Vec::new();
            for n in (lane..total).step_by(lanes) {
                let (rpc, seed) = &seeds[n % seeds.len()];
                let bytes = mutate(seed, &mut rng);
                let code = match raw.call(rpc, bytes.clone()).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => {
                        if matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown) {
                            faults.push(format!("{rpc} {bytes:02x?}: {s:?}"));
                        }
                        s.code()
                    }
                };
                *counts.entry(format!("{rpc} {code:?}")).or_default() += 1;
            }
            (counts, faults)
        }));
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut faults = Vec::new();
    for t in tasks {
        let (c, f) = t.await.unwrap();
        for (k, v) in c {
            *counts.entry(k).or_default() += v;
        }
        faults.extend(f);
    }
    println!("{total} mutated requests: {counts:#?}");
    if let Some(path) = std::env::var_os("CASCADE_FUZZ_REPORT") {
        let report = serde_json::json!({"requests": total, "faults": faults.len(), "by_rpc_and_status": counts});
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
    assert!(
        faults.is_empty(),
        "{} faults, first: {:#?}",
        faults.len(),
        &faults[..faults.len().min(5)]
    );
    assert_eq!(counts.values().sum::<usize>(), total);
    // Mutations that still decode are served: some answers are real ones.
    assert!(
        counts.iter().any(|(k, v)| k.ends_with(" Ok") && *v > 0),
        "{counts:#?}"
    );
    let after = server.client().await.predict(predict_req("u1", 3)).await;
    assert_eq!(after.unwrap().into_inner().items.len(), 3);
    server.shut().await;
}
