//! Per-file metadata stored inside objects: the file's compact Merkle tree followed by its block
//! map, one [`BlockRecord`] per data block saying where that block's bytes are stored.
//!
//! The block map is *not* trusted: a record only says where to look. Every block read through it
//! is hashed and compared with the file's Merkle tree, whose root is in the signed manifest, so a
//! wrong record can cost a failed read but never a wrong byte.

use incfs_verity::{Geometry, BLOCK_SIZE};

use crate::codec::Codec;

/// Size of one encoded [`BlockRecord`].
pub const BLOCK_RECORD_SIZE: usize = 16;

/// Where one data block is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockRecord {
    /// Index into the manifest's object table (0 for [`Codec::Zero`]).
    pub object: u32,
    pub codec: Codec,
    /// Stored bytes (0 for [`Codec::Zero`], else 1..=4096).
    pub len: u16,
    /// Byte offset of the stored bytes in the object (0 for [`Codec::Zero`]).
    pub offset: u64,
}

/// Why a block record was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("unknown codec {0}")]
    Codec(u8),
    #[error("reserved byte is {0}, must be 0")]
    Reserved(u8),
    #[error("stored length {0} is out of range for its codec")]
    Length(u16),
    #[error("a zero block must have object 0 and offset 0")]
    ZeroLocation,
    #[error("stored bytes at offset {0} run past the largest possible object")]
    Offset(u64),
}

impl BlockRecord {
    pub const ZERO: BlockRecord = BlockRecord { object: 0, codec: Codec::Zero, len: 0, offset: 0 };

    /// Encode as 16 little-endian bytes: object u32, codec u8, reserved u8, len u16, offset u64.
    pub fn encode(&self) -> [u8; BLOCK_RECORD_SIZE] {
        let mut b = [0u8; BLOCK_RECORD_SIZE];
        b[0..4].copy_from_slice(&self.object.to_le_bytes());
        b[4] = self.codec as u8;
        b[6..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; BLOCK_RECORD_SIZE]) -> Result<Self, RecordError> {
        let codec = Codec::from_u8(b[4]).ok_or(RecordError::Codec(b[4]))?;
        if b[5] != 0 {
            return Err(RecordError::Reserved(b[5]));
        }
        let r = BlockRecord {
            object: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            codec,
            len: u16::from_le_bytes(b[6..8].try_into().unwrap()),
            offset: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        };
        match codec {
            Codec::Zero if r.len != 0 => Err(RecordError::Length(r.len)),
            Codec::Zero if r.object != 0 || r.offset != 0 => Err(RecordError::ZeroLocation),
            Codec::Raw | Codec::Lz4 | Codec::Zstd | Codec::ZstdDict if r.len == 0 || r.len as usize > BLOCK_SIZE => {
                Err(RecordError::Length(r.len))
            }
            // So that `range()` cannot overflow (found by fuzzing).
            _ if r.offset.checked_add(r.len as u64).is_none() => Err(RecordError::Offset(r.offset)),
            _ => Ok(r),
        }
    }

    /// Whether `next` can join a ranged GET that starts at `first` and last took `self`: both
    /// stored, in the same object, back to back, and the run no longer than `max_bytes`.
    pub fn joins_run(&self, next: &BlockRecord, first: &BlockRecord, max_bytes: u64) -> bool {
        self.codec != Codec::Zero
            && next.codec != Codec::Zero
            && self.object == next.object
            && self.range().end == next.offset
            && next.range().end - first.offset <= max_bytes
    }

    /// Byte range of the stored bytes within their object.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len as u64
    }
}

/// Where the parts of a file's metadata region lie, relative to its start.
///
/// ```text
/// [ compact Merkle tree: 32 * sum(levels) bytes ][ block map: 16 * blocks bytes ]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMetaLayout {
    pub geometry: Geometry,
}

impl FileMetaLayout {
    pub fn new(size: u64) -> Self {
        FileMetaLayout { geometry: Geometry::new(size) }
    }

    /// Offset of the block map (right after the tree).
    pub fn map_offset(&self) -> u64 {
        self.geometry.compact_len()
    }

    /// Offset of block `index`'s record.
    pub fn record_offset(&self, index: u64) -> u64 {
        self.map_offset() + index * BLOCK_RECORD_SIZE as u64
    }

    /// Total length of the metadata region, or `None` if it would not fit in a u64.
    pub fn len(&self) -> Option<u64> {
        self.geometry.data_blocks().checked_mul(BLOCK_RECORD_SIZE as u64)?.checked_add(self.geometry.compact_len())
    }

    pub fn is_empty(&self) -> bool {
        self.geometry.data_blocks() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_nonsense() {
        let r = BlockRecord { object: 7, codec: Codec::Lz4, len: 1234, offset: 1 << 40 };
        assert_eq!(BlockRecord::decode(&r.encode()), Ok(r));
        assert_eq!(BlockRecord::decode(&BlockRecord::ZERO.encode()), Ok(BlockRecord::ZERO));
        let mut b = r.encode();
        b[4] = 9;
        assert_eq!(BlockRecord::decode(&b), Err(RecordError::Codec(9)));
        let mut b = r.encode();
        b[5] = 1;
        assert_eq!(BlockRecord::decode(&b), Err(RecordError::Reserved(1)));
        let big = BlockRecord { len: 4097, ..r };
        assert_eq!(BlockRecord::decode(&big.encode()), Err(RecordError::Length(4097)));
        let empty_raw = BlockRecord { codec: Codec::Raw, len: 0, ..r };
        assert_eq!(BlockRecord::decode(&empty_raw.encode()), Err(RecordError::Length(0)));
        let zero_somewhere = BlockRecord { offset: 5, ..BlockRecord::ZERO };
        assert_eq!(BlockRecord::decode(&zero_somewhere.encode()), Err(RecordError::ZeroLocation));
        let wrapping = BlockRecord { object: 0, codec: Codec::Raw, len: 100, offset: u64::MAX - 10 };
        assert_eq!(BlockRecord::decode(&wrapping.encode()), Err(RecordError::Offset(u64::MAX - 10)));
    }

    #[test]
    fn meta_layout() {
        let l = FileMetaLayout::new(129 * 4096);
        assert_eq!(l.map_offset(), (129 + 2) * 32);
        assert_eq!(l.len(), Some((129 + 2) * 32 + 129 * 16));
        assert_eq!(l.record_offset(1), (129 + 2) * 32 + 16);
        assert!(FileMetaLayout::new(0).is_empty());
    }
}
