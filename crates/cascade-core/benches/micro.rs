//! Micro-benchmarks (run by hand: `cargo bench -p cascade-core --bench micro`).
//!
//! - Bloom filter membership (the seen-set predicate inside the HNSW walk)
//! - HNSW search at several `ef` (recall@100 vs exact printed alongside)
//! - the ranker's CPU forward per batch size: plain and factorized
//! - the in-process pipeline end to end (`Engine::predict`)
//! - this CPU's measured matmul peak through the same Candle backend (the
//!   reference the ranker's GFLOP/s is compared with; reported in elem/s =
//!   FLOP/s)
//!
//! The catalogue is `cascade synth` output: `CASCADE_BENCH_ARTIFACT=<version dir>`
//! uses an existing one (e.g. the 1M-item catalogue); otherwise 100,000 items
//! are generated into a temporary directory first.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::hint::black_box;
use std::path::PathBuf;

use candle_core::Device;
use cascade_core::{Engine, PredictRequest};
use cascade_model::serving::{FactorizedRanker, Row};
use cascade_retrieval::{recall_at_k, IndexParams};
use cascade_train::devices::{random_rows, LoadedRanker};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastbloom::BloomFilter;

fn artifact() -> (Option<tempfile::TempDir>, PathBuf) {
    if let Some(p) = std::env::var_os("CASCADE_BENCH_ARTIFACT") {
        return (None, PathBuf::from(p));
    }
    let t = tempfile::tempdir().expect("temp dir");
    let cfg = cascade_train::synth::SynthConfig {
        items: 100_000,
        users: 5_000,
        per_user: 20,
        clusters: 256,
        dim: 64,
        text_dim: 32,
        candidates: 200,
        seed: 7,
        index: IndexParams::default(),
    };
    let (dir, _, _) = cascade_train::synth::synth_artifact(t.path(), &cfg).expect("synth");
    (Some(t), dir)
}

fn benches(c: &mut Criterion) {
    // Bloom membership, sized as the server sizes the seen sets.
    let mut f = BloomFilter::with_false_pos(cascade_core::SEEN_FILTER_FP_RATE)
        .seed(&0x5eed)
        .expected_items(200);
    for i in 0..200u32 {
        f.insert(&(i * 7));
    }
    let mut g = c.benchmark_group("bloom");
    g.bench_function("contains (member)", |b| {
        b.iter(|| f.contains(black_box(&(7u32 * 50))))
    });
    g.bench_function("contains (non-member)", |b| {
        b.iter(|| f.contains(black_box(&3u32)))
    });
    g.finish();

    // The attainable f32 matmul rate here: square matmuls large enough that
    // Candle's gemm runs at its best on every core; 2·n³ FLOP each.
    let mut g = c.benchmark_group("cpu_peak_matmul");
    for n in [512usize, 1024] {
        let a = candle_core::Tensor::ones((n, n), candle_core::DType::F32, &Device::Cpu)
            .expect("tensor");
        g.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(a.matmul(&a).expect("matmul")))
        });
    }
    g.finish();

    let (_keep, dir) = artifact();
    let mut ranker = LoadedRanker::load(&dir, &Device::Cpu).expect("artifact");
    eprintln!(
        "catalogue: {} items, {} users ({})",
        ranker.artifact.space.dims.num_items,
        ranker.artifact.space.dims.num_users,
        dir.display()
    );

    // HNSW search per ef, with recall@100 against exact search.
    let vectors = ranker.artifact.item_vectors.clone();
    let queries: Vec<Vec<f32>> = (0..200)
        .map(|q| {
            vectors[(q * 7919) % vectors.len()]
                .iter()
                .map(|x| x * 0.9 + 0.01)
                .collect()
        })
        .collect();
    let mut g = c.benchmark_group("hnsw_search_k100");
    for ef in [32usize, 64, 128, 256] {
        ranker.artifact.index.params.ef_search = ef;
        let recall = recall_at_k(&ranker.artifact.index, &vectors, &queries[..100], 100);
        eprintln!("hnsw ef={ef}: recall@100 vs exact {recall:.4}");
        let index = &ranker.artifact.index;
        let mut q = 0;
        g.bench_with_input(BenchmarkId::from_parameter(ef), &ef, |b, _| {
            b.iter(|| {
                q = (q + 1) % queries.len();
                black_box(index.search(&queries[q], 100, None))
            })
        });
    }
    g.finish();
    ranker.artifact.index.params.ef_search = IndexParams::default().ef_search;

    // Ranker forward on CPU per batch size.
    let fr = FactorizedRanker::new(
        &ranker.artifact.ranker,
        &ranker.artifact.tables.items,
        ranker.artifact.space.user_cats.clone(),
    )
    .expect("factorized");
    eprintln!(
        "ranker: {:.0} FLOP per row in the plain forward",
        ranker.flops_per_row()
    );
    let mut g = c.benchmark_group("ranker_forward");
    for batch in [1usize, 16, 256, 1024, 4096] {
        let (u, i, t) = random_rows(&ranker.artifact, batch, batch as u64);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("plain", batch), &batch, |b, _| {
            b.iter(|| black_box(ranker.forward(&u, &i, &t).expect("forward")))
        });
        // As the server does: one user part per request, 200 rows each.
        let parts: Vec<_> = (0..batch.div_ceil(200))
            .map(|r| fr.user(u[r * 200]))
            .collect();
        let rows: Vec<Row> = (0..batch)
            .map(|j| Row {
                user: j / 200,
                item: i[j],
                tt: t[j],
            })
            .collect();
        g.bench_with_input(BenchmarkId::new("factorized", batch), &batch, |b, _| {
            b.iter(|| black_box(fr.score(&parts, &rows).expect("score")))
        });
    }
    g.finish();
    // Known users of this catalogue (synthetic or real IDs alike).
    let users: Vec<String> = ranker
        .artifact
        .space
        .user_ids
        .iter()
        .take(500)
        .cloned()
        .collect();
    drop(ranker);

    // The whole in-process pipeline.
    let engine = Engine::load(&dir, &Device::Cpu).expect("engine");
    let first = engine
        .predict(&PredictRequest {
            user_id: users[0].clone(),
            num_results: 10,
            ..Default::default()
        })
        .expect("predict");
    assert!(
        !first.cold_start,
        "the pipeline bench must rank known users"
    );
    let mut g = c.benchmark_group("pipeline");
    let mut n = 0;
    g.bench_function("predict k=10 of 200 candidates", |b| {
        b.iter(|| {
            n = (n + 1) % users.len();
            black_box(
                engine
                    .predict(&PredictRequest {
                        user_id: users[n].clone(),
                        num_results: 10,
                        ..Default::default()
                    })
                    .expect("predict"),
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = benches
}
criterion_main!(micro);
