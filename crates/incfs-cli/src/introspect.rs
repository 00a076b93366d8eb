//! `incfs pending`, `incfs log`, `incfs files`, `incfs fill`, `incfs add` and `incfs sign-file`:
//! looking into a live mount and pushing files and blocks into it, over its control socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use incfs_fs::control::{ask, ask_within, socket_path, FileEntry, FillReport};
use incfs_fs::pending::{now_us, PendingRead, ReadRecord};

use crate::mount::image_path;

/// Blocks sent per `fill` request (about 5.5 MiB of base64 at most).
const FILL_BATCH: u64 = 1024;

fn mountpoint(mp: &Path) -> Result<std::path::PathBuf> {
    std::fs::canonicalize(mp).with_context(|| format!("{}", mp.display()))
}

fn blocks_text(block: u64, count: u64) -> String {
    if count == 1 {
        format!("block {block}")
    } else {
        format!("blocks {block}-{}", block + count - 1)
    }
}

pub fn pending(mp: &Path, json: bool) -> Result<i32> {
    let mp = mountpoint(mp)?;
    let v = ask(&mp, &serde_json::json!({ "cmd": "pending" })).map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!("{v}");
        return Ok(0);
    }
    let list: Vec<PendingRead> = serde_json::from_value(v)?;
    if list.is_empty() {
        println!("no read is waiting for data");
    }
    let now = now_us();
    for p in list {
        let age = Duration::from_micros(now.saturating_sub(p.time_us));
        println!("#{} {:>8.1?} {} {} {}", p.serial, age, p.id, p.path, blocks_text(p.block, p.count));
    }
    Ok(0)
}

pub fn log(mp: &Path, json: bool) -> Result<i32> {
    let mp = mountpoint(mp)?;
    let sock = socket_path(&mp).map_err(anyhow::Error::msg)?;
    let mut s = std::os::unix::net::UnixStream::connect(&sock)
        .with_context(|| format!("{} is not an incfs mount served by a running daemon", mp.display()))?;
    writeln!(s, "{}", serde_json::json!({ "cmd": "log" }))?;
    let mut lines = BufReader::new(s).lines();
    match lines.next() {
        Some(Ok(l)) if l.contains("\"ok\"") => {}
        other => bail!("the daemon did not open the log: {other:?}"),
    }
    let stdout = std::io::stdout();
    for line in lines {
        let line = line?;
        let mut out = stdout.lock();
        if json {
            writeln!(out, "{line}")?;
        } else if let Ok(r) = serde_json::from_str::<ReadRecord>(&line) {
            let how = if r.waited { "waited" } else { "local" };
            writeln!(out, "#{} {} {} {} {how}", r.serial, r.id, r.path, blocks_text(r.block, r.count))?;
        } else {
            writeln!(out, "({line})")?;
        }
        out.flush()?;
    }
    Ok(0)
}

pub fn files(mp: &Path, incomplete: bool, json: bool) -> Result<i32> {
    let mp = mountpoint(mp)?;
    let request = serde_json::json!({ "cmd": "files", "incomplete": incomplete });
    let v = ask_within(&mp, &request, Duration::from_secs(60)).map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!("{v}");
        return Ok(0);
    }
    let list: Vec<FileEntry> = serde_json::from_value(v)?;
    let mut out = std::io::stdout().lock();
    for f in list {
        writeln!(out, "{} {:>9}/{:<9} {}", f.id, f.blocks_present, f.blocks_total, f.path)?;
    }
    Ok(0)
}

/// `A-B` or `A` as a block range.
fn parse_range(s: &str) -> Result<std::ops::Range<u64>> {
    let bad = || anyhow::anyhow!("--blocks {s:?}: write a block number or a range like 0-15");
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse::<u64>().map_err(|_| bad())?),
        None => {
            let a = s.trim().parse().map_err(|_| bad())?;
            (a, a)
        }
    };
    if b < a {
        return Err(bad());
    }
    Ok(a..b + 1)
}

pub fn fill(mp: &Path, path: &Path, from: &Path, blocks: Option<&str>) -> Result<i32> {
    let mp = mountpoint(mp)?;
    let rel = image_path(&mp, path)?;
    let mut file = std::fs::File::open(from).with_context(|| format!("{}", from.display()))?;
    let size = file.metadata()?.len();
    let all = 0..size.div_ceil(4096);
    let range = match blocks {
        Some(r) => parse_range(r)?,
        None => all.clone(),
    };
    if range.end > all.end {
        bail!("{} has {} blocks; --blocks asks for more", from.display(), all.end);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut filled, mut rejected) = (0u64, Vec::new());
    let mut at = range.start;
    while at < range.end {
        let end = (at + FILL_BATCH).min(range.end);
        let mut batch = Vec::new();
        for i in at..end {
            let mut buf = vec![0u8; 4096];
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(i * 4096))?;
            let n = read_full(&mut file, &mut buf)?;
            buf.truncate(n);
            while buf.last() == Some(&0) {
                buf.pop();
            }
            let (codec, data) = if buf.is_empty() { ("zero", String::new()) } else { ("raw", b64.encode(&buf)) };
            batch.push(serde_json::json!({ "block": i, "codec": codec, "data": data }));
        }
        let request = serde_json::json!({ "cmd": "fill", "path": rel, "blocks": batch });
        let v = ask_within(&mp, &request, Duration::from_secs(120)).map_err(|e| anyhow::anyhow!(e))?;
        let r: FillReport = serde_json::from_value(v)?;
        filled += r.filled;
        rejected.extend(r.rejected);
        at = end;
    }
    for (block, why) in rejected.iter().take(10) {
        eprintln!("block {block} refused: {why}");
    }
    println!("{rel}: {filled} blocks filled, {} refused", rejected.len());
    Ok(if rejected.is_empty() { 0 } else { 1 })
}

/// The fs-verity tree of a local file: (size, root hash, compact tree).
fn tree_of(file: &Path) -> Result<(u64, incfs_format::Hash, Vec<u8>)> {
    let data = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    let tree = incfs_verity::MerkleTree::from_data(&data);
    Ok((data.len() as u64, *tree.root(), tree.to_compact()))
}

/// `--mode` (octal), else `file`'s permission bits.
fn mode_of(mode: Option<&str>, file: &Path) -> Result<u16> {
    use std::os::unix::fs::PermissionsExt;
    match mode {
        Some(m) => u16::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| anyhow::anyhow!("--mode {m:?}: octal permission bits like 644")),
        None => Ok((std::fs::metadata(file).with_context(|| format!("{}", file.display()))?.permissions().mode()
            & 0o7777) as u16),
    }
}

pub fn sign_file(
    file: &Path,
    key: &Path,
    image: &str,
    path: &str,
    mode: Option<&str>,
    out: Option<&Path>,
) -> Result<i32> {
    let key = crate::keys::load_signing_key(key)?;
    if !incfs_format::manifest::is_valid_image_name(image) {
        bail!("--image {image:?}: not a valid image name");
    }
    let canonical = incfs_format::push::canonical_path(path.as_bytes());
    if canonical.is_empty() || !canonical.split(|&b| b == b'/').all(incfs_format::manifest::is_valid_name) {
        bail!("--path {path:?}: give the file's path inside the image, like lang/fr.pak");
    }
    let mode = mode_of(mode, file)?;
    let (size, root, _) = tree_of(file)?;
    let digest = incfs_verity::file_digest(&root, size);
    let sig = key.sign(&incfs_format::push::push_message(image, path.as_bytes(), mode, &digest));
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| {
        let mut p = file.as_os_str().to_owned();
        p.push(".sig");
        p.into()
    });
    std::fs::write(&out, sig).with_context(|| format!("{}", out.display()))?;
    println!(
        "{} {} -> {} (image {image}, path {}, mode {mode:o})",
        incfs_verity::format_digest(&digest),
        file.display(),
        out.display(),
        String::from_utf8_lossy(&canonical)
    );
    Ok(0)
}

pub fn add(mp: &Path, path: &Path, from: &Path, signature: &Path, mode: Option<&str>, fill_now: bool) -> Result<i32> {
    let mpc = mountpoint(mp)?;
    let rel = image_path(&mpc, path)?;
    let (size, root, tree) = tree_of(from)?;
    let mode = mode_of(mode, from)?;
    let sig = std::fs::read(signature).with_context(|| format!("{}", signature.display()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let request = serde_json::json!({
        "cmd": "add", "path": rel, "mode": mode, "size": size, "root_hash": hex::encode(root),
        "tree": b64.encode(&tree), "signature": b64.encode(&sig),
    });
    let v = ask_within(&mpc, &request, Duration::from_secs(60)).map_err(|e| anyhow::anyhow!(e))?;
    println!("{}: added ({})", rel, v["digest"].as_str().unwrap_or("?"));
    if fill_now {
        return fill(mp, path, from, None);
    }
    Ok(0)
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
