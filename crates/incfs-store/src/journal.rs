//! Journal records: the persisted index of a segment (pure encoding, no I/O).
//!
//! Each segment file `NNNNNNNN.seg` of the block store holds stored bytes back to back (blocks
//! exactly as fetched, metadata pieces) with no framing; its journal `NNNNNNNN.jnl` says what lies
//! where, and which blocks of which file contents are present. A journal is the 8-byte magic
//! [`MAGIC`] followed by records, each `kind u8, payload (fixed size per kind), crc32 u32` where
//! the CRC (IEEE, as zlib's `crc32`) covers kind and payload. Replay stops at the first record
//! that is short, of an unknown kind or fails its CRC: that is where a writer was killed.
//! `docs/cache.md` gives every field.

use incfs_format::{Codec, Hash};

/// First bytes of every journal: "INCFSJ" and the layout version (2).
pub const MAGIC: [u8; 8] = *b"INCFSJ\x00\x02";
/// Bits per presence chunk: one [`Record::PresenceChunk`] covers 16 MiB of a file.
pub const PRESENCE_CHUNK_BITS: u64 = 4096;
pub const PRESENCE_CHUNK_BYTES: usize = (PRESENCE_CHUNK_BITS / 8) as usize;

/// Identity of a file's content: root hash and size. Identical files share presence.
pub type FileKey = [u8; 40];

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A verified block with leaf hash `hash` is stored at `offset` of this journal's segment:
    /// `len` bytes encoded with `codec`.
    Block { hash: Hash, codec: Codec, len: u16, offset: u64 },
    /// Blocks `first..first+count` of content `file` are present.
    Present { file: FileKey, first: u64, count: u32 },
    /// The presence bits of chunk `chunk` of `file` are exactly `bits` (repairs; `fsck`).
    PresenceChunk { file: FileKey, chunk: u64, bits: Box<[u8; PRESENCE_CHUNK_BYTES]> },
    /// Piece `chunk` of the metadata region at `region` of object `object` (unverified bytes)
    /// is stored at `offset` of this journal's segment, `len` bytes.
    Meta { object: Hash, region: u64, chunk: u64, len: u32, offset: u64 },
    /// The block `hash` stored in segment `segment` at `offset` is gone (found damaged).
    DropBlock { hash: Hash, segment: u32, offset: u64 },
    /// The metadata piece is gone (found damaged).
    DropMeta { object: Hash, region: u64, chunk: u64 },
}

const BLOCK: u8 = 1;
const PRESENT: u8 = 2;
const PRESENCE_CHUNK: u8 = 3;
const META: u8 = 4;
const DROP_BLOCK: u8 = 5;
const DROP_META: u8 = 6;

fn payload_len(kind: u8) -> Option<usize> {
    Some(match kind {
        BLOCK => 32 + 1 + 2 + 8,
        PRESENT => 40 + 8 + 4,
        PRESENCE_CHUNK => 40 + 8 + PRESENCE_CHUNK_BYTES,
        META => 32 + 8 + 8 + 4 + 8,
        DROP_BLOCK => 32 + 4 + 8,
        DROP_META => 32 + 8 + 8,
        _ => return None,
    })
}

/// Why replay stopped before the end of a journal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record cut short")]
    Short,
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("checksum mismatch")]
    Checksum,
    #[error("bad field: {0}")]
    Field(&'static str),
}

impl Record {
    /// Append the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        match self {
            Record::Block { hash, codec, len, offset } => {
                out.push(BLOCK);
                out.extend_from_slice(hash);
                out.push(*codec as u8);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Record::Present { file, first, count } => {
                out.push(PRESENT);
                out.extend_from_slice(file);
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Record::PresenceChunk { file, chunk, bits } => {
                out.push(PRESENCE_CHUNK);
                out.extend_from_slice(file);
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&bits[..]);
            }
            Record::Meta { object, region, chunk, len, offset } => {
                out.push(META);
                out.extend_from_slice(object);
                out.extend_from_slice(&region.to_le_bytes());
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Record::DropBlock { hash, segment, offset } => {
                out.push(DROP_BLOCK);
                out.extend_from_slice(hash);
                out.extend_from_slice(&segment.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Record::DropMeta { object, region, chunk } => {
                out.push(DROP_META);
                out.extend_from_slice(object);
                out.extend_from_slice(&region.to_le_bytes());
                out.extend_from_slice(&chunk.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Decode the record at the start of `b`: the record and its encoded length.
    pub fn decode(b: &[u8]) -> Result<(Record, usize), RecordError> {
        let kind = *b.first().ok_or(RecordError::Short)?;
        let n = payload_len(kind).ok_or(RecordError::Kind(kind))?;
        if b.len() < 1 + n + 4 {
            return Err(RecordError::Short);
        }
        let crc = u32::from_le_bytes(b[1 + n..1 + n + 4].try_into().unwrap());
        if crc32fast::hash(&b[..1 + n]) != crc {
            return Err(RecordError::Checksum);
        }
        let p = &b[1..1 + n];
        let h = |at: usize| -> Hash { p[at..at + 32].try_into().unwrap() };
        let key = |at: usize| -> FileKey { p[at..at + 40].try_into().unwrap() };
        let u64_at = |at: usize| u64::from_le_bytes(p[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(p[at..at + 4].try_into().unwrap());
        let r = match kind {
            BLOCK => {
                let codec = Codec::from_u8(p[32]).ok_or(RecordError::Field("codec"))?;
                let len = u16::from_le_bytes([p[33], p[34]]);
                if len as usize > incfs_format::BLOCK_SIZE {
                    return Err(RecordError::Field("block length"));
                }
                Record::Block { hash: h(0), codec, len, offset: u64_at(35) }
            }
            PRESENT => Record::Present { file: key(0), first: u64_at(40), count: u32_at(48) },
            PRESENCE_CHUNK => Record::PresenceChunk {
                file: key(0),
                chunk: u64_at(40),
                bits: Box::new(p[48..48 + PRESENCE_CHUNK_BYTES].try_into().unwrap()),
            },
            META => Record::Meta {
                object: h(0),
                region: u64_at(32),
                chunk: u64_at(40),
                len: u32_at(48),
                offset: u64_at(52),
            },
            DROP_BLOCK => Record::DropBlock { hash: h(0), segment: u32_at(32), offset: u64_at(36) },
            DROP_META => Record::DropMeta { object: h(0), region: u64_at(32), chunk: u64_at(40) },
            _ => unreachable!("payload_len knows only these kinds"),
        };
        Ok((r, 1 + n + 4))
    }
}

/// Every record of a journal's bytes (after the magic), up to the first bad one; and why it
/// stopped early, if it did (a torn tail after a crash, or damage).
pub fn replay(mut b: &[u8]) -> (Vec<Record>, Option<RecordError>) {
    let mut out = Vec::new();
    while !b.is_empty() {
        match Record::decode(b) {
            Ok((r, n)) => {
                out.push(r);
                b = &b[n..];
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// Sorted block indices as `(first, count)` runs, for [`Record::Present`].
pub fn runs(blocks: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((first, count)) if *first + *count as u64 == b && *count < u32::MAX => *count += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Record> {
        let mut bits = Box::new([0u8; PRESENCE_CHUNK_BYTES]);
        bits[3] = 0x81;
        vec![
            Record::Block { hash: [1; 32], codec: Codec::Zstd, len: 4096, offset: 1 << 40 },
            Record::Present { file: [2; 40], first: 7, count: 300 },
            Record::PresenceChunk { file: [3; 40], chunk: 9, bits },
            Record::Meta { object: [4; 32], region: 5, chunk: 6, len: 65536, offset: 8 },
            Record::DropBlock { hash: [5; 32], segment: 3, offset: 99 },
            Record::DropMeta { object: [6; 32], region: 1, chunk: 2 },
        ]
    }

    #[test]
    fn records_round_trip_and_replay_stops_at_a_torn_tail() {
        let mut b = Vec::new();
        for r in all() {
            r.encode(&mut b);
        }
        assert_eq!(replay(&b), (all(), None));
        // Every cut inside the last record loses that record only.
        let last = {
            let mut v = Vec::new();
            all().last().unwrap().encode(&mut v);
            v.len()
        };
        for cut in 1..last {
            let (got, err) = replay(&b[..b.len() - cut]);
            assert_eq!(got, all()[..5].to_vec());
            assert_eq!(err, Some(RecordError::Short));
        }
        // A flipped bit anywhere in a record is caught by its checksum (or its kind).
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x10;
            let (got, err) = replay(&d);
            assert!(err.is_some(), "flip at {i} unnoticed");
            assert!(got.len() < all().len());
        }
    }

    #[test]
    fn runs_group_consecutive_blocks() {
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8]), vec![(0, 3), (5, 1), (7, 2)]);
        assert!(runs(&[]).is_empty());
    }
}
