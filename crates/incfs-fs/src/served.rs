//! The bytes of a read, served from the verified blocks that hold them.
//!
//! A read is answered from pieces of blocks already in memory (a fetched run's decoded buffer,
//! a block read back from the store, a plain copy's block, or zeros) rather than from one buffer
//! they are first copied into: the FUSE reply is written from the pieces with one `writev`, so a
//! cold sequential read copies each byte once on its way to the kernel, not twice. Pieces that
//! lie back to back in one buffer (the blocks of one fetched run) are one piece.

use std::io::IoSlice;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use incfs_format::BLOCK_SIZE;

/// Zeros for sparse parts of a file (holes and zero blocks are never stored).
static ZEROS: [u8; ZEROS_LEN] = [0; ZEROS_LEN];
const ZEROS_LEN: usize = 128 << 10;

/// A verified block of a fetched run: `buf[at..at + BLOCK_SIZE]`, where `buf` is the run's one
/// buffer of decoded blocks (one allocation per run, not per block: a quarter of a million 4 KiB
/// allocations per GiB, made on the verifying threads and freed on the reading ones, kept glibc's
/// arena lock busy) or, for a block stored raw, the response body it came in (no copy at all).
pub(crate) struct RunBlock {
    pub(crate) buf: Bytes,
    pub(crate) at: usize,
}

impl std::ops::Deref for RunBlock {
    type Target = [u8; BLOCK_SIZE];
    fn deref(&self) -> &Self::Target {
        self.buf[self.at..][..BLOCK_SIZE].try_into().expect("a whole block")
    }
}

/// A verified, decoded block: taken from the staged readahead (part of a run) or shared with
/// the verified-block cache.
pub(crate) enum Block {
    Owned(RunBlock),
    Shared(Arc<[u8; BLOCK_SIZE]>),
}

impl std::ops::Deref for Block {
    type Target = [u8; BLOCK_SIZE];
    fn deref(&self) -> &Self::Target {
        match self {
            Block::Owned(b) => b,
            Block::Shared(b) => b,
        }
    }
}

/// Where a piece's bytes lie.
enum Holder {
    Run(Bytes),
    Block(Arc<[u8; BLOCK_SIZE]>),
    Zeros,
}

impl Holder {
    fn bytes(&self) -> &[u8] {
        match self {
            Holder::Run(v) => v,
            Holder::Block(b) => &b[..],
            Holder::Zeros => &ZEROS,
        }
    }
}

/// The bytes of one read, in order, as pieces of the buffers that hold them.
#[derive(Default)]
pub struct Served {
    pieces: Vec<(Holder, Range<usize>)>,
    len: usize,
}

impl Served {
    /// Bytes in all.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `range` of `block` come next.
    pub(crate) fn push_block(&mut self, block: Block, range: Range<usize>) {
        match block {
            Block::Owned(RunBlock { buf, at }) => self.push(Holder::Run(buf), at + range.start..at + range.end),
            Block::Shared(b) => self.push(Holder::Block(b), range),
        }
    }

    /// `n` zero bytes come next.
    pub(crate) fn push_zeros(&mut self, n: usize) {
        let mut left = n;
        while left > 0 {
            let take = match self.pieces.last() {
                Some((Holder::Zeros, r)) if r.end < ZEROS_LEN => (ZEROS_LEN - r.end).min(left),
                _ => left.min(ZEROS_LEN),
            };
            self.push(Holder::Zeros, 0..take);
            left -= take;
        }
    }

    fn push(&mut self, holder: Holder, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.len += range.len();
        if let Some((last, r)) = self.pieces.last_mut() {
            let joins = match (&*last, &holder) {
                // Clones of one buffer: the same bytes at the same address.
                (Holder::Run(a), Holder::Run(b)) => {
                    a.as_ptr() == b.as_ptr() && a.len() == b.len() && r.end == range.start
                }
                (Holder::Zeros, Holder::Zeros) => r.end + range.len() <= ZEROS_LEN,
                _ => false,
            };
            if joins {
                r.end += range.len();
                return;
            }
        }
        self.pieces.push((holder, range));
    }

    /// The pieces, for a vectored write.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.pieces.iter().map(|(h, r)| IoSlice::new(&h.bytes()[r.clone()])).collect()
    }

    /// The bytes in one buffer (for callers that need them contiguous).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for (h, r) in &self.pieces {
            out.extend_from_slice(&h.bytes()[r.clone()]);
        }
        out
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Served({} bytes in {} pieces)", self.len, self.pieces.len())
    }
}

impl PartialEq<[u8]> for Served {
    fn eq(&self, other: &[u8]) -> bool {
        let mut rest = other;
        self.len == other.len()
            && self.pieces.iter().all(|(h, r)| {
                let (head, tail) = rest.split_at(r.len());
                rest = tail;
                head == &h.bytes()[r.clone()]
            })
    }
}

impl PartialEq<Vec<u8>> for Served {
    fn eq(&self, other: &Vec<u8>) -> bool {
        *self == other[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(blocks: usize) -> Bytes {
        (0..blocks * BLOCK_SIZE).map(|i| (i / BLOCK_SIZE + i % 251) as u8).collect::<Vec<u8>>().into()
    }

    fn block(run: &Bytes, k: usize) -> Block {
        Block::Owned(RunBlock { buf: run.clone(), at: k * BLOCK_SIZE })
    }

    #[test]
    fn blocks_of_one_run_join_and_others_stay_apart() {
        let r = run(3);
        let mut s = Served::default();
        s.push_block(block(&r, 0), 100..BLOCK_SIZE);
        s.push_block(block(&r, 1), 0..BLOCK_SIZE);
        s.push_zeros(5000);
        s.push_block(Block::Shared(Arc::new([7u8; BLOCK_SIZE])), 0..10);
        s.push_block(block(&r, 2), 0..20);
        assert_eq!(s.io_slices().len(), 4, "run blocks 0 and 1 are one piece");
        let copy = Bytes::copy_from_slice(&r);
        s.push_block(Block::Owned(RunBlock { buf: copy.clone(), at: 2 * BLOCK_SIZE }), 20..21);
        assert_eq!(s.io_slices().len(), 5, "the same bytes elsewhere are another piece");
        let mut want = r[100..2 * BLOCK_SIZE].to_vec();
        want.extend(std::iter::repeat_n(0u8, 5000));
        want.extend([7u8; 10]);
        want.extend(&r[2 * BLOCK_SIZE..2 * BLOCK_SIZE + 21]);
        assert_eq!(s.len(), want.len());
        assert_eq!(s.to_vec(), want);
        let joined: Vec<u8> = s.io_slices().iter().flat_map(|x| x.iter().copied()).collect();
        assert_eq!(joined, want);
        assert!(s == want);
        let mut other = want.clone();
        other[BLOCK_SIZE] ^= 1;
        assert!(s != other, "a differing byte in the second piece");
        assert!(s != want[..want.len() - 1], "a shorter buffer");
    }

    #[test]
    fn a_run_block_out_of_order_is_a_new_piece() {
        let r = run(2);
        let mut s = Served::default();
        s.push_block(block(&r, 1), 0..BLOCK_SIZE);
        s.push_block(block(&r, 0), 0..BLOCK_SIZE);
        assert_eq!(s.io_slices().len(), 2);
        let mut want = r[BLOCK_SIZE..].to_vec();
        want.extend(&r[..BLOCK_SIZE]);
        assert_eq!(s.to_vec(), want);
    }

    #[test]
    fn long_zero_ranges_span_several_pieces() {
        let mut s = Served::default();
        s.push_zeros(3);
        s.push_zeros(ZEROS_LEN * 2 + 1);
        assert_eq!(s.len(), ZEROS_LEN * 2 + 4);
        assert_eq!(s.io_slices().iter().map(|x| x.len()).sum::<usize>(), s.len());
        assert!(s.io_slices().iter().all(|x| x.len() <= ZEROS_LEN));
        assert!(s.to_vec().iter().all(|&b| b == 0));
        assert!(Served::default().is_empty());
    }
}
