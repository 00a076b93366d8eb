//! A bounded cache (`--cache-size`), against real parts: FUSE through the kernel, `incfs serve`
//! on 127.0.0.1, `cmp` reading the mount, and `du -sb` watching the cache directory while it
//! works (not only at the end).

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
/// What the cache may hold beyond its limit (docs/cache.md, "Size limit"): directory entries,
/// journal records and log lines written since the daemon last measured the directory.
const SLACK: u64 = MIB;

/// `du -sb DIR`, as a user would check it.
fn du(dir: &Path) -> u64 {
    let out = run("du", &["-sb", dir.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// Samples `du -sb` of a directory until dropped; the largest figure seen.
struct DuWatch {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DuWatch {
    fn start(dir: &Path) -> DuWatch {
        let (stop, max) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, m, dir) = (stop.clone(), max.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                // du may meet a file evicted while it walks: it then says so and counts the rest.
                let out = std::process::Command::new("du").args(["-sb"]).arg(&dir).output().unwrap();
                if let Some(n) = text(&out.stdout).split_whitespace().next().and_then(|n| n.parse().ok()) {
                    m.fetch_max(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        DuWatch { stop, max, thread: Some(thread) }
    }

    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for DuWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn random_files(src: &Path, files: usize, size: usize, seed: u64) {
    for i in 0..files {
        fs::write(src.join(format!("f{i:02}.bin")), random_bytes(seed + i as u64, size)).unwrap();
    }
}

fn cmp(a: &Path, b: &Path) {
    let out = std::process::Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(out.status.success(), "cmp {} {}: {}{}", a.display(), b.display(), text(&out.stdout), text(&out.stderr));
}

#[test]
fn a_limited_cache_stays_within_its_limit_and_every_file_reads_back() {
    // 256 MiB of random data: 32 files of 8 MiB, through a 64 MiB cache.
    let p = Published::new(|src| random_files(src, 32, 8 << 20, 100), &[]);
    let serve = IncfsServer::start(&p.repo);
    let limit = 64 * MIB;
    let cache = p.dir.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    let watch = DuWatch::start(&cache);
    let m = Mount::start(
        &serve.url,
        &p.dir.path().join("mnt"),
        &p.public,
        &cache,
        &["--cache-size", "64M", "--background", "on"],
    );
    // Completion fills the cache up to the limit and stops there, saying so.
    assert!(
        wait_for(Duration::from_secs(60), || m.status()["cache_full"] == true),
        "background completion did not stop at the limit: {}\n{}",
        m.status(),
        m.log()
    );
    let s = m.status();
    assert_eq!(s["cache_limit"], limit);
    assert!(s["blocks_present"].as_u64().unwrap() < s["blocks_total"].as_u64().unwrap());
    assert_eq!(s["evictions"], 0, "completion never evicts: {s}");
    let status_text = incfs_ok(&["status", m.dir.to_str().unwrap()]);
    assert!(status_text.contains("cache full:") && status_text.contains("limit 64.00 MiB"), "{status_text}");

    // Every file reads back exactly, which evicts what was read least recently.
    for i in 0..32 {
        let name = format!("f{i:02}.bin");
        cmp(&m.path(&name), &p.src.join(&name));
    }
    let s = m.status();
    assert!(s["evictions"].as_u64().unwrap() >= 3, "{s}");
    assert!(s["evicted_bytes"].as_u64().unwrap() >= 128 * MIB, "{s}");
    // The first files were evicted long ago: read again, they are fetched again, correctly.
    let fetched = m.stat("bytes_fetched");
    drop_caches();
    cmp(&m.path("f00.bin"), &p.src.join("f00.bin"));
    assert!(m.stat("bytes_fetched") >= fetched + 4 * MIB, "f00.bin was fetched again");
    assert!(m.stat("blocks_refetched") > 0, "{}", m.status());
    assert_eq!(m.stat("reads_failed_other") + m.stat("reads_failed_verification"), 0, "{}", m.log());
    drop(m);
    let max = watch.max();
    drop(watch);
    eprintln!("the cache held {max} bytes at its largest (limit {limit})");
    assert!(max <= limit + SLACK, "the cache held {max} bytes at its largest; limit {limit}");
    assert!(max >= limit - 16 * MIB, "the cache was used up to its limit ({max} bytes at most)");
    assert!(du(&cache) <= limit + SLACK);
}

#[test]
fn two_images_sharing_one_limited_cache_both_keep_working_within_it() {
    let a = Published::new(|src| random_files(src, 8, 8 << 20, 200), &[]);
    let b = Published::new(|src| random_files(src, 8, 8 << 20, 300), &[]);
    let (sa, sb) = (IncfsServer::start(&a.repo), IncfsServer::start(&b.repo));
    let limit = 40 * MIB;
    let cache = a.dir.path().join("shared-cache");
    fs::create_dir_all(&cache).unwrap();
    let watch = DuWatch::start(&cache);
    let ma = Mount::start(&sa.url, &a.dir.path().join("mnt-a"), &a.public, &cache, &["--cache-size", "40M"]);
    // The second mount asks for more; the smaller limit recorded in the cache stays.
    let mb = Mount::start(&sb.url, &b.dir.path().join("mnt-b"), &b.public, &cache, &["--cache-size", "1G"]);
    assert_eq!(mb.status()["cache_limit"], limit);
    for round in 0..2 {
        for i in 0..8 {
            let name = format!("f{i:02}.bin");
            cmp(&ma.path(&name), &a.src.join(&name));
            cmp(&mb.path(&name), &b.src.join(&name));
        }
        drop_caches();
        eprintln!("round {round}: cache {} bytes", du(&cache));
    }
    let evictions = ma.stat("evictions") + mb.stat("evictions");
    assert!(evictions > 0, "{}\n{}", ma.status(), mb.status());
    drop((ma, mb));
    let max = watch.max();
    drop(watch);
    assert!(max <= limit + SLACK, "two mounts held {max} bytes at their largest; limit {limit}");
}

/// Drop the kernel's page cache, so that reads reach the daemon again.
fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}
