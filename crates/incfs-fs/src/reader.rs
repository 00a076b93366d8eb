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

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use incfs_fetch::image::{verify_block, verify_block_into};
use incfs_format::block_map::{BlockRecord, FileMetaLayout, BLOCK_RECORD_SIZE};
use incfs_format::compact_map::CompactMap;
use incfs_format::manifest::{FileData, ObjectRef};
use incfs_format::{layout, Codec, Hash, BLOCK_SIZE};
use incfs_store::{FileKey, NewBlock, Store};
use incfs_verity::{check_hash_block, hash_data_block, Geometry, HASHES_PER_BLOCK, HASH_SIZE};
use parking_lot::{Mutex, RwLock};
use quick_cache::sync::Cache;

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
/// [`MAX_RUN_BYTES`], the bound on fetched bytes buffered for them: 16 MiB.
pub const DEFAULT_PARALLEL: usize = 8;

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
    parallel: usize,
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

/// Blocks verified and decoded ahead of their read, oldest pushed out first.
#[derive(Default)]
struct Staged {
    blocks: HashMap<Hash, RunBlock, rustc_hash::FxBuildHasher>,
    order: std::collections::VecDeque<Hash>,
}

impl Staged {
    fn put(&mut self, leaf: Hash, block: RunBlock) {
        if self.blocks.insert(leaf, block).is_none() {
            self.order.push_back(leaf);
        }
        while self.blocks.len() > STAGED_MAX {
            match self.order.pop_front() {
                Some(old) => {
                    self.blocks.remove(&old);
                }
                None => break,
            }
        }
        // Taken entries leave stale names behind: drop them once they dominate.
        if self.order.len() > 2 * STAGED_MAX {
            let blocks = &self.blocks;
            self.order.retain(|h| blocks.contains_key(h));
        }
    }

    fn take(&mut self, leaf: &Hash) -> Option<RunBlock> {
        self.blocks.remove(leaf)
    }
}

/// Memory for decoded compact maps: a sparse file's map is a few KiB, the largest (16,383
/// runs) some MiB, and one is decoded again (hashing its levels) whenever it is not held.
const COMPACT_MAPS_BYTES: u64 = 16 << 20;

/// Weighs a decoded compact map by its memory.
#[derive(Clone)]
struct MapWeight;

impl quick_cache::Weighter<(u32, u64), Arc<CompactMap>> for MapWeight {
    fn weight(&self, _: &(u32, u64), map: &Arc<CompactMap>) -> u64 {
        map.memory_bytes().max(1)
    }
}

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
            demand_began: tokio::sync::Notify::new(),
            pending: Pending::default(),
            filled: tokio::sync::watch::channel(0).0,
            bad_fills: Mutex::new(HashMap::new()),
            fills_only: AtomicBool::new(false),
            pushed: RwLock::new(Vec::new()),
            compacts: Cache::with_weighter(16, COMPACT_MAPS_BYTES, MapWeight),
            compact_dense: Cache::new(64),
            slots: Arc::new(tokio::sync::Semaphore::new(parallel)),
            parallel,
            plain_dir: std::sync::OnceLock::new(),
            plain_open: Mutex::new(None),
        }
    }

    /// Plain copies lie in `dir`: read released blocks from there.
    pub fn set_plain_dir(&self, dir: std::path::PathBuf) {
        let _ = self.plain_dir.set(dir);
    }

    /// Block `i` of `f` from its plain copy, if there is one and the block matches `leaf`.
    fn plain_block(&self, f: &FileRef, i: u64, leaf: &Hash) -> Option<Block> {
        let dir = self.plain_dir.get()?;
        let file = {
            let mut open = self.plain_open.lock();
            match open.as_ref() {
                Some((k, file)) if *k == f.key => file.clone(),
                _ => {
                    let file = Arc::new(std::fs::File::open(dir.join(hex::encode(f.key))).ok()?);
                    *open = Some((f.key, file.clone()));
                    file
                }
            }
        };
        let bs = BLOCK_SIZE as u64;
        let len = f.data.size.checked_sub(i * bs)?.min(bs) as usize;
        let mut buf = [0u8; BLOCK_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf[..len], i * bs).ok()?;
        if hash_data_block(&buf) != *leaf {
            tracing::warn!("{}: block {i} of its plain copy does not match; fetching it", f.label);
            *self.plain_open.lock() = None;
            return None;
        }
        let b: Arc<[u8; BLOCK_SIZE]> = Arc::new(buf);
        self.verified.insert(*leaf, b.clone());
        Some(Block::Shared(b))
    }

    /// Requests in flight for readahead and background work, at most.
    pub fn parallel(&self) -> usize {
        self.parallel
    }

    /// Bytes fetched ahead and not read yet: verified blocks of readahead, and the spans of
    /// cold small files' neighbours (at most [`STAGED_LIMIT_BYTES`] in all).
    pub fn staged_bytes(&self) -> u64 {
        (self.staged.lock().blocks.len() * BLOCK_SIZE) as u64 + self.nearby.bytes()
    }

    /// How far on either side of a cold small file its neighbours' spans are fetched with it
    /// (`--nearby`; 0: only its own).
    pub fn set_nearby(&self, reach: u64) {
        self.nearby_reach.store(reach, Ordering::Relaxed);
    }

    /// Readahead and background requests in flight now.
    pub fn requests_in_flight(&self) -> usize {
        self.parallel - self.slots.available_permits()
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

    /// Accept block `block` of `f` from outside: `stored` is its payload encoded with `codec`
    /// (format section 2.1). Verified against the file's tree (fetching tree pieces from the
    /// sources if needed) before it is stored; waiting reads wake either way, and those waiting
    /// for a block filled wrong fail with a verification error.
    pub async fn fill(&self, f: &FileRef, block: u64, codec: Codec, stored: &[u8]) -> Result<(), FillError> {
        if block >= incfs_verity::block_count(f.data.size) {
            return Err(FillError::OutOfRange(f.label.clone(), block));
        }
        let geo = Geometry::new(f.data.size);
        let leaf = loop {
            match self.leaf(f, &geo, block) {
                Ok(h) => break h,
                Err(Local::Need(Need::Meta { chunk })) => {
                    self.fetch_meta(f, chunk).await.map_err(|e| FillError::Read(e.message))?
                }
                Err(Local::Need(Need::Blocks(_))) => unreachable!("a leaf needs no data blocks"),
                Err(Local::Fail(e)) => return Err(FillError::Read(e.message)),
            }
        };
        let len = u16::try_from(stored.len()).ok().filter(|&n| n as usize <= BLOCK_SIZE);
        let rec = BlockRecord { object: 0, codec, len: len.unwrap_or(0), offset: 0 };
        let checked = match len {
            None => Err(format!("{} stored bytes, more than a block", stored.len())),
            Some(_) => verify_block(&rec, stored, &leaf).map_err(|e| e.to_string()),
        };
        let result = match checked {
            Ok(decoded) => {
                let new = NewBlock { hash: leaf, codec, data: stored };
                let stored_ok = leaf == self.zero_hash || self.store_blocks(&f.key, &[new], vec![block]).is_ok();
                if stored_ok {
                    self.verified.insert(leaf, Arc::from(decoded));
                    self.bad_fills.lock().remove(&(f.key, block));
                    Stats::add(&self.stats.blocks_filled, 1);
                    Ok(())
                } else {
                    Err(FillError::Read(format!("{}: block {block}: cannot store it", f.label)))
                }
            }
            Err(e) => {
                Stats::add(&self.stats.blocks_bad, 1);
                Stats::add(&self.stats.fills_rejected, 1);
                tracing::error!("{}: filled block {block} failed verification ({e}); not stored", f.label);
                let failure = ReadFailure {
                    cause: FailCause::Verification,
                    message: format!("{}: block {block} as filled: {e}", f.label),
                };
                let at = *self.filled.borrow() + 1;
                let bad = BadFill { at, when: Instant::now(), failure };
                self.bad_fills.lock().insert((f.key, block), bad);
                Err(FillError::Verification(f.label.clone(), block, e))
            }
        };
        self.filled.send_modify(|n| *n += 1);
        result
    }

    /// A fill after fill count `since`, or just before, got one of `blocks` of `f` wrong.
    fn bad_fill(&self, f: &FileRef, blocks: &[u64], since: u64) -> Option<ReadFailure> {
        let bad = self.bad_fills.lock();
        blocks.iter().find_map(|b| {
            let b = bad.get(&(f.key, *b))?;
            (b.at > since || b.when.elapsed() < FAILURE_MEMORY).then(|| b.failure.clone())
        })
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

    /// Whether every block of `f` is present locally.
    pub fn is_complete(&self, f: &FileRef) -> bool {
        self.presence.count(&f.key) >= incfs_verity::block_count(f.data.size)
    }

    /// The file's metadata region: (object, offset, length).
    pub fn meta_region(&self, f: &FileRef) -> Option<(u32, u64, u64)> {
        f.data.meta.map(|_| self.region(f))
    }

    /// Every leaf hash of `f` (its Merkle tree must be local).
    pub(crate) fn leaves(&self, f: &FileRef) -> Result<Vec<Hash>, Local> {
        let geo = Geometry::new(f.data.size);
        let mut memo = None;
        (0..incfs_verity::block_count(f.data.size)).map(|i| self.leaf_in(f, &geo, i, &mut memo)).collect()
    }

    /// The store keys of `f`'s metadata pieces (object digest, region offset, piece); none for a
    /// pushed file (its tree is kept apart).
    pub(crate) fn meta_keys(&self, f: &FileRef) -> Vec<(Hash, u64, u64)> {
        let Some((object, offset, len)) = self.meta_region(f) else { return Vec::new() };
        if object == PUSHED_OBJECT {
            return Vec::new();
        }
        let digest = self.digest(object);
        (0..len.div_ceil(META_CHUNK)).map(|c| (digest, offset, c)).collect()
    }

    fn region(&self, f: &FileRef) -> (u32, u64, u64) {
        let m = f.data.meta.expect("non-empty files have a metadata region");
        // validate() guaranteed the region fits in its object.
        (m.object, m.offset, m.stored_len(f.data.size).unwrap())
    }

    fn meta_chunk_local(&self, f: &FileRef, chunk: u64) -> Result<Option<Arc<Vec<u8>>>, Local> {
        let (object, offset, _) = self.region(f);
        if object == PUSHED_OBJECT {
            // Only its tree is kept (the block map is of no use without a source).
            let tree = self.pushed.read().get(offset as usize).cloned();
            let start = (chunk * META_CHUNK) as usize;
            return match tree {
                Some(t) if start < t.len() => {
                    Ok(Some(Arc::new(t[start..t.len().min(start + META_CHUNK as usize)].to_vec())))
                }
                _ => Err(fail(FailCause::Other, format!("{}: pushed file without its tree", f.label))),
            };
        }
        if f.data.has_compact_map() {
            return self.compact_chunk(f, chunk);
        }
        self.stored_piece(object, offset, chunk)
    }

    /// Piece `chunk` of the region at `offset` of `object` as stored (memory, then the store).
    fn stored_piece(&self, object: u32, offset: u64, chunk: u64) -> Result<Option<Arc<Vec<u8>>>, Local> {
        if let Some(c) = self.meta.get(&(object, offset, chunk)) {
            return Ok(Some(c));
        }
        let digest = self.digest(object);
        match self.store.get_meta(&digest, offset, chunk) {
            Ok(Some(bytes)) => {
                let c = Arc::new(bytes);
                self.meta.insert((object, offset, chunk), c.clone());
                Ok(Some(c))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(fail(FailCause::Other, e.to_string())),
        }
    }

    /// Piece `chunk` of the dense region of a file stored as a compact map, rebuilt from the
    /// map (the map itself is fetched and stored whole, as its one piece group).
    fn compact_chunk(&self, f: &FileRef, chunk: u64) -> Result<Option<Arc<Vec<u8>>>, Local> {
        let (object, offset, _) = self.region(f);
        if let Some(c) = self.compact_dense.get(&(object, offset, chunk)) {
            return Ok(Some(c));
        }
        let Some(map) = self.compact_map(f)? else { return Ok(None) };
        let dense = FileMetaLayout::new(f.data.size).len().unwrap_or(0);
        let start = chunk * META_CHUNK;
        if start >= dense {
            return Err(fail(FailCause::Other, format!("{}: metadata piece {chunk} is past its end", f.label)));
        }
        let c = Arc::new(map.dense(start..dense.min(start + META_CHUNK)));
        self.compact_dense.insert((object, offset, chunk), c.clone());
        Ok(Some(c))
    }

    /// The decoded compact map of `f`, if its bytes are local; one that does not give the
    /// signed root is dropped (and its mirror blamed) so that it is fetched again.
    fn compact_map(&self, f: &FileRef) -> Result<Option<Arc<CompactMap>>, Local> {
        let (object, offset, len) = self.region(f);
        if let Some(m) = self.compacts.get(&(object, offset)) {
            return Ok(Some(m));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        for chunk in 0..len.div_ceil(META_CHUNK) {
            match self.stored_piece(object, offset, chunk)? {
                Some(piece) => bytes.extend_from_slice(&piece),
                None => return Ok(None),
            }
        }
        let problem = match CompactMap::decode(f.data.size, &bytes) {
            Ok(map) if map.root() == &f.data.root_hash => {
                let map = Arc::new(map);
                self.compacts.insert((object, offset), map.clone());
                return Ok(Some(map));
            }
            Ok(_) => "does not match the signed root hash".to_string(),
            Err(e) => e.to_string(),
        };
        self.drop_meta(f, 0..1);
        Stats::add(&self.stats.blocks_bad, 1);
        tracing::error!("{}: compact block map failed verification: {problem}", f.label);
        Err(fail(FailCause::Verification, format!("{}: compact block map failed verification", f.label)))
    }

    /// Bytes `range` of the file's metadata region, from memory or the store.
    fn meta_local(&self, f: &FileRef, range: Range<u64>) -> Result<Vec<u8>, Local> {
        let mut out = vec![0; (range.end - range.start) as usize];
        self.meta_local_into(f, range, &mut out)?;
        Ok(out)
    }

    /// [`Reader::meta_local`] into `out` (`range`'s length): no allocation, for the block
    /// record every planned block reads.
    fn meta_local_into(&self, f: &FileRef, range: Range<u64>, out: &mut [u8]) -> Result<(), Local> {
        if range.is_empty() {
            return Ok(());
        }
        let mut at = 0;
        for chunk in range.start / META_CHUNK..=(range.end - 1) / META_CHUNK {
            let Some(bytes) = self.meta_chunk_local(f, chunk)? else {
                return Err(Local::Need(Need::Meta { chunk }));
            };
            let base = chunk * META_CHUNK;
            let from = range.start.max(base) - base;
            let to = range.end.min(base + bytes.len() as u64) - base;
            if from > to || to > bytes.len() as u64 {
                return Err(fail(FailCause::Other, "cached metadata piece is too short"));
            }
            let piece = &bytes[from as usize..to as usize];
            out[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        if at != out.len() {
            return Err(fail(FailCause::Other, "cached metadata piece is too short"));
        }
        Ok(())
    }

    /// Forget a cached metadata piece that produced a hash mismatch, so it is fetched again.
    fn drop_meta(&self, f: &FileRef, range: Range<u64>) {
        let (object, offset, _) = self.region(f);
        if object == PUSHED_OBJECT {
            return; // checked whole when pushed; nothing fetched to drop
        }
        let digest = self.digest(object);
        let mut liars = Vec::new();
        // A compact map is one answer: all of it goes, and what was rebuilt from it.
        let chunks = match f.data.has_compact_map() {
            true => {
                self.compacts.remove(&(object, offset));
                self.compact_dense.retain(|k, _| (k.0, k.1) != (object, offset));
                0..self.region(f).2.div_ceil(META_CHUNK)
            }
            false => range.start / META_CHUNK..(range.end.max(1) - 1) / META_CHUNK + 1,
        };
        for chunk in chunks {
            self.meta.remove(&(object, offset, chunk));
            let _ = self.store.remove_meta(&digest, offset, chunk);
            liars.extend(self.meta_from.lock().remove(&(object, offset, chunk)));
        }
        liars.sort_unstable();
        liars.dedup();
        for m in liars {
            self.mirrors.lied(m);
        }
        // Neighbours' bytes from the same answer are as suspect: the next try asks a source.
        self.nearby.forget(object);
    }

    /// Hash block `index` of `level`, checked up to the root.
    fn hash_block(&self, f: &FileRef, geo: &Geometry, level: usize, index: u64) -> Result<Arc<Vec<Hash>>, Local> {
        let key = (f.key, level as u8, index);
        if let Some(h) = self.hashes.get(&key) {
            return Ok(h);
        }
        let range = geo.hash_block_range(level, index);
        let bytes = self.meta_local(f, range.clone())?;
        let hashes: Vec<Hash> = bytes.chunks_exact(HASH_SIZE).map(|c| c.try_into().unwrap()).collect();
        let expected = if level + 1 == geo.levels().len() {
            f.data.root_hash
        } else {
            let parent = self.hash_block(f, geo, level + 1, index / HASHES_PER_BLOCK as u64)?;
            parent[(index % HASHES_PER_BLOCK as u64) as usize]
        };
        if !check_hash_block(&hashes, &expected) {
            self.drop_meta(f, range);
            Stats::add(&self.stats.blocks_bad, 1);
            tracing::error!("{}: Merkle tree level {level} block {index} failed verification", f.label);
            return Err(fail(FailCause::Verification, format!("{}: hash block failed verification", f.label)));
        }
        let h = Arc::new(hashes);
        self.hashes.insert(key, h.clone());
        Ok(h)
    }

    /// The verified leaf hash of data block `i`.
    fn leaf(&self, f: &FileRef, geo: &Geometry, i: u64) -> Result<Hash, Local> {
        self.leaf_in(f, geo, i, &mut None)
    }

    /// [`Reader::leaf`] for a walk over consecutive blocks: `memo` keeps the level-0 hash
    /// block last used, so it is looked up once per 128 blocks, not once per block.
    fn leaf_in(
        &self,
        f: &FileRef,
        geo: &Geometry,
        i: u64,
        memo: &mut Option<(u64, Arc<Vec<Hash>>)>,
    ) -> Result<Hash, Local> {
        if geo.data_blocks() == 1 {
            return Ok(f.data.root_hash);
        }
        let index = i / HASHES_PER_BLOCK as u64;
        let hashes = match memo {
            Some((at, h)) if *at == index => h,
            _ => &mut memo.insert((index, self.hash_block(f, geo, 0, index)?)).1,
        };
        Ok(hashes[(i % HASHES_PER_BLOCK as u64) as usize])
    }

    fn record(&self, f: &FileRef, i: u64) -> Result<BlockRecord, Local> {
        if Self::is_pushed(f) {
            return Err(fail(FailCause::Other, format!("{}: a pushed file's blocks come only from fills", f.label)));
        }
        let layout = FileMetaLayout::new(f.data.size);
        let at = layout.record_offset(i);
        let range = at..at + BLOCK_RECORD_SIZE as u64;
        let mut bytes = [0; BLOCK_RECORD_SIZE];
        self.meta_local_into(f, range.clone(), &mut bytes)?;
        let bad = |what: String| {
            // Unverified bytes from a server: forget the piece so it is fetched afresh.
            self.drop_meta(f, range.clone());
            fail(FailCause::Verification, format!("{}: block {i}: {what}", f.label))
        };
        let r = BlockRecord::decode(&bytes).map_err(|e| bad(format!("bad block record: {e}")))?;
        if r.codec != Codec::Zero {
            let size = self.object(r.object).map(|o| o.size);
            if size.is_none_or(|s| r.range().end > s) {
                return Err(bad("record points outside the image".into()));
            }
        }
        Ok(r)
    }

    /// A stored block, decoded and verified; a damaged one is removed and reported absent.
    fn stored_block(&self, leaf: &Hash) -> Result<Option<Block>, Local> {
        if let Some(b) = self.staged.lock().take(leaf) {
            return Ok(Some(Block::Owned(b)));
        }
        if let Some(b) = self.verified.get(leaf) {
            return Ok(Some(Block::Shared(b)));
        }
        let Some((codec, data)) = self.store.get_block(leaf).map_err(|e| fail(FailCause::Other, e.to_string()))? else {
            return Ok(None);
        };
        let rec = BlockRecord { object: 0, codec, len: data.len() as u16, offset: 0 };
        match verify_block(&rec, &data, leaf) {
            Ok(b) => {
                let b: Arc<[u8; BLOCK_SIZE]> = Arc::from(b);
                self.verified.insert(*leaf, b.clone());
                Ok(Some(Block::Shared(b)))
            }
            Err(e) => {
                tracing::error!("local store block {} is damaged ({e}); dropping it", hex::encode(leaf));
                Stats::add(&self.stats.blocks_bad, 1);
                let _ = self.store.remove_block(leaf);
                Ok(None)
            }
        }
    }

    /// Serve bytes `offset..offset+size` of `f` from local data only.
    pub fn read_local(&self, f: &FileRef, offset: u64, size: u32) -> Result<Served, Local> {
        let end = (offset + size as u64).min(f.data.size);
        if offset >= end {
            return Ok(Served::default());
        }
        let geo = Geometry::new(f.data.size);
        let bs = BLOCK_SIZE as u64;
        let mut out = Served::default();
        let mut missing = Vec::new();
        let mut found = Vec::new();
        let (first, last) = (offset / bs, (end - 1) / bs);
        // One look at presence and one hash block per 128 blocks, not one per block.
        let present_mask = self.presence.mask(&f.key, first..last + 1);
        let mut memo = None;
        for i in first..=last {
            let leaf = self.leaf_in(f, &geo, i, &mut memo)?;
            let from = offset.max(i * bs) - i * bs;
            let to = end.min((i + 1) * bs) - i * bs;
            if leaf == self.zero_hash {
                out.push_zeros((to - from) as usize);
                found.push(i);
                continue;
            }
            // Presence is a hint that saves a store lookup for a block surely absent (a block
            // stored for another file with the same content is found by `plan`, which asks the
            // store, and then marked present here too).
            let present = present_mask[(i - first) as usize];
            if present && !missing.is_empty() {
                found.push(i); // not served this time: not read (nor taken from `staged`)
                continue;
            }
            let block = match present {
                true => match self.stored_block(&leaf)? {
                    Some(b) => Some(b),
                    None => self.plain_block(f, i, &leaf),
                },
                // Not stored: served from memory once (a full cache), or verified lately.
                false => match self.staged.lock().take(&leaf) {
                    Some(b) => Some(Block::Owned(b)),
                    None => self.verified.get(&leaf).map(Block::Shared),
                },
            };
            match block {
                Some(block) if missing.is_empty() => {
                    out.push_block(block, from as usize..to as usize);
                    found.push(i);
                }
                Some(_) => found.push(i),
                None => missing.push(i),
            }
        }
        if found.iter().any(|&i| !present_mask[(i - first) as usize]) {
            self.persist_presence(&f.key, found);
        }
        if missing.is_empty() {
            Ok(out)
        } else {
            Err(Local::Need(Need::Blocks(missing)))
        }
    }

    fn persist_presence(&self, key: &FileKey, blocks: Vec<u64>) {
        if let Err(e) = self.store_blocks(key, &[], blocks) {
            tracing::warn!("cannot record block presence: {e}");
        }
    }

    /// Store verified blocks and mark `present` blocks of `key`: one data write and one journal
    /// write.
    fn store_blocks(
        &self,
        key: &FileKey,
        blocks: &[NewBlock<'_>],
        present: Vec<u64>,
    ) -> Result<(), incfs_store::StoreError> {
        self.store_marking(key, present, blocks.is_empty(), |new| self.store.put_blocks(blocks, Some((key, new))))
    }

    /// Store the verified blocks of a fetched run (`blocks` are ranges of `bytes`, written as
    /// they are) and mark `present` blocks of `key`.
    fn store_run(
        &self,
        key: &FileKey,
        bytes: &[u8],
        blocks: &[(Hash, Codec, Range<usize>)],
        present: Vec<u64>,
        evict: bool,
    ) -> Result<(), incfs_store::StoreError> {
        self.store_marking(key, present, blocks.is_empty(), |new| {
            self.store.put_run(bytes, blocks, Some((key, new)), evict)
        })
    }

    /// Call `put` with the blocks of `present` not marked yet (sorted), then mark them: persisted
    /// first, so memory never claims more than the store holds. Nothing to store and nothing new
    /// to mark: no write at all.
    fn store_marking(
        &self,
        key: &FileKey,
        present: Vec<u64>,
        no_blocks: bool,
        put: impl FnOnce(&[u64]) -> Result<(), incfs_store::StoreError>,
    ) -> Result<(), incfs_store::StoreError> {
        let mut new: Vec<u64> = present.into_iter().filter(|&i| !self.presence.is_present(key, i)).collect();
        new.sort_unstable();
        new.dedup();
        if no_blocks && new.is_empty() {
            return Ok(());
        }
        put(&new)?;
        self.presence.mark(key, new);
        Ok(())
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
                        None => self.fetch_meta(f, chunk).await?,
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

    /// Cache a whole metadata region fetched along with other bytes (unverified, as any piece:
    /// each hash block is checked against its parent when used).
    pub(crate) fn put_meta_region(&self, f: &FileRef, region: &[u8], mirror: usize) {
        let (object, offset, len) = self.region(f);
        if region.len() as u64 != len || object == PUSHED_OBJECT {
            return;
        }
        let digest = self.digest(object);
        for (chunk, piece) in region.chunks(META_CHUNK as usize).enumerate() {
            let chunk = chunk as u64;
            if self.meta.get(&(object, offset, chunk)).is_some() {
                continue; // the cached piece came from elsewhere: not this mirror's to answer for
            }
            remember_mirror(&self.meta_from, (object, offset, chunk), mirror);
            if let Err(e) = self.store.put_meta(&digest, offset, chunk, piece) {
                tracing::warn!("cannot cache metadata: {e}");
            }
            self.meta.insert((object, offset, chunk), Arc::new(piece.to_vec()));
        }
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

    /// A read found `f` cold (its metadata not local): tell the hook, and return its span (and
    /// the range to fetch for it) if it is small.
    fn cold_file(&self, f: &FileRef) -> Option<(u32, Range<u64>, Range<u64>)> {
        let hook = self.cold_hook.read().clone();
        if let Some(hook) = hook {
            hook(&f.key);
        }
        self.small_span(f)
    }

    /// The span of a small file not pushed: its object and byte range, if known and at most
    /// [`SMALL_SPAN`] long, and the range to fetch for it (widened to its neighbours' spans).
    fn small_span(&self, f: &FileRef) -> Option<(u32, Range<u64>, Range<u64>)> {
        if Self::is_pushed(f) || f.data.meta.is_none() || self.fills_only.load(Ordering::Relaxed) {
            return None;
        }
        let (object, offset, len) = self.region(f);
        let regions = self.regions.read().clone();
        let k = regions.binary_search(&(object, offset, offset + len)).ok()?;
        let span = crate::nearby::span(&regions, k)?;
        if span.end - span.start > SMALL_SPAN {
            return None;
        }
        let fetch = crate::nearby::widen(&regions, k, span.clone(), self.nearby_reach.load(Ordering::Relaxed));
        Some((object, span, fetch))
    }

    /// Join the metadata (or span) flight `key`, or start it with `fetch`, unless `local()`
    /// says its data is cached already. Looked at under the lock, and a flight leaves the map
    /// only once it has cached its data (or failed): a piece is always either cached or in
    /// flight, so concurrent readers cause one request. `None`: nothing to wait for.
    fn meta_flight(
        &self,
        key: (u32, u64, u64),
        local: impl FnOnce() -> bool,
        fetch: impl FnOnce() -> BoxFuture<'static, Result<Arc<Vec<Arc<Vec<u8>>>>, ReadFailure>>,
    ) -> Option<SharedMeta> {
        let mut inflight = self.inflight_meta.lock();
        if let Some(s) = inflight.get(&key) {
            return Some(s.clone());
        }
        if local() {
            return None;
        }
        let (fetch, flights) = (fetch(), self.inflight_meta.clone());
        let shared = async move {
            let result = fetch.await;
            // Done (whoever polled it to the end): later callers find the data cached.
            flights.lock().remove(&key);
            result
        }
        .boxed()
        .shared();
        inflight.insert(key, shared.clone());
        Some(shared)
    }

    /// Fetch a small file's whole span: metadata region and the blocks that lie in the span,
    /// verified and stored; single-flighted with other readers of the file.
    async fn fetch_span(
        self: &Arc<Self>,
        f: &FileRef,
        (object, span, widened): (u32, Range<u64>, Range<u64>),
    ) -> Result<(), ReadFailure> {
        let (_, offset, len) = self.region(f);
        let key = (object, offset, SPAN_GROUP);
        let local = || matches!(self.meta_chunk_local(f, 0), Ok(Some(_)));
        let shared = self.meta_flight(key, local, || {
            let (me, f) = (self.clone(), f.clone());
            async move {
                let (bytes, mirror) = match me.nearby.get(object, &span) {
                    Some(found) => found,
                    None => {
                        let key = layout::object(&me.digest(object));
                        let (bytes, mirror) = get_counted(&me.mirrors, &me.stats, &key, widened.clone()).await?;
                        let own = (span.start - widened.start) as usize..(span.end - widened.start) as usize;
                        if widened != span {
                            me.nearby.put(object, widened, bytes.clone(), mirror);
                        }
                        (bytes.slice(own), mirror)
                    }
                };
                let at = (offset - span.start) as usize;
                me.put_meta_region(&f, &bytes[at..at + len as usize], mirror);
                let missing: Vec<u64> = (0..incfs_verity::block_count(f.data.size))
                    .filter(|&b| !me.presence.is_present(&f.key, b))
                    .collect();
                // Blocks stored elsewhere (deduplicated) are left to the read's next step.
                if let Ok(plan) = me.plan(&f, &missing) {
                    let inside: Vec<_> = plan
                        .into_iter()
                        .filter(|(_, _, r)| r.object == object && r.offset >= span.start && r.range().end <= span.end)
                        .collect();
                    if !inside.is_empty() {
                        me.accept_off_thread(&f, inside, bytes, span.start, mirror, Purpose::Read).await;
                    }
                }
                Ok(Arc::new(Vec::new()))
            }
            .boxed()
        });
        match shared {
            Some(s) => s.await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Fetch the group of metadata pieces holding piece `chunk` of `f`'s region; concurrent
    /// callers for one group share one request.
    pub(crate) async fn fetch_meta(&self, f: &FileRef, chunk: u64) -> Result<(), ReadFailure> {
        let (object, offset, len) = self.region(f);
        if object == PUSHED_OBJECT {
            let message = format!("{}: pushed file without its tree", f.label);
            return Err(ReadFailure { cause: FailCause::Other, message });
        }
        // A compact map (at most one group long) is fetched whole, whichever piece was asked.
        let compact = f.data.has_compact_map();
        let group = if compact { 0 } else { chunk / META_PIECES_PER_FETCH };
        let key = (object, offset, group);
        let local = || matches!(self.meta_chunk_local(f, chunk), Ok(Some(_)));
        let shared = self.meta_flight(key, local, || {
            let digest = self.digest(object);
            let (mirrors, stats, store) = (self.mirrors.clone(), self.stats.clone(), self.store.clone());
            let meta_from = self.meta_from.clone();
            let first = group * META_PIECES_PER_FETCH;
            let start = offset + first * META_CHUNK;
            let end = offset + len.min((first + META_PIECES_PER_FETCH) * META_CHUNK);
            async move {
                let (bytes, mirror) = get_counted(&mirrors, &stats, &layout::object(&digest), start..end).await?;
                let pieces: Vec<Arc<Vec<u8>>> =
                    bytes.chunks(META_CHUNK as usize).map(|p| Arc::new(p.to_vec())).collect();
                for (k, piece) in pieces.iter().enumerate() {
                    remember_mirror(&meta_from, (object, offset, first + k as u64), mirror);
                    if let Err(e) = store.put_meta(&digest, offset, first + k as u64, piece) {
                        tracing::warn!("cannot cache metadata: {e}");
                    }
                }
                Ok(Arc::new(pieces))
            }
            .boxed()
        });
        let Some(shared) = shared else { return Ok(()) };
        let pieces = shared.await?;
        let first = group * META_PIECES_PER_FETCH;
        for (k, piece) in pieces.iter().enumerate() {
            self.meta.insert((object, offset, first + k as u64), piece.clone());
        }
        Ok(())
    }

    /// Leaf and record of each block of `blocks` that is neither zero nor stored yet.
    pub(crate) fn plan(&self, f: &FileRef, blocks: &[u64]) -> Result<Vec<(u64, Hash, BlockRecord)>, Local> {
        let geo = Geometry::new(f.data.size);
        let mut leaves = Vec::with_capacity(blocks.len());
        let mut memo = None;
        for &i in blocks {
            leaves.push((i, self.leaf_in(f, &geo, i, &mut memo)?));
        }
        let hashes: Vec<Hash> = leaves.iter().map(|(_, h)| *h).filter(|h| *h != self.zero_hash).collect();
        let stored = self.store.stored_among(&hashes);
        let mut out = Vec::new();
        let mut present = Vec::new();
        for (i, leaf) in leaves {
            if leaf == self.zero_hash || stored.contains(&leaf) {
                present.push(i);
                continue;
            }
            out.push((i, leaf, self.record(f, i)?));
        }
        if !present.is_empty() {
            self.persist_presence(&f.key, present);
        }
        Ok(out)
    }

    pub(crate) async fn fetch_blocks(
        self: &Arc<Self>,
        f: &FileRef,
        needed: &[u64],
        ahead: Range<u64>,
        keep_decoded: bool,
    ) -> Result<(), ReadFailure> {
        let blocks_total = incfs_verity::block_count(f.data.size);
        let mut wanted: Vec<u64> = needed.to_vec();
        wanted.extend(ahead.start.max(needed.last().map_or(0, |l| l + 1))..ahead.end.min(blocks_total));
        if wanted.is_empty() {
            return Ok(());
        }
        let plan = loop {
            match self.plan(f, &wanted) {
                Ok(p) => break p,
                Err(Local::Fail(e)) => return Err(e),
                Err(Local::Need(Need::Meta { chunk })) => self.fetch_meta(f, chunk).await?,
                Err(Local::Need(Need::Blocks(_))) => unreachable!("planning needs no blocks"),
            }
        };
        // Sets, not list scans: a plan covers up to a readahead window (thousands of blocks), and
        // scanning lists per item made planning quadratic (4% of the daemon's CPU on a cold read).
        let needed: rustc_hash::FxHashSet<u64> = needed.iter().copied().collect();
        let needed_leaves: Vec<Hash> = plan.iter().filter(|(i, _, _)| needed.contains(i)).map(|(_, h, _)| *h).collect();
        let mut waits = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            // Checked again under the lock: a run stores its blocks before it leaves
            // `inflight`, so a block is always either stored or in flight here.
            let candidates: Vec<Hash> =
                plan.iter().filter(|(_, h, _)| !inflight.contains_key(h)).map(|(_, h, _)| *h).collect();
            let stored = self.store.stored_among(&candidates);
            // Needed blocks and readahead go in separate runs: the read waits only for its own.
            let (mut now, mut ahead) = (Vec::new(), Vec::new());
            let mut planned = rustc_hash::FxHashSet::default();
            for item in plan {
                let is_needed = needed.contains(&item.0);
                match inflight.get(&item.1) {
                    Some(s) if is_needed => waits.push(s.clone()),
                    Some(_) => {}
                    None if !planned.insert(item.1) => {}
                    None if stored.contains(&item.1) => {}
                    None if is_needed => now.push(item),
                    None => ahead.push(item),
                }
            }
            for (todo, wait) in [(now, true), (ahead, false)] {
                for run in group_runs(&todo) {
                    let items: Vec<_> = todo[run].to_vec();
                    let me = self.clone();
                    let file = f.clone();
                    let leaves: Vec<Hash> = items.iter().map(|(_, h, _)| *h).collect();
                    let slot = if wait { None } else { Some(self.slots.clone()) };
                    let handle = tokio::spawn(async move { me.fetch_run(file, items, keep_decoded, slot).await });
                    let shared = async move { handle.await.unwrap_or_else(|_| Arc::new(RunOutcome::default())) }
                        .boxed()
                        .shared();
                    for h in leaves {
                        inflight.insert(h, shared.clone());
                    }
                    if wait {
                        waits.push(shared);
                    }
                }
            }
        }
        let outcomes = futures::future::join_all(waits).await;
        if outcomes.iter().all(|o| o.failed.is_empty()) {
            return Ok(());
        }
        for leaf in &needed_leaves {
            if let Some(e) = outcomes.iter().find_map(|o| o.failed.get(leaf)) {
                return Err(e.clone());
            }
        }
        Ok(())
    }

    /// One ranged GET for blocks lying back to back in one object; verify, store, report. With
    /// `slot`, the request waits for a slot of it first (readahead).
    async fn fetch_run(
        self: Arc<Self>,
        f: FileRef,
        items: Vec<(u64, Hash, BlockRecord)>,
        keep_decoded: bool,
        slot: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Arc<RunOutcome> {
        let _permit = match &slot {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let first = items[0].2;
        let end = items.last().unwrap().2.range().end;
        let key = layout::object(&self.digest(first.object));
        let found = self.nearby.get(first.object, &(first.offset..end)).map(Ok);
        let fetched = match found {
            Some(found) => found,
            None => get_counted(&self.mirrors, &self.stats, &key, first.offset..end).await,
        };
        let outcome = match fetched {
            Err(failure) => {
                let mut outcome = RunOutcome::default();
                for (_, h, _) in &items {
                    outcome.failed.insert(*h, failure.clone());
                }
                outcome
            }
            Ok((bytes, mirror)) => {
                let purpose = if keep_decoded { Purpose::Read } else { Purpose::Prefetch };
                self.accept_off_thread(&f, items.clone(), bytes, first.offset, mirror, purpose).await
            }
        };
        let mut inflight = self.inflight.lock();
        for (_, h, _) in &items {
            inflight.remove(h);
        }
        Arc::new(outcome)
    }

    /// [`Reader::accept`] on the blocking pool: decoding, hashing and storing are CPU and disk
    /// work, kept off the async workers.
    pub(crate) async fn accept_off_thread(
        self: &Arc<Self>,
        f: &FileRef,
        items: Vec<(u64, Hash, BlockRecord)>,
        bytes: bytes::Bytes,
        base: u64,
        mirror: usize,
        purpose: Purpose,
    ) -> RunOutcome {
        let (me, f) = (self.clone(), f.clone());
        tokio::task::spawn_blocking(move || me.accept(&f, &items, &bytes, base, mirror, purpose))
            .await
            .unwrap_or_default()
    }

    /// Keep a run's verified blocks for the reader about to read them: each is a view of the
    /// response `body` (blocks stored raw) or of the run's decoded buffer `run`.
    fn stage(&self, body: &bytes::Bytes, run: Vec<u8>, decoded: Vec<(Hash, Place)>) {
        let run = bytes::Bytes::from(run);
        let mut staged = self.staged.lock();
        for (leaf, place) in decoded {
            let block = match place {
                Place::Body(at) => RunBlock { buf: body.clone(), at },
                Place::Run(at) => RunBlock { buf: run.clone(), at },
            };
            staged.put(leaf, block);
        }
    }

    /// Verify blocks `items` of `f` out of `bytes` (which start at object offset `base`, as
    /// served by mirror `mirror`), store the good ones and report the bad. For a read, also keep
    /// them in memory for the reader about to read them (not for background fetching).
    pub(crate) fn accept(
        &self,
        f: &FileRef,
        items: &[(u64, Hash, BlockRecord)],
        bytes: &bytes::Bytes,
        base: u64,
        mirror: usize,
        purpose: Purpose,
    ) -> RunOutcome {
        let keep_decoded = purpose == Purpose::Read;
        let mut outcome = RunOutcome::default();
        let mut good = Vec::new();
        // Where each good block's decoded bytes lie: in the response itself (a whole block
        // stored raw: hashed and served where it is), or at this offset of `run`.
        let mut decoded: Vec<(Hash, Place)> = Vec::new();
        let in_place = |r: &BlockRecord| r.codec == Codec::Raw && r.len as usize == BLOCK_SIZE;
        // Other blocks are decoded for a reader into one buffer for the run; otherwise each is
        // only checked, in a scratch block.
        let decodes = if keep_decoded { items.iter().filter(|(_, _, r)| !in_place(r)).count() } else { 0 };
        let mut run = vec![0u8; decodes * BLOCK_SIZE];
        let mut next = 0;
        let mut lied = false;
        let mut scratch = [0u8; BLOCK_SIZE];
        for (i, leaf, r) in items {
            let at = (r.offset - base) as usize;
            let stored = &bytes[at..at + r.len as usize];
            let checked = if in_place(r) {
                match hash_data_block(stored) == *leaf {
                    true => Ok(Place::Body(at)),
                    false => Err(incfs_fetch::image::BlockFault::Mismatch),
                }
            } else {
                let slot = next;
                let out: &mut [u8; BLOCK_SIZE] = match keep_decoded {
                    true => (&mut run[slot * BLOCK_SIZE..][..BLOCK_SIZE]).try_into().expect("a whole block"),
                    false => &mut scratch,
                };
                verify_block_into(r, stored, leaf, out).map(|()| {
                    next += 1;
                    Place::Run(slot * BLOCK_SIZE)
                })
            };
            match checked {
                Ok(place) => {
                    decoded.push((*leaf, place));
                    good.push((*i, (*leaf, r.codec, at..at + stored.len())))
                }
                Err(e) => {
                    Stats::add(&self.stats.blocks_bad, 1);
                    tracing::error!(
                        "{}: block {i} from {} failed verification ({e}); not stored",
                        f.label,
                        self.mirrors.sources()[mirror].name()
                    );
                    lied = true;
                    // The block's record (where it lies, its codec) came from the same kind of
                    // untrusted bytes: forget its piece, so the next try reads it afresh rather
                    // than asking for the wrong bytes again.
                    let at = FileMetaLayout::new(f.data.size).record_offset(*i);
                    self.drop_meta(f, at..at + BLOCK_RECORD_SIZE as u64);
                    outcome.failed.insert(
                        *leaf,
                        ReadFailure { cause: FailCause::Verification, message: format!("{}: block {i}: {e}", f.label) },
                    );
                }
            }
        }
        match lied {
            true => self.mirrors.lied(mirror),
            false => self.mirrors.vouch(mirror),
        }
        let present: Vec<u64> = good.iter().map(|(i, _)| *i).collect();
        let blocks: Vec<(Hash, Codec, Range<usize>)> = good.into_iter().map(|(_, b)| b).collect();
        // Background completion never evicts (it stops at the limit); reads and prefetching do.
        let evict = purpose != Purpose::Complete;
        match self.store_run(&f.key, bytes, &blocks, present, evict) {
            Ok(()) => {
                Stats::add(&self.stats.blocks_fetched, blocks.len() as u64);
                // Only once written: a block served is a block kept, even if killed now.
                if keep_decoded {
                    self.stage(bytes, run, decoded);
                }
            }
            Err(e @ incfs_store::StoreError::Full { .. }) if keep_decoded => {
                // Nothing left to evict (all pinned, or in use): the read is still served, from
                // memory, and the blocks are not kept.
                tracing::debug!("{}: blocks served without being stored: {e}", f.label);
                Stats::add(&self.stats.blocks_fetched, blocks.len() as u64);
                self.stage(bytes, run, decoded);
            }
            Err(e) => {
                tracing::error!("cannot store blocks: {e}");
                for (hash, _, _) in &blocks {
                    outcome.failed.insert(*hash, ReadFailure { cause: FailCause::Other, message: e.to_string() });
                }
            }
        }
        outcome
    }
}

/// Note that mirror `mirror` sent metadata piece `key` (see `Reader::meta_from`).
fn remember_mirror(map: &MetaFrom, key: (u32, u64, u64), mirror: usize) {
    let mut map = map.lock();
    if map.len() >= META_FROM_MAX {
        map.clear();
    }
    map.insert(key, mirror);
}

/// One ranged GET from the mirrors, counted in `stats`: bytes and latency, or a failure.
pub(crate) async fn get_counted(
    mirrors: &Mirrors,
    stats: &Stats,
    key: &str,
    range: Range<u64>,
) -> Result<(bytes::Bytes, usize), ReadFailure> {
    let t = Instant::now();
    match mirrors.get_range(key, range).await {
        Ok((bytes, mirror)) => {
            stats.fetched(bytes.len() as u64, t.elapsed());
            Ok((bytes, mirror))
        }
        Err(e) => {
            Stats::add(&stats.fetch_failures, 1);
            Err(ReadFailure { cause: FailCause::Source, message: e.to_string() })
        }
    }
}

/// Split blocks (in file order) into runs one ranged GET can serve: stored back to back in one
/// object, at most [`MAX_RUN_BYTES`] long and [`MAX_RUN_BLOCKS`] blocks.
/// Where a verified block of a fetched run lies: at this offset of the response body (stored
/// raw, so its bytes are its data), or of the run's buffer of decoded blocks.
enum Place {
    Body(usize),
    Run(usize),
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

pub(crate) fn group_runs(items: &[(u64, Hash, BlockRecord)]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (k, (_, _, r)) in items.iter().enumerate() {
        if let Some(run) = runs.last_mut() {
            let prev = &items[run.end - 1].2;
            let start = &items[run.start].2;
            if k - run.start < MAX_RUN_BLOCKS && prev.joins_run(r, start, MAX_RUN_BYTES) {
                run.end = k + 1;
                continue;
            }
        }
        runs.push(k..k + 1);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u64, object: u32, offset: u64, len: u16) -> (u64, Hash, BlockRecord) {
        (i, [i as u8; 32], BlockRecord { object, codec: Codec::Lz4, len, offset })
    }

    #[test]
    fn runs_join_only_adjacent_bytes() {
        let items =
            vec![item(0, 0, 0, 10), item(1, 0, 10, 5), item(2, 0, 100, 5), item(3, 1, 105, 5), item(9, 1, 110, 1)];
        assert_eq!(group_runs(&items), vec![0..2, 2..3, 3..5]);
        let big: Vec<_> = (0..2000).map(|i| item(i, 0, i * 4096, 4096)).collect();
        assert_eq!(group_runs(&big).len(), 4, "8 MiB in runs of 2 MiB");
        let text: Vec<_> = (0..2000).map(|i| item(i, 0, i * 200, 200)).collect();
        assert_eq!(group_runs(&text), vec![0..512, 512..1024, 1024..1536, 1536..2000], "2 MiB of file per run");
    }
}
