//! Reading many files with few requests. Pack writes each file's data and then its metadata
//! region, file after file, so in an object a file's span runs from the end of the previous
//! file's metadata region to the end of its own. Consecutive spans make a [`Window`] of up to
//! [`WINDOW_BYTES`], fetched with one ranged GET; every file in it is then read from memory
//! ([`Held`]), and a block stored elsewhere (say by an older version) is fetched on its own.
//! One request per window instead of two or more per file (`verify`, `extract`).

use std::ops::Range;

use incfs_format::manifest::FileData;

use crate::image::{Held, Image};

/// How much of an object one window covers, at most (unless one file's span alone is larger:
/// such a file is a window without a span, its blocks fetched in runs).
pub const WINDOW_BYTES: u64 = 8 << 20;

/// Files read together: those whose data and metadata lie in `span` of an object (fetched
/// once), or one file alone (`span` None). `files` are indexes into the planned slice.
#[derive(Debug, PartialEq, Eq)]
pub struct Window {
    pub span: Option<(u32, Range<u64>)>,
    pub files: Vec<usize>,
}

impl Window {
    /// The window's bytes, if it has a span and the source gives it (else its files are read
    /// as if alone, each reporting what is wrong with it).
    pub async fn fetch(&self, image: &Image) -> Option<Held> {
        let (object, span) = self.span.as_ref()?;
        let bytes = image.source().get_range(&image.object_key(*object), span.clone()).await.ok()?;
        Some(Held { object: *object, start: span.start, bytes })
    }
}

/// Group `files` (of an image with `objects` objects) into windows; files without a metadata
/// region (empty ones) are left out.
pub fn plan(files: &[FileData], objects: usize) -> Vec<Window> {
    let mut by_object: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); objects];
    for (i, f) in files.iter().enumerate() {
        let Some(m) = f.meta else { continue };
        // validate() guaranteed the region lies inside its object.
        let len = m.stored_len(f.size).unwrap_or(0);
        by_object[m.object as usize].push((m.offset, m.offset + len, i));
    }
    let mut out = Vec::new();
    for (object, mut regions) in by_object.into_iter().enumerate() {
        regions.sort_unstable();
        let mut cursor = 0;
        let mut current: Option<Window> = None;
        for (offset, end, i) in regions {
            let start = cursor.min(offset);
            cursor = cursor.max(end);
            if end - start > WINDOW_BYTES {
                out.extend(current.take());
                out.push(Window { span: None, files: vec![i] });
                continue;
            }
            match &mut current {
                Some(Window { span: Some((_, span)), files }) if end - span.start <= WINDOW_BYTES => {
                    span.end = span.end.max(end);
                    files.push(i);
                }
                _ => {
                    out.extend(current.take());
                    current = Some(Window { span: Some((object as u32, start..end)), files: vec![i] });
                }
            }
        }
        out.extend(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use incfs_format::manifest::MetaRef;

    fn file(size: u64, object: u32, offset: u64) -> FileData {
        FileData { size, root_hash: [0; 32], meta: Some(MetaRef::dense(object, offset)) }
    }

    #[test]
    fn files_are_grouped_by_consecutive_spans_of_their_object() {
        let meta = |size: u64| incfs_format::FileMetaLayout::new(size).len().unwrap();
        // Object 0: two small files back to back (data, then metadata), then one too large for
        // a window; object 1: one small file.
        let a = file(10_000, 0, 12_288);
        let b_off = 12_288 + meta(10_000) + 8192;
        let b = file(8192, 0, b_off);
        let big_off = b_off + meta(8192) + WINDOW_BYTES + 4096;
        let big = file(WINDOW_BYTES + 4096, 0, big_off);
        let c = file(100, 1, 4096);
        let files = vec![a, b, big, c];
        let w = plan(&files, 2);
        assert_eq!(
            w,
            vec![
                Window { span: Some((0, 0..b_off + meta(8192))), files: vec![0, 1] },
                Window { span: None, files: vec![2] },
                Window { span: Some((1, 0..4096 + meta(100))), files: vec![3] },
            ]
        );
    }
}
