//! `incfs demo`: the whole job end to end on a built-in sample tree, on 127.0.0.1 only.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use incfs_fetch::{Image, Source, SourceOptions};
use incfs_pack::{NoProgress, PackOptions};
use incfs_sign::{KeyAlgorithm, SigningKey, TrustedKeys};

/// Deterministic pseudo-random bytes (xorshift), so the sample is the same on every machine.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The built-in sample: text, a binary, duplicates, a sparse file, links and awkward names.
fn make_sample(root: &Path) -> Result<()> {
    fs::create_dir_all(root.join("docs/guide"))?;
    fs::create_dir_all(root.join("bin"))?;
    fs::create_dir_all(root.join("empty-dir"))?;
    let text: String = (0..2000).map(|i| format!("line {i}: incfs serves verified blocks on demand\n")).collect();
    fs::write(root.join("docs/README.txt"), &text)?;
    fs::write(root.join("docs/guide/copy-of-README.txt"), &text)?;
    fs::write(root.join("bin/tool"), noise(1, 5 << 20))?;
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("empty"), b"")?;
    fs::write(root.join("one-byte"), b"x")?;
    let sparse = fs::File::create(root.join("sparse.img"))?;
    sparse.set_len(64 << 20)?;
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"data in the middle of a hole", 32 << 20)?;
    fs::hard_link(root.join("bin/tool"), root.join("bin/tool-hardlink"))?;
    symlink("docs/README.txt", root.join("readme-link"))?;
    symlink("../../outside/the/tree", root.join("escaping-link"))?;
    fs::write(root.join("name with\nnewline"), b"hostile names are data too\n")?;
    Ok(())
}

/// Compare two trees entry by entry: type, mode, size, content, symlink target.
fn compare(a: &Path, b: &Path) -> Result<u64> {
    let mut n = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (pa, pb) = (a.join(&rel), b.join(&rel));
        let (ma, mb) = (
            fs::symlink_metadata(&pa)?,
            fs::symlink_metadata(&pb).with_context(|| format!("{} missing", pb.display()))?,
        );
        n += 1;
        if ma.mode() != mb.mode() || (ma.is_file() && ma.len() != mb.len()) {
            bail!("{} differs in type, mode or size", rel.display());
        }
        if ma.is_file() && fs::read(&pa)? != fs::read(&pb)? {
            bail!("{} differs in content", rel.display());
        }
        if ma.file_type().is_symlink() && fs::read_link(&pa)? != fs::read_link(&pb)? {
            bail!("{} differs in target", rel.display());
        }
        if ma.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&pa)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
            if names.len() != fs::read_dir(&pb)?.count() {
                bail!("{} has a different number of entries", rel.display());
            }
            names.sort();
            stack.extend(names.into_iter().map(|name| rel.join(name)));
        }
    }
    Ok(n)
}

/// Mount the image (in a thread of this process), read one file, then everything, and unmount.
fn mount_and_read(url: &str, mnt: &Path, work: &Path, key: incfs_sign::PublicKey, sample: &Path) -> Result<()> {
    fs::create_dir_all(mnt)?;
    let opts = incfs_fs::MountOptions {
        sources: vec![url.to_string()],
        mountpoint: mnt.to_path_buf(),
        trust: TrustedKeys::new(vec![key]),
        cache: work.join("cache"),
        settings: incfs_fs::MountSettings {
            read_timeout: std::time::Duration::from_secs(10),
            threads: 4,
            // The demo shows lazy fetching: nothing is fetched unless read.
            background: false,
            ..Default::default()
        },
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let daemon = std::thread::spawn(move || incfs_fs::mount(opts, move |_| ready_tx.send(()).unwrap()));
    if ready_rx.recv().is_err() {
        let err = daemon.join().map_err(|_| anyhow::anyhow!("mount thread panicked"))?;
        return err.map_err(|e| anyhow::anyhow!("{e} (mounting needs root and /dev/fuse)"));
    }
    let status = |what: &str| -> Result<()> {
        let s = incfs_fs::control::ask(&fs::canonicalize(mnt)?, &serde_json::json!({ "cmd": "status" }))
            .map_err(|e| anyhow::anyhow!(e))?;
        println!(
            "                     {what}: {}/{} blocks present, {} bytes fetched",
            s["blocks_present"], s["blocks_total"], s["bytes_fetched"]
        );
        Ok(())
    };
    let result = (|| -> Result<()> {
        status("mounted")?;
        let text = fs::read_to_string(mnt.join("docs/README.txt"))?;
        println!("                     docs/README.txt: {} lines, read through the mount", text.lines().count());
        status("after one file")?;
        let n = compare(sample, mnt)?;
        status("after reading everything")?;
        println!("                     {n} entries identical to the original, read through FUSE");
        Ok(())
    })();
    incfs_fs::unmount(&fs::canonicalize(mnt)?).map_err(|e| anyhow::anyhow!(e))?;
    daemon.join().map_err(|_| anyhow::anyhow!("mount thread panicked"))??;
    println!("9. unmount          incfs unmount {}", mnt.display());
    result
}

pub async fn run(dir: Option<PathBuf>) -> Result<i32> {
    let tmp;
    let work = match dir {
        Some(d) => {
            fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let (sample, repo, copy) = (work.join("sample"), work.join("repo"), work.join("copy"));
    for d in [&sample, &repo, &copy] {
        if d.exists() {
            bail!("{} already exists; give --dir a new directory", d.display());
        }
    }
    println!("1. sample tree      {}", sample.display());
    make_sample(&sample)?;

    println!("2. publisher key    incfs keygen --algorithm ed25519");
    let key = SigningKey::generate(KeyAlgorithm::Ed25519)?;
    fs::write(work.join("publisher.pub.pem"), key.public_key().to_pem())?;

    println!("3. pack             incfs pack {} {} --key publisher.pem", sample.display(), repo.display());
    let s = incfs_pack::pack(&sample, &repo, &key, &PackOptions::default(), &NoProgress)?;
    println!(
        "                     {} files, {} in, {} stored, {} saved by dedup, {} of holes not stored",
        s.files,
        indicatif::HumanBytes(s.bytes_in),
        indicatif::HumanBytes(s.bytes_stored),
        indicatif::HumanBytes(s.dedup_saved),
        indicatif::HumanBytes(s.zero_bytes)
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    println!("4. serve            incfs serve {} -> {url}/", repo.display());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stats = Arc::new(incfs_serve::ServeStats::default());
    let server = tokio::spawn(incfs_serve::serve(listener, repo.clone(), stats.clone(), async {
        let _ = stopped.await;
    }));

    let trust = TrustedKeys::new(vec![key.public_key()]);
    let image = Image::open(Source::parse(&url, &SourceOptions::default())?, &trust).await?;
    println!("5. verify over HTTP incfs verify {url} --trust publisher.pub.pem");
    let report = incfs_fetch::verify::verify_image(&image, &()).await;
    for p in &report.problems {
        println!("   problem: {p}");
    }
    if !report.problems.is_empty() {
        bail!("verification found {} problems", report.problems.len());
    }
    println!(
        "                     OK: {} files, {} blocks checked against their Merkle trees",
        report.files, report.blocks
    );

    println!("6. extract          incfs extract {url} {} --trust publisher.pub.pem", copy.display());
    incfs_fetch::extract::extract(&image, &copy, &()).await?;
    let entries = compare(&sample, &copy)?;
    println!("7. compare          {entries} entries of the extracted copy identical to the original");

    let mnt = work.join("mnt");
    println!("8. mount            incfs mount {url} {} --trust publisher.pub.pem", mnt.display());
    mount_and_read(&url, &mnt, &work, key.public_key(), &sample)?;
    let _ = stop.send(());
    server.await??;
    println!(
        "                     the server sent {} bytes in {} requests in all",
        stats.body_bytes.load(std::sync::atomic::Ordering::Relaxed),
        stats.requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("demo OK");
    Ok(0)
}
