//! The daemon's read pipeline ([`Reader`]) and background completion ([`Background`]) driven
//! directly, without FUSE and without HTTP: a packed image served from an in-process
//! [`TestStore`] that adds latency and a bandwidth limit, counts requests and bytes, and injects
//! faults. Counts are exact where the pipeline's design makes them so; timings are only ever
//! compared with generous bounds.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::harness::{random_bytes, Fixture};
use common::test_store::Request;
use incfs_format::BLOCK_SIZE;
use incfs_fs::background::BackgroundOptions;
use incfs_fs::reader::{FileRef, ReadFailure, Reader};
use incfs_fs::stats::{FailCause, Stats};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const BS: u64 = BLOCK_SIZE as u64;

/// Bound on any one wait of a test.
const BOUND: Duration = Duration::from_secs(10);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(BOUND, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {BOUND:?}"),
    }
}

/// Poll `cond` every few milliseconds until it holds, at most [`BOUND`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// `reader.read` on its own task (as the FUSE layer calls it).
fn spawn_read(
    reader: &Arc<Reader>,
    f: &FileRef,
    offset: u64,
    size: u32,
) -> tokio::task::JoinHandle<Result<Vec<u8>, ReadFailure>> {
    let (reader, f) = (reader.clone(), f.clone());
    tokio::spawn(async move { reader.read(&f, offset, size, 0..0, deadline()).await.map(|s| s.to_vec()) })
}

/// Concurrent reads of one range of a cold file share the fetches: one metadata request and one
/// request for the blocks, whatever the number of readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_for_blocks() {
    let big = random_bytes(1, 4 * MIB);
    let fx = Fixture::new(&[("big", &big)], 4).await;
    let _bg = fx.background(BackgroundOptions::default());
    fx.store.set_latency(Duration::from_millis(20));
    let f = fx.file("big");
    let (offset, size) = (MIB, 64 * KIB);
    let reads: Vec<_> = (0..32).map(|_| spawn_read(&fx.reader, &f, offset as u64, size as u32)).collect();
    let results = bounded("32 reads", futures::future::join_all(reads)).await;
    for r in results {
        assert!(r.unwrap().unwrap() == big[offset..offset + size], "wrong bytes");
    }
    let requests = fx.store.requests();
    assert_eq!(fx.meta_requests(&f), 1, "one metadata request: {requests:#?}");
    assert_eq!(requests.len(), 2, "metadata and one run of 16 blocks: {requests:#?}");
    let run = requests.iter().find(|r| !fx.touches_meta(&f, r)).expect("a block request").range.clone();
    assert!(run.end - run.start <= size as u64, "the block request holds no more than the 16 blocks: {run:?}");
    assert_eq!(Stats::get(&fx.reader.stats.fetch_requests), 2);
    assert_eq!(Stats::get(&fx.reader.stats.blocks_fetched), 16);
}

/// Concurrent first reads of different blocks of a cold large file (> 1 MiB: not fetched as one
/// small span) share one metadata request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_for_metadata() {
    let big = random_bytes(2, 4 * MIB);
    let fx = Fixture::new(&[("big", &big)], 4).await;
    let _bg = fx.background(BackgroundOptions::default());
    fx.store.set_latency(Duration::from_millis(20));
    let f = fx.file("big");
    // Blocks 64 apart: no two reads' blocks are adjacent, so each costs one block request.
    let reads: Vec<_> = (0..16u64).map(|i| spawn_read(&fx.reader, &f, i * 64 * BS, BS as u32)).collect();
    let results = bounded("16 reads", futures::future::join_all(reads)).await;
    for (i, r) in results.into_iter().enumerate() {
        let at = i * 64 * BLOCK_SIZE;
        assert!(r.unwrap().unwrap() == big[at..at + BLOCK_SIZE], "read {i}: wrong bytes");
    }
    let requests = fx.store.requests();
    assert_eq!(fx.meta_requests(&f), 1, "one metadata request for 16 readers: {requests:#?}");
    assert_eq!(requests.len(), 1 + 16, "and one request per block: {requests:#?}");
}

/// A cold small file costs one request: its blocks and metadata region lie back to back (pack
/// writes them so) and are fetched together, once the reader knows where the regions lie
/// (`Background::new` tells it, as the daemon always builds one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_small_file_costs_one_request() {
    let a = random_bytes(3, 300 * KIB);
    let b = random_bytes(4, 40 * KIB);
    let fx = Fixture::new(&[("a", &a), ("b", &b)], 4).await;
    let _bg = fx.background(BackgroundOptions { enabled: false, ..Default::default() });
    fx.store.set_latency(Duration::from_millis(5));
    let f = fx.file("b");
    let got = bounded("read", fx.reader.read(&f, 0, b.len() as u32, 0..0, deadline())).await.unwrap();
    assert!(got == b, "wrong bytes");
    let requests = fx.store.requests();
    assert_eq!(requests.len(), 1, "data and metadata in one request: {requests:#?}");
    assert_eq!(fx.meta_requests(&f), 1);
    assert!(requests[0].range.end - requests[0].range.start <= 1 << 20, "a small span: {requests:#?}");
    assert!(fx.reader.is_complete(&f), "every block of the span kept");
    // Read again: all local.
    let again = bounded("read again", fx.reader.read(&f, 4096, 8192, 0..0, deadline())).await.unwrap();
    assert!(again == b[4096..4096 + 8192]);
    assert_eq!(fx.store.requests().len(), 1);
}

/// Five small files packed side by side: 10 KiB each, their spans about 10.3 KiB.
fn neighbours() -> Vec<(String, Vec<u8>)> {
    (1..=5).map(|k| (format!("d/{k}"), random_bytes(40 + k, 10 * KIB))).collect()
}

async fn neighbours_fixture(files: &[(String, Vec<u8>)]) -> Fixture {
    let list: Vec<(&str, &[u8])> = files.iter().map(|(p, c)| (p.as_str(), c.as_slice())).collect();
    Fixture::new(&list, 4).await
}

/// A cold small file brings its neighbours in the pack (within `--nearby`) in its request:
/// reading all five costs one request, and each is verified and kept when read. With
/// `--nearby 0`, one request each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neighbours_of_a_cold_small_file_come_in_its_request() {
    let files = neighbours();
    let mut fx = neighbours_fixture(&files).await;
    for (reach, expected) in [(64 * KIB as u64, 1), (0, files.len())] {
        fx.renew();
        fx.reader.set_nearby(reach);
        let _bg = fx.background(BackgroundOptions { enabled: false, ..Default::default() });
        for k in [2, 0, 4, 1, 3] {
            let (path, content) = &files[k];
            let f = fx.file(path);
            let got = bounded("read", fx.reader.read(&f, 0, content.len() as u32, 0..0, deadline())).await;
            assert!(got.unwrap() == *content, "{path}: wrong bytes");
            assert!(fx.reader.is_complete(&f), "{path}: verified and kept");
        }
        let requests = fx.store.requests();
        assert_eq!(requests.len(), expected, "--nearby {reach}: {requests:#?}");
        if reach == 0 {
            assert_eq!(fx.reader.staged_bytes(), 0, "nothing held for neighbours");
        }
    }
}

/// A one-block file has no tree (its root is its leaf), only a block record: cold, its record
/// and its data still come in one request, not one for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_one_block_file_costs_one_request() {
    let files: Vec<(String, Vec<u8>)> = (1..=3).map(|k| (format!("s/{k}"), random_bytes(60 + k, 3000))).collect();
    let fx = neighbours_fixture(&files).await;
    fx.reader.set_nearby(0);
    let _bg = fx.background(BackgroundOptions { enabled: false, ..Default::default() });
    let (path, content) = &files[1];
    let f = fx.file(path);
    let got = bounded("read", fx.reader.read(&f, 0, 4096, 0..0, deadline())).await.unwrap();
    assert!(got == *content, "wrong bytes");
    let requests = fx.store.requests();
    assert_eq!(requests.len(), 1, "record and data in one request: {requests:#?}");
    assert!(fx.reader.is_complete(&f));
}

/// Neighbours' bytes are not trusted because they came along: a bit flipped in one of them
/// fails its verification when that file is read (counted), the held bytes are dropped, and the
/// file is fetched again from the source; nothing wrong is returned or kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_neighbour_is_fetched_again_not_served() {
    let files = neighbours();
    let fx = neighbours_fixture(&files).await;
    let _bg = fx.background(BackgroundOptions { enabled: false, ..Default::default() });
    // One response for all five, its middle byte flipped: inside the third file's span.
    fx.store.set_flip(true);
    let first = fx.file(&files[0].0);
    let got = bounded("first read", fx.reader.read(&first, 0, (10 * KIB) as u32, 0..0, deadline())).await;
    assert!(got.unwrap() == files[0].1, "the first file's own bytes were fine");
    assert_eq!(fx.store.requests().len(), 1, "all five in one request");
    fx.store.set_flip(false);
    let mut failures = 0;
    for (path, content) in &files[1..] {
        let f = fx.file(path);
        let mut got = bounded("read", fx.reader.read(&f, 0, content.len() as u32, 0..0, deadline())).await;
        // A damaged hash block fails its read once (EIO); the next read asks the source.
        if let Err(e) = &got {
            assert_eq!(e.cause, FailCause::Verification, "{path}: {e:?}");
            failures += 1;
            got = bounded("read again", fx.reader.read(&f, 0, content.len() as u32, 0..0, deadline())).await;
        }
        assert!(got.unwrap() == *content, "{path}: wrong bytes");
    }
    assert!(failures <= 1, "one damaged file at most fails once");
    assert!(Stats::get(&fx.reader.stats.blocks_bad) >= 1, "the damage was detected");
    assert!(fx.store.requests().len() >= 2, "the damaged file came again from the source");
}

/// A block that fails verification is never returned nor kept; once the source serves it
/// right, the same read succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_block_fails_verification_and_is_not_kept() {
    let big = random_bytes(5, 4 * MIB);
    let fx = Fixture::new(&[("big", &big)], 4).await;
    let _bg = fx.background(BackgroundOptions::default());
    let f = fx.file("big");
    // Metadata first (served right), so that only the block request is corrupted.
    let first = bounded("warm-up read", fx.reader.read(&f, 0, BS as u32, 0..0, deadline())).await.unwrap();
    assert!(first == big[..BLOCK_SIZE]);
    let block = 100u64;
    let at = (block * BS) as usize;
    let leaf = incfs_verity::hash_data_block(&big[at..at + BLOCK_SIZE]);

    fx.store.set_flip(true);
    let err = bounded("corrupted read", fx.reader.read(&f, block * BS, BS as u32, 0..0, deadline()))
        .await
        .expect_err("a corrupted block must not be returned");
    assert_eq!(err.cause, FailCause::Verification, "{err:?}");
    assert!(fx.store.counts().bytes_corrupted >= 1, "the fault was applied");
    assert!(!fx.reader.store().has_block(&leaf), "a bad block is not stored");
    assert!(!fx.reader.presence.is_present(&f.key, block), "nor marked present");
    assert!(Stats::get(&fx.reader.stats.blocks_bad) >= 1);

    fx.store.set_flip(false);
    let got = bounded("read after the fault", fx.reader.read(&f, block * BS, BS as u32, 0..0, deadline()))
        .await
        .expect("served right, the block verifies");
    assert!(got == big[at..at + BLOCK_SIZE], "wrong bytes");
    assert!(fx.reader.store().has_block(&leaf));
    assert!(fx.reader.presence.is_present(&f.key, block));
}

/// A failing source gives a source failure, not a hang, and the read works once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_request_fails_the_read_then_recovers() {
    let big = random_bytes(6, 2 * MIB);
    let fx = Fixture::new(&[("big", &big)], 4).await;
    let _bg = fx.background(BackgroundOptions::default());
    let f = fx.file("big");
    fx.store.fail_next(1);
    let err = bounded("failing read", fx.reader.read(&f, 0, BS as u32, 0..0, deadline())).await.unwrap_err();
    assert_eq!(err.cause, FailCause::Source, "{err:?}");
    assert_eq!(fx.store.counts().failures_injected, 1);
    // A source failure is remembered for a moment (the kernel's retry of a failed readahead
    // must not wait again); after that the read goes to the source again and succeeds.
    let got = bounded("read after recovery", async {
        loop {
            match fx.reader.read(&f, 0, BS as u32, 0..0, deadline()).await {
                Ok(v) => break v,
                Err(e) => assert_eq!(e.cause, FailCause::Source, "{e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(got == big[..BLOCK_SIZE]);
    assert_eq!(fx.store.counts().failures_injected, 1);
}

/// Demand reads overtake background completion: while the background fetches a large file over
/// a slow link, a cold read of another file is served long before the large file is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demand_read_overtakes_background_completion() {
    let a = random_bytes(7, 16 * MIB);
    let b = random_bytes(8, 40 * KIB);
    let fx = Fixture::new(&[("a", &a), ("b", &b)], 4).await;
    let (fa, fb) = (fx.file("a"), fx.file("b"));
    let (ma, mb) = (fa.data.meta.unwrap(), fb.data.meta.unwrap());
    assert!((ma.object, ma.offset) < (mb.object, mb.offset), "b is packed after a");
    // 16 MiB take 2 s at this rate.
    fx.store.set_latency(Duration::from_millis(5));
    fx.store.set_bandwidth(Some(8 << 20));
    let bg = fx.background(BackgroundOptions { enabled: true, ..Default::default() });
    let task = tokio::spawn(bg.clone().run());
    let store = fx.store.clone();
    wait_until("background fetching a's blocks", || {
        store.counts().in_flight > 0 && store.requests().iter().any(|r| r.range.end - r.range.start >= MIB as u64)
    })
    .await;
    let t = Instant::now();
    let got = bounded("read of b", fx.reader.read(&fb, 0, b.len() as u32, 0..0, deadline())).await.unwrap();
    let took = t.elapsed();
    assert!(got == b, "wrong bytes");
    let a_present = fx.reader.presence.count(&fa.key);
    let a_blocks = a.len() as u64 / BS;
    assert!(!fx.reader.is_complete(&fa), "a was complete ({a_present} blocks) before b was read");
    assert!(took < Duration::from_secs(1), "the read of b took {took:?} while a was being fetched");
    task.abort();
    eprintln!(
        "b read in {took:?} with {a_present}/{a_blocks} blocks of a present; {} background requests cancelled",
        Stats::get(&fx.reader.stats.background_cancelled)
    );
}

/// Readahead is bounded: a cold sequential read with a 16 MiB readahead window keeps at most
/// `parallel` readahead requests (2 MiB each) in flight, plus the read's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readahead_bounds_requests_and_bytes_in_flight() {
    const PARALLEL: usize = 4;
    let big = random_bytes(9, 32 * MIB);
    let fx = Fixture::new(&[("big", &big)], PARALLEL).await;
    let _bg = fx.background(BackgroundOptions::default());
    fx.store.set_latency(Duration::from_millis(5));
    fx.store.set_bandwidth(Some(256 << 20));
    let f = fx.file("big");
    let blocks = big.len() as u64 / BS;
    bounded("sequential read", async {
        for off in (0..big.len()).step_by(MIB) {
            let next = (off + MIB) as u64 / BS;
            let got = fx.reader.read(&f, off as u64, MIB as u32, next..next + 4096, deadline()).await.unwrap();
            assert!(got == big[off..off + MIB], "wrong bytes at {off}");
        }
    })
    .await;
    let c = fx.store.counts();
    eprintln!("sequential read: {c:?}");
    let own = 2;
    assert!(c.max_in_flight as usize <= PARALLEL + own, "{c:?}");
    assert!(c.max_bytes_in_flight <= ((PARALLEL + own) * 2 * MIB) as u64, "{c:?}");
    assert!(c.max_in_flight > 1, "readahead ran in parallel: {c:?}");
    assert_eq!(Stats::get(&fx.reader.stats.blocks_fetched), blocks, "every block fetched exactly once");
    let object = fx.manifest.objects[f.data.meta.unwrap().object as usize];
    assert!(c.bytes_served <= object.size, "no byte fetched twice: {c:?}, object of {}", object.size);
}

/// On a long link (first bytes after >= `LONG_LINK`), readahead keeps twice `parallel`
/// requests in flight, and still no more; on a short one, `parallel` (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_link_gets_twice_the_requests_in_flight() {
    const PARALLEL: usize = 4;
    let big = random_bytes(11, 24 * MIB);
    let fx = Fixture::new(&[("big", &big)], PARALLEL).await;
    let _bg = fx.background(BackgroundOptions { enabled: false, ..Default::default() });
    fx.store.set_latency(incfs_fs::reader::LONG_LINK + Duration::from_millis(10));
    let f = fx.file("big");
    assert_eq!(fx.reader.parallel(), PARALLEL, "nothing measured yet");
    // One read first (its last MiB, no readahead), which measures the link.
    let last = big.len() - MIB;
    let got = bounded("first read", fx.reader.read(&f, last as u64, MIB as u32, 0..0, deadline())).await.unwrap();
    assert!(got == big[last..], "wrong bytes at {last}");
    assert_eq!(fx.reader.parallel(), 2 * PARALLEL, "a long link doubles the requests in flight");
    bounded("sequential read", async {
        for off in (0..last).step_by(MIB) {
            let next = (off + MIB) as u64 / BS;
            let got = fx.reader.read(&f, off as u64, MIB as u32, next..next + 4096, deadline()).await.unwrap();
            assert!(got == big[off..off + MIB], "wrong bytes at {off}");
        }
    })
    .await;
    let c = fx.store.counts();
    eprintln!("sequential read on a long link: {c:?}");
    assert_eq!(fx.reader.parallel(), 2 * PARALLEL, "a long link doubles the requests in flight");
    let own = 2;
    assert!(c.max_in_flight as usize > PARALLEL + own, "more than --parallel in flight: {c:?}");
    assert!(c.max_in_flight as usize <= 2 * PARALLEL + own, "{c:?}");
    assert_eq!(Stats::get(&fx.reader.stats.blocks_fetched), big.len() as u64 / BS, "every block fetched once");
}

/// A read that cannot get its data in time fails with a timeout at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_source_times_out_at_the_deadline() {
    let big = random_bytes(10, 2 * MIB);
    let fx = Fixture::new(&[("big", &big)], 4).await;
    let _bg = fx.background(BackgroundOptions::default());
    fx.store.set_latency(Duration::from_secs(2));
    let f = fx.file("big");
    let t = Instant::now();
    let err = bounded("read", fx.reader.read(&f, 0, BS as u32, 0..0, Instant::now() + Duration::from_millis(200)))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.cause, FailCause::Timeout, "{err:?}");
    assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(1), "failed after {took:?}");
}

/// `rounds` times, from a cold cache: 200 reads of one block each (block `block(i)` for read
/// `i`) started 10 µs apart, so that some arrive while the first fetch is completing. Returns
/// each round's requests.
async fn staggered_reads(fx: &mut Fixture, path: &str, rounds: usize, block: fn(u64) -> u64) -> Vec<Vec<Request>> {
    fx.store.set_latency(Duration::from_micros(500));
    let mut out = Vec::new();
    for _ in 0..rounds {
        fx.renew();
        let _bg = fx.background(BackgroundOptions::default());
        let f = fx.file(path);
        let t0 = Instant::now();
        let reads: Vec<_> = (0..200u64)
            .map(|i| {
                let (reader, f) = (fx.reader.clone(), f.clone());
                tokio::spawn(async move {
                    // Finer than the timer's millisecond.
                    while t0.elapsed() < Duration::from_micros(i * 10) {
                        tokio::task::yield_now().await;
                    }
                    reader.read(&f, block(i) * BS, BS as u32, 0..0, deadline()).await
                })
            })
            .collect();
        for r in bounded("staggered reads", futures::future::join_all(reads)).await {
            r.unwrap().expect("read");
        }
        out.push(fx.store.requests());
    }
    out
}

/// Single flight for metadata must also hold for readers that arrive while the fetch is
/// completing: a piece should always be either cached or in flight, as a block is.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn single_flight_for_metadata_with_late_readers() {
    let big = random_bytes(11, 8 * MIB);
    let mut fx = Fixture::new(&[("big", &big)], 4).await;
    let rounds = staggered_reads(&mut fx, "big", 50, |i| i * 9).await;
    let f = fx.file("big");
    let counts: Vec<usize> = rounds.iter().map(|reqs| reqs.iter().filter(|r| fx.touches_meta(&f, r)).count()).collect();
    assert!(counts.iter().all(|&n| n == 1), "metadata requests per round: {counts:?}");
}

/// The same for a small file's span (blocks and metadata in one request).
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn single_flight_for_small_spans_with_late_readers() {
    let a = random_bytes(12, 300 * KIB);
    let b = random_bytes(13, 40 * KIB);
    let mut fx = Fixture::new(&[("a", &a), ("b", &b)], 4).await;
    let rounds = staggered_reads(&mut fx, "b", 50, |_| 0).await;
    let counts: Vec<usize> = rounds.iter().map(Vec::len).collect();
    assert!(
        counts.iter().all(|&n| n == 1),
        "requests per round: {counts:?}; e.g. {:#?}",
        rounds.iter().find(|r| r.len() > 1)
    );
}
