//! API keys: random, shown once, kept only as a SHA-256 digest.

use std::fmt;

use farthing_payments::KeyHash;
use sha2::{Digest, Sha256};

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// A fresh API key: a kind prefix and 32 random bytes in hex.
    pub fn generate_api_key(kind: &str) -> Secret {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random source works");
        Secret(format!("fk_{kind}_{}", hex(&bytes)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest under which the key is stored and looked up.
    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 15)] as char);
    }
    out
}

/// SHA-256 of `parts`, each length-prefixed so that no two sequences collide.
pub fn fingerprint(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let secret = Secret::generate_api_key("mer");
        assert!(!format!("{secret:?}").contains(secret.expose()));
        assert!(secret.expose().starts_with("fk_mer_"));
        assert_eq!(secret.expose().len(), "fk_mer_".len() + 64);
    }

    #[test]
    fn two_generated_keys_differ_and_hash_differently() {
        let a = Secret::generate_api_key("pyr");
        let b = Secret::generate_api_key("pyr");
        assert_ne!(a, b);
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), Secret::new(a.expose().to_string()).hash());
    }
}
