//! An in-process TCP proxy on 127.0.0.1 that adds latency and, optionally, a download bandwidth cap.
//!
//! This kernel has no `netem` (`tc qdisc ... netem delay`), so tests that need a "slow network"
//! between the mount and its server put this proxy in between instead. It is the Rust counterpart of
//! `bench/delay_proxy.py`: every chunk read from either side is forwarded RTT/2 after it arrived, in
//! order, so a request and its response together take one extra RTT. With a rate, server->client
//! bytes of all connections share one token bucket.
//!
//! The proxy runs on its own thread with its own tokio runtime, so it works from plain `#[test]`s
//! and from `#[tokio::test]`s alike, and dropping it tears everything down without waiting on peers.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::runner::Runner;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{sleep_until, Instant};

/// Largest single read; also the largest chunk the delay queue holds.
const READ_SIZE: usize = 64 * 1024;
/// Bytes a direction of one connection may hold in its delay queue before it stops reading, so a
/// fast sender against a capped reader applies TCP back-pressure instead of filling memory.
const MAX_QUEUED: usize = 32 * 1024 * 1024;

pub struct DelayProxy {
    port: u16,
    connections: Arc<AtomicU64>,
    bytes_down: Arc<AtomicU64>,
    _runner: Runner,
}

impl DelayProxy {
    /// Listen on 127.0.0.1 (random port) and forward every connection to 127.0.0.1:`target_port`,
    /// delaying each direction by `rtt / 2` and, if `rate` is set, capping the total server->client
    /// rate of all connections at `rate` bytes per second.
    pub fn start(target_port: u16, rtt: Duration, rate: Option<u64>) -> DelayProxy {
        assert!(rate != Some(0), "DelayProxy rate must be positive (use None for unlimited)");
        // Bind before returning so the port is usable as soon as `start` returns.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the delay proxy");
        listener.set_nonblocking(true).expect("making the proxy listener non-blocking");
        let port = listener.local_addr().expect("proxy listener address").port();

        let connections = Arc::new(AtomicU64::new(0));
        let bytes_down = Arc::new(AtomicU64::new(0));
        let shared = Shared {
            target_port,
            delay: rtt / 2,
            limit: rate.map(|r| Arc::new(RateLimit::new(r))),
            bytes_down: bytes_down.clone(),
        };
        let accepted = connections.clone();

        let runner =
            Runner::spawn(format!("delay-proxy-{port}"), move |stop| accept_loop(listener, shared, accepted, stop));

        DelayProxy { port, connections, bytes_down, _runner: runner }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Server->client bytes forwarded so far (all connections).
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Shared {
    target_port: u16,
    delay: Duration,
    limit: Option<Arc<RateLimit>>,
    bytes_down: Arc<AtomicU64>,
}

async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Shared,
    accepted: Arc<AtomicU64>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = TcpListener::from_std(listener).expect("registering the proxy listener");
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((client, _)) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(connection(client, shared.clone()));
                }
                // E.g. EMFILE: back off briefly rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn connection(client: TcpStream, shared: Shared) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", shared.target_port)).await else {
        return; // dropping `client` closes it, as a refused connection would
    };
    // Without this, Nagle plus delayed ACKs would add up to ~40 ms of unmodelled latency.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, shared.delay, None, None);
    let down = pump(server_read, client_write, shared.delay, shared.limit.as_deref(), Some(&shared.bytes_down));
    // Any error tears down the whole connection (both sockets close when this returns); a clean
    // EOF only half-closes the other side and waits for the opposite direction to finish.
    let _ = tokio::try_join!(up, down);
}

/// Forward `from` to `to`, each chunk `delay` after it was read; on EOF, flush and shut down `to`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    delay: Duration,
    limit: Option<&RateLimit>,
    counter: Option<&AtomicU64>,
) -> io::Result<()> {
    // A queue with due times rather than a sleep per read, so chunks in flight overlap
    // (no head-of-line blocking beyond their order).
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let room = Semaphore::new(MAX_QUEUED);

    let read = async {
        let tx = tx; // moved in, so the queue closes when reading ends
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            let arrived = Instant::now();
            // Copied out (not the whole buffer) so queued small reads don't each pin 64 KiB.
            let chunk = buf[..n].to_vec();
            room.acquire_many(n as u32).await.map_err(io::Error::other)?.forget();
            if tx.send((arrived + delay, chunk)).is_err() {
                return Ok(());
            }
        }
    };

    let write = async {
        while let Some((due, data)) = rx.recv().await {
            if due > Instant::now() {
                sleep_until(due).await;
            }
            match limit {
                Some(limit) => {
                    for piece in data.chunks(limit.piece) {
                        let until = limit.reserve(piece.len());
                        if until > Instant::now() {
                            sleep_until(until).await;
                        }
                        count(counter, piece.len());
                        to.write_all(piece).await?;
                    }
                }
                None => {
                    count(counter, data.len());
                    to.write_all(&data).await?;
                }
            }
            room.add_permits(data.len());
        }
        to.shutdown().await
    };

    tokio::try_join!(read, write).map(|_| ())
}

/// Counted before the write, so a peer can never have received more than `bytes_down()` says.
fn count(counter: Option<&AtomicU64>, n: usize) {
    if let Some(counter) = counter {
        counter.fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// A token bucket kept as "the time the link is busy until": each piece reserves its transmission
/// time after the previous reservation, so connections sharing the link interleave piece by piece.
struct RateLimit {
    rate: u64,
    /// Largest piece reserved at once: ~10 ms worth, so one big chunk never hogs the link.
    piece: usize,
    /// Idle credit: a writer that wakes a little late may catch up by this much (the bucket size).
    burst: Duration,
    busy_until: Mutex<Instant>,
}

impl RateLimit {
    fn new(rate: u64) -> RateLimit {
        let piece = usize::try_from(rate / 100).unwrap_or(usize::MAX).max(1);
        RateLimit { rate, piece, burst: Duration::from_millis(10), busy_until: Mutex::new(Instant::now()) }
    }

    /// Reserve `n` bytes of link time; returns when they may be sent.
    fn reserve(&self, n: usize) -> Instant {
        let mut busy = self.busy_until.lock();
        let now = Instant::now();
        let start = (*busy).max(now.checked_sub(self.burst).unwrap_or(now));
        *busy = start + Duration::from_secs_f64(n as f64 / self.rate as f64);
        *busy
    }
}
