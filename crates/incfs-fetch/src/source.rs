//! Where repository bytes come from: an HTTP(S) server, an S3-compatible bucket or a local
//! directory, all through `object_store` so that each is one ranged GET away.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, GetOptions, GetRange, GetResult, ObjectStore, RetryConfig};

use crate::body;

/// Redirects followed within a source's own origin before giving up.
const MAX_REDIRECTS: usize = 5;

/// Why bytes could not be had from a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: {key} does not exist")]
    NotFound { source_name: String, key: String },
    #[error("{source_name}: {key}: asked for bytes {start}..{end}, got {got}")]
    ShortRead { source_name: String, key: String, start: u64, end: u64, got: usize },
    #[error("{source_name}: {key}: asked for bytes {start}..{end}, the server sent more; refused")]
    LongRead { source_name: String, key: String, start: u64, end: u64 },
    #[error("{source_name}: {key} is larger than the {limit}-byte limit ({what}); refused")]
    TooLarge { source_name: String, key: String, limit: u64, what: String },
    #[error("{source_name}: {key}: {message}")]
    Other { source_name: String, key: String, message: String },
    #[error("cannot use {spec:?} as a source: {reason}")]
    Spec { spec: String, reason: String },
}

/// Network behaviour of a source.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub connect_timeout: Duration,
    /// Bound on one request, including its body.
    pub request_timeout: Duration,
    /// Retries of a failed request (with backoff), bounded by `request_timeout` overall.
    pub retries: usize,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions { connect_timeout: Duration::from_secs(5), request_timeout: Duration::from_secs(30), retries: 3 }
    }
}

/// A repository location.
#[derive(Debug, Clone)]
pub struct Source {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    name: String,
    /// A local directory: its ranged reads are exact by construction (and one `pread`, where
    /// streaming would come in 8 KiB chunks).
    local: bool,
    /// Moving average of the time ranged GETs took to their first byte (the response head),
    /// microseconds; zero until one did (and always, for a local directory).
    first_byte_us: Arc<AtomicU64>,
}

impl Source {
    /// Parse `http://…`, `https://…`, `s3://bucket/prefix` or a local directory path.
    ///
    /// S3 settings (endpoint, region, credentials) come from the usual `AWS_*` variables
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
    pub fn parse(spec: &str, opts: &SourceOptions) -> Result<Source, SourceError> {
        let err = |reason: String| SourceError::Spec { spec: spec.to_string(), reason };
        let client = ClientOptions::new()
            .with_allow_http(true)
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.request_timeout);
        let retry =
            RetryConfig { max_retries: opts.retries, retry_timeout: opts.request_timeout, ..Default::default() };
        if spec.starts_with("http://") || spec.starts_with("https://") {
            // No trailing slash: object_store appends each key segment after the last one, so
            // a base ending in "/" would ask for "/repo//manifest" (which nginx merges, but a
            // CDN or an S3 website endpoint treats as another key).
            let url = spec.trim_end_matches('/').to_string();
            let store = object_store::http::HttpBuilder::new()
                .with_url(url)
                .with_client_options(client)
                .with_http_connector(SameOriginConnector { opts: opts.clone() })
                .with_retry(retry)
                .build()
                .map_err(|e| err(e.to_string()))?;
            Ok(Source {
                store: Arc::new(store),
                prefix: String::new(),
                name: spec.to_string(),
                local: false,
                first_byte_us: Default::default(),
            })
        } else if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(err("no bucket name; write s3://BUCKET/PREFIX".into()));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(client)
                .with_retry(retry);
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| std::env::var("AWS_ENDPOINT_URL")) {
                b = b.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
            }
            let store = b.build().map_err(|e| err(e.to_string()))?;
            Ok(Source {
                store: Arc::new(store),
                prefix: prefix.trim_matches('/').to_string(),
                name: spec.to_string(),
                local: false,
                first_byte_us: Default::default(),
            })
        } else if spec.contains("://") {
            Err(err("unsupported scheme; use http://, https://, s3:// or a local directory".into()))
        } else {
            let path = std::fs::canonicalize(spec).map_err(|e| err(e.to_string()))?;
            if !path.is_dir() {
                return Err(err("not a directory".into()));
            }
            let store = object_store::local::LocalFileSystem::new_with_prefix(&path).map_err(|e| err(e.to_string()))?;
            Ok(Source {
                store: Arc::new(store),
                prefix: String::new(),
                name: path.display().to_string(),
                local: true,
                first_byte_us: Default::default(),
            })
        }
    }

    /// A source over any `object_store` implementation, with the repository at its root.
    ///
    /// For tests and embedders: an in-memory store, a store wrapped to add latency or faults,
    /// or one configured in ways [`Source::parse`] does not offer. `name` is used in messages.
    pub fn from_object_store(name: &str, store: Arc<dyn ObjectStore>) -> Source {
        Source { store, prefix: String::new(), name: name.to_string(), local: false, first_byte_us: Default::default() }
    }

    /// How long ranged GETs have recently taken to their first byte (a moving average): about
    /// the round trip to the server; zero before the first one, and for a local directory.
    pub fn first_byte_latency(&self) -> Duration {
        Duration::from_micros(self.first_byte_us.load(Relaxed))
    }

    /// The source as the user wrote it (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self, key: &str) -> StorePath {
        if self.prefix.is_empty() {
            StorePath::from(key)
        } else {
            StorePath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn map_err(&self, key: &str, e: object_store::Error) -> SourceError {
        match e {
            object_store::Error::NotFound { .. } => {
                SourceError::NotFound { source_name: self.name.clone(), key: key.to_string() }
            }
            e => SourceError::Other { source_name: self.name.clone(), key: key.to_string(), message: causes(&e) },
        }
    }

    /// The whole of `key`, refused ([`SourceError::TooLarge`]) past `limit` bytes: the
    /// server's declared size is checked first, then the body is read with that cap, so neither
    /// an absurd `Content-Length` nor an endless body makes us hold more than `limit`.
    pub async fn get(&self, key: &str, limit: u64) -> Result<Bytes, SourceError> {
        let r = self.store.get(&self.path(key)).await.map_err(|e| self.map_err(key, e))?;
        let too_large =
            |what: String| SourceError::TooLarge { source_name: self.name.clone(), key: key.to_string(), limit, what };
        if r.meta.size > limit {
            return Err(too_large(format!("the server declares {} bytes", r.meta.size)));
        }
        self.read_capped(key, r, limit, false).await?.ok_or_else(|| too_large("the body went on past it".into()))
    }

    /// Bytes `range` of `key`; anything but exactly that many bytes is an error (a body that
    /// goes on past the range is not read further).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, SourceError> {
        let (start, end) = (range.start, range.end);
        if self.local {
            let b = self.store.get_range(&self.path(key), range).await.map_err(|e| self.map_err(key, e))?;
            return self.exact(key, b, start, end);
        }
        let opts = GetOptions { range: Some(GetRange::Bounded(range.clone())), ..Default::default() };
        let asked = std::time::Instant::now();
        let r = self.store.get_opts(&self.path(key), opts).await.map_err(|e| self.map_err(key, e))?;
        let us = (asked.elapsed().as_micros() as u64).max(1);
        // A weight of 1/8 for each new one; updates that race lose one sample, harmlessly.
        let old = self.first_byte_us.load(Relaxed);
        self.first_byte_us.store(if old == 0 { us } else { (old * 7 + us) / 8 }, Relaxed);
        if r.range != range {
            let message = format!("asked for bytes {start}..{end}, the server answered with bytes {:?}", r.range);
            return Err(SourceError::Other { source_name: self.name.clone(), key: key.to_string(), message });
        }
        let len = end - start;
        let b = self.read_capped(key, r, len, true).await?.ok_or_else(|| SourceError::LongRead {
            source_name: self.name.clone(),
            key: key.to_string(),
            start,
            end,
        })?;
        self.exact(key, b, start, end)
    }

    /// `b` if it is exactly bytes `start..end`, else [`SourceError::ShortRead`].
    fn exact(&self, key: &str, b: Bytes, start: u64, end: u64) -> Result<Bytes, SourceError> {
        if b.len() as u64 != end - start {
            return Err(SourceError::ShortRead {
                source_name: self.name.clone(),
                key: key.to_string(),
                start,
                end,
                got: b.len(),
            });
        }
        Ok(b)
    }

    /// The body of `r`, or `None` once it passes `limit` bytes (reading stops there). A range
    /// we asked for (`exact`) of at least [`body::ALIGNED_MIN`] bytes is received into a
    /// page-aligned buffer ([`body::BodyBuf`]); otherwise a body that comes in one chunk (common
    /// for short ranges) is returned without a copy, and chunks are copied into one buffer as
    /// they come and dropped, so a body costs its size once, not twice. A buffer is sized up
    /// front only when `limit` is a size we chose (a range we asked for), never from what the
    /// server declares.
    async fn read_capped(
        &self,
        key: &str,
        r: GetResult,
        limit: u64,
        exact: bool,
    ) -> Result<Option<Bytes>, SourceError> {
        let mut stream = r.into_stream();
        let mut first: Option<Bytes> = None;
        let mut buf: Option<BytesMut> = None;
        let mut aligned =
            (exact && limit >= body::ALIGNED_MIN as u64).then(|| body::BodyBuf::with_room(limit as usize));
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await.transpose().map_err(|e| self.map_err(key, e))? {
            total += chunk.len() as u64;
            if total > limit {
                return Ok(None);
            }
            if let Some(a) = &mut aligned {
                if !a.extend(&chunk) {
                    return Ok(None); // cannot happen: within `limit`, for which it has room
                }
                continue;
            }
            match (&mut buf, first.take()) {
                (Some(buf), _) => buf.extend_from_slice(&chunk),
                (None, None) => first = Some(chunk),
                (None, Some(one)) => {
                    let room = if exact { limit as usize } else { 2 * total as usize };
                    let mut b = BytesMut::with_capacity(room);
                    b.extend_from_slice(&one);
                    b.extend_from_slice(&chunk);
                    buf = Some(b);
                }
            }
        }
        Ok(Some(match (aligned, buf, first) {
            (Some(a), _, _) => a.freeze(),
            (None, Some(buf), _) => buf.freeze(),
            (None, None, Some(one)) => one,
            (None, None, None) => Bytes::new(),
        }))
    }

    /// Size of `key`.
    pub async fn size(&self, key: &str) -> Result<u64, SourceError> {
        Ok(self.store.head(&self.path(key)).await.map_err(|e| self.map_err(key, e))?.size)
    }
}

/// An error with its causes ("request or response body error" says little; "operation timed
/// out" under it says what happened), each message once.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let m = c.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = c.source();
    }
    out
}

/// The HTTP client of an `http(s)://` source: the settings incfs gives object_store, plus a
/// redirect policy object_store does not offer. Redirects are followed (at most
/// [`MAX_REDIRECTS`]) only within the source's own scheme, host and port: a server may move a
/// path, but not send the client to a host the user did not name (another server, an address
/// inside the network, a metadata service). The bytes would be verified either way; what is
/// refused is being made to contact that host at all.
#[derive(Debug)]
struct SameOriginConnector {
    opts: SourceOptions,
}

impl HttpConnector for SameOriginConnector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            let first = &attempt.previous()[0];
            let to = attempt.url();
            let same = to.scheme() == first.scheme()
                && to.host_str() == first.host_str()
                && to.port_or_known_default() == first.port_or_known_default();
            if !same {
                let to = to.to_string();
                attempt.error(format!(
                    "the server redirected to another host ({to}); refused: incfs follows redirects only within \
                     the source's own host (name that address as the source if you trust it)"
                ))
            } else if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects; refused"))
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .user_agent(concat!("incfs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(self.opts.connect_timeout)
            .timeout(self.opts.request_timeout)
            .redirect(policy)
            // As object_store does: compression would hide the real Content-Length.
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .build()
            .map_err(|e| object_store::Error::Generic { store: "HTTP", source: Box::new(e) })?;
        Ok(HttpClient::new(client))
    }
}
