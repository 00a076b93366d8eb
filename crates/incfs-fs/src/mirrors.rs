//! Several sources of one repository, tried healthy-first.
//!
//! A mirror that fails a request, or serves a block that fails verification, is skipped for a
//! backoff period (doubling from 1 s to 60 s) while others are tried; it is tried again once the
//! period is over, and a success clears its record. With every mirror in backoff, the one whose
//! period ends first is tried anyway: a read never waits on a timer when it could try.

use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use incfs_fetch::{Source, SourceError};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

struct Health {
    failures: u32,
    retry_at: Option<Instant>,
}

pub struct Mirrors {
    sources: Vec<Source>,
    health: Mutex<Vec<Health>>,
}

impl Mirrors {
    pub fn new(sources: Vec<Source>) -> Self {
        let health = sources.iter().map(|_| Health { failures: 0, retry_at: None }).collect();
        Mirrors { sources, health: Mutex::new(health) }
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Mirror indices in the order to try them now.
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let h = self.health.lock().unwrap();
        let mut idx: Vec<usize> = (0..self.sources.len()).collect();
        idx.sort_by_key(|&i| match h[i].retry_at {
            Some(t) if t > now => (1, t, i),
            _ => (0, now, i),
        });
        idx
    }

    /// Put mirror `i` in backoff.
    pub fn penalize(&self, i: usize) {
        let mut h = self.health.lock().unwrap();
        let e = &mut h[i];
        e.failures = e.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << e.failures.min(6).saturating_sub(1)).min(MAX_BACKOFF);
        e.retry_at = Some(Instant::now() + backoff);
        tracing::warn!("source {} put in backoff for {:?}", self.sources[i].name(), backoff);
    }

    fn succeeded(&self, i: usize) {
        let mut h = self.health.lock().unwrap();
        h[i] = Health { failures: 0, retry_at: None };
    }

    /// Bytes `range` of `key` from the first mirror that has them; also returns which mirror.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<(Bytes, usize), SourceError> {
        let mut last = None;
        for i in self.order() {
            match self.sources[i].get_range(key, range.clone()).await {
                Ok(b) => {
                    self.succeeded(i);
                    return Ok((b, i));
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    self.penalize(i);
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one source"))
    }
}
