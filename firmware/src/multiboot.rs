//! Multiboot v1 (the Multiboot Specification 0.6.96), as QEMU's `-kernel`
//! and GRUB's `multiboot` load it: a header in the first 8 KiB of the file
//! says where the kernel goes — by its own address fields (the "a.out
//! kludge", flag bit 16) or, without them, by the ELF program headers —
//! the modules follow it page-aligned, each with its command line, and the
//! vCPU starts in 32-bit protected mode, paging off, flat segments, with
//! EAX = [`BOOTLOADER_MAGIC`] and EBX = the Multiboot information
//! structure.
//!
//! Where this differs from QEMU: QEMU refuses an ELF64 file without the
//! a.out kludge; GRUB loads one by its physical addresses, and so does
//! this loader. The kernel's command line is passed as given (QEMU and
//! GRUB put the kernel's file name in front; the VMM has no file name).
//! Everything the kernel is loaded into must be RAM from 1 MiB up: below
//! that lie the boot structures.

use alloc::vec::Vec;
use core::fmt;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};

use crate::cpu::{self, BootState};
use crate::e820::{self, E820Entry, E820Type};
use crate::layout::{low, HIGH_RAM_START, KIB, PAGE_SIZE};
use crate::ram::{self, Le, OutOfRam, PutLe};

/// The header's first word.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What EAX holds at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies 4-byte aligned in the file's first 8 KiB.
pub const SEARCH_LEN: usize = 8192;
const HEADER_ALIGN: usize = 4;
/// `e_ident[EI_CLASS]`.
const ELF_CLASS: usize = 4;

/// Header flags. Bits 0-15 are requirements: a loader that does not know
/// one must refuse the kernel.
pub mod flags {
    /// Modules page-aligned (always so here).
    pub const PAGE_ALIGN: u32 = 1 << 0;
    /// mem_lower/mem_upper and the memory map wanted (always given).
    pub const MEMORY_INFO: u32 = 1 << 1;
    /// A video mode wanted. QEMU only warns and boots; so does this
    /// loader, giving no video information.
    pub const VIDEO_MODE: u32 = 1 << 2;
    /// The address fields of the header are valid (the a.out kludge).
    pub const AOUT_KLUDGE: u32 = 1 << 16;
    pub const REQUIRED: u32 = 0xffff;
    pub const KNOWN_REQUIRED: u32 = PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE;
}

/// Offsets of the header fields, from the magic.
mod hdr {
    pub const FLAGS: usize = 4;
    pub const CHECKSUM: usize = 8;
    pub const HEADER_ADDR: usize = 12;
    pub const LOAD_ADDR: usize = 16;
    pub const LOAD_END_ADDR: usize = 20;
    pub const BSS_END_ADDR: usize = 24;
    pub const ENTRY_ADDR: usize = 28;
    /// With the address fields.
    pub const KLUDGE_LEN: usize = 32;
}

/// The Multiboot information structure and what it points to.
pub mod info {
    pub const FLAGS: usize = 0;
    pub const MEM_LOWER: usize = 4;
    pub const MEM_UPPER: usize = 8;
    pub const CMDLINE: usize = 16;
    pub const MODS_COUNT: usize = 20;
    pub const MODS_ADDR: usize = 24;
    pub const MMAP_LENGTH: usize = 44;
    pub const MMAP_ADDR: usize = 48;
    pub const BOOT_LOADER_NAME: usize = 64;
    /// Up to and with the VBE fields (the framebuffer fields are not given).
    pub const SIZE: usize = 88;

    pub const HAS_MEMORY: u32 = 1 << 0;
    pub const HAS_CMDLINE: u32 = 1 << 2;
    pub const HAS_MODS: u32 = 1 << 3;
    pub const HAS_MMAP: u32 = 1 << 6;
    pub const HAS_BOOT_LOADER_NAME: u32 = 1 << 9;

    /// A module entry: mod_start, mod_end (exclusive), string, reserved.
    pub const MODULE_SIZE: usize = 16;
    /// A memory map entry: size (of the rest, 20), base, length, type.
    pub const MMAP_ENTRY_SIZE: usize = 24;
    pub const MMAP_ENTRY_REST: u32 = 20;
}

/// Where the information structure and its tables go: this page and the
/// next (the Linux zero page's, unused on this path), below the stack.
pub const INFO_AT: u64 = low::PVH_START_INFO;
const INFO_END: u64 = low::PVH_START_INFO + 2 * PAGE_SIZE;
const BOOT_LOADER_NAME: &[u8] = b"moat\0";
/// Room kept for the boot loader's name after the structure.
const NAME_ROOM: u64 = 16;
/// Lower memory as Multiboot counts it ends at 640 KiB.
const LOWER_MEMORY_END: u64 = 640 * KIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No header magic, 4-byte aligned, in the first 8 KiB.
    NoHeader,
    /// magic + flags + checksum is not 0 (mod 2^32).
    BadChecksum {
        flags: u32,
        checksum: u32,
    },
    /// Requirement bits (0-15) this loader does not know.
    UnsupportedFlags(u32),
    /// The header's address fields reach past the end of the file.
    HeaderTruncated,
    /// The address fields contradict each other: `header_addr` below
    /// `load_addr`, the load start before the file's start, an end below
    /// its start.
    BadAddresses,
    /// The file is shorter than the part the header says to load.
    ImageTruncated {
        needed: u64,
        size: u64,
    },
    /// No a.out kludge and not an ELF file.
    NotElf,
    /// An ELF file, but not a little-endian x86 executable with loadable
    /// segments inside the file.
    BadElf(&'static str),
    /// Something the kernel is loaded into is not RAM from 1 MiB up.
    OutsideRam {
        start: u64,
        end: u64,
    },
    /// The entry point lies in nothing that is loaded (or above 4 GiB).
    EntryOutsideImage(u64),
    /// No RAM above the kernel for this module (index from 0).
    ModuleDoesNotFit(usize),
    /// More modules than the information pages hold.
    TooManyModules,
    /// The command lines together exceed their 64 KiB area.
    CmdlineTooLong,
    /// A command line contains a NUL byte.
    CmdlineHasNul,
    /// More memory-map entries than the information pages hold.
    TooManyE820Entries,
    Ram(OutOfRam),
}

impl From<OutOfRam> for Error {
    fn from(e: OutOfRam) -> Self {
        Error::Ram(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::NoHeader => write!(f, "no Multiboot header in the first 8 KiB"),
            Error::BadChecksum { flags, checksum } => write!(
                f,
                "Multiboot header checksum wrong (flags {flags:#x}, checksum {checksum:#x}: \
                 magic + flags + checksum must be 0)"
            ),
            Error::UnsupportedFlags(bits) => write!(
                f,
                "Multiboot header requires features this loader does not have (flags {bits:#x})"
            ),
            Error::HeaderTruncated => {
                write!(
                    f,
                    "Multiboot header's address fields reach past the end of the file"
                )
            }
            Error::BadAddresses => write!(
                f,
                "Multiboot header's address fields contradict each other or the file \
                 (header_addr, load_addr, load_end_addr, bss_end_addr)"
            ),
            Error::ImageTruncated { needed, size } => write!(
                f,
                "kernel file truncated: the header loads {needed} bytes, the file has {size}"
            ),
            Error::NotElf => write!(
                f,
                "Multiboot header without load addresses (flag 16), and not an ELF file"
            ),
            Error::BadElf(why) => write!(f, "Multiboot ELF kernel: {why}"),
            Error::OutsideRam { start, end } => write!(
                f,
                "kernel load addresses {start:#x}..{end:#x} outside guest RAM \
                 (it must be loaded into RAM from 1 MiB up)"
            ),
            Error::EntryOutsideImage(entry) => {
                write!(f, "entry point {entry:#x} outside the loaded kernel image")
            }
            Error::ModuleDoesNotFit(index) => {
                write!(
                    f,
                    "module {index} does not fit in guest RAM above the kernel"
                )
            }
            Error::TooManyModules => write!(f, "too many modules"),
            Error::CmdlineTooLong => write!(f, "command lines longer than 64 KiB together"),
            Error::CmdlineHasNul => write!(f, "a command line contains a NUL byte"),
            Error::TooManyE820Entries => write!(f, "memory map too long"),
            Error::Ram(OutOfRam { addr, len }) => {
                write!(f, "write of {len} bytes at {addr:#x} outside guest RAM")
            }
        }
    }
}

/// The checked header: its flags and, with the a.out kludge, its fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the magic in the file.
    pub offset: usize,
    pub flags: u32,
    pub kludge: Option<Kludge>,
}

/// The a.out kludge's address fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kludge {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// The offset of the first header magic in `image`, if any.
pub fn find_magic(image: &[u8]) -> Option<usize> {
    let window = &image[..image.len().min(SEARCH_LEN)];
    (0..window.len())
        .step_by(HEADER_ALIGN)
        .find(|&off| window.u32_at(off) == Some(HEADER_MAGIC))
}

impl Header {
    /// Finds and checks the header of `image`.
    pub fn parse(image: &[u8]) -> Result<Self, Error> {
        let offset = find_magic(image).ok_or(Error::NoHeader)?;
        let field = |at: usize| image.u32_at(offset + at).ok_or(Error::HeaderTruncated);
        let flags = field(hdr::FLAGS)?;
        let checksum = field(hdr::CHECKSUM)?;
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            return Err(Error::BadChecksum { flags, checksum });
        }
        let unknown = flags & flags::REQUIRED & !flags::KNOWN_REQUIRED;
        if unknown != 0 {
            return Err(Error::UnsupportedFlags(unknown));
        }
        let kludge = if flags & flags::AOUT_KLUDGE != 0 {
            if image.len() < offset + hdr::KLUDGE_LEN {
                return Err(Error::HeaderTruncated);
            }
            Some(Kludge {
                header_addr: field(hdr::HEADER_ADDR)?,
                load_addr: field(hdr::LOAD_ADDR)?,
                load_end_addr: field(hdr::LOAD_END_ADDR)?,
                bss_end_addr: field(hdr::BSS_END_ADDR)?,
                entry_addr: field(hdr::ENTRY_ADDR)?,
            })
        } else {
            None
        };
        Ok(Self {
            offset,
            flags,
            kludge,
        })
    }
}

/// A piece of the file copied to a physical address, zero-filled up to
/// `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.paddr.saturating_add(self.memsz)
    }

    fn contains(&self, addr: u64) -> bool {
        self.paddr <= addr && addr < self.end()
    }
}

/// A checked Multiboot kernel: what to copy where, and the entry point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub header: Header,
    pub segments: Vec<Segment>,
    pub entry: u32,
}

impl Kernel {
    /// Parses `image`: the header, then the load plan from the header's
    /// address fields or the ELF program headers. Nothing here looks at
    /// RAM; [`load`] checks the plan against the memory map.
    pub fn parse(image: &[u8]) -> Result<Self, Error> {
        let header = Header::parse(image)?;
        let (segments, entry) = match header.kludge {
            Some(k) => kludge_plan(image, header.offset, &k)?,
            None => elf_plan(image)?,
        };
        let entry_in_image = segments.iter().any(|s| s.contains(entry));
        match u32::try_from(entry) {
            Ok(e) if entry_in_image => Ok(Self {
                header,
                segments,
                entry: e,
            }),
            _ => Err(Error::EntryOutsideImage(entry)),
        }
    }

    /// One past the highest byte the kernel occupies.
    pub fn end(&self) -> u64 {
        self.segments.iter().map(Segment::end).max().unwrap_or(0)
    }
}

/// The a.out kludge: the file from `header_offset - (header_addr -
/// load_addr)` goes to `load_addr`, up to `load_end_addr` (0: the end of
/// the file), then zeroes up to `bss_end_addr` (0: none).
fn kludge_plan(
    image: &[u8],
    header_offset: usize,
    k: &Kludge,
) -> Result<(Vec<Segment>, u64), Error> {
    let (header, load) = (u64::from(k.header_addr), u64::from(k.load_addr));
    let before_header = header.checked_sub(load).ok_or(Error::BadAddresses)?;
    let offset = (header_offset as u64)
        .checked_sub(before_header)
        .ok_or(Error::BadAddresses)?;
    let file_len = image.len() as u64;
    let filesz = match k.load_end_addr {
        0 => file_len - offset,
        end => u64::from(end)
            .checked_sub(load)
            .ok_or(Error::BadAddresses)?,
    };
    if offset + filesz > file_len {
        return Err(Error::ImageTruncated {
            needed: offset + filesz,
            size: file_len,
        });
    }
    let memsz = match k.bss_end_addr {
        0 => filesz,
        end => u64::from(end)
            .checked_sub(load)
            .filter(|&size| size >= filesz)
            .ok_or(Error::BadAddresses)?,
    };
    let segment = Segment {
        offset,
        paddr: load,
        filesz,
        memsz,
    };
    Ok((alloc::vec![segment], u64::from(k.entry_addr)))
}

/// Without the kludge: an ELF32 (i386) or ELF64 (x86-64) executable,
/// loaded by its program headers' physical addresses. The entry point is
/// `e_entry` moved from the virtual to the physical address of the
/// segment holding it, as GRUB does.
fn elf_plan(image: &[u8]) -> Result<(Vec<Segment>, u64), Error> {
    if image.get(..elf::ELFMAG.len()) != Some(&elf::ELFMAG[..]) {
        return Err(Error::NotElf);
    }
    match image.get(ELF_CLASS).copied().map(elf::FileClass) {
        Some(elf::ELFCLASS32) => {
            elf_plan_of::<elf::FileHeader32<object::Endianness>>(image, elf::EM_386)
        }
        Some(elf::ELFCLASS64) => {
            elf_plan_of::<elf::FileHeader64<object::Endianness>>(image, elf::EM_X86_64)
        }
        _ => Err(Error::BadElf("neither ELF32 nor ELF64")),
    }
}

fn elf_plan_of<H: FileHeader<Endian = object::Endianness>>(
    image: &[u8],
    machine: elf::Machine,
) -> Result<(Vec<Segment>, u64), Error> {
    let header = H::parse(image).map_err(|_| Error::BadElf("header truncated or malformed"))?;
    let endian = header
        .endian()
        .ok()
        .filter(|e| *e == object::Endianness::Little)
        .ok_or(Error::BadElf("not little-endian"))?;
    if header.e_machine(endian) != machine {
        return Err(Error::BadElf(
            "not for x86 (i386 for ELF32, x86-64 for ELF64)",
        ));
    }
    if header.e_type(endian) != elf::ET_EXEC {
        return Err(Error::BadElf("not an executable"));
    }
    let phdrs = header
        .program_headers(endian, image)
        .map_err(|_| Error::BadElf("program headers outside the file"))?;
    let mut segments = Vec::new();
    let mut entry: u64 = header.e_entry(endian).into();
    let mut entry_moved = false;
    for ph in phdrs.iter().filter(|ph| ph.p_type(endian) == elf::PT_LOAD) {
        let (offset, filesz) = ph.file_range(endian);
        let segment = Segment {
            offset,
            paddr: ph.p_paddr(endian).into(),
            filesz,
            memsz: ph.p_memsz(endian).into(),
        };
        if ph.data(endian, image).is_err() {
            return Err(Error::BadElf("a segment lies outside the file"));
        }
        if segment.filesz > segment.memsz {
            return Err(Error::BadElf(
                "a segment's file size exceeds its memory size",
            ));
        }
        let vaddr: u64 = ph.p_vaddr(endian).into();
        if !entry_moved && vaddr <= entry && entry - vaddr < segment.memsz {
            entry = segment.paddr.saturating_add(entry - vaddr);
            entry_moved = true;
        }
        segments.push(segment);
    }
    if segments.is_empty() {
        return Err(Error::BadElf("no loadable segment"));
    }
    Ok((segments, entry))
}

/// A boot module: its bytes and its command line (without NUL).
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    pub bytes: &'a [u8],
    pub cmdline: &'a [u8],
}

/// Where [`load`] put things, with the state to start the vCPU in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub state: BootState,
    pub kernel_end: u64,
    /// `[start, end)` of each module.
    pub modules: Vec<(u64, u64)>,
}

/// Loads the Multiboot kernel `image` with `modules` into `ram`, writes the
/// information structure at [`INFO_AT`] (module list, memory map and the
/// loader's name after it) and the command lines at [`low::CMDLINE`], and
/// returns the entry state.
pub fn load(
    ram: &mut [u8],
    image: &[u8],
    cmdline: &[u8],
    modules: &[Module],
    e820: &[E820Entry],
) -> Result<Loaded, Error> {
    let kernel = Kernel::parse(image)?;
    let ram_len = ram.len() as u64;
    for s in &kernel.segments {
        let in_ram = s.paddr >= HIGH_RAM_START
            && s.paddr
                .checked_add(s.memsz)
                .is_some_and(|end| end <= ram_len)
            && e820::is_ram(e820, s.paddr, s.memsz);
        if !in_ram {
            return Err(Error::OutsideRam {
                start: s.paddr,
                end: s.paddr.saturating_add(s.memsz),
            });
        }
    }
    let overlapping = kernel.segments.iter().enumerate().any(|(i, a)| {
        kernel.segments[i + 1..]
            .iter()
            .any(|b| a.paddr < b.end() && b.paddr < a.end())
    });
    if overlapping {
        return Err(Error::BadElf("loadable segments overlap"));
    }

    // The information pages: structure, name, memory map, module list.
    let name_at = INFO_AT + info::SIZE as u64;
    let mmap_at = name_at + NAME_ROOM;
    let mmap_len = e820.len() * info::MMAP_ENTRY_SIZE;
    let mods_at = (mmap_at + mmap_len as u64).next_multiple_of(16);
    if mods_at > INFO_END {
        return Err(Error::TooManyE820Entries);
    }
    if modules.len() as u64 > (INFO_END - mods_at) / info::MODULE_SIZE as u64 {
        return Err(Error::TooManyModules);
    }

    // Command lines: the kernel's, then each module's, NUL-terminated.
    let lines = core::iter::once(cmdline).chain(modules.iter().map(|m| m.cmdline));
    let mut line_at = Vec::with_capacity(modules.len() + 1);
    let mut text = Vec::new();
    for line in lines {
        if line.contains(&0) {
            return Err(Error::CmdlineHasNul);
        }
        line_at.push(low::CMDLINE + text.len() as u64);
        text.extend_from_slice(line);
        text.push(0);
    }
    if text.len() as u64 > low::CMDLINE_MAX {
        return Err(Error::CmdlineTooLong);
    }

    // Modules: page-aligned, in order, in RAM above the kernel.
    let mut placed = Vec::with_capacity(modules.len());
    let mut floor = kernel.end();
    for (index, m) in modules.iter().enumerate() {
        let size = m.bytes.len() as u64;
        let at = e820::lowest_fit(e820, size.max(1), floor, ram_len, PAGE_SIZE)
            .ok_or(Error::ModuleDoesNotFit(index))?;
        placed.push((at, at + size));
        floor = at + size;
    }

    for s in &kernel.segments {
        // `parse` checked the file range, the loop above the memory range.
        let start = usize::try_from(s.offset).unwrap_or(usize::MAX);
        let bytes = usize::try_from(s.filesz)
            .ok()
            .and_then(|len| image.get(start..start.checked_add(len)?))
            .unwrap_or_default();
        ram::write(ram, s.paddr, bytes)?;
        ram::zero(ram, s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    for (m, &(at, _)) in modules.iter().zip(&placed) {
        ram::write(ram, at, m.bytes)?;
    }
    ram::write(ram, low::CMDLINE, &text)?;

    let mut list = alloc::vec![0u8; modules.len() * info::MODULE_SIZE];
    for (i, &(start, end)) in placed.iter().enumerate() {
        let entry = i * info::MODULE_SIZE;
        // RAM ends below 4 GiB on this path (`in_ram`, `lowest_fit`).
        list.put_u32(entry, start as u32);
        list.put_u32(entry + 4, end as u32);
        list.put_u32(entry + 8, line_at[i + 1] as u32);
    }
    ram::write(ram, mods_at, &list)?;

    let mut mmap = Vec::with_capacity(mmap_len);
    for e in e820 {
        mmap.extend_from_slice(&info::MMAP_ENTRY_REST.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    ram::write(ram, mmap_at, &mmap)?;
    ram::write(ram, name_at, BOOT_LOADER_NAME)?;

    let (mem_lower, mem_upper) = memory_sizes(e820);
    let mut structure = [0u8; info::SIZE];
    let mut present = info::HAS_MEMORY | info::HAS_CMDLINE | info::HAS_MMAP;
    present |= info::HAS_BOOT_LOADER_NAME;
    if !modules.is_empty() {
        present |= info::HAS_MODS;
    }
    structure.put_u32(info::FLAGS, present);
    structure.put_u32(info::MEM_LOWER, mem_lower);
    structure.put_u32(info::MEM_UPPER, mem_upper);
    structure.put_u32(info::CMDLINE, line_at[0] as u32);
    structure.put_u32(info::MODS_COUNT, modules.len() as u32);
    structure.put_u32(info::MODS_ADDR, mods_at as u32);
    structure.put_u32(info::MMAP_LENGTH, mmap_len as u32);
    structure.put_u32(info::MMAP_ADDR, mmap_at as u32);
    structure.put_u32(info::BOOT_LOADER_NAME, name_at as u32);
    ram::write(ram, INFO_AT, &structure)?;

    let mut state = cpu::protected_mode(ram)?;
    state.rip = kernel.entry.into();
    state.rax = BOOTLOADER_MAGIC.into();
    state.rbx = INFO_AT;
    Ok(Loaded {
        state,
        kernel_end: kernel.end(),
        modules: placed,
    })
}

/// `mem_lower` and `mem_upper` in KiB: RAM from 0 (at most 640 KiB), and
/// RAM from 1 MiB up to the first hole.
fn memory_sizes(e820: &[E820Entry]) -> (u32, u32) {
    let ram_from = |at: u64| {
        e820.iter()
            .find(|e| e.kind == E820Type::Ram && e.addr <= at && at < e.addr.saturating_add(e.size))
            .map_or(0, |e| e.addr.saturating_add(e.size) - at)
    };
    let lower = ram_from(0).min(LOWER_MEMORY_END) / KIB;
    let upper = ram_from(HIGH_RAM_START) / KIB;
    (lower as u32, u32::try_from(upper).unwrap_or(u32::MAX))
}
