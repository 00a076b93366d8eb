//! The cache size limit: what a cache directory holds, by kind, and what to evict first.
//!
//! The limit is recorded in the cache itself (`CACHE/limit`, the number of bytes in decimal), so
//! every process sharing the cache honours the same one; a mount asking for a smaller limit
//! lowers it, a larger one does not raise it (`incfs cache limit` sets it exactly). Everything in
//! the directory counts, as `du -sb` counts it (apparent sizes, directories included).
//!
//! Eviction works on whole files, never on single blocks: a sealed segment with its journal, or
//! a plain copy. Recency is the file's modification time, which every process bumps when it reads
//! from the file (at most once a second per file: one clock read per block read, one `futimens`
//! per file per second), so that the least recently used file across all processes goes first.
//! Choosing is pure ([`choose`]); doing it is [`crate::segments`]'s.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The file recording the limit, in the cache directory.
pub const LIMIT_FILE: &str = "limit";

/// Bytes in a cache directory, by kind (apparent sizes, as `du -sb` counts them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Segment files: stored blocks, metadata pieces, and bytes no longer indexed.
    pub segments: u64,
    /// Their journals.
    pub journals: u64,
    /// Plain copies of complete files (FUSE passthrough), and copies being written.
    pub plain: u64,
    /// `store.db` and its WAL and shared-memory files.
    pub database: u64,
    /// Everything else: logs, the lock and limit files, directories.
    pub other: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.segments + self.journals + self.plain + self.database + self.other
    }
}

/// What can be evicted: a sealed segment (with its journal), or a plain copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Victim {
    Segment(u32),
    Plain(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Candidate {
    pub victim: Victim,
    /// Last use (modification time).
    pub used: SystemTime,
    /// Bytes it frees.
    pub bytes: u64,
}

/// Pick victims, least recently used first, until `need` more bytes fit beside `used` under
/// `limit`; `None` when even all of them would not make room.
pub fn choose(mut candidates: Vec<Candidate>, used: u64, need: u64, limit: u64) -> Option<Vec<Candidate>> {
    if need > limit {
        return None;
    }
    candidates.sort_by_key(|c| c.used);
    let mut freed = 0u64;
    let mut out = Vec::new();
    for c in candidates {
        if used.saturating_sub(freed) + need <= limit {
            break;
        }
        freed += c.bytes;
        out.push(c);
    }
    (used.saturating_sub(freed) + need <= limit).then_some(out)
}

fn segment_id(name: &str, suffix: &str) -> Option<u32> {
    name.strip_suffix(suffix).filter(|n| n.len() == 8).and_then(|n| n.parse().ok())
}

/// What `cache` holds, by kind.
pub fn scan(cache: &Path) -> std::io::Result<Usage> {
    Surveyor::default().scan(cache)
}

/// Everything that could be evicted now from `cache` (see [`Surveyor::candidates`]).
pub fn candidates(cache: &Path, skip: Option<u32>) -> std::io::Result<Vec<Candidate>> {
    Surveyor::default().candidates(cache, skip)
}

/// Measures a cache directory again and again, cheaply: the plain copies (possibly thousands
/// of files) are listed again only when their directory changed (a copy made or deleted) or
/// [`PLAIN_RELIST`] passed (recency of copies is that much behind at most); the segments (a few
/// dozen files) every time.
#[derive(Default)]
pub struct Surveyor {
    plain: parking_lot::Mutex<Option<PlainMemo>>,
}

struct PlainMemo {
    dir_mtime: SystemTime,
    at: std::time::Instant,
    bytes: u64,
    cands: Vec<Candidate>,
}

/// How long a listing of the plain copies is reused while their directory is unchanged.
pub const PLAIN_RELIST: std::time::Duration = std::time::Duration::from_secs(5);

impl Surveyor {
    /// The plain copies' bytes and candidates.
    fn plain(&self, cache: &Path) -> std::io::Result<(u64, Vec<Candidate>)> {
        let dir = cache.join("plain");
        let dir_mtime = match std::fs::metadata(&dir) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Vec::new())),
            Err(e) => return Err(e),
        };
        let mut memo = self.plain.lock();
        if let Some(m) = memo.as_ref().filter(|m| m.dir_mtime == dir_mtime && m.at.elapsed() < PLAIN_RELIST) {
            return Ok((m.bytes, m.cands.clone()));
        }
        let (mut bytes, mut cands) = (0, Vec::new());
        for e in read_dir_or_empty(&dir)? {
            let e = e?;
            let Ok(m) = e.metadata() else { continue };
            bytes += m.len();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue; // a copy being written
            }
            let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            cands.push(Candidate { victim: Victim::Plain(e.path()), used, bytes: m.len() });
        }
        *memo = Some(PlainMemo { dir_mtime, at: std::time::Instant::now(), bytes, cands: cands.clone() });
        Ok((bytes, cands))
    }

    /// What `cache` holds, by kind.
    pub fn scan(&self, cache: &Path) -> std::io::Result<Usage> {
        let mut u = walk(cache)?;
        u.plain = self.plain(cache)?.0;
        Ok(u)
    }

    /// Everything that could be evicted now from `cache`: segments other than `skip` (this
    /// process's own segment; other processes' current segments are found locked when
    /// evicting), pinned ones excepted, and plain copies.
    pub fn candidates(&self, cache: &Path, skip: Option<u32>) -> std::io::Result<Vec<Candidate>> {
        let mut out = segment_candidates(cache, skip)?;
        out.extend(self.plain(cache)?.1);
        Ok(out)
    }
}

/// What `cache` holds but the plain copies' bytes (the `plain` directory itself is not listed).
fn walk(cache: &Path) -> std::io::Result<Usage> {
    let mut u = Usage::default();
    let plain = cache.join("plain");
    let mut dirs = vec![cache.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        u.other += std::fs::symlink_metadata(&dir).map(|m| m.len()).unwrap_or(0);
        for e in rd {
            let e = e?;
            // Files come and go under other processes: one gone since listed counts nothing.
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                if e.path() == plain {
                    u.other += m.len();
                } else {
                    dirs.push(e.path());
                }
                continue;
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            let in_data = dir.file_name().is_some_and(|n| n == "data") && dir.parent() == Some(cache);
            let slot = if in_data && segment_id(&name, ".seg").is_some() {
                &mut u.segments
            } else if in_data && segment_id(&name, ".jnl").is_some() {
                &mut u.journals
            } else if dir == cache && name.starts_with("store.db") {
                &mut u.database
            } else {
                &mut u.other
            };
            *slot += m.len();
        }
    }
    Ok(u)
}

/// The segments that could be evicted: all but `skip` and pinned ones.
fn segment_candidates(cache: &Path, skip: Option<u32>) -> std::io::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    let data = cache.join("data");
    let mut journals = std::collections::HashMap::new();
    let mut segments = Vec::new();
    let mut pinned = std::collections::HashSet::new();
    for e in read_dir_or_empty(&data)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = segment_id(&name, ".jnl") {
            if let Ok(m) = e.metadata() {
                journals.insert(id, m.len());
            }
        } else if let Some(id) = segment_id(&name, ".pin") {
            pinned.insert(id);
        } else if let Some(id) = segment_id(&name, ".seg") {
            if let Ok(m) = e.metadata() {
                segments.push((id, m));
            }
        }
    }
    for (id, m) in segments {
        if Some(id) == skip || pinned.contains(&id) {
            continue;
        }
        let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let bytes = m.len() + journals.get(&id).copied().unwrap_or(0);
        out.push(Candidate { victim: Victim::Segment(id), used, bytes });
    }
    Ok(out)
}

/// The file key a plain copy is named after (its 40 bytes in hex).
pub fn plain_key(path: &Path) -> Option<crate::FileKey> {
    let name = path.file_name()?.to_str()?;
    if name.len() != 80 {
        return None;
    }
    let mut key = [0u8; 40];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

fn read_dir_or_empty(dir: &Path) -> std::io::Result<Box<dyn Iterator<Item = std::io::Result<std::fs::DirEntry>>>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(Box::new(rd)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Box::new(std::iter::empty())),
        Err(e) => Err(e),
    }
}

/// The limit recorded in `cache`, if any.
pub fn recorded(cache: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(cache.join(LIMIT_FILE)) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not a number of bytes; set it again with incfs cache limit", LIMIT_FILE),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Record `limit` exactly (`None`: no limit).
pub fn set(cache: &Path, limit: Option<u64>) -> std::io::Result<()> {
    let path = cache.join(LIMIT_FILE);
    match limit {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(n) => {
            let tmp = cache.join(format!(".{LIMIT_FILE}.{}", std::process::id()));
            std::fs::write(&tmp, format!("{n}\n"))?;
            std::fs::rename(&tmp, &path)
        }
    }
}

/// Record `limit` unless a smaller one is recorded; returns the limit in force.
pub fn lower(cache: &Path, limit: u64) -> std::io::Result<u64> {
    match recorded(cache)? {
        Some(old) if old <= limit => Ok(old),
        _ => set(cache, Some(limit)).map(|_| limit),
    }
}

/// Segment size under a limit: small enough that evicting one frees a small part of the cache
/// (a sixteenth), never below 1 MiB nor above the unlimited size.
pub fn segment_size(limit: Option<u64>, unlimited: u64) -> u64 {
    match limit {
        Some(l) => (l / 16).clamp(1 << 20, unlimited),
        None => unlimited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn c(id: u32, age: u64, bytes: u64) -> Candidate {
        let used = SystemTime::UNIX_EPOCH + Duration::from_secs(1000 - age);
        Candidate { victim: Victim::Segment(id), used, bytes }
    }

    #[test]
    fn oldest_go_first_and_only_as_many_as_needed() {
        let cands = vec![c(1, 10, 40), c(2, 30, 40), c(3, 20, 40)];
        let v = choose(cands.clone(), 100, 10, 100).unwrap();
        assert_eq!(v.iter().map(|c| c.victim.clone()).collect::<Vec<_>>(), vec![Victim::Segment(2)]);
        let v = choose(cands.clone(), 100, 50, 100).unwrap();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(choose(cands.clone(), 100, 90, 100).unwrap().len() == 3);
        assert!(choose(cands.clone(), 200, 90, 100).is_none(), "not enough to evict");
        assert!(choose(Vec::new(), 10, 200, 100).is_none(), "larger than the limit");
        assert!(choose(cands, 10, 20, 100).unwrap().is_empty(), "fits already");
    }

    #[test]
    fn usage_by_kind_and_the_recorded_limit() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::create_dir_all(d.join("plain")).unwrap();
        std::fs::write(d.join("data/00000001.seg"), [0; 100]).unwrap();
        std::fs::write(d.join("data/00000001.jnl"), [0; 10]).unwrap();
        std::fs::write(d.join("plain/ab"), [0; 1000]).unwrap();
        std::fs::write(d.join("store.db"), [0; 7]).unwrap();
        std::fs::write(d.join("daemon.log"), [0; 3]).unwrap();
        let u = scan(d).unwrap();
        assert_eq!((u.segments, u.journals, u.plain, u.database), (100, 10, 1000, 7));
        assert!(u.other >= 3, "{u:?}");
        let cands = candidates(d, None).unwrap();
        assert_eq!(cands.len(), 2);
        assert!(candidates(d, Some(1)).unwrap().iter().all(|c| matches!(c.victim, Victim::Plain(_))));
        std::fs::write(d.join("data/00000001.pin"), b"").unwrap();
        assert_eq!(candidates(d, None).unwrap().len(), 1, "a pinned segment is never a candidate");

        assert_eq!(recorded(d).unwrap(), None);
        assert_eq!(lower(d, 500).unwrap(), 500);
        assert_eq!(lower(d, 900).unwrap(), 500, "the smallest limit wins");
        assert_eq!(lower(d, 300).unwrap(), 300);
        set(d, Some(900)).unwrap();
        assert_eq!(recorded(d).unwrap(), Some(900));
        set(d, None).unwrap();
        assert_eq!(recorded(d).unwrap(), None);
        assert_eq!(segment_size(Some(64 << 20), 256 << 20), 4 << 20);
        assert_eq!(segment_size(Some(1 << 20), 256 << 20), 1 << 20);
        assert_eq!(segment_size(None, 256 << 20), 256 << 20);
    }
}
