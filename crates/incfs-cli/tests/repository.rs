//! Packing real and hostile trees: what goes in comes out, byte for byte and bit for bit of
//! metadata; the same input gives the same repository; data is stored once.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tree with every kind of entry and awkward name incfs must handle.
fn hostile_tree(root: &Path) {
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    let odd_names: [&[u8]; 7] = [
        b"new\nline",
        b"\xff\xfe not utf-8",
        b" leading space",
        b"-dash",
        b"tab\tname",
        "é文件".as_bytes(),
        &[b'x'; 255],
    ];
    for (i, n) in odd_names.iter().enumerate() {
        fs::write(root.join(std::ffi::OsStr::from_bytes(n)), format!("odd name {i}\n")).unwrap();
    }
    let mut deep = root.to_path_buf();
    for _ in 0..100 {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom.txt"), "deep\n").unwrap();
    fs::write(root.join("empty"), "").unwrap();
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"island", 4 << 20).unwrap();
    fs::write(root.join("data.bin"), random_bytes(1, 300_000)).unwrap();
    fs::hard_link(root.join("data.bin"), root.join("empty-dir/../hard1")).unwrap();
    fs::hard_link(root.join("data.bin"), root.join("hard2")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    symlink("../../outside/tree", root.join("escaping-link")).unwrap();
    symlink("no/such/target", root.join("dangling-link")).unwrap();
    run("mkfifo", &[root.join("fifo").to_str().unwrap()]);
    run("mknod", &[root.join("null-dev").to_str().unwrap(), "c", "1", "3"]);
    let _ = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
    fs::write(root.join("setuid"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("empty-dir"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::lchown(root.join("data.bin"), Some(1234), Some(5678)).unwrap();
    xattr::set(root.join("data.bin"), "user.incfs.test", b"value\0with nul").unwrap();
    let t = filetime::FileTime::from_unix_time(1_700_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("setuid"), t).unwrap();
    filetime::set_symlink_file_times(root.join("abs-link"), t, t).unwrap();
}

fn repo_bytes(repo: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    read_tree(repo).into_iter().filter(|(p, _)| !p.to_string_lossy().starts_with('.')).collect()
}

#[test]
fn hostile_tree_round_trips_exactly() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    hostile_tree(&src);
    let (private, public) = ed25519_key(dir.path());
    let repo = dir.path().join("repo");
    let out = Command::new(incfs_bin())
        .args(["pack", src.to_str().unwrap(), repo.to_str().unwrap(), "--key", private.to_str().unwrap(), "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("skipping socket"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 skipped (sockets)"), "{}", text(&out.stdout));
    // Holes cost no data: the repository holds the 300 kB of real data, the 8 MiB sparse file's
    // tree and block map (~100 kB) and two copies of the manifest.
    let stored: u64 = repo_bytes(&repo).iter().map(|(_, b)| b.len() as u64).sum();
    assert!(stored < 450_000, "stored {stored} bytes");

    let copy = dir.path().join("copy");
    incfs_ok(&["extract", repo.to_str().unwrap(), copy.to_str().unwrap(), "--trust", public.to_str().unwrap(), "-q"]);
    let (a, b) = (describe(&src), describe(&copy));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y);
    }
    // Holes stay holes on extraction too.
    assert!(fs::metadata(copy.join("sparse")).unwrap().blocks() * 512 < 1 << 20);
}

#[test]
fn same_tree_same_key_gives_identical_repository() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    hostile_tree(&src);
    for (name, args) in [
        ("ed", &["-algorithm", "ed25519"][..]),
        ("ec", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..]),
        ("rsa", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..]),
    ] {
        let (private, _) = openssl_key(dir.path(), name, args);
        let a = dir.path().join(format!("{name}-a"));
        let b = dir.path().join(format!("{name}-b"));
        for compression in ["zstd", "lz4"] {
            let _ = fs::remove_dir_all(&a);
            let _ = fs::remove_dir_all(&b);
            pack(&src, &a, &private, &["--compression", compression, "--object-mib", "1"]);
            pack(&src, &b, &private, &["--compression", compression, "--object-mib", "1"]);
            let (ra, rb) = (repo_bytes(&a), repo_bytes(&b));
            assert!(ra.len() >= 3);
            assert!(ra == rb, "{name}/{compression}: repositories differ");
        }
    }
}

#[test]
fn unreadable_file_is_a_clear_error_naming_it() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("sub/ok.txt"), "fine").unwrap();
    fs::write(src.join("sub/secret.bin"), "no peeking").unwrap();
    fs::set_permissions(src.join("sub/secret.bin"), fs::Permissions::from_mode(0o000)).unwrap();
    let (private, _) = ed25519_key(dir.path());
    fs::set_permissions(&private, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let repo = dir.path().join("repo");
    fs::create_dir(&repo).unwrap();
    fs::set_permissions(&repo, fs::Permissions::from_mode(0o777)).unwrap();
    // Root reads everything: run the pack as nobody.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", incfs_bin(), "pack"])
        .args([&src, &repo])
        .args(["--key", private.to_str().unwrap(), "-q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("sub/secret.bin: Permission denied"), "{err}");
    assert!(!repo.join("manifest").exists(), "a failed pack must not publish");
}

fn object_bytes(repo: &Path) -> u64 {
    fs::read_dir(repo.join("objects")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

#[test]
fn duplicates_and_new_versions_store_only_new_blocks() {
    let dir = tempdir();
    let (private, public) = ed25519_key(dir.path());
    let (repo, v1, v2) = (dir.path().join("repo"), dir.path().join("v1"), dir.path().join("v2"));
    fs::create_dir(&v1).unwrap();
    let a = random_bytes(9, 1 << 20);
    fs::write(v1.join("a.bin"), &a).unwrap();
    fs::write(v1.join("copy-of-a.bin"), &a).unwrap();
    fs::write(v1.join("c.txt"), "removed in v2\n").unwrap();
    let out = pack(&v1, &repo, &private, &[]);
    let after_v1 = object_bytes(&repo);
    assert!(after_v1 < (1 << 20) + 64 * 1024, "duplicate stored twice: {after_v1} bytes\n{out}");
    assert!(out.contains("1.00 MiB by deduplication"), "{out}");

    // v2: one block of a.bin changed, c.txt removed, new.txt added.
    run("cp", &["-a", v1.to_str().unwrap(), v2.to_str().unwrap()]);
    let mut changed = a.clone();
    changed[100_000] ^= 0xff;
    fs::write(v2.join("a.bin"), &changed).unwrap();
    fs::remove_file(v2.join("c.txt")).unwrap();
    fs::write(v2.join("new.txt"), "added in v2\n").unwrap();
    let out = pack(&v2, &repo, &private, &[]);
    assert!(out.contains("version 2"), "{out}");
    let growth = object_bytes(&repo) - after_v1;
    // One 4 KiB block, a.bin's new tree and block map (~12 KiB), new.txt: nothing else.
    assert!(growth < 24 * 1024, "v2 stored {growth} new bytes\n{out}");
    assert_eq!(fs::read(repo.join("manifest")).unwrap(), fs::read(repo.join("versions/2.manifest")).unwrap());

    let pubkey = public.to_str().unwrap();
    for (version, tree) in [("1", &v1), ("2", &v2)] {
        let out = incfs(&["verify", repo.to_str().unwrap(), "--trust", pubkey, "--version", version, "-q"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let copy = dir.path().join(format!("copy{version}"));
        incfs_ok(&[
            "extract",
            repo.to_str().unwrap(),
            copy.to_str().unwrap(),
            "--trust",
            pubkey,
            "--version",
            version,
            "-q",
        ]);
        assert_eq!(read_tree(&copy), read_tree(tree));
    }

    // Versions only grow.
    let out = incfs(&[
        "pack",
        v2.to_str().unwrap(),
        repo.to_str().unwrap(),
        "--key",
        private.to_str().unwrap(),
        "--version",
        "2",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("version 2 is not newer than the repository's latest version 2"),
        "{}",
        text(&out.stderr)
    );
}

fn python_stdlib() -> PathBuf {
    let out = run("python3", &["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"]);
    PathBuf::from(out.trim())
}

#[test]
fn python_stdlib_round_trips_through_incfs_serve_and_nginx() {
    let dir = tempdir();
    let src = dir.path().join("stdlib");
    fs::create_dir(&src).unwrap();
    // A private copy, so that nothing writes .pyc files into it while the test runs.
    let tar = format!(
        "tar -C '{}' --exclude=./site-packages --exclude=./test -cf - . | tar -C '{}' -xf -",
        python_stdlib().display(),
        src.display()
    );
    run("sh", &["-c", &tar]);
    assert!(src.join("os.py").is_file());
    let (private, public) = ed25519_key(dir.path());
    let repo = dir.path().join("repo");
    pack(&src, &repo, &private, &[]);

    let serve = IncfsServer::start(&repo);
    let nginx = Nginx::start(&repo);
    for (name, url) in [("incfs-serve", &serve.url), ("nginx", &nginx.url)] {
        let copy = dir.path().join(format!("copy-{name}"));
        incfs_ok(&["extract", url, copy.to_str().unwrap(), "--trust", public.to_str().unwrap(), "-q"]);
        let diff = Command::new("diff").args(["-r", "--no-dereference"]).args([&src, &copy]).output().unwrap();
        assert!(diff.status.success(), "{name}: diff -r found differences:\n{}", text(&diff.stdout));
        let out = incfs(&["verify", url, "--trust", public.to_str().unwrap(), "-q"]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
}

#[test]
fn prune_removes_old_versions_and_only_their_objects() {
    let dir = tempdir();
    let (private, public) = ed25519_key(dir.path());
    let (repo, src) = (dir.path().join("repo"), dir.path().join("src"));
    let pubkey = public.to_str().unwrap();
    fs::create_dir(&src).unwrap();
    // v1: a.bin alone (its own object); v2: a.bin replaced, b.bin added; v3: c.txt added.
    fs::write(src.join("a.bin"), random_bytes(1, 1 << 20)).unwrap();
    pack(&src, &repo, &private, &["--compression", "none"]);
    fs::write(src.join("a.bin"), random_bytes(2, 1 << 20)).unwrap();
    fs::write(src.join("b.bin"), random_bytes(3, 300_000)).unwrap();
    pack(&src, &repo, &private, &["--compression", "none"]);
    fs::write(src.join("c.txt"), "v3\n").unwrap();
    pack(&src, &repo, &private, &["--compression", "none"]);
    let before = object_bytes(&repo);

    let out = incfs_ok(&["prune", repo.to_str().unwrap(), "--keep", "2", "--dry-run"]);
    assert!(out.contains("kept versions 2, 3; would remove versions 1 and 1 objects"), "{out}");
    assert_eq!(object_bytes(&repo), before);
    let out = incfs_ok(&["prune", repo.to_str().unwrap(), "--keep", "2"]);
    assert!(out.contains("removed versions 1 and 1 objects"), "{out}");
    let freed = before - object_bytes(&repo);
    assert!((1 << 20..(1 << 20) + 64 * 1024).contains(&freed), "freed {freed} bytes");
    assert!(!repo.join("versions/1.manifest").exists());

    // The kept versions verify and extract whole; the removed one is gone.
    for version in ["2", "3"] {
        let out = incfs(&["verify", repo.to_str().unwrap(), "--trust", pubkey, "--version", version, "-q"]);
        assert!(out.status.success(), "version {version}: {}", text(&out.stdout));
    }
    let out = incfs(&["verify", repo.to_str().unwrap(), "--trust", pubkey, "--version", "1", "-q"]);
    assert!(!out.status.success());
    let copy = dir.path().join("copy");
    incfs_ok(&["extract", repo.to_str().unwrap(), copy.to_str().unwrap(), "--trust", pubkey, "-q"]);
    assert_eq!(read_tree(&copy), read_tree(&src));
    // Packing goes on after a prune, reusing what is kept.
    fs::write(src.join("d.txt"), "v4\n").unwrap();
    let out = pack(&src, &repo, &private, &["--compression", "none"]);
    assert!(out.contains("version 4"), "{out}");
    let out = incfs(&["verify", repo.to_str().unwrap(), "--trust", pubkey, "-q"]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(object_bytes(&repo) - (before - freed) < 16 * 1024, "v4 stored more than d.txt");
}
