//! Access profiles: the order in which a program first read the blocks of an image.
//!
//! `incfs mount --record-profile` writes one; `incfs pack --profile` lays the profiled files out
//! first, in that order, and publishes the profile beside the manifest; a fresh mount's
//! background fetcher then fetches those blocks first, in order, in few large requests. A profile
//! only orders fetching: every block is still verified, so it is not signed, and a damaged or
//! hostile one can only make fetching slower. Its text form:
//!
//! ```text
//! incfs-profile 1
//! <first block> <block count> <path>
//! ```
//!
//! One entry per line, in first-read order. Paths are relative to the image root; bytes that
//! are not printable (controls, whitespace, `\`, invalid UTF-8) are written as `\xNN`.

use std::collections::HashMap;

/// First line of every profile.
pub const PROFILE_HEADER: &str = "incfs-profile 1";
/// Largest profile accepted (a hostile server cannot make a mount parse gigabytes).
pub const MAX_PROFILE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileEntry {
    /// Path relative to the image root, raw bytes.
    pub path: Vec<u8>,
    pub start: u64,
    pub count: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub entries: Vec<ProfileEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("not an incfs profile (the first line must be {PROFILE_HEADER:?})")]
    Header,
    #[error("profile is larger than {MAX_PROFILE_BYTES} bytes")]
    TooLarge,
    #[error("profile line {line}: {reason}")]
    Line { line: usize, reason: &'static str },
}

/// Write `path` with every byte that is not plainly printable (controls, whitespace, `\`,
/// invalid UTF-8) escaped as `\xNN`, so it is one space-free word.
pub fn escape_path(path: &[u8]) -> String {
    crate::manifest::escape_path_where(path, |c| c.is_control() || c.is_whitespace())
}

/// The inverse of [`escape_path`].
pub fn unescape_path(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let hex = b.get(i + 1..i + 4)?;
            if hex[0] != b'x' {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(&hex[1..]).ok()?, 16).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

impl Profile {
    pub fn parse(bytes: &[u8]) -> Result<Profile, ProfileError> {
        if bytes.len() > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooLarge);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| ProfileError::Line { line: 0, reason: "not UTF-8" })?;
        let mut lines = text.lines();
        if lines.next().map(str::trim_end) != Some(PROFILE_HEADER) {
            return Err(ProfileError::Header);
        }
        let mut entries = Vec::new();
        for (n, line) in lines.enumerate() {
            let line_no = n + 2;
            let bad = |reason| ProfileError::Line { line: line_no, reason };
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(3, ' ');
            let start = parts.next().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| bad("bad first block"))?;
            let count = parts.next().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| bad("bad block count"))?;
            let path = parts.next().and_then(unescape_path).ok_or_else(|| bad("bad path"))?;
            if count == 0 || start.checked_add(count).is_none() {
                return Err(bad("empty or overflowing block range"));
            }
            if path.is_empty() || path.starts_with(b"/") {
                return Err(bad("path must be relative to the image root"));
            }
            entries.push(ProfileEntry { path, start, count });
        }
        Ok(Profile { entries })
    }

    pub fn encode(&self) -> String {
        let mut out = format!("{PROFILE_HEADER}\n");
        for e in &self.entries {
            out.push_str(&format!("{} {} {}\n", e.start, e.count, escape_path(&e.path)));
        }
        out
    }

    /// Paths in order of first appearance, each once.
    pub fn paths(&self) -> Vec<&[u8]> {
        let mut seen = std::collections::HashSet::new();
        self.entries.iter().filter(|e| seen.insert(e.path.as_slice())).map(|e| e.path.as_slice()).collect()
    }
}

/// Builds a profile from reads as they happen: only the first read of each block counts, and a
/// read that continues the previous entry of the same file extends it.
#[derive(Debug, Default)]
pub struct Recorder {
    profile: Profile,
    /// Per file: blocks seen, as sorted disjoint ranges (reads are mostly sequential, so few).
    seen: HashMap<Vec<u8>, Vec<std::ops::Range<u64>>>,
    /// Index of the last entry of each file, to extend it.
    last_entry: HashMap<Vec<u8>, usize>,
}

impl Recorder {
    /// Continue a recording saved as `profile` (by a daemon that was replaced meanwhile).
    pub fn resume(profile: &Profile) -> Recorder {
        let mut r = Recorder::default();
        for e in &profile.entries {
            r.read(&e.path, e.start..e.start.saturating_add(e.count));
        }
        r
    }

    /// Record a read of blocks `blocks` of `path`; returns whether anything new was recorded.
    pub fn read(&mut self, path: &[u8], blocks: std::ops::Range<u64>) -> bool {
        if blocks.is_empty() {
            return false;
        }
        let seen = self.seen.entry(path.to_vec()).or_default();
        let mut changed = false;
        for new in subtract(blocks, seen) {
            changed = true;
            insert_range(seen, new.clone());
            let newest = self.profile.entries.len().checked_sub(1);
            let last = self.last_entry.get(path).copied().filter(|&i| Some(i) == newest);
            match last.map(|i| &mut self.profile.entries[i]) {
                // Extend only the newest entry of all, so the recorded order stays exact.
                Some(e) if e.start + e.count == new.start => e.count += new.end - new.start,
                _ => {
                    self.profile.entries.push(ProfileEntry {
                        path: path.to_vec(),
                        start: new.start,
                        count: new.end - new.start,
                    });
                    self.last_entry.insert(path.to_vec(), self.profile.entries.len() - 1);
                }
            }
        }
        changed
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }
}

/// The parts of `r` not covered by `have` (sorted, disjoint).
fn subtract(r: std::ops::Range<u64>, have: &[std::ops::Range<u64>]) -> Vec<std::ops::Range<u64>> {
    let mut out = Vec::new();
    let mut at = r.start;
    for h in have {
        if h.end <= at {
            continue;
        }
        if h.start >= r.end {
            break;
        }
        if h.start > at {
            out.push(at..h.start);
        }
        at = at.max(h.end);
    }
    if at < r.end {
        out.push(at..r.end);
    }
    out
}

fn insert_range(v: &mut Vec<std::ops::Range<u64>>, r: std::ops::Range<u64>) {
    let pos = v.partition_point(|x| x.start < r.start);
    v.insert(pos, r);
    // Merge neighbours that touch.
    let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(v.len());
    for x in v.drain(..) {
        match merged.last_mut() {
            Some(m) if m.end >= x.start => m.end = m.end.max(x.end),
            _ => merged.push(x),
        }
    }
    *v = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_hostile_paths() {
        let p = Profile {
            entries: vec![
                ProfileEntry { path: b"a b/\\c\n\xff".to_vec(), start: 3, count: 2 },
                ProfileEntry { path: "d\u{e9}j\u{e0}/x".as_bytes().to_vec(), start: 0, count: 1 },
            ],
        };
        let text = p.encode();
        assert_eq!(text.lines().count(), 3, "one line per entry: {text}");
        assert_eq!(Profile::parse(text.as_bytes()).unwrap(), p);
        assert_eq!(p.paths().len(), 2);
    }

    #[test]
    fn rejects_bad_profiles() {
        assert_eq!(Profile::parse(b"hello\n"), Err(ProfileError::Header));
        for bad in ["1 0 a", "x 1 a", "1 1 /abs", "1 1 a\\x4", "18446744073709551615 2 a", "1 1"] {
            let text = format!("{PROFILE_HEADER}\n{bad}\n");
            assert!(matches!(Profile::parse(text.as_bytes()), Err(ProfileError::Line { line: 2, .. })), "{bad}");
        }
        assert_eq!(Profile::parse(&vec![b' '; MAX_PROFILE_BYTES + 1]), Err(ProfileError::TooLarge));
    }

    #[test]
    fn recorder_keeps_first_reads_in_order() {
        let mut r = Recorder::default();
        assert!(r.read(b"a", 0..4));
        assert!(r.read(b"a", 4..8), "sequential read extends");
        assert!(!r.read(b"a", 2..6), "nothing new");
        assert!(r.read(b"b", 0..1));
        assert!(r.read(b"a", 6..10), "only 8..10 is new, and a new entry (b came between)");
        assert!(r.read(b"b", 1..2));
        let e: Vec<(&[u8], u64, u64)> =
            r.profile().entries.iter().map(|e| (e.path.as_slice(), e.start, e.count)).collect();
        assert_eq!(e, vec![(&b"a"[..], 0, 8), (b"b", 0, 1), (b"a", 8, 2), (b"b", 1, 1)]);
    }

    #[test]
    fn a_resumed_recording_goes_on_as_if_never_stopped() {
        let mut whole = Recorder::default();
        let mut first = Recorder::default();
        let reads: [(&[u8], std::ops::Range<u64>); 5] =
            [(b"a", 0..4), (b"b", 0..1), (b"a", 4..8), (b"a", 2..6), (b"b", 1..3)];
        for (i, (path, blocks)) in reads.iter().enumerate() {
            whole.read(path, blocks.clone());
            if i < 3 {
                first.read(path, blocks.clone());
            }
        }
        let mut resumed = Recorder::resume(&first.profile().clone());
        for (path, blocks) in &reads[3..] {
            resumed.read(path, blocks.clone());
        }
        assert_eq!(resumed.profile(), whole.profile());
    }

    #[test]
    fn subtract_and_insert() {
        assert_eq!(subtract(0..10, &[2..3, 5..7]), vec![0..2, 3..5, 7..10]);
        let mut v = vec![0..2, 5..7];
        insert_range(&mut v, 2..5);
        assert_eq!(v, vec![0..7]);
    }
}
