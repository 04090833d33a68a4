//! The ranker on two devices: output agreement on random rows of a real
//! artifact, and forward throughput per batch size. `cascade gpu-check` runs
//! these on a GPU host (CPU as the reference); tests run them CPU vs CPU.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use cascade_model::nn::PairInputs;
use cascade_model::parity::{agreement, Agreement};
use cascade_model::serving::{FactorizedRanker, Row};
use serde::Serialize;

use cascade_artifact::Artifact;

use crate::TrainError;

/// An artifact's ranker and feature tables, loaded on one device.
pub struct LoadedRanker {
    pub artifact: Artifact,
    pub device: Device,
}

impl LoadedRanker {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, TrainError> {
        Ok(Self {
            artifact: Artifact::load(dir, device)?,
            device: device.clone(),
        })
    }

    /// The plain batched forward: (rating, engagement) per row.
    pub fn forward(
        &self,
        users: &[u32],
        items: &[u32],
        tt: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
        let (rating, engage) = self.forward_tensors(
            &Tensor::new(users, &self.device)?,
            &Tensor::new(items, &self.device)?,
            &Tensor::from_vec(tt.to_vec(), (tt.len(), 1), &self.device)?,
        )?;
        Ok((rating.to_vec1()?, engage.to_vec1()?))
    }

    /// The forward on index tensors already on the device (what the timing uses).
    pub fn forward_tensors(
        &self,
        users: &Tensor,
        items: &Tensor,
        tt: &Tensor,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let out = self.artifact.ranker.forward(&PairInputs {
            user: &self.artifact.tables.users(users)?,
            item: &self.artifact.tables.items.select(items)?,
            tt_score: tt,
        })?;
        Ok((out.rating, out.engage))
    }

    /// Multiply-adds ×2 per scored row in the plain forward's matrix products
    /// (the text projection and the three dense layers; lookups and the FM
    /// term are not counted).
    pub fn flops_per_row(&self) -> f64 {
        let d = &self.artifact.space.dims;
        let c = &self.artifact.serving.ranker;
        let k = c.field_dim as f64;
        let fields = (6 + d.user_cat_vocab.len()) as f64;
        let (h1, h2) = (c.hidden[0] as f64, c.hidden[1] as f64);
        2.0 * (d.text_dim as f64 * k
            + d.num_genres.max(1) as f64 * k
            + fields * k * h1
            + h1 * h2
            + h2 * 2.0)
    }
}

/// Random rows over the artifact's users and items, with two-tower scores in [-1, 1].
pub fn random_rows(a: &Artifact, n: usize, seed: u64) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (nu, ni) = (a.space.dims.num_users as u64, a.space.dims.num_items as u64);
    let users = (0..n).map(|_| (next() % nu) as u32).collect();
    let items = (0..n).map(|_| (next() % ni) as u32).collect();
    let tt = (0..n)
        .map(|_| (next() % 20_001) as f32 / 10_000.0 - 1.0)
        .collect();
    (users, items, tt)
}

/// The ranker's outputs on `other` against `reference` for `n` random rows,
/// and the factorized CPU path against `other` (what the server runs on each).
pub fn ranker_agreement(
    reference: &LoadedRanker,
    other: &LoadedRanker,
    n: usize,
    seed: u64,
) -> Result<Vec<Agreement>, TrainError> {
    let (u, i, t) = random_rows(&reference.artifact, n, seed);
    let (r0, e0) = reference.forward(&u, &i, &t)?;
    let (r1, e1) = other.forward(&u, &i, &t)?;
    let dev = |l: &LoadedRanker| cascade_model::device_name(&l.device);
    let (a, b) = (dev(reference), dev(other));
    let mut out = vec![
        agreement(&format!("ranker rating head, {b} vs {a}"), &r0, &r1)?,
        agreement(&format!("ranker engagement head, {b} vs {a}"), &e0, &e1)?,
    ];
    let cpu = if matches!(reference.device, Device::Cpu) {
        reference
    } else {
        other
    };
    let f = FactorizedRanker::new(
        &cpu.artifact.ranker,
        &cpu.artifact.tables.items,
        cpu.artifact.space.user_cats.clone(),
    )?;
    let parts: Vec<_> = u.iter().map(|&x| f.user(x)).collect();
    let rows: Vec<Row> = (0..n)
        .map(|j| Row {
            user: j,
            item: i[j],
            tt: t[j],
        })
        .collect();
    let (fr, fe) = f.score(&parts, &rows)?;
    out.push(agreement(
        &format!("factorized CPU ranker vs {b} plain forward (rating)"),
        &r1,
        &fr,
    )?);
    out.push(agreement(
        &format!("factorized CPU ranker vs {b} plain forward (engagement)"),
        &e1,
        &fe,
    )?);
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub device: String,
    pub batch: usize,
    pub iterations: usize,
    /// Median time of one forward including the copy of its outputs to the
    /// host (which is what waits for the device).
    pub median_ms: f64,
    pub p90_ms: f64,
    pub rows_per_s: f64,
    pub gflops: f64,
}

/// Time the plain forward for each batch size: inputs prepared on the device
/// beforehand, a few warm-up runs, then `iterations` timed runs (fewer for
/// the largest batches so a run stays short).
pub fn ranker_throughput(
    l: &LoadedRanker,
    batches: &[usize],
    iterations: usize,
) -> Result<Vec<Throughput>, TrainError> {
    let flops = l.flops_per_row();
    let mut out = Vec::new();
    for &b in batches {
        let (u, i, t) = random_rows(&l.artifact, b, b as u64);
        let u = Tensor::new(u.as_slice(), &l.device)?;
        let i = Tensor::new(i.as_slice(), &l.device)?;
        let t = Tensor::from_vec(t, (b, 1), &l.device)?;
        let iters = (iterations * 256 / b.max(256)).clamp(5, iterations.max(5));
        let run = || -> Result<f64, TrainError> {
            let t0 = Instant::now();
            let (r, e) = l.forward_tensors(&u, &i, &t)?;
            let _: Vec<f32> = r.to_vec1()?;
            let _: Vec<f32> = e.to_vec1()?;
            Ok(t0.elapsed().as_secs_f64())
        };
        for _ in 0..3 {
            run()?;
        }
        let mut times: Vec<f64> = (0..iters).map(|_| run()).collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let p90 = times[(times.len() * 9 / 10).min(times.len() - 1)];
        out.push(Throughput {
            device: cascade_model::device_name(&l.device),
            batch: b,
            iterations: iters,
            median_ms: median * 1e3,
            p90_ms: p90 * 1e3,
            rows_per_s: b as f64 / median,
            gflops: flops * b as f64 / median / 1e9,
        });
    }
    Ok(out)
}
