//! The registry: servers publish their portal under the name the manifest
//! says they provide; the root hands it to the components that use it.
//!
//! Protocol (a call to the registry portal, selector
//! [`crate::REGISTRY_PORTAL`] in every component):
//! - word 0: [`OP_PUBLISH`]; words 1–5: the name, UTF-8, packed
//!   little-endian 8 bytes a word, NUL-padded (at most [`NAME_MAX`] bytes);
//! - one typed item in the caller's UTCB: space object, rights `PT_CALL`,
//!   count 1, source = the server's portal selector, destination =
//!   [`slot`]`(index)` = `SLOT_BASE + index`, where `index` is the
//!   component's place in the manifest (the root passes it as `index=N` in
//!   the component's arguments);
//! - reply word 0: one of the `REPLY_*` codes.
//!
//! The root's registry handler receives into the window
//! `SLOT_BASE..SLOT_BASE + MAX_COMPONENTS`, accepts only an item that landed
//! in the caller's own slot and revokes anything else that arrived, so no
//! component can fill another's slot. One component publishes one portal
//! (it can serve several operations through it).
//!
//! The [`Board`] is what the registry handler EC and the root's main EC
//! share: which component instance is current, and which slots hold a
//! published portal. Lock-free, so neither waits for the other.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::manifest::MAX_COMPONENTS;

pub const OP_PUBLISH: u64 = 1;
pub const NAME_MAX: usize = 40;
/// The root's object selectors that receive published portals.
pub const SLOT_BASE: u64 = 4096;

pub const REPLY_OK: u64 = 0;
/// Unknown operation, or a name that is not packed right.
pub const REPLY_BAD_REQUEST: u64 = 1;
/// The manifest does not say the caller provides this name.
pub const REPLY_NOT_PROVIDER: u64 = 2;
/// The caller already published its portal (this instance).
pub const REPLY_ALREADY_PUBLISHED: u64 = 3;
/// No capability arrived in the caller's slot.
pub const REPLY_NO_PORTAL: u64 = 4;
/// The call came from an instance of the component the root has destroyed.
pub const REPLY_STALE: u64 = 5;

/// The root selector of component `index`'s published portal.
pub const fn slot(index: usize) -> u64 {
    SLOT_BASE + index as u64
}

/// The window the registry handler receives into.
pub const WINDOW: (u64, u64) = (SLOT_BASE, MAX_COMPONENTS as u64);

/// A name read from message words 1–5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Name {
    bytes: [u8; NAME_MAX],
    len: usize,
}

impl Name {
    /// The name packed in `words[1..6]`: non-empty UTF-8, NUL-padded with
    /// nothing after the first NUL.
    pub fn unpack(words: &[u64; 6]) -> Option<Name> {
        let mut bytes = [0u8; NAME_MAX];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(&words[1..]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(NAME_MAX);
        let padded = bytes[len..].iter().all(|&b| b == 0);
        let name = Name { bytes, len };
        (len > 0 && padded && core::str::from_utf8(&bytes[..len]).is_ok()).then_some(name)
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

/// Which instance of a component a portal into the root belongs to:
/// `index` in the manifest, `generation` counting its starts from 1. Both
/// travel as the portal id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instance {
    pub index: usize,
    pub generation: u64,
}

impl Instance {
    const INDEX_BITS: u32 = 16;

    pub fn portal_id(self) -> u64 {
        self.generation << Self::INDEX_BITS | self.index as u64
    }

    pub fn from_portal_id(id: u64) -> Instance {
        Instance {
            index: (id & ((1 << Self::INDEX_BITS) - 1)) as usize,
            generation: id >> Self::INDEX_BITS,
        }
    }
}

/// What the root's ECs share about running components and publications.
pub struct Board {
    /// The running instance's generation per component; 0: none runs.
    generations: [AtomicU64; MAX_COMPONENTS],
    /// Per component: 0, or the number of its current publication.
    published: [AtomicU64; MAX_COMPONENTS],
    publications: AtomicU64,
}

impl Default for Board {
    fn default() -> Self {
        Self::new()
    }
}

impl Board {
    pub const fn new() -> Self {
        Self {
            generations: [const { AtomicU64::new(0) }; MAX_COMPONENTS],
            published: [const { AtomicU64::new(0) }; MAX_COMPONENTS],
            publications: AtomicU64::new(0),
        }
    }

    /// Main EC: `instance` is starting; earlier publications are gone.
    pub fn start(&self, instance: Instance) {
        if let Some(slot) = self.published.get(instance.index) {
            slot.store(0, Ordering::Release);
        }
        if let Some(generation) = self.generations.get(instance.index) {
            generation.store(instance.generation, Ordering::Release);
        }
    }

    /// Main EC: component `index` is destroyed.
    pub fn stop(&self, index: usize) {
        if let Some(generation) = self.generations.get(index) {
            generation.store(0, Ordering::Release);
        }
        if let Some(slot) = self.published.get(index) {
            slot.store(0, Ordering::Release);
        }
    }

    pub fn is_current(&self, instance: Instance) -> bool {
        instance.generation != 0
            && self
                .generations
                .get(instance.index)
                .is_some_and(|g| g.load(Ordering::Acquire) == instance.generation)
    }

    /// Registry handler: `instance` published its portal; returns the
    /// publication's number, or `None` if the instance is no longer current
    /// (the main EC destroyed it meanwhile, so its slot is empty again).
    pub fn publish(&self, instance: Instance) -> Option<u64> {
        let slot = self.published.get(instance.index)?;
        let number = self.publications.fetch_add(1, Ordering::AcqRel) + 1;
        slot.store(number, Ordering::Release);
        if self.is_current(instance) {
            Some(number)
        } else {
            // A new instance's `start` comes before any publication of its
            // own (they pass through the same handler EC), so this clears
            // only the stale one.
            slot.store(0, Ordering::Release);
            None
        }
    }

    /// 0, or the number of `index`'s current publication.
    pub fn publication(&self, index: usize) -> u64 {
        self.published
            .get(index)
            .map_or(0, |slot| slot.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(name: &[u8]) -> [u64; 6] {
        let mut words = [OP_PUBLISH, 0, 0, 0, 0, 0];
        for (i, chunk) in name.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            words[1 + i] = u64::from_le_bytes(word);
        }
        words
    }

    #[test]
    fn names_unpack() {
        let words = [OP_PUBLISH, u64::from_le_bytes(*b"echo\0\0\0\0"), 0, 0, 0, 0];
        assert_eq!(Name::unpack(&words).unwrap().as_str(), "echo");
        let long = b"a-name-that-is-exactly-forty-bytes-long!";
        assert_eq!(Name::unpack(&pack(long)).unwrap().as_str().as_bytes(), long);
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(Name::unpack(&[OP_PUBLISH, 0, 0, 0, 0, 0]), None);
        // Bytes after the terminating NUL.
        assert_eq!(Name::unpack(&pack(b"ab\0cd")), None);
        assert_eq!(Name::unpack(&pack(&[0xff, 0xfe])), None);
    }

    #[test]
    fn portal_ids_round_trip() {
        let instance = Instance {
            index: 63,
            generation: 7,
        };
        assert_eq!(Instance::from_portal_id(instance.portal_id()), instance);
    }

    #[test]
    fn board_tracks_instances_and_publications() {
        let board = Board::new();
        let first = Instance {
            index: 3,
            generation: 1,
        };
        assert!(!board.is_current(first));
        board.start(first);
        assert!(board.is_current(first));
        assert_eq!(board.publication(3), 0);
        let n = board.publish(first).unwrap();
        assert_eq!(board.publication(3), n);
        board.stop(3);
        assert_eq!(board.publish(first), None);
        assert!(!board.is_current(first));
        assert_eq!(board.publication(3), 0);
        let second = Instance {
            index: 3,
            generation: 2,
        };
        board.start(second);
        assert!(!board.is_current(first));
        // A late publication of the old instance is dropped.
        assert_eq!(board.publish(first), None);
        assert_eq!(board.publication(3), 0);
        assert!(board.publish(second).unwrap() > n);
        assert_eq!(board.publication(99), 0);
        assert!(!board.is_current(Instance {
            index: 99,
            generation: 1
        }));
    }
}
