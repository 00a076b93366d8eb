//! Fetch: the ranged GETs in flight, one per run of blocks (or span of a cold small file),
//! shared by every read that needs them (single flight), readahead within a bound of slots.

use super::*;

impl Reader {
    /// A read found `f` cold (its metadata not local): tell the hook, and return its span (and
    /// the range to fetch for it) if it is small.
    pub(super) fn cold_file(&self, f: &FileRef) -> Option<(u32, Range<u64>, Range<u64>)> {
        let hook = self.cold_hook.read().clone();
        if let Some(hook) = hook {
            hook(&f.key);
        }
        self.small_span(f)
    }

    /// The span of a small file not pushed: its object and byte range, if known and at most
    /// [`SMALL_SPAN`] long, and the range to fetch for it (widened to its neighbours' spans).
    pub(super) fn small_span(&self, f: &FileRef) -> Option<(u32, Range<u64>, Range<u64>)> {
        if Self::is_pushed(f) || f.data.meta.is_none() || self.fills_only.load(Ordering::Relaxed) {
            return None;
        }
        let (object, offset, len) = self.region(f);
        let regions = self.regions.read().clone();
        let k = regions.binary_search(&(object, offset, offset + len)).ok()?;
        let span = crate::nearby::span(&regions, k)?;
        if span.end - span.start > SMALL_SPAN {
            return None;
        }
        let fetch = crate::nearby::widen(&regions, k, span.clone(), self.nearby_reach.load(Ordering::Relaxed));
        Some((object, span, fetch))
    }

    /// Fetch a small file's whole span: metadata region and the blocks that lie in the span,
    /// verified and stored; single-flighted with other readers of the file.
    pub(super) async fn fetch_span(
        self: &Arc<Self>,
        f: &FileRef,
        (object, span, widened): (u32, Range<u64>, Range<u64>),
    ) -> Result<(), ReadFailure> {
        let (_, offset, len) = self.region(f);
        let key = (object, offset, SPAN_GROUP);
        let local = || matches!(self.meta_chunk_local(f, 0), Ok(Some(_)));
        let shared = self.meta_flight(key, local, || {
            let (me, f) = (self.clone(), f.clone());
            async move {
                let (bytes, mirror) = match me.nearby.get(object, &span) {
                    Some(found) => found,
                    None => {
                        let key = layout::object(&me.digest(object));
                        let (bytes, mirror) = get_counted(&me.mirrors, &me.stats, &key, widened.clone()).await?;
                        let own = (span.start - widened.start) as usize..(span.end - widened.start) as usize;
                        if widened != span {
                            me.nearby.put(object, widened, bytes.clone(), mirror);
                        }
                        (bytes.slice(own), mirror)
                    }
                };
                let at = (offset - span.start) as usize;
                me.put_meta_region(&f, &bytes[at..at + len as usize], mirror);
                let missing: Vec<u64> = (0..incfs_verity::block_count(f.data.size))
                    .filter(|&b| !me.presence.is_present(&f.key, b))
                    .collect();
                // Blocks stored elsewhere (deduplicated) are left to the read's next step.
                if let Ok(plan) = me.plan(&f, &missing) {
                    let inside: Vec<_> = plan
                        .into_iter()
                        .filter(|(_, _, r)| r.object == object && r.offset >= span.start && r.range().end <= span.end)
                        .collect();
                    if !inside.is_empty() {
                        me.accept_off_thread(&f, inside, bytes, span.start, mirror, Purpose::Read, true).await;
                    }
                }
                Ok(Arc::new(Vec::new()))
            }
            .boxed()
        });
        match shared {
            Some(s) => s.await.map(|_| ()),
            None => Ok(()),
        }
    }

    pub(crate) async fn fetch_blocks(
        self: &Arc<Self>,
        f: &FileRef,
        needed: &[u64],
        ahead: Range<u64>,
        keep_decoded: bool,
    ) -> Result<(), ReadFailure> {
        let blocks_total = incfs_verity::block_count(f.data.size);
        let mut wanted: Vec<u64> = needed.to_vec();
        wanted.extend(ahead.start.max(needed.last().map_or(0, |l| l + 1))..ahead.end.min(blocks_total));
        if wanted.is_empty() {
            return Ok(());
        }
        let plan = loop {
            match self.plan(f, &wanted) {
                Ok(p) => break p,
                Err(Local::Fail(e)) => return Err(e),
                Err(Local::Need(Need::Meta { chunk })) => self.fetch_meta_for(f, wanted[0], Some(chunk)).await?,
                Err(Local::Need(Need::Blocks(_))) => unreachable!("planning needs no blocks"),
            }
        };
        // Readahead: the metadata of what comes after the window, before planning needs it.
        if !ahead.is_empty() && blocks_total > 0 {
            let probe = (ahead.end + META_LOOKAHEAD * self.link_scale() as u64).min(blocks_total - 1);
            if probe >= ahead.end && !self.missing_meta_for(f, probe).is_empty() {
                let (me, f) = (self.clone(), f.clone());
                tokio::spawn(async move {
                    let _ = me.fetch_meta_for(&f, probe, None).await;
                });
            }
        }
        // Sets, not list scans: a plan covers up to a readahead window (thousands of blocks), and
        // scanning lists per item made planning quadratic (4% of the daemon's CPU on a cold read).
        let needed: rustc_hash::FxHashSet<u64> = needed.iter().copied().collect();
        let needed_leaves: Vec<Hash> = plan.iter().filter(|(i, _, _)| needed.contains(i)).map(|(_, h, _)| *h).collect();
        let mut waits = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            // Checked again under the lock: a run stores its blocks before it leaves
            // `inflight`, so a block is always either stored or in flight here.
            let candidates: Vec<Hash> =
                plan.iter().filter(|(_, h, _)| !inflight.contains_key(h)).map(|(_, h, _)| *h).collect();
            let stored = self.store.stored_among(&candidates);
            // Needed blocks and readahead go in separate runs: the read waits only for its own.
            let (mut now, mut ahead) = (Vec::new(), Vec::new());
            let mut planned = rustc_hash::FxHashSet::default();
            for item in plan {
                let is_needed = needed.contains(&item.0);
                match inflight.get(&item.1) {
                    // One wait per run, not per block: a 1 MiB read inside a run in flight
                    // joined 256 clones of it, each polled and woken (~3% of the daemon's CPU
                    // on a cold read). A run's blocks are consecutive here, so comparing with
                    // the last wait finds nearly every repeat.
                    Some(s) if is_needed && !waits.last().is_some_and(|w: &SharedRun| w.ptr_eq(s)) => {
                        waits.push(s.clone())
                    }
                    Some(_) => {}
                    None if !planned.insert(item.1) => {}
                    None if stored.contains(&item.1) => {}
                    None if is_needed => now.push(item),
                    None => ahead.push(item),
                }
            }
            for (todo, wait) in [(now, true), (ahead, false)] {
                for run in group_runs(&todo) {
                    let items: Vec<_> = todo[run].to_vec();
                    let me = self.clone();
                    let file = f.clone();
                    let leaves: Vec<Hash> = items.iter().map(|(_, h, _)| *h).collect();
                    let slot = if wait { None } else { Some(self.slots.clone()) };
                    let handle = tokio::spawn(async move { me.fetch_run(file, items, keep_decoded, slot).await });
                    let shared = async move { handle.await.unwrap_or_else(|_| Arc::new(RunOutcome::default())) }
                        .boxed()
                        .shared();
                    for h in leaves {
                        inflight.insert(h, shared.clone());
                    }
                    if wait {
                        waits.push(shared);
                    }
                }
            }
        }
        let outcomes = futures::future::join_all(waits).await;
        if outcomes.iter().all(|o| o.failed.is_empty()) {
            return Ok(());
        }
        for leaf in &needed_leaves {
            if let Some(e) = outcomes.iter().find_map(|o| o.failed.get(leaf)) {
                return Err(e.clone());
            }
        }
        Ok(())
    }

    /// One ranged GET for blocks lying back to back in one object; verify, store, report. With
    /// `slot`, the request waits for a slot of it first (readahead).
    pub(super) async fn fetch_run(
        self: Arc<Self>,
        f: FileRef,
        items: Vec<(u64, Hash, BlockRecord)>,
        keep_decoded: bool,
        slot: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Arc<RunOutcome> {
        let _permit = match &slot {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let first = items[0].2;
        let end = items.last().unwrap().2.range().end;
        let key = layout::object(&self.digest(first.object));
        let found = self.nearby.get(first.object, &(first.offset..end)).map(Ok);
        let fetched = match found {
            Some(found) => found,
            None => get_counted(&self.mirrors, &self.stats, &key, first.offset..end).await,
        };
        self.fit_slots();
        let outcome = match fetched {
            Err(failure) => {
                let mut outcome = RunOutcome::default();
                for (_, h, _) in &items {
                    outcome.failed.insert(*h, failure.clone());
                }
                outcome
            }
            Ok((bytes, mirror)) => {
                let purpose = if keep_decoded { Purpose::Read } else { Purpose::Prefetch };
                self.accept_off_thread(&f, items.clone(), bytes, first.offset, mirror, purpose, slot.is_none()).await
            }
        };
        let mut inflight = self.inflight.lock();
        for (_, h, _) in &items {
            inflight.remove(h);
        }
        Arc::new(outcome)
    }
}

/// One ranged GET from the mirrors, counted in `stats`: bytes and latency, or a failure.
pub(crate) async fn get_counted(
    mirrors: &Mirrors,
    stats: &Stats,
    key: &str,
    range: Range<u64>,
) -> Result<(bytes::Bytes, usize), ReadFailure> {
    let t = Instant::now();
    match mirrors.get_range(key, range).await {
        Ok((bytes, mirror)) => {
            stats.fetched(bytes.len() as u64, t.elapsed());
            Ok((bytes, mirror))
        }
        Err(e) => {
            Stats::add(&stats.fetch_failures, 1);
            Err(ReadFailure { cause: FailCause::Source, message: e.to_string() })
        }
    }
}
