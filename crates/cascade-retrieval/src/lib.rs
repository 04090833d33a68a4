//! The item index: HNSW (`hnsw_rs`) over L2-normalised item vectors with
//! dot-product distance, plus exact search to measure its recall.
//!
//! The distance is [`ClampedDot`], not anndists' `DistDot`: `DistDot`
//! asserts `1 − dot ≥ 0`, and two unit vectors that are (nearly) the same
//! give a dot a rounding error above 1, so a query equal to an item (a
//! one-item context) panicked inside the graph walk.

use std::path::Path;

use hnsw_rs::api::AnnT;
use hnsw_rs::prelude::{Distance, Hnsw, HnswIo};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// File basename of the dumped graph (`items.hnsw.graph`, `items.hnsw.data`).
pub const INDEX_BASENAME: &str = "items";

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index: {0}")]
    Hnsw(String),
    #[error("index: vector {index} has dimension {got}, expected {expected}")]
    Dim {
        index: usize,
        got: usize,
        expected: usize,
    },
    #[error("index: empty catalogue")]
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IndexParams {
    pub max_nb_connection: usize,
    pub ef_construction: usize,
    pub max_layer: usize,
    pub ef_search: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        Self {
            max_nb_connection: 24,
            ef_construction: 200,
            max_layer: 16,
            ef_search: 128,
        }
    }
}

/// `1 − a·b`, clamped to `[0, 2]`: cosine distance for unit vectors that
/// tolerates their rounding (see the module docs). Summed in eight lanes so
/// the compiler vectorises it.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClampedDot;

impl Distance<f32> for ClampedDot {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - dot(va, vb)).clamp(0.0, 2.0)
    }
}

/// Dot product in eight independent accumulators.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

pub struct ItemIndex {
    hnsw: Hnsw<'static, f32, ClampedDot>,
    pub dim: usize,
    pub len: usize,
    pub params: IndexParams,
}

/// A scored neighbour: item index and dot-product similarity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub item: usize,
    pub score: f32,
}

impl ItemIndex {
    /// Build over `vectors` (row `i` = item `i`), inserting in parallel.
    pub fn build(vectors: &[Vec<f32>], params: IndexParams) -> Result<Self, IndexError> {
        let dim = vectors.first().map(Vec::len).ok_or(IndexError::Empty)?;
        if let Some((index, v)) = vectors.iter().enumerate().find(|(_, v)| v.len() != dim) {
            return Err(IndexError::Dim {
                index,
                got: v.len(),
                expected: dim,
            });
        }
        let mut hnsw = Hnsw::<f32, ClampedDot>::new(
            params.max_nb_connection,
            vectors.len(),
            params.max_layer,
            params.ef_construction,
            ClampedDot,
        );
        let data: Vec<(&Vec<f32>, usize)> =
            vectors.iter().enumerate().map(|(i, v)| (v, i)).collect();
        hnsw.parallel_insert(&data);
        hnsw.set_searching_mode(true);
        Ok(Self {
            hnsw,
            dim,
            len: vectors.len(),
            params,
        })
    }

    /// Top-`k` items by dot product with the query's direction (it is
    /// re-normalised; a zero, non-finite or wrongly sized query finds
    /// nothing); `keep` (when given) is evaluated inside the graph walk, so
    /// filtered-out items never take a result slot.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: Option<&dyn Fn(usize) -> bool>,
    ) -> Vec<Hit> {
        if query.len() != self.dim || k == 0 {
            return Vec::new();
        }
        // Tower outputs are unit already: only other queries are copied.
        let norm = dot(query, query).sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Vec::new();
        }
        let rescaled: Vec<f32>;
        let query = if (norm - 1.0).abs() <= 1e-5 {
            query
        } else {
            rescaled = query.iter().map(|x| x / norm).collect();
            rescaled.as_slice()
        };
        let ef = self.params.ef_search.max(k);
        let res = match keep {
            Some(f) => {
                let pred = |id: &usize| f(*id);
                self.hnsw.search_filter(query, k, ef, Some(&pred))
            }
            None => self.hnsw.search(query, k, ef),
        };
        res.into_iter()
            .map(|n| Hit {
                item: n.d_id,
                score: 1.0 - n.distance,
            })
            .collect()
    }

    /// Dump to `dir/items.hnsw.{graph,data}`.
    pub fn save(&self, dir: &Path) -> Result<(), IndexError> {
        self.hnsw
            .file_dump(dir, INDEX_BASENAME)
            .map_err(|e| IndexError::Hnsw(e.to_string()))?;
        Ok(())
    }

    pub fn load(dir: &Path, params: IndexParams) -> Result<Self, IndexError> {
        // hnsw_rs ties the loaded graph's lifetime to its reloader. The reloader is
        // a few paths and options (data is copied, not memory-mapped), so it is
        // leaked once per load to give the index a 'static lifetime.
        let io: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir, INDEX_BASENAME)));
        let mut hnsw: Hnsw<'static, f32, ClampedDot> = io
            .load_hnsw()
            .map_err(|e| IndexError::Hnsw(format!("{}: {e}", dir.display())))?;
        hnsw.set_searching_mode(true);
        let len = hnsw.get_nb_point();
        let dim = hnsw.get_point_indexation().get_data_dimension();
        Ok(Self {
            hnsw,
            dim,
            len,
            params,
        })
    }
}

/// Exact top-`k` by dot product (ties broken by lower item index).
pub fn exact_top_k(vectors: &[Vec<f32>], query: &[f32], k: usize) -> Vec<Hit> {
    let mut scored: Vec<Hit> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| Hit {
            item: i,
            score: v.iter().zip(query).map(|(a, b)| a * b).sum(),
        })
        .collect();
    let k = k.min(scored.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item));
    scored.select_nth_unstable_by(k - 1, cmp);
    scored.truncate(k);
    scored.sort_by(cmp);
    scored
}

/// Mean recall@k of the index against exact search over `queries`.
pub fn recall_at_k(index: &ItemIndex, vectors: &[Vec<f32>], queries: &[Vec<f32>], k: usize) -> f64 {
    if queries.is_empty() {
        return 0.0;
    }
    let total: f64 = queries
        .par_iter()
        .map(|q| {
            let truth: std::collections::HashSet<usize> = exact_top_k(vectors, q, k)
                .into_iter()
                .map(|h| h.item)
                .collect();
            let got = index.search(q, k, None);
            got.iter().filter(|h| truth.contains(&h.item)).count() as f64
                / truth.len().max(1) as f64
        })
        .sum();
    total / queries.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn unit_vectors(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let v: Vec<f32> = (0..d).map(|_| rng.random::<f32>() - 0.5).collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            })
            .collect()
    }

    #[test]
    fn exact_top_k_orders_by_dot_then_index() {
        let v = vec![
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![1.0, 0.0],
            vec![0.6, 0.8],
        ];
        let hits = exact_top_k(&v, &[1.0, 0.0], 3);
        assert_eq!(
            hits.iter().map(|h| h.item).collect::<Vec<_>>(),
            vec![0, 2, 3]
        );
        assert!((hits[2].score - 0.6).abs() < 1e-6);
    }

    #[test]
    fn hnsw_recall_is_high_and_survives_save_load() {
        let items = unit_vectors(3000, 32, 1);
        let queries = unit_vectors(50, 32, 2);
        let idx = ItemIndex::build(&items, IndexParams::default()).unwrap();
        let r = recall_at_k(&idx, &items, &queries, 100);
        assert!(r > 0.9, "recall@100 {r}");
        let dir = tempfile::tempdir().unwrap();
        idx.save(dir.path()).unwrap();
        let loaded = ItemIndex::load(dir.path(), IndexParams::default()).unwrap();
        assert_eq!((loaded.len, loaded.dim), (3000, 32));
        let a: Vec<usize> = idx
            .search(&queries[0], 10, None)
            .iter()
            .map(|h| h.item)
            .collect();
        let b: Vec<usize> = loaded
            .search(&queries[0], 10, None)
            .iter()
            .map(|h| h.item)
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn every_item_as_its_own_query_finds_itself_without_panicking() {
        // Unit vectors whose self-dot rounds above 1 made DistDot assert;
        // duplicates and a non-unit query must work too.
        let mut items = unit_vectors(500, 64, 7);
        items.push(items[3].clone());
        let idx = ItemIndex::build(&items, IndexParams::default()).unwrap();
        let above_one = items.iter().filter(|v| dot(v, v) > 1.0).count();
        assert!(above_one > 0, "the test set must hold a self-dot above 1");
        for (i, v) in items.iter().enumerate() {
            let hits = idx.search(v, 5, None);
            assert_eq!(hits.len(), 5);
            assert!(hits.iter().any(|h| h.item == i) || i == 3 || i == 500);
            assert!(hits.iter().all(|h| (-1.0..=1.0).contains(&h.score)));
        }
        let scaled: Vec<f32> = items[10].iter().map(|x| x * 3.0).collect();
        assert_eq!(idx.search(&scaled, 1, None)[0].item, 10);
        assert!(idx.search(&[0.0; 64], 5, None).is_empty());
        assert!(idx.search(&[1.0; 3], 5, None).is_empty());
    }

    #[test]
    fn eight_lane_dot_matches_the_plain_sum() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.01).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-3 * plain.abs());
    }

    #[test]
    fn filter_applies_inside_search() {
        let items = unit_vectors(2000, 16, 3);
        let idx = ItemIndex::build(&items, IndexParams::default()).unwrap();
        let q = &items[8];
        let keep = |i: usize| i % 2 == 1;
        let hits = idx.search(q, 20, Some(&keep));
        assert_eq!(hits.len(), 20, "filtered search still fills k");
        assert!(hits.iter().all(|h| h.item % 2 == 1));
        assert!(
            !hits.iter().any(|h| h.item == 8),
            "the query item itself is filtered out"
        );
    }
}
