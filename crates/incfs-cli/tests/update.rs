//! New versions applied to a live mount: `incfs update` and `incfs mount --follow`.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn update_switches_a_live_mount_fetching_only_what_changed() {
    let held_v1 = random_bytes(30, 2 * MIB);
    let p = Published::new(
        |src| {
            fs::write(src.join("changed.bin"), random_bytes(10, MIB)).unwrap();
            fs::write(src.join("same.bin"), random_bytes(20, MIB)).unwrap();
            fs::write(src.join("held.bin"), &held_v1).unwrap();
            fs::write(src.join("removed.txt"), "gone in v2\n").unwrap();
            fs::create_dir(src.join("dir")).unwrap();
            fs::write(src.join("dir/keep.txt"), "kept\n").unwrap();
        },
        &[],
    );
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "update", &[]);
    assert_eq!(fs::read(m.path("changed.bin")).unwrap(), random_bytes(10, MIB));
    assert_eq!(fs::read(m.path("same.bin")).unwrap(), random_bytes(20, MIB));
    assert_eq!(names(&m.dir), ["changed.bin", "dir", "held.bin", "removed.txt", "same.bin"]);
    let same_ino = fs::metadata(m.path("same.bin")).unwrap().ino();
    let changed_ino = fs::metadata(m.path("changed.bin")).unwrap().ino();
    // A reader that keeps v1's file open across the switch, having read only its first block.
    let mut held = fs::File::open(m.path("held.bin")).unwrap();
    let mut first = vec![0u8; 4096];
    held.read_exact(&mut first).unwrap();
    assert_eq!(first, held_v1[..4096]);

    // v2: one block of changed.bin differs, added.txt is new, removed.txt is gone, held.bin is
    // all new, the rest is identical.
    let mut changed_v2 = random_bytes(10, MIB);
    changed_v2[100 * 4096..101 * 4096].copy_from_slice(&random_bytes(11, 4096));
    fs::write(p.src.join("changed.bin"), &changed_v2).unwrap();
    fs::write(p.src.join("added.txt"), "new in v2\n").unwrap();
    fs::remove_file(p.src.join("removed.txt")).unwrap();
    fs::write(p.src.join("held.bin"), random_bytes(31, 2 * MIB)).unwrap();
    pack(&p.src, &p.repo, &p.private, &[]);

    let before = m.stat("bytes_fetched");
    let out = incfs_ok(&["update", m.dir.to_str().unwrap()]);
    assert!(out.contains("version 1 -> 2: 1 added, 1 removed, 2 changed"), "{out}");
    assert!(out.contains("+ added.txt") && out.contains("- removed.txt") && out.contains("~ changed.bin"), "{out}");
    assert_eq!(m.stat("version"), 2);
    let manifest_bytes = m.stat("bytes_fetched") - before;

    // The open file reads v1 to its end, never a mix.
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, held_v1[4096..], "a file opened before the switch must keep reading its version");
    drop(held);

    // The changed file shows v2 and costs its new Merkle tree and block map (12 KiB for 256
    // blocks) plus the one changed block, not the file.
    let before = m.stat("bytes_fetched");
    assert_eq!(fs::read(m.path("changed.bin")).unwrap(), changed_v2);
    let cost = m.stat("bytes_fetched") - before;
    assert!((4096..=12 * 1024 + 4096 + 1024).contains(&cost), "changed file cost {cost} bytes of network");
    println!("after update: the 1 MiB file changed in one block cost {cost} bytes of network");
    assert_ne!(fs::metadata(m.path("changed.bin")).unwrap().ino(), changed_ino);
    // The unchanged file is the same inode (the kernel keeps its cache) and costs nothing.
    assert_eq!(fs::metadata(m.path("same.bin")).unwrap().ino(), same_ino);
    let before = m.stat("bytes_fetched");
    assert_eq!(fs::read(m.path("same.bin")).unwrap(), random_bytes(20, MIB));
    assert_eq!(m.stat("bytes_fetched"), before);
    assert_eq!(fs::read_to_string(m.path("added.txt")).unwrap(), "new in v2\n");
    assert_eq!(fs::read(m.path("held.bin")).unwrap(), random_bytes(31, 2 * MIB));
    let err = fs::read(m.path("removed.txt")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(names(&m.dir), ["added.txt", "changed.bin", "dir", "held.bin", "same.bin"]);
    assert_eq!(fs::read_to_string(m.path("dir/keep.txt")).unwrap(), "kept\n");
    assert!(manifest_bytes == 0, "the switch itself fetched {manifest_bytes} bytes of data");

    // Going back is refused unless asked for.
    let out = incfs(&["update", m.dir.to_str().unwrap(), "--to", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("refusing the rollback"), "{}", text(&out.stderr));
    assert_eq!(m.stat("version"), 2);
    assert_eq!(fs::read_to_string(m.path("added.txt")).unwrap(), "new in v2\n");
    let out = incfs_ok(&["update", m.dir.to_str().unwrap(), "--to", "1", "--allow-rollback"]);
    assert!(out.contains("version 2 -> 1"), "{out}");
    assert_eq!(fs::read(m.path("changed.bin")).unwrap(), random_bytes(10, MIB));
    assert_eq!(fs::read_to_string(m.path("removed.txt")).unwrap(), "gone in v2\n");
    assert!(!m.path("added.txt").exists());
    // The same version again is no switch.
    let out = incfs_ok(&["update", m.dir.to_str().unwrap(), "--to", "1"]);
    assert!(out.contains("already serves version 1"), "{out}");
    assert_eq!(m.stat("reads_failed_verification"), 0);
}

#[test]
fn follow_switches_to_a_newly_published_version() {
    let p = Published::new(|src| fs::write(src.join("a.txt"), "v1\n").unwrap(), &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "follow", &["--follow", "200ms"]);
    assert_eq!(fs::read_to_string(m.path("a.txt")).unwrap(), "v1\n");
    fs::write(p.src.join("a.txt"), "v2\n").unwrap();
    fs::write(p.src.join("b.txt"), "b\n").unwrap();
    pack(&p.src, &p.repo, &p.private, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.stat("version") != 2 {
        assert!(Instant::now() < deadline, "--follow did not switch to version 2:\n{}", m.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fs::read_to_string(m.path("a.txt")).unwrap(), "v2\n");
    assert_eq!(fs::read_to_string(m.path("b.txt")).unwrap(), "b\n");
}

#[test]
fn update_refuses_another_image_and_bad_signatures() {
    let p = Published::new(|src| fs::write(src.join("a.txt"), "v1\n").unwrap(), &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "refuse", &[]);
    // v2 signed by a key the mount does not trust.
    let (other, _) = openssl_key(p.dir.path(), "other", &["-algorithm", "ed25519"]);
    fs::write(p.src.join("a.txt"), "v2\n").unwrap();
    pack(&p.src, &p.repo, &other, &[]);
    let out = incfs(&["update", m.dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("error:"), "{}", text(&out.stderr));
    assert_eq!(m.stat("version"), 1);
    assert_eq!(fs::read_to_string(m.path("a.txt")).unwrap(), "v1\n");
    // A version that does not exist.
    let out = incfs(&["update", m.dir.to_str().unwrap(), "--to", "9"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(m.stat("version"), 1);
}
