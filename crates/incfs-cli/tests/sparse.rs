//! Sparse and repetitive files cost a compact map (manifest format 3), not 48 bytes of metadata
//! per 4 KiB block: a 1 GiB file holding 1 MiB of data packs to kilobytes of metadata and reads
//! back byte-exact through verify, extract and a mount; a map that lies is never believed.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;

const MIB: u64 = 1 << 20;
/// Where the 1 MiB of data lies in the sparse file.
const DATA_AT: u64 = 300 * MIB;

/// `src/sparse.img` (1 GiB, 1 MiB of random data at 300 MiB), `src/repeat.bin` (16 MiB: one
/// random 4 KiB block over and over), `src/small.txt`; packed alone, so the one object holds the
/// sparse file's data first, then its map.
fn packed(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    let sparse = fs::File::create(src.join("sparse.img")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    sparse.write_all_at(&random_bytes(1, MIB as usize), DATA_AT).unwrap();
    fs::write(src.join("repeat.bin"), random_bytes(2, 4096).repeat(4096)).unwrap();
    fs::write(src.join("small.txt"), "hello\n").unwrap();
    let (key, public) = ed25519_key(dir);
    let repo = dir.join("repo");
    pack(&src, &repo, &key, &[]);
    (src, repo, public)
}

fn object(repo: &Path) -> PathBuf {
    let objects: Vec<_> = fs::read_dir(repo.join("objects")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(objects.len(), 1, "one object");
    objects[0].clone()
}

#[test]
fn a_sparse_gigabyte_costs_kilobytes_of_metadata_and_reads_back() {
    let dir = tempdir();
    let (src, repo, public) = packed(dir.path());
    assert_eq!(fs::read(repo.join("manifest")).unwrap()[8], 3, "compact maps are manifest format 3");
    // Data: 1 MiB (random, stored raw), one 4 KiB block for repeat.bin, 6 bytes; the rest is
    // metadata (a dense layout would take 12 MiB for the sparse file and 192 KiB for repeat.bin).
    let stored = fs::metadata(object(&repo)).unwrap().len();
    let metadata = stored - MIB - 4096 - 6;
    assert!(metadata < 64 * 1024, "{metadata} bytes of metadata");

    let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
    incfs_ok(&["verify", r, "--trust", t, "-q"]);
    let out = dir.path().join("out");
    incfs_ok(&["extract", r, out.to_str().unwrap(), "--trust", t, "-q"]);
    diff_r(&src, &out);

    let server = IncfsServer::start(&repo);
    // One cold block inside the data: the map, then the block's run (nothing else).
    let m = Mount::start(&server.url, &dir.path().join("mnt"), &public, &dir.path().join("cache"), &[]);
    let mut block = [0u8; 4096];
    let at = DATA_AT + 5 * 4096;
    fs::File::open(m.path("sparse.img")).unwrap().read_exact_at(&mut block, at).unwrap();
    assert_eq!(block[..], random_bytes(1, MIB as usize)[5 * 4096..6 * 4096]);
    let requests = m.stat("fetch_requests");
    assert!(requests <= 2, "{requests} requests for one cold block of a sparse file");
    run("cmp", &[m.path("sparse.img").to_str().unwrap(), src.join("sparse.img").to_str().unwrap()]);
    diff_r(&m.dir, &src);
    assert_eq!(m.stat("blocks_bad"), 0);

    // A new version changing one block stores that block and a new map: the rest is found
    // through the old version's map (deduplication reads compact maps too).
    let f = fs::OpenOptions::new().write(true).open(src.join("sparse.img")).unwrap();
    f.write_all_at(&random_bytes(3, 4096), DATA_AT + 8192).unwrap();
    let before = dir_bytes(&repo.join("objects"));
    let key = dir.path().join("ed25519.pem"); // made by packed()
    pack(&src, &repo, &key, &[]);
    let added = dir_bytes(&repo.join("objects")) - before;
    assert!(added < 4096 + 64 * 1024, "version 2 added {added} bytes");
    incfs_ok(&["verify", r, "--trust", t, "-q"]);
}

#[test]
fn a_lying_compact_map_is_never_believed() {
    let dir = tempdir();
    let (src, repo, public) = packed(dir.path());
    let object = object(&repo);
    let bytes = fs::read(&object).unwrap();
    // The sparse file's map: a run count (one run per distinct block), then runs of first
    // block, count, leaf hash and block record. Two lies: a leaf hash (the map no longer gives
    // the signed root), and a block record's offset (leaves right, so the map is taken, but the
    // record points at other bytes, which fail their leaf).
    let mut head = 256u64.to_le_bytes().to_vec();
    head.extend_from_slice(&(DATA_AT / 4096).to_le_bytes());
    let map = bytes.windows(head.len()).position(|w| w == head).expect("the sparse file's map");
    let leaf_byte = map + 8 + 16 + 3;
    let offset_byte = map + 8 + 48 + 8;
    let data = random_bytes(1, MIB as usize);
    for (lie, byte) in [("leaf", leaf_byte), ("record", offset_byte)] {
        let mut bad = bytes.clone();
        bad[byte] ^= 0x10;
        fs::write(&object, &bad).unwrap();
        let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
        let out = incfs(&["verify", r, "--trust", t, "-q"]);
        assert!(!out.status.success(), "{lie}: verify took a lying map");

        let server = IncfsServer::start(&repo);
        let cache = dir.path().join(format!("cache-{lie}"));
        let m = Mount::start(&server.url, &dir.path().join(format!("mnt-{lie}")), &public, &cache, &[]);
        let f = fs::File::open(m.path("sparse.img")).unwrap();
        let mut block = [0u8; 4096];
        let err = f.read_exact_at(&mut block, DATA_AT).expect_err("a read through a lying map fails");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{lie}: {err}");
        assert!(m.stat("blocks_bad") >= 1, "{lie}: the lie is counted");
        assert!(m.stat("reads_failed_verification") >= 1, "{lie}: as a verification failure");
        // What the lie does not touch is served right: another file, and for a lying record
        // (the map's leaves hold) the hole.
        assert_eq!(fs::read(m.path("small.txt")).unwrap(), b"hello\n");
        if lie == "record" {
            f.read_exact_at(&mut block, 0).unwrap();
            assert_eq!(block, [0u8; 4096]);
        }
        drop(m);
        drop(server);
        // Repaired at the source: the same cache serves the right bytes.
        fs::write(&object, &bytes).unwrap();
        let server = IncfsServer::start(&repo);
        let m = Mount::start(&server.url, &dir.path().join(format!("mnt-{lie}")), &public, &cache, &[]);
        let got = wait_for(std::time::Duration::from_secs(30), || {
            fs::File::open(m.path("sparse.img")).unwrap().read_exact_at(&mut block, DATA_AT).is_ok()
        });
        assert!(got, "{lie}: the repaired map is fetched again");
        assert_eq!(block[..], data[..4096]);
        run("cmp", &[m.path("sparse.img").to_str().unwrap(), src.join("sparse.img").to_str().unwrap()]);
    }
}

/// `pack` skips the holes of a sparse file (SEEK_DATA/SEEK_HOLE) rather than reading them: the
/// result is byte-identical to packing the same bytes written out in full.
#[test]
fn holes_pack_exactly_as_written_zeros() {
    let dir = tempdir();
    let size = 40 * MIB + 100; // the last block is short, and lies in a hole
    let pieces = [(5 * MIB + 10, random_bytes(4, 3000)), (20 * MIB, random_bytes(5, 6 * MIB as usize))];
    let mut full = vec![0u8; size as usize];
    for (at, bytes) in &pieces {
        full[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
    }
    let (key, _) = ed25519_key(dir.path());
    let mut repos = Vec::new();
    for name in ["holes", "zeros"] {
        let src = dir.path().join(name).join("src");
        fs::create_dir_all(&src).unwrap();
        let path = src.join("disk.img");
        if name == "holes" {
            let f = fs::File::create(&path).unwrap();
            f.set_len(size).unwrap();
            for (at, bytes) in &pieces {
                f.write_all_at(bytes, *at).unwrap();
            }
        } else {
            fs::write(&path, &full).unwrap();
        }
        run("touch", &["-d", "@1700000000", path.to_str().unwrap(), src.to_str().unwrap()]);
        let repo = dir.path().join(name).join("repo");
        pack(&src, &repo, &key, &["--name", "disk"]);
        repos.push(repo);
    }
    let allocated = fs::metadata(dir.path().join("holes/src/disk.img"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .unwrap();
    assert!(allocated * 512 < 8 * MIB, "the first file has holes ({allocated} sectors)");
    for rel in ["manifest", "objects"] {
        let out = std::process::Command::new("diff")
            .arg("-r")
            .arg(repos[0].join(rel))
            .arg(repos[1].join(rel))
            .output()
            .unwrap();
        assert!(out.status.success(), "{rel} differs");
    }
    let out = dir.path().join("out");
    let public = dir.path().join("ed25519.pub.pem");
    incfs_ok(&[
        "extract",
        repos[0].to_str().unwrap(),
        out.to_str().unwrap(),
        "--trust",
        public.to_str().unwrap(),
        "-q",
    ]);
    assert!(fs::read(out.join("disk.img")).unwrap() == full);
}
