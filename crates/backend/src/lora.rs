//! LoRA products: many adapters in one batch, each token by its own.
//!
//! A LoRA adapter adds `scale · B · A · x` to a linear layer's output, with
//! `A` `[r, K]` and `B` `[N, r]` of a small rank `r`. A batch mixes tokens of
//! several adapters (and tokens of none), so the engine keeps every resident
//! adapter's matrices in stacked slot tensors and gives each token the slot
//! of its adapter; [`Backend::lora_apply`](crate::Backend::lora_apply) then
//! adds one adapted product's delta for the whole batch, in Punica's two
//! steps:
//!
//! - *shrink*: `u[t] = A[slot_t] · x[t]`, a narrow vector of `r` per part, in f32;
//! - *expand*: `out[t, o..] += B[slot_t] · u[t]`, added into the base
//!   product's output.
//!
//! A layer whose weight stacks several projections (q/k/v, gate/up) stacks
//! their `A` matrices too (one shrink over every part) and expands each part
//! into its columns ([`LoraPart`]). The scale (`alpha / r`, or
//! `alpha / sqrt(r)` for rsLoRA) is folded into `B` when an adapter is loaded,
//! and a rank below the slots' rank is padded with zero rows of `A`.
//!
//! Slot layouts: `A` is part-major, `[P, S, R, K]`, and each part's `B` is held
//! transposed, `[S, R, N]`, so that both stacks are plain matrices over all
//! slots (`[P·S·R, K]` and `[S·R, N]`), and each part's columns of `x · Aᵀ`
//! (`p·S·R .. (p+1)·S·R`) are contiguous: a backend may run a product as dense
//! GEMMs over every slot (`x · A_allᵀ`, the columns of every slot but the
//! token's zeroed, then each part's `· Bt_all`) instead of per-token gathers.
//! The shrunk vector is the backend's own: only the sum reaches `out`.
//!
//! Grouped by slot (SGMV): a step's tokens may also come with [`LoraGroups`],
//! the tokens ordered by slot and cut into groups of at most
//! [`LORA_GROUP_TOKENS`] tokens of one slot ([`lora_token_groups`] makes them
//! on the host). A backend that reads them loads each adapter's matrices once
//! per group instead of once per token; the products are the same.

use crate::{Backend, BackendError, DType, Result, Tensor};

/// The most tokens in one [`LoraGroups`] group.
pub const LORA_GROUP_TOKENS: usize = 32;

/// A step's tokens grouped by adapter slot, for the grouped (SGMV) kernels.
#[derive(Clone, Copy)]
pub struct LoraGroups<'a, B: Backend> {
    /// I32 `[T]`: the token indices, ordered by slot (a permutation of `0..T`).
    pub order: &'a Tensor<B>,
    /// I32 `[G, 3]`: `(slot, first, count)` per group: the tokens
    /// `order[first..first + count]`, all of `slot` (-1: no adapter), with
    /// `count <= LORA_GROUP_TOKENS`. Trailing groups of count 0 pad a
    /// fixed-size buffer (a recorded graph's) and are skipped.
    pub groups: &'a Tensor<B>,
}

/// The most groups [`lora_token_groups`] makes for `tokens` tokens over
/// `num_slots` slots: every slot (and "none") adds at most one partial group.
pub fn lora_group_capacity(tokens: usize, num_slots: usize) -> usize {
    tokens.div_ceil(LORA_GROUP_TOKENS) + num_slots + 1
}

/// Groups `token_slots` for [`LoraGroups`]: the token order (stable: a slot's
/// tokens keep their order) and the `(slot, first, count)` triples, row-major,
/// padded with `(-1, T, 0)` to `capacity` groups when given. Slots outside
/// `-1..` (any negative) group as -1; slots past the slot count group as they are
/// (the products report them).
pub fn lora_token_groups(token_slots: &[i32], capacity: Option<usize>) -> (Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..token_slots.len() as i32).collect();
    order.sort_by_key(|&t| token_slots[t as usize].max(-1));
    let mut groups = Vec::new();
    let mut first = 0;
    while first < order.len() {
        let slot = token_slots[order[first] as usize].max(-1);
        let mut count = 1;
        while count < LORA_GROUP_TOKENS
            && first + count < order.len()
            && token_slots[order[first + count] as usize].max(-1) == slot
        {
            count += 1;
        }
        groups.extend_from_slice(&[slot, first as i32, count as i32]);
        first += count;
    }
    if let Some(capacity) = capacity {
        while groups.len() < 3 * capacity {
            groups.extend_from_slice(&[-1, order.len() as i32, 0]);
        }
    }
    (order, groups)
}

/// The most parts one [`LoraArgs`] stacks (q, k and v).
pub const LORA_MAX_PARTS: usize = 3;

/// One part of an adapted product: its `B` slots and where its columns of
/// the output start.
#[derive(Clone, Copy)]
pub struct LoraPart<'a, B: Backend> {
    /// `[S, R, N]`, the activation dtype: each slot's `B` of this part,
    /// transposed (`Bᵀ`, `R` rows of `N`), scale folded in.
    pub b: &'a Tensor<B>,
    /// The first column of `out` this part adds into (`out_offset + N <= O`).
    pub out_offset: usize,
}

/// One adapted product's LoRA delta, every part of it: for each part `p` and
/// each token `t` with `token_slots[t] = s >= 0`,
///
/// `u_p[t, r] = Σ_k a[p, s, r, k] · x[t, k]` (in f32), then
/// `out[t, parts[p].out_offset + n] += Σ_r u_p[t, r] · parts[p].b[s, r, n]`
///
/// for `n < N_p`, `r < R`; rows with `token_slots[t] < 0` are left as they
/// are (a backend may add an exact 0 to them), and so are the columns outside
/// the parts. A backend may round each `u_p[t, r]` to the activation dtype
/// before the expand (as vLLM's kernels and the dense path do); the expand's
/// sum stays in f32 and is added to `out` once (one rounding of `out`). The
/// parts' column ranges must not overlap.
pub struct LoraArgs<'a, B: Backend> {
    /// `[T, K]`, the activation dtype: the product's input (after its norm).
    pub x: &'a Tensor<B>,
    /// `[P, S, R, K]`, the activation dtype: every part's `A`, each part's
    /// slots stacked (`[P·S·R, K]` as a matrix).
    pub a: &'a Tensor<B>,
    /// `P` parts (`1..=`[`LORA_MAX_PARTS`]), in the order of `a`'s parts.
    pub parts: &'a [LoraPart<'a, B>],
    /// I32 `[T]`: each token's adapter slot in `0..S`, or -1 for no adapter.
    pub token_slots: &'a Tensor<B>,
    /// `[T, O]`, the activation dtype: the base product's output.
    pub out: &'a Tensor<B>,
    /// The same tokens grouped by slot, for backends that use them; they
    /// must agree with `token_slots`.
    pub groups: Option<LoraGroups<'a, B>>,
}

/// The shape of a checked [`LoraArgs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    pub tokens: usize,
    /// K, the input width.
    pub k: usize,
    /// S, the slots.
    pub slots: usize,
    /// R, the slots' rank.
    pub rank: usize,
    /// P, the parts.
    pub parts: usize,
    /// O, the output's width.
    pub out_cols: usize,
}

fn check_slots<B: Backend>(op: &'static str, token_slots: &Tensor<B>, tokens: usize) -> Result<()> {
    if token_slots.dtype() != DType::I32 {
        return Err(BackendError::DType { op, dtype: token_slots.dtype() });
    }
    token_slots.expect_dims(op, "token_slots", &[tokens])
}

impl<B: Backend> LoraGroups<'_, B> {
    /// Checks dtypes and shapes for `tokens` tokens; returns the group count.
    /// (What the groups hold is checked where it is read.)
    pub fn check(&self, op: &'static str, tokens: usize) -> Result<usize> {
        for tensor in [self.order, self.groups] {
            if tensor.dtype() != DType::I32 {
                return Err(BackendError::DType { op, dtype: tensor.dtype() });
            }
        }
        self.order.expect_dims(op, "order", &[tokens])?;
        let (g, width) = self.groups.dims2(op)?;
        if width != 3 {
            return Err(BackendError::shape(op, format!("groups {:?} is not [G, 3]", self.groups.dims())));
        }
        Ok(g)
    }
}

/// Checks host copies of the groups against the token slots: every token
/// once, each group of one slot and at most [`LORA_GROUP_TOKENS`] tokens.
pub fn check_lora_token_groups(
    op: &'static str,
    token_slots: &[i32],
    order: &[i32],
    groups: &[i32],
) -> Result<()> {
    let bad = |detail: String| Err(BackendError::Index { op, detail });
    let t = token_slots.len();
    if order.len() != t {
        return bad(format!("an order of {} tokens for {t}", order.len()));
    }
    let mut seen = vec![false; t];
    for (g, group) in groups.chunks_exact(3).enumerate() {
        let (slot, first, count) = (group[0], group[1], group[2]);
        let (Ok(first), Ok(count)) = (usize::try_from(first), usize::try_from(count)) else {
            return bad(format!("group {g}: first {first}, count {count}"));
        };
        if count > LORA_GROUP_TOKENS || first + count > t {
            return bad(format!("group {g}: tokens {first}..{} of {t}", first + count));
        }
        for &token in &order[first..first + count] {
            let Some(done) = usize::try_from(token).ok().and_then(|i| seen.get_mut(i)) else {
                return bad(format!("group {g}: token {token} of {t}"));
            };
            if std::mem::replace(done, true) {
                return bad(format!("token {token} in two groups"));
            }
            if token_slots[token as usize].max(-1) != slot {
                return bad(format!(
                    "group {g} of slot {slot} holds token {token} of slot {}",
                    token_slots[token as usize]
                ));
            }
        }
    }
    match seen.iter().position(|&s| !s) {
        Some(missing) => bad(format!("token {missing} in no group")),
        None => Ok(()),
    }
}

impl<B: Backend> LoraArgs<'_, B> {
    /// Checks shapes, dtypes and the parts' columns (`N_p` is `parts[p].b.dim(2)`).
    pub fn check(&self, activation: DType) -> Result<LoraShape> {
        const OP: &str = "lora_apply";
        let (t, k) = self.x.dims2(OP)?;
        let [p, s, r, ak] = *self.a.dims() else {
            return Err(BackendError::shape(
                OP,
                format!("a {:?} is not [parts, slots, R, K]", self.a.dims()),
            ));
        };
        if ak != k {
            return Err(BackendError::shape(OP, format!("x {:?} vs a {:?}", self.x.dims(), self.a.dims())));
        }
        if p != self.parts.len() || p == 0 || p > LORA_MAX_PARTS {
            return Err(BackendError::shape(
                OP,
                format!("a {:?} for {} parts (1..={LORA_MAX_PARTS})", self.a.dims(), self.parts.len()),
            ));
        }
        let (ot, o) = self.out.dims2(OP)?;
        if ot != t {
            return Err(BackendError::shape(
                OP,
                format!("x {:?} vs out {:?}", self.x.dims(), self.out.dims()),
            ));
        }
        let mut tensors = vec![("x", self.x), ("a", self.a), ("out", self.out)];
        let mut columns = Vec::with_capacity(p);
        for (i, part) in self.parts.iter().enumerate() {
            let [bs, br, n] = *part.b.dims() else {
                return Err(BackendError::shape(
                    OP,
                    format!("part {i}: b {:?} is not [slots, R, N]", part.b.dims()),
                ));
            };
            if bs != s || br != r || part.out_offset + n > o {
                return Err(BackendError::shape(
                    OP,
                    format!(
                        "part {i}: b {:?} from column {} of out {:?}, a {:?}",
                        part.b.dims(),
                        part.out_offset,
                        self.out.dims(),
                        self.a.dims()
                    ),
                ));
            }
            columns.push((part.out_offset, part.out_offset + n));
            tensors.push(("b", part.b));
        }
        columns.sort_unstable();
        if let Some(w) = columns.windows(2).find(|w| w[0].1 > w[1].0) {
            return Err(BackendError::shape(OP, format!("parts' columns {:?} and {:?} overlap", w[0], w[1])));
        }
        for (name, tensor) in tensors {
            if tensor.dtype() != activation {
                return Err(BackendError::shape(
                    OP,
                    format!("{name} is {:?}, not {activation:?}", tensor.dtype()),
                ));
            }
        }
        check_slots(OP, self.token_slots, t)?;
        if let Some(groups) = &self.groups {
            groups.check(OP, t)?;
        }
        Ok(LoraShape { tokens: t, k, slots: s, rank: r, parts: p, out_cols: o })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_order_tokens_by_slot_in_runs_of_at_most_the_group_size() {
        let mut slots = vec![2, -1, 0, 2, 0, -1, 1];
        slots.extend(std::iter::repeat_n(3, LORA_GROUP_TOKENS + 3));
        let (order, groups) = lora_token_groups(&slots, None);
        assert_eq!(&order[..7], &[1, 5, 2, 4, 6, 0, 3]);
        assert_eq!(
            groups,
            vec![-1, 0, 2, 0, 2, 2, 1, 4, 1, 2, 5, 2, 3, 7, LORA_GROUP_TOKENS as i32, 3, 39, 3]
        );
        check_lora_token_groups("test", &slots, &order, &groups).unwrap();
        assert!(groups.len() / 3 <= lora_group_capacity(slots.len(), 4));
        let (_, padded) = lora_token_groups(&slots, Some(lora_group_capacity(slots.len(), 4)));
        assert_eq!(padded.len(), 3 * lora_group_capacity(slots.len(), 4));
        assert_eq!(&padded[groups.len()..groups.len() + 3], &[-1, slots.len() as i32, 0]);
        check_lora_token_groups("test", &slots, &order, &padded).unwrap();
    }

    #[test]
    fn host_check_finds_groups_that_disagree_with_the_slots() {
        let slots = [0, 1, 0];
        let (order, groups) = lora_token_groups(&slots, None);
        let mut wrong_slot = groups.clone();
        wrong_slot[0] = 1;
        let mut missing = groups.clone();
        missing[2] = 1;
        let mut twice = order.clone();
        twice[1] = twice[0];
        for (order, groups) in [(&order, &wrong_slot), (&order, &missing), (&twice, &groups)] {
            assert!(check_lora_token_groups("test", &slots, order, groups).is_err());
        }
    }
}
