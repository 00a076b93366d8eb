//! `delay-proxy LISTEN_PORT TARGET_PORT RTT_MS`: a TCP proxy on 127.0.0.1 that adds a fixed
//! round-trip time, for the benchmarks in `bench/`.
//!
//! Why: this machine's kernel has no `netem` (`tc qdisc ... netem delay`), so a "20 ms RTT" link
//! is simulated by a proxy between the client and the server instead. The Python one
//! (`bench/delay_proxy.py`, asyncio, single-threaded) tops out at ~0.5-0.6 GiB/s on the 2-core
//! bench VM (one core busy, 1.7 CPU s per GiB), so a fast transfer through it measured the
//! proxy; this one forwards ~1.2 GiB/s there (0.6 CPU s per GiB: the two socket copies), about
//! what nginx serves to curl directly.
//!
//! Delay model: the proxy listens on 127.0.0.1:LISTEN_PORT and, for each accepted connection,
//! connects to 127.0.0.1:TARGET_PORT (TCP_NODELAY on both sockets). In each direction a reader
//! task timestamps every chunk it reads and queues it; a writer task writes each chunk RTT/2 after
//! it was read, in order. A request and its response therefore take one RTT longer, and chunks in
//! flight overlap, so bandwidth is not limited (a direction holds at most [`MAX_QUEUED`] bytes
//! in its queue, i.e. ~6 GiB/s per connection at 20 ms RTT, before it stops reading and TCP
//! back-pressure takes over). The writers wait on a clock thread of their own rather than tokio's
//! timer: tokio's has 1 ms resolution and overshot by ~1.2 ms per direction (an echo took 22.5 ms
//! for a 20 ms RTT), the clock thread's futex waits by ~0.1 ms (20.5 ms; the Python proxy: 20.9).
//!
//! An end of stream is forwarded as a half-close (shutdown of the write side to the other peer,
//! after the queued data, at its due time); an error on any of the two sockets closes both at
//! once. Runs until killed.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

/// Least room a read is given: when the current block has less left, the reader starts a new one.
const MIN_READ: usize = 256 * 1024;
/// Reads go into blocks of this size; each chunk read is a slice of its block (no copy), and a
/// block is freed once all its chunks are written.
const BLOCK: usize = 1024 * 1024;
/// Bytes one direction of one connection may hold queued before its reader waits for the writer.
const MAX_QUEUED: usize = 64 * 1024 * 1024;

#[tokio::main]
async fn main() -> ExitCode {
    let (listen, target, delay) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("delay-proxy: {e}\nusage: delay-proxy LISTEN_PORT TARGET_PORT RTT_MS");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, listen)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delay-proxy: listening on 127.0.0.1:{listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(connection(client, target, delay));
            }
            // E.g. EMFILE: back off briefly rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// LISTEN_PORT TARGET_PORT RTT_MS -> (listen port, target port, one-way delay = RTT/2).
fn parse_args() -> Result<(u16, u16, Duration), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, rtt] = args.as_slice() else {
        return Err(format!("expected 3 arguments, got {}", args.len()));
    };
    let port = |s: &str| s.parse::<u16>().map_err(|e| format!("bad port {s:?}: {e}"));
    let rtt_ms: f64 = rtt.parse().map_err(|e| format!("bad RTT_MS {rtt:?}: {e}"))?;
    let delay = Duration::try_from_secs_f64(rtt_ms / 2000.0).map_err(|e| format!("bad RTT_MS {rtt:?}: {e}"))?;
    Ok((port(listen)?, port(target)?, delay))
}

async fn connection(client: TcpStream, target: u16, delay: Duration) {
    let server = match TcpStream::connect((Ipv4Addr::LOCALHOST, target)).await {
        Ok(s) => s,
        Err(e) => {
            // Dropping `client` closes it, as a refused connection would.
            eprintln!("delay-proxy: connecting to 127.0.0.1:{target}: {e}");
            return;
        }
    };
    // Without this, Nagle plus delayed ACKs would add up to ~40 ms of unmodelled latency.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Four tasks (a reader and a writer per direction), so that they can run on different cores.
    let mut tasks = JoinSet::new();
    direction(&mut tasks, client_read, server_write, delay);
    direction(&mut tasks, server_read, client_write, delay);
    while let Some(done) = tasks.join_next().await {
        if !matches!(done, Ok(Ok(()))) {
            // Dropping the other tasks drops their socket halves: both connections close.
            tasks.abort_all();
            return;
        }
    }
}

/// Spawn the reader and the writer of one direction, `from` -> `to`.
fn direction(tasks: &mut JoinSet<io::Result<()>>, from: OwnedReadHalf, to: OwnedWriteHalf, delay: Duration) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(MAX_QUEUED));
    tasks.spawn(read_side(from, tx, delay, room.clone()));
    tasks.spawn(write_side(rx, to, room));
}

/// Read chunks from `from` and queue each with its due time (read time + `delay`); on end of
/// stream, close the queue.
async fn read_side(
    mut from: OwnedReadHalf,
    tx: mpsc::UnboundedSender<(Instant, Bytes)>,
    delay: Duration,
    room: Arc<Semaphore>,
) -> io::Result<()> {
    let mut block = BytesMut::with_capacity(BLOCK);
    // Used-up blocks, oldest first, reused once all their chunks are written (fresh allocations
    // would cost page faults: ~0.05 CPU s per GiB).
    let mut used = VecDeque::new();
    loop {
        if block.capacity() < MIN_READ {
            used.push_back(block);
            block = if used.front_mut().is_some_and(|oldest| oldest.try_reclaim(BLOCK)) {
                used.pop_front().expect("front checked")
            } else {
                BytesMut::with_capacity(BLOCK)
            };
            if used.len() > MAX_QUEUED / BLOCK {
                used.pop_front(); // freed when its last chunk is written
            }
        }
        let n = from.read_buf(&mut block).await?;
        if n == 0 {
            return Ok(()); // dropping `tx` ends the writer once the queue is drained
        }
        let due = Instant::now() + delay;
        let chunk = block.split().freeze();
        // At most BLOCK bytes per read: fits in u32.
        room.acquire_many(n as u32).await.map_err(io::Error::other)?.forget();
        if tx.send((due, chunk)).is_err() {
            return Ok(()); // the writer is gone (and has reported why)
        }
    }
}

/// Write every queued chunk to `to` at its due time, in order; when the queue is closed and
/// drained, shut down the write side of `to` (the peer sees the end of stream).
async fn write_side(
    mut rx: mpsc::UnboundedReceiver<(Instant, Bytes)>,
    mut to: OwnedWriteHalf,
    room: Arc<Semaphore>,
) -> io::Result<()> {
    while let Some((due, chunk)) = rx.recv().await {
        until(due).await;
        to.write_all(&chunk).await?;
        room.add_permits(chunk.len());
    }
    to.shutdown().await
}

/// Completes at `due`, to within the kernel's timer slack (~0.05-0.1 ms).
fn until(due: Instant) -> Until {
    Until(due)
}

struct Until(Instant);

impl Future for Until {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.0 {
            return Poll::Ready(());
        }
        CLOCK.wake_at(self.0, cx.waker().clone());
        Poll::Pending
    }
}

/// One thread that wakes each registered waker once its instant has passed (a futex wait with a
/// timeout: microseconds late, not tokio's millisecond ticks).
struct Clock {
    queue: Mutex<BinaryHeap<Reverse<Alarm>>>,
    changed: Condvar,
}

static CLOCK: LazyLock<Clock> = LazyLock::new(|| {
    std::thread::Builder::new().name("clock".into()).spawn(|| CLOCK.run()).expect("starting the clock thread");
    Clock { queue: Mutex::new(BinaryHeap::new()), changed: Condvar::new() }
});

impl Clock {
    fn wake_at(&self, at: Instant, waker: Waker) {
        let mut queue = self.queue.lock();
        let earliest = queue.peek().is_none_or(|Reverse(first)| at < first.at);
        queue.push(Reverse(Alarm { at, waker }));
        drop(queue);
        if earliest {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        let mut queue = self.queue.lock();
        loop {
            let now = Instant::now();
            while queue.peek().is_some_and(|Reverse(first)| first.at <= now) {
                if let Some(Reverse(alarm)) = queue.pop() {
                    alarm.waker.wake();
                }
            }
            match queue.peek() {
                Some(Reverse(first)) => {
                    let timeout = first.at - now;
                    self.changed.wait_for(&mut queue, timeout);
                }
                None => self.changed.wait(&mut queue),
            }
        }
    }
}

/// A waker and when to wake it; ordered by that instant alone.
struct Alarm {
    at: Instant,
    waker: Waker,
}

impl PartialEq for Alarm {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Alarm {}

impl PartialOrd for Alarm {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Alarm {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}
