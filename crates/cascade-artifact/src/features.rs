//! Turns a [`Dataset`] plus a set of training interactions into model inputs
//! and the vocabularies the server needs to rebuild them.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use cascade_data::{Dataset, Interaction, Item};
use cascade_model::nn::{FeatureDims, ItemInputs, UserInputs};
use serde::{Deserialize, Serialize};

use crate::ArtifactError;

/// Everything needed to featurise users and items, stored as `features.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureSpace {
    pub dims: FeatureDims,
    pub genres: Vec<String>,
    /// Per user column: its name and value vocabulary (index 0 is "missing").
    pub user_columns: Vec<(String, Vec<String>)>,
    /// Decade buckets: bucket 0 = unknown year, bucket b = decade `first_decade + 10*(b-1)`.
    pub first_decade: i32,
    pub item_ids: Vec<String>,
    pub user_ids: Vec<String>,
    /// Per user: indices into the shared categorical table.
    pub user_cats: Vec<Vec<u32>>,
    /// Per user: most recent training items, newest first (at most `history_len`).
    pub user_history: Vec<Vec<u32>>,
    /// Per user: every item interacted with in training, ascending (the seen set
    /// the server never recommends again).
    pub user_seen: Vec<Vec<u32>>,
    /// Training interaction count per item (popularity).
    pub item_popularity: Vec<u32>,
    pub global_mean_rating: f32,
}

impl FeatureSpace {
    pub fn build(ds: &Dataset, train: &[usize], text_dim: usize, history_len: usize) -> Self {
        let mut genre_set: BTreeMap<&str, ()> = BTreeMap::new();
        for it in &ds.items {
            for g in &it.genres {
                genre_set.insert(g, ());
            }
        }
        let genres: Vec<String> = genre_set.keys().map(|s| s.to_string()).collect();
        let years: Vec<i32> = ds.items.iter().filter_map(|i| i.year).collect();
        let first_decade = years
            .iter()
            .min()
            .map(|y| y.div_euclid(10) * 10)
            .unwrap_or(0);
        let last_decade = years
            .iter()
            .max()
            .map(|y| y.div_euclid(10) * 10)
            .unwrap_or(0);
        let num_year_buckets = if years.is_empty() {
            1
        } else {
            ((last_decade - first_decade) / 10 + 2) as usize
        };

        let mut user_columns = Vec::new();
        for (c, name) in ds.user_feature_names.iter().enumerate() {
            let mut vals: Vec<String> = ds
                .users
                .iter()
                .map(|u| u.features[c].clone())
                .filter(|v| !v.is_empty())
                .collect();
            vals.sort();
            vals.dedup();
            let mut vocab = vec![String::new()];
            vocab.extend(vals);
            user_columns.push((name.clone(), vocab));
        }
        let user_cat_vocab: Vec<usize> = user_columns.iter().map(|(_, v)| v.len()).collect();
        let mut user_cats = Vec::with_capacity(ds.users.len());
        for u in &ds.users {
            let mut offset = 0u32;
            let mut row = Vec::with_capacity(user_columns.len());
            for (c, (_, vocab)) in user_columns.iter().enumerate() {
                let ix = vocab
                    .binary_search(&u.features[c])
                    .ok()
                    .filter(|_| !u.features[c].is_empty())
                    .unwrap_or(0);
                row.push(offset + ix as u32);
                offset += vocab.len() as u32;
            }
            user_cats.push(row);
        }

        let mut per_user: Vec<Vec<&Interaction>> = vec![Vec::new(); ds.users.len()];
        let mut item_popularity = vec![0u32; ds.items.len()];
        let mut sum = 0.0f64;
        for &i in train {
            let x = &ds.interactions[i];
            per_user[x.user as usize].push(x);
            item_popularity[x.item as usize] += 1;
            sum += x.rating as f64;
        }
        let user_seen = per_user
            .iter()
            .map(|xs| {
                let mut v: Vec<u32> = xs.iter().map(|x| x.item).collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();
        let user_history = per_user
            .into_iter()
            .map(|mut xs| {
                xs.sort_by(|a, b| b.timestamp.cmp(&a.timestamp).then(a.item.cmp(&b.item)));
                xs.into_iter().take(history_len).map(|x| x.item).collect()
            })
            .collect();
        Self {
            dims: FeatureDims {
                num_users: ds.users.len(),
                num_items: ds.items.len(),
                user_cat_vocab,
                num_genres: genres.len(),
                num_year_buckets,
                text_dim,
                history_len,
            },
            genres,
            user_columns,
            first_decade,
            item_ids: ds.items.iter().map(|i| i.id.clone()).collect(),
            user_ids: ds.users.iter().map(|u| u.id.clone()).collect(),
            user_cats,
            user_history,
            user_seen,
            item_popularity,
            global_mean_rating: if train.is_empty() {
                0.0
            } else {
                (sum / train.len() as f64) as f32
            },
        }
    }

    /// The categorical indices of a user with no known features: each
    /// column's "missing" entry (index 0 of its vocabulary).
    pub fn unknown_user_cats(&self) -> Vec<u32> {
        let mut offset = 0u32;
        self.user_columns
            .iter()
            .map(|(_, vocab)| {
                let ix = offset;
                offset += vocab.len() as u32;
                ix
            })
            .collect()
    }

    /// Every known user's categorical indices, then the unknown user's (at
    /// index `num_users`, the models' unknown-user slot).
    pub fn serving_user_cats(&self) -> Vec<Vec<u32>> {
        let mut v = self.user_cats.clone();
        v.push(self.unknown_user_cats());
        v
    }

    pub fn year_bucket(&self, year: Option<i32>) -> u32 {
        match year {
            Some(y) => {
                let b = (y.div_euclid(10) * 10 - self.first_decade) / 10 + 1;
                b.clamp(0, self.dims.num_year_buckets as i32 - 1) as u32
            }
            None => 0,
        }
    }
}

/// All items' inputs resident as tensors, plus all users' inputs for batching.
/// User rows run `0..=num_users`: the last is the unknown user (ID slot
/// `num_users`, every categorical "missing", empty history), so a new user's
/// inputs are one row lookup away like anyone else's.
pub struct Tables {
    pub num_users: usize,
    pub items: ItemInputs,
    pub user_ids: Tensor,
    pub user_cats: Option<Tensor>,
    pub user_hist: Tensor,
    pub user_hist_w: Tensor,
}

impl Tables {
    /// Item tensors for `items` and user tensors for `space`'s users.
    pub fn build(
        space: &FeatureSpace,
        items: &[Item],
        text: &[Vec<f32>],
        dev: &Device,
    ) -> Result<Self, ArtifactError> {
        let n = items.len();
        let g = space.dims.num_genres.max(1);
        let mut genres = vec![0f32; n * g];
        for (i, it) in items.iter().enumerate() {
            let idx: Vec<usize> = it
                .genres
                .iter()
                .filter_map(|x| space.genres.binary_search(x).ok())
                .collect();
            for &j in &idx {
                genres[i * g + j] = 1.0 / idx.len() as f32;
            }
        }
        let year: Vec<u32> = items.iter().map(|it| space.year_bucket(it.year)).collect();
        let td = space.dims.text_dim;
        let mut flat = Vec::with_capacity(n * td);
        for row in text {
            if row.len() != td {
                return Err(ArtifactError::Invalid(format!(
                    "text embedding of width {} (expected {td})",
                    row.len()
                )));
            }
            flat.extend_from_slice(row);
        }
        let items = ItemInputs {
            ids: Tensor::arange(0u32, n as u32, dev)?,
            genres: Tensor::from_vec(genres, (n, g), dev)?,
            year: Tensor::from_vec(year, n, dev)?,
            text: Tensor::from_vec(flat, (n, td), dev)?,
        };
        let nu = space.dims.num_users;
        let rows = nu + 1;
        let l = space.dims.history_len.max(1);
        let mut hist = vec![0u32; rows * l];
        let mut hist_w = vec![0f32; rows * l];
        for (u, h) in space.user_history.iter().enumerate() {
            for (j, &it) in h.iter().enumerate() {
                hist[u * l + j] = it;
                hist_w[u * l + j] = 1.0 / h.len() as f32;
            }
        }
        let c = space.user_columns.len();
        let user_cats = if c > 0 {
            let flat: Vec<u32> = space.serving_user_cats().into_iter().flatten().collect();
            Some(Tensor::from_vec(flat, (rows, c), dev)?)
        } else {
            None
        };
        Ok(Self {
            num_users: nu,
            items,
            user_ids: Tensor::arange(0u32, rows as u32, dev)?,
            user_cats,
            user_hist: Tensor::from_vec(hist, (rows, l), dev)?,
            user_hist_w: Tensor::from_vec(hist_w, (rows, l), dev)?,
        })
    }

    /// User inputs whose ID and categoricals come from `id_rows` and whose
    /// history comes from `hist_rows` (training replaces some users' ID and
    /// features by the unknown user's, keeping their history, so the models
    /// learn to serve a user known only by what they interacted with).
    pub fn users_split(
        &self,
        id_rows: &Tensor,
        hist_rows: &Tensor,
    ) -> candle_core::Result<UserInputs> {
        Ok(UserInputs {
            ids: self.user_ids.index_select(id_rows, 0)?,
            cats: self
                .user_cats
                .as_ref()
                .map(|c| c.index_select(id_rows, 0))
                .transpose()?,
            hist: self.user_hist.index_select(hist_rows, 0)?,
            hist_w: self.user_hist_w.index_select(hist_rows, 0)?,
        })
    }

    /// User inputs for the given user indices.
    pub fn users(&self, idx: &Tensor) -> candle_core::Result<UserInputs> {
        self.users_split(idx, idx)
    }
}
