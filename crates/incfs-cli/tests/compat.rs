//! Repositories packed by earlier releases still read, and a repository of a newer format is
//! refused with a message asking for an upgrade (fixtures in `tests/fixtures/`, never
//! regenerated). A client from before format 3 refuses a format-3 repository the same way
//! ("manifest format 3 is newer than this incfs reads ... upgrade incfs"), and one from before
//! dictionaries a format-4 repository ("manifest format 4 is newer ...").

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-2026-12")
}

fn dictionary_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-2026-12-dict")
}

fn compact_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-2026-12-compact")
}

/// Every file `digests` lists (lines of "DIGEST PATH") has that `incfs digest` under `dest`.
fn check_digests(dest: &Path, digests: &Path) {
    for line in fs::read_to_string(digests).unwrap().lines() {
        let (digest, path) = line.split_once(' ').unwrap();
        let got = incfs_ok(&["digest", dest.join(path).to_str().unwrap()]);
        assert!(got.starts_with(digest), "{path}: {got} instead of {digest}");
    }
}

#[test]
fn a_repository_packed_in_2026_12_verifies_extracts_and_mounts() {
    let (repo, public) = (fixture().join("repo"), fixture().join("publisher.pub.pem"));
    let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
    assert_eq!(fs::read(repo.join("versions/1.manifest")).unwrap()[8], 1, "version 1 is format 1");
    assert_eq!(fs::read(repo.join("manifest")).unwrap()[8], 2, "version 2 is format 2");
    for v in ["1", "2"] {
        let out = incfs_ok(&["verify", r, "--trust", t, "--version", v, "-q"]);
        assert!(out.contains(&format!("OK: fixture version {v}")), "{out}");
    }
    let dir = tempdir();
    let dest = dir.path().join("v2");
    incfs_ok(&["extract", r, dest.to_str().unwrap(), "--trust", t, "-q"]);
    check_digests(&dest, &fixture().join("v2.digests"));
    assert_eq!(fs::read_link(dest.join("link")).unwrap(), Path::new("hello.txt"));
    let dest1 = dir.path().join("v1");
    incfs_ok(&["extract", r, dest1.to_str().unwrap(), "--trust", t, "--version", "1", "-q"]);
    assert_eq!(fs::read_to_string(dest1.join("hello.txt")).unwrap(), "hello from a repository packed in 2026-12\n");

    let m = Mount::start(r, &dir.path().join("mnt"), &public, &dir.path().join("cache"), &[]);
    diff_r(&m.dir, &dest);
}

#[test]
fn a_format_3_repository_with_compact_maps_verifies_extracts_and_mounts() {
    let (repo, public) = (compact_fixture().join("repo"), compact_fixture().join("publisher.pub.pem"));
    let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
    assert_eq!(fs::read(repo.join("manifest")).unwrap()[8], 3, "format 3");
    let out = incfs_ok(&["verify", r, "--trust", t, "-q"]);
    assert!(out.contains("OK: fixture version 1"), "{out}");
    let dir = tempdir();
    let dest = dir.path().join("out");
    incfs_ok(&["extract", r, dest.to_str().unwrap(), "--trust", t, "-q"]);
    check_digests(&dest, &compact_fixture().join("digests"));
    let sparse = fs::read(dest.join("sparse.bin")).unwrap();
    assert_eq!(sparse.len(), 64 << 20);
    assert!(sparse[..10 << 20].iter().chain(&sparse[(10 << 20) + 8192..]).all(|&b| b == 0), "a hole but 8 KiB");

    let m = Mount::start(r, &dir.path().join("mnt"), &public, &dir.path().join("cache"), &[]);
    diff_r(&m.dir, &dest);
}

#[test]
fn a_format_4_repository_with_a_dictionary_verifies_extracts_and_mounts() {
    let (repo, public) = (dictionary_fixture().join("repo"), dictionary_fixture().join("publisher.pub.pem"));
    let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
    assert_eq!(fs::read(repo.join("manifest")).unwrap()[8], 4, "format 4");
    let out = incfs_ok(&["verify", r, "--trust", t, "-q"]);
    assert!(out.contains("OK: fixture version 1"), "{out}");
    let dir = tempdir();
    let dest = dir.path().join("out");
    incfs_ok(&["extract", r, dest.to_str().unwrap(), "--trust", t, "-q"]);
    check_digests(&dest, &dictionary_fixture().join("digests"));
    let m = Mount::start(r, &dir.path().join("mnt"), &public, &dir.path().join("cache"), &[]);
    diff_r(&m.dir, &dest);
    assert_eq!(m.stat("blocks_bad"), 0);
}

#[test]
fn a_repository_of_a_newer_format_is_refused_with_a_request_to_upgrade() {
    let dir = tempdir();
    let repo = dir.path().join("repo");
    run("cp", &["-a", fixture().join("repo").to_str().unwrap(), repo.to_str().unwrap()]);
    let mut manifest = fs::read(repo.join("manifest")).unwrap();
    manifest[8] = 5; // the format a later release might write
    fs::write(repo.join("manifest"), &manifest).unwrap();
    let public = fixture().join("publisher.pub.pem");
    let dest = dir.path().join("out");
    let out = incfs(&["extract", repo.to_str().unwrap(), dest.to_str().unwrap(), "--trust", public.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("manifest format 5 is newer than this incfs reads") && err.contains("upgrade incfs"), "{err}");
}
