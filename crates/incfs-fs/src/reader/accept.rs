//! Verify and store: every block of a fetched run (or filled from outside) hashed against its
//! leaf before anything else; good ones stored in one write, staged for the reader about to
//! read them; bad ones counted, logged, and their mirror blamed.

use incfs_format::codec::decode_block;
use incfs_verity::hash_data_blocks;

use super::*;

impl Reader {
    /// Accept block `block` of `f` from outside: `stored` is its payload encoded with `codec`
    /// (format section 2.1). Verified against the file's tree (fetching tree pieces from the
    /// sources if needed) before it is stored; waiting reads wake either way, and those waiting
    /// for a block filled wrong fail with a verification error.
    pub async fn fill(&self, f: &FileRef, block: u64, codec: Codec, stored: &[u8]) -> Result<(), FillError> {
        if block >= incfs_verity::block_count(f.data.size) {
            return Err(FillError::OutOfRange(f.label.clone(), block));
        }
        let geo = Geometry::new(f.data.size);
        let leaf = loop {
            match self.leaf(f, &geo, block) {
                Ok(h) => break h,
                Err(Local::Need(Need::Meta { chunk })) => {
                    self.fetch_meta(f, chunk).await.map_err(|e| FillError::Read(e.message))?
                }
                Err(Local::Need(Need::Blocks(_))) => unreachable!("a leaf needs no data blocks"),
                Err(Local::Fail(e)) => return Err(FillError::Read(e.message)),
            }
        };
        let len = u16::try_from(stored.len()).ok().filter(|&n| n as usize <= BLOCK_SIZE);
        let rec = BlockRecord { object: 0, codec, len: len.unwrap_or(0), offset: 0 };
        let checked = match len {
            None => Err(format!("{} stored bytes, more than a block", stored.len())),
            Some(_) => verify_block(&rec, stored, &leaf).map_err(|e| e.to_string()),
        };
        let result = match checked {
            Ok(decoded) => {
                let new = NewBlock { hash: leaf, codec, data: stored };
                let stored_ok = leaf == self.zero_hash || self.store_blocks(&f.key, &[new], vec![block]).is_ok();
                if stored_ok {
                    self.verified.insert(leaf, Arc::from(decoded));
                    self.bad_fills.lock().remove(&(f.key, block));
                    Stats::add(&self.stats.blocks_filled, 1);
                    Ok(())
                } else {
                    Err(FillError::Read(format!("{}: block {block}: cannot store it", f.label)))
                }
            }
            Err(e) => {
                Stats::add(&self.stats.blocks_bad, 1);
                Stats::add(&self.stats.fills_rejected, 1);
                tracing::error!("{}: filled block {block} failed verification ({e}); not stored", f.label);
                let failure = ReadFailure {
                    cause: FailCause::Verification,
                    message: format!("{}: block {block} as filled: {e}", f.label),
                };
                let at = *self.filled.borrow() + 1;
                let bad = BadFill { at, when: Instant::now(), failure };
                self.bad_fills.lock().insert((f.key, block), bad);
                Err(FillError::Verification(f.label.clone(), block, e))
            }
        };
        self.filled.send_modify(|n| *n += 1);
        result
    }

    /// A fill after fill count `since`, or just before, got one of `blocks` of `f` wrong.
    pub(super) fn bad_fill(&self, f: &FileRef, blocks: &[u64], since: u64) -> Option<ReadFailure> {
        let bad = self.bad_fills.lock();
        blocks.iter().find_map(|b| {
            let b = bad.get(&(f.key, *b))?;
            (b.at > since || b.when.elapsed() < FAILURE_MEMORY).then(|| b.failure.clone())
        })
    }

    pub(super) fn persist_presence(&self, key: &FileKey, blocks: Vec<u64>) {
        if let Err(e) = self.store_blocks(key, &[], blocks) {
            tracing::warn!("cannot record block presence: {e}");
        }
    }

    /// Store verified blocks and mark `present` blocks of `key`: one data write and one journal
    /// write.
    pub(super) fn store_blocks(
        &self,
        key: &FileKey,
        blocks: &[NewBlock<'_>],
        present: Vec<u64>,
    ) -> Result<(), incfs_store::StoreError> {
        self.store_marking(key, present, blocks.is_empty(), |new| self.store.put_blocks(blocks, Some((key, new))))
    }

    /// Store the verified blocks of a fetched run (`blocks` are ranges of `bytes`, written as
    /// they are) and mark `present` blocks of `key`.
    pub(super) fn store_run(
        &self,
        key: &FileKey,
        bytes: &[u8],
        blocks: &[(Hash, Codec, Range<usize>)],
        present: Vec<u64>,
        purpose: Purpose,
    ) -> Result<(), incfs_store::StoreError> {
        // Background completion never evicts (it stops at the limit); reads and prefetching do.
        let evict = purpose != Purpose::Complete;
        // A run a reader waits on goes through the page cache (the reader is not held to the
        // disk's write speed); background work is written direct (see `incfs_store::Via`).
        let via = match purpose {
            Purpose::Read => incfs_store::Via::PageCache,
            Purpose::Prefetch | Purpose::Complete => incfs_store::Via::Direct,
        };
        self.store_marking(key, present, blocks.is_empty(), |new| {
            self.store.put_run(bytes, blocks, Some((key, new)), evict, via)
        })
    }

    /// Call `put` with the blocks of `present` not marked yet (sorted), then mark them: persisted
    /// first, so memory never claims more than the store holds. Nothing to store and nothing new
    /// to mark: no write at all.
    pub(super) fn store_marking(
        &self,
        key: &FileKey,
        present: Vec<u64>,
        no_blocks: bool,
        put: impl FnOnce(&[u64]) -> Result<(), incfs_store::StoreError>,
    ) -> Result<(), incfs_store::StoreError> {
        let mut new: Vec<u64> = present.into_iter().filter(|&i| !self.presence.is_present(key, i)).collect();
        new.sort_unstable();
        new.dedup();
        if no_blocks && new.is_empty() {
            return Ok(());
        }
        put(&new)?;
        self.presence.mark(key, new);
        Ok(())
    }

    /// [`Reader::accept`] on the blocking pool: decoding, hashing and storing are CPU and disk
    /// work, kept off the async workers. Readahead runs take their turn on the cores
    /// ([`Reader::cpu`]); others (`urgent`: a run a read waits for itself, and background
    /// work, bounded by its own count of jobs) go at once.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn accept_off_thread(
        self: &Arc<Self>,
        f: &FileRef,
        items: Vec<(u64, Hash, BlockRecord)>,
        bytes: bytes::Bytes,
        base: u64,
        mirror: usize,
        purpose: Purpose,
        urgent: bool,
    ) -> RunOutcome {
        let (me, f) = (self.clone(), f.clone());
        let _turn = match urgent {
            true => None,
            false => self.cpu.clone().acquire_owned().await.ok(),
        };
        tokio::task::spawn_blocking(move || me.accept(&f, &items, &bytes, base, mirror, purpose))
            .await
            .unwrap_or_default()
    }

    /// Keep a run's verified blocks for the reader about to read them: each is a view of the
    /// response `body` (blocks stored raw) or of the run's decoded buffer `run`.
    pub(super) fn stage(&self, body: &bytes::Bytes, run: Vec<u8>, decoded: Vec<(Hash, Place)>) {
        let run = bytes::Bytes::from(run);
        let mut staged = self.staged.lock();
        for (leaf, place) in decoded {
            let block = match place {
                Place::Body(at) => RunBlock { buf: body.clone(), at },
                Place::Run(at) => RunBlock { buf: run.clone(), at },
            };
            staged.put(leaf, block);
        }
    }

    /// Verify blocks `items` of `f` out of `bytes` (which start at object offset `base`, as
    /// served by mirror `mirror`), store the good ones and report the bad. For a read, also keep
    /// them in memory for the reader about to read them (not for background fetching).
    pub(crate) fn accept(
        &self,
        f: &FileRef,
        items: &[(u64, Hash, BlockRecord)],
        bytes: &bytes::Bytes,
        base: u64,
        mirror: usize,
        purpose: Purpose,
    ) -> RunOutcome {
        let keep_decoded = purpose == Purpose::Read;
        let mut outcome = RunOutcome::default();
        let mut good = Vec::new();
        // Where each good block's decoded bytes lie: in the response itself (a whole block
        // stored raw: hashed and served where it is), or at this offset of `run`.
        let mut decoded: Vec<(Hash, Place)> = Vec::new();
        let in_place = |r: &BlockRecord| r.codec == Codec::Raw && r.len as usize == BLOCK_SIZE;
        // Other blocks are decoded for a reader into one buffer for the run; otherwise into a
        // scratch buffer of one batch, reused (no larger than the run: a small file's blocks
        // need a few KiB, not a fresh mapping of 256 KiB).
        let decodes = if keep_decoded { items.iter().filter(|(_, _, r)| !in_place(r)).count() } else { 0 };
        let mut run = vec![0u8; decodes * BLOCK_SIZE];
        let scratch_blocks = if keep_decoded { 0 } else { items.len().min(VERIFY_BATCH) };
        let mut scratch = vec![0u8; scratch_blocks * BLOCK_SIZE];
        let mut next = 0;
        let mut lied = false;
        // In batches: decoded first, then hashed together (several SHA-256 streams at once).
        for batch in items.chunks(VERIFY_BATCH) {
            let mut checked: Vec<Result<Place, incfs_fetch::image::BlockFault>> = Vec::with_capacity(batch.len());
            for (k, (_, _, r)) in batch.iter().enumerate() {
                let at = (r.offset - base) as usize;
                let stored = &bytes[at..at + r.len as usize];
                checked.push(if in_place(r) {
                    Ok(Place::Body(at))
                } else {
                    let (buf, slot) = match keep_decoded {
                        true => (&mut run, next),
                        false => (&mut scratch, k),
                    };
                    let out: &mut [u8; BLOCK_SIZE] =
                        (&mut buf[slot * BLOCK_SIZE..][..BLOCK_SIZE]).try_into().expect("a whole block");
                    next += keep_decoded as usize;
                    match decode_block(r.codec, stored, out) {
                        Ok(()) => Ok(Place::Run(slot * BLOCK_SIZE)),
                        Err(e) => Err(incfs_fetch::image::BlockFault::Decode(e.to_string())),
                    }
                });
            }
            let data = |place: &Place| -> &[u8] {
                match *place {
                    Place::Body(at) => &bytes[at..at + BLOCK_SIZE],
                    Place::Run(at) if keep_decoded => &run[at..at + BLOCK_SIZE],
                    Place::Run(at) => &scratch[at..at + BLOCK_SIZE],
                }
            };
            let blocks: Vec<&[u8]> = checked.iter().filter_map(|c| c.as_ref().ok()).map(data).collect();
            let mut hashes = vec![[0u8; HASH_SIZE]; blocks.len()];
            hash_data_blocks(&blocks, &mut hashes);
            let mut hashes = hashes.into_iter();
            for ((i, leaf, r), checked) in batch.iter().zip(checked) {
                let at = (r.offset - base) as usize;
                let checked = checked.and_then(|place| match hashes.next() == Some(*leaf) {
                    true => Ok(place),
                    false => Err(incfs_fetch::image::BlockFault::Mismatch),
                });
                match checked {
                    Ok(place) => {
                        if keep_decoded {
                            decoded.push((*leaf, place));
                        }
                        good.push((*i, (*leaf, r.codec, at..at + r.len as usize)))
                    }
                    Err(e) => {
                        Stats::add(&self.stats.blocks_bad, 1);
                        tracing::error!(
                            "{}: block {i} from {} failed verification ({e}); not stored",
                            f.label,
                            self.mirrors.sources()[mirror].name()
                        );
                        lied = true;
                        // The block's record (where it lies, its codec) came from the same kind of
                        // untrusted bytes: forget its piece, so the next try reads it afresh rather
                        // than asking for the wrong bytes again.
                        let at = FileMetaLayout::new(f.data.size).record_offset(*i);
                        self.drop_meta(f, at..at + BLOCK_RECORD_SIZE as u64);
                        outcome.failed.insert(
                            *leaf,
                            ReadFailure {
                                cause: FailCause::Verification,
                                message: format!("{}: block {i}: {e}", f.label),
                            },
                        );
                    }
                }
            }
        }
        match lied {
            true => self.mirrors.lied(mirror),
            false => self.mirrors.vouch(mirror),
        }
        let present: Vec<u64> = good.iter().map(|(i, _)| *i).collect();
        let blocks: Vec<(Hash, Codec, Range<usize>)> = good.into_iter().map(|(_, b)| b).collect();
        match self.store_run(&f.key, bytes, &blocks, present, purpose) {
            Ok(()) => {
                Stats::add(&self.stats.blocks_fetched, blocks.len() as u64);
                // Only once written: a block served is a block kept, even if killed now.
                if keep_decoded {
                    self.stage(bytes, run, decoded);
                }
            }
            Err(e @ incfs_store::StoreError::Full { .. }) if keep_decoded => {
                // Nothing left to evict (all pinned, or in use): the read is still served, from
                // memory, and the blocks are not kept.
                tracing::debug!("{}: blocks served without being stored: {e}", f.label);
                Stats::add(&self.stats.blocks_fetched, blocks.len() as u64);
                self.stage(bytes, run, decoded);
            }
            Err(e) => {
                tracing::error!("cannot store blocks: {e}");
                for (hash, _, _) in &blocks {
                    outcome.failed.insert(*hash, ReadFailure { cause: FailCause::Other, message: e.to_string() });
                }
            }
        }
        outcome
    }
}

/// Blocks of a run decoded, then hashed together: enough to fill every stream of the batch
/// hasher, few enough that a scratch buffer for them stays small (256 KiB).
const VERIFY_BATCH: usize = 64;

/// Where a verified block of a fetched run lies: at this offset of the response body (stored
/// raw, so its bytes are its data), or of the run's buffer of decoded blocks.
pub(super) enum Place {
    Body(usize),
    Run(usize),
}

/// Blocks verified and decoded ahead of their read, oldest pushed out first.
#[derive(Default)]
pub(super) struct Staged {
    blocks: HashMap<Hash, RunBlock, rustc_hash::FxBuildHasher>,
    order: std::collections::VecDeque<Hash>,
}

impl Staged {
    pub(super) fn put(&mut self, leaf: Hash, block: RunBlock) {
        if self.blocks.insert(leaf, block).is_none() {
            self.order.push_back(leaf);
        }
        while self.blocks.len() > STAGED_MAX {
            match self.order.pop_front() {
                Some(old) => {
                    self.blocks.remove(&old);
                }
                None => break,
            }
        }
        // Taken entries leave stale names behind: drop them once they dominate.
        if self.order.len() > 2 * STAGED_MAX {
            let blocks = &self.blocks;
            self.order.retain(|h| blocks.contains_key(h));
        }
    }

    pub(super) fn take(&mut self, leaf: &Hash) -> Option<RunBlock> {
        self.blocks.remove(leaf)
    }

    pub(super) fn len(&self) -> usize {
        self.blocks.len()
    }
}
