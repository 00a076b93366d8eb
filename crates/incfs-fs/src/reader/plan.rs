//! Plan: which of a read's blocks must be fetched, and the runs (one ranged GET each) they are
//! fetched in. No I/O but the store's index.

use super::*;

impl Reader {
    /// Leaf and record of each block of `blocks` that is neither zero nor stored yet.
    pub(crate) fn plan(&self, f: &FileRef, blocks: &[u64]) -> Result<Vec<(u64, Hash, BlockRecord)>, Local> {
        let geo = Geometry::new(f.data.size);
        let mut leaves = Vec::with_capacity(blocks.len());
        let mut memo = None;
        for &i in blocks {
            leaves.push((i, self.leaf_in(f, &geo, i, &mut memo)?));
        }
        let hashes: Vec<Hash> = leaves.iter().map(|(_, h)| *h).filter(|h| *h != self.zero_hash).collect();
        let stored = self.store.stored_among(&hashes);
        let (present, todo): (Vec<_>, Vec<_>) =
            leaves.into_iter().partition(|(_, leaf)| *leaf == self.zero_hash || stored.contains(leaf));
        if !present.is_empty() {
            self.persist_presence(&f.key, present.into_iter().map(|(i, _)| i).collect());
        }
        let indices: Vec<u64> = todo.iter().map(|(i, _)| *i).collect();
        let records = self.records(f, &indices)?;
        Ok(todo.into_iter().zip(records).map(|((i, leaf), r)| (i, leaf, r)).collect())
    }
}

/// Split blocks (in file order) into runs one ranged GET can serve: stored back to back in one
/// object, at most [`MAX_RUN_BYTES`] long and [`MAX_RUN_BLOCKS`] blocks.
pub(crate) fn group_runs(items: &[(u64, Hash, BlockRecord)]) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (k, (_, _, r)) in items.iter().enumerate() {
        if let Some(run) = runs.last_mut() {
            let prev = &items[run.end - 1].2;
            let start = &items[run.start].2;
            if k - run.start < MAX_RUN_BLOCKS && prev.joins_run(r, start, MAX_RUN_BYTES) {
                run.end = k + 1;
                continue;
            }
        }
        runs.push(k..k + 1);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: u64, object: u32, offset: u64, len: u16) -> (u64, Hash, BlockRecord) {
        (i, [i as u8; 32], BlockRecord { object, codec: Codec::Lz4, len, offset })
    }

    #[test]
    fn runs_join_only_adjacent_bytes() {
        let items =
            vec![item(0, 0, 0, 10), item(1, 0, 10, 5), item(2, 0, 100, 5), item(3, 1, 105, 5), item(9, 1, 110, 1)];
        assert_eq!(group_runs(&items), vec![0..2, 2..3, 3..5]);
        let big: Vec<_> = (0..2000).map(|i| item(i, 0, i * 4096, 4096)).collect();
        assert_eq!(group_runs(&big).len(), 4, "8 MiB in runs of 2 MiB");
        let text: Vec<_> = (0..2000).map(|i| item(i, 0, i * 200, 200)).collect();
        assert_eq!(group_runs(&text), vec![0..512, 512..1024, 1024..1536, 1536..2000], "2 MiB of file per run");
    }
}
