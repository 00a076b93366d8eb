//! An image opened from a source: the verified manifest, and verified reads of file data.
//!
//! Trust flows one way. The manifest is accepted only with a valid signature from a trusted key;
//! it holds each file's Merkle root. A file's metadata region (tree and block map) is fetched and
//! its tree checked against that root; every data block fetched is decoded and hashed and must
//! equal its leaf in that tree. Nothing that fails a check is returned.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};

use incfs_format::block_map::BlockRecord;
use incfs_format::codec::decode_block;
use incfs_format::compact_map::decode_region;
use incfs_format::manifest::{FileData, Manifest};
use incfs_format::{layout, wire, Codec, Hash, BLOCK_SIZE};
use incfs_sign::{PublicKey, SignatureError, TrustedKeys};
use incfs_verity::{hash_data_block, MerkleTree};

use crate::source::{Source, SourceError};

/// Largest single ranged GET when reading runs of adjacent blocks.
pub const MAX_RUN_BYTES: u64 = 8 << 20;
/// Ranged GETs in flight per file read.
const READ_CONCURRENCY: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{source_name}: the manifest is malformed: {error}")]
    Manifest { source_name: String, error: wire::WireError },
    #[error("{source_name}: {error}")]
    Signature { source_name: String, error: SignatureError },
    #[error(
        "{source_name}: {key} holds version {found}, not version {asked}; the repository is damaged or the server \
         is lying"
    )]
    WrongVersion { source_name: String, key: String, asked: u64, found: u64 },
    #[error(
        "{source_name}: {name} version {version} expired at {at} (its publisher signs a new version before then; \
         a server still serving this one may be replaying an old version); --allow-expired uses it anyway"
    )]
    Expired { source_name: String, name: String, version: u64, at: String },
    #[error("{source_name}: compression dictionary {key}: {error}")]
    Dictionary { source_name: String, key: String, error: incfs_format::codec::DictionaryError },
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// An expiry time for messages: RFC 3339, UTC.
pub fn format_time(at: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Why a file's metadata region was rejected.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata: {0}")]
    Source(#[from] SourceError),
    #[error("{0}")]
    Region(#[from] incfs_format::compact_map::RegionError),
    #[error("block {block}: bad block record: {reason}")]
    Record { block: u64, reason: String },
}

/// Why one block could not be returned.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BlockFault {
    #[error("content does not match the Merkle tree (corrupted or substituted data)")]
    Mismatch,
    #[error("stored bytes do not decode: {0}")]
    Decode(String),
    #[error("{0}")]
    Fetch(String),
}

/// Bytes of one object already fetched (a span read with one GET), which reads inside it take
/// from memory instead of asking the source. Unverified, like anything fetched: every block and
/// tree piece taken from it is checked as usual.
#[derive(Debug, Clone)]
pub struct Held {
    pub object: u32,
    pub start: u64,
    pub bytes: Bytes,
}

impl Held {
    /// Bytes `range` of `object`, if held.
    fn get(&self, object: u32, range: &Range<u64>) -> Option<Bytes> {
        let end = self.start + self.bytes.len() as u64;
        (object == self.object && range.start >= self.start && range.end <= end)
            .then(|| self.bytes.slice((range.start - self.start) as usize..(range.end - self.start) as usize))
    }
}

/// A file's verified Merkle tree and (unverified) block map.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub tree: MerkleTree,
    pub records: Vec<BlockRecord>,
}

impl FileMeta {
    pub fn size(&self) -> u64 {
        self.tree.geometry().size()
    }
}

/// A repository image with a verified manifest.
#[derive(Debug, Clone)]
pub struct Image {
    source: Source,
    manifest: Arc<Manifest>,
    manifest_bytes: Bytes,
    signer: PublicKey,
}

impl Image {
    /// Open the newest version published at `source`.
    pub async fn open(source: Source, trust: &TrustedKeys) -> Result<Image, ImageError> {
        let bytes = source.get(layout::LATEST_MANIFEST, layout::MAX_MANIFEST_BYTES).await?;
        Self::from_manifest_bytes(source, bytes, trust)
    }

    /// Open version `version` published at `source` (which must hold that version).
    pub async fn open_version(source: Source, version: u64, trust: &TrustedKeys) -> Result<Image, ImageError> {
        let bytes = source.get(&layout::version_manifest(version), layout::MAX_MANIFEST_BYTES).await?;
        Self::from_manifest_bytes(source, bytes, trust)?.expect_version(version)
    }

    /// This image, if it is version `version` (a `versions/N.manifest` must hold version N).
    pub fn expect_version(self, version: u64) -> Result<Image, ImageError> {
        if self.manifest.version != version {
            return Err(ImageError::WrongVersion {
                source_name: self.source.name().to_string(),
                key: layout::version_manifest(version),
                asked: version,
                found: self.manifest.version,
            });
        }
        Ok(self)
    }

    /// Refuse the manifest if its signed expiry has passed, unless `allow_expired`.
    pub fn check_fresh(&self, allow_expired: bool) -> Result<(), ImageError> {
        match self.manifest.expires {
            Some(at) if !allow_expired && self.manifest.expired_at(unix_now()) => Err(ImageError::Expired {
                source_name: self.source.name().to_string(),
                name: self.manifest.name.clone(),
                version: self.manifest.version,
                at: format_time(at),
            }),
            _ => Ok(()),
        }
    }

    /// Accept manifest bytes (however obtained) after checking signature and structure.
    pub fn from_manifest_bytes(source: Source, bytes: Bytes, trust: &TrustedKeys) -> Result<Image, ImageError> {
        let source_name = source.name().to_string();
        let env = wire::open_envelope(&bytes)
            .map_err(|error| ImageError::Manifest { source_name: source_name.clone(), error })?;
        let signer = trust
            .verify(&env)
            .map_err(|error| ImageError::Signature { source_name: source_name.clone(), error })?
            .clone();
        let manifest = wire::decode(&env).map_err(|error| ImageError::Manifest { source_name, error })?;
        Ok(Image { source, manifest: Arc::new(manifest), manifest_bytes: bytes, signer })
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Fetch the image's compression dictionaries (format 4), check each against the signed
    /// object table and make them known to the block decoder. Before any block is decoded.
    pub async fn load_dictionaries(&self) -> Result<(), ImageError> {
        for &index in &self.manifest.dictionaries {
            let key = self.object_key(index);
            let bytes = self.source.get(&key, incfs_format::manifest::MAX_DICTIONARY_SIZE).await?;
            incfs_format::codec::accept_dictionary(&self.manifest.objects[index as usize], &bytes)
                .map_err(|error| ImageError::Dictionary { source_name: self.source.name().to_string(), key, error })?;
        }
        Ok(())
    }

    /// The signed manifest exactly as fetched.
    pub fn manifest_bytes(&self) -> &Bytes {
        &self.manifest_bytes
    }

    pub fn signer(&self) -> &PublicKey {
        &self.signer
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Repository key of object `index` (which must be in the manifest's table).
    pub fn object_key(&self, index: u32) -> String {
        layout::object(&self.manifest.objects[index as usize].digest)
    }

    /// Bytes `range` of object `object`: from `held` if it holds them, else from the source.
    async fn object_range(&self, held: Option<&Held>, object: u32, range: Range<u64>) -> Result<Bytes, SourceError> {
        match held.and_then(|h| h.get(object, &range)) {
            Some(b) => Ok(b),
            None => self.source.get_range(&self.object_key(object), range).await,
        }
    }

    /// Fetch and check a file's metadata region.
    pub async fn file_meta(&self, file: &FileData) -> Result<FileMeta, MetaError> {
        self.file_meta_in(file, None).await
    }

    /// [`Image::file_meta`], taking the region from `held` when it lies there.
    pub async fn file_meta_in(&self, file: &FileData, held: Option<&Held>) -> Result<FileMeta, MetaError> {
        let Some(meta) = file.meta else {
            return Ok(FileMeta { tree: MerkleTree::from_leaves(0, Vec::new()), records: Vec::new() });
        };
        // validate() guaranteed the region lies inside the object, so this cannot overflow.
        let len = meta.stored_len(file.size).unwrap();
        let bytes = self.object_range(held, meta.object, meta.offset..meta.offset + len).await?;
        let (tree, records) = decode_region(file.size, &meta, &bytes, &file.root_hash)?;
        for (i, r) in records.iter().enumerate().filter(|(_, r)| r.codec != Codec::Zero) {
            let bad = |reason: String| MetaError::Record { block: i as u64, reason };
            let obj =
                self.manifest.objects.get(r.object as usize).ok_or_else(|| bad("names a missing object".into()))?;
            if r.range().end > obj.size {
                return Err(bad(format!("bytes {:?} lie outside object {}", r.range(), r.object)));
            }
        }
        Ok(FileMeta { tree, records })
    }

    /// Read blocks `blocks` of a file, verified. Adjacent stored blocks are fetched with one
    /// ranged GET; several GETs run at once. Returns one outcome per block, in order; a failed
    /// block never carries data.
    pub async fn read_blocks(
        &self,
        meta: &FileMeta,
        blocks: Range<u64>,
    ) -> Vec<Result<Box<[u8; BLOCK_SIZE]>, BlockFault>> {
        self.read_blocks_in(meta, blocks, None).await
    }

    /// [`Image::read_blocks`], taking stored bytes from `held` where they lie there.
    pub async fn read_blocks_in(
        &self,
        meta: &FileMeta,
        blocks: Range<u64>,
        held: Option<&Held>,
    ) -> Vec<Result<Box<[u8; BLOCK_SIZE]>, BlockFault>> {
        let runs = coalesce(&meta.records, blocks);
        let results: Vec<Vec<_>> =
            stream::iter(runs).map(|run| self.read_run(meta, run, held)).buffered(READ_CONCURRENCY).collect().await;
        results.into_iter().flatten().collect()
    }

    async fn read_run(
        &self,
        meta: &FileMeta,
        run: Range<u64>,
        held: Option<&Held>,
    ) -> Vec<Result<Box<[u8; BLOCK_SIZE]>, BlockFault>> {
        let records = &meta.records[run.start as usize..run.end as usize];
        let first = records[0];
        let fetched: Result<Option<Bytes>, BlockFault> = if first.codec == Codec::Zero {
            Ok(None)
        } else {
            let end = records.last().unwrap().range().end;
            self.object_range(held, first.object, first.offset..end)
                .await
                .map(Some)
                .map_err(|e| BlockFault::Fetch(e.to_string()))
        };
        let leaves = &meta.tree.leaves()[run.start as usize..run.end as usize];
        let fetched = match fetched {
            Err(e) => return records.iter().map(|_| Err(e.clone())).collect(),
            Ok(f) => f,
        };
        // Decoding and hashing are the CPU of verify and extract: a run of some size goes to the
        // blocking pool, so that runs of several files are checked on every core, not on the
        // task polling them all.
        if records.len() < OFFLOAD_BLOCKS {
            return check_run(records, leaves, first.offset, fetched.as_deref());
        }
        let (records, leaves) = (records.to_vec(), leaves.to_vec());
        let n = records.len();
        tokio::task::spawn_blocking(move || check_run(&records, &leaves, first.offset, fetched.as_deref()))
            .await
            .unwrap_or_else(|e| {
                (0..n).map(|_| Err(BlockFault::Decode(format!("checking blocks failed: {e}")))).collect()
            })
    }
}

/// Runs of at least this many blocks are checked on the blocking pool.
const OFFLOAD_BLOCKS: usize = 8;

/// Check blocks stored at `records` (their stored bytes lie in `fetched`, which starts at
/// object offset `base`; `None` for zero blocks) against `leaves`.
fn check_run(
    records: &[BlockRecord],
    leaves: &[Hash],
    base: u64,
    fetched: Option<&[u8]>,
) -> Vec<Result<Box<[u8; BLOCK_SIZE]>, BlockFault>> {
    // Every block decoded first, then hashed together (several SHA-256 streams at once).
    let mut decoded: Vec<Result<Box<[u8; BLOCK_SIZE]>, BlockFault>> = records
        .iter()
        .map(|r| {
            let stored = fetched.map_or(&[][..], |b| &b[(r.offset - base) as usize..(r.range().end - base) as usize]);
            let mut block = Box::new([0u8; BLOCK_SIZE]);
            decode_block(r.codec, stored, &mut block).map_err(|e| BlockFault::Decode(e.to_string()))?;
            Ok(block)
        })
        .collect();
    let blocks: Vec<&[u8]> = decoded.iter().filter_map(|d| d.as_ref().ok()).map(|b| &b[..]).collect();
    let mut hashes = vec![[0u8; incfs_verity::HASH_SIZE]; blocks.len()];
    incfs_verity::hash_data_blocks(&blocks, &mut hashes);
    let mut hashes = hashes.into_iter();
    for (d, leaf) in decoded.iter_mut().zip(leaves) {
        if d.is_ok() && hashes.next().as_ref() != Some(leaf) {
            *d = Err(BlockFault::Mismatch);
        }
    }
    decoded
}

/// Decode stored bytes and check them against their leaf hash.
pub fn verify_block(r: &BlockRecord, stored: &[u8], leaf: &Hash) -> Result<Box<[u8; BLOCK_SIZE]>, BlockFault> {
    let mut block = Box::new([0u8; BLOCK_SIZE]);
    decode_block(r.codec, stored, &mut block).map_err(|e| BlockFault::Decode(e.to_string()))?;
    if &hash_data_block(&block[..]) != leaf {
        return Err(BlockFault::Mismatch);
    }
    Ok(block)
}

/// Split `blocks` into runs that one GET can serve: zero blocks alone (nothing to fetch), or
/// stored blocks lying back to back in one object, up to [`MAX_RUN_BYTES`].
pub fn coalesce(records: &[BlockRecord], blocks: Range<u64>) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for i in blocks {
        let r = &records[i as usize];
        if let Some(last) = runs.last_mut() {
            let prev = &records[(last.end - 1) as usize];
            let start = &records[last.start as usize];
            let joins = prev.joins_run(r, start, MAX_RUN_BYTES);
            let both_zero = r.codec == Codec::Zero && prev.codec == Codec::Zero;
            if joins || both_zero {
                last.end = i + 1;
                continue;
            }
        }
        runs.push(i..i + 1);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(object: u32, offset: u64, len: u16) -> BlockRecord {
        BlockRecord { object, codec: Codec::Lz4, len, offset }
    }

    #[test]
    fn coalesces_adjacent_blocks_only() {
        let records = vec![
            rec(0, 0, 100),
            rec(0, 100, 50),
            BlockRecord::ZERO,
            BlockRecord::ZERO,
            rec(0, 150, 10),
            rec(1, 160, 10),
            rec(1, 500, 10),
        ];
        assert_eq!(coalesce(&records, 0..7), vec![0..2, 2..4, 4..5, 5..6, 6..7]);
        assert_eq!(coalesce(&records, 1..3), vec![1..2, 2..3]);
    }

    #[test]
    fn runs_are_capped() {
        let records: Vec<_> = (0..5000).map(|i| rec(0, i * 4096, 4096)).collect();
        let runs = coalesce(&records, 0..5000);
        assert_eq!(runs.len(), 3);
        assert!(runs.iter().all(|r| (r.end - r.start) * 4096 <= MAX_RUN_BYTES));
    }
}
