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

use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use incfs_fetch::{Image, ImageError, SourceError};
use incfs_format::layout;
use incfs_format::manifest::Manifest;
use incfs_sign::TrustedKeys;
use serde::{Deserialize, Serialize};

use crate::background::{Background, BackgroundOptions};
use crate::reader::Reader;
use crate::view::{Inval, Views};

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] incfs_store::StoreError),
    #[error("{source_name} serves image {offered:?}, but this mount is of {mounted:?}; mount it elsewhere instead")]
    OtherImage { source_name: String, offered: String, mounted: String },
    #[error(
        "version {offered} is older than version {current}{accepted}; refusing the rollback \
         (incfs update --allow-rollback to go back on purpose)"
    )]
    Rollback { offered: u64, current: u64, accepted: String },
    #[error(
        "version {offered}'s object table does not extend version {current}'s: it is not a version of the same \
         repository"
    )]
    Unrelated { offered: u64, current: u64 },
    #[error("no source could be reached: {0}")]
    Unreachable(String),
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
    pub reader: Arc<Reader>,
    trust: TrustedKeys,
    background_opts: BackgroundOptions,
    recording: bool,
    running: Mutex<Running>,
    /// Tells the kernel what a switch made stale; set once the FUSE session exists.
    notifier: Mutex<Option<fuser::Notifier>>,
    /// One switch at a time.
    switching: tokio::sync::Mutex<()>,
}

impl Live {
    pub fn new(
        views: Arc<Views>,
        reader: Arc<Reader>,
        trust: TrustedKeys,
        background_opts: BackgroundOptions,
        recording: bool,
    ) -> Arc<Live> {
        let background = Background::new(reader.clone(), views.current().manifest.clone(), background_opts.clone());
        Arc::new(Live {
            views,
            reader,
            trust,
            background_opts,
            recording,
            running: Mutex::new(Running { background, task: None }),
            notifier: Mutex::new(None),
            switching: tokio::sync::Mutex::new(()),
        })
    }

    pub fn set_notifier(&self, n: fuser::Notifier) {
        *self.notifier.lock().unwrap() = Some(n);
    }

    /// The background fetcher of the current version.
    pub fn background(&self) -> Arc<Background> {
        self.running.lock().unwrap().background.clone()
    }

    /// Start (or restart) background completion on the runtime of the caller.
    pub fn start_background(&self) {
        let mut r = self.running.lock().unwrap();
        if let Some(t) = r.task.take() {
            t.abort();
        }
        r.task = Some(tokio::spawn(r.background.clone().run()));
    }

    pub fn manifest(&self) -> Arc<Manifest> {
        self.views.current().manifest.clone()
    }

    /// Fetch a version's signed manifest (the newest: `None`) from the first source that answers.
    async fn fetch(&self, version: Option<u64>) -> Result<Image, UpdateError> {
        let key = version.map_or(layout::LATEST_MANIFEST.to_string(), layout::version_manifest);
        let mut unreachable = Vec::new();
        for source in self.reader.mirrors().sources() {
            match source.get(&key).await {
                Ok(bytes) => return Ok(Image::from_manifest_bytes(source.clone(), bytes, &self.trust)?),
                Err(e @ SourceError::NotFound { .. }) => return Err(e.into()),
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        Err(UpdateError::Unreachable(unreachable.join("; ")))
    }

    /// Switch to version `to` (default: the newest published).
    pub async fn update(&self, to: Option<u64>, allow_rollback: bool) -> Result<UpdateReport, UpdateError> {
        let _one = self.switching.lock().await;
        let image = self.fetch(to).await?;
        let new = image.manifest().clone();
        let current = self.views.current();
        let cur = &current.manifest;
        let mut report = UpdateReport {
            from: cur.version,
            to: new.version,
            switched: false,
            added: vec![],
            removed: vec![],
            changed: vec![],
        };
        if new.name != cur.name {
            return Err(UpdateError::OtherImage {
                source_name: image.source().name().to_string(),
                offered: new.name.clone(),
                mounted: cur.name.clone(),
            });
        }
        if new.version == cur.version {
            return Ok(report);
        }
        let store = self.reader.store();
        let key_id = *image.signer().id();
        let accepted = store.accepted(&key_id, &new.name)?.map(|a| a.version);
        let newest_seen = accepted.unwrap_or(0).max(cur.version);
        if new.version < newest_seen && !allow_rollback {
            let accepted = match accepted {
                Some(a) if a > cur.version => format!(" (this cache accepted version {a})"),
                _ => " (mounted)".to_string(),
            };
            return Err(UpdateError::Rollback { offered: new.version, current: cur.version, accepted });
        }
        let (shorter, longer) = if new.objects.len() <= cur.objects.len() {
            (&new.objects, &cur.objects)
        } else {
            (&cur.objects, &new.objects)
        };
        if longer[..shorter.len()] != shorter[..] {
            return Err(UpdateError::Unrelated { offered: new.version, current: cur.version });
        }
        if new.version < newest_seen {
            store.accept_rollback(&key_id, &new.name, new.version, image.manifest_bytes())?;
        } else {
            store.accept(&key_id, &new.name, new.version, image.manifest_bytes())?;
        }

        let (view, changes) = current.next(new.clone(), self.views.max_ino() + 1, self.recording);
        self.reader.presence.load(store, view.contents.iter().map(|(k, _)| *k))?;
        self.reader.extend_objects(&new.objects);
        self.views.switch(view);
        self.invalidate(&changes.invalidate);
        {
            let mut r = self.running.lock().unwrap();
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
        report.switched = true;
        report.added = changes.added;
        report.removed = changes.removed;
        report.changed = changes.changed;
        Ok(report)
    }

    fn invalidate(&self, what: &[Inval]) {
        let notifier = self.notifier.lock().unwrap();
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
            match self.update(None, false).await {
                Ok(_) => {}
                Err(e) => tracing::warn!("--follow: {e}"),
            }
        }
    }
}
