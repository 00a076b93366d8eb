//! Keys from `openssl genpkey` sign and verify images; every kind of damage makes `incfs verify`
//! fail and name the problem; openssl itself accepts our manifest signatures.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// A small tree: one random (incompressible) file of 8 blocks, a text file, a link.
fn sample_tree(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("random.bin"), random_bytes(7, 8 * 4096)).unwrap();
    fs::write(src.join("sub/text.txt"), "hello incfs\n".repeat(1000)).unwrap();
    std::os::unix::fs::symlink("../random.bin", src.join("sub/link")).unwrap();
    src
}

fn verify(repo: &Path, public: &Path) -> (bool, String) {
    let out = incfs(&["verify", repo.to_str().unwrap(), "--trust", public.to_str().unwrap(), "-q"]);
    (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

/// The only object of a fresh single-object repository.
fn only_object(repo: &Path) -> PathBuf {
    let objects: Vec<_> = fs::read_dir(repo.join("objects")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    objects[0].clone()
}

/// Split a manifest into (signed part, signature) as docs/format.md describes.
fn split_manifest(bytes: &[u8]) -> (&[u8], &[u8]) {
    let body_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let signed = &bytes[..24 + body_len];
    let trailer = &bytes[24 + body_len..];
    let sig_len = u16::from_le_bytes(trailer[33..35].try_into().unwrap()) as usize;
    assert_eq!(trailer.len(), 35 + sig_len);
    (signed, &trailer[35..])
}

#[test]
fn openssl_keys_of_every_algorithm_pack_and_verify() {
    let dir = tempdir();
    let src = sample_tree(dir.path());
    let algorithms: [(&str, &[&str]); 4] = [
        ("ed25519", &["-algorithm", "ed25519"]),
        ("p256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        ("rsa2048", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        ("rsa4096", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"]),
    ];
    for (name, args) in algorithms {
        let (private, public) = openssl_key(dir.path(), name, args);
        let repo = dir.path().join(format!("repo-{name}"));
        pack(&src, &repo, &private, &[]);
        let (ok, out) = verify(&repo, &public);
        assert!(ok, "{name}: {out}");
        assert!(out.contains("OK: src version 1"), "{name}: {out}");

        // openssl checks the signature on its own, from the documented layout.
        let manifest = fs::read(repo.join("manifest")).unwrap();
        assert_eq!(manifest, fs::read(repo.join("versions/1.manifest")).unwrap());
        let (signed, sig) = split_manifest(&manifest);
        let signed_path = dir.path().join("signed.bin");
        let sig_path = dir.path().join("sig.bin");
        fs::write(&signed_path, signed).unwrap();
        fs::write(&sig_path, sig).unwrap();
        let (s, g, p) = (signed_path.to_str().unwrap(), sig_path.to_str().unwrap(), public.to_str().unwrap());
        if name == "ed25519" {
            run("openssl", &["pkeyutl", "-verify", "-pubin", "-inkey", p, "-rawin", "-in", s, "-sigfile", g]);
        } else {
            run("openssl", &["dgst", "-sha256", "-verify", p, "-signature", g, s]);
        }
    }
}

#[test]
fn keygen_keys_are_read_by_openssl_and_used_by_pack() {
    let dir = tempdir();
    let src = sample_tree(dir.path());
    for alg in ["ed25519", "ecdsa-p256", "rsa-3072"] {
        let base = dir.path().join(alg);
        incfs_ok(&["keygen", "--algorithm", alg, "--out", base.to_str().unwrap()]);
        let private = dir.path().join(format!("{alg}.pem"));
        let public = dir.path().join(format!("{alg}.pub.pem"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        run("openssl", &["pkey", "-in", private.to_str().unwrap(), "-noout"]);
        run("openssl", &["pkey", "-pubin", "-in", public.to_str().unwrap(), "-noout"]);
        let repo = dir.path().join(format!("repo-{alg}"));
        pack(&src, &repo, &private, &[]);
        assert!(verify(&repo, &public).0);
        // Refuses to overwrite a key.
        let again = incfs(&["keygen", "--algorithm", alg, "--out", base.to_str().unwrap()]);
        assert!(!again.status.success() && text(&again.stderr).contains("already exists"));
    }
}

/// Pack the sample uncompressed (every data block is 4096 raw bytes at a known offset), damage
/// it with `damage`, and return verify's verdict and output.
fn damaged(damage: impl Fn(&Path, &Path)) -> (bool, String) {
    let dir = tempdir();
    let src = sample_tree(dir.path());
    let (private, public) = ed25519_key(dir.path());
    let repo = dir.path().join("repo");
    pack(&src, &repo, &private, &["--compression", "none"]);
    assert!(verify(&repo, &public).0);
    damage(&repo, dir.path());
    verify(&repo, &public)
}

#[test]
fn wrong_public_key_is_rejected() {
    let (ok, out) = damaged(|repo, dir| {
        let (_, other) = openssl_key(dir, "other", &["-algorithm", "ed25519"]);
        fs::copy(other, dir.join("ed25519.pub.pem")).unwrap();
        let _ = repo;
    });
    assert!(!ok);
    assert!(out.contains("not among the trusted keys"), "{out}");
}

#[test]
fn flipped_manifest_byte_is_rejected() {
    let (ok, out) = damaged(|repo, _| {
        let p = repo.join("manifest");
        let mut b = fs::read(&p).unwrap();
        b[40] ^= 1;
        fs::write(&p, b).unwrap();
    });
    assert!(!ok);
    assert!(out.contains("signature is invalid"), "{out}");
}

#[test]
fn flipped_data_byte_names_file_and_block() {
    let (ok, out) = damaged(|repo, _| {
        let p = only_object(repo);
        let mut b = fs::read(&p).unwrap();
        b[3 * 4096 + 100] ^= 0x20; // random.bin is packed first: its block 3
        fs::write(&p, b).unwrap();
    });
    assert!(!ok);
    assert!(out.contains("random.bin: block 3: content does not match"), "{out}");
    assert!(!out.contains("block 2:") && !out.contains("block 4:"), "{out}");
}

#[test]
fn swapped_blocks_are_both_reported() {
    let (ok, out) = damaged(|repo, _| {
        let p = only_object(repo);
        let mut b = fs::read(&p).unwrap();
        let (first, second) = b.split_at_mut(6 * 4096);
        first[5 * 4096..].swap_with_slice(&mut second[..4096]);
        fs::write(&p, b).unwrap();
    });
    assert!(!ok);
    assert!(out.contains("random.bin: block 5: content does not match"), "{out}");
    assert!(out.contains("random.bin: block 6: content does not match"), "{out}");
}

#[test]
fn truncated_object_is_reported_with_the_blocks_it_held() {
    let (ok, out) = damaged(|repo, _| {
        let p = only_object(repo);
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(7 * 4096).unwrap();
    });
    assert!(!ok);
    assert!(out.contains("(truncated or replaced)"), "{out}");
    // Block 7 of random.bin and everything after it (text.txt, metadata) is gone.
    assert!(out.contains("random.bin"), "{out}");
    assert!(out.contains("text.txt"), "{out}");
}

#[test]
fn removed_object_is_reported_as_missing() {
    let (ok, out) = damaged(|repo, _| fs::remove_file(only_object(repo)).unwrap());
    assert!(!ok);
    assert!(out.contains(" is missing"), "{out}");
    assert!(out.contains("random.bin: metadata:") && out.contains("does not exist"), "{out}");
}

#[test]
fn bad_keys_give_clear_errors() {
    let dir = tempdir();
    let src = sample_tree(dir.path());
    let (_, public) = ed25519_key(dir.path());
    let repo = dir.path().join("repo");
    let out = incfs(&["pack", src.to_str().unwrap(), repo.to_str().unwrap(), "--key", public.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("signing needs the private key"), "{}", text(&out.stderr));
    let (p384, _) = openssl_key(dir.path(), "p384", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
    let out = incfs(&["pack", src.to_str().unwrap(), repo.to_str().unwrap(), "--key", p384.to_str().unwrap()]);
    assert!(text(&out.stderr).contains("not supported"), "{}", text(&out.stderr));
    let (rsa1024, _) = openssl_key(dir.path(), "rsa1024", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]);
    let out = incfs(&["pack", src.to_str().unwrap(), repo.to_str().unwrap(), "--key", rsa1024.to_str().unwrap()]);
    assert!(text(&out.stderr).contains("1024 bits"), "{}", text(&out.stderr));
}
