//! `incfs fsck CACHE`: check a cache offline and drop what is damaged.
//!
//! A mount never serves a damaged block (everything read from the cache is verified again), so
//! this is not needed for correctness; it finds damage before a read does, and it repairs the
//! hints that verification cannot: presence bits. They say a block is local; a block dropped
//! without clearing its bit would leave a file "complete" that is not, and completion would not
//! fetch it again. So fsck (1) checks every stored block against its key (decode, hash), (2) for
//! every file of every accepted manifest, rebuilds the file's Merkle tree from the cached
//! metadata pieces, checks it against the signed root, and (3) clears every presence bit whose
//! block is neither zero nor stored. Damaged blocks and metadata pieces are removed.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use incfs_format::codec::{decode_block, DecodeError};
use incfs_format::compact_map::decode_region;
use incfs_format::manifest::InodeKind;
use incfs_format::{wire, Hash};
use incfs_store::{file_key, FileKey, Store, PRESENCE_CHUNK_BITS};
use incfs_verity::{hash_data_block, Geometry, MerkleTree};

use crate::reader::META_CHUNK;

/// What fsck found (and, unless a dry run, repaired).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FsckReport {
    pub blocks_checked: u64,
    pub blocks_damaged: u64,
    pub images: u64,
    pub files_checked: u64,
    /// Files whose cached tree failed its check (their pieces dropped).
    pub trees_damaged: u64,
    /// Presence bits cleared because their block is not stored.
    pub presence_cleared: u64,
    /// Plain copies checked (their file's presence then needs no stored block: a copy holds
    /// them all), and those that did not match their file (deleted).
    pub plain_checked: u64,
    pub plain_damaged: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("{0} is in use by a mount; unmount it first (fsck changes presence records a daemon keeps in memory)")]
    InUse(String),
    #[error(transparent)]
    Store(#[from] incfs_store::StoreError),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

/// The cache's lock file: mounts hold it shared, fsck exclusive.
pub fn lock_path(cache: &Path) -> std::path::PathBuf {
    cache.join("lock")
}

/// Check the cache at `cache`; with `repair`, drop damaged blocks and pieces and clear wrong
/// presence bits.
pub fn fsck(cache: &Path, repair: bool, progress: &dyn Fn(&str)) -> Result<FsckReport, FsckError> {
    if !cache.join("store.db").exists() {
        return Err(FsckError::Io {
            path: cache.display().to_string(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no incfs cache here (no store.db)"),
        });
    }
    let lock_file = lock_path(cache);
    let io = |error| FsckError::Io { path: lock_file.display().to_string(), error };
    let lock = File::options().create(true).truncate(false).write(true).open(&lock_file).map_err(io)?;
    if lock.try_lock().is_err() {
        return Err(FsckError::InUse(cache.display().to_string()));
    }
    let store = Store::open(cache)?;
    let mut report = FsckReport::default();

    // Blocks stored with a dictionary decode only with it: every accepted image's, as the
    // cache keeps them (nothing is fetched).
    for acc in store.all_accepted()? {
        let Ok(manifest) = wire::open_envelope(&acc.bytes).and_then(|env| wire::decode(&env)) else { continue };
        if let Err(e) = futures::executor::block_on(crate::dictionaries::load(&manifest, &store, &[])) {
            tracing::warn!("{}: {e}", manifest.name);
        }
    }

    progress("checking blocks");
    let mut scratch = [0u8; incfs_format::BLOCK_SIZE];
    for hash in store.block_hashes()? {
        // Unreadable (a segment cut short) counts as damaged too: the index claims it.
        let good = match store.get_block(&hash)? {
            Some((codec, data)) => match decode_block(codec, &data, &mut scratch) {
                // Its dictionary is not in the cache: it cannot be checked here (nor is it damaged).
                Err(DecodeError::NoDictionary(_)) => continue,
                Err(_) => false,
                Ok(()) => hash_data_block(&scratch) == hash,
            },
            None => false,
        };
        report.blocks_checked += 1;
        if !good {
            report.blocks_damaged += 1;
            tracing::warn!("block {} is damaged", hex::encode(hash));
            if repair {
                store.remove_block(&hash)?;
            }
        }
    }

    progress("checking files and presence");
    let zero = hash_data_block(&[]);
    let mut done: HashSet<FileKey> = HashSet::new();
    for acc in store.all_accepted()? {
        // Signed when it was accepted; here it only tells which blocks each file has. A record
        // that does not even decode is skipped (a mount verifies it again and refuses it).
        let Ok(env) = wire::open_envelope(&acc.bytes) else { continue };
        let Ok(manifest) = wire::decode(&env) else { continue };
        if manifest.validate().is_err() {
            continue;
        }
        report.images += 1;
        for inode in &manifest.inodes {
            let InodeKind::File(f) = &inode.kind else { continue };
            let key = file_key(&f.root_hash, f.size);
            let Some(meta) = f.meta else { continue };
            if f.size == 0 || !done.insert(key) {
                continue;
            }
            report.files_checked += 1;
            // A plain copy holds every block of its file (the store released them): if it
            // matches, the file is complete whatever the segments hold.
            let plain = cache.join("plain").join(hex::encode(key));
            if plain.exists() {
                if plain_matches(&plain, f) {
                    report.plain_checked += 1;
                    continue;
                }
                report.plain_damaged += 1;
                tracing::warn!("plain copy {} does not match its file", plain.display());
                if repair {
                    std::fs::remove_file(&plain)
                        .map_err(|error| FsckError::Io { path: plain.display().to_string(), error })?;
                }
            }
            let object = manifest.objects[meta.object as usize].digest;
            let geo = Geometry::new(f.size);
            let leaves: Option<Vec<Hash>> = if geo.data_blocks() == 1 {
                Some(vec![f.root_hash])
            } else {
                // The compact tree is the start of the metadata region, in cached pieces.
                let len = if meta.compact != 0 { meta.compact as u64 } else { geo.compact_len() };
                let mut compact = Vec::with_capacity(len as usize);
                let mut complete = true;
                for chunk in 0..len.div_ceil(META_CHUNK) {
                    match store.get_meta(&object, meta.offset, chunk)? {
                        Some(piece) => compact.extend_from_slice(&piece),
                        None => {
                            complete = false;
                            break;
                        }
                    }
                }
                compact.truncate(len as usize);
                let tree = |bytes: &[u8]| match meta.compact {
                    0 => MerkleTree::from_compact(f.size, bytes, &f.root_hash).map_err(|e| e.to_string()),
                    _ => decode_region(f.size, &meta, bytes, &f.root_hash).map(|(t, _)| t).map_err(|e| e.to_string()),
                };
                match complete.then(|| tree(&compact)) {
                    Some(Ok(tree)) => Some(tree.leaves().to_vec()),
                    Some(Err(_)) => {
                        report.trees_damaged += 1;
                        tracing::warn!("cached tree of a file with root {} is damaged", hex::encode(f.root_hash));
                        if repair {
                            let region = meta.stored_len(f.size).unwrap_or(0);
                            for chunk in 0..region.div_ceil(META_CHUNK) {
                                store.remove_meta(&object, meta.offset, chunk)?;
                            }
                        }
                        None
                    }
                    None => None,
                }
            };
            report.presence_cleared += check_presence(&store, &key, leaves.as_deref(), &zero, repair)?;
        }
    }
    drop(lock);
    Ok(report)
}

/// Whether the plain copy at `path` holds exactly `f` (size and fs-verity root).
fn plain_matches(path: &Path, f: &incfs_format::FileData) -> bool {
    use std::io::Read;
    let Ok(mut file) = File::open(path) else { return false };
    if file.metadata().map(|m| m.len()).ok() != Some(f.size) {
        return false;
    }
    let mut leaves = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = f.size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if file.read_exact(&mut buf[..n]).is_err() {
            return false;
        }
        leaves.extend(incfs_verity::hash_data(&buf[..n]));
        left -= n as u64;
    }
    MerkleTree::from_leaves(f.size, leaves).root() == &f.root_hash
}

/// Clear the presence bits of `key` whose block is not stored (all of them when the tree is
/// unknown: nothing can vouch for them). Returns how many were (or would be) cleared.
fn check_presence(
    store: &Store,
    key: &FileKey,
    leaves: Option<&[Hash]>,
    zero: &Hash,
    repair: bool,
) -> Result<u64, FsckError> {
    let chunks = store.presence(key);
    let mut set: Vec<u64> = Vec::new();
    for (c, bits) in &chunks {
        for (byte, b) in bits.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    set.push(c * PRESENCE_CHUNK_BITS + byte as u64 * 8 + bit);
                }
            }
        }
    }
    let stored: HashSet<Hash> = match leaves {
        Some(l) => {
            let wanted: Vec<Hash> = set.iter().filter_map(|&i| l.get(i as usize)).copied().collect();
            store.stored_among(&wanted)
        }
        None => HashSet::new(),
    };
    let bad: Vec<u64> = set
        .into_iter()
        .filter(|&i| match leaves.and_then(|l| l.get(i as usize)) {
            Some(h) => h != zero && !stored.contains(h),
            None => true,
        })
        .collect();
    if repair && !bad.is_empty() {
        let mut new: HashMap<u64, Vec<u8>> = chunks.into_iter().collect();
        for i in &bad {
            if let Some(bits) = new.get_mut(&(i / PRESENCE_CHUNK_BITS)) {
                let b = i % PRESENCE_CHUNK_BITS;
                bits[(b / 8) as usize] &= !(1 << (b % 8));
            }
        }
        let rows: Vec<(FileKey, u64, Vec<u8>)> = new.into_iter().map(|(c, bits)| (*key, c, bits)).collect();
        store.set_presence(&rows)?;
    }
    Ok(bad.len() as u64)
}
