//! External data loaders (`--loader`, the example `examples/loader.py`), `incfs fill`, and the
//! introspection of waiting reads: `incfs pending`, `incfs log`, `incfs files`.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn example_loader() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/loader.py")
}

fn loader_cmd(tree: &Path, extra: &str) -> String {
    format!("python3 {} {} {extra}", example_loader().display(), tree.display())
}

/// A tree of a few sizes, with a subdirectory and a sparse file.
fn fill_tree(src: &Path) {
    fs::write(src.join("big.bin"), random_bytes(1, 3 << 20)).unwrap();
    fs::write(src.join("small.txt"), "hello from the loader\n").unwrap();
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("sub/mid.bin"), random_bytes(2, 200_000)).unwrap();
    let sparse = fs::File::create(src.join("sub/sparse")).unwrap();
    sparse.set_len(1 << 20).unwrap();
}

#[test]
fn the_example_loader_serves_a_whole_mount() {
    let p = Published::new(fill_tree, &[]);
    let cmd = loader_cmd(&p.src, "");
    let m = p.mount(p.repo.to_str().unwrap(), "loader", &["--loader", &cmd]);
    let out = Command::new("diff").args(["-r"]).arg(&p.src).arg(&m.dir).output().unwrap();
    assert!(out.status.success(), "diff -r: {}\n{}", text(&out.stdout), m.log());
    let s = m.status();
    let data_blocks = (3 << 20) / 4096 + 1 + 200_000 / 4096 + 1;
    assert!(s["blocks_filled"].as_u64().unwrap() >= data_blocks, "{s}");
    assert_eq!(s["fills_rejected"], 0);
    // The source gave the manifest and Merkle trees only (48 bytes a block, 40 KiB here), not
    // the 3.4 MiB of data. Concurrent first reads of a file may each fetch its tree piece (metadata
    // fetches are not shared between readers), hence the margin.
    assert!(s["bytes_fetched"].as_u64().unwrap() < 3 * 64 * 1024, "{s}");
    assert_eq!(s["reads_failed_timeout"], 0);
}

#[test]
fn a_wrong_block_from_the_loader_fails_that_read_and_a_retry_succeeds() {
    let p = Published::new(fill_tree, &[]);
    let cmd = loader_cmd(&p.src, "--corrupt-once sub/mid.bin");
    let m = p.mount(p.repo.to_str().unwrap(), "corrupt", &["--loader", &cmd]);
    let want = fs::read(p.src.join("sub/mid.bin")).unwrap();
    // The read given the bad block fails with EIO (and so does the kernel's immediate retry).
    let err = fs::read(m.path("sub/mid.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let s = m.status();
    assert!(s["fills_rejected"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["reads_failed_verification"].as_u64().unwrap() >= 1, "{s}");
    assert!(m.log().contains("sub/mid.bin: filled block 0 failed verification"), "{}", m.log());
    // Past the one second in which the failure is remembered, the loader is asked again and
    // sends the right bytes; nothing bad was kept.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(fs::read(m.path("sub/mid.bin")).unwrap() == want);
}

#[test]
fn a_dying_loader_times_reads_out_and_a_restarted_one_resumes() {
    let p = Published::new(fill_tree, &[]);
    let flag = p.dir.path().join("loader-must-die");
    let cmd = loader_cmd(&p.src, &format!("--exit-if-exists {}", flag.display()));
    let m = p.mount(p.repo.to_str().unwrap(), "dying", &["--loader", &cmd, "--read-timeout", "1s"]);
    assert_eq!(fs::read_to_string(m.path("small.txt")).unwrap(), "hello from the loader\n");
    fs::write(&flag, "").unwrap();
    let t = Instant::now();
    let err = fs::read(m.path("sub/mid.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETIME), "{err}");
    assert!(t.elapsed() < Duration::from_secs(4), "the read took {:?}", t.elapsed());
    assert!(m.daemon_alive());
    assert!(m.stat("reads_failed_timeout") >= 1);
    // Back: the daemon starts the loader again, which takes the reads waiting.
    fs::remove_file(&flag).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fs::read(m.path("sub/mid.bin")) {
            Ok(b) => {
                assert!(b == fs::read(p.src.join("sub/mid.bin")).unwrap(), "wrong bytes");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "no restarted loader served the read: {e}\n{}", m.log());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert!(m.log().contains("loader exited"), "{}", m.log());
}

#[test]
fn waiting_readers_are_listed_logged_and_woken_by_fill() {
    let files = ["a.bin", "b.bin", "c.bin"];
    let p = Published::new(
        |src| {
            for (i, f) in files.iter().enumerate() {
                fs::write(src.join(f), random_bytes(10 + i as u64, 64 << 10)).unwrap();
            }
        },
        &[],
    );
    // A loader that never answers: reads wait until `incfs fill` brings their blocks.
    let m = p.mount(p.repo.to_str().unwrap(), "fill", &["--loader", "cat >/dev/null", "--read-timeout", "20s"]);
    let mnt = m.dir.to_str().unwrap().to_string();
    let mut log =
        ChildGuard(Command::new(incfs_bin()).args(["log", &mnt, "--json"]).stdout(Stdio::piped()).spawn().unwrap());
    let log_out = log.0.stdout.take().unwrap();
    let log_lines =
        std::thread::spawn(move || BufReader::new(log_out).lines().map_while(Result::ok).collect::<Vec<_>>());

    let incomplete = incfs_ok(&["files", &mnt, "--incomplete", "--json"]);
    let incomplete: Vec<serde_json::Value> = serde_json::from_str(&incomplete).unwrap();
    assert_eq!(incomplete.len(), 3);

    // Three readers per file, several files at once.
    let readers: Vec<_> = files
        .iter()
        .flat_map(|f| std::iter::repeat_n(m.path(f), 3))
        .map(|path| std::thread::spawn(move || fs::read(path)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pending = loop {
        let v: Vec<serde_json::Value> = serde_json::from_str(&incfs_ok(&["pending", &mnt, "--json"])).unwrap();
        // Every file's read from block 0 (the kernel may send a file's later blocks apart).
        let paths: std::collections::BTreeSet<&str> =
            v.iter().filter(|p| p["block"] == 0).map(|p| p["path"].as_str().unwrap()).collect();
        if paths.len() == 3 {
            break v;
        }
        assert!(Instant::now() < deadline, "not every file's read is pending: {v:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Each file's first read waits from block 0; the kernel may also have split a file's reads
    // (a second reader finding the first pages locked asks for the rest), so more entries of
    // one file may be listed, all within the file.
    for f in &files {
        let first = pending.iter().filter(|r| r["path"] == *f).map(|r| r["block"].as_u64().unwrap()).min();
        assert_eq!(first, Some(0), "{f}: {pending:?}");
    }
    for r in &pending {
        assert!(r["block"].as_u64().unwrap() + r["count"].as_u64().unwrap() <= 16, "{r}");
        assert_eq!(r["id"].as_str().unwrap().len(), 32);
        assert!(r["serial"].as_u64().unwrap() > 0);
    }
    let text_listing = incfs_ok(&["pending", &mnt]);
    assert!(text_listing.contains("a.bin") && text_listing.contains("block"), "{text_listing}");
    assert!(readers.iter().all(|r| !r.is_finished()), "a reader finished before any fill");

    // One producer fills each file; every reader wakes with the right bytes.
    for f in &files {
        let out = incfs_ok(&["fill", &mnt, f, "--from", p.src.join(f).to_str().unwrap()]);
        assert!(out.contains("16 blocks filled, 0 refused"), "{out}");
    }
    for (k, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap().unwrap();
        assert!(got == fs::read(p.src.join(files[k / 3])).unwrap(), "reader {k} read wrong bytes");
    }
    assert!(serde_json::from_str::<Vec<serde_json::Value>>(&incfs_ok(&["pending", &mnt, "--json"]))
        .unwrap()
        .is_empty());
    assert_eq!(incfs_ok(&["files", &mnt, "--incomplete", "--json"]).trim(), "[]");

    // A block that does not match the tree is refused and counted.
    let wrong = p.dir.path().join("wrong");
    fs::write(&wrong, random_bytes(99, 64 << 10)).unwrap();
    let out = incfs(&["fill", &mnt, "a.bin", "--from", wrong.to_str().unwrap(), "--blocks", "0-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("0 blocks filled, 2 refused"), "{}", text(&out.stdout));
    assert_eq!(m.stat("fills_rejected"), 2);

    // The read log saw every file read, having waited, from block 0.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) on the `incfs log` child this test started.
    unsafe { libc::kill(log.0.id() as i32, libc::SIGTERM) };
    let _ = log.0.wait();
    let records: Vec<serde_json::Value> =
        log_lines.join().unwrap().iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    for f in &files {
        assert!(
            records.iter().any(|r| r["path"] == *f && r["block"] == 0 && r["waited"] == true),
            "no waited read of {f} from block 0 in the log: {records:?}"
        );
    }
}

/// An image with a `lang/` directory to push language packs into.
fn lang_tree(src: &Path) {
    fs::create_dir(src.join("lang")).unwrap();
    fs::write(src.join("lang/en.txt"), "hello\n").unwrap();
}

#[test]
fn a_pushed_file_reads_once_filled_and_nothing_unsigned_or_wrong_gets_in() {
    let p = Published::new(lang_tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "push", &["--read-timeout", "3s"]);
    let mnt = m.dir.to_str().unwrap().to_string();
    let fr = p.dir.path().join("fr.pak");
    fs::write(&fr, random_bytes(40, 300_000)).unwrap();
    let key = p.private.to_str().unwrap();
    let out = incfs_ok(&["sign-file", fr.to_str().unwrap(), "--key", key, "--image", "src", "--path", "lang/fr.pak"]);
    assert!(out.contains(&incfs_ok(&["digest", fr.to_str().unwrap()]).split(' ').next().unwrap().to_string()));
    let sig = format!("{}.sig", fr.display());
    let out = incfs_ok(&["add", &mnt, "lang/fr.pak", "--from", fr.to_str().unwrap(), "--signature", &sig, "--fill"]);
    assert!(out.contains("lang/fr.pak: added") && out.contains("74 blocks filled, 0 refused"), "{out}");
    assert!(fs::read(m.path("lang/fr.pak")).unwrap() == fs::read(&fr).unwrap(), "pushed file reads wrong");
    let mut names: Vec<_> = fs::read_dir(m.path("lang")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["en.txt", "fr.pak"]);

    // Signed by a key the mount does not trust: refused, nothing appears.
    let (other, _) = openssl_key(p.dir.path(), "other", &["-algorithm", "ed25519"]);
    let de = p.dir.path().join("de.pak");
    fs::write(&de, random_bytes(41, 100_000)).unwrap();
    let bad_sig = p.dir.path().join("de.bad.sig");
    incfs_ok(&[
        "sign-file",
        de.to_str().unwrap(),
        "--key",
        other.to_str().unwrap(),
        "--image",
        "src",
        "--path",
        "lang/de.pak",
        "--out",
        bad_sig.to_str().unwrap(),
    ]);
    let out =
        incfs(&["add", &mnt, "lang/de.pak", "--from", de.to_str().unwrap(), "--signature", bad_sig.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no trusted key signed"), "{}", text(&out.stderr));
    assert!(!m.path("lang/de.pak").exists());
    // A taken name is refused too.
    let out = incfs(&["add", &mnt, "lang/en.txt", "--from", fr.to_str().unwrap(), "--signature", &sig]);
    assert_eq!(out.status.code(), Some(2));

    // Signed right, but the blocks pushed are not the file's: the waiting read fails with EIO,
    // nothing is kept; the right blocks then read.
    incfs_ok(&["sign-file", de.to_str().unwrap(), "--key", key, "--image", "src", "--path", "lang/de.pak"]);
    let de_sig = format!("{}.sig", de.display());
    incfs_ok(&["add", &mnt, "lang/de.pak", "--from", de.to_str().unwrap(), "--signature", &de_sig]);
    let path = m.path("lang/de.pak");
    let reader = std::thread::spawn(move || fs::read(path));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !incfs_ok(&["pending", &mnt]).contains("lang/de.pak") {
        assert!(Instant::now() < deadline, "the read of the pushed file is not pending");
        std::thread::sleep(Duration::from_millis(20));
    }
    let wrong = p.dir.path().join("wrong.pak");
    fs::write(&wrong, random_bytes(42, 100_000)).unwrap();
    let out = incfs(&["fill", &mnt, "lang/de.pak", "--from", wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = reader.join().unwrap().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(m.stat("fills_rejected") >= 25);
    assert!(m.present("lang/de.pak").is_empty(), "a wrong block was kept");
    incfs_ok(&["fill", &mnt, "lang/de.pak", "--from", de.to_str().unwrap()]);
    assert!(fs::read(m.path("lang/de.pak")).unwrap() == fs::read(&de).unwrap());

    // Pushed files stay through a version switch.
    fs::write(p.src.join("lang/es.txt"), "hola\n").unwrap();
    pack(&p.src, &p.repo, &p.private, &[]);
    incfs_ok(&["update", &mnt]);
    assert_eq!(fs::read_to_string(m.path("lang/es.txt")).unwrap(), "hola\n");
    assert!(fs::read(m.path("lang/fr.pak")).unwrap() == fs::read(&fr).unwrap());

    // And through a restart: the cache keeps them (checked again) with their blocks.
    drop(m);
    let m = p.mount(&serve.url, "push", &[]);
    let before = m.stat("bytes_fetched");
    assert!(fs::read(m.path("lang/fr.pak")).unwrap() == fs::read(&fr).unwrap());
    assert!(fs::read(m.path("lang/de.pak")).unwrap() == fs::read(&de).unwrap());
    assert_eq!(m.stat("bytes_fetched"), before);
    assert_eq!(fs::read_to_string(m.path("lang/es.txt")).unwrap(), "hola\n");
}

#[test]
fn a_push_signature_holds_only_for_its_image_path_and_mode() {
    let p = Published::new(lang_tree, &[]);
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "replay", &[]);
    let mnt = m.dir.to_str().unwrap().to_string();
    let fr = p.dir.path().join("fr.pak");
    fs::write(&fr, random_bytes(43, 20_000)).unwrap();
    let (from, key) = (fr.to_str().unwrap(), p.private.to_str().unwrap());
    let sign = |out: &str, extra: &[&str]| {
        let out = p.dir.path().join(out);
        let mut args = vec!["sign-file", from, "--key", key, "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        incfs_ok(&args);
        out.to_str().unwrap().to_string()
    };
    let good = sign("good.sig", &["--image", "src", "--path", "lang/fr.pak", "--mode", "644"]);
    let other_image = sign("image.sig", &["--image", "another", "--path", "lang/fr.pak", "--mode", "644"]);
    let refused = |path: &str, sig: &str, mode: &str, why: &str| {
        let out = incfs(&["add", &mnt, path, "--from", from, "--signature", sig, "--mode", mode]);
        assert_eq!(out.status.code(), Some(2), "{path} with {sig} mode {mode} was accepted");
        assert!(text(&out.stderr).contains(why), "{}", text(&out.stderr));
        assert!(!m.path(path).exists());
    };
    // The same signature replayed at another path, with setuid, or from another image's push.
    refused("lang/other.pak", &good, "644", "no trusted key signed");
    refused("fr.pak", &good, "644", "at this path");
    refused("lang/fr.pak", &good, "4755", "with mode 4755");
    refused("lang/fr.pak", &other_image, "644", "for image \"src\"");
    // A signature over the fs-verity digest alone (what `fsverity sign` and incfs before
    // 2026-12 signed), made here with openssl: names no place, so it is refused with the fix.
    let digest = incfs_ok(&["digest", from]);
    let hex_digest = digest.split(' ').next().unwrap().trim_start_matches("sha256:");
    let mut formatted = b"FSVerity".to_vec();
    formatted.extend_from_slice(&[1, 0, 32, 0]);
    formatted.extend_from_slice(&hex::decode(hex_digest).unwrap());
    let formatted_path = p.dir.path().join("formatted.bin");
    fs::write(&formatted_path, &formatted).unwrap();
    let fsverity_sig = p.dir.path().join("fsverity.sig");
    run(
        "openssl",
        &[
            "pkeyutl",
            "-sign",
            "-rawin",
            "-inkey",
            key,
            "-in",
            formatted_path.to_str().unwrap(),
            "-out",
            fsverity_sig.to_str().unwrap(),
        ],
    );
    refused("lang/fr.pak", fsverity_sig.to_str().unwrap(), "644", "covers only the file's content");
    // The signature made for this place works there, and the file reads.
    let out = incfs_ok(&["add", &mnt, "lang/fr.pak", "--from", from, "--signature", &good, "--mode", "644", "--fill"]);
    assert!(out.contains("added"), "{out}");
    assert!(fs::read(m.path("lang/fr.pak")).unwrap() == fs::read(&fr).unwrap());
    assert_eq!(fs::metadata(m.path("lang/fr.pak")).unwrap().permissions().mode() & 0o7777, 0o644);
}

#[test]
fn loaders_push_files_only_where_the_mount_allows_it() {
    use base64::Engine;
    let p = Published::new(fill_tree, &[]);
    let new = p.dir.path().join("new.bin");
    fs::write(&new, random_bytes(44, 5000)).unwrap();
    let sig = p.dir.path().join("new.sig");
    let key = p.private.to_str().unwrap();
    let sign = ["sign-file", new.to_str().unwrap(), "--key", key, "--image", "src", "--path", "pushed.bin"];
    incfs_ok(&[&sign[..], &["--mode", "600", "--out", sig.to_str().unwrap()]].concat());
    let data = fs::read(&new).unwrap();
    let tree = incfs_verity::MerkleTree::from_data(&data);
    let b64 = base64::engine::general_purpose::STANDARD;
    let add = serde_json::json!({
        "type": "add", "path": "pushed.bin", "mode": 0o600, "size": data.len(),
        "root_hash": hex::encode(tree.root()), "tree": b64.encode(tree.to_compact()),
        "signature": b64.encode(fs::read(&sig).unwrap()),
    });
    let add_line = p.dir.path().join("add.json");
    fs::write(&add_line, format!("{add}\n")).unwrap();
    for (name, allow) in [("no-add", false), ("may-add", true)] {
        // A loader that pushes one file, then records what the daemon answers.
        let answers = p.dir.path().join(format!("answers-{name}"));
        let cmd = format!("cat {}; exec cat > {}", add_line.display(), answers.display());
        let mut args = vec!["--loader", &cmd];
        if allow {
            args.push("--allow-loader-add");
        }
        let m = p.mount(p.repo.to_str().unwrap(), name, &args);
        let deadline = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            let text = fs::read_to_string(&answers).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains("\"added\"") || l.contains("\"rejected\"")) {
                break l.to_string();
            }
            assert!(Instant::now() < deadline, "no answer to the loader's add: {text}\n{}", m.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        if allow {
            assert!(answer.contains("\"added\""), "{answer}");
            assert!(m.path("pushed.bin").exists());
        } else {
            assert!(answer.contains("\"rejected\"") && answer.contains("--allow-loader-add"), "{answer}");
            assert!(!m.path("pushed.bin").exists());
        }
    }
}
