//! `incfs cache ls|du|gc|rm|limit`: a cache directory's images and bytes, and cleaning it.

use std::path::Path;

use anyhow::Result;
use incfs_fs::cache;
use indicatif::HumanBytes;

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        100.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

pub fn ls(dir: &Path, json: bool) -> Result<i32> {
    let images = cache::list(dir)?;
    if json {
        println!("{}", serde_json::to_string(&images)?);
        return Ok(0);
    }
    if images.is_empty() {
        println!("{}: no image", dir.display());
    }
    println!("IMAGE                     VERSION   FILES       BYTES           PRESENT           PINNED  LAST USED");
    for i in images {
        println!(
            "{:<24} {:>8} {:>7} {:>11} {:>10} {:>5.1}% {:>5} {:>10}  {}{}",
            i.name,
            i.version,
            i.files,
            HumanBytes(i.bytes).to_string(),
            HumanBytes(i.present_bytes).to_string(),
            pct(i.present_bytes, i.bytes),
            i.pinned,
            HumanBytes(i.pinned_bytes).to_string(),
            i.last_used.as_deref().unwrap_or("-"),
            if i.mounted { " (mounted)" } else { "" }
        );
    }
    Ok(0)
}

pub fn du(dir: &Path, json: bool) -> Result<i32> {
    let r = cache::du(dir)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(0);
    }
    let u = &r.usage;
    let limit = r.limit.map_or("no limit".to_string(), |l| format!("limit {}", HumanBytes(l)));
    println!("{}: {} ({limit})", dir.display(), HumanBytes(u.total));
    for (kind, n) in [
        ("blocks", u.blocks),
        ("metadata", u.metadata),
        ("unindexed", u.unindexed),
        ("journals", u.journals),
        ("plain copies", u.plain),
        ("database", u.database),
        ("other", u.other),
    ] {
        println!("  {kind:<13} {:>11}", HumanBytes(n).to_string());
    }
    println!("  free to evict {:>11} (not pinned)", HumanBytes(r.evictable).to_string());
    Ok(0)
}

fn print_gc(r: &cache::GcReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "dropped {} blocks, {} metadata pieces, {} file contents, {} plain copies: {} -> {}",
            r.blocks,
            r.metadata_pieces,
            r.contents,
            r.plain_copies,
            HumanBytes(r.bytes_before),
            HumanBytes(r.bytes_after)
        );
    }
    Ok(())
}

pub fn gc(dir: &Path, json: bool) -> Result<i32> {
    print_gc(&cache::gc(dir)?, json)?;
    Ok(0)
}

pub fn rm(dir: &Path, image: &str, json: bool) -> Result<i32> {
    print_gc(&cache::remove(dir, image)?, json)?;
    Ok(0)
}

pub fn limit(dir: &Path, size: Option<&str>, json: bool) -> Result<i32> {
    if let Some(s) = size {
        let limit = match s {
            "none" => None,
            s => Some(crate::parse_cache_size(s).map_err(anyhow::Error::msg)?),
        };
        cache::set_limit(dir, limit)?;
    }
    let now = cache::recorded_limit(dir)?;
    if json {
        println!("{}", serde_json::json!({ "limit": now }));
    } else {
        match now {
            Some(l) => println!("{}: limit {} ({l} bytes)", dir.display(), HumanBytes(l)),
            None => println!("{}: no limit", dir.display()),
        }
    }
    Ok(0)
}
