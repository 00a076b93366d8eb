//! The lazy mount against real parts: FUSE through the kernel, `incfs serve` and nginx on
//! 127.0.0.1, ordinary tools (`diff -r`, `cat`, python) reading through the mount.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;

/// Environment variables for `incfs mount` (S3 settings).
type Env = Vec<(String, String)>;

/// The same repository behind all three kinds of server: `incfs serve`, nginx, and an
/// S3-compatible store (Garage).
struct Servers {
    serve: IncfsServer,
    nginx: Nginx,
    garage: Garage,
    repo: PathBuf,
}

impl Servers {
    fn start(repo: &Path) -> Self {
        let garage = Garage::start();
        garage.upload(repo, "repo");
        Servers { serve: IncfsServer::start(repo), nginx: Nginx::start(repo), garage, repo: repo.to_path_buf() }
    }

    /// (name, source, environment) of each server.
    fn each(&self) -> Vec<(&'static str, String, Env)> {
        vec![
            ("serve", self.serve.url.clone(), vec![]),
            ("nginx", self.nginx.url.clone(), vec![]),
            ("s3", self.garage.url("repo"), self.garage.env()),
        ]
    }

    /// Publish a changed repository file to the S3 copy too (the others serve the directory).
    fn republish(&self, rel: &str) {
        self.garage.put(&self.repo.join(rel), &format!("repo/{rel}"));
    }
}

/// Mixed data: random, compressible, sparse, many small files, links.
fn mixed_data(dest: &Path, scale_mib: usize) {
    fs::create_dir_all(dest.join("small")).unwrap();
    fs::write(dest.join("random.bin"), random_bytes(1, scale_mib << 19)).unwrap();
    let text: String = (0..(scale_mib << 14)).map(|i| format!("row {i}, a line of compressible text\n")).collect();
    fs::write(dest.join("text.csv"), text).unwrap();
    let sparse = fs::File::create(dest.join("sparse.img")).unwrap();
    sparse.set_len((scale_mib as u64) << 19).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", (scale_mib as u64) << 18).unwrap();
    for i in 0..300 {
        fs::write(dest.join(format!("small/f{i:03}")), random_bytes(100 + i, (i as usize * 97) % 20000)).unwrap();
    }
    fs::hard_link(dest.join("random.bin"), dest.join("random-link.bin")).unwrap();
    std::os::unix::fs::symlink("text.csv", dest.join("text-link")).unwrap();
}

#[test]
fn real_tree_mounts_identical_through_incfs_serve_nginx_and_s3() {
    let p = Published::new(
        |src| {
            python_stdlib_copy(&src.join("stdlib"));
            mixed_data(&src.join("data"), 160);
        },
        &[],
    );
    let serve = IncfsServer::start(&p.repo);
    let nginx = Nginx::start(&p.repo);
    let garage = Garage::start();
    garage.upload(&p.repo, "images/stdlib");
    for (name, url, env) in [("serve", serve.url.clone(), vec![]), ("nginx", nginx.url.clone(), vec![])] {
        let m = p.mount_env(&url, name, &[], &env);
        assert_eq!(m.stat("blocks_present"), 0, "{name}: nothing is fetched at mount");
        let diff = Command::new("diff").args(["-r", "--no-dereference"]).args([&p.src, &m.dir]).output().unwrap();
        assert!(diff.status.success(), "{name}: diff -r:\n{}{}", text(&diff.stdout), text(&diff.stderr));
        let (a, b) = (describe(&p.src), describe(&m.dir));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y, "{name}: stat differs");
        }
        let s = m.status();
        assert_eq!(s["complete"], true, "{name}: {s}");
        assert_eq!(s["reads_failed_verification"], 0);
    }
    // S3 (Garage): every entry's metadata, and the contents of the data tree and two stdlib
    // packages. Garage answers each GET about 40 ms late (delayed ACKs against its unflushed
    // writes), so reading all 3,000 files would take minutes here.
    let garage = Garage::start();
    garage.upload(&p.repo, "images/stdlib");
    let m = p.mount_env(&garage.url("images/stdlib"), "s3", &[], &garage.env());
    assert_eq!(describe_with(&p.src, false), describe_with(&m.dir, false), "s3: stat differs");
    for sub in ["data", "stdlib/json", "stdlib/email"] {
        let diff = Command::new("diff")
            .args(["-r", "--no-dereference"])
            .args([p.src.join(sub), m.path(sub)])
            .output()
            .unwrap();
        assert!(diff.status.success(), "s3: diff -r {sub}:\n{}{}", text(&diff.stdout), text(&diff.stderr));
    }
    assert_eq!(m.stat("reads_failed_verification"), 0);
}

#[test]
fn one_small_file_costs_about_its_own_blocks() {
    let p = Published::new(
        |src| {
            fs::write(src.join("big.bin"), random_bytes(5, 100 << 20)).unwrap();
            fs::write(src.join("small.txt"), random_bytes(6, 10 << 10)).unwrap();
            fs::write(src.join("neighbour.bin"), random_bytes(7, 1 << 20)).unwrap();
        },
        &[],
    );
    let nginx = Nginx::start(&p.repo);
    let m = p.mount(&nginx.url, "one", &[]);
    let manifest_bytes = fs::metadata(p.repo.join("manifest")).unwrap().len();
    let log = nginx.dir.path().join("access.log");
    let sent_before = nginx_body_bytes(&log);
    assert_eq!(fs::read(m.path("small.txt")).unwrap(), fs::read(p.src.join("small.txt")).unwrap());
    let fetched = m.stat("bytes_fetched");
    let sent = nginx_body_bytes(&log) - sent_before;
    // 3 data blocks, its block map (3 x 16 bytes) and tree: nothing of its neighbours.
    assert!(fetched <= (10 << 10) + 4 * 4096, "fetched {fetched} bytes for a 10 KiB file");
    assert_eq!(sent, fetched, "the server's count agrees with ours");
    assert!(sent_before <= manifest_bytes + 100, "mounting fetched only the manifest");

    // The same from an S3-compatible store.
    let garage = Garage::start();
    garage.upload(&p.repo, "one");
    let m = p.mount_env(&garage.url("one"), "one-s3", &[], &garage.env());
    assert_eq!(fs::read(m.path("small.txt")).unwrap(), fs::read(p.src.join("small.txt")).unwrap());
    assert_eq!(m.stat("bytes_fetched"), fetched, "S3 costs the same bytes as HTTP");
}

/// A sequential cold read reaches the daemon as 1 MiB reads (the negotiated `max_pages`), not
/// 128 KiB ones: read sizes set the request count and the readahead window's steps. (A
/// `max_write` of 64 KiB once made them 128 KiB, unnoticed but for the request count.)
#[test]
fn sequential_reads_reach_the_daemon_1_mib_at_a_time() {
    use std::io::{BufRead, BufReader};
    let p = Published::new(|src| fs::write(src.join("seq.bin"), random_bytes(8, 16 << 20)).unwrap(), &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "seq", &["--background", "off"]);
    let mnt = m.dir.to_str().unwrap().to_string();
    let mut log = ChildGuard(
        Command::new(incfs_bin()).args(["log", &mnt, "--json"]).stdout(std::process::Stdio::piped()).spawn().unwrap(),
    );
    // The log's lines, as they come, on a channel (the reading thread ends with the stream).
    let (tx, rx) = std::sync::mpsc::channel();
    let out = log.0.stdout.take().unwrap();
    let reading = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(fs::read(m.path("seq.bin")).unwrap(), fs::read(p.src.join("seq.bin")).unwrap());
    // Every read of the file is logged; stop at the one that ends it, waiting 10 s at most.
    let blocks = (16u64 << 20) / 4096;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut largest = 0;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let Ok(r) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let (block, count) = (r["block"].as_u64().unwrap_or(0), r["count"].as_u64().unwrap_or(0));
        largest = largest.max(count);
        if block + count >= blocks {
            break;
        }
    }
    drop(log); // kills and reaps `incfs log`: its stream ends, and with it the reading thread
    reading.join().unwrap();
    assert_eq!(largest, 256, "largest read the daemon saw: {largest} blocks");
}

fn nginx_body_bytes(log: &Path) -> u64 {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('"').nth(2)?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn python_runs_from_a_mostly_absent_stdlib() {
    let p = Published::new(python_stdlib_copy, &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "py", &[]);
    let dir = m.dir.to_str().unwrap();
    let script = format!(
        "import sys; sys.path.insert(0, {dir:?}); import json, email.parser, decimal, csv; \
         assert json.__file__.startswith({dir:?}), json.__file__; \
         print(json.dumps({{'ok': decimal.Decimal('1.5') * 2}}, default=str))"
    );
    let out = Command::new("python3").args(["-I", "-S", "-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), r#"{"ok": "3.0"}"#);
    let s = m.status();
    let (present, total) = (s["blocks_present"].as_u64().unwrap(), s["blocks_total"].as_u64().unwrap());
    assert!(present * 10 < total, "most of the image stays absent: {present}/{total} blocks present");
}

#[test]
fn corrupted_block_on_the_server_fails_with_eio_and_is_never_kept() {
    let victim = random_bytes(11, 64 << 10);
    let p = Published::new(
        |src| {
            fs::write(src.join("victim.bin"), &victim).unwrap();
            fs::write(src.join("bystander.bin"), random_bytes(12, 64 << 10)).unwrap();
        },
        &["--compression", "none"],
    );
    // Find victim.bin's first block in the (single) object and flip one byte of it.
    let object = fs::read_dir(p.repo.join("objects")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = fs::read(&object).unwrap();
    let at = bytes.windows(64).position(|w| w == &victim[..64]).unwrap() + 100;

    let rel = format!("objects/{}", object.file_name().unwrap().to_str().unwrap());
    let servers = Servers::start(&p.repo);
    for (name, url, env) in servers.each() {
        bytes[at] ^= 0x01;
        fs::write(&object, &bytes).unwrap();
        servers.republish(&rel);
        let m = p.mount_env(&url, &format!("bad-{name}"), &[], &env);
        let err = fs::read(m.path("victim.bin")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
        assert_eq!(fs::read(m.path("bystander.bin")).unwrap(), fs::read(p.src.join("bystander.bin")).unwrap());
        assert!(m.stat("reads_failed_verification") >= 1, "{name}");
        assert!(!m.present("victim.bin").iter().any(|&(a, _)| a == 0), "{name}: the bad block was not kept");

        bytes[at] ^= 0x01;
        fs::write(&object, &bytes).unwrap();
        servers.republish(&rel);
        // The source is in backoff after serving a bad block; the next read still tries it.
        assert_eq!(fs::read(m.path("victim.bin")).unwrap(), victim, "{name}");
        assert_eq!(m.present("victim.bin"), vec![(0, 16)], "{name}");
    }
}

#[test]
fn server_down_bounds_reads_and_recovery_needs_no_remount() {
    let p = Published::new(
        |src| {
            fs::write(src.join("present.bin"), random_bytes(21, 256 << 10)).unwrap();
            fs::write(src.join("absent.bin"), random_bytes(22, 256 << 10)).unwrap();
            fs::write(src.join("stalled.bin"), random_bytes(23, 256 << 10)).unwrap();
        },
        &[],
    );
    let port = free_port();
    let server = IncfsServer::start_on(&p.repo, port);
    let m = p.mount(&server.url, "down", &["--read-timeout", "2s"]);
    let present = fs::read(m.path("present.bin")).unwrap();
    drop(server);

    // Connection refused: fails fast, never past the bound.
    let t = Instant::now();
    assert!(fs::read(m.path("absent.bin")).is_err());
    assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
    // Present data needs no server (the kernel's page cache is dropped first).
    drop_caches();
    assert_eq!(fs::read(m.path("present.bin")).unwrap(), present);

    // A server that accepts and never answers: the read fails with ETIME at the bound.
    let staller = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let t = Instant::now();
    let err = fs::read(m.path("stalled.bin")).unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::ETIME), "{err}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(4), "took {took:?}");
    drop(staller);
    assert!(m.stat("reads_failed_timeout") >= 1);

    let _server = IncfsServer::start_on(&p.repo, port);
    let back = fs::read(m.path("absent.bin")).unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    assert_eq!(back, fs::read(p.src.join("absent.bin")).unwrap());
    // A file whose read just timed out fails at once for a second (so that the kernel's retry
    // of a failed readahead does not wait a second time); after that it is fetched again.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fs::read(m.path("stalled.bin")).unwrap(), fs::read(p.src.join("stalled.bin")).unwrap());
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn kill_9_mid_read_loses_nothing_fetched() {
    let data = random_bytes(31, 48 << 20);
    let p = Published::new(|src| fs::write(src.join("large.bin"), &data).unwrap(), &[]);
    let servers = Servers::start(&p.repo);
    for (name, url, env) in servers.each() {
        kill_9_mid_read(&p, name, &url, &env, &data);
    }
}

fn kill_9_mid_read(p: &Published, name: &str, url: &str, env: &[(String, String)], data: &[u8]) {
    let cache = p.dir.path().join(format!("cache-kill-{name}"));
    let mnt = p.dir.path().join(format!("mnt-kill-{name}"));
    let m = Mount::start_with_env(url, &mnt, &p.public, &cache, &[], env);
    let total_blocks = (48u64 << 20) / 4096;

    // A slow sequential reader; kill the daemon once about a quarter is local.
    let path = m.path("large.bin");
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut f = fs::File::open(path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(15));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.stat("blocks_present") < total_blocks / 4 {
        assert!(Instant::now() < deadline, "{name}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(m.pid as i32, libc::SIGKILL) };
    reader.join().unwrap();
    m.wait_killed();

    // Background completion off: every byte fetched now is one the read asked for.
    let m2 = Mount::start_with_env(url, &mnt, &p.public, &cache, &["--background", "off"], env);
    let present_before = m2.stat("blocks_present");
    assert!(present_before >= total_blocks / 4, "{name}: {present_before} blocks survived");
    assert!(fs::read(m2.path("large.bin")).unwrap() == data, "{name}: content differs after the crash");
    let fetched = m2.stat("bytes_fetched");
    let missing_bytes = (total_blocks - present_before) * 4096;
    assert!(fetched <= missing_bytes + (1 << 20), "{name}: refetched {fetched} bytes for {missing_bytes} missing");
    drop(m);
}

#[test]
fn concurrent_readers_share_one_fetch_per_block() {
    let data = random_bytes(41, 8 << 20);
    let p = Published::new(|src| fs::write(src.join("cold.bin"), &data).unwrap(), &[]);
    let servers = Servers::start(&p.repo);
    for (name, url, env) in servers.each() {
        let m = p.mount_env(&url, &format!("many-{name}"), &[], &env);
        let barrier = Arc::new(Barrier::new(32));
        let readers: Vec<_> = (0..32)
            .map(|_| {
                let (b, path) = (barrier.clone(), m.path("cold.bin"));
                std::thread::spawn(move || {
                    b.wait();
                    fs::read(path).unwrap()
                })
            })
            .collect();
        for r in readers {
            assert!(r.join().unwrap() == data, "{name}");
        }
        assert_eq!(m.stat("blocks_fetched"), 2048, "{name}: each block fetched exactly once");
    }
}

#[test]
fn every_change_is_refused_with_erofs() {
    let p = Published::new(
        |src| {
            fs::create_dir(src.join("dir")).unwrap();
            fs::write(src.join("file"), "content\n").unwrap();
        },
        &[],
    );
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "ro", &[]);
    let d = m.dir.to_str().unwrap();
    for cmd in [
        format!("touch {d}/new"),
        format!("touch {d}/file"),
        format!("echo x > {d}/file"),
        format!("echo x >> {d}/file"),
        format!("rm {d}/file"),
        format!("mkdir {d}/newdir"),
        format!("rmdir {d}/dir"),
        format!("chmod 600 {d}/file"),
        format!("truncate -s 0 {d}/file"),
        format!("mv {d}/file {d}/moved"),
        format!("ln -s x {d}/link"),
        format!("setfattr -n user.x -v 1 {d}/file 2>&1 || python3 -c \"import os; os.setxattr('{d}/file', 'user.x', b'1')\""),
    ] {
        let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
        assert!(!out.status.success(), "{cmd} succeeded");
        let err = text(&out.stderr) + &text(&out.stdout);
        assert!(err.contains("Read-only file system"), "{cmd}: {err}");
    }
    assert_eq!(fs::read_to_string(m.path("file")).unwrap(), "content\n");
    assert!(fs::metadata(m.path("file")).unwrap().mode() & 0o777 == 0o644);
}

#[test]
fn bad_manifests_and_rollbacks_fall_back_to_the_cache_or_are_refused() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), "v1\n").unwrap();
    let (private, public) = ed25519_key(dir.path());
    let (_, other_public) = openssl_key(dir.path(), "other", &["-algorithm", "ed25519"]);
    let repo = dir.path().join("repo");
    pack(&src, &repo, &private, &[]);
    fs::write(src.join("f"), "v2\n").unwrap();
    pack(&src, &repo, &private, &[]);
    let serve = IncfsServer::start(&repo);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let cache = dir.path().join("cache");

    let try_mount = |source: &str, trust: &Path, cache: &Path| {
        let _unmount = Unmount(mnt.clone());
        let out = incfs(&[
            "mount",
            source,
            mnt.to_str().unwrap(),
            "--trust",
            trust.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
            "--read-timeout",
            "2s",
        ]);
        assert!(!is_mounted(&mnt), "nothing may be mounted after a refusal");
        (out.status.success(), text(&out.stderr).trim().to_string())
    };
    let (ok, err) = try_mount(&serve.url, &other_public, &cache);
    assert!(!ok && err.contains("not among the trusted keys") && err.lines().count() == 1, "{err}");

    // Version 2 accepted once; a server then offering version 1 is a rollback: refused, and the
    // cache's version 2 is mounted instead, with a warning saying why.
    {
        let _m = Mount::start(&serve.url, &mnt, &public, &cache, &[]);
        assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "v2\n");
    }
    fs::copy(repo.join("versions/1.manifest"), repo.join("manifest")).unwrap();
    let from_cache = |why: &str| {
        let (m, warned) = Mount::start_warned(&serve.url, &mnt, &public, &cache, &[], &[]);
        assert!(warned.contains(why) && warned.contains("mounted src version 2 from the cache"), "{warned}");
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v2\n");
        assert!(m.status()["offline"].as_bool().unwrap(), "status says the image came from the cache");
    };
    from_cache("refusing the rollback");

    let mut bad = fs::read(repo.join("versions/2.manifest")).unwrap();
    bad.truncate(bad.len() - 10);
    fs::write(repo.join("manifest"), &bad).unwrap();
    from_cache("malformed");
    // Without a copy in the cache, the wrong answer is the error and nothing is mounted.
    let (ok, err) = try_mount(&serve.url, &public, &dir.path().join("empty-cache"));
    assert!(!ok && err.contains("malformed"), "{err}");

    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let fresh = dir.path().join("fresh-cache");
    let _unmount = Unmount(mnt.clone());
    let out = incfs(&[
        "mount",
        &unreachable,
        mnt.to_str().unwrap(),
        "--trust",
        public.to_str().unwrap(),
        "--cache",
        fresh.to_str().unwrap(),
        "--read-timeout",
        "2s",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("holds no copy"), "{err}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn mirrors_unmount_paths_and_signals() {
    let p = Published::new(|src| fs::write(src.join("f.bin"), random_bytes(51, 100_000)).unwrap(), &[]);
    let serve = IncfsServer::start(&p.repo);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let expected = fs::read(p.src.join("f.bin")).unwrap();

    // A dead primary is skipped: the manifest and the data come from the mirror.
    let m = p.mount(&dead, "mirror", &["--source", &serve.url]);
    assert_eq!(fs::read(m.path("f.bin")).unwrap(), expected);
    // umount(8) works, and the daemon exits.
    run("umount", &[m.dir.to_str().unwrap()]);
    m.wait_gone();

    // fusermount3 -u works too.
    let m = p.mount(&serve.url, "fusermount", &[]);
    run("fusermount3", &["-u", m.dir.to_str().unwrap()]);
    m.wait_gone();

    // SIGTERM and SIGINT unmount cleanly.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let m = p.mount(&serve.url, &format!("sig{sig}"), &[]);
        assert_eq!(fs::read(m.path("f.bin")).unwrap(), expected);
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(m.pid as i32, sig) };
        m.wait_gone();
    }
}
