//! Publisher keys and manifest signatures.
//!
//! Keys are read and written in the PEM formats `openssl` uses: PKCS#8 (`PRIVATE KEY`) and
//! SubjectPublicKeyInfo (`PUBLIC KEY`); the older `EC PRIVATE KEY` (SEC1) and `RSA PRIVATE KEY` /
//! `RSA PUBLIC KEY` (PKCS#1) forms are read too. Three algorithms are supported:
//!
//! | key         | signature                         | deterministic |
//! |-------------|-----------------------------------|---------------|
//! | Ed25519     | Ed25519 (RFC 8032)                | yes           |
//! | ECDSA P-256 | ECDSA SHA-256, DER, RFC 6979 nonce | yes           |
//! | RSA 2048-4096 | RSASSA-PKCS1-v1_5 SHA-256       | yes           |
//!
//! Every scheme is deterministic so that packing the same tree with the same key gives a
//! byte-identical repository. The signatures are the standard ones, so `openssl` can check a
//! manifest on its own (see `docs/format.md`). A key is identified by the SHA-256 of its
//! SubjectPublicKeyInfo DER encoding, which the manifest records next to the signature.

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use incfs_format::wire::{Envelope, SignatureAlgorithm};
use incfs_format::Hash;
use p256::ecdsa::signature::{Signer, Verifier};
use rand_core::OsRng;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256};

const OID_ED25519: &str = "1.3.101.112";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// Smallest and largest RSA modulus accepted, in bits.
pub const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM key file: {0}")]
    Pem(String),
    #[error("PEM block '{0}' is not a key incfs reads (expected PRIVATE KEY or PUBLIC KEY)")]
    Label(String),
    #[error("this is a public key; signing needs the private key (the NAME.pem from incfs keygen, not NAME.pub.pem)")]
    PublicNotPrivate,
    #[error("the private key is encrypted; decrypt it first: openssl pkey -in KEY.pem -out PLAIN.pem")]
    Encrypted,
    #[error("key algorithm {0} is not supported; use Ed25519, ECDSA P-256 or RSA 2048-4096")]
    Algorithm(String),
    #[error("RSA key has {0} bits; use 2048 to 4096 bits")]
    RsaSize(usize),
    #[error("malformed {what} key: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// Why a signature was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("manifest is signed by key {signer}, which is not among the trusted keys ({trusted}); pass the publisher's public key with --trust")]
    UnknownKey { signer: String, trusted: String },
    #[error("manifest signature uses {found} but the trusted key {key} is an {expected} key")]
    AlgorithmMismatch { found: &'static str, expected: &'static str, key: String },
    #[error("manifest signature is invalid: the manifest was altered or signed by another key")]
    Invalid,
}

/// Key types `incfs keygen` can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Ed25519,
    EcdsaP256,
    Rsa3072,
}

#[derive(Clone)]
enum Secret {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

/// A publisher's private key.
#[derive(Clone)]
pub struct SigningKey(Secret);

#[derive(Clone, PartialEq, Eq)]
enum Public {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
    Rsa(Box<rsa::RsaPublicKey>),
}

/// A public key that manifests can be checked against.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: Public,
    id: Hash,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({} {})", self.algorithm().name(), self.id_hex())
    }
}

fn malformed(what: &'static str) -> impl Fn(String) -> KeyError {
    move |reason| KeyError::Malformed { what, reason }
}

fn split_pem(pem: &str) -> Result<(String, Vec<u8>), KeyError> {
    let (label, der) = pem_rfc7468::decode_vec(pem.trim().as_bytes()).map_err(|e| KeyError::Pem(e.to_string()))?;
    Ok((label.to_string(), der))
}

fn check_rsa_bits(bits: usize) -> Result<(), KeyError> {
    if RSA_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(KeyError::RsaSize(bits))
    }
}

use rsa::pkcs8::der;
use rsa::pkcs8::spki::der::pem as pem_rfc7468;

impl SigningKey {
    /// Generate a new key.
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, KeyError> {
        Ok(SigningKey(match alg {
            KeyAlgorithm::Ed25519 => Secret::Ed25519(ed25519_dalek::SigningKey::generate(&mut OsRng)),
            KeyAlgorithm::EcdsaP256 => Secret::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            KeyAlgorithm::Rsa3072 => Secret::Rsa(Box::new(
                rsa::RsaPrivateKey::new(&mut OsRng, 3072).map_err(|e| KeyError::Generate(e.to_string()))?,
            )),
        }))
    }

    /// Read a private key from PEM (PKCS#8, SEC1 EC or PKCS#1 RSA).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, der) = split_pem(pem)?;
        match label.as_str() {
            "PRIVATE KEY" => Self::from_pkcs8_der(&der),
            "ENCRYPTED PRIVATE KEY" => Err(KeyError::Encrypted),
            "EC PRIVATE KEY" => {
                let sk = p256::SecretKey::from_sec1_der(&der).map_err(|e| malformed("EC P-256")(e.to_string()))?;
                Ok(SigningKey(Secret::P256(sk.into())))
            }
            "RSA PRIVATE KEY" => {
                let k = rsa::RsaPrivateKey::from_pkcs1_der(&der).map_err(|e| malformed("RSA")(e.to_string()))?;
                check_rsa_bits(k.size() * 8)?;
                Ok(SigningKey(Secret::Rsa(Box::new(k))))
            }
            "PUBLIC KEY" | "RSA PUBLIC KEY" => Err(KeyError::PublicNotPrivate),
            other => Err(KeyError::Label(other.to_string())),
        }
    }

    fn from_pkcs8_der(der_bytes: &[u8]) -> Result<Self, KeyError> {
        use der::Decode;
        let info = rsa::pkcs8::PrivateKeyInfo::from_der(der_bytes).map_err(|e| malformed("PKCS#8")(e.to_string()))?;
        let oid = info.algorithm.oid.to_string();
        match oid.as_str() {
            OID_ED25519 => ed25519_dalek::SigningKey::from_pkcs8_der(der_bytes)
                .map(|k| SigningKey(Secret::Ed25519(k)))
                .map_err(|e| malformed("Ed25519")(e.to_string())),
            OID_EC => {
                let curve = info.algorithm.parameters_oid().map(|o| o.to_string()).unwrap_or_default();
                if curve != OID_P256 {
                    return Err(KeyError::Algorithm(format!("EC on curve {curve}")));
                }
                p256::SecretKey::from_pkcs8_der(der_bytes)
                    .map(|k| SigningKey(Secret::P256(k.into())))
                    .map_err(|e| malformed("EC P-256")(e.to_string()))
            }
            OID_RSA => {
                let k = rsa::RsaPrivateKey::from_pkcs8_der(der_bytes).map_err(|e| malformed("RSA")(e.to_string()))?;
                check_rsa_bits(k.size() * 8)?;
                Ok(SigningKey(Secret::Rsa(Box::new(k))))
            }
            other => Err(KeyError::Algorithm(other.to_string())),
        }
    }

    /// The key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn to_pem(&self) -> String {
        let le = rsa::pkcs8::LineEnding::LF;
        let pem = match &self.0 {
            // PKCS#8 v1 (no embedded public key), the form openssl writes and reads.
            Secret::Ed25519(k) => {
                ed25519_dalek::pkcs8::KeypairBytes { secret_key: k.to_bytes(), public_key: None }.to_pkcs8_pem(le)
            }
            Secret::P256(k) => p256::SecretKey::from(k).to_pkcs8_pem(le),
            Secret::Rsa(k) => rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(k.as_ref(), le),
        };
        pem.expect("encoding a valid key cannot fail").to_string()
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::new(match &self.0 {
            Secret::Ed25519(k) => Public::Ed25519(k.verifying_key()),
            Secret::P256(k) => Public::P256(*k.verifying_key()),
            Secret::Rsa(k) => Public::Rsa(Box::new(k.to_public_key())),
        })
    }

    pub fn algorithm(&self) -> SignatureAlgorithm {
        self.public_key().algorithm()
    }

    /// Sign `message` with this key's scheme.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.0 {
            Secret::Ed25519(k) => k.sign(message).to_bytes().to_vec(),
            Secret::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                sig.to_der().as_bytes().to_vec()
            }
            Secret::Rsa(k) => {
                let sk = rsa::pkcs1v15::SigningKey::<Sha256>::new(k.as_ref().clone());
                let sig: rsa::pkcs1v15::Signature = sk.sign(message);
                rsa::signature::SignatureEncoding::to_vec(&sig)
            }
        }
    }
}

impl PublicKey {
    fn new(key: Public) -> Self {
        let der = match &key {
            Public::Ed25519(k) => k.to_public_key_der(),
            Public::P256(k) => k.to_public_key_der(),
            Public::Rsa(k) => rsa::pkcs8::EncodePublicKey::to_public_key_der(k.as_ref()),
        }
        .expect("encoding a valid key cannot fail");
        let id = Sha256::digest(der.as_bytes()).into();
        PublicKey { key, id }
    }

    /// Read a public key from PEM (SubjectPublicKeyInfo or PKCS#1 RSA). A private key is accepted
    /// too, and its public half used.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, der_bytes) = split_pem(pem)?;
        match label.as_str() {
            "PUBLIC KEY" => {
                use der::Decode;
                let info = rsa::pkcs8::spki::SubjectPublicKeyInfoRef::from_der(&der_bytes)
                    .map_err(|e| malformed("public")(e.to_string()))?;
                let oid = info.algorithm.oid.to_string();
                let key = match oid.as_str() {
                    OID_ED25519 => Public::Ed25519(
                        ed25519_dalek::VerifyingKey::from_public_key_der(&der_bytes)
                            .map_err(|e| malformed("Ed25519")(e.to_string()))?,
                    ),
                    OID_EC => {
                        let curve = info.algorithm.parameters_oid().map(|o| o.to_string()).unwrap_or_default();
                        if curve != OID_P256 {
                            return Err(KeyError::Algorithm(format!("EC on curve {curve}")));
                        }
                        Public::P256(
                            p256::ecdsa::VerifyingKey::from_public_key_der(&der_bytes)
                                .map_err(|e| malformed("EC P-256")(e.to_string()))?,
                        )
                    }
                    OID_RSA => {
                        let k = rsa::RsaPublicKey::from_public_key_der(&der_bytes)
                            .map_err(|e| malformed("RSA")(e.to_string()))?;
                        check_rsa_bits(k.size() * 8)?;
                        Public::Rsa(Box::new(k))
                    }
                    other => return Err(KeyError::Algorithm(other.to_string())),
                };
                Ok(PublicKey::new(key))
            }
            "RSA PUBLIC KEY" => {
                let k = rsa::RsaPublicKey::from_pkcs1_der(&der_bytes).map_err(|e| malformed("RSA")(e.to_string()))?;
                check_rsa_bits(k.size() * 8)?;
                Ok(PublicKey::new(Public::Rsa(Box::new(k))))
            }
            _ => SigningKey::from_pem(pem).map(|k| k.public_key()),
        }
    }

    /// The key as SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn to_pem(&self) -> String {
        let le = rsa::pkcs8::LineEnding::LF;
        match &self.key {
            Public::Ed25519(k) => k.to_public_key_pem(le),
            Public::P256(k) => k.to_public_key_pem(le),
            Public::Rsa(k) => rsa::pkcs8::EncodePublicKey::to_public_key_pem(k.as_ref(), le),
        }
        .expect("encoding a valid key cannot fail")
    }

    /// SHA-256 of the SubjectPublicKeyInfo DER: the key id recorded in manifests.
    pub fn id(&self) -> &Hash {
        &self.id
    }

    /// The key id in hex (what error messages and `incfs keygen` print).
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    pub fn algorithm(&self) -> SignatureAlgorithm {
        match self.key {
            Public::Ed25519(_) => SignatureAlgorithm::Ed25519,
            Public::P256(_) => SignatureAlgorithm::EcdsaP256Sha256,
            Public::Rsa(_) => SignatureAlgorithm::RsaPkcs1Sha256,
        }
    }

    /// Check `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let ok = match &self.key {
            Public::Ed25519(k) => ed25519_dalek::Signature::from_slice(signature)
                .map(|s| k.verify_strict(message, &s).is_ok())
                .unwrap_or(false),
            Public::P256(k) => {
                p256::ecdsa::Signature::from_der(signature).map(|s| k.verify(message, &s).is_ok()).unwrap_or(false)
            }
            Public::Rsa(k) => rsa::pkcs1v15::Signature::try_from(signature)
                .map(|s| rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k.as_ref().clone()).verify(message, &s).is_ok())
                .unwrap_or(false),
        };
        if ok {
            Ok(())
        } else {
            Err(SignatureError::Invalid)
        }
    }
}

/// The set of publisher keys a client trusts.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        TrustedKeys(keys)
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }

    /// The trusted key under which `signature` over `message` verifies, if any (for signatures
    /// that do not name their key, like those of files pushed into a mount).
    pub fn verify_any(&self, message: &[u8], signature: &[u8]) -> Option<&PublicKey> {
        self.0.iter().find(|k| k.verify(message, signature).is_ok())
    }

    /// Check a manifest's signature: the signer must be trusted, use its key's scheme, and the
    /// signature must cover the header and body exactly. Returns the key that signed.
    pub fn verify(&self, env: &Envelope<'_>) -> Result<&PublicKey, SignatureError> {
        let key = self.0.iter().find(|k| k.id == env.key_id).ok_or_else(|| SignatureError::UnknownKey {
            signer: hex::encode(env.key_id),
            trusted: self.0.iter().map(|k| k.id_hex()).collect::<Vec<_>>().join(", "),
        })?;
        if key.algorithm() != env.algorithm {
            return Err(SignatureError::AlgorithmMismatch {
                found: env.algorithm.name(),
                expected: key.algorithm().name(),
                key: key.id_hex(),
            });
        }
        key.verify(env.signed, env.signature)?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_deterministically_and_round_trips_pem() {
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa3072] {
            let sk = SigningKey::generate(alg).unwrap();
            let again = SigningKey::from_pem(&sk.to_pem()).unwrap();
            let pk = PublicKey::from_pem(&sk.public_key().to_pem()).unwrap();
            assert_eq!(pk, sk.public_key());
            assert_eq!(PublicKey::from_pem(&sk.to_pem()).unwrap(), pk, "private PEM gives its public half");
            let s1 = sk.sign(b"message");
            assert_eq!(s1, again.sign(b"message"), "{alg:?} must be deterministic");
            pk.verify(b"message", &s1).unwrap();
            assert_eq!(pk.verify(b"messagE", &s1), Err(SignatureError::Invalid));
            let mut bad = s1.clone();
            let n = bad.len() / 2;
            bad[n] ^= 1;
            assert_eq!(pk.verify(b"message", &bad), Err(SignatureError::Invalid));
        }
    }

    #[test]
    fn non_keys_are_rejected_with_reasons() {
        assert!(matches!(SigningKey::from_pem("hello"), Err(KeyError::Pem(_))));
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(SigningKey::from_pem(cert), Err(KeyError::Label(_))));
        let pk = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().public_key().to_pem();
        assert!(matches!(SigningKey::from_pem(&pk), Err(KeyError::PublicNotPrivate)));
    }
}
