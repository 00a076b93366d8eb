//! Where things live inside a repository, relative to its root (a directory, URL or bucket
//! prefix). Every path uses `/` and only ASCII, so the same names work on any server.

use incfs_verity::Hash;

/// The newest version's signed manifest. Replaced atomically when a version is published.
pub const LATEST_MANIFEST: &str = "manifest";

/// The access profile published with the newest version (optional; see [`crate::profile`]).
pub const PROFILE: &str = "profile";

/// Largest manifest a client accepts (`manifest` and `versions/<N>.manifest`): about a million
/// files' entries. A server that declares or sends more is refused before its bytes are held, so
/// a hostile one cannot make a client allocate what it announces.
pub const MAX_MANIFEST_BYTES: u64 = 128 << 20;

/// Directory holding every published version's manifest.
pub const VERSIONS_DIR: &str = "versions";

/// Directory holding the content-named objects.
pub const OBJECTS_DIR: &str = "objects";

/// Path of version `version`'s manifest.
pub fn version_manifest(version: u64) -> String {
    format!("{VERSIONS_DIR}/{version}.manifest")
}

/// Path of the object whose SHA-256 is `digest`.
pub fn object(digest: &Hash) -> String {
    format!("{OBJECTS_DIR}/{}", hex::encode(digest))
}

/// Parse a version manifest's file name (`"<decimal>.manifest"`) back into its version.
pub fn parse_version_manifest_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".manifest")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(version_manifest(12), "versions/12.manifest");
        assert_eq!(parse_version_manifest_name("12.manifest"), Some(12));
        assert_eq!(parse_version_manifest_name("012.manifest"), None);
        assert_eq!(parse_version_manifest_name(".manifest"), None);
        assert_eq!(parse_version_manifest_name("1x.manifest"), None);
        assert_eq!(object(&[0xab; 32]).len(), "objects/".len() + 64);
    }
}
