//! Memory the task shares with another party — a device's registers, or a
//! region shared with another component — read and written only with
//! volatile accesses, bounds-checked against the mapping. The other side
//! may change it at any time: copy out, then check.

/// A mapping of `len` bytes at `base` in this task's address space.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    base: u64,
    len: u64,
}

impl Window {
    /// # Safety
    /// `base..base + len` must be mapped (readable and writable) in this
    /// task for as long as the `Window` or a copy of it is used, and only
    /// through volatile accesses.
    pub const unsafe fn new(base: u64, len: u64) -> Self {
        Self { base, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// A part of the window (`None` if it does not fit).
    pub fn sub(&self, offset: u64, len: u64) -> Option<Window> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(Window {
            base: self.base + offset,
            len,
        })
    }

    fn at<T>(&self, offset: u64) -> *mut T {
        let size = core::mem::size_of::<T>() as u64;
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len)
                && offset.is_multiple_of(size),
            "access at {offset:#x} outside or misaligned in a {:#x}-byte window",
            self.len
        );
        (self.base + offset) as *mut T
    }

    pub fn read<T: Copy>(&self, offset: u64) -> T {
        // SAFETY: `at` checked the access lies inside the window, aligned;
        // `new`'s contract makes the window mapped; T is a plain integer.
        unsafe { core::ptr::read_volatile(self.at::<T>(offset)) }
    }

    pub fn write<T: Copy>(&self, offset: u64, value: T) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile(self.at::<T>(offset), value) }
    }

    /// The address of `offset..offset + len`, which must lie inside the
    /// window.
    fn span(&self, offset: u64, len: u64) -> u64 {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "{len} bytes at {offset:#x} outside a {:#x}-byte window",
            self.len
        );
        self.base + offset
    }

    /// Copies `out.len()` bytes from `offset` on: single bytes up to an
    /// 8-byte boundary of the window, then 8 bytes at a time (each access
    /// volatile, as the other side may write meanwhile).
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) {
        let from = self.span(offset, out.len() as u64);
        let head = (from.wrapping_neg() % 8).min(out.len() as u64) as usize;
        let (bytes, words) = out.split_at_mut(head);
        let whole = words.len() / 8 * 8;
        let (words, tail) = words.split_at_mut(whole);
        // Each access below: `span` checked the whole range lies
        // inside the window, mapped by `new`'s contract; the words are
        // 8-byte aligned.
        for (i, byte) in bytes.iter_mut().enumerate() {
            // SAFETY: see above.
            *byte = unsafe { core::ptr::read_volatile((from + i as u64) as *const u8) };
        }
        let at = from + head as u64;
        for (i, word) in words.chunks_exact_mut(8).enumerate() {
            // SAFETY: see above.
            let value = unsafe { core::ptr::read_volatile((at + i as u64 * 8) as *const u64) };
            word.copy_from_slice(&value.to_ne_bytes());
        }
        let at = at + whole as u64;
        for (i, byte) in tail.iter_mut().enumerate() {
            // SAFETY: see above.
            *byte = unsafe { core::ptr::read_volatile((at + i as u64) as *const u8) };
        }
    }

    /// Copies `bytes` to `offset` on, as [`read_bytes`](Self::read_bytes)
    /// reads.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        let to = self.span(offset, bytes.len() as u64);
        let head = (to.wrapping_neg() % 8).min(bytes.len() as u64) as usize;
        let (first, words) = bytes.split_at(head);
        // Each access below: as in `read_bytes`.
        for (i, &byte) in first.iter().enumerate() {
            // SAFETY: see above.
            unsafe { core::ptr::write_volatile((to + i as u64) as *mut u8, byte) };
        }
        let at = to + head as u64;
        let mut chunks = words.chunks_exact(8);
        for (i, word) in (&mut chunks).enumerate() {
            let mut value = [0u8; 8];
            value.copy_from_slice(word);
            // SAFETY: see above.
            unsafe {
                core::ptr::write_volatile(
                    (at + i as u64 * 8) as *mut u64,
                    u64::from_ne_bytes(value),
                )
            };
        }
        let tail = chunks.remainder();
        let at = at + (words.len() - tail.len()) as u64;
        for (i, &byte) in tail.iter().enumerate() {
            // SAFETY: see above.
            unsafe { core::ptr::write_volatile((at + i as u64) as *mut u8, byte) };
        }
    }

    /// Copies `len` bytes from `from` (at `from_offset`) to this window at
    /// `offset`: 8 bytes at a time where both are as aligned (the bytes up
    /// to the first 8-byte boundary and after the last one singly), else
    /// byte by byte.
    pub fn copy_from(&self, offset: u64, from: &Window, from_offset: u64, len: u64) {
        let to = self.span(offset, len);
        let source = from.span(from_offset, len);
        // SAFETY: `span` checked both ranges lie inside their windows,
        // mapped by `new`'s contract; the accesses are volatile.
        unsafe { copy_volatile(to, source, len) }
    }
}

/// Copies `len` bytes from address `from` to `to`, each access volatile:
/// single bytes up to an 8-byte boundary of `to`, then 8 bytes at a time
/// if `from` is as aligned (else bytes), then the remaining bytes.
///
/// # Safety
/// Both ranges must be mapped, readable and writable respectively, and not
/// overlap.
unsafe fn copy_volatile(to: u64, from: u64, len: u64) {
    let mut i = 0;
    if to % 8 == from % 8 {
        let head = (to.wrapping_neg() % 8).min(len);
        while i < head {
            // SAFETY: inside both ranges (the caller's contract).
            unsafe { byte_volatile(to + i, from + i) };
            i += 1;
        }
        while len - i >= 8 {
            // SAFETY: inside both ranges and 8-byte aligned.
            unsafe {
                let word = core::ptr::read_volatile((from + i) as *const u64);
                core::ptr::write_volatile((to + i) as *mut u64, word);
            }
            i += 8;
        }
    }
    while i < len {
        // SAFETY: inside both ranges.
        unsafe { byte_volatile(to + i, from + i) };
        i += 1;
    }
}

/// # Safety
/// As [`copy_volatile`], for one byte.
unsafe fn byte_volatile(to: u64, from: u64) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::write_volatile(to as *mut u8, core::ptr::read_volatile(from as *const u8)) }
}

/// The window an argument `NAME=ADDR,SIZE` names (as the root task gives
/// mappings), if present and well formed.
///
/// # Safety
/// The argument must come from the root task, which mapped that memory.
pub unsafe fn window_arg(args: &str, name: &str) -> Option<Window> {
    let value = args
        .split_whitespace()
        .rev()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == name)?
        .1;
    let (address, size) = value.split_once(',')?;
    let hex = |t: &str| u64::from_str_radix(t.strip_prefix("0x")?, 16).ok();
    let (address, size) = (hex(address)?, hex(size)?);
    // SAFETY: the caller vouches the root task mapped it.
    Some(unsafe { Window::new(address, size) })
}

#[cfg(test)]
mod tests {
    use super::Window;

    /// Copies of every length from every alignment land exactly where
    /// they should, and nowhere else.
    #[test]
    fn byte_copies_at_every_alignment() {
        let mut memory = [0u64; 8];
        let base = memory.as_mut_ptr() as u64;
        // SAFETY: `memory` is 64 bytes, alive and used only through the
        // window until the end of the test.
        let window = unsafe { Window::new(base, 64) };
        for offset in 0..16u64 {
            for len in 0..40usize {
                let data: [u8; 40] = core::array::from_fn(|i| i as u8 + 1);
                for at in (0..64).step_by(8) {
                    window.write::<u64>(at, 0);
                }
                window.write_bytes(offset, &data[..len]);
                let mut all = [0u8; 64];
                window.read_bytes(0, &mut all);
                for (i, &b) in all.iter().enumerate() {
                    let inside = (offset as usize..offset as usize + len).contains(&i);
                    let want = if inside { data[i - offset as usize] } else { 0 };
                    assert_eq!(b, want, "offset {offset} len {len} byte {i}");
                }
                let mut back = [0u8; 40];
                window.read_bytes(offset, &mut back[..len]);
                assert_eq!(back[..len], data[..len]);
            }
        }
    }

    /// Window-to-window copies from every pair of alignments move exactly
    /// the bytes asked for.
    #[test]
    fn window_copies_at_every_alignment() {
        let mut from_memory = [0u64; 8];
        let mut to_memory = [0u64; 8];
        // SAFETY: both arrays are 64 bytes, alive and used only through
        // the windows until the end of the test.
        let (from, to) = unsafe {
            (
                Window::new(from_memory.as_mut_ptr() as u64, 64),
                Window::new(to_memory.as_mut_ptr() as u64, 64),
            )
        };
        let data: [u8; 64] = core::array::from_fn(|i| i as u8 + 1);
        from.write_bytes(0, &data);
        for from_offset in 0..10u64 {
            for offset in 0..10u64 {
                for len in 0..40u64 {
                    for at in (0..64).step_by(8) {
                        to.write::<u64>(at, 0);
                    }
                    to.copy_from(offset, &from, from_offset, len);
                    let mut all = [0u8; 64];
                    to.read_bytes(0, &mut all);
                    for (i, &b) in all.iter().enumerate() {
                        let i = i as u64;
                        let want = if (offset..offset + len).contains(&i) {
                            data[(i - offset + from_offset) as usize]
                        } else {
                            0
                        };
                        assert_eq!(b, want, "{from_offset} -> {offset} len {len} byte {i}");
                    }
                }
            }
        }
    }
}
