//! The incfs repository format, as data structures and byte encodings.
//!
//! A repository is a directory of immutable, content-named *objects* plus one signed *manifest*
//! per published version (see `docs/format.md` for the byte-level specification). This crate
//! turns those bytes into checked Rust values and back; it performs no I/O and checks no
//! signatures (it hashes only to rebuild trees from compact maps), so every parser of untrusted
//! input lives here and can be fuzzed on its own.
//!
//! - [`manifest`]: the image model (inodes, directory entries, objects) and its validation.
//! - [`wire`]: the manifest's byte encoding and the signature envelope around it.
//! - [`block_map`]: per-file metadata stored in objects (compact Merkle tree + block records).
//! - [`compact_map`]: the metadata of sparse and repetitive files as runs (format 3).
//! - [`codec`]: per-block compression (zero, raw, LZ4, zstd).
//! - [`layout`]: where things live inside a repository.
//! - [`profile`]: access profiles (which blocks a program reads first, in order).
//! - [`push`]: the message a publisher signs to push one file into live mounts.

pub mod block_map;
pub mod codec;
pub mod compact_map;
pub mod layout;
pub mod manifest;
pub mod profile;
pub mod push;
pub mod wire;

pub use block_map::{BlockRecord, FileMetaLayout, BLOCK_RECORD_SIZE};
pub use codec::{Codec, Compression};
pub use manifest::{Dirent, FileData, Inode, InodeKind, Manifest, ManifestError, MetaRef, Metadata, ObjectRef, Xattr};
pub use wire::{Envelope, SignatureAlgorithm, WireError};

pub use incfs_verity::{Hash, BLOCK_SIZE};
