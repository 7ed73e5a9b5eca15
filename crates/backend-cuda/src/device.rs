//! The device side the backend stands on: the primary context, the one stream
//! every op runs on, and stream-ordered device memory.

use std::ffi::c_void;
use std::sync::Arc;

use cust::context::{Context, CurrentContext};
use cust::device::Device;
use cust::stream::{Stream, StreamFlags};
use cust::sys as cu;

use crate::error::{driver, CudaError, DriverContext};

/// The context and stream shared by a backend and every buffer it allocated.
/// Buffers hold an `Arc` of it, so the stream outlives the last free queued on it.
pub(crate) struct DeviceInner {
    // Field order is drop order: the stream goes before the context.
    stream: Stream,
    context: Context,
    pool: cu::CUmemoryPool,
    pub(crate) device: Device,
}

// SAFETY: the pool handle is a driver object usable from any thread once the
// context is current, which every entry point ensures first.
unsafe impl Send for DeviceInner {}
unsafe impl Sync for DeviceInner {}

impl DeviceInner {
    pub(crate) fn new(ordinal: u32) -> Result<Arc<Self>, CudaError> {
        cust::init(cust::CudaFlags::empty()).during("cuInit")?;
        let device = Device::get_device(ordinal).during("cuDeviceGet")?;
        let context = Context::new(device).during("cuDevicePrimaryCtxRetain")?;
        CurrentContext::set_current(&context).during("cuCtxSetCurrent")?;
        let stream = Stream::new(StreamFlags::NON_BLOCKING, None).during("cuStreamCreate")?;
        let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver calls with valid out-pointers.
        unsafe {
            driver("cuDeviceGetDefaultMemPool", cu::cuDeviceGetDefaultMemPool(&mut pool, device.as_raw()))?;
            // Keep freed memory in the pool across synchronisations: per-step
            // activations are then recycled without going back to the driver.
            let mut threshold: u64 = u64::MAX;
            driver(
                "cuMemPoolSetAttribute",
                cu::cuMemPoolSetAttribute(
                    pool,
                    cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut c_void,
                ),
            )?;
        }
        Ok(Arc::new(Self { stream, context, pool, device }))
    }

    /// Makes the context current on the calling thread (cheap; every entry point calls it).
    pub(crate) fn bind(&self) -> Result<(), CudaError> {
        CurrentContext::set_current(&self.context).during("cuCtxSetCurrent")
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    pub(crate) fn raw_stream(&self) -> cu::CUstream {
        self.stream.as_inner()
    }

    pub(crate) fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        self.stream.synchronize().during("cuStreamSynchronize")
    }

    /// Returns pooled memory nobody holds to the driver (before reporting free memory).
    pub(crate) fn trim_pool(&self) -> Result<(), CudaError> {
        // SAFETY: the pool belongs to this device; trimming keeps live allocations.
        unsafe { driver("cuMemPoolTrimTo", cu::cuMemPoolTrimTo(self.pool, 0)) }
    }

    /// Stream-ordered allocation of at least `bytes` bytes (at least one).
    pub(crate) fn alloc(self: &Arc<Self>, bytes: usize) -> Result<CudaStorage, CudaError> {
        self.bind()?;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the stream belongs to the current context.
        let r = unsafe { cu::cuMemAllocAsync(&mut ptr, bytes.max(1), self.raw_stream()) };
        if r == cu::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            return Err(CudaError::OutOfMemory { bytes: bytes as u64 });
        }
        driver("cuMemAllocAsync", r)?;
        Ok(CudaStorage { ptr, bytes, device: self.clone() })
    }

    /// Enqueues a host-to-device copy. For pageable host memory the driver has
    /// staged the data when this returns, so `src` may be dropped at once.
    pub(crate) fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst is a device range of at least src.len() bytes (callers check sizes).
        unsafe {
            driver(
                "cuMemcpyHtoDAsync",
                cu::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, src.len(), self.raw_stream()),
            )
        }
    }

    /// Enqueues a device-to-host copy into `dst`.
    ///
    /// # Safety
    /// `dst` must stay valid and untouched until the stream is synchronised.
    pub(crate) unsafe fn copy_to_host_async(&self, dst: &mut [u8], src: u64) -> Result<(), CudaError> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        driver(
            "cuMemcpyDtoHAsync",
            cu::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len(), self.raw_stream()),
        )
    }

    /// Enqueues a device-to-device copy.
    pub(crate) fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges are device memory of at least `bytes` (callers check sizes).
        unsafe { driver("cuMemcpyDtoDAsync", cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.raw_stream())) }
    }

    pub(crate) fn memset_u32(&self, dst: u64, value: u32, count: usize) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: dst holds at least `count` u32 (callers check sizes).
        unsafe { driver("cuMemsetD32Async", cu::cuMemsetD32Async(dst, value, count, self.raw_stream())) }
    }

    pub(crate) fn memory_info(&self) -> Result<(u64, u64), CudaError> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        unsafe { driver("cuMemGetInfo", cu::cuMemGetInfo_v2(&mut free, &mut total))? };
        Ok((free as u64, total as u64))
    }
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // Let queued work (and queued frees) finish before the stream goes away.
        let _ = CurrentContext::set_current(&self.context);
        let _ = self.stream.synchronize();
    }
}

/// Device memory from the stream-ordered pool, freed on the stream when dropped
/// (so work queued before the drop still sees it).
pub struct CudaStorage {
    ptr: u64,
    bytes: usize,
    device: Arc<DeviceInner>,
}

impl CudaStorage {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes as requested.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: ptr came from cuMemAllocAsync on this stream and is freed once.
            unsafe {
                let _ = cu::cuMemFreeAsync(self.ptr, self.device.raw_stream());
            }
        }
    }
}

/// An instantiated CUDA graph: a decode step's launches, recorded once from
/// the stream and replayed with one launch.
pub struct CudaGraph {
    exec: cu::CUgraphExec,
    device: Arc<DeviceInner>,
}

// SAFETY: an executable graph is a driver object usable from any thread with
// the context current; launches go through the backend's one stream.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaGraph({:p})", self.exec)
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // Replays already queued keep the graph alive on the device side.
            // SAFETY: exec came from cuGraphInstantiateWithFlags and is destroyed once.
            unsafe {
                let _ = cu::cuGraphExecDestroy(self.exec);
            }
        }
    }
}

impl DeviceInner {
    /// Records what `record` enqueues on the stream into a graph (nothing runs),
    /// then instantiates it. Relaxed mode: other threads' driver calls (a server
    /// thread querying memory, say) do not invalidate the capture.
    pub(crate) fn capture<E: From<CudaError>>(
        self: &Arc<Self>,
        record: impl FnOnce() -> Result<(), E>,
    ) -> Result<CudaGraph, E> {
        self.bind()?;
        // SAFETY: the stream belongs to the current context.
        unsafe {
            driver(
                "cuStreamBeginCapture",
                cu::cuStreamBeginCapture_v2(
                    self.raw_stream(),
                    cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
                ),
            )?
        };
        let recorded = record();
        let mut graph: cu::CUgraph = std::ptr::null_mut();
        // Always end the capture, so the stream is usable again whatever happened.
        // SAFETY: valid out-pointer; capture was begun on this stream above.
        let ended =
            unsafe { driver("cuStreamEndCapture", cu::cuStreamEndCapture(self.raw_stream(), &mut graph)) };
        let instantiated = recorded.and_then(|()| {
            ended?;
            let mut exec: cu::CUgraphExec = std::ptr::null_mut();
            // SAFETY: graph is the valid graph the capture produced.
            unsafe { driver("cuGraphInstantiate", cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0))? };
            Ok(CudaGraph { exec, device: self.clone() })
        });
        if !graph.is_null() {
            // The executable graph is independent of the graph it came from.
            // SAFETY: graph came from cuStreamEndCapture and is destroyed once.
            unsafe {
                let _ = cu::cuGraphDestroy(graph);
            }
        }
        instantiated
    }

    /// Enqueues one run of `graph` on the stream.
    pub(crate) fn replay(&self, graph: &CudaGraph) -> Result<(), CudaError> {
        self.bind()?;
        // SAFETY: the graph was instantiated in this context; the stream is ours.
        unsafe { driver("cuGraphLaunch", cu::cuGraphLaunch(graph.exec, self.raw_stream())) }
    }
}

/// Page-locked host memory that device-to-host copies land in. A copy into
/// pageable memory returns only once it is done, so two of them cost two round
/// trips; into this buffer both are queued and one synchronisation covers them.
pub(crate) struct PinnedHost {
    device: Arc<DeviceInner>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain host memory, used under the owner's mutex.
unsafe impl Send for PinnedHost {}

impl PinnedHost {
    pub(crate) fn new(device: Arc<DeviceInner>) -> Self {
        Self { device, ptr: std::ptr::null_mut(), len: 0 }
    }

    /// The first `len` bytes, growing the buffer if it is smaller.
    pub(crate) fn slice(&mut self, len: usize) -> Result<&mut [u8], CudaError> {
        if len > self.len {
            self.release();
            self.device.bind()?;
            let mut p: *mut c_void = std::ptr::null_mut();
            let want = len.next_power_of_two().max(4096);
            // SAFETY: valid out-pointer; the device's context is current.
            unsafe { driver("cuMemAllocHost", cu::cuMemAllocHost_v2(&mut p, want))? };
            self.ptr = p as *mut u8;
            self.len = want;
        }
        // SAFETY: `ptr` points to `self.len >= len` bytes owned by this value.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    fn release(&mut self) {
        if !self.ptr.is_null() && self.device.bind().is_ok() {
            // SAFETY: allocated by cuMemAllocHost above, freed once.
            unsafe {
                let _ = cu::cuMemFreeHost(self.ptr as *mut c_void);
            }
        }
        self.ptr = std::ptr::null_mut();
        self.len = 0;
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        self.release();
    }
}
