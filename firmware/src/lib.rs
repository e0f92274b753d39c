//! Moat's guest firmware: what a PC BIOS and boot loader would leave in
//! guest RAM for Linux, built directly by the VMM.
//!
//! Guest RAM comes as a byte slice indexed by guest-physical address,
//! covering `[0, ram.len())` below the MMIO hole; every write is bounds
//! checked and every malformed image or layout is an error, never a panic.
//! The slice is expected to be zeroed (fresh guest memory).
//!
//! Two boot paths, each returning the vCPU state to start in
//! ([`BootState`]):
//! - [`boot_linux`]: a bzImage through the 64-bit Linux boot protocol
//!   (long mode, identity-mapped page tables, `boot_params`);
//! - [`boot_pvh`]: an ELF vmlinux through PVH (32-bit protected mode,
//!   `hvm_start_info`).
//!
//! Both also write the ACPI tables ([`acpi`]) and hand the guest the
//! memory map ([`e820`]) of the [`GuestLayout`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi;
pub mod aml;
pub mod cpu;
pub mod e820;
pub mod layout;
pub mod linux;
pub mod pvh;
pub mod ram;

pub use cpu::{BootState, Segment};
pub use layout::{GuestLayout, LayoutError, Window};

/// What the guest is told beside its kernel image, on either boot path.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo<'a> {
    pub cmdline: &'a [u8],
    pub initrd: Option<&'a [u8]>,
    pub e820: &'a [e820::E820Entry],
    pub rsdp: Option<u64>,
}

/// Errors of the boot paths, by layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    Layout(LayoutError),
    Acpi(acpi::Error),
    Linux(linux::Error),
    Pvh(pvh::Error),
}

impl From<LayoutError> for Error {
    fn from(e: LayoutError) -> Self {
        Error::Layout(e)
    }
}

impl From<acpi::Error> for Error {
    fn from(e: acpi::Error) -> Self {
        Error::Acpi(e)
    }
}

impl From<linux::Error> for Error {
    fn from(e: linux::Error) -> Self {
        Error::Linux(e)
    }
}

impl From<pvh::Error> for Error {
    fn from(e: pvh::Error) -> Self {
        Error::Pvh(e)
    }
}

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct Payload<'a> {
    /// A bzImage for [`boot_linux`], an ELF vmlinux for [`boot_pvh`].
    pub kernel: &'a [u8],
    /// The command line, without NUL.
    pub cmdline: &'a [u8],
    pub initrd: Option<&'a [u8]>,
}

impl<'a> Payload<'a> {
    /// What the guest is told: this payload's command line and initrd,
    /// the memory map and the RSDP.
    fn info<'m>(&self, e820: &'m [e820::E820Entry], rsdp: u64) -> BootInfo<'m>
    where
        'a: 'm,
    {
        BootInfo {
            cmdline: self.cmdline,
            initrd: self.initrd,
            e820,
            rsdp: Some(rsdp),
        }
    }
}

/// Validates `layout` against `ram`, writes the ACPI tables and returns
/// the RSDP address and the memory map.
fn platform(
    ram: &mut [u8],
    layout: &GuestLayout,
) -> Result<(u64, alloc::vec::Vec<e820::E820Entry>), Error> {
    layout.validate(ram.len() as u64)?;
    let tables = acpi::build(ram, layout)?;
    Ok((tables.rsdp, e820::memory_map(layout)))
}

/// Sets up `ram` to boot a bzImage through Linux's 64-bit boot protocol.
pub fn boot_linux(
    ram: &mut [u8],
    layout: &GuestLayout,
    payload: &Payload,
) -> Result<BootState, Error> {
    let (rsdp, map) = platform(ram, layout)?;
    Ok(linux::load(ram, payload.kernel, &payload.info(&map, rsdp))?.state)
}

/// Sets up `ram` to boot an ELF vmlinux through its PVH entry point.
pub fn boot_pvh(
    ram: &mut [u8],
    layout: &GuestLayout,
    payload: &Payload,
) -> Result<BootState, Error> {
    let (rsdp, map) = platform(ram, layout)?;
    Ok(pvh::load(ram, payload.kernel, &payload.info(&map, rsdp))?.state)
}
