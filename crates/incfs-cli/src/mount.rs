//! `incfs mount`, `incfs unmount`, `incfs status`, `incfs update`, `incfs prefetch`, `incfs fsck`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use incfs_fs::control::{ask, ask_within, FileStatus, PrefetchProgress, Status};
use incfs_fs::live::UpdateReport;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};

use crate::keys::load_trusted;

/// Set in the daemon's environment by a parent waiting for it to be ready.
const READY_ENV: &str = "INCFS_REPORT_READY";

/// The command line as parsed (after a mount helper's was turned into `incfs mount ...`): the
/// daemon is started with it.
static COMMAND_LINE: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

pub fn set_command_line(args: Vec<std::ffi::OsString>) {
    let _ = COMMAND_LINE.set(args);
}

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

/// `incfs mount`'s arguments.
pub struct MountArgs {
    pub sources: Vec<String>,
    pub mountpoint: PathBuf,
    pub trust: Vec<PathBuf>,
    pub cache: Option<PathBuf>,
    pub foreground: bool,
    pub settings: incfs_fs::MountSettings,
}

/// Make a path given on the command line absolute (the daemon runs from another directory).
fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

pub fn mount(a: MountArgs) -> Result<i32> {
    let cache = a.cache.clone().unwrap_or_else(default_cache);
    let mountpoint = a.mountpoint.as_path();
    if !a.foreground {
        return spawn_daemon(mountpoint, &cache);
    }
    if std::env::var_os(incfs_fs::handover::SUPERVISOR_FD_ENV).is_none() {
        // This process holds the mount; the daemon proper is a child running this same command
        // line, replaced if it dies and by `incfs restart`.
        let args: Vec<std::ffi::OsString> =
            COMMAND_LINE.get().cloned().unwrap_or_else(|| std::env::args_os().skip(1).collect());
        let s = incfs_fs::supervisor::Supervise {
            mountpoint: std::fs::canonicalize(mountpoint).or_else(|_| absolute(mountpoint))?,
            binary: std::env::current_exe().context("cannot find the incfs binary")?,
            args,
            threads: a.settings.threads,
        };
        return incfs_fs::supervisor::run(s).map_err(|e| anyhow::anyhow!("supervisor: {e}"));
    }
    let report = std::env::var_os(READY_ENV).is_some();
    let result = (|| -> Result<()> {
        let mut settings = a.settings.clone();
        settings.profile = settings.profile.as_deref().map(absolute).transpose()?;
        settings.record_profile = settings.record_profile.as_deref().map(absolute).transpose()?;
        let opts = incfs_fs::MountOptions {
            sources: a.sources.clone(),
            mountpoint: mountpoint.to_path_buf(),
            trust: load_trusted(&a.trust)?,
            cache: cache.clone(),
            settings,
        };
        incfs_fs::mount(opts, |warnings| {
            if report {
                // The waiting parent shows warnings to the user, then the mount.
                for w in warnings {
                    println!("warning: {w}");
                }
                println!("ready {}", std::process::id());
                let _ = std::io::stdout().flush();
            } else {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
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
    let mut args: Vec<std::ffi::OsString> =
        COMMAND_LINE.get().cloned().unwrap_or_else(|| std::env::args_os().skip(1).collect());
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
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        out.read_line(&mut line)?;
        match line.trim().strip_prefix("warning: ") {
            Some(w) => eprintln!("warning: {w}"),
            None => break,
        }
    }
    match line.trim().split_once(' ').unwrap_or((line.trim(), "")) {
        ("ready", daemon) => {
            println!(
                "mounted at {} (daemon pid {daemon}, supervisor pid {}, log {})",
                mountpoint.display(),
                child.id(),
                log_path.display()
            );
            Ok(0)
        }
        _ if line.starts_with("error: ") => {
            let l = line.trim();
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

/// `incfs restart`: ask the daemon to have its supervisor replace it, then wait until another
/// daemon answers (or the old binary again, when the new one failed: reported as an error).
pub fn restart(mountpoint: &Path, binary: Option<&Path>, timeout: Duration) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let binary = binary.map(absolute).transpose()?;
    let request = serde_json::json!({ "cmd": "restart", "binary": binary });
    let old: u32 = serde_json::from_value(ask(&mp, &request).map_err(|e| anyhow::anyhow!(e))?)?;
    let started = std::time::Instant::now();
    let status = loop {
        // Refused or unanswered while the switch happens; bounded by --timeout.
        if let Ok(v) = ask_within(&mp, &serde_json::json!({ "cmd": "status" }), Duration::from_secs(5)) {
            let s: Status = serde_json::from_value(v)?;
            if s.daemon_pid != old && s.daemon_pid != 0 {
                break s;
            }
        }
        if started.elapsed() > timeout {
            bail!("no new daemon answered within {timeout:?}; see the mount's daemon.log");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(e) = &status.restart_error {
        bail!("{e}; daemon pid {} serves {} again", status.daemon_pid, mp.display());
    }
    println!(
        "restarted {}: daemon pid {old} -> {} (incfs {}), {:.2} s",
        mp.display(),
        status.daemon_pid,
        status.daemon_version,
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// `incfs pin` (`pin`) and `incfs unpin`: pinning fetches the files first, with a progress bar.
pub fn pin(mountpoint: &Path, paths: &[PathBuf], pin: bool, quiet: bool) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let rel = image_paths(&mp, paths)?;
    let request = serde_json::json!({ "cmd": "pin", "paths": rel, "pin": pin });
    if pin {
        // Whether they fit, before fetching them.
        let check = serde_json::json!({ "cmd": "pin", "paths": rel, "pin": true, "check": true });
        ask_within(&mp, &check, Duration::from_secs(600)).map_err(|e| anyhow::anyhow!(e))?;
    }
    // A block evicted between the fetch and the pin (a tight limit): fetched again, once.
    let mut tries = 0;
    let v = loop {
        tries += 1;
        if pin {
            let code = prefetch(&mp, paths, Duration::from_secs(60), quiet)?;
            if code != 0 {
                return Ok(code);
            }
        }
        match ask_within(&mp, &request, Duration::from_secs(600)) {
            Ok(v) => break v,
            Err(e) if tries < 2 && e.to_string().contains("not in the cache") => continue,
            Err(e) => bail!(e),
        }
    };
    let r: incfs_fs::control::PinReport = serde_json::from_value(v)?;
    println!(
        "{} {} files ({}); the cache's pinned data: {}",
        if pin { "pinned" } else { "unpinned" },
        r.files,
        HumanBytes(r.bytes),
        HumanBytes(r.pinned_bytes)
    );
    Ok(0)
}

/// Paths inside the image of `paths` (the whole image if none).
fn image_paths(mp: &Path, paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut rel = Vec::new();
    for p in paths {
        rel.push(image_path(mp, p)?);
    }
    if rel.is_empty() {
        rel.push(String::new());
    }
    Ok(rel)
}

/// A path inside the image: given under the mountpoint, or relative to the image root.
pub fn image_path(mp: &Path, p: &Path) -> Result<String> {
    let abs = absolute(p)?;
    let rel = match abs.strip_prefix(mp) {
        Ok(r) => r.to_path_buf(),
        Err(_) => p.to_path_buf(),
    };
    Ok(rel.to_string_lossy().into_owned())
}

pub fn status(mountpoint: &Path, path: Option<&Path>, json: bool) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let request = match path {
        None => serde_json::json!({ "cmd": "status" }),
        Some(p) => serde_json::json!({ "cmd": "file", "path": image_path(&mp, p)? }),
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
    let supervisor = match s.supervisor_pid {
        Some(p) => format!(", supervisor pid {p}, {} restarts", s.restarts),
        None => String::new(),
    };
    println!("mounted:   {} (daemon pid {}, incfs {}{supervisor})", s.mountpoint, s.daemon_pid, s.daemon_version);
    if let Some(e) = &s.restart_error {
        println!("restart:   the last restart failed: {e}");
    }
    if let Some(at) = &s.expires {
        println!("expires:   {at} (signed in the manifest; updates must bring a fresher one)");
    }
    println!(
        "sources:   {}{}",
        s.sources.join(", "),
        if s.offline { " (offline: mounted from the cache)" } else { "" }
    );
    let u = &s.cache_usage;
    let limit = s.cache_limit.map_or("no limit".to_string(), |l| format!("limit {}", HumanBytes(l)));
    println!("cache:     {} ({} of {limit})", s.cache, HumanBytes(u.total));
    println!(
        "           blocks {}, metadata {}, unindexed {}, journals {}, plain copies {}, database {}",
        HumanBytes(u.blocks),
        HumanBytes(u.metadata),
        HumanBytes(u.unindexed),
        HumanBytes(u.journals),
        HumanBytes(u.plain),
        HumanBytes(u.database)
    );
    if s.evictions > 0 || s.cache_limit.is_some() {
        println!(
            "evicted:   {} files ({}) to stay within the limit; {} blocks fetched again since",
            s.evictions,
            HumanBytes(s.evicted_bytes),
            s.blocks_refetched
        );
    }
    println!(
        "blocks:    {}/{} present ({pct:.1}%){}",
        s.blocks_present,
        s.blocks_total,
        if s.complete { ", complete" } else { "" }
    );
    if s.cache_full {
        println!("           cache full: {pct:.1}% present, {}; background completion stopped at the limit", limit);
    }
    println!(
        "fetched:   {} in {} requests ({} failed)",
        HumanBytes(s.bytes_fetched),
        s.fetch_requests,
        s.fetch_failures
    );
    println!("latency:   mean {:.1} ms, p99 {:.1} ms", s.fetch_latency_mean_ms, s.fetch_latency_p99_ms);
    println!(
        "pipeline:  {}/{} readahead and background requests in flight (2 MiB each at most), {} of {} fetched ahead",
        s.requests_in_flight,
        s.parallel,
        HumanBytes(s.staged_bytes),
        HumanBytes(s.staged_limit)
    );
    println!(
        "reads:     {} served by the daemon, {} waited for the network, {} pending; {} opens passed through",
        s.reads_served, s.reads_waited, s.pending_reads, s.opens_passthrough
    );
    match (s.plain_files, s.plain_bytes) {
        (Some(n), Some(b)) => match s.plain_queued.unwrap_or(0) {
            0 => println!("plain:     {} in {n} plain copies for passthrough", HumanBytes(b)),
            q => println!("plain:     {} in {n} plain copies for passthrough, {q} being made", HumanBytes(b)),
        },
        _ => println!("plain:     passthrough off"),
    }
    if !s.fetching.is_empty() {
        println!("fetching:  {}", s.fetching.join(", "));
    }
    println!(
        "failures:  {} timeout, {} verification, {} source, {} other ({} bad blocks rejected)",
        s.reads_failed_timeout, s.reads_failed_verification, s.reads_failed_source, s.reads_failed_other, s.blocks_bad
    );
    Ok(0)
}

/// `incfs update`: switch the mount to another version and say what changed.
pub fn update(
    mountpoint: &Path,
    to: Option<u64>,
    allow_rollback: bool,
    allow_expired: bool,
    json: bool,
) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let request = serde_json::json!({
        "cmd": "update", "to": to, "allow_rollback": allow_rollback, "allow_expired": allow_expired,
    });
    let v = ask_within(&mp, &request, Duration::from_secs(300)).map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!("{v}");
        return Ok(0);
    }
    let r: UpdateReport = serde_json::from_value(v)?;
    if !r.switched {
        println!("{} already serves version {}", mp.display(), r.to);
        return Ok(0);
    }
    println!(
        "{}: version {} -> {}: {} added, {} removed, {} changed",
        mp.display(),
        r.from,
        r.to,
        r.added.len(),
        r.removed.len(),
        r.changed.len()
    );
    for (mark, list) in [("+", &r.added), ("-", &r.removed), ("~", &r.changed)] {
        for p in list.iter().take(20) {
            println!("  {mark} {p}");
        }
        if list.len() > 20 {
            println!("  {mark} ... and {} more", list.len() - 20);
        }
    }
    Ok(0)
}

/// `incfs prefetch`: ask the daemon to fetch these paths first, show progress until complete.
pub fn prefetch(mountpoint: &Path, paths: &[PathBuf], stall: Duration, quiet: bool) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let rel = image_paths(&mp, paths)?;
    let v = ask(&mp, &serde_json::json!({ "cmd": "prefetch", "paths": rel })).map_err(|e| anyhow::anyhow!(e))?;
    let mut p: PrefetchProgress = serde_json::from_value(v)?;
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(p.blocks_total * 4096) };
    bar.set_style(
        ProgressStyle::with_template(
            "prefetch [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_message(format!("{} files", p.files));
    let mut last_change = std::time::Instant::now();
    let mut last_present = p.blocks_present;
    while p.blocks_present < p.blocks_total {
        std::thread::sleep(Duration::from_millis(200));
        let v =
            ask(&mp, &serde_json::json!({ "cmd": "prefetch_progress", "id": p.id })).map_err(|e| anyhow::anyhow!(e))?;
        p = serde_json::from_value(v)?;
        bar.set_position(p.blocks_present * 4096);
        if p.blocks_present != last_present {
            last_present = p.blocks_present;
            last_change = std::time::Instant::now();
        } else if last_change.elapsed() > stall {
            bar.abandon();
            bail!(
                "prefetch made no progress for {} ({} of {} blocks present, {} failed fetches); \
                 check the sources and the daemon log",
                humantime::format_duration(stall),
                p.blocks_present,
                p.blocks_total,
                p.fetch_failures
            );
        }
    }
    bar.finish_and_clear();
    if !quiet {
        println!("{} files complete ({})", p.files, HumanBytes(p.blocks_total * 4096));
    }
    Ok(0)
}

/// `incfs status --watch`: a live view until interrupted (or the mount goes away).
pub fn watch(mountpoint: &Path) -> Result<i32> {
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("{}", mountpoint.display()))?;
    let get = || -> Result<Status> {
        let v = ask(&mp, &serde_json::json!({ "cmd": "status" })).map_err(|e| anyhow::anyhow!(e))?;
        Ok(serde_json::from_value(v)?)
    };
    let s = get()?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = MultiProgress::new();
    let bar = multi.add(ProgressBar::new(s.blocks_total * 4096));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}").unwrap().progress_chars("=> "),
    );
    bar.set_prefix(format!("{} v{}", s.image, s.version));
    let detail = multi.add(ProgressBar::new_spinner());
    detail.set_style(ProgressStyle::with_template("{msg}").unwrap());
    let mut samples: std::collections::VecDeque<(std::time::Instant, u64)> = Default::default();
    loop {
        let s = match get() {
            Ok(s) => s,
            Err(e) => {
                bar.abandon();
                eprintln!("{e:#}");
                return Ok(0);
            }
        };
        let now = std::time::Instant::now();
        samples.push_back((now, s.blocks_present));
        while samples.len() > 2 && now.duration_since(samples[0].0) > Duration::from_secs(5) {
            samples.pop_front();
        }
        let (t0, b0) = samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 { (s.blocks_present.saturating_sub(b0)) as f64 * 4096.0 / secs } else { 0.0 };
        let left = (s.blocks_total - s.blocks_present.min(s.blocks_total)) * 4096;
        let eta = if s.complete {
            "complete".to_string()
        } else if rate > 0.0 {
            format!("eta {}", humantime::format_duration(Duration::from_secs((left as f64 / rate) as u64)))
        } else {
            "eta -".to_string()
        };
        let fetching = if s.fetching.is_empty() { "-".to_string() } else { s.fetching.join(", ") };
        let counters = format!(
            "fetched {} in {} requests; {} reads pending; failures {} timeout, {} verification, {} source",
            HumanBytes(s.bytes_fetched),
            s.fetch_requests,
            s.pending_reads,
            s.reads_failed_timeout,
            s.reads_failed_verification,
            s.reads_failed_source,
        );
        if tty {
            bar.set_position(s.blocks_present * 4096);
            bar.set_message(format!("{}/s {eta}", HumanBytes(rate as u64)));
            detail.set_message(format!("{counters}\nfetching: {fetching}"));
            std::thread::sleep(Duration::from_millis(500));
        } else {
            // Not a terminal (a log, a pipe): one plain line a second.
            let pct = 100.0 * s.blocks_present as f64 / s.blocks_total.max(1) as f64;
            println!(
                "{}/{} blocks ({pct:.1}%) {}/s {eta}; {counters}; fetching: {fetching}",
                s.blocks_present,
                s.blocks_total,
                HumanBytes(rate as u64)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// `incfs fsck CACHE`.
pub fn fsck(cache: &Path, dry_run: bool) -> Result<i32> {
    let r = incfs_fs::fsck::fsck(cache, !dry_run, &|step| eprintln!("{step}..."))?;
    let fixed = if dry_run { "found" } else { "dropped" };
    println!("blocks:   {} checked, {} damaged ({fixed})", r.blocks_checked, r.blocks_damaged);
    println!(
        "files:    {} checked in {} images, {} cached trees damaged ({fixed})",
        r.files_checked, r.images, r.trees_damaged
    );
    println!(
        "presence: {} bits claimed blocks not stored ({})",
        r.presence_cleared,
        if dry_run { "found" } else { "cleared" }
    );
    println!(
        "plain:    {} copies checked, {} did not match their file ({})",
        r.plain_checked,
        r.plain_damaged,
        if dry_run { "found" } else { "deleted" }
    );
    let bad = r.blocks_damaged + r.trees_damaged + r.presence_cleared + r.plain_damaged;
    Ok(if bad > 0 { 1 } else { 0 })
}
