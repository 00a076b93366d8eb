//! Plain copies of complete files, the backing files of FUSE passthrough.
//!
//! The kernel can read a file's bytes straight from a backing file, never asking the daemon
//! (FUSE passthrough), but only from a plain file: not from the compressed, block-addressed
//! store. So when a complete file is opened, its blocks are read through the verifying read path
//! and written to `CACHE/plain/<file key>`; from then on the kernel reads that copy directly.
//!
//! The trust trade: a plain copy is verified once, when it is written (every block checked
//! against the Merkle tree on its way out of the store) or, for a copy left by an earlier daemon,
//! when it is first used (its fs-verity root recomputed and compared). After that the kernel reads
//! it without per-read checks, so anyone able to write the cache directory (root) can alter what
//! readers see, which they could do to the daemon's memory as well.
//!
//! Space: copies count against a limit (`--plain-limit`); making one that would pass it first
//! deletes the least recently used copies. A file open at the time keeps its deleted copy until it
//! is closed (an unlinked inode stays readable).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use incfs_format::BLOCK_SIZE;
use incfs_store::FileKey;
use incfs_verity::{hash_data, MerkleTree};
use parking_lot::{Condvar, Mutex};

use crate::reader::{FileRef, Local, Reader};

/// Bytes read through the verifying path per step while writing a copy.
const STEP: u32 = 1 << 20;

struct Copy {
    size: u64,
    /// Checked against the manifest during this daemon's life.
    verified: bool,
    last_used: Instant,
}

pub struct PlainCopies {
    dir: PathBuf,
    limit: u64,
    copies: Mutex<HashMap<FileKey, Copy>>,
    /// Contents whose copy is being written or checked now: one at a time per content, any
    /// number of contents at once (a multi-GiB copy must not hold up the open of a small file).
    making: Mutex<HashSet<FileKey>>,
    made: Condvar,
    /// Bytes promised to copies being written (counted against the limit, under `copies`).
    reserved: AtomicU64,
    /// The mount is ending: copies being written give up (their temporary file removed).
    stopped: AtomicBool,
    /// Contents whose copy was asked for in the background and is not done yet.
    queued: Mutex<HashSet<FileKey>>,
}

/// Holds the claim on one content's copy; released (and waiters woken) when dropped.
struct Making<'a> {
    plain: &'a PlainCopies,
    key: FileKey,
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        self.plain.making.lock().remove(&self.key);
        self.plain.made.notify_all();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlainError {
    #[error("plain copy: {0}")]
    Io(#[from] std::io::Error),
    #[error("plain copy: the file is not complete locally")]
    Incomplete,
    #[error("plain copy: {0}")]
    Read(String),
    #[error("plain copy of {0} bytes would pass the limit of {1} bytes")]
    TooLarge(u64, u64),
    #[error("plain copy: {0}")]
    Store(#[from] incfs_store::StoreError),
    #[error("plain copy: the mount is ending")]
    Stopped,
}

impl PlainCopies {
    /// Make copies being written give up at their next step (the mount is ending).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Open `dir`, taking stock of copies left by an earlier daemon (not trusted until checked).
    pub fn open(dir: &Path, limit: u64) -> Result<PlainCopies, std::io::Error> {
        incfs_store::private_dir(dir)?;
        let mut copies = HashMap::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            let key = hex::decode(name.as_bytes()).ok().and_then(|k| <FileKey>::try_from(k).ok());
            match key {
                Some(key) => {
                    let size = e.metadata()?.len();
                    copies.insert(key, Copy { size, verified: false, last_used: Instant::now() });
                }
                // Leftovers of a copy being written when the daemon stopped.
                None => {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(PlainCopies {
            dir: dir.to_path_buf(),
            limit,
            copies: Mutex::new(copies),
            making: Mutex::new(HashSet::new()),
            made: Condvar::new(),
            reserved: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            queued: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, key: &FileKey) -> PathBuf {
        self.dir.join(hex::encode(key))
    }

    /// (copies, bytes) on disk.
    pub fn usage(&self) -> (u64, u64) {
        let c = self.copies.lock();
        (c.len() as u64, c.values().map(|c| c.size).sum())
    }

    /// Whether a file of `size` bytes may have a copy at all (larger ones are never copied).
    pub fn fits(&self, size: u64) -> bool {
        size <= self.limit
    }

    /// Note that `key`'s copy is to be made in the background: false if it is already.
    pub fn queue(&self, key: &FileKey) -> bool {
        self.queued.lock().insert(*key)
    }

    /// The background copy of `key` is done (made, or failed).
    pub fn dequeue(&self, key: &FileKey) {
        self.queued.lock().remove(key);
    }

    /// Copies asked for in the background and not done yet.
    pub fn queued(&self) -> u64 {
        self.queued.lock().len() as u64
    }

    /// Whether a copy of `key` is there, verified or left by an earlier daemon (to be checked).
    pub fn known(&self, key: &FileKey) -> bool {
        self.copies.lock().contains_key(key)
    }

    /// Whether a verified copy of `key` is ready to open without work.
    pub fn ready(&self, key: &FileKey) -> bool {
        self.copies.lock().get(key).is_some_and(|c| c.verified)
    }

    /// The plain copy of complete file `f`, opened read-only: checked if left by an earlier
    /// daemon, written now if missing.
    pub fn get(&self, reader: &Reader, f: &FileRef) -> Result<File, PlainError> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(PlainError::Stopped); // the rest of a queue, at unmount: at once
        }
        let path = self.path(&f.key);
        let known = self.copies.lock().get(&f.key).map(|c| c.verified);
        match known {
            Some(true) => {
                if let Ok(file) = File::open(&path) {
                    self.touch(&f.key, &file);
                    return Ok(file);
                }
            }
            Some(false) => {
                let _making = self.claim(f.key);
                if self.ready(&f.key) {
                    // Checked by whoever held the claim before us.
                    return Ok(File::open(&path)?);
                }
                if let Ok(file) = File::open(&path) {
                    if let Some(leaves) = check(&file, f)? {
                        if let Some(c) = self.copies.lock().get_mut(&f.key) {
                            c.verified = true;
                            c.last_used = Instant::now();
                        }
                        release(reader, f, &leaves);
                        return Ok(File::open(&path)?);
                    }
                    tracing::error!(
                        "plain copy of {} does not match its digest; deleted, the file is fetched again and copied anew",
                        f.label
                    );
                    // The copy held the file's blocks (the store let them go): none is local
                    // any more that the copy does not vouch for.
                    self.copies.lock().remove(&f.key);
                    reader.store().forget_plain(&f.key);
                    let _ = fs::remove_file(&path);
                    if let Err(e) = reader.store().forget_presence(&[f.key]) {
                        tracing::warn!("{}: cannot clear its presence: {e}", f.label);
                    }
                }
            }
            None => {}
        }
        self.make(reader, f)
    }

    /// Wait until no one else works on `key`'s copy, then claim it.
    fn claim(&self, key: FileKey) -> Making<'_> {
        let mut making = self.making.lock();
        while making.contains(&key) {
            self.made.wait(&mut making);
        }
        making.insert(key);
        Making { plain: self, key }
    }

    /// Mark a copy used: here, and in its modification time, which is its recency for the
    /// cache limit's eviction (shared by every process using the cache).
    fn touch(&self, key: &FileKey, file: &File) {
        if let Some(c) = self.copies.lock().get_mut(key) {
            c.last_used = Instant::now();
        }
        let _ = file.set_modified(std::time::SystemTime::now());
    }

    fn make(&self, reader: &Reader, f: &FileRef) -> Result<File, PlainError> {
        let _making = self.claim(f.key);
        let path = self.path(&f.key);
        if self.ready(&f.key) {
            // Written by whoever held the claim before us.
            if let Ok(file) = File::open(&path) {
                return Ok(file);
            }
        }
        if !reader.is_complete(f) {
            return Err(PlainError::Incomplete);
        }
        let size = f.data.size;
        if size > self.limit {
            return Err(PlainError::TooLarge(size, self.limit));
        }
        // Under the cache's limit too (which may evict least recently used data for it).
        let _room = reader.store().reserve(size)?;
        self.reserve(reader, &f.key, size);
        let result = self.write(reader, f, &path);
        self.reserved.fetch_sub(size, Ordering::Relaxed);
        result
    }

    fn write(&self, reader: &Reader, f: &FileRef, path: &Path) -> Result<File, PlainError> {
        let size = f.data.size;
        let tmp = self.dir.join(format!(".tmp-{}", hex::encode(f.key)));
        let mut out = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o400).open(&tmp)?;
        let mut offset = 0u64;
        let mut leaves = Vec::with_capacity(incfs_verity::block_count(size) as usize);
        let result = (|| -> Result<(), PlainError> {
            while offset < size {
                if self.stopped.load(Ordering::Relaxed) {
                    return Err(PlainError::Stopped);
                }
                let data = match reader.read_local(f, offset, STEP) {
                    Ok(d) => d.to_vec(),
                    Err(Local::Need(_)) => return Err(PlainError::Incomplete),
                    Err(Local::Fail(e)) => return Err(PlainError::Read(e.message)),
                };
                if data.is_empty() {
                    return Err(PlainError::Read("short read".into()));
                }
                leaves.extend(hash_data(&data));
                write_sparse(&mut out, &data)?;
                offset += data.len() as u64;
            }
            out.set_len(size)?;
            // No fsync: the store's segments and journals get none either (a kill of the
            // daemon loses nothing written; a power loss may), and a copy left by an earlier
            // daemon is checked against the file's root before its first use (`check`): one
            // torn by a power loss is found and deleted, the file fetched again. When copies
            // were made in `open`, an fdatasync per copy waited behind background completion's
            // direct writes: it was the FUSE threads' main wait during a program's cold start.
            fs::rename(&tmp, path)?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.copies.lock().insert(f.key, Copy { size, verified: true, last_used: Instant::now() });
        tracing::debug!("plain copy of {} written ({size} bytes)", f.label);
        release(reader, f, &leaves);
        Ok(File::open(path)?)
    }

    /// Forget `key`'s old copy, delete least recently used copies until `size` more fits
    /// under the limit beside the copies being written (each first giving its blocks back to
    /// the store, see [`recover`]), and reserve `size` for this one.
    fn reserve(&self, reader: &Reader, key: &FileKey, size: u64) {
        let mut copies = self.copies.lock();
        copies.remove(key);
        let mut used: u64 = copies.values().map(|c| c.size).sum::<u64>() + self.reserved.load(Ordering::Relaxed);
        while used + size > self.limit {
            let Some((&key, _)) = copies.iter().min_by_key(|(_, c)| c.last_used) else { break };
            let c = copies.remove(&key).unwrap();
            used -= c.size;
            recover(reader.store(), &key, &self.path(&key));
            let _ = fs::remove_file(self.path(&key));
            tracing::debug!("plain copy {} dropped to make room", hex::encode(key));
        }
        self.reserved.fetch_add(size, Ordering::Relaxed);
    }
}

/// Write `data` at the file's position, leaving holes for all-zero blocks.
fn write_sparse(out: &mut File, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    for block in data.chunks(BLOCK_SIZE) {
        if block.iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(block.len() as i64))?;
        } else {
            out.write_all(block)?;
        }
    }
    Ok(())
}

/// Every byte stored once: the copy now holds `f`'s blocks, so the store lets its compressed
/// ones go (a read the daemon serves itself takes them from the copy, checked against the leaf).
fn release(reader: &Reader, f: &FileRef, leaves: &[incfs_format::Hash]) {
    if let Err(e) = reader.store().release_blocks(&f.key, f.data.size, leaves) {
        tracing::warn!("{}: compressed blocks kept beside the plain copy: {e}", f.label);
    }
}

/// Before a copy is deleted (the plain-copy limit): give its blocks back to the store,
/// compressed (LZ4), so that the file stays complete without a fetch, if they fit under the
/// cache limit without evicting anything; otherwise its presence is cleared (fetched again
/// when read).
fn recover(store: &incfs_store::Store, key: &FileKey, path: &Path) {
    let zero = incfs_verity::hash_data_block(&[]);
    // Blocks indexed in the copy are not stored as far as the store is concerned.
    store.forget_plain(key);
    let result = (|| -> Result<(), PlainError> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut buf = vec![0u8; STEP as usize];
        let mut offset = 0u64;
        while offset < size {
            let n = (size - offset).min(STEP as u64) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf[..n], offset)?;
            let mut encoded = Vec::new();
            for chunk in buf[..n].chunks(BLOCK_SIZE) {
                let leaf = incfs_verity::hash_data_block(chunk);
                if leaf != zero && !store.has_block(&leaf) {
                    encoded.push((leaf, incfs_format::codec::encode_block(chunk, incfs_format::Compression::Lz4)));
                }
            }
            let blocks: Vec<incfs_store::NewBlock<'_>> = encoded
                .iter()
                .map(|(h, e)| incfs_store::NewBlock { hash: *h, codec: e.codec, data: &e.bytes })
                .collect();
            store.keep_blocks(&blocks)?;
            offset += n as u64;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::info!("plain copy {} dropped without its blocks ({e}); fetched again when read", hex::encode(key));
        if let Err(e) = store.forget_presence(&[*key]) {
            tracing::warn!("cannot clear the presence of {}: {e}", hex::encode(key));
        }
    }
}

/// The leaf hashes of `file` if it holds exactly the content of `f` (size and fs-verity root).
fn check(file: &File, f: &FileRef) -> Result<Option<Vec<incfs_format::Hash>>, PlainError> {
    if file.metadata()?.len() != f.data.size {
        return Ok(None);
    }
    let mut leaves = Vec::with_capacity(incfs_verity::block_count(f.data.size) as usize);
    let mut buf = vec![0u8; 4 << 20];
    let mut r = file;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        leaves.extend(hash_data(&buf[..n]));
        if n < buf.len() {
            break;
        }
    }
    let good = MerkleTree::from_leaves(f.data.size, leaves.clone()).root() == &f.data.root_hash;
    Ok(good.then_some(leaves))
}
