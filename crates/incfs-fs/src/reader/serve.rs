//! Serve: a read answered from what is local (staged blocks, the store, a plain copy, zeros),
//! or what it needs ([`Need`]). Synchronous: no network, no runtime.

use super::*;

impl Reader {
    /// Block `i` of `f` from its plain copy, if there is one and the block matches `leaf`.
    pub(super) fn plain_block(&self, f: &FileRef, i: u64, leaf: &Hash) -> Option<Block> {
        let dir = self.plain_dir.get()?;
        let file = {
            let mut open = self.plain_open.lock();
            match open.as_ref() {
                Some((k, file)) if *k == f.key => file.clone(),
                _ => {
                    let file = Arc::new(std::fs::File::open(dir.join(hex::encode(f.key))).ok()?);
                    *open = Some((f.key, file.clone()));
                    file
                }
            }
        };
        let bs = BLOCK_SIZE as u64;
        let len = f.data.size.checked_sub(i * bs)?.min(bs) as usize;
        let mut buf = [0u8; BLOCK_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf[..len], i * bs).ok()?;
        if hash_data_block(&buf) != *leaf {
            tracing::warn!("{}: block {i} of its plain copy does not match; fetching it", f.label);
            *self.plain_open.lock() = None;
            return None;
        }
        let b: Arc<[u8; BLOCK_SIZE]> = Arc::new(buf);
        self.verified.insert(*leaf, b.clone());
        Some(Block::Shared(b))
    }

    /// A stored block, decoded and verified; a damaged one is removed and reported absent.
    pub(super) fn stored_block(&self, leaf: &Hash) -> Result<Option<Block>, Local> {
        if let Some(b) = self.staged.lock().take(leaf) {
            return Ok(Some(Block::Owned(b)));
        }
        if let Some(b) = self.verified.get(leaf) {
            return Ok(Some(Block::Shared(b)));
        }
        let Some((codec, data)) = self.store.get_block(leaf).map_err(|e| fail(FailCause::Other, e.to_string()))? else {
            return Ok(None);
        };
        let rec = BlockRecord { object: 0, codec, len: data.len() as u16, offset: 0 };
        match verify_block(&rec, &data, leaf) {
            Ok(b) => {
                let b: Arc<[u8; BLOCK_SIZE]> = Arc::from(b);
                self.verified.insert(*leaf, b.clone());
                Ok(Some(Block::Shared(b)))
            }
            Err(e) => {
                tracing::error!("local store block {} is damaged ({e}); dropping it", hex::encode(leaf));
                Stats::add(&self.stats.blocks_bad, 1);
                let _ = self.store.remove_block(leaf);
                Ok(None)
            }
        }
    }

    /// Serve bytes `offset..offset+size` of `f` from local data only.
    pub fn read_local(&self, f: &FileRef, offset: u64, size: u32) -> Result<Served, Local> {
        let end = (offset + size as u64).min(f.data.size);
        if offset >= end {
            return Ok(Served::default());
        }
        let geo = Geometry::new(f.data.size);
        let bs = BLOCK_SIZE as u64;
        let mut out = Served::default();
        let mut missing = Vec::new();
        let mut found = Vec::new();
        let (first, last) = (offset / bs, (end - 1) / bs);
        // One look at presence and one hash block per 128 blocks, not one per block.
        let present_mask = self.presence.mask(&f.key, first..last + 1);
        let mut memo = None;
        for i in first..=last {
            let leaf = self.leaf_in(f, &geo, i, &mut memo)?;
            let from = offset.max(i * bs) - i * bs;
            let to = end.min((i + 1) * bs) - i * bs;
            if leaf == self.zero_hash {
                out.push_zeros((to - from) as usize);
                found.push(i);
                continue;
            }
            // Presence is a hint that saves a store lookup for a block surely absent (a block
            // stored for another file with the same content is found by `plan`, which asks the
            // store, and then marked present here too).
            let present = present_mask[(i - first) as usize];
            if present && !missing.is_empty() {
                found.push(i); // not served this time: not read (nor taken from `staged`)
                continue;
            }
            let block = match present {
                true => match self.stored_block(&leaf)? {
                    Some(b) => Some(b),
                    None => self.plain_block(f, i, &leaf),
                },
                // Not stored: served from memory once (a full cache), or verified lately.
                false => match self.staged.lock().take(&leaf) {
                    Some(b) => Some(Block::Owned(b)),
                    None => self.verified.get(&leaf).map(Block::Shared),
                },
            };
            match block {
                Some(block) if missing.is_empty() => {
                    out.push_block(block, from as usize..to as usize);
                    found.push(i);
                }
                Some(_) => found.push(i),
                None => missing.push(i),
            }
        }
        if found.iter().any(|&i| !present_mask[(i - first) as usize]) {
            self.persist_presence(&f.key, found);
        }
        if missing.is_empty() {
            Ok(out)
        } else {
            Err(Local::Need(Need::Blocks(missing)))
        }
    }
}
