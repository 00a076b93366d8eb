//! Micro-benchmark of the read pipeline without FUSE or HTTP:
//!
//! ```text
//! cargo run --release -p incfs-fs --example pipeline_bench [-- MIB]
//! ```
//!
//! Packs about 256 MiB (half random, half compressible text that never repeats a block), loads
//! the repository into the in-process test store (no latency, no bandwidth limit), and times
//!
//! - a cold sequential read of every file through `Reader::read` in 1 MiB reads with a 16 MiB
//!   readahead window (fetch, decode, hash, store: the daemon's path minus FUSE);
//! - the same read again, warm (every block local);
//! - as a baseline, decoding and hashing every stored block directly (`verify_block` over each
//!   block record, one thread, the bytes already in memory).
//!
//! For each: MiB/s of file data and process CPU time per GiB (getrusage), and the ratio of the
//! pipeline's rates to the baseline's.

#[path = "../tests/common/harness.rs"]
mod harness;
#[path = "../tests/common/test_store.rs"]
mod test_store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use incfs_fetch::image::verify_block;
use incfs_fs::background::{Background, BackgroundOptions};
use incfs_fs::reader::{FileRef, Reader, DEFAULT_PARALLEL};
use incfs_fs::stats::Stats;

const MIB: usize = 1 << 20;
const READ: usize = MIB;
const AHEAD_BLOCKS: u64 = 4096;

/// Process CPU time (user + system) so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct passed.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Measure {
    name: &'static str,
    bytes: u64,
    wall: Duration,
    cpu: Duration,
}

impl Measure {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.wall.as_secs_f64()
    }

    fn cpu_s_per_gib(&self) -> f64 {
        self.cpu.as_secs_f64() / (self.bytes as f64 / (1u64 << 30) as f64)
    }

    fn print(&self) {
        println!(
            "{:<34} {:>8.1} MiB in {:>7.3} s: {:>8.1} MiB/s, CPU {:>6.3} s ({:.3} CPU s/GiB)",
            self.name,
            self.bytes as f64 / MIB as f64,
            self.wall.as_secs_f64(),
            self.mib_s(),
            self.cpu.as_secs_f64(),
            self.cpu_s_per_gib()
        );
    }
}

async fn measure<F: std::future::Future<Output = u64>>(name: &'static str, f: F) -> Measure {
    let (t, c) = (Instant::now(), cpu_time());
    let bytes = f.await;
    Measure { name, bytes, wall: t.elapsed(), cpu: cpu_time() - c }
}

/// Read every file sequentially, as a program would through the mount, checking the bytes.
async fn read_all(reader: &Arc<Reader>, files: &[(FileRef, Vec<u8>)]) -> u64 {
    let mut total = 0;
    for (f, content) in files {
        for off in (0..content.len()).step_by(READ) {
            let next = ((off + READ) / incfs_format::BLOCK_SIZE) as u64;
            let deadline = Instant::now() + Duration::from_secs(30);
            let got = reader
                .read(f, off as u64, READ as u32, next..next + AHEAD_BLOCKS, deadline)
                .await
                .unwrap_or_else(|e| panic!("{}: read at {off}: {e:?}", f.label));
            assert!(got == content[off..(off + READ).min(content.len())], "{}: wrong bytes at {off}", f.label);
            total += got.len() as u64;
        }
    }
    total
}

fn main() {
    let total_mib: usize = std::env::args().nth(1).map_or(256, |a| a.parse().expect("size in MiB"));
    let file_mib = (total_mib / 4).max(1);
    let contents: Vec<(String, Vec<u8>)> = (0..4u64)
        .map(|i| {
            let len = file_mib * MIB;
            if i % 2 == 0 {
                (format!("random{i}"), harness::random_bytes(i + 1, len))
            } else {
                (format!("text{i}"), harness::text_bytes(i + 1, len))
            }
        })
        .collect();
    let t = Instant::now();
    let files: Vec<(&str, &[u8])> = contents.iter().map(|(n, c)| (n.as_str(), c.as_slice())).collect();
    let (repo, trust) = harness::pack(&files);
    println!("packed {} MiB in {:.2} s", file_mib * 4, t.elapsed().as_secs_f64());

    // As the daemon's runtime: two async workers, a bounded blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let fx = harness::Fixture::from_repo(repo, &trust, DEFAULT_PARALLEL).await;
        let _bg = Background::new(fx.reader.clone(), fx.manifest.clone(), BackgroundOptions::default());
        let files: Vec<(FileRef, Vec<u8>)> = contents.into_iter().map(|(n, c)| (fx.file(&n), c)).collect();
        let stored: u64 = fx.manifest.objects.iter().map(|o| o.size).sum();
        println!(
            "repository: {} objects, {:.1} MiB stored; reader parallel {DEFAULT_PARALLEL}, reads of {} KiB, readahead {} MiB",
            fx.manifest.objects.len(),
            stored as f64 / MIB as f64,
            READ >> 10,
            AHEAD_BLOCKS * 4096 / MIB as u64
        );

        let cold = measure("cold read through Reader::read", read_all(&fx.reader, &files)).await;
        let c = fx.store.counts();
        println!(
            "  test store: {} requests, {:.1} MiB served, at most {} requests / {:.1} MiB in flight; reader: {} fetches",
            c.requests,
            c.bytes_served as f64 / MIB as f64,
            c.max_in_flight,
            c.max_bytes_in_flight as f64 / MIB as f64,
            Stats::get(&fx.reader.stats.fetch_requests)
        );
        let warm = measure("warm read through Reader::read", read_all(&fx.reader, &files)).await;

        // Baseline: the same blocks decoded and hashed directly, their bytes already in memory.
        let mut objects: HashMap<u32, bytes::Bytes> = HashMap::new();
        for i in 0..fx.manifest.objects.len() as u32 {
            let key = fx.image.object_key(i);
            objects.insert(i, bytes::Bytes::from(std::fs::read(fx.repo.path().join(&key)).unwrap()));
        }
        let mut metas = Vec::new();
        for (f, _) in &files {
            metas.push(fx.image.file_meta(&f.data).await.expect("file metadata"));
        }
        let base = measure("baseline: decode + SHA-256 only", async {
            let mut total = 0u64;
            for (meta, (f, _)) in metas.iter().zip(&files) {
                for (r, leaf) in meta.records.iter().zip(meta.tree.leaves()) {
                    let stored: &[u8] = match r.codec {
                        incfs_format::Codec::Zero => &[],
                        _ => &objects[&r.object][r.range().start as usize..r.range().end as usize],
                    };
                    let block = verify_block(r, stored, leaf).expect("block verifies");
                    std::hint::black_box(&block);
                }
                total += f.data.size;
            }
            total
        })
        .await;

        println!();
        for m in [&cold, &warm, &base] {
            m.print();
        }
        println!();
        println!(
            "cold / baseline: {:.2}x the throughput, {:.2}x the CPU per GiB",
            cold.mib_s() / base.mib_s(),
            cold.cpu_s_per_gib() / base.cpu_s_per_gib()
        );
        println!(
            "warm / baseline: {:.2}x the throughput, {:.2}x the CPU per GiB",
            warm.mib_s() / base.mib_s(),
            warm.cpu_s_per_gib() / base.cpu_s_per_gib()
        );
    });
}
