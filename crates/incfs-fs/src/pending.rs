//! Reads waiting for data, and the read log: what `incfs pending`, `incfs log` and data loaders
//! (`docs/loader.md`) see.
//!
//! Every read that cannot be served from local data gets a serial number and stays listed until
//! it ends; each new one is also announced to whoever listens (loaders), so that a loader can
//! fill the blocks it waits for. Every read the daemon answers goes to the read log, a bounded
//! broadcast: a slow listener loses records (and is told how many), never slows reads down.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

/// Records a listener may fall behind by before it loses some.
const CHANNEL_DEPTH: usize = 8192;

/// A file's stable id: the first 16 bytes of SHA-256 of its path as printed (escaped as in
/// messages and profiles), in hex. The same path has the same id in every version and mount.
pub fn file_id(path: &str) -> String {
    hex::encode(&Sha256::digest(path.as_bytes())[..16])
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A read waiting for data blocks `[block, block + count)` of a file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingRead {
    pub serial: u64,
    /// When it began, microseconds since the Unix epoch.
    pub time_us: u64,
    pub id: String,
    pub path: String,
    pub block: u64,
    pub count: u64,
    /// The file's size in bytes.
    pub size: u64,
}

/// One read answered by the daemon (the read log).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadRecord {
    pub serial: u64,
    pub time_us: u64,
    pub id: String,
    pub path: String,
    pub block: u64,
    pub count: u64,
    /// It had to wait for data (fetched or filled).
    pub waited: bool,
}

pub struct Pending {
    waiting: Mutex<BTreeMap<u64, PendingRead>>,
    serial: AtomicU64,
    began: broadcast::Sender<PendingRead>,
    log: broadcast::Sender<ReadRecord>,
    /// Log listeners now: checked on every read without taking the channel's lock.
    listeners: AtomicUsize,
}

/// A read-log listener; unsubscribed when dropped.
pub struct LogSubscription<'a> {
    pub rx: broadcast::Receiver<ReadRecord>,
    owner: &'a Pending,
}

impl Drop for LogSubscription<'_> {
    fn drop(&mut self) {
        self.owner.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            waiting: Mutex::new(BTreeMap::new()),
            serial: AtomicU64::new(1),
            began: broadcast::channel(CHANNEL_DEPTH).0,
            log: broadcast::channel(CHANNEL_DEPTH).0,
            listeners: AtomicUsize::new(0),
        }
    }
}

/// A pending read; it leaves the list when dropped.
pub struct PendingGuard<'a> {
    owner: &'a Pending,
    pub serial: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.owner.waiting.lock().remove(&self.serial);
    }
}

impl Pending {
    /// List a read of `count` blocks from `block` of file `path` as waiting, and announce it.
    pub fn begin(&self, path: &str, size: u64, block: u64, count: u64) -> PendingGuard<'_> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let p =
            PendingRead { serial, time_us: now_us(), id: file_id(path), path: path.to_string(), block, count, size };
        self.waiting.lock().insert(serial, p.clone());
        let _ = self.began.send(p);
        PendingGuard { owner: self, serial }
    }

    /// The reads waiting now, oldest first.
    pub fn list(&self) -> Vec<PendingRead> {
        self.waiting.lock().values().cloned().collect()
    }

    /// New pending reads, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PendingRead> {
        self.began.subscribe()
    }

    /// Log an answered read; costs nothing when nobody listens.
    pub fn log(&self, path: &Arc<str>, block: u64, count: u64, waited: bool) {
        if self.listeners.load(Ordering::Relaxed) == 0 {
            return;
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let _ = self.log.send(ReadRecord {
            serial,
            time_us: now_us(),
            id: file_id(path),
            path: path.to_string(),
            block,
            count,
            waited,
        });
    }

    pub fn subscribe_log(&self) -> LogSubscription<'_> {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        LogSubscription { rx: self.log.subscribe(), owner: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_reads_are_listed_until_they_end_and_announced() {
        let p = Pending::default();
        let mut rx = p.subscribe();
        let a = p.begin("a", 10_000, 0, 2);
        let b = p.begin("dir/b", 4096, 0, 1);
        assert_eq!(p.list().iter().map(|r| r.serial).collect::<Vec<_>>(), vec![a.serial, b.serial]);
        assert_eq!(rx.try_recv().unwrap().path, "a");
        let announced = rx.try_recv().unwrap();
        assert_eq!((announced.id.as_str(), announced.count), (file_id("dir/b").as_str(), 1));
        drop(a);
        assert_eq!(p.list().len(), 1);
        drop(b);
        assert!(p.list().is_empty());
    }

    #[test]
    fn the_log_reaches_listeners_and_ids_are_stable() {
        let p = Pending::default();
        p.log(&Arc::from("nobody listens"), 0, 1, false);
        let mut sub = p.subscribe_log();
        p.log(&Arc::from("x"), 3, 4, true);
        let r = sub.rx.try_recv().unwrap();
        assert_eq!((r.block, r.count, r.waited), (3, 4, true));
        assert!(sub.rx.try_recv().is_err());
        drop(sub);
        assert_eq!(p.listeners.load(Ordering::Relaxed), 0);
        assert_eq!(file_id("x"), file_id("x"));
        assert_ne!(file_id("x"), file_id("y"));
        assert_eq!(file_id("x").len(), 32);
    }
}
