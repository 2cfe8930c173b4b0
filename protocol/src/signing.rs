//! Message authenticity between coordinators and workers (docs/security.md, "The
//! broker").
//!
//! With `TASKER_MESSAGE_KEY` set, every step, result, notice and control message carries
//! [`SIGNATURE_HEADER`]: `v1=` and the hex HMAC-SHA256 of its body under that key. A
//! receiver accepts a message whose signature verifies under its key or under
//! `TASKER_MESSAGE_KEY_PREVIOUS` (so keys can be rotated without a stop: give every
//! process the new key with the old one as previous, then drop the previous). A step or
//! result that does not verify is dead-lettered with reason `bad_signature`; a control
//! message is dropped and counted. Without a key nothing is signed or checked.

use std::fmt;

use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, FieldTable};
use sha2::Sha256;

/// The header carrying a message's signature.
pub const SIGNATURE_HEADER: &str = "x-tasker-signature";
/// Shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// The reason a message that does not verify is dead-lettered with.
pub const BAD_SIGNATURE: &str = "bad_signature";

type HmacSha256 = Hmac<Sha256>;

/// The keys a process signs with and accepts.
#[derive(Clone, Default)]
pub struct MessageKeys {
    current: Option<Vec<u8>>,
    previous: Option<Vec<u8>>,
}

impl fmt::Debug for MessageKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageKeys")
            .field("current", &self.current.as_ref().map(|_| "***"))
            .field("previous", &self.previous.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSignature {
    /// No signature header.
    #[error("the message is not signed ({SIGNATURE_HEADER} missing)")]
    Missing,
    /// A signature that none of the keys produces.
    #[error(
        "the message's signature does not verify with TASKER_MESSAGE_KEY or TASKER_MESSAGE_KEY_PREVIOUS"
    )]
    Mismatch,
}

impl MessageKeys {
    /// Keys from the settings' values (empty counts as unset).
    ///
    /// # Errors
    ///
    /// A key shorter than [`MIN_KEY_BYTES`], or a previous key without a current one.
    pub fn new(current: Option<&str>, previous: Option<&str>) -> Result<Self, String> {
        let read = |name: &str, value: Option<&str>| -> Result<Option<Vec<u8>>, String> {
            match value.map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(key) if key.len() < MIN_KEY_BYTES => Err(format!(
                    "{name} must be at least {MIN_KEY_BYTES} bytes (it has {}); use e.g. `openssl rand -hex 32`",
                    key.len()
                )),
                Some(key) => Ok(Some(key.as_bytes().to_vec())),
            }
        };
        let current = read("TASKER_MESSAGE_KEY", current)?;
        let previous = read("TASKER_MESSAGE_KEY_PREVIOUS", previous)?;
        if current.is_none() && previous.is_some() {
            return Err(
                "TASKER_MESSAGE_KEY_PREVIOUS is set but TASKER_MESSAGE_KEY is not".to_owned(),
            );
        }
        Ok(MessageKeys { current, previous })
    }

    /// Whether messages are signed and checked.
    pub fn enabled(&self) -> bool {
        self.current.is_some()
    }

    fn mac(key: &[u8], body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(body);
        mac
    }

    /// `headers` with the signature of `body` added (unchanged without a key).
    pub fn sign(&self, body: &[u8], mut headers: FieldTable) -> FieldTable {
        if let Some(key) = &self.current {
            let tag = Self::mac(key, body).finalize().into_bytes();
            let value = format!("v1={}", hex::encode(tag));
            headers.insert(SIGNATURE_HEADER.into(), AMQPValue::LongString(value.into()));
        }
        headers
    }

    /// Whether `body` with these headers verifies (always, without a key).
    ///
    /// # Errors
    ///
    /// Why it does not.
    pub fn verify(&self, body: &[u8], headers: Option<&FieldTable>) -> Result<(), BadSignature> {
        let Some(current) = &self.current else {
            return Ok(());
        };
        let value = headers
            .and_then(|h| h.inner().get(SIGNATURE_HEADER))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(s.to_string()),
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            })
            .ok_or(BadSignature::Missing)?;
        let tag = value
            .strip_prefix("v1=")
            .and_then(|text| hex::decode(text).ok())
            .ok_or(BadSignature::Mismatch)?;
        for key in std::iter::once(current).chain(&self.previous) {
            // verify_slice compares in constant time.
            if Self::mac(key, body).verify_slice(&tag).is_ok() {
                return Ok(());
            }
        }
        Err(BadSignature::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a-key-of-thirty-two-bytes-or-more-000";
    const B: &str = "b-key-of-thirty-two-bytes-or-more-111";

    #[test]
    fn signed_messages_verify_and_tampered_ones_do_not() {
        let keys = MessageKeys::new(Some(A), None).unwrap();
        let headers = keys.sign(b"{\"n\":1}", FieldTable::default());
        assert_eq!(keys.verify(b"{\"n\":1}", Some(&headers)), Ok(()));
        assert_eq!(
            keys.verify(b"{\"n\":2}", Some(&headers)),
            Err(BadSignature::Mismatch)
        );
        assert_eq!(keys.verify(b"{\"n\":1}", None), Err(BadSignature::Missing));
        let other = MessageKeys::new(Some(B), None).unwrap();
        assert_eq!(
            other.verify(b"{\"n\":1}", Some(&headers)),
            Err(BadSignature::Mismatch)
        );
    }

    #[test]
    fn a_previous_key_is_accepted_during_a_rotation() {
        let old = MessageKeys::new(Some(A), None).unwrap();
        let rotating = MessageKeys::new(Some(B), Some(A)).unwrap();
        let headers = old.sign(b"body", FieldTable::default());
        assert_eq!(rotating.verify(b"body", Some(&headers)), Ok(()));
        // What the rotating process signs, the old one cannot read: roll the new key
        // out everywhere (as previous-aware) before anyone signs with it only.
        let new_headers = rotating.sign(b"body", FieldTable::default());
        assert!(old.verify(b"body", Some(&new_headers)).is_err());
    }

    #[test]
    fn without_a_key_nothing_is_signed_or_checked() {
        let none = MessageKeys::new(None, None).unwrap();
        assert!(!none.enabled());
        assert!(none.sign(b"x", FieldTable::default()).inner().is_empty());
        assert_eq!(none.verify(b"x", None), Ok(()));
    }

    #[test]
    fn short_or_orphan_keys_are_refused() {
        assert!(
            MessageKeys::new(Some("short"), None)
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(
            MessageKeys::new(None, Some(A))
                .unwrap_err()
                .contains("TASKER_MESSAGE_KEY is not")
        );
        assert!(!MessageKeys::new(Some(""), None).unwrap().enabled());
    }
}
