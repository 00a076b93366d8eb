//! The FUSE face of a mount: attributes and directories straight from the signed manifest (no
//! network, ever), reads through the [`Reader`], and `EROFS` for every change. Which manifest:
//! the current [`View`], or for an inode number the kernel still holds from before a version
//! switch, the retired view that gave it out; an open file reads the version it was opened in.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use incfs_format::manifest::{Inode, InodeKind};
use incfs_format::profile::Recorder;
use parking_lot::Mutex;

use crate::handover::OpenMode;
use crate::plain::PlainCopies;
use crate::reader::{FileRef, Local, ReadFailure, Reader};
use crate::served::Served;
use crate::stats::{FailCause, Stats};
use crate::view::{View, Views};

/// An inode never changes (a new version gives changed inodes new numbers, and the kernel is
/// told to forget the names that moved), so the kernel may cache names and attributes long.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Readahead window bounds, in blocks: it doubles on sequential reads up to 16 MiB, fetched as
/// several parallel requests (see [`crate::reader`]), 32 MiB on a long link
/// ([`crate::reader::LONG_LINK`]), and drops to nothing on random reads. On loopback, 32 MiB
/// raised the daemon's peak RSS from 81-85 to 89-94 MiB and read no faster (the CPU is the limit
/// there).
const READAHEAD_START: u64 = 16;
const READAHEAD_MAX: u64 = 4096;
/// A read this close to where the last one ended still counts as sequential: the kernel sends
/// readahead as several asynchronous requests that FUSE threads may take out of order.
const SEQUENTIAL_SLACK: u64 = 512;

/// errno for a read whose data could not be had in time (as kernel incfs: "timer expired").
pub const ETIME: i32 = libc::ETIME;
/// A complete file's first open is served by the daemon while its plain copy is made in the
/// background; opens once the copy is ready are passed through. Copies of files up to this size
/// are made one after another by one thread (a program's start opens hundreds of them); larger
/// ones by a thread each (a long copy does not hold the small ones back). Made during `open`
/// instead (at 110-280 MB/s), they were a third of a Python program's cold start with
/// background completion on (1.0-1.2 s against 0.7-0.8 with passthrough off, 20 ms RTT). A
/// copy up to this size left by an earlier daemon is still checked during `open` (read and
/// hashed, not written), so that no read of the file uses its blocks unchecked.
const PLAIN_QUEUED_MAX: u64 = 8 << 20;

struct Handle {
    next_block: u64,
    window: u64,
    /// Readahead was asked for up to here (blocks).
    ahead_until: u64,
    /// Inode whose passthrough this handle holds.
    passthrough: Option<u64>,
    /// The file as opened: reads stay on this version whatever is switched meanwhile.
    file: Option<FileRef>,
}

impl Handle {
    fn new(file: Option<FileRef>, window: u64, passthrough: Option<u64>) -> Handle {
        Handle { next_block: 0, window, ahead_until: 0, passthrough, file }
    }
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
    /// The mount's sysfs readahead knob, once known (set after mounting).
    pub readahead: Arc<std::sync::OnceLock<Option<std::path::PathBuf>>>,
    /// Told when an inode's open mode starts or ends (the supervisor keeps it for the next
    /// daemon: see [`crate::handover`]).
    pub on_mode: Option<ModeHook>,
    /// Taking a connection over: what `FUSE_INIT` settled, and inodes earlier daemons opened.
    pub takeover: Option<(crate::handover::InitFacts, HashMap<u64, OpenMode>)>,
    /// Daemons of this connection before this one. File handles carry it in their top bits:
    /// files opened through an earlier daemon stay open, and their handles must never name
    /// one of ours (a read would be answered from another file).
    pub generation: u64,
}

/// Told of open-mode changes: `(kernel inode, mode or None once closed)`.
pub type ModeHook = Arc<dyn Fn(u64, Option<OpenMode>) + Send + Sync>;

/// Kernel readahead for the mount, in KiB. FUSE offers at most the kernel default (128 KiB) at
/// INIT, which keeps sequential reads to 128 KiB requests, one or two in flight; raised, the
/// kernel sends 1 MiB requests (the `max_pages` limit) several at a time.
const KERNEL_READAHEAD_KB: u32 = 4096;

/// File handles are `generation << 40 | counter`: a trillion opens per daemon, and 2^24
/// daemons per mount.
const HANDLE_GENERATION_SHIFT: u32 = 40;

pub struct IncFs {
    views: Arc<Views>,
    reader: Arc<Reader>,
    rt: tokio::runtime::Handle,
    read_timeout: Duration,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    plain: Option<Arc<PlainCopies>>,
    /// Cleared when the kernel refuses passthrough (no CAP_SYS_ADMIN, or no support).
    passthrough: Arc<AtomicBool>,
    /// By kernel inode number.
    modes: Mutex<HashMap<u64, IoMode>>,
    /// Inodes an earlier daemon of this connection opened, not yet opened by this one: their
    /// open files may still be in that mode, which the kernel does not let us change.
    inherited: Mutex<HashMap<u64, OpenMode>>,
    on_mode: Option<ModeHook>,
    /// Threads writing plain copies in the background (joined at the end).
    copiers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The queue of small files' copies, once its thread runs.
    copy_queue: Mutex<Option<std::sync::mpsc::Sender<FileRef>>>,
    recorder: Option<Arc<Mutex<Recorder>>>,
    readahead: Arc<std::sync::OnceLock<Option<std::path::PathBuf>>>,
    readahead_done: AtomicBool,
}

/// The errno for a failed read, counted and logged.
fn errno_for(reader: &Reader, e: &ReadFailure) -> Errno {
    reader.stats.failed(e.cause);
    tracing::warn!("read failed ({:?}): {}", e.cause, e.message);
    match e.cause {
        FailCause::Timeout => Errno::from_i32(ETIME),
        _ => Errno::EIO,
    }
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
    pub fn new(views: Arc<Views>, reader: Arc<Reader>, rt: tokio::runtime::Handle, opts: FsOptions) -> Self {
        // Taking over, FUSE_INIT will not come: what it settled is what the first daemon saw.
        let (passthrough, inherited) = match opts.takeover {
            Some((init, modes)) => (opts.plain.is_some() && init.passthrough, modes),
            None => (opts.plain.is_some(), HashMap::new()),
        };
        IncFs {
            views,
            reader,
            rt,
            read_timeout: opts.read_timeout,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new((opts.generation << HANDLE_GENERATION_SHIFT) | 1),
            passthrough: Arc::new(AtomicBool::new(passthrough)),
            plain: opts.plain,
            modes: Mutex::new(HashMap::new()),
            inherited: Mutex::new(inherited),
            on_mode: opts.on_mode,
            copiers: Mutex::new(Vec::new()),
            copy_queue: Mutex::new(None),
            recorder: opts.recorder,
            readahead: opts.readahead,
            readahead_done: AtomicBool::new(false),
        }
    }

    /// Whether complete files are passed through (cleared at FUSE_INIT if the kernel refuses).
    pub fn passthrough_flag(&self) -> Arc<AtomicBool> {
        self.passthrough.clone()
    }

    fn report_mode(&self, ino: u64, mode: Option<OpenMode>) {
        if let Some(hook) = &self.on_mode {
            hook(ino, mode);
        }
    }

    /// The mode entry of inode `i`, created from what an earlier daemon left if it was open
    /// then: a passthrough keeps its backing id (never closed here: files opened before may
    /// still use it), a cached one stays cached; both for the rest of this daemon's life (the
    /// opens counted here are only this daemon's).
    fn mode_entry<'a>(&self, modes: &'a mut HashMap<u64, IoMode>, i: u64, reply: &ReplyOpen) -> &'a mut IoMode {
        modes.entry(i).or_insert_with(|| {
            let mut m = IoMode::default();
            match self.inherited.lock().remove(&i) {
                Some(OpenMode::Passthrough(id)) => {
                    // SAFETY: the id was opened on this connection by an earlier daemon and is
                    // never closed while this daemon runs (the phantom count below keeps it).
                    m.backing = Some(unsafe { reply.wrap_backing(id) });
                    m.passthrough = 1;
                }
                Some(OpenMode::Cached) => m.cached = 1,
                None => {}
            }
            m
        })
    }

    /// On the first requests after FUSE_INIT: raise the kernel's readahead for this mount
    /// through sysfs (root only; without it reads stay correct, only smaller).
    fn raise_readahead(&self) {
        if self.readahead_done.load(Ordering::Relaxed) {
            return;
        }
        let Some(knob) = self.readahead.get() else { return };
        if self.readahead_done.swap(true, Ordering::Relaxed) {
            return;
        }
        match knob {
            Some(path) => match std::fs::write(path, KERNEL_READAHEAD_KB.to_string()) {
                Ok(()) => tracing::info!("kernel readahead {KERNEL_READAHEAD_KB} KiB ({})", path.display()),
                Err(e) => tracing::info!("kernel readahead left at its default ({}: {e})", path.display()),
            },
            None => tracing::info!("kernel readahead left at its default (mount not found in mountinfo)"),
        }
    }

    /// The view that gave out kernel inode `ino`, and the inode's index in its manifest.
    fn inode(&self, ino: INodeNo) -> Option<(Arc<View>, u32)> {
        self.views.find(ino.0)
    }

    fn attr(&self, view: &View, idx: u32) -> FileAttr {
        let node = &view.manifest.inodes[idx as usize];
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
            ino: INodeNo(view.ino(idx)),
            size,
            // What the file occupies once complete: its 4 KiB blocks, in 512-byte units.
            blocks: size.div_ceil(4096) * 8,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: node.meta.mode,
            nlink: view.nlinks[idx as usize],
            uid: node.meta.uid,
            gid: node.meta.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// A backing id for passthrough of complete file `f` (kernel inode `i`), if it can be had now:
    /// its verified plain copy if ready, else none (the copy is made in the background).
    fn plain_backing(&self, i: u64, f: &FileRef, reply: &ReplyOpen) -> Option<BackingId> {
        let plain = self.plain.as_ref().filter(|p| p.fits(f.data.size))?;
        if self.modes.lock().get(&i).is_some_and(|m| m.backing.is_some() || m.cached > 0) {
            return None;
        }
        // A small copy an earlier daemon left is checked now (read and hashed, not written): a
        // damaged one is deleted before any read of the file could use its blocks.
        if !plain.ready(&f.key) && (f.data.size > PLAIN_QUEUED_MAX || !plain.known(&f.key)) {
            self.copy_later(plain, f);
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

    /// Have `f`'s plain copy made (or a copy an earlier daemon left checked) in the background,
    /// unless it is being made already.
    fn copy_later(&self, plain: &Arc<PlainCopies>, f: &FileRef) {
        if !plain.queue(&f.key) {
            return;
        }
        let copy = {
            let (plain, reader) = (plain.clone(), self.reader.clone());
            move |f: FileRef| {
                match plain.get(&reader, &f) {
                    Ok(_) | Err(crate::plain::PlainError::Stopped) => {}
                    Err(e) => tracing::warn!("{}: {e}", f.label),
                }
                plain.dequeue(&f.key);
            }
        };
        let mut copiers = self.copiers.lock();
        copiers.retain(|c| !c.is_finished());
        if f.data.size > PLAIN_QUEUED_MAX {
            let f = f.clone();
            copiers.push(std::thread::spawn(move || copy(f)));
            return;
        }
        let mut queue = self.copy_queue.lock();
        let tx = queue.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<FileRef>();
            copiers.push(std::thread::spawn(move || rx.into_iter().for_each(copy)));
            tx
        });
        if let Err(std::sync::mpsc::SendError(f)) = tx.send(f.clone()) {
            plain.dequeue(&f.key); // the session is ending
        }
    }
}

impl Filesystem for IncFs {
    /// The session ended (unmounted): plain copies being written stop, their threads end.
    fn destroy(&mut self) {
        if let Some(p) = &self.plain {
            p.stop();
        }
        self.copy_queue.lock().take();
        for c in self.copiers.lock().drain(..) {
            let _ = c.join();
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        // Read-only: no write ever comes, and a max_write of 1 MiB (not fuser's 16 MiB) lets each
        // request thread read requests into a 1 MiB buffer (the kernel wants room for max_write
        // in every read). Not less: fuser sizes read requests (max_pages) by it too.
        let _ = config.set_max_write(fuser::SMALL_MAX_WRITE as u32);
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
        self.raise_readahead();
        let Some((view, p)) = self.inode(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match view.manifest.lookup(p, name.as_bytes()) {
            Some(i) => reply.entry(&TTL, &self.attr(&view, i), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.raise_readahead();
        match self.inode(ino) {
            Some((view, i)) => reply.attr(&TTL, &self.attr(&view, i)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let Some((view, i)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match &view.manifest.inodes[i as usize] {
            Inode { kind: InodeKind::Symlink(t), .. } => reply.data(t),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.raise_readahead();
        let Some((view, idx)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(f) = view.file(idx) else {
            return reply.error(Errno::EINVAL);
        };
        let i = ino.0;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        if self.passthrough.load(Ordering::Relaxed) && f.data.size > 0 && self.reader.is_complete(&f) {
            // What an earlier daemon left decides first.
            self.mode_entry(&mut self.modes.lock(), i, &reply);
            let backing = self.plain_backing(i, &f, &reply);
            let mut modes = self.modes.lock();
            let m = self.mode_entry(&mut modes, i, &reply);
            if m.cached == 0 {
                if m.backing.is_none() {
                    m.backing = backing;
                    if let Some(id) = &m.backing {
                        self.report_mode(i, Some(OpenMode::Passthrough(id.id())));
                    }
                }
                if let Some(id) = &m.backing {
                    m.passthrough += 1;
                    self.handles.lock().insert(fh, Handle::new(Some(f), 0, Some(i)));
                    Stats::add(&self.reader.stats.opens_passthrough, 1);
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
                }
            }
        }
        if self.passthrough.load(Ordering::Relaxed) {
            let mut modes = self.modes.lock();
            let m = self.mode_entry(&mut modes, i, &reply);
            if m.passthrough > 0 {
                // The kernel would refuse a cached open while passthrough opens exist; cannot
                // happen (passthrough needs a complete file, and a file stays complete), but be
                // exact rather than hand the reader an EIO from the kernel.
                if let Some(id) = &m.backing {
                    m.passthrough += 1;
                    self.handles.lock().insert(fh, Handle::new(Some(f), 0, Some(i)));
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
                }
            }
            m.cached += 1;
            if m.cached == 1 {
                self.report_mode(i, Some(OpenMode::Cached));
            }
        }
        self.handles.lock().insert(fh, Handle::new(Some(f), READAHEAD_START, None));
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
        let first_block = offset / 4096;
        let next_block = (offset + size as u64).div_ceil(4096);
        // Twice the window on a long link (its requests are in flight longer).
        let readahead_max = READAHEAD_MAX * self.reader.link_scale() as u64;
        let (f, ahead, window) = {
            let mut h = self.handles.lock();
            let ra = h.entry(fh.0).or_insert(Handle::new(None, READAHEAD_START, None));
            let sequential = first_block.abs_diff(ra.next_block) <= SEQUENTIAL_SLACK.max(ra.window);
            // At least twice this read: the kernel's first reads of a file are its readahead
            // (512 KiB and more), and doubling from 64 KiB took a round trip per step.
            let least = READAHEAD_START.max(2 * (next_block - first_block)).min(readahead_max);
            ra.window = if sequential { (ra.window * 2).clamp(least, readahead_max) } else { 0 };
            if !sequential {
                ra.ahead_until = 0;
            }
            ra.next_block = if sequential { ra.next_block.max(next_block) } else { next_block };
            // Only what was not asked for yet: the window slides, it is not planned again.
            let ahead = next_block.max(ra.ahead_until)..next_block + ra.window;
            (ra.file.clone(), ahead, ra.window)
        };
        let asked_ahead = |until: u64| {
            if let Some(h) = self.handles.lock().get_mut(&fh.0) {
                h.ahead_until = h.ahead_until.max(until);
            }
        };
        // The version the handle was opened on; without a handle (cannot happen with the
        // kernel's protocol, but cheap to be exact), the inode's own.
        let Some(f) = f.or_else(|| self.inode(ino).and_then(|(view, i)| view.file(i))) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(rec) = &self.recorder {
            if let Some(path) = self.inode(ino).and_then(|(view, i)| view.paths.get(i as usize).cloned()) {
                rec.lock().read(&path, first_block..next_block.min(incfs_verity::block_count(f.data.size)));
            }
        }
        let label = f.label.clone();
        let served =
            move |reader: &Reader, result: Result<Served, ReadFailure>, waited: bool, reply: ReplyData| match result {
                Ok(data) => {
                    Stats::add(&reader.stats.reads_served, 1);
                    let count = (offset + data.len() as u64).div_ceil(4096).saturating_sub(first_block).max(1);
                    reader.pending.log(&label, first_block, count, waited);
                    // One writev takes at most IOV_MAX (1024) slices, the header included: a
                    // 1 MiB read has at most 257 pieces, so this is only a guard.
                    let slices = data.io_slices();
                    match slices.len() < 1024 {
                        true => reply.data_vectored(&slices),
                        false => reply.data(&data.to_vec()),
                    }
                }
                Err(e) => reply.error(errno_for(reader, &e)),
            };
        // Readahead is asked for a quarter of the window at a time, whether this read is local
        // (so that a sequential reader never catches up with the network) or waits (a reader
        // that keeps up with the network waits on every read: asking for each read's own slice
        // made every request one kernel read long, 1 MiB of file or 56 KiB of compressible
        // text, and at 20 ms RTT the request count, not the link, set the speed).
        // Not while half the staging bound is fetched and unread: the network is ahead of this
        // reader, and more would only sit in memory (or be pushed out unread).
        let ask_ahead = window > 0
            && ahead.end.saturating_sub(ahead.start) >= (window / 4).max(1)
            && self.reader.staged_bytes() < crate::reader::STAGED_LIMIT_BYTES / 2;
        match self.reader.read_local(&f, offset, size) {
            Ok(data) => {
                if ask_ahead {
                    asked_ahead(ahead.end);
                    let _guard = self.rt.enter();
                    self.reader.read_ahead(f.clone(), ahead);
                }
                served(&self.reader, Ok(data), false, reply)
            }
            Err(Local::Fail(e)) => served(&self.reader, Err(e), false, reply),
            Err(Local::Need(_)) => {
                // Answered by the task that completes the read: this FUSE thread goes back to
                // the kernel at once, so reads waiting for the network never starve the others.
                Stats::add(&self.reader.stats.reads_waited, 1);
                let ahead = match ask_ahead {
                    true => ahead,
                    false => ahead.start..ahead.start,
                };
                asked_ahead(ahead.end);
                let reader = self.reader.clone();
                let deadline = Instant::now() + self.read_timeout;
                self.rt.spawn(async move {
                    let result = reader.read(&f, offset, size, ahead, deadline).await;
                    served(&reader, result, true, reply);
                });
            }
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
        let handle = self.handles.lock().remove(&fh.0);
        // A handle this daemon does not know was opened by an earlier one (see mode_entry).
        if let (Some(handle), true) = (handle, self.plain.is_some()) {
            let mut modes = self.modes.lock();
            if let Some(m) = modes.get_mut(&ino.0) {
                match handle.passthrough {
                    Some(_) => m.passthrough = m.passthrough.saturating_sub(1),
                    None => m.cached = m.cached.saturating_sub(1),
                }
                if m.passthrough == 0 && m.cached == 0 {
                    // The supervisor hears of it before the backing id closes (dropping the entry
                    // closes it): a successor told of an id already closed would hand it to the
                    // kernel, which fails that open with EIO.
                    self.report_mode(ino.0, None);
                    modes.remove(&ino.0);
                }
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inode(ino) {
            Some((view, i)) if matches!(view.manifest.inodes[i as usize].kind, InodeKind::Dir) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some((view, d)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (inode, next, name) in entries(&view, d, offset) {
            let kind = file_type(&view.manifest.inodes[inode as usize].kind);
            if reply.add(INodeNo(view.ino(inode)), next, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some((view, d)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (inode, next, name) in entries(&view, d, offset) {
            let attr = self.attr(&view, inode);
            if reply.add(attr.ino, next, OsStr::from_bytes(name), &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let view = self.views.current();
        reply.statfs(view.data_blocks, 0, 0, view.manifest.inodes.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some((view, i)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match view.manifest.inodes[i as usize].xattrs.iter().find(|x| x.name == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some(x) if size == 0 => reply.size(x.value.len() as u32),
            Some(x) if (size as usize) < x.value.len() => reply.error(Errno::ERANGE),
            Some(x) => reply.data(&x.value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some((view, i)) = self.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for x in &view.manifest.inodes[i as usize].xattrs {
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

/// Entries of directory `d` of `view` from position `offset`: (inode, offset of the next entry,
/// name). Position 0 is ".", 1 is "..", then the directory's entries in name order.
fn entries(view: &View, d: u32, offset: u64) -> impl Iterator<Item = (u32, u64, &[u8])> + '_ {
    let children = view.manifest.children(d);
    let dots = [(d, b".".as_slice()), (view.parents[d as usize], b"..".as_slice())];
    dots.into_iter()
        .chain(children.iter().map(|c| (c.inode, c.name.as_slice())))
        .enumerate()
        .skip(offset as usize)
        .map(|(pos, (inode, name))| (inode, pos as u64 + 1, name))
}
