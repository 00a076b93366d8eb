//! The image model: what a signed manifest says, and the rules a manifest must obey.
//!
//! Inodes and directory entries are kept apart, as in a Unix filesystem, so hard links are
//! simply several entries naming one inode. Inode 0 is the root directory. [`Manifest::validate`]
//! enforces every structural rule (names, reachability, bounds of object references, sizes), so
//! code that holds a validated manifest can index it without further checks.

use incfs_verity::Hash;

use crate::block_map::FileMetaLayout;

/// Longest name of a directory entry or extended attribute, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target, in bytes (Linux `PATH_MAX - 1`).
pub const MAX_SYMLINK_LEN: usize = 4095;
/// Largest extended attribute value, in bytes (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: usize = 65536;
/// Largest file size accepted (1 PiB): far beyond real images, small enough that block and
/// tree arithmetic can never overflow.
pub const MAX_FILE_SIZE: u64 = 1 << 50;
/// Longest image name, in bytes.
pub const MAX_IMAGE_NAME_LEN: usize = 255;

/// A signed image: one version of a published tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Human-readable image name (UTF-8, no `/`, no control characters).
    pub name: String,
    /// Version number; each version published to a repository is larger than the last.
    pub version: u64,
    /// When this manifest stops being acceptable from a source (seconds since the Unix epoch):
    /// the publisher promises to sign a newer one before then, so a server that keeps serving
    /// this one (a frozen or replayed version) is noticed. `None`: never (format 1).
    pub expires: Option<i64>,
    /// Objects referenced by this version, addressed by index.
    pub objects: Vec<ObjectRef>,
    /// The image's zstd dictionaries (format 4): indexes of objects that each hold one, whole.
    /// Append-only across versions like the object table: blocks stored with an older
    /// dictionary stay readable.
    pub dictionaries: Vec<u32>,
    /// Inodes; index 0 is the root directory.
    pub inodes: Vec<Inode>,
    /// Directory entries, sorted by (parent, name).
    pub dirents: Vec<Dirent>,
}

/// An object the manifest refers to: its SHA-256 (which is also its name) and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub digest: Hash,
    pub size: u64,
}

/// Ownership, permissions and modification time of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Permission bits, including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub meta: Metadata,
    pub xattrs: Vec<Xattr>,
    pub kind: InodeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeKind {
    File(FileData),
    Dir,
    Symlink(Vec<u8>),
    Fifo,
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
}

impl InodeKind {
    /// The on-disk kind code.
    pub fn code(&self) -> u8 {
        match self {
            InodeKind::File(_) => 1,
            InodeKind::Dir => 2,
            InodeKind::Symlink(_) => 3,
            InodeKind::Fifo => 4,
            InodeKind::CharDev { .. } => 5,
            InodeKind::BlockDev { .. } => 6,
        }
    }
}

/// A regular file's content: its size, Merkle root and where its metadata region is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileData {
    pub size: u64,
    /// fs-verity Merkle tree root hash (all zeros for an empty file).
    pub root_hash: Hash,
    /// Location of the file's metadata region; `None` exactly when the file is empty.
    pub meta: Option<MetaRef>,
}

impl FileData {
    /// Whether the file's metadata is a compact map (format 3) rather than the dense region.
    pub fn has_compact_map(&self) -> bool {
        self.meta.is_some_and(|m| m.compact != 0)
    }

    /// The fs-verity digest (`fsverity digest` output) of the file.
    pub fn digest(&self) -> Hash {
        incfs_verity::file_digest(&self.root_hash, self.size)
    }
}

/// Where a file's metadata region lies, and in which form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetaRef {
    pub object: u32,
    pub offset: u64,
    /// 0: the dense region ([`FileMetaLayout`]); else the length of a compact map
    /// ([`crate::compact_map`], manifest format 3) stored there instead.
    pub compact: u32,
}

impl MetaRef {
    /// A dense region at `offset` of `object`.
    pub fn dense(object: u32, offset: u64) -> Self {
        MetaRef { object, offset, compact: 0 }
    }

    /// Bytes the region takes in its object, for a file of `size` bytes (`None`: overflow).
    pub fn stored_len(&self, size: u64) -> Option<u64> {
        match self.compact {
            0 => FileMetaLayout::new(size).len(),
            n => Some(n as u64),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirent {
    pub parent: u32,
    pub inode: u32,
    pub name: Vec<u8>,
}

/// A structural rule a manifest broke.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("image name {0:?} is invalid: use 1-255 bytes of UTF-8 without '/' or control characters")]
    ImageName(String),
    #[error("version must be at least 1")]
    Version,
    #[error("inode 0 must be the root directory")]
    Root,
    #[error("inode {inode}: {what}")]
    Inode { inode: u32, what: String },
    #[error("directory entry {index}: {what}")]
    Dirent { index: usize, what: String },
    #[error("directory entries are not sorted by (parent, name) or repeat a name at entry {0}")]
    DirentOrder(usize),
    #[error("inode {0} is not reachable from the root directory")]
    Unreachable(u32),
    #[error("dictionary {index}: {what}")]
    Dictionary { index: usize, what: String },
}

/// Most dictionaries a manifest lists.
pub const MAX_DICTIONARIES: usize = 255;
/// Largest dictionary object (a client fetches and keeps each whole).
pub const MAX_DICTIONARY_SIZE: u64 = 1 << 20;

/// Whether `name` may be a directory entry: 1-255 bytes, no `/`, no NUL, not `.` or `..`.
///
/// Any other byte is allowed, including newlines and invalid UTF-8, as on Linux.
pub fn is_valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// Whether `name` may be an image name.
pub fn is_valid_image_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_IMAGE_NAME_LEN && !name.chars().any(|c| c == '/' || c.is_control())
}

impl Manifest {
    /// Whether this manifest has expired at `now` (seconds since the Unix epoch).
    pub fn expired_at(&self, now: i64) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }

    /// Check every structural rule. A manifest that passes can be indexed without bounds worries:
    /// every inode, object and metadata region it names exists.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !is_valid_image_name(&self.name) {
            return Err(ManifestError::ImageName(self.name.clone()));
        }
        if self.version == 0 {
            return Err(ManifestError::Version);
        }
        if !matches!(self.inodes.first().map(|i| &i.kind), Some(InodeKind::Dir)) {
            return Err(ManifestError::Root);
        }
        if self.inodes.len() > u32::MAX as usize || self.objects.len() > u32::MAX as usize {
            return Err(ManifestError::Root);
        }
        for (i, inode) in self.inodes.iter().enumerate() {
            self.validate_inode(inode).map_err(|what| ManifestError::Inode { inode: i as u32, what })?;
        }
        self.validate_dictionaries()?;
        self.validate_tree()
    }

    fn validate_dictionaries(&self) -> Result<(), ManifestError> {
        let err = |index, what: &str| Err(ManifestError::Dictionary { index, what: what.into() });
        if self.dictionaries.len() > MAX_DICTIONARIES {
            return err(MAX_DICTIONARIES, "more than 255 dictionaries");
        }
        for (i, &d) in self.dictionaries.iter().enumerate() {
            match self.objects.get(d as usize) {
                None => return err(i, "names an object the table does not have"),
                Some(o) if o.size == 0 || o.size > MAX_DICTIONARY_SIZE => return err(i, "is empty or over 1 MiB"),
                Some(_) if self.dictionaries[..i].contains(&d) => return err(i, "is listed twice"),
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn validate_inode(&self, inode: &Inode) -> Result<(), String> {
        if inode.meta.mode & !0o7777 != 0 {
            return Err(format!("mode {:o} has bits outside 0o7777", inode.meta.mode));
        }
        if inode.meta.mtime_nsec >= 1_000_000_000 {
            return Err(format!("mtime nanoseconds {} out of range", inode.meta.mtime_nsec));
        }
        for (j, x) in inode.xattrs.iter().enumerate() {
            if x.name.is_empty() || x.name.len() > MAX_NAME_LEN || x.name.contains(&0) {
                return Err(format!("extended attribute name {:?} is invalid", x.name));
            }
            if x.value.len() > MAX_XATTR_VALUE_LEN {
                return Err("extended attribute value is larger than 64 KiB".into());
            }
            if j > 0 && inode.xattrs[j - 1].name >= x.name {
                return Err("extended attributes are not sorted by name or repeat a name".into());
            }
        }
        match &inode.kind {
            InodeKind::File(f) => self.validate_file(f),
            InodeKind::Symlink(t) => {
                if t.is_empty() || t.len() > MAX_SYMLINK_LEN || t.contains(&0) {
                    Err("symlink target must be 1-4095 bytes without NUL".into())
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    fn validate_file(&self, f: &FileData) -> Result<(), String> {
        if f.size > MAX_FILE_SIZE {
            return Err(format!("size {} is larger than the 1 PiB limit", f.size));
        }
        match (f.size, f.meta) {
            (0, None) if f.root_hash == [0; 32] => Ok(()),
            (0, _) => Err("an empty file must have no metadata and a zero root hash".into()),
            (_, None) => Err("a non-empty file needs a metadata region".into()),
            (size, Some(m)) => {
                let obj = self
                    .objects
                    .get(m.object as usize)
                    .ok_or_else(|| format!("metadata names object {} of {}", m.object, self.objects.len()))?;
                if m.compact != 0 {
                    use crate::compact_map::{MAX_COMPACT_LEN, RUN_SIZE};
                    let n = m.compact as u64;
                    if !(8..=MAX_COMPACT_LEN).contains(&n) || !(n - 8).is_multiple_of(RUN_SIZE as u64) {
                        return Err(format!("compact map length {n} is not 8 + 64 per run up to 1 MiB"));
                    }
                }
                let len = m.stored_len(size).ok_or("metadata length overflows")?;
                match m.offset.checked_add(len) {
                    Some(end) if end <= obj.size => Ok(()),
                    _ => Err(format!(
                        "metadata region {}+{} lies outside object {} ({} bytes)",
                        m.offset, len, m.object, obj.size
                    )),
                }
            }
        }
    }

    /// Entries sorted and unique, parents are directories, directories have exactly one entry
    /// and every inode is reachable from the root (which also rules out directory cycles).
    fn validate_tree(&self) -> Result<(), ManifestError> {
        let n = self.inodes.len();
        let mut links = vec![0u32; n];
        for (index, d) in self.dirents.iter().enumerate() {
            let bad = |what: &str| ManifestError::Dirent { index, what: what.to_string() };
            if !is_valid_name(&d.name) {
                return Err(bad(&format!("name {:?} is not a valid file name", String::from_utf8_lossy(&d.name))));
            }
            match self.inodes.get(d.parent as usize) {
                Some(Inode { kind: InodeKind::Dir, .. }) => {}
                _ => return Err(bad("parent is not a directory")),
            }
            if d.inode == 0 || d.inode as usize >= n {
                return Err(bad("inode is out of range or the root"));
            }
            if index > 0 {
                let p = &self.dirents[index - 1];
                if (p.parent, &p.name) >= (d.parent, &d.name) {
                    return Err(ManifestError::DirentOrder(index));
                }
            }
            links[d.inode as usize] = links[d.inode as usize].saturating_add(1);
            if links[d.inode as usize] > 1 && matches!(self.inodes[d.inode as usize].kind, InodeKind::Dir) {
                return Err(bad("a directory can have only one name"));
            }
        }
        // Walk from the root; entries of one parent are contiguous because of the sort order.
        let mut seen = vec![false; n];
        seen[0] = true;
        let mut stack = vec![0u32];
        while let Some(dir) = stack.pop() {
            for d in self.children(dir) {
                if !seen[d.inode as usize] {
                    seen[d.inode as usize] = true;
                    if matches!(self.inodes[d.inode as usize].kind, InodeKind::Dir) {
                        stack.push(d.inode);
                    }
                }
            }
        }
        match seen.iter().position(|s| !s) {
            Some(i) => Err(ManifestError::Unreachable(i as u32)),
            None => Ok(()),
        }
    }

    /// Entries of directory `dir`, sorted by name (binary search over the sorted entries).
    pub fn children(&self, dir: u32) -> &[Dirent] {
        let start = self.dirents.partition_point(|d| d.parent < dir);
        let end = self.dirents.partition_point(|d| d.parent <= dir);
        &self.dirents[start..end]
    }

    /// Look up `name` in directory `dir`.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<u32> {
        let c = self.children(dir);
        c.binary_search_by(|d| d.name.as_slice().cmp(name)).ok().map(|i| c[i].inode)
    }

    /// The inode at `path` (relative to the root, components joined with `/`; empty and `.`
    /// components are skipped, `..` is not followed).
    pub fn resolve(&self, path: &[u8]) -> Option<u32> {
        let mut ino = 0u32;
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty() && *p != b".") {
            if !matches!(self.inodes.get(ino as usize)?.kind, InodeKind::Dir) {
                return None;
            }
            ino = self.lookup(ino, part)?;
        }
        Some(ino)
    }

    /// Every inode under `root` (itself included), for acting on a whole tree.
    pub fn subtree(&self, root: u32) -> Vec<u32> {
        let mut out = vec![root];
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for d in self.children(dir) {
                out.push(d.inode);
                if matches!(self.inodes[d.inode as usize].kind, InodeKind::Dir) {
                    stack.push(d.inode);
                }
            }
        }
        out
    }

    /// Number of names of each inode (a directory counts `.` and its subdirectories' `..`).
    pub fn link_counts(&self) -> Vec<u32> {
        let mut links: Vec<u32> =
            self.inodes.iter().map(|i| if matches!(i.kind, InodeKind::Dir) { 1 } else { 0 }).collect();
        links[0] += 1; // the root's own ".." (it is its own parent)
        for d in &self.dirents {
            links[d.inode as usize] += 1;
            if matches!(self.inodes[d.inode as usize].kind, InodeKind::Dir) {
                links[d.parent as usize] += 1;
            }
        }
        links
    }

    /// Every path in the tree with its inode, depth first, in entry order. Paths are relative to
    /// the root, as raw bytes joined with `/`; the root itself is the empty path.
    pub fn walk(&self) -> Vec<(Vec<u8>, u32)> {
        let mut out = vec![(Vec::new(), 0u32)];
        let mut stack: Vec<(Vec<u8>, u32)> = vec![(Vec::new(), 0)];
        while let Some((prefix, dir)) = stack.pop() {
            let mut subdirs = Vec::new();
            for d in self.children(dir) {
                let mut path = prefix.clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(&d.name);
                if matches!(self.inodes[d.inode as usize].kind, InodeKind::Dir) {
                    subdirs.push((path.clone(), d.inode));
                }
                out.push((path, d.inode));
            }
            stack.extend(subdirs.into_iter().rev());
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Manifest {
        let meta = Metadata { mode: 0o755, uid: 1, gid: 2, mtime_sec: 1_700_000_000, mtime_nsec: 5 };
        let file = |size: u64| Inode {
            meta,
            xattrs: vec![Xattr { name: b"user.k".to_vec(), value: b"v".to_vec() }],
            kind: InodeKind::File(FileData { size, root_hash: [size as u8; 32], meta: Some(MetaRef::dense(0, 0)) }),
        };
        Manifest {
            name: "sample".into(),
            version: 3,
            expires: None,
            objects: vec![ObjectRef { digest: [9; 32], size: 1 << 20 }],
            dictionaries: vec![],
            inodes: vec![
                Inode { meta, xattrs: vec![], kind: InodeKind::Dir },
                file(10),
                Inode { meta, xattrs: vec![], kind: InodeKind::Dir },
                Inode { meta, xattrs: vec![], kind: InodeKind::Symlink(b"../../etc/passwd".to_vec()) },
                Inode { meta, xattrs: vec![], kind: InodeKind::CharDev { major: 1, minor: 3 } },
                Inode {
                    meta,
                    xattrs: vec![],
                    kind: InodeKind::File(FileData { size: 0, root_hash: [0; 32], meta: None }),
                },
            ],
            dirents: vec![
                Dirent { parent: 0, inode: 1, name: b"a\nb".to_vec() },
                Dirent { parent: 0, inode: 2, name: b"dir".to_vec() },
                Dirent { parent: 0, inode: 5, name: b"empty".to_vec() },
                Dirent { parent: 2, inode: 1, name: b"hardlink".to_vec() },
                Dirent { parent: 2, inode: 4, name: b"null".to_vec() },
                Dirent { parent: 2, inode: 3, name: vec![0xff, 0xfe] },
            ],
        }
    }

    #[test]
    fn sample_is_valid_and_navigable() {
        let m = sample();
        m.validate().unwrap();
        assert_eq!(m.lookup(0, b"dir"), Some(2));
        assert_eq!(m.lookup(2, b"hardlink"), Some(1));
        assert_eq!(m.lookup(2, b"missing"), None);
        assert_eq!(m.link_counts(), vec![3, 2, 2, 1, 1, 1]);
        let paths: Vec<Vec<u8>> = m.walk().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths[..4], [b"".to_vec(), b"a\nb".to_vec(), b"dir".to_vec(), b"empty".to_vec()]);
        assert_eq!(paths.len(), 7);
        assert_eq!(m.resolve(b"dir/hardlink"), Some(1));
        assert_eq!(m.resolve(b"./dir//null/"), Some(4));
        assert_eq!(m.resolve(b""), Some(0));
        assert_eq!(m.resolve(b"dir/../a\nb"), None, ".. is not followed");
        assert_eq!(m.resolve(b"a\nb/x"), None);
        assert_eq!(m.resolve(b"empty/x"), None, "not a directory");
        let mut sub = m.subtree(2);
        sub.sort();
        assert_eq!(sub, vec![1, 2, 3, 4]);
    }

    #[test]
    fn structural_errors_are_caught() {
        let mut m = sample();
        m.dirents[0].name = b"..".to_vec();
        assert!(matches!(m.validate(), Err(ManifestError::Dirent { index: 0, .. })));

        let mut m = sample();
        m.dirents[1].name = b"x/y".to_vec();
        assert!(matches!(m.validate(), Err(ManifestError::Dirent { index: 1, .. })));

        let mut m = sample();
        m.dirents.swap(0, 1);
        assert_eq!(m.validate(), Err(ManifestError::DirentOrder(1)));

        let mut m = sample();
        m.dirents.remove(4);
        assert_eq!(m.validate(), Err(ManifestError::Unreachable(4)));

        // A directory that is its own parent is unreachable from the root.
        let mut m = sample();
        m.dirents[1].parent = 2;
        m.dirents.sort_by(|a, b| (a.parent, &a.name).cmp(&(b.parent, &b.name)));
        assert!(matches!(m.validate(), Err(ManifestError::Unreachable(_))));

        let mut m = sample();
        if let InodeKind::File(f) = &mut m.inodes[1].kind {
            f.meta = Some(MetaRef::dense(0, (1 << 20) - 10));
        }
        assert!(matches!(m.validate(), Err(ManifestError::Inode { inode: 1, .. })));

        let mut m = sample();
        if let InodeKind::File(f) = &mut m.inodes[1].kind {
            f.size = u64::MAX;
        }
        assert!(matches!(m.validate(), Err(ManifestError::Inode { inode: 1, .. })));

        let mut m = sample();
        m.name = "a/b".into();
        assert!(matches!(m.validate(), Err(ManifestError::ImageName(_))));
    }
}

/// A path for messages: printable UTF-8 as is; control characters, invalid UTF-8 and `\` as
/// `\xNN`, so a hostile name (say, one holding a newline) cannot forge output lines.
pub fn display_path(path: &[u8]) -> String {
    escape_path_where(path, char::is_control)
}

/// `path` as UTF-8 text with invalid UTF-8, `\` and every character `escape` picks written as
/// `\xNN` per byte (so it can be read back unambiguously).
pub fn escape_path_where(path: &[u8], escape: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if escape(c) || c == '\\' {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod display_tests {
    #[test]
    fn hostile_paths_print_on_one_line() {
        assert_eq!(super::display_path(b"a\nb\\c\xffd/\xc3\xa9"), "a\\x0ab\\x5cc\\xffd/\u{e9}");
    }
}
