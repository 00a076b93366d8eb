//! Response bodies in page-aligned buffers, reused.
//!
//! The block store writes a run fetched for background work with `O_DIRECT` as it was received
//! (runs a reader waits on go through the page cache: `incfs_store::Via`): with the body's first
//! byte on a page boundary it is written where it lies (only a partial last page is copied),
//! where a body anywhere in memory was copied whole into an aligned buffer first.
//! Buffers of run size are kept for reuse (a few): glibc maps every allocation of that size
//! afresh, and the page faults of a fresh 2 MiB buffer per request cost ~4% of the daemon's CPU
//! on a cold read, the copy another 2%.

use bytes::Bytes;
use parking_lot::Mutex;

/// Alignment of a body's first byte.
pub const PAGE: usize = 4096;
/// Bodies up to this long get a buffer of the pool (a run of blocks is at most 2 MiB).
pub const POOLED_MAX: usize = 2 << 20;
/// Shorter bodies are not worth an aligned buffer (the store writes them through the page
/// cache anyway).
pub const ALIGNED_MIN: usize = 64 << 10;
/// Free buffers kept, at most (8 MiB).
const POOL_KEEP: usize = 4;
/// Length of a pooled buffer: room for [`POOLED_MAX`] bytes from wherever its first page
/// boundary lies.
const POOLED_LEN: usize = POOLED_MAX + PAGE;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn pool() -> parking_lot::MutexGuard<'static, Vec<Vec<u8>>> {
    POOL.lock()
}

/// A body being received: bytes appended at a page-aligned start.
pub struct BodyBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl BodyBuf {
    /// A buffer for a body of at most `room` bytes.
    pub fn with_room(room: usize) -> BodyBuf {
        let buf = match room <= POOLED_MAX {
            true => pool().pop().unwrap_or_else(|| vec![0; POOLED_LEN]),
            false => vec![0; room + PAGE],
        };
        let start = buf.as_ptr().align_offset(PAGE);
        BodyBuf { buf, start, len: 0 }
    }

    /// Append `data`; false (and nothing appended) if it does not fit (a buffer has room for at
    /// least what was asked for).
    pub fn extend(&mut self, data: &[u8]) -> bool {
        let at = self.start + self.len;
        match self.buf.get_mut(at..at + data.len()) {
            Some(dst) => {
                dst.copy_from_slice(data);
                self.len += data.len();
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body as [`Bytes`]; the buffer goes back to the pool when the last view of it drops.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for BodyBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl Drop for BodyBuf {
    fn drop(&mut self) {
        if self.buf.len() == POOLED_LEN {
            let mut pool = pool();
            if pool.len() < POOL_KEEP {
                pool.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_start_on_a_page_and_hold_what_was_appended() {
        for room in [ALIGNED_MIN, POOLED_MAX, POOLED_MAX + 1, 3 * POOLED_MAX] {
            let mut b = BodyBuf::with_room(room);
            let data: Vec<u8> = (0..room).map(|i| (i % 251) as u8).collect();
            let (first, rest) = data.split_at(room / 3);
            assert!(b.extend(first) && b.extend(rest));
            assert!(!b.extend(&vec![0; POOLED_LEN + room]), "far past its room");
            let bytes = b.freeze();
            assert_eq!(bytes.as_ptr() as usize % PAGE, 0);
            assert_eq!(&bytes[..], &data[..]);
        }
    }

    #[test]
    fn a_pooled_buffer_is_reused_once_every_view_is_gone() {
        let mut b = BodyBuf::with_room(POOLED_MAX);
        assert!(b.extend(&[7; 100]));
        let bytes = b.freeze();
        let view = bytes.slice(10..20);
        let at = bytes.as_ptr();
        drop(bytes);
        assert_eq!(&view[..], &[7; 10]);
        drop(view);
        // Another test may take it first: look for it among a few.
        let again: Vec<BodyBuf> = (0..POOL_KEEP + 1).map(|_| BodyBuf::with_room(POOLED_MAX)).collect();
        assert!(again.iter().any(|b| b.buf[b.start..].as_ptr() == at));
    }
}
