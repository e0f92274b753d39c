//! A fixed-size byte queue: the kernel console's output buffer, so a write
//! costs a copy and the UART is fed as it empties instead of being waited
//! for with everything else held off.

pub struct ByteRing<const N: usize> {
    bytes: [u8; N],
    /// Index of the oldest byte.
    head: usize,
    len: usize,
}

impl<const N: usize> ByteRing<N> {
    pub const fn new() -> Self {
        Self {
            bytes: [0; N],
            head: 0,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == N
    }

    /// Appends `byte`; false (and nothing changes) if the queue is full.
    pub fn push(&mut self, byte: u8) -> bool {
        if self.is_full() {
            return false;
        }
        self.bytes[(self.head + self.len) % N] = byte;
        self.len += 1;
        true
    }

    /// Removes and returns the oldest byte.
    pub fn pop(&mut self) -> Option<u8> {
        if self.is_empty() {
            return None;
        }
        let byte = self.bytes[self.head];
        self.head = (self.head + 1) % N;
        self.len -= 1;
        Some(byte)
    }
}

impl<const N: usize> Default for ByteRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_the_wrap() {
        let mut ring = ByteRing::<4>::new();
        let mut out = Vec::new();
        for round in 0..10u8 {
            assert!(ring.push(round));
            assert!(ring.push(round.wrapping_add(100)));
            out.extend(core::iter::from_fn(|| ring.pop()));
        }
        let expected: Vec<u8> = (0..10u8).flat_map(|r| [r, r + 100]).collect();
        assert_eq!(out, expected);
        assert!(ring.is_empty());
    }

    #[test]
    fn refuses_when_full_and_loses_nothing() {
        let mut ring = ByteRing::<3>::new();
        assert!(ring.push(1) && ring.push(2) && ring.push(3));
        assert!(ring.is_full());
        assert!(!ring.push(4));
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.pop(), Some(1));
        assert!(ring.push(5));
        assert_eq!(
            core::iter::from_fn(|| ring.pop()).collect::<Vec<_>>(),
            [2, 3, 5]
        );
        assert_eq!(ring.pop(), None);
    }
}
