//! Metadata: the pieces of a file's Merkle tree and block records, local (memory, store, a
//! compact map rebuilt) or fetched (single flight per piece), and the leaf hash and record of a
//! block, each hash block checked against its parent up to the signed root.

use super::*;

impl Reader {
    /// The file's metadata region: (object, offset, length).
    pub fn meta_region(&self, f: &FileRef) -> Option<(u32, u64, u64)> {
        f.data.meta.map(|_| self.region(f))
    }

    /// Every leaf hash of `f` (its Merkle tree must be local).
    pub(crate) fn leaves(&self, f: &FileRef) -> Result<Vec<Hash>, Local> {
        let geo = Geometry::new(f.data.size);
        let mut memo = None;
        (0..incfs_verity::block_count(f.data.size)).map(|i| self.leaf_in(f, &geo, i, &mut memo)).collect()
    }

    /// The store keys of `f`'s metadata pieces (object digest, region offset, piece); none for a
    /// pushed file (its tree is kept apart).
    pub(crate) fn meta_keys(&self, f: &FileRef) -> Vec<(Hash, u64, u64)> {
        let Some((object, offset, len)) = self.meta_region(f) else { return Vec::new() };
        if object == PUSHED_OBJECT {
            return Vec::new();
        }
        let digest = self.digest(object);
        (0..len.div_ceil(META_CHUNK)).map(|c| (digest, offset, c)).collect()
    }

    pub(super) fn region(&self, f: &FileRef) -> (u32, u64, u64) {
        let m = f.data.meta.expect("non-empty files have a metadata region");
        // validate() guaranteed the region fits in its object.
        (m.object, m.offset, m.stored_len(f.data.size).unwrap())
    }

    pub(super) fn meta_chunk_local(&self, f: &FileRef, chunk: u64) -> Result<Option<Arc<Vec<u8>>>, Local> {
        let (object, offset, _) = self.region(f);
        if object == PUSHED_OBJECT {
            // Only its tree is kept (the block map is of no use without a source).
            let tree = self.pushed.read().get(offset as usize).cloned();
            let start = (chunk * META_CHUNK) as usize;
            return match tree {
                Some(t) if start < t.len() => {
                    Ok(Some(Arc::new(t[start..t.len().min(start + META_CHUNK as usize)].to_vec())))
                }
                _ => Err(fail(FailCause::Other, format!("{}: pushed file without its tree", f.label))),
            };
        }
        if f.data.has_compact_map() {
            return self.compact_chunk(f, chunk);
        }
        self.stored_piece(object, offset, chunk)
    }

    /// Piece `chunk` of the region at `offset` of `object` as stored (memory, then the store).
    pub(super) fn stored_piece(&self, object: u32, offset: u64, chunk: u64) -> Result<Option<Arc<Vec<u8>>>, Local> {
        if let Some(c) = self.meta.get(&(object, offset, chunk)) {
            return Ok(Some(c));
        }
        let digest = self.digest(object);
        match self.store.get_meta(&digest, offset, chunk) {
            Ok(Some(bytes)) => {
                let c = Arc::new(bytes);
                self.meta.insert((object, offset, chunk), c.clone());
                Ok(Some(c))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(fail(FailCause::Other, e.to_string())),
        }
    }

    /// Piece `chunk` of the dense region of a file stored as a compact map, rebuilt from the
    /// map (the map itself is fetched and stored whole, as its one piece group).
    pub(super) fn compact_chunk(&self, f: &FileRef, chunk: u64) -> Result<Option<Arc<Vec<u8>>>, Local> {
        let (object, offset, _) = self.region(f);
        if let Some(c) = self.compact_dense.get(&(object, offset, chunk)) {
            return Ok(Some(c));
        }
        let Some(map) = self.compact_map(f)? else { return Ok(None) };
        let dense = FileMetaLayout::new(f.data.size).len().unwrap_or(0);
        let start = chunk * META_CHUNK;
        if start >= dense {
            return Err(fail(FailCause::Other, format!("{}: metadata piece {chunk} is past its end", f.label)));
        }
        let c = Arc::new(map.dense(start..dense.min(start + META_CHUNK)));
        self.compact_dense.insert((object, offset, chunk), c.clone());
        Ok(Some(c))
    }

    /// The decoded compact map of `f`, if its bytes are local; one that does not give the
    /// signed root is dropped (and its mirror blamed) so that it is fetched again.
    pub(super) fn compact_map(&self, f: &FileRef) -> Result<Option<Arc<CompactMap>>, Local> {
        let (object, offset, len) = self.region(f);
        if let Some(m) = self.compacts.get(&(object, offset)) {
            return Ok(Some(m));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        for chunk in 0..len.div_ceil(META_CHUNK) {
            match self.stored_piece(object, offset, chunk)? {
                Some(piece) => bytes.extend_from_slice(&piece),
                None => return Ok(None),
            }
        }
        let problem = match CompactMap::decode(f.data.size, &bytes) {
            Ok(map) if map.root() == &f.data.root_hash => {
                let map = Arc::new(map);
                self.compacts.insert((object, offset), map.clone());
                return Ok(Some(map));
            }
            Ok(_) => "does not match the signed root hash".to_string(),
            Err(e) => e.to_string(),
        };
        self.drop_meta(f, 0..1);
        Stats::add(&self.stats.blocks_bad, 1);
        tracing::error!("{}: compact block map failed verification: {problem}", f.label);
        Err(fail(FailCause::Verification, format!("{}: compact block map failed verification", f.label)))
    }

    /// Bytes `range` of the file's metadata region, from memory or the store.
    pub(super) fn meta_local(&self, f: &FileRef, range: Range<u64>) -> Result<Vec<u8>, Local> {
        let mut out = vec![0; (range.end - range.start) as usize];
        self.meta_local_into(f, range, &mut out)?;
        Ok(out)
    }

    /// [`Reader::meta_local`] into `out` (`range`'s length): no allocation, for the block
    /// record every planned block reads.
    pub(super) fn meta_local_into(&self, f: &FileRef, range: Range<u64>, out: &mut [u8]) -> Result<(), Local> {
        if range.is_empty() {
            return Ok(());
        }
        let mut at = 0;
        for chunk in range.start / META_CHUNK..=(range.end - 1) / META_CHUNK {
            let Some(bytes) = self.meta_chunk_local(f, chunk)? else {
                return Err(Local::Need(Need::Meta { chunk }));
            };
            let base = chunk * META_CHUNK;
            let from = range.start.max(base) - base;
            let to = range.end.min(base + bytes.len() as u64) - base;
            if from > to || to > bytes.len() as u64 {
                return Err(fail(FailCause::Other, "cached metadata piece is too short"));
            }
            let piece = &bytes[from as usize..to as usize];
            out[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        if at != out.len() {
            return Err(fail(FailCause::Other, "cached metadata piece is too short"));
        }
        Ok(())
    }

    /// Forget a cached metadata piece that produced a hash mismatch, so it is fetched again.
    pub(super) fn drop_meta(&self, f: &FileRef, range: Range<u64>) {
        let (object, offset, _) = self.region(f);
        if object == PUSHED_OBJECT {
            return; // checked whole when pushed; nothing fetched to drop
        }
        let digest = self.digest(object);
        let mut liars = Vec::new();
        // A compact map is one answer: all of it goes, and what was rebuilt from it.
        let chunks = match f.data.has_compact_map() {
            true => {
                self.compacts.remove(&(object, offset));
                self.compact_dense.retain(|k, _| (k.0, k.1) != (object, offset));
                0..self.region(f).2.div_ceil(META_CHUNK)
            }
            false => range.start / META_CHUNK..(range.end.max(1) - 1) / META_CHUNK + 1,
        };
        for chunk in chunks {
            self.meta.remove(&(object, offset, chunk));
            let _ = self.store.remove_meta(&digest, offset, chunk);
            liars.extend(self.meta_from.lock().remove(&(object, offset, chunk)));
        }
        liars.sort_unstable();
        liars.dedup();
        for m in liars {
            self.mirrors.lied(m);
        }
        // Neighbours' bytes from the same answer are as suspect: the next try asks a source.
        self.nearby.forget(object);
    }

    /// Hash block `index` of `level`, checked up to the root.
    pub(super) fn hash_block(
        &self,
        f: &FileRef,
        geo: &Geometry,
        level: usize,
        index: u64,
    ) -> Result<Arc<Vec<Hash>>, Local> {
        let key = (f.key, level as u8, index);
        if let Some(h) = self.hashes.get(&key) {
            return Ok(h);
        }
        let range = geo.hash_block_range(level, index);
        let bytes = self.meta_local(f, range.clone())?;
        let hashes: Vec<Hash> = bytes.chunks_exact(HASH_SIZE).map(|c| c.try_into().unwrap()).collect();
        let expected = if level + 1 == geo.levels().len() {
            f.data.root_hash
        } else {
            let parent = self.hash_block(f, geo, level + 1, index / HASHES_PER_BLOCK as u64)?;
            parent[(index % HASHES_PER_BLOCK as u64) as usize]
        };
        if !check_hash_block(&hashes, &expected) {
            self.drop_meta(f, range);
            Stats::add(&self.stats.blocks_bad, 1);
            tracing::error!("{}: Merkle tree level {level} block {index} failed verification", f.label);
            return Err(fail(FailCause::Verification, format!("{}: hash block failed verification", f.label)));
        }
        let h = Arc::new(hashes);
        self.hashes.insert(key, h.clone());
        Ok(h)
    }

    /// The verified leaf hash of data block `i`.
    pub(super) fn leaf(&self, f: &FileRef, geo: &Geometry, i: u64) -> Result<Hash, Local> {
        self.leaf_in(f, geo, i, &mut None)
    }

    /// [`Reader::leaf`] for a walk over consecutive blocks: `memo` keeps the level-0 hash
    /// block last used, so it is looked up once per 128 blocks, not once per block.
    pub(super) fn leaf_in(
        &self,
        f: &FileRef,
        geo: &Geometry,
        i: u64,
        memo: &mut Option<(u64, Arc<Vec<Hash>>)>,
    ) -> Result<Hash, Local> {
        if geo.data_blocks() == 1 {
            return Ok(f.data.root_hash);
        }
        let index = i / HASHES_PER_BLOCK as u64;
        let hashes = match memo {
            Some((at, h)) if *at == index => h,
            _ => &mut memo.insert((index, self.hash_block(f, geo, 0, index)?)).1,
        };
        Ok(hashes[(i % HASHES_PER_BLOCK as u64) as usize])
    }

    /// The records of blocks `blocks` (ascending) of `f`, checked against the object table.
    /// Consecutive blocks' records lie back to back: each such run is read with one metadata
    /// lookup, not one per block (a cold read plans thousands of blocks at a time).
    pub(super) fn records(&self, f: &FileRef, blocks: &[u64]) -> Result<Vec<BlockRecord>, Local> {
        if Self::is_pushed(f) {
            return Err(fail(FailCause::Other, format!("{}: a pushed file's blocks come only from fills", f.label)));
        }
        let layout = FileMetaLayout::new(f.data.size);
        let objects = self.objects.read().clone();
        let mut out = Vec::with_capacity(blocks.len());
        let mut bytes = Vec::new();
        let mut k = 0;
        while k < blocks.len() {
            let mut end = k + 1;
            while end < blocks.len() && blocks[end] == blocks[end - 1] + 1 {
                end += 1;
            }
            let at = layout.record_offset(blocks[k]);
            bytes.resize((end - k) * BLOCK_RECORD_SIZE, 0);
            self.meta_local_into(f, at..at + bytes.len() as u64, &mut bytes)?;
            for (n, raw) in bytes.chunks_exact(BLOCK_RECORD_SIZE).enumerate() {
                let i = blocks[k + n];
                let bad = |what: String| {
                    // Unverified bytes from a server: forget the piece so it is fetched afresh.
                    let at = layout.record_offset(i);
                    self.drop_meta(f, at..at + BLOCK_RECORD_SIZE as u64);
                    fail(FailCause::Verification, format!("{}: block {i}: {what}", f.label))
                };
                let r = BlockRecord::decode(raw.try_into().expect("chunks of a record's size"))
                    .map_err(|e| bad(format!("bad block record: {e}")))?;
                if r.codec != Codec::Zero {
                    let size = objects.get(r.object as usize).map(|o| o.size);
                    if size.is_none_or(|s| r.range().end > s) {
                        return Err(bad("record points outside the image".into()));
                    }
                }
                out.push(r);
            }
            k = end;
        }
        Ok(out)
    }

    /// Cache a whole metadata region fetched along with other bytes (unverified, as any piece:
    /// each hash block is checked against its parent when used).
    pub(crate) fn put_meta_region(&self, f: &FileRef, region: &[u8], mirror: usize) {
        let (object, offset, len) = self.region(f);
        if region.len() as u64 != len || object == PUSHED_OBJECT {
            return;
        }
        let digest = self.digest(object);
        for (chunk, piece) in region.chunks(META_CHUNK as usize).enumerate() {
            let chunk = chunk as u64;
            if self.meta.get(&(object, offset, chunk)).is_some() {
                continue; // the cached piece came from elsewhere: not this mirror's to answer for
            }
            remember_mirror(&self.meta_from, (object, offset, chunk), mirror);
            if let Err(e) = self.store.put_meta(&digest, offset, chunk, piece) {
                tracing::warn!("cannot cache metadata: {e}");
            }
            self.meta.insert((object, offset, chunk), Arc::new(piece.to_vec()));
        }
    }

    /// Join the metadata (or span) flight `key`, or start it with `fetch`, unless `local()`
    /// says its data is cached already. Looked at under the lock, and a flight leaves the map
    /// only once it has cached its data (or failed): a piece is always either cached or in
    /// flight, so concurrent readers cause one request. `None`: nothing to wait for.
    pub(super) fn meta_flight(
        &self,
        key: (u32, u64, u64),
        local: impl FnOnce() -> bool,
        fetch: impl FnOnce() -> BoxFuture<'static, Result<Arc<Vec<Arc<Vec<u8>>>>, ReadFailure>>,
    ) -> Option<SharedMeta> {
        let mut inflight = self.inflight_meta.lock();
        if let Some(s) = inflight.get(&key) {
            return Some(s.clone());
        }
        if local() {
            return None;
        }
        let (fetch, flights) = (fetch(), self.inflight_meta.clone());
        let shared = async move {
            let result = fetch.await;
            // Done (whoever polled it to the end): later callers find the data cached.
            flights.lock().remove(&key);
            result
        }
        .boxed()
        .shared();
        inflight.insert(key, shared.clone());
        Some(shared)
    }

    /// The pieces of `f`'s metadata region a read of block `i` uses (its hash block at every
    /// level of the tree, and its block record) that are not local. All are known from the
    /// file's size alone, so they can be fetched at once: one round trip, not one per level.
    pub(super) fn missing_meta_for(&self, f: &FileRef, i: u64) -> Vec<u64> {
        if Self::is_pushed(f) || f.data.meta.is_none() {
            return Vec::new();
        }
        let mut chunks = Vec::new();
        if f.data.has_compact_map() {
            chunks.push(0); // fetched whole, whichever piece is asked for
        } else {
            let geo = Geometry::new(f.data.size);
            if geo.data_blocks() > 1 {
                let mut index = i;
                for level in 0..geo.levels().len() {
                    index /= HASHES_PER_BLOCK as u64;
                    let r = geo.hash_block_range(level, index);
                    chunks.extend([r.start / META_CHUNK, (r.end - 1) / META_CHUNK]);
                }
            }
            let at = FileMetaLayout::new(f.data.size).record_offset(i);
            chunks.extend([at / META_CHUNK, (at + BLOCK_RECORD_SIZE as u64 - 1) / META_CHUNK]);
        }
        chunks.sort_unstable();
        chunks.dedup();
        chunks.retain(|&c| !matches!(self.meta_chunk_local(f, c), Ok(Some(_))));
        chunks
    }

    /// Make local every metadata piece a read of block `i` of `f` uses ([`Reader::missing_meta_for`]),
    /// and piece `also` if given: one request per group of pieces, all in flight together.
    pub(crate) async fn fetch_meta_for(&self, f: &FileRef, i: u64, also: Option<u64>) -> Result<(), ReadFailure> {
        let mut chunks = self.missing_meta_for(f, i);
        chunks.extend(also);
        chunks.sort_unstable();
        chunks.dedup_by_key(|c| *c / META_PIECES_PER_FETCH);
        let fetched = futures::future::join_all(chunks.iter().map(|&c| self.fetch_meta(f, c))).await;
        fetched.into_iter().collect()
    }

    /// Fetch the group of metadata pieces holding piece `chunk` of `f`'s region; concurrent
    /// callers for one group share one request.
    pub(crate) async fn fetch_meta(&self, f: &FileRef, chunk: u64) -> Result<(), ReadFailure> {
        let (object, offset, len) = self.region(f);
        if object == PUSHED_OBJECT {
            let message = format!("{}: pushed file without its tree", f.label);
            return Err(ReadFailure { cause: FailCause::Other, message });
        }
        // A compact map (at most one group long) is fetched whole, whichever piece was asked.
        let compact = f.data.has_compact_map();
        let group = if compact { 0 } else { chunk / META_PIECES_PER_FETCH };
        let key = (object, offset, group);
        let local = || matches!(self.meta_chunk_local(f, chunk), Ok(Some(_)));
        let shared = self.meta_flight(key, local, || {
            let digest = self.digest(object);
            let (mirrors, stats, store) = (self.mirrors.clone(), self.stats.clone(), self.store.clone());
            let meta_from = self.meta_from.clone();
            let first = group * META_PIECES_PER_FETCH;
            let start = offset + first * META_CHUNK;
            let end = offset + len.min((first + META_PIECES_PER_FETCH) * META_CHUNK);
            async move {
                let (bytes, mirror) = get_counted(&mirrors, &stats, &layout::object(&digest), start..end).await?;
                let pieces: Vec<Arc<Vec<u8>>> =
                    bytes.chunks(META_CHUNK as usize).map(|p| Arc::new(p.to_vec())).collect();
                for (k, piece) in pieces.iter().enumerate() {
                    remember_mirror(&meta_from, (object, offset, first + k as u64), mirror);
                    if let Err(e) = store.put_meta(&digest, offset, first + k as u64, piece) {
                        tracing::warn!("cannot cache metadata: {e}");
                    }
                }
                Ok(Arc::new(pieces))
            }
            .boxed()
        });
        let Some(shared) = shared else { return Ok(()) };
        let pieces = shared.await?;
        let first = group * META_PIECES_PER_FETCH;
        for (k, piece) in pieces.iter().enumerate() {
            self.meta.insert((object, offset, first + k as u64), piece.clone());
        }
        Ok(())
    }
}

/// Note that mirror `mirror` sent metadata piece `key` (see `Reader::meta_from`).
pub(super) fn remember_mirror(map: &MetaFrom, key: (u32, u64, u64), mirror: usize) {
    let mut map = map.lock();
    if map.len() >= META_FROM_MAX {
        map.clear();
    }
    map.insert(key, mirror);
}

/// Memory for decoded compact maps: a sparse file's map is a few KiB, the largest (16,383
/// runs) some MiB, and one is decoded again (hashing its levels) whenever it is not held.
pub(super) const COMPACT_MAPS_BYTES: u64 = 16 << 20;

/// Weighs a decoded compact map by its memory.
#[derive(Clone)]
pub(super) struct MapWeight;

impl quick_cache::Weighter<(u32, u64), Arc<CompactMap>> for MapWeight {
    fn weight(&self, _: &(u32, u64), map: &Arc<CompactMap>) -> u64 {
        map.memory_bytes().max(1)
    }
}
