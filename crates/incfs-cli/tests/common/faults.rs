//! An in-process HTTP/1.1 proxy on 127.0.0.1 that injects faults into responses.
//!
//! Tests of the fetcher's error handling put it between the mount (or any client) and a real
//! server (`incfs serve`, nginx). Every request read from a client connection (keep-alive is
//! supported) is decided on by one random draw against a [`FaultPlan`]; at most one fault applies
//! per request:
//!
//! - `status_5xx` / `status_429`: answered by the proxy (503, or 429 with `Retry-After: 0`) without
//!   contacting the server; with `burst_len > 1` the next `burst_len - 1` eligible requests fail the
//!   same way (an outage rather than a blip);
//! - `stall`, `reset_mid_body`, `truncate_body`: the response head (with the real
//!   `Content-Length`) and a random strict prefix of the body are sent, then the connection is held
//!   open silently, reset (`SO_LINGER` 0, then close: an RST) or closed cleanly (FIN);
//! - `wrong_content_range`: the `Content-Range` of a 206 names another range of the same length;
//!   the body is untouched;
//! - `flip_bit`: one random bit of the body is flipped;
//! - `delay`: the intact response is sent after a random delay of up to `delay_max`.
//!
//! Each request gets its own upstream connection (`Connection: close`); the whole upstream
//! response is read, then rewritten to the client with correct framing. Decisions come from one
//! `StdRng` seeded by the caller, so a client that sends the same requests in the same order meets
//! the same faults (same cut points, same flipped bits).
//!
//! Like `proxy::DelayProxy`, it runs on its own thread with its own tokio runtime, and dropping it
//! closes every connection (stalled ones included) without waiting on peers.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::runner::Runner;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};

/// Largest request head (request line and headers) accepted from a client.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted from a client.
const MAX_REQUEST_BODY: usize = 16 << 20;
/// Largest upstream response (head and body) the proxy buffers.
const MAX_RESPONSE: usize = 256 << 20;
/// Bound on one whole upstream exchange (connect, send, read to EOF).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean close waits for the client to close its side (so unread client bytes do not
/// turn the FIN into an RST).
const CLOSE_DRAIN: Duration = Duration::from_secs(1);
/// How long a reset waits for the partial body to leave the send queue before the RST.
const RESET_DRAIN: Duration = Duration::from_millis(200);

/// What to inject, as probabilities per request (each in `0.0..=1.0`; their sum should not exceed
/// 1: they are cumulative in the order 5xx, 429, stall, reset, truncate, wrong range, flip, delay).
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Probability a response is delayed by a random time up to `delay_max` (otherwise intact).
    pub delay: f64,
    pub delay_max: Duration,
    /// Send the head and part of the body, then reset the connection (`SO_LINGER` 0, then close).
    pub reset_mid_body: f64,
    /// Send the head (original `Content-Length`) and part of the body, then close cleanly (FIN).
    pub truncate_body: f64,
    /// Rewrite the `Content-Range` of a 206 to a different range of the same length; body untouched.
    pub wrong_content_range: f64,
    /// Answer 503 (no upstream contact), with a short body and `Content-Length`.
    pub status_5xx: f64,
    /// Answer 429 with `Retry-After: 0` (no upstream contact).
    pub status_429: f64,
    /// When a 5xx/429 fires, also fail the next `burst_len - 1` eligible requests the same way
    /// (0 or 1: single failures).
    pub burst_len: u32,
    /// Flip one random bit of the body (status and headers unchanged).
    pub flip_bit: f64,
    /// Send the head and part of the body, then nothing more; the connection stays open until the
    /// client closes it or the proxy is dropped.
    pub stall: f64,
    /// If set, only requests whose path contains this string may be faulted; others pass through.
    pub only_path_containing: Option<String>,
}

/// What the proxy did so far. `requests` counts every request read from a client; `passed` those
/// forwarded unmodified and undelayed (including ones whose drawn fault could not apply: a flip of
/// an empty body, a wrong range on a response that is not a 206 with a `Content-Range`). A request
/// whose upstream exchange failed (answered 502) is counted in `requests` only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub requests: u64,
    pub passed: u64,
    pub delayed: u64,
    pub resets: u64,
    pub truncated: u64,
    pub wrong_range: u64,
    pub status_5xx: u64,
    pub status_429: u64,
    pub flipped: u64,
    pub stalled: u64,
}

pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    _runner: Runner,
}

impl FaultProxy {
    /// Listen on 127.0.0.1 (random port, bound before this returns) and forward each request to
    /// 127.0.0.1:`upstream_port`, injecting faults per `plan` with an RNG seeded by `seed`.
    pub fn start(upstream_port: u16, seed: u64, plan: FaultPlan) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the fault proxy");
        listener.set_nonblocking(true).expect("making the fault proxy listener non-blocking");
        let port = listener.local_addr().expect("fault proxy listener address").port();

        let shared = Arc::new(Shared {
            upstream_port,
            state: Mutex::new(State { plan, rng: StdRng::seed_from_u64(seed), burst: None }),
            counters: Counters::default(),
        });
        let task_shared = shared.clone();
        let runner = Runner::spawn(format!("fault-proxy-{port}"), move |stop| accept_loop(listener, task_shared, stop));

        FaultProxy { port, shared, _runner: runner }
    }

    /// Replace the plan for requests arriving from now on; a burst in progress ends.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut state = self.shared.lock();
        state.plan = plan;
        state.burst = None;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Counters so far. Each is bumped before the corresponding response is written, so a client
    /// that has seen a response also sees it counted.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        FaultCounts {
            requests: get(&c.requests),
            passed: get(&c.passed),
            delayed: get(&c.delayed),
            resets: get(&c.resets),
            truncated: get(&c.truncated),
            wrong_range: get(&c.wrong_range),
            status_5xx: get(&c.status_5xx),
            status_429: get(&c.status_429),
            flipped: get(&c.flipped),
            stalled: get(&c.stalled),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Status5xx,
    Status429,
    Stall,
    Reset,
    Truncate,
    WrongRange,
    Flip,
    Delay,
}

/// The fate of one request, fixed when it arrives.
struct Decision {
    fault: Option<Fault>,
    /// Random bits for the fault's parameter (cut point, bit, range, delay), drawn with the choice
    /// so the RNG sequence depends only on the order of requests.
    param: u64,
    delay_max: Duration,
}

struct State {
    plan: FaultPlan,
    rng: StdRng,
    /// A 5xx/429 burst in progress: the fault and how many more eligible requests it takes.
    burst: Option<(Fault, u32)>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    passed: AtomicU64,
    delayed: AtomicU64,
    resets: AtomicU64,
    truncated: AtomicU64,
    wrong_range: AtomicU64,
    status_5xx: AtomicU64,
    status_429: AtomicU64,
    flipped: AtomicU64,
    stalled: AtomicU64,
}

struct Shared {
    upstream_port: u16,
    state: Mutex<State>,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    fn decide(&self, path: &str) -> Decision {
        let mut state = self.lock();
        let choice: f64 = state.rng.gen();
        let param: u64 = state.rng.gen();
        let delay_max = state.plan.delay_max;
        let eligible = state.plan.only_path_containing.as_deref().is_none_or(|s| path.contains(s));
        if !eligible {
            return Decision { fault: None, param, delay_max };
        }
        if let Some((fault, left)) = state.burst.take() {
            if left > 1 {
                state.burst = Some((fault, left - 1));
            }
            return Decision { fault: Some(fault), param, delay_max };
        }
        let p = &state.plan;
        let order = [
            (Fault::Status5xx, p.status_5xx),
            (Fault::Status429, p.status_429),
            (Fault::Stall, p.stall),
            (Fault::Reset, p.reset_mid_body),
            (Fault::Truncate, p.truncate_body),
            (Fault::WrongRange, p.wrong_content_range),
            (Fault::Flip, p.flip_bit),
            (Fault::Delay, p.delay),
        ];
        let mut cumulative = 0.0;
        let mut fault = None;
        for (f, probability) in order {
            if probability > 0.0 {
                cumulative += probability;
                if choice < cumulative {
                    fault = Some(f);
                    break;
                }
            }
        }
        if matches!(fault, Some(Fault::Status5xx | Fault::Status429)) && p.burst_len > 1 {
            state.burst = Some((fault.unwrap(), p.burst_len - 1));
        }
        Decision { fault, param, delay_max }
    }

    fn count(&self, counter: impl Fn(&Counters) -> &AtomicU64) {
        counter(&self.counters).fetch_add(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: std::net::TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let listener = TcpListener::from_std(listener).expect("registering the fault proxy listener");
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((client, _)) => {
                    tokio::spawn(connection(client, shared.clone()));
                }
                // E.g. EMFILE: back off briefly rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// A request read from a client.
struct Request {
    /// Request line without its CRLF.
    line: String,
    /// Header lines (name, value) in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    path: String,
    head: bool,
    /// The client asked for the connection to close after this response.
    close: bool,
}

enum ReadError {
    Io,
    /// Answer with this status and close.
    Reject(u16, &'static str),
}

/// How a client connection continues after a response.
enum Next {
    KeepAlive,
    Close,
    Reset,
    Stall,
    /// The client went away (write failed).
    Gone,
}

async fn connection(mut client: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let request = match read_request(&mut client, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReadError::Io) => return,
            Err(ReadError::Reject(code, reason)) => {
                let response = synthetic(code, reason, &[], false, true);
                if client.write_all(&response).await.is_ok() {
                    close_cleanly(client).await;
                }
                return;
            }
        };
        shared.count(|c| &c.requests);
        let decision = shared.decide(&request.path);
        match respond(&mut client, &shared, &request, decision).await {
            Next::KeepAlive => continue,
            Next::Close => return close_cleanly(client).await,
            Next::Reset => return reset(client).await,
            Next::Stall => return hold(client).await,
            Next::Gone => return,
        }
    }
}

/// Read one request (head, then a `Content-Length` body) from `client`; `buf` carries bytes read
/// past it (pipelining) to the next call. `Ok(None)` on a clean EOF between requests.
async fn read_request(client: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Request>, ReadError> {
    let head_end = loop {
        // Tolerate empty lines before a request (RFC 9112 section 2.2).
        let blank = buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        buf.drain(..blank);
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Reject(431, "Request Header Fields Too Large"));
        }
        let n = client.read_buf(buf).await.map_err(|_| ReadError::Io)?;
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(ReadError::Io) };
        }
    };
    if head_end > MAX_HEAD {
        return Err(ReadError::Reject(431, "Request Header Fields Too Large"));
    }
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| ReadError::Reject(400, "Bad Request"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for l in lines {
        let (name, value) = l.split_once(':').ok_or(ReadError::Reject(400, "Bad Request"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    buf.drain(..head_end + 4);

    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Reject(400, "Bad Request"));
    };
    if header(&headers, "transfer-encoding").is_some() {
        return Err(ReadError::Reject(501, "Not Implemented"));
    }
    let body_len = match header(&headers, "content-length") {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| ReadError::Reject(400, "Bad Request"))?,
    };
    if body_len > MAX_REQUEST_BODY {
        return Err(ReadError::Reject(413, "Content Too Large"));
    }
    while buf.len() < body_len {
        if client.read_buf(buf).await.map_err(|_| ReadError::Io)? == 0 {
            return Err(ReadError::Io);
        }
    }
    let body: Vec<u8> = buf.drain(..body_len).collect();

    // The path of an origin-form or absolute-form target, without its query.
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split('?').next().unwrap_or_default().to_string();
    let close = version != "HTTP/1.1" || has_token(&headers, "connection", "close");
    let head = method.eq_ignore_ascii_case("HEAD");
    Ok(Some(Request { line, headers, body, path, head, close }))
}

/// Answer `request` as `decision` says.
async fn respond(client: &mut TcpStream, shared: &Shared, request: &Request, decision: Decision) -> Next {
    let keep = if request.close { Next::Close } else { Next::KeepAlive };
    match decision.fault {
        Some(Fault::Status5xx) => {
            shared.count(|c| &c.status_5xx);
            let response = synthetic(503, "Service Unavailable", &[], request.head, request.close);
            return write(client, &response, keep).await;
        }
        Some(Fault::Status429) => {
            shared.count(|c| &c.status_429);
            let response = synthetic(429, "Too Many Requests", &[("Retry-After", "0")], request.head, request.close);
            return write(client, &response, keep).await;
        }
        _ => {}
    }

    let Ok(mut response) = exchange(shared.upstream_port, request).await else {
        let response = synthetic(502, "Bad Gateway", &[], request.head, true);
        return write(client, &response, Next::Close).await;
    };
    let param = decision.param;
    let len = response.body.len() as u64;
    // A strict prefix of the body (empty for an empty body).
    let cut = if len == 0 { 0 } else { (param % len) as usize };
    match decision.fault {
        Some(fault @ (Fault::Stall | Fault::Reset | Fault::Truncate)) => {
            let next = match fault {
                Fault::Stall => {
                    shared.count(|c| &c.stalled);
                    Next::Stall
                }
                Fault::Reset => {
                    shared.count(|c| &c.resets);
                    Next::Reset
                }
                _ => {
                    shared.count(|c| &c.truncated);
                    Next::Close
                }
            };
            let mut out = response.head(request.close);
            out.extend_from_slice(&response.body[..cut]);
            write(client, &out, next).await
        }
        Some(Fault::WrongRange) => {
            let rewritten = (response.code == 206)
                .then(|| header(&response.headers, "content-range"))
                .flatten()
                .and_then(|v| other_range(v, param));
            match rewritten {
                Some(value) => {
                    for (name, v) in &mut response.headers {
                        if name.eq_ignore_ascii_case("content-range") {
                            *v = value.clone();
                        }
                    }
                    shared.count(|c| &c.wrong_range);
                }
                None => shared.count(|c| &c.passed),
            }
            write(client, &response.full(request.close), keep).await
        }
        Some(Fault::Flip) => {
            if len == 0 {
                shared.count(|c| &c.passed);
            } else {
                let bit = param % (len * 8);
                response.body[(bit / 8) as usize] ^= 1 << (bit % 8);
                shared.count(|c| &c.flipped);
            }
            write(client, &response.full(request.close), keep).await
        }
        Some(Fault::Delay) => {
            shared.count(|c| &c.delayed);
            let max = u64::try_from(decision.delay_max.as_nanos()).unwrap_or(u64::MAX);
            let nanos = if max == u64::MAX { param } else { param % (max + 1) };
            tokio::time::sleep(Duration::from_nanos(nanos)).await;
            write(client, &response.full(request.close), keep).await
        }
        Some(Fault::Status5xx | Fault::Status429) | None => {
            shared.count(|c| &c.passed);
            write(client, &response.full(request.close), keep).await
        }
    }
}

async fn write(client: &mut TcpStream, bytes: &[u8], next: Next) -> Next {
    match client.write_all(bytes).await {
        Ok(()) => next,
        Err(_) => Next::Gone,
    }
}

/// FIN, then wait (bounded) for the client to close its side, discarding what it sends, so that
/// unread bytes do not make the kernel answer with an RST.
async fn close_cleanly(mut client: TcpStream) {
    if client.shutdown().await.is_err() {
        return;
    }
    let _ = timeout(CLOSE_DRAIN, drain(&mut client)).await;
}

/// Let the partial response leave the send queue (bounded), then close with an RST.
async fn reset(client: TcpStream) {
    let deadline = Instant::now() + RESET_DRAIN;
    while unsent(&client).is_some_and(|n| n > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = client.set_zero_linger();
    drop(client);
}

/// Keep the connection open, sending nothing, until the client closes it (or the task is dropped
/// with the runtime).
async fn hold(mut client: TcpStream) {
    drain(&mut client).await;
}

async fn drain(client: &mut TcpStream) {
    let mut scratch = [0u8; 4096];
    while matches!(client.read(&mut scratch).await, Ok(n) if n > 0) {}
}

/// Bytes written to `stream` that the kernel has not sent yet (`TIOCOUTQ`).
fn unsent(stream: &TcpStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    (r == 0).then_some(n)
}

/// An upstream response, read to EOF and parsed.
struct Response {
    /// Status line without its CRLF.
    line: String,
    code: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The response has no body whatever its headers say (HEAD, 204, 304), so its
    /// `Content-Length` is kept as the server sent it.
    bodiless: bool,
}

impl Response {
    /// The head for the client: the server's headers without hop-by-hop framing, with
    /// `Content-Length` set to the real body length.
    fn head(&self, close: bool) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line);
        for (name, value) in &self.headers {
            let framing = name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("keep-alive")
                || name.eq_ignore_ascii_case("transfer-encoding")
                || (!self.bodiless && name.eq_ignore_ascii_case("content-length"));
            if !framing {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        if !self.bodiless {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn full(&self, close: bool) -> Vec<u8> {
        let mut out = self.head(close);
        out.extend_from_slice(&self.body);
        out
    }
}

/// Send `request` to the server on a new connection and read its whole response.
async fn exchange(port: u16, request: &Request) -> io::Result<Response> {
    let work = async {
        let mut server = TcpStream::connect(("127.0.0.1", port)).await?;
        let _ = server.set_nodelay(true);
        let mut out = format!("{}\r\n", request.line);
        for (name, value) in &request.headers {
            if !name.eq_ignore_ascii_case("connection") && !name.eq_ignore_ascii_case("keep-alive") {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&request.body);
        server.write_all(&out).await?;
        let mut raw = Vec::new();
        (&mut server).take(MAX_RESPONSE as u64 + 1).read_to_end(&mut raw).await?;
        if raw.len() > MAX_RESPONSE {
            return Err(io::Error::other("upstream response too large"));
        }
        parse_response(raw, request.head)
    };
    timeout(UPSTREAM_TIMEOUT, work).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream timed out"))?
}

fn parse_response(raw: Vec<u8>, head_request: bool) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad upstream response: {what}"));
    let mut start = 0;
    loop {
        let end = start + find(&raw[start..], b"\r\n\r\n").ok_or_else(|| bad("no end of head"))?;
        let head = std::str::from_utf8(&raw[start..end]).map_err(|_| bad("head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or_default().to_string();
        let code: u16 = line
            .split_ascii_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .filter(|_| line.starts_with("HTTP/1."))
            .ok_or_else(|| bad("status line"))?;
        let mut headers = Vec::new();
        for l in lines {
            let (name, value) = l.split_once(':').ok_or_else(|| bad("header line"))?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        let rest = &raw[end + 4..];
        if (100..200).contains(&code) {
            // An interim response (100 Continue, 103 Early Hints): the real one follows.
            start = end + 4;
            continue;
        }
        let bodiless = head_request || code == 204 || code == 304;
        let body = if bodiless {
            Vec::new()
        } else if has_token(&headers, "transfer-encoding", "chunked") {
            dechunk(rest).ok_or_else(|| bad("chunked body"))?
        } else if let Some(v) = header(&headers, "content-length") {
            let n: usize = v.parse().map_err(|_| bad("Content-Length"))?;
            rest[..n.min(rest.len())].to_vec()
        } else {
            rest.to_vec()
        };
        return Ok(Response { line, code, headers, body, bodiless });
    }
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = find(rest, b"\r\n")?;
        let size_field = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some(body); // trailers, if any, are dropped
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// `Content-Range: bytes A-B/TOTAL` rewritten to another range of the same length: within the
/// resource when there is room, else just past the original range.
fn other_range(value: &str, param: u64) -> Option<String> {
    let (unit, rest) = value.trim().split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = rest.trim().split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    let len = b.checked_sub(a)? + 1;
    let start = match total.trim().parse::<u64>() {
        // Starts 0..=t-len are valid; pick one of them other than `a`.
        Ok(t) if t > len => {
            let k = param % (t - len);
            if k >= a {
                k + 1
            } else {
                k
            }
        }
        _ => a.checked_add(len)?,
    };
    Some(format!("bytes {}-{}/{}", start, start.checked_add(len - 1)?, total.trim()))
}

/// A 503/429/502/4xx answered by the proxy itself, with a short body.
fn synthetic(code: u16, reason: &str, extra: &[(&str, &str)], head_request: bool, close: bool) -> Vec<u8> {
    let body = format!("{code} {reason} (injected by the fault proxy)\n");
    let mut out = format!("HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if !head_request {
        out.push_str(&body);
    }
    out.into_bytes()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Whether any `name` header lists `token` (comma-separated, case-insensitive).
fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
