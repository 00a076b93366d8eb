//! An in-process object store for driving the fetch pipeline without HTTP.
//!
//! [`TestStore`] wraps `object_store`'s [`InMemory`] and implements [`ObjectStore`] by delegating
//! to it, adding on every GET (ranged or not; `get_range` and `head` arrive here as `get_opts`):
//!
//! - a fixed latency before the first byte;
//! - an optional bandwidth limit, shared by all requests like one network link: a response's
//!   body (after its head, which comes after the latency) is sent in chunks, each reserving its transfer time on the link in turn, so concurrent
//!   requests share the rate about evenly, and a request dropped midway frees it;
//! - counters: requests, bytes served, requests and bytes in flight now and at most, and a log
//!   of every request (key, range);
//! - faults: fail the next N requests with an error, or flip a byte of every response.
//!
//! Settings can be changed while requests run. Used by `tests/pipeline.rs` and by
//! `examples/pipeline_bench.rs` (through `#[path]`).
#![allow(dead_code)]

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};
use parking_lot::Mutex;

/// Bytes sent per reservation of the link when bandwidth is limited (at least; more at high
/// rates, so that each chunk lasts a few milliseconds and timer granularity does not matter).
const LINK_CHUNK: u64 = 64 << 10;
const LINK_CHUNK_TIME: Duration = Duration::from_millis(4);

/// One GET as the store saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub key: String,
    /// Bytes asked for (the whole object for an unranged GET; empty for a HEAD).
    pub range: Range<u64>,
    pub head: bool,
    /// Answered with an injected error.
    pub failed: bool,
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    pub bytes_served: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
    pub bytes_in_flight: u64,
    pub max_bytes_in_flight: u64,
    pub failures_injected: u64,
    pub bytes_corrupted: u64,
}

pub struct TestStore {
    inner: InMemory,
    latency_us: AtomicU64,
    wire: Arc<Wire>,
    log: Mutex<Vec<Request>>,
    fail_next: AtomicU64,
    flip: AtomicBool,
}

impl fmt::Debug for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestStore").field("counts", &self.counts()).finish_non_exhaustive()
    }
}

impl fmt::Display for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TestStore")
    }
}

impl Default for TestStore {
    fn default() -> Self {
        TestStore {
            inner: InMemory::new(),
            latency_us: AtomicU64::new(0),
            wire: Arc::new(Wire {
                bandwidth: AtomicU64::new(0),
                link: Mutex::new(Instant::now()),
                counts: Mutex::new(Counts::default()),
            }),
            log: Mutex::new(Vec::new()),
            fail_next: AtomicU64::new(0),
            flip: AtomicBool::new(false),
        }
    }
}

/// The link and the counters, shared with response bodies still being sent.
struct Wire {
    /// Bytes per second; 0: unlimited.
    bandwidth: AtomicU64,
    /// When the link is next free.
    link: Mutex<Instant>,
    counts: Mutex<Counts>,
}

/// Takes a request out of the in-flight counts when dropped (its body sent, or cancelled).
struct InFlight {
    wire: Arc<Wire>,
    bytes: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut c = self.wire.counts.lock();
        c.in_flight -= 1;
        c.bytes_in_flight -= self.bytes;
    }
}

impl TestStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Delay before each response's first byte.
    pub fn set_latency(&self, d: Duration) {
        self.latency_us.store(d.as_micros() as u64, SeqCst);
    }

    /// Limit the link shared by all responses to `bytes_per_sec` (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.wire.bandwidth.store(bytes_per_sec.unwrap_or(0), SeqCst);
    }

    /// Answer the next `n` GETs with an error.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, SeqCst);
    }

    /// Flip a bit of the middle byte of every response body while on.
    pub fn set_flip(&self, on: bool) {
        self.flip.store(on, SeqCst);
    }

    pub fn counts(&self) -> Counts {
        *self.wire.counts.lock()
    }

    /// Every request so far (since the last reset), in the order they arrived.
    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().clone()
    }

    /// Zero the counters (in-flight counts of running requests are kept) and clear the log.
    pub fn reset(&self) {
        let mut c = self.wire.counts.lock();
        *c = Counts {
            in_flight: c.in_flight,
            max_in_flight: c.in_flight,
            bytes_in_flight: c.bytes_in_flight,
            max_bytes_in_flight: c.bytes_in_flight,
            ..Counts::default()
        };
        self.log.lock().clear();
    }

    /// Store `bytes` under `key` (not counted as a request).
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) {
        self.inner.put(&Path::from(key), PutPayload::from(bytes)).await.expect("in-memory put");
    }

    /// Store every file under `dir` at its relative path (`/`-separated); dot files are left
    /// out. Returns the number of files stored.
    pub async fn load_dir(&self, dir: &std::path::Path) -> usize {
        let mut stack = vec![dir.to_path_buf()];
        let mut n = 0;
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let e = e.expect("read_dir entry");
                let path = e.path();
                if e.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if e.file_type().expect("file type").is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path.strip_prefix(dir).unwrap();
                let key: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                self.put_bytes(&key.join("/"), std::fs::read(&path).expect("read file")).await;
                n += 1;
            }
        }
        n
    }

    fn begin(&self, bytes: u64) -> InFlight {
        let mut c = self.wire.counts.lock();
        c.in_flight += 1;
        c.max_in_flight = c.max_in_flight.max(c.in_flight);
        c.bytes_in_flight += bytes;
        c.max_bytes_in_flight = c.max_bytes_in_flight.max(c.bytes_in_flight);
        InFlight { wire: self.wire.clone(), bytes }
    }
}

impl Wire {
    /// Send `len` bytes over the shared link, a chunk at a time.
    async fn transmit(&self, len: u64) {
        let mut left = len;
        while left > 0 {
            let rate = self.bandwidth.load(SeqCst);
            if rate == 0 {
                return;
            }
            let chunk = left.min(LINK_CHUNK.max((rate as f64 * LINK_CHUNK_TIME.as_secs_f64()) as u64));
            let done = {
                let mut free = self.link.lock();
                let start = (*free).max(Instant::now());
                *free = start + Duration::from_secs_f64(chunk as f64 / rate as f64);
                *free
            };
            tokio::time::sleep_until(done.into()).await;
            left -= chunk;
        }
    }
}

#[async_trait]
impl ObjectStore for TestStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        let result = self.inner.get_opts(location, options).await;
        let range = match &result {
            Ok(r) if !head => r.range.clone(),
            _ => 0..0,
        };
        let len = range.end - range.start;
        let fail = self.fail_next.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok();
        self.log.lock().push(Request { key: location.to_string(), range, head, failed: fail });
        self.wire.counts.lock().requests += 1;
        let _flight = self.begin(len);
        tokio::time::sleep(Duration::from_micros(self.latency_us.load(SeqCst))).await;
        if fail {
            self.wire.counts.lock().failures_injected += 1;
            return Err(object_store::Error::Generic { store: "TestStore", source: "injected failure".into() });
        }
        let r = result?;
        if head {
            return Ok(r);
        }
        let (meta, range, attributes) = (r.meta.clone(), r.range.clone(), r.attributes.clone());
        let bytes = r.bytes().await?;
        let bytes = if self.flip.load(SeqCst) && !bytes.is_empty() {
            let mut v = bytes.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x01;
            self.wire.counts.lock().bytes_corrupted += 1;
            Bytes::from(v)
        } else {
            bytes
        };
        self.wire.counts.lock().bytes_served += bytes.len() as u64;
        // The head goes out after the latency; the body takes its time on the link after it, as
        // over HTTP (a client sees its first byte before the last).
        let wire = self.wire.clone();
        let stream = futures::stream::once(async move {
            wire.transmit(bytes.len() as u64).await;
            drop(_flight);
            Ok(bytes)
        });
        Ok(GetResult { payload: GetResultPayload::Stream(stream.boxed()), meta, range, attributes })
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}
