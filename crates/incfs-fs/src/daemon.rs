//! Mounting: verify the manifest (or fall back to the cached one when every source is
//! unreachable), refuse rollbacks, mount FUSE, serve the control socket, follow new versions if
//! asked, unmount on SIGTERM or SIGINT, and return when the filesystem is unmounted by any means.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};
use incfs_fetch::{Image, ImageError, Source, SourceError, SourceOptions};
use incfs_format::profile::{Profile, Recorder, MAX_PROFILE_BYTES};
use incfs_format::{layout, Manifest};
use incfs_sign::TrustedKeys;
use incfs_store::Store;
use parking_lot::Mutex;

use crate::background::BackgroundOptions;
use crate::control::{socket_path, Control};
use crate::fuse::{FsOptions, IncFs};
use crate::handover::{InitFacts, Link, Takeover, ToSupervisor, ToWorker};
use crate::live::{Live, Policy};
use crate::mirrors::Mirrors;
use crate::plain::PlainCopies;
use crate::reader::Reader;
use crate::stats::Stats;
use crate::view::{View, Views};

/// Everything `incfs mount` was asked.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Repository locations; the first is the primary, the rest mirrors.
    pub sources: Vec<String>,
    pub mountpoint: PathBuf,
    pub trust: TrustedKeys,
    pub cache: PathBuf,
    pub settings: MountSettings,
}

/// How a mount behaves (every field has a default).
#[derive(Debug, Clone)]
pub struct MountSettings {
    /// Bound on a read that waits for the network.
    pub read_timeout: Duration,
    /// FUSE request threads.
    pub threads: usize,
    /// Readahead and background requests in flight at once.
    pub parallel: usize,
    /// How far on either side of a cold small file the spans of its neighbours in the pack are
    /// fetched with it, in bytes (0: only its own).
    pub nearby: u64,
    /// Complete the image in the background.
    pub background: bool,
    /// Cap on background fetching, bytes per second.
    pub bandwidth: Option<u64>,
    /// Mount from the cache alone, without contacting any source.
    pub offline: bool,
    /// Serve complete files through FUSE passthrough.
    pub passthrough: bool,
    /// Space for passthrough's plain copies; `None`: a quarter of the cache's filesystem.
    pub plain_limit: Option<u64>,
    /// Limit on the whole cache directory, recorded in it (a smaller recorded one stays).
    pub cache_size: Option<u64>,
    /// Paths of the image to fetch and pin once mounted.
    pub pin: Vec<String>,
    /// Access profile to fetch first (instead of the one published with the image).
    pub profile: Option<PathBuf>,
    /// Record an access profile of this mount here.
    pub record_profile: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Look for a newer version this often and switch to it.
    pub follow: Option<Duration>,
    /// A data loader command (`sh -c`): data blocks come from it, not from the sources.
    pub loader: Option<String>,
    /// The image expected (manifest name); also accepts a source now serving it instead of the
    /// image the cache saw it serve before.
    pub image: Option<String>,
    /// Accept manifests whose signed expiry has passed.
    pub allow_expired: bool,
    /// Loaders may push new files into the mount (their `add` messages).
    pub loader_add: bool,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            read_timeout: Duration::from_secs(5),
            threads: 8,
            parallel: crate::reader::DEFAULT_PARALLEL,
            nearby: crate::nearby::DEFAULT_NEARBY,
            background: true,
            bandwidth: None,
            offline: false,
            passthrough: true,
            plain_limit: None,
            cache_size: None,
            pin: Vec::new(),
            profile: None,
            record_profile: None,
            metrics: None,
            follow: None,
            loader: None,
            image: None,
            allow_expired: false,
            loader_add: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Dictionary(#[from] crate::dictionaries::DictionaryLoadError),
    #[error(transparent)]
    Source(#[from] incfs_fetch::SourceError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] incfs_store::StoreError),
    #[error(
        "{source_name} offers {name} version {offered}, older than version {accepted} already accepted by this cache; \
         refusing the rollback"
    )]
    Rollback { source_name: String, name: String, offered: u64, accepted: u64 },
    #[error("{source_name} serves image {offered:?}, not {expected:?} (--image); check the source address")]
    NotTheImage { source_name: String, offered: String, expected: String },
    #[error(
        "{source_name} served image {pinned:?} to the cache {cache} before and now serves {offered:?}; refusing it \
         (if the repository was replaced on purpose, mount with --image {offered:?})"
    )]
    ImageChanged { source_name: String, pinned: String, offered: String, cache: String },
    #[error("no source could be reached ({0}) and the cache {1} holds no copy of this image to mount offline")]
    Offline(String, String),
    #[error("control socket: {0}")]
    ControlSocket(String),
    #[error("--offline: the cache {0} holds no image from {1}; mount once with the network first")]
    NotCached(String, String),
    #[error("the cache {0} is being checked by incfs fsck; mount again when it is done")]
    CacheBusy(String),
    #[error("metrics endpoint {addr}: {error}")]
    Metrics { addr: std::net::SocketAddr, error: std::io::Error },
    #[error("profile {}: {error}", path.display())]
    Profile { path: PathBuf, error: String },
    #[error("mountpoint {}: {reason}", path.display())]
    Mountpoint { path: PathBuf, reason: String },
    #[error("mounting at {}: {error}", path.display())]
    Fuse { path: PathBuf, error: std::io::Error },
    #[error("taking the mount over: {0}")]
    Takeover(String),
    #[error(transparent)]
    Link(#[from] crate::handover::LinkError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The manifest a mount serves, and how it was had.
struct Opened {
    manifest: Arc<Manifest>,
    /// The manifest as signed and published.
    bytes: bytes::Bytes,
    /// From the cache, not from a source.
    from_cache: bool,
    /// What the user should know (shown by `incfs mount` and logged).
    warnings: Vec<String>,
}

impl MountError {
    /// Whether the cache's copy may stand in when every source answered this way: yes for a
    /// broken or attacked publication (missing, malformed, badly signed, older, expired: the
    /// cache holds a version verified when fresh, no older than any the cache accepted), no for
    /// an image other than the one asked for, which needs the user's decision.
    fn cache_may_answer(&self) -> bool {
        !matches!(self, MountError::NotTheImage { .. } | MountError::ImageChanged { .. })
    }
}

/// Get the manifest: from the first source whose answer holds (signed by a trusted key,
/// well-formed, the image expected, not expired, not older than what this cache accepted). A
/// source that answers wrongly does not stop the others from being tried. When none holds, or
/// none can be reached, the cache's copy is mounted (signature checked again), with a warning
/// saying why, except when a source serves another image than the one asked for: that is
/// refused. With no copy in the cache, the first wrong answer is the mount's error.
async fn open_image(opts: &MountOptions, sources: &[Source], store: &Store) -> Result<Opened, MountError> {
    let mut unreachable = Vec::new();
    let mut refused: Option<MountError> = None;
    for source in sources {
        let answer = match source.get(layout::LATEST_MANIFEST, layout::MAX_MANIFEST_BYTES).await {
            Ok(bytes) => accept_manifest(opts, sources, store, source, bytes.clone()).map(|m| (m, bytes)),
            Err(e @ SourceError::NotFound { .. }) => Err(e.into()),
            Err(e) => {
                tracing::warn!("{e}");
                unreachable.push(e.to_string());
                continue;
            }
        };
        match answer {
            Ok((manifest, bytes)) => return Ok(Opened { manifest, bytes, from_cache: false, warnings: Vec::new() }),
            Err(e) if !e.cache_may_answer() => return Err(e),
            Err(e) => {
                if sources.len() > 1 {
                    tracing::warn!("{e}; trying the next source");
                }
                refused.get_or_insert(e);
            }
        }
    }
    let Some((m, bytes)) = cached_image(opts, sources, store)? else {
        return Err(match refused {
            Some(e) => e,
            None => MountError::Offline(unreachable.join("; "), opts.cache.display().to_string()),
        });
    };
    let why = match &refused {
        Some(e) => format!("no source gave a manifest that holds ({e})"),
        None => format!("no source could be reached ({})", unreachable.join("; ")),
    };
    let warning = format!("{why}; mounted {} version {} from the cache", m.name, m.version);
    tracing::warn!("{warning}");
    Ok(Opened { manifest: m, bytes, from_cache: true, warnings: vec![warning] })
}

/// Check a manifest `source` sent (signature, expiry, the image expected or pinned, rollback
/// record) and record it as accepted, pinning every source to its image.
fn accept_manifest(
    opts: &MountOptions,
    sources: &[Source],
    store: &Store,
    source: &Source,
    bytes: bytes::Bytes,
) -> Result<Arc<Manifest>, MountError> {
    let image = Image::from_manifest_bytes(source.clone(), bytes.clone(), &opts.trust)?;
    image.check_fresh(opts.settings.allow_expired)?;
    let m = image.manifest();
    // Named with --image: that image only (and a pin to another one is overridden). Else the
    // image this source served before, if any.
    if opts.settings.image.is_some() {
        expect_image(opts, source.name(), &m.name)?;
    } else if let Some(pinned) = store.source_image(source.name())?.filter(|p| *p != m.name) {
        return Err(MountError::ImageChanged {
            source_name: source.name().to_string(),
            pinned,
            offered: m.name.clone(),
            cache: opts.cache.display().to_string(),
        });
    }
    let key_id = *image.signer().id();
    if let Some(acc) = store.accepted(&m.name)? {
        if acc.version > m.version {
            return Err(MountError::Rollback {
                source_name: source.name().to_string(),
                name: m.name.clone(),
                offered: m.version,
                accepted: acc.version,
            });
        }
    }
    store.accept(&key_id, &m.name, m.version, &bytes)?;
    for s in sources {
        store.remember_source(s.name(), &key_id, &m.name)?;
    }
    Ok(m.clone())
}

/// Refuse image `offered` from `source_name` if `mount --image` named another.
fn expect_image(opts: &MountOptions, source_name: &str, offered: &str) -> Result<(), MountError> {
    match &opts.settings.image {
        Some(expected) if expected != offered => Err(MountError::NotTheImage {
            source_name: source_name.to_string(),
            offered: offered.to_string(),
            expected: expected.clone(),
        }),
        _ => Ok(()),
    }
}

/// The newest manifest this cache accepted for the primary source, its signature checked again.
fn cached_image(
    opts: &MountOptions,
    sources: &[Source],
    store: &Store,
) -> Result<Option<(Arc<Manifest>, bytes::Bytes)>, MountError> {
    let primary = &sources[0];
    let Some(acc) = store.manifest_for_source(primary.name())? else {
        return Ok(None);
    };
    let bytes = bytes::Bytes::from(acc.bytes);
    let image = Image::from_manifest_bytes(primary.clone(), bytes.clone(), &opts.trust)?;
    let m = image.manifest();
    expect_image(opts, &format!("the cache's copy of {}", primary.name()), &m.name)?;
    // No expiry check here: expiry guards against a source replaying an old version; the
    // cache's copy was fresh when accepted, and offline there is no source to distrust.
    if m.expired_at(incfs_fetch::image::unix_now()) && !opts.settings.allow_expired {
        tracing::warn!("mounting {} version {} from the cache: its signed expiry has passed", m.name, m.version);
    }
    Ok(Some((m.clone(), bytes)))
}

/// The access profile to fetch first: the one given, else the one published beside the
/// manifest (optional: a missing or bad one only costs ordering).
async fn load_profile(opts: &MountOptions, sources: &[Source], offline: bool) -> Result<Option<Profile>, MountError> {
    if let Some(path) = &opts.settings.profile {
        let bad = |error: String| MountError::Profile { path: path.clone(), error };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        return Profile::parse(&bytes).map(Some).map_err(|e| bad(e.to_string()));
    }
    if offline {
        return Ok(None);
    }
    for source in sources {
        match source.size(layout::PROFILE).await {
            Ok(n) if n > MAX_PROFILE_BYTES as u64 => {
                tracing::warn!("{}: profile of {n} bytes is too large; ignored", source.name());
                return Ok(None);
            }
            Ok(_) => {}
            Err(SourceError::NotFound { .. }) => return Ok(None),
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        }
        match source.get(layout::PROFILE, MAX_PROFILE_BYTES as u64).await.map(|b| Profile::parse(&b)) {
            Ok(Ok(p)) => {
                tracing::info!("fetching in the order of the published profile ({} entries)", p.entries.len());
                return Ok(Some(p));
            }
            Ok(Err(e)) => {
                tracing::warn!("{}: published profile ignored: {e}", source.name());
                return Ok(None);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
    Ok(None)
}

/// A quarter of the size of the filesystem holding `dir`.
fn default_plain_limit(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs only writes into the zeroed struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_blocks.saturating_mul(st.f_frsize) / 4
}

/// Write the recorded profile atomically.
fn save_profile(recorder: &Mutex<Recorder>, path: &Path) {
    let text = recorder.lock().profile().encode();
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
        tracing::error!("cannot write the profile {}: {e}", path.display());
    }
}

/// The sysfs readahead knob of the filesystem mounted at `mountpoint`, from
/// `/proc/self/mountinfo` (its device number; not a stat, which would be a request to our own
/// mount before it serves).
fn readahead_knob(mountpoint: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Mount points are written with spaces, tabs, newlines and backslashes as octal escapes.
    let want =
        mountpoint.to_str()?.replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011").replace('\n', "\\012");
    // The newest mount there is ours (mountinfo lists mounts in the order they were made).
    let dev = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) == Some(&want.as_str()) {
            f.get(2).map(|d| d.to_string())
        } else {
            None
        }
    });
    dev.map(|d| PathBuf::from(format!("/sys/class/bdi/{d}/read_ahead_kb")))
}

/// Mount and serve until unmounted. `on_ready` runs once the mount is usable, with what the
/// user should be warned of (say, that the image came from the cache because no source held).
///
/// The stages, in order: check the mountpoint; open the cache (shared lock: `incfs fsck`
/// takes it exclusively); accept a manifest ([`open_image`]); build the view of it (pushed
/// files included) and the reader; mount FUSE; serve the control socket and start the
/// background work (completion, `--follow`, loader, metrics, profile recording, signals); run
/// until unmounted; stop everything. Each stage is a function below.
pub fn mount(opts: MountOptions, on_ready: impl FnOnce(&[String])) -> Result<(), MountError> {
    // Under a supervisor (crate::supervisor): its link, and what to take over, if anything.
    let link = Link::from_env().transpose()?.map(Arc::new);
    let takeover = match &link {
        Some(l) => match l.recv()? {
            ToWorker::Hello { takeover } => takeover,
            other => return Err(MountError::Takeover(format!("unexpected first message {other:?}"))),
        },
        None => None,
    };
    let mountpoint = match &takeover {
        // Mounted already: a stat of it would wait for this very process to answer.
        Some(t) => t.mountpoint.clone(),
        None => {
            let mp = std::fs::canonicalize(&opts.mountpoint)
                .map_err(|e| MountError::Mountpoint { path: opts.mountpoint.clone(), reason: e.to_string() })?;
            if !mp.is_dir() {
                return Err(MountError::Mountpoint { path: mp, reason: "not a directory".into() });
            }
            mp
        }
    };
    let _trim = AllocatorTrim::start();
    // Blocking threads verify and store fetched runs: a few per core is enough, and each idle one
    // keeps a malloc arena (RSS).
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(8).enable_all().build()?;
    let (store, cache_lock) = open_cache(&opts)?;
    let (sources, opened) = accept(&opts, &store, &rt, takeover.as_deref())?;
    let manifest = opened.manifest;
    // Before any block is decoded. From the cache when it has them: offline, no source is asked.
    let dictionary_sources: &[Source] = if opened.from_cache { &[] } else { &sources };
    rt.block_on(crate::dictionaries::load(&manifest, &store, dictionary_sources))?;
    // Held while mounted: `incfs cache rm` refuses an image in use.
    let image_lock = crate::cache::image_lock(&opts.cache, &manifest.name)?;
    let _ = image_lock.try_lock_shared();
    mark_used(&store, &manifest.name);
    let profile = rt.block_on(load_profile(&opts, &sources, opened.from_cache || takeover.is_some()))?;
    let recording = opts.settings.record_profile.is_some();
    let Built { reader, views, pushed } =
        build_view(&opts, &store, &manifest, sources, recording, takeover.as_deref())?;
    if let Some(t) = &takeover {
        reader.stats.carry_over(&t.counters);
    }

    // With a loader, data comes when it fills it: the sources give the manifest and trees only,
    // and there is nothing for background completion to fetch.
    let background = opts.settings.background && opts.settings.loader.is_none();
    if let Some(cmd) = &opts.settings.loader {
        reader.set_fills_only(true);
        tracing::info!("data blocks come from the loader {cmd:?}; background completion off");
    }
    let live = Live::new(
        views.clone(),
        reader.clone(),
        Policy {
            trust: opts.trust.clone(),
            allow_expired: opts.settings.allow_expired,
            loader_add: opts.settings.loader_add,
        },
        BackgroundOptions { enabled: background, bandwidth: opts.settings.bandwidth, profile },
        recording,
        (manifest.clone(), opened.bytes.clone()),
        pushed,
    );
    let recorder = opts.settings.record_profile.as_ref().map(|path| {
        // Taking over: go on with what the previous daemon saved (each second).
        let saved = takeover.as_ref().and_then(|_| std::fs::read(path).ok()).and_then(|b| Profile::parse(&b).ok());
        Arc::new(Mutex::new(saved.map_or_else(Recorder::default, |p| Recorder::resume(&p))))
    });
    let plain = if opts.settings.passthrough && recorder.is_some() {
        tracing::info!("recording a profile: passthrough off, so that every first read is seen");
        None
    } else if opts.settings.passthrough {
        let limit = opts.settings.plain_limit.unwrap_or_else(|| default_plain_limit(&opts.cache));
        Some(Arc::new(PlainCopies::open(&opts.cache.join("plain"), limit)?))
    } else {
        None
    };
    let readahead = Arc::new(std::sync::OnceLock::new());
    let fs_opts = FsOptions {
        read_timeout: opts.settings.read_timeout,
        plain: plain.clone(),
        recorder: recorder.clone(),
        readahead: readahead.clone(),
        on_mode: link.clone().map(|l| -> crate::fuse::ModeHook {
            Arc::new(move |ino, mode| {
                if let Err(e) = l.send(&ToSupervisor::Mode { ino, mode }) {
                    tracing::warn!("{e}");
                }
            })
        }),
        takeover: takeover.as_ref().map(|t| (t.init, t.modes.iter().copied().collect())),
        generation: takeover.as_ref().map_or(0, |t| t.restarts),
    };
    let fs = IncFs::new(views, reader.clone(), rt.handle().clone(), fs_opts);
    // Bound before mounting, so that a taken address is an error with nothing mounted.
    let metrics_listener = match opts.settings.metrics {
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr)).map_err(|error| MountError::Metrics { addr, error })?,
        ),
        None => None,
    };
    let session = start_fuse(fs, &manifest.name, &opts, &mountpoint, link.as_deref(), takeover.as_deref())?;
    live.set_notifier(session.notifier());
    let control = Arc::new(Control {
        live: live.clone(),
        reader,
        mountpoint: mountpoint.clone(),
        cache: opts.cache.clone(),
        plain,
        offline: opened.from_cache,
        prefetches: Mutex::new(Default::default()),
        supervisor: link.clone(),
        restarts: takeover.as_ref().map_or((0, None), |t| (t.restarts, t.restart_error.clone())),
    });
    let sock = start_services(&opts, &rt, &live, &control, metrics_listener, recorder.clone())?;

    // Written by the first request after FUSE_INIT (INIT itself would undo a larger setting).
    let _ = readahead.set(readahead_knob(&mountpoint));
    if let Some(l) = &link {
        let l2 = l.clone();
        live.on_view(Arc::new(move |v| {
            if let Err(e) = l2.send(&ToSupervisor::View(v)) {
                tracing::warn!("{e}");
            }
        }));
        serve_supervisor(l.clone(), reader_stats(&control));
    }
    if takeover.is_some() {
        // Requests the previous daemon had read but not answered: the kernel sends them again.
        resend_unanswered(&session);
        tracing::info!("serving {} again (daemon pid {})", mountpoint.display(), std::process::id());
    } else {
        tracing::info!("mounted at {}", mountpoint.display());
        on_ready(&opened.warnings);
    }
    if let Some(l) = &link {
        l.send(&ToSupervisor::Ready)?;
    }
    let result = session.run();

    // Unmounted: stop everything this mount started.
    let _ = std::fs::remove_file(&sock);
    if let (Some(rec), Some(path)) = (&recorder, &opts.settings.record_profile) {
        save_profile(rec, path);
        tracing::info!("profile written to {}", path.display());
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    mark_used(&store, &manifest.name);
    drop((cache_lock, image_lock));
    result.map_err(|error| MountError::Fuse { path: mountpoint, error })
}

fn reader_stats(control: &Control) -> Arc<Stats> {
    control.reader.stats.clone()
}

/// The FUSE session: mounted here (no supervisor), or by the supervisor and initialized here
/// (first worker), or taken over initialized (a worker replacing another).
fn start_fuse(
    fs: IncFs,
    name: &str,
    opts: &MountOptions,
    mountpoint: &Path,
    link: Option<&Link>,
    takeover: Option<&Takeover>,
) -> Result<Session<IncFs>, MountError> {
    let fuse_err = |error| MountError::Fuse { path: mountpoint.to_path_buf(), error };
    let Some(link) = link else {
        let config = fuse_config(name, opts.settings.threads, true);
        return Session::new(fs, mountpoint, &config).map_err(fuse_err);
    };
    // Every thread reads the supervisor's fd itself, not a clone: requests read from a clone
    // are failed by the kernel when the clone closes (a dying worker), while those read from
    // the shared fd stay pending, to be sent again to the next worker.
    let config = fuse_config(name, opts.settings.threads, false);
    let acl = config.acl;
    if takeover.is_some() {
        let fd = link.recv_fd()?;
        return Ok(Session::from_fd_initialized(fs, fd, acl, config));
    }
    link.send(&ToSupervisor::Mount { name: name.to_string() })?;
    match link.recv()? {
        ToWorker::Mounted => {}
        ToWorker::MountFailed { error } => return Err(fuse_err(std::io::Error::other(error))),
        other => return Err(MountError::Takeover(format!("unexpected answer to mount: {other:?}"))),
    }
    let fd = link.recv_fd()?;
    let passthrough = fs.passthrough_flag();
    let session = Session::from_fd(fs, fd, acl, config).map_err(fuse_err)?;
    let init = InitFacts { passthrough: passthrough.load(std::sync::atomic::Ordering::Relaxed) };
    link.send(&ToSupervisor::Initialized { init })?;
    Ok(session)
}

/// Tell the kernel to send again every request read from this connection and not answered
/// (`FUSE_NOTIFY_RESEND`, Linux 6.9): those the previous worker held when it died or stopped.
fn resend_unanswered(session: &Session<IncFs>) {
    use std::os::fd::AsFd;
    // struct fuse_out_header { len: u32, error: i32 (the notify code), unique: u64 (0) }
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&16u32.to_le_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    if let Err(e) = nix::unistd::write(session.as_fd(), &header) {
        tracing::warn!(
            "cannot ask the kernel to resend unanswered requests ({e}; Linux 6.9 or later has it): \
             reads the previous daemon held will not complete"
        );
    }
}

/// Wait for the supervisor's [`ToWorker::Stop`] (an `incfs restart`): hand the counters over
/// and exit at once; the replacement takes the connection, and the kernel sends it whatever
/// this process leaves unanswered. Exiting without unwinding is what `kill -9` does too, and
/// the cache is built to survive that at any instant.
fn serve_supervisor(link: Arc<Link>, stats: Arc<Stats>) {
    let Some(mut reader) = link.take_reader() else { return };
    std::thread::spawn(move || loop {
        match crate::handover::read_frame::<ToWorker>(&mut reader) {
            Ok(ToWorker::Stop) => {
                tracing::info!("handing the mount over to a new daemon");
                let _ = link.send(&ToSupervisor::Counters { counters: stats.snapshot() });
                std::process::exit(0);
            }
            Ok(other) => tracing::warn!("supervisor said {other:?}; ignored"),
            // The supervisor is gone; PR_SET_PDEATHSIG ends this process.
            Err(_) => return,
        }
    });
}

fn mark_used(store: &Store, name: &str) {
    if let Err(e) = store.mark_used(name) {
        tracing::warn!("cannot record when {name} was used: {e}");
    }
}

/// `mount --pin`: fetch those files first, then pin them (logged; a failure leaves the mount up).
async fn pin_at_mount(control: Arc<Control>, paths: Vec<String>) {
    if let Err(e) = control.pin(&paths, true, true) {
        return tracing::error!("--pin: {e}");
    }
    let progress = match control.prefetch(&paths) {
        Ok(p) => p,
        Err(e) => return tracing::error!("--pin: {e}"),
    };
    // Background fetching retries what fails; this waits as long as the mount lives.
    loop {
        match control.prefetch_progress(progress.id) {
            Ok(p) if p.blocks_present >= p.blocks_total => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return tracing::error!("--pin: {e}"),
        }
    }
    match tokio::task::spawn_blocking(move || control.pin(&paths, true, false)).await {
        Ok(Ok(r)) => tracing::info!("--pin: {} files pinned ({} bytes)", r.files, r.bytes),
        Ok(Err(e)) => tracing::error!("--pin: {e}"),
        Err(e) => tracing::error!("--pin: {e}"),
    }
}

/// glibc gives each thread that allocates an arena of its own and keeps what is freed there:
/// with FUSE, async and blocking threads all passing buffers around, RSS grew to several times
/// what is live (measured 332 MiB at peak). One arena keeps it near the live set (peak during a
/// 1 GiB cold read: 81-91 MiB, against 99-107 with two arenas), at the price of its lock: +0.2
/// CPU seconds per GiB read (2.4-2.6 -> 2.55-2.8; a pool of reused 4 KiB block buffers did not
/// change that, so it is not the block buffers). A trim every second returns what the heap holds
/// freed (a fixed mmap threshold did that too, but its page faults cost 0.5 CPU seconds per GiB
/// read). The trimming thread stops when this is dropped.
struct AllocatorTrim {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AllocatorTrim {
    fn start() -> AllocatorTrim {
        // SAFETY: mallopt only tunes the allocator; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_secs(1)) {
                // SAFETY: malloc_trim only returns free heap memory to the kernel; thread-safe.
                unsafe { libc::malloc_trim(0) };
            }
        });
        AllocatorTrim { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for AllocatorTrim {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Open the cache's store and take its shared lock (`incfs fsck` takes it exclusively).
fn open_cache(opts: &MountOptions) -> Result<(Arc<Store>, std::fs::File), MountError> {
    let store = Arc::new(Store::open(&opts.cache)?);
    if let Some(asked) = opts.settings.cache_size {
        let io = |source| incfs_store::StoreError::Io { path: opts.cache.clone(), source };
        let limit = incfs_store::limit::lower(&opts.cache, asked).map_err(io)?;
        if limit < asked {
            tracing::warn!(
                "the cache {} keeps its recorded limit of {limit} bytes, smaller than --cache-size; \
                 incfs cache limit raises it",
                opts.cache.display()
            );
        }
        store.reload_limit()?;
    }
    let lock_file = crate::fsck::lock_path(&opts.cache);
    let cache_lock = std::fs::File::options().create(true).truncate(false).write(true).open(&lock_file)?;
    if cache_lock.try_lock_shared().is_err() {
        return Err(MountError::CacheBusy(opts.cache.display().to_string()));
    }
    Ok((store, cache_lock))
}

/// The sources, and the manifest to serve: from them, or from the cache (`--offline`, or none
/// holding).
fn accept(
    opts: &MountOptions,
    store: &Store,
    rt: &tokio::runtime::Runtime,
    takeover: Option<&Takeover>,
) -> Result<(Vec<Source>, Opened), MountError> {
    // Requests may outlive the read that started them (the block is still worth having), but
    // not by much; the read itself is bounded by read_timeout.
    let source_opts = SourceOptions {
        request_timeout: opts.settings.read_timeout * 2 + Duration::from_secs(1),
        connect_timeout: Duration::from_secs(5),
        retries: 2,
    };
    let sources = opts.sources.iter().map(|s| Source::parse(s, &source_opts)).collect::<Result<Vec<_>, _>>()?;
    let opened = if let Some(t) = takeover {
        // The manifest the previous daemon served, as signed (checked again all the same); no
        // source is contacted: the mount must answer again at once.
        let bytes = bytes::Bytes::from(t.view.manifest.clone());
        let image = Image::from_manifest_bytes(sources[0].clone(), bytes.clone(), &opts.trust)?;
        let m = image.manifest().clone();
        tracing::info!("taking the mount over: {} version {}", m.name, m.version);
        Opened { manifest: m, bytes, from_cache: opts.settings.offline, warnings: Vec::new() }
    } else if opts.settings.offline {
        let (m, bytes) = cached_image(opts, &sources, store)?
            .ok_or_else(|| MountError::NotCached(opts.cache.display().to_string(), sources[0].name().to_string()))?;
        tracing::info!("--offline: mounting version {} from the cache; no source is contacted", m.version);
        Opened { manifest: m, bytes, from_cache: true, warnings: Vec::new() }
    } else {
        rt.block_on(open_image(opts, &sources, store))?
    };
    Ok((sources, opened))
}

/// What [`build_view`] makes.
struct Built {
    reader: Arc<Reader>,
    views: Arc<Views>,
    pushed: Vec<crate::live::Pushed>,
}

/// The reader over `sources` and the first view of `manifest`, with the files pushed into
/// earlier mounts of this image shown again (checked again).
fn build_view(
    opts: &MountOptions,
    store: &Arc<Store>,
    manifest: &Arc<Manifest>,
    sources: Vec<Source>,
    recording: bool,
    takeover: Option<&Takeover>,
) -> Result<Built, MountError> {
    let stats = Arc::new(Stats::default());
    let mirrors = Arc::new(Mirrors::new(sources));
    let reader = Arc::new(Reader::new(&manifest.objects, store.clone(), mirrors, stats, opts.settings.parallel));
    reader.set_nearby(opts.settings.nearby);
    // Blocks of files with a plain copy (this mount's or another's) are read from the copy.
    reader.set_plain_dir(opts.cache.join("plain"));
    let weak = Arc::downgrade(&reader);
    store.on_evict(Arc::new(move |key: &incfs_store::FileKey, first: u64, count: u32| {
        if let Some(r) = weak.upgrade() {
            r.presence.unmark(key, first, count);
        }
    }));
    let pushed = crate::live::restore_pushed(&reader, &opts.trust, manifest);
    let (served, skipped) = crate::live::with_pushed(manifest, &pushed);
    for s in skipped {
        tracing::warn!("pushed file {s} has no place in version {}: not shown", manifest.version);
    }
    let view = match takeover {
        None => View::first(served, recording),
        // The kernel knows files by the numbers the previous daemon gave: the same ones, for
        // the same paths, or no takeover at all (wrong numbers would show one file's data under
        // another's name).
        Some(t) => (crate::handover::shape(&served) == t.view.shape)
            .then(|| View::restored(served, t.view.inos.clone(), t.view.max_ino, recording))
            .flatten()
            .ok_or(MountError::Takeover(
                "the files shown changed shape since the previous daemon (a push it had not reported)".into(),
            ))?,
    };
    reader.presence.load(store, view.contents.iter().map(|(k, _)| *k))?;
    Ok(Built { reader, views: Arc::new(Views::new(view)), pushed })
}

/// How the kernel is asked to mount image `name`: read-only, `nodev`, `default_permissions`,
/// `threads` request threads (on cloned fds if `clone_fd`); as root, open to all users and
/// unmounted by fusermount3 if the process holding the mount dies (so the mountpoint never
/// stays dead).
pub(crate) fn fuse_config(name: &str, threads: usize, clone_fd: bool) -> Config {
    let root = nix_is_root();
    let mut mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("incfs:{name}")),
        MountOption::Subtype("incfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoAtime,
    ];
    if root {
        mount_options.push(MountOption::AutoUnmount);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if root { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(threads.max(1));
    config.clone_fd = clone_fd;
    config
}

/// Start what runs beside FUSE on the mount's runtime: background completion, `--follow`, the
/// loader, metrics, profile recording, the control socket (its path is returned) and the
/// signal handler. All of it ends with the runtime.
fn start_services(
    opts: &MountOptions,
    rt: &tokio::runtime::Runtime,
    live: &Arc<Live>,
    control: &Arc<Control>,
    metrics_listener: Option<tokio::net::TcpListener>,
    recorder: Option<Arc<Mutex<Recorder>>>,
) -> Result<PathBuf, MountError> {
    let mountpoint = control.mountpoint.as_path();
    let sock = socket_path(mountpoint).map_err(MountError::ControlSocket)?;
    let _ = std::fs::remove_file(&sock);
    {
        let _guard = rt.enter();
        live.start_background();
    }
    if let Some(interval) = opts.settings.follow.filter(|_| !opts.settings.offline) {
        rt.spawn(live.clone().follow(interval));
    }
    if let Some(cmd) = opts.settings.loader.clone() {
        rt.spawn(crate::loader::run_command(live.clone(), cmd));
    }
    if !opts.settings.pin.is_empty() {
        rt.spawn(pin_at_mount(control.clone(), opts.settings.pin.clone()));
    }
    // Pins follow their paths across versions: changed content is fetched and pinned anew.
    let (weak, handle) = (Arc::downgrade(control), rt.handle().clone());
    live.on_switch(Arc::new(move |m| {
        let Some(control) = weak.upgrade() else { return };
        let renew = control.pins_to_renew(m);
        if !renew.is_empty() {
            tracing::info!("pinning the new content of {} pinned paths", renew.len());
            handle.spawn(pin_at_mount(control, renew));
        }
    }));
    if let (Some(addr), Some(listener)) = (opts.settings.metrics, metrics_listener) {
        tracing::info!("metrics on http://{addr}/metrics");
        rt.spawn(crate::metrics::serve(control.clone(), listener));
    }
    if let (Some(rec), Some(path)) = (recorder, opts.settings.record_profile.clone()) {
        rt.spawn(async move {
            let mut saved = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = {
                    let r = rec.lock();
                    (r.profile().entries.len(), r.profile().entries.last().map_or(0, |e| e.count))
                };
                if now != saved {
                    saved = now;
                    let (rec, path) = (rec.clone(), path.clone());
                    let _ = tokio::task::spawn_blocking(move || save_profile(&rec, &path)).await;
                }
            }
        });
    }
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&sock)
    };
    // Owner only (its directory is too); SO_PEERCRED is checked on every connection as well.
    let listener = listener
        .and_then(|l| std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map(|_| l));
    match listener {
        Ok(l) => {
            rt.spawn(control.clone().serve(l));
        }
        Err(e) => tracing::warn!("no control socket at {}: {e}; incfs status will not work", sock.display()),
    }
    let signal_mountpoint = mountpoint.to_path_buf();
    let supervisor = control.supervisor.is_some().then(|| {
        // SAFETY: getppid has no preconditions and cannot fail.
        unsafe { libc::getppid() }
    });
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut usr1)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::user_defined1()))
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr1.recv() => {
                    // From PR_SET_PDEATHSIG if our supervisor died (we were reparented);
                    // anything else is ignored.
                    // SAFETY: getppid has no preconditions and cannot fail.
                    if supervisor.is_some_and(|s| unsafe { libc::getppid() } != s) {
                        tracing::error!(
                            "the supervisor died: detaching {} and exiting",
                            signal_mountpoint.display()
                        );
                        unmount_lazily(&signal_mountpoint);
                        std::process::exit(1);
                    }
                }
            }
        }
        tracing::warn!("signal received: unmounting {}", signal_mountpoint.display());
        // The same path as `incfs unmount`: the kernel then ends the session and run() returns.
        if let Err(e) = unmount(&signal_mountpoint) {
            tracing::error!("unmount failed: {e}");
        }
    });
    Ok(sock)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Detach `mountpoint` at once even if files are open (`umount -l`; `fusermount3 -uz` for
/// users): what is left when the process holding the mount is gone.
fn unmount_lazily(mountpoint: &Path) {
    if nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).is_ok() {
        return;
    }
    let out = std::process::Command::new("fusermount3").arg("-uz").arg(mountpoint).output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        tracing::error!("cannot detach {}: {out:?}", mountpoint.display());
    }
}

/// Unmount `mountpoint` (as `fusermount3 -u`, falling back to `umount`).
pub fn unmount(mountpoint: &Path) -> Result<(), String> {
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| std::process::Command::new(cmd).args(args).output();
    let mp = mountpoint.as_os_str();
    match run("fusermount3", &["-u".as_ref(), mp]) {
        Ok(o) if o.status.success() => return Ok(()),
        Ok(o) => tracing::debug!("fusermount3: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => tracing::debug!("fusermount3: {e}"),
    }
    match run("umount", &[mp]) {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}
