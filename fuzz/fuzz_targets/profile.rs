//! Access profiles, published unsigned beside the manifest.
#![no_main]
use incfs_format::profile::Profile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Profile::parse(data) {
        let again = Profile::parse(p.encode().as_bytes()).expect("an encoded profile parses");
        assert_eq!(again, p);
        let _ = p.paths();
    }
});
