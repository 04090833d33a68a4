//! Metric definitions, as RecBole computes them, so numbers are comparable
//! with its published ML-100K table.

use std::collections::HashSet;

/// Ranking metrics for one user's top-k list against their held-out items.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TopK {
    pub recall: f64,
    pub ndcg: f64,
    pub hit: f64,
}

/// Recall@k = hits / |relevant|; NDCG@k with binary gains and an ideal DCG over
/// `min(|relevant|, k)` positions; Hit@k = any hit. `ranked` is best-first.
pub fn top_k(ranked: &[u32], relevant: &HashSet<u32>, k: usize) -> TopK {
    if relevant.is_empty() {
        return TopK::default();
    }
    let mut hits = 0usize;
    let mut dcg = 0.0;
    for (pos, item) in ranked.iter().take(k).enumerate() {
        if relevant.contains(item) {
            hits += 1;
            dcg += 1.0 / ((pos + 2) as f64).log2();
        }
    }
    let idcg: f64 = (0..relevant.len().min(k))
        .map(|p| 1.0 / ((p + 2) as f64).log2())
        .sum();
    TopK {
        recall: hits as f64 / relevant.len() as f64,
        ndcg: dcg / idcg,
        hit: if hits > 0 { 1.0 } else { 0.0 },
    }
}

/// Mean of per-user metrics.
pub fn mean(xs: &[TopK]) -> TopK {
    let n = xs.len().max(1) as f64;
    TopK {
        recall: xs.iter().map(|x| x.recall).sum::<f64>() / n,
        ndcg: xs.iter().map(|x| x.ndcg).sum::<f64>() / n,
        hit: xs.iter().map(|x| x.hit).sum::<f64>() / n,
    }
}

/// (RMSE, MAE) of predictions against targets.
pub fn rmse_mae(pred: &[f32], truth: &[f32]) -> (f64, f64) {
    let n = pred.len().max(1) as f64;
    let (mut se, mut ae) = (0.0, 0.0);
    for (p, t) in pred.iter().zip(truth) {
        let d = (*p - *t) as f64;
        se += d * d;
        ae += d.abs();
    }
    ((se / n).sqrt(), ae / n)
}

/// Indices of the `k` highest scores, best first; ties go to the lower index.
/// Entries with `-inf` (masked) are never returned.
pub fn top_indices(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32)
        .filter(|&i| scores[i as usize] > f32::NEG_INFINITY)
        .collect();
    let cmp = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(xs: &[u32]) -> HashSet<u32> {
        xs.iter().copied().collect()
    }

    #[test]
    fn hand_computed_top_k() {
        // relevant {1, 5, 9}; list hits at positions 0 and 2.
        let m = top_k(&[1, 2, 5, 3], &set(&[1, 5, 9]), 4);
        assert!((m.recall - 2.0 / 3.0).abs() < 1e-12);
        let dcg = 1.0 + 1.0 / 4f64.log2(); // 1/log2(2) + 1/log2(4) = 1.5
        let idcg = 1.0 + 1.0 / 3f64.log2() + 1.0 / 4f64.log2();
        assert!((m.ndcg - dcg / idcg).abs() < 1e-12);
        assert_eq!(m.hit, 1.0);
        // k cuts the list: only position 0 counts.
        let m = top_k(&[1, 2, 5, 3], &set(&[1, 5, 9]), 1);
        assert!((m.recall - 1.0 / 3.0).abs() < 1e-12);
        assert!(
            (m.ndcg - 1.0).abs() < 1e-12,
            "ideal DCG uses min(|rel|, k) = 1 position"
        );
        // no hit
        let m = top_k(&[7, 8], &set(&[1]), 2);
        assert_eq!((m.recall, m.ndcg, m.hit), (0.0, 0.0, 0.0));
    }

    #[test]
    fn perfect_ranking_scores_one() {
        let m = top_k(&[4, 2, 9], &set(&[2, 4, 9]), 10);
        assert_eq!((m.recall, m.hit), (1.0, 1.0));
        assert!((m.ndcg - 1.0).abs() < 1e-12);
    }

    #[test]
    fn rmse_and_mae() {
        let (r, m) = rmse_mae(&[3.0, 4.0, 1.0], &[4.0, 4.0, 3.0]);
        assert!((r - (5.0f64 / 3.0).sqrt()).abs() < 1e-9);
        assert!((m - 1.0).abs() < 1e-9);
    }

    #[test]
    fn top_indices_orders_and_skips_masked() {
        let s = [0.5, f32::NEG_INFINITY, 0.9, 0.5, 0.1];
        assert_eq!(top_indices(&s, 3), vec![2, 0, 3]);
        assert_eq!(top_indices(&s, 10), vec![2, 0, 3, 4]);
    }
}
