//! The device side the backend stands on: the primary context, the one stream
//! every op runs on, stream-ordered device memory, and the page-locked staging
//! ring that keeps small host-to-device copies asynchronous.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cust::context::{Context, CurrentContext};
use cust::device::Device;
use cust::event::{Event, EventFlags, EventStatus};
use cust::stream::{Stream, StreamFlags};
use cust::sys as cu;

use crate::error::{driver, CudaError, DriverContext};

/// The context and stream shared by a backend and every buffer it allocated.
/// Buffers hold an `Arc` of it, so the stream outlives the last free queued on it.
pub(crate) struct DeviceInner {
    // Field order is drop order: the staging ring (pinned memory, events) and
    // the stream go before the context.
    staging: Mutex<StagingRing>,
    /// Set while `capture` records the stream: copies then bypass the ring,
    /// whose bytes a recorded copy would read again at every replay.
    capturing: AtomicBool,
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
        Ok(Arc::new(Self {
            staging: Mutex::new(StagingRing::default()),
            capturing: AtomicBool::new(false),
            stream,
            context,
            pool,
            device,
        }))
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

    /// Enqueues a host-to-device copy; `src` may be dropped or reused as soon
    /// as this returns. Copies up to [`STAGING_MAX_COPY`] bytes go through the
    /// staging ring and never wait for the GPU; larger ones (weights at load
    /// time) are queued from pageable memory, which the driver may make wait.
    pub(crate) fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        if src.len() <= STAGING_MAX_COPY && !self.capturing.load(Ordering::Acquire) {
            let mut ring = self.staging.lock().map_err(|_| CudaError::Poisoned("staging ring"))?;
            return ring.copy(self, dst, src);
        }
        // SAFETY: dst is a device range of at least src.len() bytes (callers check sizes).
        unsafe { self.copy_from_host(dst, src.as_ptr(), src.len()) }
    }

    /// Enqueues `cuMemcpyHtoDAsync(dst, src, len)` on the stream.
    ///
    /// # Safety
    /// `dst` is a device range and `src` a host range of `len` bytes; if `src`
    /// is page-locked it must stay untouched until the copy has run.
    unsafe fn copy_from_host(&self, dst: u64, src: *const u8, len: usize) -> Result<(), CudaError> {
        driver(
            "cuMemcpyHtoDAsync",
            cu::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, self.raw_stream()),
        )
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
        self.capturing.store(true, Ordering::Release);
        let captured = self.capture_inner(record);
        self.capturing.store(false, Ordering::Release);
        captured
    }

    fn capture_inner<E: From<CudaError>>(
        self: &Arc<Self>,
        record: impl FnOnce() -> Result<(), E>,
    ) -> Result<CudaGraph, E> {
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

    /// Bytes held (the most `slice` returns without growing).
    pub(crate) fn capacity(&self) -> usize {
        self.len
    }

    /// The first `len` bytes (at most the capacity) to read.
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: `ptr` points to `self.len` bytes owned by this value.
        unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.len)) }
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

/// Size of the page-locked ring that small host-to-device copies are staged
/// through (allocated at the first such copy).
pub(crate) const STAGING_RING_BYTES: usize = 16 << 20;
/// The largest copy staged through the ring; larger ones stay pageable.
pub(crate) const STAGING_MAX_COPY: usize = STAGING_RING_BYTES / 4;
/// Staged copies start at multiples of this.
const STAGING_ALIGN: usize = 256;

/// Page-locked staging for small host-to-device copies.
///
/// Why: `cuMemcpyHtoDAsync` from pageable memory may wait for the stream
/// before it returns (the driver stages the bytes through its own pinned
/// buffers), so every per-step upload (token ids, positions, block tables,
/// sampling parameters) could wait for the GPU to finish the previous step.
/// From page-locked memory the copy is only queued. So a small copy is first
/// `memcpy`'d into this ring, then queued from there.
///
/// Reuse: each staged copy records an event after it. Positions in the ring
/// count bytes since its creation and never wrap (the address is the position
/// modulo the size), so in-flight copies are ordered by position; before a
/// copy overwrites bytes, the copies that used them one lap earlier are waited
/// for (normally long complete: that is 16 MiB of uploads ago).
#[derive(Default)]
struct StagingRing {
    /// The pinned buffer, null until the first staged copy.
    base: Option<std::ptr::NonNull<u8>>,
    /// Where the next copy goes (a position, see above).
    head: u64,
    /// Staged copies not yet seen complete, oldest first: (position, event after it).
    in_flight: VecDeque<(u64, Event)>,
    /// Events of completed copies, recorded again by later ones.
    spare: Vec<Event>,
}

// SAFETY: the buffer is plain host memory and the events driver objects; the
// ring is used only under the device's mutex.
unsafe impl Send for StagingRing {}

/// Where a staged copy of `len` bytes (`0 < len <= capacity`) goes when the
/// ring's next free position is `head`: returns `(start, reuse_below)`. It
/// takes positions `start..start + len`, never straddling the end of the
/// buffer (a copy that would is moved to the buffer's start, skipping the
/// tail), and overwrites bytes that copies starting before `reuse_below` used,
/// so those must have completed first.
fn staging_reserve(head: u64, len: usize, capacity: usize) -> (u64, u64) {
    let (len, capacity) = (len as u64, capacity as u64);
    let at = head % capacity;
    let start = if at + len > capacity { head + (capacity - at) } else { head };
    (start, (start + len).saturating_sub(capacity))
}

impl StagingRing {
    /// Stages `src` and queues its copy to `dst` on `device`'s stream.
    fn copy(&mut self, device: &DeviceInner, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        let base = self.buffer()?;
        let (start, reuse_below) = staging_reserve(self.head, src.len(), STAGING_RING_BYTES);
        self.retire(reuse_below)?;
        let event = match self.spare.pop() {
            Some(e) => e,
            None => Event::new(EventFlags::DISABLE_TIMING).during("cuEventCreate")?,
        };
        // SAFETY: `start % size .. + len` lies inside the buffer (staging_reserve
        // never straddles its end) and no queued copy reads those bytes any more
        // (waited for above); the copy reads them before the event recorded next
        // completes, and nothing writes them again before that event is waited for.
        unsafe {
            let at = base.as_ptr().add((start % STAGING_RING_BYTES as u64) as usize);
            std::ptr::copy_nonoverlapping(src.as_ptr(), at, src.len());
            device.copy_from_host(dst, at, src.len())?;
        }
        self.head = start + src.len().next_multiple_of(STAGING_ALIGN) as u64;
        if let Err(e) = event.record(device.stream()).during("cuEventRecord") {
            // Without its event the region cannot be tracked: let the copy finish now.
            let _ = device.stream.synchronize();
            return Err(e);
        }
        self.in_flight.push_back((start, event));
        Ok(())
    }

    /// The pinned buffer, allocated on first use (the context is current).
    fn buffer(&mut self) -> Result<std::ptr::NonNull<u8>, CudaError> {
        if let Some(p) = self.base {
            return Ok(p);
        }
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the caller made the context current.
        unsafe { driver("cuMemAllocHost", cu::cuMemAllocHost_v2(&mut p, STAGING_RING_BYTES))? };
        let p = std::ptr::NonNull::new(p as *mut u8)
            .ok_or(CudaError::OutOfMemory { bytes: STAGING_RING_BYTES as u64 })?;
        self.base = Some(p);
        Ok(p)
    }

    /// Retires copies, oldest first, their events going to the spares: those
    /// starting before `reuse_below` are waited for; later ones are retired
    /// only while already complete (so the queue stays short).
    fn retire(&mut self, reuse_below: u64) -> Result<(), CudaError> {
        while let Some((at, event)) = self.in_flight.front() {
            if *at < reuse_below {
                event.synchronize().during("cuEventSynchronize")?;
            } else if event.query().during("cuEventQuery")? != EventStatus::Ready {
                break;
            }
            if let Some((_, event)) = self.in_flight.pop_front() {
                self.spare.push(event);
            }
        }
        Ok(())
    }
}

impl Drop for StagingRing {
    /// Runs inside `DeviceInner`'s drop, after the stream was synchronised and
    /// with the context current.
    fn drop(&mut self) {
        if let Some(p) = self.base.take() {
            // SAFETY: allocated by cuMemAllocHost, freed once, no copy pending.
            unsafe {
                let _ = cu::cuMemFreeHost(p.as_ptr() as *mut c_void);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_copies_fill_the_ring_in_order_and_skip_a_tail_they_would_straddle() {
        let cap = 1000;
        // The first lap overwrites nothing.
        assert_eq!(staging_reserve(0, 100, cap), (0, 0));
        assert_eq!(staging_reserve(900, 100, cap), (900, 0));
        // 950 + 100 would straddle the end: start over at the next lap.
        assert_eq!(staging_reserve(950, 100, cap), (1000, 100));
        // Later laps wait for the copies that used the same bytes a lap before.
        assert_eq!(staging_reserve(1100, 300, cap), (1100, 400));
        assert_eq!(staging_reserve(2999, 1, cap), (2999, 2000));
        // A copy of the whole ring waits for everything before it.
        assert_eq!(staging_reserve(1500, cap, cap), (2000, 2000));
    }
}
