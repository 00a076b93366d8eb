//! Counters of a mount, readable at any time without locks on the read path.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;

/// How many recent fetch latencies are kept for the mean and p99.
const LATENCY_WINDOW: usize = 4096;

#[derive(Default)]
pub struct Stats {
    /// FUSE reads answered with data.
    pub reads_served: AtomicU64,
    /// Reads that had to wait for the network.
    pub reads_waited: AtomicU64,
    pub reads_failed_timeout: AtomicU64,
    pub reads_failed_verification: AtomicU64,
    pub reads_failed_source: AtomicU64,
    pub reads_failed_other: AtomicU64,
    /// Ranged GETs issued (data and metadata).
    pub fetch_requests: AtomicU64,
    pub fetch_failures: AtomicU64,
    /// Bytes received from sources.
    pub bytes_fetched: AtomicU64,
    /// Blocks fetched and verified.
    pub blocks_fetched: AtomicU64,
    /// Blocks that failed verification (from the network or the local store).
    pub blocks_bad: AtomicU64,
    /// Opens served by FUSE passthrough (their reads never reach the daemon).
    pub opens_passthrough: AtomicU64,
    /// Background requests cancelled because a read started waiting for the network.
    pub background_cancelled: AtomicU64,
    /// Blocks filled from outside (loaders, `incfs fill`) and kept.
    pub blocks_filled: AtomicU64,
    /// Filled blocks that failed verification (also counted in `blocks_bad`).
    pub fills_rejected: AtomicU64,
    latencies_us: Mutex<VecDeque<u64>>,
}

/// Why a read failed, for counting and for the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCause {
    Timeout,
    Verification,
    Source,
    Other,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn failed(&self, cause: FailCause) {
        let c = match cause {
            FailCause::Timeout => &self.reads_failed_timeout,
            FailCause::Verification => &self.reads_failed_verification,
            FailCause::Source => &self.reads_failed_source,
            FailCause::Other => &self.reads_failed_other,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn fetched(&self, bytes: u64, latency: Duration) {
        self.fetch_requests.fetch_add(1, Relaxed);
        self.bytes_fetched.fetch_add(bytes, Relaxed);
        let mut l = self.latencies_us.lock();
        if l.len() == LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(latency.as_micros() as u64);
    }

    /// Mean and 99th percentile of recent fetch latencies, in milliseconds.
    pub fn latency_ms(&self) -> (f64, f64) {
        let mut v: Vec<u64> = self.latencies_us.lock().iter().copied().collect();
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_unstable();
        let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
        let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).min(v.len()) - 1];
        (mean / 1000.0, p99 as f64 / 1000.0)
    }

    /// The counters by name, handed to the daemon replacing this one (`incfs restart`).
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        self.counters().into_iter().map(|(n, c)| (n.to_string(), c.load(Relaxed))).collect()
    }

    /// Add counters of an earlier daemon of this mount.
    pub fn carry_over(&self, from: &std::collections::BTreeMap<String, u64>) {
        for (name, c) in self.counters() {
            if let Some(v) = from.get(name) {
                c.fetch_add(*v, Relaxed);
            }
        }
    }

    fn counters(&self) -> [(&'static str, &AtomicU64); 15] {
        [
            ("reads_served", &self.reads_served),
            ("reads_waited", &self.reads_waited),
            ("reads_failed_timeout", &self.reads_failed_timeout),
            ("reads_failed_verification", &self.reads_failed_verification),
            ("reads_failed_source", &self.reads_failed_source),
            ("reads_failed_other", &self.reads_failed_other),
            ("fetch_requests", &self.fetch_requests),
            ("fetch_failures", &self.fetch_failures),
            ("bytes_fetched", &self.bytes_fetched),
            ("blocks_fetched", &self.blocks_fetched),
            ("blocks_bad", &self.blocks_bad),
            ("opens_passthrough", &self.opens_passthrough),
            ("background_cancelled", &self.background_cancelled),
            ("blocks_filled", &self.blocks_filled),
            ("fills_rejected", &self.fills_rejected),
        ]
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}
