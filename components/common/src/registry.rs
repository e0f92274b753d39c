//! The root task's registry of named portals, as a component speaks to it.
//!
//! A server publishes a portal with a call to the registry portal
//! ([`crate::sel::REGISTRY`]): word 0 is [`OP_PUBLISH`], words 1..5 the name
//! packed little-endian (at most [`NAME_MAX`] bytes, NUL-padded), and one
//! typed item in the UTCB delegating the portal (`PT_CALL`) into the root's
//! slot for this component. Only this module knows the layout, so a change
//! of the root task's protocol is a change here.

use moat_abi::{rights, Space, TypedItem};

pub const OP_PUBLISH: u64 = 1;
/// Name bytes that fit in message words 1..5.
pub const NAME_MAX: usize = 40;
/// The root task's object selectors that receive published portals:
/// `SLOT_BASE + index`, the index being the component's place in the
/// manifest (passed as `index=N`).
pub const SLOT_BASE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong,
}

/// The six message words of a publish call for `name`.
pub fn publish_words(name: &str) -> Result<[u64; 6], NameError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    let mut words = [OP_PUBLISH, 0, 0, 0, 0, 0];
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        words[1 + i] = u64::from_le_bytes(word);
    }
    Ok(words)
}

/// The name packed by [`publish_words`], as the root task reads it back.
pub fn unpack_name(words: &[u64; 6]) -> ([u8; NAME_MAX], usize) {
    let mut bytes = [0u8; NAME_MAX];
    for (i, word) in words[1..].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(NAME_MAX);
    (bytes, len)
}

/// The typed item that hands `portal` to the root task for component `index`.
pub fn publish_item(portal: u64, index: u64) -> TypedItem {
    TypedItem {
        space: Space::Object,
        rights: rights::PT_CALL,
        count: 1,
        source: portal,
        destination: SLOT_BASE + index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pack_little_endian_and_round_trip() {
        let words = publish_words("echo").unwrap();
        assert_eq!(words[0], OP_PUBLISH);
        assert_eq!(words[1], u64::from_le_bytes(*b"echo\0\0\0\0"));
        assert_eq!(&words[2..], &[0; 4]);
        let long = "a-name-that-is-exactly-forty-bytes-long!";
        assert_eq!(long.len(), NAME_MAX);
        let (bytes, len) = unpack_name(&publish_words(long).unwrap());
        assert_eq!(&bytes[..len], long.as_bytes());
        let (bytes, len) = unpack_name(&words);
        assert_eq!(&bytes[..len], b"echo");
    }

    #[test]
    fn bad_names() {
        assert_eq!(publish_words(""), Err(NameError::Empty));
        assert_eq!(publish_words(&"x".repeat(41)), Err(NameError::TooLong));
    }

    #[test]
    fn item_delegates_the_portal_into_the_slot() {
        let item = publish_item(17, 3);
        assert_eq!(item.space, Space::Object);
        assert_eq!(item.rights, rights::PT_CALL);
        assert_eq!((item.count, item.source, item.destination), (1, 17, 4099));
        assert_eq!(TypedItem::decode(item.encode()), Some(item));
    }
}
