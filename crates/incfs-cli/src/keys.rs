//! Key files: `incfs keygen`, and loading keys given on the command line.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use incfs_sign::{KeyAlgorithm, PublicKey, SigningKey, TrustedKeys};

fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<()> {
    let mut o = OpenOptions::new();
    o.write(true).mode(mode);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(path).with_context(|| {
        if path.exists() && !force {
            format!("{} already exists (use --force to replace it)", path.display())
        } else {
            format!("cannot create {}", path.display())
        }
    })?;
    // An existing file keeps its mode through open(): a private key replaced with --force must
    // end up `mode` all the same.
    f.set_permissions(std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

pub fn keygen(alg: KeyAlgorithm, out: &Path, force: bool) -> Result<i32> {
    let key = SigningKey::generate(alg)?;
    let private = with_suffix(out, ".pem");
    let public = with_suffix(out, ".pub.pem");
    write_new(&private, key.to_pem().as_bytes(), 0o600, force)?;
    write_new(&public, key.public_key().to_pem().as_bytes(), 0o644, force)?;
    println!("private key: {} (keep it secret)", private.display());
    println!("public key:  {} (give it to clients: --trust)", public.display());
    println!("key id:      {}", key.public_key().id_hex());
    Ok(0)
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("cannot read key {}", path.display()))?;
    SigningKey::from_pem(&pem).with_context(|| format!("{}", path.display()))
}

pub fn load_trusted(paths: &[PathBuf]) -> Result<TrustedKeys> {
    if paths.is_empty() {
        bail!("no trusted key given; pass the publisher's public key with --trust PUB.pem");
    }
    let keys = paths
        .iter()
        .map(|p| {
            let pem = std::fs::read_to_string(p).with_context(|| format!("cannot read key {}", p.display()))?;
            PublicKey::from_pem(&pem).with_context(|| format!("{}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TrustedKeys::new(keys))
}
