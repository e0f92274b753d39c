//! Device models for Moat's VMM.
//!
//! Every model is a plain state machine: register reads and writes at an
//! offset inside its own window ([`BusDevice`]); the [`Bus`] turns guest
//! addresses into offsets. What a model needs from outside — time, interrupt
//! lines, guest memory — comes in through the small traits below, so the
//! whole crate runs on the host under `cargo test`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi_pm;
pub mod bus;
pub mod debug_exit;
pub mod ioapic;
pub mod lapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod rtc;
#[cfg(any(test, feature = "test-utils"))]
pub mod testutil;
pub mod uart;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, Shared};

/// Guest time, in nanoseconds since the VM started; monotonic.
pub trait Clock {
    fn now_ns(&self) -> u64;
}

/// An interrupt line from a device to an interrupt controller.
///
/// Level-triggered sources call `set_level` whenever their condition
/// changes; edge sources call `pulse`.
pub trait IrqLine {
    fn set_level(&self, high: bool);
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// Where message-signalled interrupts (MSI/MSI-X) go: the address/data
/// pair as the guest programmed it.
pub trait MsiSink {
    fn send(&self, address: u64, data: u32);
}

/// A guest-physical address outside the guest's RAM, or a range crossing
/// its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadGuestAddress(pub u64);

/// The guest's RAM as seen by device models (DMA): bounds-checked copies in
/// and out; implementations must never touch memory outside the guest.
pub trait GuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), BadGuestAddress>;
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), BadGuestAddress>;

    /// Replaces the dword at `gpa` (4-byte aligned) by `new` if it holds
    /// `current`; `Ok(false)` if it did not. Memory a running vCPU can
    /// write at the same time must do this atomically; the default, a
    /// read and a write, is for memory nothing else writes meanwhile.
    fn compare_exchange_u32(
        &self,
        gpa: u64,
        current: u32,
        new: u32,
    ) -> Result<bool, BadGuestAddress> {
        let mut bytes = [0u8; 4];
        self.read(gpa, &mut bytes)?;
        if u32::from_le_bytes(bytes) != current {
            return Ok(false);
        }
        self.write(gpa, &new.to_le_bytes())?;
        Ok(true)
    }
}
