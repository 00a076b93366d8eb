//! Writing content-named objects.
//!
//! Blocks and file metadata are appended to the current object until it passes the target size;
//! then it is flushed, fsynced and renamed to `objects/<sha256 of its bytes>`. Objects are
//! written with `O_DIRECT` in aligned 1 MiB pieces where the filesystem takes it: a buffered
//! write costs a page-cache copy of every byte, and the fsync then waited for writeback at disk
//! speed (ext4 here: 2.3 GB/s direct, 0.4 GB/s buffered with fsync), holding up the thread that
//! stores blocks. The manifest's
//! object table is append-only across versions of a repository: a new version's table starts
//! with the previous version's table, so block records and metadata regions written for one
//! version stay valid, unchanged, in every later one.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use incfs_format::manifest::ObjectRef;
use incfs_format::{layout, Hash};
use sha2::{Digest, Sha256};

use crate::PackError;

struct OpenObject {
    index: u32,
    tmp: PathBuf,
    file: DirectFile,
    hasher: Sha256,
    len: u64,
}

/// Offset, length and memory alignment of direct writes (covers 512- and 4096-byte devices).
const ALIGN: usize = 4096;
/// Bytes gathered before a write.
const PIECE: usize = 1 << 20;

/// A file written from its start in pieces of [`PIECE`] bytes, with `O_DIRECT` while the
/// filesystem takes it (buffered from the first refusal on).
struct DirectFile {
    file: File,
    direct: bool,
    /// [`PIECE`] + [`ALIGN`] bytes: the piece is the aligned part, from `at`.
    buf: Vec<u8>,
    at: usize,
    /// Bytes gathered in the piece.
    filled: usize,
    /// Bytes written before the piece.
    written: u64,
}

impl DirectFile {
    fn create(path: &Path) -> std::io::Result<DirectFile> {
        let direct = File::options().write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            // Not taken by this filesystem: a plain file.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (File::create(path)?, false),
            Err(e) => return Err(e),
        };
        let buf = vec![0u8; PIECE + ALIGN];
        let at = buf.as_ptr().align_offset(ALIGN);
        Ok(DirectFile { file, direct, buf, at, filled: 0, written: 0 })
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(PIECE - self.filled);
            self.buf[self.at + self.filled..self.at + self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == PIECE {
                self.flush_piece()?;
            }
        }
        Ok(())
    }

    /// Write the piece (zero-padded to [`ALIGN`]; the padding is cut off by [`Self::finish`]).
    fn flush_piece(&mut self) -> std::io::Result<()> {
        let padded = self.filled.next_multiple_of(ALIGN);
        let piece = &mut self.buf[self.at..self.at + padded];
        piece[self.filled..].fill(0);
        match self.file.write_all_at(piece, self.written) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // Refused after all (this device's alignment rules): buffered from now on.
                self.direct = false;
                clear_direct(&self.file)?;
                self.file.write_all_at(piece, self.written)?;
            }
            r => r?,
        }
        self.written += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Write what is gathered, cut the padding off and make the bytes durable.
    fn finish(mut self) -> std::io::Result<()> {
        if self.filled > 0 {
            self.flush_piece()?;
        }
        self.file.set_len(self.written)?;
        self.file.sync_all()
    }
}

fn clear_direct(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL/F_SETFL on a descriptor this File owns; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) struct ObjectWriter {
    repo: PathBuf,
    /// The object table: the previous version's objects, then the ones written now.
    pub table: Vec<ObjectRef>,
    current: Option<OpenObject>,
    target_size: u64,
    pub bytes_written: u64,
    pub objects_written: u64,
}

/// Prefix of objects being written; anything with it is left over from an interrupted pack.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

impl ObjectWriter {
    pub fn new(repo: &Path, base_table: Vec<ObjectRef>, target_size: u64) -> Self {
        ObjectWriter {
            repo: repo.to_path_buf(),
            table: base_table,
            current: None,
            target_size,
            bytes_written: 0,
            objects_written: 0,
        }
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> PackError {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    }

    /// Append `bytes` contiguously to an object; returns (object index, offset). Starts a new
    /// object first if the current one has reached the target size.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(u32, u64), PackError> {
        if self.current.as_ref().is_some_and(|o| o.len >= self.target_size) {
            self.finish_current()?;
        }
        if self.current.is_none() {
            let index = u32::try_from(self.table.len()).map_err(|_| PackError::TooManyObjects)?;
            let tmp = self.repo.join(layout::OBJECTS_DIR).join(format!("{TMP_PREFIX}{}-{index}", std::process::id()));
            let file = DirectFile::create(&tmp).map_err(self.io(&tmp))?;
            self.table.push(ObjectRef { digest: [0; 32], size: 0 });
            self.current = Some(OpenObject { index, tmp, file, hasher: Sha256::new(), len: 0 });
        }
        let o = self.current.as_mut().unwrap();
        let at = o.len;
        o.file.write_all(bytes).map_err(|source| PackError::Io { path: o.tmp.clone(), source })?;
        o.hasher.update(bytes);
        o.len += bytes.len() as u64;
        self.bytes_written += bytes.len() as u64;
        Ok((o.index, at))
    }

    fn finish_current(&mut self) -> Result<(), PackError> {
        let Some(o) = self.current.take() else {
            return Ok(());
        };
        o.file.finish().map_err(self.io(&o.tmp))?;
        let digest: Hash = o.hasher.finalize().into();
        let dest = self.repo.join(layout::object(&digest));
        // Same name means same bytes: if it already exists (an interrupted earlier pack of the
        // same tree wrote it), keeping either copy is correct.
        fs::rename(&o.tmp, &dest).map_err(self.io(&dest))?;
        self.table[o.index as usize] = ObjectRef { digest, size: o.len };
        self.objects_written += 1;
        Ok(())
    }

    /// Finish the last object and make the new names durable. Returns the object table and the
    /// number of objects written.
    pub fn finish(mut self) -> Result<(Vec<ObjectRef>, u64), PackError> {
        self.finish_current()?;
        crate::sync_dir(&self.repo.join(layout::OBJECTS_DIR))?;
        Ok((self.table, self.objects_written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_file_holds_exactly_the_bytes_written_whatever_their_alignment() {
        let dir = tempfile::tempdir().unwrap();
        for total in [0usize, 1, ALIGN - 1, ALIGN, PIECE - 3, PIECE, PIECE + 5000, 3 * PIECE + 1] {
            let path = dir.path().join(format!("f{total}"));
            let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
            let mut f = DirectFile::create(&path).unwrap();
            // Uneven appends, as blocks and metadata regions come.
            for piece in data.chunks(1 + total / 7) {
                f.write_all(piece).unwrap();
            }
            f.finish().unwrap();
            assert_eq!(fs::read(&path).unwrap(), data, "{total} bytes");
        }
    }
}
