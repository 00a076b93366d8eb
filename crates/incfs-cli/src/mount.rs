//! `incfs mount`, `incfs unmount`, `incfs status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use incfs_fs::control::{ask, FileStatus, Status};
use indicatif::HumanBytes;

use crate::keys::load_trusted;

/// Set in the daemon's environment by a parent waiting for it to be ready.
const READY_ENV: &str = "INCFS_REPORT_READY";

pub fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("incfs");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/incfs");
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join(".cache/incfs")
}

pub fn mount(
    sources: Vec<String>,
    mountpoint: &Path,
    trust: &[PathBuf],
    cache: Option<PathBuf>,
    read_timeout: Duration,
    foreground: bool,
    threads: usize,
) -> Result<i32> {
    let cache = cache.unwrap_or_else(default_cache);
    if !foreground {
        return spawn_daemon(mountpoint, &cache);
    }
    let report = std::env::var_os(READY_ENV).is_some();
    let result = (|| -> Result<()> {
        let opts = incfs_fs::MountOptions {
            sources,
            mountpoint: mountpoint.to_path_buf(),
            trust: load_trusted(trust)?,
            cache: cache.clone(),
            read_timeout,
            threads,
        };
        incfs_fs::mount(opts, || {
            if report {
                println!("ready");
                let _ = std::io::stdout().flush();
            } else {
                eprintln!(
                    "mounted at {} (cache {}); Ctrl-C or incfs unmount to stop",
                    mountpoint.display(),
                    cache.display()
                );
            }
        })?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(0),
        Err(e) if report => {
            // The waiting parent shows this line to the user.
            println!("error: {e:#}");
            Ok(2)
        }
        Err(e) => Err(e),
    }
}

/// Run this same command again with --foreground, detached, and wait until it reports the
/// mount ready (or fails). Its log goes to CACHE/daemon.log.
fn spawn_daemon(mountpoint: &Path, cache: &Path) -> Result<i32> {
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create cache directory {}", cache.display()))?;
    let log_path = cache.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut child = Command::new(std::env::current_exe()?)
        .args(&args)
        .env(READY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the mount daemon")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    match line.trim() {
        "ready" => {
            println!("mounted at {} (daemon pid {}, log {})", mountpoint.display(), child.id(), log_path.display());
            Ok(0)
        }
        l if l.starts_with("error: ") => {
            let _ = child.wait();
            eprintln!("{l}");
            Ok(2)
        }
        _ => {
            let status = child.wait()?;
            bail!("the mount daemon exited ({status}) before the mount was ready; see {}", log_path.display())
        }
    }
}

pub fn unmount(mountpoint: &Path) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    incfs_fs::unmount(&mp).map_err(|e| anyhow::anyhow!("cannot unmount {}: {e}", mp.display()))?;
    Ok(0)
}

pub fn status(mountpoint: &Path, path: Option<&Path>, json: bool) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let request = match path {
        None => serde_json::json!({ "cmd": "status" }),
        Some(p) => {
            // Accept both a path under the mountpoint and one relative to it.
            let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) };
            let rel = match abs.strip_prefix(&mp) {
                Ok(r) => r.to_path_buf(),
                Err(_) => p.to_path_buf(),
            };
            serde_json::json!({ "cmd": "file", "path": rel.to_string_lossy() })
        }
    };
    let v = ask(&mp, &request).map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!("{v}");
        return Ok(0);
    }
    if path.is_some() {
        let f: FileStatus = serde_json::from_value(v)?;
        let ranges: Vec<String> =
            f.present.iter().map(|(a, b)| if b - a == 1 { format!("{a}") } else { format!("{a}-{}", b - 1) }).collect();
        println!("{}: {} bytes, {}/{} blocks present", f.path, f.size, f.blocks_present, f.blocks_total);
        println!("present blocks: {}", if ranges.is_empty() { "none".to_string() } else { ranges.join(", ") });
        return Ok(0);
    }
    let s: Status = serde_json::from_value(v)?;
    let pct = if s.blocks_total > 0 { 100.0 * s.blocks_present as f64 / s.blocks_total as f64 } else { 100.0 };
    println!("image:     {} version {}", s.image, s.version);
    println!("mounted:   {}", s.mountpoint);
    println!("sources:   {}", s.sources.join(", "));
    println!("cache:     {} ({} stored)", s.cache, HumanBytes(s.bytes_stored));
    println!(
        "blocks:    {}/{} present ({pct:.1}%){}",
        s.blocks_present,
        s.blocks_total,
        if s.complete { ", complete" } else { "" }
    );
    println!(
        "fetched:   {} in {} requests ({} failed)",
        HumanBytes(s.bytes_fetched),
        s.fetch_requests,
        s.fetch_failures
    );
    println!("latency:   mean {:.1} ms, p99 {:.1} ms", s.fetch_latency_mean_ms, s.fetch_latency_p99_ms);
    println!("reads:     {} served, {} waited for the network", s.reads_served, s.reads_waited);
    println!(
        "failures:  {} timeout, {} verification, {} source, {} other ({} bad blocks rejected)",
        s.reads_failed_timeout, s.reads_failed_verification, s.reads_failed_source, s.reads_failed_other, s.blocks_bad
    );
    Ok(0)
}
