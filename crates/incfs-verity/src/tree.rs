//! Hashing blocks, building whole trees and checking hash blocks.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::{Geometry, Hash, BLOCK_SIZE, HASHES_PER_BLOCK, HASH_SIZE, LOG_BLOCK_SIZE};

static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// Below this many bytes, hashing on one thread beats the cost of spreading the work.
const PARALLEL_THRESHOLD: usize = 1 << 20;

/// Hash of one data block: SHA-256 of `data` zero-padded to 4096 bytes.
///
/// `data` may be shorter than a block (the last block of a file, or a block stored with its
/// trailing zeros trimmed): both pad to the same 4096 bytes and so give the same hash.
pub fn hash_data_block(data: &[u8]) -> Hash {
    assert!(data.len() <= BLOCK_SIZE, "a data block is at most 4096 bytes");
    let mut h = Sha256::new();
    h.update(data);
    h.update(&ZEROS[..BLOCK_SIZE - data.len()]);
    h.finalize().into()
}

/// Hash of one hash block holding `hashes` (at most 128), zero-padded to 4096 bytes.
pub fn hash_hash_block(hashes: &[Hash]) -> Hash {
    assert!(hashes.len() <= HASHES_PER_BLOCK, "a hash block holds at most 128 hashes");
    let mut h = Sha256::new();
    for x in hashes {
        h.update(x);
    }
    h.update(&ZEROS[..BLOCK_SIZE - hashes.len() * HASH_SIZE]);
    h.finalize().into()
}

/// Whether [`tape_sha256`] hashes as [`sha2`] does on this machine: checked once, on blocks
/// that exercise every lane, before any batch is trusted to it. A CPU or backend that disagrees
/// costs speed (sha2 hashes everything), never a wrong verdict.
fn batch_agrees() -> bool {
    static AGREES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AGREES.get_or_init(|| {
        let blocks: Vec<[u8; BLOCK_SIZE]> = (0..9u8)
            .map(|i| {
                std::array::from_fn(|j| (j as u8).wrapping_mul(31).wrapping_add(i.wrapping_mul(97)) ^ (j >> 8) as u8)
            })
            .collect();
        let msgs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
        let mut out = vec![[0u8; HASH_SIZE]; msgs.len()];
        tape_sha256::hash_many(&msgs, &mut out);
        msgs.iter().zip(&out).all(|(m, h)| &hash_data_block(m) == h)
    })
}

/// Hashes of data blocks `blocks` (each at most 4096 bytes, zero-padded like
/// [`hash_data_block`]) into `out`, one per block. Several whole blocks are hashed at once
/// (four SHA-256 streams interleaved on the SHA extensions: about 1.8x the rate of one at a
/// time), so callers with a run of blocks should hash them here rather than one by one.
pub fn hash_data_blocks(blocks: &[&[u8]], out: &mut [Hash]) {
    assert_eq!(blocks.len(), out.len(), "one hash per block");
    assert!(blocks.iter().all(|b| b.len() <= BLOCK_SIZE), "a data block is at most 4096 bytes");
    if blocks.len() < 2 || !batch_agrees() {
        for (b, o) in blocks.iter().zip(out.iter_mut()) {
            *o = hash_data_block(b);
        }
        return;
    }
    if blocks.iter().all(|b| b.len() == BLOCK_SIZE) {
        return tape_sha256::hash_many(blocks, out);
    }
    // Short blocks (a file's last, or stored with trailing zeros trimmed) pad one by one.
    let whole: Vec<usize> = (0..blocks.len()).filter(|&i| blocks[i].len() == BLOCK_SIZE).collect();
    let msgs: Vec<&[u8]> = whole.iter().map(|&i| blocks[i]).collect();
    let mut hashes = vec![[0u8; HASH_SIZE]; msgs.len()];
    tape_sha256::hash_many(&msgs, &mut hashes);
    for (&i, h) in whole.iter().zip(hashes) {
        out[i] = h;
    }
    for (b, o) in blocks.iter().zip(out.iter_mut()).filter(|(b, _)| b.len() < BLOCK_SIZE) {
        *o = hash_data_block(b);
    }
}

/// Hashes of the data blocks of `data` (4096 bytes each, the last zero-padded), in batches.
fn hash_data_serial(data: &[u8]) -> Vec<Hash> {
    let blocks: Vec<&[u8]> = data.chunks(BLOCK_SIZE).collect();
    let mut out = vec![[0u8; HASH_SIZE]; blocks.len()];
    hash_data_blocks(&blocks, &mut out);
    out
}

/// Hashes of every 4 KiB block of `data` (level 0 of its tree), in parallel for large inputs.
pub fn hash_data(data: &[u8]) -> Vec<Hash> {
    if data.len() < PARALLEL_THRESHOLD {
        hash_data_serial(data)
    } else {
        // 64 blocks per task: batches of four, and few enough tasks to spread cheaply.
        data.par_chunks(64 * BLOCK_SIZE).flat_map_iter(hash_data_serial).collect()
    }
}

/// Hashes of the hash blocks of one tree level (128 hashes each, the last zero-padded).
fn hash_level_serial(level: &[Hash]) -> Vec<Hash> {
    let blocks: Vec<&[u8]> = level.chunks(HASHES_PER_BLOCK).map(|c| c.as_flattened()).collect();
    let mut out = vec![[0u8; HASH_SIZE]; blocks.len()];
    hash_data_blocks(&blocks, &mut out);
    out
}

/// Check that the hash block holding `hashes` hashes to `expected` (its entry in the parent
/// level, or the root hash for the top level).
pub fn check_hash_block(hashes: &[Hash], expected: &Hash) -> bool {
    hashes.len() <= HASHES_PER_BLOCK && &hash_hash_block(hashes) == expected
}

/// The fs-verity file digest: SHA-256 of the 256-byte `fsverity_descriptor` for a file of
/// `size` bytes whose tree has root hash `root` (SHA-256, 4096-byte blocks, no salt).
pub fn file_digest(root: &Hash, size: u64) -> Hash {
    let mut desc = [0u8; 256];
    desc[0] = 1; // version
    desc[1] = 1; // hash algorithm: FS_VERITY_HASH_ALG_SHA256
    desc[2] = LOG_BLOCK_SIZE;
    desc[3] = 0; // salt size
                 // 4..8 reserved
    desc[8..16].copy_from_slice(&size.to_le_bytes());
    desc[16..16 + HASH_SIZE].copy_from_slice(root);
    // root_hash is 64 bytes (zero-padded), then salt[32] and reserved[144]: all zero.
    Sha256::digest(desc).into()
}

/// What an fs-verity built-in signature signs (`struct fsverity_formatted_digest`): the
/// ASCII magic `FSVerity`, le16 hash algorithm (1, SHA-256), le16 digest size (32), the digest.
pub fn formatted_digest(digest: &Hash) -> [u8; 12 + HASH_SIZE] {
    let mut m = [0u8; 12 + HASH_SIZE];
    m[..8].copy_from_slice(b"FSVerity");
    m[8..10].copy_from_slice(&1u16.to_le_bytes());
    m[10..12].copy_from_slice(&(HASH_SIZE as u16).to_le_bytes());
    m[12..].copy_from_slice(digest);
    m
}

/// Digest in the form `fsverity digest` prints: `sha256:<64 hex digits>`.
pub fn format_digest(digest: &Hash) -> String {
    format!("sha256:{}", hex::encode(digest))
}

/// Why a stored tree was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("tree is {actual} bytes, a file of {size} bytes needs {expected}")]
    Length { size: u64, expected: u64, actual: u64 },
    #[error("level {level} hash block {index} does not match its parent")]
    HashBlock { level: usize, index: u64 },
    #[error("top hash block does not match the root hash")]
    Root,
}

/// A whole Merkle tree, every level in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    geometry: Geometry,
    /// Hashes per level, level 0 (one hash per data block) first. A one-block file has just
    /// level 0, holding the root hash; it is not part of the stored tree.
    levels: Vec<Vec<Hash>>,
    root: Hash,
}

fn root_of(levels: &[Vec<Hash>]) -> Hash {
    match levels.last() {
        None => [0; HASH_SIZE],
        Some(top) if levels.len() == 1 && top.len() == 1 => top[0],
        Some(top) => hash_hash_block(top),
    }
}

impl MerkleTree {
    /// Build the tree of a file of `size` bytes from its data block hashes.
    pub fn from_leaves(size: u64, leaves: Vec<Hash>) -> Self {
        let geometry = Geometry::new(size);
        assert_eq!(leaves.len() as u64, geometry.data_blocks(), "one leaf per data block");
        let mut levels = Vec::with_capacity(geometry.levels().len());
        if !leaves.is_empty() {
            levels.push(leaves);
            while levels.last().unwrap().len() > HASHES_PER_BLOCK {
                let below = levels.last().unwrap();
                // A hash block is its hashes back to back, zero-padded: hashed as a data block.
                let above: Vec<Hash> = if below.len() >= PARALLEL_THRESHOLD / HASH_SIZE {
                    below.par_chunks(64 * HASHES_PER_BLOCK).flat_map_iter(hash_level_serial).collect()
                } else {
                    hash_level_serial(below)
                };
                levels.push(above);
            }
        }
        let root = root_of(&levels);
        MerkleTree { geometry, levels, root }
    }

    /// Build the tree of `data` (the whole file).
    pub fn from_data(data: &[u8]) -> Self {
        Self::from_leaves(data.len() as u64, hash_data(data))
    }

    /// Parse a compact tree (see [`Geometry::compact_offset`]) of a file of `size` bytes and
    /// check every hash block in it against `root`.
    pub fn from_compact(size: u64, compact: &[u8], root: &Hash) -> Result<Self, TreeError> {
        let geometry = Geometry::new(size);
        if compact.len() as u64 != geometry.compact_len() {
            return Err(TreeError::Length { size, expected: geometry.compact_len(), actual: compact.len() as u64 });
        }
        if geometry.data_blocks() == 1 {
            // No stored tree: the root hash is the data block's own hash.
            return Ok(MerkleTree { geometry, levels: vec![vec![*root]], root: *root });
        }
        let levels: Vec<Vec<Hash>> = (0..geometry.levels().len())
            .map(|level| {
                let start = geometry.compact_offset(level) as usize;
                let n = geometry.levels()[level] as usize;
                compact[start..start + n * HASH_SIZE].chunks_exact(HASH_SIZE).map(|c| c.try_into().unwrap()).collect()
            })
            .collect();
        // Top down, the direction trust flows: a damaged level is named, not its children.
        if &root_of(&levels) != root {
            return Err(TreeError::Root);
        }
        for level in (0..levels.len().saturating_sub(1)).rev() {
            let parents = &levels[level + 1];
            for (index, block) in levels[level].chunks(HASHES_PER_BLOCK).enumerate() {
                if !check_hash_block(block, &parents[index]) {
                    return Err(TreeError::HashBlock { level, index: index as u64 });
                }
            }
        }
        Ok(MerkleTree { geometry, levels, root: *root })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn root(&self) -> &Hash {
        &self.root
    }

    /// The fs-verity digest of the file.
    pub fn digest(&self) -> Hash {
        file_digest(&self.root, self.geometry.size())
    }

    /// Hashes of the data blocks (level 0).
    pub fn leaves(&self) -> &[Hash] {
        self.levels.first().map_or(&[], |l| l.as_slice())
    }

    fn stored_levels(&self) -> &[Vec<Hash>] {
        if self.geometry.levels().is_empty() {
            &[]
        } else {
            &self.levels
        }
    }

    /// The tree in compact form: levels top first, hashes back to back, no padding.
    pub fn to_compact(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.geometry.compact_len() as usize);
        for level in self.stored_levels().iter().rev() {
            for h in level {
                out.extend_from_slice(h);
            }
        }
        out
    }

    /// The tree in the padded fs-verity layout (top level first, 4096-byte hash blocks), as
    /// `FS_IOC_READ_VERITY_METADATA` would return it.
    pub fn to_fsverity_layout(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for level in self.stored_levels().iter().rev() {
            for block in level.chunks(HASHES_PER_BLOCK) {
                for h in block {
                    out.extend_from_slice(h);
                }
                out.resize(out.len().next_multiple_of(BLOCK_SIZE), 0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> Hash {
        Sha256::digest(data).into()
    }

    #[test]
    fn empty_file_has_zero_root() {
        let t = MerkleTree::from_data(&[]);
        assert_eq!(t.root(), &[0; 32]);
        assert!(t.to_compact().is_empty());
    }

    #[test]
    fn batches_hash_as_one_at_a_time() {
        assert!(batch_agrees(), "tape-sha256 disagrees with sha2 on this machine");
        let data: Vec<u8> = (0..40 * BLOCK_SIZE + 123).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
        // Every batch size up to a few lanes' worth, whole and short blocks mixed.
        for n in 0..=41 {
            let mut blocks: Vec<&[u8]> = data.chunks(BLOCK_SIZE).take(n).collect();
            if n > 3 {
                blocks[2] = &data[5..900];
                blocks[n - 1] = &[];
            }
            let mut out = vec![[0u8; HASH_SIZE]; blocks.len()];
            hash_data_blocks(&blocks, &mut out);
            let one_by_one: Vec<Hash> = blocks.iter().map(|b| hash_data_block(b)).collect();
            assert_eq!(out, one_by_one, "batch of {n}");
        }
        let big: Vec<u8> = data.iter().cycle().take(3 << 20).copied().collect();
        let serial: Vec<Hash> = big.chunks(BLOCK_SIZE).map(hash_data_block).collect();
        assert_eq!(hash_data(&big), serial);
        let level: Vec<Hash> = serial.iter().cycle().take(70_000).copied().collect();
        let hashed: Vec<Hash> = level.chunks(HASHES_PER_BLOCK).map(hash_hash_block).collect();
        assert_eq!(hash_level_serial(&level), hashed);
    }

    #[test]
    fn short_block_pads_with_zeros() {
        let mut padded = vec![0u8; BLOCK_SIZE];
        padded[..3].copy_from_slice(b"abc");
        assert_eq!(hash_data_block(b"abc"), sha(&padded));
        assert_eq!(hash_data_block(b"abc"), hash_data_block(&padded));
    }

    #[test]
    fn one_block_root_is_the_block_hash() {
        let t = MerkleTree::from_data(b"hello");
        assert_eq!(t.root(), &hash_data_block(b"hello"));
        assert!(t.to_compact().is_empty() && t.to_fsverity_layout().is_empty());
        assert_eq!(MerkleTree::from_compact(5, &[], t.root()).unwrap(), t);
    }

    #[test]
    fn two_block_root_is_hash_of_padded_hash_block() {
        let data = vec![7u8; BLOCK_SIZE + 1];
        let t = MerkleTree::from_data(&data);
        let mut block = vec![0u8; BLOCK_SIZE];
        block[..32].copy_from_slice(&hash_data_block(&data[..BLOCK_SIZE]));
        block[32..64].copy_from_slice(&hash_data_block(&data[BLOCK_SIZE..]));
        assert_eq!(t.root(), &sha(&block));
        assert_eq!(t.to_fsverity_layout(), block);
    }

    #[test]
    fn compact_round_trip_and_tamper_detection() {
        let data: Vec<u8> = (0..(200 * BLOCK_SIZE + 17)).map(|i| (i * 7 % 251) as u8).collect();
        let t = MerkleTree::from_data(&data);
        assert_eq!(t.geometry().levels(), &[201, 2]);
        let compact = t.to_compact();
        let back = MerkleTree::from_compact(data.len() as u64, &compact, t.root()).unwrap();
        assert_eq!(back, t);

        let mut bad = compact.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            MerkleTree::from_compact(data.len() as u64, &bad, t.root()),
            Err(TreeError::HashBlock { level: 0, index: 1 })
        );
        bad = compact.clone();
        bad[0] ^= 1;
        assert_eq!(MerkleTree::from_compact(data.len() as u64, &bad, t.root()), Err(TreeError::Root));
        assert!(matches!(
            MerkleTree::from_compact(data.len() as u64, &compact[1..], t.root()),
            Err(TreeError::Length { .. })
        ));
    }

    #[test]
    fn parallel_and_serial_hashing_agree() {
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 253) as u8).collect();
        let serial: Vec<Hash> = data.chunks(BLOCK_SIZE).map(hash_data_block).collect();
        assert_eq!(hash_data(&data), serial);
    }

    #[test]
    fn digest_formats_like_fsverity() {
        let d = MerkleTree::from_data(&[]).digest();
        let s = format_digest(&d);
        assert!(s.starts_with("sha256:") && s.len() == 7 + 64);
    }
}
