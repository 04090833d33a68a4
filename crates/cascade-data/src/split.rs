//! Seeded splits for the two evaluation protocols.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::Interaction;

/// Indices of interactions per split part.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Vec<usize>,
    pub valid: Vec<usize>,
    pub test: Vec<usize>,
}

/// A random split over all interactions (the rating protocol: 90/10, no validation).
pub fn random_split(n: usize, test_fraction: f64, seed: u64) -> Split {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_test = (n as f64 * test_fraction).round() as usize;
    let test = idx.split_off(n - n_test);
    Split {
        train: idx,
        valid: Vec::new(),
        test,
    }
}

/// Part sizes for one user's `n` interactions, as RecBole's ratio split
/// computes them: floor each held-out part, give train the rest, and give a
/// held-out part that would round to zero one row while train keeps more than one.
pub fn part_sizes(n: usize, ratios: [f64; 3]) -> [usize; 3] {
    let total: f64 = ratios.iter().sum();
    let r = ratios.map(|x| x / total);
    let mut cnt = r.map(|x| (x * n as f64) as usize);
    cnt[0] = n - cnt[1] - cnt[2];
    for i in [2usize, 1] {
        if cnt[0] <= 1 {
            break;
        }
        let want = r[i] * n as f64;
        if want > 0.0 && want < 1.0 {
            cnt[i] += 1;
            cnt[0] -= 1;
        }
    }
    cnt
}

/// Per-user random split (RecBole's `RS: [0.8, 0.1, 0.1]`, `order: RO`,
/// `group_by: user`): each user's interactions are shuffled and cut by ratio.
pub fn per_user_split(
    interactions: &[Interaction],
    num_users: usize,
    ratios: [f64; 3],
    seed: u64,
) -> Split {
    let mut by_user: Vec<Vec<usize>> = vec![Vec::new(); num_users];
    for (i, x) in interactions.iter().enumerate() {
        by_user[x.user as usize].push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut s = Split {
        train: Vec::new(),
        valid: Vec::new(),
        test: Vec::new(),
    };
    for mut rows in by_user {
        rows.shuffle(&mut rng);
        let [a, b, _] = part_sizes(rows.len(), ratios);
        s.train.extend_from_slice(&rows[..a]);
        s.valid.extend_from_slice(&rows[a..a + b]);
        s.test.extend_from_slice(&rows[a + b..]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_match_recbole_rule() {
        assert_eq!(part_sizes(20, [0.8, 0.1, 0.1]), [16, 2, 2]);
        assert_eq!(part_sizes(25, [0.8, 0.1, 0.1]), [21, 2, 2]);
        // 0.1 * 5 = 0.5 rounds to zero: each held-out part gets one row.
        assert_eq!(part_sizes(5, [0.8, 0.1, 0.1]), [3, 1, 1]);
        assert_eq!(part_sizes(1, [0.8, 0.1, 0.1]), [1, 0, 0]);
    }

    #[test]
    fn per_user_split_is_a_seeded_partition() {
        let xs: Vec<Interaction> = (0..300)
            .map(|i| Interaction {
                user: (i % 7) as u32,
                item: i as u32,
                rating: 1.0,
                timestamp: 0,
            })
            .collect();
        let a = per_user_split(&xs, 7, [0.8, 0.1, 0.1], 3);
        let b = per_user_split(&xs, 7, [0.8, 0.1, 0.1], 3);
        let c = per_user_split(&xs, 7, [0.8, 0.1, 0.1], 4);
        assert_eq!(a.test, b.test);
        assert_ne!(a.test, c.test);
        let mut all: Vec<usize> = a
            .train
            .iter()
            .chain(&a.valid)
            .chain(&a.test)
            .copied()
            .collect();
        all.sort();
        assert_eq!(all, (0..300).collect::<Vec<_>>());
        // every user has held-out rows
        for u in 0..7u32 {
            assert!(a.test.iter().any(|&i| xs[i].user == u));
        }
    }

    #[test]
    fn random_split_sizes() {
        let s = random_split(1000, 0.1, 1);
        assert_eq!((s.train.len(), s.test.len()), (900, 100));
    }
}
