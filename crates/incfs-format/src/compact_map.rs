//! Compact metadata for sparse and repetitive files (manifest format 3).
//!
//! The dense metadata region of a file ([`crate::FileMetaLayout`]) costs 32 bytes of tree and 16
//! of block map per 4 KiB block, whatever the block holds: 12 MiB for a 1 GiB file that is one
//! hole. A *compact map* lists only runs of equal blocks that are not zero:
//!
//! ```text
//! u64 run count N
//! N runs of 64 bytes, sorted by first block, not overlapping:
//!   u64 first block | u64 block count (>= 1) | [32] leaf hash | [16] block record
//! ```
//!
//! Every block not in a run is a zero block. A reader rebuilds any part of the dense region
//! from the runs ([`CompactMap::dense`]): the tree's levels are runs too (a hash block whose
//! children all lie in one run, or in no run, is one of a few values), so the work and memory
//! are in proportion to the runs, not to the file's size. Nothing here is trusted: the root
//! computed from the runs must equal the signed root ([`CompactMap::root`]), and every hash block
//! rebuilt is checked against its parent as any fetched one.
//!
//! A writer uses a compact map only where it is at most half the dense region and at most
//! [`MAX_COMPACT_LEN`] bytes, so a reader fetches it whole in one request.

use std::collections::HashMap;
use std::ops::Range;

use incfs_verity::{block_count, hash_data_block, hash_hash_block, Geometry, Hash, HASHES_PER_BLOCK, HASH_SIZE};

use crate::block_map::{BlockRecord, FileMetaLayout, BLOCK_RECORD_SIZE};
use crate::codec::Codec;

/// Bytes per run.
pub const RUN_SIZE: usize = 8 + 8 + HASH_SIZE + BLOCK_RECORD_SIZE;
/// Largest compact map (16,383 runs): fetched whole, in one request.
pub const MAX_COMPACT_LEN: u64 = 1 << 20;

/// Blocks `first..first + count` of a file all hash to `leaf` and are stored at `record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub count: u64,
    pub leaf: Hash,
    pub record: BlockRecord,
}

impl Run {
    fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Why a compact map was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompactError {
    #[error("compact map is {0} bytes: not 8 + 64 per run, or over the 1 MiB limit")]
    Length(usize),
    #[error("compact map run {0} is empty, out of order, overlaps another or lies past the file's end")]
    Run(usize),
    #[error("compact map run {0}: {1}")]
    Record(usize, crate::block_map::RecordError),
}

/// The runs of a file whose blocks hash to `leaves` and are stored at `records` (one each):
/// consecutive blocks with the same leaf and record join; zero blocks are left out.
pub fn runs_of(leaves: &[Hash], records: &[BlockRecord]) -> Vec<Run> {
    assert_eq!(leaves.len(), records.len(), "one record per leaf");
    let mut runs: Vec<Run> = Vec::new();
    for (i, (leaf, record)) in leaves.iter().zip(records).enumerate() {
        if record.codec == Codec::Zero {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.end() == i as u64 && r.leaf == *leaf && r.record == *record => r.count += 1,
            _ => runs.push(Run { first: i as u64, count: 1, leaf: *leaf, record: *record }),
        }
    }
    runs
}

/// Length of the compact map of `runs`.
pub fn encoded_len(runs: usize) -> u64 {
    8 + (runs * RUN_SIZE) as u64
}

/// Whether a writer should store `runs` as a compact map rather than the dense region of a file
/// of `size` bytes: it must be at most half as long, and at most [`MAX_COMPACT_LEN`].
pub fn worth_it(size: u64, runs: usize) -> bool {
    let compact = encoded_len(runs);
    let dense = FileMetaLayout::new(size).len().unwrap_or(u64::MAX);
    compact <= MAX_COMPACT_LEN && compact.saturating_mul(2) <= dense
}

pub fn encode(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(runs.len()) as usize);
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for r in runs {
        out.extend_from_slice(&r.first.to_le_bytes());
        out.extend_from_slice(&r.count.to_le_bytes());
        out.extend_from_slice(&r.leaf);
        out.extend_from_slice(&r.record.encode());
    }
    out
}

/// One level of the tree: entries `0..n`, given as runs `(first, count, hash)` of equal hashes
/// in order; every entry outside them is `zero`, the hash of an all-zero subtree.
#[derive(Debug)]
struct Level {
    n: u64,
    runs: Vec<(u64, u64, Hash)>,
    zero: Hash,
}

impl Level {
    fn entry(&self, e: u64) -> Hash {
        let k = self.runs.partition_point(|&(first, count, _)| first + count <= e);
        match self.runs.get(k) {
            Some(&(first, _, h)) if first <= e => h,
            _ => self.zero,
        }
    }

    /// Hash block `j` of this level: the hash of its (up to 128) entries, zero-padded.
    fn hash_block(&self, j: u64) -> Hash {
        let per = HASHES_PER_BLOCK as u64;
        let entries: Vec<Hash> = (j * per..((j + 1) * per).min(self.n)).map(|e| self.entry(e)).collect();
        hash_hash_block(&entries)
    }

    /// The level above this one.
    fn parent(&self) -> Level {
        let per = HASHES_PER_BLOCK as u64;
        let n = self.n.div_ceil(per);
        let zero = hash_hash_block(&[self.zero; HASHES_PER_BLOCK]);
        // Parents whose block lies wholly in one run are one value per run; parents touching a
        // run's edge, and the last parent (its block may be short: zero-padded, not a zero
        // subtree), are computed. The rest cover no run: all-zero subtrees.
        let mut spans: Vec<(u64, u64, Option<Hash>)> = Vec::new();
        for &(first, count, _) in &self.runs {
            let end = first + count;
            let (inner_start, inner_end) = (first.div_ceil(per), end / per);
            if inner_start < inner_end {
                spans.push((inner_start, inner_end - inner_start, None));
                // Full blocks of one run: one hash, kept with the span.
            }
            for j in [first / per, (end - 1) / per] {
                if !(inner_start..inner_end).contains(&j) {
                    spans.push((j, 1, Some([0; HASH_SIZE])));
                }
            }
        }
        spans.push((n - 1, 1, Some([0; HASH_SIZE])));
        spans.sort_by_key(|s| (s.0, s.2.is_some()));
        let mut memo: HashMap<Hash, Hash> = HashMap::new();
        let mut runs: Vec<(u64, u64, Hash)> = Vec::new();
        let mut covered = 0u64; // parents before this are done
        for (j, count, computed) in spans {
            if j + count <= covered {
                continue; // a computed parent already inside a span of full blocks, or twice
            }
            let hash = match computed {
                Some(_) => self.hash_block(j),
                None => {
                    let child = self.entry(j * per);
                    *memo.entry(child).or_insert_with(|| hash_hash_block(&[child; HASHES_PER_BLOCK]))
                }
            };
            covered = j + count;
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == j && last.2 == hash => last.1 += count,
                _ => runs.push((j, count, hash)),
            }
        }
        Level { n, runs, zero }
    }
}

/// A decoded compact map: the runs, and the tree's levels rebuilt from them.
#[derive(Debug)]
pub struct CompactMap {
    geometry: Geometry,
    runs: Vec<Run>,
    /// Level 0 (the leaves) first; empty for a file of one block.
    levels: Vec<Level>,
    root: Hash,
}

impl CompactMap {
    /// Parse the compact map of a file of `size` bytes (at least one block).
    pub fn decode(size: u64, bytes: &[u8]) -> Result<Self, CompactError> {
        let bad_len = CompactError::Length(bytes.len());
        if bytes.len() < 8 || bytes.len() as u64 > MAX_COMPACT_LEN {
            return Err(bad_len);
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let len = n.checked_mul(RUN_SIZE as u64).and_then(|runs| runs.checked_add(encoded_len(0)));
        if len != Some(bytes.len() as u64) {
            return Err(bad_len);
        }
        let blocks = block_count(size);
        let mut runs: Vec<Run> = Vec::with_capacity(n as usize);
        for (k, b) in bytes[8..].chunks_exact(RUN_SIZE).enumerate() {
            let first = u64::from_le_bytes(b[0..8].try_into().unwrap());
            let count = u64::from_le_bytes(b[8..16].try_into().unwrap());
            let leaf: Hash = b[16..48].try_into().unwrap();
            let record = BlockRecord::decode(b[48..64].try_into().unwrap()).map_err(|e| CompactError::Record(k, e))?;
            let after_last = runs.last().is_none_or(|r| r.end() <= first);
            if count == 0 || !after_last || first.checked_add(count).is_none_or(|end| end > blocks) {
                return Err(CompactError::Run(k));
            }
            runs.push(Run { first, count, leaf, record });
        }
        let geometry = Geometry::new(size);
        let mut levels = Vec::new();
        if !geometry.levels().is_empty() {
            let mut level = Level { n: blocks, runs: Vec::with_capacity(runs.len()), zero: hash_data_block(&[]) };
            for r in &runs {
                match level.runs.last_mut() {
                    Some(last) if last.0 + last.1 == r.first && last.2 == r.leaf => last.1 += r.count,
                    _ => level.runs.push((r.first, r.count, r.leaf)),
                }
            }
            levels.push(level);
            while levels.last().unwrap().n > HASHES_PER_BLOCK as u64 {
                let above = levels.last().unwrap().parent();
                levels.push(above);
            }
        }
        let mut map = CompactMap { geometry, runs, levels, root: [0; HASH_SIZE] };
        map.root = match map.levels.last() {
            Some(top) => top.hash_block(0),
            None => map.leaf(0),
        };
        Ok(map)
    }

    /// The root hash the runs give: a map is of use only if it equals the signed root.
    pub fn root(&self) -> &Hash {
        &self.root
    }

    fn run(&self, i: u64) -> Option<&Run> {
        let k = self.runs.partition_point(|r| r.end() <= i);
        self.runs.get(k).filter(|r| r.first <= i)
    }

    /// Leaf hash of block `i`.
    pub fn leaf(&self, i: u64) -> Hash {
        self.run(i).map_or_else(|| hash_data_block(&[]), |r| r.leaf)
    }

    /// Where block `i` is stored.
    pub fn record(&self, i: u64) -> BlockRecord {
        self.run(i).map_or(BlockRecord::ZERO, |r| r.record)
    }

    /// The runs, in block order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Bytes this map holds in memory, about (runs and rebuilt levels): a few KiB for a sparse
    /// file, some MiB at most for the largest map.
    pub fn memory_bytes(&self) -> u64 {
        let level_runs: usize = self.levels.iter().map(|l| l.runs.len()).sum();
        (self.runs.len() * std::mem::size_of::<Run>() + level_runs * std::mem::size_of::<(u64, u64, Hash)>()) as u64
    }

    /// Bytes `range` of the file's dense metadata region (compact tree, then block map), as a
    /// writer of the dense layout would have stored them.
    pub fn dense(&self, range: Range<u64>) -> Vec<u8> {
        let tree_len = self.geometry.compact_len();
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut at = range.start;
        while at < range.end {
            let (item, start, len): ([u8; HASH_SIZE], u64, u64) = if at < tree_len {
                let level = (0..self.levels.len())
                    .find(|&k| at >= self.geometry.compact_offset(k))
                    .expect("the bottom level starts the furthest in");
                let base = self.geometry.compact_offset(level);
                let e = (at - base) / HASH_SIZE as u64;
                (self.levels[level].entry(e), base + e * HASH_SIZE as u64, HASH_SIZE as u64)
            } else {
                let i = (at - tree_len) / BLOCK_RECORD_SIZE as u64;
                let mut item = [0u8; HASH_SIZE];
                item[..BLOCK_RECORD_SIZE].copy_from_slice(&self.record(i).encode());
                (item, tree_len + i * BLOCK_RECORD_SIZE as u64, BLOCK_RECORD_SIZE as u64)
            };
            let to = range.end.min(start + len);
            out.extend_from_slice(&item[(at - start) as usize..(to - start) as usize]);
            at = to;
        }
        out
    }
}

/// Why a file's metadata region (either form) was rejected.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region is {actual} bytes, its file needs {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("Merkle tree does not match the signed root hash: {0}")]
    Tree(#[from] incfs_verity::TreeError),
    #[error("{0}")]
    Compact(#[from] CompactError),
    #[error("compact map does not match the signed root hash")]
    Root,
    #[error("block {block}: bad block record: {reason}")]
    Record { block: u64, reason: crate::block_map::RecordError },
}

/// A whole metadata region of a file of `size` bytes (`bytes`, stored as `meta` says), checked
/// against its signed `root`: the file's tree and one block record per block. For readers that
/// take a file whole (extract, pack's index of earlier versions); a mount reads pieces instead.
pub fn decode_region(
    size: u64,
    meta: &crate::MetaRef,
    bytes: &[u8],
    root: &Hash,
) -> Result<(incfs_verity::MerkleTree, Vec<BlockRecord>), RegionError> {
    let expected = meta.stored_len(size).unwrap_or(u64::MAX);
    if bytes.len() as u64 != expected {
        return Err(RegionError::Length { expected, actual: bytes.len() as u64 });
    }
    if meta.compact != 0 {
        let map = CompactMap::decode(size, bytes)?;
        if map.root() != root {
            return Err(RegionError::Root);
        }
        let blocks = block_count(size);
        let tree = incfs_verity::MerkleTree::from_leaves(size, (0..blocks).map(|i| map.leaf(i)).collect());
        return Ok((tree, (0..blocks).map(|i| map.record(i)).collect()));
    }
    let layout = FileMetaLayout::new(size);
    let (tree, map) = bytes.split_at(layout.map_offset() as usize);
    let tree = incfs_verity::MerkleTree::from_compact(size, tree, root)?;
    let records = map
        .chunks_exact(BLOCK_RECORD_SIZE)
        .enumerate()
        .map(|(i, c)| {
            BlockRecord::decode(c.try_into().unwrap()).map_err(|reason| RegionError::Record { block: i as u64, reason })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((tree, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use incfs_verity::MerkleTree;

    fn rec(i: u64) -> BlockRecord {
        BlockRecord { object: 1, codec: Codec::Raw, len: 4096, offset: i * 4096 }
    }

    /// A file of `blocks` blocks where `data(i)` is Some(content id) for a stored block; the
    /// dense region as pack writes it, and the compact map of the same file.
    fn both(size: u64, data: impl Fn(u64) -> Option<u64>) -> (Vec<u8>, Vec<u8>, Hash) {
        let blocks = block_count(size);
        let mut leaves = Vec::new();
        let mut records = Vec::new();
        for i in 0..blocks {
            match data(i) {
                Some(c) => {
                    leaves.push(hash_data_block(&c.to_le_bytes()));
                    records.push(rec(c));
                }
                None => {
                    leaves.push(hash_data_block(&[]));
                    records.push(BlockRecord::ZERO);
                }
            }
        }
        let tree = MerkleTree::from_leaves(size, leaves.clone());
        let mut dense = tree.to_compact();
        for r in &records {
            dense.extend_from_slice(&r.encode());
        }
        (dense, encode(&runs_of(&leaves, &records)), *tree.root())
    }

    fn check(size: u64, data: impl Fn(u64) -> Option<u64>) {
        let (dense, compact, root) = both(size, data);
        if compact.len() as u64 > MAX_COMPACT_LEN {
            assert!(matches!(CompactMap::decode(size, &compact), Err(CompactError::Length(_))));
            return;
        }
        let map = CompactMap::decode(size, &compact).unwrap();
        assert_eq!(map.root(), &root, "size {size}: the root from the runs");
        assert!(map.dense(0..dense.len() as u64) == dense, "size {size}: the whole dense region");
        for (a, b) in [(0, 1), (5, 77), (31, 33), ((dense.len() as u64).saturating_sub(17), dense.len() as u64)] {
            if b <= dense.len() as u64 && a < b {
                assert_eq!(map.dense(a..b), dense[a as usize..b as usize], "size {size}: bytes {a}..{b}");
            }
        }
    }

    #[test]
    fn dense_bytes_and_root_match_the_dense_writer() {
        let b = 4096u64;
        for size in [b, 2 * b, 128 * b, 129 * b, 128 * 128 * b + 1, 3 * 128 * 128 * b + 100] {
            let blocks = block_count(size);
            check(size, |_| None); // one hole
            check(size, Some); // no hole
            check(size, |i| (i % 3 == 0).then_some(i));
            check(size, |i| (i == blocks - 1).then_some(1)); // data only at the end
            check(size, |i| (i < blocks / 2).then_some(7)); // one repeated block, then a hole
            check(size, |i| (i % 300 < 140).then_some(i / 300)); // runs across hash block edges
        }
    }

    #[test]
    fn random_sparse_files_match_the_dense_writer() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for _ in 0..40 {
            let size = 1 + next(40_000 * 4096);
            // Stretches of data (distinct, or one repeated block) between holes.
            let (a, b, c) = (next(700), next(700), next(3));
            check(size, |i| match (i / (a + 1) + i / (b + 1)) % 3 {
                0 => None,
                1 if c == 0 => Some(5),
                _ => Some(i),
            });
        }
    }

    #[test]
    fn a_sparse_gigabyte_costs_kilobytes() {
        let size = 1u64 << 30;
        let blocks = block_count(size);
        let data = |i: u64| (1000..1256).contains(&i).then_some(i); // 1 MiB of distinct blocks
        let (dense, compact, root) = both(size, data);
        assert_eq!(dense.len(), 12 * 1024 * 1024 + 32 * (2048 + 16));
        assert_eq!(compact.len() as u64, encoded_len(256));
        assert!(compact.len() < 64 * 1024);
        assert!(worth_it(size, 256));
        let map = CompactMap::decode(size, &compact).unwrap();
        assert_eq!(map.root(), &root);
        assert!(map.memory_bytes() < 64 * 1024, "{} bytes in memory", map.memory_bytes());
        for i in [0, 999, 1000, 1255, 1256, blocks - 1] {
            let rec_at = FileMetaLayout::new(size).record_offset(i);
            assert_eq!(map.dense(rec_at..rec_at + 16), dense[rec_at as usize..rec_at as usize + 16]);
        }
        assert!(map.dense(0..1 << 20) == dense[..1 << 20]);
    }

    #[test]
    fn hostile_maps_are_refused() {
        let size = 100 * 4096;
        let run = |first, count| Run { first, count, leaf: [1; 32], record: rec(0) };
        let ok = encode(&[run(0, 2), run(5, 95)]);
        assert!(CompactMap::decode(size, &ok).is_ok());
        assert_eq!(CompactMap::decode(size, &ok[..ok.len() - 1]).unwrap_err(), CompactError::Length(ok.len() - 1));
        assert!(CompactMap::decode(size, &[]).is_err());
        let mut lying_count = ok.clone();
        lying_count[0] = 200;
        assert!(matches!(CompactMap::decode(size, &lying_count), Err(CompactError::Length(_))));
        lying_count[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(CompactMap::decode(size, &lying_count), Err(CompactError::Length(_))));
        for bad in [vec![run(5, 1), run(0, 2)], vec![run(0, 3), run(2, 1)], vec![run(0, 0)], vec![run(99, 2)]] {
            assert!(matches!(CompactMap::decode(size, &encode(&bad)), Err(CompactError::Run(_))), "{bad:?}");
        }
        assert!(matches!(CompactMap::decode(size, &encode(&[run(u64::MAX, 2)])), Err(CompactError::Run(0))));
        let mut bad_record = ok.clone();
        bad_record[8 + 48 + 4] = 9; // codec
        assert!(matches!(CompactMap::decode(size, &bad_record), Err(CompactError::Record(0, _))));
    }

    #[test]
    fn whole_regions_of_either_form() {
        let size = 300 * 4096 + 5;
        let (dense, compact, root) = both(size, |i| (i % 100 < 3).then_some(i));
        let dense_ref = crate::MetaRef::dense(0, 0);
        let compact_ref = crate::MetaRef { compact: compact.len() as u32, ..dense_ref };
        let (t1, r1) = decode_region(size, &dense_ref, &dense, &root).unwrap();
        let (t2, r2) = decode_region(size, &compact_ref, &compact, &root).unwrap();
        assert_eq!((t1.leaves(), &r1), (t2.leaves(), &r2));
        assert!(matches!(decode_region(size, &compact_ref, &compact, &[9; 32]), Err(RegionError::Root)));
        assert!(matches!(decode_region(size, &dense_ref, &dense, &[9; 32]), Err(RegionError::Tree(_))));
        assert!(matches!(decode_region(size, &dense_ref, &compact, &root), Err(RegionError::Length { .. })));
    }

    #[test]
    fn runs_join_equal_neighbours_only() {
        let z = hash_data_block(&[]);
        let (a, b) = ([1; 32], [2; 32]);
        let leaves = [a, a, z, a, b, b];
        let records = [rec(0), rec(0), BlockRecord::ZERO, rec(0), rec(1), rec(2)];
        let runs = runs_of(&leaves, &records);
        let spans: Vec<(u64, u64)> = runs.iter().map(|r| (r.first, r.count)).collect();
        assert_eq!(spans, [(0, 2), (3, 1), (4, 1), (5, 1)]);
        assert!(!worth_it(6 * 4096, runs.len()), "small files keep the dense region");
    }
}
