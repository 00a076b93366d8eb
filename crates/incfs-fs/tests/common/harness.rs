//! A packed image served from a [`TestStore`], and a [`Reader`] over it with a fresh cache:
//! the daemon's read pipeline as `daemon::mount` builds it, without FUSE and without HTTP.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use incfs_fetch::{Image, Source};
use incfs_format::manifest::{InodeKind, Manifest};
use incfs_fs::background::{Background, BackgroundOptions};
use incfs_fs::mirrors::Mirrors;
use incfs_fs::reader::{FileRef, Reader};
use incfs_fs::stats::Stats;
use incfs_pack::{NoProgress, PackOptions};
use incfs_sign::{KeyAlgorithm, SigningKey, TrustedKeys};
use incfs_store::{file_key, Store};

use super::test_store::{Request, TestStore};

/// Deterministic incompressible bytes (splitmix64).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Deterministic compressible text that never repeats a block (words drawn at random, with a
/// running line number).
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "block", "tree", "leaf", "hash", "verify", "fetch", "range", "object", "manifest", "mount", "read", "cache",
        "store", "mirror", "span", "region", "kernel", "page", "file", "image", "signed", "root", "level", "run",
    ];
    let rnd = random_bytes(seed, len / 2 + 64);
    let mut out = Vec::with_capacity(len + 64);
    let (mut k, mut line) = (0usize, 0u64);
    while out.len() < len {
        out.extend_from_slice(format!("{line:08} ").as_bytes());
        for _ in 0..10 {
            out.extend_from_slice(WORDS[rnd[k % rnd.len()] as usize % WORDS.len()].as_bytes());
            out.push(b' ');
            k += 1;
        }
        out.push(b'\n');
        line += 1;
    }
    out.truncate(len);
    out
}

/// Pack `files` (relative path, content) into a new repository; returns it and the key to
/// trust.
pub fn pack(files: &[(&str, &[u8])]) -> (tempfile::TempDir, TrustedKeys) {
    let src = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let p = src.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
    }
    let repo = tempfile::tempdir().unwrap();
    let key = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap();
    let opts = PackOptions { name: Some("test".into()), ..PackOptions::default() };
    incfs_pack::pack(src.path(), repo.path(), &key, &opts, &NoProgress).expect("pack");
    (repo, TrustedKeys::new(vec![key.public_key()]))
}

/// An image in a [`TestStore`] and a reader over it.
pub struct Fixture {
    pub store: Arc<TestStore>,
    pub image: Image,
    pub manifest: Arc<Manifest>,
    pub reader: Arc<Reader>,
    pub repo: tempfile::TempDir,
    pub cache: tempfile::TempDir,
}

impl Fixture {
    /// Pack `files`, load the repository into a new test store, open it (counters are reset
    /// afterwards) and build a reader with `parallel` readahead/background slots.
    pub async fn new(files: &[(&str, &[u8])], parallel: usize) -> Fixture {
        let (repo, trust) = pack(files);
        Self::from_repo(repo, &trust, parallel).await
    }

    pub async fn from_repo(repo: tempfile::TempDir, trust: &TrustedKeys, parallel: usize) -> Fixture {
        let store = TestStore::new();
        store.load_dir(repo.path()).await;
        let source = Source::from_object_store("test-store", store.clone());
        let image = Image::open(source.clone(), trust).await.expect("open image");
        let manifest = image.manifest().clone();
        let cache = tempfile::tempdir().unwrap();
        let reader = Self::reader_over(&manifest, source, cache.path(), parallel);
        store.reset();
        Fixture { store, image, manifest, reader, repo, cache }
    }

    /// Start again cold: a new reader over a new, empty cache (the store's counters reset).
    pub fn renew(&mut self) {
        self.cache = tempfile::tempdir().unwrap();
        self.reader =
            Self::reader_over(&self.manifest, self.image.source().clone(), self.cache.path(), self.reader.parallel());
        self.store.reset();
    }

    /// A reader as the daemon builds one: a store in `cache`, the one source as its mirrors.
    pub fn reader_over(manifest: &Manifest, source: Source, cache: &Path, parallel: usize) -> Arc<Reader> {
        let store = Arc::new(Store::open(cache).expect("open store"));
        let mirrors = Arc::new(Mirrors::new(vec![source]));
        Arc::new(Reader::new(&manifest.objects, store, mirrors, Arc::new(Stats::default()), parallel))
    }

    /// The file at `path`, as the reader sees it.
    pub fn file(&self, path: &str) -> FileRef {
        let ino = self.manifest.resolve(path.as_bytes()).unwrap_or_else(|| panic!("{path} not in the image"));
        match &self.manifest.inodes[ino as usize].kind {
            InodeKind::File(d) => FileRef { data: *d, key: file_key(&d.root_hash, d.size), label: Arc::from(path) },
            other => panic!("{path} is not a file: {other:?}"),
        }
    }

    /// Background completion over the image (registers the files' metadata regions with the
    /// reader, as the daemon always does). Not started: spawn `.clone().run()` for that.
    pub fn background(&self, opts: BackgroundOptions) -> Arc<Background> {
        Background::new(self.reader.clone(), self.manifest.clone(), opts)
    }

    /// Whether request `r` touched `f`'s metadata region.
    pub fn touches_meta(&self, f: &FileRef, r: &Request) -> bool {
        let (object, offset, len) = self.reader.meta_region(f).expect("file has metadata");
        let key = incfs_format::layout::object(&self.manifest.objects[object as usize].digest);
        r.key == key && r.range.start < offset + len && offset < r.range.end
    }

    /// Requests so far that touched `f`'s metadata region.
    pub fn meta_requests(&self, f: &FileRef) -> usize {
        self.store.requests().iter().filter(|r| self.touches_meta(f, r)).count()
    }
}
