//! The image's compression dictionaries (manifest format 4) for a mount: each taken from the
//! cache, or fetched from a source and kept in the cache (so that a complete mount still reads
//! offline), checked against the signed object table, and registered with the block decoder
//! before any block is read.

use incfs_fetch::Source;
use incfs_format::codec::{accept_dictionary, DictionaryError};
use incfs_format::layout;
use incfs_format::manifest::{Manifest, MAX_DICTIONARY_SIZE};
use incfs_store::{Store, StoreError};

/// The cache keeps a dictionary as the metadata piece (object digest, this region, chunk 0):
/// no metadata region starts at this offset (a dictionary object holds nothing else).
const REGION: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum DictionaryLoadError {
    #[error("compression dictionary {key}: {error}")]
    Bad { key: String, error: DictionaryError },
    #[error("compression dictionary {key}: not in the cache and no source gave it ({reason}); a mount with a reachable source fetches it")]
    Unavailable { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The cache's keys (object, region, piece) of the dictionaries `manifest` lists: kept by `gc`,
/// and pinned with every pinned file of the image (a pinned file must read offline).
pub fn cache_keys(manifest: &Manifest) -> impl Iterator<Item = (incfs_format::Hash, u64, u64)> + '_ {
    manifest.dictionaries.iter().filter_map(|&i| manifest.objects.get(i as usize)).map(|o| (o.digest, REGION, 0))
}

/// Make every dictionary `manifest` lists known to the decoder (`sources` empty: offline).
pub async fn load(manifest: &Manifest, store: &Store, sources: &[Source]) -> Result<(), DictionaryLoadError> {
    for &index in &manifest.dictionaries {
        let entry = &manifest.objects[index as usize];
        let key = layout::object(&entry.digest);
        if let Some(bytes) = store.get_meta(&entry.digest, REGION, 0)? {
            if accept_dictionary(entry, &bytes).is_ok() {
                continue;
            }
            // Damaged in the cache: fetched again below.
            store.remove_meta(&entry.digest, REGION, 0)?;
        }
        let mut failure = DictionaryLoadError::Unavailable { key: key.clone(), reason: "offline".into() };
        let mut got = None;
        for s in sources {
            match s.get(&key, MAX_DICTIONARY_SIZE).await {
                Ok(bytes) => match accept_dictionary(entry, &bytes) {
                    Ok(_) => {
                        got = Some(bytes);
                        break;
                    }
                    // A source serving wrong bytes: another may serve the right ones.
                    Err(error) => failure = DictionaryLoadError::Bad { key: format!("{key} from {}", s.name()), error },
                },
                Err(e) => failure = DictionaryLoadError::Unavailable { key: key.clone(), reason: e.to_string() },
            }
        }
        let Some(bytes) = got else {
            return Err(failure);
        };
        store.put_meta(&entry.digest, REGION, 0, &bytes)?;
    }
    Ok(())
}
