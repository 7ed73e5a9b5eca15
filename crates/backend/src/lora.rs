//! LoRA products: many adapters in one batch, each token by its own.
//!
//! A LoRA adapter adds `scale · B · A · x` to a linear layer's output, with
//! `A` `[r, K]` and `B` `[N, r]` of a small rank `r`. A batch mixes tokens of
//! several adapters (and tokens of none), so the engine keeps every resident
//! adapter's matrices in stacked slot tensors and gives each token the slot
//! of its adapter; the two products below then run once for the whole batch
//! (Punica's SGMV/BGMV split):
//!
//! - *shrink*: `u[t] = A[slot_t] · x[t]`, to a narrow F32 `[T, U]` buffer;
//! - *expand*: `out[t, o..] += B[slot_t] · u[t, i..i+r]`, added into the base
//!   product's output.
//!
//! A layer whose weight stacks several projections (q/k/v, gate/up) stacks
//! their `A` matrices too (one shrink, `U = parts · r`) and expands each part
//! into its columns (`u_offset`, `out_offset`). The scale (`alpha / r`, or
//! `alpha / sqrt(r)` for rsLoRA) is folded into `B` when an adapter is loaded,
//! and a rank below the slots' rank is padded with zero rows of `A`.

use crate::{Backend, BackendError, DType, Result, Tensor};

/// `out[t, :] = a[token_slots[t]] · x[t, :]`, or zeros where `token_slots[t] < 0`.
pub struct LoraShrinkArgs<'a, B: Backend> {
    /// `[T, K]`, the activation dtype: the layer's input (after its norm).
    pub x: &'a Tensor<B>,
    /// `[S, U, K]`, the activation dtype: each slot's stacked `A` matrices.
    pub a: &'a Tensor<B>,
    /// I32 `[T]`: each token's adapter slot in `0..S`, or -1 for no adapter.
    pub token_slots: &'a Tensor<B>,
    /// F32 `[T, U]`.
    pub out: &'a Tensor<B>,
}

/// `out[t, out_offset + n] += Σ_r u[t, u_offset + r] · b[token_slots[t], n, r]`
/// for `n < N`, `r < R`; rows with `token_slots[t] < 0` are left as they are.
pub struct LoraExpandArgs<'a, B: Backend> {
    /// F32 `[T, U]`: a shrink's output.
    pub u: &'a Tensor<B>,
    /// The first column of `u` this part reads (`u_offset + R <= U`).
    pub u_offset: usize,
    /// `[S, N, R]`, the activation dtype: each slot's `B` of this part, scale folded in.
    pub b: &'a Tensor<B>,
    /// I32 `[T]`, as for the shrink.
    pub token_slots: &'a Tensor<B>,
    /// `[T, O]`, the activation dtype: the base product's output (`out_offset + N <= O`).
    pub out: &'a Tensor<B>,
    pub out_offset: usize,
}

fn check_slots<B: Backend>(op: &'static str, token_slots: &Tensor<B>, tokens: usize) -> Result<()> {
    if token_slots.dtype() != DType::I32 {
        return Err(BackendError::DType { op, dtype: token_slots.dtype() });
    }
    token_slots.expect_dims(op, "token_slots", &[tokens])
}

impl<B: Backend> LoraShrinkArgs<'_, B> {
    /// Checks shapes and dtypes; returns `(T, K, S, U)`.
    pub fn check(&self, activation: DType) -> Result<(usize, usize, usize, usize)> {
        const OP: &str = "lora_shrink";
        let (t, k) = self.x.dims2(OP)?;
        let [s, u, ak] = self.a.dims() else {
            return Err(BackendError::shape(OP, format!("a {:?} is not [slots, U, K]", self.a.dims())));
        };
        let (s, u) = (*s, *u);
        if *ak != k {
            return Err(BackendError::shape(OP, format!("x {:?} vs a {:?}", self.x.dims(), self.a.dims())));
        }
        for (name, tensor) in [("x", self.x), ("a", self.a)] {
            if tensor.dtype() != activation {
                return Err(BackendError::shape(
                    OP,
                    format!("{name} is {:?}, not {activation:?}", tensor.dtype()),
                ));
            }
        }
        if self.out.dtype() != DType::F32 {
            return Err(BackendError::DType { op: OP, dtype: self.out.dtype() });
        }
        self.out.expect_dims(OP, "out", &[t, u])?;
        check_slots(OP, self.token_slots, t)?;
        Ok((t, k, s, u))
    }
}

impl<B: Backend> LoraExpandArgs<'_, B> {
    /// Checks shapes and dtypes; returns `(T, S, N, R)`.
    pub fn check(&self, activation: DType) -> Result<(usize, usize, usize, usize)> {
        const OP: &str = "lora_expand";
        let (t, u) = self.u.dims2(OP)?;
        let [s, n, r] = self.b.dims() else {
            return Err(BackendError::shape(OP, format!("b {:?} is not [slots, N, R]", self.b.dims())));
        };
        let (s, n, r) = (*s, *n, *r);
        let (ot, o) = self.out.dims2(OP)?;
        if self.u.dtype() != DType::F32 {
            return Err(BackendError::DType { op: OP, dtype: self.u.dtype() });
        }
        for (name, tensor) in [("b", self.b), ("out", self.out)] {
            if tensor.dtype() != activation {
                return Err(BackendError::shape(
                    OP,
                    format!("{name} is {:?}, not {activation:?}", tensor.dtype()),
                ));
            }
        }
        if ot != t || self.u_offset + r > u || self.out_offset + n > o {
            return Err(BackendError::shape(
                OP,
                format!(
                    "u {:?} from column {}, b {:?}, out {:?} from column {}",
                    self.u.dims(),
                    self.u_offset,
                    self.b.dims(),
                    self.out.dims(),
                    self.out_offset
                ),
            ));
        }
        check_slots(OP, self.token_slots, t)?;
        Ok((t, s, n, r))
    }
}
