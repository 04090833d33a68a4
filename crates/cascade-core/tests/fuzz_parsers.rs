//! Property-based fuzzing of what reads untrusted bytes: the event-log
//! replay and request validation. Each property runs on thousands of random
//! inputs (proptest; `PROPTEST_CASES` raises the count) and must never panic.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use cascade_core::{Event, EventStore, PredictRequest};
use proptest::prelude::*;

fn event_line(user: &str, item: &str) -> String {
    serde_json::to_string(&Event {
        user_id: user.into(),
        item_id: item.into(),
        kind: "view".into(),
        timestamp: 1,
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Any bytes as the log: start-up either replays or names a bad line,
    /// never panics; after a successful open the log ends on a line boundary
    /// and a second open replays the same events.
    #[test]
    fn any_log_bytes_replay_or_name_a_line(
        good in proptest::collection::vec(("[a-z]{1,6}", "[a-z]{1,6}"), 0..5),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let mut bytes: Vec<u8> = good
            .iter()
            .flat_map(|(u, i)| (event_line(u, i) + "\n").into_bytes())
            .collect();
        bytes.extend(&tail);
        let keep = cut.index(bytes.len() + 1);
        bytes.truncate(keep);
        std::fs::write(&path, &bytes).unwrap();
        match EventStore::open(&path) {
            Ok((_, replayed)) => {
                let after = std::fs::read(&path).unwrap();
                prop_assert!(after.is_empty() || after.ends_with(b"\n"));
                prop_assert!(bytes.starts_with(&after));
                let (_, again) = EventStore::open(&path).unwrap();
                prop_assert_eq!(again, replayed);
            }
            Err(e) => prop_assert!(e.to_string().contains("line "), "{}", e),
        }
    }

    /// Any field values: validation answers Ok or INVALID_ARGUMENT naming a
    /// field, never panics.
    #[test]
    fn any_predict_request_validates_or_names_a_field(
        user in ".{0,300}",
        k in any::<usize>(),
        n in any::<usize>(),
        ids in proptest::collection::vec(".{0,300}", 0..4),
    ) {
        let req = PredictRequest {
            user_id: user,
            num_results: k,
            num_candidates: n,
            exclude_item_ids: ids.clone(),
            candidate_item_ids: ids.clone(),
            context_item_ids: ids,
        };
        if let Err(e) = req.validate() {
            prop_assert!(
                matches!(e, cascade_core::EngineError::InvalidArgument { .. }),
                "{:?}", e
            );
        }
    }
}
