//! `incfs extract`: write a whole image out to a local directory, every block verified.
//!
//! Directories are made first, then file contents (several files at once), then symlinks,
//! special files and hard links, and finally ownership, permissions, extended attributes and
//! times, directories last and deepest first so that writing into them does not disturb their
//! times. Paths are built only from validated entry names under directories this function
//! created, so no name can escape the destination.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};

use incfs_format::manifest::{display_path, FileData, Inode, InodeKind};
use incfs_format::Codec;

use crate::image::Image;
use crate::ByteProgress;

const FILE_CONCURRENCY: usize = 8;
const BATCH_BLOCKS: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is not empty; extract into a new or empty directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("{path}: {message}")]
    Data { path: String, message: String },
}

/// Totals of one extraction.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtractSummary {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExtractError + '_ {
    move |source| ExtractError::Io { path: path.to_path_buf(), source }
}

fn join(dest: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        dest.to_path_buf()
    } else {
        dest.join(OsStr::from_bytes(rel))
    }
}

/// Extract `image` into `dest`, which must not exist or be empty.
pub async fn extract(image: &Image, dest: &Path, progress: &dyn ByteProgress) -> Result<ExtractSummary, ExtractError> {
    match fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(ExtractError::NotEmpty(dest.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::create_dir_all(dest).map_err(io(dest))?,
        Err(e) => return Err(io(dest)(e)),
    }
    let m = image.manifest();
    let entries = m.walk();
    let mut first_path: HashMap<u32, PathBuf> = HashMap::new();
    let mut files = Vec::new();
    for (rel, inode) in &entries {
        let path = join(dest, rel);
        if matches!(m.inodes[*inode as usize].kind, InodeKind::Dir) && !rel.is_empty() {
            fs::create_dir(&path).map_err(io(&path))?;
        }
        if let InodeKind::File(f) = &m.inodes[*inode as usize].kind {
            if !first_path.contains_key(inode) {
                files.push((rel.clone(), path.clone(), *f));
            }
        }
        first_path.entry(*inode).or_insert(path);
    }
    let total: u64 = files.iter().map(|(_, _, f)| f.size).sum();
    progress.start(total);
    let results: Vec<Result<(), ExtractError>> = stream::iter(files.iter())
        .map(|(rel, path, f)| write_file(image, rel, path, f, progress))
        .buffer_unordered(FILE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), _>>()?;

    for (rel, inode) in &entries {
        let path = join(dest, rel);
        let node = &m.inodes[*inode as usize];
        let first = &first_path[inode];
        if first != &path {
            fs::hard_link(first, &path).map_err(io(&path))?;
            continue;
        }
        match &node.kind {
            InodeKind::Symlink(target) => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path).map_err(io(&path))?
            }
            InodeKind::Fifo => mknod(&path, libc::S_IFIFO, 0)?,
            InodeKind::CharDev { major, minor } => mknod(&path, libc::S_IFCHR, libc::makedev(*major, *minor))?,
            InodeKind::BlockDev { major, minor } => mknod(&path, libc::S_IFBLK, libc::makedev(*major, *minor))?,
            InodeKind::File(_) | InodeKind::Dir => {}
        }
    }
    // Metadata: non-directories, then directories deepest first.
    let is_dir = |i: &u32| matches!(m.inodes[*i as usize].kind, InodeKind::Dir);
    for (rel, inode) in
        entries.iter().filter(|(_, i)| !is_dir(i)).chain(entries.iter().rev().filter(|(_, i)| is_dir(i)))
    {
        let path = join(dest, rel);
        if first_path[inode] == path {
            apply_metadata(&path, &m.inodes[*inode as usize])?;
        }
    }
    Ok(ExtractSummary { entries: entries.len() as u64, files: files.len() as u64, bytes: total })
}

fn mknod(path: &Path, kind: libc::mode_t, dev: libc::dev_t) -> Result<(), ExtractError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io(path)(e.into()))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) } != 0 {
        return Err(io(path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

async fn write_file(
    image: &Image,
    rel: &[u8],
    path: &Path,
    f: &FileData,
    progress: &dyn ByteProgress,
) -> Result<(), ExtractError> {
    let out = File::create(path).map_err(io(path))?;
    let data_err = |message: String| ExtractError::Data { path: display_path(rel), message };
    let meta = image.file_meta(f).await.map_err(|e| data_err(e.to_string()))?;
    let n = meta.records.len() as u64;
    let mut start = 0;
    while start < n {
        let end = (start + BATCH_BLOCKS).min(n);
        let blocks = image.read_blocks(&meta, start..end).await;
        for (i, b) in (start..end).zip(blocks) {
            let block = b.map_err(|e| data_err(format!("block {i}: {e}")))?;
            // Holes stay holes: zero blocks are not written.
            if meta.records[i as usize].codec != Codec::Zero {
                let len = (f.size - i * 4096).min(4096) as usize;
                out.write_all_at(&block[..len], i * 4096).map_err(io(path))?;
            }
        }
        progress.advance(((end - start) * 4096).min(f.size - start * 4096));
        start = end;
    }
    out.set_len(f.size).map_err(io(path))?;
    Ok(())
}

fn apply_metadata(path: &Path, inode: &Inode) -> Result<(), ExtractError> {
    let symlink = matches!(inode.kind, InodeKind::Symlink(_));
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::lchown(path, Some(inode.meta.uid), Some(inode.meta.gid)).map_err(io(path))?;
    }
    if !symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(inode.meta.mode.into())).map_err(io(path))?;
    }
    for x in &inode.xattrs {
        if let Err(e) = xattr::set(path, OsStr::from_bytes(&x.name), &x.value) {
            tracing::warn!(
                "{}: cannot set extended attribute {}: {e}",
                path.display(),
                String::from_utf8_lossy(&x.name)
            );
        }
    }
    let t = filetime::FileTime::from_unix_time(inode.meta.mtime_sec, inode.meta.mtime_nsec);
    filetime::set_symlink_file_times(path, t, t).map_err(io(path))
}
