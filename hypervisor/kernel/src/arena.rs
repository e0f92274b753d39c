//! Slots for kernel objects, named by generation-checked ids: an id whose
//! object is gone (and whose slot may hold a new one) no longer resolves,
//! so stale references inside the kernel fail a lookup instead of reaching
//! the wrong object.

use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

/// An object id: slot index and generation, packed into a `u64`.
pub struct Id<T> {
    raw: u64,
    marker: PhantomData<fn() -> T>,
}

impl<T> Id<T> {
    const fn new(index: u32, generation: u32) -> Self {
        Self {
            raw: (generation as u64) << 32 | index as u64,
            marker: PhantomData,
        }
    }

    pub const fn index(self) -> u32 {
        self.raw as u32
    }

    pub const fn generation(self) -> u32 {
        (self.raw >> 32) as u32
    }

    pub const fn raw(self) -> u64 {
        self.raw
    }

    pub const fn from_raw(raw: u64) -> Self {
        Self {
            raw,
            marker: PhantomData,
        }
    }
}

impl<T> Clone for Id<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Id<T> {}
impl<T> PartialEq for Id<T> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<T> Eq for Id<T> {}
impl<T> fmt::Debug for Id<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.index(), self.generation())
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// A growable set of slots; freed slots are reused with a new generation.
pub struct Arena<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Arena<T> {
    pub const fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Stores `value`; None if memory for the slot table cannot be had.
    pub fn insert(&mut self, value: T) -> Option<Id<T>> {
        if let Some(index) = self.free.pop() {
            let slot = self.slots.get_mut(index as usize)?;
            slot.generation = slot.generation.wrapping_add(1);
            slot.value = Some(value);
            self.len += 1;
            return Some(Id::new(index, slot.generation));
        }
        let index = u32::try_from(self.slots.len()).ok()?;
        self.slots.try_reserve(1).ok()?;
        // Freed slots must always fit on the free list without allocating.
        self.free
            .try_reserve(self.slots.len() + 1 - self.free.len())
            .ok()?;
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        self.len += 1;
        Some(Id::new(index, 0))
    }

    pub fn get(&self, id: Id<T>) -> Option<&T> {
        let slot = self.slots.get(id.index() as usize)?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.value.as_ref()
    }

    pub fn get_mut(&mut self, id: Id<T>) -> Option<&mut T> {
        let slot = self.slots.get_mut(id.index() as usize)?;
        if slot.generation != id.generation() {
            return None;
        }
        slot.value.as_mut()
    }

    pub fn remove(&mut self, id: Id<T>) -> Option<T> {
        let slot = self.slots.get_mut(id.index() as usize)?;
        if slot.generation != id.generation() {
            return None;
        }
        let value = slot.value.take()?;
        // Cannot fail: `insert` reserved room for every slot.
        self.free.push(id.index());
        self.len -= 1;
        Some(value)
    }

    pub fn contains(&self, id: Id<T>) -> bool {
        self.get(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn ids(&self) -> impl Iterator<Item = Id<T>> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.value.is_some())
            .map(|(index, slot)| Id::new(index as u32, slot.generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove() {
        let mut arena = Arena::new();
        let a = arena.insert("a").unwrap();
        let b = arena.insert("b").unwrap();
        assert_eq!(arena.get(a), Some(&"a"));
        assert_eq!(arena.len(), 2);
        assert_eq!(arena.remove(a), Some("a"));
        assert_eq!(arena.get(a), None);
        assert_eq!(arena.remove(a), None);
        assert_eq!(arena.get(b), Some(&"b"));
        assert_eq!(arena.ids().collect::<Vec<_>>(), [b]);
    }

    #[test]
    fn stale_ids_do_not_reach_new_objects() {
        let mut arena = Arena::new();
        let old = arena.insert(1).unwrap();
        arena.remove(old);
        let new = arena.insert(2).unwrap();
        assert_eq!(old.index(), new.index());
        assert_ne!(old, new);
        assert_eq!(arena.get(old), None);
        assert_eq!(arena.get_mut(old), None);
        assert_eq!(arena.get(new), Some(&2));
    }

    #[test]
    fn raw_round_trip_and_garbage() {
        let mut arena = Arena::new();
        let id = arena.insert(7u8).unwrap();
        assert_eq!(arena.get(Id::from_raw(id.raw())), Some(&7));
        for raw in [u64::MAX, 1 << 40, 12345] {
            assert_eq!(arena.get(Id::from_raw(raw)), None);
        }
    }
}
