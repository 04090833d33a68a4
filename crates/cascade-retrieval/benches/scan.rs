//! Exact scan against the HNSW walk per catalogue size: where the scan stops
//! paying (`DEFAULT_EXACT_BELOW`). Run by hand:
//! `cargo bench -p cascade-retrieval --bench scan`.
//!
//! Random unit vectors of the two-tower's width (64), k = 200 (the default
//! candidate count), the default `ef_search`, and a filter that drops one
//! item in twenty (a seen set) on both paths.
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is a failed run

use std::hint::black_box;

use cascade_retrieval::{IndexParams, ItemIndex, SearchPath};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

#[path = "../tests/support/unit_vectors.rs"]
mod unit_vectors;
use unit_vectors::unit_vectors;

fn benches(c: &mut Criterion) {
    let sizes: Vec<usize> = std::env::var("CASCADE_SCAN_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_682, 5_000, 20_000, 50_000]);
    let queries = unit_vectors(64, 64, 2);
    let keep = |i: usize| i % 20 != 7;
    let mut g = c.benchmark_group("retrieve_k200");
    for &n in &sizes {
        let items = unit_vectors(n, 64, 1);
        let mut index = ItemIndex::build(&items, IndexParams::default()).unwrap();
        for path in [SearchPath::Exact, SearchPath::Hnsw] {
            index.choose_path(&items, Some(path)).unwrap();
            let mut q = 0;
            let name = format!("{path:?}").to_lowercase();
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    q = (q + 1) % queries.len();
                    black_box(index.search(&queries[q], 200, Some(&keep)))
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = scan;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(scan);
