//! The test-only fault-injecting HTTP proxy (`common::faults::FaultProxy`) in front of `incfs serve`:
//! each fault kind does what it says, and nothing else, to a raw HTTP/1.1 client and to curl.

mod common;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::faults::{FaultCounts, FaultPlan, FaultProxy};
use common::IncfsServer;

const SIZE: usize = 1 << 20;
const BLOCK: u64 = 4096;

/// `incfs serve` on a tempdir holding `objects/x` (1 MiB of random bytes) and `manifest` (10 KiB).
struct Upstream {
    dir: tempfile::TempDir,
    _server: IncfsServer,
    port: u16,
    object: Vec<u8>,
    manifest: Vec<u8>,
}

fn upstream() -> Upstream {
    let dir = common::tempdir();
    fs::create_dir(dir.path().join("objects")).unwrap();
    let object = common::random_bytes(1, SIZE);
    let manifest = common::random_bytes(2, 10 * 1024);
    fs::write(dir.path().join("objects/x"), &object).unwrap();
    fs::write(dir.path().join("manifest"), &manifest).unwrap();
    let server = IncfsServer::start(dir.path());
    let port = server.url.rsplit(':').next().unwrap().parse().unwrap();
    Upstream { dir, _server: server, port, object, manifest }
}

/// What a raw client got for one request: the head, the body bytes that arrived, and the error
/// that cut the body short (if any).
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    error: Option<io::ErrorKind>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> usize {
        self.header("content-length").expect("Content-Length").parse().unwrap()
    }

    /// The reply must be complete.
    fn ok(self) -> Reply {
        assert_eq!(self.error, None, "incomplete reply: {self:?}");
        self
    }
}

/// One keep-alive HTTP/1.1 client connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Conn { reader: BufReader::new(stream) }
    }

    /// Send a request (`range` inclusive) and read its reply; `Err` if the head did not arrive.
    fn request(&mut self, method: &str, path: &str, range: Option<(u64, u64)>) -> io::Result<Reply> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: faults-test\r\n");
        if let Some((a, b)) = range {
            head.push_str(&format!("Range: bytes={a}-{b}\r\n"));
        }
        head.push_str("\r\n");
        self.reader.get_mut().write_all(head.as_bytes())?;

        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut reply = Reply { status, headers, body: Vec::new(), error: None };
        if method == "HEAD" {
            return Ok(reply);
        }
        let want = reply.content_length();
        let mut chunk = [0u8; 16 * 1024];
        while reply.body.len() < want {
            let room = (want - reply.body.len()).min(chunk.len());
            match self.reader.read(&mut chunk[..room]) {
                Ok(0) => {
                    reply.error = Some(io::ErrorKind::UnexpectedEof);
                    break;
                }
                Ok(n) => reply.body.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    reply.error = Some(e.kind());
                    break;
                }
            }
        }
        Ok(reply)
    }

    /// Whether the server closed the connection (EOF or reset) within `wait`.
    fn closed_within(&mut self, wait: Duration) -> bool {
        self.reader.get_ref().set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 1];
        let r = self.reader.read(&mut b);
        self.reader.get_ref().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match r {
            Ok(0) => true,
            Ok(_) => panic!("unexpected bytes after the reply"),
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        }
    }
}

fn get(port: u16, path: &str, range: Option<(u64, u64)>) -> Reply {
    Conn::open(port).request("GET", path, range).unwrap()
}

fn block(data: &[u8], i: u64) -> &[u8] {
    &data[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize]
}

/// `curl URL` with `extra` args: (exit code, `%{http_code}`, body bytes written, response headers).
fn curl(dir: &Path, url: &str, extra: &[&str]) -> (i32, String, Vec<u8>, String) {
    let body = dir.join(format!("curl-body-{}", rand::random::<u64>()));
    let headers = dir.join(format!("curl-headers-{}", rand::random::<u64>()));
    let out = Command::new("curl")
        .args(["-s", "-o", body.to_str().unwrap(), "-D", headers.to_str().unwrap(), "-w", "%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is needed by this test");
    let bytes = fs::read(&body).unwrap_or_default();
    let head = fs::read_to_string(&headers).unwrap_or_default();
    (out.status.code().unwrap_or(-1), common::text(&out.stdout), bytes, head)
}

fn counts(f: impl FnOnce(&mut FaultCounts)) -> FaultCounts {
    let mut c = FaultCounts::default();
    f(&mut c);
    c
}

#[test]
fn pass_through_is_byte_exact_and_keeps_connections_alive() {
    let up = upstream();
    let proxy = FaultProxy::start(up.port, 1, FaultPlan::default());
    assert_eq!(proxy.url(), format!("http://127.0.0.1:{}", proxy.port()));

    // Several requests on one connection: the proxy keeps it alive across them.
    let mut conn = Conn::open(proxy.port());
    for i in [0, 1, 7, 255] {
        let r = conn.request("GET", "/objects/x", Some((i * BLOCK, (i + 1) * BLOCK - 1))).unwrap().ok();
        assert_eq!(r.status, 206);
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {}-{}/{SIZE}", i * BLOCK, (i + 1) * BLOCK - 1)).as_deref()
        );
        assert_eq!(r.body, block(&up.object, i));
        assert_eq!(r.header("connection"), None);
    }
    let head = conn.request("HEAD", "/objects/x", None).unwrap().ok();
    assert_eq!((head.status, head.content_length()), (200, SIZE));
    let whole = conn.request("GET", "/objects/x", None).unwrap().ok();
    assert_eq!(whole.status, 200);
    assert!(whole.body == up.object, "whole object differs");
    let missing = conn.request("GET", "/objects/nope", None).unwrap().ok();
    assert_eq!(missing.status, 404);
    assert!(!conn.closed_within(Duration::from_millis(50)), "keep-alive connection closed");

    // And to curl.
    let url = format!("{}/objects/x", proxy.url());
    let (code, status, body, _) = curl(up.dir.path(), &url, &["-r", "4096-8191"]);
    assert_eq!((code, status.as_str()), (0, "206"));
    assert_eq!(body, block(&up.object, 1));

    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.passed) = (8, 8)));
}

#[test]
fn flip_changes_exactly_one_bit() {
    let up = upstream();
    let proxy = FaultProxy::start(up.port, 2, FaultPlan { flip_bit: 1.0, ..FaultPlan::default() });
    let mut conn = Conn::open(proxy.port());
    for i in 0..8 {
        let r = conn.request("GET", "/objects/x", Some((i * BLOCK, (i + 1) * BLOCK - 1))).unwrap().ok();
        assert_eq!(r.status, 206);
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {}-{}/{SIZE}", i * BLOCK, (i + 1) * BLOCK - 1)).as_deref()
        );
        assert_eq!(r.body.len(), BLOCK as usize);
        let flipped: u32 = r.body.iter().zip(block(&up.object, i)).map(|(a, b)| (a ^ b).count_ones()).sum();
        assert_eq!(flipped, 1, "block {i}");
    }
    // A HEAD has no body to flip: it passes.
    let head = conn.request("HEAD", "/objects/x", None).unwrap().ok();
    assert_eq!((head.status, head.content_length()), (200, SIZE));
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.flipped, c.passed) = (9, 8, 1)));
}

#[test]
fn status_faults_bursts_and_set_plan() {
    let up = upstream();
    let proxy = FaultProxy::start(up.port, 3, FaultPlan { status_5xx: 1.0, ..FaultPlan::default() });
    let mut conn = Conn::open(proxy.port());
    let r = conn.request("GET", "/objects/x", Some((0, 4095))).unwrap().ok();
    assert_eq!(r.status, 503);
    assert!(!r.body.is_empty() && r.body.len() == r.content_length());
    let r = conn.request("HEAD", "/objects/x", None).unwrap().ok();
    assert_eq!(r.status, 503);

    proxy.set_plan(FaultPlan { status_429: 1.0, ..FaultPlan::default() });
    let r = conn.request("GET", "/objects/x", Some((0, 4095))).unwrap().ok();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("0"));
    assert_eq!(r.body.len(), r.content_length());

    // A plan change ends faults (and any burst) for later requests, on the same connection.
    proxy.set_plan(FaultPlan { status_5xx: 1.0, burst_len: 5, ..FaultPlan::default() });
    assert_eq!(conn.request("GET", "/objects/x", Some((0, 4095))).unwrap().status, 503);
    proxy.set_plan(FaultPlan::default());
    let r = conn.request("GET", "/objects/x", Some((0, 4095))).unwrap().ok();
    assert_eq!((r.status, r.body.as_slice()), (206, block(&up.object, 0)));
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.status_5xx, c.status_429, c.passed) = (5, 3, 1, 1)));

    // Bursts: every run of failures is at least burst_len long (except one cut by the end).
    for (plan, code) in [
        (FaultPlan { status_5xx: 0.15, burst_len: 4, ..FaultPlan::default() }, 503),
        (FaultPlan { status_429: 0.15, burst_len: 3, ..FaultPlan::default() }, 429),
    ] {
        let burst = plan.burst_len as usize;
        let proxy = FaultProxy::start(up.port, 4, plan);
        let mut conn = Conn::open(proxy.port());
        let statuses: Vec<u16> =
            (0..80).map(|_| conn.request("GET", "/manifest", Some((0, 99))).unwrap().ok().status).collect();
        assert!(statuses.iter().all(|&s| s == 206 || s == code), "{statuses:?}");
        let runs: Vec<usize> = statuses.split(|&s| s == 206).map(|r| r.len()).filter(|&n| n > 0).collect();
        assert!(!runs.is_empty(), "no failures in {statuses:?}");
        let ends_failing = *statuses.last().unwrap() == code;
        for (k, &n) in runs.iter().enumerate() {
            assert!(n >= burst || (ends_failing && k == runs.len() - 1), "run of {n} in {statuses:?}");
        }
        let failed = runs.iter().sum::<usize>() as u64;
        let c = proxy.counts();
        assert_eq!((c.requests, c.passed, c.status_5xx + c.status_429), (80, 80 - failed, failed));
    }
}

#[test]
fn truncate_and_reset_cut_bodies_short() {
    let up = upstream();
    let proxy = FaultProxy::start(up.port, 5, FaultPlan { truncate_body: 1.0, ..FaultPlan::default() });
    let url = format!("{}/objects/x", proxy.url());

    // Truncated: the original length is announced, fewer bytes arrive, then a clean EOF.
    for i in 0..4 {
        let mut conn = Conn::open(proxy.port());
        let r = conn.request("GET", "/objects/x", Some((i * BLOCK, (i + 1) * BLOCK - 1))).unwrap();
        assert_eq!((r.status, r.content_length()), (206, BLOCK as usize));
        assert_eq!(r.error, Some(io::ErrorKind::UnexpectedEof));
        assert!(r.body.len() < BLOCK as usize);
        assert_eq!(r.body, block(&up.object, i)[..r.body.len()]);
    }
    let (code, status, body, head) = curl(up.dir.path(), &url, &["-r", "0-65535"]);
    assert_eq!((code, status.as_str()), (18, "206"), "curl: partial file");
    assert!(head.to_ascii_lowercase().contains("content-length: 65536"), "{head}");
    assert!(body.len() < 65536 && body == up.object[..body.len()]);
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.truncated) = (5, 5)));

    // Reset: the connection dies mid-body; whatever arrived is a prefix of the right bytes.
    proxy.set_plan(FaultPlan { reset_mid_body: 1.0, ..FaultPlan::default() });
    for i in 0..4 {
        let mut conn = Conn::open(proxy.port());
        let r = conn.request("GET", "/objects/x", Some((i * BLOCK, (i + 1) * BLOCK - 1))).unwrap();
        assert_eq!((r.status, r.content_length()), (206, BLOCK as usize));
        assert_eq!(r.error, Some(io::ErrorKind::ConnectionReset), "after {} bytes", r.body.len());
        assert!(r.body.len() < BLOCK as usize);
        assert_eq!(r.body, block(&up.object, i)[..r.body.len()]);
    }
    let (code, status, body, _) = curl(up.dir.path(), &url, &["-r", "0-65535"]);
    assert!(code == 56 || code == 18, "curl exit {code}");
    assert_eq!(status, "206");
    assert!(body.len() < 65536 && body == up.object[..body.len()]);
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.truncated, c.resets) = (10, 5, 5)));
}

#[test]
fn wrong_content_range_keeps_the_body() {
    let up = upstream();
    let proxy = FaultProxy::start(up.port, 6, FaultPlan { wrong_content_range: 1.0, ..FaultPlan::default() });
    let mut conn = Conn::open(proxy.port());
    for i in [0, 1, 100, 255] {
        let (a, b) = (i * BLOCK, (i + 1) * BLOCK - 1);
        let r = conn.request("GET", "/objects/x", Some((a, b))).unwrap().ok();
        assert_eq!(r.status, 206);
        assert_eq!(r.body, block(&up.object, i));
        let range = r.header("content-range").unwrap();
        assert_ne!(range, format!("bytes {a}-{b}/{SIZE}"));
        let (span, total) = range.strip_prefix("bytes ").unwrap().split_once('/').unwrap();
        let (x, y) = span.split_once('-').unwrap();
        let (x, y): (u64, u64) = (x.parse().unwrap(), y.parse().unwrap());
        assert_eq!((y - x + 1, total), (BLOCK, SIZE.to_string().as_str()), "{range}");
        assert!(y < SIZE as u64, "{range}");
    }
    // A 200 has no Content-Range to falsify: it passes untouched.
    let r = conn.request("GET", "/manifest", None).unwrap().ok();
    assert_eq!((r.status, r.header("content-range")), (200, None));
    assert_eq!(r.body, up.manifest);

    let (code, status, body, head) = curl(up.dir.path(), &format!("{}/objects/x", proxy.url()), &["-r", "8192-12287"]);
    assert_eq!((code, status.as_str(), body.as_slice()), (0, "206", block(&up.object, 2)));
    assert!(!head.contains("bytes 8192-12287/"), "{head}");
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.wrong_range, c.passed) = (6, 5, 1)));
}

#[test]
fn stall_holds_the_connection_until_the_client_or_drop() {
    let up = upstream();
    let proxy = FaultProxy::start(up.port, 7, FaultPlan { stall: 1.0, ..FaultPlan::default() });
    let start = Instant::now();
    let (code, status, body, _) =
        curl(up.dir.path(), &format!("{}/objects/x", proxy.url()), &["-m", "1", "-r", "0-65535"]);
    assert_eq!((code, status.as_str()), (28, "206"), "curl should time out");
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert!(body.len() < 65536 && body == up.object[..body.len()]);

    // A raw client stays stuck until the proxy is dropped, which closes the connection promptly.
    let mut conn = Conn::open(proxy.port());
    conn.reader.get_ref().set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let r = conn.request("GET", "/objects/x", Some((0, BLOCK - 1))).unwrap();
    assert_eq!(r.status, 206);
    assert!(matches!(r.error, Some(io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)), "{:?}", r.error);
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.stalled) = (2, 2)));
    let start = Instant::now();
    drop(proxy);
    assert!(start.elapsed() < Duration::from_secs(1), "drop took {:?}", start.elapsed());
    assert!(conn.closed_within(Duration::from_secs(2)), "stalled connection still open after drop");
}

#[test]
fn only_matching_paths_are_faulted_and_delay_is_intact() {
    let up = upstream();
    let plan = FaultPlan { flip_bit: 1.0, only_path_containing: Some("objects/".into()), ..FaultPlan::default() };
    let proxy = FaultProxy::start(up.port, 8, plan);
    let mut conn = Conn::open(proxy.port());
    let r = conn.request("GET", "/manifest", None).unwrap().ok();
    assert_eq!((r.status, r.body == up.manifest), (200, true));
    let r = conn.request("GET", "/manifest", Some((100, 4195))).unwrap().ok();
    assert_eq!((r.status, &r.body[..]), (206, &up.manifest[100..4196]));
    let r = conn.request("GET", "/objects/x", Some((0, BLOCK - 1))).unwrap().ok();
    assert_ne!(r.body, block(&up.object, 0));
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.passed, c.flipped) = (3, 2, 1)));

    proxy.set_plan(FaultPlan { delay: 1.0, delay_max: Duration::from_millis(150), ..FaultPlan::default() });
    let start = Instant::now();
    for i in 0..4 {
        let r = conn.request("GET", "/objects/x", Some((i * BLOCK, (i + 1) * BLOCK - 1))).unwrap().ok();
        assert_eq!((r.status, r.body.as_slice()), (206, block(&up.object, i)));
    }
    assert!(start.elapsed() > Duration::from_millis(10), "4 random delays up to 150 ms took {:?}", start.elapsed());
    assert_eq!(proxy.counts(), counts(|c| (c.requests, c.passed, c.flipped, c.delayed) = (7, 2, 1, 4)));
}

/// Outcome of one request, coarse enough to be independent of timing.
fn outcome(port: u16, i: u64) -> (u16, usize, Option<io::ErrorKind>, Option<String>) {
    let r = get(port, "/objects/x", Some((i * BLOCK, (i + 1) * BLOCK - 1)));
    let error = r.error.map(|e| if e == io::ErrorKind::UnexpectedEof { e } else { io::ErrorKind::ConnectionReset });
    let len = if r.error.is_some() { 0 } else { r.body.len() };
    (r.status, len, error, r.header("content-range").map(str::to_string))
}

#[test]
fn same_seed_same_faults() {
    let up = upstream();
    let plan = FaultPlan {
        status_5xx: 0.1,
        status_429: 0.1,
        reset_mid_body: 0.1,
        truncate_body: 0.1,
        wrong_content_range: 0.1,
        flip_bit: 0.1,
        delay: 0.1,
        delay_max: Duration::from_millis(5),
        ..FaultPlan::default()
    };
    let a = FaultProxy::start(up.port, 9, plan.clone());
    let b = FaultProxy::start(up.port, 9, plan);
    let seq_a: Vec<_> = (0..40).map(|i| outcome(a.port(), i)).collect();
    let seq_b: Vec<_> = (0..40).map(|i| outcome(b.port(), i)).collect();
    assert_eq!(seq_a, seq_b);
    let c = a.counts();
    assert_eq!(c, b.counts());
    let faulted =
        c.delayed + c.resets + c.truncated + c.wrong_range + c.status_5xx + c.status_429 + c.flipped + c.stalled;
    assert_eq!((c.requests, c.passed + faulted), (40, 40));
    assert!(c.passed > 0 && faulted > 0, "{c:?}");
}
