//! `incfs digest`: fs-verity digests of local files, streamed in 4 MiB chunks.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use incfs_verity::{format_digest, hash_data, Hash, MerkleTree};

/// fs-verity digest of the file at `path`, read through `buf` (reused across files: a fresh
/// 4 MiB buffer per file costs more than hashing a small file).
pub fn file_digest(path: &Path, buf: &mut [u8]) -> Result<Hash> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut leaves = Vec::new();
    let mut size = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).with_context(|| format!("cannot read {}", path.display()))? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        size += n as u64;
        leaves.extend(hash_data(&buf[..n]));
        if n < buf.len() {
            break;
        }
    }
    Ok(MerkleTree::from_leaves(size, leaves).digest())
}

pub fn run(files: &[std::path::PathBuf]) -> Result<i32> {
    let mut buf = vec![0u8; 4 << 20];
    for f in files {
        println!("{} {}", format_digest(&file_digest(f, &mut buf)?), f.display());
    }
    Ok(0)
}
