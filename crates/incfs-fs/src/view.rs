//! What the kernel sees of one image version, and how a new version maps onto the mounted one.
//!
//! Inode numbers belong to the mount, not to a manifest. The first version mounted numbers its
//! inodes `index + 1`. A later version keeps the number of every inode that is unchanged at the
//! same path (same kind, content, metadata, extended attributes and link count) and gives fresh,
//! never reused numbers to the rest. So the kernel's caches stay valid for whatever did not
//! change (names, attributes, page cache), a changed file is a new inode whose page cache starts
//! empty, and a file opened before a switch keeps its inode and reads the version it opened.
//! The directories whose entries changed are reported, for the kernel to forget its cached
//! names and listings of them ([`Inval`]).
//!
//! Pure: no I/O, no FUSE; [`Views`] is the mount's current view plus the retired ones that open
//! files and cached names may still refer to.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use incfs_format::manifest::{display_path, Inode, InodeKind, Manifest};
use incfs_store::{file_key, FileKey};
use parking_lot::{Mutex, RwLock};

use crate::pending::file_id;
use crate::reader::FileRef;

/// Kernel inode number of the root directory (fixed by FUSE).
pub const ROOT_INO: u64 = 1;

/// One version of the image as mounted.
pub struct View {
    pub manifest: Arc<Manifest>,
    /// Kernel inode number of each manifest inode; `None`: `index + 1`.
    inos: Option<Vec<u64>>,
    /// Manifest inode of each kernel inode number; `None`: `number - 1`.
    index: Option<HashMap<u64, u32>>,
    pub nlinks: Vec<u32>,
    /// Parent of each directory inode (the root is its own parent).
    pub parents: Vec<u32>,
    /// Path of each inode (its first name), for messages and listings.
    pub labels: Vec<Arc<str>>,
    /// Raw path of each inode, kept only when recording a profile.
    pub paths: Vec<Arc<[u8]>>,
    /// Data blocks of all files, for statfs.
    pub data_blocks: u64,
    /// Distinct file contents with data: (key, blocks), sorted.
    pub contents: Vec<(FileKey, u64)>,
    /// Highest kernel inode number this view uses.
    pub max_ino: u64,
    /// Regular files by stable id ([`file_id`]), made when first asked for.
    ids: OnceLock<HashMap<String, u32>>,
}

/// Something the kernel may have cached that a switch made stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inval {
    /// The name `name` in directory `parent` (a kernel inode number).
    Entry { parent: u64, name: Vec<u8> },
    /// Attributes and listing of directory `ino`.
    Inode(u64),
}

/// What a switch changed, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Paths present in both versions whose inode changed (content, metadata or kind);
    /// directories count only by their entries (added, removed).
    pub changed: Vec<String>,
    pub invalidate: Vec<Inval>,
}

/// Whether the kernel may keep treating `a` as `b`: everything it can see of them is equal.
/// Where a file's metadata region lies does not count (it is where to fetch, not what is read).
fn same_inode(a: &Inode, b: &Inode) -> bool {
    let kind = match (&a.kind, &b.kind) {
        (InodeKind::File(x), InodeKind::File(y)) => x.size == y.size && x.root_hash == y.root_hash,
        (x, y) => x == y,
    };
    kind && a.meta == b.meta && a.xattrs == b.xattrs
}

impl View {
    /// The first version mounted: inode numbers `index + 1`.
    pub fn first(manifest: Arc<Manifest>, recording: bool) -> View {
        let max_ino = manifest.inodes.len() as u64;
        View::build(manifest, None, None, max_ino, recording)
    }

    /// The view a previous daemon of this mount served: `manifest` with the kernel inode
    /// numbers it had given (`inos`, one per inode; `None`: a fresh view's). `None` if they do
    /// not fit this manifest.
    pub fn restored(manifest: Arc<Manifest>, inos: Option<Vec<u64>>, max_ino: u64, recording: bool) -> Option<View> {
        let Some(inos) = inos else {
            let n = manifest.inodes.len() as u64;
            return Some(View::build(manifest, None, None, max_ino.max(n), recording));
        };
        if inos.len() != manifest.inodes.len() {
            return None;
        }
        let index: HashMap<u64, u32> = inos.iter().enumerate().map(|(i, &ino)| (ino, i as u32)).collect();
        if index.len() != inos.len() {
            return None;
        }
        let max_ino = inos.iter().copied().max().unwrap_or(ROOT_INO).max(max_ino);
        Some(View::build(manifest, Some(inos), Some(index), max_ino, recording))
    }

    /// Kernel inode numbers of the manifest's inodes (`None`: index + 1).
    pub fn inode_numbers(&self) -> Option<Vec<u64>> {
        self.inos.clone()
    }

    fn build(
        manifest: Arc<Manifest>,
        inos: Option<Vec<u64>>,
        index: Option<HashMap<u64, u32>>,
        max_ino: u64,
        recording: bool,
    ) -> View {
        let n = manifest.inodes.len();
        let mut labels: Vec<Arc<str>> = vec![Arc::from(""); n];
        let mut paths: Vec<Arc<[u8]>> = if recording { vec![Arc::from(&b""[..]); n] } else { vec![] };
        let mut named = vec![false; n];
        for (path, ino) in manifest.walk() {
            if !std::mem::replace(&mut named[ino as usize], true) {
                labels[ino as usize] = Arc::from(display_path(&path));
                if recording {
                    paths[ino as usize] = Arc::from(path.as_slice());
                }
            }
        }
        let mut parents = vec![0u32; n];
        for d in &manifest.dirents {
            parents[d.inode as usize] = d.parent;
        }
        let mut data_blocks = 0;
        let mut contents = Vec::new();
        for i in &manifest.inodes {
            if let InodeKind::File(f) = &i.kind {
                let blocks = incfs_verity::block_count(f.size);
                data_blocks += blocks;
                if f.size > 0 {
                    contents.push((file_key(&f.root_hash, f.size), blocks));
                }
            }
        }
        contents.sort_unstable();
        contents.dedup();
        View {
            nlinks: manifest.link_counts(),
            manifest,
            inos,
            index,
            parents,
            labels,
            paths,
            data_blocks,
            contents,
            max_ino,
            ids: OnceLock::new(),
        }
    }

    /// Regular file `idx` as the reader sees it.
    pub fn file(&self, idx: u32) -> Option<FileRef> {
        match &self.manifest.inodes.get(idx as usize)?.kind {
            InodeKind::File(f) => Some(FileRef {
                data: *f,
                key: file_key(&f.root_hash, f.size),
                label: self.labels[idx as usize].clone(),
            }),
            _ => None,
        }
    }

    /// The regular file whose stable id is `id`.
    pub fn index_by_id(&self, id: &str) -> Option<u32> {
        let ids = self.ids.get_or_init(|| {
            (0..self.manifest.inodes.len() as u32)
                .filter(|&i| matches!(self.manifest.inodes[i as usize].kind, InodeKind::File(_)))
                .map(|i| (file_id(&self.labels[i as usize]), i))
                .collect()
        });
        ids.get(id).copied()
    }

    /// Kernel inode number of manifest inode `idx`.
    pub fn ino(&self, idx: u32) -> u64 {
        match &self.inos {
            None => idx as u64 + 1,
            Some(v) => v[idx as usize],
        }
    }

    /// Manifest inode of kernel inode number `ino`, if this view has it.
    pub fn index_of(&self, ino: u64) -> Option<u32> {
        match &self.index {
            None => {
                let idx = u32::try_from(ino.checked_sub(1)?).ok()?;
                ((idx as usize) < self.manifest.inodes.len()).then_some(idx)
            }
            Some(m) => m.get(&ino).copied(),
        }
    }

    /// `manifest` as the next version after this one; fresh inode numbers start above
    /// `next_ino`. Returns the view and what changed.
    pub fn next(&self, manifest: Arc<Manifest>, next_ino: u64, recording: bool) -> (View, Changes) {
        let old = &self.manifest;
        let old_walk = old.walk();
        let old_by_path: HashMap<&[u8], u32> = old_walk.iter().map(|(p, i)| (p.as_slice(), *i)).collect();
        let new_walk = manifest.walk();
        let new_links = manifest.link_counts();
        let mut inos: Vec<u64> = vec![0; manifest.inodes.len()];
        let mut used = HashSet::new();
        let mut fresh = next_ino.max(self.max_ino + 1);
        let mut changes = Changes::default();
        for (path, idx) in &new_walk {
            let before = old_by_path.get(path.as_slice()).copied();
            let node = &manifest.inodes[*idx as usize];
            let is_dir = matches!(node.kind, InodeKind::Dir);
            match before {
                None => changes.added.push(display_path(path)),
                // A directory's own changes are its entries': reported as those.
                Some(o) if matches!(old.inodes[o as usize].kind, InodeKind::Dir) && is_dir => {}
                Some(o) if !same_inode(&old.inodes[o as usize], node) => changes.changed.push(display_path(path)),
                Some(_) => {}
            }
            if inos[*idx as usize] != 0 {
                continue; // a further name of a hard-linked inode
            }
            let keep = match before {
                _ if *idx == 0 => Some(ROOT_INO),
                Some(o) => {
                    let same = same_inode(&old.inodes[o as usize], node)
                        && (is_dir || self.nlinks[o as usize] == new_links[*idx as usize]);
                    Some(self.ino(o)).filter(|ino| same && !used.contains(ino))
                }
                None => None,
            };
            let ino = keep.unwrap_or_else(|| {
                fresh += 1;
                fresh - 1
            });
            used.insert(ino);
            inos[*idx as usize] = ino;
        }
        let new_paths: HashSet<&[u8]> = new_walk.iter().map(|(p, _)| p.as_slice()).collect();
        changes.removed =
            old_walk.iter().filter(|(p, _)| !new_paths.contains(p.as_slice())).map(|(p, _)| display_path(p)).collect();

        // Directories kept under their inode number whose entries differ: the kernel must
        // forget those names and the listing.
        let old_index: HashMap<u64, u32> = (0..old.inodes.len() as u32).map(|i| (self.ino(i), i)).collect();
        for (d, node) in manifest.inodes.iter().enumerate() {
            if !matches!(node.kind, InodeKind::Dir) {
                continue;
            }
            let ino = inos[d];
            let Some(&od) = old_index.get(&ino) else { continue };
            let old_entries: HashMap<&[u8], u64> =
                old.children(od).iter().map(|e| (e.name.as_slice(), self.ino(e.inode))).collect();
            let new_entries: HashMap<&[u8], u64> =
                manifest.children(d as u32).iter().map(|e| (e.name.as_slice(), inos[e.inode as usize])).collect();
            let mut names: Vec<&[u8]> = old_entries
                .iter()
                .filter(|(n, i)| new_entries.get(*n) != Some(i))
                .map(|(n, _)| *n)
                .chain(new_entries.keys().filter(|n| !old_entries.contains_key(*n)).copied())
                .collect();
            let differs = !names.is_empty() || !same_inode(&old.inodes[od as usize], node);
            names.sort_unstable();
            changes.invalidate.extend(names.into_iter().map(|n| Inval::Entry { parent: ino, name: n.to_vec() }));
            if differs {
                changes.invalidate.push(Inval::Inode(ino));
            }
        }
        let index = inos.iter().enumerate().map(|(i, &ino)| (ino, i as u32)).collect();
        let max_ino = inos.iter().copied().max().unwrap_or(ROOT_INO).max(fresh - 1);
        (View::build(manifest, Some(inos), Some(index), max_ino, recording), changes)
    }
}

/// The mount's current view, and the retired views that open files and the kernel's cached
/// names may still refer to (kept for the mount's life: each costs one manifest).
pub struct Views {
    current: RwLock<Arc<View>>,
    retired: Mutex<Vec<Arc<View>>>,
}

impl Views {
    pub fn new(first: View) -> Views {
        Views { current: RwLock::new(Arc::new(first)), retired: Mutex::new(Vec::new()) }
    }

    pub fn current(&self) -> Arc<View> {
        self.current.read().clone()
    }

    /// The view knowing kernel inode `ino`, and its manifest index: the current view first,
    /// then the retired ones, newest first.
    pub fn find(&self, ino: u64) -> Option<(Arc<View>, u32)> {
        let cur = self.current();
        if let Some(i) = cur.index_of(ino) {
            return Some((cur, i));
        }
        let retired = self.retired.lock();
        retired.iter().rev().find_map(|v| v.index_of(ino).map(|i| (v.clone(), i)))
    }

    /// Highest inode number any view used.
    pub fn max_ino(&self) -> u64 {
        let cur = self.current().max_ino;
        self.retired.lock().iter().map(|v| v.max_ino).fold(cur, u64::max)
    }

    /// Make `view` current; the previous one is retired.
    pub fn switch(&self, view: View) {
        let old = std::mem::replace(&mut *self.current.write(), Arc::new(view));
        self.retired.lock().push(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use incfs_format::manifest::{Dirent, FileData, MetaRef, Metadata};

    fn file(size: u64, root: u8) -> Inode {
        let meta = Some(MetaRef::dense(0, root as u64 * 100));
        Inode {
            meta: Metadata { mode: 0o644, ..Default::default() },
            xattrs: vec![],
            kind: InodeKind::File(FileData { size, root_hash: [root; 32], meta }),
        }
    }

    fn dir() -> Inode {
        Inode { meta: Metadata { mode: 0o755, ..Default::default() }, xattrs: vec![], kind: InodeKind::Dir }
    }

    /// root/{a, b, d/{c}} with the given contents of a, b, c.
    fn tree(entries: &[(&str, Option<u8>)]) -> Arc<Manifest> {
        let mut inodes = vec![dir(), dir()];
        let mut dirents = vec![Dirent { parent: 0, inode: 1, name: b"d".to_vec() }];
        for (name, root) in entries {
            let Some(root) = root else { continue };
            let (parent, name) = match name.strip_prefix("d/") {
                Some(n) => (1, n),
                None => (0, *name),
            };
            inodes.push(file(5000, *root));
            dirents.push(Dirent { parent, inode: inodes.len() as u32 - 1, name: name.as_bytes().to_vec() });
        }
        dirents.sort_by(|x, y| (x.parent, &x.name).cmp(&(y.parent, &y.name)));
        Arc::new(Manifest {
            name: "t".into(),
            version: 1,
            expires: None,
            objects: vec![],
            dictionaries: vec![],
            inodes,
            dirents,
        })
    }

    #[test]
    fn unchanged_inodes_keep_their_numbers_changed_ones_get_fresh_ones() {
        let v1 = View::first(tree(&[("a", Some(1)), ("b", Some(2)), ("d/c", Some(3))]), false);
        let a1 = v1.ino(v1.manifest.resolve(b"a").unwrap());
        let b1 = v1.ino(v1.manifest.resolve(b"b").unwrap());
        // b changes, d/c is removed, d/e is added.
        let (v2, ch) = v1.next(tree(&[("a", Some(1)), ("b", Some(9)), ("d/e", Some(4))]), 0, false);
        assert_eq!(v2.ino(0), ROOT_INO);
        assert_eq!(v2.ino(v2.manifest.resolve(b"a").unwrap()), a1);
        let b2 = v2.ino(v2.manifest.resolve(b"b").unwrap());
        assert_ne!(b2, b1);
        assert!(b2 > v1.max_ino);
        assert_eq!(v2.index_of(b2), v2.manifest.resolve(b"b"));
        assert_eq!(v2.index_of(b1), None);
        assert_eq!(ch.added, vec!["d/e"]);
        assert_eq!(ch.removed, vec!["d/c"]);
        assert_eq!(ch.changed, vec!["b"]);
        let d = v2.ino(v2.manifest.resolve(b"d").unwrap());
        assert!(ch.invalidate.contains(&Inval::Entry { parent: ROOT_INO, name: b"b".to_vec() }));
        assert!(ch.invalidate.contains(&Inval::Entry { parent: d, name: b"c".to_vec() }));
        assert!(ch.invalidate.contains(&Inval::Entry { parent: d, name: b"e".to_vec() }));
        assert!(ch.invalidate.contains(&Inval::Inode(d)));
        assert!(!ch.invalidate.iter().any(|i| matches!(i, Inval::Entry { name, .. } if name == b"a")));
    }

    #[test]
    fn an_identical_version_changes_nothing() {
        let m = tree(&[("a", Some(1)), ("d/c", Some(3))]);
        let v1 = View::first(m.clone(), false);
        let (v2, ch) = v1.next(m, 0, false);
        assert_eq!(ch, Changes::default());
        for i in 0..v2.manifest.inodes.len() as u32 {
            assert_eq!(v2.ino(i), v1.ino(i));
        }
    }

    #[test]
    fn numbers_are_never_reused_across_views() {
        let v1 = View::first(tree(&[("a", Some(1))]), false);
        let (v2, _) = v1.next(tree(&[("a", Some(2))]), 0, false);
        let a2 = v2.ino(v2.manifest.resolve(b"a").unwrap());
        let views = Views::new(v1);
        views.switch(v2);
        // Back to the first content: a fresh number again, not the first view's.
        let (v3, _) = views.current().next(tree(&[("a", Some(1))]), views.max_ino() + 1, false);
        let a3 = v3.ino(v3.manifest.resolve(b"a").unwrap());
        assert!(a3 > a2 && a3 > 3);
        // The retired view still answers for its numbers.
        let (old, idx) = views.find(3).unwrap();
        assert_eq!(old.labels[idx as usize].as_ref(), "a");
    }
}
