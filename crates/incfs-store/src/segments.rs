//! The block store proper: append-only segment files, their journals, and the index in memory.
//!
//! Why this shape (measured): with blocks in SQLite, 61% of the daemon's CPU during a cold read
//! went to `sqlite3_step` (every block written twice, into the WAL and at checkpoint, plus a
//! B-tree insert and lookup per block). Here a fetched run costs two `write`s whatever its length:
//! its stored bytes appended to the process's current segment in one `pwrite`, then one journal
//! append naming each block and the presence it brings. The index (leaf hash -> where) lives in
//! memory, rebuilt at open by replaying the journals: keyed by the first 16 bytes of the leaf
//! hash, 28 bytes an entry (about 14 MiB per GiB cached at the table's lowest load, 7 at its
//! highest; a full 32-byte key and 64-bit offsets took twice that, which was the largest part of
//! the daemon's memory during a cold read). 128 bits of a SHA-256 digest tell blocks apart as
//! well as all 256 can here: a wrong pairing would take a collision of 2^64 work, and every block
//! read from the store is verified against its full leaf hash anyway.
//!
//! Crash safety: data is written before the journal records that point at it, and both are in
//! the kernel's page cache before a read that needed them is answered, so `kill -9` at any
//! instant loses nothing that was served; a torn journal tail is cut at replay (each record has a
//! CRC). After a power loss a record may point at bytes that did not reach the disk: every block
//! and metadata piece read from here is verified by the caller, and a bad one is dropped
//! ([`Segments::drop_block`]) and fetched again. Nothing here is trusted more than the network.
//!
//! Sharing: several processes may use one cache. Each appends only to segments it created
//! (`O_EXCL`, and held with an exclusive `flock` while it appends, so that no one evicts it), and
//! reads every segment; what another live process stores after this one opened is not seen until
//! the next open (it costs a refetch, never a wrong byte).
//!
//! Limit: with a cache size limit ([`crate::limit`]), a write that would pass it first evicts
//! whole files, least recently used first: a sealed segment with its journal (the blocks and
//! metadata pieces it held leave the index, the presence its journal recorded is cleared), or a
//! plain copy. A segment another process evicted reads as absent here: its index entries are
//! dropped when found so, and the blocks are fetched again.

use std::collections::{BTreeMap, HashMap};

use parking_lot::{Mutex, RwLock};
use rustc_hash::FxBuildHasher;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use incfs_format::{Codec, Hash};

use crate::journal::{self, FileKey, Record, PRESENCE_CHUNK_BITS, PRESENCE_CHUNK_BYTES};
use crate::limit::{self, Victim};
use crate::StoreError;

/// A process starts a new segment once its current one holds this much (with no cache limit;
/// under a limit, a sixteenth of it: [`limit::segment_size`]). Large enough to keep the number of
/// open files small.
pub const SEGMENT_MAX: u64 = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    segment: u32,
    offset: u64,
    len: u32,
}

/// Where a block lies: 12 bytes (segments stay far below 4 GiB, stored blocks at most 4 KiB).
#[derive(Debug, Clone, Copy)]
struct BlockLoc {
    segment: u32,
    offset: u32,
    len: u16,
    codec: Codec,
}

impl BlockLoc {
    /// Whether this is the place a record names (a later record may have moved the block).
    fn is_at(&self, segment: u32, offset: u64) -> bool {
        self.segment == segment && self.offset as u64 == offset
    }

    fn at(&self) -> Loc {
        Loc { segment: self.segment, offset: self.offset as u64, len: self.len as u32 }
    }
}

/// The index key of a block: the first half of its leaf hash.
type BlockKey = [u8; 16];

fn block_key(hash: &Hash) -> BlockKey {
    hash[..16].try_into().expect("a hash has 32 bytes")
}

/// The block index, in shards by the key's first byte: a table grows by doubling, and while it
/// does the old and new tables are both allocated; one shard at a time, that peak is a 64th of
/// what one big table's would be (8 MiB at 1 GiB cached).
struct BlockIndex {
    shards: Vec<HashMap<BlockKey, BlockLoc, FxBuildHasher>>,
}

impl Default for BlockIndex {
    fn default() -> Self {
        BlockIndex { shards: (0..64).map(|_| HashMap::default()).collect() }
    }
}

impl BlockIndex {
    fn shard(key: &BlockKey) -> usize {
        (key[0] & 63) as usize
    }
    fn get(&self, key: &BlockKey) -> Option<&BlockLoc> {
        self.shards[Self::shard(key)].get(key)
    }
    fn contains_key(&self, key: &BlockKey) -> bool {
        self.shards[Self::shard(key)].contains_key(key)
    }
    fn insert(&mut self, key: BlockKey, loc: BlockLoc) -> Option<BlockLoc> {
        self.shards[Self::shard(&key)].insert(key, loc)
    }
    fn remove(&mut self, key: &BlockKey) -> Option<BlockLoc> {
        self.shards[Self::shard(key)].remove(key)
    }
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }
}

type MetaKey = (Hash, u64, u64);
type Chunks = BTreeMap<u64, Box<[u8; PRESENCE_CHUNK_BYTES]>>;

#[derive(Default)]
struct Index {
    /// Keys are SHA-256 digests: a fast hash of them is as good as SipHash.
    blocks: BlockIndex,
    meta: HashMap<MetaKey, Loc>,
    presence: HashMap<FileKey, Chunks>,
    block_bytes: u64,
    /// Bytes indexed per segment (blocks and metadata pieces): what compaction would keep.
    live: HashMap<u32, u64, FxBuildHasher>,
}

impl Index {
    fn add_live(&mut self, segment: u32, n: u64) {
        *self.live.entry(segment).or_default() += n;
    }

    fn sub_live(&mut self, segment: u32, n: u64) {
        if let Some(l) = self.live.get_mut(&segment) {
            *l = l.saturating_sub(n);
        }
    }

    fn insert_block(&mut self, hash: &Hash, new: BlockLoc) {
        if let Some(old) = self.blocks.insert(block_key(hash), new) {
            self.unaccount(&old);
        }
        if new.segment < PLAIN_BASE {
            self.block_bytes += new.len as u64;
            self.add_live(new.segment, new.len as u64);
        }
    }

    /// Bytes of a block leaving the index (blocks in plain copies are not the store's bytes).
    fn unaccount(&mut self, b: &BlockLoc) {
        if b.segment < PLAIN_BASE {
            self.block_bytes -= b.len as u64;
            self.sub_live(b.segment, b.len as u64);
        }
    }

    /// Forget the block recorded at `segment`/`offset`, if the index still points there.
    fn forget_block(&mut self, hash: &Hash, segment: u32, offset: u64) -> bool {
        let key = block_key(hash);
        match self.blocks.get(&key).copied() {
            Some(b) if b.is_at(segment, offset) => {
                self.unaccount(&b);
                self.blocks.remove(&key);
                true
            }
            _ => false,
        }
    }

    fn insert_meta(&mut self, key: MetaKey, at: Loc) {
        if let Some(old) = self.meta.insert(key, at) {
            self.sub_live(old.segment, old.len as u64);
        }
        self.add_live(at.segment, at.len as u64);
    }

    /// Forget a metadata piece, if it is still at `at` (any place: `None`).
    fn forget_meta(&mut self, key: &MetaKey, at: Option<Loc>) {
        match self.meta.get(key).copied() {
            Some(l) if at.is_none_or(|a| a == l) => {
                self.meta.remove(key);
                self.sub_live(l.segment, l.len as u64);
            }
            _ => {}
        }
    }

    fn apply(&mut self, segment: u32, r: Record, segment_len: u64) {
        match r {
            Record::Block { hash, codec, len, offset } => {
                if offset + len as u64 > segment_len {
                    return; // its bytes never reached the disk (power loss): fetched again
                }
                let Ok(offset) = u32::try_from(offset) else { return }; // not written so: ignored
                self.insert_block(&hash, BlockLoc { segment, offset, len, codec });
            }
            Record::Present { file, first, count } => {
                let chunks = self.presence.entry(file).or_default();
                // Chunk by chunk: a run of a few hundred blocks finds its chunk once.
                let (mut i, end) = (first, first.saturating_add(count as u64));
                while i < end {
                    let c = i / PRESENCE_CHUNK_BITS;
                    let until = end.min((c + 1) * PRESENCE_CHUNK_BITS);
                    let bits = chunks.entry(c).or_insert_with(|| Box::new([0; PRESENCE_CHUNK_BYTES]));
                    for b in i % PRESENCE_CHUNK_BITS..(until - 1) % PRESENCE_CHUNK_BITS + 1 {
                        bits[(b / 8) as usize] |= 1 << (b % 8);
                    }
                    i = until;
                }
            }
            Record::PresenceChunk { file, chunk, bits } => {
                let chunks = self.presence.entry(file).or_default();
                if bits.iter().all(|b| *b == 0) {
                    chunks.remove(&chunk);
                } else {
                    chunks.insert(chunk, bits);
                }
            }
            Record::Meta { object, region, chunk, len, offset } => {
                if offset + len as u64 <= segment_len {
                    self.insert_meta((object, region, chunk), Loc { segment, offset, len });
                }
            }
            Record::DropBlock { hash, segment, offset } => {
                self.forget_block(&hash, segment, offset);
            }
            Record::DropMeta { object, region, chunk } => {
                self.forget_meta(&(object, region, chunk), None);
            }
        }
    }

    /// Clear the presence of blocks `first..first+count` of `file` (their segment was evicted).
    fn clear_presence(&mut self, file: &FileKey, first: u64, count: u32) {
        let Some(chunks) = self.presence.get_mut(file) else { return };
        for i in first..first.saturating_add(count as u64) {
            let (c, b) = (i / PRESENCE_CHUNK_BITS, i % PRESENCE_CHUNK_BITS);
            if let Some(bits) = chunks.get_mut(&c) {
                bits[(b / 8) as usize] &= !(1 << (b % 8));
            }
        }
        chunks.retain(|_, bits| bits.iter().any(|b| *b != 0));
    }
}

/// Called with (file, first block, count) for presence cleared by an eviction (`0, u32::MAX`:
/// every block of the file).
pub type EvictHook = Arc<dyn Fn(&FileKey, u64, u32) + Send + Sync>;

/// A segment open for reading, and when this process last marked it used.
struct SegFile {
    file: File,
    touched: AtomicU64,
}

impl SegFile {
    /// Mark the segment used now (its modification time: recency across processes), at most
    /// once a second.
    fn touch(&self) {
        let now = SystemTime::now();
        let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.touched.load(Ordering::Relaxed) < secs && self.touched.swap(secs, Ordering::Relaxed) < secs {
            let _ = self.file.set_modified(now);
        }
    }
}

/// The cache limit as this process sees it: the recorded limit, bytes in the directory at the
/// last scan plus what this process wrote since, and what evictions did.
struct Budget {
    cache: PathBuf,
    /// `u64::MAX`: no limit.
    limit: AtomicU64,
    used: AtomicU64,
    /// Bytes written since the last scan (others' writes show only in a scan).
    unscanned: AtomicU64,
    scanned: Mutex<Option<Instant>>,
    /// Held from the check of room to the write that uses it, so that no scan or other check
    /// comes in between (appends, reservations and scans all take it).
    gate: Mutex<()>,
    /// Room promised to writes outside the segments that are not on disk yet (plain copies).
    reserved: AtomicU64,
    surveyor: limit::Surveyor,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    refetched: AtomicU64,
    /// Leaf hashes of evicted blocks, as bits of a fixed table (1 MiB, allocated at the first
    /// eviction): a block stored again whose bit is set counts as a refetch. Cleared when half
    /// full, so the count is approximate (a false hit per bit set when cleared, at most).
    evicted: Mutex<Option<(Box<[u64]>, u64)>>,
}

const EVICTED_BITS: u64 = 1 << 23;

fn evicted_bit(hash: &Hash) -> u64 {
    u64::from_le_bytes(hash[16..24].try_into().expect("8 bytes")) % EVICTED_BITS
}

impl Budget {
    fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::Relaxed)).filter(|&l| l != u64::MAX)
    }

    /// Read the recorded limit and measure the directory again.
    fn rescan(&self) -> Result<(), StoreError> {
        let io = |source| StoreError::Io { path: self.cache.clone(), source };
        let limit = limit::recorded(&self.cache).map_err(io)?;
        self.limit.store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
        if limit.is_some() {
            let on_disk = self.surveyor.scan(&self.cache).map_err(io)?.total();
            self.used.store(on_disk + self.reserved.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.unscanned.store(0, Ordering::Relaxed);
        *self.scanned.lock() = Some(Instant::now());
        Ok(())
    }

    /// Whether the view is old: other processes may have written or evicted meanwhile.
    fn stale(&self, limit: u64) -> bool {
        self.unscanned.load(Ordering::Relaxed) > limit / 64
            || self.scanned.lock().is_none_or(|t| t.elapsed() > std::time::Duration::from_millis(500))
    }

    fn note_evicted(&self, hash: &Hash) {
        let mut e = self.evicted.lock();
        let (bits, set) = e.get_or_insert_with(|| (vec![0u64; (EVICTED_BITS / 64) as usize].into(), 0));
        if *set > EVICTED_BITS / 2 {
            bits.fill(0);
            *set = 0;
        }
        let b = evicted_bit(hash);
        if bits[(b / 64) as usize] & (1 << (b % 64)) == 0 {
            bits[(b / 64) as usize] |= 1 << (b % 64);
            *set += 1;
        }
    }

    fn note_stored(&self, hash: &Hash) {
        if self.evictions.load(Ordering::Relaxed) == 0 {
            return; // nothing evicted yet (no limit, or none reached): no lock per block
        }
        let mut e = self.evicted.lock();
        let Some((bits, set)) = e.as_mut() else { return };
        let b = evicted_bit(hash);
        if bits[(b / 64) as usize] & (1 << (b % 64)) != 0 {
            bits[(b / 64) as usize] &= !(1 << (b % 64));
            *set -= 1;
            self.refetched.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Room reserved under the cache limit for a write outside the segments.
pub struct Reserved<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.budget.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The cache limit and what it caused, as this process saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitState {
    pub limit: Option<u64>,
    /// Bytes in the cache directory (at the last scan, plus this process's writes since).
    pub used: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Blocks fetched again after their eviction (approximate).
    pub refetched: u64,
}

/// The segment this process appends to.
struct Writer {
    id: u32,
    data: File,
    /// The same segment opened with `O_DIRECT`, for large runs (see [`DIRECT_MIN`]); `None`
    /// where the filesystem refuses it (tmpfs before Linux 6.6, FUSE filesystems without direct
    /// I/O).
    direct: Option<File>,
    /// Where a run is aligned for a direct write (writes are serialized by the writer's lock).
    aligned: Vec<u8>,
    journal: File,
    tail: u64,
}

/// Writes at least this long made [`Via::Direct`] use `O_DIRECT`, at an offset and of a length
/// rounded up to [`DIRECT_ALIGN`] (the gap and the padding are dead bytes, never indexed). A
/// buffered write costs the daemon a copy into the page cache and ext4's delayed allocation per
/// page (7% of its CPU on a cold read, half of it the copy); the device copies a direct write
/// itself, but the writer waits for it. Small writes stay buffered: the padding would cost more
/// than the copy saves. The bytes are read back through the page cache either way (the kernel
/// drops cached pages a direct write overlaps).
const DIRECT_MIN: usize = 128 << 10;
/// How a large write reaches the segment.
///
/// `Direct` ([`DIRECT_MIN`] bytes or more: `O_DIRECT`) costs the daemon no page-cache copy and
/// leaves the page cache to the user's own files, but the caller waits for the device: right for
/// work nobody waits on (background completion, prefetching, compaction). `PageCache` returns
/// once the kernel holds the bytes (a `kill -9` of the daemon loses nothing; the kernel writes
/// them back later): for a run a reader is waiting on, so that a cold read is not held to the
/// local disk's write speed. On the bench's VM, where the server reads the same disk, the cold
/// read of a 1 GiB file took 1.20-1.24 s against 1.39-1.46 s direct, at the same daemon CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    PageCache,
}

/// Offset, length and memory alignment for direct writes: covers 512- and 4096-byte devices.
const DIRECT_ALIGN: usize = 4096;

/// Write `data` at `offset` (a multiple of [`DIRECT_ALIGN`]) through `direct`, padded with zeros
/// to a multiple of [`DIRECT_ALIGN`]; returns the length written. Data that starts on an
/// aligned address (a response body received page-aligned) is written where it lies, only its
/// partial last page copied into `buf`; other data is copied whole into `buf`, aligned.
fn write_direct(direct: &File, buf: &mut Vec<u8>, data: &[u8], offset: u64) -> std::io::Result<u64> {
    let padded = data.len().next_multiple_of(DIRECT_ALIGN);
    if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        let head = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let tail = &data[head..];
        if buf.len() < 2 * DIRECT_ALIGN {
            *buf = vec![0; 2 * DIRECT_ALIGN];
        }
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let last = &mut buf[at..at + DIRECT_ALIGN];
        last[..tail.len()].copy_from_slice(tail);
        last[tail.len()..].fill(0);
        let pieces: &[&[u8]] = match tail.is_empty() {
            true => &[&data[..head]],
            false => &[&data[..head], last],
        };
        pwrite_all(direct, pieces, offset)?;
        return Ok(padded as u64);
    }
    if buf.len() < padded + DIRECT_ALIGN {
        *buf = vec![0; padded + DIRECT_ALIGN]; // a fresh allocation may sit elsewhere: realigned below
    }
    let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
    let aligned = &mut buf[at..at + padded];
    aligned[..data.len()].copy_from_slice(data);
    aligned[data.len()..].fill(0);
    let written = direct.write_all_at(aligned, offset);
    if buf.len() > KEEP_ALIGNED {
        *buf = Vec::new(); // a rare large write (compaction): not kept
    }
    written.map(|()| padded as u64)
}

/// All of `pieces`, back to back, at `offset` of `file`: one `pwritev(2)` (std has no
/// positioned vectored write), the rest of a short write piece by piece.
fn pwrite_all(file: &File, pieces: &[&[u8]], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let iov: Vec<libc::iovec> =
        pieces.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }).collect();
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let at = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: each iovec points into a slice borrowed for the whole call, with that slice's
    // length; pwritev only reads from them, and `file` is an open descriptor.
    let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, at) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut done = n as usize;
    let mut start = 0;
    for p in pieces {
        let end = start + p.len();
        if done < end {
            file.write_all_at(&p[done - start..], offset + done as u64)?;
            done = end;
        }
        start = end;
    }
    debug_assert_eq!(done, total);
    Ok(())
}

/// The aligned buffer is kept up to this size: a fetched run (up to 2 MiB) fits.
const KEEP_ALIGNED: usize = (4 << 20) + DIRECT_ALIGN;

pub struct Segments {
    dir: PathBuf,
    index: RwLock<Index>,
    writer: Mutex<Option<Writer>>,
    /// Direct writes work here (until one is refused with EINVAL).
    direct_ok: AtomicBool,
    /// Highest segment id seen; new segments take the next free one.
    last_id: Mutex<u32>,
    files: RwLock<HashMap<u32, Arc<SegFile>>>,
    budget: Budget,
    on_evict: RwLock<Option<EvictHook>>,
    /// One compaction at a time.
    compacting: Mutex<()>,
    /// Plain copies whose blocks the index points at, by number (see [`PLAIN_BASE`]).
    plains: Mutex<Vec<FileKey>>,
    /// The segment pinned data is moved to ([`Segments::pin`]); its id has a marker file.
    pin_writer: Mutex<Option<Writer>>,
    /// Pinned segments (a `NNNNNNNN.pin` marker beside them, listing the pinned contents they
    /// hold): never evicted nor compacted; and the contents pinned.
    pins: RwLock<Pins>,
    /// Segments a pin is moving data out of: neither evicted nor compacted meanwhile.
    protect: Mutex<std::collections::HashSet<u32>>,
    /// One pin at a time.
    pinning: Mutex<()>,
}

/// Clears the protected segments when a pin ends, however it ends.
struct Unprotect<'a>(&'a Mutex<std::collections::HashSet<u32>>);

impl Drop for Unprotect<'_> {
    fn drop(&mut self) {
        self.0.lock().clear();
    }
}

#[derive(Default)]
struct Pins {
    segments: HashMap<u32, std::collections::BTreeSet<FileKey>>,
    keys: std::collections::HashSet<FileKey>,
}

/// Index places at or above this "segment" id are blocks of plain copies, not of segments:
/// `PLAIN_BASE + n` is the `n`th plain copy this process registered, the offset a block number.
/// Segment ids are 8 decimal digits, far below.
const PLAIN_BASE: u32 = 1 << 31;

/// A segment is compacted once its unindexed bytes pass half its length and this much.
const COMPACT_MIN_DEAD: u64 = 1 << 20;
/// Live bytes moved per append while compacting (bounds the memory it takes).
const COMPACT_PIECE: usize = 8 << 20;

/// Replay every journal in `dir` in segment order, calling `each(segment, record, segment
/// length)`; returns the segment ids found (with or without a journal).
fn replay_dir(dir: &Path, mut each: impl FnMut(u32, Record, u64)) -> Result<Vec<u32>, StoreError> {
    let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
    let mut ids: Vec<u32> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let name = e.map_err(io)?.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name.strip_suffix(".jnl").and_then(|n| n.parse::<u32>().ok()) {
            ids.push(id);
        } else if let Some(id) = name.strip_suffix(".seg").and_then(|n| n.parse::<u32>().ok()) {
            // A segment whose journal was never created holds nothing reachable; its id
            // is still taken.
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    for &id in &ids {
        let jpath = dir.join(jnl_name(id));
        let mut bytes = Vec::new();
        match File::open(&jpath) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(|source| StoreError::Io { path: jpath.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StoreError::Io { path: jpath, source }),
        };
        if bytes.len() < journal::MAGIC.len() {
            continue; // created, killed before its magic was written
        }
        if bytes[..journal::MAGIC.len()] != journal::MAGIC {
            return Err(StoreError::Corrupt {
                path: jpath,
                what: "not an incfs journal of this layout; move the cache directory away and mount again".into(),
            });
        }
        let seg_len = match std::fs::metadata(dir.join(seg_name(id))) {
            Ok(m) => m.len(),
            // Evicted (the journal goes first; killed before the segment followed): nothing
            // it names is here, its presence included.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StoreError::Io { path: dir.join(seg_name(id)), source }),
        };
        let (records, stopped) = journal::replay(&bytes[journal::MAGIC.len()..]);
        if let Some(e) = stopped {
            tracing::info!("journal {}: replay stopped after {} records ({e})", jpath.display(), records.len());
        }
        for r in records {
            each(id, r, seg_len);
        }
    }
    Ok(ids)
}

fn hex_hash(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Add `data` (a block or metadata piece, `r` naming it at offset 0) to a piece of a move.
fn push_piece((buf, recs): &mut (Vec<u8>, Vec<Record>), data: &[u8], mut r: Record) {
    if let Record::Block { offset, .. } | Record::Meta { offset, .. } = &mut r {
        *offset = buf.len() as u64;
    }
    buf.extend_from_slice(data);
    recs.push(r);
}

fn pin_name(id: u32) -> String {
    format!("{id:08}.pin")
}

/// The pin markers in `dir`: which pinned contents each pinned segment holds.
fn load_pins(dir: &Path) -> Pins {
    let mut pins = Pins::default();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pin")).and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let keys: std::collections::BTreeSet<FileKey> = std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| limit::plain_key(Path::new(l.trim())))
            .collect();
        if keys.is_empty() {
            // Left by a process that pinned nothing into it (its writer's lock keeps a live
            // one from eviction anyway).
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        pins.keys.extend(keys.iter().copied());
        pins.segments.insert(id, keys);
    }
    pins
}

fn hex_key(key: &FileKey) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn seg_name(id: u32) -> String {
    format!("{id:08}.seg")
}

fn jnl_name(id: u32) -> String {
    format!("{id:08}.jnl")
}

/// One stored block as found: codec and stored bytes (not yet verified).
pub type StoredBlock = (Codec, Vec<u8>);

impl Segments {
    /// Open the segments in `dir` (created if missing), replaying every journal.
    pub fn open(dir: &Path) -> Result<Segments, StoreError> {
        let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
        crate::private_dir(dir).map_err(io)?;
        let mut index = Index::default();
        let ids = replay_dir(dir, |id, r, seg_len| index.apply(id, r, seg_len))?;
        let budget = Budget {
            cache: dir.parent().unwrap_or(dir).to_path_buf(),
            limit: AtomicU64::new(u64::MAX),
            used: AtomicU64::new(0),
            unscanned: AtomicU64::new(0),
            scanned: Mutex::new(None),
            gate: Mutex::new(()),
            reserved: AtomicU64::new(0),
            surveyor: limit::Surveyor::default(),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            refetched: AtomicU64::new(0),
            evicted: Mutex::new(None),
        };
        budget.rescan()?;
        Ok(Segments {
            dir: dir.to_path_buf(),
            index: RwLock::new(index),
            writer: Mutex::new(None),
            direct_ok: AtomicBool::new(true),
            last_id: Mutex::new(ids.last().copied().unwrap_or(0)),
            files: RwLock::new(HashMap::new()),
            budget,
            on_evict: RwLock::new(None),
            compacting: Mutex::new(()),
            plains: Mutex::new(Vec::new()),
            pin_writer: Mutex::new(None),
            pins: RwLock::new(load_pins(dir)),
            protect: Mutex::new(Default::default()),
            pinning: Mutex::new(()),
        })
    }

    /// Call `hook` with the presence every eviction clears (the mount's own presence map).
    pub fn on_evict(&self, hook: EvictHook) {
        *self.on_evict.write() = Some(hook);
    }

    pub fn limit_state(&self) -> LimitState {
        let b = &self.budget;
        if b.stale(b.limit().unwrap_or(u64::MAX)) {
            // Another process (incfs cache limit, a mount) may have changed it.
            let _gate = b.gate.lock();
            let _ = b.rescan();
        }
        LimitState {
            limit: b.limit(),
            used: b.used.load(Ordering::Relaxed),
            evictions: b.evictions.load(Ordering::Relaxed),
            evicted_bytes: b.evicted_bytes.load(Ordering::Relaxed),
            refetched: b.refetched.load(Ordering::Relaxed),
        }
    }

    /// Read the recorded limit again now (after it was changed).
    pub fn reload_limit(&self) -> Result<(), StoreError> {
        let _gate = self.budget.gate.lock();
        self.budget.rescan()
    }

    /// Whether `need` more bytes fit under the limit without evicting anything.
    pub fn has_room(&self, need: u64) -> Result<bool, StoreError> {
        let b = &self.budget;
        let Some(limit) = b.limit() else { return Ok(true) };
        let _gate = b.gate.lock();
        if b.stale(limit) {
            b.rescan()?;
        }
        Ok(b.limit().is_none_or(|l| b.used.load(Ordering::Relaxed) + need <= l))
    }

    /// Room for `need` bytes written outside the segments (a plain copy), evicting least
    /// recently used files if needed; counted as used until the returned guard is dropped (by
    /// then the bytes are on disk, where scans find them).
    pub fn reserve(&self, need: u64) -> Result<Reserved<'_>, StoreError> {
        let gate = self.budget.gate.lock();
        let plain_gone = self.make_room(need, None, true)?;
        self.budget.reserved.fetch_add(need, Ordering::Relaxed);
        drop(gate);
        self.forget_presence(&plain_gone)?;
        Ok(Reserved { budget: &self.budget, bytes: need })
    }

    /// Make room for `need` more bytes under the limit, evicting least recently used files (if
    /// `evict`) other than segment `own`; [`StoreError::Full`] when that cannot be done. The
    /// caller holds the budget's gate until the bytes are written.
    /// Returns the file keys whose plain copies went (their presence is to be cleared: their
    /// blocks may be gone from the segments, released when the copy was made).
    fn make_room(&self, need: u64, own: Option<u32>, evict: bool) -> Result<Vec<FileKey>, StoreError> {
        let b = &self.budget;
        let Some(limit) = b.limit() else { return Ok(Vec::new()) };
        if b.stale(limit) || b.used.load(Ordering::Relaxed) + need > limit {
            b.rescan()?;
        }
        let Some(limit) = b.limit() else { return Ok(Vec::new()) };
        let mut busy = std::collections::HashSet::new();
        let mut plain_gone = Vec::new();
        loop {
            let used = b.used.load(Ordering::Relaxed);
            if used + need <= limit {
                b.used.fetch_add(need, Ordering::Relaxed);
                b.unscanned.fetch_add(need, Ordering::Relaxed);
                return Ok(plain_gone);
            }
            let full = || StoreError::Full { path: b.cache.clone(), limit, need };
            if !evict {
                return Err(full());
            }
            let io = |source| StoreError::Io { path: b.cache.clone(), source };
            let mut cands = b.surveyor.candidates(&b.cache, own).map_err(io)?;
            let protect = self.protect.lock().clone();
            cands.retain(|c| !matches!(c.victim, Victim::Segment(id) if busy.contains(&id) || protect.contains(&id)));
            let victims = limit::choose(cands, used, need, limit).ok_or_else(full)?;
            for v in victims {
                let freed = match &v.victim {
                    Victim::Segment(id) => self.evict_segment(*id)?,
                    Victim::Plain(path) => match std::fs::remove_file(path) {
                        Ok(()) => {
                            if let Some(key) = limit::plain_key(path) {
                                self.forget_plain(&key);
                                // A pinned content's blocks stay in its pinned segments.
                                if !self.pins.read().keys.contains(&key) {
                                    plain_gone.push(key);
                                }
                            }
                            Some(v.bytes)
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
                        Err(source) => return Err(StoreError::Io { path: path.clone(), source }),
                    },
                };
                match freed {
                    Some(n) => {
                        tracing::debug!("evicted {:?} ({n} bytes) to stay within the cache limit", v.victim);
                        b.used.fetch_sub(n.min(b.used.load(Ordering::Relaxed)), Ordering::Relaxed);
                        b.evictions.fetch_add(1, Ordering::Relaxed);
                        b.evicted_bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    None => {
                        if let Victim::Segment(id) = v.victim {
                            busy.insert(id);
                        }
                    }
                }
            }
        }
    }

    /// Evict segment `id` with its journal; `None` if another process is still appending to it.
    fn evict_segment(&self, id: u32) -> Result<Option<u64>, StoreError> {
        let (spath, jpath) = (self.dir.join(seg_name(id)), self.dir.join(jnl_name(id)));
        let f = match File::options().write(true).open(&spath) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(0)),
            Err(source) => return Err(StoreError::Io { path: spath, source }),
        };
        if f.try_lock().is_err() {
            return Ok(None);
        }
        let journal = match std::fs::read(&jpath) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Io { path: jpath, source }),
        };
        let seg_len = f.metadata().map_err(self.io(spath.clone()))?.len();
        // Journal first: a journal whose segment is gone is skipped at replay, presence and
        // all. Truncated before unlinked, so that processes holding it open free it too.
        match std::fs::remove_file(&jpath) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(self.io(jpath)(e)),
            _ => {}
        }
        f.set_len(0).map_err(self.io(spath.clone()))?;
        std::fs::remove_file(&spath).map_err(self.io(spath))?;
        let records = match journal.get(..journal::MAGIC.len()) {
            Some(m) if m == journal::MAGIC => journal::replay(&journal[journal::MAGIC.len()..]).0,
            _ => Vec::new(),
        };
        let mut cleared = Vec::new();
        {
            let mut index = self.index.write();
            for r in records {
                match r {
                    Record::Block { hash, offset, .. } if index.forget_block(&hash, id, offset) => {
                        self.budget.note_evicted(&hash);
                    }
                    Record::Meta { object, region, chunk, len, offset } => {
                        index.forget_meta(&(object, region, chunk), Some(Loc { segment: id, offset, len }));
                    }
                    // A pinned content's blocks live on in a pinned segment.
                    Record::Present { file, first, count } if !self.pins.read().keys.contains(&file) => {
                        index.clear_presence(&file, first, count);
                        cleared.push((file, first, count));
                    }
                    _ => {}
                }
            }
        }
        self.index.write().live.remove(&id);
        self.files.write().remove(&id);
        if let Some(hook) = self.on_evict.read().clone() {
            for (file, first, count) in &cleared {
                hook(file, *first, *count);
            }
        }
        Ok(Some(seg_len + journal.len() as u64))
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError::Io { path, source }
    }

    /// A new segment of this process's own (its id claimed with `O_EXCL`).
    fn new_writer(&self, pinned: bool) -> Result<Writer, StoreError> {
        let mut last = self.last_id.lock();
        loop {
            *last += 1;
            let id = *last;
            let spath = self.dir.join(seg_name(id));
            let data = match File::options().read(true).write(true).create_new(true).mode(0o600).open(&spath) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue, // another process
                Err(e) => return Err(self.io(spath)(e)),
            };
            // Held while this process appends: no one evicts a segment being written.
            data.lock().map_err(self.io(spath.clone()))?;
            if pinned {
                let mpath = self.dir.join(pin_name(id));
                File::options().write(true).create_new(true).mode(0o600).open(&mpath).map_err(self.io(mpath))?;
                self.pins.write().segments.insert(id, Default::default());
            }
            let jpath = self.dir.join(jnl_name(id));
            let mut journal = File::options()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&jpath)
                .map_err(self.io(jpath.clone()))?;
            journal.write_all(&journal::MAGIC).map_err(self.io(jpath))?;
            let direct = match self.direct_ok.load(Ordering::Relaxed) {
                true => File::options().write(true).custom_flags(libc::O_DIRECT).open(&spath).ok(),
                false => None,
            };
            return Ok(Writer { id, data, direct, aligned: Vec::new(), journal, tail: 0 });
        }
    }

    /// Append `data` to this process's segment and then `records(segment, offset)` to its
    /// journal; apply the records to the index once both are written.
    /// With `data`, first makes room for it under the cache limit (evicting if `evict`).
    fn append(
        &self,
        data: &[u8],
        evict: bool,
        records: impl FnOnce(u32, u64) -> Vec<Record>,
    ) -> Result<(), StoreError> {
        self.append_to(false, data, evict, Via::Direct, records)
    }

    /// [`Segments::append`] to this process's pinned segment (`pinned`) or its other one, with
    /// `O_DIRECT` where it is worth it (`via`, [`DIRECT_MIN`]) or through the page cache.
    fn append_to(
        &self,
        pinned: bool,
        data: &[u8],
        evict: bool,
        via: Via,
        records: impl FnOnce(u32, u64) -> Vec<Record>,
    ) -> Result<(), StoreError> {
        let direct = via == Via::Direct && data.len() >= DIRECT_MIN;
        let mut w = if pinned { self.pin_writer.lock() } else { self.writer.lock() };
        let max = limit::segment_size(self.budget.limit(), SEGMENT_MAX);
        // Room for a direct write's alignment gap and padding too.
        let room = match direct {
            true => (data.len() + 2 * DIRECT_ALIGN) as u64,
            false => data.len() as u64,
        };
        if w.as_ref().is_none_or(|w| w.tail > 0 && w.tail + room > max) {
            *w = None; // sealed: its lock goes with it
            *w = Some(self.new_writer(pinned)?);
        }
        let w = w.as_mut().unwrap();
        let (_gate, plain_gone) = if data.is_empty() {
            (None, Vec::new())
        } else {
            let gate = self.budget.gate.lock();
            let gone = self.make_room(room, Some(w.id), evict)?;
            (Some(gate), gone)
        };
        let mut offset = w.tail;
        let mut written = false;
        if let Some(direct) = w.direct.as_ref().filter(|_| direct) {
            offset = w.tail.next_multiple_of(DIRECT_ALIGN as u64);
            match write_direct(direct, &mut w.aligned, data, offset) {
                Ok(len) => {
                    w.tail = offset + len;
                    written = true;
                }
                // Refused (alignment rules of this filesystem or device): buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        "direct writes refused in {} ({e}): writing through the page cache",
                        self.dir.display()
                    );
                    self.direct_ok.store(false, Ordering::Relaxed);
                    w.direct = None;
                    offset = w.tail;
                }
                Err(e) => return Err(self.io(self.dir.join(seg_name(w.id)))(e)),
            }
        }
        if !data.is_empty() && !written {
            w.data.write_all_at(data, offset).map_err(self.io(self.dir.join(seg_name(w.id))))?;
            w.tail += data.len() as u64;
        }
        let mut records = records(w.id, offset);
        records.extend(self.presence_clearing(&plain_gone));
        let mut buf = Vec::with_capacity(records.len() * 48);
        for r in &records {
            r.encode(&mut buf);
        }
        // One write(2) in append mode: a torn record can only be the last one.
        w.journal.write_all(&buf).map_err(self.io(self.dir.join(jnl_name(w.id))))?;
        let mut index = self.index.write();
        for r in records {
            if let Record::Block { hash, .. } = &r {
                self.budget.note_stored(hash);
            }
            index.apply(w.id, r, w.tail);
        }
        drop(index);
        self.tell_cleared(&plain_gone);
        Ok(())
    }

    /// Records clearing every presence chunk of `keys`.
    fn presence_clearing(&self, keys: &[FileKey]) -> Vec<Record> {
        let index = self.index.read();
        let mut out = Vec::new();
        for k in keys {
            for &chunk in index.presence.get(k).map(|c| c.keys().collect::<Vec<_>>()).unwrap_or_default() {
                out.push(Record::PresenceChunk { file: *k, chunk, bits: Box::new([0; PRESENCE_CHUNK_BYTES]) });
            }
        }
        out
    }

    /// Tell the mount that `keys` have no block present any more.
    fn tell_cleared(&self, keys: &[FileKey]) {
        if keys.is_empty() {
            return;
        }
        if let Some(hook) = self.on_evict.read().clone() {
            for k in keys {
                hook(k, 0, u32::MAX);
            }
        }
    }

    /// Clear every presence bit of `keys`, persisted (their plain copy went, and with it the
    /// only place their released blocks were kept).
    pub fn forget_presence(&self, keys: &[FileKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let records = self.presence_clearing(keys);
        self.append(&[], false, |_, _| records)?;
        self.tell_cleared(keys);
        Ok(())
    }

    /// Store the blocks of a fetched run: `blocks` (leaf hash, codec, range in `bytes`) verified,
    /// and mark blocks `present` of content `file`. The bytes from the first new block's start
    /// (from the page boundary before it, in a page-aligned body: see [`write_direct`]) to the
    /// last one's end go in one write, as fetched; blocks already stored are not indexed again
    /// (their bytes are written along: cheaper than cutting the run).
    pub fn put_run(
        &self,
        bytes: &[u8],
        blocks: &[(Hash, Codec, std::ops::Range<usize>)],
        present: Option<(&FileKey, &[u64])>,
        evict: bool,
        via: Via,
    ) -> Result<(), StoreError> {
        let new: Vec<&(Hash, Codec, std::ops::Range<usize>)> = {
            let index = self.index.read();
            let mut seen = rustc_hash::FxHashSet::default();
            blocks.iter().filter(|(h, _, _)| !index.blocks.contains_key(&block_key(h)) && seen.insert(*h)).collect()
        };
        let present_runs = present.map(|(f, b)| (*f, journal::runs(b))).filter(|(_, r)| !r.is_empty());
        if new.is_empty() && present_runs.is_none() {
            return Ok(());
        }
        let span = match (new.iter().map(|b| b.2.start).min(), new.iter().map(|b| b.2.end).max()) {
            // In a page-aligned body (a response as received), from the page boundary at or
            // before the first new block: written with O_DIRECT where it lies, with no copy
            // (write_direct), at the cost of at most a page of dead bytes before it.
            (Some(a), Some(b))
                if via == Via::Direct
                    && bytes.as_ptr().align_offset(DIRECT_ALIGN) == 0
                    && b - a / DIRECT_ALIGN * DIRECT_ALIGN >= DIRECT_MIN =>
            {
                a / DIRECT_ALIGN * DIRECT_ALIGN..b
            }
            (Some(a), Some(b)) => a..b,
            _ => 0..0,
        };
        self.append_to(false, &bytes[span.clone()], evict, via, |_, base| {
            let mut records = Vec::with_capacity(new.len() + 1);
            for (hash, codec, r) in &new {
                let offset = base + (r.start - span.start) as u64;
                records.push(Record::Block { hash: *hash, codec: *codec, len: r.len() as u16, offset });
            }
            if let Some((file, runs)) = present_runs {
                for (first, count) in runs {
                    records.push(Record::Present { file, first, count });
                }
            }
            records
        })
    }

    /// Store blocks (leaf hash, codec, stored bytes) not yet stored, and mark blocks `present`
    /// of content `file`, with one data write and one journal write.
    pub fn put_blocks(
        &self,
        blocks: &[(Hash, Codec, &[u8])],
        present: Option<(&FileKey, &[u64])>,
    ) -> Result<(), StoreError> {
        let mut data = Vec::with_capacity(blocks.iter().map(|(_, _, d)| d.len()).sum());
        let mut ranges = Vec::with_capacity(blocks.len());
        for (hash, codec, d) in blocks {
            ranges.push((*hash, *codec, data.len()..data.len() + d.len()));
            data.extend_from_slice(d);
        }
        self.put_run(&data, &ranges, present, true, Via::Direct)
    }

    /// The segment open for reading; `None` if it is gone (evicted by another process).
    fn file(&self, segment: u32) -> Result<Option<Arc<SegFile>>, StoreError> {
        if let Some(f) = self.files.read().get(&segment) {
            return Ok(Some(f.clone()));
        }
        let path = match segment.checked_sub(PLAIN_BASE) {
            Some(n) => match self.plains.lock().get(n as usize) {
                Some(key) => self.budget.cache.join("plain").join(hex_key(key)),
                None => return Ok(None),
            },
            None => self.dir.join(seg_name(segment)),
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(path)(e)),
        };
        let f = Arc::new(SegFile { file, touched: AtomicU64::new(0) });
        self.files.write().insert(segment, f.clone());
        Ok(Some(f))
    }

    /// `None`: not there (evicted by another process, or shorter than the journal said after a
    /// power loss): the caller refetches.
    fn read(&self, at: Loc) -> Result<Option<Vec<u8>>, StoreError> {
        let mut buf = vec![0u8; at.len as usize];
        let Some(f) = self.file(at.segment)? else { return Ok(None) };
        let offset = if at.segment >= PLAIN_BASE { at.offset * 4096 } else { at.offset };
        match f.file.read_exact_at(&mut buf, offset) {
            Ok(()) => {
                f.touch();
                Ok(Some(buf))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                if f.file.metadata().is_ok_and(|m| m.len() == 0) {
                    self.files.write().remove(&at.segment); // evicted: let its inode go
                }
                Ok(None)
            }
            Err(e) => Err(self.io(self.dir.join(seg_name(at.segment)))(e)),
        }
    }

    /// The stored form of block `hash`, if stored (not verified).
    pub fn get_block(&self, hash: &Hash) -> Result<Option<StoredBlock>, StoreError> {
        let mut loc = self.index.read().blocks.get(&block_key(hash)).copied();
        // A second look: a compaction may have moved the block while it was being read.
        for _ in 0..2 {
            let Some(at) = loc else { return Ok(None) };
            if let Some(d) = self.read(at.at())? {
                return Ok(Some((at.codec, d)));
            }
            let mut index = self.index.write();
            // Not indexed any more, so that the block is stored again once fetched.
            if !index.forget_block(hash, at.segment, at.offset as u64) {
                loc = index.blocks.get(&block_key(hash)).copied();
            } else {
                loc = None;
            }
        }
        Ok(None)
    }

    pub fn has_block(&self, hash: &Hash) -> bool {
        self.index.read().blocks.contains_key(&block_key(hash))
    }

    /// Which of `hashes` are stored.
    pub fn stored_among(&self, hashes: &[Hash]) -> std::collections::HashSet<Hash> {
        let index = self.index.read();
        hashes.iter().filter(|h| index.blocks.contains_key(&block_key(h))).copied().collect()
    }

    /// Forget block `hash` (found damaged); it will be fetched again when needed.
    pub fn drop_block(&self, hash: &Hash) -> Result<(), StoreError> {
        let loc = self.index.read().blocks.get(&block_key(hash)).copied();
        let Some(loc) = loc else { return Ok(()) };
        self.append(&[], false, |_, _| {
            vec![Record::DropBlock { hash: *hash, segment: loc.segment, offset: loc.offset as u64 }]
        })
    }

    /// Forget blocks whose content is kept elsewhere now (the verified plain copies of the files
    /// that have them), then compact the segments this leaves mostly unindexed. Forgetting is
    /// in memory: until a compaction rewrites their segment, a restart indexes them again (it
    /// costs space, never a wrong byte).
    ///
    /// The blocks stay indexed, at their place in the copy (`CACHE/plain/<key hex>`, block `i`
    /// of `leaves`, raw): a file sharing one of them finds it there.
    pub fn release_blocks(&self, key: &FileKey, size: u64, leaves: &[Hash]) -> Result<(), StoreError> {
        let zero = incfs_verity::hash_data_block(&[]);
        let n = {
            let mut plains = self.plains.lock();
            match plains.iter().position(|k| k == key) {
                Some(n) => n,
                None => {
                    plains.push(*key);
                    plains.len() - 1
                }
            }
        };
        self.files.write().remove(&(PLAIN_BASE + n as u32)); // a new copy: opened afresh
        {
            let pins = self.pins.read();
            let pinned_segs = &pins.segments;
            let mut index = self.index.write();
            for (i, h) in leaves.iter().enumerate() {
                let len = size.saturating_sub(i as u64 * 4096).min(4096) as u16;
                if *h == zero || len == 0 || i > u32::MAX as usize {
                    continue;
                }
                let at = BlockLoc { segment: PLAIN_BASE + n as u32, offset: i as u32, len, codec: Codec::Raw };
                let pinned = index.blocks.get(&block_key(h)).is_some_and(|b| pinned_segs.contains_key(&b.segment));
                if !pinned {
                    index.insert_block(h, at);
                }
            }
        }
        self.compact_sparse()
    }

    /// Pin content `key`: move its blocks (`leaves`) and metadata pieces (`meta`: object,
    /// region offset, piece) that are not in a pinned segment yet into this process's pinned
    /// segment, and record the content in the markers of every pinned segment holding them.
    /// Every block must be local (fetch the file first). Returns the bytes it occupies there.
    pub fn pin(&self, key: &FileKey, leaves: &[Hash], meta: &[(Hash, u64, u64)]) -> Result<u64, StoreError> {
        let _one = self.pinning.lock();
        let zero = incfs_verity::hash_data_block(&[]);
        let not_local =
            |h: &Hash| StoreError::NotLocal { what: format!("block {} of a file being pinned", hex_hash(h)) };
        // Marked first: an eviction meanwhile keeps its presence (its blocks are being moved).
        self.pins.write().keys.insert(*key);
        let mut piece: (Vec<u8>, Vec<Record>) = (Vec::new(), Vec::new());
        let mut holding = std::collections::HashSet::new();
        let mut bytes = 0u64;
        let mut seen = std::collections::HashSet::new();
        // What a read of one piece gives: its bytes and its record (offset 0).
        let items = meta
            .iter()
            .filter_map(|&(object, region, chunk)| {
                let at = self.index.read().meta.get(&(object, region, chunk)).copied()?;
                Some(Ok((at, Record::Meta { object, region, chunk, len: at.len, offset: 0 })))
            })
            .chain(leaves.iter().filter(|h| **h != zero && seen.insert(**h)).map(|h| {
                let loc = self.index.read().blocks.get(&block_key(h)).copied().ok_or_else(|| not_local(h))?;
                Ok((loc.at(), Record::Block { hash: *h, codec: loc.codec, len: loc.len, offset: 0 }))
            }));
        // The segments the moved bytes come from are kept from eviction and compaction until
        // their part is moved; the move itself may evict other data, and each piece moved
        // frees the segments it emptied (compacted), so pinning needs little room beyond the
        // pinned bytes themselves.
        let items: Vec<(Loc, Record)> = items.collect::<Result<_, StoreError>>()?;
        let mut left: HashMap<u32, usize> = HashMap::new();
        for (at, _) in &items {
            *left.entry(at.segment).or_default() += 1;
        }
        *self.protect.lock() = left.keys().copied().collect();
        let _unprotect = Unprotect(&self.protect);
        let piece_max = (limit::segment_size(self.budget.limit(), SEGMENT_MAX) as usize).min(COMPACT_PIECE);
        let mut moved_from = Vec::new();
        for (at, r) in items {
            bytes += at.len as u64;
            if self.pins.read().segments.contains_key(&at.segment) {
                holding.insert(at.segment);
                continue;
            }
            let data = self.read(at)?.ok_or_else(|| StoreError::NotLocal { what: format!("{r:?}") })?;
            if piece.0.len() + data.len() > piece_max {
                holding.insert(self.append_piece(std::mem::take(&mut piece))?);
                self.release_protected(&mut left, &mut moved_from)?;
            }
            push_piece(&mut piece, &data, r);
            moved_from.push(at.segment);
        }
        if !piece.1.is_empty() {
            holding.insert(self.append_piece(piece)?);
            self.release_protected(&mut left, &mut moved_from)?;
        }
        let mut pins = self.pins.write();
        for id in holding {
            let keys = pins.segments.entry(id).or_default();
            if keys.insert(*key) {
                let keys = keys.clone();
                self.write_marker(id, &keys)?;
            }
        }
        drop(pins);
        self.compact_sparse()?;
        Ok(bytes)
    }

    /// After a piece of a pin moved: segments whose part is all moved may go (compacted).
    fn release_protected(&self, left: &mut HashMap<u32, usize>, moved_from: &mut Vec<u32>) -> Result<(), StoreError> {
        let mut protect = self.protect.lock();
        for seg in moved_from.drain(..) {
            if let Some(n) = left.get_mut(&seg) {
                *n -= 1;
                if *n == 0 {
                    protect.remove(&seg);
                }
            }
        }
        drop(protect);
        self.compact_sparse()
    }

    /// Append a piece of moved data (records at offsets within it) to the pinned segment;
    /// returns the segment's id.
    fn append_piece(&self, (data, recs): (Vec<u8>, Vec<Record>)) -> Result<u32, StoreError> {
        let mut used = 0;
        self.append_to(true, &data, true, Via::Direct, |id, base| {
            used = id;
            recs.into_iter()
                .map(|mut r| {
                    if let Record::Block { offset, .. } | Record::Meta { offset, .. } = &mut r {
                        *offset += base;
                    }
                    r
                })
                .collect()
        })?;
        Ok(used)
    }

    /// Unpin content `key`: pinned segments left holding no pinned content become ordinary
    /// (evicted and compacted like any other).
    pub fn unpin(&self, key: &FileKey) -> Result<(), StoreError> {
        let mut pins = self.pins.write();
        pins.keys.remove(key);
        let own = self.pin_writer.lock().as_ref().map(|w| w.id);
        let ids: Vec<u32> = pins.segments.iter().filter(|(_, k)| k.contains(key)).map(|(id, _)| *id).collect();
        for id in ids {
            let keys = pins.segments.get_mut(&id).expect("listed");
            keys.remove(key);
            if keys.is_empty() && own != Some(id) {
                pins.segments.remove(&id);
                let path = self.dir.join(pin_name(id));
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(self.io(path)(e)),
                    _ => {}
                }
            } else {
                let keys = keys.clone();
                self.write_marker(id, &keys)?;
            }
        }
        Ok(())
    }

    fn write_marker(&self, id: u32, keys: &std::collections::BTreeSet<FileKey>) -> Result<(), StoreError> {
        let path = self.dir.join(pin_name(id));
        let tmp = self.dir.join(format!(".{}.{}", pin_name(id), std::process::id()));
        let text: String = keys.iter().map(|k| hex_key(k) + "\n").collect();
        let mut f = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(self.io(tmp.clone()))?;
        f.write_all(text.as_bytes()).map_err(self.io(tmp.clone()))?;
        std::fs::rename(&tmp, &path).map_err(self.io(path))
    }

    /// See [`crate::Store::stored_len`].
    pub fn stored_len(&self, hashes: &[Hash]) -> u64 {
        let index = self.index.read();
        let unique: std::collections::HashSet<&Hash> = hashes.iter().collect();
        unique.into_iter().filter_map(|h| index.blocks.get(&block_key(h))).map(|b| b.len as u64).sum()
    }

    pub fn pinned_contents(&self) -> Vec<FileKey> {
        self.pins.read().keys.iter().copied().collect()
    }

    /// Bytes in pinned segments and their journals.
    pub fn pinned_bytes(&self) -> u64 {
        let pins = self.pins.read();
        pins.segments
            .keys()
            .map(|id| {
                let len = |n: String| std::fs::metadata(self.dir.join(n)).map_or(0, |m| m.len());
                len(seg_name(*id)) + len(jnl_name(*id))
            })
            .sum()
    }

    /// The plain copy of `key` is going: blocks indexed in it are not there any more.
    pub fn forget_plain(&self, key: &FileKey) {
        let Some(n) = self.plains.lock().iter().position(|k| k == key) else { return };
        let segment = PLAIN_BASE + n as u32;
        let mut index = self.index.write();
        for shard in &mut index.blocks.shards {
            shard.retain(|_, b| b.segment != segment);
        }
        drop(index);
        self.files.write().remove(&segment);
    }

    /// Compact every segment whose unindexed bytes are more than half of it (and at least
    /// [`COMPACT_MIN_DEAD`]): what is still indexed moves to this process's current segment,
    /// with the presence its journal records, and the old segment goes.
    pub fn compact_sparse(&self) -> Result<(), StoreError> {
        self.compact_where(|len, dead| dead >= COMPACT_MIN_DEAD && dead > len / 2)
    }

    /// Compact every segment with unindexed bytes at all (`incfs cache gc`).
    pub fn compact_all(&self) -> Result<(), StoreError> {
        self.compact_where(|_, dead| dead > 0)
    }

    /// Compact the segments for which `wanted(length, unindexed bytes)` holds.
    fn compact_where(&self, wanted: impl Fn(u64, u64) -> bool) -> Result<(), StoreError> {
        let _one = self.compacting.lock();
        let own = self.writer.lock().as_ref().map(|w| (w.id, w.tail));
        let mut todo = Vec::new();
        {
            let index = self.index.read();
            for e in std::fs::read_dir(&self.dir).map_err(self.io(self.dir.clone()))? {
                let Ok(e) = e else { continue };
                let name = e.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if self.dir.join(pin_name(id)).exists() || self.protect.lock().contains(&id) {
                    continue; // pinned (moved by nothing), or being moved out of by a pin
                }
                let len = match own {
                    Some((w, tail)) if w == id => tail,
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                };
                let live = index.live.get(&id).copied().unwrap_or(0);
                if wanted(len, len.saturating_sub(live)) {
                    todo.push(id);
                }
            }
        }
        for id in todo {
            if own.is_some_and(|(w, _)| w == id) {
                *self.writer.lock() = None; // sealed, so that it can go
            }
            if let Err(e) = self.compact(id) {
                match e {
                    // No room to move what is live: the unindexed bytes stay until evicted.
                    StoreError::Full { .. } => return Ok(()),
                    e => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Move what segment `id` still holds to the current segment, then remove it.
    fn compact(&self, id: u32) -> Result<(), StoreError> {
        let (spath, jpath) = (self.dir.join(seg_name(id)), self.dir.join(jnl_name(id)));
        let f = match File::options().read(true).write(true).open(&spath) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Io { path: spath, source }),
        };
        if f.try_lock().is_err() {
            return Ok(()); // being written, evicted or compacted by another process
        }
        let journal = std::fs::read(&jpath).map_err(self.io(jpath.clone()))?;
        let records = match journal.get(..journal::MAGIC.len()) {
            Some(m) if m == journal::MAGIC => journal::replay(&journal[journal::MAGIC.len()..]).0,
            _ => Vec::new(),
        };
        // What is still indexed here, read into pieces of bounded size, and the presence.
        let mut pieces: Vec<(Vec<u8>, Vec<Record>)> = vec![(Vec::new(), Vec::new())];
        let mut presence = Vec::new();
        for r in records {
            let at = {
                let index = self.index.read();
                match &r {
                    Record::Block { hash, offset, len, .. }
                        if index.blocks.get(&block_key(hash)).is_some_and(|b| b.is_at(id, *offset)) =>
                    {
                        Some((*offset, *len as usize))
                    }
                    Record::Meta { object, region, chunk, len, offset }
                        if index.meta.get(&(*object, *region, *chunk))
                            == Some(&Loc { segment: id, offset: *offset, len: *len }) =>
                    {
                        Some((*offset, *len as usize))
                    }
                    _ => None,
                }
            };
            match (at, r) {
                (Some((offset, len)), mut r) => {
                    if pieces.last().is_some_and(|(d, _)| d.len() + len > COMPACT_PIECE) {
                        pieces.push((Vec::new(), Vec::new()));
                    }
                    let (data, recs) = pieces.last_mut().expect("one piece at least");
                    let rel = data.len() as u64;
                    data.resize(data.len() + len, 0);
                    f.read_exact_at(&mut data[rel as usize..], offset).map_err(self.io(spath.clone()))?;
                    match &mut r {
                        Record::Block { offset, .. } | Record::Meta { offset, .. } => *offset = rel,
                        _ => {}
                    }
                    recs.push(r);
                }
                (None, r @ (Record::Present { .. } | Record::PresenceChunk { .. })) => presence.push(r),
                _ => {}
            }
        }
        pieces.last_mut().expect("one piece at least").1.extend(presence);
        for (data, recs) in pieces {
            self.append(&data, false, |_, base| {
                recs.into_iter()
                    .map(|mut r| {
                        if let Record::Block { offset, .. } | Record::Meta { offset, .. } = &mut r {
                            *offset += base;
                        }
                        r
                    })
                    .collect()
            })?;
        }
        match std::fs::remove_file(&jpath) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(self.io(jpath)(e)),
            _ => {}
        }
        let freed = f.metadata().map(|m| m.len()).unwrap_or(0) + journal.len() as u64;
        f.set_len(0).map_err(self.io(spath.clone()))?;
        std::fs::remove_file(&spath).map_err(self.io(spath))?;
        self.index.write().live.remove(&id);
        self.files.write().remove(&id);
        let b = &self.budget;
        b.used.fetch_sub(freed.min(b.used.load(Ordering::Relaxed)), Ordering::Relaxed);
        tracing::debug!("segment {id} compacted: {freed} bytes freed");
        Ok(())
    }

    /// See [`crate::Store::gc`].
    pub fn gc(
        &self,
        leaves: &std::collections::HashSet<Hash>,
        regions: &std::collections::HashSet<(Hash, u64)>,
        keys: &std::collections::HashSet<FileKey>,
    ) -> Result<(u64, u64, u64), StoreError> {
        let mut records = Vec::new();
        let (mut blocks, mut pieces) = (0u64, 0u64);
        {
            let index = self.index.read();
            for h in self.block_hashes()? {
                if !leaves.contains(&h) {
                    if let Some(b) = index.blocks.get(&block_key(&h)) {
                        records.push(Record::DropBlock { hash: h, segment: b.segment, offset: b.offset as u64 });
                        blocks += 1;
                    }
                }
            }
            for (object, region, chunk) in index.meta.keys() {
                if !regions.contains(&(*object, *region)) {
                    records.push(Record::DropMeta { object: *object, region: *region, chunk: *chunk });
                    pieces += 1;
                }
            }
        }
        let gone: Vec<FileKey> = self.index.read().presence.keys().filter(|k| !keys.contains(*k)).copied().collect();
        records.extend(self.presence_clearing(&gone));
        if !records.is_empty() {
            self.append(&[], false, |_, _| records)?;
        }
        self.compact_all()?;
        Ok((blocks, pieces, gone.len() as u64))
    }

    /// Every stored block's full leaf hash (for `fsck`). The index keeps half of each, so the
    /// journals are read again for the rest: the records that put the blocks where they are now.
    pub fn block_hashes(&self) -> Result<Vec<Hash>, StoreError> {
        let index = self.index.read();
        let mut v = Vec::with_capacity(index.blocks.len());
        replay_dir(&self.dir, |segment, r, _| {
            if let Record::Block { hash, offset, .. } = r {
                let here = index.blocks.get(&block_key(&hash));
                if here.is_some_and(|b| b.is_at(segment, offset)) {
                    v.push(hash);
                }
            }
        })?;
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// (blocks, stored bytes).
    pub fn totals(&self) -> (u64, u64) {
        let index = self.index.read();
        (index.blocks.len() as u64, index.block_bytes)
    }

    /// Bytes of metadata pieces indexed.
    pub fn meta_bytes(&self) -> u64 {
        self.index.read().meta.values().map(|l| l.len as u64).sum()
    }

    pub fn presence(&self, file: &FileKey) -> Vec<(u64, Vec<u8>)> {
        let index = self.index.read();
        index.presence.get(file).map_or_else(Vec::new, |c| c.iter().map(|(k, v)| (*k, v.to_vec())).collect())
    }

    /// Replace presence chunks exactly (`fsck`).
    pub fn set_presence(&self, chunks: &[(FileKey, u64, Vec<u8>)]) -> Result<(), StoreError> {
        let mut records = Vec::new();
        for (file, chunk, bits) in chunks {
            let mut b = Box::new([0u8; PRESENCE_CHUNK_BYTES]);
            let n = bits.len().min(PRESENCE_CHUNK_BYTES);
            b[..n].copy_from_slice(&bits[..n]);
            records.push(Record::PresenceChunk { file: *file, chunk: *chunk, bits: b });
        }
        self.append(&[], false, |_, _| records)
    }

    pub fn get_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let key = (*object, region, chunk);
        let loc = self.index.read().meta.get(&key).copied();
        let Some(at) = loc else { return Ok(None) };
        let found = self.read(at)?;
        if found.is_none() {
            self.index.write().forget_meta(&key, Some(at));
        }
        Ok(found)
    }

    pub fn put_meta(&self, object: &Hash, region: u64, chunk: u64, data: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(data.len()).map_err(|_| StoreError::Corrupt {
            path: self.dir.clone(),
            what: format!("metadata piece of {} bytes", data.len()),
        })?;
        self.append(data, true, |_, offset| vec![Record::Meta { object: *object, region, chunk, len, offset }])
    }

    pub fn drop_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<(), StoreError> {
        if !self.index.read().meta.contains_key(&(*object, region, chunk)) {
            return Ok(());
        }
        self.append(&[], false, |_, _| vec![Record::DropMeta { object: *object, region, chunk }])
    }
}
