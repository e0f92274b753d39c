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

    /// Copies `out.len()` bytes from `offset` on (with string moves, which
    /// the compiler neither elides nor splits: as volatile, as the other
    /// side may write meanwhile). For shared and DMA memory, not device
    /// registers: the accesses' widths are the string moves'.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) {
        let from = self.span(offset, out.len() as u64);
        // SAFETY: `span` checked the source lies inside the window (mapped
        // by `new`'s contract); the destination is all of `out`, private
        // memory that cannot overlap it.
        unsafe { copy_shared(out.as_mut_ptr() as u64, from, out.len() as u64) }
    }

    /// Copies `bytes` to `offset` on, as [`read_bytes`](Self::read_bytes)
    /// reads.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        let to = self.span(offset, bytes.len() as u64);
        // SAFETY: as in `read_bytes`, the other way round.
        unsafe { copy_shared(to, bytes.as_ptr() as u64, bytes.len() as u64) }
    }

    /// Copies `len` bytes from `from` (at `from_offset`) to this window at
    /// `offset`, as [`read_bytes`](Self::read_bytes) copies.
    pub fn copy_from(&self, offset: u64, from: &Window, from_offset: u64, len: u64) {
        let to = self.span(offset, len);
        let source = from.span(from_offset, len);
        // SAFETY: `span` checked both ranges lie inside their windows,
        // mapped by `new`'s contract (distinct mappings: a window is never
        // copied onto itself here).
        unsafe { copy_shared(to, source, len) }
    }
}

/// Copies `len` bytes from address `from` to `to` with `rep movsq` (then
/// `rep movsb` for the last bytes): one instruction the compiler treats as
/// opaque, so memory another party writes meanwhile is read once, as with
/// volatile accesses, and moved 8 bytes per step.
///
/// # Safety
/// `from..from + len` must be mapped readable, `to..to + len` writable,
/// and the two must not overlap.
unsafe fn copy_shared(to: u64, from: u64, len: u64) {
    // SAFETY: the caller's contract; the direction flag is clear (the
    // ABI's rule at every call), and string moves change no flags.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov rcx, {rest}",
            "rep movsb",
            rest = in(reg) len % 8,
            inout("rcx") len / 8 => _,
            inout("rdi") to => _,
            inout("rsi") from => _,
            options(nostack, preserves_flags),
        );
    }
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
