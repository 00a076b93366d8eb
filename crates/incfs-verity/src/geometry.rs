//! The shape of a file's Merkle tree, derived from the file size alone.

use crate::{block_count, HASHES_PER_BLOCK, HASH_SIZE};

/// Levels of the largest tree: ceil(52 / 7) for 2^52 blocks of 4 KiB in a u64 size.
const MAX_LEVELS: usize = 8;

/// Shape of the Merkle tree of a file of a given size.
///
/// `levels()[0]` is the number of data blocks (one hash each); `levels()[i + 1]` is the number of
/// hash blocks in level `i`. The last entry is the top level, whose hashes fit in one hash block.
/// A file of at most one block has no levels at all: as in fs-verity, the root hash of a
/// one-block file is the hash of its data block, and that of an empty file is all zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    blocks: u64,
    /// Inline, not a `Vec`: a read path makes a geometry per block, and a u64 size has at most
    /// 8 levels (2^52 blocks, 7 bits of fan-out per level).
    levels: [u64; MAX_LEVELS],
    depth: usize,
}

impl Geometry {
    pub fn new(size: u64) -> Self {
        let blocks = block_count(size);
        let mut levels = [0; MAX_LEVELS];
        let mut depth = 0;
        let mut n = blocks;
        if n > 1 {
            levels[0] = n;
            depth = 1;
            while n > HASHES_PER_BLOCK as u64 {
                n = n.div_ceil(HASHES_PER_BLOCK as u64);
                levels[depth] = n;
                depth += 1;
            }
        }
        Geometry { size, blocks, levels, depth }
    }

    /// File size the tree covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of data blocks.
    pub fn data_blocks(&self) -> u64 {
        self.blocks
    }

    /// Hashes per stored level, level 0 (data block hashes) first; empty for files of at most
    /// one block.
    pub fn levels(&self) -> &[u64] {
        &self.levels[..self.depth]
    }

    /// Number of hash blocks that make up `level` in the padded (fs-verity) layout.
    pub fn hash_blocks_in_level(&self, level: usize) -> u64 {
        self.levels()[level].div_ceil(HASHES_PER_BLOCK as u64)
    }

    /// Byte offset of `level`'s first hash in the compact tree.
    ///
    /// The compact tree stores the levels from the top level down to level 0, each as its hashes
    /// back to back with no padding, so it is `32 * sum(levels)` bytes long.
    pub fn compact_offset(&self, level: usize) -> u64 {
        self.levels()[level + 1..].iter().sum::<u64>() * HASH_SIZE as u64
    }

    /// Length in bytes of the compact tree.
    pub fn compact_len(&self) -> u64 {
        self.levels().iter().sum::<u64>() * HASH_SIZE as u64
    }

    /// Byte range, within the compact tree, of hash block `index` of `level`: the hashes that
    /// the padded block would hold, without the padding.
    pub fn hash_block_range(&self, level: usize, index: u64) -> std::ops::Range<u64> {
        let per = HASHES_PER_BLOCK as u64;
        let first = index * per;
        let last = (first + per).min(self.levels()[level]);
        let base = self.compact_offset(level);
        base + first * HASH_SIZE as u64..base + last * HASH_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_for_boundary_sizes() {
        assert_eq!(Geometry::new(0).levels(), &[] as &[u64]);
        assert_eq!(Geometry::new(1).levels(), &[] as &[u64]);
        assert_eq!(Geometry::new(4096).levels(), &[] as &[u64]);
        assert_eq!(Geometry::new(4096).data_blocks(), 1);
        assert_eq!(Geometry::new(4097).levels(), &[2]);
        assert_eq!(Geometry::new(128 * 4096).levels(), &[128]);
        assert_eq!(Geometry::new(128 * 4096 + 1).levels(), &[129, 2]);
        assert_eq!(Geometry::new(16384 * 4096).levels(), &[16384, 128]);
        assert_eq!(Geometry::new(16384 * 4096 + 1).levels(), &[16385, 129, 2]);
        // The largest size there is fits.
        assert_eq!(Geometry::new(u64::MAX).levels().len(), MAX_LEVELS);
    }

    #[test]
    fn compact_layout_is_top_down() {
        let g = Geometry::new(16385 * 4096);
        assert_eq!(g.compact_offset(2), 0);
        assert_eq!(g.compact_offset(1), 2 * 32);
        assert_eq!(g.compact_offset(0), (2 + 129) * 32);
        assert_eq!(g.compact_len(), (2 + 129 + 16385) * 32);
        assert_eq!(g.hash_block_range(0, 128), g.compact_offset(0) + 128 * 128 * 32..g.compact_len());
        assert_eq!(g.hash_blocks_in_level(0), 129);
    }
}
