//! [`LinearFusion`]: what a linear layer may fuse around its product.

use crate::{Backend, BackendError, Result, Tensor};

/// What [`Backend::linear_fused`] does around `p = x' · weightᵀ + bias`.
///
/// In a Llama block every product sits between a norm, an activation or the
/// residual add; with a handful of tokens (decode) each of those is a kernel
/// launch of its own that costs about as much as the work it does. Naming
/// them here lets a device backend fold them into the product.
pub struct LinearFusion<'a, B: Backend> {
    /// `x' = rms_norm(x, weight, eps)` row-wise, as [`Backend::rms_norm`];
    /// otherwise `x' = x`.
    pub input_norm: Option<(&'a Tensor<B>, f32)>,
    /// `out = silu(p[:, :N/2]) * p[:, N/2:]`: weight is `[gate; up]` stacked
    /// (`[N, K]`), out `[T, N/2]`, as [`Backend::silu_and_mul`] of `p`.
    pub silu_mul: bool,
    /// `out += p` instead of `out = p`: the residual update. Not together with
    /// `silu_mul`.
    pub accumulate: bool,
}

impl<B: Backend> LinearFusion<'_, B> {
    /// A plain product: `out = x · weightᵀ + bias`.
    pub fn none() -> Self {
        Self { input_norm: None, silu_mul: false, accumulate: false }
    }

    /// Checks the operands' shapes; returns `(tokens, in_features, out_features)`
    /// where out_features is the weight's row count (`N`).
    pub fn check_shapes(
        &self,
        op: &'static str,
        x: &Tensor<B>,
        weight: &Tensor<B>,
        bias: Option<&Tensor<B>>,
        out: &Tensor<B>,
    ) -> Result<(usize, usize, usize)> {
        let (t, k) = x.dims2(op)?;
        let (n, wk) = weight.dims2(op)?;
        if wk != k {
            return Err(BackendError::shape(op, format!("x {:?} vs weight {:?}", x.dims(), weight.dims())));
        }
        if let Some(b) = bias {
            b.expect_dims(op, "bias", &[n])?;
        }
        if let Some((g, eps)) = self.input_norm {
            g.expect_dims(op, "norm weight", &[k])?;
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(BackendError::shape(op, format!("norm eps {eps}")));
            }
        }
        if self.silu_mul {
            if self.accumulate {
                return Err(BackendError::shape(op, "silu_mul and accumulate together"));
            }
            if n % 2 != 0 {
                return Err(BackendError::shape(op, format!("silu_mul over {n} columns (odd)")));
            }
            out.expect_dims(op, "out", &[t, n / 2])?;
        } else {
            out.expect_dims(op, "out", &[t, n])?;
        }
        Ok((t, k, n))
    }
}
