//! A hostile HTTP/1.1 server on 127.0.0.1: it serves a real repository directory (whole GETs and
//! `Range: bytes=A-B` GETs, keep-alive), except where its current [`Lie`] says otherwise.
//!
//! Blocking I/O, a thread per connection: a lie that streams forever only ends when the client
//! closes its side (a write then fails), so nothing outlives the client. Dropping the server
//! stops accepting.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// How the server misbehaves (whole GETs are the manifest and the profile; ranged GETs are the
/// objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// None: a plain, correct server.
    Honest,
    /// Whole GETs: `200` declaring `Content-Length: 1099511627776` (1 TiB), then the real bytes
    /// and silence.
    AbsurdLength,
    /// Whole GETs: `200` with a 10 GiB `Content-Length` and zeros streamed for as long as the
    /// client reads.
    TenGibBody,
    /// Whole GETs: `200`, chunked, zeros forever.
    EndlessChunked,
    /// Ranged GETs: `206` with the right `Content-Range` but a body (and `Content-Length`) 1 MiB
    /// longer than the range.
    LongRangeBody,
    /// Ranged GETs: `200` with the whole file, as a server without range support would.
    WholeForRange,
    /// Ranged GETs: no answer at all; the connection is held until the client closes it.
    StallRange,
    /// Ranged GETs: the right range, with a byte in every 1000 of the body flipped (a mirror
    /// serving damaged or forged data).
    FlipRange,
    /// Whole GETs: `200` with the right `Content-Length`, half the body, then silence with the
    /// connection held open.
    StallBody,
    /// HEAD requests: `200` declaring 1 TiB; GETs are honest.
    HeadLies,
    /// Every request: `302` to the same path on another host (`localhost` instead of
    /// `127.0.0.1`, same port: a client that follows it gets honest answers there).
    RedirectAway,
    /// Every request: `302` to a path on the same host (`/moved/...`), which serves it.
    RedirectHere,
}

pub struct HostileServer {
    pub port: u16,
    lie: Arc<Mutex<Lie>>,
    stop: Arc<AtomicBool>,
}

impl HostileServer {
    /// Serve `root` (its files by path below it) on a free port of 127.0.0.1.
    pub fn start(root: &Path, lie: Lie) -> HostileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (lie, stop) = (Arc::new(Mutex::new(lie)), Arc::new(AtomicBool::new(false)));
        let (root, l, s) = (root.to_path_buf(), lie.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (root, lie) = (root.clone(), l.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &root, &lie, port);
                });
            }
        });
        HostileServer { port, lie, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn set(&self, lie: Lie) {
        *self.lie.lock() = lie;
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}

const NOT_FOUND: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";

fn serve(conn: TcpStream, root: &Path, lie: &Mutex<Lie>, port: u16) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    // Bounds a request head that never comes; writes fail once the client is gone.
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("range") {
                    range = parse_range(value.trim());
                }
            }
        }
        let lie = *lie.lock();
        let (moved, target) = match target.strip_prefix("/moved") {
            Some(t) => (true, t.to_string()),
            None => (false, target),
        };
        match lie {
            Lie::RedirectAway if !moved => {
                let to = format!("http://localhost:{port}/moved{target}");
                write!(out, "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            }
            Lie::RedirectHere if !moved => {
                write!(out, "HTTP/1.1 302 Found\r\nLocation: /moved{target}\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            }
            _ => {}
        }
        // Strict about paths, as a CDN or an S3 website endpoint is: "a//b" is not "a/b".
        if target.contains("//") {
            out.write_all(NOT_FOUND)?;
            continue;
        }
        let path: PathBuf = root.join(target.trim_start_matches('/'));
        let Ok(mut body) = std::fs::read(&path) else {
            out.write_all(NOT_FOUND)?;
            continue;
        };
        let head_only = method == "HEAD";
        if head_only && lie == Lie::HeadLies {
            write!(out, "HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n")?;
            continue;
        }
        match (range, lie) {
            (None, Lie::AbsurdLength) => {
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n")?;
                out.write_all(&body)?;
                let mut sink = [0u8; 1];
                let _ = reader.read(&mut sink); // silence until the client gives up
                return Ok(());
            }
            (None, Lie::TenGibBody) => {
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 10u64 << 30)?;
                let zeros = vec![0u8; 1 << 16];
                loop {
                    out.write_all(&zeros)?;
                }
            }
            (None, Lie::EndlessChunked) => {
                write!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
                let zeros = vec![0u8; 1 << 16];
                loop {
                    write!(out, "{:x}\r\n", zeros.len())?;
                    out.write_all(&zeros)?;
                    out.write_all(b"\r\n")?;
                }
            }
            (None, Lie::StallBody) if !head_only => {
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())?;
                out.write_all(&body[..body.len() / 2])?;
                let mut sink = [0u8; 1];
                while matches!(reader.read(&mut sink), Ok(1)) {}
                return Ok(());
            }
            (None, _) => {
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())?;
            }
            (Some(_), Lie::StallRange) => {
                let mut sink = [0u8; 1];
                while matches!(reader.read(&mut sink), Ok(1)) {}
                return Ok(());
            }
            (Some(_), Lie::WholeForRange) => {
                write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())?;
            }
            (Some((a, b)), _) => {
                let size = body.len() as u64;
                let b = b.min(size.saturating_sub(1));
                if a > b {
                    write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n\r\n")?;
                    continue;
                }
                body = body[a as usize..=b as usize].to_vec();
                if lie == Lie::LongRangeBody {
                    body.extend(std::iter::repeat_n(0xA5u8, 1 << 20));
                }
                if lie == Lie::FlipRange {
                    // Every answer of more than a few bytes is wrong somewhere: in hash blocks
                    // and block records as well as in data.
                    for at in (17..body.len()).step_by(1000) {
                        body[at] ^= 0x40;
                    }
                }
                write!(
                    out,
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{size}\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )?;
            }
        }
        if !head_only {
            out.write_all(&body)?;
        }
    }
}

/// `bytes=A-B` or `bytes=A-` (one range only).
fn parse_range(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    Some((a.parse().ok()?, if b.is_empty() { u64::MAX } else { b.parse().ok()? }))
}
