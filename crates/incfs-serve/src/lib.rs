//! `incfs serve`: a static file server for a repository directory.
//!
//! incfs needs nothing from a server but GET and HEAD with a single `Range:` (any static server,
//! CDN or object store will do); this one exists so that the quick start and the tests need no
//! other software. It answers `206` with `Content-Range` for one satisfiable range, `416` for an
//! unsatisfiable one, a plain `200` when the range header is absent, malformed or asks for
//! several ranges (which RFC 9110 allows a server to ignore), and `304` for a matching
//! `If-None-Match`. It serves only plain files whose every path segment is made of
//! `[A-Za-z0-9._-]` and does not start with a dot, so `..`, hidden files (locks, temporaries of a
//! running pack) and anything outside the root are never reachable. Accepted sockets get
//! `TCP_NODELAY`: without it, ranged GETs on loopback stall on delayed ACKs.
//!
//! Its headers let any HTTP cache between it and many clients (a caching proxy, a CDN) keep
//! what it serves ([`cache_headers`]): objects and version manifests never change once written,
//! so they are `immutable` for a year with their content digest as `ETag`; `manifest` and
//! `profile` are replaced in place, so caches keep them for a few seconds only.

use std::io::SeekFrom;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

/// Counters of what the server sent, for logs and tests.
#[derive(Debug, Default)]
pub struct ServeStats {
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
}

#[derive(Clone)]
struct AppState {
    root: Arc<PathBuf>,
    stats: Arc<ServeStats>,
}

/// Build the router serving `root`.
pub fn router(root: PathBuf, stats: Arc<ServeStats>) -> Router {
    Router::new().fallback(handle).with_state(AppState { root: Arc::new(root), stats })
}

/// Serve `root` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    root: PathBuf,
    stats: Arc<ServeStats>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(root, stats).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// The file a request path names, if it is a servable name.
fn resolve(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let mut path = root.to_path_buf();
    let mut any = false;
    for seg in uri_path.split('/').filter(|s| !s.is_empty()) {
        let ok = !seg.starts_with('.') && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return None;
        }
        path.push(seg);
        any = true;
    }
    any.then_some(path)
}

/// A single byte range requested, resolved against the file length.
#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Serve the whole file (no header, a malformed one, or several ranges).
    Whole,
    /// Serve bytes `start..=end`.
    Part(u64, u64),
    Unsatisfiable,
}

/// Parse `bytes=A-B`, `bytes=A-` or `bytes=-N` (RFC 9110 section 14.1.2). Written by hand because
/// the one rule that matters here is easy and a crate we tried rejects suffix ranges longer than
/// the file, which the RFC says must return the whole file.
fn parse_range(value: Option<&HeaderValue>, len: u64) -> RangeRequest {
    let Some(spec) = value.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.is_empty(), num(a), num(b)) {
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part(len.saturating_sub(n), len - 1)
            }
        }
        (false, Some(start), end) if b.is_empty() || end.is_some() => {
            if end.is_some_and(|e| e < start) {
                return RangeRequest::Whole;
            }
            if start >= len {
                return RangeRequest::Unsatisfiable;
            }
            RangeRequest::Part(start, end.unwrap_or(u64::MAX).min(len - 1))
        }
        _ => RangeRequest::Whole,
    }
}

/// How long caches may keep what is at `path` (`Cache-Control`), and a strong `ETag` when the
/// path names its content. Objects are named by the SHA-256 of their bytes, and a published
/// `versions/N.manifest` is never rewritten (pack refuses a version that is not newer): both are
/// kept for a year and never revalidated. `manifest` and `profile` change with every pack: kept
/// 5 s, which bounds how late a client behind a cache sees a new version.
pub fn cache_headers(path: &str) -> (&'static str, Option<String>) {
    const IMMUTABLE: &str = "public, max-age=31536000, immutable";
    let path = path.trim_start_matches('/');
    if let Some(name) = path.strip_prefix("objects/") {
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return (IMMUTABLE, Some(format!("\"{name}\"")));
        }
    }
    if path.starts_with("versions/") {
        return (IMMUTABLE, None);
    }
    ("public, max-age=5", None)
}

fn status(code: StatusCode) -> Response<Body> {
    Response::builder().status(code).body(Body::empty()).unwrap()
}

async fn handle(State(state): State<AppState>, req: Request<Body>) -> Response<Body> {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = status(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(path) = resolve(&state.root, req.uri().path()) else {
        return status(StatusCode::NOT_FOUND);
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return status(StatusCode::NOT_FOUND),
        Err(_) => return status(StatusCode::FORBIDDEN),
    };
    let md = match file.metadata().await {
        Ok(md) if md.is_file() => md,
        _ => return status(StatusCode::NOT_FOUND),
    };
    let len = md.len();
    let stat_etag =
        || format!("\"{:x}-{:x}-{:x}\"", md.ino(), len, md.mtime() as u64 * 1_000_000_000 + md.mtime_nsec() as u64);
    let (cache_control, etag) = cache_headers(req.uri().path());
    let etag = etag.unwrap_or_else(stat_etag);
    let mut response = respond(req.headers(), file, len, &etag, head).await;
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache_control));
    if let Some(l) = response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if !head {
            state.stats.body_bytes.fetch_add(l, Ordering::Relaxed);
        }
    }
    tracing::debug!("{} {} -> {}", req.method(), req.uri().path(), response.status());
    response
}

async fn respond(headers: &HeaderMap, mut file: tokio::fs::File, len: u64, etag: &str, head: bool) -> Response<Body> {
    let builder = Response::builder()
        .header(header::ETAG, etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return builder.status(StatusCode::NOT_MODIFIED).body(Body::empty()).unwrap();
    }
    // A range applies only if If-Range (when present) still names this version of the file.
    let if_range_ok = headers.get(header::IF_RANGE).is_none_or(|v| v.to_str().ok() == Some(etag));
    let range = if if_range_ok { parse_range(headers.get(header::RANGE), len) } else { RangeRequest::Whole };
    let (code, start, count, builder) = match range {
        RangeRequest::Whole => (StatusCode::OK, 0, len, builder),
        RangeRequest::Part(s, e) => (
            StatusCode::PARTIAL_CONTENT,
            s,
            e - s + 1,
            builder.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{len}")),
        ),
        RangeRequest::Unsatisfiable => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .header(header::CONTENT_LENGTH, "0")
                .body(Body::empty())
                .unwrap();
        }
    };
    let builder = builder.status(code).header(header::CONTENT_LENGTH, count.to_string());
    if head {
        return builder.body(Body::empty()).unwrap();
    }
    if start > 0 && file.seek(SeekFrom::Start(start)).await.is_err() {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let stream = ReaderStream::with_capacity(file.take(count), 256 << 10);
    builder.body(Body::from_stream(stream)).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 100), Whole);
        assert_eq!(parse_range(Some(&hv("bytes=0-9")), 100), Part(0, 9));
        assert_eq!(parse_range(Some(&hv("bytes=90-")), 100), Part(90, 99));
        assert_eq!(parse_range(Some(&hv("bytes=90-500")), 100), Part(90, 99));
        assert_eq!(parse_range(Some(&hv("bytes=-10")), 100), Part(90, 99));
        assert_eq!(parse_range(Some(&hv("bytes=-1000")), 100), Part(0, 99));
        assert_eq!(parse_range(Some(&hv("bytes=100-")), 100), Unsatisfiable);
        assert_eq!(parse_range(Some(&hv("bytes=-0")), 100), Unsatisfiable);
        assert_eq!(parse_range(Some(&hv("bytes=0-1,5-6")), 100), Whole);
        assert_eq!(parse_range(Some(&hv("bytes=5-1")), 100), Whole);
        assert_eq!(parse_range(Some(&hv("bytes=a-b")), 100), Whole);
        assert_eq!(parse_range(Some(&hv("items=0-1")), 100), Whole);
        assert_eq!(parse_range(Some(&hv("bytes=0-0")), 0), Unsatisfiable);
    }

    #[test]
    fn what_never_changes_is_immutable_and_the_rest_short_lived() {
        let digest = "ab".repeat(32);
        let (cc, etag) = cache_headers(&format!("/objects/{digest}"));
        assert!(cc.contains("immutable") && cc.contains("max-age=31536000"));
        assert_eq!(etag, Some(format!("\"{digest}\"")));
        assert!(cache_headers("/versions/3.manifest").0.contains("immutable"));
        for p in ["/manifest", "/profile", "/objects/not-a-digest"] {
            assert_eq!(cache_headers(p), ("public, max-age=5", None), "{p}");
        }
    }

    #[test]
    fn only_plain_names_resolve() {
        let root = Path::new("/srv");
        assert_eq!(resolve(root, "/objects/ab12"), Some(PathBuf::from("/srv/objects/ab12")));
        assert_eq!(resolve(root, "/manifest"), Some(PathBuf::from("/srv/manifest")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/.lock"), None);
        assert_eq!(resolve(root, "/objects/%2e%2e"), None);
        assert_eq!(resolve(root, "/"), None);
    }
}
