//! Reading incfs repositories: sources, verified image reads, whole-image checks and extraction.
//!
//! - [`source`]: HTTP(S), S3-compatible and local repositories behind one ranged-GET interface.
//! - [`body`]: response bodies in page-aligned, reused buffers (written to the store as they are).
//! - [`image`]: a manifest accepted only with a trusted signature, and block reads that are
//!   verified against each file's Merkle tree before they are returned.
//! - [`verify`]: `incfs verify`, every object, tree and block, with a report of all problems.
//! - [`extract`]: `incfs extract`, the whole image written to a local directory.
//! - [`window`]: many files read with one request (their spans in an object, back to back).

pub mod body;
pub mod extract;
pub mod image;
pub mod source;
pub mod verify;
pub mod window;

pub use image::{BlockFault, FileMeta, Image, ImageError, MetaError};

/// Receives progress of work measured in bytes of file content (verify, extract).
pub trait ByteProgress: Sync {
    fn start(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

impl ByteProgress for () {}
pub use source::{Source, SourceError, SourceOptions};
