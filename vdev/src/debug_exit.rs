//! QEMU's `isa-debug-exit` device (hw/misc/debugexit.c): a write of any
//! width at any offset of its window ends the machine, and QEMU exits with
//! status `(value << 1) | 1`, so that a test kernel can report its verdict
//! as the emulator's exit status. Reads return 0. The VMM learns of the
//! write from [`DebugExit::value`] and ends the guest.

use crate::BusDevice;

/// QEMU's default `iobase` and `iosize`.
pub const DEFAULT_PORT: u64 = 0xf4;
pub const WINDOW_LEN: u64 = 4;

#[derive(Debug, Default)]
pub struct DebugExit {
    value: Option<u32>,
}

impl DebugExit {
    pub fn new() -> Self {
        Self::default()
    }

    /// The value the guest wrote, if it did; the first write sticks (the
    /// VMM stops the guest before it runs again).
    pub fn value(&self) -> Option<u32> {
        self.value
    }
}

/// The exit status QEMU gives for a write of `value`: `(value << 1) | 1`,
/// which a process exit status cuts to its low 8 bits.
pub fn exit_status(value: u32) -> u8 {
    ((value << 1) | 1) as u8
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        self.value.get_or_insert(u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_of_any_width_is_the_value_and_the_first_sticks() {
        let mut d = DebugExit::new();
        let mut b = [0xff; 2];
        d.read(0, &mut b);
        assert_eq!((b, d.value()), ([0, 0], None));
        d.write(1, &[0x34, 0x12]);
        assert_eq!(d.value(), Some(0x1234));
        d.write(0, &[7]);
        assert_eq!(d.value(), Some(0x1234));
        let mut d = DebugExit::new();
        d.write(0, &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(d.value(), Some(0x1234_5678));
        let mut d = DebugExit::new();
        d.write(0, &[]);
        assert_eq!(d.value(), Some(0));
    }

    #[test]
    fn exit_status_is_qemus() {
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(0x10), 0x21);
        assert_eq!(exit_status(0x31), 0x63);
        assert_eq!(exit_status(0x80), 1, "the status keeps 8 bits");
    }
}
