//! A backend for testing the shared argument checks: its tensors have shapes,
//! dtypes and storage identity, but hold no data and no op runs.

use std::sync::Arc;

use crate::{
    AttentionHostMetadata, AttentionMetadata, Backend, DType, HostSlice, HostVec, LinearFusion, MemoryInfo,
    Result, RotaryCacheArgs, SampledToken, SamplingRow, Tensor,
};

pub(crate) struct Shapes;

/// One allocation (its address tells storages apart).
pub(crate) struct Storage(#[allow(dead_code)] u8);

/// A fresh tensor on its own storage.
pub(crate) fn tensor(dims: &[usize], dtype: DType) -> Tensor<Shapes> {
    Tensor::from_parts(Arc::new(Storage(0)), 0, dims.into(), dtype)
}

/// Device tensors shaped as `host` says (AttentionMetadata::upload without the data).
pub(crate) fn metadata(host: AttentionHostMetadata) -> AttentionMetadata<Shapes> {
    let n = host.num_seqs();
    AttentionMetadata {
        query_start_loc: tensor(&[n + 1], DType::I32),
        seq_lens: tensor(&[n], DType::I32),
        block_tables: tensor(&[n, host.max_blocks_per_seq], DType::I32),
        slot_mapping: tensor(&[host.num_tokens()], DType::I64),
        host,
    }
}

const NO_OPS: &str = "the Shapes test backend runs no op";

impl Backend for Shapes {
    type Storage = Storage;
    type Graph = crate::NoGraph;
    type Sampled = ();

    fn name(&self) -> String {
        "shapes".into()
    }
    fn activation_dtype(&self) -> DType {
        DType::BF16
    }
    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        Ok(tensor(shape, dtype))
    }
    fn upload(&self, _: HostSlice<'_>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        Ok(tensor(shape, dtype))
    }
    fn write(&self, _: &Tensor<Self>, _: HostSlice<'_>) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn download(&self, _: &Tensor<Self>) -> Result<HostVec> {
        unreachable!("{NO_OPS}")
    }
    fn fill(&self, _: &Tensor<Self>, _: f32) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn memory_info(&self) -> Result<MemoryInfo> {
        unreachable!("{NO_OPS}")
    }
    fn embedding(&self, _: &Tensor<Self>, _: &Tensor<Self>, _: &Tensor<Self>) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn rms_norm(&self, _: &Tensor<Self>, _: &Tensor<Self>, _: f32, _: &Tensor<Self>) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn add_rms_norm(
        &self,
        _: &Tensor<Self>,
        _: &Tensor<Self>,
        _: &Tensor<Self>,
        _: f32,
        _: &Tensor<Self>,
    ) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn linear_fused(
        &self,
        _: &Tensor<Self>,
        _: &Tensor<Self>,
        _: Option<&Tensor<Self>>,
        _: &Tensor<Self>,
        _: &LinearFusion<'_, Self>,
    ) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn rotary_and_cache(&self, args: &RotaryCacheArgs<'_, Self>) -> Result<()> {
        args.check().map(|_| ())
    }
    fn attention(&self, args: &crate::AttentionArgs<'_, Self>) -> Result<()> {
        args.check().map(|_| ())
    }
    fn silu_and_mul(&self, _: &Tensor<Self>, _: &Tensor<Self>) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn gather_rows(&self, _: &Tensor<Self>, _: &Tensor<Self>, _: &Tensor<Self>) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn copy_blocks(&self, caches: &[&Tensor<Self>], pairs: &[(u32, u32)]) -> Result<()> {
        crate::check_copy_blocks(caches, pairs)
    }
    fn swap_out(&self, cache: &Tensor<Self>, host_pool: &mut [u8], pairs: &[(u32, u32)]) -> Result<()> {
        crate::check_swap_out(cache, host_pool.len(), pairs).map(|_| ())
    }
    fn swap_in(&self, host_pool: &[u8], cache: &Tensor<Self>, pairs: &[(u32, u32)]) -> Result<()> {
        crate::check_swap_in(host_pool.len(), cache, pairs).map(|_| ())
    }
    fn capture(&self, _: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph> {
        unreachable!("{NO_OPS}")
    }
    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        match *graph {}
    }
    fn sample_async(&self, _: &Tensor<Self>, _: &[SamplingRow<'_>]) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
    fn finish_sample(&self, _: ()) -> Result<Vec<SampledToken>> {
        unreachable!("{NO_OPS}")
    }
    fn feed_sampled_tokens(&self, _: &(), _: &Tensor<Self>, _: &Tensor<Self>) -> Result<()> {
        unreachable!("{NO_OPS}")
    }
}
