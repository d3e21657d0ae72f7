//! base64url (no padding) as Azure uses it for key material and payloads.
//! Decoding is lenient about padding and also accepts standard base64,
//! because SDKs differ in what they send.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn decode(s: &str) -> Option<Vec<u8>> {
    let trimmed = s.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(trimmed)
        .ok()
        .or_else(|| STANDARD.decode(s).ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn roundtrip_and_reject() {
        let v = vec![0xfbu8, 0xff, 0x00, 0x10];
        let s = super::encode(&v);
        assert!(!s.contains('='));
        assert_eq!(super::decode(&s).unwrap(), v);
        assert_eq!(super::decode("+/8AEA==").unwrap(), v);
        assert!(super::decode("not base64!").is_none());
    }
}
