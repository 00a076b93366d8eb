//! A manifest is tied to what was asked for: the image a source served before (or the one
//! named with `--image`), its version number, no rollback whichever trusted key signed it, and
//! its signed expiry (`pack --expires`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use incfs_format::Manifest;

/// `incfs mount` expected to fail: nothing may be left mounted; (stderr, exit code).
fn refused_mount(source: &str, mnt: &Path, trust: &[&Path], cache: &Path, extra: &[&str]) -> String {
    fs::create_dir_all(mnt).unwrap();
    let _unmount = Unmount(mnt.to_path_buf());
    let mut args = vec!["mount", source, mnt.to_str().unwrap(), "--cache", cache.to_str().unwrap()];
    for t in trust {
        args.extend(["--trust", t.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let out = incfs(&args);
    assert!(!is_mounted(mnt), "nothing may be mounted after a refusal");
    assert_eq!(out.status.code(), Some(2), "incfs {args:?} did not fail:\n{}", text(&out.stdout));
    let err = text(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

fn read_manifest(path: &Path) -> Manifest {
    let bytes = fs::read(path).unwrap();
    incfs_format::wire::decode(&incfs_format::wire::open_envelope(&bytes).unwrap()).unwrap()
}

/// Sign `m` with `key_pem` and publish it in `repo` as its version and as the latest.
fn publish(repo: &Path, key_pem: &Path, m: &Manifest) {
    let key = incfs_sign::SigningKey::from_pem(&fs::read_to_string(key_pem).unwrap()).unwrap();
    let signed = incfs_format::wire::encode_signed_part(m);
    let sig = key.sign(&signed);
    let bytes = incfs_format::wire::seal(signed, key.algorithm(), key.public_key().id(), &sig);
    fs::write(repo.join(format!("versions/{}.manifest", m.version)), &bytes).unwrap();
    fs::write(repo.join("manifest"), &bytes).unwrap();
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn a_source_that_starts_serving_another_image_is_refused_unless_named() {
    let dir = tempdir();
    let (private, public) = ed25519_key(dir.path());
    let tree = |name: &str| -> PathBuf {
        let src = dir.path().join(name);
        fs::create_dir(&src).unwrap();
        fs::write(src.join("which"), format!("{name}\n")).unwrap();
        src
    };
    let (alpha, beta) = (tree("alpha"), tree("beta"));
    let served = dir.path().join("served");
    pack(&alpha, &served, &private, &[]);
    let beta_repo = dir.path().join("beta-repo");
    pack(&beta, &beta_repo, &private, &[]);
    let serve = IncfsServer::start(&served);
    let (mnt, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    {
        let m = Mount::start(&serve.url, &mnt, &public, &cache, &[]);
        assert_eq!(fs::read_to_string(m.path("which")).unwrap(), "alpha\n");
    }
    // The same address now serves another image signed by the same trusted key.
    fs::remove_dir_all(&served).unwrap();
    run("cp", &["-a", beta_repo.to_str().unwrap(), served.to_str().unwrap()]);
    let err = refused_mount(&serve.url, &mnt, &[&public], &cache, &[]);
    assert!(err.contains("served image \"alpha\"") && err.contains("now serves \"beta\""), "{err}");
    assert!(err.contains("--image \"beta\""), "the message says how to accept it: {err}");
    // Naming an image up front: any other is refused, even on a fresh cache.
    let err = refused_mount(&serve.url, &mnt, &[&public], &dir.path().join("fresh"), &["--image", "gamma"]);
    assert!(err.contains("serves image \"beta\", not \"gamma\""), "{err}");
    // Naming the new one accepts the change on purpose, and the pin moves with it.
    {
        let m = Mount::start(&serve.url, &mnt, &public, &cache, &["--image", "beta"]);
        assert_eq!(fs::read_to_string(m.path("which")).unwrap(), "beta\n");
    }
    let m = Mount::start(&serve.url, &mnt, &public, &cache, &[]);
    assert_eq!(fs::read_to_string(m.path("which")).unwrap(), "beta\n");
}

#[test]
fn rollback_protection_holds_across_a_key_rotation() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let (old_private, old_public) = openssl_key(dir.path(), "old", &["-algorithm", "ed25519"]);
    let (new_private, new_public) = openssl_key(dir.path(), "new", &["-algorithm", "ed25519"]);
    let repo = dir.path().join("repo");
    for (v, key) in [(1, &old_private), (2, &old_private), (3, &new_private)] {
        fs::write(src.join("f"), format!("v{v}\n")).unwrap();
        pack(&src, &repo, key, &[]);
    }
    let serve = IncfsServer::start(&repo);
    let (mnt, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
    let extra = ["--trust", new_public.to_str().unwrap()];
    {
        // Clients trust both keys during the rotation; version 3 (new key) is accepted.
        let m = Mount::start(&serve.url, &mnt, &old_public, &cache, &extra);
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v3\n");
    }
    // A server replays version 2, validly signed by the old key, which is still trusted: refused,
    // and the cache's version 3 is mounted instead, with the reason.
    fs::copy(repo.join("versions/2.manifest"), repo.join("manifest")).unwrap();
    {
        let (m, warned) = Mount::start_warned(&serve.url, &mnt, &old_public, &cache, &extra, &[]);
        assert!(
            warned.contains("version 2, older than version 3") && warned.contains("refusing the rollback"),
            "{warned}"
        );
        assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v3\n");
    }
    // And a live mount does not follow it either.
    fs::copy(repo.join("versions/3.manifest"), repo.join("manifest")).unwrap();
    let m = Mount::start(&serve.url, &mnt, &old_public, &cache, &extra);
    fs::copy(repo.join("versions/2.manifest"), repo.join("manifest")).unwrap();
    let out = incfs(&["update", m.dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("refusing the rollback"), "{}", text(&out.stderr));
    assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v3\n");
}

#[test]
fn a_version_file_must_hold_its_version() {
    let p = Published::new(|src| fs::write(src.join("f"), "v1\n").unwrap(), &[]);
    fs::write(p.src.join("f"), "v2\n").unwrap();
    pack(&p.src, &p.repo, &p.private, &[]);
    // versions/3.manifest is a copy of version 1 (validly signed, but not version 3).
    fs::copy(p.repo.join("versions/1.manifest"), p.repo.join("versions/3.manifest")).unwrap();
    let (repo, trust) = (p.repo.to_str().unwrap(), p.public.to_str().unwrap());
    let out = incfs(&["verify", repo, "--trust", trust, "--version", "3"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("holds version 1, not version 3"), "{}", text(&out.stderr));
    let dest = p.dir.path().join("out");
    let out = incfs(&["extract", repo, dest.to_str().unwrap(), "--trust", trust, "--version", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("holds version 1, not version 3"), "{}", text(&out.stderr));
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "v", &[]);
    let out = incfs(&["update", m.dir.to_str().unwrap(), "--to", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("holds version 1, not version 3"), "{}", text(&out.stderr));
    assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v2\n");
    incfs_ok(&["update", m.dir.to_str().unwrap(), "--to", "1", "--allow-rollback"]);
    assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v1\n");
}

#[test]
fn an_expired_manifest_is_refused_unless_allowed() {
    let p = Published::new(|src| fs::write(src.join("f"), "v1\n").unwrap(), &[]);
    // A live expiry packs and mounts (format 2), and pack says when to publish again.
    fs::write(p.src.join("f"), "v2\n").unwrap();
    let out = pack(&p.src, &p.repo, &p.private, &["--expires", "30d"]);
    assert!(out.contains("expires:") && out.contains("publish again"), "{out}");
    let v2 = read_manifest(&p.repo.join("versions/2.manifest"));
    let at = v2.expires.expect("an expiry was signed in");
    assert!((at - now() - 30 * 86400).abs() < 120, "expiry {at} is not 30 days from now");
    assert_eq!(fs::read(p.repo.join("manifest")).unwrap()[8], 2, "format 2");
    let serve = IncfsServer::start(&p.repo);
    let live = p.mount(&serve.url, "live", &[]);
    assert_eq!(fs::read_to_string(live.path("f")).unwrap(), "v2\n");
    let status = live.status();
    assert_eq!(
        status["expires"].as_str(),
        Some(incfs_fetch::image::format_time(at).as_str()),
        "status shows the expiry"
    );
    assert_eq!(status["daemon_pid"].as_u64(), Some(live.daemon_pid as u64));
    assert_eq!(status["supervisor_pid"].as_u64(), Some(live.pid as u64));

    // Version 3 expired an hour ago: what a server freezing clients on it would serve.
    let mut v3 = v2.clone();
    v3.version = 3;
    v3.expires = Some(now() - 3600);
    publish(&p.repo, &p.private, &v3);
    let (repo, trust) = (p.repo.to_str().unwrap(), p.public.to_str().unwrap());
    let mnt = p.dir.path().join("mnt-expired");
    let err = refused_mount(&serve.url, &mnt, &[&p.public], &p.dir.path().join("cache-expired"), &[]);
    assert!(err.contains("version 3 expired at") && err.contains("--allow-expired"), "{err}");
    let out = incfs(&["update", live.dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("expired at"), "{}", text(&out.stderr));
    assert_eq!(fs::read_to_string(live.path("f")).unwrap(), "v2\n", "the live mount stays on version 2");
    let out = incfs(&["verify", repo, "--trust", trust]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("expired at"), "{}", text(&out.stderr));
    let dest = p.dir.path().join("out");
    let out = incfs(&["extract", repo, dest.to_str().unwrap(), "--trust", trust]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("expired at"), "{}", text(&out.stderr));

    // Each of them takes it when told to.
    incfs_ok(&["update", live.dir.to_str().unwrap(), "--allow-expired"]);
    let m = p.mount(&serve.url, "allowed", &["--allow-expired"]);
    assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v2\n");
    incfs_ok(&["verify", repo, "--trust", trust, "--allow-expired"]);
    incfs_ok(&["extract", repo, dest.to_str().unwrap(), "--trust", trust, "--allow-expired"]);
    assert_eq!(fs::read_to_string(dest.join("f")).unwrap(), "v2\n");
}

#[test]
fn an_update_passes_over_a_source_offering_a_rollback_for_one_that_holds() {
    let p = Published::new(|src| fs::write(src.join("f"), "v1\n").unwrap(), &[]);
    fs::write(p.src.join("f"), "v2\n").unwrap();
    pack(&p.src, &p.repo, &p.private, &[]);
    let mirror = p.dir.path().join("mirror");
    run("cp", &["-a", p.repo.to_str().unwrap(), mirror.to_str().unwrap()]);
    let (primary, second) = (IncfsServer::start(&p.repo), IncfsServer::start(&mirror));
    let m = p.mount(&primary.url, "u", &["--source", &second.url]);
    assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v2\n");
    // The mirror publishes version 3; the primary replays version 1.
    fs::write(p.src.join("f"), "v3\n").unwrap();
    pack(&p.src, &mirror, &p.private, &[]);
    fs::copy(p.repo.join("versions/1.manifest"), p.repo.join("manifest")).unwrap();
    let out = incfs_ok(&["update", m.dir.to_str().unwrap()]);
    assert!(out.contains("version 2 -> 3"), "{out}");
    assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "v3\n");
    assert!(m.log().contains("offers version 1, older than version 2"), "the primary's answer is logged:\n{}", m.log());
}
