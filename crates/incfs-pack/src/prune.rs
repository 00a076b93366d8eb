//! `incfs prune`: remove old versions from a repository, and the objects only they used.
//!
//! The newest versions asked for are kept whole. An object is removed only when no block record
//! and no metadata region of a kept version points into it; the object table of later versions
//! still lists it (tables are append-only, format section 3.2), but nothing a kept version reads
//! lies there, so readers of kept versions never ask for it. Manifests go first, objects after,
//! so a crash midway leaves at worst objects that a later prune removes.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::Path;

use incfs_format::manifest::InodeKind;
use incfs_format::{layout, Codec};

use crate::dedup::{read_manifest, read_records, versions};
use crate::{sync_dir, PackError};

/// What a prune removed (or would, with `dry_run`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    pub kept: Vec<u64>,
    pub removed_versions: Vec<u64>,
    pub removed_objects: u64,
    pub freed_bytes: u64,
}

/// Keep the newest `keep` versions of the repository at `repo` (at least one).
pub fn prune(repo: &Path, keep: usize, dry_run: bool) -> Result<PruneReport, PackError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    };
    let keep = keep.max(1);
    let lock_path = repo.join(".lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.try_lock().map_err(|_| PackError::Locked(repo.to_path_buf()))?;
    let all = versions(repo)?;
    let split = all.len().saturating_sub(keep);
    let (old, kept) = all.split_at(split);
    let mut report = PruneReport { kept: kept.to_vec(), removed_versions: old.to_vec(), ..Default::default() };
    let Some(&newest) = kept.last() else {
        return Ok(report);
    };
    let damaged = |reason: String| PackError::DamagedRepository { reason };
    let latest = read_manifest(repo, newest).map_err(damaged)?;

    // Every object a kept version reads from; any doubt stops the prune before it removes a thing.
    let mut used = HashSet::new();
    for &v in kept {
        let m = if v == newest { latest.clone() } else { read_manifest(repo, v).map_err(damaged)? };
        if !latest.objects.starts_with(&m.objects) {
            return Err(damaged(format!("version {v} does not share the newest version's object table")));
        }
        // Clients load every dictionary a manifest lists, used by its blocks or not.
        used.extend(m.dictionaries.iter().copied());
        for inode in &m.inodes {
            let InodeKind::File(f) = &inode.kind else { continue };
            let Some(meta) = f.meta else { continue };
            used.insert(meta.object);
            let records = read_records(repo, &m, f.size, meta).map_err(|e| damaged(format!("version {v}: {e}")))?;
            used.extend(records.iter().filter(|r| r.codec != Codec::Zero).map(|r| r.object));
        }
    }
    let unused: Vec<_> = (0..latest.objects.len() as u32)
        .filter(|i| !used.contains(i))
        .map(|i| repo.join(layout::object(&latest.objects[i as usize].digest)))
        .filter(|p| p.exists())
        .collect();
    report.removed_objects = unused.len() as u64;
    report.freed_bytes = unused.iter().filter_map(|p| fs::metadata(p).ok()).map(|m| m.len()).sum();
    if dry_run {
        return Ok(report);
    }
    for v in old {
        let p = repo.join(layout::version_manifest(*v));
        fs::remove_file(&p).map_err(io(&p))?;
    }
    sync_dir(&repo.join(layout::VERSIONS_DIR))?;
    for p in &unused {
        fs::remove_file(p).map_err(io(p))?;
    }
    sync_dir(&repo.join(layout::OBJECTS_DIR))?;
    drop(lock);
    Ok(report)
}
