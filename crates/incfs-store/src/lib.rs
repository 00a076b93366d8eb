//! The local backing store of incfs mounts, one per cache directory.
//!
//! Two parts with different needs. Data (fetched blocks, compressed exactly as they arrived and
//! keyed by their leaf hash, so a block shared by files, images or versions is stored once;
//! pieces of file metadata regions; which blocks of each file content are present) is written on
//! every cold read and lives in append-only segment files with journals ([`segments`]): a fetched
//! run costs two writes, whatever its length. Records that change rarely (per image name the
//! newest manifest accepted, whichever trusted key signed it, for rollback protection and
//! offline mounts; which image each source served, its pinned identity; files pushed into
//! mounts) stay in a small SQLite database, `store.db`, where transactions are worth their cost.
//!
//! The store does not trust itself: callers verify every block and metadata piece they read from
//! it against the Merkle tree before use, and drop it ([`Store::remove_block`]) if it fails.
//! Layout and crash safety: `docs/cache.md`.

pub mod journal;
pub mod limit;
pub mod segments;

use std::path::{Path, PathBuf};

use incfs_format::{Codec, Hash};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

pub use journal::{FileKey, PRESENCE_CHUNK_BITS};
pub use limit::Usage;
use segments::Segments;
pub use segments::{EvictHook, LimitState, Via};

/// The cache layout this build writes: `PRAGMA user_version` of `store.db`. Version 1 (blocks,
/// metadata and presence in SQLite tables) is migrated at open.
pub const LAYOUT_VERSION: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache database {}: {source}", path.display())]
    Db { path: PathBuf, source: rusqlite::Error },
    #[error("cannot create cache directory {}: {source}", path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cache file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cache {} holds a bad value: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "the cache {} is full: {need} more bytes do not fit under its limit of {limit} bytes and nothing more can be \
         evicted; raise the limit with incfs cache limit, or unpin files",
        path.display()
    )]
    Full { path: PathBuf, limit: u64, need: u64 },
    #[error("{what} is not in the cache (evicted meanwhile?); fetch it and try again")]
    NotLocal { what: String },
    #[error("cache {} was written by a newer incfs (layout {found}, this one knows {LAYOUT_VERSION}); upgrade incfs, or use another --cache", path.display())]
    Newer { path: PathBuf, found: i64 },
}

pub fn file_key(root: &Hash, size: u64) -> FileKey {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(root);
    k[32..].copy_from_slice(&size.to_le_bytes());
    k
}

/// A manifest this cache has accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedManifest {
    pub version: u64,
    pub bytes: Vec<u8>,
}

/// Totals over the whole store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreTotals {
    pub blocks: u64,
    pub block_bytes: u64,
}

pub struct Store {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    data: Segments,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS images (key_id BLOB NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    manifest BLOB NOT NULL, PRIMARY KEY (key_id, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (source TEXT PRIMARY KEY, key_id BLOB NOT NULL, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS used (name TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pinned (image TEXT NOT NULL, path TEXT NOT NULL, key BLOB NOT NULL,
    PRIMARY KEY (image, path));
CREATE TABLE IF NOT EXISTS pushed (image TEXT NOT NULL, path BLOB NOT NULL, mode INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_sec INTEGER NOT NULL, mtime_nsec INTEGER NOT NULL, root BLOB NOT NULL,
    tree BLOB NOT NULL, signature BLOB NOT NULL, PRIMARY KEY (image, path));
";

/// A file pushed into mounts of an image (`incfs add`), kept so that a restarted mount shows it
/// again (its signature is checked again then: the record is trusted no more than the network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedFile {
    pub path: Vec<u8>,
    pub mode: u16,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub root: Hash,
    pub tree: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A block to store: its leaf hash, codec and stored bytes.
pub struct NewBlock<'a> {
    pub hash: Hash,
    pub codec: Codec,
    pub data: &'a [u8],
}

impl Store {
    /// Open (creating if needed) the store in `dir`, migrating a cache of layout 1.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        private_dir(dir).map_err(|source| StoreError::Dir { path: dir.to_path_buf(), source })?;
        let path = dir.join("store.db");
        let conn = connect(&path)?;
        private_files(dir).map_err(|source| StoreError::Dir { path: dir.to_path_buf(), source })?;
        let db = |source| StoreError::Db { path: path.clone(), source };
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db)?;
        if version > LAYOUT_VERSION {
            return Err(StoreError::Newer { path: dir.to_path_buf(), found: version });
        }
        let v1: bool = conn
            .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'blocks'", [], |_| Ok(()))
            .optional()
            .map_err(db)?
            .is_some();
        let data_dir = dir.join("data");
        if v1 && version < LAYOUT_VERSION {
            // Whatever an interrupted migration left is redone from the database.
            if data_dir.exists() {
                std::fs::remove_dir_all(&data_dir)
                    .map_err(|source| StoreError::Io { path: data_dir.clone(), source })?;
            }
        }
        let data = Segments::open(&data_dir)?;
        if v1 {
            migrate_v1(&conn, &data).map_err(|e| match e {
                StoreError::Db { source, .. } => db(source),
                e => e,
            })?;
        }
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(&format!("PRAGMA user_version = {LAYOUT_VERSION}")).map_err(db)?;
        Ok(Store { path, pool: Mutex::new(vec![conn]), data })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db { path: self.path.clone(), source }
    }

    /// Run `f` with a pooled connection.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.pool.lock().pop();
        let mut conn = match conn {
            Some(c) => c,
            None => connect(&self.path)?,
        };
        let r = f(&mut conn).map_err(|e| self.err(e));
        let mut pool = self.pool.lock();
        if pool.len() < 4 {
            pool.push(conn);
        }
        r
    }

    /// The SQLite database's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored form of the block with leaf hash `hash`, if present (not yet verified).
    pub fn get_block(&self, hash: &Hash) -> Result<Option<(Codec, Vec<u8>)>, StoreError> {
        self.data.get_block(hash)
    }

    /// Which of `hashes` are stored (an in-memory lookup).
    pub fn stored_among(&self, hashes: &[Hash]) -> std::collections::HashSet<Hash> {
        self.data.stored_among(hashes)
    }

    pub fn has_block(&self, hash: &Hash) -> bool {
        self.data.has_block(hash)
    }

    /// Store verified blocks and mark blocks `present` of a file content (sorted indices),
    /// with one data write and one journal write.
    pub fn put_blocks(&self, blocks: &[NewBlock<'_>], present: Option<(&FileKey, &[u64])>) -> Result<(), StoreError> {
        let b: Vec<(Hash, Codec, &[u8])> = blocks.iter().map(|b| (b.hash, b.codec, b.data)).collect();
        self.data.put_blocks(&b, present)
    }

    /// Store the verified blocks of a fetched run, `blocks` naming their ranges in `bytes`, and
    /// mark blocks `present`: one data write (the run as fetched) and one journal write.
    pub fn put_run(
        &self,
        bytes: &[u8],
        blocks: &[(Hash, Codec, std::ops::Range<usize>)],
        present: Option<(&FileKey, &[u64])>,
        evict: bool,
        via: Via,
    ) -> Result<(), StoreError> {
        self.data.put_run(bytes, blocks, present, evict, via)
    }

    /// The cache limit in force and what it caused in this process.
    pub fn limit_state(&self) -> LimitState {
        self.data.limit_state()
    }

    /// Read the recorded limit again (after `limit::set`/`limit::lower`).
    pub fn reload_limit(&self) -> Result<(), StoreError> {
        self.data.reload_limit()
    }

    /// Whether `need` more bytes fit under the limit without evicting (background work).
    pub fn has_room(&self, need: u64) -> Result<bool, StoreError> {
        self.data.has_room(need)
    }

    /// Make room for `need` bytes written outside the segments (a plain copy), evicting least
    /// recently used files if needed; the room stays reserved until the guard is dropped.
    pub fn reserve(&self, need: u64) -> Result<segments::Reserved<'_>, StoreError> {
        self.data.reserve(need)
    }

    /// Call `hook` with presence an eviction cleared.
    pub fn on_evict(&self, hook: EvictHook) {
        self.data.on_evict(hook)
    }

    /// What the cache directory holds, by kind.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        limit::scan(dir).map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })
    }

    /// Forget blocks kept elsewhere now (in verified plain copies of every file that has them),
    /// and compact the segments that leaves mostly unindexed: every byte stored once.
    /// `leaves` are the leaf hashes of file content `key` of `size` bytes, whose plain copy
    /// now holds them.
    pub fn release_blocks(&self, key: &FileKey, size: u64, leaves: &[Hash]) -> Result<(), StoreError> {
        self.data.release_blocks(key, size, leaves)
    }

    /// The plain copy of `key` is going: forget the blocks indexed in it.
    pub fn forget_plain(&self, key: &FileKey) {
        self.data.forget_plain(key)
    }

    /// Clear every presence bit of `keys` (their plain copy went, with the blocks it held).
    pub fn forget_presence(&self, keys: &[FileKey]) -> Result<(), StoreError> {
        self.data.forget_presence(keys)
    }

    /// Store blocks only if they fit under the limit without evicting ([`StoreError::Full`]).
    pub fn keep_blocks(&self, blocks: &[NewBlock<'_>]) -> Result<(), StoreError> {
        let mut data = Vec::new();
        let mut ranges = Vec::with_capacity(blocks.len());
        for b in blocks {
            ranges.push((b.hash, b.codec, data.len()..data.len() + b.data.len()));
            data.extend_from_slice(b.data);
        }
        self.data.put_run(&data, &ranges, None, false, Via::Direct)
    }

    /// Pin content `key` (see [`segments::Segments::pin`]); returns the bytes it occupies.
    pub fn pin(&self, key: &FileKey, leaves: &[Hash], meta: &[(Hash, u64, u64)]) -> Result<u64, StoreError> {
        self.data.pin(key, leaves, meta)
    }

    /// Unpin content `key`.
    pub fn unpin(&self, key: &FileKey) -> Result<(), StoreError> {
        self.data.unpin(key)
    }

    /// Stored bytes of the blocks `hashes` that are stored (each counted once).
    pub fn stored_len(&self, hashes: &[Hash]) -> u64 {
        self.data.stored_len(hashes)
    }

    /// Contents the pinned segments' markers name.
    pub fn pinned_contents(&self) -> Vec<FileKey> {
        self.data.pinned_contents()
    }

    /// Bytes of pinned segments.
    pub fn pinned_bytes(&self) -> u64 {
        self.data.pinned_bytes()
    }

    /// Bytes of metadata pieces indexed.
    pub fn meta_bytes(&self) -> u64 {
        self.data.meta_bytes()
    }

    /// Drop a block found damaged (it will be fetched again when needed).
    pub fn remove_block(&self, hash: &Hash) -> Result<(), StoreError> {
        self.data.drop_block(hash)
    }

    pub fn totals(&self) -> StoreTotals {
        let (blocks, block_bytes) = self.data.totals();
        StoreTotals { blocks, block_bytes }
    }

    /// Presence chunks of a file content: (chunk index, bits), bit `i` of chunk `c` being block
    /// `c * 4096 + i` (least significant bit first).
    pub fn presence(&self, file: &FileKey) -> Vec<(u64, Vec<u8>)> {
        self.data.presence(file)
    }

    /// Every stored block's leaf hash, sorted (to walk them all: `fsck`).
    pub fn block_hashes(&self) -> Result<Vec<Hash>, StoreError> {
        self.data.block_hashes()
    }

    /// Replace presence chunks exactly.
    pub fn set_presence(&self, chunks: &[(FileKey, u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.data.set_presence(chunks)
    }

    /// A cached piece of a file metadata region (unverified bytes).
    pub fn get_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.data.get_meta(object, region, chunk)
    }

    pub fn put_meta(&self, object: &Hash, region: u64, chunk: u64, data: &[u8]) -> Result<(), StoreError> {
        self.data.put_meta(object, region, chunk, data)
    }

    pub fn remove_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<(), StoreError> {
        self.data.drop_meta(object, region, chunk)
    }

    /// The newest manifest accepted for image `name`, whichever trusted key signed it (so that
    /// rotating keys does not forget how far the image went).
    pub fn accepted(&self, name: &str) -> Result<Option<AcceptedManifest>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT version, manifest FROM images WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                params![name],
                |r| Ok(AcceptedManifest { version: r.get::<_, i64>(0)? as u64, bytes: r.get(1)? }),
            )
            .optional()
        })
    }

    /// Every accepted manifest, for offline mounts that must find one without the network.
    pub fn all_accepted(&self) -> Result<Vec<AcceptedManifest>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT version, manifest FROM images ORDER BY version DESC")?;
            let rows =
                st.query_map([], |r| Ok(AcceptedManifest { version: r.get::<_, i64>(0)? as u64, bytes: r.get(1)? }))?;
            rows.collect()
        })
    }

    /// Record `manifest` (signed by `key_id`) as the accepted one of image `name`, unless a
    /// newer version already is, under any key (returns false then).
    pub fn accept(&self, key_id: &Hash, name: &str, version: u64, manifest: &[u8]) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let current: Option<i64> =
                tx.query_row("SELECT MAX(version) FROM images WHERE name = ?1", params![name], |r| r.get(0))?;
            if current.is_some_and(|v| v as u64 > version) {
                return Ok(false);
            }
            replace_accepted(&tx, key_id, name, version, manifest)?;
            tx.commit()?;
            Ok(true)
        })
    }
}

impl Store {
    /// Note that image `name` is in use now (mounted, or unmounted just now): `cache ls`.
    pub fn mark_used(&self, name: &str) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.with(|c| {
            c.execute("INSERT OR REPLACE INTO used (name, at) VALUES (?1, ?2)", params![name, now as i64]).map(|_| ())
        })
    }

    /// When each image was last used (seconds since the epoch).
    pub fn last_used(&self) -> Result<std::collections::HashMap<String, i64>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, at FROM used")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Forget image `name`: its accepted manifest, the sources that served it, its pushed files
    /// and pins. Its data goes at the next [`Store::gc`].
    pub fn forget_image(&self, name: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            for table in ["images WHERE name", "sources WHERE name", "pushed WHERE image", "used WHERE name"] {
                tx.execute(&format!("DELETE FROM {table} = ?1"), params![name])?;
            }
            tx.execute("DELETE FROM pinned WHERE image = ?1", params![name])?;
            tx.commit()
        })
    }

    /// Pin `path` of image `name` (content `key`), or unpin it (`None`).
    pub fn set_pinned(&self, name: &str, path: &str, key: Option<&FileKey>) -> Result<(), StoreError> {
        self.with(|c| {
            match key {
                Some(k) => c.execute("INSERT OR REPLACE INTO pinned VALUES (?1, ?2, ?3)", params![name, path, &k[..]]),
                None => c.execute("DELETE FROM pinned WHERE image = ?1 AND path = ?2", params![name, path]),
            }
            .map(|_| ())
        })
    }

    /// Pinned files: (image, path, content key).
    pub fn pinned(&self) -> Result<Vec<(String, String, FileKey)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT image, path, key FROM pinned ORDER BY image, path")?;
            let rows = st.query_map([], |r| {
                let k: Vec<u8> = r.get(2)?;
                Ok((r.get(0)?, r.get(1)?, k.try_into().unwrap_or([0; 40])))
            })?;
            rows.collect()
        })
    }

    /// Drop everything no recorded image references: blocks whose leaf hash is not in `leaves`,
    /// metadata pieces of regions not in `regions` (object, region offset), presence of contents
    /// not in `keys`; then compact. Returns (blocks, metadata pieces, contents) dropped.
    pub fn gc(
        &self,
        leaves: &std::collections::HashSet<Hash>,
        regions: &std::collections::HashSet<(Hash, u64)>,
        keys: &std::collections::HashSet<FileKey>,
    ) -> Result<(u64, u64, u64), StoreError> {
        self.data.gc(leaves, regions, keys)
    }

    /// Keep a pushed file of `image`.
    pub fn put_pushed(&self, image: &str, f: &PushedFile) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO pushed VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    image,
                    &f.path,
                    f.mode,
                    f.size as i64,
                    f.mtime_sec,
                    f.mtime_nsec,
                    &f.root[..],
                    &f.tree,
                    &f.signature
                ],
            )
            .map(|_| ())
        })
    }

    /// The pushed files of `image`, in the order they were pushed (unchecked).
    pub fn pushed(&self, image: &str) -> Result<Vec<PushedFile>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT path, mode, size, mtime_sec, mtime_nsec, root, tree, signature FROM pushed \
                 WHERE image = ?1 ORDER BY rowid",
            )?;
            let rows = st.query_map(params![image], |r| {
                let root: Vec<u8> = r.get(5)?;
                Ok(PushedFile {
                    path: r.get(0)?,
                    mode: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_sec: r.get(3)?,
                    mtime_nsec: r.get(4)?,
                    root: root.try_into().unwrap_or([0; 32]),
                    tree: r.get(6)?,
                    signature: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Record `manifest` as accepted even though a newer version was: a rollback the user asked
    /// for (`incfs update --allow-rollback`), so that a restart mounts what was chosen.
    pub fn accept_rollback(&self, key_id: &Hash, name: &str, version: u64, manifest: &[u8]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            replace_accepted(&tx, key_id, name, version, manifest)?;
            tx.commit()
        })
    }

    /// The image `source` served when last reached (its pinned identity).
    pub fn source_image(&self, source: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| c.query_row("SELECT name FROM sources WHERE source = ?1", [source], |r| r.get(0)).optional())
    }

    /// Remember which image `source` serves, so that it can be mounted from the cache alone.
    pub fn remember_source(&self, source: &str, key_id: &Hash, name: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO sources (source, key_id, name) VALUES (?1, ?2, ?3)",
                params![source, &key_id[..], name],
            )
            .map(|_| ())
        })
    }

    /// The newest accepted manifest of the image `source` served when last reached.
    pub fn manifest_for_source(&self, source: &str) -> Result<Option<AcceptedManifest>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT i.version, i.manifest FROM sources s JOIN images i ON i.name = s.name
                 WHERE s.source = ?1 ORDER BY i.version DESC LIMIT 1",
                [source],
                |r| Ok(AcceptedManifest { version: r.get::<_, i64>(0)? as u64, bytes: r.get(1)? }),
            )
            .optional()
        })
    }
}

/// Make `manifest` the one accepted record of image `name` (older caches may hold one per key).
fn replace_accepted(
    tx: &rusqlite::Transaction<'_>,
    key_id: &Hash,
    name: &str,
    version: u64,
    manifest: &[u8],
) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM images WHERE name = ?1", params![name])?;
    tx.execute(
        "INSERT INTO images (key_id, name, version, manifest) VALUES (?1, ?2, ?3, ?4)",
        params![&key_id[..], name, version as i64, manifest],
    )?;
    Ok(())
}

/// Create `dir` (and missing parents) readable by its owner only, and make it so if it exists:
/// the cache holds the content of files whose modes may hide it from other users, and blocks,
/// metadata and the database are readable by whoever can reach them. One closed directory
/// closes all of it, whatever the modes below (cache layouts of before 2026-12 had 0755/0644).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The database and its WAL/shared-memory files, owner only (SQLite creates them with the
/// process umask, and the WAL and -shm files with the database's mode).
fn private_files(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for name in ["store.db", "store.db-wal", "store.db-shm"] {
        match std::fs::metadata(dir.join(name)) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600))?
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let db = |source| StoreError::Db { path: path.to_path_buf(), source };
    let conn = Connection::open(path).map_err(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db)?;
    // Small and rarely written now: WAL with automatic checkpoints keeps the log small.
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;").map_err(db)?;
    Ok(conn)
}

/// Move the data of a layout-1 cache (blocks, metadata pieces, presence in SQLite tables) into
/// segments, then drop those tables. Idempotent: interrupted, it is redone at the next open.
fn migrate_v1(conn: &Connection, data: &Segments) -> Result<(), StoreError> {
    let db = |source| StoreError::Db { path: PathBuf::new(), source };
    tracing::info!("migrating a cache of layout 1 to layout {LAYOUT_VERSION}");
    let mut after: Vec<u8> = Vec::new();
    loop {
        let mut st = conn
            .prepare("SELECT hash, codec, data FROM blocks WHERE hash > ?1 ORDER BY hash LIMIT 1024")
            .map_err(db)?;
        let rows: Vec<(Vec<u8>, u8, Vec<u8>)> = st
            .query_map([&after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?;
        let Some(last) = rows.last() else { break };
        after = last.0.clone();
        // A row that does not even look like a block is left behind (fetched again if needed).
        let blocks: Vec<(Hash, Codec, &[u8])> = rows
            .iter()
            .filter_map(|(h, c, d)| {
                let ok = d.len() <= incfs_format::BLOCK_SIZE;
                Some((<Hash>::try_from(h.as_slice()).ok()?, Codec::from_u8(*c)?, d.as_slice())).filter(|_| ok)
            })
            .collect();
        data.put_blocks(&blocks, None)?;
    }
    {
        let mut st = conn.prepare("SELECT object, region, chunk, data FROM meta").map_err(db)?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, Vec<u8>>(3)?))
            })
            .map_err(db)?;
        for row in rows {
            let (object, region, chunk, bytes) = row.map_err(db)?;
            if let Ok(object) = <Hash>::try_from(object.as_slice()) {
                data.put_meta(&object, region as u64, chunk as u64, &bytes)?;
            }
        }
        let mut st = conn.prepare("SELECT file, chunk, bits FROM presence").map_err(db)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)))
            .map_err(db)?;
        let mut chunks = Vec::new();
        for row in rows {
            let (file, chunk, bits) = row.map_err(db)?;
            if let Ok(file) = <FileKey>::try_from(file.as_slice()) {
                chunks.push((file, chunk as u64, bits));
            }
        }
        data.set_presence(&chunks)?;
    }
    conn.execute_batch(&format!(
        "BEGIN; DROP TABLE IF EXISTS blocks; DROP TABLE IF EXISTS meta; DROP TABLE IF EXISTS presence;
         DROP TABLE IF EXISTS totals; PRAGMA user_version = {LAYOUT_VERSION}; COMMIT; VACUUM;"
    ))
    .map_err(db)?;
    tracing::info!("cache migrated: {} blocks", data.totals().0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_of_runs_across_chunks_marks_exactly_those_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let key = file_key(&[3; 32], 40 << 20);
        // Runs inside a chunk, ending on its last bit, and crossing into the next two.
        let marked: Vec<u64> = (5..9).chain(4000..4096).chain(4100..12290).collect();
        s.put_blocks(&[], Some((&key, &marked))).unwrap();
        for s in [s, { Store::open(dir.path()).unwrap() }] {
            let mut present = Vec::new();
            for (chunk, bits) in s.presence(&key) {
                for (i, byte) in bits.iter().enumerate() {
                    for b in 0..8 {
                        if byte & (1 << b) != 0 {
                            present.push(chunk * 4096 + i as u64 * 8 + b);
                        }
                    }
                }
            }
            assert_eq!(present, marked);
        }
    }

    #[test]
    fn blocks_presence_meta_and_manifests_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let h = [1u8; 32];
        assert_eq!(s.get_block(&h).unwrap(), None);
        let key = file_key(&[2; 32], 5000);
        s.put_blocks(&[NewBlock { hash: h, codec: Codec::Lz4, data: b"abc" }], Some((&key, &[0, 1]))).unwrap();
        s.put_blocks(&[NewBlock { hash: h, codec: Codec::Lz4, data: b"abc" }], None).unwrap();
        assert_eq!(s.get_block(&h).unwrap(), Some((Codec::Lz4, b"abc".to_vec())));
        assert_eq!(s.totals(), StoreTotals { blocks: 1, block_bytes: 3 }, "stored once");
        assert_eq!(s.presence(&key)[0].1[0], 0b11);
        s.remove_block(&h).unwrap();
        assert!(!s.has_block(&h));
        assert_eq!(s.totals(), StoreTotals::default());
        let h2 = [9u8; 32];
        s.put_blocks(&[NewBlock { hash: h2, codec: Codec::Raw, data: b"xyz" }], Some((&key, &[4]))).unwrap();

        s.put_meta(&h, 10, 0, b"meta").unwrap();
        assert_eq!(s.get_meta(&h, 10, 0).unwrap(), Some(b"meta".to_vec()));
        assert_eq!(s.get_meta(&h, 10, 1).unwrap(), None);

        assert!(s.accept(&h, "img", 2, b"m2").unwrap());
        assert!(!s.accept(&h, "img", 1, b"m1").unwrap(), "rollback refused");
        assert!(s.accept(&h, "img", 3, b"m3").unwrap());
        assert_eq!(s.accepted("img").unwrap(), Some(AcceptedManifest { version: 3, bytes: b"m3".to_vec() }));
        assert!(!s.accept(&[5; 32], "img", 2, b"k2").unwrap(), "rollback under another trusted key refused");
        assert_eq!(s.accepted("other").unwrap(), None);
        drop(s);
        // Everything survives reopening, removals included.
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.accepted("img").unwrap().unwrap().version, 3);
        assert_eq!(s.get_meta(&h, 10, 0).unwrap(), Some(b"meta".to_vec()));
        assert!(!s.has_block(&h));
        assert_eq!(s.get_block(&h2).unwrap(), Some((Codec::Raw, b"xyz".to_vec())));
        assert_eq!(s.presence(&key)[0].1[0], 0b1_0011);
        s.remove_meta(&h, 10, 0).unwrap();
        assert_eq!(s.get_meta(&h, 10, 0).unwrap(), None);
        assert_eq!(s.manifest_for_source("http://x").unwrap(), None);
        s.remember_source("http://x", &h, "img").unwrap();
        assert_eq!(s.manifest_for_source("http://x").unwrap().unwrap().bytes, b"m3");
        assert_eq!(s.source_image("http://x").unwrap().as_deref(), Some("img"));
        assert!(s.accept(&[5; 32], "img", 4, b"k4").unwrap(), "a newer version under a rotated key");
        assert_eq!(s.manifest_for_source("http://x").unwrap().unwrap().bytes, b"k4");
        s.accept_rollback(&h, "img", 2, b"m2").unwrap();
        assert_eq!(s.accepted("img").unwrap().unwrap().version, 2, "a rollback asked for sticks");
        drop(s);
        assert_eq!(Store::open(dir.path()).unwrap().get_meta(&h, 10, 0).unwrap(), None);
    }

    fn block(i: u32) -> (Hash, Vec<u8>) {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&i.to_le_bytes());
        h[16..20].copy_from_slice(&i.to_le_bytes());
        (h, vec![i as u8; 4096])
    }

    fn put(s: &Store, key: &FileKey, i: u32) -> Result<(), StoreError> {
        let (h, d) = block(i);
        s.put_blocks(&[NewBlock { hash: h, codec: Codec::Raw, data: &d }], Some((key, &[i as u64])))
    }

    #[test]
    fn large_runs_written_directly_read_back_between_buffered_ones() {
        // Runs of 128 KiB and more go to the segment with O_DIRECT at aligned offsets, small ones
        // through the page cache: alternate them, read every block back, then again from a
        // reopened store (the index rebuilt from the journals).
        let dir = tempfile::tempdir().unwrap();
        let key = file_key(&[4; 32], 1 << 30);
        let mut runs = Vec::new(); // (run bytes, its blocks)
        for (k, len) in [300usize, 1 << 20, 5000, (2 << 20) + 4097, 1, 131072, 131071].into_iter().enumerate() {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + k * 7) as u8).collect();
            // Blocks of up to 4000 bytes, each named by its run and place.
            let blocks: Vec<(Hash, Codec, std::ops::Range<usize>)> = (0..len)
                .step_by(4000)
                .enumerate()
                .map(|(j, at)| {
                    let mut h = [k as u8; 32];
                    h[1..9].copy_from_slice(&(j as u64).to_le_bytes());
                    (h, Codec::Zstd, at..(at + 4000).min(len))
                })
                .collect();
            runs.push((bytes, blocks));
        }
        let check = |s: &Store| {
            for (bytes, blocks) in &runs {
                for (h, codec, r) in blocks {
                    let got = s.get_block(h).unwrap();
                    assert!(
                        got == Some((*codec, bytes[r.clone()].to_vec())),
                        "block at {r:?} of a run of {}",
                        bytes.len()
                    );
                }
            }
        };
        {
            let s = Store::open(dir.path()).unwrap();
            for (k, (bytes, blocks)) in runs.iter().enumerate() {
                s.put_run(bytes, blocks, Some((&key, &[k as u64])), true, Via::Direct).unwrap();
            }
            check(&s);
        }
        check(&Store::open(dir.path()).unwrap());
        // Where the filesystem takes O_DIRECT, the large runs went that way: aligned, padded.
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("probe"))
            .is_ok();
        let seg = std::fs::metadata(dir.path().join("data/00000001.seg")).unwrap().len();
        let sum: u64 = runs.iter().map(|(b, _)| b.len() as u64).sum();
        match direct {
            true => assert!(seg > sum && seg % 4096 == 131071 % 4096, "segment of {seg} bytes for {sum}"),
            false => assert_eq!(seg, sum),
        }
    }

    #[test]
    fn a_limited_cache_evicts_least_recently_used_segments_and_stays_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 4 << 20; // 1 MiB segments
        limit::set(dir.path(), Some(limit)).unwrap();
        let s = Store::open(dir.path()).unwrap();
        let cleared = std::sync::Arc::new(Mutex::new(Vec::new()));
        let c = cleared.clone();
        s.on_evict(std::sync::Arc::new(move |_: &FileKey, first: u64, count: u32| c.lock().push((first, count))));
        let key = file_key(&[3; 32], 1 << 30);
        let write = |range: std::ops::Range<u32>| {
            for i in range {
                put(&s, &key, i).unwrap();
                let du = limit::scan(dir.path()).unwrap().total();
                assert!(du <= limit + 64 * 1024, "{du} bytes in the cache after block {i}");
            }
        };
        write(0..768); // three segments of 256 blocks
                       // Recency has a resolution of a second: the first segment, read after that, is newer
                       // than the second and third.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(s.get_block(&block(0).0).unwrap().is_some());
        write(768..1300);
        let st = s.limit_state();
        assert!(st.evictions >= 1 && st.evicted_bytes >= 1 << 20, "{st:?}");
        assert!(s.get_block(&block(0).0).unwrap().is_some(), "recently used data stays");
        assert!(s.get_block(&block(300).0).unwrap().is_none(), "old unused data went");
        assert!(s.get_block(&block(1299).0).unwrap().is_some());
        assert!(!cleared.lock().is_empty());
        let bits = s.presence(&key);
        let present =
            |i: u64| bits.iter().any(|(c, b)| *c == i / 4096 && b[(i % 4096 / 8) as usize] & (1 << (i % 8)) != 0);
        assert!(!present(300) && present(1299) && present(0), "presence follows the blocks");
        // Fetched again: stored again, counted.
        put(&s, &key, 300).unwrap();
        assert!(s.get_block(&block(300).0).unwrap().is_some());
        assert_eq!(s.limit_state().refetched, 1);
        drop(s);
        // After a restart: what was evicted stays gone, presence included.
        let s = Store::open(dir.path()).unwrap();
        assert!(s.get_block(&block(601).0).unwrap().is_none());
        let bits = s.presence(&key);
        assert!(bits.iter().all(|(c, b)| *c != 0 || b[601 / 8] & (1 << (601 % 8)) == 0));
    }

    #[test]
    fn a_segment_evicted_by_another_process_reads_as_absent_and_is_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        limit::set(dir.path(), Some(2 << 20)).unwrap();
        let a = Store::open(dir.path()).unwrap();
        let key = file_key(&[3; 32], 1 << 30);
        for i in 0..300 {
            put(&a, &key, i).unwrap(); // more than one segment: the first is sealed
        }
        assert!(a.get_block(&block(0).0).unwrap().is_some());
        let b = Store::open(dir.path()).unwrap();
        for i in 1000..1400 {
            put(&b, &key, i).unwrap();
        }
        assert!(a.get_block(&block(0).0).unwrap().is_none(), "evicted by the other store");
        assert!(!a.has_block(&block(0).0), "and forgotten, so that it is stored again");
        put(&a, &key, 0).unwrap();
        assert!(a.get_block(&block(0).0).unwrap().is_some());
        // A segment being written by the other store is never evicted.
        assert!(b.get_block(&block(1399).0).unwrap().is_some());
    }

    #[test]
    fn a_full_cache_refuses_writes_it_may_not_evict_for() {
        let dir = tempfile::tempdir().unwrap();
        limit::set(dir.path(), Some(1 << 20)).unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (h, d) = block(1);
        let big = vec![0u8; 2 << 20];
        let e = s.put_run(&big, &[(h, Codec::Raw, 0..big.len())], None, true, Via::Direct).unwrap_err();
        assert!(matches!(e, StoreError::Full { .. }) && e.to_string().contains("incfs cache limit"), "{e}");
        let e = s.put_run(&d, &[(h, Codec::Raw, 0..4096)], None, false, Via::Direct);
        assert!(e.is_ok(), "room without evicting");
        assert!(s.has_room(4096).unwrap());
        assert!(!s.has_room(2 << 20).unwrap());
    }

    #[test]
    fn a_torn_journal_tail_loses_only_the_torn_run() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let key = file_key(&[2; 32], 1 << 20);
        s.put_blocks(&[NewBlock { hash: [1; 32], codec: Codec::Raw, data: b"one" }], Some((&key, &[0]))).unwrap();
        s.put_blocks(&[NewBlock { hash: [2; 32], codec: Codec::Raw, data: b"two" }], Some((&key, &[1]))).unwrap();
        drop(s);
        let jnl = dir.path().join("data/00000001.jnl");
        let len = std::fs::metadata(&jnl).unwrap().len();
        // Cut the last record (the second run's presence) in half, as a kill during write would.
        std::fs::OpenOptions::new().write(true).open(&jnl).unwrap().set_len(len - 30).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.has_block(&[1; 32]) && s.has_block(&[2; 32]));
        assert_eq!(s.presence(&key)[0].1[0], 0b01, "presence of the torn record is not claimed");
        // New writes go to a new segment; both are read.
        s.put_blocks(&[NewBlock { hash: [3; 32], codec: Codec::Raw, data: b"three" }], None).unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get_block(&[3; 32]).unwrap().unwrap().1, b"three");
        assert_eq!(s.get_block(&[1; 32]).unwrap().unwrap().1, b"one");
    }

    #[test]
    fn a_truncated_segment_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_blocks(&[NewBlock { hash: [1; 32], codec: Codec::Raw, data: &[7; 100] }], None).unwrap();
        drop(s);
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("data/00000001.seg"))
            .unwrap()
            .set_len(50)
            .unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get_block(&[1; 32]).unwrap(), None);
    }

    #[test]
    fn a_layout_1_cache_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("store.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE blocks (hash BLOB PRIMARY KEY, codec INTEGER NOT NULL, data BLOB NOT NULL);
                 CREATE TABLE meta (object BLOB NOT NULL, region INTEGER NOT NULL, chunk INTEGER NOT NULL,
                   data BLOB NOT NULL, PRIMARY KEY (object, region, chunk)) WITHOUT ROWID;
                 CREATE TABLE presence (file BLOB NOT NULL, chunk INTEGER NOT NULL, bits BLOB NOT NULL,
                   PRIMARY KEY (file, chunk)) WITHOUT ROWID;
                 CREATE TABLE images (key_id BLOB NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
                   manifest BLOB NOT NULL, PRIMARY KEY (key_id, name)) WITHOUT ROWID;
                 CREATE TABLE totals (id INTEGER PRIMARY KEY, blocks INTEGER, block_bytes INTEGER);",
            )
            .unwrap();
            c.execute_batch("BEGIN").unwrap();
            for i in 0..3000u32 {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&i.to_le_bytes());
                c.execute("INSERT INTO blocks VALUES (?1, 2, ?2)", params![&h[..], &i.to_le_bytes()[..]]).unwrap();
            }
            c.execute_batch("COMMIT").unwrap();
            c.execute("INSERT INTO meta VALUES (?1, 5, 0, x'aabb')", [&[4u8; 32][..]]).unwrap();
            c.execute("INSERT INTO presence VALUES (?1, 0, x'07')", [&[6u8; 40][..]]).unwrap();
            c.execute("INSERT INTO images VALUES (?1, 'img', 4, x'00')", [&[1u8; 32][..]]).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.totals().blocks, 3000);
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&2999u32.to_le_bytes());
        assert_eq!(s.get_block(&h).unwrap(), Some((Codec::Lz4, 2999u32.to_le_bytes().to_vec())));
        assert_eq!(s.get_meta(&[4; 32], 5, 0).unwrap(), Some(vec![0xaa, 0xbb]));
        assert_eq!(s.presence(&[6; 40])[0].1[0], 7);
        assert_eq!(s.accepted("img").unwrap().unwrap().version, 4);
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.totals().blocks, 3000, "migrated once");
        drop(s);
        Connection::open(dir.path().join("store.db")).unwrap().execute_batch("PRAGMA user_version = 3").unwrap();
        let e = Store::open(dir.path()).err().expect("a newer layout is refused");
        assert!(e.to_string().contains("newer incfs"), "{e}");
    }
}
