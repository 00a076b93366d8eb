//! Several sources of one repository, tried healthy-first.
//!
//! A mirror that fails a request is skipped for a backoff period (doubling from 1 s to 60 s)
//! while others are tried; it is tried again once the period is over, and an answer clears that
//! record. A mirror that *lied* (sent bytes that failed verification: a data block, a block
//! record, a hash block) is put behind every mirror that did not, for a longer period (doubling
//! from 60 s to an hour) that an answer does not clear: only bytes from it that verify do. A
//! liar therefore keeps its place at the back however fast it answers, while a mirror with a
//! passing fault is back in a second. With every mirror in backoff, the one whose period ends
//! first is tried anyway: a read never waits on a timer when it could try.

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use incfs_fetch::{Source, SourceError};
use parking_lot::Mutex;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const FIRST_LIE_BACKOFF: Duration = Duration::from_secs(60);
const MAX_LIE_BACKOFF: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Health {
    /// Failed requests in a row, and when the mirror may be tried first again.
    failures: u32,
    retry_at: Option<Instant>,
    /// Answers that failed verification since its last verified one, and until when it stays
    /// behind the mirrors that did not lie.
    lies: u32,
    lied_until: Option<Instant>,
}

/// `first`, doubled for each of `count` - 1 events, at most `max`.
fn backoff(first: Duration, max: Duration, count: u32) -> Duration {
    first.saturating_mul(1 << count.min(12).saturating_sub(1)).min(max)
}

pub struct Mirrors {
    sources: Vec<Source>,
    health: Mutex<Vec<Health>>,
    /// The mirror that answered last.
    last: std::sync::atomic::AtomicUsize,
}

impl Mirrors {
    pub fn new(sources: Vec<Source>) -> Self {
        let health = sources.iter().map(|_| Health::default()).collect();
        Mirrors { sources, health: Mutex::new(health), last: Default::default() }
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Mirror indices in the order to try them now.
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let h = self.health.lock();
        let mut idx: Vec<usize> = (0..self.sources.len()).collect();
        let until = |t: Option<Instant>| t.filter(|&t| t > now);
        idx.sort_by_key(|&i| {
            let (lied, backoff) = (until(h[i].lied_until), until(h[i].retry_at));
            (lied.is_some(), backoff.is_some(), lied.max(backoff).unwrap_or(now), i)
        });
        idx
    }

    /// Time to first byte of the mirror that answered last ([`Source::first_byte_latency`]).
    pub fn first_byte_latency(&self) -> Duration {
        self.sources[self.last.load(std::sync::atomic::Ordering::Relaxed)].first_byte_latency()
    }

    /// Put mirror `i` in backoff.
    pub fn penalize(&self, i: usize) {
        let mut h = self.health.lock();
        let e = &mut h[i];
        e.failures = e.failures.saturating_add(1);
        let backoff = backoff(FIRST_BACKOFF, MAX_BACKOFF, e.failures);
        e.retry_at = Some(Instant::now() + backoff);
        tracing::warn!("source {} put in backoff for {:?}", self.sources[i].name(), backoff);
    }

    /// Mirror `i` sent bytes that failed verification: behind every mirror that did not lie,
    /// for a period that grows with each lie until it sends bytes that verify.
    pub fn lied(&self, i: usize) {
        let mut h = self.health.lock();
        let e = &mut h[i];
        e.lies = e.lies.saturating_add(1);
        let backoff = backoff(FIRST_LIE_BACKOFF, MAX_LIE_BACKOFF, e.lies);
        e.lied_until = Some(Instant::now() + backoff);
        tracing::warn!(
            "source {} sent data that failed verification ({} time(s) in a row): used only when no other source can answer, for {:?}",
            self.sources[i].name(),
            e.lies,
            backoff
        );
    }

    /// Bytes from mirror `i` verified: whatever it lied before is forgiven.
    pub fn vouch(&self, i: usize) {
        let mut h = self.health.lock();
        if h[i].lies > 0 {
            h[i].lies = 0;
            h[i].lied_until = None;
        }
    }

    /// Mirror `i` answered (what it sent is judged by [`Mirrors::lied`] / [`Mirrors::vouch`]).
    fn succeeded(&self, i: usize) {
        let mut h = self.health.lock();
        h[i].failures = 0;
        h[i].retry_at = None;
    }

    /// Bytes `range` of `key` from the first mirror that has them; also returns which mirror.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<(Bytes, usize), SourceError> {
        let mut last = None;
        for i in self.order() {
            match self.sources[i].get_range(key, range.clone()).await {
                Ok(b) => {
                    self.succeeded(i);
                    self.last.store(i, std::sync::atomic::Ordering::Relaxed);
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
