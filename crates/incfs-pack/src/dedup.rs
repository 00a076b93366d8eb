//! What the repository already stores, so that a block or a file is stored only once.
//!
//! Blocks are addressed by content: their leaf hash (the SHA-256 of the zero-padded block, the
//! same hash the Merkle tree holds). Before packing, the metadata regions of every version
//! already in the repository are read back; each one's tree is checked against its root hash,
//! and its blocks become candidates for reuse. A block from an earlier pack is read back and
//! hashed the first time it is reused, so a damaged repository is never propagated into a new
//! version: the block is stored afresh instead.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use incfs_format::block_map::{BlockRecord, FileMetaLayout, BLOCK_RECORD_SIZE};
use incfs_format::codec::decode_block;
use incfs_format::compact_map::{decode_region, CompactMap};
use incfs_format::manifest::{InodeKind, Manifest, MetaRef, ObjectRef};
use incfs_format::{layout, wire, Hash, BLOCK_SIZE};
use incfs_verity::hash_data_block;
use parking_lot::RwLock;
use rustc_hash::FxBuildHasher;
use sha2::{Digest, Sha256};

use crate::PackError;

/// Digest of a file's encoded block records: two files with the same content, size and records
/// can share one metadata region.
pub(crate) fn records_digest(records: &[BlockRecord]) -> Hash {
    let mut h = Sha256::new();
    for r in records {
        h.update(r.encode());
    }
    h.finalize().into()
}

#[derive(Default)]
pub(crate) struct DedupIndex {
    /// Shared with [`Known`] handles, so that blocks of the next batch are prepared (hashed,
    /// looked up, encoded) while this batch is stored.
    // Keys are SHA-256 digests: a fast hash of them spreads as well as SipHash would.
    blocks: Arc<RwLock<HashMap<Hash, BlockRecord, FxBuildHasher>>>,
    files: HashMap<(Hash, u64), (MetaRef, Hash), FxBuildHasher>,
    /// Objects with an index below this were written by earlier packs.
    old_objects: u32,
    old_table: Vec<ObjectRef>,
    verified: HashSet<(u32, u64)>,
    open: HashMap<u32, File>,
    repo: PathBuf,
}

/// Which blocks have a stored copy, as the index knows at the moment of asking.
#[derive(Clone)]
pub(crate) struct Known(Arc<RwLock<HashMap<Hash, BlockRecord, FxBuildHasher>>>);

impl Known {
    /// Whether a stored copy of the block is known (unchecked: [`DedupIndex::block`] checks).
    pub fn contains(&self, hash: &Hash) -> bool {
        self.0.read().contains_key(hash)
    }
}

/// The repository's newest version, if any, and the reuse index over all its versions.
/// The versions published in `repo`, ascending.
pub(crate) fn versions(repo: &Path) -> Result<Vec<u64>, PackError> {
    let dir = repo.join(layout::VERSIONS_DIR);
    let mut versions: Vec<u64> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| layout::parse_version_manifest_name(e.file_name().to_str()?))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(PackError::Io { path: dir, source }),
    };
    versions.sort_unstable();
    Ok(versions)
}

/// Version `v`'s manifest, decoded (the publisher's own repository: not checked against a key).
pub(crate) fn read_manifest(repo: &Path, v: u64) -> Result<Manifest, String> {
    let path = repo.join(layout::version_manifest(v));
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let env = wire::open_envelope(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let m = wire::decode(&env).map_err(|e| format!("{}: {e}", path.display()))?;
    if m.version != v {
        return Err(format!("{} says it is version {}", path.display(), m.version));
    }
    Ok(m)
}

/// The block records of a file, read from its metadata region in `repo` (bounds-checked against
/// `m`'s object table).
pub(crate) fn read_records(repo: &Path, m: &Manifest, size: u64, meta: MetaRef) -> Result<Vec<BlockRecord>, String> {
    let len = meta.stored_len(size).ok_or("metadata too large")?;
    let object = m.objects.get(meta.object as usize).ok_or("metadata in a missing object")?;
    let path = repo.join(layout::object(&object.digest));
    let mut bytes = vec![0u8; len as usize];
    File::open(&path)
        .and_then(|f| f.read_exact_at(&mut bytes, meta.offset))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.compact != 0 {
        let map = CompactMap::decode(size, &bytes).map_err(|e| e.to_string())?;
        return Ok((0..incfs_verity::block_count(size)).map(|i| map.record(i)).collect());
    }
    let map = &bytes[FileMetaLayout::new(size).map_offset() as usize..];
    map.chunks_exact(BLOCK_RECORD_SIZE)
        .map(|c| BlockRecord::decode(c.try_into().unwrap()).map_err(|e| e.to_string()))
        .collect()
}

pub(crate) fn load(repo: &Path) -> Result<(Option<Manifest>, DedupIndex), PackError> {
    let mut index = DedupIndex { repo: repo.to_path_buf(), ..Default::default() };
    let versions = versions(repo)?;
    let Some(&newest) = versions.last() else {
        return Ok((None, index));
    };
    let read_manifest = |v: u64| read_manifest(repo, v);
    let latest = read_manifest(newest).map_err(|reason| PackError::DamagedRepository { reason })?;
    index.old_table = latest.objects.clone();
    index.old_objects = latest.objects.len() as u32;

    for &v in versions.iter().rev() {
        let m = if v == newest {
            latest.clone()
        } else {
            match read_manifest(v) {
                Ok(m) => m,
                Err(reason) => {
                    tracing::warn!("not reusing data of an unreadable old version: {reason}");
                    continue;
                }
            }
        };
        if !latest.objects.starts_with(&m.objects) {
            tracing::warn!("version {v} does not share the newest version's object table; not reusing its data");
            continue;
        }
        for inode in &m.inodes {
            if let InodeKind::File(f) = &inode.kind {
                if let Some(meta) = f.meta {
                    if let Err(reason) = index.learn_file(&m, f.size, &f.root_hash, meta) {
                        tracing::warn!("version {v}: not reusing a damaged file record: {reason}");
                    }
                }
            }
        }
    }
    Ok((Some(latest), index))
}

impl DedupIndex {
    fn object_file(&mut self, object: u32) -> std::io::Result<&File> {
        if !self.open.contains_key(&object) {
            let path = self.repo.join(layout::object(&self.old_table[object as usize].digest));
            self.open.insert(object, File::open(path)?);
        }
        Ok(&self.open[&object])
    }

    fn read_old(&mut self, object: u32, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        self.object_file(object)
            .and_then(|f| f.read_exact_at(&mut buf, offset))
            .map_err(|e| format!("object {object} at {offset}: {e}"))?;
        Ok(buf)
    }

    fn learn_file(&mut self, m: &Manifest, size: u64, root: &Hash, meta: MetaRef) -> Result<(), String> {
        let len = meta.stored_len(size).ok_or("metadata too large")? as usize;
        let bytes = self.read_old(meta.object, meta.offset, len)?;
        let (tree, records) = decode_region(size, &meta, &bytes, root).map_err(|e| e.to_string())?;
        for r in records.iter().filter(|r| r.codec != incfs_format::Codec::Zero) {
            let obj = m.objects.get(r.object as usize).ok_or("block record names a missing object")?;
            if r.range().end > obj.size {
                return Err("block record lies outside its object".into());
            }
        }
        for (leaf, r) in tree.leaves().iter().zip(&records) {
            if r.codec != incfs_format::Codec::Zero {
                self.blocks.write().entry(*leaf).or_insert(*r);
            }
        }
        self.files.entry((*root, size)).or_insert((meta, records_digest(&records)));
        Ok(())
    }

    /// A stored copy of the block with leaf hash `hash`, checked if it comes from an earlier pack.
    pub fn block(&mut self, hash: &Hash) -> Option<BlockRecord> {
        let r = *self.blocks.read().get(hash)?;
        if r.object >= self.old_objects || self.verified.contains(&(r.object, r.offset)) {
            return Some(r);
        }
        let ok = self
            .read_old(r.object, r.offset, r.len as usize)
            .and_then(|stored| {
                let mut block = [0u8; BLOCK_SIZE];
                decode_block(r.codec, &stored, &mut block).map_err(|e| e.to_string())?;
                Ok(&hash_data_block(&block) == hash)
            })
            .unwrap_or(false);
        if ok {
            self.verified.insert((r.object, r.offset));
            Some(r)
        } else {
            tracing::warn!(
                "stored block at object {} offset {} is damaged; storing a fresh copy (run incfs verify on the repository)",
                r.object,
                r.offset
            );
            self.blocks.write().remove(hash);
            None
        }
    }

    /// A handle that tells which blocks have a stored copy, usable while the index changes.
    pub fn known(&self) -> Known {
        Known(self.blocks.clone())
    }

    pub fn insert_block(&mut self, hash: Hash, r: BlockRecord) {
        self.blocks.write().insert(hash, r);
    }

    /// An existing metadata region for a file with this root hash, size and block records.
    pub fn file(&self, root: &Hash, size: u64, records: &Hash) -> Option<MetaRef> {
        self.files.get(&(*root, size)).filter(|(_, r)| r == records).map(|(m, _)| *m)
    }

    pub fn insert_file(&mut self, root: Hash, size: u64, meta: MetaRef, records: Hash) {
        self.files.insert((root, size), (meta, records));
    }
}
