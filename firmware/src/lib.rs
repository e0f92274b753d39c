//! Moat's guest firmware: what a PC BIOS and boot loader would leave in
//! guest RAM for Linux, built directly by the VMM.
//!
//! Guest RAM comes as a byte slice indexed by guest-physical address,
//! covering `[0, ram.len())` below the MMIO hole; every write is bounds
//! checked and every malformed image or layout is an error, never a panic.
//! The slice is expected to be zeroed (fresh guest memory).
//!
//! Three boot paths, each returning the vCPU state to start in
//! ([`BootState`]):
//! - [`boot_linux`]: a bzImage through the 64-bit Linux boot protocol
//!   (long mode, identity-mapped page tables, `boot_params`);
//! - [`boot_pvh`]: an ELF vmlinux through PVH (32-bit protected mode,
//!   `hvm_start_info`);
//! - [`boot_multiboot`]: a Multiboot v1 kernel with its modules (32-bit
//!   protected mode, the Multiboot information structure).
//!
//! [`KernelFormat::detect`] tells a bzImage from a Multiboot kernel, as
//! QEMU's `-kernel` does. All also write the ACPI tables ([`acpi`]) and
//! the SMBIOS tables ([`smbios`]), and hand the guest the memory map
//! ([`e820`]) of the [`GuestLayout`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi;
pub mod aml;
pub mod cpu;
pub mod e820;
pub mod layout;
pub mod linux;
pub mod multiboot;
pub mod pvh;
pub mod ram;
pub mod smbios;

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
    Smbios(smbios::Error),
    Linux(linux::Error),
    Pvh(pvh::Error),
    Multiboot(multiboot::Error),
    /// Neither a bzImage nor a file with a Multiboot header.
    UnknownFormat,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Linux(e) => write!(f, "bzImage: {e}"),
            Error::Multiboot(e) => write!(f, "Multiboot kernel: {e}"),
            Error::UnknownFormat => write!(
                f,
                "the kernel is neither a bzImage (no \"HdrS\" setup header) \
                 nor a Multiboot kernel (no header in its first 8 KiB)"
            ),
            Error::Layout(e) => write!(f, "guest layout: {e:?}"),
            Error::Acpi(e) => write!(f, "ACPI tables: {e:?}"),
            Error::Smbios(e) => write!(f, "SMBIOS tables: {e:?}"),
            Error::Pvh(e) => write!(f, "PVH vmlinux: {e:?}"),
        }
    }
}

impl From<multiboot::Error> for Error {
    fn from(e: multiboot::Error) -> Self {
        Error::Multiboot(e)
    }
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

impl From<smbios::Error> for Error {
    fn from(e: smbios::Error) -> Self {
        Error::Smbios(e)
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

/// Validates `layout` against `ram`, writes the ACPI and SMBIOS tables
/// and returns the RSDP address and the memory map.
fn platform(
    ram: &mut [u8],
    layout: &GuestLayout,
) -> Result<(u64, alloc::vec::Vec<e820::E820Entry>), Error> {
    layout.validate(ram.len() as u64)?;
    let tables = acpi::build(ram, layout)?;
    smbios::build(ram, layout, tables.end)?;
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

/// What kind of kernel a file is, by the same tests as QEMU's `-kernel`:
/// the Linux setup header first, then a Multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Multiboot,
    Unknown,
}

impl KernelFormat {
    pub fn detect(kernel: &[u8]) -> Self {
        if linux::has_setup_header(kernel) {
            KernelFormat::BzImage
        } else if multiboot::find_magic(kernel).is_some() {
            KernelFormat::Multiboot
        } else {
            KernelFormat::Unknown
        }
    }
}

/// Sets up `ram` to boot a Multiboot v1 kernel with `modules` (see
/// [`multiboot`]).
pub fn boot_multiboot(
    ram: &mut [u8],
    layout: &GuestLayout,
    kernel: &[u8],
    cmdline: &[u8],
    modules: &[multiboot::Module],
) -> Result<BootState, Error> {
    let (_, map) = platform(ram, layout)?;
    Ok(multiboot::load(ram, kernel, cmdline, modules, &map)?.state)
}

/// Boots `payload.kernel` by its format: a bzImage through
/// [`boot_linux`], a Multiboot kernel through [`boot_multiboot`] with
/// `modules` (the payload's initrd is for Linux only).
pub fn boot_detected(
    ram: &mut [u8],
    layout: &GuestLayout,
    payload: &Payload,
    modules: &[multiboot::Module],
) -> Result<BootState, Error> {
    match KernelFormat::detect(payload.kernel) {
        KernelFormat::BzImage => boot_linux(ram, layout, payload),
        KernelFormat::Multiboot => {
            boot_multiboot(ram, layout, payload.kernel, payload.cmdline, modules)
        }
        KernelFormat::Unknown => Err(Error::UnknownFormat),
    }
}
