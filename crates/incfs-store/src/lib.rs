//! The local backing store of incfs mounts: one SQLite database per cache directory.
//!
//! What it keeps, and why SQLite: fetched blocks, compressed exactly as they arrived and keyed by
//! their leaf hash (so a block shared by files, images or versions is stored once); fetched
//! pieces of file metadata regions; which blocks of each file content are present; and, per
//! publisher key and image name, the newest manifest accepted (rollback protection, offline
//! mounts). SQLite in WAL mode gives atomic, crash-safe transactions with bounded memory, and its
//! WAL frames carry checksums, so a write torn by a crash is discarded at recovery, never read.
//! `synchronous=NORMAL` means a committed transaction survives the daemon being killed at any
//! instant (it is in the WAL file); only a power loss can roll back the last few transactions,
//! which costs a refetch, never a wrong byte.
//!
//! The store does not trust itself either: callers re-hash every block they read from it against
//! its key before serving it, and remove it ([`Store::remove_block`]) if it does not match.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use incfs_format::{Codec, Hash};
use rusqlite::{params, Connection, OptionalExtension};

/// Bits per presence chunk: one row covers 16 MiB of a file.
pub const PRESENCE_CHUNK_BITS: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache database {}: {source}", path.display())]
    Db { path: PathBuf, source: rusqlite::Error },
    #[error("cannot create cache directory {}: {source}", path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cache database {} holds a bad value: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
}

/// Identity of a file's content: root hash and size. Identical files share presence.
pub type FileKey = [u8; 40];

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
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blocks (hash BLOB PRIMARY KEY, codec INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (object BLOB NOT NULL, region INTEGER NOT NULL, chunk INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (object, region, chunk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS presence (file BLOB NOT NULL, chunk INTEGER NOT NULL, bits BLOB NOT NULL,
    PRIMARY KEY (file, chunk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS images (key_id BLOB NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    manifest BLOB NOT NULL, PRIMARY KEY (key_id, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (source TEXT PRIMARY KEY, key_id BLOB NOT NULL, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 1), blocks INTEGER NOT NULL,
    block_bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
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

/// A stored block as found on disk: (key, codec byte, stored bytes), nothing checked.
pub type RawBlock = (Vec<u8>, u8, Vec<u8>);

/// A block to store: its leaf hash, codec and stored bytes.
pub struct NewBlock<'a> {
    pub hash: Hash,
    pub codec: Codec,
    pub data: &'a [u8],
}

impl Store {
    /// Open (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.to_path_buf(), source })?;
        let path = dir.join("store.db");
        let store = Store { path: path.clone(), pool: Mutex::new(Vec::new()) };
        let conn = store.connect()?;
        conn.execute_batch(SCHEMA).map_err(|e| store.err(e))?;
        store.pool.lock().unwrap().push(conn);
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db { path: self.path.clone(), source }
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open(&self.path).map_err(|e| self.err(e))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(|e| self.err(e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-4096; \
             PRAGMA wal_autocheckpoint=0;",
        )
        .map_err(|e| self.err(e))?;
        Ok(conn)
    }

    /// Run `f` with a pooled connection.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.pool.lock().unwrap().pop();
        let mut conn = match conn {
            Some(c) => c,
            None => self.connect()?,
        };
        let r = f(&mut conn).map_err(|e| self.err(e));
        let mut pool = self.pool.lock().unwrap();
        if pool.len() < 16 {
            pool.push(conn);
        }
        r
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored form of the block with leaf hash `hash`, if present (not yet verified).
    pub fn get_block(&self, hash: &Hash) -> Result<Option<(Codec, Vec<u8>)>, StoreError> {
        let row = self.with(|c| {
            c.prepare_cached("SELECT codec, data FROM blocks WHERE hash = ?1")?
                .query_row([&hash[..]], |r| Ok((r.get::<_, u8>(0)?, r.get::<_, Vec<u8>>(1)?)))
                .optional()
        })?;
        match row {
            None => Ok(None),
            Some((c, data)) => match Codec::from_u8(c) {
                Some(codec) => Ok(Some((codec, data))),
                None => Err(StoreError::Corrupt { path: self.path.clone(), what: format!("codec {c}") }),
            },
        }
    }

    /// Which of `hashes` are stored, in one query per 500.
    pub fn stored_among(&self, hashes: &[Hash]) -> Result<std::collections::HashSet<Hash>, StoreError> {
        let mut out = std::collections::HashSet::new();
        for chunk in hashes.chunks(500) {
            self.with(|c| {
                let marks = vec!["?"; chunk.len()].join(",");
                let mut st = c.prepare_cached(&format!("SELECT hash FROM blocks WHERE hash IN ({marks})"))?;
                let rows =
                    st.query_map(rusqlite::params_from_iter(chunk.iter().map(|h| &h[..])), |r| r.get::<_, Vec<u8>>(0))?;
                for h in rows {
                    if let Ok(h) = <Hash>::try_from(h?) {
                        out.insert(h);
                    }
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Move the write-ahead log into the database. Connections do not do it on commit (that
    /// would stall the read that committed), so the daemon calls this from a thread of its own.
    /// `truncate` also waits for readers and empties the log file (it only ever grows while
    /// readers keep old snapshots, as a busy mount's do); otherwise readers are not waited for.
    pub fn checkpoint(&self, truncate: bool) -> Result<(), StoreError> {
        let mode = if truncate { "TRUNCATE" } else { "PASSIVE" };
        self.with(|c| c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())))
    }

    /// Size of the write-ahead log, to decide when to checkpoint.
    pub fn wal_size(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        std::fs::metadata(wal).map_or(0, |m| m.len())
    }

    pub fn has_block(&self, hash: &Hash) -> Result<bool, StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM blocks WHERE hash = ?1")?.query_row([&hash[..]], |_| Ok(())).optional()
        })
        .map(|r| r.is_some())
    }

    /// Store verified blocks and mark their presence, in one transaction.
    pub fn put_blocks(&self, blocks: &[NewBlock<'_>], presence: &[(FileKey, u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let (mut n, mut bytes) = (0i64, 0i64);
            {
                let mut ins =
                    tx.prepare_cached("INSERT OR IGNORE INTO blocks (hash, codec, data) VALUES (?1, ?2, ?3)")?;
                for b in blocks {
                    if ins.execute(params![&b.hash[..], b.codec as u8, b.data])? == 1 {
                        n += 1;
                        bytes += b.data.len() as i64;
                    }
                }
                let mut pres =
                    tx.prepare_cached("INSERT OR REPLACE INTO presence (file, chunk, bits) VALUES (?1, ?2, ?3)")?;
                for (file, chunk, bits) in presence {
                    pres.execute(params![&file[..], *chunk as i64, bits])?;
                }
            }
            tx.execute("UPDATE totals SET blocks = blocks + ?1, block_bytes = block_bytes + ?2", params![n, bytes])?;
            tx.commit()
        })
    }

    /// Drop a block found damaged (it will be fetched again when needed).
    pub fn remove_block(&self, hash: &Hash) -> Result<(), StoreError> {
        self.remove_raw_block(hash)
    }

    pub fn totals(&self) -> Result<StoreTotals, StoreError> {
        self.with(|c| {
            c.query_row("SELECT blocks, block_bytes FROM totals WHERE id = 1", [], |r| {
                Ok(StoreTotals { blocks: r.get::<_, i64>(0)? as u64, block_bytes: r.get::<_, i64>(1)? as u64 })
            })
        })
    }

    /// Presence chunks of a file content: (chunk index, bits), bit `i` of chunk `c` being block
    /// `c * 4096 + i` (least significant bit first).
    pub fn presence(&self, file: &FileKey) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached("SELECT chunk, bits FROM presence WHERE file = ?1")?;
            let rows = st.query_map([&file[..]], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)))?;
            rows.collect()
        })
    }

    /// Up to `limit` stored blocks with keys above `after`, in key order (to walk them all in
    /// bounded memory): (key, codec byte, stored bytes). Keys are raw: a damaged row may hold
    /// one that is not 32 bytes long.
    pub fn blocks_after(&self, after: &[u8], limit: usize) -> Result<Vec<RawBlock>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare_cached("SELECT hash, codec, data FROM blocks WHERE hash > ?1 ORDER BY hash LIMIT ?2")?;
            let rows = st.query_map(params![after, limit as i64], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, u8>(1)?, r.get::<_, Vec<u8>>(2)?))
            })?;
            rows.collect()
        })
    }

    /// Remove a block by its raw key (also one that is not 32 bytes long), keeping totals right.
    pub fn remove_raw_block(&self, key: &[u8]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let len: Option<i64> =
                tx.query_row("SELECT length(data) FROM blocks WHERE hash = ?1", [key], |r| r.get(0)).optional()?;
            if let Some(len) = len {
                tx.execute("DELETE FROM blocks WHERE hash = ?1", [key])?;
                tx.execute("UPDATE totals SET blocks = blocks - 1, block_bytes = block_bytes - ?1", [len])?;
            }
            tx.commit()
        })
    }

    /// Replace presence chunks.
    pub fn set_presence(&self, chunks: &[(FileKey, u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.put_blocks(&[], chunks)
    }

    /// A cached piece of a file metadata region (unverified bytes).
    pub fn get_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT data FROM meta WHERE object = ?1 AND region = ?2 AND chunk = ?3")?
                .query_row(params![&object[..], region as i64, chunk as i64], |r| r.get(0))
                .optional()
        })
    }

    pub fn put_meta(&self, object: &Hash, region: u64, chunk: u64, data: &[u8]) -> Result<(), StoreError> {
        self.with(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO meta (object, region, chunk, data) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![&object[..], region as i64, chunk as i64, data])
                .map(|_| ())
        })
    }

    pub fn remove_meta(&self, object: &Hash, region: u64, chunk: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM meta WHERE object = ?1 AND region = ?2 AND chunk = ?3",
                params![&object[..], region as i64, chunk as i64],
            )
            .map(|_| ())
        })
    }

    /// The newest manifest accepted for (`key_id`, `name`).
    pub fn accepted(&self, key_id: &Hash, name: &str) -> Result<Option<AcceptedManifest>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT version, manifest FROM images WHERE key_id = ?1 AND name = ?2",
                params![&key_id[..], name],
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

    /// Record `manifest` as accepted, unless a newer version already is (returns false then).
    pub fn accept(&self, key_id: &Hash, name: &str, version: u64, manifest: &[u8]) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let current: Option<i64> = tx
                .query_row(
                    "SELECT version FROM images WHERE key_id = ?1 AND name = ?2",
                    params![&key_id[..], name],
                    |r| r.get(0),
                )
                .optional()?;
            if current.is_some_and(|v| v as u64 > version) {
                return Ok(false);
            }
            tx.execute(
                "INSERT OR REPLACE INTO images (key_id, name, version, manifest) VALUES (?1, ?2, ?3, ?4)",
                params![&key_id[..], name, version as i64, manifest],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }
}

impl Store {
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
            c.execute(
                "INSERT OR REPLACE INTO images (key_id, name, version, manifest) VALUES (?1, ?2, ?3, ?4)",
                params![&key_id[..], name, version as i64, manifest],
            )
            .map(|_| ())
        })
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
                "SELECT i.version, i.manifest FROM sources s JOIN images i ON i.key_id = s.key_id AND i.name = s.name
                 WHERE s.source = ?1",
                [source],
                |r| Ok(AcceptedManifest { version: r.get::<_, i64>(0)? as u64, bytes: r.get(1)? }),
            )
            .optional()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_presence_meta_and_manifests_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let h = [1u8; 32];
        assert_eq!(s.get_block(&h).unwrap(), None);
        let key = file_key(&[2; 32], 5000);
        s.put_blocks(&[NewBlock { hash: h, codec: Codec::Lz4, data: b"abc" }], &[(key, 0, vec![0b11])]).unwrap();
        s.put_blocks(&[NewBlock { hash: h, codec: Codec::Lz4, data: b"abc" }], &[]).unwrap();
        assert_eq!(s.get_block(&h).unwrap(), Some((Codec::Lz4, b"abc".to_vec())));
        assert_eq!(s.totals().unwrap(), StoreTotals { blocks: 1, block_bytes: 3 });
        assert_eq!(s.presence(&key).unwrap(), vec![(0, vec![0b11])]);
        s.remove_block(&h).unwrap();
        assert!(!s.has_block(&h).unwrap());
        assert_eq!(s.totals().unwrap(), StoreTotals::default());

        s.put_meta(&h, 10, 0, b"meta").unwrap();
        assert_eq!(s.get_meta(&h, 10, 0).unwrap(), Some(b"meta".to_vec()));
        assert_eq!(s.get_meta(&h, 10, 1).unwrap(), None);

        assert!(s.accept(&h, "img", 2, b"m2").unwrap());
        assert!(!s.accept(&h, "img", 1, b"m1").unwrap(), "rollback refused");
        assert!(s.accept(&h, "img", 3, b"m3").unwrap());
        assert_eq!(s.accepted(&h, "img").unwrap(), Some(AcceptedManifest { version: 3, bytes: b"m3".to_vec() }));
        drop(s);
        // Everything survives reopening.
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.accepted(&h, "img").unwrap().unwrap().version, 3);
        assert_eq!(s.get_meta(&h, 10, 0).unwrap(), Some(b"meta".to_vec()));
        assert_eq!(s.manifest_for_source("http://x").unwrap(), None);
        s.remember_source("http://x", &h, "img").unwrap();
        assert_eq!(s.manifest_for_source("http://x").unwrap().unwrap().bytes, b"m3");
    }
}
