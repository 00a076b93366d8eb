//! Block records (16 bytes each) and the metadata layout of a file of any size.
#![no_main]
use incfs_format::block_map::{BlockRecord, FileMetaLayout, BLOCK_RECORD_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 8 {
        let size = u64::from_le_bytes(data[..8].try_into().unwrap());
        let layout = FileMetaLayout::new(size);
        if let Some(len) = layout.len() {
            let blocks = incfs_verity::block_count(size);
            if blocks > 0 {
                assert!(layout.record_offset(blocks - 1) + BLOCK_RECORD_SIZE as u64 <= len);
            }
        }
    }
    let mut prev: Option<BlockRecord> = None;
    for chunk in data.chunks_exact(BLOCK_RECORD_SIZE) {
        if let Ok(r) = BlockRecord::decode(chunk.try_into().unwrap()) {
            assert_eq!(BlockRecord::decode(&r.encode()).unwrap(), r);
            let _ = r.range();
            if let Some(p) = prev {
                let _ = p.joins_run(&r, &p, 4 << 20);
            }
            prev = Some(r);
        }
    }
});
