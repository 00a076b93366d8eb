//! A mount's switchable state: the version being served (its [`View`]) and the background
//! fetcher completing it, and switching both to another version of the image while mounted
//! (`incfs update`, `incfs mount --follow`).
//!
//! A switch fetches the other version's signed manifest, checks it exactly as a mount does
//! (trusted signature, same image, no rollback unless allowed, an object table that extends the
//! mounted one), records it in the cache, then makes it current in one step: every later lookup
//! sees the new tree. The kernel is told to forget the names and listings that changed; inodes
//! that did not change keep their numbers and cached pages. Nothing is fetched for the switch
//! but the manifest: blocks are content-addressed, so only blocks the cache lacks are fetched,
//! when read or by background completion.
//!
//! Single files can also be pushed in without a new manifest ([`Live::add`], `incfs add`): a
//! path, a mode, and the file's size, Merkle tree and a trusted key's signature binding its
//! fs-verity digest to this image, that path and that mode (`incfs_format::push`). The file
//! joins the tree served (and every later version, where its path is free); its blocks come
//! from fills and are verified against that tree like any others.

use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use incfs_fetch::{Image, ImageError, SourceError};
use incfs_format::layout;
use incfs_format::manifest::{is_valid_name, Dirent, FileData, Inode, InodeKind, Manifest, MetaRef, Metadata};
use incfs_format::Hash;
use incfs_sign::TrustedKeys;
use incfs_store::PushedFile;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::background::{Background, BackgroundOptions};
use crate::reader::Reader;
use crate::view::{Changes, Inval, View, Views};

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Dictionary(#[from] crate::dictionaries::DictionaryLoadError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] incfs_store::StoreError),
    #[error("{source_name} serves image {offered:?}, but this mount is of {mounted:?}; mount it elsewhere instead")]
    OtherImage { source_name: String, offered: String, mounted: String },
    #[error(
        "{source_name} offers version {offered}, older than version {current}{accepted}; refusing the rollback \
         (incfs update --allow-rollback to go back on purpose)"
    )]
    Rollback { source_name: String, offered: u64, current: u64, accepted: String },
    #[error(
        "version {offered}'s object table does not extend version {current}'s: it is not a version of the same \
         repository"
    )]
    Unrelated { offered: u64, current: u64 },
    #[error("no source could be reached: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Add(String),
}

/// What a mount accepts beyond a trusted signature, set when it is mounted.
#[derive(Debug, Clone)]
pub struct Policy {
    pub trust: TrustedKeys,
    /// Manifests whose signed expiry has passed are accepted.
    pub allow_expired: bool,
    /// Loader sessions may push new files (`add` messages); without it only fills are taken
    /// from them. Control requests (`incfs add`, root or the mount's user) always may.
    pub loader_add: bool,
}

/// A file pushed into the mount.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Raw path components.
    parent: Vec<u8>,
    name: Vec<u8>,
    inode: Inode,
}

/// Check a file to push into image `image`: a valid path, a size, a tree matching its root, a
/// trusted key's signature binding its digest to this image, path and mode. Its tree is then
/// kept by the reader.
fn check_push(f: &PushedFile, image: &str, trust: &TrustedKeys, reader: &Reader) -> Result<(Pushed, Hash), String> {
    let shown = incfs_format::manifest::display_path(&f.path);
    let parts: Vec<&[u8]> = f.path.split(|&b| b == b'/').filter(|p| !p.is_empty()).collect();
    let Some((name, dirs)) = parts.split_last() else {
        return Err("an empty path; name the file to add".into());
    };
    if let Some(p) = parts.iter().find(|p| !is_valid_name(p)) {
        let p = incfs_format::manifest::display_path(p);
        return Err(format!("{shown}: {p:?} is not a valid file name"));
    }
    if f.size == 0 || f.size > incfs_format::manifest::MAX_FILE_SIZE {
        return Err(format!("{shown}: size {} cannot be pushed (1 byte to 1 PiB)", f.size));
    }
    incfs_verity::MerkleTree::from_compact(f.size, &f.tree, &f.root)
        .map_err(|e| format!("{shown}: its Merkle tree does not match its root hash: {e}"))?;
    let digest = incfs_verity::file_digest(&f.root, f.size);
    let mode = f.mode & 0o7777;
    let message = incfs_format::push::push_message(image, &f.path, mode, &digest);
    let signer = trust.verify_any(&message, &f.signature).ok_or_else(|| {
        let path = String::from_utf8_lossy(&incfs_format::push::canonical_path(&f.path)).into_owned();
        let how = format!("incfs sign-file FILE --key KEY --image {image:?} --path {path:?} --mode {mode:o}");
        if trust.verify_any(&incfs_verity::formatted_digest(&digest), &f.signature).is_some() {
            format!(
                "{shown}: the signature covers only the file's content (an fs-verity digest signature, or one \
                 made by incfs before 2026-12), not where it goes; sign the push with {how}"
            )
        } else {
            format!(
                "{shown}: no trusted key signed {} for image {image:?} at this path with mode {mode:o}; sign it \
                 with {how}",
                incfs_verity::format_digest(&digest)
            )
        }
    })?;
    tracing::info!("{shown}: pushed, digest {} signed by {}", incfs_verity::format_digest(&digest), signer.id_hex());
    let offset = reader.push_tree(f.tree.clone());
    let inode = Inode {
        meta: Metadata { mode, uid: 0, gid: 0, mtime_sec: f.mtime_sec, mtime_nsec: f.mtime_nsec },
        xattrs: vec![],
        kind: InodeKind::File(FileData {
            size: f.size,
            root_hash: f.root,
            meta: Some(MetaRef::dense(crate::reader::PUSHED_OBJECT, offset)),
        }),
    };
    Ok((Pushed { parent: dirs.join(&b'/'), name: name.to_vec(), inode }, digest))
}

/// The files pushed into earlier mounts of `base`'s image, from the cache, each checked again
/// (one that no longer checks, say under another set of trusted keys, is left out and logged).
pub fn restore_pushed(reader: &Reader, trust: &TrustedKeys, base: &Manifest) -> Vec<Pushed> {
    let records = match reader.store().pushed(&base.name) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot read the pushed files of {}: {e}", base.name);
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for r in records {
        match check_push(&r, &base.name, trust, reader) {
            Ok((p, _)) => out.push(p),
            Err(e) => tracing::warn!("pushed file left out: {e}"),
        }
    }
    out
}

/// `base` with the pushed files whose place is free in it (the others are returned by path).
/// Without pushed files, `base` itself: a copy would hold the whole tree twice (for an image of
/// 100,000 files, 14 MiB of the daemon's memory).
pub fn with_pushed(base: &Arc<Manifest>, pushed: &[Pushed]) -> (Arc<Manifest>, Vec<String>) {
    if pushed.is_empty() {
        return (base.clone(), Vec::new());
    }
    let mut m = (**base).clone();
    let mut skipped = Vec::new();
    for p in pushed {
        let label = || incfs_format::manifest::display_path(&[&p.parent[..], &p.name[..]].join(&b'/'));
        let parent = match m.resolve(&p.parent) {
            Some(d) if matches!(m.inodes[d as usize].kind, InodeKind::Dir) => d,
            _ => {
                skipped.push(label());
                continue;
            }
        };
        if m.lookup(parent, &p.name).is_some() {
            skipped.push(label());
            continue;
        }
        m.inodes.push(p.inode.clone());
        let d = Dirent { parent, inode: m.inodes.len() as u32 - 1, name: p.name.clone() };
        let at = m.dirents.partition_point(|e| (e.parent, &e.name[..]) < (d.parent, &d.name[..]));
        m.dirents.insert(at, d);
    }
    (Arc::new(m), skipped)
}

/// What `incfs update` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpdateReport {
    pub from: u64,
    pub to: u64,
    /// False when the mount already served that version.
    pub switched: bool,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

struct Running {
    background: Arc<Background>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct Live {
    pub views: Arc<Views>,
    /// The signed manifest served (the current view's, without pushed files), and its bytes.
    base: Mutex<Arc<Manifest>>,
    base_bytes: Mutex<bytes::Bytes>,
    pushed: Mutex<Vec<Pushed>>,
    pub reader: Arc<Reader>,
    pub policy: Policy,
    background_opts: BackgroundOptions,
    recording: bool,
    running: Mutex<Running>,
    /// Tells the kernel what a switch made stale; set once the FUSE session exists.
    notifier: Mutex<Option<fuser::Notifier>>,
    /// One switch at a time.
    switching: tokio::sync::Mutex<()>,
    on_switch: Mutex<Option<SwitchHook>>,
    /// Told after every change of the view (update, push): the supervisor keeps it.
    on_view: Mutex<Option<ViewHook>>,
}

/// Told of each new view.
pub type ViewHook = Arc<dyn Fn(crate::handover::ViewState) + Send + Sync>;

/// Told of each version switched to.
pub type SwitchHook = Arc<dyn Fn(&Arc<Manifest>) + Send + Sync>;

impl Live {
    /// `views` shows `base` (the signed manifest, and its bytes) with `pushed` (as
    /// [`with_pushed`] made it).
    pub fn new(
        views: Arc<Views>,
        reader: Arc<Reader>,
        policy: Policy,
        background_opts: BackgroundOptions,
        recording: bool,
        (base, base_bytes): (Arc<Manifest>, bytes::Bytes),
        pushed: Vec<Pushed>,
    ) -> Arc<Live> {
        let background = Background::new(reader.clone(), views.current().manifest.clone(), background_opts.clone());
        Arc::new(Live {
            base: Mutex::new(base),
            base_bytes: Mutex::new(base_bytes),
            pushed: Mutex::new(pushed),
            views,
            reader,
            policy,
            background_opts,
            recording,
            running: Mutex::new(Running { background, task: None }),
            notifier: Mutex::new(None),
            switching: tokio::sync::Mutex::new(()),
            on_switch: Mutex::new(None),
            on_view: Mutex::new(None),
        })
    }

    /// Call `hook` with the view served now and after every change of it.
    pub fn on_view(&self, hook: ViewHook) {
        hook(self.served_state());
        *self.on_view.lock() = Some(hook);
    }

    /// What a daemon taking this mount over needs to serve the same view.
    pub fn served_state(&self) -> crate::handover::ViewState {
        let view = self.views.current();
        crate::handover::ViewState {
            manifest: self.base_bytes.lock().to_vec(),
            inos: view.inode_numbers(),
            max_ino: self.views.max_ino(),
            shape: crate::handover::shape(&view.manifest),
        }
    }

    /// Call `hook` with each version switched to (pins follow their paths).
    pub fn on_switch(&self, hook: SwitchHook) {
        *self.on_switch.lock() = Some(hook);
    }

    pub fn set_notifier(&self, n: fuser::Notifier) {
        *self.notifier.lock() = Some(n);
    }

    /// The background fetcher of the current version.
    pub fn background(&self) -> Arc<Background> {
        self.running.lock().background.clone()
    }

    /// Start (or restart) background completion on the runtime of the caller.
    pub fn start_background(&self) {
        let mut r = self.running.lock();
        if let Some(t) = r.task.take() {
            t.abort();
        }
        r.task = Some(tokio::spawn(r.background.clone().run()));
    }

    pub fn manifest(&self) -> Arc<Manifest> {
        self.views.current().manifest.clone()
    }

    /// Fetch a version's signed manifest (the newest: `None`) from the first source whose
    /// answer holds: trusted, the version asked for, not expired (unless allowed), and passing
    /// `check` (same image, no rollback).
    async fn fetch(
        &self,
        version: Option<u64>,
        allow_expired: bool,
        check: impl Fn(&Image) -> Result<(), UpdateError>,
    ) -> Result<Image, UpdateError> {
        let key = version.map_or(layout::LATEST_MANIFEST.to_string(), layout::version_manifest);
        // A source that answers wrongly (missing, malformed, badly signed) does not stop the
        // others from being tried; with none holding, the first wrong answer is the error.
        let mut unreachable = Vec::new();
        let mut refused: Option<UpdateError> = None;
        for source in self.reader.mirrors().sources() {
            let answer = match source.get(&key, layout::MAX_MANIFEST_BYTES).await {
                Ok(bytes) => Image::from_manifest_bytes(source.clone(), bytes, &self.policy.trust)
                    .and_then(|i| match version {
                        Some(v) => i.expect_version(v),
                        None => Ok(i),
                    })
                    .and_then(|i| i.check_fresh(allow_expired).map(|()| i))
                    .map_err(UpdateError::from)
                    .and_then(|i| check(&i).map(|()| i)),
                Err(e @ SourceError::NotFound { .. }) => Err(e.into()),
                Err(e) => {
                    unreachable.push(e.to_string());
                    continue;
                }
            };
            match answer {
                Ok(image) => return Ok(image),
                Err(e) => {
                    tracing::warn!("{e}");
                    refused.get_or_insert(e);
                }
            }
        }
        Err(refused.unwrap_or_else(|| UpdateError::Unreachable(unreachable.join("; "))))
    }

    /// Switch to version `to` (default: the newest published).
    pub async fn update(
        &self,
        to: Option<u64>,
        allow_rollback: bool,
        allow_expired: bool,
    ) -> Result<UpdateReport, UpdateError> {
        let _one = self.switching.lock().await;
        let cur = &self.base.lock().clone();
        let store = self.reader.store();
        let accepted = store.accepted(&cur.name)?.map(|a| a.version);
        let newest_seen = accepted.unwrap_or(0).max(cur.version);
        // Checked per source, so that a source offering another image or an old version is
        // passed over for the next one, as at mount.
        let check = |image: &Image| {
            let new = image.manifest();
            if new.name != cur.name {
                return Err(UpdateError::OtherImage {
                    source_name: image.source().name().to_string(),
                    offered: new.name.clone(),
                    mounted: cur.name.clone(),
                });
            }
            if new.version < newest_seen && !allow_rollback {
                let accepted = match accepted {
                    Some(a) if a > cur.version => format!(" (this cache accepted version {a})"),
                    _ => " (mounted)".to_string(),
                };
                let source_name = image.source().name().to_string();
                return Err(UpdateError::Rollback {
                    source_name,
                    offered: new.version,
                    current: cur.version,
                    accepted,
                });
            }
            Ok(())
        };
        let image = self.fetch(to, allow_expired || self.policy.allow_expired, check).await?;
        let new = image.manifest().clone();
        let current = self.views.current();
        let mut report = UpdateReport {
            from: cur.version,
            to: new.version,
            switched: false,
            added: vec![],
            removed: vec![],
            changed: vec![],
        };
        if new.version == cur.version {
            return Ok(report);
        }
        let key_id = *image.signer().id();
        let (shorter, longer) = if new.objects.len() <= cur.objects.len() {
            (&new.objects, &cur.objects)
        } else {
            (&cur.objects, &new.objects)
        };
        if longer[..shorter.len()] != shorter[..] {
            return Err(UpdateError::Unrelated { offered: new.version, current: cur.version });
        }
        // A new version may bring a new dictionary: known before any of its blocks is read.
        crate::dictionaries::load(&new, store, self.reader.mirrors().sources()).await?;
        if new.version < newest_seen {
            store.accept_rollback(&key_id, &new.name, new.version, image.manifest_bytes())?;
        } else {
            store.accept(&key_id, &new.name, new.version, image.manifest_bytes())?;
        }

        let pushed = self.pushed.lock().clone();
        let (served, skipped) = with_pushed(&new, &pushed);
        for s in skipped {
            tracing::warn!("pushed file {s} has no place in version {}: no longer shown", new.version);
        }
        self.reader.extend_objects(&new.objects);
        let changes = self.show(&current, served)?;
        *self.base.lock() = new.clone();
        *self.base_bytes.lock() = image.manifest_bytes().clone();
        self.view_changed();
        {
            let mut r = self.running.lock();
            r.background = Background::new(self.reader.clone(), new.clone(), self.background_opts.clone());
        }
        self.start_background();
        tracing::info!(
            "switched from version {} to {}: {} added, {} removed, {} changed",
            cur.version,
            new.version,
            changes.added.len(),
            changes.removed.len(),
            changes.changed.len()
        );
        if let Some(hook) = self.on_switch.lock().clone() {
            hook(&new);
        }
        report.switched = true;
        report.added = changes.added;
        report.removed = changes.removed;
        report.changed = changes.changed;
        Ok(report)
    }

    /// Push a file in (`incfs add`): `tree` is its compact Merkle tree (format section 2.2),
    /// `signature` a trusted key's signature over its push message (`incfs_format::push`). Its
    /// blocks then come from fills. Returns the file's digest.
    pub async fn add(
        &self,
        path: &[u8],
        mode: u16,
        size: u64,
        root: Hash,
        tree: &[u8],
        signature: &[u8],
    ) -> Result<Hash, UpdateError> {
        let _one = self.switching.lock().await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let record = PushedFile {
            path: path.to_vec(),
            mode,
            size,
            mtime_sec: now.as_secs() as i64,
            mtime_nsec: now.subsec_nanos(),
            root,
            tree: tree.to_vec(),
            signature: signature.to_vec(),
        };
        let image = self.base.lock().name.clone();
        let (p, digest) = check_push(&record, &image, &self.policy.trust, &self.reader).map_err(UpdateError::Add)?;
        let current = self.views.current();
        let (served, skipped) = with_pushed(&current.manifest, std::slice::from_ref(&p));
        if !skipped.is_empty() {
            let shown = incfs_format::manifest::display_path(path);
            return Err(UpdateError::Add(format!("{shown}: the name is taken or its directory does not exist")));
        }
        // Kept before it is shown: a file a reader saw is one a restarted mount shows again.
        self.reader.store().put_pushed(&image, &record)?;
        self.pushed.lock().push(p);
        self.show(&current, served)?;
        self.view_changed();
        Ok(digest)
    }

    /// Make `served` the tree shown, as the view after `current`: presence of its files loaded,
    /// then switched in one step, then the kernel told what went stale.
    fn show(&self, current: &View, served: Arc<Manifest>) -> Result<Changes, UpdateError> {
        let (view, changes) = current.next(served, self.views.max_ino() + 1, self.recording);
        self.reader.presence.load(self.reader.store(), view.contents.iter().map(|(k, _)| *k))?;
        self.views.switch(view);
        self.invalidate(&changes.invalidate);
        Ok(changes)
    }

    fn view_changed(&self) {
        if let Some(hook) = self.on_view.lock().clone() {
            hook(self.served_state());
        }
    }

    fn invalidate(&self, what: &[Inval]) {
        let notifier = self.notifier.lock();
        let Some(n) = notifier.as_ref() else { return };
        for i in what {
            // ENOENT (nothing cached) is no error; anything else only costs staleness until the
            // kernel's own timeout, so it is logged, not fatal.
            let r = match i {
                Inval::Entry { parent, name } => {
                    n.inval_entry(fuser::INodeNo(*parent), std::ffi::OsStr::from_bytes(name))
                }
                Inval::Inode(ino) => n.inval_inode(fuser::INodeNo(*ino), 0, 0),
            };
            if let Err(e) = r {
                tracing::warn!("cannot invalidate the kernel's cache of {i:?}: {e}");
            }
        }
    }

    /// `mount --follow`: look for a newer version every `interval` and switch to it.
    pub async fn follow(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            match self.update(None, false, false).await {
                Ok(_) => {}
                Err(e) => tracing::warn!("--follow: {e}"),
            }
        }
    }
}
