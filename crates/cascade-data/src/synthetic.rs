//! A small dataset with planted structure, used by tests to show that
//! training learns: users belong to a taste cluster, mostly interact with
//! items of their cluster, and rate those higher. Popularity is flat across
//! clusters, so a popularity ranker cannot find the structure; a learned one can.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::format::{Dataset, Interaction, Item, User};

pub fn planted(
    num_users: usize,
    num_items: usize,
    clusters: usize,
    per_user: usize,
    seed: u64,
) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let items: Vec<Item> = (0..num_items)
        .map(|i| Item {
            id: format!("i{i}"),
            title: format!("Item {i}"),
            year: Some(1990 + (i % 20) as i32),
            genres: vec![format!("g{}", i % clusters)],
            description: String::new(),
        })
        .collect();
    let users: Vec<User> = (0..num_users)
        .map(|u| User {
            id: format!("u{u}"),
            features: vec![format!("c{}", u % clusters), ["a", "b"][u % 2].to_string()],
        })
        .collect();
    let mut interactions = Vec::new();
    for u in 0..num_users {
        let c = u % clusters;
        let mut seen = std::collections::HashSet::new();
        while seen.len() < per_user {
            let in_cluster = rng.random_bool(0.85);
            let item = if in_cluster {
                let k = rng.random_range(0..num_items / clusters);
                k * clusters + c
            } else {
                rng.random_range(0..num_items)
            };
            if item >= num_items || !seen.insert(item) {
                continue;
            }
            let base = if item % clusters == c { 4.3 } else { 2.2 };
            let rating = (base + rng.random_range(-0.7f32..0.7))
                .round()
                .clamp(1.0, 5.0);
            interactions.push(Interaction {
                user: u as u32,
                item: item as u32,
                rating,
                timestamp: rng.random_range(0..1_000_000),
            });
        }
    }
    Dataset {
        items,
        users,
        user_feature_names: vec!["segment".into(), "group".into()],
        interactions,
        checksum: "synthetic".into(),
    }
}
