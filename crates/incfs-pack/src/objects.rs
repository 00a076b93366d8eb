//! Writing content-named objects.
//!
//! Blocks and file metadata are appended to the current object until it passes the target size;
//! then it is flushed, fsynced and renamed to `objects/<sha256 of its bytes>`. The manifest's
//! object table is append-only across versions of a repository: a new version's table starts
//! with the previous version's table, so block records and metadata regions written for one
//! version stay valid, unchanged, in every later one.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use incfs_format::manifest::ObjectRef;
use incfs_format::{layout, Hash};
use sha2::{Digest, Sha256};

use crate::PackError;

struct OpenObject {
    index: u32,
    tmp: PathBuf,
    file: BufWriter<File>,
    hasher: Sha256,
    len: u64,
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
            let file = File::create(&tmp).map_err(self.io(&tmp))?;
            self.table.push(ObjectRef { digest: [0; 32], size: 0 });
            self.current = Some(OpenObject {
                index,
                tmp,
                file: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                len: 0,
            });
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
        let file = o.file.into_inner().map_err(|e| PackError::Io { path: o.tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(self.io(&o.tmp))?;
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
