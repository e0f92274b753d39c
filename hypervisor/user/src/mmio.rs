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

    /// Copies `out.len()` bytes from `offset` on.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = self.read::<u8>(offset + i as u64);
        }
    }

    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        for (i, &byte) in bytes.iter().enumerate() {
            self.write::<u8>(offset + i as u64, byte);
        }
    }

    /// Copies `len` bytes from `from` (at `from_offset`) to this window at
    /// `offset`.
    pub fn copy_from(&self, offset: u64, from: &Window, from_offset: u64, len: u64) {
        for i in 0..len {
            self.write::<u8>(offset + i, from.read::<u8>(from_offset + i));
        }
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
