//! Moat's VMM library: the instruction emulator for MMIO exits and the
//! guest page walk it needs.
//!
//! On an MMIO exit the hardware gives the faulting guest-physical address
//! but not the instruction (SVM without decode assists, VMX). [`emulate`]
//! fetches the instruction at CS:RIP through the guest's page tables
//! ([`paging`]), decodes it with iced-x86, checks that its memory operand
//! is the one that exited, and performs it against the [`Platform`]: guest
//! RAM for the ordinary side, the device bus for the MMIO side.
//!
//! Everything here is safe code run on the host by `cargo test`.
// The crate root forbids unsafe while it only holds the library; when the
// VMM binary (with its unsafe shims) joins, move this to the modules.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod cpu;
pub mod cpuid;
pub mod emulate;
pub mod machine;
pub mod msr;
pub mod paging;
pub mod pvclock;
pub mod state;

#[cfg(test)]
mod testutil;

pub use cpu::{CpuState, Gpr, Mode, Segment};
pub use emulate::{emulate, Outcome};
pub use paging::{translate, AccessKind, WalkError};

/// A guest-physical address (or a range starting there) that is not RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotRam(pub u64);

/// What the emulator needs from the VMM: guest RAM and the MMIO bus.
///
/// RAM accesses never reach a device; MMIO accesses never touch RAM. The
/// emulator tries RAM first and goes to the bus for anything RAM refuses,
/// so a RAM function must return `Err` for any range not wholly RAM.
/// Every access the emulator makes lies within one 4 KiB guest page.
pub trait Platform {
    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam>;
    fn write_ram(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam>;
    /// Atomically replace the aligned dword at `gpa` by `new` if it still
    /// holds `current`; `Ok(false)` if it did not. Used to set page-table
    /// accessed/dirty bits without losing a concurrent guest update.
    fn cmpxchg_ram_u32(&mut self, gpa: u64, current: u32, new: u32) -> Result<bool, NotRam>;
    /// Device read of `data.len()` (1-8) bytes; the bus decides what an
    /// unclaimed address reads as.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
    /// The guest's MAXPHYADDR: physical-address bits above it are reserved
    /// in page-table entries.
    fn phys_addr_bits(&self) -> u32 {
        52
    }
}

/// An exception for the VMM to inject into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// For #PF: the linear address, which the VMM loads into CR2 when it
    /// injects (the emulator leaves `CpuState::cr2` alone).
    pub cr2: Option<u64>,
}

impl Exception {
    pub const UD: u8 = 6;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;

    pub fn page_fault(error_code: u32, address: u64) -> Self {
        Self {
            vector: Self::PF,
            error_code: Some(error_code),
            cr2: Some(address),
        }
    }

    pub fn with_zero_code(vector: u8) -> Self {
        Self {
            vector,
            error_code: Some(0),
            cr2: None,
        }
    }
}
