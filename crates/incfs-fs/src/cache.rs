//! `incfs cache ls|du|gc|rm|limit`: what a cache holds, image by image, and dropping what no
//! recorded image needs.
//!
//! What a cache records of an image is its newest accepted manifest (`store.db`); from it come
//! the image's file contents, their metadata regions and, through the cached Merkle trees, the
//! leaf hash of every block. `gc` keeps exactly what those manifests (and files pushed into
//! their mounts) reference and drops the rest: blocks of versions replaced by `update`, images
//! removed with `rm`. It may run beside mounts: one of them that still reads a dropped block
//! (a file kept open across an update) fetches it again.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use incfs_format::manifest::{InodeKind, Manifest};
use incfs_format::{wire, FileData, Hash};
use incfs_store::{file_key, limit, FileKey, Store};
use incfs_verity::{Geometry, MerkleTree};
use serde::{Deserialize, Serialize};

use crate::control::CacheUsage;
use crate::reader::META_CHUNK;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0} holds no incfs cache (no store.db); give the cache directory with --cache")]
    NoCache(String),
    #[error("image {0:?} is not in the cache {1} (incfs cache ls lists them)")]
    NoImage(String, String),
    #[error("image {0:?} is mounted from the cache {1}; unmount it first")]
    Mounted(String, String),
    #[error(transparent)]
    Store(#[from] incfs_store::StoreError),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |error| CacheError::Io { path: path.display().to_string(), error }
}

/// The lock file of image `name` in `cache`: every daemon serving the image holds it shared,
/// so that `cache rm` can tell that it is mounted.
pub fn image_lock(cache: &Path, name: &str) -> std::io::Result<File> {
    let dir = cache.join("images");
    incfs_store::private_dir(&dir)?;
    File::options().create(true).truncate(false).write(true).open(dir.join(hex::encode(name.as_bytes())))
}

fn mounted(cache: &Path, name: &str) -> bool {
    let path = cache.join("images").join(hex::encode(name.as_bytes()));
    File::open(path).is_ok_and(|f| f.try_lock().is_err())
}

fn open(cache: &Path) -> Result<Store, CacheError> {
    if !cache.join("store.db").exists() {
        return Err(CacheError::NoCache(cache.display().to_string()));
    }
    Ok(Store::open(cache)?)
}

/// The manifests the cache accepted (newest version of each image). Signed when accepted;
/// here they only say what the image holds. One that does not decode is skipped.
fn recorded(store: &Store) -> Result<Vec<Manifest>, CacheError> {
    let mut out = Vec::new();
    for acc in store.all_accepted()? {
        let Ok(env) = wire::open_envelope(&acc.bytes) else { continue };
        let Ok(m) = wire::decode(&env) else { continue };
        if m.validate().is_ok() {
            out.push(m);
        }
    }
    Ok(out)
}

/// A file's leaf hashes from its cached Merkle tree: `Ok(None)` if the tree is not (wholly)
/// cached, `Err(())` if it is and fails its signed root.
pub fn cached_leaves(store: &Store, m: &Manifest, f: &FileData) -> Result<Option<Vec<Hash>>, CacheError> {
    let Some(meta) = f.meta else { return Ok(None) };
    let geo = Geometry::new(f.size);
    if geo.data_blocks() == 1 {
        return Ok(Some(vec![f.root_hash]));
    }
    let object = m.objects[meta.object as usize].digest;
    let len = geo.compact_len();
    let mut compact = Vec::with_capacity(len as usize);
    for chunk in 0..len.div_ceil(META_CHUNK) {
        match store.get_meta(&object, meta.offset, chunk)? {
            Some(piece) => compact.extend_from_slice(&piece),
            None => return Ok(None),
        }
    }
    compact.truncate(len as usize);
    Ok(MerkleTree::from_compact(f.size, &compact, &f.root_hash).ok().map(|t| t.leaves().to_vec()))
}

/// One image of a cache, for `incfs cache ls`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageEntry {
    pub name: String,
    pub version: u64,
    /// Distinct file contents and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Bytes of those present in the cache.
    pub present_bytes: u64,
    /// Pinned paths (`incfs pin`), and the bytes of their contents.
    pub pinned: u64,
    pub pinned_bytes: u64,
    /// When a mount last used it (RFC 3339), if known.
    pub last_used: Option<String>,
    /// Served by a running mount now.
    pub mounted: bool,
}

pub fn list(cache: &Path) -> Result<Vec<ImageEntry>, CacheError> {
    let store = open(cache)?;
    let used = store.last_used()?;
    let pins = store.pinned()?;
    let mut out = Vec::new();
    for m in recorded(&store)? {
        let mut seen = HashSet::new();
        let (mut files, mut bytes, mut present) = (0, 0, 0);
        for inode in &m.inodes {
            let InodeKind::File(f) = &inode.kind else { continue };
            let key = file_key(&f.root_hash, f.size);
            if !seen.insert(key) {
                continue;
            }
            files += 1;
            bytes += f.size;
            let count: u64 = store.presence(&key).iter().flat_map(|(_, b)| b).map(|b| b.count_ones() as u64).sum();
            present += (count * incfs_format::BLOCK_SIZE as u64).min(f.size);
        }
        let mine: Vec<&(String, String, FileKey)> = pins.iter().filter(|(i, _, _)| *i == m.name).collect();
        let pinned_bytes = mine.iter().map(|(_, _, k)| u64::from_le_bytes(k[32..].try_into().unwrap())).sum();
        out.push(ImageEntry {
            mounted: mounted(cache, &m.name),
            last_used: used.get(&m.name).map(|&t| incfs_fetch::image::format_time(t)),
            pinned: mine.len() as u64,
            pinned_bytes,
            name: m.name,
            version: m.version,
            files,
            bytes,
            present_bytes: present,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `incfs cache du`: bytes by kind, and how much of it eviction may take.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DuReport {
    pub usage: CacheUsage,
    pub limit: Option<u64>,
    /// Segments and plain copies that eviction may take (not pinned), with their journals.
    pub evictable: u64,
}

pub fn du(cache: &Path) -> Result<DuReport, CacheError> {
    let store = open(cache)?;
    let usage = store.usage()?;
    let evictable = limit::candidates(cache, None).map_err(io(cache))?.iter().map(|c| c.bytes).sum();
    Ok(DuReport {
        usage: CacheUsage::new(&usage, store.totals().block_bytes, store.meta_bytes()),
        limit: store.limit_state().limit,
        evictable,
    })
}

/// What `gc` dropped.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcReport {
    pub blocks: u64,
    pub metadata_pieces: u64,
    /// File contents no image has any more (their presence records).
    pub contents: u64,
    pub plain_copies: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

pub fn gc(cache: &Path) -> Result<GcReport, CacheError> {
    let store = open(cache)?;
    let before = store.usage()?.total();
    let (mut leaves, mut regions, mut keys) = (HashSet::new(), HashSet::new(), HashSet::new());
    for m in recorded(&store)? {
        for inode in &m.inodes {
            let InodeKind::File(f) = &inode.kind else { continue };
            keys.insert(file_key(&f.root_hash, f.size));
            if let Some(meta) = f.meta {
                if (meta.object as usize) < m.objects.len() {
                    regions.insert((m.objects[meta.object as usize].digest, meta.offset));
                }
            }
            // A tree not cached leaves its blocks unknown: they go (fetched again if read).
            if let Some(l) = cached_leaves(&store, &m, f)? {
                leaves.extend(l);
            }
        }
        regions.extend(crate::dictionaries::cache_keys(&m).map(|(object, region, _)| (object, region)));
        for p in store.pushed(&m.name)? {
            keys.insert(file_key(&p.root, p.size));
            if let Ok(t) = MerkleTree::from_compact(p.size, &p.tree, &p.root) {
                leaves.extend(t.leaves().iter().copied());
            }
        }
    }
    // Pins of a path whose content changed (an update) or whose image went: dropped.
    let mut paths = std::collections::HashMap::new();
    for m in recorded(&store)? {
        for (path, ino) in m.walk() {
            if let InodeKind::File(f) = &m.inodes[ino as usize].kind {
                let label = incfs_format::manifest::display_path(&path);
                paths.insert((m.name.clone(), label), file_key(&f.root_hash, f.size));
            }
        }
    }
    let mut stale = Vec::new();
    for (image, path, key) in store.pinned()? {
        if paths.get(&(image.clone(), path.clone())) != Some(&key) {
            store.set_pinned(&image, &path, None)?;
            stale.push(key);
        }
    }
    let still: HashSet<FileKey> = store.pinned()?.into_iter().map(|(_, _, k)| k).collect();
    for k in stale.into_iter().chain(store.pinned_contents()).filter(|k| !still.contains(k)) {
        store.unpin(&k)?;
    }
    let (blocks, metadata_pieces, contents) = store.gc(&leaves, &regions, &keys)?;
    let mut plain_copies = 0;
    let plain = cache.join("plain");
    if let Ok(rd) = std::fs::read_dir(&plain) {
        for e in rd.flatten() {
            let path: PathBuf = e.path();
            if limit::plain_key(&path).is_some_and(|k| !keys.contains(&k)) {
                std::fs::remove_file(&path).map_err(io(&path))?;
                plain_copies += 1;
            }
        }
    }
    let after = store.usage()?.total();
    Ok(GcReport { blocks, metadata_pieces, contents, plain_copies, bytes_before: before, bytes_after: after })
}

/// `incfs cache rm IMAGE`: forget the image, then [`gc`].
pub fn remove(cache: &Path, name: &str) -> Result<GcReport, CacheError> {
    let store = open(cache)?;
    if store.accepted(name)?.is_none() {
        return Err(CacheError::NoImage(name.to_string(), cache.display().to_string()));
    }
    if mounted(cache, name) {
        return Err(CacheError::Mounted(name.to_string(), cache.display().to_string()));
    }
    store.forget_image(name)?;
    let _ = std::fs::remove_file(cache.join("images").join(hex::encode(name.as_bytes())));
    drop(store);
    gc(cache)
}

/// `incfs cache limit`: set the cache's limit exactly (`None`: none).
pub fn set_limit(cache: &Path, limit: Option<u64>) -> Result<(), CacheError> {
    recorded_limit(cache)?;
    limit::set(cache, limit).map_err(io(cache))
}

/// The cache's recorded limit.
pub fn recorded_limit(cache: &Path) -> Result<Option<u64>, CacheError> {
    if !cache.join("store.db").exists() {
        return Err(CacheError::NoCache(cache.display().to_string()));
    }
    limit::recorded(cache).map_err(io(cache))
}
