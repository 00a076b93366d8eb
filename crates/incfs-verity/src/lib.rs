//! fs-verity compatible Merkle trees: SHA-256, 4096-byte data and hash blocks, no salt.
//!
//! This crate is pure computation. It knows the shape of a file's tree ([`Geometry`]), how to
//! hash data and hash blocks, how to build a whole tree ([`MerkleTree`]), how to turn a root hash
//! into the fs-verity file digest ([`file_digest`]), and how to check one hash block against its
//! parent ([`check_hash_block`]). It never reads a file or the network, so it can be tested and
//! fuzzed without either.
//!
//! The layout follows the kernel's `Documentation/filesystems/fsverity.rst`: level 0 holds the
//! hash of every data block (the last block zero-padded to 4096 bytes); each level above holds the
//! hash of every 4096-byte hash block of the level below (zero-padded); the level with a single
//! hash block is the top, and the root hash is the hash of that block. An empty file has an
//! all-zero root hash. incfs stores trees in a *compact* form (no padding, see
//! [`Geometry::compact_offset`]); the padded hash blocks are reconstructed on demand.

mod geometry;
mod tree;

pub use geometry::Geometry;
pub use tree::{
    check_hash_block, file_digest, format_digest, formatted_digest, hash_data, hash_data_block, hash_data_blocks,
    hash_hash_block, MerkleTree, TreeError,
};

/// Size of a data block and of a hash block, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// log2 of [`BLOCK_SIZE`], as recorded in the fs-verity descriptor.
pub const LOG_BLOCK_SIZE: u8 = 12;
/// Size of one SHA-256 hash.
pub const HASH_SIZE: usize = 32;
/// Hashes that fit in one hash block.
pub const HASHES_PER_BLOCK: usize = BLOCK_SIZE / HASH_SIZE;

/// A SHA-256 hash.
pub type Hash = [u8; HASH_SIZE];

/// Number of 4 KiB data blocks of a file of `size` bytes.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}
