//! [`CudaBackend`]: the `Backend` trait on one NVIDIA GPU.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cust::event::{Event, EventFlags};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use pagoda_backend::fp8::e4m3_from_f32;
use pagoda_backend::{
    AttentionArgs, Backend, BackendError, CacheBlocks, DType, Fp8LinearArgs, Fp8LinearMode, HostSlice,
    HostVec, KvCacheShape, LinearFusion, LoraArgs, LoraGroups, MemoryInfo, Result, RotaryCacheArgs,
    RotaryShape, SampledToken, SamplingRow, Tensor, UniformFill,
};

mod fp8_linear;

use crate::device::{CudaGraph, CudaStorage, DeviceInner, PinnedHost};
use crate::error::{CudaError, DriverContext};
use crate::ffi::{self, check};
use crate::policy::{DeviceFacts, KernelOptions, KernelPolicy};
use crate::sampling::{CudaSampled, Readbacks};

/// The CUDA backend: every op is a kernel (or a cuBLAS call) queued on one
/// stream; only downloads, `sample`/`finish_sample`, swap-outs and
/// `synchronize` wait for the GPU (`finish_sample` for its own copies only).
/// Small uploads are staged through page-locked memory, so they never wait.
///
/// Index errors found on the device (a token id past the vocabulary, a cache
/// slot or block-table entry out of range) skip the offending element and are
/// reported as [`BackendError::Index`] by the next call that waits; errors
/// recorded before a `sample_async` are reported by its `finish_sample`.
///
/// How the launchers choose kernels (PDL, the small-batch GEMV, decode
/// partitions, the SM count they size grids by) is this device's
/// [`KernelPolicy`], resolved once at creation; see [`crate::policy`].
pub struct CudaBackend {
    device: Arc<DeviceInner>,
    name: String,
    activation: DType,
    /// This device's facts, and what the caller and the environment asked at
    /// creation: [`CudaBackend::set_kernel_options`] resolves again from them.
    facts: DeviceFacts,
    asked: KernelOptions,
    policy: KernelPolicy,
    /// `policy` as every launcher takes it.
    launch_policy: ffi::PagodaKernelPolicy,
    blas: Mutex<BlasHandle>,
    /// The device status word the kernels set bits in.
    status: CudaStorage,
    /// Where downloads and the status word land before they are copied out.
    readback: Mutex<PinnedHost>,
    /// Page-locked memory for `sample_async`'s copies, reused across calls.
    sample_readbacks: Arc<Readbacks>,
}

struct BlasHandle(*mut c_void);

// SAFETY: the handle is only used under the backend's mutex.
unsafe impl Send for BlasHandle {}

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: created by pagoda_blas_create, destroyed once.
        unsafe {
            let _ = ffi::pagoda_blas_destroy(self.0);
        }
    }
}

impl CudaBackend {
    /// The GPU `ordinal` with bf16 activations; kernel switches from the
    /// `PAGODA_*` environment, else the device's defaults.
    pub fn new(ordinal: u32) -> Result<Self, CudaError> {
        Self::with_activation_dtype(ordinal, DType::BF16)
    }

    /// The GPU `ordinal` with `activation` (BF16 or F16; F32 works for every op
    /// but attention) as the activation and KV-cache dtype.
    pub fn with_activation_dtype(ordinal: u32, activation: DType) -> Result<Self, CudaError> {
        Self::with_kernel_options(ordinal, activation, KernelOptions::default())
    }

    /// [`CudaBackend::with_activation_dtype`] with kernel switches: each one
    /// `options` sets wins over the `PAGODA_*` environment (read here, once),
    /// which wins over the device's default ([`KernelPolicy::resolve`]). A
    /// `PAGODA_*` variable with a value it does not understand is an error.
    pub fn with_kernel_options(
        ordinal: u32,
        activation: DType,
        options: KernelOptions,
    ) -> Result<Self, CudaError> {
        let env = KernelOptions::from_env()?;
        let device = DeviceInner::new(ordinal)?;
        let name = device.device.name().during("cuDeviceGetName")?;
        let attribute = |a, call| -> Result<u32, CudaError> {
            Ok(u32::try_from(device.device.get_attribute(a).during(call)?).unwrap_or(0))
        };
        use cust::device::DeviceAttribute as A;
        let facts = DeviceFacts {
            num_sms: attribute(A::MultiprocessorCount, "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)")?,
            compute_capability: (
                attribute(A::ComputeCapabilityMajor, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)")?,
                attribute(A::ComputeCapabilityMinor, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)")?,
            ),
        };
        let policy = KernelPolicy::resolve(options, env, facts);
        let mut handle = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is current.
        check("pagoda_blas_create", unsafe { ffi::pagoda_blas_create(&mut handle) })?;
        let blas = Mutex::new(BlasHandle(handle));
        let status = device.alloc(4)?;
        device.memset_u32(status.ptr(), 0, 1)?;
        let readback = Mutex::new(PinnedHost::new(device.clone()));
        let sample_readbacks = Arc::default();
        Ok(Self {
            device,
            name,
            activation,
            facts,
            asked: options.or(env),
            policy,
            launch_policy: policy.to_ffi(),
            blas,
            status,
            readback,
            sample_readbacks,
        })
    }

    /// How this backend's launchers choose kernels.
    pub fn kernel_policy(&self) -> KernelPolicy {
        self.policy
    }

    /// What the kernel policy knows of this device (SM count, compute capability).
    pub fn device_facts(&self) -> DeviceFacts {
        self.facts
    }

    /// Resolves the policy again with `options` first; the switches it leaves
    /// unset keep what the creation options or the environment set (benches
    /// and tests sweep a switch this way). Work already queued or captured
    /// keeps the choices it was launched with.
    pub fn set_kernel_options(&mut self, options: KernelOptions) {
        self.policy = KernelPolicy::resolve(options, self.asked, self.facts);
        self.launch_policy = self.policy.to_ffi();
    }

    /// The policy as the launchers take it.
    pub(crate) fn launch_policy(&self) -> &ffi::PagodaKernelPolicy {
        &self.launch_policy
    }

    fn stream(&self) -> *mut c_void {
        self.device.raw_stream() as *mut c_void
    }

    /// The device status word the kernels set `PAGODA_STATUS_*` bits in.
    pub(crate) fn status_ptr(&self) -> *mut u32 {
        self.status.ptr() as *mut u32
    }

    fn bind(&self) -> Result<()> {
        Ok(self.device.bind()?)
    }

    /// Reports and clears the status word read back as `word`; call after a
    /// synchronisation.
    fn take_status(&self, word: u32) -> Result<()> {
        if word != 0 {
            self.device.memset_u32(self.status.ptr(), 0, 1)?;
        }
        self.status_error(word)
    }

    /// The index error of status bits `word` (already cleared on the device),
    /// with those of sampling handles dropped unfinished; `Ok` if none.
    pub(crate) fn status_error(&self, word: u32) -> Result<()> {
        let word = word | self.sample_readbacks.take_orphaned_status();
        if word == 0 {
            return Ok(());
        }
        let mut what = Vec::new();
        for (bit, name) in [
            (ffi::PAGODA_STATUS_ROW_INDEX, "a row index or token id out of range"),
            (ffi::PAGODA_STATUS_SLOT, "a cache slot out of range"),
            (ffi::PAGODA_STATUS_BLOCK_TABLE, "a block-table entry out of range"),
            (ffi::PAGODA_STATUS_POSITION, "a position outside the cos/sin table"),
            (ffi::PAGODA_STATUS_LORA_SLOT, "a LoRA slot past the slot count"),
        ] {
            if word & bit != 0 {
                what.push(name);
            }
        }
        Err(BackendError::Index { op: "device kernel", detail: what.join(", ") })
    }

    /// Synchronises and reports any index error the kernels recorded.
    fn sync_checked(&self) -> Result<()> {
        let mut word = [0u8; 4];
        // SAFETY: `word` lives until the synchronisation below.
        unsafe { self.device.copy_to_host_async(&mut word, self.status.ptr())? };
        self.device.synchronize()?;
        self.take_status(u32::from_le_bytes(word))
    }

    /// A scratch buffer that lives until the work queued before its drop is done.
    fn scratch(&self, bytes: usize) -> Result<CudaStorage> {
        Ok(self.device.alloc(bytes)?)
    }

    /// A scratch buffer when a launcher asked for `bytes` > 0 of workspace.
    fn optional_scratch(&self, bytes: usize) -> Result<Option<CudaStorage>> {
        if bytes == 0 {
            return Ok(None);
        }
        self.scratch(bytes).map(Some)
    }

    fn upload_scratch<T: bytemuck::Pod>(&self, data: &[T]) -> Result<CudaStorage> {
        let buf = self.scratch(std::mem::size_of_val(data))?;
        self.device.copy_to_device(buf.ptr(), bytemuck::cast_slice(data))?;
        Ok(buf)
    }

    /// Copies `src` over `dst` on the device (same dtype and element count).
    pub fn copy(&self, src: &Tensor<Self>, dst: &Tensor<Self>) -> Result<()> {
        if src.dtype() != dst.dtype() || src.numel() != dst.numel() {
            return Err(BackendError::shape("copy", format!("{src:?} to {dst:?}")));
        }
        Ok(self.device.copy_on_device(dptr(dst), dptr(src), src.size_in_bytes())?)
    }

    /// Runs `f` (which queues device work) and returns the GPU time between
    /// events recorded before and after it, in milliseconds. Waits for the GPU.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        self.bind()?;
        let start = Event::new(EventFlags::DEFAULT).map_err(|e| device_err("cuEventCreate", e))?;
        let end = Event::new(EventFlags::DEFAULT).map_err(|e| device_err("cuEventCreate", e))?;
        start.record(self.device.stream()).map_err(|e| device_err("cuEventRecord", e))?;
        f()?;
        end.record(self.device.stream()).map_err(|e| device_err("cuEventRecord", e))?;
        end.synchronize().map_err(|e| device_err("cuEventSynchronize", e))?;
        end.elapsed_time_f32(&start).map_err(|e| device_err("cuEventElapsedTime", e))
    }
}

/// A launcher's (workspace pointer, size) for an optional scratch buffer.
fn scratch_args(scratch: &Option<CudaStorage>) -> (*mut c_void, usize) {
    scratch.as_ref().map_or((std::ptr::null_mut(), 0), |s| (s.ptr() as *mut c_void, s.bytes()))
}

fn device_err(call: &'static str, source: cust::error::CudaError) -> BackendError {
    CudaError::Driver { call, source }.into()
}

fn dtype_code(d: DType) -> i32 {
    (match d {
        DType::F32 => ffi::PAGODA_DTYPE_F32,
        DType::F16 => ffi::PAGODA_DTYPE_F16,
        DType::BF16 => ffi::PAGODA_DTYPE_BF16,
        DType::I32 => ffi::PAGODA_DTYPE_I32,
        DType::I64 => ffi::PAGODA_DTYPE_I64,
        DType::F8E4M3 => ffi::PAGODA_DTYPE_F8E4M3,
    }) as i32
}

/// Device address of a tensor's first element.
fn dptr(t: &Tensor<CudaBackend>) -> u64 {
    t.storage().ptr() + (t.offset() * t.dtype().size_in_bytes()) as u64
}

// The kernels' group size is the one the host groups with.
const _: () = assert!(ffi::PAGODA_LORA_GROUP_TOKENS as usize == pagoda_backend::LORA_GROUP_TOKENS);
// The launcher takes as many parts as the trait allows.
const _: () = assert!(ffi::PAGODA_LORA_MAX_PARTS as usize == pagoda_backend::LORA_MAX_PARTS);

/// Whether the LoRA products may take the grouped (SGMV) kernels: only with
/// `PAGODA_LORA_GROUPED=1` until they have run on a GPU (they were written in
/// a session that got no GPU); the per-token kernels are the default.
fn lora_grouped_kernels() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("PAGODA_LORA_GROUPED").is_ok_and(|v| v == "1"))
}

/// The default of [`lora_dense_min_tokens`]: LoRA products of at least this
/// many tokens run as dense GEMMs over every slot.
pub const DEFAULT_LORA_DENSE_MIN_TOKENS: i32 = 32;

/// `PAGODA_LORA_DENSE_MIN_TOKENS=N`: the fewest tokens a LoRA product needs to
/// run as dense cuBLAS GEMMs over every slot (`csrc/lora.cu`); 0 never.
pub const ENV_LORA_DENSE_MIN_TOKENS: &str = "PAGODA_LORA_DENSE_MIN_TOKENS";

/// The fewest tokens for the dense LoRA path: [`ENV_LORA_DENSE_MIN_TOKENS`] if
/// set to a number, else [`DEFAULT_LORA_DENSE_MIN_TOKENS`]. Read once.
fn lora_dense_min_tokens() -> i32 {
    static MIN: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var(ENV_LORA_DENSE_MIN_TOKENS)
            .ok()
            .and_then(|v| v.trim().parse::<i32>().ok())
            .filter(|&v| v >= 0)
            .unwrap_or(DEFAULT_LORA_DENSE_MIN_TOKENS)
    })
}

/// The grouped tokens' device pointers and group count, or nulls and 0
/// (the args' `check` has checked the groups' shapes).
fn lora_groups(
    op: &'static str,
    groups: &Option<LoraGroups<'_, CudaBackend>>,
) -> Result<(*const i32, *const i32, i32)> {
    Ok(match groups {
        Some(g) if lora_grouped_kernels() => (
            dptr(g.order) as *const i32,
            dptr(g.groups) as *const i32,
            to_i32(op, "groups", g.groups.dim(0))?,
        ),
        _ => (std::ptr::null(), std::ptr::null(), 0),
    })
}

fn vptr(t: &Tensor<CudaBackend>) -> *mut c_void {
    dptr(t) as *mut c_void
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| BackendError::shape(op, format!("{what} = {v} exceeds i32")))
}

fn no_alias(op: &'static str, out: &Tensor<CudaBackend>, inputs: &[&Tensor<CudaBackend>]) -> Result<()> {
    if inputs.iter().any(|i| i.shares_storage(out)) {
        return Err(BackendError::Aliasing { op });
    }
    Ok(())
}

fn expect_float(op: &'static str, t: &Tensor<CudaBackend>) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(BackendError::DType { op, dtype: t.dtype() });
    }
    Ok(())
}

fn same_dtype(op: &'static str, a: &Tensor<CudaBackend>, b: &Tensor<CudaBackend>) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(BackendError::DType { op, dtype: b.dtype() });
    }
    Ok(())
}

/// The bytes of `data` in `dtype` (floats and E4M3 codes converted, a float
/// to its nearest code, saturating; integers must match).
fn encode<'a>(op: &'static str, data: HostSlice<'a>, dtype: DType) -> Result<Cow<'a, [u8]>> {
    let from = data.dtype();
    if from == dtype {
        let bytes: &'a [u8] = match data {
            HostSlice::F32(s) => bytemuck::cast_slice(s),
            HostSlice::F16(s) => bytemuck::cast_slice(s),
            HostSlice::BF16(s) => bytemuck::cast_slice(s),
            HostSlice::I32(s) => bytemuck::cast_slice(s),
            HostSlice::I64(s) => bytemuck::cast_slice(s),
            HostSlice::Bytes(b, _) => b,
        };
        return Ok(Cow::Borrowed(&bytes[..data.len() * dtype.size_in_bytes()]));
    }
    if !(from.holds_reals() && dtype.holds_reals()) {
        return Err(BackendError::DType { op, dtype: from });
    }
    // f32 to 16 bits, the common case (weights, LoRA slots): `half`'s slice
    // conversion, many times faster than element by element.
    if let HostSlice::F32(src) = data {
        match dtype {
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; src.len()];
                v.convert_from_f32_slice(src);
                return Ok(Cow::Owned(bytemuck::cast_slice(&v).to_vec()));
            }
            DType::F16 => {
                let mut v = vec![f16::ZERO; src.len()];
                v.convert_from_f32_slice(src);
                return Ok(Cow::Owned(bytemuck::cast_slice(&v).to_vec()));
            }
            _ => {}
        }
    }
    let n = data.len();
    let mut out = Vec::with_capacity(n * dtype.size_in_bytes());
    match dtype {
        DType::F32 => (0..n).for_each(|i| out.extend_from_slice(&data.get_f32(i).to_le_bytes())),
        DType::F16 => {
            (0..n).for_each(|i| out.extend_from_slice(&f16::from_f32(data.get_f32(i)).to_le_bytes()))
        }
        DType::BF16 => {
            (0..n).for_each(|i| out.extend_from_slice(&bf16::from_f32(data.get_f32(i)).to_le_bytes()))
        }
        DType::F8E4M3 => (0..n).for_each(|i| out.push(e4m3_from_f32(data.get_f32(i)))),
        DType::I32 | DType::I64 => return Err(BackendError::DType { op, dtype }),
    }
    Ok(Cow::Owned(out))
}

fn host_vec_from_bytes(dtype: DType, bytes: &[u8]) -> HostVec {
    match dtype {
        DType::F32 => HostVec::F32(bytemuck::pod_collect_to_vec(bytes)),
        DType::F16 => HostVec::F16(bytemuck::pod_collect_to_vec(bytes)),
        DType::BF16 => HostVec::BF16(bytemuck::pod_collect_to_vec(bytes)),
        DType::I32 => HostVec::I32(bytemuck::pod_collect_to_vec(bytes)),
        DType::I64 => HostVec::I64(bytemuck::pod_collect_to_vec(bytes)),
        DType::F8E4M3 => HostVec::F8E4M3(bytes.to_vec()),
    }
}

/// Splits copy-on-write pairs into runs whose copies are independent, so each
/// run can go in one launch and the runs keep the order the pairs were given in.
fn independent_runs(pairs: &[(u32, u32)]) -> Vec<&[(u32, u32)]> {
    let mut runs = Vec::new();
    let (mut start, mut read, mut written) = (0, HashSet::new(), HashSet::new());
    for (i, &(src, dst)) in pairs.iter().enumerate() {
        let conflicts = written.contains(&src) || written.contains(&dst) || read.contains(&dst) || src == dst;
        if conflicts && i > start {
            runs.push(&pairs[start..i]);
            start = i;
            read.clear();
            written.clear();
        }
        read.insert(src);
        written.insert(dst);
    }
    if start < pairs.len() {
        runs.push(&pairs[start..]);
    }
    runs
}

impl Backend for CudaBackend {
    type Storage = CudaStorage;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn activation_dtype(&self) -> DType {
        self.activation
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        let numel: usize = shape.iter().product();
        let storage = self.device.alloc(numel * dtype.size_in_bytes())?;
        Ok(Tensor::from_parts(Arc::new(storage), 0, shape.into(), dtype))
    }

    fn upload(&self, data: HostSlice<'_>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(BackendError::shape(
                "upload",
                format!("{} elements for shape {shape:?}", data.len()),
            ));
        }
        let bytes = encode("upload", data, dtype)?;
        let t = self.alloc(shape, dtype)?;
        self.device.copy_to_device(dptr(&t), &bytes)?;
        Ok(t)
    }

    fn write(&self, dst: &Tensor<Self>, data: HostSlice<'_>) -> Result<()> {
        if data.len() != dst.numel() {
            return Err(BackendError::shape("write", format!("{} elements into {dst:?}", data.len())));
        }
        let bytes = encode("write", data, dst.dtype())?;
        Ok(self.device.copy_to_device(dptr(dst), &bytes)?)
    }

    fn download(&self, src: &Tensor<Self>) -> Result<HostVec> {
        let mut bytes = vec![0u8; src.size_in_bytes()];
        self.download_bytes(&mut bytes, dptr(src))?;
        Ok(host_vec_from_bytes(src.dtype(), &bytes))
    }

    fn fill(&self, dst: &Tensor<Self>, value: f32) -> Result<()> {
        self.bind()?;
        // SAFETY: dst is a device range of numel elements of its dtype.
        let rc = unsafe {
            ffi::pagoda_fill(
                vptr(dst),
                dtype_code(dst.dtype()),
                dst.numel(),
                value,
                self.launch_policy(),
                self.stream(),
            )
        };
        Ok(check("pagoda_fill", rc)?)
    }

    fn fill_uniform(&self, dst: &Tensor<Self>, fill: &UniformFill) -> Result<()> {
        let (rows, cols, row_stride) = fill.check(dst)?;
        self.bind()?;
        // SAFETY: dst is a device range of rows * cols elements of its (float) dtype.
        let rc = unsafe {
            ffi::pagoda_fill_uniform(
                vptr(dst),
                dtype_code(dst.dtype()),
                rows,
                cols,
                fill.key,
                fill.low,
                fill.width(),
                fill.first,
                row_stride,
                self.launch_policy(),
                self.stream(),
            )
        };
        Ok(check("pagoda_fill_uniform", rc)?)
    }

    fn synchronize(&self) -> Result<()> {
        self.sync_checked()
    }

    fn memory_info(&self) -> Result<MemoryInfo> {
        self.sync_checked()?;
        self.device.trim_pool()?;
        let (free_bytes, total_bytes) = self.device.memory_info()?;
        Ok(MemoryInfo { free_bytes, total_bytes })
    }

    fn embedding(&self, token_ids: &Tensor<Self>, table: &Tensor<Self>, out: &Tensor<Self>) -> Result<()> {
        const OP: &str = "embedding";
        token_ids.expect_dtype(OP, DType::I32)?;
        let (vocab, hidden) = table.dims2(OP)?;
        let t = token_ids.numel();
        out.expect_dims(OP, "out", &[t, hidden])?;
        same_dtype(OP, table, out)?;
        no_alias(OP, out, &[token_ids, table])?;
        self.gather(OP, table, vocab, hidden, token_ids, out)
    }

    fn rms_norm(&self, x: &Tensor<Self>, weight: &Tensor<Self>, eps: f32, out: &Tensor<Self>) -> Result<()> {
        const OP: &str = "rms_norm";
        let (rows, hidden) = x.dims2(OP)?;
        self.norm(OP, x, None, weight, eps, out, rows, hidden)
    }

    fn add_rms_norm(
        &self,
        x: &Tensor<Self>,
        residual: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
        out: &Tensor<Self>,
    ) -> Result<()> {
        const OP: &str = "add_rms_norm";
        let (rows, hidden) = x.dims2(OP)?;
        residual.expect_dims(OP, "residual", &[rows, hidden])?;
        same_dtype(OP, x, residual)?;
        no_alias(OP, residual, &[x, weight])?;
        no_alias(OP, out, &[residual])?;
        self.norm(OP, x, Some(residual), weight, eps, out, rows, hidden)
    }

    fn linear_fused(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        out: &Tensor<Self>,
        fusion: &LinearFusion<'_, Self>,
    ) -> Result<()> {
        self.linear_layer("linear_fused", x, weight, bias, out, fusion)
    }

    /// Weight only: the FP8 GEMV (16 rows a launch); quantized activations:
    /// per-row quantization and cuBLASLt's FP8 GEMM (`backend/fp8_linear.rs`).
    fn fp8_linear(&self, args: &Fp8LinearArgs<'_, Self>) -> Result<()> {
        self.fp8_linear_layer(args)
    }

    fn fp8_linear_mode(&self, tokens: usize) -> Fp8LinearMode {
        fp8_linear::fp8_linear_mode(tokens)
    }

    /// In a kernel, one block a row (`backend/fp8_linear.rs`).
    fn fp8_quantize_rows(&self, x: &Tensor<Self>, codes: &Tensor<Self>, scales: &Tensor<Self>) -> Result<()> {
        self.fp8_quantize_rows_layer(x, codes, scales)
    }

    fn rotary_and_cache(&self, a: &RotaryCacheArgs<'_, Self>) -> Result<()> {
        const OP: &str = "rotary_and_cache";
        let RotaryShape { num_tokens: t, max_positions, cache } = a.check()?;
        let (hq, hkv, d, rd) = (a.num_q_heads, a.num_kv_heads, a.head_dim, a.rotary_dim);
        let args = ffi::PagodaRotaryArgs {
            qkv: vptr(a.qkv),
            positions: dptr(a.positions) as *const i32,
            cos_sin: dptr(a.cos_sin) as *const f32,
            q_out: vptr(a.q_out),
            k_cache: vptr(a.k_cache),
            v_cache: vptr(a.v_cache),
            slot_mapping: dptr(a.slot_mapping) as *const i64,
            status: self.status_ptr(),
            dtype: dtype_code(a.qkv.dtype()),
            cache_dtype: dtype_code(a.k_cache.dtype()),
            kv_scales: a.kv_scales.map_or(std::ptr::null(), |s| dptr(s) as *const f32),
            num_tokens: to_i32(OP, "tokens", t)?,
            num_q_heads: to_i32(OP, "q heads", hq)?,
            num_kv_heads: to_i32(OP, "kv heads", hkv)?,
            head_dim: to_i32(OP, "head_dim", d)?,
            rotary_dim: to_i32(OP, "rotary_dim", rd)?,
            neox: (a.style == pagoda_backend::RopeStyle::Neox) as i32,
            max_positions: to_i32(OP, "max_positions", max_positions)?,
            num_blocks: to_i32(OP, "num_blocks", cache.num_blocks)?,
            block_size: to_i32(OP, "block_size", cache.block_size)?,
        };
        self.bind()?;
        // SAFETY: every pointer and size was checked against the tensors (RotaryCacheArgs::check).
        let rc = unsafe { ffi::pagoda_rotary_and_cache(&args, self.launch_policy(), self.stream()) };
        Ok(check("pagoda_rotary_and_cache", rc)?)
    }

    fn attention(&self, a: &AttentionArgs<'_, Self>) -> Result<()> {
        const OP: &str = "attention";
        let KvCacheShape { num_blocks, block_size, .. } = a.check()?;
        let host = &a.meta.host;
        let (hq, hkv, d) = (a.num_q_heads, a.num_kv_heads, a.head_dim);
        // What the kernels support, beyond the shared checks.
        if !matches!(a.q.dtype(), DType::BF16 | DType::F16) {
            return Err(BackendError::DType { op: OP, dtype: a.q.dtype() });
        }
        if d != 64 && d != 128 {
            return Err(BackendError::shape(OP, format!("head_dim {d} (the kernels take 64 or 128)")));
        }
        if !block_size.is_power_of_two() {
            return Err(BackendError::shape(
                OP,
                format!("block_size {block_size} (the kernels take powers of two)"),
            ));
        }
        let num_decode = host.num_decode_seqs;
        let max_decode_seq_len = host.seq_lens[..num_decode].iter().copied().max().unwrap_or(0);
        let max_prefill_query_len =
            (num_decode..host.num_seqs()).map(|s| host.query_len(s)).max().unwrap_or(0);
        let mut args = ffi::PagodaAttentionArgs {
            q: vptr(a.q),
            k_cache: vptr(a.k_cache),
            v_cache: vptr(a.v_cache),
            out: vptr(a.out),
            cache_dtype: dtype_code(a.k_cache.dtype()),
            kv_scales: a.kv_scales.map_or(std::ptr::null(), |s| dptr(s) as *const f32),
            query_start_loc: dptr(&a.meta.query_start_loc) as *const i32,
            seq_lens: dptr(&a.meta.seq_lens) as *const i32,
            block_tables: dptr(&a.meta.block_tables) as *const i32,
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
            status: self.status_ptr(),
            dtype: dtype_code(a.q.dtype()),
            num_seqs: to_i32(OP, "sequences", host.num_seqs())?,
            num_decode_seqs: to_i32(OP, "decode sequences", num_decode)?,
            max_blocks_per_seq: to_i32(OP, "max_blocks_per_seq", host.max_blocks_per_seq)?,
            num_blocks: to_i32(OP, "num_blocks", num_blocks)?,
            block_size: to_i32(OP, "block_size", block_size)?,
            num_q_heads: to_i32(OP, "q heads", hq)?,
            num_kv_heads: to_i32(OP, "kv heads", hkv)?,
            head_dim: d as i32,
            scale: a.scale,
            sliding_window: to_i32(OP, "sliding_window", a.sliding_window.unwrap_or(0))?,
            max_decode_seq_len,
            max_prefill_query_len: to_i32(OP, "query length", max_prefill_query_len)?,
        };
        self.bind()?;
        // SAFETY: a pure size computation over the arguments.
        let bytes = unsafe { ffi::pagoda_attention_workspace_bytes(&args, self.launch_policy()) };
        let workspace = self.optional_scratch(bytes)?;
        let (ptr, len) = scratch_args(&workspace);
        (args.workspace, args.workspace_bytes) = (ptr as *mut f32, len);
        // SAFETY: tensors checked (AttentionArgs::check and above); the
        // workspace is freed on the stream after the launch.
        let rc = unsafe { ffi::pagoda_attention(&args, self.launch_policy(), self.stream()) };
        Ok(check("pagoda_attention", rc)?)
    }

    fn silu_and_mul(&self, x: &Tensor<Self>, out: &Tensor<Self>) -> Result<()> {
        const OP: &str = "silu_and_mul";
        let (rows, two_i) = x.dims2(OP)?;
        if two_i % 2 != 0 {
            return Err(BackendError::shape(OP, format!("x {:?}: odd width", x.dims())));
        }
        out.expect_dims(OP, "out", &[rows, two_i / 2])?;
        expect_float(OP, x)?;
        same_dtype(OP, x, out)?;
        no_alias(OP, out, &[x])?;
        self.bind()?;
        // SAFETY: shapes checked above.
        let rc = unsafe {
            ffi::pagoda_silu_and_mul(
                vptr(x),
                vptr(out),
                dtype_code(x.dtype()),
                to_i32(OP, "rows", rows)?,
                to_i32(OP, "width", two_i / 2)?,
                self.launch_policy(),
                self.stream(),
            )
        };
        Ok(check("pagoda_silu_and_mul", rc)?)
    }

    fn gather_rows(&self, x: &Tensor<Self>, indices: &Tensor<Self>, out: &Tensor<Self>) -> Result<()> {
        const OP: &str = "gather_rows";
        indices.expect_dtype(OP, DType::I32)?;
        let (rows, width) = x.dims2(OP)?;
        out.expect_dims(OP, "out", &[indices.numel(), width])?;
        same_dtype(OP, x, out)?;
        no_alias(OP, out, &[x, indices])?;
        self.gather(OP, x, rows, width, indices, out)
    }

    /// One launcher for the whole product (`csrc/lora.cu`): dense cuBLAS
    /// GEMMs over every slot from [`lora_dense_min_tokens`] tokens, per-token
    /// kernels below; a slot past the slot count is skipped on the device
    /// and reported as [`BackendError::Index`] by the next call that waits.
    fn lora_apply(&self, args: &LoraArgs<'_, Self>) -> Result<()> {
        const OP: &str = "lora_apply";
        let shape = args.check(self.activation)?;
        let mut inputs = vec![args.x, args.a, args.token_slots];
        inputs.extend(args.parts.iter().map(|part| part.b));
        no_alias(OP, args.out, &inputs)?;
        let (token_order, groups, num_groups) = lora_groups(OP, &args.groups)?;
        let empty = ffi::PagodaLoraPart { b: std::ptr::null(), n: 0, out_offset: 0 };
        let mut parts = [empty; ffi::PAGODA_LORA_MAX_PARTS as usize];
        for (slot, part) in parts.iter_mut().zip(args.parts) {
            *slot = ffi::PagodaLoraPart {
                b: vptr(part.b),
                n: to_i32(OP, "N", part.b.dim(2))?,
                out_offset: to_i32(OP, "out_offset", part.out_offset)?,
            };
        }
        let mut launch = ffi::PagodaLoraArgs {
            x: vptr(args.x),
            a: vptr(args.a),
            token_slots: dptr(args.token_slots) as *const i32,
            out: vptr(args.out),
            status: self.status_ptr(),
            dtype: dtype_code(self.activation),
            num_tokens: to_i32(OP, "tokens", shape.tokens)?,
            k: to_i32(OP, "K", shape.k)?,
            rank: to_i32(OP, "rank", shape.rank)?,
            num_slots: to_i32(OP, "slots", shape.slots)?,
            num_parts: to_i32(OP, "parts", shape.parts)?,
            out_stride: to_i32(OP, "out columns", shape.out_cols)?,
            parts,
            token_order,
            groups,
            num_groups,
            dense_min_tokens: lora_dense_min_tokens(),
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
        };
        self.bind()?;
        // SAFETY: a pure size computation over the arguments.
        let bytes = unsafe { ffi::pagoda_lora_scratch_bytes(&launch) };
        let scratch = self.optional_scratch(bytes)?;
        (launch.scratch, launch.scratch_bytes) = scratch_args(&scratch);
        let blas = self.blas.lock().map_err(|_| BackendError::Device("cuBLAS handle poisoned".into()))?;
        // SAFETY: shapes (the parts' columns included), dtypes and aliasing
        // checked above; slots are checked on the device; the scratch is
        // freed on the stream after the work.
        let rc = unsafe { ffi::pagoda_lora(blas.0, &launch, self.launch_policy(), self.stream()) };
        Ok(check("pagoda_lora", rc)?)
    }

    fn copy_blocks(&self, caches: &[&Tensor<Self>], pairs: &[(u32, u32)]) -> Result<()> {
        const OP: &str = "copy_blocks";
        pagoda_backend::check_copy_blocks(caches, pairs)?;
        if caches.is_empty() || pairs.is_empty() {
            return Ok(());
        }
        // One launch copies every cache: they must share one block size.
        let bytes0 = CacheBlocks::of(OP, "cache", caches[0])?.block_bytes;
        for c in caches {
            if CacheBlocks::of(OP, "cache", c)?.block_bytes != bytes0 {
                return Err(BackendError::shape(OP, "caches with different block sizes"));
            }
        }
        let ptrs: Vec<u64> = caches.iter().map(|c| dptr(c)).collect();
        let ptrs_dev = self.upload_scratch(&ptrs)?;
        for run in independent_runs(pairs) {
            let flat: Vec<i64> = run.iter().flat_map(|&(s, d)| [s as i64, d as i64]).collect();
            let pairs_dev = self.upload_scratch(&flat)?;
            self.bind()?;
            // SAFETY: block ids checked against every cache; buffers live until after the launch.
            let rc = unsafe {
                ffi::pagoda_copy_blocks(
                    ptrs_dev.ptr() as *const u64,
                    to_i32(OP, "caches", caches.len())?,
                    bytes0,
                    pairs_dev.ptr() as *const i64,
                    to_i32(OP, "pairs", run.len())?,
                    self.launch_policy(),
                    self.stream(),
                )
            };
            check("pagoda_copy_blocks", rc)?;
        }
        Ok(())
    }

    fn swap_out(&self, cache: &Tensor<Self>, host_pool: &mut [u8], pairs: &[(u32, u32)]) -> Result<()> {
        let block_bytes = pagoda_backend::check_swap_out(cache, host_pool.len(), pairs)?.block_bytes;
        for &(dev, host) in pairs {
            let dst = &mut host_pool[host as usize * block_bytes..(host as usize + 1) * block_bytes];
            // SAFETY: the pool outlives the synchronisation below.
            unsafe {
                self.device.copy_to_host_async(dst, dptr(cache) + (dev as usize * block_bytes) as u64)?;
            }
        }
        self.sync_checked()
    }

    fn swap_in(&self, host_pool: &[u8], cache: &Tensor<Self>, pairs: &[(u32, u32)]) -> Result<()> {
        let block_bytes = pagoda_backend::check_swap_in(host_pool.len(), cache, pairs)?.block_bytes;
        for &(host, dev) in pairs {
            let src = &host_pool[host as usize * block_bytes..(host as usize + 1) * block_bytes];
            self.device.copy_to_device(dptr(cache) + (dev as usize * block_bytes) as u64, src)?;
        }
        Ok(())
    }

    type Graph = CudaGraph;

    fn supports_graphs(&self) -> bool {
        true
    }

    fn capture(&self, record: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        self.device.capture(record)
    }

    fn replay(&self, graph: &CudaGraph) -> Result<()> {
        Ok(self.device.replay(graph)?)
    }

    type Sampled = CudaSampled;

    fn supports_logit_constraints(&self) -> bool {
        true
    }

    fn supports_token_masks(&self) -> bool {
        true
    }

    fn sample_async(&self, logits: &Tensor<Self>, rows: &[SamplingRow<'_>]) -> Result<CudaSampled> {
        crate::sampling::sample_async(self, logits, rows)
    }

    fn finish_sample(&self, sampled: CudaSampled) -> Result<Vec<SampledToken>> {
        crate::sampling::finish_sample(self, sampled)
    }

    fn feed_sampled_tokens(
        &self,
        sampled: &CudaSampled,
        source_rows: &Tensor<Self>,
        token_ids: &Tensor<Self>,
    ) -> Result<()> {
        crate::sampling::feed_sampled_tokens(self, sampled, source_rows, token_ids)
    }
}

// Internal launch helpers shared by several ops.
impl CudaBackend {
    fn gather(
        &self,
        op: &'static str,
        x: &Tensor<Self>,
        rows: usize,
        width: usize,
        indices: &Tensor<Self>,
        out: &Tensor<Self>,
    ) -> Result<()> {
        self.bind()?;
        // SAFETY: shapes checked by the callers; bad indices are skipped on the device.
        let rc = unsafe {
            ffi::pagoda_gather_rows(
                vptr(x),
                dptr(indices) as *const i32,
                vptr(out),
                dtype_code(x.dtype()),
                to_i32(op, "rows", indices.numel())?,
                to_i32(op, "width", width)?,
                to_i32(op, "source rows", rows)?,
                self.status_ptr(),
                ffi::PAGODA_STATUS_ROW_INDEX,
                self.launch_policy(),
                self.stream(),
            )
        };
        Ok(check("pagoda_gather_rows", rc)?)
    }

    /// `linear_fused` (and so `linear`): checks, then one `pagoda_linear` call
    /// (the C side picks the fused small-batch kernel or cuBLAS, as the policy allows).
    fn linear_layer(
        &self,
        op: &'static str,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        out: &Tensor<Self>,
        fusion: &LinearFusion<'_, Self>,
    ) -> Result<()> {
        let (t, k, n) = fusion.check_shapes(op, x, weight, bias, out)?;
        expect_float(op, x)?;
        same_dtype(op, x, weight)?;
        if out.dtype() != x.dtype() && (out.dtype() != DType::F32 || fusion.silu_mul) {
            return Err(BackendError::DType { op, dtype: out.dtype() });
        }
        no_alias(op, out, &[x, weight])?;
        if let Some(b) = bias {
            same_dtype(op, x, b)?;
            no_alias(op, out, &[b])?;
        }
        if let Some((g, _)) = fusion.input_norm {
            same_dtype(op, x, g)?;
            no_alias(op, out, &[g])?;
        }
        let mut args = ffi::PagodaLinearArgs {
            x: vptr(x),
            weight: vptr(weight),
            bias: bias.map_or(std::ptr::null(), |b| vptr(b) as *const c_void),
            norm_weight: fusion.input_norm.map_or(std::ptr::null(), |(g, _)| vptr(g) as *const c_void),
            eps: fusion.input_norm.map_or(0.0, |(_, eps)| eps),
            out: vptr(out),
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
            in_dtype: dtype_code(x.dtype()),
            out_dtype: dtype_code(out.dtype()),
            t: to_i32(op, "tokens", t)?,
            n: to_i32(op, "out features", n)?,
            k: to_i32(op, "in features", k)?,
            silu_mul: fusion.silu_mul as i32,
            accumulate: fusion.accumulate as i32,
        };
        self.bind()?;
        // SAFETY: a pure size computation over the arguments.
        let bytes = unsafe { ffi::pagoda_linear_scratch_bytes(&args, self.launch_policy()) };
        let scratch = self.optional_scratch(bytes)?;
        (args.scratch, args.scratch_bytes) = scratch_args(&scratch);
        let blas = self.blas.lock().map_err(|_| BackendError::Device("cuBLAS handle poisoned".into()))?;
        // SAFETY: shapes, dtypes and aliasing checked above; the handle is held
        // under the mutex; the scratch is freed on the stream after the work.
        let rc = unsafe { ffi::pagoda_linear(blas.0, &args, self.launch_policy(), self.stream()) };
        Ok(check("pagoda_linear", rc)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        op: &'static str,
        x: &Tensor<Self>,
        residual: Option<&Tensor<Self>>,
        weight: &Tensor<Self>,
        eps: f32,
        out: &Tensor<Self>,
        rows: usize,
        hidden: usize,
    ) -> Result<()> {
        weight.expect_dims(op, "weight", &[hidden])?;
        out.expect_dims(op, "out", &[rows, hidden])?;
        expect_float(op, x)?;
        same_dtype(op, x, out)?;
        if weight.dtype() != x.dtype() && weight.dtype() != DType::F32 {
            return Err(BackendError::DType { op, dtype: weight.dtype() });
        }
        no_alias(op, out, &[x, weight])?;
        self.bind()?;
        // SAFETY: shapes checked above.
        let rc = unsafe {
            ffi::pagoda_rms_norm(
                vptr(x),
                residual.map_or(std::ptr::null_mut(), vptr),
                vptr(weight),
                dtype_code(weight.dtype()),
                vptr(out),
                dtype_code(x.dtype()),
                to_i32(op, "rows", rows)?,
                to_i32(op, "hidden", hidden)?,
                eps,
                self.launch_policy(),
                self.stream(),
            )
        };
        Ok(check("pagoda_rms_norm", rc)?)
    }

    pub(crate) fn raw_stream(&self) -> *mut c_void {
        self.stream()
    }

    pub(crate) fn device(&self) -> &Arc<DeviceInner> {
        &self.device
    }

    pub(crate) fn sample_readbacks(&self) -> &Arc<Readbacks> {
        &self.sample_readbacks
    }

    /// Copies device bytes to the host, waits, and reports recorded index errors.
    /// Both copies go to page-locked memory, so one wait covers them.
    fn download_bytes(&self, dst: &mut [u8], src: u64) -> Result<()> {
        let mut pinned =
            self.readback.lock().map_err(|_| BackendError::Device("readback buffer poisoned".into()))?;
        let status_at = dst.len().next_multiple_of(16);
        let buf = pinned.slice(status_at + 4)?;
        let (data, rest) = buf.split_at_mut(status_at);
        // SAFETY: the pinned buffer outlives the synchronisation below, and
        // nothing else touches it while the mutex is held.
        unsafe {
            self.device.copy_to_host_async(&mut data[..dst.len()], src)?;
            self.device.copy_to_host_async(&mut rest[..4], self.status.ptr())?;
        }
        self.device.synchronize()?;
        dst.copy_from_slice(&data[..dst.len()]);
        self.take_status(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]))
    }
}

pub(crate) fn tensor_ptr(t: &Tensor<CudaBackend>) -> u64 {
    dptr(t)
}

pub(crate) fn dtype_to_code(d: DType) -> i32 {
    dtype_code(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn independent_runs_split_only_at_dependencies() {
        let pairs = [(1, 2), (3, 4), (2, 5), (6, 7), (7, 1)];
        let runs = independent_runs(&pairs);
        assert_eq!(runs, vec![&pairs[0..2], &pairs[2..4], &pairs[4..5]]);
        assert_eq!(independent_runs(&[(0, 1), (0, 2)]).len(), 1);
        assert_eq!(independent_runs(&[(0, 1), (2, 1)]).len(), 2);
        assert_eq!(independent_runs(&[(0, 1), (1, 0)]).len(), 2);
        assert!(independent_runs(&[]).is_empty());
    }

    #[test]
    fn encode_converts_floats_and_refuses_integer_mismatches() {
        let v = [1.5f32, -2.0];
        let b = encode("t", HostSlice::F32(&v), DType::BF16).unwrap();
        assert_eq!(&b[..], bytemuck::cast_slice::<bf16, u8>(&[bf16::from_f32(1.5), bf16::from_f32(-2.0)]));
        assert!(matches!(encode("t", HostSlice::F32(&v), DType::F32).unwrap(), Cow::Borrowed(_)));
        assert!(encode("t", HostSlice::I32(&[1]), DType::I64).is_err());
        assert!(encode("t", HostSlice::I32(&[1]), DType::F32).is_err());
    }

    #[test]
    fn e4m3_codes_upload_as_they_are_floats_round_to_them() {
        let codes = [0x38u8, 0xC0, 0x7F];
        let raw = encode("t", HostSlice::Bytes(&codes, DType::F8E4M3), DType::F8E4M3).unwrap();
        assert!(matches!(raw, Cow::Borrowed(b) if b == codes));
        let rounded = encode("t", HostSlice::F32(&[0.3, -1000.0]), DType::F8E4M3).unwrap();
        assert_eq!(&rounded[..], &[0x2A, 0xFE]);
        let decoded = encode("t", HostSlice::Bytes(&codes[..2], DType::F8E4M3), DType::F32).unwrap();
        assert_eq!(&decoded[..], bytemuck::cast_slice::<f32, u8>(&[1.0, -2.0]));
        assert!(encode("t", HostSlice::I32(&[1]), DType::F8E4M3).is_err());
        assert_eq!(host_vec_from_bytes(DType::F8E4M3, &codes), HostVec::F8E4M3(codes.to_vec()));
    }
}
