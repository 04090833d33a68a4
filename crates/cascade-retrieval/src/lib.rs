//! The item index: HNSW (`hnsw_rs`) over L2-normalised item vectors with
//! dot-product distance, and an exact scan of a flat copy of the vectors for
//! catalogues small enough that scanning them all is cheaper than walking the
//! graph (below [`IndexParams::exact_below`] items; see
//! [`DEFAULT_EXACT_BELOW`] for how that size was chosen).
//!
//! The distance is [`ClampedDot`], not anndists' `DistDot`: `DistDot`
//! asserts `1 − dot ≥ 0`, and two unit vectors that are (nearly) the same
//! give a dot a rounding error above 1, so a query equal to an item (a
//! one-item context) panicked inside the graph walk.

use std::path::Path;

use hnsw_rs::api::AnnT;

mod dump;
pub use dump::check_bytes as check_dump_bytes;
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

/// Catalogues with fewer items than this are searched by an exact scan, not
/// the graph. `cargo bench -p cascade-retrieval --bench scan` (k = 200, 64-d,
/// `bench/results/criterion-scan.txt`): the scan costs about 13 µs per 1,000
/// items (24 µs at 1,682, 263 µs at 20,000, 673 µs at 50,000) while the walk
/// cost 0.58 ms at 1,682 and 4.2 ms at 20,000 random vectors (its worst
/// case) and about 1.4 ms at k = 100 on the clustered 1M synthetic catalogue.
/// Below this size the scan stays under about 0.3 ms, cheaper than any walk
/// measured, and it is exact.
pub const DEFAULT_EXACT_BELOW: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IndexParams {
    pub max_nb_connection: usize,
    pub ef_construction: usize,
    pub max_layer: usize,
    pub ef_search: usize,
    /// Catalogues with fewer items are scanned exactly instead of walked.
    #[serde(default = "default_exact_below")]
    pub exact_below: usize,
}

fn default_exact_below() -> usize {
    DEFAULT_EXACT_BELOW
}

impl Default for IndexParams {
    fn default() -> Self {
        Self {
            max_nb_connection: 24,
            ef_construction: 200,
            max_layer: 16,
            ef_search: 128,
            exact_below: DEFAULT_EXACT_BELOW,
        }
    }
}

/// How [`ItemIndex::search`] finds the top items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchPath {
    /// Every item's dot product with the query, then the top `k`.
    Exact,
    /// The HNSW graph walk.
    Hnsw,
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
    /// Row-major copy of the vectors (`len × dim`), held only while the
    /// exact scan is the search path.
    flat: Option<Vec<f32>>,
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
        let mut index = Self {
            hnsw,
            flat: None,
            dim,
            len: vectors.len(),
            params,
        };
        index.choose_path(vectors, None)?;
        Ok(index)
    }

    /// Pick the search path: `force` when given, otherwise the exact scan
    /// below `params.exact_below` items. `vectors` are the indexed vectors
    /// (row `i` = item `i`), copied flat for the scan; nothing is copied
    /// again when the index already takes that path.
    pub fn choose_path(
        &mut self,
        vectors: &[Vec<f32>],
        force: Option<SearchPath>,
    ) -> Result<SearchPath, IndexError> {
        let path = force.unwrap_or(if self.len < self.params.exact_below {
            SearchPath::Exact
        } else {
            SearchPath::Hnsw
        });
        if path == self.path() {
            return Ok(path);
        }
        self.flat = match path {
            SearchPath::Hnsw => None,
            SearchPath::Exact => {
                if vectors.len() != self.len {
                    return Err(IndexError::Hnsw(format!(
                        "{} vectors for an index of {} items",
                        vectors.len(),
                        self.len
                    )));
                }
                let mut flat = Vec::with_capacity(self.len * self.dim);
                for (index, v) in vectors.iter().enumerate() {
                    if v.len() != self.dim {
                        return Err(IndexError::Dim {
                            index,
                            got: v.len(),
                            expected: self.dim,
                        });
                    }
                    flat.extend_from_slice(v);
                }
                Some(flat)
            }
        };
        Ok(path)
    }

    /// The path [`ItemIndex::search`] takes.
    pub fn path(&self) -> SearchPath {
        if self.flat.is_some() {
            SearchPath::Exact
        } else {
            SearchPath::Hnsw
        }
    }

    /// Top-`k` items by dot product with the query's direction (it is
    /// re-normalised; a zero, non-finite or wrongly sized query finds
    /// nothing), best first; `keep` (when given) is evaluated inside the
    /// search, so filtered-out items never take a result slot. The exact scan
    /// asks `keep` once per item; the graph walk once per neighbour visit.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: Option<&dyn Fn(usize) -> bool>,
    ) -> Vec<Hit> {
        match &self.flat {
            Some(flat) => self.with_unit(query, k, |q| self.scan(flat, q, k, keep)),
            None => self.walk(query, k, keep),
        }
    }

    /// The graph walk whatever the search path (what its recall measures).
    pub fn walk(&self, query: &[f32], k: usize, keep: Option<&dyn Fn(usize) -> bool>) -> Vec<Hit> {
        self.with_unit(query, k, |query| {
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
        })
    }

    /// Run `search` on the query scaled to unit length; nothing for a zero,
    /// non-finite or wrongly sized query, or `k == 0`.
    fn with_unit(
        &self,
        query: &[f32],
        k: usize,
        search: impl FnOnce(&[f32]) -> Vec<Hit>,
    ) -> Vec<Hit> {
        if query.len() != self.dim || k == 0 {
            return Vec::new();
        }
        // Tower outputs are unit already: only other queries are copied.
        let norm = dot(query, query).sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Vec::new();
        }
        if (norm - 1.0).abs() <= 1e-5 {
            return search(query);
        }
        let rescaled: Vec<f32> = query.iter().map(|x| x / norm).collect();
        search(&rescaled)
    }

    /// The exact path: every item's score as the graph walk computes it
    /// (`1 − ClampedDot`), then items best first (ties: lower item index)
    /// until `k` pass `keep`. `keep` is asked only about items in that walk,
    /// so its cost follows `k` and what it rejects, not the catalogue size;
    /// the answer is the same as filtering every item first.
    fn scan(
        &self,
        flat: &[f32],
        query: &[f32],
        k: usize,
        keep: Option<&dyn Fn(usize) -> bool>,
    ) -> Vec<Hit> {
        let mut scored: Vec<Hit> = flat
            .chunks_exact(self.dim)
            .enumerate()
            .map(|(item, v)| Hit {
                item,
                score: 1.0 - ClampedDot.eval(query, v),
            })
            .collect();
        let Some(keep) = keep else {
            return top_k(scored, k);
        };
        let mut out = Vec::with_capacity(k.min(scored.len()));
        let mut rest: &mut [Hit] = &mut scored;
        // Each round sorts the next best `chunk` items (twice the last).
        let mut chunk = (2 * k).max(64);
        while out.len() < k && !rest.is_empty() {
            let m = chunk.min(rest.len());
            if m < rest.len() {
                rest.select_nth_unstable_by(m - 1, best_first);
            }
            let (head, tail) = rest.split_at_mut(m);
            head.sort_unstable_by(best_first);
            for h in head.iter() {
                if keep(h.item) {
                    out.push(*h);
                    if out.len() == k {
                        break;
                    }
                }
            }
            rest = tail;
            chunk = chunk.saturating_mul(2);
        }
        out
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
        // hnsw_rs can abort or exit on a corrupt file: walk it first.
        dump::check(dir, INDEX_BASENAME)
            .map_err(|e| IndexError::Hnsw(format!("{}: {e}", dir.display())))?;
        let io: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir, INDEX_BASENAME)));
        let mut hnsw: Hnsw<'static, f32, ClampedDot> = io
            .load_hnsw()
            .map_err(|e| IndexError::Hnsw(format!("{}: {e}", dir.display())))?;
        hnsw.set_searching_mode(true);
        let len = hnsw.get_nb_point();
        let dim = hnsw.get_point_indexation().get_data_dimension();
        Ok(Self {
            hnsw,
            flat: None,
            dim,
            len,
            params,
        })
    }
}

/// Higher score first, then lower item index: a total order, so every
/// selection and sort over hits is deterministic.
fn best_first(a: &Hit, b: &Hit) -> std::cmp::Ordering {
    b.score.total_cmp(&a.score).then(a.item.cmp(&b.item))
}

/// The best `k` hits, best first.
fn top_k(mut scored: Vec<Hit>, k: usize) -> Vec<Hit> {
    let k = k.min(scored.len());
    if k == 0 {
        return Vec::new();
    }
    if k < scored.len() {
        scored.select_nth_unstable_by(k - 1, best_first);
        scored.truncate(k);
    }
    scored.sort_unstable_by(best_first);
    scored
}

/// Exact top-`k` by dot product (ties broken by lower item index).
pub fn exact_top_k(vectors: &[Vec<f32>], query: &[f32], k: usize) -> Vec<Hit> {
    let scored: Vec<Hit> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| Hit {
            item: i,
            score: v.iter().zip(query).map(|(a, b)| a * b).sum(),
        })
        .collect();
    top_k(scored, k)
}

/// Mean recall@k of the index's graph walk against exact search over `queries`.
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
            let got = index.walk(q, k, None);
            got.iter().filter(|h| truth.contains(&h.item)).count() as f64
                / truth.len().max(1) as f64
        })
        .sum();
    total / queries.len() as f64
}

#[cfg(test)]
#[path = "../tests/support/unit_vectors.rs"]
mod unit_vectors;

#[cfg(test)]
mod tests {
    use super::unit_vectors::unit_vectors;
    use super::*;
    use std::collections::HashSet;

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
            .walk(&queries[0], 10, None)
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
    fn filter_applies_inside_search_on_both_paths() {
        let items = unit_vectors(2000, 16, 3);
        let idx = ItemIndex::build(&items, IndexParams::default()).unwrap();
        assert_eq!(idx.path(), SearchPath::Exact);
        let q = &items[8];
        let keep = |i: usize| i % 2 == 1;
        for hits in [idx.search(q, 20, Some(&keep)), idx.walk(q, 20, Some(&keep))] {
            assert_eq!(hits.len(), 20, "filtered search still fills k");
            assert!(hits.iter().all(|h| h.item % 2 == 1));
            assert!(
                !hits.iter().any(|h| h.item == 8),
                "the query item itself is filtered out"
            );
        }
    }

    /// Filters that reject the best items, most items, or all of them: the
    /// scan answers as filtering every item first would, asking the filter
    /// about fewer items than the catalogue holds when few are rejected.
    #[test]
    fn the_scan_asks_the_filter_lazily_and_answers_as_filtering_first() {
        let items = unit_vectors(2000, 16, 8);
        let idx = ItemIndex::build(&items, IndexParams::default()).unwrap();
        let q = &items[11];
        // Every item, best first, scored as the scan scores them.
        let truth = idx.search(q, 2000, None);
        assert_eq!(truth.len(), 2000);
        let best: HashSet<usize> = truth[..150].iter().map(|h| h.item).collect();
        let filters: Vec<Box<dyn Fn(usize) -> bool>> = vec![
            Box::new(|i| i % 7 != 0),
            Box::new(move |i| !best.contains(&i)),
            Box::new(|i| i % 50 == 3),
            Box::new(|_| false),
        ];
        for (n, f) in filters.iter().enumerate() {
            let asked = std::cell::Cell::new(0usize);
            let counting = |i: usize| {
                asked.set(asked.get() + 1);
                f(i)
            };
            let got = idx.search(q, 100, Some(&counting));
            let want: Vec<usize> = truth
                .iter()
                .map(|h| h.item)
                .filter(|&i| f(i))
                .take(100)
                .collect();
            assert_eq!(
                got.iter().map(|h| h.item).collect::<Vec<_>>(),
                want,
                "filter {n}"
            );
            if n == 0 {
                assert!(asked.get() < 400, "asked about {} items", asked.get());
            }
        }
    }

    #[test]
    fn the_path_follows_the_catalogue_size_unless_forced() {
        let items = unit_vectors(500, 16, 4);
        let small = IndexParams {
            exact_below: 501,
            ..IndexParams::default()
        };
        let mut idx = ItemIndex::build(&items, small).unwrap();
        assert_eq!(idx.path(), SearchPath::Exact);
        let at_threshold = IndexParams {
            exact_below: 500,
            ..IndexParams::default()
        };
        assert_eq!(
            ItemIndex::build(&items, at_threshold).unwrap().path(),
            SearchPath::Hnsw
        );
        assert_eq!(
            idx.choose_path(&items, Some(SearchPath::Hnsw)).unwrap(),
            SearchPath::Hnsw
        );
        assert_eq!(idx.path(), SearchPath::Hnsw);
        assert!(
            idx.choose_path(&items[..10], Some(SearchPath::Exact))
                .is_err(),
            "a scan over other vectors than the index holds is refused"
        );
    }

    #[test]
    fn the_scan_is_exact_and_scores_as_the_walk_does() {
        let items = unit_vectors(3000, 32, 5);
        let queries = unit_vectors(20, 32, 6);
        let idx = ItemIndex::build(&items, IndexParams::default()).unwrap();
        assert_eq!(idx.path(), SearchPath::Exact);
        let mut agree = 0usize;
        for q in &queries {
            let scan = idx.search(q, 100, None);
            let truth = exact_top_k(&items, q, 100);
            assert_eq!(scan.len(), 100);
            for (a, b) in scan.iter().zip(&truth) {
                assert_eq!(a.item, b.item);
                assert!((a.score - b.score).abs() < 1e-5, "{a:?} vs {b:?}");
            }
            assert!(scan.windows(2).all(|w| w[0].score >= w[1].score));
            // Where the walk finds an item, it scores it the same.
            let walk = idx.walk(q, 100, None);
            for w in &walk {
                if let Some(s) = scan.iter().find(|s| s.item == w.item) {
                    agree += 1;
                    assert_eq!(s.score.to_bits(), w.score.to_bits());
                }
            }
        }
        assert!(agree > 20 * 90, "the walk found {agree} of 2000");
    }
}
