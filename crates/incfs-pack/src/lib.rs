//! `incfs pack`: turn a directory tree into a version of an incfs repository.
//!
//! The steps, in order: [`scan`] walks the tree (metadata only); each regular file is then read
//! once and its blocks hashed and the new ones compressed, in parallel: small files (up to 4 MiB)
//! many at a time, in batches of up to [`BATCH_BYTES`], a large one in 4 MiB chunks whose blocks
//! are worked on in parallel. Then, one file after the other in a fixed order, each block is
//! looked up in the [`dedup`] index and the new ones appended to [`objects`], followed by the
//! file's Merkle tree and block map. Finally the manifest is signed and written, version file
//! first, then `manifest` (each by atomic rename), so a reader never sees a manifest that names
//! an object not yet durable. The parallel part only computes (hashes, compressed bytes: pure
//! functions of the content); every decision and write happens in that fixed order, so the same
//! tree, options and key always give a byte-identical repository.

mod dedup;
mod dictionary;
mod objects;
mod prune;
mod scan;

use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use incfs_format::block_map::BlockRecord;
use incfs_format::codec::{encode_block, encode_block_into};
use incfs_format::compact_map;
use incfs_format::manifest::{is_valid_image_name, FileData, Inode, Manifest, MetaRef};
use incfs_format::profile::Profile;
use incfs_format::{layout, wire, Codec, Compression, Hash, BLOCK_SIZE};
use incfs_sign::SigningKey;
use incfs_verity::{hash_data_block, MerkleTree};

/// Default size at which an object is closed and a new one started.
pub const DEFAULT_OBJECT_SIZE: u64 = 64 << 20;

/// How much of a file is read, hashed and compressed at a time.
const CHUNK: usize = 4 << 20;

/// Small files read, hashed and compressed at once (bounds the memory of a batch).
pub const BATCH_BYTES: u64 = 8 << 20;
/// Batches prepared ahead of the one being stored (memory: this many + 1 batches).
const BATCHES_AHEAD: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is not a directory; pack takes the directory to publish", .0.display())]
    NotADirectory(PathBuf),
    #[error("{}: {what} is not supported", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}: the file changed while it was being packed; pack a tree that is not being written to", .0.display())]
    Changed(PathBuf),
    #[error("version {requested} is not newer than the repository's latest version {latest}")]
    VersionNotNewer { requested: u64, latest: u64 },
    #[error("image name {0:?} is invalid: use 1-255 bytes without '/' or control characters")]
    Name(String),
    #[error("another incfs pack is writing to {}", .0.display())]
    Locked(PathBuf),
    #[error("the repository is damaged ({reason}); check it with incfs verify")]
    DamagedRepository { reason: String },
    #[error("more than 4 billion inodes")]
    TooManyInodes,
    #[error("more than 4 billion objects")]
    TooManyObjects,
    #[error("internal error, the manifest built is invalid: {0}")]
    Internal(String),
    #[error("a dictionary is for zstd: use --compression zstd with --dictionary")]
    DictionaryNeedsZstd,
}

/// What to publish and how.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Image name; defaults to the previous version's name, else the source directory's name.
    pub name: Option<String>,
    /// Version number; defaults to the previous version + 1, or 1.
    pub version: Option<u64>,
    pub compression: Compression,
    pub object_size: u64,
    /// An access profile: its files are packed first, in its order (so a mount fetches them in
    /// few requests), and it is published beside the manifest.
    pub profile: Option<Profile>,
    /// Signed expiry of the manifest (seconds since the Unix epoch): mounts refuse it from a
    /// source after that time, so the publisher must publish again before then.
    pub expires: Option<i64>,
    /// Compress new blocks with a dictionary (zstd only).
    pub dictionary: DictionaryMode,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            name: None,
            version: None,
            compression: Compression::Zstd { level: Compression::DEFAULT_ZSTD_LEVEL },
            object_size: DEFAULT_OBJECT_SIZE,
            profile: None,
            expires: None,
            dictionary: DictionaryMode::Off,
        }
    }
}

/// Totals of one pack, for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackSummary {
    pub name: String,
    pub version: u64,
    /// Regular files (inodes: hard links count once), directories, symlinks, other nodes.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub specials: u64,
    /// Extra names of hard-linked files.
    pub hard_links: u64,
    /// Sockets and other entries left out.
    pub skipped: u64,
    /// Bytes of regular file content read.
    pub bytes_in: u64,
    /// Bytes of non-zero blocks newly stored, before compression.
    pub new_block_bytes: u64,
    /// The same blocks after compression.
    pub new_block_stored: u64,
    /// Bytes written to new objects (blocks and file metadata).
    pub bytes_stored: u64,
    /// Bytes not stored because an identical block was already stored (this or an older version).
    pub dedup_saved: u64,
    /// Bytes of all-zero blocks (holes), which take no space.
    pub zero_bytes: u64,
    pub objects_written: u64,
    pub manifest_bytes: u64,
    /// The dictionary new blocks were compressed with: its id, size and whether it is new.
    pub dictionary: Option<(u32, u64, bool)>,
}

/// Receives progress while packing. Implemented by the CLI (a bar on a terminal, lines otherwise).
pub trait Progress: Sync {
    fn start(&self, _files: u64, _bytes: u64) {}
    fn file(&self, _path: &Path) {}
    fn advance(&self, _bytes: u64) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;
impl Progress for NoProgress {}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), PackError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| PackError::Io { path: dir.to_path_buf(), source })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PackError> {
    let io = |source| PackError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_file_name(format!("{}{}", objects::TMP_PREFIX, std::process::id()));
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path.parent().unwrap())
}

/// Remove files left by an interrupted pack (never referenced by any manifest).
fn clean_leftovers(dir: &Path) -> Result<(), PackError> {
    for e in fs::read_dir(dir).map_err(|source| PackError::Io { path: dir.to_path_buf(), source })?.flatten() {
        if e.file_name().to_string_lossy().starts_with(objects::TMP_PREFIX) {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(())
}

pub use dictionary::DictionaryMode;
pub use prune::{prune, PruneReport};

/// Pack the tree at `src` as the next version of the repository at `repo` (created if needed).
pub fn pack(
    src: &Path,
    repo: &Path,
    key: &SigningKey,
    opts: &PackOptions,
    progress: &dyn Progress,
) -> Result<PackSummary, PackError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    };
    for d in [layout::OBJECTS_DIR, layout::VERSIONS_DIR] {
        fs::create_dir_all(repo.join(d)).map_err(io(&repo.join(d)))?;
    }
    let lock_path = repo.join(".lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.try_lock().map_err(|_| PackError::Locked(repo.to_path_buf()))?;
    for d in [layout::OBJECTS_DIR, layout::VERSIONS_DIR] {
        clean_leftovers(&repo.join(d))?;
    }
    clean_leftovers(repo)?;

    let (previous, dedup) = dedup::load(repo)?;
    let latest = previous.as_ref().map_or(0, |m| m.version);
    let version = opts.version.unwrap_or(latest + 1);
    if version <= latest || version == 0 {
        return Err(PackError::VersionNotNewer { requested: version, latest });
    }
    let name = match (&opts.name, &previous) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => p.name.clone(),
        (None, None) => fs::canonicalize(src)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| is_valid_image_name(n))
            .unwrap_or_else(|| "image".into()),
    };
    if !is_valid_image_name(&name) {
        return Err(PackError::Name(name));
    }

    let scanned = scan::scan(src)?;
    progress.start(scanned.file_count, scanned.file_bytes);
    let (mut base_table, mut dictionaries) = previous.map(|m| (m.objects, m.dictionaries)).unwrap_or_default();
    let mut summary =
        PackSummary { name: name.clone(), version, skipped: scanned.skipped.len() as u64, ..Default::default() };
    let newest_dictionary = dictionary::register_existing(repo, &base_table, &dictionaries)?;
    // Files named by the profile are packed first, in its order; the rest in tree order.
    let is_file = |i: usize| matches!(scanned.inodes[i].kind, scan::ScannedKind::File { .. });
    let mut order: Vec<usize> = Vec::with_capacity(scanned.file_count as usize);
    let mut queued = vec![false; scanned.inodes.len()];
    if let Some(profile) = &opts.profile {
        let mut by_path = std::collections::HashMap::new();
        for (i, s) in scanned.inodes.iter().enumerate() {
            if let scan::ScannedKind::File { path, .. } = &s.kind {
                if let Ok(rel) = path.strip_prefix(src) {
                    by_path.insert(rel.as_os_str().as_encoded_bytes().to_vec(), i);
                }
            }
        }
        for p in profile.paths() {
            if let Some(&i) = by_path.get(p) {
                if !std::mem::replace(&mut queued[i], true) {
                    order.push(i);
                }
            }
        }
    }
    order.extend((0..scanned.inodes.len()).filter(|&i| is_file(i) && !queued[i]));
    let compression = match (opts.dictionary, opts.compression) {
        (DictionaryMode::Off, c) => c,
        (mode, Compression::Zstd { level }) => {
            let reuse = newest_dictionary.filter(|_| mode == DictionaryMode::Use);
            let id = match reuse {
                Some(id) => {
                    let size = base_table[*dictionaries.last().unwrap() as usize].size;
                    summary.dictionary = Some((id, size, false));
                    Some(id)
                }
                None => {
                    let files: Vec<(&Path, u64)> = order
                        .iter()
                        .filter_map(|&i| match &scanned.inodes[i].kind {
                            scan::ScannedKind::File { path, size } => Some((path.as_path(), *size)),
                            scan::ScannedKind::Other(_) => None,
                        })
                        .collect();
                    match dictionary::train(&files)? {
                        Some(dict) => {
                            let entry = dictionary::store(repo, &dict)?;
                            let id = incfs_format::codec::accept_dictionary(&entry, &dict).map_err(|e| {
                                PackError::Internal(format!("the new dictionary: {e}; pack again to reuse the old one"))
                            })?;
                            // Trained again on the same sample (--new-dictionary, same tree): the
                            // same bytes, listed once.
                            let listed = dictionaries.iter().any(|&i| base_table[i as usize] == entry);
                            if !listed {
                                let index = u32::try_from(base_table.len()).map_err(|_| PackError::TooManyObjects)?;
                                dictionaries.push(index);
                                base_table.push(entry);
                            }
                            summary.dictionary = Some((id, dict.len() as u64, !listed));
                            Some(id)
                        }
                        None => {
                            tracing::warn!("too little data to train a compression dictionary on; packed without one");
                            None
                        }
                    }
                }
            };
            id.map_or(Compression::Zstd { level }, |dict| Compression::ZstdDict { level, dict })
        }
        (_, _) => return Err(PackError::DictionaryNeedsZstd),
    };
    let mut packer =
        Packer { objects: objects::ObjectWriter::new(repo, base_table, opts.object_size), dedup, compression, summary };
    let mut packed = packer.pack_files(&scanned.inodes, &order, progress)?;
    let mut inodes = Vec::with_capacity(scanned.inodes.len());
    for (i, s) in scanned.inodes.into_iter().enumerate() {
        let kind = match s.kind {
            scan::ScannedKind::File { .. } => {
                incfs_format::InodeKind::File(packed[i].take().expect("every file was packed"))
            }
            scan::ScannedKind::Other(k) => k,
        };
        match &kind {
            incfs_format::InodeKind::File(_) => packer.summary.files += 1,
            incfs_format::InodeKind::Dir => packer.summary.dirs += 1,
            incfs_format::InodeKind::Symlink(_) => packer.summary.symlinks += 1,
            _ => packer.summary.specials += 1,
        }
        inodes.push(Inode { meta: s.meta, xattrs: s.xattrs, kind });
    }
    packer.summary.hard_links = scanned.dirents.len() as u64 + 1 - inodes.len() as u64;
    let mut summary = packer.summary;
    summary.bytes_stored = packer.objects.bytes_written;
    let (objects, written) = packer.objects.finish()?;
    summary.objects_written = written;

    let manifest =
        Manifest { name, version, expires: opts.expires, objects, dictionaries, inodes, dirents: scanned.dirents };
    manifest.validate().map_err(|e| PackError::Internal(e.to_string()))?;
    let signed = wire::encode_signed_part(&manifest);
    let signature = key.sign(&signed);
    let file = wire::seal(signed, key.algorithm(), key.public_key().id(), &signature);
    summary.manifest_bytes = file.len() as u64;
    write_atomic(&repo.join(layout::version_manifest(version)), &file)?;
    if let Some(profile) = &opts.profile {
        // Before the manifest: a reader that sees the new manifest finds its profile.
        write_atomic(&repo.join(layout::PROFILE), profile.encode().as_bytes())?;
    }
    write_atomic(&repo.join(layout::LATEST_MANIFEST), &file)?;
    drop(lock);
    Ok(summary)
}

struct Packer {
    objects: objects::ObjectWriter,
    dedup: dedup::DedupIndex,
    compression: Compression,
    summary: PackSummary,
}

/// A piece of a file (a whole small file, or a chunk of a large one) hashed, with the blocks
/// that may need storing already encoded: the parallel part of packing.
struct Prepared {
    hashes: Vec<Hash>,
    /// `Some` for the first block of each content that is not zero and was not known to the
    /// dedup index when prepared: its codec and where its stored bytes lie in `stored`.
    encoded: Vec<Option<(Codec, Range<usize>)>>,
    /// The encoded blocks' stored bytes, back to back.
    stored: Vec<u8>,
}

/// Leaf hash of an all-zero block (stored as a hole, never as data).
static ZERO_HASH: std::sync::LazyLock<Hash> = std::sync::LazyLock::new(|| hash_data_block(&[]));

/// Block `i` of `chunk` (the last one may be short).
fn block_of(chunk: &[u8], i: usize) -> &[u8] {
    &chunk[i * BLOCK_SIZE..(i * BLOCK_SIZE + BLOCK_SIZE).min(chunk.len())]
}

/// Hash `chunk`'s blocks and encode those that may be new (`parallel`: the encoding too).
fn prepare(chunk: &[u8], known: &dedup::Known, compression: Compression, parallel: bool) -> Prepared {
    let hashes: Vec<Hash> = incfs_verity::hash_data(chunk);
    let mut seen = rustc_hash::FxHashSet::default();
    let todo: Vec<usize> = (0..hashes.len())
        .filter(|&i| hashes[i] != *ZERO_HASH && !known.contains(&hashes[i]) && seen.insert(hashes[i]))
        .collect();
    // Each group of blocks is encoded into a buffer of its own, then the buffers joined.
    let encode = |group: &[usize]| {
        let mut stored = Vec::with_capacity(group.len() * BLOCK_SIZE / 2);
        let mut at = Vec::with_capacity(group.len());
        for &i in group {
            let start = stored.len();
            let codec = encode_block_into(block_of(chunk, i), compression, &mut stored);
            at.push((i, codec, start..stored.len()));
        }
        (stored, at)
    };
    // Per group: its stored bytes, and per block (index, codec, bytes in the group's buffer).
    type Group = (Vec<u8>, Vec<(usize, Codec, Range<usize>)>);
    let groups: Vec<Group> = match parallel {
        true => todo.par_chunks(64).map(encode).collect(),
        false => vec![encode(&todo)],
    };
    let mut encoded: Vec<Option<(Codec, Range<usize>)>> = vec![None; hashes.len()];
    let mut stored = Vec::with_capacity(groups.iter().map(|g| g.0.len()).sum());
    for (bytes, at) in groups {
        let base = stored.len();
        stored.extend_from_slice(&bytes);
        for (i, codec, r) in at {
            encoded[i] = Some((codec, base + r.start..base + r.end));
        }
    }
    Prepared { hashes, encoded, stored }
}

/// A small file read whole and prepared.
struct SmallFile {
    data: Vec<u8>,
    prepared: Prepared,
}

/// Read a file of `size` bytes (at most [`CHUNK`]) whole, checking it does not change size.
fn read_small(path: &Path, size: u64) -> Result<Vec<u8>, PackError> {
    let io = |source| PackError::Io { path: path.to_path_buf(), source };
    let f = File::open(path).map_err(io)?;
    if f.metadata().map_err(io)?.len() != size {
        return Err(PackError::Changed(path.to_path_buf()));
    }
    // One byte more than expected tells a file that grew.
    let mut data = vec![0u8; size as usize + 1];
    let n = read_full_at(&f, &mut data, 0).map_err(io)?;
    if n as u64 != size {
        return Err(PackError::Changed(path.to_path_buf()));
    }
    data.truncate(n);
    Ok(data)
}

/// Where the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) of `f` begins at or after `at`;
/// `Some(end)` when only a hole remains (`SEEK_DATA` past the last data), `None` where the file
/// system cannot tell (then the file is simply read).
fn seek(f: &File, at: u64, whence: libc::c_int, end: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor `f` keeps open; it only moves the file offset, which
    // nothing here uses (reads give their offsets).
    let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, whence) };
    match r {
        r if r >= 0 => Some(r as u64),
        _ if whence == libc::SEEK_DATA && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
            Some(end)
        }
        _ => None,
    }
}

/// Fill `buf` from `f` at `offset`, short only at the end of the file.
fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A piece of a large file, in file order: whole zero blocks found as a hole (not read), or
/// data read (the first `n` bytes of a buffer) and prepared.
enum Piece {
    Hole(u64),
    Data(Vec<u8>, usize, Prepared),
}

/// Read `f` (`size` bytes when scanned) piece by piece into the buffers `free` hands over,
/// prepare each, and send them to `out`, in order; stops at the end of the file, on an error
/// (sent), or when either channel is closed (the packer gave up).
fn read_pieces(
    f: &File,
    path: &Path,
    size: u64,
    known: &dedup::Known,
    compression: Compression,
    free: &std::sync::mpsc::Receiver<Vec<u8>>,
    out: &std::sync::mpsc::SyncSender<Result<Piece, PackError>>,
) {
    let io = |source| PackError::Io { path: path.to_path_buf(), source };
    let bs = BLOCK_SIZE as u64;
    let mut total = 0u64;
    loop {
        // Whole blocks of a hole are zero blocks without being read or hashed: a 1 GiB disk
        // image holding 1 MiB of data packs in the time of its data.
        if let Some(data) = seek(f, total, libc::SEEK_DATA, size).filter(|_| total < size) {
            let to = data.min(size) / bs * bs;
            if to > total {
                if out.send(Ok(Piece::Hole(to - total))).is_err() {
                    return;
                }
                total = to;
                continue;
            }
        }
        let Ok(mut buf) = free.recv() else { return };
        // Data up to the next hole (whole blocks), at most a chunk; then EOF is read for, so
        // that a file that grew since the scan is noticed.
        let want = match seek(f, total, libc::SEEK_HOLE, size) {
            Some(hole) if hole > total => (hole.div_ceil(bs) * bs - total).min(buf.len() as u64) as usize,
            _ => buf.len(),
        };
        let piece = match read_full_at(f, &mut buf[..want], total) {
            Ok(0) => return,
            Ok(n) if total + n as u64 > size => Err(PackError::Changed(path.to_path_buf())),
            Ok(n) => {
                total += n as u64;
                let prepared = prepare(&buf[..n], known, compression, true);
                Ok(Piece::Data(buf, n, prepared))
            }
            Err(e) => Err(io(e)),
        };
        let stop = piece.is_err();
        if out.send(piece).is_err() || stop {
            return;
        }
    }
}

impl Packer {
    /// Pack the files `order` names (indexes into `inodes`, each a regular file), in that order;
    /// their data, by inode index.
    fn pack_files(
        &mut self,
        inodes: &[scan::ScannedInode],
        order: &[usize],
        progress: &dyn Progress,
    ) -> Result<Vec<Option<FileData>>, PackError> {
        let file = |i: usize| match &inodes[i].kind {
            scan::ScannedKind::File { path, size } => (path.as_path(), *size),
            _ => unreachable!("only regular files are ordered for packing"),
        };
        let mut packed = vec![None; inodes.len()];
        // Large files one by one (their chunks are worked on in parallel); runs of small files
        // in batches, each read, hashed and encoded in parallel while the batch before it is
        // stored (storing is sequential: the output's order is fixed).
        let mut steps: Vec<Range<usize>> = Vec::new();
        let mut at = 0;
        while at < order.len() {
            let (mut end, mut bytes) = (at, 0);
            while end < order.len() {
                let size = file(order[end]).1;
                if end > at && (size > CHUNK as u64 || bytes + size > BATCH_BYTES) {
                    break;
                }
                bytes += size;
                end += 1;
                if size > CHUNK as u64 {
                    break;
                }
            }
            steps.push(at..end);
            at = end;
        }
        let is_large = |r: &Range<usize>| file(order[r.start]).1 > CHUNK as u64;
        let (known, compression) = (self.dedup.known(), self.compression);
        let prepare_batch = |r: Range<usize>| -> Vec<Result<SmallFile, PackError>> {
            order[r]
                .par_iter()
                .map(|&i| {
                    let (path, size) = file(i);
                    let data = read_small(path, size)?;
                    let prepared = prepare(&data, &known, compression, false);
                    Ok(SmallFile { data, prepared })
                })
                .collect()
        };
        std::thread::scope(|scope| -> Result<(), PackError> {
            // Batches of small files prepared ahead, in step order: several at once, so that one
            // batch's slowest file does not leave a core idle while the next waits to start.
            let mut ahead = std::collections::VecDeque::new();
            let mut queued = 0;
            for (k, step) in steps.iter().enumerate() {
                while queued < steps.len() && queued <= k + BATCHES_AHEAD {
                    let next = steps[queued].clone();
                    if !is_large(&next) {
                        ahead.push_back(scope.spawn(move || prepare_batch(next)));
                    }
                    queued += 1;
                }
                if is_large(step) {
                    let (path, size) = file(order[step.start]);
                    progress.file(path);
                    packed[order[step.start]] = Some(self.pack_large(path, size, progress)?);
                    continue;
                }
                let batch = ahead
                    .pop_front()
                    .expect("every small step is queued")
                    .join()
                    .expect("preparing a batch does not panic");
                for (&i, f) in order[step.clone()].iter().zip(batch) {
                    let f = f?;
                    let (path, size) = file(i);
                    progress.file(path);
                    let leaves = f.prepared.hashes.clone();
                    let records = self.place(&f.data, f.prepared)?;
                    progress.advance(size);
                    packed[i] = Some(self.finish_file(size, leaves, records)?);
                }
            }
            Ok(())
        })?;
        Ok(packed)
    }

    /// A file larger than [`CHUNK`], read chunk by chunk, each chunk's blocks worked on in
    /// parallel; the next chunk is read and prepared (on a thread of its own) while this one's
    /// new blocks are stored, so that neither the reading nor the storing leaves cores idle.
    fn pack_large(&mut self, path: &Path, size: u64, progress: &dyn Progress) -> Result<FileData, PackError> {
        let io = |source| PackError::Io { path: path.to_path_buf(), source };
        let f = File::open(path).map_err(io)?;
        if f.metadata().map_err(io)?.len() != size {
            return Err(PackError::Changed(path.to_path_buf()));
        }
        let blocks = incfs_verity::block_count(size) as usize;
        let mut leaves = Vec::with_capacity(blocks);
        let mut records = Vec::with_capacity(blocks);
        let mut total = 0u64;
        let (known, compression) = (self.dedup.known(), self.compression);
        std::thread::scope(|scope| -> Result<(), PackError> {
            // Declared in here, so that an early return drops them before the scope waits for
            // the reader: it then finds both channels closed and stops.
            let (pieces_tx, pieces) = std::sync::mpsc::sync_channel(1);
            let (free, free_rx) = std::sync::mpsc::channel();
            for _ in 0..2 {
                let _ = free.send(vec![0u8; CHUNK]);
            }
            let f = &f;
            scope.spawn(move || read_pieces(f, path, size, &known, compression, &free_rx, &pieces_tx));
            for piece in pieces {
                match piece? {
                    Piece::Hole(bytes) => {
                        let n = (bytes / BLOCK_SIZE as u64) as usize;
                        leaves.extend(std::iter::repeat_n(*ZERO_HASH, n));
                        records.extend(std::iter::repeat_n(BlockRecord::ZERO, n));
                        self.summary.zero_bytes += bytes;
                        total += bytes;
                        progress.advance(bytes);
                    }
                    Piece::Data(buf, n, prepared) => {
                        leaves.extend_from_slice(&prepared.hashes);
                        records.extend(self.place(&buf[..n], prepared)?);
                        total += n as u64;
                        progress.advance(n as u64);
                        let _ = free.send(buf);
                    }
                }
            }
            Ok(())
        })?;
        if total != size {
            return Err(PackError::Changed(path.to_path_buf()));
        }
        self.finish_file(size, leaves, records)
    }

    /// Store what is new of a prepared piece of a file, in block order; its block records.
    fn place(&mut self, chunk: &[u8], mut p: Prepared) -> Result<Vec<BlockRecord>, PackError> {
        let mut records = Vec::with_capacity(p.hashes.len());
        for (i, h) in p.hashes.iter().enumerate() {
            let block = block_of(chunk, i);
            let len = block.len() as u64;
            if *h == *ZERO_HASH {
                self.summary.zero_bytes += len;
                records.push(BlockRecord::ZERO);
            } else if let Some(r) = self.dedup.block(h) {
                // Stored by an earlier version, file, or block of this one.
                self.summary.dedup_saved += len;
                records.push(r);
            } else {
                // Encoded when prepared, unless the index then knew a copy that turned out
                // damaged when checked.
                let fresh;
                let (codec, bytes) = match p.encoded[i].take() {
                    Some((codec, at)) => (codec, &p.stored[at]),
                    None => {
                        fresh = encode_block(block, self.compression);
                        (fresh.codec, &fresh.bytes[..])
                    }
                };
                let (object, offset) = self.objects.append(bytes)?;
                let r = BlockRecord { object, codec, len: bytes.len() as u16, offset };
                self.dedup.insert_block(*h, r);
                self.summary.new_block_bytes += len;
                self.summary.new_block_stored += bytes.len() as u64;
                records.push(r);
            }
        }
        Ok(records)
    }

    /// A file's Merkle tree and block map, stored once per distinct content and map.
    fn finish_file(&mut self, size: u64, leaves: Vec<Hash>, records: Vec<BlockRecord>) -> Result<FileData, PackError> {
        self.summary.bytes_in += size;
        if size == 0 {
            return Ok(FileData { size, root_hash: [0; 32], meta: None });
        }
        // Sparse and repetitive files: a compact map where it is much smaller (format 3).
        let runs = compact_map::runs_of(&leaves, &records);
        let compact = compact_map::worth_it(size, runs.len());
        let tree = MerkleTree::from_leaves(size, leaves);
        let digest = dedup::records_digest(&records);
        let meta = match self.dedup.file(tree.root(), size, &digest) {
            Some(m) => m,
            None => {
                let bytes = match compact {
                    true => compact_map::encode(&runs),
                    false => {
                        let mut bytes = tree.to_compact();
                        for r in &records {
                            bytes.extend_from_slice(&r.encode());
                        }
                        bytes
                    }
                };
                let (object, offset) = self.objects.append(&bytes)?;
                let m = MetaRef { object, offset, compact: if compact { bytes.len() as u32 } else { 0 } };
                self.dedup.insert_file(*tree.root(), size, m, digest);
                m
            }
        };
        Ok(FileData { size, root_hash: *tree.root(), meta: Some(meta) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_file_that_changed_size_since_the_scan_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_small(&path, 10).unwrap(), b"0123456789");
        for scanned in [5, 20] {
            assert!(matches!(read_small(&path, scanned), Err(PackError::Changed(_))), "scanned as {scanned} bytes");
        }
    }

    #[test]
    fn prepare_encodes_each_new_content_once_and_skips_zeros_and_known_blocks() {
        let mut chunk = vec![0u8; 4 * BLOCK_SIZE];
        chunk[..BLOCK_SIZE].fill(1);
        chunk[2 * BLOCK_SIZE..3 * BLOCK_SIZE].fill(1); // the same content as block 0
        chunk[3 * BLOCK_SIZE..].fill(2);
        let dir = tempfile::tempdir().unwrap();
        let (_, dedup) = dedup::load(dir.path()).unwrap();
        for parallel in [false, true] {
            let p = prepare(&chunk, &dedup.known(), Compression::Lz4, parallel);
            let encoded: Vec<bool> = p.encoded.iter().map(Option::is_some).collect();
            assert_eq!(encoded, [true, false, false, true], "block 1 is zero, block 2 repeats block 0");
        }
    }
}
