//! PVH entry (Xen's `docs/misc/pvh.pandoc`, as Linux implements it): an
//! uncompressed ELF `vmlinux` is loaded by its program headers, and the
//! vCPU starts in 32-bit protected mode, paging off, at the address in the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note with EBX pointing at `hvm_start_info`.

use crate::BootInfo;
use alloc::vec::Vec;

use crate::cpu::{self, BootState};
use crate::e820;
use crate::layout::{low, HIGH_RAM_START, PAGE_SIZE};
use crate::ram::{self, Le, OutOfRam, PutLe};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The file ends inside the ELF header or the program header table.
    TooShort,
    /// Not an ELF file.
    BadMagic,
    /// Not a little-endian ELF64 executable for x86-64.
    NotX86_64Executable,
    /// `e_phentsize` is not the ELF64 program header size.
    BadProgramHeaderSize,
    /// A segment's file bytes lie outside the file, or exceed its size in memory.
    SegmentOutsideFile,
    /// A loadable segment is not wholly in guest RAM above 1 MiB.
    SegmentOutsideRam {
        paddr: u64,
        memsz: u64,
    },
    NoLoadableSegment,
    /// No `Xen` note of type `XEN_ELFNOTE_PHYS32_ENTRY`.
    NoPvhNote,
    /// The entry note's address is not 32-bit or lies in no loaded segment.
    BadEntry(u64),
    CmdlineTooLong,
    CmdlineHasNul,
    /// No page-aligned RAM for the initrd above the kernel.
    InitrdDoesNotFit,
    /// More memory-map entries than the start-info page holds.
    TooManyE820Entries,
    Ram(OutOfRam),
}

impl From<OutOfRam> for Error {
    fn from(e: OutOfRam) -> Self {
        Error::Ram(e)
    }
}

mod elf {
    pub const MAGIC: &[u8; 4] = b"\x7fELF";
    pub const CLASS: usize = 4;
    pub const CLASS_64: u8 = 2;
    pub const DATA: usize = 5;
    pub const DATA_LE: u8 = 1;
    pub const TYPE: usize = 0x10;
    pub const TYPE_EXEC: u16 = 2;
    pub const MACHINE: usize = 0x12;
    pub const MACHINE_X86_64: u16 = 62;
    pub const PHOFF: usize = 0x20;
    pub const PHENTSIZE: usize = 0x36;
    pub const PHNUM: usize = 0x38;
    pub const EHDR_SIZE: usize = 0x40;

    pub const PHDR_SIZE: usize = 56;
    pub const P_TYPE: usize = 0;
    pub const P_OFFSET: usize = 8;
    pub const P_PADDR: usize = 24;
    pub const P_FILESZ: usize = 32;
    pub const P_MEMSZ: usize = 40;
    pub const PT_LOAD: u32 = 1;
    pub const PT_NOTE: u32 = 4;

    pub const NOTE_HEADER: usize = 12;
    pub const XEN_NAME: &[u8] = b"Xen\0";
    pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
}

/// `struct hvm_start_info` and friends (xen/include/public/arch-x86/hvm/start_info.h).
mod si {
    pub const MAGIC: u32 = 0x336e_c578;
    pub const VERSION: u32 = 1;
    pub const SIZE: usize = 56;
    pub const OFF_MAGIC: usize = 0;
    pub const OFF_VERSION: usize = 4;
    pub const OFF_NR_MODULES: usize = 12;
    pub const OFF_MODLIST: usize = 16;
    pub const OFF_CMDLINE: usize = 24;
    pub const OFF_RSDP: usize = 32;
    pub const OFF_MEMMAP: usize = 40;
    pub const OFF_MEMMAP_ENTRIES: usize = 48;
    pub const MODLIST_ENTRY_SIZE: usize = 32;
    pub const MEMMAP_ENTRY_SIZE: usize = 24;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// A checked view of a `vmlinux`: its loadable segments and PVH entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vmlinux {
    segments: Vec<Segment>,
    /// The 32-bit PVH entry point.
    pub entry: u32,
}

fn program_headers(image: &[u8]) -> Result<impl Iterator<Item = &[u8]>, Error> {
    if image.len() < elf::EHDR_SIZE {
        return Err(Error::TooShort);
    }
    if image[..4] != *elf::MAGIC {
        return Err(Error::BadMagic);
    }
    let is_x86_64_exec = image[elf::CLASS] == elf::CLASS_64
        && image[elf::DATA] == elf::DATA_LE
        && image.u16_at(elf::TYPE) == Some(elf::TYPE_EXEC)
        && image.u16_at(elf::MACHINE) == Some(elf::MACHINE_X86_64);
    if !is_x86_64_exec {
        return Err(Error::NotX86_64Executable);
    }
    if image.u16_at(elf::PHENTSIZE) != Some(elf::PHDR_SIZE as u16) {
        return Err(Error::BadProgramHeaderSize);
    }
    let count = usize::from(image.u16_at(elf::PHNUM).ok_or(Error::TooShort)?);
    let table = image
        .u64_at(elf::PHOFF)
        .and_then(|off| usize::try_from(off).ok())
        .and_then(|off| image.get(off..off.checked_add(count * elf::PHDR_SIZE)?))
        .ok_or(Error::TooShort)?;
    Ok(table.chunks_exact(elf::PHDR_SIZE))
}

/// The file bytes `[offset, offset + len)`, if inside `image`.
fn file_range(image: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    image.get(start..start.checked_add(usize::try_from(len).ok()?)?)
}

/// The PHYS32_ENTRY address in one PT_NOTE segment's bytes.
fn find_pvh_note(mut notes: &[u8]) -> Option<u64> {
    let padded = |n: u32| usize::try_from(n).ok()?.checked_next_multiple_of(4);
    while notes.len() >= elf::NOTE_HEADER {
        let namesz = notes.u32_at(0)?;
        let descsz = notes.u32_at(4)?;
        let kind = notes.u32_at(8)?;
        let name_end = elf::NOTE_HEADER.checked_add(padded(namesz)?)?;
        let desc_end = name_end.checked_add(padded(descsz)?)?;
        let name = notes.get(elf::NOTE_HEADER..elf::NOTE_HEADER.checked_add(namesz as usize)?)?;
        let desc = notes.get(name_end..name_end.checked_add(descsz as usize)?)?;
        if name == elf::XEN_NAME && kind == elf::XEN_ELFNOTE_PHYS32_ENTRY {
            // Linux stores a pointer-sized value; 4 bytes is as valid.
            return match desc.len() {
                4 => desc.u32_at(0).map(u64::from),
                8 => desc.u64_at(0),
                _ => None,
            };
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

impl Vmlinux {
    /// Parses and checks the ELF headers of `image`.
    pub fn parse(image: &[u8]) -> Result<Self, Error> {
        let mut segments = Vec::new();
        let mut entry = None;
        for ph in program_headers(image)? {
            let field = |off| ph.u64_at(off).ok_or(Error::TooShort);
            let kind = ph.u32_at(elf::P_TYPE).ok_or(Error::TooShort)?;
            let (offset, filesz) = (field(elf::P_OFFSET)?, field(elf::P_FILESZ)?);
            match kind {
                elf::PT_LOAD => {
                    let seg = Segment {
                        offset,
                        paddr: field(elf::P_PADDR)?,
                        filesz,
                        memsz: field(elf::P_MEMSZ)?,
                    };
                    if file_range(image, offset, filesz).is_none() || filesz > seg.memsz {
                        return Err(Error::SegmentOutsideFile);
                    }
                    segments.push(seg);
                }
                elf::PT_NOTE if entry.is_none() => {
                    let notes =
                        file_range(image, offset, filesz).ok_or(Error::SegmentOutsideFile)?;
                    entry = find_pvh_note(notes);
                }
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(Error::NoLoadableSegment);
        }
        let entry = entry.ok_or(Error::NoPvhNote)?;
        let in_segment = segments
            .iter()
            .any(|s| s.paddr <= entry && entry - s.paddr < s.memsz);
        match u32::try_from(entry) {
            Ok(e) if in_segment => Ok(Self { segments, entry: e }),
            _ => Err(Error::BadEntry(entry)),
        }
    }

    /// One past the highest byte the segments occupy.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.paddr.saturating_add(s.memsz))
            .max()
            .unwrap_or(0)
    }
}

/// Where [`load`] put things, with the state to start the vCPU in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub state: BootState,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Loads the ELF `image` by its physical addresses, writes `hvm_start_info`
/// (at [`low::PVH_START_INFO`], module list and memory map after it) and
/// the command line, and returns the PVH entry state.
pub fn load(ram: &mut [u8], image: &[u8], info: &BootInfo) -> Result<Loaded, Error> {
    let kernel = Vmlinux::parse(image)?;
    let ram_len = ram.len() as u64;

    if info.cmdline.contains(&0) {
        return Err(Error::CmdlineHasNul);
    }
    if info.cmdline.len() as u64 >= low::CMDLINE_MAX {
        return Err(Error::CmdlineTooLong);
    }
    let memmap_at = low::PVH_START_INFO + (si::SIZE + si::MODLIST_ENTRY_SIZE) as u64;
    let memmap_room = (low::PVH_INFO_END - memmap_at) as usize / si::MEMMAP_ENTRY_SIZE;
    if info.e820.len() > memmap_room {
        return Err(Error::TooManyE820Entries);
    }
    for s in &kernel.segments {
        let in_ram = s.paddr >= HIGH_RAM_START
            && s.paddr
                .checked_add(s.memsz)
                .is_some_and(|end| end <= ram_len)
            && e820::is_ram(info.e820, s.paddr, s.memsz);
        if !in_ram {
            return Err(Error::SegmentOutsideRam {
                paddr: s.paddr,
                memsz: s.memsz,
            });
        }
    }
    let kernel_end = kernel.end();
    let initrd = match info.initrd {
        Some(data) => {
            let size = data.len() as u64;
            let at = e820::highest_fit(info.e820, size, kernel_end, ram_len, PAGE_SIZE);
            Some((at.ok_or(Error::InitrdDoesNotFit)?, size))
        }
        None => None,
    };

    for s in &kernel.segments {
        // `parse` checked the file range; `in_ram` above the memory range.
        let bytes = file_range(image, s.offset, s.filesz).unwrap_or_default();
        ram::write(ram, s.paddr, bytes)?;
        ram::zero(ram, s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    if let (Some(data), Some((addr, _))) = (info.initrd, initrd) {
        ram::write(ram, addr, data)?;
    }
    ram::write(ram, low::CMDLINE, info.cmdline)?;
    ram::write(ram, low::CMDLINE + info.cmdline.len() as u64, &[0])?;

    let modlist_at = low::PVH_START_INFO + si::SIZE as u64;
    let mut start_info = [0u8; si::SIZE + si::MODLIST_ENTRY_SIZE];
    start_info.put_u32(si::OFF_MAGIC, si::MAGIC);
    start_info.put_u32(si::OFF_VERSION, si::VERSION);
    start_info.put_u64(si::OFF_CMDLINE, low::CMDLINE);
    start_info.put_u64(si::OFF_RSDP, info.rsdp.unwrap_or(0));
    start_info.put_u64(si::OFF_MEMMAP, memmap_at);
    start_info.put_u32(si::OFF_MEMMAP_ENTRIES, info.e820.len() as u32);
    if let Some((addr, size)) = initrd {
        start_info.put_u32(si::OFF_NR_MODULES, 1);
        start_info.put_u64(si::OFF_MODLIST, modlist_at);
        start_info.put_u64(si::SIZE, addr);
        start_info.put_u64(si::SIZE + 8, size);
    }
    ram::write(ram, low::PVH_START_INFO, &start_info)?;
    let mut memmap = Vec::with_capacity(info.e820.len() * si::MEMMAP_ENTRY_SIZE);
    for e in info.e820 {
        memmap.extend_from_slice(&e.addr.to_le_bytes());
        memmap.extend_from_slice(&e.size.to_le_bytes());
        memmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    ram::write(ram, memmap_at, &memmap)?;

    let mut state = cpu::protected_mode(ram)?;
    state.rip = kernel.entry.into();
    state.rbx = low::PVH_START_INFO;
    Ok(Loaded {
        state,
        kernel_end,
        initrd,
    })
}
