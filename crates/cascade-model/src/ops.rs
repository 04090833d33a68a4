//! A fused softmax cross-entropy for Candle's CPU backend.
//!
//! `candle_nn::loss::cross_entropy` is composed of ~6 elementwise passes, and
//! autograd adds more on the way back; over a `[batch × catalogue]` logit
//! matrix those passes were most of the two-tower's training time on CPU. This
//! op does the forward in one pass per row and the backward in one more, with
//! exactly the same math. Other devices use the composed version.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

fn rows<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("targets must be contiguous".into()))?;
    Ok(&s.as_slice::<u32>()?[a..b])
}

/// `e^x` for `x ≤ 0` (every argument here is a logit minus its row's max),
/// within 2 ulp of `f32::exp` over `[-87, 0]`, 0 below. Range reduction
/// `x = k·ln2 + r`, a degree-6 polynomial for `e^r` on `|r| ≤ ln2/2`, and
/// `2^k` built in the exponent bits: branch-free, so the loops below
/// vectorise, where libm's `expf` was a call per element (a fifth of the
/// two-tower's training time in the profile).
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5·2^23 trick: `f32::round` and `mul_add`
    // are library calls on the baseline x86-64 target and would not vectorise.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let k = (x * LOG2E + MAGIC) - MAGIC;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Minimax coefficients of e^r (Cephes expf), Horner form.
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let two_k = f32::from_bits(((k as i32 + 127) as u32) << 23);
    er * two_k
}

fn row_max(row: &[f32]) -> f32 {
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Σ e^(x − m) over a row, in eight lanes (vectorised).
fn sum_exp(row: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| exp_nonpos(x - m)).sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += exp_nonpos(c[l] - m);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Per-row log-sum-exp, numerically stable.
fn lse(row: &[f32]) -> f32 {
    let m = row_max(row);
    m + sum_exp(row, m).ln()
}

struct Xent;

impl CustomOp2 for Xent {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n) = l1.shape().dims2()?;
        let x = rows(s1, l1, "logits")?;
        let t = targets(s2, l2)?;
        let out: Vec<f32> = x
            .par_chunks(n)
            .zip(t.par_iter())
            .map(|(row, &ti)| lse(row) - row.get(ti as usize).copied().unwrap_or(f32::NAN))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(b)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.contiguous()?.apply_op3_no_bwd(
            &t.contiguous()?,
            &grad.contiguous()?,
            &XentGrad,
        )?;
        Ok((Some(g), None))
    }
}

/// d loss_i / d x_ij = (softmax(x_i)_j − [j = t_i]) · grad_i
struct XentGrad;

impl CustomOp3 for XentGrad {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n) = l1.shape().dims2()?;
        let x = rows(s1, l1, "logits")?;
        let t = targets(s2, l2)?;
        let g = rows(s3, l3, "grad")?;
        let mut out = vec![0f32; b * n];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .zip(t.par_iter().zip(g.par_iter()))
            .for_each(|((o, row), (&ti, &gi))| {
                // One exponential per element: e^(x − m), then scale by g / Σ.
                let m = row_max(row);
                for (oj, xj) in o.iter_mut().zip(row) {
                    *oj = exp_nonpos(xj - m);
                }
                let scale = gi / o.iter().sum::<f32>();
                for oj in o.iter_mut() {
                    *oj *= scale;
                }
                if let Some(o) = o.get_mut(ti as usize) {
                    *o -= gi;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, n))))
    }
}

/// Mean softmax cross-entropy of `logits` `[B, N]` against `targets` `[B]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, Xent)?
            .mean_all()
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn exp_matches_libm_over_its_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (a, b) = (exp_nonpos(x), x.exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(-200.0), (-87.0f32).exp());
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), (-87.0f32).exp());
    }

    #[test]
    fn fused_matches_composed_loss_and_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (37, 211), &dev).unwrap())).unwrap();
        let t = Tensor::from_vec(
            (0..37u32).map(|i| (i * 7) % 211).collect::<Vec<_>>(),
            37,
            &dev,
        )
        .unwrap();
        let fused = cross_entropy(x.as_tensor(), &t).unwrap();
        let plain = candle_nn::loss::cross_entropy(x.as_tensor(), &t).unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            plain.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        let ga = fused
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gb = plain
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let max_err = ga
            .iter()
            .zip(&gb)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(max_err < 1e-6, "gradient differs by {max_err}");
        assert!(
            gb.iter().any(|v| v.abs() > 1e-4),
            "gradient must not be trivially zero"
        );
    }
}
