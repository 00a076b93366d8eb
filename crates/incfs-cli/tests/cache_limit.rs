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

/// The Python standard library, completed and every file read once: each complete file is kept
/// once (its plain copy, for passthrough; the compressed blocks released), and with passthrough
/// off once too (compressed). After a restart, offline, both forms read back byte-exact.
#[test]
fn every_byte_is_stored_once() {
    let p = Published::new(python_stdlib_copy, &[]);
    let serve = IncfsServer::start(&p.repo);
    let tree = du(&p.src);
    let repo = du(&p.repo);
    let read_all =
        |m: &Mount| run("sh", &["-c", &format!("find '{}' -type f -exec cat {{}} + >/dev/null", m.dir.display())]);

    let cache = p.dir.path().join("cache-auto");
    let m = Mount::start(&serve.url, &p.dir.path().join("mnt-auto"), &p.public, &cache, &["--background", "on"]);
    m.wait_complete(Duration::from_secs(120));
    read_all(&m);
    // Copies are written in the background: wait for them, bounded.
    m.wait_plain_copies(Duration::from_secs(60));
    let bound = tree + tree / 10;
    let stored_once = wait_for(Duration::from_secs(30), || du(&cache) <= bound);
    let s = m.status();
    assert!(stored_once, "cache {} bytes, tree {tree}: more than 1.1x; {}", du(&cache), s["cache_usage"]);
    eprintln!(
        "passthrough auto: cache {} bytes, {:.2}x the tree; {}",
        du(&cache),
        du(&cache) as f64 / tree as f64,
        s["cache_usage"]
    );
    assert!(s["plain_bytes"].as_u64().unwrap() > tree / 2, "{s}");
    drop(m);

    let cache_off = p.dir.path().join("cache-off");
    let m = Mount::start(
        &serve.url,
        &p.dir.path().join("mnt-off"),
        &p.public,
        &cache_off,
        &["--background", "on", "--passthrough", "off"],
    );
    m.wait_complete(Duration::from_secs(120));
    read_all(&m);
    drop(m);
    let off = du(&cache_off);
    eprintln!("passthrough off: cache {off} bytes, {:.2}x the repository", off as f64 / repo as f64);
    assert!(off <= repo + repo / 5, "cache {off} bytes, repository {repo}: more than 1.2x");

    // Offline, served by the daemon itself (passthrough off): blocks come from the plain copies.
    let url = serve.url.clone();
    drop(serve);
    let out = incfs(&["fsck", cache.to_str().unwrap()]);
    assert!(out.status.success(), "fsck found damage: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("presence: 0 bits"), "{}", text(&out.stdout));
    let m =
        Mount::start(&url, &p.dir.path().join("mnt-auto"), &p.public, &cache, &["--offline", "--passthrough", "off"]);
    diff_r(&m.dir, &p.src);
    assert_eq!(m.stat("fetch_requests"), 0, "{}", m.log());
}

/// A plain copy dropped for the plain-copy limit gives its blocks back to the store first: the
/// file stays complete and reads without a fetch.
#[test]
fn a_file_whose_plain_copy_goes_keeps_its_blocks() {
    let p = Published::new(|src| random_files(src, 3, 700 << 10, 400), &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "recover", &["--background", "on", "--plain-limit", "1M"]);
    m.wait_complete(Duration::from_secs(30));
    let requests = m.stat("fetch_requests");
    cmp(&m.path("f00.bin"), &p.src.join("f00.bin")); // copied, its blocks released
    m.wait_plain_copies(Duration::from_secs(30));
    let blocks = m.status()["cache_usage"]["blocks"].as_u64().unwrap();
    assert!(blocks <= 1400 << 10, "f00's blocks were not released: {}", m.status());
    cmp(&m.path("f01.bin"), &p.src.join("f01.bin")); // copied; f00's copy goes (limit 1 MiB)
    m.wait_plain_copies(Duration::from_secs(30));
    assert_eq!(m.stat("plain_files"), 1, "{}", m.status());
    assert_eq!(m.status()["complete"], true, "{}", m.status());
    drop_caches();
    cmp(&m.path("f00.bin"), &p.src.join("f00.bin"));
    assert_eq!(m.stat("fetch_requests"), requests, "f00 was fetched again:\n{}", m.log());
}

fn cache_json(cache: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["cache"];
    a.extend_from_slice(args);
    a.extend(["--cache", cache.to_str().unwrap(), "--json"]);
    serde_json::from_str(&incfs_ok(&a)).unwrap()
}

#[test]
fn cache_commands_list_measure_clean_and_remove_images() {
    let p = Published::new(|src| random_files(src, 6, 300 << 10, 500), &[]);
    let serve = IncfsServer::start(&p.repo);
    let cache = p.dir.path().join("cache");
    let mnt = p.dir.path().join("mnt");
    let m = Mount::start(&serve.url, &mnt, &p.public, &cache, &[]);
    diff_r(&m.dir, &p.src);
    drop(m);
    // Version 2 changes half the files: version 1's blocks of those are no longer referenced.
    for i in 0..3 {
        fs::write(p.src.join(format!("f{i:02}.bin")), random_bytes(600 + i, 300 << 10)).unwrap();
    }
    pack(&p.src, &p.repo, &p.private, &[]);
    let m = Mount::start(&serve.url, &mnt, &p.public, &cache, &[]);
    diff_r(&m.dir, &p.src);

    let ls = cache_json(&cache, &["ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    let img = &ls[0];
    assert_eq!((img["name"].as_str(), img["version"].as_u64(), img["files"].as_u64()), (Some("src"), Some(2), Some(6)));
    assert_eq!(img["present_bytes"], img["bytes"], "{img}");
    assert_eq!(img["mounted"], true, "{img}");
    let rm = incfs(&["cache", "rm", "src", "--cache", cache.to_str().unwrap()]);
    assert!(!rm.status.success() && text(&rm.stderr).contains("is mounted"), "{}", text(&rm.stderr));
    drop(m);

    let du_before = cache_json(&cache, &["du"]);
    // As du counts it (give or take the database's journal, there while it is open).
    assert!(du_before["usage"]["total"].as_u64().unwrap().abs_diff(du(&cache)) < 64 << 10, "{du_before}");
    assert!(du_before["usage"]["blocks"].as_u64().unwrap() > 8 * (300 << 10), "both versions' blocks: {du_before}");
    let gc = cache_json(&cache, &["gc"]);
    assert_eq!(gc["blocks"].as_u64(), Some(3 * 75), "version 1's blocks of the changed files: {gc}");
    assert!(gc["bytes_after"].as_u64().unwrap() + 3 * (300 << 10) <= gc["bytes_before"].as_u64().unwrap(), "{gc}");
    assert!(du(&cache).abs_diff(gc["bytes_after"].as_u64().unwrap()) < 64 << 10);
    // Nothing the recorded version needs went: offline, it reads back whole.
    let url = serve.url.clone();
    drop(serve);
    let m = Mount::start(&url, &mnt, &p.public, &cache, &["--offline"]);
    diff_r(&m.dir, &p.src);
    assert_eq!(m.stat("fetch_requests"), 0);
    drop(m);
    let ls = cache_json(&cache, &["ls"]);
    assert_eq!(ls[0]["mounted"], false);
    assert!(ls[0]["last_used"].as_str().is_some_and(|t| t.starts_with("20")), "{ls}");

    let rm = cache_json(&cache, &["rm", "src"]);
    assert!(rm["bytes_after"].as_u64().unwrap() < 256 << 10, "{rm}");
    assert_eq!(cache_json(&cache, &["ls"]), serde_json::json!([]));
    let again = incfs(&["cache", "rm", "src", "--cache", cache.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again.stderr).contains("not in the cache"));

    assert_eq!(cache_json(&cache, &["limit", "100M"])["limit"], 100 << 20);
    assert_eq!(cache_json(&cache, &["limit"])["limit"], 100 << 20);
    assert_eq!(cache_json(&cache, &["limit", "none"])["limit"], serde_json::Value::Null);
    let small = incfs(&["cache", "limit", "1M", "--cache", cache.to_str().unwrap()]);
    assert!(!small.status.success() && text(&small.stderr).contains("at least 8M"));
    let none = incfs(&["cache", "ls", "--cache", p.dir.path().join("nothing").to_str().unwrap()]);
    assert!(!none.status.success() && text(&none.stderr).contains("no incfs cache"), "{}", text(&none.stderr));
}

/// Pinned files outlive a cache limit smaller than the image: with the server gone, a remount
/// from the cache reads them; an unpinned file that was evicted fails with EIO (the source
/// refuses connections), within the read timeout.
#[test]
fn pinned_files_survive_a_limit_smaller_than_the_image() {
    let p = Published::new(|src| random_files(src, 12, 8 << 20, 700), &[]);
    let serve = IncfsServer::start(&p.repo);
    let cache = p.dir.path().join("cache");
    let mnt = p.dir.path().join("mnt");
    let m = Mount::start(&serve.url, &mnt, &p.public, &cache, &["--cache-size", "40M", "--pin", "f02.bin"]);
    let out = incfs_ok(&["pin", m.dir.to_str().unwrap(), "f00.bin", m.path("f01.bin").to_str().unwrap(), "-q"]);
    assert!(out.contains("pinned 2 files"), "{out}");
    // --pin: fetched and pinned by the daemon once mounted.
    assert!(
        wait_for(Duration::from_secs(30), || cache_json(&cache, &["ls"])[0]["pinned"] == 3),
        "{}\n{}",
        cache_json(&cache, &["ls"]),
        m.log()
    );
    // Everything else pinned (a limit just above the pinned data): reads are still served,
    // from memory, and the cache stays within the limit.
    incfs_ok(&["cache", "limit", "26M", "--cache", cache.to_str().unwrap()]);
    let watch = DuWatch::start(&cache);
    assert!(wait_for(Duration::from_secs(5), || m.status()["cache_limit"] == 26 << 20), "{}", m.status());
    for name in ["f05.bin", "f06.bin"] {
        cmp(&m.path(name), &p.src.join(name));
    }
    assert!(watch.max() <= (26 << 20) + SLACK, "{} bytes with a limit of 26 MiB", watch.max());
    drop(watch);
    incfs_ok(&["cache", "limit", "40M", "--cache", cache.to_str().unwrap()]);
    // More than the limit can hold is refused, saying why.
    let all = incfs(&["pin", m.dir.to_str().unwrap(), "-q"]);
    assert!(!all.status.success(), "{}", text(&all.stdout));
    assert!(text(&all.stderr).contains("more than the cache limit"), "{}", text(&all.stderr));

    for i in 0..12 {
        let name = format!("f{i:02}.bin");
        cmp(&m.path(&name), &p.src.join(&name));
    }
    assert!(m.stat("evictions") > 0, "{}", m.status());
    // Unpinning one makes it evictable again (still pinned: 2 files).
    let out = incfs_ok(&["unpin", m.dir.to_str().unwrap(), "f02.bin"]);
    assert!(out.contains("unpinned 1 files"), "{out}");
    assert_eq!(cache_json(&cache, &["ls"])[0]["pinned"], 2);
    for i in 3..12 {
        let name = format!("f{i:02}.bin");
        cmp(&m.path(&name), &p.src.join(&name));
    }
    drop(m);
    let url = serve.url.clone();
    drop(serve);
    assert!(du(&cache) <= (40 << 20) + SLACK);

    let m = Mount::start(&url, &mnt, &p.public, &cache, &["--read-timeout", "2s"]);
    for name in ["f00.bin", "f01.bin"] {
        cmp(&m.path(name), &p.src.join(name));
    }
    let evicted = (3..12)
        .map(|i| format!("f{i:02}.bin"))
        .find(|n| m.present(n).iter().map(|(a, b)| b - a).sum::<u64>() < 2048)
        .expect("an unpinned file was evicted");
    let t = std::time::Instant::now();
    let out = std::process::Command::new("cat").arg(m.path(&evicted)).output().unwrap();
    let took = t.elapsed();
    assert!(!out.status.success(), "{evicted} read back with the server gone");
    assert!(text(&out.stderr).contains("Input/output error"), "{}", text(&out.stderr));
    assert!(took < Duration::from_secs(3), "the failed read took {took:?} (read timeout 2 s)");
    assert_eq!(m.stat("bytes_fetched"), 0);
}

/// A pin is of a path: after an update changes the file there, its new content is fetched and
/// pinned, and the old content is unpinned.
#[test]
fn pins_follow_their_path_across_an_update() {
    let p = Published::new(|src| random_files(src, 3, 1 << 20, 800), &[]);
    let serve = IncfsServer::start(&p.repo);
    let cache = p.dir.path().join("cache");
    let m = Mount::start(&serve.url, &p.dir.path().join("mnt"), &p.public, &cache, &["--cache-size", "16M"]);
    incfs_ok(&["pin", m.dir.to_str().unwrap(), "f00.bin", "-q"]);
    let marked = || -> std::collections::BTreeSet<String> {
        fs::read_dir(cache.join("data"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pin"))
            .flat_map(|e| fs::read_to_string(e.path()).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    let before = marked();
    assert_eq!(before.len(), 1, "{before:?}");
    fs::write(p.src.join("f00.bin"), random_bytes(900, 1 << 20)).unwrap();
    pack(&p.src, &p.repo, &p.private, &[]);
    incfs_ok(&["update", m.dir.to_str().unwrap()]);
    assert!(
        wait_for(Duration::from_secs(30), || {
            let now = marked();
            now.len() == 1 && now != before
        }),
        "pinned contents: {:?} (before {before:?})\n{}",
        marked(),
        m.log()
    );
    assert_eq!(cache_json(&cache, &["ls"])[0]["pinned"], 1);
    let url = serve.url.clone();
    drop(m);
    drop(serve);
    let m = Mount::start(&url, &p.dir.path().join("mnt"), &p.public, &cache, &["--offline"]);
    cmp(&m.path("f00.bin"), &p.src.join("f00.bin"));
}

/// `kill -9` at random instants of reads through a limited cache (evicting, writing plain
/// copies that take over blocks, compacting): no read ever returns a wrong byte, the cache stays
/// within its limit, and after the last kill every file reads back and `fsck` finds no damage.
#[test]
fn kill_9_while_evicting_and_compacting_serves_nothing_wrong() {
    use rand::{Rng, SeedableRng};
    let p = Published::new(|src| random_files(src, 12, 2 << 20, 1000), &[]);
    let serve = IncfsServer::start(&p.repo);
    let cache = p.dir.path().join("cache");
    let mnt = p.dir.path().join("mnt");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6576696374);
    for i in 0..8 {
        let m = Mount::start(&serve.url, &mnt, &p.public, &cache, &["--cache-size", "8M"]);
        let names: Vec<String> = (0..4).map(|_| format!("f{:02}.bin", rng.gen_range(0..12))).collect();
        let (dir, src) = (m.dir.clone(), p.src.clone());
        let reader = std::thread::spawn(move || {
            for n in names {
                // A read cut by the kill fails; one that returns must be right.
                if let Ok(bytes) = fs::read(dir.join(&n)) {
                    assert!(bytes == fs::read(src.join(&n)).unwrap(), "a wrong byte in {n}");
                }
            }
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(m.pid as i32, libc::SIGKILL) };
        reader.join().unwrap_or_else(|e| panic!("iteration {i}: {e:?}"));
        m.wait_killed();
        assert!(du(&cache) <= (8 << 20) + SLACK, "iteration {i}: {} bytes", du(&cache));
    }
    let m = Mount::start(&serve.url, &mnt, &p.public, &cache, &["--cache-size", "8M"]);
    for i in 0..12 {
        let name = format!("f{i:02}.bin");
        cmp(&m.path(&name), &p.src.join(&name));
    }
    assert_eq!(m.stat("blocks_bad"), 0, "{}", m.log());
    drop(m);
    let out = incfs(&["fsck", cache.to_str().unwrap()]);
    let report = text(&out.stdout);
    assert!(report.contains(" 0 damaged") && report.contains("0 cached trees damaged"), "{report}");
    assert!(report.contains("0 did not match"), "{report}");
}
