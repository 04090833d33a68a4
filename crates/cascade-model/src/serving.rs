//! The ranker's forward, rearranged for serving on CPU.
//!
//! The deep part's first layer is linear over the concatenated field vectors,
//! so `W·[u; i; t] = W_u·u + W_i·i + W_t·t`: the item-side term is computed
//! once per item when the model loads, the user-side term once per request,
//! and per candidate only a 128-wide add, the FM term (from precomputed field
//! sums and squared norms) and the two small upper layers remain. Same model,
//! same math; `tests::matches_the_plain_forward` holds it to that.

use std::borrow::Borrow;

use candle_core::{Device, Module, Tensor, D};

use crate::nn::{ItemInputs, Ranker};

/// The user-side terms of one user, computed once per request.
#[derive(Debug, Clone)]
pub struct UserPart {
    /// Sum of the user's field vectors `[k]`.
    sum: Vec<f32>,
    /// Sum of the user's fields' squared norms.
    sq: f32,
    /// `W_u·u` `[h1]`.
    l1: Vec<f32>,
    bias: f32,
}

/// One candidate row: which user part, which item, its two-tower score.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub user: usize,
    pub item: u32,
    pub tt: f32,
}

pub struct FactorizedRanker {
    k: usize,
    h1: usize,
    global_mean: f32,
    user_id: Vec<f32>,
    user_cat: Vec<f32>,
    user_bias: Vec<f32>,
    /// Per user: indices into `user_cat` (already offset per column).
    user_cats: Vec<Vec<u32>>,
    /// First-layer weight columns of the user fields, `[h1, n_user_fields * k]` row-major.
    w1_user: Vec<f32>,
    n_user_fields: usize,
    b1: Vec<f32>,
    item_sum: Vec<f32>,
    item_sq: Vec<f32>,
    item_l1: Vec<f32>,
    item_bias: Vec<f32>,
    item_engage: Vec<f32>,
    /// The two-tower score's field is `t · tt_p`.
    tt_p: Vec<f32>,
    tt_p_sq: f32,
    tt_l1: Vec<f32>,
    /// `[h1, h2]` (transposed second layer): the one product big enough to
    /// want gemm's kernels; the small layers after it are plain loops.
    w2t: Tensor,
    /// `[h2]`, the head's weights `[2, h2]` row-major, `[2]`.
    b2: Vec<f32>,
    head_w: Vec<f32>,
    head_b: [f32; 2],
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()
}

impl FactorizedRanker {
    /// Precompute the item-side terms for every item in `items` (on CPU).
    /// `user_cats[u]` are user `u`'s categorical indices, as the ranker's
    /// user inputs carry them (empty when the model has no user columns).
    pub fn new(
        r: &Ranker,
        items: &ItemInputs,
        user_cats: Vec<Vec<u32>>,
    ) -> candle_core::Result<Self> {
        let cpu = Device::Cpu;
        let k = r.cfg.field_dim;
        let h1 = r.cfg.hidden[0];
        let n_user_fields = 1 + r.n_cat_cols;
        // Item fields in the forward's order: item ID, genres, year, text.
        let fields = Tensor::stack(
            &[
                r.item_id.forward(&items.ids)?,
                r.genre.forward(&items.genres)?,
                r.year.forward(&items.year)?,
                r.text.forward(&items.text)?,
            ],
            1,
        )?; // [N, 4, k]
        let n = fields.dim(0)?;
        let item_sum = flat(&fields.sum(1)?)?;
        let item_sq = flat(&fields.sqr()?.sum(D::Minus1)?.sum(1)?)?;
        let w1 = r.l1.weight(); // [h1, F*k]
        let w1_items = w1.narrow(1, n_user_fields * k, 4 * k)?; // [h1, 4k]
        let item_l1 = flat(&fields.reshape((n, 4 * k))?.matmul(&w1_items.t()?)?)?;
        let tt_p = flat(r.tt.weight())?; // Linear 1 -> k: weight [k, 1]
        let w1_tt = w1.narrow(1, (n_user_fields + 4) * k, k)?; // [h1, k]
        let tt_l1 = flat(&w1_tt.matmul(r.tt.weight())?)?;
        let b1 = match r.l1.bias() {
            Some(b) => flat(b)?,
            None => vec![0.0; h1],
        };
        let head_b = match r.head.bias() {
            Some(b) => match flat(b)?.as_slice() {
                &[a, b] => [a, b],
                other => candle_core::bail!("ranker head bias has {} values, not 2", other.len()),
            },
            None => [0.0; 2],
        };
        let b2 = match r.l2.bias() {
            Some(b) => flat(b)?,
            None => vec![0.0; r.cfg.hidden[1]],
        };
        let head_w = flat(r.head.weight())?; // Linear h2 -> 2: weight [2, h2]
        if head_w.len() != 2 * b2.len() {
            candle_core::bail!(
                "ranker head has {} weights for {} inputs",
                head_w.len(),
                b2.len()
            );
        }
        Ok(Self {
            k,
            h1,
            global_mean: r.global_mean,
            user_id: flat(r.user_id.embeddings())?,
            user_cat: flat(r.user_cat.embeddings())?,
            user_bias: flat(r.user_bias.embeddings())?,
            user_cats,
            w1_user: flat(&w1.narrow(1, 0, n_user_fields * k)?.contiguous()?)?,
            n_user_fields,
            b1,
            item_sum,
            item_sq,
            item_l1,
            item_bias: flat(r.item_bias.embeddings())?,
            item_engage: flat(r.item_engage_bias.embeddings())?,
            tt_p_sq: tt_p.iter().map(|x| x * x).sum(),
            tt_p,
            tt_l1,
            w2t: r.l2.weight().t()?.contiguous()?.to_device(&cpu)?,
            b2,
            head_w,
            head_b,
        })
    }

    /// The user-side terms for user index `u`.
    pub fn user(&self, u: u32) -> UserPart {
        let k = self.k;
        let u = u as usize;
        let mut fields: Vec<&[f32]> = vec![&self.user_id[u * k..(u + 1) * k]];
        if self.n_user_fields > 1 {
            if let Some(cats) = self.user_cats.get(u) {
                for &c in cats.iter().take(self.n_user_fields - 1) {
                    let c = c as usize;
                    fields.push(&self.user_cat[c * k..(c + 1) * k]);
                }
            }
        }
        let mut sum = vec![0f32; k];
        let mut sq = 0f32;
        let mut x = vec![0f32; self.n_user_fields * k];
        for (f, v) in fields.iter().enumerate() {
            for (j, &a) in v.iter().enumerate() {
                sum[j] += a;
                sq += a * a;
                x[f * k + j] = a;
            }
        }
        let width = self.n_user_fields * k;
        let l1 = (0..self.h1)
            .map(|h| {
                self.w1_user[h * width..(h + 1) * width]
                    .iter()
                    .zip(&x)
                    .map(|(w, a)| w * a)
                    .sum()
            })
            .collect();
        UserPart {
            sum,
            sq,
            l1,
            bias: self.user_bias[u],
        }
    }

    /// (rating, engagement logit) per row; `users` owned or borrowed (the
    /// server keeps known users' parts and lends them).
    pub fn score(
        &self,
        users: &[impl Borrow<UserPart>],
        rows: &[Row],
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (k, h1) = (self.k, self.h1);
        let n = rows.len();
        let mut hidden = vec![0f32; n * h1];
        let mut shallow = Vec::with_capacity(n);
        for (r, row) in rows.iter().enumerate() {
            let u: &UserPart = users[row.user].borrow();
            let i = row.item as usize;
            let t = row.tt;
            // FM: 0.5 * (|Σ v_f|² - Σ |v_f|²) over user, item and tt fields.
            let isum = &self.item_sum[i * k..(i + 1) * k];
            let s2: f32 = u
                .sum
                .iter()
                .zip(isum)
                .zip(&self.tt_p)
                .map(|((a, b), p)| {
                    let s = a + b + t * p;
                    s * s
                })
                .sum();
            let sq = u.sq + self.item_sq[i] + t * t * self.tt_p_sq;
            let fm = 0.5 * (s2 - sq);
            shallow.push(fm + u.bias + self.item_bias[i]);
            let il1 = &self.item_l1[i * h1..(i + 1) * h1];
            let out = &mut hidden[r * h1..(r + 1) * h1];
            // Zipped, not indexed: no bounds checks, so it vectorises (the
            // same sums in the same order as before).
            let terms = u.l1.iter().zip(il1).zip(&self.tt_l1).zip(&self.b1);
            for (o, (((&ul, &il), &tw), &b)) in out.iter_mut().zip(terms) {
                *o = (ul + il + t * tw + b).max(0.0);
            }
        }
        let x = Tensor::from_vec(hidden, (n, h1), &Device::Cpu)?;
        let x: Vec<f32> = x.matmul(&self.w2t)?.flatten_all()?.to_vec1()?; // [n, h2]
        let h2 = self.b2.len();
        let (w_rating, w_engage) = self.head_w.split_at(h2);
        let mut rating = Vec::with_capacity(n);
        let mut engage = Vec::with_capacity(n);
        for ((row, x), s) in rows.iter().zip(x.chunks_exact(h2)).zip(&shallow) {
            let (mut d0, mut d1) = (self.head_b[0], self.head_b[1]);
            for (((&x, &b), &w0), &w1) in x.iter().zip(&self.b2).zip(w_rating).zip(w_engage) {
                let a = (x + b).max(0.0);
                d0 += a * w0;
                d1 += a * w1;
            }
            rating.push(d0 + s + self.global_mean);
            engage.push(d1 + self.item_engage[row.item as usize]);
        }
        Ok((rating, engage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{FeatureDims, PairInputs, RankerConfig, UserInputs};
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    /// Every parameter random (biases too), so no term can hide behind a zero.
    fn randomise(vm: &VarMap) {
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut state = 12345u64;
        for name in names {
            let var = &data[name];
            let n = var.elem_count();
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.4
                })
                .collect();
            var.set(&Tensor::from_vec(vals, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    #[test]
    fn matches_the_plain_forward() {
        let dev = Device::Cpu;
        let dims = FeatureDims {
            num_users: 7,
            num_items: 11,
            user_cat_vocab: vec![3, 4],
            num_genres: 5,
            num_year_buckets: 4,
            text_dim: 12,
            history_len: 3,
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let ranker = Ranker::new(vb, &dims, &RankerConfig::default(), 3.5).unwrap();
        randomise(&vm);
        let n_items = dims.num_items;
        let items = ItemInputs {
            ids: Tensor::arange(0u32, n_items as u32, &dev).unwrap(),
            genres: Tensor::rand(0f32, 1f32, (n_items, dims.num_genres), &dev).unwrap(),
            year: Tensor::from_vec(
                (0..n_items as u32).map(|i| i % 4).collect::<Vec<_>>(),
                n_items,
                &dev,
            )
            .unwrap(),
            text: Tensor::randn(0f32, 1f32, (n_items, dims.text_dim), &dev).unwrap(),
        };
        // Per user: one value of each column, offset into the shared table.
        let user_cats: Vec<Vec<u32>> = (0..dims.num_users as u32)
            .map(|u| vec![u % 3, 3 + (u % 4)])
            .collect();
        let fr = FactorizedRanker::new(&ranker, &items, user_cats.clone()).unwrap();

        // Rows from three users over assorted items and two-tower scores.
        let rows: Vec<(u32, u32, f32)> = (0..40u32)
            .map(|j| (j % 3 + 2, (j * 7) % n_items as u32, (j as f32 * 0.37).sin()))
            .collect();
        let parts: Vec<UserPart> = (0..dims.num_users as u32).map(|u| fr.user(u)).collect();
        let frows: Vec<Row> = rows
            .iter()
            .map(|&(u, i, t)| Row {
                user: u as usize,
                item: i,
                tt: t,
            })
            .collect();
        let (rating, engage) = fr.score(&parts, &frows).unwrap();

        let n = rows.len();
        let uidx: Vec<u32> = rows.iter().map(|r| r.0).collect();
        let iidx = Tensor::from_vec(rows.iter().map(|r| r.1).collect::<Vec<_>>(), n, &dev).unwrap();
        let cats: Vec<u32> = uidx
            .iter()
            .flat_map(|&u| user_cats[u as usize].clone())
            .collect();
        let user = UserInputs {
            ids: Tensor::from_vec(uidx.clone(), n, &dev).unwrap(),
            cats: Some(Tensor::from_vec(cats, (n, 2), &dev).unwrap()),
            hist: Tensor::zeros((n, 3), DType::U32, &dev).unwrap(),
            hist_w: Tensor::zeros((n, 3), DType::F32, &dev).unwrap(),
        };
        let tt =
            Tensor::from_vec(rows.iter().map(|r| r.2).collect::<Vec<_>>(), (n, 1), &dev).unwrap();
        let out = ranker
            .forward(&PairInputs {
                user: &user,
                item: &items.select(&iidx).unwrap(),
                tt_score: &tt,
            })
            .unwrap();
        let want_r: Vec<f32> = out.rating.to_vec1().unwrap();
        let want_e: Vec<f32> = out.engage.to_vec1().unwrap();
        for j in 0..n {
            for (got, want) in [(rating[j], want_r[j]), (engage[j], want_e[j])] {
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "row {j}: {got} vs {want}"
                );
            }
        }
        // Not vacuous: the rows differ from one another.
        assert!(want_r.iter().any(|&v| (v - want_r[0]).abs() > 1e-3));
    }
}
