//! What a publisher signs to push one file into live mounts (`incfs add`).
//!
//! The message binds the file's content (its fs-verity digest) to the image, the path and the
//! mode it may appear with, so a signature made for one push cannot be replayed at another path,
//! with other permissions, or into another image trusting the same key. It starts with a
//! domain tag no manifest (`INCFSMAN`) and no fs-verity signed digest (`FSVerity`) starts with,
//! so no other signature by the same key can be mistaken for it, nor it for them.
//!
//! ```text
//! "incfs-push-v1\n"          14 bytes
//! str16 image name           as in the manifest
//! str16 path                 components joined by '/', no leading, trailing or repeated '/'
//! u16   mode                 permission bits (mode & 0o7777)
//! [32]  fs-verity digest     of the file (binds its size and Merkle root)
//! ```
//! Integers little-endian; `str16` is a u16 length and the bytes.

use incfs_verity::Hash;

/// The message's first bytes.
pub const PUSH_TAG: &[u8; 14] = b"incfs-push-v1\n";

/// `path` in the form the message uses: its non-empty components joined by `/`.
pub fn canonical_path(path: &[u8]) -> Vec<u8> {
    path.split(|&b| b == b'/').filter(|p| !p.is_empty()).collect::<Vec<_>>().join(&b'/')
}

/// The bytes a publisher signs to push a file with fs-verity digest `digest` to `path` (any
/// form; made canonical) with `mode` into image `image`. Names longer than 65535 bytes are not
/// valid anyway; they are cut, which only makes the signature fail to verify.
pub fn push_message(image: &str, path: &[u8], mode: u16, digest: &Hash) -> Vec<u8> {
    let path = canonical_path(path);
    let mut m = Vec::with_capacity(PUSH_TAG.len() + 4 + image.len() + path.len() + 2 + 32);
    m.extend_from_slice(PUSH_TAG);
    for s in [image.as_bytes(), &path[..]] {
        let s = &s[..s.len().min(u16::MAX as usize)];
        m.extend_from_slice(&(s.len() as u16).to_le_bytes());
        m.extend_from_slice(s);
    }
    m.extend_from_slice(&(mode & 0o7777).to_le_bytes());
    m.extend_from_slice(digest);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_field_changes_the_message() {
        let base = push_message("img", b"a/b", 0o644, &[1; 32]);
        assert!(base.starts_with(PUSH_TAG));
        assert_eq!(base, push_message("img", b"/a//b/", 0o644, &[1; 32]), "path forms are one path");
        for other in [
            push_message("img2", b"a/b", 0o644, &[1; 32]),
            push_message("img", b"a/c", 0o644, &[1; 32]),
            push_message("img", b"a/b", 0o4755, &[1; 32]),
            push_message("img", b"a/b", 0o644, &[2; 32]),
            // Length prefixes: moving a byte from the name to the path is another message.
            push_message("im", b"ga/b", 0o644, &[1; 32]),
        ] {
            assert_ne!(base, other);
        }
        assert!(!base.starts_with(b"INCFSMAN") && !base.starts_with(b"FSVerity"));
    }
}
