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
//! (`O_EXCL`), and reads every segment; what another live process stores after this one opened
//! is not seen until the next open (it costs a refetch, never a wrong byte).

use std::collections::{BTreeMap, HashMap};

use parking_lot::{Mutex, RwLock};
use rustc_hash::FxBuildHasher;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use incfs_format::{Codec, Hash};

use crate::journal::{self, FileKey, Record, PRESENCE_CHUNK_BITS, PRESENCE_CHUNK_BYTES};
use crate::StoreError;

/// A process starts a new segment once its current one holds this much. Small enough that
/// dropping or compacting whole segments (cache limits) is cheap, large enough to keep the
/// number of open files small.
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
}

impl Index {
    fn apply(&mut self, segment: u32, r: Record, segment_len: u64) {
        match r {
            Record::Block { hash, codec, len, offset } => {
                if offset + len as u64 > segment_len {
                    return; // its bytes never reached the disk (power loss): fetched again
                }
                let Ok(offset) = u32::try_from(offset) else { return }; // not written so: ignored
                let new = BlockLoc { segment, offset, len, codec };
                if let Some(old) = self.blocks.insert(block_key(&hash), new) {
                    self.block_bytes -= old.len as u64;
                }
                self.block_bytes += len as u64;
            }
            Record::Present { file, first, count } => {
                let chunks = self.presence.entry(file).or_default();
                for i in first..first.saturating_add(count as u64) {
                    let (c, b) = (i / PRESENCE_CHUNK_BITS, i % PRESENCE_CHUNK_BITS);
                    let bits = chunks.entry(c).or_insert_with(|| Box::new([0; PRESENCE_CHUNK_BYTES]));
                    bits[(b / 8) as usize] |= 1 << (b % 8);
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
                    self.meta.insert((object, region, chunk), Loc { segment, offset, len });
                }
            }
            Record::DropBlock { hash, segment, offset } => {
                let key = block_key(&hash);
                if let Some(b) = self.blocks.get(&key) {
                    if b.is_at(segment, offset) {
                        self.block_bytes -= b.len as u64;
                        self.blocks.remove(&key);
                    }
                }
            }
            Record::DropMeta { object, region, chunk } => {
                self.meta.remove(&(object, region, chunk));
            }
        }
    }
}

/// The segment this process appends to.
struct Writer {
    id: u32,
    data: File,
    journal: File,
    tail: u64,
}

pub struct Segments {
    dir: PathBuf,
    index: RwLock<Index>,
    writer: Mutex<Option<Writer>>,
    /// Highest segment id seen; new segments take the next free one.
    last_id: Mutex<u32>,
    files: RwLock<HashMap<u32, Arc<File>>>,
}

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
        let seg_len = std::fs::metadata(dir.join(seg_name(id))).map(|m| m.len()).unwrap_or(0);
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
        Ok(Segments {
            dir: dir.to_path_buf(),
            index: RwLock::new(index),
            writer: Mutex::new(None),
            last_id: Mutex::new(ids.last().copied().unwrap_or(0)),
            files: RwLock::new(HashMap::new()),
        })
    }

    fn io(&self, path: PathBuf) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError::Io { path, source }
    }

    /// A new segment of this process's own (its id claimed with `O_EXCL`).
    fn new_writer(&self) -> Result<Writer, StoreError> {
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
            let jpath = self.dir.join(jnl_name(id));
            let mut journal = File::options()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&jpath)
                .map_err(self.io(jpath.clone()))?;
            journal.write_all(&journal::MAGIC).map_err(self.io(jpath))?;
            return Ok(Writer { id, data, journal, tail: 0 });
        }
    }

    /// Append `data` to this process's segment and then `records(segment, offset)` to its
    /// journal; apply the records to the index once both are written.
    fn append(&self, data: &[u8], records: impl FnOnce(u32, u64) -> Vec<Record>) -> Result<(), StoreError> {
        let mut w = self.writer.lock();
        if w.as_ref().is_none_or(|w| w.tail > 0 && w.tail + data.len() as u64 > SEGMENT_MAX) {
            *w = Some(self.new_writer()?);
        }
        let w = w.as_mut().unwrap();
        let offset = w.tail;
        if !data.is_empty() {
            w.data.write_all_at(data, offset).map_err(self.io(self.dir.join(seg_name(w.id))))?;
            w.tail += data.len() as u64;
        }
        let records = records(w.id, offset);
        let mut buf = Vec::with_capacity(records.len() * 48);
        for r in &records {
            r.encode(&mut buf);
        }
        // One write(2) in append mode: a torn record can only be the last one.
        w.journal.write_all(&buf).map_err(self.io(self.dir.join(jnl_name(w.id))))?;
        let mut index = self.index.write();
        for r in records {
            index.apply(w.id, r, w.tail);
        }
        Ok(())
    }

    /// Store the blocks of a fetched run: `blocks` (leaf hash, codec, range in `bytes`) verified,
    /// and mark blocks `present` of content `file`. The bytes from the first block's start to
    /// the last one's end go in one write, as fetched (no copy); blocks already stored are not
    /// indexed again (their bytes are written along: cheaper than cutting the run).
    pub fn put_run(
        &self,
        bytes: &[u8],
        blocks: &[(Hash, Codec, std::ops::Range<usize>)],
        present: Option<(&FileKey, &[u64])>,
    ) -> Result<(), StoreError> {
        let new: Vec<&(Hash, Codec, std::ops::Range<usize>)> = {
            let index = self.index.read();
            let mut seen = std::collections::HashSet::new();
            blocks.iter().filter(|(h, _, _)| !index.blocks.contains_key(&block_key(h)) && seen.insert(*h)).collect()
        };
        let present_runs = present.map(|(f, b)| (*f, journal::runs(b))).filter(|(_, r)| !r.is_empty());
        if new.is_empty() && present_runs.is_none() {
            return Ok(());
        }
        let span = match (new.iter().map(|b| b.2.start).min(), new.iter().map(|b| b.2.end).max()) {
            (Some(a), Some(b)) => a..b,
            _ => 0..0,
        };
        self.append(&bytes[span.clone()], |_, base| {
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
        self.put_run(&data, &ranges, present)
    }

    fn file(&self, segment: u32) -> Result<Arc<File>, StoreError> {
        if let Some(f) = self.files.read().get(&segment) {
            return Ok(f.clone());
        }
        let path = self.dir.join(seg_name(segment));
        let f = Arc::new(File::open(&path).map_err(self.io(path))?);
        self.files.write().insert(segment, f.clone());
        Ok(f)
    }

    fn read(&self, at: Loc) -> Result<Option<Vec<u8>>, StoreError> {
        let mut buf = vec![0u8; at.len as usize];
        let f = self.file(at.segment)?;
        match f.read_exact_at(&mut buf, at.offset) {
            Ok(()) => Ok(Some(buf)),
            // Shorter than the journal said (a power loss): as absent; the caller refetches.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(self.io(self.dir.join(seg_name(at.segment)))(e)),
        }
    }

    /// The stored form of block `hash`, if stored (not verified).
    pub fn get_block(&self, hash: &Hash) -> Result<Option<StoredBlock>, StoreError> {
        let loc = self.index.read().blocks.get(&block_key(hash)).copied();
        let Some(loc) = loc else { return Ok(None) };
        Ok(self.read(loc.at())?.map(|d| (loc.codec, d)))
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
        self.append(&[], |_, _| {
            vec![Record::DropBlock { hash: *hash, segment: loc.segment, offset: loc.offset as u64 }]
        })
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
        self.append(&[], |_, _| records)
    }

    pub fn get_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let loc = self.index.read().meta.get(&(*object, region, chunk)).copied();
        match loc {
            Some(at) => self.read(at),
            None => Ok(None),
        }
    }

    pub fn put_meta(&self, object: &Hash, region: u64, chunk: u64, data: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(data.len()).map_err(|_| StoreError::Corrupt {
            path: self.dir.clone(),
            what: format!("metadata piece of {} bytes", data.len()),
        })?;
        self.append(data, |_, offset| vec![Record::Meta { object: *object, region, chunk, len, offset }])
    }

    pub fn drop_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<(), StoreError> {
        if !self.index.read().meta.contains_key(&(*object, region, chunk)) {
            return Ok(());
        }
        self.append(&[], |_, _| vec![Record::DropMeta { object: *object, region, chunk }])
    }
}
