//! Data encryption keys and the random identifiers that name them.

use std::fmt;

use aws_lc_rs::{hkdf, rand};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::CryptoError;

/// Fills a fresh 16-byte identifier from the system CSPRNG.
pub fn random_id() -> Result<[u8; 16], CryptoError> {
    let mut id = [0u8; 16];
    rand::fill(&mut id).map_err(|_| CryptoError::Library("random id"))?;
    Ok(id)
}

macro_rules! id_type {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A new random identifier.
            pub fn random() -> Result<Self, CryptoError> {
                random_id().map(Self)
            }
            /// Lower-case hex, as shown by `atrest inspect`.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

id_type!(
    FileId,
    "Names one atrest file for its whole life; bound into every unit's AAD."
);
id_type!(
    DekId,
    "Names one data encryption key; bound into every unit's AAD and the header."
);

/// A 256-bit data encryption key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Dek {
    id: DekIdBytes,
    bytes: [u8; 32],
}

// DekId is Copy and holds no secret; wrap it so the derive sees Zeroize.
#[derive(Clone, Copy, Zeroize)]
struct DekIdBytes([u8; 16]);

impl Dek {
    /// A fresh random key with a fresh id.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes).map_err(|_| CryptoError::Library("random key"))?;
        Ok(Self {
            id: DekIdBytes(random_id()?),
            bytes,
        })
    }

    /// Rebuilds a key from its id and raw bytes (after unwrapping).
    pub fn from_parts(id: DekId, bytes: &[u8; 32]) -> Self {
        Self {
            id: DekIdBytes(id.0),
            bytes: *bytes,
        }
    }

    pub fn id(&self) -> DekId {
        DekId(self.id.0)
    }

    /// The raw key. Only for handing to a cipher or a key wrap.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Derives a 256-bit subkey for one purpose (HKDF-SHA256, RFC 5869).
    /// `label` separates purposes; the DEK id is the salt.
    pub fn derive(&self, label: &[u8]) -> Result<[u8; 32], CryptoError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &self.id.0).extract(&self.bytes);
        let info = [label];
        let okm = prk
            .expand(&info, Len32)
            .map_err(|_| CryptoError::Library("hkdf"))?;
        let mut out = [0u8; 32];
        okm.fill(&mut out)
            .map_err(|_| CryptoError::Library("hkdf"))?;
        Ok(out)
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dek({}, <redacted>)", hex::encode(self.id.0))
    }
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let dek = Dek::generate().unwrap();
        let shown = format!("{dek:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&hex::encode(dek.expose_secret())));
    }

    #[test]
    fn derivation_separates_labels_and_keys() {
        let a = Dek::generate().unwrap();
        let b = Dek::generate().unwrap();
        assert_ne!(a.derive(b"x").unwrap(), a.derive(b"y").unwrap());
        assert_ne!(a.derive(b"x").unwrap(), b.derive(b"x").unwrap());
        assert_eq!(a.derive(b"x").unwrap(), a.derive(b"x").unwrap());
    }

    #[test]
    fn generated_keys_differ() {
        let a = Dek::generate().unwrap();
        let b = Dek::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.id(), b.id());
    }
}
