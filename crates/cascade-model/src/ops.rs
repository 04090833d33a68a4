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

/// Per-row log-sum-exp, numerically stable.
fn lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln()
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
                let l = lse(row);
                for (oj, xj) in o.iter_mut().zip(row) {
                    *oj = (xj - l).exp() * gi;
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
