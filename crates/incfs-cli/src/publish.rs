//! `incfs pack`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use incfs_pack::{pack as pack_tree, PackOptions};
use indicatif::HumanBytes;

use crate::keys::load_signing_key;
use crate::progress::Reporter;

/// Read and check an access profile for `incfs pack --profile`.
pub fn load_profile(path: Option<&Path>) -> Result<Option<incfs_format::profile::Profile>> {
    let Some(path) = path else { return Ok(None) };
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the profile {}", path.display()))?;
    let profile = incfs_format::profile::Profile::parse(&bytes).with_context(|| {
        format!("{} is not a usable profile (make one with incfs mount --record-profile)", path.display())
    })?;
    Ok(Some(profile))
}

/// `pack --expires WHEN`: a duration from `now` (like 30d) or an RFC 3339 UTC time; seconds
/// since the Unix epoch.
pub fn parse_expiry(when: &str, now: i64) -> Result<i64> {
    if let Ok(d) = humantime::parse_duration(when) {
        return Ok(now.saturating_add(d.as_secs().min(i64::MAX as u64) as i64));
    }
    let t = humantime::parse_rfc3339_weak(when).map_err(|_| {
        anyhow::anyhow!(
            "--expires {when:?}: give a time from now (like 30d, 12h) or a UTC date (like 2027-01-31T00:00:00Z)"
        )
    })?;
    let at = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if at <= now {
        anyhow::bail!("--expires {when:?} is in the past: the manifest would be refused at once");
    }
    Ok(at)
}

pub fn pack(src: &Path, repo: &Path, key: &Path, opts: &PackOptions, quiet: bool) -> Result<i32> {
    let key = load_signing_key(key)?;
    let started = Instant::now();
    let reporter = Reporter::new("packing", quiet);
    let result = pack_tree(src, repo, &key, opts, &reporter);
    reporter.finish();
    let s = result.with_context(|| format!("packing {} into {}", src.display(), repo.display()))?;
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let ratio = if s.new_block_bytes > 0 { s.new_block_stored as f64 / s.new_block_bytes as f64 } else { 1.0 };
    println!("packed {} version {} into {} with key {}", s.name, s.version, repo.display(), key.public_key().id_hex());
    if let Some(at) = opts.expires {
        println!("  expires:  {} (publish again before then)", incfs_fetch::image::format_time(at));
    }
    println!(
        "  entries: {} files, {} directories, {} symlinks, {} special, {} extra hard links{}",
        s.files,
        s.dirs,
        s.symlinks,
        s.specials,
        s.hard_links,
        if s.skipped > 0 { format!(", {} skipped (sockets)", s.skipped) } else { String::new() }
    );
    println!(
        "  bytes in: {} in {:.1}s ({}/s)",
        HumanBytes(s.bytes_in),
        secs,
        HumanBytes((s.bytes_in as f64 / secs) as u64)
    );
    println!(
        "  stored:   {} new ({} of new blocks compressed to {}, ratio {:.3}; {} objects; manifest {})",
        HumanBytes(s.bytes_stored),
        HumanBytes(s.new_block_bytes),
        HumanBytes(s.new_block_stored),
        ratio,
        s.objects_written,
        HumanBytes(s.manifest_bytes)
    );
    println!(
        "  saved:    {} by deduplication, {} of zero blocks not stored",
        HumanBytes(s.dedup_saved),
        HumanBytes(s.zero_bytes)
    );
    if let Some((id, size, new)) = s.dictionary {
        println!(
            "  dictionary: {} ({}), {}",
            id,
            HumanBytes(size),
            if new { "trained on this tree (clients fetch it once)" } else { "the repository's, reused" }
        );
    }
    Ok(0)
}

/// `incfs prune`.
pub fn prune(repo: &Path, keep: usize, dry_run: bool) -> Result<i32> {
    let r = incfs_pack::prune(repo, keep, dry_run)?;
    let list = |v: &[u64]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        }
    };
    let verb = if dry_run { "would remove" } else { "removed" };
    println!(
        "kept versions {}; {verb} versions {} and {} objects ({})",
        list(&r.kept),
        list(&r.removed_versions),
        r.removed_objects,
        indicatif::HumanBytes(r.freed_bytes)
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_expiry;

    #[test]
    fn expiry_is_a_duration_from_now_or_a_future_date() {
        assert_eq!(parse_expiry("30d", 1000).unwrap(), 1000 + 30 * 86400);
        assert_eq!(parse_expiry("2030-01-01T00:00:00Z", 1000).unwrap(), 1_893_456_000);
        assert!(parse_expiry("2001-01-01T00:00:00Z", 1_800_000_000).unwrap_err().to_string().contains("in the past"));
        assert!(parse_expiry("soon", 0).unwrap_err().to_string().contains("30d"));
    }
}
