//! NCCL's unique id, from rank 0 to every other rank of a group, over TCP.
//!
//! Every rank of an NCCL communicator starts from the same 128-byte unique id, which rank 0
//! makes (`ncclGetUniqueId`: it names the address NCCL's own bootstrap listens at). NCCL leaves
//! handing it out to the application; this does it over one TCP address, `host:port`, that every
//! rank is configured with, so ranks in several processes or on several hosts need nothing else.
//!
//! - Rank 0 binds the address ([`IdServer::start`]: a taken port fails there) and serves from a
//!   thread of its own, so rank 0 goes on to create its communicator at once (in one process, the
//!   other ranks may only start after rank 0's start returned).
//! - Every other rank connects ([`fetch_id`]), retrying while nobody listens yet, and says which
//!   rank of which group size it is. Rank 0 answers nobody until every rank `1..world` has
//!   connected and agreed on the group size, then sends each the id; so a wrong configuration (a
//!   different group size, a rank given twice) is an error on every rank that reached rank 0,
//!   before any of them waits inside NCCL.
//! - Everything has a deadline: a rank waits at most its timeout for rank 0, rank 0 at most its
//!   own for the others (then tells those that came which ranks never did). Nothing blocks
//!   without one. A connection that does not speak this protocol (a port scanner, say) is
//!   dropped and does not count.
//!
//! The wire format (little endian): the rank sends `MAGIC`, the group size (u32) and its rank
//! (u32); rank 0 answers `0` and the 128 id bytes, or `1`, a length (u32) and a UTF-8 message
//! saying why not.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`; checked against nccl.h in `nccl.rs`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// An NCCL unique id as bytes.
pub type UniqueIdBytes = [u8; UNIQUE_ID_BYTES];

/// Opens every hello, so a stray connection is told apart from a rank (version 1 of the protocol).
const MAGIC: [u8; 8] = *b"PGDNCCL1";
const HELLO_BYTES: usize = 16;
const REPLY_ID: u8 = 0;
const REPLY_REFUSED: u8 = 1;
/// The longest refusal message read (a longer one is cut).
const MAX_MESSAGE: usize = 4096;
/// How long rank 0 waits for one connection's hello before dropping it.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Rank 0's pause between looks for a new connection.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// A rank's pause between tries to reach rank 0.
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// The longest one connection attempt may take.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);

/// Why the unique id did not reach a rank.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum BootstrapError {
    /// The rank, the group size or the address is unusable as given.
    #[error("{0}")]
    Config(String),
    /// A deadline passed; the message says who waited for whom.
    #[error("{0}")]
    Timeout(String),
    /// Rank 0 refused this rank, or gave up on the group; its message says why.
    #[error("rank 0 refused: {0}")]
    Refused(String),
    /// The group's configuration disagrees between ranks (seen by rank 0).
    #[error("{0}")]
    Mismatch(String),
    /// A socket call failed.
    #[error("{0}")]
    Io(String),
    /// The serving rank stopped before it was done (its communicator was aborted or dropped).
    #[error("rank 0 stopped serving the NCCL unique id")]
    Stopped,
}

/// Checks a rank's place in a group.
pub fn check_rank(rank: usize, world: usize) -> Result<(), BootstrapError> {
    if world == 0 {
        return Err(BootstrapError::Config("a group needs at least one rank".into()));
    }
    if rank >= world {
        return Err(BootstrapError::Config(format!(
            "rank {rank} is not in a group of {world} (ranks 0..{world})"
        )));
    }
    if u32::try_from(world).is_err() || i32::try_from(world).is_err() {
        return Err(BootstrapError::Config(format!("a group of {world} ranks is more than NCCL counts")));
    }
    Ok(())
}

/// The socket addresses `address` (`host:port`) names.
fn resolve(address: &str) -> Result<Vec<SocketAddr>, BootstrapError> {
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| {
            BootstrapError::Config(format!(
                "the NCCL bootstrap address {address:?} is not a reachable host:port ({e})"
            ))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(BootstrapError::Config(format!("the NCCL bootstrap address {address:?} names no host")));
    }
    Ok(addrs)
}

/// Binds rank 0's listener at `address`.
pub fn bind(address: &str) -> Result<TcpListener, BootstrapError> {
    let addrs = resolve(address)?;
    TcpListener::bind(&addrs[..]).map_err(|e| {
        BootstrapError::Io(format!(
            "rank 0 cannot listen at {address} for the other ranks ({e}); the address must be one of \
             rank 0's own, with a free port"
        ))
    })
}

/// What rank 0's serving thread ended with, once it has.
type Outcome = Arc<Mutex<Option<Result<(), BootstrapError>>>>;

/// Rank 0 handing its unique id to ranks `1..world` from a thread of its own. Dropping it stops
/// the thread (within one poll or hello timeout) and frees the address.
#[derive(Debug)]
pub struct IdServer {
    address: String,
    stop: Arc<AtomicBool>,
    outcome: Outcome,
    thread: Option<JoinHandle<()>>,
}

impl IdServer {
    /// Serves `id` on `listener` (bound to the group's address) to the other `world - 1` ranks, for at most
    /// `timeout` from now.
    pub fn start(
        listener: TcpListener,
        world: usize,
        id: UniqueIdBytes,
        timeout: Duration,
    ) -> Result<Self, BootstrapError> {
        check_rank(0, world)?;
        let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        listener
            .set_nonblocking(true)
            .map_err(|e| BootstrapError::Io(format!("rank 0 cannot poll its listener at {address}: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let outcome: Outcome = Arc::default();
        let deadline = Instant::now() + timeout;
        let thread = {
            let (stop, outcome, address) = (stop.clone(), outcome.clone(), address.clone());
            std::thread::Builder::new()
                .name("pagoda-nccl-id".into())
                .spawn(move || {
                    let server = Serving { listener, address, world, timeout, deadline, stop };
                    let result = server.run(&id);
                    if let Ok(mut slot) = outcome.lock() {
                        *slot = Some(result);
                    }
                })
                .map_err(|e| BootstrapError::Io(format!("cannot start the NCCL id server thread: {e}")))?
        };
        Ok(Self { address, stop, outcome, thread: Some(thread) })
    }

    /// The address served at.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// How serving ended: `None` while it goes on.
    pub fn outcome(&self) -> Option<Result<(), BootstrapError>> {
        self.outcome.lock().ok().and_then(|o| o.clone())
    }

    /// Waits until serving ends and returns how.
    pub fn wait(mut self) -> Result<(), BootstrapError> {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.outcome().unwrap_or(Err(BootstrapError::Stopped))
    }
}

impl Drop for IdServer {
    fn drop(&mut self) {
        // Not joined: the thread sees the flag within one poll (or one hello's timeout).
        self.stop.store(true, Ordering::Release);
    }
}

/// The serving thread's state.
struct Serving {
    listener: TcpListener,
    address: String,
    world: usize,
    timeout: Duration,
    deadline: Instant,
    stop: Arc<AtomicBool>,
}

impl Serving {
    fn run(&self, id: &UniqueIdBytes) -> Result<(), BootstrapError> {
        // Ranks that said hello and wait for the id, by rank (index 0 unused).
        let mut waiting: Vec<Option<TcpStream>> = (0..self.world).map(|_| None).collect();
        let result = self.gather(&mut waiting);
        let peers = waiting.iter_mut().filter_map(Option::take);
        match &result {
            Ok(()) => {
                let mut failed = None;
                for mut peer in peers {
                    let mut reply = Vec::with_capacity(1 + UNIQUE_ID_BYTES);
                    reply.push(REPLY_ID);
                    reply.extend_from_slice(id);
                    if let Err(e) = peer.write_all(&reply) {
                        failed.get_or_insert(BootstrapError::Io(format!(
                            "rank 0 could not send the NCCL unique id to a rank: {e}"
                        )));
                    }
                }
                failed.map_or(Ok(()), Err)
            }
            Err(e) => {
                for mut peer in peers {
                    let _ = refuse(&mut peer, &e.to_string());
                }
                result
            }
        }
    }

    /// Accepts connections until every rank `1..world` said hello.
    fn gather(&self, waiting: &mut [Option<TcpStream>]) -> Result<(), BootstrapError> {
        loop {
            let missing: Vec<usize> = (1..self.world).filter(|&r| waiting[r].is_none()).collect();
            if missing.is_empty() {
                return Ok(());
            }
            if self.stop.load(Ordering::Acquire) {
                return Err(BootstrapError::Stopped);
            }
            if Instant::now() >= self.deadline {
                return Err(BootstrapError::Timeout(format!(
                    "rank 0 waited {:?} at {} for rank(s) {} of a group of {}, which never connected",
                    self.timeout,
                    self.address,
                    list(&missing),
                    self.world
                )));
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Some((rank, stream)) = self.hello(stream)? {
                        if waiting[rank].is_some() {
                            let why = format!("two ranks connected as rank {rank} of {}", self.world);
                            let mut stream = stream;
                            let _ = refuse(&mut stream, &why);
                            return Err(BootstrapError::Mismatch(why));
                        }
                        waiting[rank] = Some(stream);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                    std::thread::sleep(ACCEPT_POLL);
                }
                Err(e) => {
                    return Err(BootstrapError::Io(format!(
                        "rank 0 stopped listening at {}: {e}",
                        self.address
                    )))
                }
            }
        }
    }

    /// Reads one connection's hello: the rank it is, or `None` for a connection that is not a
    /// rank (dropped). A rank of another group size, or out of range, is refused and fails the
    /// group.
    fn hello(&self, mut stream: TcpStream) -> Result<Option<(usize, TcpStream)>, BootstrapError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let wait = HELLO_TIMEOUT.min(left).max(Duration::from_millis(1));
        let setup = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(wait)))
            .and_then(|()| stream.set_write_timeout(Some(HELLO_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true));
        if setup.is_err() {
            return Ok(None);
        }
        let mut hello = [0u8; HELLO_BYTES];
        if stream.read_exact(&mut hello).is_err() || hello[..8] != MAGIC {
            return Ok(None);
        }
        let world = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
        let rank = u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
        let why = if world != self.world {
            format!(
                "a rank connected as rank {rank} of a group of {world}, but rank 0's group has {}",
                self.world
            )
        } else if rank == 0 || rank >= world {
            format!("a rank connected as rank {rank}, which is not one of ranks 1..{world}")
        } else {
            // Answered once every rank is here: until then it waits, as long as rank 0 does.
            if stream.set_write_timeout(Some(HELLO_TIMEOUT)).is_err() {
                return Ok(None);
            }
            return Ok(Some((rank, stream)));
        };
        let _ = refuse(&mut stream, &why);
        Err(BootstrapError::Mismatch(why))
    }
}

/// Tells a rank why it gets no id.
fn refuse(stream: &mut TcpStream, why: &str) -> std::io::Result<()> {
    let bytes = &why.as_bytes()[..why.len().min(MAX_MESSAGE)];
    let mut reply = Vec::with_capacity(5 + bytes.len());
    reply.push(REPLY_REFUSED);
    reply.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    reply.extend_from_slice(bytes);
    stream.write_all(&reply)
}

/// `1, 2, 5`.
fn list(ranks: &[usize]) -> String {
    ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

/// Rank `rank` (1 or more) of a group of `world`: connects to rank 0 at `address`, retrying
/// while nobody listens there, and returns the id rank 0 sends once every rank has connected.
/// Fails after `timeout` in all.
pub fn fetch_id(
    address: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<UniqueIdBytes, BootstrapError> {
    check_rank(rank, world)?;
    if rank == 0 {
        return Err(BootstrapError::Config("rank 0 makes the NCCL unique id; it does not fetch one".into()));
    }
    let addrs = resolve(address)?;
    let started = Instant::now();
    let deadline = started + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut stream = 'connect: loop {
        let mut last_error = None;
        for addr in &addrs {
            let attempt = CONNECT_ATTEMPT.min(left()).max(Duration::from_millis(1));
            match TcpStream::connect_timeout(addr, attempt) {
                Ok(stream) => break 'connect stream,
                Err(e) => last_error = Some(e),
            }
        }
        if left().is_zero() {
            let last = last_error.map(|e| format!(" (last: {e})")).unwrap_or_default();
            return Err(BootstrapError::Timeout(format!(
                "rank {rank} of {world} found no rank 0 at {address} within {timeout:?}{last}: is rank 0 \
                 started, with this address?"
            )));
        }
        std::thread::sleep(CONNECT_RETRY.min(left()));
    };
    let io =
        |e: std::io::Error| BootstrapError::Io(format!("rank {rank}: talking to rank 0 at {address}: {e}"));
    let wait = left().max(Duration::from_millis(1));
    stream.set_nodelay(true).map_err(io)?;
    stream.set_write_timeout(Some(wait)).map_err(io)?;
    stream.set_read_timeout(Some(wait)).map_err(io)?;
    let mut hello = [0u8; HELLO_BYTES];
    hello[..8].copy_from_slice(&MAGIC);
    hello[8..12].copy_from_slice(&(world as u32).to_le_bytes());
    hello[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io)?;
    let timed_out = |e: std::io::Error| {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            BootstrapError::Timeout(format!(
                "rank {rank} of {world} reached rank 0 at {address} but got no NCCL unique id within \
                 {timeout:?} (rank 0 waits for every rank to connect)"
            ))
        } else if e.kind() == ErrorKind::UnexpectedEof {
            BootstrapError::Refused(format!("rank 0 at {address} closed the connection without an answer"))
        } else {
            io(e)
        }
    };
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).map_err(timed_out)?;
    match status[0] {
        REPLY_ID => {
            let mut id = [0u8; UNIQUE_ID_BYTES];
            stream.read_exact(&mut id).map_err(timed_out)?;
            Ok(id)
        }
        REPLY_REFUSED => {
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).map_err(timed_out)?;
            let len = (u32::from_le_bytes(len) as usize).min(MAX_MESSAGE);
            let mut message = vec![0u8; len];
            stream.read_exact(&mut message).map_err(timed_out)?;
            Err(BootstrapError::Refused(String::from_utf8_lossy(&message).into_owned()))
        }
        other => Err(BootstrapError::Io(format!(
            "rank {rank}: {address} answered {other:#x}, not a Pagoda NCCL bootstrap (is another program \
             listening there?)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_secs(10);

    fn fake_id(seed: u8) -> UniqueIdBytes {
        std::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
    }

    /// A listener on a free localhost port, and its address.
    fn local() -> (TcpListener, String) {
        let listener = bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        (listener, address)
    }

    fn fetch_on_threads(
        address: &str,
        ranks: impl IntoIterator<Item = usize>,
        world: usize,
        timeout: Duration,
    ) -> Vec<std::thread::JoinHandle<Result<UniqueIdBytes, BootstrapError>>> {
        ranks
            .into_iter()
            .map(|rank| {
                let address = address.to_string();
                std::thread::spawn(move || fetch_id(&address, rank, world, timeout))
            })
            .collect()
    }

    #[test]
    fn every_rank_gets_rank_0s_id() {
        for world in [2, 3, 8] {
            let (listener, address) = local();
            let id = fake_id(world as u8);
            // The other ranks may start before or after rank 0 serves: half start first.
            let early = fetch_on_threads(&address, (1..world).step_by(2), world, QUICK);
            std::thread::sleep(Duration::from_millis(50));
            let server = IdServer::start(listener, world, id, QUICK).unwrap();
            let late = fetch_on_threads(&address, (2..world).step_by(2), world, QUICK);
            for fetched in early.into_iter().chain(late) {
                assert_eq!(fetched.join().unwrap(), Ok(id), "world {world}");
            }
            assert_eq!(server.wait(), Ok(()));
        }
    }

    #[test]
    fn a_rank_retries_until_rank_0_listens() {
        // Reserve a port, free it, and let rank 0 bind it only after rank 1 started trying.
        let address = {
            let (listener, address) = local();
            drop(listener);
            address
        };
        let fetching = fetch_on_threads(&address, [1], 2, QUICK);
        std::thread::sleep(Duration::from_millis(300));
        let server = IdServer::start(bind(&address).unwrap(), 2, fake_id(7), QUICK).unwrap();
        assert_eq!(fetching.into_iter().next().unwrap().join().unwrap(), Ok(fake_id(7)));
        assert_eq!(server.wait(), Ok(()));
    }

    #[test]
    fn a_rank_with_no_rank_0_times_out_naming_the_address() {
        let address = {
            let (listener, address) = local();
            drop(listener);
            address
        };
        let started = Instant::now();
        let e = fetch_id(&address, 1, 2, Duration::from_millis(400)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(matches!(e, BootstrapError::Timeout(_)), "{e:?}");
        assert!(e.to_string().contains(&address) && e.to_string().contains("rank 1 of 2"), "{e}");
    }

    #[test]
    fn rank_0_gives_up_on_missing_ranks_and_tells_those_that_came() {
        let (listener, address) = local();
        let server = IdServer::start(listener, 4, fake_id(1), Duration::from_millis(600)).unwrap();
        // Ranks 1 and 3 come (waiting longer than rank 0 does); rank 2 never does.
        let came = fetch_on_threads(&address, [1, 3], 4, QUICK);
        let e = server.wait().unwrap_err();
        assert!(matches!(e, BootstrapError::Timeout(_)), "{e:?}");
        assert!(e.to_string().contains("rank(s) 2 of a group of 4"), "{e}");
        for fetched in came {
            let e = fetched.join().unwrap().unwrap_err();
            assert!(matches!(e, BootstrapError::Refused(_)), "{e:?}");
            assert!(e.to_string().contains("rank(s) 2"), "{e}");
        }
    }

    #[test]
    fn a_rank_that_waits_less_than_rank_0_times_out_on_its_own() {
        let (listener, address) = local();
        let server = IdServer::start(listener, 3, fake_id(1), QUICK).unwrap();
        let e = fetch_id(&address, 1, 3, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, BootstrapError::Timeout(_)), "{e:?}");
        assert!(e.to_string().contains("got no NCCL unique id"), "{e}");
        drop(server);
    }

    #[test]
    fn a_different_group_size_fails_rank_0_and_every_rank() {
        let (listener, address) = local();
        let server = IdServer::start(listener, 3, fake_id(1), QUICK).unwrap();
        let fine = fetch_on_threads(&address, [1], 3, QUICK);
        std::thread::sleep(Duration::from_millis(100));
        let e = fetch_id(&address, 2, 4, QUICK).unwrap_err();
        assert!(
            matches!(&e, BootstrapError::Refused(m) if m.contains("group of 4") && m.contains("has 3")),
            "{e:?}"
        );
        let e = server.wait().unwrap_err();
        assert!(matches!(e, BootstrapError::Mismatch(_)), "{e:?}");
        let e = fine.into_iter().next().unwrap().join().unwrap().unwrap_err();
        assert!(matches!(&e, BootstrapError::Refused(m) if m.contains("group of 4")), "{e:?}");
    }

    #[test]
    fn a_rank_given_twice_fails_the_group() {
        let (listener, address) = local();
        let server = IdServer::start(listener, 3, fake_id(1), QUICK).unwrap();
        let first = fetch_on_threads(&address, [2], 3, QUICK);
        std::thread::sleep(Duration::from_millis(100));
        let e = fetch_id(&address, 2, 3, QUICK).unwrap_err();
        assert!(
            matches!(&e, BootstrapError::Refused(m) if m.contains("two ranks connected as rank 2")),
            "{e:?}"
        );
        assert!(matches!(server.wait(), Err(BootstrapError::Mismatch(_))));
        assert!(first.into_iter().next().unwrap().join().unwrap().is_err());
    }

    #[test]
    fn a_stray_connection_is_dropped_and_does_not_count() {
        let (listener, address) = local();
        let server = IdServer::start(listener, 2, fake_id(3), QUICK).unwrap();
        // Something that is not a rank: it connects, writes junk and hangs up.
        let mut stray = TcpStream::connect(&address).unwrap();
        stray.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        drop(stray);
        // One that connects and says nothing at all, kept open.
        let _silent = TcpStream::connect(&address).unwrap();
        assert_eq!(fetch_id(&address, 1, 2, QUICK), Ok(fake_id(3)));
        assert_eq!(server.wait(), Ok(()));
    }

    #[test]
    fn a_peer_that_is_not_rank_0_is_named() {
        // A listener that answers like an HTTP server would.
        let (listener, address) = local();
        let answering = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; HELLO_BYTES];
            s.read_exact(&mut hello).unwrap();
            s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n").unwrap();
        });
        let e = fetch_id(&address, 1, 2, QUICK).unwrap_err();
        assert!(e.to_string().contains("not a Pagoda NCCL bootstrap"), "{e}");
        answering.join().unwrap();
    }

    #[test]
    fn bad_configurations_fail_at_once_with_the_reason() {
        let quick = Duration::from_millis(100);
        for (rank, world, want) in [
            (0, 0, "at least one rank"),
            (2, 2, "rank 2 is not in a group of 2"),
            (0, 2, "rank 0 makes the NCCL unique id"),
        ] {
            let e = fetch_id("127.0.0.1:1", rank, world, quick).unwrap_err();
            assert!(matches!(e, BootstrapError::Config(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{e}");
        }
        for address in ["no-port", "127.0.0.1:99999", ""] {
            let e = fetch_id(address, 1, 2, quick).unwrap_err();
            assert!(matches!(e, BootstrapError::Config(_)), "{address}: {e:?}");
            assert!(e.to_string().contains("host:port"), "{e}");
        }
        let (listener, _) = local();
        assert!(matches!(IdServer::start(listener, 0, fake_id(0), quick), Err(BootstrapError::Config(_))));
    }

    #[test]
    fn a_taken_port_fails_rank_0_at_bind() {
        let (_held, address) = local();
        let e = bind(&address).unwrap_err();
        assert!(e.to_string().contains("cannot listen at") && e.to_string().contains(&address), "{e}");
    }

    #[test]
    fn dropping_the_server_stops_it_and_frees_the_address() {
        let (listener, address) = local();
        let server = IdServer::start(listener, 2, fake_id(0), QUICK).unwrap();
        assert_eq!(server.outcome(), None);
        drop(server);
        let deadline = Instant::now() + Duration::from_secs(5);
        while bind(&address).is_err() {
            assert!(Instant::now() < deadline, "the address stayed taken");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
