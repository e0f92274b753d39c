//! Linux's x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit
//! entry: the protected-mode part of a bzImage is copied into RAM, a zero
//! page (`struct boot_params`) describes memory, command line, initrd and
//! RSDP, and the vCPU starts in long mode at `startup_64`.

use crate::BootInfo;
use alloc::vec;
use alloc::vec::Vec;

use crate::cpu::{self, BootState};
use crate::e820::{self, E820Entry};
use crate::layout::{low, HIGH_RAM_START, PAGE_SIZE};
use crate::ram::{self, Le, OutOfRam, PutLe};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The image ends before its setup header does.
    TooShort,
    /// No 0xaa55 boot flag or "HdrS" header magic.
    BadMagic,
    /// Boot protocol older than 2.12 (no 64-bit entry flags).
    ProtocolTooOld(u16),
    /// Not a bzImage (LOADED_HIGH clear).
    NotBzImage,
    /// `xloadflags` lacks XLF_KERNEL_64.
    No64BitEntry,
    /// The setup sectors reach past the end of the file.
    SetupPastEnd,
    /// No protected-mode code after the setup sectors.
    NoKernel,
    /// The compressed payload lies outside the protected-mode code.
    BadPayload,
    /// `kernel_alignment` is not a power of two.
    BadAlignment,
    /// Neither `pref_address` nor (if relocatable) any aligned address
    /// from 1 MiB up has `init_size` bytes of RAM.
    KernelDoesNotFit,
    /// The command line is longer than `cmdline_size` or our buffer.
    CmdlineTooLong,
    /// The command line contains a NUL byte.
    CmdlineHasNul,
    /// No page-aligned RAM for the initrd above the kernel and below both
    /// `initrd_addr_max` and the end of RAM.
    InitrdDoesNotFit,
    /// More memory-map entries than the zero page holds.
    TooManyE820Entries,
    Ram(OutOfRam),
}

impl From<OutOfRam> for Error {
    fn from(e: OutOfRam) -> Self {
        Error::Ram(e)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Error::TooShort => write!(f, "file too short: it ends inside the setup header"),
            Error::BadMagic => write!(f, "not a bzImage: no 0xaa55 boot flag or \"HdrS\" magic"),
            Error::ProtocolTooOld(v) => write!(
                f,
                "boot protocol {}.{:02} too old (2.12 or later needed for the 64-bit entry)",
                v >> 8,
                v & 0xff
            ),
            Error::NotBzImage => write!(f, "a zImage, not a bzImage (LOADED_HIGH clear)"),
            Error::No64BitEntry => write!(f, "no 64-bit entry point (XLF_KERNEL_64 clear)"),
            Error::SetupPastEnd => write!(
                f,
                "file truncated: the setup sectors reach past the end of the file"
            ),
            Error::NoKernel => write!(f, "file truncated: nothing after the setup sectors"),
            Error::BadPayload => write!(
                f,
                "file truncated or corrupt: the compressed kernel reaches past the end of the file"
            ),
            Error::BadAlignment => write!(f, "kernel_alignment is not a power of two"),
            Error::KernelDoesNotFit => write!(
                f,
                "kernel does not fit in guest RAM (it needs init_size bytes of RAM from its \
                 load address)"
            ),
            Error::CmdlineTooLong => write!(f, "command line too long"),
            Error::CmdlineHasNul => write!(f, "command line contains a NUL byte"),
            Error::InitrdDoesNotFit => {
                write!(f, "initrd does not fit in guest RAM above the kernel")
            }
            Error::TooManyE820Entries => write!(f, "memory map too long for the zero page"),
            Error::Ram(OutOfRam { addr, len }) => {
                write!(f, "write of {len} bytes at {addr:#x} outside guest RAM")
            }
        }
    }
}

/// Whether `image` has the Linux setup header's "HdrS" magic where the
/// boot protocol puts it (QEMU's first test for `-kernel`).
pub fn has_setup_header(image: &[u8]) -> bool {
    image.get(hdr::HEADER..hdr::HEADER + 4) == Some(&hdr::HEADER_MAGIC[..])
}

/// Offsets in the image file, which equal those in `boot_params`.
mod hdr {
    pub const START: usize = 0x1f1;
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    /// The second byte of the jump instruction: header length past 0x202.
    pub const JUMP_LEN: usize = 0x201;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PAYLOAD_OFFSET: usize = 0x248;
    pub const PAYLOAD_LENGTH: usize = 0x24c;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    /// End of the 2.12 header (after `handover_offset`).
    pub const END_2_12: usize = 0x268;
    /// Where `boot_params` stops leaving room for the header.
    pub const MAX_END: usize = 0x290;

    pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
    pub const HEADER_MAGIC: &[u8; 4] = b"HdrS";
    pub const LOADED_HIGH: u8 = 1 << 0;
    pub const XLF_KERNEL_64: u16 = 1 << 0;
    /// "Undefined" boot loader ID.
    pub const LOADER_UNDEFINED: u8 = 0xff;
}

/// Other `boot_params` fields.
mod zp {
    pub const SIZE: usize = 0x1000;
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const E820_TABLE: usize = 0x2d0;
    pub const E820_MAX: usize = 128;
    pub const E820_ENTRY_SIZE: usize = 20;
}

const SECTOR: usize = 512;
const DEFAULT_SETUP_SECTS: usize = 4;
const MIN_VERSION: u16 = 0x020c;
const VERSION_ACPI_RSDP: u16 = 0x020e;
/// `startup_64` sits 0x200 bytes into the protected-mode code.
const STARTUP_64_OFFSET: u64 = 0x200;

/// The validated facts of a bzImage's setup header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    pub version: u16,
    /// Byte offset of the protected-mode code in the file.
    pub kernel_offset: usize,
    pub pref_address: u64,
    pub kernel_alignment: u64,
    pub relocatable: bool,
    /// Memory the kernel needs from its load address, at least the code size.
    pub init_size: u64,
    pub cmdline_size: u32,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u64,
    pub xloadflags: u16,
    /// `[0x1f1, header_end)` of the file is copied into the zero page.
    header_end: usize,
}

impl SetupHeader {
    /// Parses and checks the header of `image`.
    pub fn parse(image: &[u8]) -> Result<Self, Error> {
        let u8_at = |o| image.u8_at(o).ok_or(Error::TooShort);
        let u16_at = |o| image.u16_at(o).ok_or(Error::TooShort);
        let u32_at = |o| image.u32_at(o).ok_or(Error::TooShort);
        if image.len() < hdr::HEADER + 4 {
            return Err(Error::TooShort);
        }
        if u16_at(hdr::BOOT_FLAG)? != hdr::BOOT_FLAG_MAGIC
            || image[hdr::HEADER..][..4] != *hdr::HEADER_MAGIC
        {
            return Err(Error::BadMagic);
        }
        let version = u16_at(hdr::VERSION)?;
        if version < MIN_VERSION {
            return Err(Error::ProtocolTooOld(version));
        }
        if image.len() < hdr::END_2_12 {
            return Err(Error::TooShort);
        }
        if u8_at(hdr::LOADFLAGS)? & hdr::LOADED_HIGH == 0 {
            return Err(Error::NotBzImage);
        }
        let xloadflags = u16_at(hdr::XLOADFLAGS)?;
        if xloadflags & hdr::XLF_KERNEL_64 == 0 {
            return Err(Error::No64BitEntry);
        }
        let setup_sects = match usize::from(u8_at(hdr::SETUP_SECTS)?) {
            0 => DEFAULT_SETUP_SECTS,
            n => n,
        };
        let kernel_offset = (setup_sects + 1) * SECTOR;
        if kernel_offset > image.len() {
            return Err(Error::SetupPastEnd);
        }
        let kernel_len = (image.len() - kernel_offset) as u64;
        if kernel_len == 0 {
            return Err(Error::NoKernel);
        }
        let payload_end =
            u64::from(u32_at(hdr::PAYLOAD_OFFSET)?) + u64::from(u32_at(hdr::PAYLOAD_LENGTH)?);
        if payload_end > kernel_len {
            return Err(Error::BadPayload);
        }
        let relocatable = u8_at(hdr::RELOCATABLE_KERNEL)? != 0;
        let kernel_alignment = u64::from(u32_at(hdr::KERNEL_ALIGNMENT)?);
        if relocatable && !kernel_alignment.is_power_of_two() {
            return Err(Error::BadAlignment);
        }
        let header_end = (hdr::HEADER + usize::from(u8_at(hdr::JUMP_LEN)?))
            .clamp(hdr::END_2_12, hdr::MAX_END)
            .min(kernel_offset);
        Ok(Self {
            version,
            kernel_offset,
            pref_address: image.u64_at(hdr::PREF_ADDRESS).ok_or(Error::TooShort)?,
            kernel_alignment,
            relocatable,
            init_size: u64::from(u32_at(hdr::INIT_SIZE)?).max(kernel_len),
            cmdline_size: u32_at(hdr::CMDLINE_SIZE)?,
            initrd_addr_max: u64::from(u32_at(hdr::INITRD_ADDR_MAX)?),
            xloadflags,
            header_end,
        })
    }

    /// Where the kernel goes: its preferred address if `init_size` bytes
    /// of RAM are there, else (if relocatable) the lowest aligned address
    /// from 1 MiB up that has them. `ram_len` caps what the map calls RAM.
    ///
    /// Linux's decompressor still works at `pref_address` (its
    /// LOAD_PHYSICAL_ADDR) when loaded lower, so in practice RAM must cover
    /// `pref_address + init_size` anyway; relocation serves other kernels.
    fn load_address(&self, e820: &[E820Entry], ram_len: u64) -> Result<u64, Error> {
        let pref = self.pref_address;
        let pref_fits = pref >= HIGH_RAM_START
            && pref
                .checked_add(self.init_size)
                .is_some_and(|end| end <= ram_len)
            && e820::is_ram(e820, pref, self.init_size);
        if pref_fits {
            return Ok(pref);
        }
        if !self.relocatable {
            return Err(Error::KernelDoesNotFit);
        }
        e820::lowest_fit(
            e820,
            self.init_size,
            HIGH_RAM_START,
            ram_len,
            self.kernel_alignment,
        )
        .ok_or(Error::KernelDoesNotFit)
    }

    /// The highest page-aligned initrd start in RAM above `floor`, ending
    /// at or below `initrd_addr_max + 1` and `ram_len`.
    fn initrd_address(
        &self,
        e820: &[E820Entry],
        size: u64,
        floor: u64,
        ram_len: u64,
    ) -> Result<u64, Error> {
        let top = self.initrd_addr_max.saturating_add(1).min(ram_len);
        e820::highest_fit(e820, size, floor, top, PAGE_SIZE).ok_or(Error::InitrdDoesNotFit)
    }
}

/// Where [`load`] put things, with the state to start the vCPU in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub state: BootState,
    pub kernel_addr: u64,
    /// `kernel_addr + init_size`: memory the kernel claims while it boots.
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Loads the bzImage `image` into `ram` and prepares the 64-bit entry:
/// zero page at [`low::ZERO_PAGE`], command line at [`low::CMDLINE`],
/// identity-mapped page tables and GDT (see [`cpu::long_mode`]).
pub fn load(ram: &mut [u8], image: &[u8], info: &BootInfo) -> Result<Loaded, Error> {
    let header = SetupHeader::parse(image)?;
    let ram_len = ram.len() as u64;

    if info.cmdline.contains(&0) {
        return Err(Error::CmdlineHasNul);
    }
    let cmdline_max = u64::from(header.cmdline_size).min(low::CMDLINE_MAX - 1);
    if info.cmdline.len() as u64 > cmdline_max {
        return Err(Error::CmdlineTooLong);
    }
    if info.e820.len() > zp::E820_MAX {
        return Err(Error::TooManyE820Entries);
    }

    let kernel_addr = header.load_address(info.e820, ram_len)?;
    let kernel_end = kernel_addr + header.init_size;
    let initrd = match info.initrd {
        Some(data) => {
            let size = data.len() as u64;
            Some((
                header.initrd_address(info.e820, size, kernel_end, ram_len)?,
                size,
            ))
        }
        None => None,
    };

    let mut state = cpu::long_mode(ram)?;
    // `parse` checked kernel_offset < image.len().
    ram::write(ram, kernel_addr, &image[header.kernel_offset..])?;
    if let (Some(data), Some((addr, _))) = (info.initrd, initrd) {
        ram::write(ram, addr, data)?;
    }
    ram::write(ram, low::CMDLINE, info.cmdline)?;
    ram::write(ram, low::CMDLINE + info.cmdline.len() as u64, &[0])?;

    let zero_page = build_zero_page(image, &header, info, kernel_addr, initrd);
    ram::write(ram, low::ZERO_PAGE, &zero_page)?;

    state.rip = kernel_addr + STARTUP_64_OFFSET;
    state.rsi = low::ZERO_PAGE;
    Ok(Loaded {
        state,
        kernel_addr,
        kernel_end,
        initrd,
    })
}

fn split(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

fn build_zero_page(
    image: &[u8],
    header: &SetupHeader,
    info: &BootInfo,
    kernel_addr: u64,
    initrd: Option<(u64, u64)>,
) -> Vec<u8> {
    let mut zp = vec![0u8; zp::SIZE];
    // `parse` checked header_end <= kernel_offset <= image.len().
    zp.put(
        hdr::START,
        image.get(hdr::START..header.header_end).unwrap_or_default(),
    );
    zp.put_u8(hdr::TYPE_OF_LOADER, hdr::LOADER_UNDEFINED);
    zp.put_u32(hdr::CODE32_START, kernel_addr as u32);

    let (lo, hi) = split(low::CMDLINE);
    zp.put_u32(hdr::CMD_LINE_PTR, lo);
    zp.put_u32(zp::EXT_CMD_LINE_PTR, hi);

    let (addr, size) = initrd.unwrap_or((0, 0));
    let ((addr_lo, addr_hi), (size_lo, size_hi)) = (split(addr), split(size));
    zp.put_u32(hdr::RAMDISK_IMAGE, addr_lo);
    zp.put_u32(zp::EXT_RAMDISK_IMAGE, addr_hi);
    zp.put_u32(hdr::RAMDISK_SIZE, size_lo);
    zp.put_u32(zp::EXT_RAMDISK_SIZE, size_hi);

    if let (Some(rsdp), true) = (info.rsdp, header.version >= VERSION_ACPI_RSDP) {
        zp.put_u64(zp::ACPI_RSDP_ADDR, rsdp);
    }

    zp.put_u8(zp::E820_ENTRIES, info.e820.len().min(zp::E820_MAX) as u8);
    for (i, e) in info.e820.iter().take(zp::E820_MAX).enumerate() {
        let at = zp::E820_TABLE + i * zp::E820_ENTRY_SIZE;
        zp.put_u64(at, e.addr);
        zp.put_u64(at + 8, e.size);
        zp.put_u32(at + 16, e.kind as u32);
    }
    zp
}
