//! The manifest's bytes: a fixed header, the body, and a signature trailer.
//!
//! ```text
//! header   magic "INCFSMAN" | format u16 (1, 2 or 3) | reserved u16 = 0 | reserved u32 = 0 | body_len u64
//! body     body_len bytes (see `docs/format.md`)
//! trailer  algorithm u8 | key_id [32] | sig_len u16 | signature
//! ```
//!
//! All integers are little-endian. The signature covers the header and body (everything before
//! the trailer). Decoding never trusts a length or count before checking it against the bytes
//! that remain, so hostile input cannot make it allocate more than the input's own size.

use incfs_verity::{Hash, HASH_SIZE};

use crate::manifest::{
    Dirent, FileData, Inode, InodeKind, Manifest, ManifestError, MetaRef, Metadata, ObjectRef, Xattr,
};

pub const MAGIC: &[u8; 8] = b"INCFSMAN";
/// The newest manifest format this build reads and writes. A writer uses the oldest format
/// that can express a manifest (format 1 unless it has an expiry), so that older readers keep
/// reading images that use nothing new; a reader refuses a newer format, asking for an upgrade.
pub const FORMAT_VERSION: u16 = 4;
/// Body flag (format 2): an `i64` expiry time follows the flags.
const FLAG_EXPIRES: u16 = 1;
pub const HEADER_LEN: usize = 24;
/// Object index meaning "no metadata region" (empty files).
const NO_OBJECT: u32 = u32::MAX;

/// Signature algorithms. The numeric values are part of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SignatureAlgorithm {
    /// Ed25519 (RFC 8032), 64-byte signature over the message itself.
    Ed25519 = 1,
    /// ECDSA over P-256 with SHA-256, DER-encoded signature.
    EcdsaP256Sha256 = 2,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RsaPkcs1Sha256 = 3,
}

impl SignatureAlgorithm {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Ed25519,
            2 => Self::EcdsaP256Sha256,
            3 => Self::RsaPkcs1Sha256,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::EcdsaP256Sha256 => "ecdsa-p256",
            Self::RsaPkcs1Sha256 => "rsa",
        }
    }
}

/// Why manifest bytes were rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not an incfs manifest (bad magic)")]
    Magic,
    #[error("manifest format {0} is newer than this incfs reads (formats 1 to {FORMAT_VERSION}); upgrade incfs")]
    FormatVersion(u16),
    #[error("manifest is truncated: {0}")]
    Truncated(&'static str),
    #[error("manifest has {0} unexpected bytes after its end")]
    TrailingBytes(usize),
    #[error("manifest field {field} has invalid value {value}")]
    Field { field: &'static str, value: u64 },
    #[error("manifest image name is not UTF-8")]
    NameEncoding,
    #[error("unknown signature algorithm {0}")]
    Algorithm(u8),
    #[error("invalid manifest: {0}")]
    Invalid(#[from] ManifestError),
}

/// A manifest file split into its parts, before any cryptography.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Format version from the header (1 or 2).
    pub format: u16,
    /// Header and body: the bytes the signature covers.
    pub signed: &'a [u8],
    pub body: &'a [u8],
    pub algorithm: SignatureAlgorithm,
    /// SHA-256 of the signer's SubjectPublicKeyInfo (DER).
    pub key_id: Hash,
    pub signature: &'a [u8],
}

/// The oldest format that can express `manifest`: 4 if it has compression dictionaries, 3 if a
/// file's metadata is a compact map, else 2 if it expires, else 1.
pub fn format_for(manifest: &Manifest) -> u16 {
    if !manifest.dictionaries.is_empty() {
        return 4;
    }
    let compact = manifest.inodes.iter().any(|i| match &i.kind {
        InodeKind::File(f) => f.has_compact_map(),
        _ => false,
    });
    match (compact, manifest.expires.is_some()) {
        (true, _) => 3,
        (false, true) => 2,
        (false, false) => 1,
    }
}

/// The header and body of `manifest`: the bytes to sign.
pub fn encode_signed_part(manifest: &Manifest) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(4096));
    w.bytes(MAGIC);
    let format = format_for(manifest);
    w.u16(format);
    w.u16(0);
    w.u32(0);
    w.u64(0); // body length, patched below
    encode_body(manifest, format, &mut w);
    let body_len = (w.0.len() - HEADER_LEN) as u64;
    w.0[16..24].copy_from_slice(&body_len.to_le_bytes());
    w.0
}

/// Append the signature trailer to the signed part, giving the manifest file.
pub fn seal(mut signed: Vec<u8>, algorithm: SignatureAlgorithm, key_id: &Hash, signature: &[u8]) -> Vec<u8> {
    assert!(signature.len() <= u16::MAX as usize);
    signed.push(algorithm as u8);
    signed.extend_from_slice(key_id);
    signed.extend_from_slice(&(signature.len() as u16).to_le_bytes());
    signed.extend_from_slice(signature);
    signed
}

/// Split a manifest file into its signed part and signature, checking only the framing.
pub fn open_envelope(bytes: &[u8]) -> Result<Envelope<'_>, WireError> {
    let mut r = Reader(bytes);
    if r.take(8, "header")? != MAGIC {
        return Err(WireError::Magic);
    }
    let format = r.u16("header")?;
    if !(1..=FORMAT_VERSION).contains(&format) {
        return Err(WireError::FormatVersion(format));
    }
    r.u16("header")?;
    r.u32("header")?;
    let body_len = r.u64("header")?;
    if body_len > r.0.len() as u64 {
        return Err(WireError::Truncated("body"));
    }
    let body = r.take(body_len as usize, "body")?;
    let signed = &bytes[..HEADER_LEN + body.len()];
    let alg = r.u8("signature")?;
    let algorithm = SignatureAlgorithm::from_u8(alg).ok_or(WireError::Algorithm(alg))?;
    let key_id: Hash = r.take(HASH_SIZE, "signature")?.try_into().unwrap();
    let sig_len = r.u16("signature")? as usize;
    let signature = r.take(sig_len, "signature")?;
    r.finish()?;
    Ok(Envelope { format, signed, body, algorithm, key_id, signature })
}

/// Decode and validate the manifest an envelope holds.
pub fn decode(env: &Envelope<'_>) -> Result<Manifest, WireError> {
    decode_body(env.body, env.format)
}

/// Decode and validate a manifest body of format `format`.
pub fn decode_body(body: &[u8], format: u16) -> Result<Manifest, WireError> {
    let mut r = Reader(body);
    let name_len = r.u16("image name")? as usize;
    let name = String::from_utf8(r.take(name_len, "image name")?.to_vec()).map_err(|_| WireError::NameEncoding)?;
    let version = r.u64("version")?;
    let log_block_size = r.u8("block size")?;
    if log_block_size != incfs_verity::LOG_BLOCK_SIZE {
        return Err(WireError::Field { field: "log_block_size", value: log_block_size.into() });
    }
    let hash_alg = r.u8("hash algorithm")?;
    if hash_alg != 1 {
        return Err(WireError::Field { field: "hash_algorithm", value: hash_alg.into() });
    }
    let flags = r.u16("flags")?;
    let known = if format >= 2 { FLAG_EXPIRES } else { 0 };
    if flags & !known != 0 {
        return Err(WireError::Field { field: "flags", value: flags.into() });
    }
    let expires = if flags & FLAG_EXPIRES != 0 { Some(r.u64("expiry")? as i64) } else { None };

    let n = r.count(40, "objects")?;
    let mut objects = Vec::with_capacity(n);
    for _ in 0..n {
        let digest = r.take(HASH_SIZE, "objects")?.try_into().unwrap();
        objects.push(ObjectRef { digest, size: r.u64("objects")? });
    }
    let mut dictionaries = Vec::new();
    if format >= 4 {
        let n = r.u8("dictionaries")?;
        for _ in 0..n {
            dictionaries.push(r.u32("dictionaries")?);
        }
    }

    let n = r.count(INODE_MIN_LEN, "inodes")?;
    let mut inodes = Vec::with_capacity(n);
    for _ in 0..n {
        inodes.push(decode_inode(&mut r, format)?);
    }

    let n = r.count(DIRENT_MIN_LEN, "directory entries")?;
    let mut dirents = Vec::with_capacity(n);
    for _ in 0..n {
        let parent = r.u32("directory entries")?;
        let inode = r.u32("directory entries")?;
        let len = r.u16("directory entries")? as usize;
        dirents.push(Dirent { parent, inode, name: r.take(len, "directory entries")?.to_vec() });
    }
    r.finish()?;

    let m = Manifest { name, version, expires, objects, dictionaries, inodes, dirents };
    m.validate()?;
    Ok(m)
}

/// Smallest encoding of an inode: kind, mode, uid, gid, mtime, xattr count.
const INODE_MIN_LEN: usize = 1 + 2 + 4 + 4 + 8 + 4 + 2;
const DIRENT_MIN_LEN: usize = 4 + 4 + 2;

fn decode_inode(r: &mut Reader<'_>, format: u16) -> Result<Inode, WireError> {
    let kind = r.u8("inode")?;
    let meta = Metadata {
        mode: r.u16("inode")?,
        uid: r.u32("inode")?,
        gid: r.u32("inode")?,
        mtime_sec: r.u64("inode")? as i64,
        mtime_nsec: r.u32("inode")?,
    };
    let n = r.u16("xattrs")? as usize;
    let mut xattrs = Vec::with_capacity(n.min(r.0.len() / 5));
    for _ in 0..n {
        let nl = r.u8("xattrs")? as usize;
        let name = r.take(nl, "xattrs")?.to_vec();
        let vl = r.u32("xattrs")? as usize;
        let value = r.take(vl, "xattrs")?.to_vec();
        xattrs.push(Xattr { name, value });
    }
    let kind = match kind {
        1 => {
            let size = r.u64("file")?;
            let root_hash = r.take(HASH_SIZE, "file")?.try_into().unwrap();
            let object = r.u32("file")?;
            let offset = r.u64("file")?;
            let compact = if format >= 3 { r.u32("file")? } else { 0 };
            let meta = (object != NO_OBJECT).then_some(MetaRef { object, offset, compact });
            if meta.is_none() && offset != 0 {
                return Err(WireError::Field { field: "meta_offset", value: offset });
            }
            if meta.is_none() && compact != 0 {
                return Err(WireError::Field { field: "compact", value: compact.into() });
            }
            InodeKind::File(FileData { size, root_hash, meta })
        }
        2 => InodeKind::Dir,
        3 => {
            let len = r.u16("symlink")? as usize;
            InodeKind::Symlink(r.take(len, "symlink")?.to_vec())
        }
        4 => InodeKind::Fifo,
        5 => InodeKind::CharDev { major: r.u32("device")?, minor: r.u32("device")? },
        6 => InodeKind::BlockDev { major: r.u32("device")?, minor: r.u32("device")? },
        k => return Err(WireError::Field { field: "inode kind", value: k.into() }),
    };
    Ok(Inode { meta, xattrs, kind })
}

fn encode_body(m: &Manifest, format: u16, w: &mut Writer) {
    w.u16(m.name.len() as u16);
    w.bytes(m.name.as_bytes());
    w.u64(m.version);
    w.u8(incfs_verity::LOG_BLOCK_SIZE);
    w.u8(1); // SHA-256
    match m.expires {
        Some(at) => {
            w.u16(FLAG_EXPIRES);
            w.u64(at as u64);
        }
        None => w.u16(0),
    }
    w.u32(m.objects.len() as u32);
    for o in &m.objects {
        w.bytes(&o.digest);
        w.u64(o.size);
    }
    if format >= 4 {
        w.u8(m.dictionaries.len() as u8);
        for &d in &m.dictionaries {
            w.u32(d);
        }
    }
    w.u32(m.inodes.len() as u32);
    for i in &m.inodes {
        w.u8(i.kind.code());
        w.u16(i.meta.mode);
        w.u32(i.meta.uid);
        w.u32(i.meta.gid);
        w.u64(i.meta.mtime_sec as u64);
        w.u32(i.meta.mtime_nsec);
        w.u16(i.xattrs.len() as u16);
        for x in &i.xattrs {
            w.u8(x.name.len() as u8);
            w.bytes(&x.name);
            w.u32(x.value.len() as u32);
            w.bytes(&x.value);
        }
        match &i.kind {
            InodeKind::File(f) => {
                w.u64(f.size);
                w.bytes(&f.root_hash);
                let m = f.meta.unwrap_or(MetaRef { object: NO_OBJECT, offset: 0, compact: 0 });
                w.u32(m.object);
                w.u64(m.offset);
                if format >= 3 {
                    w.u32(m.compact);
                }
            }
            InodeKind::Symlink(t) => {
                w.u16(t.len() as u16);
                w.bytes(t);
            }
            InodeKind::CharDev { major, minor } | InodeKind::BlockDev { major, minor } => {
                w.u32(*major);
                w.u32(*minor);
            }
            InodeKind::Dir | InodeKind::Fifo => {}
        }
    }
    w.u32(m.dirents.len() as u32);
    for d in &m.dirents {
        w.u32(d.parent);
        w.u32(d.inode);
        w.u16(d.name.len() as u16);
        w.bytes(&d.name);
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if n > self.0.len() {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A u32 count of records of at least `min_len` bytes each, checked against what remains.
    fn count(&mut self, min_len: usize, what: &'static str) -> Result<usize, WireError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_len) > self.0.len() {
            return Err(WireError::Truncated(what));
        }
        Ok(n)
    }
    fn finish(&self) -> Result<(), WireError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    #[test]
    fn manifest_round_trips_through_envelope() {
        let m = sample();
        let signed = encode_signed_part(&m);
        let file = seal(signed.clone(), SignatureAlgorithm::Ed25519, &[7; 32], &[1; 64]);
        let env = open_envelope(&file).unwrap();
        assert_eq!(env.signed, &signed[..]);
        assert_eq!(env.algorithm, SignatureAlgorithm::Ed25519);
        assert_eq!(env.key_id, [7; 32]);
        assert_eq!(env.signature, &[1; 64]);
        assert_eq!(decode(&env).unwrap(), m);
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let m = sample();
        let file = seal(encode_signed_part(&m), SignatureAlgorithm::Ed25519, &[7; 32], &[1; 64]);
        for len in 0..file.len() {
            assert!(open_envelope(&file[..len]).is_err(), "prefix of {len} bytes accepted");
        }
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(open_envelope(&longer), Err(WireError::TrailingBytes(1)));
        let env = open_envelope(&file).unwrap();
        for len in 0..env.body.len() {
            assert!(decode_body(&env.body[..len], env.format).is_err());
        }
    }

    #[test]
    fn every_single_byte_flip_is_rejected_or_changes_the_manifest() {
        let m = sample();
        let signed = encode_signed_part(&m);
        let body = &signed[HEADER_LEN..];
        for i in 0..body.len() {
            let mut b = body.to_vec();
            b[i] ^= 0x41;
            if let Ok(decoded) = decode_body(&b, 1) {
                assert_ne!(decoded, m, "flip at {i} went unnoticed");
            }
        }
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut body = Vec::new();
        body.extend_from_slice(&1u16.to_le_bytes());
        body.push(b'x');
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&[12, 1, 0, 0]);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_body(&body, 1), Err(WireError::Truncated("objects")));
    }

    #[test]
    fn wrong_magic_and_format() {
        let file = seal(encode_signed_part(&sample()), SignatureAlgorithm::Ed25519, &[7; 32], &[1; 64]);
        let mut bad = file.clone();
        bad[0] = b'X';
        assert_eq!(open_envelope(&bad), Err(WireError::Magic));
        let mut bad = file.clone();
        bad[8] = FORMAT_VERSION as u8 + 1;
        assert_eq!(open_envelope(&bad), Err(WireError::FormatVersion(FORMAT_VERSION + 1)));
        let mut bad = file.clone();
        bad[8] = 0;
        assert_eq!(open_envelope(&bad), Err(WireError::FormatVersion(0)));
        let mut bad = file;
        bad[HEADER_LEN - 8] ^= 0x80;
        assert!(open_envelope(&bad).is_err());
    }

    #[test]
    fn compact_maps_need_format_3_and_are_checked() {
        let mut m = sample();
        let InodeKind::File(f) = &mut m.inodes[1].kind else { panic!("inode 1 is a file") };
        f.meta.as_mut().unwrap().compact = 8 + 64;
        let signed = encode_signed_part(&m);
        assert_eq!(signed[8], 3);
        let file = seal(signed, SignatureAlgorithm::Ed25519, &[7; 32], &[1; 64]);
        let env = open_envelope(&file).unwrap();
        assert_eq!(decode(&env).unwrap(), m);
        // Read as format 2, the body has four bytes per file too many.
        assert!(decode_body(env.body, 2).is_err());
        // A length that is not 8 + 64 per run, or over 1 MiB, is refused; so is a compact map
        // where there is no region.
        for bad in [9, 8 + 64 + 1, (1 << 20) + 8] {
            let mut b = m.clone();
            let InodeKind::File(f) = &mut b.inodes[1].kind else { unreachable!() };
            f.meta.as_mut().unwrap().compact = bad;
            assert!(matches!(b.validate(), Err(ManifestError::Inode { inode: 1, .. })), "compact {bad}");
        }
        let mut body = encode_signed_part(&m)[HEADER_LEN..].to_vec();
        let empty = body.windows(12).rposition(|w| w == [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        body[empty + 12] = 1; // the empty file's compact field
        assert_eq!(decode_body(&body, 3), Err(WireError::Field { field: "compact", value: 1 }));
    }

    #[test]
    fn dictionaries_need_format_4_and_are_checked() {
        let mut m = sample();
        m.objects.push(ObjectRef { digest: [3; 32], size: 64 << 10 });
        m.dictionaries = vec![1];
        let signed = encode_signed_part(&m);
        assert_eq!(signed[8], 4);
        let file = seal(signed, SignatureAlgorithm::Ed25519, &[7; 32], &[1; 64]);
        let env = open_envelope(&file).unwrap();
        assert_eq!(decode(&env).unwrap(), m);
        // Read as format 3, the body has the list's five bytes too many.
        assert!(decode_body(env.body, 3).is_err());
        // An index past the table, an object over 1 MiB, or one listed twice is refused.
        for (list, size) in [(vec![2], 1 << 16), (vec![1], (1 << 20) + 1), (vec![1, 1], 1 << 16)] {
            let mut b = m.clone();
            b.objects[1].size = size;
            b.dictionaries = list.clone();
            assert!(matches!(b.validate(), Err(ManifestError::Dictionary { .. })), "{list:?} of {size}");
        }
    }

    #[test]
    fn expiry_needs_format_2_and_older_manifests_stay_format_1() {
        let m = sample();
        assert_eq!(encode_signed_part(&m)[8], 1, "no new field: the format older readers read");
        let mut e = sample();
        e.expires = Some(1_900_000_000);
        let signed = encode_signed_part(&e);
        assert_eq!(signed[8], 2);
        let file = seal(signed, SignatureAlgorithm::Ed25519, &[7; 32], &[1; 64]);
        let env = open_envelope(&file).unwrap();
        assert_eq!(decode(&env).unwrap(), e);
        assert!(e.expired_at(1_900_000_000) && !e.expired_at(1_899_999_999) && !m.expired_at(i64::MAX));
        // The same body read as format 1 (a header rewritten to 1 breaks the signature anyway):
        // flags must be 0 there.
        assert_eq!(decode_body(env.body, 1), Err(WireError::Field { field: "flags", value: 1 }));
        // Unknown flags are refused in format 2 too.
        let mut body = env.body.to_vec();
        let at = 2 + e.name.len() + 8 + 2;
        body[at] = 3;
        assert_eq!(decode_body(&body, 2), Err(WireError::Field { field: "flags", value: 3 }));
    }
}
