//! A manifest file as a server sends it: envelope, body, structural validation. The signature
//! is not checked here (it is over these very bytes; what matters is that no input panics,
//! aborts or allocates by an unchecked length).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = incfs_format::wire::open_envelope(data) {
        if let Ok(m) = incfs_format::wire::decode(&env) {
            if m.validate().is_ok() {
                // A valid manifest must be navigable without panics.
                let _ = m.walk();
                let _ = m.link_counts();
                let _ = m.resolve(b"a/b/c");
                // And encode again, as pack does.
                let _ = incfs_format::wire::encode_signed_part(&m);
            }
        }
    }
});
