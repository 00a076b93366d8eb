//! Walk a source tree into inodes and directory entries, without reading file contents.
//!
//! Nothing is ever followed: a symlink is recorded as a symlink whatever it points at, even
//! outside the tree. Entries are visited in byte order of their names so that the same tree
//! always gives the same inode numbers. Regular files with several names (hard links) become one
//! inode. Sockets cannot be meaningfully published and are skipped with a warning; fifos and
//! device nodes are recorded as such (a mount shows them, and `nodev` keeps devices inert).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use incfs_format::manifest::{Dirent, InodeKind, Metadata, Xattr, MAX_SYMLINK_LEN, MAX_XATTR_VALUE_LEN};

use rayon::prelude::*;

use crate::PackError;

/// An inode found in the source tree; regular files carry their path and size for later.
pub(crate) struct ScannedInode {
    pub meta: Metadata,
    pub xattrs: Vec<Xattr>,
    pub kind: ScannedKind,
}

pub(crate) enum ScannedKind {
    File { path: PathBuf, size: u64 },
    Other(InodeKind),
}

pub(crate) struct Scan {
    pub inodes: Vec<ScannedInode>,
    pub dirents: Vec<Dirent>,
    pub skipped: Vec<PathBuf>,
    pub file_bytes: u64,
    pub file_count: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
    move |source| PackError::Io { path: path.to_path_buf(), source }
}

fn metadata_of(md: &fs::Metadata) -> Metadata {
    Metadata {
        mode: (md.mode() & 0o7777) as u16,
        uid: md.uid(),
        gid: md.gid(),
        mtime_sec: md.mtime(),
        mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
    }
}

/// Extended attributes of `path` (not following symlinks), sorted by name. Filesystems without
/// xattr support simply have none.
fn xattrs_of(path: &Path) -> Result<Vec<Xattr>, PackError> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(value) = xattr::get(path, &name).map_err(io_err(path))? else {
            continue;
        };
        if value.len() > MAX_XATTR_VALUE_LEN || name.len() > 255 {
            return Err(PackError::Unsupported {
                path: path.to_path_buf(),
                what: "an extended attribute larger than Linux allows".into(),
            });
        }
        out.push(Xattr { name: name.into_vec(), value });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One entry of a directory as listed: everything the scan needs from the filesystem, gathered
/// on the thread pool (lstat, extended attributes and link targets are most of a scan's time).
struct Listed {
    name: OsString,
    path: PathBuf,
    md: fs::Metadata,
    xattrs: Vec<Xattr>,
    /// A symlink's target.
    target: Option<Vec<u8>>,
    /// A directory's own listing: its index in the listings.
    listing: Option<usize>,
}

/// The entries of `dir` in byte order of their names, with their metadata.
fn list_dir(dir: &Path) -> Result<Vec<Listed>, PackError> {
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names
        .into_par_iter()
        .with_min_len(8)
        .map(|name| {
            let path = dir.join(&name);
            let md = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let ft = md.file_type();
            if ft.is_socket() {
                return Ok(Listed { name, path, md, xattrs: Vec::new(), target: None, listing: None });
            }
            let target = if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err(&path))?.into_os_string().into_vec();
                if target.len() > MAX_SYMLINK_LEN {
                    return Err(PackError::Unsupported { path, what: "a symlink target over 4095 bytes".into() });
                }
                Some(target)
            } else {
                None
            };
            let xattrs = xattrs_of(&path)?;
            Ok(Listed { name, path, md, xattrs, target, listing: None })
        })
        .collect()
}

/// Every directory under `root` listed, level by level, the directories of a level in parallel
/// (no recursion: a deeply nested tree cannot overflow a stack). Index 0 is `root`'s listing.
fn list_tree(root: &Path) -> Result<Vec<Vec<Listed>>, PackError> {
    let mut listings: Vec<Vec<Listed>> = vec![Vec::new()];
    let mut level = vec![(0usize, root.to_path_buf())];
    while !level.is_empty() {
        let listed: Vec<Result<Vec<Listed>, PackError>> = level.par_iter().map(|(_, dir)| list_dir(dir)).collect();
        let mut next = Vec::new();
        for ((at, _), entries) in level.iter().zip(listed) {
            let mut entries = entries?;
            for e in entries.iter_mut().filter(|e| e.md.is_dir()) {
                e.listing = Some(listings.len());
                listings.push(Vec::new());
                next.push((listings.len() - 1, e.path.clone()));
            }
            listings[*at] = entries;
        }
        level = next;
    }
    Ok(listings)
}

pub(crate) fn scan(root: &Path) -> Result<Scan, PackError> {
    let md = fs::metadata(root).map_err(io_err(root))?;
    if !md.is_dir() {
        return Err(PackError::NotADirectory(root.to_path_buf()));
    }
    let mut s = Scan { inodes: Vec::new(), dirents: Vec::new(), skipped: Vec::new(), file_bytes: 0, file_count: 0 };
    s.inodes.push(ScannedInode {
        meta: metadata_of(&md),
        xattrs: xattrs_of(root)?,
        kind: ScannedKind::Other(InodeKind::Dir),
    });
    let mut listings = list_tree(root)?;
    let mut hard_links: HashMap<(u64, u64), u32> = HashMap::new();
    // Inodes are numbered depth first, a directory's entries together, in name order: the same
    // tree always gives the same numbers.
    let mut stack = vec![(0usize, 0u32)];
    while let Some((listing, dir_inode)) = stack.pop() {
        let mut subdirs = Vec::new();
        for e in std::mem::take(&mut listings[listing]) {
            let Listed { name, path, md, xattrs, target, listing } = e;
            let ft = md.file_type();
            if ft.is_socket() {
                tracing::warn!("skipping socket {}: sockets cannot be published", path.display());
                s.skipped.push(path);
                continue;
            }
            let key = (md.dev(), md.ino());
            let existing = (!ft.is_dir() && md.nlink() > 1).then(|| hard_links.get(&key).copied()).flatten();
            let inode = match existing {
                Some(i) => i,
                None => {
                    let index = u32::try_from(s.inodes.len()).map_err(|_| PackError::TooManyInodes)?;
                    let kind = if ft.is_file() {
                        s.file_bytes += md.len();
                        s.file_count += 1;
                        ScannedKind::File { path, size: md.len() }
                    } else if let Some(listing) = listing {
                        subdirs.push((listing, index));
                        ScannedKind::Other(InodeKind::Dir)
                    } else if let Some(target) = target {
                        ScannedKind::Other(InodeKind::Symlink(target))
                    } else if ft.is_fifo() {
                        ScannedKind::Other(InodeKind::Fifo)
                    } else {
                        let (major, minor) = (libc::major(md.rdev()), libc::minor(md.rdev()));
                        ScannedKind::Other(if ft.is_char_device() {
                            InodeKind::CharDev { major, minor }
                        } else {
                            InodeKind::BlockDev { major, minor }
                        })
                    };
                    if md.nlink() > 1 && !ft.is_dir() {
                        hard_links.insert(key, index);
                    }
                    s.inodes.push(ScannedInode { meta: metadata_of(&md), xattrs, kind });
                    index
                }
            };
            s.dirents.push(Dirent { parent: dir_inode, inode, name: name.into_vec() });
        }
        stack.extend(subdirs.into_iter().rev());
    }
    s.dirents.sort_by(|a, b| (a.parent, &a.name).cmp(&(b.parent, &b.name)));
    Ok(s)
}
