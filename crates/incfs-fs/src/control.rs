//! The control socket of a mount: `incfs status` asks the daemon over a Unix socket.
//!
//! The socket lives at `/run/incfs/<first 32 hex digits of SHA-256(mountpoint)>.sock` (or under
//! `$XDG_RUNTIME_DIR/incfs/`, else `/tmp/incfs-<uid>/`, when `/run` is not writable), so a client
//! finds it from the mountpoint alone. Owner only: the directory 0700 and ours, the socket 0600,
//! and every peer's uid checked (root or ours); request lines are bounded ([`MAX_REQUEST`]).
//! Protocol: one JSON request per line, one JSON reply per line:
//! `{"cmd":"status"}`, `{"cmd":"file","path":"dir/name"}`, `{"cmd":"prefetch","paths":["a","b/c"]}`
//! (answers an id), `{"cmd":"prefetch_progress","id":N}`,
//! `{"cmd":"update","to":N|null,"allow_rollback":false}`, `{"cmd":"pending"}`,
//! `{"cmd":"files","incomplete":true}` and `{"cmd":"fill","path":P,"blocks":[{"block":N,
//! "codec":"raw","data":BASE64}]}`. Two requests turn the connection into a stream:
//! `{"cmd":"log"}` (one JSON read record per line, until the client closes) and
//! `{"cmd":"loader"}` (a data loader session, `docs/loader.md`), `{"cmd":"restart","binary":P|null}`
//! (answers the pid of the daemon being replaced).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use incfs_format::manifest::InodeKind;
use incfs_store::file_key;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::live::Live;
use crate::loader;
use crate::pending::file_id;
use crate::plain::PlainCopies;
use crate::reader::Reader;
use crate::stats::Stats;

/// Where the control socket of `mountpoint` (canonical) lives; its directory is made (0700)
/// or checked to be ours and closed to others, so that no other user can plant a socket there
/// for us to talk to, nor reach ours (a client is refused unless it is root or our user).
pub fn socket_path(mountpoint: &Path) -> Result<PathBuf, String> {
    let id = hex::encode(&Sha256::digest(mountpoint.as_os_str().as_encoded_bytes())[..16]);
    Ok(socket_dir()?.join(format!("{id}.sock")))
}

/// `/run/incfs` where we may create it (root), else `$XDG_RUNTIME_DIR/incfs`, else
/// `/tmp/incfs-<uid>`; in every case owned by us and writable by no one else.
fn socket_dir() -> Result<PathBuf, String> {
    let run = Path::new("/run/incfs");
    let dir = if incfs_store::private_dir(run).is_ok() {
        run.to_path_buf()
    } else if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(xdg).join("incfs")
    } else {
        // SAFETY: geteuid has no preconditions and cannot fail.
        std::env::temp_dir().join(format!("incfs-{}", unsafe { libc::geteuid() }))
    };
    if !dir.exists() {
        incfs_store::private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    check_private_dir(&dir)?;
    Ok(dir)
}

/// `dir` is a real directory (not a link), owned by us, writable by no one else.
fn check_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(format!(
            "refusing the control socket directory {}: it must be a directory owned by uid {me} and writable by no one else (found {}, uid {}, mode {:o}); remove it, or set XDG_RUNTIME_DIR to a private directory",
            dir.display(),
            if m.is_dir() { "a directory" } else { "not a directory" },
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Longest request line read from a control connection: `incfs fill` sends up to 1024 blocks
/// per request, ~5.6 MiB in base64, the longest request there is. A longer line is answered
/// with an error and the connection closed.
const MAX_REQUEST: usize = 16 << 20;

/// Read one request line into `line` (cleared first); `Ok(0)` at the end of the stream.
async fn read_request(r: &mut (impl tokio::io::AsyncBufRead + Unpin), line: &mut String) -> Result<usize, String> {
    use tokio::io::AsyncReadExt;
    line.clear();
    let n = (&mut *r).take(MAX_REQUEST as u64 + 1).read_line(line).await.map_err(|e| e.to_string())?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request line longer than {MAX_REQUEST} bytes; closing"));
    }
    Ok(n)
}

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Request {
    Status,
    File {
        path: String,
    },
    Prefetch {
        paths: Vec<String>,
    },
    PrefetchProgress {
        id: u64,
    },
    Update {
        to: Option<u64>,
        #[serde(default)]
        allow_rollback: bool,
        #[serde(default)]
        allow_expired: bool,
    },
    Pin {
        paths: Vec<String>,
        /// false: unpin.
        pin: bool,
        /// Only check that the files would fit under the limit (before fetching them).
        #[serde(default)]
        check: bool,
    },
    Pending,
    Files {
        #[serde(default)]
        incomplete: bool,
    },
    Fill {
        id: Option<String>,
        path: Option<String>,
        blocks: Vec<FillBlock>,
    },
    Log,
    Loader,
    /// Replace this daemon by a new process (`incfs restart`); answers this daemon's pid.
    Restart {
        binary: Option<std::path::PathBuf>,
    },
    Add {
        /// As printed (escaped).
        path: String,
        mode: u16,
        size: u64,
        /// Hex.
        root_hash: String,
        /// Base64: the compact tree, and the signature over the push message.
        tree: String,
        signature: String,
    },
}

#[derive(Debug, Deserialize)]
struct FillBlock {
    block: u64,
    codec: Option<String>,
    #[serde(default)]
    data: String,
}

/// What a `fill` request did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FillReport {
    pub filled: u64,
    /// (block, why) of each block not taken.
    pub rejected: Vec<(u64, String)>,
}

/// One regular file of the version served, for `incfs files`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub id: String,
    pub path: String,
    pub size: u64,
    pub blocks_present: u64,
    pub blocks_total: u64,
}

/// Progress of one `incfs prefetch`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrefetchProgress {
    pub id: u64,
    pub files: u64,
    pub blocks_present: u64,
    pub blocks_total: u64,
    /// Reads and fetches that failed since the mount started (to tell "stuck" from "slow").
    pub fetch_failures: u64,
}

/// What `incfs pin` or `incfs unpin` did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PinReport {
    /// Files (distinct contents) pinned or unpinned now, and their stored bytes.
    pub files: u64,
    pub bytes: u64,
    /// Bytes of the cache's pinned segments after it.
    pub pinned_bytes: u64,
}

/// Why the daemon refused a control request; sent as `{"error": "<this, displayed>"}`.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("bad request: {0}")]
    Bad(#[from] serde_json::Error),
    #[error("{0}: not in the image")]
    NotInImage(String),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("no prefetch request {0}")]
    NoPrefetch(u64),
    #[error("{0} of the files to pin are not complete yet; fetch them first (incfs pin does)")]
    NotComplete(usize),
    #[error(
        "pinning {new} more bytes would pin {total} bytes, more than the cache limit of {limit} bytes; \
         raise it (incfs cache limit) or pin less"
    )]
    PinTooLarge { new: u64, total: u64, limit: u64 },
    #[error("pinning: {0}")]
    Pin(String),
    #[error("this mount's daemon has no supervisor (it was started by an older incfs); unmount and mount it again")]
    NoSupervisor,
    #[error("log, loader and restart must be the first request on a connection")]
    StreamNotFirst,
    #[error(transparent)]
    Update(#[from] crate::live::UpdateError),
    /// A fill or push refused (what the loader protocol also answers; `loader.rs`).
    #[error("{0}")]
    Refused(String),
}

/// Why a control client got no answer, or what the daemon refused.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("{0}")]
    SocketDir(String),
    #[error("{mountpoint} is not an incfs mount served by a running daemon ({socket}: {source})")]
    NotServed { mountpoint: String, socket: String, source: std::io::Error },
    #[error("talking to the daemon of {mountpoint}: {source}")]
    Io { mountpoint: String, source: std::io::Error },
    #[error("bad reply from the daemon: {0}")]
    BadReply(String),
    /// The daemon's own refusal ([`RequestError`], as text).
    #[error("{0}")]
    Refused(String),
}

/// A mount's state, as `incfs status --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub image: String,
    pub version: u64,
    pub mountpoint: String,
    pub sources: Vec<String>,
    /// Mounted from the cache without a source (`--offline`, or none could be reached).
    pub offline: bool,
    pub cache: String,
    pub files: u64,
    pub blocks_total: u64,
    pub blocks_present: u64,
    pub complete: bool,
    pub bytes_fetched: u64,
    pub bytes_stored: u64,
    pub reads_served: u64,
    pub reads_waited: u64,
    pub reads_failed_timeout: u64,
    pub reads_failed_verification: u64,
    pub reads_failed_source: u64,
    pub reads_failed_other: u64,
    pub fetch_requests: u64,
    pub fetch_failures: u64,
    pub blocks_fetched: u64,
    pub blocks_bad: u64,
    pub fetch_latency_mean_ms: f64,
    pub fetch_latency_p99_ms: f64,
    /// Blocks filled from outside (loaders, `incfs fill`) and kept; fills refused as wrong.
    pub blocks_filled: u64,
    pub fills_rejected: u64,
    /// Reads waiting for the network right now.
    pub pending_reads: u64,
    /// Files the background fetcher is working on.
    pub fetching: Vec<String>,
    pub opens_passthrough: u64,
    /// Background requests given up for a read that started waiting (made again later).
    pub background_cancelled: u64,
    /// Plain copies kept for passthrough (files, bytes); `None`: passthrough off.
    pub plain_files: Option<u64>,
    pub plain_bytes: Option<u64>,
    /// Plain copies asked for (a complete file's first open) and not made yet.
    #[serde(default)]
    pub plain_queued: Option<u64>,
    /// Readahead and background requests in flight now, and their bound now (`--parallel`,
    /// doubled on a long link; each up to [`crate::reader::MAX_RUN_BYTES`]).
    #[serde(default)]
    pub requests_in_flight: u64,
    #[serde(default)]
    pub parallel: u64,
    /// Verified blocks fetched ahead of a reader, held in memory until read (bounded).
    #[serde(default)]
    pub staged_bytes: u64,
    #[serde(default)]
    pub staged_limit: u64,
    /// The daemon serving the mount: its process id and incfs version.
    #[serde(default)]
    pub daemon_pid: u32,
    #[serde(default)]
    pub daemon_version: String,
    /// The supervisor holding the mount (`None`: the daemon holds it itself), how many daemons
    /// replaced an earlier one (crashes and `incfs restart`), and why the last restart kept the
    /// old binary, if it did.
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    #[serde(default)]
    pub restarts: u64,
    #[serde(default)]
    pub restart_error: Option<String>,
    /// When the served manifest's signed expiry passes (RFC 3339), if it has one.
    #[serde(default)]
    pub expires: Option<String>,
    /// The cache's size limit (`--cache-size`, shared by every mount of the cache), if any.
    #[serde(default)]
    pub cache_limit: Option<u64>,
    /// What the cache directory holds, by kind (bytes, as `du -sb` counts them).
    #[serde(default)]
    pub cache_usage: CacheUsage,
    /// Background completion stopped at the cache limit.
    #[serde(default)]
    pub cache_full: bool,
    /// Files evicted to stay within the limit (segments of blocks, plain copies), their bytes,
    /// and blocks fetched again after their eviction (approximate), by this daemon.
    #[serde(default)]
    pub evictions: u64,
    #[serde(default)]
    pub evicted_bytes: u64,
    #[serde(default)]
    pub blocks_refetched: u64,
}

/// Bytes of a cache directory by kind.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheUsage {
    pub total: u64,
    /// Stored blocks (compressed, as fetched), indexed now.
    pub blocks: u64,
    /// Metadata pieces (Merkle trees, block records), indexed now.
    pub metadata: u64,
    /// Segment bytes no longer indexed (replaced, damaged, or bytes of a run stored before).
    pub unindexed: u64,
    pub journals: u64,
    pub plain: u64,
    pub database: u64,
    pub other: u64,
}

impl CacheUsage {
    /// From a scan of the directory and what one store's index holds.
    pub fn new(u: &incfs_store::Usage, blocks: u64, metadata: u64) -> CacheUsage {
        let blocks = blocks.min(u.segments);
        let metadata = metadata.min(u.segments - blocks);
        CacheUsage {
            total: u.total(),
            blocks,
            metadata,
            unindexed: u.segments - blocks - metadata,
            journals: u.journals,
            plain: u.plain,
            database: u.database,
            other: u.other,
        }
    }
}

/// One file's local state, for `incfs status MNT PATH`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileStatus {
    pub path: String,
    pub size: u64,
    pub blocks_total: u64,
    pub blocks_present: u64,
    /// Present block ranges, `[start, end)`.
    pub present: Vec<(u64, u64)>,
}

pub struct Control {
    pub live: Arc<Live>,
    pub reader: Arc<Reader>,
    pub mountpoint: PathBuf,
    pub cache: PathBuf,
    pub plain: Option<Arc<PlainCopies>>,
    pub offline: bool,
    /// `incfs prefetch` requests: id -> contents concerned.
    pub prefetches: Mutex<HashMap<u64, Vec<[u8; 40]>>>,
    /// The link to the supervisor, if the mount has one (`incfs restart` needs it).
    pub supervisor: Option<Arc<crate::handover::Link>>,
    /// Daemons before this one, and why the last restart fell back, if it did.
    pub restarts: (u64, Option<String>),
}

impl Control {
    pub fn status(&self) -> Status {
        let s = &self.reader.stats;
        let view = self.live.views.current();
        let blocks_total = view.contents.iter().map(|(_, b)| b).sum();
        let blocks_present = view.contents.iter().map(|(k, b)| self.reader.presence.count(k).min(*b)).sum();
        let (mean, p99) = s.latency_ms();
        let store = self.reader.store();
        let limit = store.limit_state();
        let usage = store.usage().unwrap_or_default();
        Status {
            image: view.manifest.name.clone(),
            version: view.manifest.version,
            mountpoint: self.mountpoint.display().to_string(),
            sources: self.reader.mirrors().sources().iter().map(|s| s.name().to_string()).collect(),
            offline: self.offline,
            cache: self.cache.display().to_string(),
            files: view.contents.len() as u64,
            blocks_total,
            blocks_present,
            complete: blocks_present == blocks_total,
            bytes_fetched: Stats::get(&s.bytes_fetched),
            bytes_stored: self.reader.store().totals().block_bytes,
            reads_served: Stats::get(&s.reads_served),
            reads_waited: Stats::get(&s.reads_waited),
            reads_failed_timeout: Stats::get(&s.reads_failed_timeout),
            reads_failed_verification: Stats::get(&s.reads_failed_verification),
            reads_failed_source: Stats::get(&s.reads_failed_source),
            reads_failed_other: Stats::get(&s.reads_failed_other),
            fetch_requests: Stats::get(&s.fetch_requests),
            fetch_failures: Stats::get(&s.fetch_failures),
            blocks_fetched: Stats::get(&s.blocks_fetched),
            blocks_bad: Stats::get(&s.blocks_bad),
            fetch_latency_mean_ms: mean,
            fetch_latency_p99_ms: p99,
            blocks_filled: Stats::get(&s.blocks_filled),
            fills_rejected: Stats::get(&s.fills_rejected),
            pending_reads: self.reader.demand() as u64,
            fetching: self.live.background().active(),
            opens_passthrough: Stats::get(&s.opens_passthrough),
            background_cancelled: Stats::get(&s.background_cancelled),
            plain_files: self.plain.as_ref().map(|p| p.usage().0),
            plain_bytes: self.plain.as_ref().map(|p| p.usage().1),
            plain_queued: self.plain.as_ref().map(|p| p.queued()),
            requests_in_flight: self.reader.requests_in_flight() as u64,
            parallel: self.reader.parallel() as u64,
            staged_bytes: self.reader.staged_bytes(),
            staged_limit: crate::reader::STAGED_LIMIT_BYTES,
            daemon_pid: std::process::id(),
            daemon_version: env!("CARGO_PKG_VERSION").to_string(),
            // SAFETY: getppid has no preconditions and cannot fail.
            supervisor_pid: self.supervisor.as_ref().map(|_| unsafe { libc::getppid() } as u32),
            restarts: self.restarts.0,
            restart_error: self.restarts.1.clone(),
            expires: view.manifest.expires.map(incfs_fetch::image::format_time),
            cache_limit: limit.limit,
            cache_usage: CacheUsage::new(&usage, store.totals().block_bytes, store.meta_bytes()),
            cache_full: self.live.background().cache_full(),
            evictions: limit.evictions,
            evicted_bytes: limit.evicted_bytes,
            blocks_refetched: limit.refetched,
        }
    }

    pub(crate) fn prefetch(&self, paths: &[String]) -> Result<PrefetchProgress, RequestError> {
        let manifest = self.live.manifest();
        let mut inodes = Vec::new();
        for p in paths {
            inodes.push(manifest.resolve(p.as_bytes()).ok_or_else(|| RequestError::NotInImage(p.clone()))?);
        }
        let keys = self.live.background().prefetch(&inodes);
        let mut all = self.prefetches.lock();
        let id = all.len() as u64 + 1;
        all.insert(id, keys);
        drop(all);
        self.prefetch_progress(id)
    }

    pub(crate) fn prefetch_progress(&self, id: u64) -> Result<PrefetchProgress, RequestError> {
        let all = self.prefetches.lock();
        let keys = all.get(&id).ok_or(RequestError::NoPrefetch(id))?;
        let (present, total) = self.live.background().progress(keys);
        Ok(PrefetchProgress {
            id,
            files: keys.len() as u64,
            blocks_present: present,
            blocks_total: total,
            fetch_failures: Stats::get(&self.reader.stats.fetch_failures),
        })
    }

    /// Pin (or unpin) the files under `paths`: pinned contents are kept in pinned segments of
    /// the cache, never evicted. Pinning needs them complete (`incfs pin` prefetches first).
    ///
    /// With `check`, nothing is pinned: it only says whether they would fit under the cache
    /// limit beside what is pinned already (files not complete counted at their full size).
    pub fn pin(&self, paths: &[String], pin: bool, check: bool) -> Result<PinReport, RequestError> {
        let manifest = self.live.manifest();
        let store = self.reader.store();
        let mut files: Vec<(String, crate::reader::FileRef)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in paths {
            let root = manifest.resolve(p.as_bytes()).ok_or_else(|| RequestError::NotInImage(p.clone()))?;
            for ino in manifest.subtree(root) {
                let InodeKind::File(d) = &manifest.inodes[ino as usize].kind else { continue };
                let key = file_key(&d.root_hash, d.size);
                if d.size == 0 || d.meta.is_none() || !seen.insert(ino) {
                    continue;
                }
                let label = self.live.views.current().labels[ino as usize].clone();
                files.push((label.to_string(), crate::reader::FileRef { data: *d, key, label }));
            }
        }
        let err = |e: incfs_store::StoreError| RequestError::Pin(e.to_string());
        let mut keys = std::collections::HashSet::new();
        let mut bytes = 0;
        if !pin {
            for (path, f) in &files {
                store.set_pinned(&manifest.name, path, None).map_err(err)?;
                keys.insert(f.key);
            }
            let still: std::collections::HashSet<_> =
                store.pinned().map_err(err)?.into_iter().map(|(_, _, k)| k).collect();
            for k in keys.iter().filter(|k| !still.contains(*k)) {
                store.unpin(k).map_err(err)?;
            }
            return Ok(PinReport { files: keys.len() as u64, bytes, pinned_bytes: store.pinned_bytes() });
        }
        let pinned_now: std::collections::HashSet<_> = store.pinned_contents().into_iter().collect();
        if check {
            let local = |f: &crate::reader::FileRef| self.reader.leaves(f).ok().map(|l| store.stored_len(&l));
            for (_, f) in &files {
                if !pinned_now.contains(&f.key) && keys.insert(f.key) {
                    bytes += if self.reader.is_complete(f) { local(f).unwrap_or(f.data.size) } else { f.data.size };
                }
            }
            self.fits_pinned(bytes)?;
            return Ok(PinReport { files: keys.len() as u64, bytes, pinned_bytes: store.pinned_bytes() });
        }
        let incomplete = files.iter().filter(|(_, f)| !self.reader.is_complete(f)).count();
        if incomplete > 0 {
            return Err(RequestError::NotComplete(incomplete));
        }
        let local = |e: crate::reader::Local| RequestError::Pin(format!("{e:?}"));
        let mut plan = Vec::new();
        for (_, f) in &files {
            let leaves = self.reader.leaves(f).map_err(local)?;
            if keys.insert(f.key) {
                if !pinned_now.contains(&f.key) {
                    bytes += store.stored_len(&leaves);
                }
                let mut meta = self.reader.meta_keys(f);
                meta.extend(crate::dictionaries::cache_keys(&manifest));
                plan.push((f.key, leaves, meta));
            }
        }
        self.fits_pinned(bytes)?;
        for (key, leaves, meta) in &plan {
            store.pin(key, leaves, meta).map_err(err)?;
        }
        for (path, f) in &files {
            store.set_pinned(&manifest.name, path, Some(&f.key)).map_err(err)?;
        }
        self.unpin_orphans().map_err(err)?;
        Ok(PinReport { files: keys.len() as u64, bytes, pinned_bytes: store.pinned_bytes() })
    }

    /// Contents no pinned path names any more (their path was re-pinned with new content)
    /// may be evicted again.
    fn unpin_orphans(&self) -> Result<(), incfs_store::StoreError> {
        let store = self.reader.store();
        let named: std::collections::HashSet<_> = store.pinned()?.into_iter().map(|(_, _, k)| k).collect();
        for k in store.pinned_contents().into_iter().filter(|k| !named.contains(k)) {
            store.unpin(&k)?;
        }
        Ok(())
    }

    /// After a switch to `m`: the pinned paths of this image whose content changed (to pin
    /// again); pins of paths that are gone are dropped.
    pub fn pins_to_renew(&self, m: &incfs_format::Manifest) -> Vec<String> {
        let store = self.reader.store();
        let mut renew = Vec::new();
        for (image, path, key) in store.pinned().unwrap_or_default() {
            if image != m.name {
                continue;
            }
            let now = m.resolve(path.as_bytes()).and_then(|ino| match &m.inodes[ino as usize].kind {
                InodeKind::File(d) => Some(file_key(&d.root_hash, d.size)),
                _ => None,
            });
            match now {
                Some(k) if k == key => {}
                Some(_) => renew.push(path),
                None => {
                    if let Err(e) = store.set_pinned(&image, &path, None) {
                        tracing::warn!("cannot drop the pin of {path}: {e}");
                    }
                }
            }
        }
        if let Err(e) = self.unpin_orphans() {
            tracing::warn!("cannot unpin: {e}");
        }
        renew
    }

    /// Whether `bytes` more of pinned data fit under the cache limit.
    fn fits_pinned(&self, bytes: u64) -> Result<(), RequestError> {
        let store = self.reader.store();
        if let Some(limit) = store.limit_state().limit {
            let total = store.pinned_bytes() + bytes;
            if total > limit {
                return Err(RequestError::PinTooLarge { new: bytes, total, limit });
            }
        }
        Ok(())
    }

    fn file_status(&self, path: &str) -> Result<FileStatus, RequestError> {
        let manifest = self.live.manifest();
        let ino = manifest.resolve(path.as_bytes()).ok_or_else(|| RequestError::NotInImage(path.to_string()))?;
        let InodeKind::File(f) = &manifest.inodes[ino as usize].kind else {
            return Err(RequestError::NotAFile(path.to_string()));
        };
        let key = file_key(&f.root_hash, f.size);
        let blocks_total = incfs_verity::block_count(f.size);
        let present: Vec<(u64, u64)> =
            self.reader.presence.ranges(&key, blocks_total).into_iter().map(|r| (r.start, r.end)).collect();
        Ok(FileStatus {
            path: path.to_string(),
            size: f.size,
            blocks_total,
            blocks_present: present.iter().map(|(a, b)| b - a).sum(),
            present,
        })
    }

    fn files(&self, incomplete: bool) -> Vec<FileEntry> {
        let view = self.live.views.current();
        let mut out = Vec::new();
        for (i, node) in view.manifest.inodes.iter().enumerate() {
            let InodeKind::File(f) = &node.kind else { continue };
            let key = file_key(&f.root_hash, f.size);
            let blocks_total = incfs_verity::block_count(f.size);
            let blocks_present = self.reader.presence.count(&key).min(blocks_total);
            if incomplete && blocks_present == blocks_total {
                continue;
            }
            let path = view.labels[i].to_string();
            out.push(FileEntry { id: file_id(&path), path, size: f.size, blocks_present, blocks_total });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    async fn fill(
        &self,
        id: Option<&str>,
        path: Option<&str>,
        blocks: Vec<FillBlock>,
    ) -> Result<FillReport, RequestError> {
        let f = loader::resolve(&self.live, id, path).map_err(RequestError::Refused)?;
        let mut report = FillReport { filled: 0, rejected: Vec::new() };
        for b in blocks {
            match loader::fill(&self.live, &f, b.block, b.codec.as_deref(), &b.data).await {
                Ok(()) => report.filled += 1,
                Err(e) => report.rejected.push((b.block, e)),
            }
        }
        Ok(report)
    }

    /// The reply to one request line: `{"ok": VALUE}` or `{"error": MESSAGE}`.
    async fn answer(&self, line: &str) -> String {
        match self.reply(line).await {
            Ok(v) => serde_json::json!({ "ok": v }).to_string(),
            Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
        }
    }

    async fn reply(&self, line: &str) -> Result<serde_json::Value, RequestError> {
        fn value(v: impl Serialize) -> Result<serde_json::Value, RequestError> {
            Ok(serde_json::to_value(v)?)
        }
        match serde_json::from_str::<Request>(line)? {
            Request::Status => value(self.status()),
            Request::File { path } => value(self.file_status(&path)?),
            Request::Prefetch { paths } => value(self.prefetch(&paths)?),
            Request::PrefetchProgress { id } => value(self.prefetch_progress(id)?),
            Request::Update { to, allow_rollback, allow_expired } => {
                value(self.live.update(to, allow_rollback, allow_expired).await?)
            }
            // Moving blocks is disk work: off the async workers' hands.
            Request::Pin { paths, pin, check } => value(tokio::task::block_in_place(|| self.pin(&paths, pin, check))?),
            Request::Pending => value(self.reader.pending.list()),
            Request::Files { incomplete } => value(self.files(incomplete)),
            Request::Fill { id, path, blocks } => value(self.fill(id.as_deref(), path.as_deref(), blocks).await?),
            Request::Add { path, mode, size, root_hash, tree, signature } => {
                loader::add(&self.live, &path, mode, size, &root_hash, &tree, &signature)
                    .await
                    .map_err(RequestError::Refused)
            }
            Request::Log | Request::Loader | Request::Restart { .. } => Err(RequestError::StreamNotFirst),
        }
    }

    /// `incfs restart`: answered (this daemon's pid) before the supervisor is asked, because
    /// the supervisor stops this daemon at once and an answer still to be written would die
    /// with it (the client then saw an empty reply).
    async fn restart(&self, binary: Option<PathBuf>, mut w: tokio::net::unix::OwnedWriteHalf) {
        let checked = match (&self.supervisor, &binary) {
            (None, _) => Err(RequestError::NoSupervisor),
            (Some(_), Some(b)) if !b.is_absolute() || !b.is_file() => Err(RequestError::Refused(format!(
                "{}: not an absolute path to a file; give the new incfs binary's full path",
                b.display()
            ))),
            (Some(link), _) => Ok(link),
        };
        let answer = match &checked {
            Ok(_) => serde_json::json!({ "ok": std::process::id() }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let written = w.write_all(format!("{answer}\n").as_bytes()).await.is_ok() && w.shutdown().await.is_ok();
        if let (Ok(link), true) = (checked, written) {
            if let Err(e) = link.send(&crate::handover::ToSupervisor::Restart { binary }) {
                tracing::error!("restart: cannot ask the supervisor: {e}");
            }
        }
    }

    /// The read log, one JSON record per line, until the client goes away. A client that falls
    /// behind gets `{"lost":N}` for the records it missed.
    async fn stream_log(&self, mut w: tokio::net::unix::OwnedWriteHalf) {
        use tokio::sync::broadcast::error::RecvError;
        let mut sub = self.reader.pending.subscribe_log();
        let _ = w.write_all(b"{\"ok\":\"log\"}\n").await;
        loop {
            let line = match sub.rx.recv().await {
                Ok(r) => serde_json::to_string(&r).expect("records serialize"),
                Err(RecvError::Lagged(n)) => serde_json::json!({ "lost": n }).to_string(),
                Err(RecvError::Closed) => return,
            };
            if w.write_all(line.as_bytes()).await.is_err() || w.write_all(b"\n").await.is_err() {
                return;
            }
        }
    }

    /// Serve the socket until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                // Root or the user running the daemon only (the socket is 0600 in a 0700
                // directory too; this holds even if someone loosens those).
                // SAFETY: geteuid has no preconditions and cannot fail.
                let me_uid = unsafe { libc::geteuid() };
                let peer = stream.peer_cred().map(|c| c.uid());
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                if !matches!(peer, Ok(uid) if uid == 0 || uid == me_uid) {
                    tracing::warn!("control socket: refused a client with uid {peer:?}");
                    let e = "permission denied: only root or the mount's user may use this socket";
                    return refuse(r, w, e).await;
                }
                let mut first = String::new();
                match read_request(&mut r, &mut first).await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) => return refuse(r, w, &e).await,
                }
                match serde_json::from_str::<Request>(&first) {
                    Ok(Request::Loader) => return loader::session(me.live.clone(), r, w).await,
                    Ok(Request::Log) => return me.stream_log(w).await,
                    Ok(Request::Restart { binary }) => return me.restart(binary, w).await,
                    _ => {}
                }
                let mut line = first;
                loop {
                    let mut reply = me.answer(line.trim_end()).await;
                    reply.push('\n');
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        break;
                    }
                    match read_request(&mut r, &mut line).await {
                        Ok(n) if n > 0 => {}
                        Ok(_) => break,
                        Err(e) => return refuse(r, w, &e).await,
                    }
                }
            });
        }
    }
}

/// Answer `error` and close. What the client still sends is read and dropped first (at most
/// 64 MiB, for at most 2 s): a Unix socket closed with unread input resets the connection, and
/// the client would see that instead of the answer.
async fn refuse(mut r: impl tokio::io::AsyncRead + Unpin, mut w: tokio::net::unix::OwnedWriteHalf, error: &str) {
    use tokio::io::AsyncReadExt;
    let _ = w.write_all(format!("{}\n", serde_json::json!({ "error": error })).as_bytes()).await;
    let _ = w.shutdown().await;
    let (mut rest, mut sink) = ((&mut r).take(64 << 20), tokio::io::sink());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), tokio::io::copy(&mut rest, &mut sink)).await;
}

/// Ask the daemon of `mountpoint` one request; returns the `ok` value.
pub fn ask(mountpoint: &Path, request: &serde_json::Value) -> Result<serde_json::Value, AskError> {
    ask_within(mountpoint, request, std::time::Duration::from_secs(10))
}

/// [`ask`], waiting up to `timeout` for the reply (a version switch may take longer).
pub fn ask_within(
    mountpoint: &Path,
    request: &serde_json::Value,
    timeout: std::time::Duration,
) -> Result<serde_json::Value, AskError> {
    use std::io::{BufRead, Write};
    let path = socket_path(mountpoint).map_err(AskError::SocketDir)?;
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|source| AskError::NotServed {
        mountpoint: mountpoint.display().to_string(),
        socket: path.display().to_string(),
        source,
    })?;
    let io = |source| AskError::Io { mountpoint: mountpoint.display().to_string(), source };
    s.set_read_timeout(Some(timeout)).ok();
    writeln!(s, "{request}").map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).map_err(io)?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| AskError::BadReply(e.to_string()))?;
    match (v.get("ok"), v.get("error")) {
        (Some(ok), _) => Ok(ok.clone()),
        (_, Some(e)) => Err(AskError::Refused(e.as_str().unwrap_or("error").to_string())),
        _ => Err(AskError::BadReply(line.trim().chars().take(200).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_socket_directory_must_be_ours_and_closed() {
        let t = tempfile::tempdir().unwrap();
        let ours = t.path().join("ours");
        incfs_store::private_dir(&ours).unwrap();
        assert_eq!(check_private_dir(&ours), Ok(()));

        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_private_dir(&open).unwrap_err().contains("writable by no one else"));

        let link = t.path().join("link");
        std::os::unix::fs::symlink(&ours, &link).unwrap();
        assert!(check_private_dir(&link).unwrap_err().contains("not a directory"));

        // Someone else's (a planted /tmp/incfs-<uid>): only root can make one here to test.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = t.path().join("theirs");
            incfs_store::private_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            assert!(check_private_dir(&theirs).unwrap_err().contains("uid 65534"));
        }
    }
}
