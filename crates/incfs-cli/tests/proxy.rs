//! The test-only delay proxy (`common::proxy::DelayProxy`) against tiny in-test TCP servers.
//! Timing checks are lower bounds only: a loaded machine may be slower, never faster.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::proxy::DelayProxy;

/// Serve every connection on 127.0.0.1 with `handler` (one thread each); returns the port.
fn serve(handler: fn(TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || handler(stream));
        }
    });
    port
}

/// Echo until EOF, then half-close.
fn echo(stream: TcpStream) {
    let mut read = stream.try_clone().unwrap();
    let mut write = stream;
    let _ = io::copy(&mut read, &mut write);
    let _ = write.shutdown(Shutdown::Write);
}

/// Answer each line "ping\n" with "pong\n" on the same connection (keep-alive style).
fn ping_pong(stream: TcpStream) {
    let mut write = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        assert_eq!(line, "ping");
        if write.write_all(b"pong\n").is_err() {
            return;
        }
    }
}

const MIB: usize = 1024 * 1024;

/// Send 1 MiB of known bytes, then close.
fn download(mut stream: TcpStream) {
    let _ = stream.write_all(&common::random_bytes(7, MIB));
}

fn connect(proxy: &DelayProxy) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    // Bounds a broken proxy to a failed test instead of a hung one.
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn exchange(reader: &mut BufReader<TcpStream>) -> Duration {
    let start = Instant::now();
    reader.get_mut().write_all(b"ping\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "pong\n");
    start.elapsed()
}

#[test]
fn echoes_5_mib_intact_and_propagates_half_close() {
    let proxy = DelayProxy::start(serve(echo), Duration::from_millis(10), None);
    assert!(proxy.url().ends_with(&format!(":{}", proxy.port())));
    let payload = common::random_bytes(1, 5 * MIB);
    let stream = connect(&proxy);
    let mut writer = stream.try_clone().unwrap();
    let sent = payload.clone();
    // Written from another thread: the echo comes back while we are still sending.
    let sender = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    // Ends only if our half-close reached the server and its half-close came back.
    (&stream).read_to_end(&mut got).unwrap();
    sender.join().unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "echoed bytes differ");
    assert_eq!(proxy.connections(), 1);
    assert!(proxy.bytes_down() >= payload.len() as u64);
}

#[test]
fn each_exchange_takes_at_least_one_rtt() {
    let rtt = Duration::from_millis(40);
    let proxy = DelayProxy::start(serve(ping_pong), rtt, None);
    let mut reader = BufReader::new(connect(&proxy));
    // Several exchanges on one connection, as a keep-alive HTTP client would do.
    for _ in 0..3 {
        let took = exchange(&mut reader);
        assert!(took >= rtt, "exchange took {took:?}, less than the {rtt:?} RTT");
    }
    assert_eq!(proxy.connections(), 1);
}

#[test]
fn rate_caps_the_download() {
    let proxy = DelayProxy::start(serve(download), Duration::ZERO, Some(2 * MIB as u64));
    let start = Instant::now();
    let mut got = Vec::new();
    connect(&proxy).read_to_end(&mut got).unwrap();
    let took = start.elapsed();
    assert!(got == common::random_bytes(7, MIB), "downloaded bytes differ ({} bytes)", got.len());
    // 1 MiB at 2 MiB/s is 0.5 s; allow for the bucket's small burst.
    assert!(took >= Duration::from_millis(400), "1 MiB at 2 MiB/s took only {took:?}");
    assert!(proxy.bytes_down() >= MIB as u64);

    // The cap is shared: two concurrent 1 MiB downloads together take about 1 s, not 0.5 s.
    let start = Instant::now();
    let downloads: Vec<_> = (0..2)
        .map(|_| {
            let stream = connect(&proxy);
            thread::spawn(move || {
                let mut got = Vec::new();
                (&stream).read_to_end(&mut got).unwrap();
                got.len()
            })
        })
        .collect();
    for d in downloads {
        assert_eq!(d.join().unwrap(), MIB);
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(800), "2 x 1 MiB at 2 MiB/s shared took only {took:?}");
    assert_eq!(proxy.connections(), 3);
    assert!(proxy.bytes_down() >= 3 * MIB as u64);
}

#[test]
fn counters_and_drop() {
    let proxy = DelayProxy::start(serve(ping_pong), Duration::ZERO, None);
    let mut received = 0;
    for _ in 0..3 {
        let mut reader = BufReader::new(connect(&proxy));
        exchange(&mut reader);
        exchange(&mut reader);
        received += 2 * "pong\n".len() as u64;
    }
    assert_eq!(proxy.connections(), 3);
    assert!(proxy.bytes_down() >= received, "bytes_down {} < {received}", proxy.bytes_down());

    // Dropping the proxy with a connection still open closes it rather than leaving it hanging.
    let mut reader = BufReader::new(connect(&proxy));
    exchange(&mut reader);
    assert_eq!(proxy.connections(), 4);
    drop(proxy);
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert!(
            !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            "the connection stayed open after the proxy was dropped"
        ),
    }
}
