//! `incfs pack`: turn a directory tree into a version of an incfs repository.
//!
//! The steps, in order: [`scan`] walks the tree (metadata only); each regular file is then read
//! once, in 4 MiB chunks: its blocks are hashed (in parallel), looked up in the [`dedup`] index,
//! the new ones compressed (in parallel) and appended to [`objects`] in file order, and its
//! Merkle tree and block map are appended after its data. Finally the manifest is signed and
//! written, version file first, then `manifest` (each by atomic rename), so a reader never sees a
//! manifest that names an object not yet durable. Everything is single-writer and in a fixed
//! order, so the same tree, options and key always give a byte-identical repository.

mod dedup;
mod objects;
mod prune;
mod scan;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use incfs_format::block_map::BlockRecord;
use incfs_format::codec::{encode_block, EncodedBlock};
use incfs_format::manifest::{is_valid_image_name, FileData, Inode, Manifest, MetaRef};
use incfs_format::profile::Profile;
use incfs_format::{layout, wire, Compression, Hash, BLOCK_SIZE};
use incfs_sign::SigningKey;
use incfs_verity::{hash_data_block, MerkleTree};

/// Default size at which an object is closed and a new one started.
pub const DEFAULT_OBJECT_SIZE: u64 = 64 << 20;

/// How much of a file is read, hashed and compressed at a time.
const CHUNK: usize = 4 << 20;

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
    let base_table = previous.map(|m| m.objects).unwrap_or_default();
    let mut packer = Packer {
        objects: objects::ObjectWriter::new(repo, base_table, opts.object_size),
        dedup,
        compression: opts.compression,
        summary: PackSummary {
            name: name.clone(),
            version,
            skipped: scanned.skipped.len() as u64,
            ..Default::default()
        },
        buf: vec![0u8; CHUNK],
    };
    // Files named by the profile are packed first, in its order; the rest in tree order.
    let mut packed: Vec<Option<FileData>> = vec![None; scanned.inodes.len()];
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
            let Some(&i) = by_path.get(p) else { continue };
            if packed[i].is_some() {
                continue;
            }
            if let scan::ScannedKind::File { path, size } = &scanned.inodes[i].kind {
                progress.file(path);
                packed[i] = Some(packer.pack_file(path, *size, progress)?);
            }
        }
    }
    let mut inodes = Vec::with_capacity(scanned.inodes.len());
    for (i, s) in scanned.inodes.into_iter().enumerate() {
        let kind = match s.kind {
            scan::ScannedKind::File { .. } if packed[i].is_some() => incfs_format::InodeKind::File(packed[i].unwrap()),
            scan::ScannedKind::File { path, size } => {
                progress.file(&path);
                incfs_format::InodeKind::File(packer.pack_file(&path, size, progress)?)
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

    let manifest = Manifest { name, version, expires: opts.expires, objects, inodes, dirents: scanned.dirents };
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
    buf: Vec<u8>,
}

/// What to do with one block of a chunk.
enum Plan {
    Zero,
    Stored(BlockRecord),
    /// New content: its encoding is `encoded[i]`.
    New(usize),
    /// Same content as an earlier new block of this chunk.
    SameAs(usize),
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Packer {
    fn pack_file(&mut self, path: &Path, size: u64, progress: &dyn Progress) -> Result<FileData, PackError> {
        let io = |source| PackError::Io { path: path.to_path_buf(), source };
        let mut f = File::open(path).map_err(io)?;
        if f.metadata().map_err(io)?.len() != size {
            return Err(PackError::Changed(path.to_path_buf()));
        }
        let blocks = incfs_verity::block_count(size) as usize;
        let mut leaves = Vec::with_capacity(blocks);
        let mut records = Vec::with_capacity(blocks);
        let zero_hash = hash_data_block(&[]);
        let mut total = 0u64;
        loop {
            let n = read_full(&mut f, &mut self.buf).map_err(io)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > size {
                return Err(PackError::Changed(path.to_path_buf()));
            }
            let chunk = &self.buf[..n];
            let hashes: Vec<Hash> = incfs_verity::hash_data(chunk);
            let mut plan = Vec::with_capacity(hashes.len());
            let mut fresh: Vec<usize> = Vec::new();
            let mut pending = std::collections::HashMap::new();
            for (i, h) in hashes.iter().enumerate() {
                let len = chunk[i * BLOCK_SIZE..].len().min(BLOCK_SIZE) as u64;
                plan.push(if *h == zero_hash {
                    self.summary.zero_bytes += len;
                    Plan::Zero
                } else if let Some(r) = self.dedup.block(h) {
                    self.summary.dedup_saved += len;
                    Plan::Stored(r)
                } else if let Some(&j) = pending.get(h) {
                    self.summary.dedup_saved += len;
                    Plan::SameAs(j)
                } else {
                    pending.insert(*h, fresh.len());
                    fresh.push(i);
                    Plan::New(fresh.len() - 1)
                });
            }
            let compression = self.compression;
            let encoded: Vec<EncodedBlock> = fresh
                .par_iter()
                .map(|&i| encode_block(&chunk[i * BLOCK_SIZE..(i * BLOCK_SIZE + BLOCK_SIZE).min(n)], compression))
                .collect();
            let mut written: Vec<BlockRecord> = Vec::with_capacity(encoded.len());
            for (i, e) in encoded.iter().enumerate() {
                let (object, offset) = self.objects.append(&e.bytes)?;
                let r = BlockRecord { object, codec: e.codec, len: e.bytes.len() as u16, offset };
                self.dedup.insert_block(hashes[fresh[i]], r);
                self.summary.new_block_bytes += chunk[fresh[i] * BLOCK_SIZE..].len().min(BLOCK_SIZE) as u64;
                self.summary.new_block_stored += e.bytes.len() as u64;
                written.push(r);
            }
            for p in plan {
                records.push(match p {
                    Plan::Zero => BlockRecord::ZERO,
                    Plan::Stored(r) => r,
                    Plan::New(j) | Plan::SameAs(j) => written[j],
                });
            }
            leaves.extend_from_slice(&hashes);
            progress.advance(n as u64);
        }
        if total != size {
            return Err(PackError::Changed(path.to_path_buf()));
        }
        self.summary.bytes_in += size;
        if size == 0 {
            return Ok(FileData { size, root_hash: [0; 32], meta: None });
        }
        let tree = MerkleTree::from_leaves(size, leaves);
        let digest = dedup::records_digest(&records);
        let meta = match self.dedup.file(tree.root(), size, &digest) {
            Some(m) => m,
            None => {
                let mut bytes = tree.to_compact();
                for r in &records {
                    bytes.extend_from_slice(&r.encode());
                }
                let (object, offset) = self.objects.append(&bytes)?;
                let m = MetaRef { object, offset };
                self.dedup.insert_file(*tree.root(), size, m, digest);
                m
            }
        };
        Ok(FileData { size, root_hash: *tree.root(), meta: Some(meta) })
    }
}
