//! Moat's fuzz targets as plain functions over a byte string.
//!
//! Each `fuzz_targets/NAME.rs` is a libFuzzer entry point (cargo-fuzz,
//! feature `libfuzzer`) that calls the function [`TARGETS`] lists under
//! NAME; `cargo test` (and so `cargo xtask test`) calls the same functions
//! on every file of `corpus/NAME/` without libFuzzer, so the checked-in
//! corpus and every crash found so far replay on each test run.
//!
//! The bytes become structured operations with `arbitrary`: a sequence of
//! guest accesses and host events for the device models, an instruction
//! stream plus CPU state and page tables for the emulator, raw text or
//! images for the parsers. A target fails by panicking: a model or parser
//! that panics on guest input, or a property the target checks (e.g. an
//! encode/decode round trip) that does not hold.

pub mod abi;
pub mod devices;
pub mod firmware;
pub mod manifest;
pub mod net;
pub mod virtio;
pub mod vmm;

use std::cell::RefCell;

use arbitrary::{Arbitrary, Unstructured};
use vdev::{BadGuestAddress, GuestMemory};

/// A fuzz target: its name (the file in `fuzz_targets/` and the corpus
/// folder) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("uart", devices::uart),
    ("lapic", devices::lapic),
    ("ioapic", devices::ioapic),
    ("pic", devices::pic),
    ("pit", devices::pit),
    ("rtc", devices::rtc),
    ("acpi_pm", devices::acpi_pm),
    ("pci", devices::pci),
    ("virtio_console", virtio::console),
    ("virtio_block", virtio::block),
    ("virtio_net", virtio::net),
    ("virtio_rng", virtio::rng),
    ("virtio_queue", virtio::queue),
    ("emulate", vmm::emulate),
    ("vmm_exit", vmm::exit),
    ("firmware_linux", firmware::linux),
    ("firmware_pvh", firmware::pvh),
    ("firmware_multiboot", firmware::multiboot),
    ("manifest", manifest::parse),
    ("abi", abi::abi),
    ("kernel_exit", abi::kernel_exit),
    ("elf", abi::elf),
    ("net_switch", net::switch),
];

/// The function of the target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|&(_, f)| f)
}

/// Operations one input may hold at most, so one input's run stays short.
pub const MAX_OPS: usize = 2048;

/// Decodes operations from `u` until it runs dry (or [`MAX_OPS`]) and hands
/// each to `apply`.
pub fn for_each_op<'a, T: Arbitrary<'a>>(u: &mut Unstructured<'a>, mut apply: impl FnMut(T)) {
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match T::arbitrary(u) {
            Ok(op) => apply(op),
            Err(_) => break,
        }
    }
}

/// An access width the bus passes to a device.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Width {
    B1,
    B2,
    B4,
    B8,
}

impl Width {
    pub fn bytes(self) -> usize {
        match self {
            Width::B1 => 1,
            Width::B2 => 2,
            Width::B4 => 4,
            Width::B8 => 8,
        }
    }

    /// Port I/O is at most 4 bytes wide.
    pub fn port_bytes(self) -> usize {
        self.bytes().min(4)
    }
}

/// A guest read or write near a device's window (`offset` is reduced into
/// the window plus a few bytes past it, so accesses that straddle its end
/// are tried too).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Access {
    pub write: bool,
    pub offset: u16,
    pub width: Width,
    pub value: u64,
}

impl Access {
    /// Performs the access on `bus` inside `[base, base + len + 8)`; port
    /// I/O when `port` (at most 4 bytes). Returns what a read returned.
    pub fn apply(&self, bus: &vdev::Bus, base: u64, len: u64, port: bool) -> u64 {
        let span = len.saturating_add(8).min(u64::from(u16::MAX) + 1);
        let addr = base + u64::from(self.offset) % span;
        let width = if port {
            self.width.port_bytes()
        } else {
            self.width.bytes()
        };
        let mut raw = self.value.to_le_bytes();
        if self.write {
            bus.write(addr, &raw[..width]);
            0
        } else {
            let claimed = bus.read(addr, &mut raw[..width]);
            if !claimed {
                assert!(
                    raw[..width].iter().all(|&b| b == 0xff),
                    "unclaimed reads as ones"
                );
            }
            u64::from_le_bytes(raw)
        }
    }
}

/// Guest RAM from address 0, bounds-checked.
pub struct Ram(pub RefCell<Vec<u8>>);

impl Ram {
    pub fn new(size: usize) -> Self {
        Self(RefCell::new(vec![0; size]))
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, BadGuestAddress> {
        let start = usize::try_from(gpa).map_err(|_| BadGuestAddress(gpa))?;
        let end = start.checked_add(len).ok_or(BadGuestAddress(gpa))?;
        if end > self.0.borrow().len() {
            return Err(BadGuestAddress(gpa));
        }
        Ok(start..end)
    }
}

impl GuestMemory for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), BadGuestAddress> {
        let range = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.0.borrow()[range]);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), BadGuestAddress> {
        let range = self.range(gpa, data.len())?;
        self.0.borrow_mut()[range].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod replay;
