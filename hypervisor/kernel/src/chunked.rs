//! A vector that grows a chunk at a time: what it holds never moves, so
//! growing costs one chunk's allocation instead of a copy of everything.
//! The capability arena holds a node for every page of every PD; as one
//! `Vec` it doubled by copying megabytes inside a kernel call that cannot
//! be preempted (~70 ms on Bochs, a real-time component's missed frames).

use alloc::vec::Vec;
use core::ops::{Index, IndexMut};

/// Bytes per chunk: one frame, so a new chunk is one page to find and
/// zero (a 64 KiB chunk took ~1.3 ms of Bochs' instructions inside a
/// kernel call).
const CHUNK_BYTES: usize = 4096;

pub struct Chunked<T> {
    /// Each of exactly `CHUNK` capacity, so none ever reallocates.
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Chunked<T> {
    /// Elements per chunk.
    const CHUNK: usize = {
        let size = core::mem::size_of::<T>();
        if size == 0 || size >= CHUNK_BYTES {
            1
        } else {
            CHUNK_BYTES / size
        }
    };

    pub const fn new() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        self.chunks
            .get(index / Self::CHUNK)?
            .get(index % Self::CHUNK)
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.chunks
            .get_mut(index / Self::CHUNK)?
            .get_mut(index % Self::CHUNK)
    }

    /// Appends `value`; gives it back if no memory could be had for a new
    /// chunk.
    pub fn try_push(&mut self, value: T) -> Result<(), T> {
        if self.len.is_multiple_of(Self::CHUNK) {
            let mut chunk = Vec::new();
            if chunk.try_reserve_exact(Self::CHUNK).is_err() || self.chunks.try_reserve(1).is_err()
            {
                return Err(value);
            }
            self.chunks.push(chunk);
        }
        match self.chunks.last_mut() {
            Some(chunk) => {
                chunk.push(value);
                self.len += 1;
                Ok(())
            }
            None => Err(value),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        &self.chunks[index / Self::CHUNK][index % Self::CHUNK]
    }
}

impl<T> IndexMut<usize> for Chunked<T> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        &mut self.chunks[index / Self::CHUNK][index % Self::CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_was_pushed_across_chunks() {
        let mut v = Chunked::new();
        let n = Chunked::<usize>::CHUNK * 3 + 7;
        for i in 0..n {
            assert!(v.try_push(i).is_ok());
        }
        assert_eq!(v.len(), n);
        assert!((0..n).all(|i| v.get(i) == Some(&i) && v[i] == i));
        assert_eq!(v.get(n), None);
        assert!(v.iter().copied().eq(0..n));
        let chunk = Chunked::<usize>::CHUNK;
        v[chunk] = 0;
        *v.get_mut(n - 1).unwrap() = 1;
        assert_eq!((v[chunk], v[n - 1]), (0, 1));
    }

    #[test]
    fn growing_never_moves_an_element() {
        let mut v = Chunked::new();
        v.try_push(1u64).unwrap();
        let first: *const u64 = &v[0];
        let chunk = Chunked::<u64>::CHUNK;
        assert_eq!(chunk * core::mem::size_of::<u64>(), CHUNK_BYTES);
        for i in 0..(chunk as u64 * 4) {
            v.try_push(i).unwrap();
        }
        assert!(core::ptr::eq(first, &v[0]));
        assert!(v.chunks.iter().all(|c| c.capacity() == chunk));
        assert_eq!(Chunked::<[u8; 5000]>::CHUNK, 1);
    }
}
