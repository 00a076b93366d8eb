//! Small files packed next to a cold small file, fetched with it.
//!
//! Programs read small files in groups (a package's modules, a directory's icons) and pack
//! writes a directory's files back to back, so the spans around a cold small file are likely to
//! be read next. At a high round-trip time one request per file dominates: 192 modules of a
//! Python import at 20 ms cost 192 round trips. The first cold small file's request is widened
//! to the whole spans of its neighbours within `--nearby` bytes on either side, and the extra
//! bytes are kept here, unverified and bounded, until a read of one of those files takes its
//! span from here instead of the network. They are verified like any fetched bytes when used;
//! an entry whose bytes fail verification is forgotten, so the next attempt goes to a source.

use std::collections::VecDeque;
use std::ops::Range;

use bytes::Bytes;
use parking_lot::Mutex;

/// Default reach on either side of a cold small file (`--nearby`).
pub const DEFAULT_NEARBY: u64 = 64 << 10;
/// Bytes kept here at most (oldest dropped first).
pub const NEARBY_LIMIT: u64 = 1 << 20;

/// The span of region `k` of `regions` (sorted `(object, start, end)` metadata regions): from
/// the end of the region before it in the same object (or the object's start) to the end of its
/// own, which is where pack lays out a file's blocks and then its metadata. `None` if that region
/// overlaps this one (not pack's layout).
pub fn span(regions: &[(u32, u64, u64)], k: usize) -> Option<Range<u64>> {
    let (object, start, end) = regions[k];
    match k.checked_sub(1).map(|p| regions[p]) {
        Some((o, _, before)) if o == object && before > start => None,
        Some((o, _, before)) if o == object => Some(before..end),
        _ => Some(0..end),
    }
}

/// The range to fetch for `own`, the [`span`] of region `k`, widened to the whole spans of its
/// neighbours in the same object that start within `reach` bytes before it or end within
/// `reach` bytes after it. Overlapping regions stop the widening.
pub fn widen(regions: &[(u32, u64, u64)], k: usize, own: Range<u64>, reach: u64) -> Range<u64> {
    let object = regions[k].0;
    let mut out = own.clone();
    // Backward: region j-1's span joins only if j's does not overlap it.
    let mut j = k;
    while j > 0 && regions[j - 1].0 == object && span(regions, j).is_some() {
        match span(regions, j - 1) {
            Some(s) if own.start - s.start <= reach => out.start = s.start,
            _ => break,
        }
        j -= 1;
    }
    for j in k + 1..regions.len() {
        match span(regions, j) {
            Some(s) if regions[j].0 == object && s.end - own.end <= reach => out.end = s.end,
            _ => break,
        }
    }
    out
}

struct Entry {
    object: u32,
    range: Range<u64>,
    bytes: Bytes,
    mirror: usize,
}

/// Widened fetches kept for the neighbours' reads: at most [`NEARBY_LIMIT`] bytes.
#[derive(Default)]
pub struct Nearby {
    entries: Mutex<VecDeque<Entry>>,
}

impl Nearby {
    /// Keep `bytes` (object `object`'s `range`, sent by mirror `mirror`), dropping the oldest
    /// entries beyond the limit. Larger than the limit alone: not kept.
    pub fn put(&self, object: u32, range: Range<u64>, bytes: Bytes, mirror: usize) {
        if bytes.len() as u64 != range.end - range.start || bytes.len() as u64 > NEARBY_LIMIT {
            return;
        }
        let mut entries = self.entries.lock();
        entries.push_back(Entry { object, range, bytes, mirror });
        let mut total: u64 = entries.iter().map(|e| e.bytes.len() as u64).sum();
        while total > NEARBY_LIMIT {
            let Some(old) = entries.pop_front() else { break };
            total -= old.bytes.len() as u64;
        }
    }

    /// The bytes of `range` of `object` and the mirror that sent them, if one entry holds all.
    pub fn get(&self, object: u32, range: &Range<u64>) -> Option<(Bytes, usize)> {
        let entries = self.entries.lock();
        entries.iter().rev().find_map(|e| {
            (e.object == object && e.range.start <= range.start && range.end <= e.range.end).then(|| {
                let at = (range.start - e.range.start) as usize;
                (e.bytes.slice(at..at + (range.end - range.start) as usize), e.mirror)
            })
        })
    }

    /// Forget every entry of `object` (some of its bytes failed verification).
    pub fn forget(&self, object: u32) {
        self.entries.lock().retain(|e| e.object != object);
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.entries.lock().iter().map(|e| e.bytes.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Three objects' worth of regions; in object 1, spans: [0,100) [100,250) [250,300) [300,1000).
    const REGIONS: &[(u32, u64, u64)] =
        &[(0, 50, 90), (1, 80, 100), (1, 200, 250), (1, 280, 300), (1, 900, 1000), (2, 10, 20)];

    #[test]
    fn widening_takes_whole_neighbour_spans_within_reach() {
        assert_eq!(widen(REGIONS, 2, 100..250, 0), 100..250);
        assert_eq!(widen(REGIONS, 2, 100..250, 50), 100..300);
        assert_eq!(widen(REGIONS, 2, 100..250, 100), 0..300);
        assert_eq!(widen(REGIONS, 2, 100..250, 750), 0..1000);
        // Never past another object's regions.
        assert_eq!(widen(REGIONS, 1, 0..100, 10_000), 0..1000);
        assert_eq!(widen(REGIONS, 5, 0..20, 10_000), 0..20);
    }

    #[test]
    fn a_span_starts_where_the_region_before_it_in_its_object_ends() {
        assert_eq!(span(REGIONS, 0), Some(0..90));
        assert_eq!(span(REGIONS, 1), Some(0..100));
        assert_eq!(span(REGIONS, 2), Some(100..250));
        assert_eq!(span(&[(1, 0, 100), (1, 50, 150)], 1), None, "overlapping");
    }

    #[test]
    fn overlapping_regions_stop_the_widening() {
        let regions = [(1, 0, 100), (1, 50, 150), (1, 200, 250)];
        assert_eq!(widen(&regions, 1, 100..150, 1000), 100..250);
        assert_eq!(widen(&regions, 2, 150..250, 1000), 150..250);
    }

    #[test]
    fn entries_serve_contained_ranges_and_stay_bounded() {
        let n = Nearby::default();
        n.put(1, 100..200, Bytes::from((0..100u8).collect::<Vec<_>>()), 3);
        assert_eq!(n.get(1, &(110..120)).unwrap(), (Bytes::from((10..20u8).collect::<Vec<_>>()), 3));
        assert!(n.get(1, &(150..250)).is_none());
        assert!(n.get(2, &(110..120)).is_none());
        let big = NEARBY_LIMIT / 2 + 1;
        n.put(1, 0..big, Bytes::from(vec![0; big as usize]), 0);
        n.put(2, 0..big, Bytes::from(vec![0; big as usize]), 0);
        assert!(n.bytes() <= NEARBY_LIMIT);
        assert!(n.get(1, &(110..120)).is_none(), "oldest dropped first");
        assert!(n.get(2, &(0..10)).is_some());
        n.forget(2);
        assert_eq!(n.bytes(), 0);
    }
}
