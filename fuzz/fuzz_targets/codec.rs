//! Stored block decoding: first byte picks the codec, the rest is the stored form. Output is
//! always one 4096-byte block; a frame that claims more must be refused, not allocated.
#![no_main]
use incfs_format::codec::{decode_block, Codec};
use incfs_format::BLOCK_SIZE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&c, stored)) = data.split_first() else { return };
    let Some(codec) = Codec::from_u8(c % 4) else { return };
    let mut out = [0u8; BLOCK_SIZE];
    let _ = decode_block(codec, stored, &mut out);
});
