//! An in-process [`Communicator`]: the ranks of a tensor-parallel model are
//! threads of one process, one per rank, and an all-reduce meets in shared
//! memory. It is the reference the NCCL communicator is checked against and
//! what lets tensor-parallel correctness run in CI with no GPU.
//!
//! The sum is exact in the sense the tests need: every rank deposits its
//! tensor as f32, the last to arrive adds the deposits in rank order
//! `0, 1, .., N-1`, and every rank writes back that one result. So all ranks
//! get the same bits, whatever order the threads arrive in.
//!
//! Failure: a group is *broken* by [`Communicator::abort`], by dropping any
//! rank's handle (a rank that returned or panicked will never call again), or
//! by ranks calling with tensors of different sizes. Every rank waiting in a
//! collective that can no longer complete, and every later call, then gets
//! [`BackendError::Device`] naming the cause; a round that had completed is
//! still delivered. Waiting is on a condition variable, never a spin.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use pagoda_backend::{Backend, BackendError, Communicator, HostSlice, Result, Tensor};

/// The shared state of one group; each rank holds it through an [`InProcessComm`].
#[derive(Debug)]
pub struct InProcessGroup {
    world: usize,
    state: Mutex<Round>,
    changed: Condvar,
}

/// The collective in progress.
#[derive(Debug)]
struct Round {
    /// Counts completed rounds; a waiter knows its round is done when it moves.
    number: u64,
    /// Each rank's tensor for the round being collected.
    deposits: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// The last completed round's sum, until every rank has taken it (a rank
    /// that comes early for the next round waits for that).
    sum: Option<Arc<Vec<f32>>>,
    to_take: usize,
    broken: Option<String>,
}

impl InProcessGroup {
    /// A group of `world` ranks: handle `r` of the result is rank `r`. Give
    /// each to its own thread. (`world == 0` gives no ranks.)
    #[allow(clippy::new_ret_no_self)] // the group is only reached through its ranks
    pub fn new(world: usize) -> Vec<InProcessComm> {
        let group = Arc::new(InProcessGroup {
            world,
            state: Mutex::new(Round {
                number: 0,
                deposits: vec![None; world],
                arrived: 0,
                sum: None,
                to_take: 0,
                broken: None,
            }),
            changed: Condvar::new(),
        });
        (0..world).map(|rank| InProcessComm { group: group.clone(), rank }).collect()
    }

    /// The state, or the reason the group is unusable: a thread that panicked
    /// holding the lock may have left a round half-summed.
    fn lock(&self) -> std::result::Result<MutexGuard<'_, Round>, String> {
        self.state.lock().map_err(|_| "a rank panicked inside a collective".to_string())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Round>) -> std::result::Result<MutexGuard<'a, Round>, String> {
        self.changed.wait(guard).map_err(|_| "a rank panicked inside a collective".to_string())
    }

    fn break_with(&self, round: &mut Round, why: String) {
        round.broken.get_or_insert(why);
        self.changed.notify_all();
    }

    /// Deposits `values` for `rank`, waits for the round to complete and
    /// returns its sum.
    fn all_reduce(&self, rank: usize, values: Vec<f32>) -> std::result::Result<Arc<Vec<f32>>, String> {
        let mut round = self.lock()?;
        while round.broken.is_none() && round.to_take > 0 {
            round = self.wait(round)?;
        }
        if let Some(why) = &round.broken {
            return Err(why.clone());
        }
        if round.deposits[rank].is_some() {
            // Two threads on one rank's handle: the rounds would no longer pair up.
            let why = format!("rank {rank} entered one all-reduce twice");
            self.break_with(&mut round, why.clone());
            return Err(why);
        }
        if let Some((other, len)) =
            round.deposits.iter().enumerate().find_map(|(r, d)| d.as_ref().map(|d| (r, d.len())))
        {
            if len != values.len() {
                let why = format!(
                    "rank {rank} reduces {} elements but rank {other} {len} (the ranks' calls do not match)",
                    values.len()
                );
                self.break_with(&mut round, why.clone());
                return Err(why);
            }
        }
        round.deposits[rank] = Some(values);
        round.arrived += 1;
        let number = round.number;
        if round.arrived == self.world {
            // The last to arrive sums, in rank order, so the bits do not depend
            // on which thread that is.
            let mut deposits = round.deposits.iter_mut().map(|d| d.take().unwrap_or_default());
            let mut sum = deposits.next().unwrap_or_default();
            for d in deposits {
                for (s, x) in sum.iter_mut().zip(&d) {
                    *s += x;
                }
            }
            round.sum = Some(Arc::new(sum));
            round.to_take = self.world;
            round.arrived = 0;
            round.number += 1;
            self.changed.notify_all();
        } else {
            while round.number == number {
                if let Some(why) = &round.broken {
                    return Err(why.clone());
                }
                round = self.wait(round)?;
            }
        }
        // Completed (possibly broken since, but this round's sum stands).
        let sum = round.sum.clone().ok_or("the completed round's sum is missing")?;
        round.to_take -= 1;
        if round.to_take == 0 {
            round.sum = None;
            self.changed.notify_all();
        }
        Ok(sum)
    }
}

/// One rank of an [`InProcessGroup`]. Dropping it breaks the group (see the
/// module docs), so a rank that fails or ends releases the others.
#[derive(Debug)]
pub struct InProcessComm {
    group: Arc<InProcessGroup>,
    rank: usize,
}

impl InProcessComm {
    fn error(&self, why: String) -> BackendError {
        BackendError::Device(format!("all_reduce_sum on rank {} of {}: {why}", self.rank, self.group.world))
    }

    fn break_group(&self, why: String) {
        // A lock poisoned by a panic already breaks every later call.
        if let Ok(mut round) = self.group.lock() {
            self.group.break_with(&mut round, why);
        }
    }
}

/// Through host copies, so it serves any backend: the CPU reference (where it
/// is exact f32 arithmetic) and, for tests, several ranks on one device.
impl<B: Backend> Communicator<B> for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, backend: &B, tensor: &Tensor<B>) -> Result<()> {
        if !tensor.dtype().is_float() {
            // Fail every rank rather than leave the others waiting for this one.
            let why = format!("rank {} passed a {:?} tensor (float only)", self.rank, tensor.dtype());
            self.break_group(why.clone());
            return Err(self.error(why));
        }
        let values = match backend.download_f32(tensor) {
            Ok(v) => v,
            Err(e) => {
                self.break_group(format!("rank {} could not read its tensor: {e}", self.rank));
                return Err(e);
            }
        };
        let sum = self.group.all_reduce(self.rank, values).map_err(|why| self.error(why))?;
        backend.write(tensor, HostSlice::F32(&sum))
    }

    fn abort(&self) {
        self.break_group(format!("rank {} aborted the group", self.rank));
    }
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        self.break_group(format!("rank {} left the group", self.rank));
    }
}

#[cfg(test)]
mod tests {
    use std::thread;
    use std::time::Duration;

    use pagoda_backend::DType;

    use super::*;
    use crate::CpuBackend;

    /// Values whose f32 sum depends on the order of addition: large and small
    /// magnitudes mixed, so a timing-dependent order would show up in the bits.
    fn rank_values(rank: usize, round: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = ((rank * 7919 + round * 104_729 + i * 31) % 1000) as f32;
                if (i + rank) % 3 == 0 {
                    x * 1.0e7
                } else {
                    x * 1.0e-3 + 0.1
                }
            })
            .collect()
    }

    fn expected_sum(world: usize, round: usize, len: usize) -> Vec<f32> {
        let mut sum = rank_values(0, round, len);
        for r in 1..world {
            for (s, x) in sum.iter_mut().zip(rank_values(r, round, len)) {
                *s += x;
            }
        }
        sum
    }

    #[test]
    fn every_rank_gets_the_rank_ordered_sum_bit_for_bit_over_many_rounds() {
        for world in [1, 2, 3, 4] {
            let results: Vec<Vec<Vec<u32>>> = thread::scope(|s| {
                let handles: Vec<_> = InProcessGroup::new(world)
                    .into_iter()
                    .map(|comm| {
                        s.spawn(move || {
                            let cpu = CpuBackend::new();
                            (0..200)
                                .map(|round| {
                                    // Vary the arrival order from round to round.
                                    if (round + comm.rank) % 5 == 0 {
                                        thread::yield_now();
                                    }
                                    let len = 1 + round % 17;
                                    let data = rank_values(comm.rank, round, len);
                                    let t = cpu.upload(HostSlice::F32(&data), &[len], DType::F32).unwrap();
                                    comm.all_reduce_sum(&cpu, &t).unwrap();
                                    cpu.download_f32(&t).unwrap().iter().map(|x| x.to_bits()).collect()
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (rank, rounds) in results.iter().enumerate() {
                for (round, got) in rounds.iter().enumerate() {
                    let want: Vec<u32> =
                        expected_sum(world, round, 1 + round % 17).iter().map(|x| x.to_bits()).collect();
                    assert_eq!(got, &want, "world {world}, rank {rank}, round {round}");
                }
            }
        }
    }

    #[test]
    fn a_view_is_reduced_in_place_and_the_rest_left_alone() {
        let comms = InProcessGroup::new(2);
        thread::scope(|s| {
            for comm in comms {
                s.spawn(move || {
                    let cpu = CpuBackend::new();
                    let t = cpu.upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0]), &[2, 2], DType::F32).unwrap();
                    comm.all_reduce_sum(&cpu, &t.narrow(1, 1).unwrap()).unwrap();
                    assert_eq!(cpu.download_f32(&t).unwrap(), [1.0, 2.0, 6.0, 8.0]);
                });
            }
        });
    }

    #[test]
    fn a_rank_that_leaves_releases_the_waiting_ranks_with_an_error() {
        let mut comms = InProcessGroup::new(3);
        let leaver = comms.pop().unwrap();
        let errors: Vec<String> = thread::scope(|s| {
            let waiting: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let cpu = CpuBackend::new();
                        let t = cpu.upload(HostSlice::F32(&[1.0]), &[1], DType::F32).unwrap();
                        let first = comm.all_reduce_sum(&cpu, &t).unwrap_err().to_string();
                        // Later calls fail at once too.
                        assert!(comm.all_reduce_sum(&cpu, &t).is_err());
                        first
                    })
                })
                .collect();
            thread::sleep(Duration::from_millis(20));
            drop(leaver); // as a rank's thread does when its step fails
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errors {
            assert!(e.contains("rank 2 left the group"), "{e}");
        }
    }

    #[test]
    fn abort_and_mismatched_sizes_break_the_group_for_everyone() {
        let comms = InProcessGroup::new(2);
        let cpu = CpuBackend::new();
        let t = cpu.upload(HostSlice::F32(&[1.0]), &[1], DType::F32).unwrap();
        Communicator::<CpuBackend>::abort(&comms[0]);
        let e = comms[1].all_reduce_sum(&cpu, &t).unwrap_err().to_string();
        assert!(e.contains("rank 0 aborted"), "{e}");

        let errors: Vec<String> = thread::scope(|s| {
            let handles: Vec<_> = InProcessGroup::new(2)
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let cpu = CpuBackend::new();
                        let len = 1 + comm.rank;
                        let t = cpu.upload(HostSlice::F32(&vec![1.0; len]), &[len], DType::F32).unwrap();
                        let e = comm.all_reduce_sum(&cpu, &t).unwrap_err().to_string();
                        // Keep the handle alive until both have failed, so the
                        // error seen is the mismatch, not a departure.
                        thread::sleep(Duration::from_millis(20));
                        e
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in errors {
            assert!(e.contains("do not match"), "{e}");
        }
    }

    #[test]
    fn the_last_round_is_delivered_even_if_a_rank_leaves_right_after() {
        for _ in 0..50 {
            let sums: Vec<f32> = thread::scope(|s| {
                let handles: Vec<_> = InProcessGroup::new(2)
                    .into_iter()
                    .map(|comm| {
                        s.spawn(move || {
                            let cpu = CpuBackend::new();
                            let t = cpu.upload(HostSlice::F32(&[1.5]), &[1], DType::F32).unwrap();
                            comm.all_reduce_sum(&cpu, &t).unwrap();
                            // `comm` drops here, possibly before the other rank has read the sum.
                            cpu.download_f32(&t).unwrap()[0]
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(sums, [3.0, 3.0]);
        }
    }

    #[test]
    fn a_group_of_one_is_the_identity_and_integer_tensors_are_refused() {
        let comm = InProcessGroup::new(1).pop().unwrap();
        let cpu = CpuBackend::new();
        let t = cpu.upload(HostSlice::F32(&[1.0, -2.0]), &[2], DType::F32).unwrap();
        comm.all_reduce_sum(&cpu, &t).unwrap();
        assert_eq!(cpu.download_f32(&t).unwrap(), [1.0, -2.0]);
        let ids = cpu.upload(HostSlice::I32(&[1]), &[1], DType::I32).unwrap();
        assert!(comm.all_reduce_sum(&cpu, &ids).is_err());
        assert!(InProcessGroup::new(0).is_empty());
    }
}
