//! Background completion: fetch every missing block at low priority until the image is complete.
//!
//! Work goes in this order: files asked for by `incfs prefetch` (at once), then the access
//! profile's entries (in recorded order), then every file in pack order. Small files that lie
//! back to back in an object are fetched together with their metadata in one ranged GET of up
//! to [`SPAN_MAX`] bytes (pack writes each file's blocks and then its metadata, so one span
//! holds both); large files go in runs of blocks. Before each request the fetcher waits until no
//! read is waiting for the network, so demand reads always go first, and, with a bandwidth cap,
//! until the cap allows the request; and a request in flight when a read starts waiting is
//! cancelled (its bytes would only slow that read down) and made again later. Profile entries and
//! prefetch requests do neither: they are the reads about to come, or what the user asked for
//! now. Presence is persisted with the blocks, so a restarted
//! daemon resumes where the last one stopped. Every block is verified exactly as for a read.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use incfs_format::layout;
use incfs_format::manifest::{display_path, InodeKind, Manifest};
use incfs_format::profile::Profile;
use incfs_format::Hash;
use incfs_store::{file_key, FileKey};
use parking_lot::Mutex;

use crate::reader::{get_counted, group_runs, FileRef, Local, Need, Purpose, ReadFailure, Reader};
use crate::stats::{FailCause, Stats};

/// Largest ranged GET for a span of small files (blocks and metadata together).
pub const SPAN_MAX: u64 = 2 << 20;
/// Blocks of a large file fetched per job (2 MiB, one request).
const BLOCKS_PER_JOB: u64 = 512;
/// Bytes of neighbours fetched ahead when a read finds a file cold ([`Background::hint`]).
const NEIGHBOURS: u64 = 4 << 20;
/// Files taken from the general order at a time (turned into jobs lazily).
const ROUND: usize = 64;
/// After a failed request, wait this long (doubling up to [`MAX_RETRY`]) before the next.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Background requests start only once no read has waited for the network for this long.
const QUIET: Duration = Duration::from_millis(5);
/// How often paused completion looks for room in a full cache again.
const ROOM_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Default)]
pub struct BackgroundOptions {
    /// Complete the whole image (off: only `incfs prefetch` requests are fetched).
    pub enabled: bool,
    /// Cap on background bytes per second.
    pub bandwidth: Option<u64>,
    pub profile: Option<Profile>,
}

/// Yielding work is completion (never evicts); the rest was asked for (may evict).
fn purpose(yields: bool) -> Purpose {
    if yields {
        Purpose::Complete
    } else {
        Purpose::Prefetch
    }
}

/// Bytes of an object that hold one small file's blocks and its metadata, in pack order.
#[derive(Debug, Clone)]
struct Span {
    object: u32,
    range: Range<u64>,
}

#[derive(Debug, Clone)]
enum Work {
    Whole(usize),
    Blocks(usize, Range<u64>),
}

#[derive(Debug)]
enum JobKind {
    Span { object: u32, range: Range<u64>, files: Vec<usize> },
    Blocks { file: usize, blocks: Range<u64> },
}

#[derive(Debug)]
struct Job {
    kind: JobKind,
    /// Hold back while reads wait for the network. Completion does; profile entries and
    /// prefetch requests do not: they are the reads about to come, or asked for by the user.
    yields: bool,
}

pub struct Background {
    reader: Arc<Reader>,
    /// The version being completed.
    manifest: Arc<Manifest>,
    /// Distinct file contents with data, in pack order.
    files: Vec<FileRef>,
    spans: Vec<Span>,
    by_key: HashMap<FileKey, usize>,
    opts: BackgroundOptions,
    urgent: Mutex<VecDeque<Vec<Work>>>,
    /// Files already fetched ahead as neighbours of a cold read.
    hinted: Mutex<std::collections::HashSet<usize>>,
    wake: tokio::sync::Notify,
    /// Next instant the bandwidth cap lets a request start.
    next_slot: Mutex<Instant>,
    /// Files being fetched now, for `status --watch`.
    active: Mutex<Vec<usize>>,
    complete_logged: AtomicBool,
    failures: Mutex<u32>,
    /// Completion is paused: the next request would not fit under the cache limit.
    cache_full: AtomicBool,
}

impl Background {
    pub fn new(reader: Arc<Reader>, manifest: Arc<Manifest>, opts: BackgroundOptions) -> Arc<Self> {
        let mut files: Vec<FileRef> = Vec::new();
        let mut by_key = HashMap::new();
        for (path, ino) in manifest.walk() {
            if let InodeKind::File(d) = &manifest.inodes[ino as usize].kind {
                let key = file_key(&d.root_hash, d.size);
                // Pushed files lie in no source: their blocks come only from fills.
                let pushed = d.meta.is_some_and(|m| m.object == crate::reader::PUSHED_OBJECT);
                if d.size == 0 || d.meta.is_none() || pushed || by_key.contains_key(&key) {
                    continue;
                }
                by_key.insert(key, files.len());
                files.push(FileRef { data: *d, key, label: Arc::from(display_path(&path)) });
            }
        }
        // Pack order: by metadata position. A file's span starts where the previous file's
        // metadata ended (its blocks lie in between when it was packed in this object).
        files.sort_by_key(|f| f.data.meta.map(|m| (m.object, m.offset)));
        by_key = files.iter().enumerate().map(|(i, f)| (f.key, i)).collect();
        reader.add_regions(files.iter().filter_map(|f| reader.meta_region(f)).map(|(o, off, len)| (o, off, off + len)));
        let mut spans = Vec::with_capacity(files.len());
        let mut prev: Option<(u32, u64)> = None;
        for f in &files {
            let (object, offset, len) = reader.meta_region(f).expect("files with data have metadata");
            let start = match prev {
                Some((o, end)) if o == object && end <= offset => end,
                _ => 0,
            };
            spans.push(Span { object, range: start..offset + len });
            prev = Some((object, offset + len));
        }
        let bg = Arc::new(Background {
            reader: reader.clone(),
            manifest,
            files,
            spans,
            by_key,
            opts,
            urgent: Mutex::new(VecDeque::new()),
            hinted: Mutex::new(Default::default()),
            wake: tokio::sync::Notify::new(),
            next_slot: Mutex::new(Instant::now()),
            active: Mutex::new(Vec::new()),
            complete_logged: AtomicBool::new(false),
            failures: Mutex::new(0),
            cache_full: AtomicBool::new(false),
        });
        if bg.opts.enabled {
            let weak = Arc::downgrade(&bg);
            reader.on_cold_file(Arc::new(move |key: &FileKey| {
                if let Some(bg) = weak.upgrade() {
                    bg.hint(key);
                }
            }));
        }
        bg
    }

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn object_digest(&self, object: u32) -> Hash {
        self.manifest.objects[object as usize].digest
    }

    /// Fetch the files of `inodes` (and of directories, everything under them) before anything
    /// else. Returns the distinct contents concerned, to follow their progress.
    pub fn prefetch(&self, inodes: &[u32]) -> Vec<FileKey> {
        let m = self.manifest();
        let mut keys = Vec::new();
        let mut work = Vec::new();
        for &root in inodes {
            for ino in m.subtree(root) {
                if let InodeKind::File(d) = &m.inodes[ino as usize].kind {
                    let key = file_key(&d.root_hash, d.size);
                    if let Some(&i) = self.by_key.get(&key) {
                        if !keys.contains(&key) {
                            keys.push(key);
                            work.push(Work::Whole(i));
                        }
                    }
                }
            }
        }
        self.urgent.lock().push_back(work);
        self.wake.notify_one();
        keys
    }

    /// (blocks present, blocks total) of `keys`.
    pub fn progress(&self, keys: &[FileKey]) -> (u64, u64) {
        keys.iter()
            .filter_map(|k| self.by_key.get(k))
            .map(|&i| {
                let total = incfs_verity::block_count(self.files[i].data.size);
                (self.reader.presence.count(&self.files[i].key).min(total), total)
            })
            .fold((0, 0), |(p, t), (a, b)| (p + a, t + b))
    }

    /// Whether completion is paused at the cache limit.
    pub fn cache_full(&self) -> bool {
        self.cache_full.load(Ordering::Relaxed)
    }

    /// Wait until `bytes` more fit in the cache without evicting anything: completion fills
    /// free space only, so it stops at the limit rather than evicting what it fetched before.
    async fn wait_for_room(&self, bytes: u64) {
        loop {
            match self.reader.store().has_room(bytes) {
                Ok(true) => {
                    if self.cache_full.swap(false, Ordering::Relaxed) {
                        tracing::info!("cache has room again: background completion resumes");
                    }
                    return;
                }
                Ok(false) => {
                    if !self.cache_full.swap(true, Ordering::Relaxed) {
                        tracing::info!("cache full: background completion paused at the cache limit");
                    }
                }
                Err(e) => tracing::warn!("background fetch: {e}"),
            }
            tokio::time::sleep(ROOM_POLL).await;
        }
    }

    /// Paths of the files being fetched now.
    pub fn active(&self) -> Vec<String> {
        self.active.lock().iter().map(|&i| self.files[i].label.to_string()).collect()
    }

    fn complete(&self, i: usize) -> bool {
        self.reader.is_complete(&self.files[i])
    }

    /// The profile's entries (not yielding to demand reads), then every file, in pack order.
    fn general_order(&self) -> VecDeque<(Work, bool)> {
        let mut out = VecDeque::new();
        if let Some(p) = &self.opts.profile {
            let m = self.manifest();
            for e in &p.entries {
                let Some(InodeKind::File(d)) = m.resolve(&e.path).map(|i| &m.inodes[i as usize].kind) else {
                    continue;
                };
                let Some(&i) = self.by_key.get(&file_key(&d.root_hash, d.size)) else { continue };
                let blocks = incfs_verity::block_count(d.size);
                if self.span_len(i) <= SPAN_MAX {
                    out.push_back((Work::Whole(i), false));
                } else if e.start < blocks {
                    out.push_back((Work::Blocks(i, e.start..(e.start + e.count).min(blocks)), false));
                }
            }
        }
        out.extend((0..self.files.len()).map(|i| (Work::Whole(i), true)));
        out
    }

    fn span_len(&self, i: usize) -> u64 {
        let r = &self.spans[i].range;
        r.end - r.start
    }

    /// Turn work into requests: neighbouring small files into shared spans, large files into
    /// runs of blocks; whatever is already present is skipped.
    fn jobs(&self, work: Vec<(Work, bool)>) -> Vec<Job> {
        let mut jobs: Vec<Job> = Vec::new();
        for (w, yields) in work {
            match w {
                Work::Whole(i) if self.complete(i) => {}
                Work::Whole(i) if self.span_len(i) <= SPAN_MAX => {
                    let s = &self.spans[i];
                    if let Some(Job { kind: JobKind::Span { object, range, files }, yields: y }) = jobs.last_mut() {
                        if *y == yields
                            && *object == s.object
                            && range.end == s.range.start
                            && s.range.end - range.start <= SPAN_MAX
                        {
                            range.end = s.range.end;
                            files.push(i);
                            continue;
                        }
                    }
                    let kind = JobKind::Span { object: s.object, range: s.range.clone(), files: vec![i] };
                    jobs.push(Job { kind, yields });
                }
                Work::Whole(i) => {
                    let blocks = incfs_verity::block_count(self.files[i].data.size);
                    self.block_jobs(i, 0..blocks, yields, &mut jobs);
                }
                Work::Blocks(i, r) => self.block_jobs(i, r, yields, &mut jobs),
            }
        }
        jobs
    }

    fn block_jobs(&self, i: usize, blocks: Range<u64>, yields: bool, jobs: &mut Vec<Job>) {
        let key = &self.files[i].key;
        let mut at = blocks.start;
        while at < blocks.end {
            let end = (at + BLOCKS_PER_JOB).min(blocks.end);
            if (at..end).any(|b| !self.reader.presence.is_present(key, b)) {
                jobs.push(Job { kind: JobKind::Blocks { file: i, blocks: at..end }, yields });
            }
            at = end;
        }
    }

    /// Run until the runtime shuts down. Up to `--parallel` jobs run at once; each free place
    /// goes to urgent work first (prefetch requests, neighbours of files being read), then to
    /// the general order, so urgent work waits for at most one job (2 MiB), never for a round.
    pub async fn run(self: Arc<Self>) {
        use futures::stream::FuturesUnordered;
        let mut general = if self.opts.enabled { self.general_order() } else { VecDeque::new() };
        let mut urgent_jobs: VecDeque<Job> = VecDeque::new();
        let mut general_jobs: VecDeque<Job> = VecDeque::new();
        // Two pools: general jobs waiting for reads to stop (they yield) must not keep urgent
        // jobs from starting. Requests themselves share the reader's slots either way.
        let mut urgent_running = FuturesUnordered::new();
        let mut general_running = FuturesUnordered::new();
        loop {
            loop {
                let work = self.urgent.lock().pop_front();
                match work {
                    Some(w) => urgent_jobs.extend(self.jobs(w.into_iter().map(|w| (w, false)).collect())),
                    None => break,
                }
            }
            if general_jobs.is_empty() && !general.is_empty() {
                general_jobs.extend(self.jobs(general.drain(..ROUND.min(general.len())).collect()));
                continue;
            }
            if urgent_running.len() < self.reader.parallel() {
                if let Some(job) = urgent_jobs.pop_front() {
                    urgent_running.push(self.clone().run_job(job));
                    continue;
                }
            }
            if general_running.len() < self.reader.parallel() {
                if let Some(job) = general_jobs.pop_front() {
                    general_running.push(self.clone().run_job(job));
                    continue;
                }
            }
            if !urgent_running.is_empty() || !general_running.is_empty() {
                tokio::select! {
                    Some(_) = urgent_running.next(), if !urgent_running.is_empty() => {}
                    Some(_) = general_running.next(), if !general_running.is_empty() => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            // Nothing to do, nothing running.
            if self.opts.enabled {
                let missing: Vec<usize> = (0..self.files.len()).filter(|&i| !self.complete(i)).collect();
                if missing.is_empty() {
                    if !self.complete_logged.swap(true, Ordering::Relaxed) {
                        tracing::info!("image complete: every block is present and verified");
                    }
                } else {
                    // Some requests failed: go over what is missing again, later.
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(MAX_RETRY) => {}
                    }
                    general = missing.into_iter().map(|i| (Work::Whole(i), true)).collect();
                    continue;
                }
            }
            self.wake.notified().await;
        }
    }

    /// A read found file `key` cold: fetch the files packed after it (its neighbours in the
    /// tree, which programs tend to read next) ahead of the general order, about
    /// [`NEIGHBOURS`] bytes of them. Only while completing the image (never with
    /// `--background off`: then a read fetches only what it reads).
    pub fn hint(&self, key: &FileKey) {
        let Some(&i) = self.by_key.get(key) else { return };
        let mut work = Vec::new();
        let mut bytes = 0;
        {
            let mut hinted = self.hinted.lock();
            for j in i + 1..self.files.len() {
                if bytes >= NEIGHBOURS {
                    break;
                }
                bytes += self.span_len(j);
                if hinted.insert(j) && !self.complete(j) {
                    work.push(Work::Whole(j));
                }
            }
        }
        if !work.is_empty() {
            self.urgent.lock().push_back(work);
            self.wake.notify_one();
        }
    }

    /// Wait until no read waits for the network (if `yields`) and the bandwidth cap allows
    /// `bytes` more.
    async fn wait_turn(&self, bytes: u64, yields: bool) {
        self.wait_for_no_demand(yields).await;
        if let Some(rate) = self.opts.bandwidth.filter(|&r| r > 0) {
            let start = {
                let mut next = self.next_slot.lock();
                let start = (*next).max(Instant::now());
                *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
                start
            };
            tokio::time::sleep_until(start.into()).await;
            self.wait_for_no_demand(yields).await;
        }
    }

    /// Wait until no read has waited for the network for [`QUIET`] (a program reading file
    /// after file leaves only short gaps; a request started in one would be cancelled). With
    /// no read in that time, at once: a fixed pause before every request left the cores idle
    /// between requests of an image completed with nothing else read.
    async fn wait_for_no_demand(&self, yields: bool) {
        if !yields {
            return;
        }
        loop {
            while self.reader.demand() > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let quiet = self.reader.quiet_for();
            if quiet >= QUIET {
                return;
            }
            tokio::time::sleep(QUIET - quiet).await;
        }
    }

    /// One ranged GET of background work, in its turn; a yielding one is cancelled and made
    /// again when a read starts waiting meanwhile.
    async fn get(&self, object: u32, range: Range<u64>, yields: bool) -> Result<(bytes::Bytes, usize), ReadFailure> {
        let key = layout::object(&self.object_digest(object));
        loop {
            if yields {
                self.wait_for_room(range.end - range.start).await;
            }
            self.wait_turn(range.end - range.start, yields).await;
            let began = self.reader.demand_began.notified();
            tokio::pin!(began);
            began.as_mut().enable();
            if yields && self.reader.demand() > 0 {
                continue;
            }
            // A slot shared with readahead: together they stay within `--parallel` requests.
            let Ok(_slot) = self.reader.slots.clone().acquire_owned().await else {
                return Err(ReadFailure { cause: FailCause::Other, message: "shutting down".into() });
            };
            let fetch = get_counted(self.reader.mirrors(), &self.reader.stats, &key, range.clone());
            let result = if yields {
                tokio::select! {
                    r = fetch => r,
                    _ = &mut began => {
                        Stats::add(&self.reader.stats.background_cancelled, 1);
                        continue;
                    }
                }
            } else {
                fetch.await
            };
            return result;
        }
    }

    async fn run_job(self: Arc<Self>, job: Job) {
        let files: Vec<usize> = match &job.kind {
            JobKind::Span { files, .. } => files.clone(),
            JobKind::Blocks { file, .. } => vec![*file],
        };
        self.active.lock().extend(&files);
        let ok = match job.kind {
            JobKind::Span { object, range, files } => self.fetch_span(object, range, &files, job.yields).await,
            JobKind::Blocks { file, blocks } => self.fetch_file_blocks(file, blocks, job.yields).await,
        };
        {
            let mut active = self.active.lock();
            for f in &files {
                if let Some(p) = active.iter().position(|a| a == f) {
                    active.swap_remove(p);
                }
            }
        }
        let delay = {
            let mut failures = self.failures.lock();
            if ok {
                *failures = 0;
                None
            } else {
                *failures = failures.saturating_add(1);
                Some(FIRST_RETRY.saturating_mul(1 << (*failures - 1).min(5)).min(MAX_RETRY))
            }
        };
        if let Some(d) = delay {
            // Do not hammer a source that is down; what failed is retried on a later pass.
            tokio::time::sleep(d).await;
        }
    }

    /// One GET for neighbouring small files: metadata and blocks together.
    async fn fetch_span(&self, object: u32, range: Range<u64>, files: &[usize], yields: bool) -> bool {
        let (bytes, mirror) = match self.get(object, range.clone(), yields).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("background fetch: {}", e.message);
                return false;
            }
        };
        // Every file of the span on one blocking task: storing its metadata, planning and
        // verifying are disk and CPU work, and a task per file (thousands for a tree of small
        // files) cost more in hand-offs than the work itself.
        let reader = self.reader.clone();
        let todo: Vec<(usize, FileRef)> =
            files.iter().filter(|&&i| !self.complete(i)).map(|&i| (i, self.files[i].clone())).collect();
        let purpose = purpose(yields);
        let checked = tokio::task::spawn_blocking(move || {
            let mut ok = true;
            // Blocks to fetch from elsewhere afterwards: some (deduplicated, packed in another
            // place) or, with `None`, the whole file (its metadata was not all in the span).
            let mut elsewhere: Vec<(usize, Option<Vec<u64>>)> = Vec::new();
            for (i, f) in &todo {
                let (_, offset, len) = reader.meta_region(f).expect("files with data have metadata");
                let at = (offset - range.start) as usize;
                reader.put_meta_region(f, &bytes[at..at + len as usize], mirror);
                let missing: Vec<u64> = (0..incfs_verity::block_count(f.data.size))
                    .filter(|&b| !reader.presence.is_present(&f.key, b))
                    .collect();
                let plan = match reader.plan(f, &missing) {
                    Ok(p) => p,
                    Err(Local::Need(Need::Meta { .. } | Need::Blocks(_))) => {
                        elsewhere.push((*i, None));
                        continue;
                    }
                    Err(Local::Fail(e)) => {
                        tracing::warn!("background fetch: {}", e.message);
                        ok = false;
                        continue;
                    }
                };
                let (inside, outside): (Vec<_>, Vec<_>) = plan
                    .into_iter()
                    .partition(|(_, _, r)| r.object == object && r.offset >= range.start && r.range().end <= range.end);
                ok &= reader.accept(f, &inside, &bytes, range.start, mirror, purpose).failed.is_empty();
                if !outside.is_empty() {
                    elsewhere.push((*i, Some(outside.iter().map(|(b, _, _)| *b).collect())));
                }
            }
            (ok, elsewhere)
        })
        .await;
        let Ok((mut ok, elsewhere)) = checked else { return false };
        for (i, blocks) in elsewhere {
            ok &= match blocks {
                None => self.fetch_file_blocks(i, 0..incfs_verity::block_count(self.files[i].data.size), yields).await,
                Some(blocks) => self.fetch_blocks(i, blocks, yields).await,
            };
        }
        ok
    }

    async fn fetch_file_blocks(&self, i: usize, blocks: Range<u64>, yields: bool) -> bool {
        let f = &self.files[i];
        let missing: Vec<u64> = blocks.filter(|&b| !self.reader.presence.is_present(&f.key, b)).collect();
        self.fetch_blocks(i, missing, yields).await
    }

    /// Fetch blocks `blocks` of file `i` (metadata first, as needed), in runs.
    async fn fetch_blocks(&self, i: usize, blocks: Vec<u64>, yields: bool) -> bool {
        let f = &self.files[i];
        if blocks.is_empty() {
            return true;
        }
        let plan = loop {
            match self.reader.plan(f, &blocks) {
                Ok(p) => break p,
                Err(Local::Need(Need::Meta { chunk })) => {
                    if let Err(e) = self.reader.fetch_meta(f, chunk).await {
                        tracing::warn!("background fetch: {}", e.message);
                        return false;
                    }
                }
                Err(Local::Need(Need::Blocks(_))) => unreachable!("planning needs no blocks"),
                Err(Local::Fail(e)) => {
                    tracing::warn!("background fetch: {}", e.message);
                    return false;
                }
            }
        };
        let mut ok = true;
        for run in group_runs(&plan) {
            let items = &plan[run];
            let (first, last) = (items[0].2, items[items.len() - 1].2);
            match self.get(first.object, first.offset..last.range().end, yields).await {
                Ok((bytes, mirror)) => {
                    let outcome = self
                        .reader
                        .accept_off_thread(f, items.to_vec(), bytes, first.offset, mirror, purpose(yields), true)
                        .await;
                    ok &= outcome.failed.is_empty();
                }
                Err(e) => {
                    tracing::warn!("background fetch: {}", e.message);
                    return false;
                }
            }
        }
        ok
    }
}
