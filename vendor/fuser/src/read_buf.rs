use std::mem::align_of;

use crate::ll::fuse_abi as abi;
use crate::session::MAX_WRITE_SIZE;

/// Size of the buffer for reading a request from the kernel at first (incfs patch): the kernel
/// refuses a read smaller than the connection's `max_write` plus headers (EINVAL), so a
/// filesystem that negotiates a `max_write` of at most [`SMALL_MAX_WRITE`] (incfs: read-only, no
/// writes ever come) needs no more. Upstream allocated `MAX_WRITE_SIZE` (16 MiB) per session
/// thread, part of which ended up resident.
const SMALL_BUFFER_SIZE: usize = SMALL_MAX_WRITE + 4096;
/// Largest `max_write` a buffer of [`SMALL_BUFFER_SIZE`] serves: 1 MiB, because the INIT reply
/// derives `max_pages`, the size of read requests too, from the larger of `max_write` and
/// `max_readahead` (and the kernel offers 128 KiB of readahead): 64 KiB made reads 128 KiB.
pub const SMALL_MAX_WRITE: usize = 1024 * 1024;
/// Size of the buffer once the kernel refused the small one: a connection initialized with a
/// larger `max_write` (by an earlier daemon, when a session takes a live connection over).
const BUFFER_SIZE: usize = MAX_WRITE_SIZE + 4096;

/// A buffer that provides an aligned sub-slice for FUSE operations.
///
/// This struct wraps a `Vec<u8>` and provides access to an aligned portion
/// of the buffer, ensuring proper alignment for `fuse_in_header`.
#[derive(Debug)]
pub(crate) struct FuseReadBuf {
    buffer: Vec<u8>,
}

impl FuseReadBuf {
    /// Creates a new `FuseReadBuf` of the small size (see [`FuseReadBuf::grow`]).
    ///
    /// The actual buffer may be slightly larger to accommodate alignment requirements.
    pub(crate) fn new() -> Self {
        Self {
            buffer: vec![0; SMALL_BUFFER_SIZE],
        }
    }

    /// Grow to the full size, once; `false` if it already was (the refusal was not about size).
    pub(crate) fn grow(&mut self) -> bool {
        if self.buffer.len() >= BUFFER_SIZE {
            return false;
        }
        self.buffer = vec![0; BUFFER_SIZE];
        true
    }

    /// Returns a mutable reference to the aligned portion of the buffer.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        let alignment = align_of::<abi::fuse_in_header>();
        let off = alignment - (self.buffer.as_ptr() as usize) % alignment;
        if off == alignment {
            &mut self.buffer
        } else {
            &mut self.buffer[off..]
        }
    }
}
