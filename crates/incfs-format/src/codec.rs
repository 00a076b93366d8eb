//! Per-block compression. Each 4 KiB block is stored on its own, so any block can be fetched
//! and decoded without its neighbours.
//!
//! A block's trailing zero bytes are never stored: the *payload* is the block with them trimmed,
//! and decoding pads the payload back to 4096 bytes with zeros. An all-zero block (a hole in a
//! sparse file, or zero padding) has an empty payload and is stored as [`Codec::Zero`], taking no
//! space at all. A payload is compressed only when that makes it smaller; otherwise it is stored
//! raw.

use std::cell::RefCell;

use incfs_verity::BLOCK_SIZE;

/// How one block's bytes are stored. The numeric values are part of the on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// All zeros; nothing stored.
    Zero = 0,
    /// The payload as is.
    Raw = 1,
    /// The payload compressed as one LZ4 block (no frame, no size prefix).
    Lz4 = 2,
    /// The payload compressed as one zstd frame.
    Zstd = 3,
    /// The payload compressed as one zstd frame with one of the image's dictionaries, the one
    /// the frame header's Dictionary_ID names (format 4).
    ZstdDict = 4,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        Some(match v {
            0 => Codec::Zero,
            1 => Codec::Raw,
            2 => Codec::Lz4,
            3 => Codec::Zstd,
            4 => Codec::ZstdDict,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Zero => "zero",
            Codec::Raw => "raw",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
            Codec::ZstdDict => "zstd+dict",
        }
    }
}

/// The compression a publisher asks for. Blocks that do not shrink are stored raw regardless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Lz4,
    Zstd {
        level: i32,
    },
    /// zstd with the dictionary of this id, registered with [`register_dictionary`].
    ZstdDict {
        level: i32,
        dict: u32,
    },
}

impl Compression {
    /// zstd level used when none is given. Each 4 KiB block is its own frame, where the levels
    /// differ little in ratio: /usr/share packed at level 2 is 0.8% larger than at 3 and packs
    /// in 2.17 s instead of 2.40 (level 1: +0.9%, 2.14 s).
    pub const DEFAULT_ZSTD_LEVEL: i32 = 2;
}

/// A block as stored: its codec and stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBlock {
    pub codec: Codec,
    pub bytes: Vec<u8>,
}

/// Why stored bytes could not be decoded into a block.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("a zero block must have no stored bytes, found {0}")]
    ZeroWithBytes(usize),
    #[error("a stored block is at most 4096 bytes, found {0}")]
    TooLong(usize),
    #[error("{codec} data does not decode to at most 4096 bytes: {reason}")]
    Corrupt { codec: &'static str, reason: String },
    #[error("the block was compressed with dictionary {0}, which this image does not have")]
    NoDictionary(u32),
}

/// Why a dictionary could not be registered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DictionaryError {
    #[error("not a zstd dictionary with an id (a trained dictionary starts with its magic and id)")]
    NotADictionary,
    #[error("two different dictionaries share id {0}")]
    IdClash(u32),
    #[error("its bytes do not match the digest and size the signed manifest gives (a damaged or substituted object)")]
    Mismatch,
}

/// Check a dictionary object against the manifest's entry for it (size, SHA-256: the signed
/// name) and register it; returns its id.
pub fn accept_dictionary(expected: &crate::manifest::ObjectRef, bytes: &[u8]) -> Result<u32, DictionaryError> {
    use sha2::Digest;
    if bytes.len() as u64 != expected.size || <[u8; 32]>::from(sha2::Sha256::digest(bytes)) != expected.digest {
        return Err(DictionaryError::Mismatch);
    }
    register_dictionary(bytes)
}

/// Train a zstd dictionary of at most `size` bytes on `samples` (whole payloads of blocks).
/// Deterministic: the same samples give the same dictionary, and its id is derived from its
/// content. `None` when there is too little to learn from.
pub fn train_dictionary(samples: &[&[u8]], size: usize) -> Option<Vec<u8>> {
    let dict = zstd::dict::from_samples(samples, size).ok()?;
    dictionary_id(&dict).map(|_| dict)
}

/// The dictionaries this process knows, by the id their frames carry. Registered once per image
/// (a handful); decoding looks the frame's id up here, so stored bytes name their dictionary
/// themselves and a cache shared by several images needs no record of which one each block used.
struct Registered {
    bytes: Vec<u8>,
    ddict: zstd::zstd_safe::DDict<'static>,
    /// Encoder tables, by level, made on first use (only a writer encodes).
    cdicts: Vec<(i32, std::sync::Arc<zstd::zstd_safe::CDict<'static>>)>,
}

static DICTIONARIES: std::sync::LazyLock<parking_lot::RwLock<std::collections::HashMap<u32, Registered>>> =
    std::sync::LazyLock::new(Default::default);

/// The id a zstd dictionary's frames carry, if `bytes` is a dictionary that has one.
pub fn dictionary_id(bytes: &[u8]) -> Option<u32> {
    zstd::zstd_safe::get_dict_id_from_dict(bytes).map(|id| id.get())
}

/// Make a dictionary known to [`decode_block`] (and to [`encode_block`] with
/// [`Compression::ZstdDict`]); returns its id. Registering the same bytes again is a no-op.
pub fn register_dictionary(bytes: &[u8]) -> Result<u32, DictionaryError> {
    let id = dictionary_id(bytes).ok_or(DictionaryError::NotADictionary)?;
    let mut all = DICTIONARIES.write();
    if let Some(r) = all.get(&id) {
        return if r.bytes == bytes { Ok(id) } else { Err(DictionaryError::IdClash(id)) };
    }
    let ddict = zstd::zstd_safe::DDict::create(bytes);
    all.insert(id, Registered { bytes: bytes.to_vec(), ddict, cdicts: Vec::new() });
    Ok(id)
}

/// Encoder tables of registered dictionary `id` at `level`.
fn cdict(id: u32, level: i32) -> Option<std::sync::Arc<zstd::zstd_safe::CDict<'static>>> {
    if let Some(c) = DICTIONARIES.read().get(&id)?.cdicts.iter().find(|c| c.0 == level) {
        return Some(c.1.clone());
    }
    let mut all = DICTIONARIES.write();
    let r = all.get_mut(&id)?;
    if let Some(c) = r.cdicts.iter().find(|c| c.0 == level) {
        return Some(c.1.clone());
    }
    let c = std::sync::Arc::new(zstd::zstd_safe::CDict::create(&r.bytes, level));
    r.cdicts.push((level, c.clone()));
    Some(c)
}

thread_local! {
    static ZSTD_DECODER: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static ZSTD_ENCODER: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZSTD_DICT_DECODER: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
    static ZSTD_DICT_ENCODER: RefCell<Option<zstd::zstd_safe::CCtx<'static>>> = const { RefCell::new(None) };
}

/// A block's payload (section 2.1 of docs/format.md): the block without its trailing zeros.
pub fn trim_trailing_zeros(block: &[u8]) -> &[u8] {
    let end = block.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &block[..end]
}

/// Encode one data block (at most 4096 bytes; shorter only for a file's last block).
pub fn encode_block(block: &[u8], compression: Compression) -> EncodedBlock {
    let mut bytes = Vec::new();
    let codec = encode_block_into(block, compression, &mut bytes);
    EncodedBlock { codec, bytes }
}

/// [`encode_block`], appending the stored bytes to `out` (which may hold other blocks': one
/// allocation for many blocks rather than one per block); returns the codec.
pub fn encode_block_into(block: &[u8], compression: Compression, out: &mut Vec<u8>) -> Codec {
    assert!(block.len() <= BLOCK_SIZE);
    let payload = trim_trailing_zeros(block);
    if payload.is_empty() {
        return Codec::Zero;
    }
    let start = out.len();
    // Compressed output is kept only if strictly shorter than the payload.
    let limit = payload.len() - 1;
    let codec = match compression {
        Compression::None => None,
        Compression::Lz4 => {
            out.resize(start + lz4_flex::block::get_maximum_output_size(payload.len()), 0);
            match lz4_flex::block::compress_into(payload, &mut out[start..]) {
                Ok(n) if n <= limit => {
                    out.truncate(start + n);
                    Some(Codec::Lz4)
                }
                _ => None,
            }
        }
        Compression::Zstd { level } => ZSTD_ENCODER.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().is_none_or(|(l, _)| *l != level) {
                *cell = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
            }
            let (_, c) = cell.as_mut()?;
            // Room for the worst case: with less, zstd takes another path whose frames differ
            // (packs would no longer be byte-identical to earlier releases').
            out.resize(start + zstd::zstd_safe::compress_bound(payload.len()), 0);
            match c.compress_to_buffer(payload, &mut out[start..]) {
                Ok(n) if n <= limit => {
                    out.truncate(start + n);
                    Some(Codec::Zstd)
                }
                _ => None,
            }
        }),
        Compression::ZstdDict { level, dict } => {
            let cdict = cdict(dict, level).expect("a dictionary is registered before blocks are encoded with it");
            ZSTD_DICT_ENCODER.with(|cell| {
                let mut cell = cell.borrow_mut();
                let cctx = cell.get_or_insert_with(zstd::zstd_safe::CCtx::create);
                out.resize(start + zstd::zstd_safe::compress_bound(payload.len()), 0);
                match cctx.compress_using_cdict(&mut out[start..], payload, &cdict) {
                    Ok(n) if n <= limit => {
                        out.truncate(start + n);
                        Some(Codec::ZstdDict)
                    }
                    _ => None,
                }
            })
        }
    };
    codec.unwrap_or_else(|| {
        out.truncate(start);
        out.extend_from_slice(payload);
        Codec::Raw
    })
}

/// Decode stored bytes into `out`, a whole 4096-byte block (payload, then zeros).
///
/// The output can never exceed one block, whatever the input claims: both decompressors are
/// given a 4096-byte buffer and fail rather than grow it.
pub fn decode_block(codec: Codec, stored: &[u8], out: &mut [u8; BLOCK_SIZE]) -> Result<(), DecodeError> {
    if stored.len() > BLOCK_SIZE {
        return Err(DecodeError::TooLong(stored.len()));
    }
    let n = match codec {
        Codec::Zero => {
            if !stored.is_empty() {
                return Err(DecodeError::ZeroWithBytes(stored.len()));
            }
            0
        }
        Codec::Raw => {
            out[..stored.len()].copy_from_slice(stored);
            stored.len()
        }
        Codec::Lz4 => lz4_flex::block::decompress_into(stored, &mut out[..])
            .map_err(|e| DecodeError::Corrupt { codec: "lz4", reason: e.to_string() })?,
        Codec::Zstd => ZSTD_DECODER.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| DecodeError::Corrupt { codec: "zstd", reason: e.to_string() })?,
                );
            }
            cell.as_mut()
                .unwrap()
                .decompress_to_buffer(stored, &mut out[..])
                .map_err(|e| DecodeError::Corrupt { codec: "zstd", reason: e.to_string() })
        })?,
        Codec::ZstdDict => {
            let corrupt = |reason: String| DecodeError::Corrupt { codec: "zstd+dict", reason };
            let id = zstd::zstd_safe::get_dict_id_from_frame(stored)
                .ok_or_else(|| corrupt("the frame names no dictionary".into()))?
                .get();
            let all = DICTIONARIES.read();
            let dict = all.get(&id).ok_or(DecodeError::NoDictionary(id))?;
            ZSTD_DICT_DECODER.with(|cell| {
                let mut cell = cell.borrow_mut();
                let dctx = cell.get_or_insert_with(zstd::zstd_safe::DCtx::create);
                dctx.decompress_using_ddict(&mut out[..], stored, &dict.ddict)
                    .map_err(|code| corrupt(zstd::zstd_safe::get_error_name(code).to_string()))
            })?
        }
    };
    out[n..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(block: &[u8], c: Compression) -> EncodedBlock {
        let enc = encode_block(block, c);
        let mut out = [0xffu8; BLOCK_SIZE];
        decode_block(enc.codec, &enc.bytes, &mut out).unwrap();
        assert_eq!(&out[..block.len()], block);
        assert!(out[block.len()..].iter().all(|&b| b == 0));
        enc
    }

    #[test]
    fn zero_blocks_store_nothing() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd { level: 3 }] {
            let e = round_trip(&[0u8; BLOCK_SIZE], c);
            assert_eq!((e.codec, e.bytes.len()), (Codec::Zero, 0));
            assert_eq!(round_trip(&[], c).codec, Codec::Zero);
        }
    }

    #[test]
    fn compressible_blocks_shrink_and_random_ones_stay_raw() {
        let text: Vec<u8> = b"incfs ".iter().cycle().take(BLOCK_SIZE).copied().collect();
        assert_eq!(round_trip(&text, Compression::Lz4).codec, Codec::Lz4);
        assert_eq!(round_trip(&text, Compression::Zstd { level: 3 }).codec, Codec::Zstd);
        assert_eq!(round_trip(&text, Compression::None).codec, Codec::Raw);
        let mut x = 0x12345678u32;
        let mut random: Vec<u8> = (0..BLOCK_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 11) as u8
            })
            .collect();
        random[BLOCK_SIZE - 1] = 1;
        let e = round_trip(&random, Compression::Zstd { level: 3 });
        assert_eq!((e.codec, e.bytes.len()), (Codec::Raw, BLOCK_SIZE));
        assert_eq!(round_trip(b"short tail", Compression::Lz4).bytes, b"short tail");
    }

    #[test]
    fn hostile_input_is_rejected_not_grown() {
        let mut out = [0u8; BLOCK_SIZE];
        // An LZ4 block that expands to far more than 4096 bytes.
        let big = lz4_flex::block::compress(&vec![7u8; 1 << 20]);
        assert!(decode_block(Codec::Lz4, &big, &mut out).is_err());
        let big = zstd::bulk::compress(&vec![7u8; 1 << 20], 3).unwrap();
        assert!(decode_block(Codec::Zstd, &big, &mut out).is_err());
        assert!(decode_block(Codec::Zstd, b"not zstd", &mut out).is_err());
        assert!(decode_block(Codec::Lz4, &[0xff; 20], &mut out).is_err());
        assert_eq!(decode_block(Codec::Zero, b"x", &mut out), Err(DecodeError::ZeroWithBytes(1)));
        assert_eq!(decode_block(Codec::Raw, &[1; 4097], &mut out), Err(DecodeError::TooLong(4097)));
    }

    fn text_samples(seed: usize) -> Vec<Vec<u8>> {
        (0..300)
            .map(|i| {
                let line = format!("{seed} entry {i}: name=value-{} path=/usr/share/doc/{}\n", i * 7, i % 13);
                line.repeat(4096 / line.len()).into_bytes()
            })
            .collect()
    }

    #[test]
    fn a_dictionary_is_named_by_its_frames_and_checked_before_use() {
        let samples = text_samples(1);
        let refs: Vec<&[u8]> = samples.iter().map(|s| &s[..]).collect();
        let dict = train_dictionary(&refs, 8192).expect("enough samples to train on");
        let id = dictionary_id(&dict).unwrap();
        // Checked against the signed entry before it is registered.
        let entry = crate::manifest::ObjectRef { digest: [0; 32], size: dict.len() as u64 };
        assert_eq!(accept_dictionary(&entry, &dict), Err(DictionaryError::Mismatch));
        use sha2::Digest;
        let entry = crate::manifest::ObjectRef { digest: sha2::Sha256::digest(&dict).into(), size: dict.len() as u64 };
        assert_eq!(accept_dictionary(&entry, &dict), Ok(id));
        assert_eq!(register_dictionary(&dict), Ok(id), "again: a no-op");
        let mut other = dict.clone();
        *other.last_mut().unwrap() ^= 1;
        assert_eq!(register_dictionary(&other), Err(DictionaryError::IdClash(id)));
        assert_eq!(register_dictionary(b"not a dictionary"), Err(DictionaryError::NotADictionary));

        let e = round_trip(&samples[7], Compression::ZstdDict { level: 2, dict: id });
        assert_eq!(e.codec, Codec::ZstdDict);
        assert_eq!(zstd::zstd_safe::get_dict_id_from_frame(&e.bytes).map(|i| i.get()), Some(id));
        let plain = encode_block(&samples[7], Compression::Zstd { level: 2 });
        assert!(e.bytes.len() < plain.bytes.len(), "{} vs {}", e.bytes.len(), plain.bytes.len());

        // A frame naming a dictionary this process was not given.
        let unknown_samples = text_samples(2);
        let refs: Vec<&[u8]> = unknown_samples.iter().map(|s| &s[..]).collect();
        let unknown = train_dictionary(&refs, 8192).unwrap();
        let frame =
            zstd::bulk::Compressor::with_dictionary(2, &unknown).unwrap().compress(&unknown_samples[3]).unwrap();
        let mut out = [0u8; BLOCK_SIZE];
        let unknown_id = dictionary_id(&unknown).unwrap();
        assert_ne!(unknown_id, id);
        assert_eq!(decode_block(Codec::ZstdDict, &frame, &mut out), Err(DecodeError::NoDictionary(unknown_id)));
        // A plain frame is no dictionary frame.
        assert!(decode_block(Codec::ZstdDict, &plain.bytes, &mut out).is_err());
    }
}
