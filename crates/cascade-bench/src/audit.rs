//! `cascade audit`: check a running server's answers, over gRPC, against a
//! dataset — what a user of the API gets, not what an evaluation loop scores.
//!
//! * every user of the dataset: Predict never returns an item the user
//!   interacted with in the data, and answers with `num_results` items;
//! * recorded events: after RecordEvents, the user's next Predict excludes
//!   the recorded items (known users, and new users, who are personalised
//!   by them rather than served popularity);
//! * context: every item as a one-item context of an unknown user answers OK
//!   with `num_results` items and never the context item itself; mixes of
//!   known and unknown context IDs too.
//!
//! Every violation is listed (up to a cap) and the report says whether the
//! server passed; the CLI exits non-zero when it did not.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cascade_data::Dataset;
use cascade_proto::pb::cascade_client::CascadeClient;
use cascade_proto::pb::{
    Context, Event, PersonalizedBy, PredictRequest, PredictResponse, RecordEventsRequest,
};
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use crate::BenchError;

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub endpoint: String,
    /// Items per Predict.
    pub k: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Known users that get one RecordEvents before a second Predict (every n-th user).
    pub events_every: usize,
    /// New (unknown) users created with a few events each.
    pub new_users: usize,
    /// Feed every item as a one-item context of an unknown user.
    pub context_sweep: bool,
    /// How long to keep retrying the first connection (a server still loading).
    pub wait: std::time::Duration,
}

/// What one audit found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct AuditReport {
    pub users_checked: usize,
    pub predict_calls: usize,
    /// Returned items the user had already interacted with (dataset or events).
    pub already_interacted: usize,
    /// Answers with fewer items than asked for.
    pub short_answers: usize,
    /// Answers whose `personalized_by` is not what the request's signal implies.
    pub wrong_personalization: usize,
    /// Calls that failed (any non-OK status).
    pub failed_calls: usize,
    pub known_users_with_events: usize,
    pub new_users_with_events: usize,
    /// New users whose answer equals plain popularity (events ignored).
    pub new_users_served_popularity: usize,
    pub context_items_checked: usize,
    /// Returned context items (a context item is never recommended).
    pub context_item_returned: usize,
    /// The first violations, as text.
    pub examples: Vec<String>,
    pub passed: bool,
}

impl AuditReport {
    fn violation(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }
}

struct Ctx {
    client: CascadeClient<Channel>,
    gate: Arc<Semaphore>,
    k: usize,
}

impl Ctx {
    async fn predict(
        &self,
        user: &str,
        context: Vec<String>,
    ) -> Result<PredictResponse, tonic::Status> {
        let _permit = self.gate.acquire().await;
        let mut c = self.client.clone();
        c.predict(PredictRequest {
            user_id: user.to_string(),
            num_results: self.k as u32,
            context: (!context.is_empty()).then_some(Context { item_ids: context }),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
    }

    async fn record(&self, user: &str, items: &[String]) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        c.record_events(RecordEventsRequest {
            events: items
                .iter()
                .map(|i| Event {
                    user_id: user.to_string(),
                    item_id: i.clone(),
                    kind: "audit".into(),
                    timestamp: 0,
                })
                .collect(),
        })
        .await
        .map(|_| ())
    }
}

fn ids(r: &PredictResponse) -> Vec<String> {
    r.items.iter().map(|i| i.item_id.clone()).collect()
}

/// Run every check against the server at `cfg.endpoint`, with `ds` as the truth.
pub async fn audit(cfg: &AuditConfig, ds: &Dataset) -> Result<AuditReport, BenchError> {
    let ep = Endpoint::from_shared(cfg.endpoint.clone()).map_err(|e| BenchError::Endpoint {
        url: cfg.endpoint.clone(),
        msg: e.to_string(),
    })?;
    // The server may still be loading: retry the connection until `wait`.
    let until = tokio::time::Instant::now() + cfg.wait;
    let ch = loop {
        match ep.clone().tcp_nodelay(true).connect().await {
            Ok(ch) => break ch,
            Err(e) if tokio::time::Instant::now() >= until => {
                return Err(BenchError::Endpoint {
                    url: cfg.endpoint.clone(),
                    msg: e.to_string(),
                })
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    };
    let ctx = Arc::new(Ctx {
        client: CascadeClient::new(ch),
        gate: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
        k: cfg.k,
    });
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); ds.users.len()];
    for x in &ds.interactions {
        seen[x.user as usize].insert(ds.items[x.item as usize].id.clone());
    }
    let mut rep = AuditReport::default();

    // 1. Every user of the dataset.
    let mut tasks = Vec::new();
    for (u, user) in ds.users.iter().enumerate() {
        let (ctx, id) = (ctx.clone(), user.id.clone());
        tasks.push((
            u,
            tokio::spawn(async move { ctx.predict(&id, vec![]).await }),
        ));
    }
    let mut first: HashMap<usize, Vec<String>> = HashMap::new();
    for (u, t) in tasks {
        let user = &ds.users[u].id;
        rep.predict_calls += 1;
        rep.users_checked += 1;
        match t.await {
            Ok(Ok(r)) => {
                check_answer(&mut rep, user, &r, &seen[u], cfg.k);
                let expect = if seen[u].is_empty() {
                    PersonalizedBy::Popularity
                } else {
                    PersonalizedBy::History
                };
                if r.personalized_by != expect as i32 {
                    rep.wrong_personalization += 1;
                    rep.violation(format!(
                        "user {user}: personalized_by {} (expected {expect:?})",
                        r.personalized_by
                    ));
                }
                first.insert(u, ids(&r));
            }
            Ok(Err(s)) => failed(&mut rep, format!("Predict user {user}"), &s),
            Err(e) => failed(&mut rep, format!("Predict user {user}"), &e.to_string()),
        }
    }

    // 2. Known users record the top item they were just shown; it must go.
    if cfg.events_every > 0 {
        for u in (0..ds.users.len()).step_by(cfg.events_every) {
            let Some(top) = first.get(&u).and_then(|v| v.first()).cloned() else {
                continue;
            };
            let user = ds.users[u].id.clone();
            if let Err(s) = ctx.record(&user, std::slice::from_ref(&top)).await {
                failed(&mut rep, format!("RecordEvents user {user}"), &s);
                continue;
            }
            seen[u].insert(top);
            rep.known_users_with_events += 1;
            rep.predict_calls += 1;
            match ctx.predict(&user, vec![]).await {
                Ok(r) => check_answer(&mut rep, &user, &r, &seen[u], cfg.k),
                Err(s) => failed(&mut rep, format!("Predict user {user} after events"), &s),
            }
        }
    }

    // 3. New users: a few events each (items drawn from a dataset user's
    //    history), then Predict: personalised by the events, none returned.
    let popular = ctx.predict("\u{1}audit-nobody", vec![]).await;
    let popular = match popular {
        Ok(r) => ids(&r),
        Err(s) => {
            failed(&mut rep, "Predict of a user with no signal".into(), &s);
            Vec::new()
        }
    };
    for n in 0..cfg.new_users {
        let donor = (n * 7919) % ds.users.len().max(1);
        let mut items: Vec<String> = seen.get(donor).into_iter().flatten().cloned().collect();
        items.sort();
        items.truncate(5);
        if items.is_empty() {
            continue;
        }
        let user = format!("audit-new-user-{n}");
        if let Err(s) = ctx.record(&user, &items).await {
            failed(&mut rep, format!("RecordEvents new user {user}"), &s);
            continue;
        }
        rep.new_users_with_events += 1;
        rep.predict_calls += 1;
        match ctx.predict(&user, vec![]).await {
            Ok(r) => {
                let had: HashSet<String> = items.iter().cloned().collect();
                check_answer(&mut rep, &user, &r, &had, cfg.k);
                if r.personalized_by != PersonalizedBy::Events as i32 || r.cold_start {
                    rep.wrong_personalization += 1;
                    rep.violation(format!(
                        "new user {user} with events: personalized_by {}, cold_start {}",
                        r.personalized_by, r.cold_start
                    ));
                }
                let popular_rest: Vec<String> = popular
                    .iter()
                    .filter(|i| !had.contains(*i))
                    .cloned()
                    .collect();
                if ids(&r) == popular_rest[..popular_rest.len().min(cfg.k)] {
                    rep.new_users_served_popularity += 1;
                    rep.violation(format!("new user {user}: answer equals popularity"));
                }
            }
            Err(s) => failed(&mut rep, format!("Predict new user {user}"), &s),
        }
    }

    // 4. Every item as a one-item context of an unknown user; then mixes.
    if cfg.context_sweep {
        let mut tasks = Vec::new();
        for it in &ds.items {
            let (ctx, id) = (ctx.clone(), it.id.clone());
            tasks.push((
                id.clone(),
                tokio::spawn(async move { ctx.predict("\u{1}audit-context", vec![id]).await }),
            ));
        }
        let n = ds.items.len();
        for j in 0..10usize.min(n) {
            let a = ds.items[(j * 131) % n].id.clone();
            let b = ds.items[(j * 577 + 3) % n].id.clone();
            let (ctx, mix) = (
                ctx.clone(),
                vec![format!("no-such-item-{j}"), a.clone(), b.clone(), a],
            );
            tasks.push((
                mix.join("+"),
                tokio::spawn(async move { ctx.predict("\u{1}audit-context", mix).await }),
            ));
        }
        for (item, t) in tasks {
            rep.context_items_checked += 1;
            rep.predict_calls += 1;
            let context: HashSet<String> = item.split('+').map(str::to_string).collect();
            match t.await {
                Ok(Ok(r)) => {
                    if r.items.len() != cfg.k {
                        rep.short_answers += 1;
                        rep.violation(format!("context {item}: {} items", r.items.len()));
                    }
                    if r.items.iter().any(|i| context.contains(&i.item_id)) {
                        rep.context_item_returned += 1;
                        rep.violation(format!("context {item}: a context item was returned"));
                    }
                    if r.personalized_by != PersonalizedBy::Context as i32 {
                        rep.wrong_personalization += 1;
                        rep.violation(format!(
                            "context {item}: personalized_by {}",
                            r.personalized_by
                        ));
                    }
                }
                Ok(Err(s)) => failed(&mut rep, format!("Predict context {item}"), &s),
                Err(e) => failed(&mut rep, format!("Predict context {item}"), &e.to_string()),
            }
        }
    }

    rep.passed = rep.already_interacted == 0
        && rep.short_answers == 0
        && rep.wrong_personalization == 0
        && rep.failed_calls == 0
        && rep.new_users_served_popularity == 0
        && rep.context_item_returned == 0;
    Ok(rep)
}

fn check_answer(
    rep: &mut AuditReport,
    user: &str,
    r: &PredictResponse,
    had: &HashSet<String>,
    k: usize,
) {
    if r.items.len() != k {
        rep.short_answers += 1;
        rep.violation(format!(
            "user {user}: {} items, asked for {k}",
            r.items.len()
        ));
    }
    for it in &r.items {
        if had.contains(&it.item_id) {
            rep.already_interacted += 1;
            rep.violation(format!(
                "user {user}: returned item {} they already interacted with",
                it.item_id
            ));
        }
    }
}

fn failed(rep: &mut AuditReport, what: String, err: &dyn std::fmt::Display) {
    rep.failed_calls += 1;
    rep.violation(format!("{what}: {err}"));
}
