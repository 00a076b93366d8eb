//! Compression dictionaries (`incfs pack --dictionary`, manifest format 4): the output is
//! deterministic, reads back byte-exact through verify, extract and a mount (online, then offline
//! from the cache), a new version reuses the dictionary and stores only what changed, and a
//! dictionary that does not match its signed digest is refused with a clear error.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// A tree of text files (what a dictionary is for): 80 files of generated lines.
fn text_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("docs")).unwrap();
    let words = ["block", "image", "mount", "fetch", "verify", "tree", "cache", "read", "version", "publish", "kernel"];
    let mut x = 7u64;
    for i in 0..80 {
        let mut text = String::new();
        for j in 0..(60 + i % 50) {
            text.push_str(&format!("{i:03}.{j:03}"));
            for _ in 0..(4 + j % 9) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                text.push(' ');
                text.push_str(words[(x >> 33) as usize % words.len()]);
            }
            text.push('\n');
        }
        fs::write(src.join(format!("docs/{i:03}.txt")), text).unwrap();
    }
    fs::write(src.join("random.bin"), random_bytes(3, 100_000)).unwrap();
    src
}

fn objects(repo: &Path) -> Vec<PathBuf> {
    let mut o: Vec<_> = fs::read_dir(repo.join("objects")).unwrap().map(|e| e.unwrap().path()).collect();
    o.sort();
    o
}

/// The dictionary objects: 64 KiB each (the only objects of that exact size here).
fn dictionaries(repo: &Path) -> Vec<PathBuf> {
    objects(repo).into_iter().filter(|p| fs::metadata(p).unwrap().len() == 64 << 10).collect()
}

#[test]
fn a_dictionary_image_is_deterministic_and_reads_back_online_and_offline() {
    let dir = tempdir();
    let src = text_tree(dir.path());
    let (key, public) = ed25519_key(dir.path());
    let (repo, again) = (dir.path().join("repo"), dir.path().join("again"));
    let out = pack(&src, &repo, &key, &["--dictionary"]);
    assert!(out.contains("dictionary:") && out.contains("trained on this tree"), "{out}");
    pack(&src, &again, &key, &["--dictionary"]);
    diff_r(&repo, &again);
    assert_eq!(fs::read(repo.join("manifest")).unwrap()[8], 4, "dictionaries are manifest format 4");
    assert_eq!(dictionaries(&repo).len(), 1);
    // Smaller than without one (text: the point of a dictionary).
    let plain = dir.path().join("plain");
    pack(&src, &plain, &key, &[]);
    let with = dir_bytes(&repo.join("objects")) - (64 << 10);
    assert!(with < dir_bytes(&plain.join("objects")), "{with} vs {}", dir_bytes(&plain.join("objects")));

    let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
    incfs_ok(&["verify", r, "--trust", t, "-q"]);
    let out = dir.path().join("out");
    incfs_ok(&["extract", r, out.to_str().unwrap(), "--trust", t, "-q"]);
    diff_r(&src, &out);

    let cache = dir.path().join("cache");
    let server = IncfsServer::start(&repo);
    let url = server.url.clone();
    {
        let m = Mount::start(&url, &dir.path().join("mnt"), &public, &cache, &[]);
        diff_r(&m.dir, &src);
        assert_eq!(m.stat("blocks_bad"), 0);
    }
    // Every block is cached, and so is the dictionary (which `gc` keeps: the image lists it):
    // the server is not needed any more (the cache is found by the source's name, so the same
    // URL, now with nothing behind it).
    incfs_ok(&["cache", "gc", "--cache", cache.to_str().unwrap()]);
    drop(server);
    let m = Mount::start(&url, &dir.path().join("mnt"), &public, &cache, &["--offline"]);
    diff_r(&m.dir, &src);
    assert_eq!(m.stat("fetch_requests"), 0);
    drop(m);
    // fsck decodes dictionary blocks too (the dictionary from the cache): all checked, none damaged.
    let fsck = incfs_ok(&["fsck", cache.to_str().unwrap()]);
    let blocks = fsck.lines().find(|l| l.starts_with("blocks:")).unwrap_or_default().to_string();
    let checked: u64 = blocks.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(checked > 100 && blocks.contains(" 0 damaged"), "{fsck}");
}

#[test]
fn a_new_version_reuses_the_dictionary_and_a_new_one_leaves_old_blocks_readable() {
    let dir = tempdir();
    let src = text_tree(dir.path());
    let (key, public) = ed25519_key(dir.path());
    let repo = dir.path().join("repo");
    pack(&src, &repo, &key, &["--dictionary"]);
    let before = dir_bytes(&repo.join("objects"));

    fs::write(src.join("docs/007.txt"), "one file changed\n".repeat(100)).unwrap();
    let out = pack(&src, &repo, &key, &["--dictionary"]);
    assert!(out.contains("the repository's, reused"), "{out}");
    assert_eq!(dictionaries(&repo).len(), 1, "no new dictionary");
    let added = dir_bytes(&repo.join("objects")) - before;
    assert!(added < 16 << 10, "version 2 added {added} bytes");

    // A third version with a dictionary of its own: blocks of the first keep theirs.
    fs::write(src.join("docs/008.txt"), "another change\n".repeat(100)).unwrap();
    pack(&src, &repo, &key, &["--new-dictionary", "--dictionary"]);
    assert_eq!(dictionaries(&repo).len(), 2);
    // Trained again on the same tree: the same dictionary, not listed twice.
    let out = pack(&src, &repo, &key, &["--new-dictionary", "--dictionary"]);
    assert!(out.contains("the repository's, reused"), "{out}");
    assert_eq!(dictionaries(&repo).len(), 2);
    // Without --dictionary, new blocks are plain zstd; the table keeps both dictionaries.
    fs::write(src.join("docs/009.txt"), "a plain change\n".repeat(100)).unwrap();
    pack(&src, &repo, &key, &[]);
    let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
    // Pruning to the newest version keeps every dictionary it lists.
    incfs_ok(&["prune", r, "--keep", "1"]);
    assert_eq!(dictionaries(&repo).len(), 2);
    incfs_ok(&["verify", r, "--trust", t, "-q"]);
    let out = dir.path().join("out");
    incfs_ok(&["extract", r, out.to_str().unwrap(), "--trust", t, "-q"]);
    diff_r(&src, &out);
    let server = IncfsServer::start(&repo);
    let m = Mount::start(&server.url, &dir.path().join("mnt"), &public, &dir.path().join("cache"), &[]);
    diff_r(&m.dir, &src);
}

#[test]
fn a_dictionary_that_does_not_match_its_digest_is_refused() {
    let dir = tempdir();
    let src = text_tree(dir.path());
    let (key, public) = ed25519_key(dir.path());
    let repo = dir.path().join("repo");
    pack(&src, &repo, &key, &["--dictionary"]);
    let dict = &dictionaries(&repo)[0];
    let mut bytes = fs::read(dict).unwrap();
    bytes[40_000] ^= 1;
    fs::write(dict, &bytes).unwrap();

    let (r, t) = (repo.to_str().unwrap(), public.to_str().unwrap());
    let out = incfs(&["extract", r, dir.path().join("out").to_str().unwrap(), "--trust", t, "-q"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("compression dictionary") && err.contains("do not match"), "{err}");

    let server = IncfsServer::start(&repo);
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let cache = dir.path().join("cache");
    let out = incfs(&[
        "mount",
        &server.url,
        mnt.to_str().unwrap(),
        "--trust",
        t,
        "--cache",
        cache.to_str().unwrap(),
        "--background",
        "off",
    ]);
    let _guard = Unmount(mnt.clone());
    assert!(!out.status.success(), "mounted with a substituted dictionary");
    let err = text(&out.stderr);
    assert!(err.contains("compression dictionary") && err.contains("do not match"), "{err}");
    assert!(!is_mounted(&mnt));

    // A dictionary is for zstd.
    let out = incfs(&[
        "pack",
        src.to_str().unwrap(),
        dir.path().join("r2").to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--dictionary",
        "--compression",
        "lz4",
        "-q",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("a dictionary is for zstd"), "{}", text(&out.stderr));
}
