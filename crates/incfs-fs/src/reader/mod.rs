//! The read path: FUSE read -> leaf hash (verified tree) -> local store, or fetch, verify, store.
//!
//! [`Reader::read_local`] is synchronous and never touches the network or the async runtime: it
//! serves a read entirely from memory and the store, or says what is missing ([`Need`]). The
//! asynchronous [`Reader::read`] fetches what is missing (metadata pieces, then blocks with
//! readahead, coalesced into ranged GETs and shared between concurrent readers) and tries again.
//! Blocks may also be *filled* from outside ([`Reader::fill`]: a data loader, `incfs fill`); a
//! waiting read wakes whenever one arrives. Every block, wherever it comes from, is hashed and
//! compared with its leaf in the file's Merkle tree before a byte of it is returned or stored;
//! every hash block is checked against its parent, up to the signed root.
//!
//! The steps, each in a module of its own:
//! - [`serve`]: answer a read from what is local, or say what it needs (synchronous);
//! - [`meta`]: the tree and block records a read needs, local or fetched (single flight);
//! - [`plan`]: which blocks to fetch, in which runs (one ranged GET each);
//! - [`fetch`]: the requests in flight, shared by every read that waits for them, readahead
//!   bounded by slots;
//! - [`accept`]: verify each fetched or filled block, store the good ones, stage them for the
//!   reader about to read them.
//!
//! [`Reader::read`] drives them: serve; on a need, fetch it (metadata first, then blocks); serve
//! again. A FUSE read that needs the network is answered by the task that completes it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use incfs_fetch::image::verify_block;
use incfs_format::block_map::{BlockRecord, FileMetaLayout, BLOCK_RECORD_SIZE};
use incfs_format::compact_map::CompactMap;
use incfs_format::manifest::{FileData, ObjectRef};
use incfs_format::{layout, Codec, Hash, BLOCK_SIZE};
use incfs_store::{FileKey, NewBlock, Store};
use incfs_verity::{check_hash_block, hash_data_block, Geometry, HASHES_PER_BLOCK, HASH_SIZE};
use parking_lot::{Mutex, RwLock};
use quick_cache::sync::Cache;

mod accept;
mod fetch;
mod meta;
mod plan;
mod serve;

use accept::Staged;
use meta::{MapWeight, COMPACT_MAPS_BYTES};

pub(crate) use fetch::get_counted;
pub(crate) use plan::group_runs;

use crate::mirrors::Mirrors;
use crate::nearby::Nearby;
use crate::pending::Pending;
use crate::presence::Presence;
use crate::served::{Block, RunBlock, Served};
use crate::stats::{FailCause, Stats};

/// The object of a file pushed into the mount (`incfs add`): it lies in no source; its tree is
/// held by the reader ([`Reader::push_tree`], the metadata offset indexes it) and its blocks
/// come only from fills.
pub const PUSHED_OBJECT: u32 = u32::MAX;

/// Metadata regions are cached in pieces of this size.
pub const META_CHUNK: u64 = 64 << 10;
/// A file whose span (its blocks and metadata region, back to back as pack writes them) is at
/// most this long is fetched whole at its first read: one request instead of two round trips.
pub const SMALL_SPAN: u64 = 1 << 20;
/// The in-flight key of a span fetch (a metadata "group" no region has).
const SPAN_GROUP: u64 = u64::MAX;
/// ... and fetched this many pieces at a time (1 MiB: the leaves of 128 MiB of data, or the
/// block records of 256 MiB), so a sequential read of a large file waits for metadata rarely.
const META_PIECES_PER_FETCH: u64 = 16;
/// Largest ranged GET for a run of blocks. A readahead window is cut into requests of this size
/// that run in parallel: one HTTP stream rarely fills a link, several do.
pub const MAX_RUN_BYTES: u64 = 2 << 20;
/// Most blocks in one run (2 MiB of file): a run of compressible blocks is decoded into one
/// buffer that its staged blocks share, so this, not [`MAX_RUN_BYTES`], bounds the memory a
/// request of text takes (with 4 MiB runs, decode buffers were 31 MiB of the daemon's peak).
pub const MAX_RUN_BLOCKS: usize = 512;
/// Readahead and background requests in flight at once, by default (`--parallel`). With
/// [`MAX_RUN_BYTES`], the bound on fetched bytes buffered for them: 16 MiB (32 MiB on a long
/// link: [`LONG_LINK`]).
pub const DEFAULT_PARALLEL: usize = 8;
/// A link whose requests take this long to their first byte (a moving average of recent ones:
/// the round trip, not the transfer, so a slow link is not taken for a long one) is long:
/// keeping it busy takes more bytes in flight than 8 requests of 2 MiB (at 20 ms, 16 MiB per
/// round trip is 800 MB/s at best, before any wait of ours), so it gets twice the requests in
/// flight and twice the readahead window. Measured on a cold 1 GiB read (nginx,
/// tools/delay-proxy, page cache dropped): 50 ms RTT 4.3 -> 2.7-2.9 s, 20 ms 2.2 -> 1.9-2.0 s.
/// Four times the window read no faster at 20 ms and cost more CPU (blocks fetched ahead pushed
/// out of staging unread); on loopback the larger settings were slower (CPU-bound: more
/// requests only queue) and took 110+ MiB.
pub const LONG_LINK: Duration = Duration::from_millis(15);

/// A sequential reader's metadata is fetched this many blocks (64 MiB of file; twice that on
/// a long link) beyond its readahead window: a piece group covers 128 MiB of leaves or 256 MiB
/// of block records, and planning that waited for the next group (a round trip and 1 MiB) held
/// every request behind it (at 20 ms RTT, ten stalls of 25-70 ms in a 1 GiB read).
const META_LOOKAHEAD: u64 = 16384;

/// Most metadata pieces whose mirror [`Reader`] remembers.
const META_FROM_MAX: usize = 1 << 16;
/// After a read of a file fails for want of data, further reads of that file that need the
/// network fail at once for this long. The kernel retries a failed readahead with a synchronous
/// read right away; without this, one `read(2)` would wait out the timeout twice.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);

/// A file as the reader sees it.
#[derive(Debug, Clone)]
pub struct FileRef {
    pub data: FileData,
    pub key: FileKey,
    /// Path, for log messages.
    pub label: Arc<str>,
}

/// What a local read lacked.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    /// A piece of the file's metadata region.
    Meta { chunk: u64 },
    /// Data blocks (block indices, ascending).
    Blocks(Vec<u64>),
}

/// Why a read cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFailure {
    pub cause: FailCause,
    pub message: String,
}

#[derive(Debug)]
pub enum Local {
    Need(Need),
    Fail(ReadFailure),
}

fn fail(cause: FailCause, message: impl Into<String>) -> Local {
    Local::Fail(ReadFailure { cause, message: message.into() })
}

/// Outcome of one ranged GET of a run of blocks: the leaves that could not be had, and why.
#[derive(Debug, Default)]
pub(crate) struct RunOutcome {
    pub failed: HashMap<Hash, ReadFailure>,
}

type SharedRun = Shared<BoxFuture<'static, Arc<RunOutcome>>>;
type MetaFlights = Mutex<HashMap<(u32, u64, u64), SharedMeta>>;
/// (object, region offset, piece) -> the mirror that sent it.
type MetaFrom = Mutex<HashMap<(u32, u64, u64), usize>>;
type ColdHook = Arc<dyn Fn(&FileKey) + Send + Sync>;
type SharedMeta = Shared<BoxFuture<'static, Result<Arc<Vec<Arc<Vec<u8>>>>, ReadFailure>>>;

pub struct Reader {
    /// The object table of the newest version mounted. Tables only grow from one version to the
    /// next (format section 3.2), so files of older versions find their objects here too.
    objects: RwLock<Arc<[ObjectRef]>>,
    store: Arc<Store>,
    mirrors: Arc<Mirrors>,
    pub stats: Arc<Stats>,
    pub presence: Presence,
    /// Verified hash blocks: (content, level, index) -> hashes.
    hashes: Cache<(FileKey, u8, u64), Arc<Vec<Hash>>>,
    /// Metadata pieces: (object, region offset, chunk) -> bytes (unverified).
    meta: Cache<(u32, u64, u64), Arc<Vec<u8>>>,
    /// Blocks verified recently (fetched or read), decoded: a sequential reader is served from
    /// here without a store round trip and a second hash.
    verified: Cache<Hash, Arc<[u8; BLOCK_SIZE]>>,
    inflight: Mutex<HashMap<Hash, SharedRun, rustc_hash::FxBuildHasher>>,
    /// Every known metadata region, as (object, start, end), sorted: where a file's span begins
    /// (the end of the region before it in the same object, as pack lays them out).
    regions: RwLock<Arc<Vec<(u32, u64, u64)>>>,
    /// Neighbours' spans fetched along with a cold small file's, and how far to reach for them
    /// on either side (`--nearby`).
    nearby: Nearby,
    nearby_reach: AtomicU64,
    /// Told when a read finds a file cold (its metadata not local): background completion
    /// fetches its neighbours next.
    cold_hook: RwLock<Option<ColdHook>>,
    /// Metadata fetches in flight: (object, region offset, piece group).
    inflight_meta: Arc<MetaFlights>,
    /// Which mirror sent each metadata piece fetched by this daemon: a piece that fails
    /// verification (a hash block, or a block record that named wrong bytes) is held against
    /// it ([`Mirrors::lied`]). Bounded by [`META_FROM_MAX`] (then forgotten wholesale: only the
    /// attribution is lost, never a check).
    meta_from: Arc<MetaFrom>,
    /// Blocks fetched ahead of a sequential reader, decoded and verified, until it reads them
    /// (taken then) or [`STAGED_MAX`] newer ones push them out: no second decode and hash.
    staged: Mutex<Staged>,
    recent_failures: Mutex<HashMap<FileKey, (Instant, ReadFailure)>>,
    zero_hash: Hash,
    /// Reads waiting for the network now: background fetching holds back while any do.
    demand: AtomicUsize,
    /// When the last read waiting for the network ended (microseconds since `born`).
    demand_ended_us: AtomicU64,
    born: Instant,
    /// Woken whenever a read starts waiting for the network: background requests in flight
    /// give way (they are cancelled and made again later).
    pub demand_began: tokio::sync::Notify,
    /// Reads waiting now, and the read log.
    pub pending: Pending,
    /// Counts fills (good or bad): a waiting read looks again whenever it moves.
    filled: tokio::sync::watch::Sender<u64>,
    /// Blocks a fill got wrong, with the fill count and instant at that moment: reads that were
    /// waiting for them then fail (verification) instead of waiting out their timeout, and so do
    /// reads of them for [`FAILURE_MEMORY`] after (the kernel's retry of a failed readahead),
    /// until a good fill replaces them.
    bad_fills: Mutex<HashMap<(FileKey, u64), BadFill>>,
    /// Data blocks come only from fills (a data loader), never from the sources.
    fills_only: AtomicBool,
    /// Compact Merkle trees of pushed files (checked against their roots when pushed).
    pushed: RwLock<Vec<Arc<Vec<u8>>>>,
    /// Compact maps decoded (they matched their signed roots), by region; at most
    /// [`COMPACT_MAPS_BYTES`] of them.
    compacts: Cache<(u32, u64), Arc<CompactMap>, MapWeight>,
    /// Pieces of dense regions rebuilt from compact maps, keyed as `meta`'s pieces (which, for
    /// such files, hold the map's own bytes).
    compact_dense: Cache<(u32, u64, u64), Arc<Vec<u8>>>,
    /// Requests that are not a read's own (readahead, background completion) take a slot
    /// each: bounds their number in flight, and so the bytes they buffer.
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
    /// Readahead runs verified and stored at once: one per core, in arrival order. All at once, a burst of runs shared the cores and finished together,
    /// late, and no new request went out meanwhile (the readahead window was spent on them);
    /// in order, the first is done soonest and the reader, and its window, move on. At 20 ms
    /// RTT a cold 1 GiB read took 0.87x the time, at loopback 0.9x, peak RSS 73-75 MiB
    /// against 82-93.
    pub(crate) cpu: Arc<tokio::sync::Semaphore>,
    parallel: usize,
    /// Permits `slots` holds now: `parallel`, or twice that on a long link ([`Reader::link_scale`]).
    slots_now: Mutex<usize>,
    /// Where plain copies of complete files lie (passthrough on): their blocks are released
    /// from the store once a copy is verified, and read back from the copy (checked against the
    /// leaf hash each time) when the daemon serves such a file itself.
    plain_dir: std::sync::OnceLock<std::path::PathBuf>,
    /// The plain copy read last (a daemon-served read of one takes many blocks of it).
    plain_open: Mutex<Option<(FileKey, Arc<std::fs::File>)>>,
}

/// Decoded blocks kept for a reader, at most this many (16 MiB): a readahead window.
const STAGED_MAX: usize = 4096;
pub const STAGED_LIMIT_BYTES: u64 = (STAGED_MAX * BLOCK_SIZE) as u64 + crate::nearby::NEARBY_LIMIT;

/// A block a fill got wrong: the fill count and instant then, and the failure to report.
struct BadFill {
    at: u64,
    when: Instant,
    failure: ReadFailure,
}

/// Why a filled block was not taken.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("{0}: block {1} is beyond the end of the file")]
    OutOfRange(Arc<str>, u64),
    #[error("{0}: block {1}: {2}; not stored")]
    Verification(Arc<str>, u64, String),
    #[error("{0}")]
    Read(String),
}

impl Reader {
    /// `parallel`: requests in flight for readahead and background work (reads' own requests
    /// are bounded by the kernel's outstanding reads instead).
    pub fn new(
        objects: &[ObjectRef],
        store: Arc<Store>,
        mirrors: Arc<Mirrors>,
        stats: Arc<Stats>,
        parallel: usize,
    ) -> Self {
        let parallel = parallel.max(1);
        Reader {
            objects: RwLock::new(Arc::from(objects)),
            store,
            mirrors,
            stats,
            presence: Presence::default(),
            // Memory bounds, whatever the image size: 4 MiB of verified hash blocks (each
            // covers 512 KiB of file data), 4 MiB of metadata pieces, 1 MiB of blocks read
            // from the store (the kernel's page cache keeps what is read again: these serve
            // the block two unaligned reads share), and [`STAGED_MAX`] blocks fetched ahead.
            hashes: Cache::new(1 << 10),
            meta: Cache::new(64),
            verified: Cache::new(1 << 8),
            inflight: Mutex::new(HashMap::default()),
            inflight_meta: Arc::new(Mutex::new(HashMap::new())),
            meta_from: Arc::new(Mutex::new(HashMap::new())),
            regions: RwLock::new(Arc::new(Vec::new())),
            nearby: Nearby::default(),
            nearby_reach: AtomicU64::new(crate::nearby::DEFAULT_NEARBY),
            cold_hook: RwLock::new(None),
            staged: Mutex::new(Staged::default()),
            recent_failures: Mutex::new(HashMap::new()),
            zero_hash: hash_data_block(&[]),
            demand: AtomicUsize::new(0),
            demand_ended_us: AtomicU64::new(0),
            born: Instant::now(),
            demand_began: tokio::sync::Notify::new(),
            pending: Pending::default(),
            filled: tokio::sync::watch::channel(0).0,
            bad_fills: Mutex::new(HashMap::new()),
            fills_only: AtomicBool::new(false),
            pushed: RwLock::new(Vec::new()),
            compacts: Cache::with_weighter(16, COMPACT_MAPS_BYTES, MapWeight),
            compact_dense: Cache::new(64),
            slots: Arc::new(tokio::sync::Semaphore::new(parallel)),
            cpu: Arc::new(tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))),
            parallel,
            slots_now: Mutex::new(parallel),
            plain_dir: std::sync::OnceLock::new(),
            plain_open: Mutex::new(None),
        }
    }

    /// Plain copies lie in `dir`: read released blocks from there.
    pub fn set_plain_dir(&self, dir: std::path::PathBuf) {
        let _ = self.plain_dir.set(dir);
    }

    /// Requests in flight for readahead and background work, at most, now: `--parallel`, or
    /// twice that on a long link.
    pub fn parallel(&self) -> usize {
        *self.slots_now.lock()
    }

    /// 2 on a long link ([`LONG_LINK`]), else 1: the factor of requests in flight and of the
    /// readahead window.
    pub fn link_scale(&self) -> usize {
        match self.mirrors.first_byte_latency() >= LONG_LINK {
            true => 2,
            false => 1,
        }
    }

    /// Give `slots` as many permits as the link now wants (called after each fetch; permits
    /// held stay valid, only free ones are withdrawn).
    pub(crate) fn fit_slots(&self) {
        let want = self.parallel * self.link_scale();
        let mut now = self.slots_now.lock();
        if want > *now {
            self.slots.add_permits(want - *now);
            *now = want;
        } else if want < *now {
            *now -= self.slots.forget_permits(*now - want);
        }
    }

    /// Bytes fetched ahead and not read yet: verified blocks of readahead, and the spans of
    /// cold small files' neighbours (at most [`STAGED_LIMIT_BYTES`] in all).
    pub fn staged_bytes(&self) -> u64 {
        (self.staged.lock().len() * BLOCK_SIZE) as u64 + self.nearby.bytes()
    }

    /// How far on either side of a cold small file its neighbours' spans are fetched with it
    /// (`--nearby`; 0: only its own).
    pub fn set_nearby(&self, reach: u64) {
        self.nearby_reach.store(reach, Ordering::Relaxed);
    }

    /// Readahead and background requests in flight now.
    pub fn requests_in_flight(&self) -> usize {
        self.parallel().saturating_sub(self.slots.available_permits())
    }

    /// Keep the (verified) compact tree of a pushed file; returns its metadata offset.
    pub fn push_tree(&self, tree: Vec<u8>) -> u64 {
        let mut p = self.pushed.write();
        p.push(Arc::new(tree));
        p.len() as u64 - 1
    }

    fn is_pushed(f: &FileRef) -> bool {
        f.data.meta.is_some_and(|m| m.object == PUSHED_OBJECT)
    }

    /// Take data blocks only from fills (`incfs mount --loader`).
    pub fn set_fills_only(&self, on: bool) {
        self.fills_only.store(on, Ordering::Relaxed);
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn mirrors(&self) -> &Arc<Mirrors> {
        &self.mirrors
    }

    /// Object `i` of the object table.
    pub fn object(&self, i: u32) -> Option<ObjectRef> {
        self.objects.read().get(i as usize).copied()
    }

    /// Take the object table of a newer version (a longer table, starting with the current
    /// one); a shorter one (an older version) is a prefix and changes nothing.
    pub fn extend_objects(&self, objects: &[ObjectRef]) {
        let mut table = self.objects.write();
        if objects.len() > table.len() {
            *table = Arc::from(objects);
        }
    }

    /// Digest of an object that a verified manifest or a bounds-checked record names.
    fn digest(&self, i: u32) -> Hash {
        self.objects.read()[i as usize].digest
    }

    /// Reads currently waiting for the network.
    pub fn demand(&self) -> usize {
        self.demand.load(Ordering::Relaxed)
    }

    /// How long no read has waited for the network: zero while one does (and for a mount
    /// that never had one, its age).
    pub fn quiet_for(&self) -> Duration {
        if self.demand() > 0 {
            return Duration::ZERO;
        }
        let ended = Duration::from_micros(self.demand_ended_us.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(ended)
    }

    /// Whether every block of `f` is present locally.
    pub fn is_complete(&self, f: &FileRef) -> bool {
        self.presence.count(&f.key) >= incfs_verity::block_count(f.data.size)
    }

    /// Serve a read, fetching whatever is missing, failing with [`FailCause::Timeout`] at
    /// `deadline`. Blocks `ahead` (readahead) are fetched along, not waited for.
    pub async fn read(
        self: &Arc<Self>,
        f: &FileRef,
        offset: u64,
        size: u32,
        ahead: Range<u64>,
        deadline: Instant,
    ) -> Result<Served, ReadFailure> {
        if let Some((at, e)) = self.recent_failures.lock().get(&f.key) {
            if at.elapsed() < FAILURE_MEMORY {
                return Err(e.clone());
            }
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let end = (offset + size as u64).min(f.data.size).max(offset + 1);
        let first = offset / BLOCK_SIZE as u64;
        let _listed = self.pending.begin(&f.label, f.data.size, first, end.div_ceil(BLOCK_SIZE as u64) - first);
        self.demand.fetch_add(1, Ordering::Relaxed);
        self.demand_began.notify_waiters();
        let result = match tokio::time::timeout_at(deadline.into(), self.read_fetching(f, offset, size, ahead)).await {
            Ok(r) => r,
            Err(_) => Err(ReadFailure {
                cause: FailCause::Timeout,
                message: format!("{}: data not available within {timeout:?}", f.label),
            }),
        };
        self.demand_ended_us.store(self.born.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.demand.fetch_sub(1, Ordering::Relaxed);
        // Only waits are remembered: a verification failure costs no waiting, and the next
        // attempt should go to the network at once (to another mirror, or a repaired one).
        let mut recent = self.recent_failures.lock();
        match &result {
            Err(e) if matches!(e.cause, FailCause::Timeout | FailCause::Source) => {
                recent.insert(f.key, (Instant::now(), e.clone()));
            }
            _ => {
                recent.remove(&f.key);
            }
        }
        result
    }

    async fn read_fetching(
        self: &Arc<Self>,
        f: &FileRef,
        offset: u64,
        size: u32,
        mut ahead: Range<u64>,
    ) -> Result<Served, ReadFailure> {
        // Subscribed before the first look, so that no fill can slip between a look and the wait.
        let mut fills = self.filled.subscribe();
        let since = *fills.borrow_and_update();
        // Each fetch round fetches something or fails, so a handful of rounds always suffices
        // (metadata levels, then blocks); the bound only guards against a logic error. Waits
        // for fills are bounded by the read's deadline.
        let mut rounds = 0;
        while rounds < 32 {
            match self.read_local(f, offset, size) {
                Ok(v) => return Ok(v),
                Err(Local::Fail(e)) => return Err(e),
                Err(Local::Need(Need::Meta { chunk })) => {
                    rounds += 1;
                    match if rounds == 1 { self.cold_file(f) } else { None } {
                        // A cold small file: its blocks and its metadata in one request.
                        Some(span) => self.fetch_span(f, span).await?,
                        None => self.fetch_meta_for(f, offset / BLOCK_SIZE as u64, Some(chunk)).await?,
                    }
                }
                Err(Local::Need(Need::Blocks(list))) => {
                    if let Some(e) = self.bad_fill(f, &list, since) {
                        return Err(e);
                    }
                    if self.fills_only.load(Ordering::Relaxed) || Self::is_pushed(f) {
                        let _ = fills.changed().await;
                        continue;
                    }
                    // A one-block file needs no tree (its root is its leaf), only its block
                    // record: cold all the same if its metadata is not local.
                    if rounds == 0 && !matches!(self.meta_chunk_local(f, 0), Ok(Some(_))) {
                        rounds += 1;
                        if let Some(span) = self.cold_file(f) {
                            self.fetch_span(f, span).await?;
                            continue;
                        }
                    }
                    // A span fetch of this file in flight brings these blocks: wait for it.
                    let (o, off, _) = self.region(f);
                    let span = self.inflight_meta.lock().get(&(o, off, SPAN_GROUP)).cloned();
                    if let Some(span) = span {
                        rounds += 1;
                        let _ = span.await;
                        continue;
                    }
                    rounds += 1;
                    // A fill may bring the blocks before the fetch does.
                    tokio::select! {
                        r = self.fetch_blocks(f, &list, std::mem::take(&mut ahead), true) => r?,
                        _ = fills.changed() => {}
                    }
                }
            }
        }
        Err(ReadFailure { cause: FailCause::Other, message: format!("{}: read made no progress", f.label) })
    }

    /// Fetch blocks `ahead` of `f` for a sequential reader, in the background (readahead of a
    /// read that needed nothing from the network). Failures are left to the read that comes.
    pub fn read_ahead(self: &Arc<Self>, f: FileRef, ahead: Range<u64>) {
        if ahead.is_empty() || self.fills_only.load(Ordering::Relaxed) || Self::is_pushed(&f) || self.is_complete(&f) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.fetch_blocks(&f, &[], ahead, true).await;
        });
    }

    /// Call `hook` whenever a read finds a file cold (replacing the previous hook).
    pub fn on_cold_file(&self, hook: ColdHook) {
        *self.cold_hook.write() = Some(hook);
    }

    /// Learn where the metadata regions of a manifest's files lie (each version's, kept: open
    /// files of older versions read on).
    pub fn add_regions(&self, regions: impl IntoIterator<Item = (u32, u64, u64)>) {
        let mut all: Vec<(u32, u64, u64)> = self.regions.read().to_vec();
        all.extend(regions);
        all.sort_unstable();
        all.dedup();
        *self.regions.write() = Arc::new(all);
    }
}

/// Why a run of blocks was fetched: what is done with it besides storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A reader waits for it: decoded blocks are kept for it; the store may evict for them.
    Read,
    /// Asked for (`incfs prefetch`, a profile): stored, evicting if needed.
    Prefetch,
    /// Background completion: stored only where there is room; never evicts.
    Complete,
}
