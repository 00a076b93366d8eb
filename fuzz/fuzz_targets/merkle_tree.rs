//! A compact Merkle tree from the metadata region, checked against a root: any bytes, any size.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 40 {
        return;
    }
    // Sizes up to 64 MiB of file data keep the tree small enough to fuzz fast.
    let size = u64::from_le_bytes(data[..8].try_into().unwrap()) % (64 << 20);
    let root: [u8; 32] = data[8..40].try_into().unwrap();
    let compact = &data[40..];
    if let Ok(tree) = incfs_verity::MerkleTree::from_compact(size, compact, &root) {
        assert_eq!(tree.root(), &root, "a tree accepted for a root has that root");
        assert!(tree.leaves().len() as u64 <= incfs_verity::block_count(size).max(1));
    }
});
