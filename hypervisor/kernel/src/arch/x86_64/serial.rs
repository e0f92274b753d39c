//! The 16550 UART at COM1: the kernel console.

use x86::io::{inb, outb};

const COM1: u16 = 0x3f8;
const DATA: u16 = 0;
const INTERRUPT_ENABLE: u16 = 1;
const FIFO_CONTROL: u16 = 2;
const LINE_CONTROL: u16 = 3;
const MODEM_CONTROL: u16 = 4;
const LINE_STATUS: u16 = 5;

const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TRANSMITTER_IDLE: u8 = 1 << 6;
const LCR_DLAB: u8 = 1 << 7;
const LCR_8N1: u8 = 0b11;

/// Bytes the transmitter FIFO takes once it reports empty.
pub const FIFO_DEPTH: usize = 16;
/// Bits on the line per byte at 8N1 (start, eight data, stop).
const BITS_PER_BYTE: u64 = 10;
pub const BAUD: u64 = 115_200;
/// Bytes the line carries per second.
pub const BYTES_PER_SECOND: u64 = BAUD / BITS_PER_BYTE;

pub struct Serial {
    base: u16,
}

impl Serial {
    pub const fn com1() -> Self {
        Self { base: COM1 }
    }

    fn out(&self, register: u16, value: u8) {
        // SAFETY: the kernel owns COM1; writing its registers affects nothing
        // else.
        unsafe { outb(self.base + register, value) }
    }

    fn read(&self, register: u16) -> u8 {
        // SAFETY: as in `out`; reading COM1 registers has no side effect
        // beyond the UART.
        unsafe { inb(self.base + register) }
    }

    /// 115200 baud, 8N1, FIFOs on, interrupts off.
    pub fn init(&self) {
        self.out(INTERRUPT_ENABLE, 0);
        self.out(LINE_CONTROL, LCR_DLAB);
        self.out(DATA, 1); // divisor 1 = 115200 baud
        self.out(INTERRUPT_ENABLE, 0);
        self.out(LINE_CONTROL, LCR_8N1);
        self.out(FIFO_CONTROL, 0xc7);
        self.out(MODEM_CONTROL, 0x03);
    }

    pub fn write_byte(&self, byte: u8) {
        self.wait_ready();
        self.out(DATA, byte);
    }

    /// True when the transmitter FIFO is empty, so `FIFO_DEPTH` bytes can
    /// be `put` without waiting.
    pub fn ready(&self) -> bool {
        self.read(LINE_STATUS) & LSR_THR_EMPTY != 0
    }

    pub fn wait_ready(&self) {
        while !self.ready() {
            core::hint::spin_loop();
        }
    }

    /// Writes one byte without waiting (the caller knows there is room).
    pub fn put(&self, byte: u8) {
        self.out(DATA, byte);
    }

    pub fn write_bytes(&self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(byte);
        }
    }

    /// Waits until every byte has left the UART (emulators drop what is
    /// still queued when they power off).
    pub fn drain(&self) {
        while self.read(LINE_STATUS) & LSR_TRANSMITTER_IDLE == 0 {
            core::hint::spin_loop();
        }
    }
}

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}
