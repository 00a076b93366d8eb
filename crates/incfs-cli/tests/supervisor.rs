//! The mount outlives its daemon: `incfs restart` replaces the daemon while programs read, and a
//! daemon killed with SIGKILL is replaced by the supervisor. Real mounts, real processes, real
//! signals; every wait bounded.

mod common;

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::DelayProxy;
use common::*;

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap()
}

/// Small files, a large one, and one to hold open through passthrough.
fn tree(src: &Path) {
    fs::create_dir_all(src.join("lib")).unwrap();
    for i in 0..40u64 {
        fs::write(src.join(format!("lib/m{i:02}.dat")), random_bytes(100 + i, 20_000 + (i as usize * 7919) % 300_000))
            .unwrap();
    }
    fs::write(src.join("large.bin"), random_bytes(7, 40 << 20)).unwrap();
    fs::write(src.join("open.bin"), random_bytes(8, 3 << 20)).unwrap();
}

/// Read `path` whole after dropping its pages from the page cache, so that the read reaches
/// the daemon (warm: from the local store; cold: from the network).
fn read_uncached(path: &Path) -> Result<Vec<u8>, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("open: {e}"))?;
    // SAFETY: posix_fadvise on an fd we own; no memory is passed.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut v = Vec::new();
    f.read_to_end(&mut v).map_err(|e| format!("read: {e}"))?;
    Ok(v)
}

/// Where `got` departs from `want`, for a failure message.
fn differs(rel: &Path, got: &[u8], want: &[u8]) -> String {
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    format!(
        "{} differs: {} bytes read of {}, first differing byte at {at:?} (block {:?})",
        rel.display(),
        got.len(),
        want.len(),
        at.map(|a| a / 4096)
    )
}

/// The daemon serving `m` now, from `incfs status` (retried while a new daemon starts).
fn daemon_pid(m: &Mount) -> u32 {
    let mut pid = 0;
    assert!(
        wait_for(Duration::from_secs(10), || {
            let out = incfs(&["status", m.dir.to_str().unwrap(), "--json"]);
            pid = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v["daemon_pid"].as_u64())
                .unwrap_or(0) as u32;
            pid != 0
        }),
        "no daemon answered status:\n{}",
        m.log()
    );
    pid
}

/// Runs `f` on a thread and fails the test if it does not return within `bound` (a hung read).
fn bounded<T: Send + 'static>(what: &str, bound: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(bound).unwrap_or_else(|_| panic!("{what} did not return within {bound:?}"))
}

#[test]
fn restart_replaces_the_daemon_while_programs_read() {
    let p = Published::new(tree, &[]);
    let expected: Arc<Vec<(PathBuf, Vec<u8>)>> = Arc::new(read_tree(&p.src));
    let large = fs::read(p.src.join("large.bin")).unwrap();
    let serve = IncfsServer::start(&p.repo);
    // A slow link: the large file streams from the network through every restart.
    let proxy = DelayProxy::start(port_of(&serve.url), Duration::from_millis(2), Some(8 << 20));
    let m = p.mount(&proxy.url(), "restart", &[]);

    // A file held open through FUSE passthrough across every restart.
    incfs_ok(&["prefetch", m.dir.to_str().unwrap(), "open.bin"]);
    drop(fs::File::open(m.path("open.bin")).unwrap()); // its plain copy is made after this open
    m.wait_plain_copies(Duration::from_secs(30));
    let held = fs::File::open(m.path("open.bin")).unwrap();
    let open_expected = fs::read(p.src.join("open.bin")).unwrap();
    assert_eq!(m.stat("opens_passthrough"), 1, "open.bin is passed through:\n{}", m.log());

    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    // A reader streaming the large file slowly; it records the longest wait for one read.
    let streamer = {
        let (path, large, stop) = (m.path("large.bin"), large.clone(), stop.clone());
        std::thread::spawn(move || -> Result<Duration, String> {
            let mut f = fs::File::open(&path).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 256 << 10];
            let (mut at, mut longest) = (0usize, Duration::ZERO);
            while at < large.len() && !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let n = f.read(&mut buf).map_err(|e| format!("read at {at}: {e}"))?;
                longest = longest.max(t.elapsed());
                if n == 0 || buf[..n] != large[at..at + n] {
                    return Err(format!("large.bin differs at {at} ({n} bytes read)"));
                }
                at += n;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(longest)
        })
    };
    // A loop reading every file of the image again and again, through the daemon.
    let looper = {
        let (dir, expected, stop, passes) = (m.dir.clone(), expected.clone(), stop.clone(), passes.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                for (rel, want) in expected.iter().filter(|(r, _)| !r.ends_with("large.bin")) {
                    let got = read_uncached(&dir.join(rel)).map_err(|e| format!("{}: {e}", rel.display()))?;
                    if &got != want {
                        return Err(format!("{} differs", rel.display()));
                    }
                }
                passes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    let mut pid = m.daemon_pid;
    let served_before = m.stat("reads_served");
    for i in 0..5 {
        let before = passes.load(Ordering::Relaxed);
        assert!(
            wait_for(Duration::from_secs(60), || passes.load(Ordering::Relaxed) > before || looper.is_finished()),
            "the reading loop made no progress before restart {i}:\n{}",
            m.log()
        );
        if looper.is_finished() {
            panic!("the reading loop ended before restart {i}: {:?}\n{}", looper.join(), m.log());
        }
        let served = m.stat("reads_served");
        let out = incfs(&["restart", m.dir.to_str().unwrap()]);
        assert!(out.status.success(), "restart {i}: {}{}\n{}", text(&out.stdout), text(&out.stderr), m.log());
        // Counters carry over (a new daemon starting from zero would be far below).
        assert!(m.stat("reads_served") >= served, "restart {i}: reads_served went back");
        eprintln!("{}", text(&out.stdout).trim());
        let now = daemon_pid(&m);
        assert_ne!(now, pid, "restart {i}: the daemon pid changes");
        pid = now;
        assert!(is_mounted(&m.dir), "still mounted after restart {i}");
        // The file opened through passthrough before any restart still reads.
        let mut buf = vec![0u8; 64 << 10];
        let off = (i as usize * 700_001) % (open_expected.len() - buf.len());
        held.read_exact_at(&mut buf, off as u64).unwrap();
        assert_eq!(buf, open_expected[off..off + buf.len()], "open.bin after restart {i}");
    }
    let before = passes.load(Ordering::Relaxed);
    let progressed =
        wait_for(Duration::from_secs(60), || passes.load(Ordering::Relaxed) > before || looper.is_finished());
    if !progressed || looper.is_finished() {
        stop.store(true, Ordering::Relaxed);
        let ended = looper.is_finished().then(|| looper.join());
        panic!("the reading loop made no progress after the restarts (ended: {ended:?}):\n{}", m.log());
    }
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap().unwrap_or_else(|e| panic!("the reading loop saw an error: {e}\n{}", m.log()));
    let longest = streamer.join().unwrap().unwrap_or_else(|e| panic!("the streaming reader: {e}\n{}", m.log()));
    eprintln!("longest single read of the streaming reader across 5 restarts: {longest:?}");

    let s = m.status();
    assert_eq!(s["restarts"].as_u64(), Some(5));
    assert_eq!(s["supervisor_pid"].as_u64(), Some(m.pid as u64));
    assert!(s["restart_error"].is_null());
    assert!(m.stat("reads_served") >= served_before + 5, "reads_served carried over:\n{s}");
    // Opened again after the restarts: still passthrough, the backing id reused.
    assert_eq!(fs::read(m.path("open.bin")).unwrap(), open_expected);
    drop(held);
}

#[test]
fn a_killed_daemon_is_replaced_and_reads_in_flight_complete() {
    let p = Published::new(tree, &[]);
    let expected: Arc<Vec<(PathBuf, Vec<u8>)>> = Arc::new(read_tree(&p.src));
    let serve = IncfsServer::start(&p.repo);
    let proxy = DelayProxy::start(port_of(&serve.url), Duration::from_millis(2), Some(24 << 20));
    let m = p.mount(&proxy.url(), "killed", &[]);
    let probe = m.path("lib/m00.dat");
    let probe_expected = fs::read(p.src.join("lib/m00.dat")).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut pid = m.daemon_pid;
    let mut answered_after = Vec::new();
    for round in 0..10 {
        // Cold reads at first, warm ones later (pages dropped, blocks local): both in flight.
        let readers: Vec<_> = (0..3)
            .map(|r| {
                let (dir, expected) = (m.dir.clone(), expected.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    for (rel, want) in expected.iter().skip(r).step_by(3) {
                        let got = read_uncached(&dir.join(rel)).map_err(|e| format!("{}: {e}", rel.display()))?;
                        if &got != want {
                            return Err(differs(rel, &got, want));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(next(300)));
        // SAFETY: kill(2) on the daemon of the mount this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "round {round}: kill {pid}");
        let killed = Instant::now();
        let (probe, want) = (probe.clone(), probe_expected.clone());
        bounded("a read after the kill", Duration::from_secs(5), move || {
            assert_eq!(read_uncached(&probe).unwrap(), want)
        });
        answered_after.push(killed.elapsed());
        for r in readers {
            let result = bounded("a reader in flight at the kill", Duration::from_secs(60), move || r.join().unwrap());
            result.unwrap_or_else(|e| {
                let plain: Vec<String> = fs::read_dir(m.cache.join("plain"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| format!("{:?} {}", e.file_name(), e.metadata().map_or(0, |m| m.len())))
                    .collect();
                let size_now = fs::metadata(m.path("large.bin")).map(|md| md.len());
                let again = read_uncached(&m.path("large.bin")).map(|v| v.len());
                panic!(
                    "round {round}: {e}\nlarge.bin size now {size_now:?}, read again {again:?}\nplain copies: {plain:?}\nstatus: {}\n{}",
                    m.status(),
                    m.log()
                )
            });
        }
        let now = daemon_pid(&m);
        assert_ne!(now, pid, "round {round}: a new daemon serves");
        pid = now;
        assert!(is_mounted(&m.dir));
    }
    eprintln!("kill -9 to the first successful read: {answered_after:?}");
    // Every file byte-exact at the end, through the tenth daemon.
    for (rel, want) in expected.iter() {
        assert_eq!(&read_uncached(&m.dir.join(rel)).unwrap(), want, "{}", rel.display());
    }
    assert_eq!(m.stat("restarts"), 10);
    // The supervisor is the process `incfs mount` left; killing it ends the mount: its daemon
    // detaches it and exits.
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(m.pid as i32, libc::SIGKILL) };
    let gone = |pid: u32| fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "));
    assert!(
        wait_for(Duration::from_secs(10), || !is_mounted(&m.dir) && gone(pid) && gone(m.pid)),
        "after its supervisor was killed: mounted {}, daemon {pid} gone {}\n{}",
        is_mounted(&m.dir),
        gone(pid),
        m.log()
    );
}

#[test]
fn a_restart_into_a_broken_binary_keeps_the_mount_on_the_old_one() {
    let p = Published::new(tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "broken", &[]);
    let want = fs::read(p.src.join("lib/m03.dat")).unwrap();
    assert_eq!(fs::read(m.path("lib/m03.dat")).unwrap(), want);

    let out = incfs(&["restart", m.dir.to_str().unwrap(), "--binary", "/bin/false"]);
    assert!(!out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("/bin/false") && err.contains("exited before serving"), "{err}");
    assert_eq!(read_uncached(&m.path("lib/m03.dat")).unwrap(), want);
    assert!(m.status()["restart_error"].as_str().unwrap().contains("/bin/false"));

    // A relative path is refused before anything is stopped.
    let out = incfs(&["restart", m.dir.to_str().unwrap(), "--binary", "no/such/incfs"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not an absolute path to a file"), "{}", text(&out.stderr));

    // A good restart afterwards clears the error.
    let out = incfs(&["restart", m.dir.to_str().unwrap(), "--binary", incfs_bin()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(m.status()["restart_error"].is_null());

    // SIGTERM to the daemon ends the mount, as SIGTERM to the supervisor does.
    let pid = daemon_pid(&m);
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    m.wait_gone();
}

#[test]
fn a_read_waits_only_while_the_new_daemon_starts() {
    let p = Published::new(tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    // Passthrough off: every read below is answered by the daemon, from its store.
    let m = p.mount(&serve.url, "pause", &["--passthrough", "off"]);
    incfs_ok(&["prefetch", m.dir.to_str().unwrap()]);
    let want = fs::read(p.src.join("lib/m07.dat")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, stop) = (m.path("lib/m07.dat"), stop.clone());
        std::thread::spawn(move || -> (u64, Duration) {
            let (mut reads, mut longest) = (0, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(read_uncached(&path).unwrap(), want);
                longest = longest.max(t.elapsed());
                reads += 1;
            }
            (reads, longest)
        })
    };
    for _ in 0..3 {
        let out = incfs(&["restart", m.dir.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, longest) = bounded("the reader", Duration::from_secs(30), move || reader.join().unwrap());
    eprintln!("{reads} reads across 3 restarts; the longest took {longest:?}");
    // A liveness bound, not a speed figure: the pause is a process start and a store opening.
    assert!(longest < Duration::from_secs(5), "a read waited {longest:?} during a restart\n{}", m.log());
}

#[test]
fn a_new_daemon_keeps_inode_numbers_after_updates_and_pushes() {
    use std::os::unix::fs::MetadataExt;
    let p = Published::new(
        |src| {
            fs::create_dir_all(src.join("lang")).unwrap();
            fs::write(src.join("a.txt"), "a1\n").unwrap();
            fs::write(src.join("b.txt"), "b1\n").unwrap();
            fs::write(src.join("lang/en.txt"), "hello\n").unwrap();
        },
        &[],
    );
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "inodes", &[]);
    let mnt = m.dir.to_str().unwrap().to_string();
    // Version 2: a.txt removed, b.txt changed, c.txt added: the view's inode numbers are no
    // longer those a fresh mount of version 2 would give.
    fs::remove_file(p.src.join("a.txt")).unwrap();
    fs::write(p.src.join("b.txt"), "b2\n").unwrap();
    fs::write(p.src.join("c.txt"), "c2\n").unwrap();
    pack(&p.src, &p.repo, &p.private, &[]);
    incfs_ok(&["update", &mnt]);
    // And a pushed file.
    let fr = p.dir.path().join("fr.pak");
    fs::write(&fr, random_bytes(40, 100_000)).unwrap();
    let key = p.private.to_str().unwrap();
    incfs_ok(&["sign-file", fr.to_str().unwrap(), "--key", key, "--image", "src", "--path", "lang/fr.pak"]);
    let sig = format!("{}.sig", fr.display());
    incfs_ok(&["add", &mnt, "lang/fr.pak", "--from", fr.to_str().unwrap(), "--signature", &sig, "--fill"]);

    let names = ["b.txt", "c.txt", "lang", "lang/en.txt", "lang/fr.pak"];
    let inos: Vec<u64> = names.iter().map(|n| fs::metadata(m.path(n)).unwrap().ino()).collect();
    let c = fs::File::open(m.path("c.txt")).unwrap();
    for round in 0..2 {
        if round == 0 {
            incfs_ok(&["restart", &mnt]);
        } else {
            let pid = daemon_pid(&m);
            // SAFETY: kill(2) on the daemon of the mount this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            assert!(wait_for(Duration::from_secs(5), || daemon_pid(&m) != pid));
        }
        // The kernel's cached entries and the new daemon agree on every number.
        let after: Vec<u64> = names.iter().map(|n| fs::metadata(m.path(n)).unwrap().ino()).collect();
        assert_eq!(after, inos, "round {round}: inode numbers");
        assert_eq!(fs::read_to_string(m.path("b.txt")).unwrap(), "b2\n");
        assert_eq!(fs::read(m.path("lang/fr.pak")).unwrap(), fs::read(&fr).unwrap());
        assert!(!m.path("a.txt").exists());
        // A file opened before the replacement reads through the new daemon (by inode).
        let mut buf = [0u8; 3];
        c.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"c2\n", "round {round}");
    }
    assert_eq!(m.stat("version"), 2);
}

#[test]
fn files_opened_before_a_restart_read_their_own_data() {
    let p = Published::new(tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    // Passthrough off: reads of open files reach the daemon with the handle it gave at open.
    let m = p.mount(&serve.url, "handles", &["--passthrough", "off"]);
    let large = fs::read(p.src.join("large.bin")).unwrap();
    let held = fs::File::open(m.path("large.bin")).unwrap();
    for round in 0..2 {
        incfs_ok(&["restart", m.dir.to_str().unwrap()]);
        // The new daemon's first opens, kept open: their handles must not be mistaken for the
        // held one's (given by the first daemon, at its first open).
        let _open_now: Vec<fs::File> =
            (0..8).map(|i| fs::File::open(m.path(&format!("lib/m{i:02}.dat"))).unwrap()).collect();
        // SAFETY: posix_fadvise on an fd we own; no memory is passed.
        unsafe { libc::posix_fadvise(held.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut buf = vec![0u8; 1 << 20];
        let at = (20 << 20) + round * (3 << 20);
        held.read_exact_at(&mut buf, at as u64).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(buf == large[at..at + buf.len()], "round {round}: the held file read another file's data");
        assert_eq!(fs::metadata(m.path("large.bin")).unwrap().len(), large.len() as u64, "round {round}: size");
    }
}
