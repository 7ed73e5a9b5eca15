//! The NCCL communicator on GPUs: a group of one (any GPU machine), then groups of every
//! rank on its own GPU and thread (skipped, saying so, where fewer GPUs are visible).
//!
//! Needs libnccl.so.2 where the loader or `PAGODA_NCCL_LIBRARY` finds it (on the GPU machine:
//! pip's nvidia-nccl-cu13 beside PyTorch; `scripts/gpu/session.sh nccl` sets the path), and
//! `NCCL_NVLS_ENABLE=0` where the machine asks for it. Run with `--test-threads=1`: groups of
//! different tests on the same GPUs must not interleave their collectives (each test also takes
//! a process-wide lock).
//!
//! - one rank: the all-reduce is the identity for bf16, f16 and f32, eager and replayed from a
//!   CUDA graph with kernels around it; refusals (dtype, empty tensors); a group whose second
//!   rank never joins times out and aborts instead of hanging; a rank whose rank 0 ended gets
//!   a clear error;
//! - every visible GPU (2 or more): exact sums of each dtype; the same from graphs that every
//!   rank recorded, replayed with new inputs; the TCP bootstrap over localhost; an abort by one
//!   rank releases another waiting on the GPU in a collective the first never joined; a
//!   backend on another GPU than the communicator's is refused;
//! - `all_reduce_bus_bandwidth` (ignored; `--ignored --nocapture`): NCCL's bus bandwidth of an
//!   in-place bf16 all-reduce from 1 MiB to 1 GiB over every visible GPU, as nccl-tests
//!   reports it (algorithm bandwidth x 2(n-1)/n).
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pagoda_backend::{Backend, BackendError, Communicator, DType, HostSlice, Tensor};
use pagoda_backend_cuda::nccl::{NcclComm, NcclOptions, Rendezvous};
use pagoda_backend_cuda::{device_count, CudaBackend};

/// One test's groups at a time, whatever the harness's thread count.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn gpu(ordinal: u32) -> CudaBackend {
    CudaBackend::new(ordinal).unwrap_or_else(|e| panic!("these tests need CUDA GPU {ordinal}: {e}"))
}

/// The visible GPUs, or `None` (with the reason printed) when fewer than `need`.
fn gpus_at_least(need: usize, test: &str) -> Option<usize> {
    let n = device_count().expect("a CUDA driver");
    if n < need {
        eprintln!("skipped {test}: needs {need} GPUs, {n} visible");
        return None;
    }
    Some(n)
}

fn quick() -> NcclOptions {
    NcclOptions { timeout: Duration::from_secs(60) }
}

/// Small integers, exact in bf16, f16 and f32 and in their sums over 8 ranks.
fn pattern(n: usize, rank: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank * 3) % 29) as f32 - 14.0).collect()
}

/// `run(rank, world, backend, comm)` on one thread per rank, rank r on GPU r, the group formed
/// through `rendezvous`; returns what each rank returned, in rank order. A rank that does not
/// finish within `limit` fails the test (instead of hanging it).
fn on_every_gpu<T: Send + 'static>(
    rendezvous: Vec<Rendezvous>,
    limit: Duration,
    run: impl Fn(usize, usize, &CudaBackend, &NcclComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let world = rendezvous.len();
    let run = Arc::new(run);
    let (done_tx, done_rx) = mpsc::channel();
    for rendezvous in rendezvous {
        let (run, done) = (run.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let rank = rendezvous.rank();
            let backend = gpu(rank as u32);
            let comm = NcclComm::join(&backend, rendezvous, quick()).expect("join");
            let out = run(rank, world, &backend, &comm);
            // (After an abort the stream has drained; its outcome is the test's to judge.)
            let _ = backend.synchronize();
            let _ = done.send((rank, out));
        });
    }
    drop(done_tx);
    let deadline = Instant::now() + limit;
    let mut outs: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok((rank, out)) => outs[rank] = Some(out),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("a rank did not finish within {limit:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a rank panicked (see above)"),
        }
    }
    outs.into_iter().map(|o| o.expect("every rank answered")).collect()
}

// ---- one rank --------------------------------------------------------------------------------

#[test]
fn a_group_of_one_all_reduces_to_itself_in_every_dtype() {
    let _serial = serial();
    let g = gpu(0);
    let comm = NcclComm::single(&g).unwrap();
    assert_eq!((comm.rank(), comm.world_size(), comm.device_ordinal()), (0, 1, 0));
    let ((major, minor, _), path) = comm.library();
    println!("NCCL {major}.{minor} from {path}");
    comm.wait_ready().unwrap();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let values = pattern(1000, 0);
        let x = g.upload(HostSlice::F32(&values), &[10, 100], dtype).unwrap();
        comm.all_reduce_sum(&g, &x).unwrap();
        assert_eq!(g.download_f32(&x).unwrap(), values, "{dtype:?}");
        // A view (offset into its storage) reduces only its own elements.
        let row = x.narrow(3, 2).unwrap();
        comm.all_reduce_sum(&g, &row).unwrap();
        assert_eq!(g.download_f32(&x).unwrap(), values, "{dtype:?} view");
    }
}

#[test]
fn a_group_of_one_refuses_what_nccl_cannot_sum() {
    let _serial = serial();
    let g = gpu(0);
    let comm = NcclComm::single(&g).unwrap();
    let ids = g.upload(HostSlice::I32(&[1, 2, 3]), &[3], DType::I32).unwrap();
    assert!(matches!(comm.all_reduce_sum(&g, &ids), Err(BackendError::DType { dtype: DType::I32, .. })));
    let empty = g.alloc(&[0, 64], DType::BF16).unwrap();
    comm.all_reduce_sum(&g, &empty).unwrap();
    // The communicator is still usable after a refusal.
    let x = g.upload(HostSlice::F32(&[1.0, 2.0]), &[2], DType::F32).unwrap();
    comm.all_reduce_sum(&g, &x).unwrap();
    assert_eq!(g.download_f32(&x).unwrap(), [1.0, 2.0]);
}

/// The all-reduce recorded in a CUDA graph between two copies, replayed over new inputs.
#[test]
fn a_group_of_one_all_reduces_inside_a_captured_graph() {
    let _serial = serial();
    let g = gpu(0);
    let comm = NcclComm::single(&g).unwrap();
    let n = 4096;
    let src = g.alloc(&[n], DType::BF16).unwrap();
    let x = g.alloc(&[n], DType::BF16).unwrap();
    let out = g.alloc(&[n], DType::BF16).unwrap();
    let step = |g: &CudaBackend| -> pagoda_backend::Result<()> {
        g.copy(&src, &x)?;
        comm.all_reduce_sum(g, &x)?;
        g.copy(&x, &out)
    };
    // Eager first (as the engine does before recording), then recorded.
    g.write(&src, HostSlice::F32(&pattern(n, 0))).unwrap();
    step(&g).unwrap();
    assert_eq!(g.download_f32(&out).unwrap(), pattern(n, 0));
    let graph = g.capture(&mut || step(&g)).unwrap();
    for round in 1..4 {
        let values = pattern(n, round);
        g.write(&src, HostSlice::F32(&values)).unwrap();
        g.replay(&graph).unwrap();
        assert_eq!(g.download_f32(&out).unwrap(), values, "replay {round}");
    }
    drop(graph); // before the communicator its nodes use
}

#[test]
fn a_group_whose_other_rank_never_joins_times_out_and_stays_aborted() {
    let _serial = serial();
    let g = gpu(0);
    let mut group = Rendezvous::local_group(2);
    let absent = group.pop().unwrap(); // rank 1: never joins
    let options = NcclOptions { timeout: Duration::from_secs(3) };
    let comm = NcclComm::join(&g, group.pop().unwrap(), options).unwrap();
    let started = Instant::now();
    let e = comm.wait_ready().unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert!(e.contains("rank 0 of 2") && e.contains("did not form"), "{e}");
    let x = g.upload(HostSlice::F32(&[1.0]), &[1], DType::F32).unwrap();
    let e = comm.all_reduce_sum(&g, &x).unwrap_err().to_string();
    assert!(e.contains("aborted") && e.contains("did not form"), "{e}");
    drop(absent);
    drop(comm);
    // The device is still usable.
    assert_eq!(g.download_f32(&x).unwrap(), [1.0]);
}

#[test]
fn a_rank_whose_rank_0_ended_says_so() {
    let _serial = serial();
    let g = gpu(0);
    let mut group = Rendezvous::local_group(2);
    let member = group.pop().unwrap();
    drop(group); // rank 0's start failed before it made the id
    let e = NcclComm::join(&g, member, quick()).unwrap_err().to_string();
    assert!(e.contains("rank 0 ended before it made the unique id"), "{e}");
    let e = NcclComm::join(&g, Rendezvous::tcp("127.0.0.1:1", 2, 2), quick()).unwrap_err().to_string();
    assert!(e.contains("rank 2 is not in a group of 2"), "{e}");
}

// ---- every visible GPU -----------------------------------------------------------------------

#[test]
fn every_gpu_gets_the_exact_sum_in_every_dtype() {
    let _serial = serial();
    let Some(world) = gpus_at_least(2, "every_gpu_gets_the_exact_sum_in_every_dtype") else { return };
    let n = 3 * 1024 + 5; // not a multiple of anything NCCL chunks by
    let want: Vec<f32> = (0..n).map(|i| (0..world).map(|r| pattern(n, r)[i]).sum()).collect();
    let got =
        on_every_gpu(Rendezvous::local_group(world), Duration::from_secs(120), move |rank, _, g, comm| {
            [DType::BF16, DType::F16, DType::F32]
                .map(|dtype| {
                    let x = g.upload(HostSlice::F32(&pattern(n, rank)), &[n], dtype).unwrap();
                    comm.all_reduce_sum(g, &x).unwrap();
                    g.download_f32(&x).unwrap()
                })
                .to_vec()
        });
    for (rank, sums) in got.iter().enumerate() {
        for (sum, dtype) in sums.iter().zip(["bf16", "f16", "f32"]) {
            assert!(sum == &want, "rank {rank} of {world}, {dtype}: not the exact sum");
        }
    }
}

#[test]
fn every_gpu_replays_the_all_reduce_it_recorded() {
    let _serial = serial();
    let Some(world) = gpus_at_least(2, "every_gpu_replays_the_all_reduce_it_recorded") else { return };
    let n = 8192;
    let rounds = 4;
    let got =
        on_every_gpu(Rendezvous::local_group(world), Duration::from_secs(120), move |rank, _, g, comm| {
            // f32: the second sum (up to 8 x 112) is exact there, not in bf16.
            let src = g.alloc(&[n], DType::F32).unwrap();
            let x = g.alloc(&[n], DType::F32).unwrap();
            let step = || -> pagoda_backend::Result<()> {
                g.copy(&src, &x)?;
                comm.all_reduce_sum(g, &x)?;
                comm.all_reduce_sum(g, &x) // twice: the sum times the group size
            };
            g.write(&src, HostSlice::F32(&pattern(n, rank))).unwrap();
            step().unwrap(); // eager first: every rank connects before recording
            let mut outs = vec![g.download_f32(&x).unwrap()];
            // Every rank records the same sequence, so replays meet.
            let graph = g.capture(&mut || step()).unwrap();
            for round in 1..rounds {
                g.write(&src, HostSlice::F32(&pattern(n, rank + round * world))).unwrap();
                g.replay(&graph).unwrap();
                outs.push(g.download_f32(&x).unwrap());
            }
            drop(graph);
            outs
        });
    for round in 0..rounds {
        let want: Vec<f32> = (0..n)
            .map(|i| world as f32 * (0..world).map(|r| pattern(n, r + round * world)[i]).sum::<f32>())
            .collect();
        for (rank, outs) in got.iter().enumerate() {
            assert!(outs[round] == want, "rank {rank}, round {round} (0: eager, then replays): wrong sum");
        }
    }
}

#[test]
fn every_gpu_forms_the_group_over_tcp() {
    let _serial = serial();
    let Some(world) = gpus_at_least(2, "every_gpu_forms_the_group_over_tcp") else { return };
    let address = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let rendezvous = (0..world).map(|rank| Rendezvous::tcp(address.clone(), rank, world)).collect();
    let n = 1000;
    let want: Vec<f32> = (0..n).map(|i| (0..world).map(|r| pattern(n, r)[i]).sum()).collect();
    let got = on_every_gpu(rendezvous, Duration::from_secs(120), move |rank, _, g, comm| {
        let x = g.upload(HostSlice::F32(&pattern(n, rank)), &[n], DType::F32).unwrap();
        comm.all_reduce_sum(g, &x).unwrap();
        g.download_f32(&x).unwrap()
    });
    assert!(got.iter().all(|sum| sum == &want), "a rank got another sum");
}

/// Rank 1 never joins rank 0's all-reduce and aborts instead: rank 0, waiting on its GPU for
/// it, is released (its stream drains), and every later collective fails on both.
#[test]
fn an_abort_releases_a_rank_waiting_on_the_gpu() {
    let _serial = serial();
    let Some(_) = gpus_at_least(2, "an_abort_releases_a_rank_waiting_on_the_gpu") else { return };
    let world = 2;
    let barrier = Arc::new(Barrier::new(world));
    let got =
        on_every_gpu(Rendezvous::local_group(world), Duration::from_secs(120), move |rank, _, g, comm| {
            let x = g.upload(HostSlice::F32(&[1.0; 64]), &[64], DType::F32).unwrap();
            comm.all_reduce_sum(g, &x).unwrap(); // the group formed, both connected
            g.synchronize().unwrap();
            barrier.wait();
            let outcome = if rank == 0 {
                // Queued: it waits on the GPU for rank 1, which never comes.
                comm.all_reduce_sum(g, &x).unwrap();
                let started = Instant::now();
                let _ = g.synchronize(); // returns once rank 1's abort ended the kernel
                format!("released after {:?}", started.elapsed())
            } else {
                std::thread::sleep(Duration::from_secs(2));
                comm.abort();
                "aborted".to_string()
            };
            let later = comm.all_reduce_sum(g, &x).unwrap_err().to_string();
            assert!(later.contains("aborted (rank 1 aborted it)"), "rank {rank}: {later}");
            outcome
        });
    println!("{got:?}");
}

#[test]
fn a_backend_on_another_gpu_is_refused() {
    let _serial = serial();
    let Some(_) = gpus_at_least(2, "a_backend_on_another_gpu_is_refused") else { return };
    let g0 = gpu(0);
    let g1 = gpu(1);
    let comm = NcclComm::single(&g0).unwrap();
    let x: Tensor<CudaBackend> = g1.upload(HostSlice::F32(&[1.0]), &[1], DType::F32).unwrap();
    let e = comm.all_reduce_sum(&g1, &x).unwrap_err().to_string();
    assert!(e.contains("on GPU 1 with rank 0's communicator, made on GPU 0"), "{e}");
}

/// NCCL's bus bandwidth inside this backend, for the comparison with NCCL's own figure
/// (nccl-tests' all_reduce_perf) on the same machine.
#[test]
#[ignore]
fn all_reduce_bus_bandwidth() {
    let _serial = serial();
    let Some(world) = gpus_at_least(2, "all_reduce_bus_bandwidth") else { return };
    let sizes: Vec<usize> = (20..=30).step_by(2).map(|p| 1usize << p).collect(); // bytes
    let times =
        on_every_gpu(Rendezvous::local_group(world), Duration::from_secs(300), move |_, _, g, comm| {
            sizes
                .iter()
                .map(|&bytes| {
                    let x = g.alloc(&[bytes / 2], DType::BF16).unwrap();
                    g.fill(&x, 0.0).unwrap();
                    for _ in 0..5 {
                        comm.all_reduce_sum(g, &x).unwrap();
                    }
                    let iters = 20;
                    let ms = g
                        .time_ms(|| {
                            for _ in 0..iters {
                                comm.all_reduce_sum(g, &x)?;
                            }
                            Ok(())
                        })
                        .unwrap();
                    (bytes, ms as f64 / iters as f64)
                })
                .collect::<Vec<_>>()
        });
    println!("in-place bf16 all-reduce over {world} GPUs (slowest rank):");
    for i in 0..times[0].len() {
        let bytes = times[0][i].0;
        let ms = times.iter().map(|t| t[i].1).fold(0.0, f64::max);
        let algbw = bytes as f64 / (ms * 1e-3) / 1e9;
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        println!("  {:>5} MiB: {ms:8.3} ms  algbw {algbw:7.1} GB/s  busbw {busbw:7.1} GB/s", bytes >> 20);
    }
}
