//! Capability spaces and the derivation tree between them.
//!
//! A protection domain owns several spaces (objects, memory, I/O ports); each
//! is a map from a `u64` key to a slot holding a [`Capability`]. Every
//! capability is either a root, made when its object was created, or was
//! delegated from another slot and is that slot's child. Revoking a slot
//! removes everything derived from it, in whatever space it lives.
//!
//! Slots live in one arena of nodes (grown a chunk at a time, so growing
//! never copies them) linked into the derivation tree by
//! indices (parent, first child, previous and next sibling), so unlinking is
//! O(1) and revocation is an iterative post-order walk: no recursion, however
//! deep the tree. A delegation always creates a new slot, so the tree cannot
//! have a cycle.
//!
//! Space quotas are the kernel's allocation limit: a space never holds more
//! than the `limit` it was created with. Growing the arena or the space table
//! reports [`CapError::OutOfMemory`] instead of aborting; a B-tree insertion
//! that cannot allocate still goes to the global allocator's error handler.
//!
//! Space ids are reused after [`CapSystem::destroy_space`], so a holder of a
//! [`SlotRef`] must not outlive the space it names.

use crate::chunked::Chunked;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use core::num::NonZeroU32;
use core::ops::Range;

use bitflags::bitflags;

pub type SpaceId = u32;

/// A slot: a key in one space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotRef {
    pub space: SpaceId,
    pub key: u64,
}

impl SlotRef {
    pub const fn new(space: SpaceId, key: u64) -> Self {
        Self { space, key }
    }
}

impl fmt::Display for SlotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "space {} slot {:#x}", self.space, self.key)
    }
}

bitflags! {
    /// Eight generic permission bits; each object type names its own.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Rights: u8 {
        const ALL = u8::MAX;
    }
}

impl Rights {
    pub const NONE: Self = Self::empty();

    pub const fn is_subset_of(self, other: Self) -> bool {
        self.bits() & !other.bits() == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability<T> {
    pub object: T,
    pub rights: Rights,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// No space has this id.
    NoSpace(SpaceId),
    /// The slot holds no capability.
    Empty(SlotRef),
    /// The slot already holds a capability.
    Occupied(SlotRef),
    /// The space holds as many slots as its limit allows.
    SpaceFull(SpaceId),
    InsufficientRights {
        have: Rights,
        need: Rights,
    },
    /// The capability would carry no rights at all.
    NoRights,
    /// Every space id is in use.
    TooManySpaces,
    /// The node arena or the space table could not grow.
    OutOfMemory,
}

impl fmt::Display for CapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoSpace(space) => write!(f, "no capability space {space}"),
            Self::Empty(at) => write!(f, "{at} is empty"),
            Self::Occupied(at) => write!(f, "{at} is already occupied"),
            Self::SpaceFull(space) => {
                write!(f, "capability space {space} is at its slot limit")
            }
            Self::InsufficientRights { have, need } => write!(
                f,
                "capability has rights {:#04x}, the operation needs {:#04x}",
                have.bits(),
                need.bits()
            ),
            Self::NoRights => write!(f, "a capability with no rights cannot be made"),
            Self::TooManySpaces => write!(f, "every capability space id is in use"),
            Self::OutOfMemory => write!(f, "out of memory for capability bookkeeping"),
        }
    }
}

/// Index into the node arena, stored as index + 1 so `Option<NodeIndex>` is
/// four bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NodeIndex(NonZeroU32);

impl NodeIndex {
    fn from_usize(index: usize) -> Option<Self> {
        let plus_one = u32::try_from(index.checked_add(1)?).ok()?;
        NonZeroU32::new(plus_one).map(Self)
    }

    fn get(self) -> usize {
        // u32 always fits in usize on the 64-bit targets this kernel supports.
        (self.0.get() - 1) as usize
    }
}

struct Node<T> {
    slot: SlotRef,
    cap: Capability<T>,
    parent: Option<NodeIndex>,
    first_child: Option<NodeIndex>,
    prev_sibling: Option<NodeIndex>,
    next_sibling: Option<NodeIndex>,
}

enum Entry<T> {
    Used(Node<T>),
    Free { next_free: Option<NodeIndex> },
}

struct Space {
    slots: BTreeMap<u64, NodeIndex>,
    /// The slots with the smallest keys again, direct-mapped: the hot
    /// lookups (a portal, a semaphore) use small selectors.
    low: [Option<NodeIndex>; LOW_KEYS],
    limit: usize,
}

/// Keys below this are also in `Space::low`.
const LOW_KEYS: usize = 64;

impl Space {
    fn get(&self, key: u64) -> Option<NodeIndex> {
        match usize::try_from(key).ok().and_then(|k| self.low.get(k)) {
            Some(low) => *low,
            None => self.slots.get(&key).copied(),
        }
    }

    fn insert(&mut self, key: u64, index: NodeIndex) {
        if let Some(low) = usize::try_from(key).ok().and_then(|k| self.low.get_mut(k)) {
            *low = Some(index);
        }
        self.slots.insert(key, index);
    }

    fn remove(&mut self, key: u64) {
        if let Some(low) = usize::try_from(key).ok().and_then(|k| self.low.get_mut(k)) {
            *low = None;
        }
        self.slots.remove(&key);
    }
}

/// Every capability space and the derivation tree between them.
pub struct CapSystem<T> {
    spaces: Vec<Option<Space>>,
    free_spaces: Vec<SpaceId>,
    max_spaces: usize,
    /// Chunked: growing it must not copy every node in one kernel call.
    nodes: Chunked<Entry<T>>,
    free_nodes: Option<NodeIndex>,
}

impl<T> Default for CapSystem<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> CapSystem<T> {
    /// Room for every id a [`SpaceId`] can express.
    pub fn new() -> Self {
        Self::with_max_spaces(usize::try_from(u64::from(SpaceId::MAX) + 1).unwrap_or(usize::MAX))
    }

    /// At most `max_spaces` spaces exist at once.
    pub fn with_max_spaces(max_spaces: usize) -> Self {
        Self {
            spaces: Vec::new(),
            free_spaces: Vec::new(),
            max_spaces,
            nodes: Chunked::new(),
            free_nodes: None,
        }
    }

    /// A new empty space holding at most `limit` slots. Ids of destroyed
    /// spaces are reused.
    pub fn create_space(&mut self, limit: usize) -> Result<SpaceId, CapError> {
        let space = Space {
            slots: BTreeMap::new(),
            low: [None; LOW_KEYS],
            limit,
        };
        if let Some(id) = self.free_spaces.pop() {
            if let Some(entry) = self.spaces.get_mut(id as usize) {
                *entry = Some(space);
                return Ok(id);
            }
        }
        let index = self.spaces.len();
        if index >= self.max_spaces {
            return Err(CapError::TooManySpaces);
        }
        let id = SpaceId::try_from(index).map_err(|_| CapError::TooManySpaces)?;
        // Room for every id on the free list, so destroy_space never allocates.
        let ids = index.checked_add(1).ok_or(CapError::TooManySpaces)?;
        self.free_spaces
            .try_reserve(ids.saturating_sub(self.free_spaces.len()))
            .map_err(|_| CapError::OutOfMemory)?;
        self.spaces
            .try_reserve(1)
            .map_err(|_| CapError::OutOfMemory)?;
        self.spaces.push(Some(space));
        Ok(id)
    }

    pub fn space_exists(&self, space: SpaceId) -> bool {
        self.space(space).is_some()
    }

    /// The slot limit `space` was created with.
    pub fn limit(&self, space: SpaceId) -> Option<usize> {
        self.space(space).map(|s| s.limit)
    }

    /// Occupied slots in `space`; 0 if it does not exist.
    pub fn len(&self, space: SpaceId) -> usize {
        self.space(space).map_or(0, |s| s.slots.len())
    }

    /// Stores an original capability, made when its object was created.
    pub fn insert_root(&mut self, at: SlotRef, object: T, rights: Rights) -> Result<(), CapError> {
        if rights.is_empty() {
            return Err(CapError::NoRights);
        }
        self.check_vacant(at)?;
        self.attach(at, Capability { object, rights }, None)
    }

    pub fn lookup(&self, at: SlotRef) -> Result<&Capability<T>, CapError> {
        let index = self.slot_index(at)?;
        self.node(index).map(|n| &n.cap).ok_or(CapError::Empty(at))
    }

    /// The capability at `at`, if it carries at least `needed`.
    pub fn lookup_with(&self, at: SlotRef, needed: Rights) -> Result<&Capability<T>, CapError> {
        let cap = self.lookup(at)?;
        if needed.is_subset_of(cap.rights) {
            Ok(cap)
        } else {
            Err(CapError::InsufficientRights {
                have: cap.rights,
                need: needed,
            })
        }
    }

    /// Derives a child of `from` at `to` with rights `from.rights & mask`
    /// and the given payload (e.g. a memory capability narrowed to a
    /// sub-range).
    pub fn delegate_with(
        &mut self,
        from: SlotRef,
        to: SlotRef,
        mask: Rights,
        payload: T,
    ) -> Result<(), CapError> {
        let (parent, rights) = self.derivable(from, to, mask)?;
        self.attach(
            to,
            Capability {
                object: payload,
                rights,
            },
            Some(parent),
        )
    }

    /// Removes everything derived from `at`, across spaces, and `at` itself
    /// if `include_self`. `removed` sees each slot after it is gone, children
    /// before their parent. Returns how many slots were removed.
    pub fn revoke(
        &mut self,
        at: SlotRef,
        include_self: bool,
        mut removed: impl FnMut(SlotRef, Capability<T>),
    ) -> Result<usize, CapError> {
        let index = self.slot_index(at)?;
        Ok(self.revoke_node(index, include_self, &mut removed))
    }

    /// Revokes every slot of `space`, with its descendants elsewhere, then
    /// frees the space id. Returns how many slots were removed in all.
    pub fn destroy_space(
        &mut self,
        space: SpaceId,
        mut removed: impl FnMut(SlotRef, Capability<T>),
    ) -> Result<usize, CapError> {
        let mut count = 0usize;
        while !self.destroy_space_some(space, usize::MAX, &mut count, &mut removed)? {}
        Ok(count)
    }

    /// [`Self::destroy_space`] in steps: revokes at most `max` slots of
    /// `space` (each with what was derived from it), adding how many slots
    /// went to `count`; true once the space was empty and its id is free.
    pub fn destroy_space_some(
        &mut self,
        space: SpaceId,
        max: usize,
        count: &mut usize,
        mut removed: impl FnMut(SlotRef, Capability<T>),
    ) -> Result<bool, CapError> {
        for _ in 0..max {
            let first = self
                .space(space)
                .ok_or(CapError::NoSpace(space))?
                .slots
                .first_key_value()
                .map(|(_, &index)| index);
            let Some(index) = first else {
                if let Some(entry) = self.spaces.get_mut(space as usize) {
                    *entry = None;
                }
                // create_space reserved room for every id, so this never
                // allocates.
                self.free_spaces.push(space);
                return Ok(true);
            };
            *count = count.saturating_add(self.revoke_node(index, true, &mut removed));
        }
        Ok(false)
    }

    /// The slot `at` was delegated from; `None` for roots and empty slots.
    pub fn parent(&self, at: SlotRef) -> Option<SlotRef> {
        let node = self.node(self.slot_index(at).ok()?)?;
        self.node(node.parent?).map(|p| p.slot)
    }

    /// The slots delegated directly from `at`, most recent first.
    pub fn children(&self, at: SlotRef) -> impl Iterator<Item = SlotRef> + '_ {
        let first = self
            .slot_index(at)
            .ok()
            .and_then(|index| self.node(index))
            .and_then(|node| node.first_child);
        core::iter::successors(first, move |&index| {
            self.node(index).and_then(|n| n.next_sibling)
        })
        .filter_map(move |index| self.node(index).map(|n| n.slot))
    }

    /// The occupied slots of `space` with keys in `keys`, in key order.
    pub fn range(
        &self,
        space: SpaceId,
        keys: Range<u64>,
    ) -> impl Iterator<Item = (u64, &Capability<T>)> + '_ {
        // BTreeMap::range panics on a reversed range.
        let valid = keys.start < keys.end;
        self.space(space)
            .filter(|_| valid)
            .map(|s| s.slots.range(keys))
            .into_iter()
            .flatten()
            .filter_map(move |(&key, &index)| self.node(index).map(|n| (key, &n.cap)))
    }

    fn space(&self, space: SpaceId) -> Option<&Space> {
        self.spaces.get(space as usize)?.as_ref()
    }

    fn space_mut(&mut self, space: SpaceId) -> Option<&mut Space> {
        self.spaces.get_mut(space as usize)?.as_mut()
    }

    fn node(&self, index: NodeIndex) -> Option<&Node<T>> {
        match self.nodes.get(index.get())? {
            Entry::Used(node) => Some(node),
            Entry::Free { .. } => None,
        }
    }

    fn node_mut(&mut self, index: NodeIndex) -> Option<&mut Node<T>> {
        match self.nodes.get_mut(index.get())? {
            Entry::Used(node) => Some(node),
            Entry::Free { .. } => None,
        }
    }

    fn slot_index(&self, at: SlotRef) -> Result<NodeIndex, CapError> {
        let space = self.space(at.space).ok_or(CapError::NoSpace(at.space))?;
        space.get(at.key).ok_or(CapError::Empty(at))
    }

    /// `at` names an existing space with a free slot there and room for one.
    fn check_vacant(&self, at: SlotRef) -> Result<(), CapError> {
        let space = self.space(at.space).ok_or(CapError::NoSpace(at.space))?;
        if space.slots.contains_key(&at.key) {
            return Err(CapError::Occupied(at));
        }
        if space.slots.len() >= space.limit {
            return Err(CapError::SpaceFull(at.space));
        }
        Ok(())
    }

    /// The source node and the child's rights, if `from` may be delegated to
    /// `to` with `mask`.
    fn derivable(
        &self,
        from: SlotRef,
        to: SlotRef,
        mask: Rights,
    ) -> Result<(NodeIndex, Rights), CapError> {
        let parent = self.slot_index(from)?;
        let have = self.node(parent).ok_or(CapError::Empty(from))?.cap.rights;
        let rights = have & mask;
        if rights.is_empty() {
            return Err(CapError::NoRights);
        }
        self.check_vacant(to)?;
        Ok((parent, rights))
    }

    /// Stores `cap` at the vacant slot `at` as the newest child of `parent`.
    fn attach(
        &mut self,
        at: SlotRef,
        cap: Capability<T>,
        parent: Option<NodeIndex>,
    ) -> Result<(), CapError> {
        let next_sibling = match parent {
            Some(p) => self.node(p).and_then(|n| n.first_child),
            None => None,
        };
        let index = self.alloc_node(Node {
            slot: at,
            cap,
            parent,
            first_child: None,
            prev_sibling: None,
            next_sibling,
        })?;
        if let Some(next) = next_sibling.and_then(|n| self.node_mut(n)) {
            next.prev_sibling = Some(index);
        }
        if let Some(p) = parent.and_then(|p| self.node_mut(p)) {
            p.first_child = Some(index);
        }
        if let Some(space) = self.space_mut(at.space) {
            space.insert(at.key, index);
        }
        Ok(())
    }

    fn alloc_node(&mut self, node: Node<T>) -> Result<NodeIndex, CapError> {
        if let Some(index) = self.free_nodes {
            if let Some(entry) = self.nodes.get_mut(index.get()) {
                if let Entry::Free { next_free } = *entry {
                    self.free_nodes = next_free;
                    *entry = Entry::Used(node);
                    return Ok(index);
                }
            }
        }
        let index = NodeIndex::from_usize(self.nodes.len()).ok_or(CapError::OutOfMemory)?;
        self.nodes
            .try_push(Entry::Used(node))
            .map_err(|_| CapError::OutOfMemory)?;
        Ok(index)
    }

    /// Unlinks `index` from its parent and siblings (its children must be
    /// gone), removes it from its space and returns its slot and capability.
    fn detach(&mut self, index: NodeIndex) -> Option<(SlotRef, Capability<T>)> {
        self.node(index)?;
        let free = Entry::Free {
            next_free: self.free_nodes,
        };
        let Entry::Used(node) = core::mem::replace(self.nodes.get_mut(index.get())?, free) else {
            return None;
        };
        self.free_nodes = Some(index);

        match node.prev_sibling {
            Some(prev) => {
                if let Some(prev) = self.node_mut(prev) {
                    prev.next_sibling = node.next_sibling;
                }
            }
            None => {
                if let Some(parent) = node.parent.and_then(|p| self.node_mut(p)) {
                    parent.first_child = node.next_sibling;
                }
            }
        }
        if let Some(next) = node.next_sibling.and_then(|n| self.node_mut(n)) {
            next.prev_sibling = node.prev_sibling;
        }
        if let Some(space) = self.space_mut(node.slot.space) {
            space.remove(node.slot.key);
        }
        Some((node.slot, node.cap))
    }

    /// Post-order removal of the subtree below `root` (and `root` itself if
    /// `include_self`) without recursion: descend along first children to a
    /// leaf, remove it, step back to its parent, repeat.
    fn revoke_node<F: FnMut(SlotRef, Capability<T>)>(
        &mut self,
        root: NodeIndex,
        include_self: bool,
        removed: &mut F,
    ) -> usize {
        let mut count = 0usize;
        let mut current = root;
        loop {
            while let Some(child) = self.node(current).and_then(|n| n.first_child) {
                current = child;
            }
            if current == root {
                break;
            }
            let parent = self.node(current).and_then(|n| n.parent);
            let Some((slot, cap)) = self.detach(current) else {
                break;
            };
            removed(slot, cap);
            count = count.saturating_add(1);
            match parent {
                Some(parent) => current = parent,
                None => break,
            }
        }
        if include_self {
            if let Some((slot, cap)) = self.detach(root) {
                removed(slot, cap);
                count = count.saturating_add(1);
            }
        }
        count
    }
}

impl<T: Clone> CapSystem<T> {
    /// Derives a child of `from` at `to` with rights `from.rights & mask`
    /// and the same object.
    pub fn delegate(&mut self, from: SlotRef, to: SlotRef, mask: Rights) -> Result<(), CapError> {
        let (parent, rights) = self.derivable(from, to, mask)?;
        let object = self
            .node(parent)
            .ok_or(CapError::Empty(from))?
            .cap
            .object
            .clone();
        self.attach(to, Capability { object, rights }, Some(parent))
    }
}

#[cfg(test)]
impl<T> CapSystem<T> {
    /// Panics unless the arena, the spaces and the tree links agree.
    fn check_invariants(&self) {
        let mut live = 0;
        for (i, entry) in self.nodes.iter().enumerate() {
            let Entry::Used(node) = entry else { continue };
            live += 1;
            let index = NodeIndex::from_usize(i).unwrap();
            assert_eq!(
                self.space(node.slot.space)
                    .unwrap()
                    .slots
                    .get(&node.slot.key),
                Some(&index)
            );
            assert!(!node.cap.rights.is_empty());
            match node.prev_sibling {
                Some(prev) => assert_eq!(self.node(prev).unwrap().next_sibling, Some(index)),
                None => {
                    if let Some(p) = node.parent {
                        assert_eq!(self.node(p).unwrap().first_child, Some(index));
                    }
                }
            }
            if let Some(next) = node.next_sibling {
                let next = self.node(next).unwrap();
                assert_eq!(next.prev_sibling, Some(index));
                assert_eq!(next.parent, node.parent);
            }
            if let Some(child) = node.first_child {
                let child = self.node(child).unwrap();
                assert_eq!(child.parent, Some(index));
                assert_eq!(child.prev_sibling, None);
            }
            if let Some(p) = node.parent {
                assert!(node
                    .cap
                    .rights
                    .is_subset_of(self.node(p).unwrap().cap.rights));
            }
        }
        let in_spaces: usize = self.spaces.iter().flatten().map(|s| s.slots.len()).sum();
        assert_eq!(live, in_spaces);
        for space in self.spaces.iter().flatten() {
            assert!(space.slots.len() <= space.limit);
            for (key, low) in space.low.iter().enumerate() {
                assert_eq!(
                    *low,
                    space.slots.get(&(key as u64)).copied(),
                    "low table out of step at {key}"
                );
            }
        }
        let mut free = 0;
        let mut next = self.free_nodes;
        while let Some(index) = next {
            let Entry::Free { next_free } = self.nodes[index.get()] else {
                panic!("free list reaches a used node");
            };
            free += 1;
            next = next_free;
        }
        assert_eq!(live + free, self.nodes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::vec;
    use std::vec::Vec;

    fn r(bits: u8) -> Rights {
        Rights::from_bits_truncate(bits)
    }

    fn s(space: SpaceId, key: u64) -> SlotRef {
        SlotRef::new(space, key)
    }

    fn revoke_log(
        cs: &mut CapSystem<u64>,
        at: SlotRef,
        include_self: bool,
    ) -> Result<Vec<(SlotRef, u64, Rights)>, CapError> {
        let mut log = Vec::new();
        let n = cs.revoke(at, include_self, |slot, cap| {
            log.push((slot, cap.object, cap.rights))
        })?;
        assert_eq!(n, log.len());
        Ok(log)
    }

    #[test]
    fn rights_helpers() {
        assert!(Rights::NONE.is_subset_of(Rights::NONE));
        assert!(r(0b0101).is_subset_of(r(0b0111)));
        assert!(!r(0b1000).is_subset_of(r(0b0111)));
        assert!(r(0xff).is_subset_of(Rights::ALL));
        assert_eq!(Rights::from_bits_truncate(0xff), Rights::ALL);
        assert_eq!(Rights::ALL.bits(), 0xff);
    }

    #[test]
    fn insert_lookup_and_rights() {
        let mut cs = CapSystem::new();
        let a = cs.create_space(4).unwrap();
        cs.insert_root(s(a, 7), 100u64, r(0b011)).unwrap();
        let cap = cs.lookup(s(a, 7)).unwrap();
        assert_eq!(cap.object, 100);
        assert_eq!(cap.rights, r(0b011));
        assert_eq!(cs.lookup(s(a, 8)), Err(CapError::Empty(s(a, 8))));
        assert_eq!(cs.lookup(s(a + 1, 7)), Err(CapError::NoSpace(a + 1)));
        assert!(cs.lookup_with(s(a, 7), r(0b001)).is_ok());
        assert!(cs.lookup_with(s(a, 7), Rights::NONE).is_ok());
        assert_eq!(
            cs.lookup_with(s(a, 7), r(0b101)).unwrap_err(),
            CapError::InsufficientRights {
                have: r(0b011),
                need: r(0b101)
            }
        );
        assert_eq!(
            cs.insert_root(s(a, 7), 5, Rights::ALL),
            Err(CapError::Occupied(s(a, 7)))
        );
        assert_eq!(
            cs.insert_root(s(a, 9), 5, Rights::NONE),
            Err(CapError::NoRights)
        );
        assert_eq!(
            cs.insert_root(s(9, 9), 5, Rights::ALL),
            Err(CapError::NoSpace(9))
        );
        assert_eq!(cs.len(a), 1);
        assert_eq!(cs.len(9), 0);
        assert_eq!(cs.parent(s(a, 7)), None);
        assert_eq!(cs.children(s(a, 7)).count(), 0);
        assert_eq!(cs.limit(a), Some(4));
        assert!(cs.space_exists(a));
        assert!(!cs.space_exists(9));
    }

    #[test]
    fn delegate_masks_rights_and_links_the_tree() {
        let mut cs = CapSystem::new();
        let a = cs.create_space(8).unwrap();
        let b = cs.create_space(8).unwrap();
        cs.insert_root(s(a, 0), 1u64, r(0b0111)).unwrap();
        cs.delegate(s(a, 0), s(b, 5), r(0b1101)).unwrap();
        assert_eq!(
            cs.lookup(s(b, 5)).unwrap(),
            &Capability {
                object: 1,
                rights: r(0b0101)
            }
        );
        assert_eq!(cs.parent(s(b, 5)), Some(s(a, 0)));
        cs.delegate_with(s(b, 5), s(b, 6), Rights::ALL, 42).unwrap();
        assert_eq!(
            cs.lookup(s(b, 6)).unwrap(),
            &Capability {
                object: 42,
                rights: r(0b0101)
            }
        );
        assert_eq!(cs.parent(s(b, 6)), Some(s(b, 5)));
        cs.delegate(s(a, 0), s(b, 7), Rights::ALL).unwrap();
        let children: Vec<_> = cs.children(s(a, 0)).collect();
        assert_eq!(children, vec![s(b, 7), s(b, 5)]);

        assert_eq!(
            cs.delegate(s(a, 0), s(b, 8), r(0b1000)),
            Err(CapError::NoRights)
        );
        assert_eq!(
            cs.delegate(s(a, 1), s(b, 8), Rights::ALL),
            Err(CapError::Empty(s(a, 1)))
        );
        assert_eq!(
            cs.delegate(s(a, 0), s(9, 8), Rights::ALL),
            Err(CapError::NoSpace(9))
        );
        assert_eq!(
            cs.delegate(s(a, 0), s(b, 5), Rights::ALL),
            Err(CapError::Occupied(s(b, 5)))
        );
        cs.check_invariants();
    }

    #[test]
    fn delegation_cannot_form_a_cycle() {
        let mut cs = CapSystem::new();
        let a = cs.create_space(8).unwrap();
        cs.insert_root(s(a, 0), 0u64, Rights::ALL).unwrap();
        cs.delegate(s(a, 0), s(a, 1), Rights::ALL).unwrap();
        cs.delegate(s(a, 1), s(a, 2), Rights::ALL).unwrap();
        for target in [s(a, 0), s(a, 1), s(a, 2)] {
            assert_eq!(
                cs.delegate(s(a, 2), target, Rights::ALL),
                Err(CapError::Occupied(target))
            );
        }
        assert_eq!(
            cs.delegate(s(a, 1), s(a, 1), Rights::ALL),
            Err(CapError::Occupied(s(a, 1)))
        );
        assert_eq!(cs.parent(s(a, 0)), None);
        cs.check_invariants();
    }

    /// a0 -> b0 -> c0 -> a1, b0 -> c1, a0 -> b1 (children listed newest first).
    fn three_spaces() -> (CapSystem<u64>, [SpaceId; 3]) {
        let mut cs = CapSystem::new();
        let ids = [
            cs.create_space(8).unwrap(),
            cs.create_space(8).unwrap(),
            cs.create_space(8).unwrap(),
        ];
        let [a, b, c] = ids;
        cs.insert_root(s(a, 0), 10, Rights::ALL).unwrap();
        cs.delegate(s(a, 0), s(b, 0), Rights::ALL).unwrap();
        cs.delegate(s(b, 0), s(c, 0), Rights::ALL).unwrap();
        cs.delegate(s(c, 0), s(a, 1), Rights::ALL).unwrap();
        cs.delegate(s(b, 0), s(c, 1), Rights::ALL).unwrap();
        cs.delegate(s(a, 0), s(b, 1), Rights::ALL).unwrap();
        cs.check_invariants();
        (cs, ids)
    }

    /// Every slot in the log comes after all of its descendants.
    fn assert_children_first(log: &[(SlotRef, u64, Rights)], parent_of: &[(SlotRef, SlotRef)]) {
        let position = |slot: SlotRef| log.iter().position(|&(s, _, _)| s == slot).unwrap();
        for &(child, parent) in parent_of {
            if log.iter().any(|&(s, _, _)| s == parent) {
                assert!(position(child) < position(parent), "{child} after {parent}");
            }
        }
    }

    #[test]
    fn revoke_across_three_spaces() {
        let (mut cs, [a, b, c]) = three_spaces();
        let edges = [
            (s(b, 0), s(a, 0)),
            (s(c, 0), s(b, 0)),
            (s(a, 1), s(c, 0)),
            (s(c, 1), s(b, 0)),
            (s(b, 1), s(a, 0)),
        ];
        let log = revoke_log(&mut cs, s(a, 0), false).unwrap();
        let slots: BTreeSet<_> = log.iter().map(|e| e.0).collect();
        assert_eq!(
            slots,
            BTreeSet::from([s(b, 0), s(c, 0), s(a, 1), s(c, 1), s(b, 1)])
        );
        assert_children_first(&log, &edges);
        assert!(log.iter().all(|&(_, object, _)| object == 10));
        assert!(cs.lookup(s(a, 0)).is_ok());
        assert_eq!(cs.children(s(a, 0)).count(), 0);
        assert_eq!((cs.len(a), cs.len(b), cs.len(c)), (1, 0, 0));
        cs.check_invariants();

        let (mut cs, [a, b, c]) = three_spaces();
        let log = revoke_log(&mut cs, s(a, 0), true).unwrap();
        assert_eq!(log.len(), 6);
        assert_eq!(log.last().unwrap().0, s(a, 0));
        assert_children_first(&log, &edges);
        assert_eq!((cs.len(a), cs.len(b), cs.len(c)), (0, 0, 0));
        cs.check_invariants();

        assert_eq!(
            revoke_log(&mut cs, s(a, 0), true),
            Err(CapError::Empty(s(a, 0)))
        );
        assert_eq!(
            revoke_log(&mut cs, s(7, 0), true),
            Err(CapError::NoSpace(7))
        );
    }

    #[test]
    fn revoking_a_middle_node_keeps_parent_and_siblings() {
        let (mut cs, [a, b, c]) = three_spaces();
        let log = revoke_log(&mut cs, s(b, 0), true).unwrap();
        let slots: BTreeSet<_> = log.iter().map(|e| e.0).collect();
        assert_eq!(slots, BTreeSet::from([s(b, 0), s(c, 0), s(a, 1), s(c, 1)]));
        assert_eq!(cs.children(s(a, 0)).collect::<Vec<_>>(), vec![s(b, 1)]);
        assert_eq!(cs.parent(s(b, 1)), Some(s(a, 0)));
        assert_eq!((cs.len(a), cs.len(b), cs.len(c)), (1, 1, 0));
        cs.check_invariants();

        // A leaf revoked without itself removes nothing.
        assert_eq!(revoke_log(&mut cs, s(b, 1), false).unwrap(), vec![]);

        // Unlinking the first, middle and last of several siblings.
        let (mut cs, [a, b, _]) = three_spaces();
        for key in 2..6 {
            cs.delegate(s(a, 0), s(b, key), Rights::ALL).unwrap();
        }
        // Children of a0, newest first: b5 b4 b3 b2 b1 b0.
        for key in [3, 5, 0] {
            revoke_log(&mut cs, s(b, key), true).unwrap();
            cs.check_invariants();
        }
        let children: Vec<_> = cs.children(s(a, 0)).collect();
        assert_eq!(children, vec![s(b, 4), s(b, 2), s(b, 1)]);
    }

    #[test]
    fn destroy_space_revokes_descendants_elsewhere() {
        let (mut cs, [a, b, c]) = three_spaces();
        cs.insert_root(s(c, 5), 20, Rights::ALL).unwrap();
        cs.delegate(s(c, 5), s(a, 5), Rights::ALL).unwrap();
        let mut log = Vec::new();
        let n = cs.destroy_space(b, |slot, _| log.push(slot)).unwrap();
        assert_eq!(n, 5);
        let slots: BTreeSet<_> = log.iter().copied().collect();
        assert_eq!(
            slots,
            BTreeSet::from([s(b, 0), s(c, 0), s(a, 1), s(c, 1), s(b, 1)])
        );
        assert!(!cs.space_exists(b));
        assert_eq!(cs.lookup(s(b, 0)), Err(CapError::NoSpace(b)));
        assert_eq!(cs.destroy_space(b, |_, _| {}), Err(CapError::NoSpace(b)));
        assert_eq!((cs.len(a), cs.len(c)), (2, 1));
        assert_eq!(cs.children(s(a, 0)).count(), 0);
        assert_eq!(cs.parent(s(a, 5)), Some(s(c, 5)));
        cs.check_invariants();

        // Descendants inside the destroyed space itself are counted once.
        let mut log = Vec::new();
        assert_eq!(cs.destroy_space(c, |slot, _| log.push(slot)).unwrap(), 2);
        assert_eq!(log, vec![s(a, 5), s(c, 5)]);
        cs.check_invariants();
    }

    #[test]
    fn destroy_space_in_steps() {
        let mut cs = CapSystem::new();
        let (a, b) = (cs.create_space(16).unwrap(), cs.create_space(16).unwrap());
        for key in 0..5 {
            cs.insert_root(s(a, key), key as u32, Rights::ALL).unwrap();
            cs.delegate(s(a, key), s(b, key), Rights::ALL).unwrap();
        }
        let (mut count, mut log) = (0, Vec::new());
        for _ in 0..2 {
            let done = cs.destroy_space_some(a, 2, &mut count, |slot, _| log.push(slot));
            assert_eq!(done, Ok(false));
            assert!(cs.space_exists(a));
            cs.check_invariants();
        }
        assert_eq!((count, cs.len(a), cs.len(b)), (8, 1, 1));
        assert_eq!(
            cs.destroy_space_some(a, 2, &mut count, |slot, _| log.push(slot)),
            Ok(true)
        );
        assert_eq!((count, log.len(), cs.len(b)), (10, 10, 0));
        assert!(!cs.space_exists(a));
        cs.check_invariants();
        assert_eq!(
            cs.destroy_space_some(a, 2, &mut count, |_, _| {}),
            Err(CapError::NoSpace(a))
        );
    }

    #[test]
    fn slots_and_space_ids_are_reused() {
        let mut cs = CapSystem::new();
        let a = cs.create_space(2).unwrap();
        cs.insert_root(s(a, 1), 1u64, Rights::ALL).unwrap();
        cs.delegate(s(a, 1), s(a, 2), Rights::ALL).unwrap();
        assert_eq!(
            cs.insert_root(s(a, 3), 3, Rights::ALL),
            Err(CapError::SpaceFull(a))
        );
        assert_eq!(
            cs.delegate(s(a, 1), s(a, 3), Rights::ALL),
            Err(CapError::SpaceFull(a))
        );
        revoke_log(&mut cs, s(a, 1), false).unwrap();
        cs.insert_root(s(a, 2), 2, Rights::ALL).unwrap();
        assert_eq!(cs.lookup(s(a, 2)).unwrap().object, 2);
        assert_eq!(cs.parent(s(a, 2)), None);
        assert_eq!(cs.nodes.len(), 2, "the freed node is reused");

        let b = cs.create_space(1).unwrap();
        let c = cs.create_space(0).unwrap();
        assert_eq!(
            cs.insert_root(s(c, 0), 0, Rights::ALL),
            Err(CapError::SpaceFull(c))
        );
        cs.destroy_space(b, |_, _| {}).unwrap();
        assert_eq!(cs.create_space(5).unwrap(), b);
        assert_eq!(cs.limit(b), Some(5));
        assert_eq!(cs.len(b), 0);
        cs.check_invariants();
    }

    #[test]
    fn space_count_is_limited() {
        let mut cs = CapSystem::<u64>::with_max_spaces(2);
        let a = cs.create_space(1).unwrap();
        cs.create_space(1).unwrap();
        assert_eq!(cs.create_space(1), Err(CapError::TooManySpaces));
        cs.destroy_space(a, |_, _| {}).unwrap();
        assert_eq!(cs.create_space(1), Ok(a));
        assert_eq!(cs.create_space(1), Err(CapError::TooManySpaces));
    }

    #[test]
    fn range_lists_slots_in_key_order() {
        let mut cs = CapSystem::new();
        let a = cs.create_space(16).unwrap();
        for key in [9u64, 3, u64::MAX, 0, 5] {
            cs.insert_root(s(a, key), key.wrapping_mul(2), Rights::ALL)
                .unwrap();
        }
        let keys = |range: Range<u64>| -> Vec<u64> { cs.range(a, range).map(|(k, _)| k).collect() };
        assert_eq!(keys(0..u64::MAX), vec![0, 3, 5, 9]);
        assert_eq!(keys(3..9), vec![3, 5]);
        // A reversed range is empty rather than a panic.
        let (high, low) = (9, 3);
        assert_eq!(keys(high..low), Vec::<u64>::new());
        assert_eq!(keys(4..4), Vec::<u64>::new());
        assert_eq!(cs.range(a, 5..6).next().unwrap().1.object, 10);
        assert_eq!(cs.range(7, 0..10).count(), 0);
    }

    #[test]
    fn deep_chain_without_recursion() {
        const DEPTH: u64 = 10_000;
        let mut cs = CapSystem::new();
        let a = cs.create_space(DEPTH as usize).unwrap();
        let b = cs.create_space(DEPTH as usize).unwrap();
        cs.insert_root(s(a, 0), 0u64, Rights::ALL).unwrap();
        for i in 1..DEPTH {
            let from = s(if i % 2 == 1 { a } else { b }, i - 1);
            let to = s(if i % 2 == 1 { b } else { a }, i);
            cs.delegate_with(from, to, Rights::ALL, i).unwrap();
        }
        let mut order = Vec::new();
        let n = cs
            .revoke(s(b, 1), true, |_, cap| order.push(cap.object))
            .unwrap();
        assert_eq!(n, DEPTH as usize - 1);
        assert!(order.iter().copied().eq((1..DEPTH).rev()));
        assert_eq!(cs.len(a) + cs.len(b), 1);
        cs.check_invariants();

        for i in 1..DEPTH {
            cs.delegate_with(s(a, i - 1), s(a, i), Rights::ALL, i)
                .unwrap();
        }
        assert_eq!(cs.destroy_space(a, |_, _| {}).unwrap(), DEPTH as usize);
        cs.check_invariants();
    }

    #[test]
    fn wide_tree_without_quadratic_cost() {
        const WIDTH: u64 = 10_000;
        let mut cs = CapSystem::new();
        let a = cs.create_space(1).unwrap();
        let b = cs.create_space(WIDTH as usize).unwrap();
        cs.insert_root(s(a, 0), 0u64, Rights::ALL).unwrap();
        for i in 0..WIDTH {
            cs.delegate(s(a, 0), s(b, i), Rights::ALL).unwrap();
        }
        assert_eq!(cs.children(s(a, 0)).count(), WIDTH as usize);
        // Removing children one by one is O(1) each.
        for i in (0..WIDTH).step_by(2) {
            revoke_log(&mut cs, s(b, i), true).unwrap();
        }
        assert_eq!(cs.children(s(a, 0)).count(), WIDTH as usize / 2);
        cs.check_invariants();
        assert_eq!(
            revoke_log(&mut cs, s(a, 0), false).unwrap().len(),
            WIDTH as usize / 2
        );
        assert_eq!(cs.len(b), 0);
        cs.check_invariants();
    }

    #[test]
    fn error_messages() {
        let at = s(1, 0x10);
        assert_eq!(
            CapError::Empty(at).to_string(),
            "space 1 slot 0x10 is empty"
        );
        assert!(CapError::InsufficientRights {
            have: r(1),
            need: r(3)
        }
        .to_string()
        .contains("0x03"));
        assert!(CapError::SpaceFull(2).to_string().contains("limit"));
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The obvious implementation: a flat map of slots with parent pointers.
    #[derive(Default)]
    struct Model {
        spaces: BTreeMap<SpaceId, usize>,
        slots: BTreeMap<SlotRef, (u64, Rights, Option<SlotRef>)>,
    }

    impl Model {
        fn len(&self, space: SpaceId) -> usize {
            self.slots.keys().filter(|k| k.space == space).count()
        }

        fn lookup(&self, at: SlotRef) -> Result<(u64, Rights), CapError> {
            if !self.spaces.contains_key(&at.space) {
                return Err(CapError::NoSpace(at.space));
            }
            self.slots
                .get(&at)
                .map(|&(o, r, _)| (o, r))
                .ok_or(CapError::Empty(at))
        }

        fn check_vacant(&self, at: SlotRef) -> Result<(), CapError> {
            let limit = *self
                .spaces
                .get(&at.space)
                .ok_or(CapError::NoSpace(at.space))?;
            if self.slots.contains_key(&at) {
                return Err(CapError::Occupied(at));
            }
            if self.len(at.space) >= limit {
                return Err(CapError::SpaceFull(at.space));
            }
            Ok(())
        }

        fn is_descendant(&self, mut slot: SlotRef, of: SlotRef) -> bool {
            while let Some(&(_, _, Some(parent))) = self.slots.get(&slot) {
                if parent == of {
                    return true;
                }
                slot = parent;
            }
            false
        }

        fn subtree(&self, at: SlotRef, include_self: bool) -> BTreeSet<SlotRef> {
            self.slots
                .keys()
                .copied()
                .filter(|&s| (include_self && s == at) || self.is_descendant(s, at))
                .collect()
        }
    }

    fn check_removal(
        model: &mut Model,
        expected: BTreeSet<SlotRef>,
        log: &[(SlotRef, u64, Rights)],
    ) {
        let got: BTreeSet<SlotRef> = log.iter().map(|e| e.0).collect();
        assert_eq!(got.len(), log.len(), "a slot reported twice");
        assert_eq!(got, expected);
        for (i, &(slot, object, rights)) in log.iter().enumerate() {
            let (o, r, _) = model.slots[&slot];
            assert_eq!((o, r), (object, rights));
            // Nothing reported later descends from this slot.
            for &(later, _, _) in &log[i + 1..] {
                assert!(!model.is_descendant(later, slot));
            }
        }
        for slot in expected {
            model.slots.remove(&slot);
        }
    }

    fn compare(cs: &CapSystem<u64>, model: &Model) {
        cs.check_invariants();
        for (&space, &limit) in &model.spaces {
            assert_eq!(cs.limit(space), Some(limit));
            assert_eq!(cs.len(space), model.len(space));
        }
        let live_spaces = cs.spaces.iter().filter(|s| s.is_some()).count();
        assert_eq!(live_spaces, model.spaces.len());
        for (&slot, &(object, rights, parent)) in &model.slots {
            let cap = cs.lookup(slot).unwrap();
            assert_eq!((cap.object, cap.rights), (object, rights));
            assert_eq!(cs.parent(slot), parent);
            let children: BTreeSet<SlotRef> = cs.children(slot).collect();
            let expected: BTreeSet<SlotRef> = model
                .slots
                .iter()
                .filter(|(_, v)| v.2 == Some(slot))
                .map(|(&k, _)| k)
                .collect();
            assert_eq!(children, expected);
        }
    }

    #[test]
    fn random_operations_match_a_model() {
        const SPACE_IDS: u64 = 6;
        const KEYS: u64 = 16;
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut cs = CapSystem::<u64>::with_max_spaces(5);
        let mut model = Model::default();
        // Coverage: successful delegations, and revocations removing 3+ slots.
        let (mut delegated, mut big_revokes, mut largest) = (0, 0, 0);
        // Mostly an occupied slot, so operations tend to succeed.
        let any_slot = |rng: &mut XorShift| s(rng.below(SPACE_IDS) as SpaceId, rng.below(KEYS));
        let used_slot = |rng: &mut XorShift, model: &Model| {
            let n = model.slots.len() as u64;
            if n == 0 || rng.below(5) == 0 {
                any_slot(rng)
            } else {
                *model.slots.keys().nth(rng.below(n) as usize).unwrap()
            }
        };

        for step in 0..10_000u64 {
            match rng.below(100) {
                0..5 => {
                    let limit = rng.below(KEYS + 1).max(rng.below(KEYS + 1)) as usize;
                    match cs.create_space(limit) {
                        Ok(id) => {
                            assert!(model.spaces.insert(id, limit).is_none());
                        }
                        Err(e) => {
                            assert_eq!(e, CapError::TooManySpaces);
                            assert_eq!(model.spaces.len(), 5);
                        }
                    }
                }
                5..8 => {
                    let space = rng.below(SPACE_IDS) as SpaceId;
                    let mut log = Vec::new();
                    let result = cs
                        .destroy_space(space, |slot, cap| log.push((slot, cap.object, cap.rights)));
                    if model.spaces.contains_key(&space) {
                        assert_eq!(result, Ok(log.len()));
                        largest = largest.max(log.len());
                        let mut expected = BTreeSet::new();
                        for slot in model.slots.keys().filter(|k| k.space == space) {
                            expected.extend(model.subtree(*slot, true));
                        }
                        check_removal(&mut model, expected, &log);
                        model.spaces.remove(&space);
                    } else {
                        assert_eq!(result, Err(CapError::NoSpace(space)));
                        assert!(log.is_empty());
                    }
                }
                8..25 => {
                    let at = any_slot(&mut rng);
                    let rights = r(rng.next() as u8);
                    let object = rng.next();
                    let expected = if rights.is_empty() {
                        Err(CapError::NoRights)
                    } else {
                        model.check_vacant(at)
                    };
                    assert_eq!(cs.insert_root(at, object, rights), expected);
                    if expected.is_ok() {
                        model.slots.insert(at, (object, rights, None));
                    }
                }
                25..70 => {
                    let from = used_slot(&mut rng, &model);
                    let to = any_slot(&mut rng);
                    let mask = r(rng.next() as u8 | rng.next() as u8);
                    let payload = (rng.below(2) == 0).then(|| rng.next());
                    let expected = model.lookup(from).and_then(|(object, have)| {
                        let rights = have & mask;
                        if rights.is_empty() {
                            return Err(CapError::NoRights);
                        }
                        model.check_vacant(to)?;
                        Ok((payload.unwrap_or(object), rights))
                    });
                    let result = match payload {
                        Some(p) => cs.delegate_with(from, to, mask, p),
                        None => cs.delegate(from, to, mask),
                    };
                    assert_eq!(result, expected.map(|_| ()), "step {step}");
                    if let Ok((object, rights)) = expected {
                        model.slots.insert(to, (object, rights, Some(from)));
                        delegated += 1;
                    }
                }
                70..90 => {
                    let at = used_slot(&mut rng, &model);
                    let include_self = rng.below(2) == 0;
                    let result = revoke_log(&mut cs, at, include_self);
                    match model.lookup(at) {
                        Ok(_) => {
                            let log = result.unwrap();
                            largest = largest.max(log.len());
                            if log.len() >= 3 {
                                big_revokes += 1;
                            }
                            let expected = model.subtree(at, include_self);
                            check_removal(&mut model, expected, &log);
                        }
                        Err(e) => assert_eq!(result, Err(e)),
                    }
                }
                _ => {
                    let at = used_slot(&mut rng, &model);
                    let need = r(rng.next() as u8 & rng.next() as u8);
                    let expected = model.lookup(at).and_then(|(object, have)| {
                        if need.is_subset_of(have) {
                            Ok(object)
                        } else {
                            Err(CapError::InsufficientRights { have, need })
                        }
                    });
                    assert_eq!(cs.lookup_with(at, need).map(|c| c.object), expected);
                    let space = at.space;
                    let listed: Vec<u64> = cs.range(space, 0..u64::MAX).map(|(k, _)| k).collect();
                    let mut keys: Vec<u64> = model
                        .slots
                        .keys()
                        .filter(|k| k.space == space)
                        .map(|k| k.key)
                        .collect();
                    keys.sort();
                    assert_eq!(listed, keys);
                }
            }
            compare(&cs, &model);
        }
        assert!(delegated > 1000 && big_revokes > 100 && largest >= 10);
    }
}
