//! Which blocks of each file content are present locally, for status and completion.
//!
//! Kept per content ([`FileKey`]: root hash and size), so hard links and identical files share
//! it, as bitmaps in chunks of 4096 blocks. The read path never consults it (it asks the store by
//! leaf hash); it is updated when blocks are stored or found, and persisted with them.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use incfs_store::{FileKey, Store, StoreError, PRESENCE_CHUNK_BITS};
use parking_lot::Mutex;

#[derive(Default)]
struct FilePresence {
    chunks: BTreeMap<u64, Vec<u8>>,
    count: u64,
}

#[derive(Default)]
pub struct Presence {
    files: Mutex<HashMap<FileKey, FilePresence>>,
}

fn bit(chunks: &BTreeMap<u64, Vec<u8>>, i: u64) -> bool {
    let (c, b) = (i / PRESENCE_CHUNK_BITS, i % PRESENCE_CHUNK_BITS);
    chunks.get(&c).is_some_and(|bits| bits.get((b / 8) as usize).is_some_and(|byte| byte & (1 << (b % 8)) != 0))
}

impl Presence {
    /// Load the persisted bitmaps of `keys` (each once).
    pub fn load(&self, store: &Store, keys: impl IntoIterator<Item = FileKey>) -> Result<(), StoreError> {
        let mut files = self.files.lock();
        for key in keys {
            if files.contains_key(&key) {
                continue;
            }
            let mut p = FilePresence::default();
            for (c, bits) in store.presence(&key) {
                p.count += bits.iter().map(|b| b.count_ones() as u64).sum::<u64>();
                p.chunks.insert(c, bits);
            }
            files.insert(key, p);
        }
        Ok(())
    }

    pub fn is_present(&self, key: &FileKey, block: u64) -> bool {
        self.files.lock().get(key).is_some_and(|p| bit(&p.chunks, block))
    }

    /// Whether each block of `blocks` is present, with one look at the map.
    pub fn mask(&self, key: &FileKey, blocks: Range<u64>) -> Vec<bool> {
        let files = self.files.lock();
        match files.get(key) {
            Some(p) => blocks.map(|i| bit(&p.chunks, i)).collect(),
            None => vec![false; (blocks.end - blocks.start) as usize],
        }
    }

    /// Mark blocks present; returns the chunks that changed, to persist.
    pub fn mark(&self, key: &FileKey, blocks: impl IntoIterator<Item = u64>) -> Vec<(FileKey, u64, Vec<u8>)> {
        let mut files = self.files.lock();
        let p = files.entry(*key).or_default();
        let mut changed = std::collections::BTreeSet::new();
        for i in blocks {
            let (c, b) = (i / PRESENCE_CHUNK_BITS, i % PRESENCE_CHUNK_BITS);
            let bits = p.chunks.entry(c).or_insert_with(|| vec![0u8; (PRESENCE_CHUNK_BITS / 8) as usize]);
            let byte = &mut bits[(b / 8) as usize];
            if *byte & (1 << (b % 8)) == 0 {
                *byte |= 1 << (b % 8);
                p.count += 1;
                changed.insert(c);
            }
        }
        changed.into_iter().map(|c| (*key, c, p.chunks[&c].clone())).collect()
    }

    /// Mark blocks `first..first+count` absent (evicted from the cache); `count` `u32::MAX`:
    /// every block of the content.
    pub fn unmark(&self, key: &FileKey, first: u64, count: u32) {
        let mut files = self.files.lock();
        let Some(p) = files.get_mut(key) else { return };
        if count == u32::MAX && first == 0 {
            *p = FilePresence::default();
            return;
        }
        for i in first..first.saturating_add(count as u64) {
            let (c, b) = (i / PRESENCE_CHUNK_BITS, i % PRESENCE_CHUNK_BITS);
            if let Some(byte) = p.chunks.get_mut(&c).and_then(|bits| bits.get_mut((b / 8) as usize)) {
                if *byte & (1 << (b % 8)) != 0 {
                    *byte &= !(1 << (b % 8));
                    p.count -= 1;
                }
            }
        }
    }

    /// Blocks present of one content.
    pub fn count(&self, key: &FileKey) -> u64 {
        self.files.lock().get(key).map_or(0, |p| p.count)
    }

    /// Present blocks of a content with `blocks` blocks, as sorted ranges.
    pub fn ranges(&self, key: &FileKey, blocks: u64) -> Vec<Range<u64>> {
        let files = self.files.lock();
        let Some(p) = files.get(key) else {
            return Vec::new();
        };
        let mut out: Vec<Range<u64>> = Vec::new();
        for i in 0..blocks {
            if bit(&p.chunks, i) {
                match out.last_mut() {
                    Some(r) if r.end == i => r.end = i + 1,
                    _ => out.push(i..i + 1),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_count_and_ranges() {
        let p = Presence::default();
        let k = [7u8; 40];
        let changed = p.mark(&k, [0, 1, 2, 5, 5000]);
        assert_eq!(changed.len(), 2, "two chunks touched");
        assert!(p.mark(&k, [1]).is_empty(), "already present");
        assert_eq!(p.count(&k), 5);
        assert!(p.is_present(&k, 5000) && !p.is_present(&k, 3));
        assert_eq!(p.ranges(&k, 6000), vec![0..3, 5..6, 5000..5001]);
        assert_eq!(p.mask(&k, 0..6), vec![true, true, true, false, false, true]);
        assert_eq!(p.mask(&[8u8; 40], 0..2), vec![false, false]);
        p.unmark(&k, 1, 3);
        p.unmark(&[8u8; 40], 0, 9);
        assert_eq!(p.count(&k), 3);
        assert_eq!(p.ranges(&k, 6000), vec![0..1, 5..6, 5000..5001]);
    }

    /// The cascade of issue 11 item 8: a panic while the map was locked (a short bitmap did
    /// that once) poisoned a std lock, and every later read of the mount panicked on it.
    #[test]
    fn a_panic_under_the_lock_does_not_break_later_calls() {
        let p = std::sync::Arc::new(Presence::default());
        let k = [7u8; 40];
        p.mark(&k, [0]);
        let q = p.clone();
        let r = std::thread::spawn(move || {
            let _held = q.files.lock();
            panic!("a bug while the presence map is locked");
        })
        .join();
        assert!(r.is_err(), "the thread panicked");
        p.mark(&k, [1]);
        assert_eq!(p.count(&k), 2);
        assert_eq!(p.ranges(&k, 4), vec![0..2]);
    }
}
