//! `incfs verify`: check a whole image and report every problem with its path and block.
//!
//! The signature is checked when the image is opened. Here every object's presence and size is
//! checked, then every file's tree against its signed root, then every block against its tree.
//! Problems are collected, not fatal: one damaged object must not hide the others.
//! The files of an object are read in windows ([`crate::window`]): one request for many files.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{self, StreamExt};
use parking_lot::Mutex;

use incfs_format::manifest::{display_path, FileData, InodeKind, MetaRef};
use incfs_format::{layout, Codec};

use crate::image::{BlockFault, Held, Image};
use crate::source::SourceError;
use crate::window;
use crate::ByteProgress;

/// Windows of files checked at once.
const FILE_CONCURRENCY: usize = 8;
/// Blocks read per batch within a file (bounds memory per file to 4 MiB).
const BATCH_BLOCKS: u64 = 1024;

/// One thing wrong with an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (escaped for display) or object concerned.
    pub subject: String,
    /// The blocks concerned, if the problem is about blocks.
    pub blocks: Option<Range<u64>>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.blocks {
            Some(b) if b.end - b.start == 1 => {
                write!(f, "{}: block {}: {}", self.subject, b.start, self.message)
            }
            Some(b) => write!(f, "{}: blocks {}-{}: {}", self.subject, b.start, b.end - 1, self.message),
            None => write!(f, "{}: {}", self.subject, self.message),
        }
    }
}

/// The outcome of a full check.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub problems: Vec<Problem>,
    pub files: u64,
    pub blocks: u64,
    /// File bytes covered by the check.
    pub bytes: u64,
}

/// Check everything in `image`.
pub async fn verify_image(image: &Image, progress: &dyn ByteProgress) -> VerifyReport {
    let m = image.manifest();
    let problems = Mutex::new(Vec::new());
    let blocks = AtomicU64::new(0);

    // Objects first: a missing or truncated object explains the block errors that follow. A
    // missing object is a problem only if this version reads from it: `incfs prune` removes
    // those only older versions used, which later tables still list.
    let sizes: Vec<_> = stream::iter(m.objects.iter())
        .map(|o| async move {
            let key = layout::object(&o.digest);
            match image.source().size(&key).await {
                Ok(size) if size == o.size => None,
                Ok(size) => {
                    Some(Ok(format!("{key} is {size} bytes but the manifest says {} (truncated or replaced)", o.size)))
                }
                Err(SourceError::NotFound { .. }) => Some(Err(format!("{key} is missing"))),
                Err(e) => Some(Ok(e.to_string())),
            }
        })
        .buffered(16)
        .collect()
        .await;
    let mut missing = Vec::new();
    for (i, p) in sizes.into_iter().enumerate() {
        match p {
            Some(Err(message)) => missing.push((i as u32, message)),
            Some(Ok(message)) => {
                problems.lock().push(Problem { subject: format!("object {i}"), blocks: None, message })
            }
            None => {}
        }
    }
    let used = Mutex::new(std::collections::HashSet::new());

    // One check per distinct file content (hard links and duplicate files share a region).
    let mut files: HashMap<Option<MetaRef>, (Vec<u8>, FileData)> = HashMap::new();
    for (path, inode) in m.walk() {
        if let InodeKind::File(f) = &m.inodes[inode as usize].kind {
            if f.meta.is_some() {
                files.entry(f.meta).or_insert((path, *f));
            }
        }
    }
    let mut files: Vec<_> = files.into_values().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let total: u64 = files.iter().map(|(_, f)| f.size).sum();
    progress.start(total);

    let datas: Vec<FileData> = files.iter().map(|(_, f)| *f).collect();
    stream::iter(window::plan(&datas, m.objects.len()))
        .for_each_concurrent(FILE_CONCURRENCY, |w| {
            let (problems, blocks, used, files) = (&problems, &blocks, &used, &files);
            async move {
                // A window that cannot be fetched is no finding by itself: its files are then
                // read as if alone, and say what is wrong with them.
                let held = w.fetch(image).await;
                for &i in &w.files {
                    let (path, f) = &files[i];
                    let found = verify_file(image, f, progress, used, held.as_ref()).await;
                    blocks.fetch_add(incfs_verity::block_count(f.size), Ordering::Relaxed);
                    let subject = display_path(path);
                    problems.lock().extend(found.into_iter().map(|(blocks, message)| Problem {
                        subject: subject.clone(),
                        blocks,
                        message,
                    }));
                }
            }
        })
        .await;

    let used = used.into_inner();
    let mut problems = problems.into_inner();
    for (i, message) in missing.into_iter().filter(|(i, _)| used.contains(i)) {
        problems.push(Problem { subject: format!("object {i}"), blocks: None, message });
    }
    problems.sort_by(|a, b| {
        (&a.subject, a.blocks.as_ref().map(|r| r.start)).cmp(&(&b.subject, b.blocks.as_ref().map(|r| r.start)))
    });
    VerifyReport { problems, files: files.len() as u64, blocks: blocks.into_inner(), bytes: total }
}

/// Problems of one file, consecutive blocks with the same fault merged into one range.
async fn verify_file(
    image: &Image,
    f: &FileData,
    progress: &dyn ByteProgress,
    used: &Mutex<std::collections::HashSet<u32>>,
    held: Option<&Held>,
) -> Vec<(Option<Range<u64>>, String)> {
    if let Some(m) = f.meta {
        used.lock().insert(m.object);
    }
    let meta = match image.file_meta_in(f, held).await {
        Ok(m) => m,
        Err(e) => {
            progress.advance(f.size);
            return vec![(None, e.to_string())];
        }
    };
    used.lock().extend(meta.records.iter().filter(|r| r.codec != Codec::Zero).map(|r| r.object));
    let n = meta.records.len() as u64;
    let mut out: Vec<(Option<Range<u64>>, String)> = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + BATCH_BLOCKS).min(n);
        for (i, r) in (start..end).zip(image.read_blocks_in(&meta, start..end, held).await) {
            if let Err(fault) = r {
                let rec = &meta.records[i as usize];
                let message = match fault {
                    BlockFault::Mismatch if rec.codec != Codec::Zero => {
                        format!("{fault} (object {} bytes {}..{})", rec.object, rec.offset, rec.range().end)
                    }
                    _ => fault.to_string(),
                };
                match out.last_mut() {
                    Some((Some(range), m)) if range.end == i && *m == message => range.end = i + 1,
                    _ => out.push((Some(i..i + 1), message)),
                }
            }
        }
        progress.advance(((end - start) * 4096).min(f.size - start * 4096));
        start = end;
    }
    out
}
