//! Reliability under damage and crashes: `incfs fsck` on a deliberately damaged cache,
//! `kill -9` at random instants of fetching and storing, hostile signed manifests refused by
//! verify, extract and mount, and randomized network faults. `INCFS_CRASH_ITERATIONS` (12) and
//! `INCFS_FAULT_SCENARIOS` (6) make the last two run longer on demand.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use incfs_format::manifest::{Dirent, FileData, Inode, InodeKind, Manifest, MetaRef, Metadata, ObjectRef};
use rand::{Rng, SeedableRng};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn tree(src: &Path) {
    fs::create_dir_all(src.join("lib")).unwrap();
    fs::write(src.join("random.bin"), random_bytes(1, 3 << 20)).unwrap();
    let text: String = (0..40_000).map(|i| format!("line {i} of some compressible text\n")).collect();
    fs::write(src.join("text.txt"), text).unwrap();
    for i in 0..40 {
        fs::write(src.join(format!("lib/f{i:02}")), random_bytes(100 + i, 500 + (i as usize * 1777) % 40_000)).unwrap();
    }
}

/// Flip the first byte of the first `blocks` stored blocks, and of one metadata piece longer
/// than 8 KiB, in the cache's segment files (a user's accident or a bad disk, in miniature).
/// Where they lie is read from the journals, with the store's own record decoder.
fn damage(cache: &Path, blocks: usize) {
    use incfs_store::journal::{replay, Record, MAGIC};
    use std::os::unix::fs::FileExt;
    let data = cache.join("data");
    let mut journals: Vec<_> = fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .collect();
    journals.sort();
    let (mut blocks_left, mut meta_left) = (blocks, 1);
    for j in journals {
        let bytes = fs::read(&j).unwrap();
        let seg = fs::OpenOptions::new().read(true).write(true).open(j.with_extension("seg")).unwrap();
        let flip = |offset: u64| {
            let mut b = [0u8; 1];
            seg.read_exact_at(&mut b, offset).unwrap();
            seg.write_all_at(&[b[0] ^ 1], offset).unwrap();
        };
        for r in replay(&bytes[MAGIC.len()..]).0 {
            match r {
                Record::Block { len, offset, .. } if blocks_left > 0 && len > 0 => {
                    flip(offset);
                    blocks_left -= 1;
                }
                Record::Meta { len, offset, .. } if meta_left > 0 && len > 8192 => {
                    flip(offset);
                    meta_left -= 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!((blocks_left, meta_left), (0, 0), "found enough to damage");
}

fn fsck(cache: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["fsck", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = incfs(&args);
    (out.status.code().unwrap_or(-1), text(&out.stdout) + &text(&out.stderr))
}

fn number_before(out: &str, what: &str) -> u64 {
    let at = out.find(what).unwrap_or_else(|| panic!("no {what:?} in:\n{out}"));
    out[..at].split_whitespace().last().unwrap().parse().unwrap()
}

#[test]
fn fsck_drops_damaged_blocks_and_trees_and_the_mount_heals() {
    let p = Published::new(tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    let cache = p.dir.path().join("cache-fsck");
    {
        let m = p.mount(&serve.url, "fsck", &["--background", "on", "--passthrough", "off"]);
        m.wait_complete(Duration::from_secs(60));
        let (code, out) = fsck(&cache, &[]);
        assert_eq!(code, 2, "a cache in use is refused: {out}");
        assert!(out.contains("in use by a mount"), "{out}");
    }
    let (code, out) = fsck(&cache, &[]);
    assert_eq!(code, 0, "a healthy cache: {out}");
    assert_eq!(number_before(&out, "damaged"), 0, "{out}");

    // Three blocks get a byte flipped; one cached tree piece (of random.bin, 768 blocks, so a
    // real tree) gets its first hash changed.
    damage(&cache, 3);
    let (code, out) = fsck(&cache, &["--dry-run"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(number_before(&out, "damaged (found)"), 3, "{out}");
    assert_eq!(number_before(&out, "cached trees damaged"), 1, "{out}");
    let (code, again) = fsck(&cache, &["--dry-run"]);
    assert_eq!((code, number_before(&again, "damaged (found)")), (1, 3), "a dry run changes nothing: {again}");

    let (code, out) = fsck(&cache, &[]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(number_before(&out, "damaged (dropped)"), 3, "{out}");
    let cleared = number_before(&out, "bits claimed");
    assert!(cleared >= 3, "presence of the dropped blocks (and of the file whose tree went) cleared: {out}");
    let (code, out) = fsck(&cache, &[]);
    assert_eq!(code, 0, "repaired: {out}");

    // The mount sees the image incomplete again, fetches what was dropped, and is whole.
    let m = p.mount(&serve.url, "fsck", &["--background", "on"]);
    m.wait_complete(Duration::from_secs(60));
    let out = std::process::Command::new("diff").arg("-r").arg(&m.dir).arg(&p.src).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    let fetched = m.stat("blocks_fetched");
    assert!((3..=cleared).contains(&fetched), "only what fsck dropped is fetched again: {fetched} (cleared {cleared})");
    assert_eq!(m.stat("blocks_bad"), 0, "nothing damaged was left for the mount to find");
}

/// A cache damaged every way a disk or a user can (segments cut in half, a journal cut inside a
/// record, garbage after another, bytes flipped in blocks and a tree piece) never panics a
/// mount: what is damaged is found, dropped and fetched again, every file reads byte-exact, and
/// the daemon stays up.
#[test]
fn a_mangled_cache_never_panics_the_mount() {
    use std::os::unix::fs::FileExt;
    let p = Published::new(tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    let cache = p.dir.path().join("cache-mangled");
    {
        let m = p.mount(&serve.url, "mangled", &["--background", "on", "--passthrough", "off"]);
        m.wait_complete(Duration::from_secs(60));
    }
    damage(&cache, 5);
    let data = cache.join("data");
    let mut files: Vec<_> = fs::read_dir(&data).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let journals: Vec<_> = files.iter().filter(|p| p.extension().is_some_and(|e| e == "jnl")).collect();
    let segments: Vec<_> = files.iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    assert!(!journals.is_empty() && !segments.is_empty(), "{files:?}");
    for (k, seg) in segments.iter().enumerate() {
        if k % 2 == 0 {
            let f = fs::OpenOptions::new().write(true).open(seg).unwrap();
            f.set_len(f.metadata().unwrap().len() / 2).unwrap();
        }
    }
    let first = fs::OpenOptions::new().write(true).open(journals[0]).unwrap();
    let len = first.metadata().unwrap().len();
    first.set_len(len - len / 3).unwrap(); // almost surely inside a record
    let last = journals[journals.len() - 1];
    let tail = fs::metadata(last).unwrap().len();
    fs::OpenOptions::new().write(true).open(last).unwrap().write_all_at(&random_bytes(9, 300), tail).unwrap();

    let m = p.mount(&serve.url, "mangled", &["--passthrough", "off"]);
    let out = std::process::Command::new("diff").arg("-r").arg(&m.dir).arg(&p.src).output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), m.log());
    assert!(m.daemon_alive(), "{}", m.log());
    assert!(!m.log().contains("panicked"), "{}", m.log());
    assert!(m.stat("blocks_fetched") > 0, "the damage cost nothing to refetch: the test proves nothing");
}

/// The issue's acceptance, literally: `kill -9` at random instants of a cold sequential read;
/// after each restart every block the reader had been served is still local (so it is never
/// fetched again), and the file reads byte-exact.
/// The two kill -9 tests take turns: run side by side, a mount whose daemon was killed was
/// sometimes left mounted with neither its daemon nor fusermount3's auto-unmount watchdog alive
/// (seen 3 times in 4 runs; never with either test alone). Under investigation, see the notes.
static KILLS: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

#[test]
fn kill_9_during_a_cold_sequential_read_keeps_every_served_block() {
    let _turn = KILLS.lock();
    const SIZE: usize = 24 << 20;
    let p = Published::new(|src| fs::write(src.join("big.bin"), random_bytes(24, SIZE)).unwrap(), &[]);
    let serve = IncfsServer::start(&p.repo);
    let want = fs::read(p.src.join("big.bin")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x73657175);
    let iterations = env_count("INCFS_CRASH_ITERATIONS", 20);
    let mut served_total = 0;
    for i in 0..iterations {
        let name = format!("seq-{i}");
        let m = p.mount(&serve.url, &name, &["--background", "off"]);
        // A reader that takes a while (1 MiB, then a pause), so that the kill lands mid-read.
        let path = m.path("big.bin");
        let want2 = want.clone();
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opened2 = opened.clone();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut f = fs::File::open(path).unwrap();
            opened2.store(true, std::sync::atomic::Ordering::SeqCst);
            let mut buf = vec![0u8; 1 << 20];
            let mut served = 0usize;
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => return served,
                    Ok(n) => {
                        assert_eq!(&buf[..n], &want2[served..served + n], "bytes served at {served}");
                        served += n;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        // The kill lands during the read: after the open (the mount is serving), at a random
        // instant of the next 300 ms.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !opened.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "iteration {i}: open did not return");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(m.pid as i32, libc::SIGKILL) };
        let served = reader.join().unwrap() as u64;
        // Only the daemon's end is waited for, and the restart mounts at a fresh mount point:
        // removing the dead mount is fusermount3's auto-unmount, which the other kill tests
        // check and which this one does not depend on (it was seen, rarely, to leave a killed
        // mount behind; `m`'s drop unmounts it then). The cache is free once the daemon is gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        while m.daemon_alive() {
            assert!(Instant::now() < deadline, "iteration {i}: the killed daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        served_total += served;

        let cache = p.dir.path().join(format!("cache-{name}"));
        let again = p.dir.path().join(format!("mnt-{name}-again"));
        let m = Mount::start(&serve.url, &again, &p.public, &cache, &["--background", "off"]);
        let served_blocks = served / 4096;
        let present = m.present("big.bin");
        for b in 0..served_blocks {
            assert!(
                present.iter().any(|&(s, e)| s <= b && b < e),
                "iteration {i}: block {b} was served before the kill but is not local after it ({present:?})"
            );
        }
        assert!(fs::read(m.path("big.bin")).unwrap() == want, "iteration {i}: content differs after the crash");
    }
    assert!(served_total > 0, "some kill landed after the reader got data");
}

#[test]
fn kill_9_at_random_instants_loses_nothing_and_serves_nothing_wrong() {
    let _turn = KILLS.lock();
    let p = Published::new(tree, &["--compression", "lz4"]);
    let serve = IncfsServer::start(&p.repo);
    let files: Vec<String> = read_tree(&p.src).into_iter().map(|(rel, _)| rel.to_string_lossy().into_owned()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6c);
    let iterations = env_count("INCFS_CRASH_ITERATIONS", 12);
    let mut present_before = 0;
    for i in 0..iterations {
        // Completion is capped so that every kill lands mid-fetch; a reader adds demand fetches.
        let m = p.mount(&serve.url, "crash", &["--background", "on", "--bandwidth", "3M"]);
        let present = m.stat("blocks_present");
        assert!(present >= present_before, "iteration {i}: presence went back ({present} < {present_before})");
        let rel = &files[rng.gen_range(0..files.len())];
        assert_eq!(fs::read(m.path(rel)).unwrap(), fs::read(p.src.join(rel)).unwrap(), "iteration {i}: {rel}");
        let victim = files[rng.gen_range(0..files.len())].clone();
        let path = m.path(&victim);
        let reader = std::thread::spawn(move || fs::read(path));
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
        present_before = m.stat("blocks_present");
        // SAFETY: kill(2) on the daemon this test started.
        unsafe { libc::kill(m.pid as i32, libc::SIGKILL) };
        if let Ok(bytes) = reader.join().unwrap() {
            assert_eq!(bytes, fs::read(p.src.join(&victim)).unwrap(), "iteration {i}: a read racing the kill");
        }
        m.wait_killed();
    }
    let m = p.mount(&serve.url, "crash", &["--background", "on"]);
    m.wait_complete(Duration::from_secs(60));
    let out = std::process::Command::new("diff").arg("-r").arg(&m.dir).arg(&p.src).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(m.stat("blocks_bad"), 0, "no damaged block was found in the cache after {iterations} kills");
    drop(m);
    let (code, out) = fsck(&p.dir.path().join("cache-crash"), &[]);
    assert_eq!(code, 0, "fsck finds nothing to repair after {iterations} kills: {out}");
}

/// A repository whose signed manifest is `m` (no objects needed: every case is refused before).
fn publish_manifest(dir: &Path, key_pem: &Path, m: &Manifest) -> std::path::PathBuf {
    let repo = dir.join(format!("repo-{}", rand::random::<u32>()));
    fs::create_dir_all(repo.join("objects")).unwrap();
    fs::create_dir_all(repo.join("versions")).unwrap();
    let key = incfs_sign::SigningKey::from_pem(&fs::read_to_string(key_pem).unwrap()).unwrap();
    let signed = incfs_format::wire::encode_signed_part(m);
    let sig = key.sign(&signed);
    let bytes = incfs_format::wire::seal(signed, key.algorithm(), key.public_key().id(), &sig);
    fs::write(repo.join("manifest"), &bytes).unwrap();
    fs::write(repo.join(format!("versions/{}.manifest", m.version)), &bytes).unwrap();
    repo
}

#[test]
fn hostile_manifests_are_refused_by_verify_extract_and_mount() {
    let dir = tempdir();
    let (private, public) = ed25519_key(dir.path());
    let meta = Metadata { mode: 0o644, uid: 0, gid: 0, mtime_sec: 0, mtime_nsec: 0 };
    let dir_inode = Inode { meta, xattrs: vec![], kind: InodeKind::Dir };
    let file = |size: u64| Inode {
        meta,
        xattrs: vec![],
        kind: InodeKind::File(FileData { size, root_hash: [7; 32], meta: Some(MetaRef::dense(0, 0)) }),
    };
    let base = Manifest {
        name: "hostile".into(),
        version: 1,
        expires: None,
        objects: vec![ObjectRef { digest: [1; 32], size: 1 << 20 }],
        dictionaries: vec![],
        inodes: vec![dir_inode.clone(), file(10)],
        dirents: vec![Dirent { parent: 0, inode: 1, name: b"ok".to_vec() }],
    };
    let named = |name: &[u8]| {
        let mut m = base.clone();
        m.dirents[0].name = name.to_vec();
        m
    };
    let mut cases: Vec<(&str, Manifest, &str)> = vec![
        ("parent directory name", named(b".."), "not a valid file name"),
        ("dot name", named(b"."), "not a valid file name"),
        ("slash in a name", named(b"a/../../etc"), "not a valid file name"),
        ("absolute name", named(b"/etc/passwd"), "not a valid file name"),
        ("empty name", named(b""), "not a valid file name"),
        ("NUL in a name", named(b"a\0b"), "not a valid file name"),
        ("256-byte name", named(&[b'a'; 256]), "not a valid file name"),
    ];
    let mut dup = base.clone();
    dup.inodes.push(file(20));
    dup.dirents.push(Dirent { parent: 0, inode: 2, name: b"ok".to_vec() });
    cases.push(("duplicate names", dup, "repeat a name"));
    let mut huge = base.clone();
    huge.inodes[1] = file(1 << 60);
    cases.push(("impossible size", huge, "larger than the 1 PiB limit"));
    let mut outside = base.clone();
    outside.objects[0].size = 10;
    cases.push(("metadata outside its object", outside, "lies outside object"));
    let mut no_object = base.clone();
    no_object.objects.clear();
    cases.push(("missing object", no_object, "names object 0 of 0"));
    let mut cycle = base.clone();
    cycle.inodes.push(dir_inode.clone());
    cycle.inodes.push(dir_inode.clone());
    cycle.dirents.push(Dirent { parent: 2, inode: 3, name: b"a".to_vec() });
    cycle.dirents.push(Dirent { parent: 3, inode: 2, name: b"b".to_vec() });
    cases.push(("directory cycle off the root", cycle, "not reachable from the root"));
    let mut orphan_parent = base.clone();
    orphan_parent.dirents[0].parent = 1;
    cases.push(("a file as a parent", orphan_parent, "parent is not a directory"));
    // Deep nesting is legal and must not blow any stack: 20,000 levels.
    let mut deep = base.clone();
    for d in 0..20_000u32 {
        deep.inodes.push(dir_inode.clone());
        let parent = if d == 0 { 0 } else { d + 1 };
        deep.dirents.push(Dirent { parent, inode: d + 2, name: b"d".to_vec() });
    }
    deep.dirents.sort_by(|a, b| (a.parent, &a.name).cmp(&(b.parent, &b.name)));
    deep.objects[0].size = 5;
    cases.push(("20,000 nested directories, then a bad object", deep, "lies outside object"));

    for (what, m, expect) in cases {
        let repo = publish_manifest(dir.path(), &private, &m);
        let repo_s = repo.to_str().unwrap();
        let out = incfs(&["verify", repo_s, "--trust", public.to_str().unwrap()]);
        // verify reports a malformed manifest as the problem it found (exit 1).
        assert_eq!(out.status.code(), Some(1), "{what}: verify\n{}", text(&out.stderr));
        let said = text(&out.stdout) + &text(&out.stderr);
        assert!(said.contains(expect), "{what}: verify says {said}");

        let dest = dir.path().join("extract");
        let out = incfs(&["extract", repo_s, dest.to_str().unwrap(), "--trust", public.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{what}: extract");
        assert!(text(&out.stderr).contains(expect), "{what}: extract says {}", text(&out.stderr));
        assert!(!dest.exists() || fs::read_dir(&dest).unwrap().next().is_none(), "{what}: nothing extracted");

        let mnt = dir.path().join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        let _unmount = Unmount(mnt.clone());
        let t = Instant::now();
        let out = incfs(&[
            "mount",
            repo_s,
            mnt.to_str().unwrap(),
            "--trust",
            public.to_str().unwrap(),
            "--cache",
            dir.path().join("cache").to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{what}: mount");
        assert!(text(&out.stderr).contains(expect), "{what}: mount says {}", text(&out.stderr));
        assert!(!is_mounted(&mnt), "{what}: nothing mounted");
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: refused promptly");
        assert_eq!(text(&out.stderr).trim().lines().count(), 1, "{what}: one line: {}", text(&out.stderr));
    }
}

/// Outcome of one read through a faulty network.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    eio: u64,
    etime: u64,
    slowest: Duration,
}

/// `reads` random reads of `files` through mount `m`, each checked byte for byte against `src`
/// and bounded in time; returns what happened.
fn random_reads(m: &Mount, src: &Path, files: &[String], reads: usize, seed: u64, bound: Duration) -> Tally {
    use std::os::unix::fs::FileExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    for n in 0..reads {
        let rel = &files[rng.gen_range(0..files.len())];
        let original = fs::read(src.join(rel)).unwrap();
        if original.is_empty() {
            continue;
        }
        let offset = rng.gen_range(0..original.len());
        let len = rng.gen_range(1..=(64 << 10)).min(original.len() - offset);
        let path = m.path(rel);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Instant::now();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; len];
            let r = fs::File::open(&path).and_then(|f| f.read_exact_at(&mut buf, offset as u64)).map(|_| buf);
            let _ = tx.send(r);
        });
        // A read that does not end within its bound (plus a margin) is a hang.
        let result = rx.recv_timeout(bound + Duration::from_secs(5)).unwrap_or_else(|_| {
            panic!("read {n} of {rel} at {offset}+{len} hung\n{}", m.log());
        });
        let took = t.elapsed();
        tally.slowest = tally.slowest.max(took);
        assert!(took <= bound, "read {n} of {rel} took {took:?} (bound {bound:?})");
        match result {
            Ok(buf) => {
                assert!(buf == original[offset..offset + len], "read {n}: WRONG BYTES from {rel} at {offset}+{len}");
                tally.ok += 1;
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => tally.eio += 1,
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => tally.etime += 1,
            Err(e) => panic!("read {n} of {rel}: undocumented error {e}"),
        }
    }
    tally
}

#[test]
fn randomized_network_faults_never_yield_a_wrong_byte_or_a_hang() {
    use common::faults::{FaultPlan, FaultProxy};
    let p = Published::new(tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    let port: u16 = serve.url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let files: Vec<String> = read_tree(&p.src).into_iter().map(|(rel, _)| rel.to_string_lossy().into_owned()).collect();
    let read_timeout = Duration::from_secs(2);
    // A read waits at most --read-timeout; the rest is slack for a loaded machine.
    let bound = read_timeout + Duration::from_millis(2500);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xfa017);
    let (mut injected, mut bad_blocks, mut checked) = (0u64, 0u64, 0u64);
    let mut flipped = 0u64;
    let scenarios = env_count("INCFS_FAULT_SCENARIOS", 6) as u64;
    for scenario in 0..scenarios {
        // Each scenario draws its own mix; every sixth adds a healthy mirror and only the faults
        // a mirror can answer for (errors, not wrong bytes or stalls).
        let with_mirror = scenario % 6 == 5;
        let mut plan = FaultPlan {
            status_5xx: rng.gen_range(0.0..0.15),
            status_429: rng.gen_range(0.0..0.1),
            burst_len: rng.gen_range(1..4),
            reset_mid_body: rng.gen_range(0.0..0.1),
            truncate_body: rng.gen_range(0.0..0.1),
            wrong_content_range: rng.gen_range(0.0..0.1),
            flip_bit: rng.gen_range(0.0..0.15),
            stall: rng.gen_range(0.0..0.04),
            delay: rng.gen_range(0.0..0.3),
            delay_max: Duration::from_millis(rng.gen_range(1..300)),
            only_path_containing: Some("objects/".into()),
        };
        if with_mirror {
            (plan.flip_bit, plan.stall, plan.wrong_content_range) = (0.0, 0.0, 0.0);
        }
        let proxy = FaultProxy::start(port, scenario, plan.clone());
        let name = format!("faults-{scenario}");
        let timeout = format!("{}ms", read_timeout.as_millis());
        let mut extra = vec!["--read-timeout", &timeout, "--passthrough", "off"];
        if with_mirror {
            extra.extend(["--source", serve.url.as_str()]);
        }
        let m = p.mount(&proxy.url(), &name, &extra);
        let tally = random_reads(&m, &p.src, &files, 30, scenario, bound);
        let counts = proxy.counts();
        let s = m.status();
        println!("scenario {scenario}: {plan:?}\n  reads {tally:?}\n  injected {counts:?}");
        if with_mirror {
            assert_eq!(tally.ok, 30, "a healthy mirror answers for a failing primary: {tally:?}\n{}", m.log());
        }
        // Counters agree with what happened: every failed read the test saw was counted.
        let failed: u64 =
            ["reads_failed_timeout", "reads_failed_verification", "reads_failed_source", "reads_failed_other"]
                .iter()
                .map(|k| s[k].as_u64().unwrap())
                .sum();
        assert!(failed >= tally.eio + tally.etime, "{s}");
        assert!(s["reads_failed_timeout"].as_u64().unwrap() >= tally.etime, "{s}");
        let bad = s["blocks_bad"].as_u64().unwrap();
        assert!(bad <= counts.flipped, "bad blocks come only from flipped bits: {bad} > {}", counts.flipped);

        // Healed, everything reads back exactly, without a remount: at once, or once the
        // requests of the faulty period have ended (each is bounded by 2 x --read-timeout + 1 s)
        // and the one-second failure memory has passed.
        proxy.set_plan(FaultPlan::default());
        let healed = Instant::now();
        for rel in &files {
            let got = loop {
                match fs::read(m.path(rel)) {
                    Ok(b) => break b,
                    Err(e) if healed.elapsed() < read_timeout * 2 + Duration::from_secs(3) => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("{rel} after healing: {e}\n{}", m.log()),
                }
            };
            assert_eq!(got, fs::read(p.src.join(rel)).unwrap(), "{rel} after healing");
        }
        injected += counts.requests - counts.passed;
        flipped += counts.flipped;
        bad_blocks += bad;
        checked += tally.ok + tally.eio + tally.etime;
    }
    println!("faults injected {injected} ({flipped} flipped bits, {bad_blocks} bad blocks caught); {checked} reads checked; 0 wrong bytes, 0 hangs");
    assert!(injected > 20, "the scenarios injected faults: {injected}");
    assert!(flipped == 0 || bad_blocks > 0, "flipped bits were caught by verification");
}
