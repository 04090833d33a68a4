//! Every conversion between the wire messages and `cascade-core`'s types, in
//! one place: handlers are then validate → core → convert, and a field added
//! to the API shows up here once.

use crate::pb;

/// A NaN score means "not computed" (popularity answers have no model score);
/// on the wire that is an absent optional.
fn present(v: f32) -> Option<f32> {
    (!v.is_nan()).then_some(v)
}

fn context_ids(c: Option<pb::Context>) -> Vec<String> {
    c.map(|c| c.item_ids).unwrap_or_default()
}

impl From<pb::PredictRequest> for cascade_core::PredictRequest {
    fn from(r: pb::PredictRequest) -> Self {
        Self {
            user_id: r.user_id,
            num_results: r.num_results as usize,
            num_candidates: r.num_candidates as usize,
            exclude_item_ids: r.exclude_item_ids,
            candidate_item_ids: r.candidate_item_ids,
            context_item_ids: context_ids(r.context),
        }
    }
}

/// A Rank call's arguments as the engine takes them.
pub struct RankArgs {
    pub user_id: String,
    pub item_ids: Vec<String>,
    pub context_item_ids: Vec<String>,
}

impl From<pb::RankRequest> for RankArgs {
    fn from(r: pb::RankRequest) -> Self {
        Self {
            user_id: r.user_id,
            item_ids: r.item_ids,
            context_item_ids: context_ids(r.context),
        }
    }
}

/// A Retrieve call's arguments as the engine takes them.
pub struct RetrieveArgs {
    pub user_id: String,
    pub num_candidates: usize,
    pub min_candidates: usize,
    pub exclude_item_ids: Vec<String>,
    pub context_item_ids: Vec<String>,
}

impl From<pb::RetrieveRequest> for RetrieveArgs {
    fn from(r: pb::RetrieveRequest) -> Self {
        Self {
            user_id: r.user_id,
            num_candidates: r.num_candidates as usize,
            min_candidates: r.min_candidates as usize,
            exclude_item_ids: r.exclude_item_ids,
            context_item_ids: context_ids(r.context),
        }
    }
}

impl From<pb::Event> for cascade_core::Event {
    fn from(e: pb::Event) -> Self {
        Self {
            user_id: e.user_id,
            item_id: e.item_id,
            kind: e.kind,
            timestamp: e.timestamp,
        }
    }
}

/// The events of a RecordEvents call, in order.
pub fn events(r: pb::RecordEventsRequest) -> Vec<cascade_core::Event> {
    r.events.into_iter().map(Into::into).collect()
}

impl From<cascade_core::ScoredItem> for pb::ScoredItem {
    fn from(it: cascade_core::ScoredItem) -> Self {
        Self {
            item_id: it.item_id,
            title: it.title,
            score: it.score,
            retrieval_score: present(it.retrieval_score),
            predicted_rating: present(it.predicted_rating),
        }
    }
}

impl From<cascade_core::PersonalizedBy> for pb::PersonalizedBy {
    fn from(by: cascade_core::PersonalizedBy) -> Self {
        use cascade_core::PersonalizedBy as P;
        match by {
            P::History => Self::History,
            P::Events => Self::Events,
            P::Context => Self::Context,
            P::Popularity => Self::Popularity,
        }
    }
}

impl From<cascade_core::StageTimings> for pb::StageTimings {
    fn from(t: cascade_core::StageTimings) -> Self {
        Self {
            user_state_us: t.user_state_us,
            retrieval_us: t.retrieval_us,
            ranking_us: t.ranking_us,
            total_us: t.total_us,
            rank_queue_us: t.rank_queue_us,
        }
    }
}

impl From<cascade_core::RankResponse> for pb::ScoredItems {
    fn from(r: cascade_core::RankResponse) -> Self {
        Self {
            items: r.items.into_iter().map(Into::into).collect(),
            model_version: r.model_version,
            cold_start: r.cold_start,
            personalized_by: pb::PersonalizedBy::from(r.personalized_by) as i32,
        }
    }
}

impl From<cascade_core::PredictResponse> for pb::PredictResponse {
    fn from(r: cascade_core::PredictResponse) -> Self {
        Self {
            items: r.items.into_iter().map(Into::into).collect(),
            model_version: r.model_version,
            cold_start: r.cold_start,
            personalized_by: pb::PersonalizedBy::from(r.personalized_by) as i32,
            timings: Some(r.timings.into()),
        }
    }
}

impl From<cascade_core::Reloaded> for pb::ReloadModelResponse {
    fn from(r: cascade_core::Reloaded) -> Self {
        Self {
            model_version: r.model_version,
            previous_version: r.previous_version,
            swapped: r.swapped,
            load_ms: r.load_time.as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_score_travels_as_none_and_a_present_one_as_is() {
        let it = pb::ScoredItem::from(cascade_core::ScoredItem {
            item_id: "i".into(),
            title: "t".into(),
            score: 1.5,
            retrieval_score: f32::NAN,
            predicted_rating: 4.0,
        });
        assert_eq!(it.retrieval_score, None);
        assert_eq!(it.predicted_rating, Some(4.0));
        assert_eq!(it.score, 1.5);
    }

    #[test]
    fn predict_request_fields_map_one_to_one() {
        let r = cascade_core::PredictRequest::from(pb::PredictRequest {
            user_id: "u".into(),
            num_results: 3,
            num_candidates: 40,
            exclude_item_ids: vec!["x".into()],
            candidate_item_ids: vec!["c".into()],
            context: Some(pb::Context {
                item_ids: vec!["ctx".into()],
            }),
        });
        assert_eq!(
            (r.num_results, r.num_candidates, r.context_item_ids),
            (3, 40, vec!["ctx".to_string()])
        );
        assert_eq!(
            (r.exclude_item_ids, r.candidate_item_ids),
            (vec!["x".to_string()], vec!["c".to_string()])
        );
        let none = cascade_core::PredictRequest::from(pb::PredictRequest::default());
        assert!(none.context_item_ids.is_empty());
    }

    #[test]
    fn every_personalisation_source_has_its_wire_value() {
        use cascade_core::PersonalizedBy as P;
        let all = [P::History, P::Events, P::Context, P::Popularity];
        let wire: Vec<pb::PersonalizedBy> = all.into_iter().map(Into::into).collect();
        assert_eq!(
            wire,
            [
                pb::PersonalizedBy::History,
                pb::PersonalizedBy::Events,
                pb::PersonalizedBy::Context,
                pb::PersonalizedBy::Popularity
            ]
        );
    }
}
