//! Compact maps (format 3) of a file of any size: decoding, the root and dense bytes rebuilt
//! from the runs, leaf and record lookups.
#![no_main]
use incfs_format::compact_map::CompactMap;
use incfs_format::FileMetaLayout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    // At most 2^40 bytes: any real sparse file, and every level count fits in memory as runs.
    let size = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 40) + 1;
    let Ok(map) = CompactMap::decode(size, &data[8..]) else { return };
    let _ = map.root();
    let blocks = incfs_verity::block_count(size);
    for i in [0, blocks / 2, blocks - 1] {
        let _ = (map.leaf(i), map.record(i));
    }
    let dense = FileMetaLayout::new(size).len().unwrap();
    let head = map.dense(0..dense.min(4096));
    assert_eq!(head.len() as u64, dense.min(4096));
    let tail = map.dense(dense.saturating_sub(100)..dense);
    assert_eq!(tail.len() as u64, dense.min(100));
});
