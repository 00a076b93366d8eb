//! The FUSE face of a mount: attributes and directories straight from the signed manifest (no
//! network, ever), reads through the [`Reader`], and `EROFS` for every change.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use incfs_format::manifest::{display_path, Inode, InodeKind, Manifest};
use incfs_format::profile::Recorder;
use incfs_store::file_key;

use crate::plain::PlainCopies;
use crate::reader::{FileRef, Local, ReadFailure, Reader};
use crate::stats::{FailCause, Stats};

/// The image never changes under a mount, so the kernel may cache names and attributes long.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Readahead window bounds, in blocks: it doubles on sequential reads, resets on random ones.
const READAHEAD_START: u64 = 16;
const READAHEAD_MAX: u64 = 512;

/// errno for a read whose data could not be had in time (as kernel incfs: "timer expired").
pub const ETIME: i32 = libc::ETIME;
/// Complete files up to this size get their plain copy written during `open` and are passed
/// through at once; larger ones are copied in the background and passed through from a later
/// open. Copies are written at 110-280 MB/s (measured: store cold or in the page cache), so an
/// open waits at most about 70 ms.
const PLAIN_IN_OPEN_MAX: u64 = 8 << 20;

struct Handle {
    next_block: u64,
    window: u64,
    /// Inode whose passthrough this handle holds.
    passthrough: Option<u32>,
}

/// How an inode's open files are served. The kernel refuses to mix the two (an inode is either
/// in cached or in passthrough I/O mode while files are open), so this is tracked per inode.
#[derive(Default)]
struct IoMode {
    cached: u32,
    passthrough: u32,
    /// Shared by every passthrough open of the inode; dropped (closed) with the last.
    backing: Option<BackingId>,
}

/// What `incfs mount` chose for the FUSE side.
#[derive(Default)]
pub struct FsOptions {
    pub read_timeout: Duration,
    /// Plain copies for passthrough; `None`: passthrough off.
    pub plain: Option<Arc<PlainCopies>>,
    /// Records the first read of each block (an access profile).
    pub recorder: Option<Arc<Mutex<Recorder>>>,
}

pub struct IncFs {
    manifest: Arc<Manifest>,
    reader: Arc<Reader>,
    rt: tokio::runtime::Handle,
    read_timeout: Duration,
    nlinks: Vec<u32>,
    /// Parent of each directory inode (the root is its own parent).
    parents: Vec<u32>,
    /// Data blocks of all files, for statfs (the image never changes under the mount).
    data_blocks: u64,
    labels: Vec<Arc<str>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    plain: Option<Arc<PlainCopies>>,
    /// Cleared when the kernel refuses passthrough (no CAP_SYS_ADMIN, or no support).
    passthrough: AtomicBool,
    modes: Mutex<HashMap<u32, IoMode>>,
    /// Plain copies being written in the background.
    copying: Arc<Mutex<HashSet<[u8; 40]>>>,
    recorder: Option<Arc<Mutex<Recorder>>>,
    /// Raw path of each inode, kept only when recording a profile.
    paths: Vec<Arc<[u8]>>,
}

fn file_type(kind: &InodeKind) -> FileType {
    match kind {
        InodeKind::File(_) => FileType::RegularFile,
        InodeKind::Dir => FileType::Directory,
        InodeKind::Symlink(_) => FileType::Symlink,
        InodeKind::Fifo => FileType::NamedPipe,
        InodeKind::CharDev { .. } => FileType::CharDevice,
        InodeKind::BlockDev { .. } => FileType::BlockDevice,
    }
}

fn ts(sec: i64, nsec: u32) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

impl IncFs {
    pub fn new(manifest: Arc<Manifest>, reader: Arc<Reader>, rt: tokio::runtime::Handle, opts: FsOptions) -> Self {
        let nlinks = manifest.link_counts();
        let mut labels: Vec<Arc<str>> = vec![Arc::from(""); manifest.inodes.len()];
        let recording = opts.recorder.is_some();
        let mut paths: Vec<Arc<[u8]>> =
            if recording { vec![Arc::from(&b""[..]); manifest.inodes.len()] } else { vec![] };
        for (path, ino) in manifest.walk() {
            if labels[ino as usize].is_empty() {
                labels[ino as usize] = Arc::from(display_path(&path));
                if recording {
                    paths[ino as usize] = Arc::from(path.as_slice());
                }
            }
        }
        let mut parents = vec![0u32; manifest.inodes.len()];
        for d in &manifest.dirents {
            parents[d.inode as usize] = d.parent;
        }
        let data_blocks = manifest
            .inodes
            .iter()
            .map(|i| if let InodeKind::File(f) = &i.kind { incfs_verity::block_count(f.size) } else { 0 })
            .sum();
        IncFs {
            data_blocks,
            manifest,
            reader,
            rt,
            read_timeout: opts.read_timeout,
            nlinks,
            parents,
            labels,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            passthrough: AtomicBool::new(opts.plain.is_some()),
            plain: opts.plain,
            modes: Mutex::new(HashMap::new()),
            copying: Arc::new(Mutex::new(HashSet::new())),
            recorder: opts.recorder,
            paths,
        }
    }

    fn inode(&self, ino: INodeNo) -> Option<(u32, &Inode)> {
        let idx = ino.0.checked_sub(1)?;
        let i = u32::try_from(idx).ok()?;
        self.manifest.inodes.get(idx as usize).map(|n| (i, n))
    }

    fn attr(&self, idx: u32) -> FileAttr {
        let node = &self.manifest.inodes[idx as usize];
        let kind = file_type(&node.kind);
        let (size, rdev) = match &node.kind {
            InodeKind::File(f) => (f.size, 0),
            InodeKind::Dir => (4096, 0),
            InodeKind::Symlink(t) => (t.len() as u64, 0),
            InodeKind::Fifo => (0, 0),
            InodeKind::CharDev { major, minor } | InodeKind::BlockDev { major, minor } => {
                (0, libc::makedev(*major, *minor) as u32)
            }
        };
        let mtime = ts(node.meta.mtime_sec, node.meta.mtime_nsec);
        FileAttr {
            ino: INodeNo(idx as u64 + 1),
            size,
            // What the file occupies once complete: its 4 KiB blocks, in 512-byte units.
            blocks: size.div_ceil(4096) * 8,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: node.meta.mode,
            nlink: self.nlinks[idx as usize],
            uid: node.meta.uid,
            gid: node.meta.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file(&self, idx: u32) -> Option<FileRef> {
        match &self.manifest.inodes[idx as usize].kind {
            InodeKind::File(f) => Some(FileRef {
                data: *f,
                key: file_key(&f.root_hash, f.size),
                label: self.labels[idx as usize].clone(),
            }),
            _ => None,
        }
    }

    fn errno_for(&self, e: &ReadFailure) -> Errno {
        self.reader.stats.failed(e.cause);
        tracing::warn!("read failed ({:?}): {}", e.cause, e.message);
        match e.cause {
            FailCause::Timeout => Errno::from_i32(ETIME),
            _ => Errno::EIO,
        }
    }

    /// A backing id for passthrough of complete file `f` (inode `i`), if it can be had now:
    /// its verified plain copy, written during this open when small, else in the background.
    fn plain_backing(&self, i: u32, f: &FileRef, reply: &ReplyOpen) -> Option<BackingId> {
        let plain = self.plain.as_ref().filter(|p| p.fits(f.data.size))?;
        if self.modes.lock().unwrap().get(&i).is_some_and(|m| m.backing.is_some() || m.cached > 0) {
            return None;
        }
        if f.data.size > PLAIN_IN_OPEN_MAX && !plain.ready(&f.key) {
            if self.copying.lock().unwrap().insert(f.key) {
                let (plain, reader, copying, f) = (plain.clone(), self.reader.clone(), self.copying.clone(), f.clone());
                std::thread::spawn(move || {
                    if let Err(e) = plain.get(&reader, &f) {
                        tracing::warn!("{}: {e}", f.label);
                    }
                    copying.lock().unwrap().remove(&f.key);
                });
            }
            return None;
        }
        let file = match plain.get(&self.reader, f) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!("{}: {e}; reading it through the daemon", f.label);
                return None;
            }
        };
        match reply.open_backing(&file) {
            Ok(id) => Some(id),
            Err(e) => {
                if self.passthrough.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "FUSE passthrough refused by the kernel ({e}; it needs CAP_SYS_ADMIN): \
                         complete files are read through the daemon"
                    );
                }
                None
            }
        }
    }

    fn kind_of(&self, idx: u32) -> FileType {
        file_type(&self.manifest.inodes[idx as usize].kind)
    }
}

impl Filesystem for IncFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        // Listings return attributes too; lookups in one directory may run in parallel; symlink
        // targets are cached by the kernel (the image is immutable). Each is optional.
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        if self.passthrough.load(Ordering::Relaxed) {
            // Backing files live on an ordinary filesystem: one level of stacking.
            let ok =
                config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::warn!(
                    "the kernel does not offer FUSE passthrough: complete files are read through the daemon"
                );
                self.passthrough.store(false, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some((p, _)) = self.inode(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match self.manifest.lookup(p, name.as_bytes()) {
            Some(i) => reply.entry(&TTL, &self.attr(i), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inode(ino) {
            Some((i, _)) => reply.attr(&TTL, &self.attr(i)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inode(ino) {
            Some((_, Inode { kind: InodeKind::Symlink(t), .. })) => reply.data(t),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some((i, _)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(f) = self.file(i) else {
            return reply.error(Errno::EINVAL);
        };
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        if self.passthrough.load(Ordering::Relaxed) && f.data.size > 0 && self.reader.is_complete(&f) {
            let backing = self.plain_backing(i, &f, &reply);
            let mut modes = self.modes.lock().unwrap();
            let m = modes.entry(i).or_default();
            if m.cached == 0 {
                if m.backing.is_none() {
                    m.backing = backing;
                }
                if let Some(id) = &m.backing {
                    m.passthrough += 1;
                    let h = Handle { next_block: 0, window: 0, passthrough: Some(i) };
                    self.handles.lock().unwrap().insert(fh, h);
                    Stats::add(&self.reader.stats.opens_passthrough, 1);
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
                }
            }
        }
        if self.passthrough.load(Ordering::Relaxed) {
            let mut modes = self.modes.lock().unwrap();
            let m = modes.entry(i).or_default();
            if m.passthrough > 0 {
                // The kernel would refuse a cached open while passthrough opens exist; cannot
                // happen (passthrough needs a complete file, and a file stays complete), but be
                // exact rather than hand the reader an EIO from the kernel.
                if let Some(id) = &m.backing {
                    m.passthrough += 1;
                    self.handles.lock().unwrap().insert(fh, Handle { next_block: 0, window: 0, passthrough: Some(i) });
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
                }
            }
            m.cached += 1;
        }
        self.handles.lock().unwrap().insert(fh, Handle { next_block: 0, window: READAHEAD_START, passthrough: None });
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.inode(ino).and_then(|(i, _)| self.file(i)) else {
            return reply.error(Errno::ENOENT);
        };
        let first_block = offset / 4096;
        let next_block = (offset + size as u64).div_ceil(4096);
        let readahead = {
            let mut h = self.handles.lock().unwrap();
            let ra = h.entry(fh.0).or_insert(Handle { next_block: 0, window: READAHEAD_START, passthrough: None });
            let sequential = first_block == ra.next_block || first_block + 1 == ra.next_block;
            ra.window = if sequential { (ra.window * 2).clamp(READAHEAD_START, READAHEAD_MAX) } else { 0 };
            ra.next_block = next_block;
            ra.window
        };
        if let Some(rec) = &self.recorder {
            if let Some(path) = self.inode(ino).map(|(i, _)| self.paths[i as usize].clone()) {
                rec.lock().unwrap().read(&path, first_block..next_block.min(incfs_verity::block_count(f.data.size)));
            }
        }
        let result = match self.reader.read_local(&f, offset, size) {
            Ok(data) => Ok(data),
            Err(Local::Fail(e)) => Err(e),
            Err(Local::Need(_)) => {
                Stats::add(&self.reader.stats.reads_waited, 1);
                let reader = self.reader.clone();
                let deadline = Instant::now() + self.read_timeout;
                let f2 = f.clone();
                self.rt.block_on(async move { reader.read(&f2, offset, size, readahead, deadline).await })
            }
        };
        match result {
            Ok(data) => {
                Stats::add(&self.reader.stats.reads_served, 1);
                reply.data(&data)
            }
            Err(e) => reply.error(self.errno_for(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles.lock().unwrap().remove(&fh.0);
        if self.plain.is_some() {
            if let Some((i, _)) = self.inode(ino) {
                let mut modes = self.modes.lock().unwrap();
                if let Some(m) = modes.get_mut(&i) {
                    match handle.and_then(|h| h.passthrough) {
                        Some(_) => m.passthrough = m.passthrough.saturating_sub(1),
                        None => m.cached = m.cached.saturating_sub(1),
                    }
                    if m.passthrough == 0 && m.cached == 0 {
                        modes.remove(&i);
                    }
                }
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inode(ino) {
            Some((_, Inode { kind: InodeKind::Dir, .. })) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some((d, _)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (inode, next, name) in self.entries(d, offset) {
            if reply.add(INodeNo(inode as u64 + 1), next, self.kind_of(inode), OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some((d, _)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (inode, next, name) in self.entries(d, offset) {
            let attr = self.attr(inode);
            if reply.add(INodeNo(inode as u64 + 1), next, OsStr::from_bytes(name), &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(self.data_blocks, 0, 0, self.manifest.inodes.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some((_, node)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match node.xattrs.iter().find(|x| x.name == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some(x) if size == 0 => reply.size(x.value.len() as u32),
            Some(x) if (size as usize) < x.value.len() => reply.error(Errno::ERANGE),
            Some(x) => reply.data(&x.value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some((_, node)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for x in &node.xattrs {
            list.extend_from_slice(&x.name);
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if (size as usize) < list.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.inode(ino).is_none() {
            reply.error(Errno::ENOENT)
        } else if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }

    /// No ioctls: programs probe files with some (isatty's TCGETS, for one); "not a
    /// terminal" is the quiet, expected answer.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY)
    }

    // Everything below would change the image: refused, as the mount is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS)
    }

    fn mknod(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _r: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &std::path::Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS)
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS)
    }

    fn create(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _f: i32, reply: ReplyCreate) {
        reply.error(Errno::EROFS)
    }

    fn setxattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, _v: &[u8], _f: i32, _p: u32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }
}

impl IncFs {
    /// Entries of directory `d` from position `offset`: (inode, offset of the next entry, name).
    /// Position 0 is ".", 1 is "..", then the directory's entries in name order.
    fn entries(&self, d: u32, offset: u64) -> impl Iterator<Item = (u32, u64, &[u8])> + '_ {
        let children = self.manifest.children(d);
        let dots = [(d, b".".as_slice()), (self.parent_of(d), b"..".as_slice())];
        dots.into_iter()
            .chain(children.iter().map(|c| (c.inode, c.name.as_slice())))
            .enumerate()
            .skip(offset as usize)
            .map(|(pos, (inode, name))| (inode, pos as u64 + 1, name))
    }

    /// Parent directory of directory `d` (the root is its own parent).
    fn parent_of(&self, d: u32) -> u32 {
        self.parents[d as usize]
    }
}
