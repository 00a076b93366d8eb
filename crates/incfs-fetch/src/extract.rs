//! `incfs extract`: write a whole image out to a local directory, every block verified.
//!
//! Directories are made first, then file contents (several files at once), then symlinks,
//! special files and hard links, and finally ownership, permissions, extended attributes and
//! times, directories last and deepest first so that writing into them does not disturb their
//! times. Paths are built only from validated entry names under directories this function
//! created, so no name can escape the destination.
//!
//! Other local users who can write the destination cannot redirect any of this (by swapping a
//! directory or file for a symlink between two steps): the tree is built in a private staging
//! directory inside the destination (0700, checked to be ours), always reached through
//! `/proc/self/fd/N` of a handle opened on it once, never by a name another user could
//! replace; files are created with `O_EXCL`. Only when every entry is written and has its
//! metadata are the top-level entries renamed into the destination, and the image root's
//! metadata applied to the destination through its own handle.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};

use incfs_format::manifest::{display_path, FileData, Inode, InodeKind};
use incfs_format::Codec;

use crate::image::{Held as HeldBytes, Image};
use crate::window;
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

/// A directory held open, and the path that reaches exactly it (`/proc/self/fd/N`) whatever
/// happens to its name.
struct Held {
    dir: File,
    path: PathBuf,
}

impl Held {
    fn open(path: &Path) -> std::io::Result<Held> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(path)?;
        // "/." so that calls that do not follow a last symlink (lchown, lsetxattr, utimensat
        // with AT_SYMLINK_NOFOLLOW) act on the directory, not on the /proc link.
        let path = PathBuf::from(format!("/proc/self/fd/{}/.", dir.as_raw_fd()));
        if !path.is_dir() {
            return Err(std::io::Error::other("/proc is not mounted: it is needed to extract safely"));
        }
        Ok(Held { dir, path })
    }
}

/// Make a private staging directory in `dest` (held) and return it with its name.
fn staging(dest: &Held, shown: &Path) -> Result<(Held, PathBuf), ExtractError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    for attempt in 0..16u32 {
        let name = PathBuf::from(format!(".incfs-extract-{}-{attempt}", std::process::id()));
        let at = dest.path.join(&name);
        match fs::DirBuilder::new().mode(0o700).create(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(shown)(e)),
        }
        let held = Held::open(&at).map_err(io(&shown.join(&name)))?;
        let m = held.dir.metadata().map_err(io(&shown.join(&name)))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        if m.uid() != unsafe { libc::geteuid() } || m.mode() & 0o777 != 0o700 {
            let e = std::io::Error::other("the staging directory was replaced by someone else's; refusing");
            return Err(io(&shown.join(&name))(e));
        }
        return Ok((held, name));
    }
    Err(io(shown)(std::io::Error::other("cannot create a staging directory")))
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
    let target = Held::open(dest).map_err(io(dest))?;
    let (stage, name) = staging(&target, dest)?;
    // Messages name the destination, not the /proc handle paths.
    let shown = |e: ExtractError| match e {
        ExtractError::Io { path, source } => {
            let path = match path.strip_prefix(&stage.path).or_else(|_| path.strip_prefix(&target.path)) {
                Ok(rel) => dest.join(rel),
                Err(_) => path,
            };
            ExtractError::Io { path, source }
        }
        e => e,
    };
    let result = async {
        let summary = extract_into(image, &stage.path, progress).await?;
        // Every entry written and with its metadata: move the top level into the destination.
        for e in fs::read_dir(&stage.path).map_err(io(&stage.path))? {
            let e = e.map_err(io(&stage.path))?;
            let to = target.path.join(e.file_name());
            fs::rename(e.path(), &to).map_err(io(&to))?;
        }
        // Gone already if another user who can write the destination moved it: theirs now.
        let _ = fs::remove_dir(target.path.join(&name));
        apply_metadata(&target.path, &image.manifest().inodes[0])?;
        Ok(summary)
    }
    .await
    .map_err(shown);
    if result.is_err() {
        let _ = fs::remove_dir_all(&stage.path);
        let _ = fs::remove_dir(target.path.join(&name));
    }
    result
}

/// Write the whole tree of `image` into `dest`, an empty directory only we can reach; the
/// image root's own metadata is left to the caller.
async fn extract_into(image: &Image, dest: &Path, progress: &dyn ByteProgress) -> Result<ExtractSummary, ExtractError> {
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
    // Files read in windows (one request for many); empty files have none and are made here.
    let datas: Vec<FileData> = files.iter().map(|(_, _, f)| *f).collect();
    for (rel, path, f) in files.iter().filter(|(_, _, f)| f.meta.is_none()) {
        write_file(image, rel, path, f, progress, None).await?;
    }
    let results: Vec<Result<(), ExtractError>> = stream::iter(window::plan(&datas, m.objects.len()))
        .map(|w| {
            let files = &files;
            async move {
                let held = w.fetch(image).await;
                for &i in &w.files {
                    let (rel, path, f) = &files[i];
                    write_file(image, rel, path, f, progress, held.as_ref()).await?;
                }
                Ok(())
            }
        })
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
        if first_path[inode] == path && !rel.is_empty() {
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
    held: Option<&HeldBytes>,
) -> Result<(), ExtractError> {
    let out = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io(path))?
    };
    let data_err = |message: String| ExtractError::Data { path: display_path(rel), message };
    let meta = image.file_meta_in(f, held).await.map_err(|e| data_err(e.to_string()))?;
    let n = meta.records.len() as u64;
    let mut start = 0;
    while start < n {
        let end = (start + BATCH_BLOCKS).min(n);
        let blocks = image.read_blocks_in(&meta, start..end, held).await;
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
