//! The incfs mount: a lazy, verified, read-only FUSE filesystem over an incfs image.
//!
//! - [`daemon`]: mounting, manifest checks (signature, rollback, offline fallback), signals.
//! - [`supervisor`]: the process holding the mount; replaces a dead or upgraded daemon.
//! - [`handover`]: what the supervisor and its daemon (worker) tell each other.
//! - [`fuse`]: the FUSE operations; metadata from the manifest, reads through the reader.
//! - [`view`]: a version as the kernel sees it (inode numbers kept across versions).
//! - [`live`]: the version being served and switching it (`incfs update`, `--follow`).
//! - [`reader`]: the data path: local store first, else fetch, verify, store.
//! - [`served`]: the bytes of a read, as pieces of the verified blocks (one `writev` reply).
//! - [`nearby`]: small files packed next to a cold small file, fetched with it.
//! - [`background`]: completes the image at low priority (profile first), and `incfs prefetch`.
//! - [`plain`]: verified plain copies of complete files, the backing files of FUSE passthrough.
//! - [`mirrors`]: several sources with backoff.
//! - [`presence`]: which blocks of each file are local, for status.
//! - [`pending`]: reads waiting for data and the read log (`incfs pending`, `incfs log`).
//! - [`loader`]: external data loaders (`--loader CMD`, the control socket's loader sessions).
//! - [`control`]: the control socket behind `incfs status`.
//! - [`stats`]: read, fetch and failure counters.
//! - [`metrics`]: the Prometheus endpoint (`--metrics ADDR`).
//! - [`fsck`]: offline check and repair of a cache (`incfs fsck`).
//! - [`cache`]: what a cache holds by image and kind, and dropping what no image needs
//!   (`incfs cache`).

pub mod background;
pub mod cache;
pub mod control;
pub mod daemon;
pub mod dictionaries;
pub mod fsck;
pub mod fuse;
pub mod handover;
pub mod live;
pub mod loader;
pub mod metrics;
pub mod mirrors;
pub mod nearby;
pub mod pending;
pub mod plain;
pub mod presence;
pub mod reader;
pub mod served;
pub mod stats;
pub mod supervisor;
pub mod view;

pub use daemon::{mount, unmount, MountError, MountOptions, MountSettings};
