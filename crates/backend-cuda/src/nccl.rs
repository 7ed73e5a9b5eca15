//! [`NcclComm`]: the [`Communicator`] of a tensor-parallel group on CUDA, one rank per GPU,
//! through NCCL (libnccl.so.2, loaded at the first communicator: see `nccl/library.rs`).
//!
//! **The all-reduce** is `ncclAllReduce` in place, summing bf16, f16 or f32, queued on the
//! backend's own stream like any other op: it is ordered with the kernels around it, returns
//! before it has run, and can be recorded into a CUDA graph with them (NCCL supports stream
//! capture; the backend captures in relaxed mode).
//!
//! **Forming a group.** Every rank calls [`NcclComm::join`] with its backend (the rank's GPU,
//! its context current on the calling thread) and a [`Rendezvous`], which says how rank 0's NCCL
//! unique id reaches the others:
//! - [`Rendezvous::local_group`]: ranks that are threads of one process (one per GPU, as the
//!   `pagoda` binary runs them): rank 0 hands the id over a channel.
//! - [`Rendezvous::tcp`]: ranks anywhere, each configured with the same `host:port`, its rank and
//!   the group size; rank 0 listens there, the others connect (`nccl/bootstrap.rs`). Several processes
//!   on one host, or several hosts, are configuration, nothing more (a host needs NCCL's own
//!   network settings, `NCCL_SOCKET_IFNAME` and so on, as for any NCCL program).
//!
//! `join` does not wait for the other ranks: the communicator is created non-blocking
//! (`ncclCommInitRankConfig` with `blocking = 0`), so it forms in the background while each rank
//! goes on (loading its shard, say); the first collective, or [`NcclComm::wait_ready`], waits
//! until it has, at most [`NcclOptions::timeout`]. So ranks may join in any order, and rank 0's
//! join may return before the other ranks have started.
//!
//! **Nothing hangs.** Because the communicator is non-blocking, no NCCL call blocks the calling
//! thread on a peer; where NCCL is still busy (`ncclInProgress`) the rank polls, with the
//! timeout, and notices an abort. [`Communicator::abort`] aborts every communicator of its
//! local group (`ncclCommAbort`, from whichever thread aborts), which also ends the NCCL kernels
//! a rank's stream is waiting in for a peer that will not come. Across processes, abort reaches
//! only the caller's own communicator; the peers see NCCL's errors (`ncclRemoteError`) where its
//! transport detects the loss, and a launcher should end the job when a rank exits. Errors name
//! the NCCL call, the rank and NCCL's own message (`ncclGetLastError`); an NCCL error or a
//! timeout also aborts the group, as NCCL asks (a communicator is unusable after an error).
//!
//! **Dropping** a communicator that was not aborted flushes it (`ncclCommFinalize`, waiting at
//! most [`DROP_TIMEOUT`] for its queued collectives) and frees it (`ncclCommDestroy`), and
//! aborts it if that does not finish in time; graphs that recorded its collectives must be
//! dropped first.
//!
//! NVLink multicast (NVLS) is NCCL's to choose from its environment: on machines shared with
//! others keep `NCCL_NVLS_ENABLE=0` set where the machine's policy asks for it.

mod bootstrap;
mod library;
mod sys;

use std::ffi::{c_void, CStr};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pagoda_backend::{BackendError, Communicator, DType, Tensor};
use thiserror::Error;

pub use bootstrap::{BootstrapError, IdServer, UniqueIdBytes, UNIQUE_ID_BYTES};
pub use library::{ENV_NCCL_LIBRARY, MIN_VERSION as MIN_NCCL_VERSION};

use crate::backend::tensor_ptr;
use crate::{CudaBackend, CudaError};
use library::{nccl, result_name, Nccl};

/// [`NcclOptions::timeout`]'s default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The longest a dropped communicator waits for its queued collectives before it is aborted.
pub const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a rank waits for the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NcclOptions {
    /// The longest a rank waits on the host: for rank 0's unique id, for the group to form (from
    /// the first time it is needed), and for NCCL to finish enqueueing one collective. The GPU's
    /// wait inside a collective is not bounded by it: that one ends when the peers join or the
    /// group is aborted.
    pub timeout: Duration,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self { timeout: DEFAULT_TIMEOUT }
    }
}

/// What went wrong making or using an NCCL communicator.
#[derive(Debug, Error)]
pub enum NcclError {
    /// libnccl.so.2 could not be loaded, or is too old; the message says where it was looked for.
    #[error("{0}")]
    Library(String),
    /// An NCCL call failed.
    #[error("NCCL {call} failed on rank {rank} of {world}: {name}{detail}")]
    Call {
        call: &'static str,
        rank: usize,
        world: usize,
        /// The `ncclResult_t`.
        code: u32,
        /// Its C name, with what it usually means.
        name: &'static str,
        /// `: ` and NCCL's own message for it, if it gave one.
        detail: String,
    },
    /// Rank 0's unique id did not reach this rank, or rank 0 could not hand it out.
    #[error("NCCL bootstrap: {0}")]
    Bootstrap(#[from] BootstrapError),
    /// The group did not form, or a collective was not enqueued, in time.
    #[error("NCCL: {0}")]
    Timeout(String),
    /// The group was aborted (by a rank, or after an error); the reason is the first abort's.
    #[error("the NCCL group is aborted ({0}); a new group is needed")]
    Aborted(String),
    /// The call does not fit this communicator (rank, group size, device).
    #[error("NCCL: {0}")]
    Config(String),
    /// A CUDA call around NCCL failed.
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

impl From<NcclError> for BackendError {
    fn from(e: NcclError) -> Self {
        match e {
            NcclError::Cuda(e) => e.into(),
            other => BackendError::Device(other.to_string()),
        }
    }
}

/// The number of CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES`).
pub fn device_count() -> Result<usize, CudaError> {
    use crate::error::DriverContext;
    cust::init(cust::CudaFlags::empty()).during("cuInit")?;
    Ok(cust::device::Device::num_devices().during("cuDeviceGetCount")? as usize)
}

/// How rank 0's unique id reaches the other ranks of a group, and which rank this is.
#[derive(Debug)]
pub struct Rendezvous {
    rank: usize,
    world: usize,
    how: How,
}

#[derive(Debug)]
enum How {
    /// Threads of this process.
    Local { group: Arc<GroupLink>, id: LocalId },
    /// Over TCP at this `host:port`.
    Tcp(String),
}

/// Rank 0's senders, or another rank's receiver, of the id (or of why rank 0 has none).
#[derive(Debug)]
enum LocalId {
    Root(Vec<SyncSender<Result<UniqueIdBytes, String>>>),
    Member(Receiver<Result<UniqueIdBytes, String>>),
}

impl Rendezvous {
    /// The ranks of a group of `world` threads of this process: give element `r` to the thread
    /// that joins as rank `r`. Their communicators abort together.
    pub fn local_group(world: usize) -> Vec<Rendezvous> {
        let group = GroupLink::new();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (1..world).map(|_| std::sync::mpsc::sync_channel(1)).unzip();
        let root = (world > 0).then(|| Rendezvous {
            rank: 0,
            world,
            how: How::Local { group: group.clone(), id: LocalId::Root(senders) },
        });
        root.into_iter()
            .chain(receivers.into_iter().enumerate().map(|(i, receiver)| Rendezvous {
                rank: i + 1,
                world,
                how: How::Local { group: group.clone(), id: LocalId::Member(receiver) },
            }))
            .collect()
    }

    /// Rank `rank` of a group of `world` that meets at `address` (`host:port`): rank 0 listens
    /// there (it must be one of rank 0's own addresses, with a free port), every other rank
    /// connects to it.
    pub fn tcp(address: impl Into<String>, rank: usize, world: usize) -> Rendezvous {
        Rendezvous { rank, world, how: How::Tcp(address.into()) }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }
}

/// One rank's handle on an NCCL communicator; see the [module docs](self).
pub struct NcclComm {
    rank: usize,
    world: usize,
    /// The CUDA device ordinal the communicator was made on.
    ordinal: i32,
    options: NcclOptions,
    nccl: &'static Nccl,
    cell: Arc<CommCell>,
    group: Arc<GroupLink>,
    /// Set once the communicator was seen formed.
    ready: AtomicBool,
    /// Rank 0 over TCP: handing the id out.
    server: Option<IdServer>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {} on GPU {}, {:?})", self.rank, self.world, self.ordinal, self.nccl)
    }
}

impl NcclComm {
    /// Joins the group `rendezvous` names, as its rank, on `backend`'s GPU (made current on this
    /// thread). Returns once the communicator is being created; it forms in the background
    /// ([`NcclComm::wait_ready`]). Rank 0 makes the unique id; another rank waits for it, at
    /// most `options.timeout`.
    pub fn join(
        backend: &CudaBackend,
        rendezvous: Rendezvous,
        options: NcclOptions,
    ) -> Result<Self, NcclError> {
        let Rendezvous { rank, world, how } = rendezvous;
        bootstrap::check_rank(rank, world)?;
        let nccl = nccl()?;
        let device = backend.device();
        device.bind()?;
        let ordinal = device.device.as_raw();
        let (group, id) = match how {
            How::Local { group, id } => (group, Self::local_id(nccl, rank, world, id, options)),
            How::Tcp(address) => (GroupLink::new(), Self::tcp_id(nccl, rank, world, &address, options)),
        };
        let joined = id.and_then(|(id, server)| Ok((init_rank(nccl, rank, world, &id)?, server)));
        let (raw, server) = match joined {
            Ok(joined) => joined,
            Err(e) => {
                // The ranks that joined would wait for this one: they fail instead.
                group.abort(format!("rank {rank} could not join: {e}"));
                return Err(e);
            }
        };
        let cell = Arc::new(CommCell { raw: Mutex::new(RawComm(raw)) });
        group.register(&cell, nccl);
        Ok(Self { rank, world, ordinal, options, nccl, cell, group, ready: AtomicBool::new(false), server })
    }

    /// The unique id within a process: rank 0 makes it and hands it to the others' channels.
    fn local_id(
        nccl: &Nccl,
        rank: usize,
        world: usize,
        id: LocalId,
        options: NcclOptions,
    ) -> Result<(UniqueIdBytes, Option<IdServer>), NcclError> {
        let from_root = match id {
            LocalId::Root(members) => {
                let id = unique_id(nccl, rank, world);
                for member in members {
                    // A member that is gone will not join; the others still get the id.
                    let _ = member.try_send(id.as_ref().map(|id| *id).map_err(|e| e.to_string()));
                }
                return Ok((id?, None));
            }
            LocalId::Member(from_root) => from_root,
        };
        let error = match from_root.recv_timeout(options.timeout) {
            Ok(Ok(id)) => return Ok((id, None)),
            Ok(Err(why)) => BootstrapError::Refused(format!("rank 0 made no unique id: {why}")),
            Err(RecvTimeoutError::Timeout) => BootstrapError::Timeout(format!(
                "rank {rank} of {world} got no unique id from rank 0 within {:?}",
                options.timeout
            )),
            Err(RecvTimeoutError::Disconnected) => {
                BootstrapError::Refused("rank 0 ended before it made the unique id (its start failed)".into())
            }
        };
        Err(error.into())
    }

    /// The unique id over TCP: rank 0 makes it and serves it at `address` (bound first, so a
    /// taken address fails before NCCL starts anything); the others fetch it from there.
    fn tcp_id(
        nccl: &Nccl,
        rank: usize,
        world: usize,
        address: &str,
        options: NcclOptions,
    ) -> Result<(UniqueIdBytes, Option<IdServer>), NcclError> {
        if rank > 0 {
            return Ok((bootstrap::fetch_id(address, rank, world, options.timeout)?, None));
        }
        let listener = if world > 1 { Some(bootstrap::bind(address)?) } else { None };
        let id = unique_id(nccl, rank, world)?;
        let server = listener.map(|l| IdServer::start(l, world, id, options.timeout)).transpose()?;
        Ok((id, server))
    }

    /// A group of one on `backend`'s GPU: every all-reduce is NCCL's identity.
    pub fn single(backend: &CudaBackend) -> Result<Self, NcclError> {
        let rendezvous = Rendezvous::local_group(1).pop().expect("a group of one has a rank");
        Self::join(backend, rendezvous, NcclOptions::default())
    }

    /// Waits, at most the timeout, until every rank has joined and the communicator is formed.
    /// Fails (and aborts the group) if it did not form in time, or NCCL failed forming it.
    pub fn wait_ready(&self) -> Result<(), NcclError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.settle("ncclCommInitRankConfig", |waited| {
            let server = match &self.server {
                Some(s) if s.outcome().is_none() => {
                    format!("; rank 0 is still waiting at {} for ranks to connect", s.address())
                }
                _ => String::new(),
            };
            format!(
                "rank {} of {}: the group did not form within {waited:?}: did every rank join, with the same \
                 rendezvous{server}?",
                self.rank, self.world
            )
        })?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// NCCL's version, as (major, minor, patch), and the file it was loaded from.
    pub fn library(&self) -> ((u32, u32, u32), &str) {
        (self.nccl.version, &self.nccl.path)
    }

    /// The CUDA device ordinal the communicator was made on.
    pub fn device_ordinal(&self) -> i32 {
        self.ordinal
    }

    /// In place: `tensor` becomes the sum over the ranks, queued on `backend`'s stream.
    fn all_reduce(&self, backend: &CudaBackend, tensor: &Tensor<CudaBackend>) -> Result<(), BackendError> {
        let dtype = match tensor.dtype() {
            DType::BF16 => sys::ncclBfloat16,
            DType::F16 => sys::ncclFloat16,
            DType::F32 => sys::ncclFloat32,
            other => return Err(BackendError::DType { op: "all_reduce_sum", dtype: other }),
        };
        let device = backend.device();
        let ordinal = device.device.as_raw();
        if ordinal != self.ordinal {
            return Err(NcclError::Config(format!(
                "all_reduce_sum on GPU {ordinal} with rank {}'s communicator, made on GPU {}",
                self.rank, self.ordinal
            ))
            .into());
        }
        let count = tensor.numel();
        if count == 0 {
            return Ok(());
        }
        device.bind().map_err(NcclError::from)?;
        self.wait_ready()?;
        let buffer = tensor_ptr(tensor) as *mut c_void;
        let stream = backend.raw_stream() as sys::cudaStream_t;
        let code = self.with_raw(|raw| {
            self.check_state(raw, "ncclAllReduce")?;
            // SAFETY: `buffer` holds `count` elements of `dtype` on this communicator's device
            // (checked above), in place; the stream belongs to the backend's context, current on
            // this thread; the communicator is live (under its lock).
            Ok(unsafe {
                self.nccl.api.ncclAllReduce(buffer, buffer, count, dtype, sys::ncclSum, raw, stream)
            })
        })?;
        match code {
            sys::ncclSuccess => Ok(()),
            sys::ncclInProgress => Ok(self.settle("ncclAllReduce", |waited| {
                format!(
                    "rank {} of {}: NCCL did not finish enqueueing an all-reduce within {waited:?}",
                    self.rank, self.world
                )
            })?),
            code => Err(self.fail("ncclAllReduce", code).into()),
        }
    }

    /// Runs `f` on the live communicator, under its lock (so no abort frees it meanwhile).
    fn with_raw<T>(&self, f: impl FnOnce(sys::ncclComm_t) -> Result<T, NcclError>) -> Result<T, NcclError> {
        let raw =
            self.cell.raw.lock().map_err(|_| NcclError::Aborted("a rank panicked aborting it".into()))?;
        if raw.0.is_null() {
            return Err(self.group.aborted_error());
        }
        f(raw.0)
    }

    /// The communicator's asynchronous state: `Ok(true)` if formed and idle, `Ok(false)` while
    /// NCCL is busy (`ncclInProgress`), else the error (the group then aborted).
    fn check_state(&self, raw: sys::ncclComm_t, call: &'static str) -> Result<bool, NcclError> {
        let mut state = sys::ncclSuccess;
        // SAFETY: `raw` is live (the caller holds its lock); a valid out-pointer.
        let r = unsafe { self.nccl.api.ncclCommGetAsyncError(raw, &mut state) };
        match (r, state) {
            (sys::ncclSuccess, sys::ncclSuccess) => Ok(true),
            (sys::ncclSuccess, sys::ncclInProgress) => Ok(false),
            (sys::ncclSuccess, code) => Err(self.fail_locked(raw, call, code)),
            (code, _) => Err(self.fail_locked(raw, "ncclCommGetAsyncError", code)),
        }
    }

    /// Polls until NCCL is no longer busy with this communicator, at most the timeout; a
    /// timeout, an error or an abort fails (`timed_out` words the timeout).
    fn settle(
        &self,
        call: &'static str,
        timed_out: impl FnOnce(Duration) -> String,
    ) -> Result<(), NcclError> {
        let started = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            if let Some(Err(e)) = self.server.as_ref().and_then(IdServer::outcome) {
                let e = NcclError::Bootstrap(e);
                self.group.abort(format!("rank 0 could not hand out the unique id: {e}"));
                return Err(e);
            }
            // The lock is taken per look, so an abort from another thread is never held up.
            match self.with_raw(|raw| self.check_state(raw, call)) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.group.abort_pending();
                    return Err(e);
                }
            }
            let waited = started.elapsed();
            if waited >= self.options.timeout {
                let why = timed_out(waited);
                self.group.abort(why.clone());
                return Err(NcclError::Timeout(why));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// The error of `call` returning `code`, with NCCL's message; aborts the group.
    fn fail(&self, call: &'static str, code: sys::ncclResult_t) -> NcclError {
        match self.cell.raw.lock() {
            Ok(raw) if !raw.0.is_null() => self.fail_locked(raw.0, call, code),
            _ => self.group.aborted_error(),
        }
    }

    /// [`Self::fail`] with the communicator's lock held (`raw` live). The group is aborted by
    /// the caller's caller once the lock is released: here only the error is made, and the
    /// abort is recorded to happen.
    fn fail_locked(&self, raw: sys::ncclComm_t, call: &'static str, code: sys::ncclResult_t) -> NcclError {
        let error = call_error(self.nccl, call, self.rank, self.world, code, raw);
        self.group.abort_later(error.to_string());
        error
    }
}

impl Communicator<CudaBackend> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(
        &self,
        backend: &CudaBackend,
        tensor: &Tensor<CudaBackend>,
    ) -> pagoda_backend::Result<()> {
        let result = self.all_reduce(backend, tensor);
        // An NCCL error recorded an abort under the communicator's lock; carry it out now.
        self.group.abort_pending();
        result
    }

    fn abort(&self) {
        self.group.abort(format!("rank {} aborted it", self.rank));
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.group.abort_pending();
        self.server.take();
        let raw = match self.cell.raw.lock() {
            Ok(mut raw) => std::mem::replace(&mut raw.0, std::ptr::null_mut()),
            Err(_) => return,
        };
        if raw.is_null() {
            return; // aborted
        }
        let api = &self.nccl.api;
        let flushed = !self.group.is_aborted() && self.flush(raw);
        // SAFETY: `raw` is live and, taken out of the cell, reached by no other thread; it is
        // freed exactly once.
        unsafe {
            let _ = if flushed { api.ncclCommDestroy(raw) } else { api.ncclCommAbort(raw) };
        }
    }
}

impl NcclComm {
    /// `ncclCommFinalize` on `raw` (taken out of the cell by `drop`), waiting at most
    /// [`DROP_TIMEOUT`] for it; whether it finished, with no abort meanwhile.
    fn flush(&self, raw: sys::ncclComm_t) -> bool {
        let api = &self.nccl.api;
        // SAFETY: `raw` is live and reached by this thread alone.
        let r = unsafe { api.ncclCommFinalize(raw) };
        if r != sys::ncclSuccess && r != sys::ncclInProgress {
            return false;
        }
        let deadline = Instant::now() + DROP_TIMEOUT.min(self.options.timeout);
        loop {
            let mut state = sys::ncclInProgress;
            // SAFETY: as above; a valid out-pointer.
            let r = unsafe { api.ncclCommGetAsyncError(raw, &mut state) };
            if r != sys::ncclSuccess || state != sys::ncclInProgress {
                return r == sys::ncclSuccess && state == sys::ncclSuccess && !self.group.is_aborted();
            }
            if Instant::now() >= deadline || self.group.is_aborted() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The raw communicator; null once aborted or freed.
#[derive(Debug)]
struct RawComm(sys::ncclComm_t);

// SAFETY: an ncclComm_t may be used from any thread; every use goes through the cell's mutex.
unsafe impl Send for RawComm {}

/// A communicator as its group reaches it.
#[derive(Debug)]
struct CommCell {
    raw: Mutex<RawComm>,
}

impl CommCell {
    /// `ncclCommAbort`, once: also ends NCCL kernels waiting on the GPU for a peer.
    fn abort(&self, nccl: &Nccl) {
        let Ok(mut raw) = self.raw.lock() else { return };
        let comm = std::mem::replace(&mut raw.0, std::ptr::null_mut());
        if !comm.is_null() {
            // SAFETY: live until now, freed once; no other NCCL call on it runs (the lock).
            unsafe {
                let _ = nccl.api.ncclCommAbort(comm);
            }
        }
    }
}

/// The communicators that abort together: a local group's, or one TCP rank's alone.
#[derive(Debug, Default)]
struct GroupLink {
    aborted: AtomicBool,
    /// Why, once aborted (the first reason).
    why: Mutex<Option<String>>,
    /// An abort asked for under a communicator's lock, carried out once it is released.
    pending: Mutex<Option<String>>,
    members: Mutex<Vec<(Weak<CommCell>, &'static Nccl)>>,
}

impl GroupLink {
    fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Adds a member; one that joins an aborted group is aborted at once.
    fn register(&self, cell: &Arc<CommCell>, nccl: &'static Nccl) {
        if let Ok(mut members) = self.members.lock() {
            members.retain(|(m, _)| m.strong_count() > 0);
            members.push((Arc::downgrade(cell), nccl));
        }
        if self.is_aborted() {
            cell.abort(nccl);
        }
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Aborts every member (first reason kept).
    fn abort(&self, why: String) {
        if let Ok(mut slot) = self.why.lock() {
            slot.get_or_insert(why);
        }
        self.aborted.store(true, Ordering::Release);
        let members: Vec<_> = match self.members.lock() {
            Ok(members) => members.iter().filter_map(|(m, nccl)| Some((m.upgrade()?, *nccl))).collect(),
            Err(_) => return,
        };
        for (member, nccl) in members {
            member.abort(nccl);
        }
    }

    /// Records an abort to carry out when no communicator lock is held.
    fn abort_later(&self, why: String) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.get_or_insert(why);
        }
    }

    /// Carries out an abort recorded by [`Self::abort_later`].
    fn abort_pending(&self) {
        let pending = self.pending.lock().ok().and_then(|mut p| p.take());
        if let Some(why) = pending {
            self.abort(why);
        }
    }

    fn aborted_error(&self) -> NcclError {
        let why = self.why.lock().ok().and_then(|w| w.clone());
        NcclError::Aborted(why.unwrap_or_else(|| "aborted".into()))
    }
}

/// Rank 0's new unique id.
fn unique_id(nccl: &Nccl, rank: usize, world: usize) -> Result<UniqueIdBytes, NcclError> {
    let mut id = sys::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: a valid out-pointer.
    let r = unsafe { nccl.api.ncclGetUniqueId(&mut id) };
    if r != sys::ncclSuccess {
        return Err(call_error(nccl, "ncclGetUniqueId", rank, world, r, std::ptr::null_mut()));
    }
    Ok(id.internal.map(|b| b as u8))
}

/// Starts creating rank `rank`'s communicator, non-blocking, on the current device.
fn init_rank(
    nccl: &Nccl,
    rank: usize,
    world: usize,
    id: &UniqueIdBytes,
) -> Result<sys::ncclComm_t, NcclError> {
    let mut config = MaybeUninit::<sys::ncclConfig_t>::uninit();
    // SAFETY: the shim writes a whole ncclConfig_t.
    let mut config = unsafe {
        sys::pagoda_nccl_config_nonblocking(config.as_mut_ptr());
        config.assume_init()
    };
    let id = sys::ncclUniqueId { internal: id.map(|b| b as _) };
    let mut raw: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: valid out-pointer and config; rank and world were checked to fit an int.
    let r = unsafe { nccl.api.ncclCommInitRankConfig(&mut raw, world as i32, id, rank as i32, &mut config) };
    if r == sys::ncclSuccess || r == sys::ncclInProgress {
        return Ok(raw);
    }
    let error = call_error(nccl, "ncclCommInitRankConfig", rank, world, r, raw);
    if !raw.is_null() {
        // SAFETY: the half-made communicator is freed once and not used again.
        unsafe {
            let _ = nccl.api.ncclCommAbort(raw);
        }
    }
    Err(error)
}

/// The error of `call` returning `code` on rank `rank`, with NCCL's message for it (the last
/// error on `raw`, if not null, else NCCL's text for the code).
fn call_error(
    nccl: &Nccl,
    call: &'static str,
    rank: usize,
    world: usize,
    code: sys::ncclResult_t,
    raw: sys::ncclComm_t,
) -> NcclError {
    // SAFETY: both return static or comm-owned NUL-terminated strings (or null), read at once.
    let message = unsafe {
        let last = nccl.api.ncclGetLastError(raw);
        let text = if last.is_null() || *last == 0 { nccl.api.ncclGetErrorString(code) } else { last };
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    make_call_error(call, rank, world, code, message)
}

fn make_call_error(
    call: &'static str,
    rank: usize,
    world: usize,
    code: sys::ncclResult_t,
    message: Option<String>,
) -> NcclError {
    let detail = match message.map(|m| m.trim().to_string()).filter(|m| !m.is_empty()) {
        Some(m) => format!(": {m} (NCCL_DEBUG=WARN or INFO says more)"),
        None => " (NCCL_DEBUG=WARN or INFO says more)".to_string(),
    };
    NcclError::Call { call, rank, world, code, name: result_name(code), detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_errors_become_device_errors_that_name_the_call_the_rank_and_ncclsays() {
        let e = make_call_error(
            "ncclAllReduce",
            1,
            4,
            sys::ncclRemoteError,
            Some("peer rank 3 closed its connection\n".into()),
        );
        let text = BackendError::from(e).to_string();
        assert!(
            text.starts_with("device error: NCCL ncclAllReduce failed on rank 1 of 4: ncclRemoteError"),
            "{text}"
        );
        assert!(text.contains("peer rank 3 closed its connection (NCCL_DEBUG"), "{text}");
        let e = make_call_error("ncclGetUniqueId", 0, 2, sys::ncclSystemError, None);
        assert!(e.to_string().contains("ncclSystemError") && e.to_string().contains("NCCL_DEBUG"), "{e}");
    }

    #[test]
    fn other_errors_keep_their_kind_through_the_backend_error() {
        let oom = NcclError::Cuda(CudaError::OutOfMemory { bytes: 64 });
        assert!(matches!(BackendError::from(oom), BackendError::OutOfMemory { bytes: 64 }));
        let aborted = BackendError::from(NcclError::Aborted("rank 2 aborted it".into())).to_string();
        assert!(aborted.contains("aborted (rank 2 aborted it); a new group is needed"), "{aborted}");
        let boot = NcclError::from(BootstrapError::Timeout("rank 1 of 2 found no rank 0".into()));
        assert_eq!(boot.to_string(), "NCCL bootstrap: rank 1 of 2 found no rank 0");
    }

    #[test]
    fn a_local_group_has_one_rendezvous_per_rank_in_order() {
        let group = Rendezvous::local_group(4);
        assert_eq!(group.iter().map(Rendezvous::rank).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert!(group.iter().all(|r| r.world_size() == 4));
        assert!(Rendezvous::local_group(0).is_empty());
        assert_eq!(Rendezvous::local_group(1).len(), 1);
        let tcp = Rendezvous::tcp("10.0.0.1:29500", 3, 8);
        assert_eq!((tcp.rank(), tcp.world_size()), (3, 8));
    }

    #[test]
    fn the_config_shim_asks_for_a_non_blocking_communicator() {
        let mut config = MaybeUninit::<sys::ncclConfig_t>::uninit();
        // SAFETY: the shim writes a whole ncclConfig_t.
        let config = unsafe {
            sys::pagoda_nccl_config_nonblocking(config.as_mut_ptr());
            config.assume_init()
        };
        assert_eq!(config.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!(config.magic, 0xcafe_beef);
        assert_eq!(config.version, sys::NCCL_VERSION_CODE);
        assert_eq!(config.blocking, 0);
        assert_eq!(config.minCTAs, i32::MIN, "the other options are left to NCCL");
    }

    #[test]
    fn a_group_aborts_every_member_once_with_the_first_reason() {
        let group = GroupLink::new();
        assert!(!group.is_aborted());
        group.abort_later("rank 1: ncclRemoteError".into());
        assert!(!group.is_aborted(), "only recorded");
        group.abort_pending();
        group.abort("rank 0 aborted it".into());
        assert!(group.is_aborted());
        let e = group.aborted_error().to_string();
        assert!(e.contains("(rank 1: ncclRemoteError)"), "{e}");
    }
}
