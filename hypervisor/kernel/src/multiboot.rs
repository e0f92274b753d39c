//! The Multiboot v1 information structure the bootloader leaves in physical
//! memory.
//!
//! Parsing copies what the kernel needs (memory map, modules) into fixed
//! arrays and checks every pointer and string once, so later code works on
//! validated values. Strings stay in physical memory as [`PhysStr`] and are
//! read with [`read_str`]. All addresses in the structure are 32-bit.

use core::fmt;

use crate::frame::PhysRange;

pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
pub const MAX_REGIONS: usize = 64;
pub const MAX_MODULES: usize = 16;
/// Strings must end with a NUL within this many bytes.
pub const MAX_STRING: usize = 4096;

/// Bytes of the information structure, up to and including the framebuffer
/// fields of the 0.6.96 specification.
const INFO_SIZE: u64 = 116;
/// Bytes of the structure this parser reads (through `mmap_addr`).
const INFO_READ: usize = 52;
const MODULE_SIZE: u64 = 16;
/// `base_addr`, `length` and `type` of a memory map entry.
const MMAP_ENTRY_MIN: u32 = 20;

const FLAG_MEMORY: u32 = 1 << 0;
const FLAG_CMDLINE: u32 = 1 << 2;
const FLAG_MODS: u32 = 1 << 3;
const FLAG_MMAP: u32 = 1 << 6;

/// How the parser reaches physical memory.
pub trait PhysRead {
    /// Fills `buf` from `[phys, phys + buf.len())`; `Err` if any of it lies
    /// outside readable memory (including a range that wraps around).
    fn read(&self, phys: u64, buf: &mut [u8]) -> Result<(), Unreadable>;
}

/// A physical range that a [`PhysRead`] cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unreadable;

/// A NUL-terminated string in physical memory, checked to be UTF-8 at parse
/// time. `len` excludes the NUL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysStr {
    pub addr: u64,
    pub len: usize,
}

impl PhysStr {
    /// The bytes it occupies, NUL included.
    pub fn range(&self) -> PhysRange {
        PhysRange::new(
            self.addr,
            self.addr.saturating_add(self.len as u64).saturating_add(1),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Usable,
    AcpiReclaimable,
    Nvs,
    Bad,
    Reserved(u32),
}

impl RegionKind {
    fn from_type(kind: u32) -> Self {
        match kind {
            1 => Self::Usable,
            3 => Self::AcpiReclaimable,
            4 => Self::Nvs,
            5 => Self::Bad,
            other => Self::Reserved(other),
        }
    }
}

/// A memory map entry; `start + len` does not overflow and `len` is not 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub len: u64,
    pub kind: RegionKind,
}

impl MemoryRegion {
    pub fn range(&self) -> PhysRange {
        PhysRange::new(self.start, self.start.saturating_add(self.len))
    }
}

/// A boot module occupying `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    pub cmdline: Option<PhysStr>,
}

impl Module {
    pub fn range(&self) -> PhysRange {
        PhysRange::new(self.start, self.end)
    }
}

/// What is wrong with the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmapDefect {
    /// `mmap_length` is 0.
    Empty,
    /// An entry's `size` field is below the 20 bytes of an entry.
    EntryTooSmall(u32),
    /// An entry (or its `size` field) runs past `mmap_length`.
    EntryOverrunsMap,
    /// `base + length` wraps past the top of the address space.
    RegionWraps,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultibootError {
    BadMagic(u32),
    /// Part of the information structure lies outside readable memory.
    Unreadable(u64),
    /// The bootloader passed no memory map (flag 6 unset).
    NoMemoryMap,
    /// The entry at byte `offset` of the memory map is malformed.
    BadMemoryMap {
        offset: u64,
        defect: MmapDefect,
    },
    /// Module `index` ends before it starts.
    BadModule {
        index: usize,
        start: u64,
        end: u64,
    },
    TooManyModules(u32),
    /// No NUL within `MAX_STRING` bytes of the string at this address.
    StringTooLong(u64),
    StringNotUtf8(u64),
    StringUnreadable(u64),
    /// `read_str` was given a buffer smaller than the string.
    BufferTooSmall {
        needed: usize,
        available: usize,
    },
}

impl fmt::Display for MultibootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadMagic(magic) => write!(
                f,
                "bootloader magic is {magic:#x}, not {BOOTLOADER_MAGIC:#x}: \
                 not loaded by a Multiboot v1 bootloader"
            ),
            Self::Unreadable(addr) => write!(
                f,
                "multiboot information at {addr:#x} is outside readable memory"
            ),
            Self::NoMemoryMap => write!(f, "the bootloader passed no memory map"),
            Self::BadMemoryMap { offset, defect } => {
                write!(f, "memory map entry at offset {offset}: ")?;
                match defect {
                    MmapDefect::Empty => write!(f, "the map is empty"),
                    MmapDefect::EntryTooSmall(size) => {
                        write!(f, "size {size} is below the {MMAP_ENTRY_MIN}-byte minimum")
                    }
                    MmapDefect::EntryOverrunsMap => {
                        write!(f, "runs past the end of the map")
                    }
                    MmapDefect::RegionWraps => {
                        write!(f, "region wraps past the top of the address space")
                    }
                }
            }
            Self::BadModule { index, start, end } => write!(
                f,
                "module {index} ends at {end:#x}, before its start {start:#x}"
            ),
            Self::TooManyModules(count) => write!(
                f,
                "{count} boot modules, at most {MAX_MODULES} are supported"
            ),
            Self::StringTooLong(addr) => write!(
                f,
                "string at {addr:#x} has no terminating NUL within {MAX_STRING} bytes"
            ),
            Self::StringNotUtf8(addr) => write!(f, "string at {addr:#x} is not UTF-8"),
            Self::StringUnreadable(addr) => {
                write!(f, "string at {addr:#x} is outside readable memory")
            }
            Self::BufferTooSmall { needed, available } => write!(
                f,
                "a {needed}-byte string does not fit a {available}-byte buffer"
            ),
        }
    }
}

/// The validated boot information.
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// KiB of memory below 1 MiB and above 1 MiB (flag 0).
    pub mem_lower_kib: Option<u32>,
    pub mem_upper_kib: Option<u32>,
    pub cmdline: Option<PhysStr>,
    regions: [MemoryRegion; MAX_REGIONS],
    region_count: usize,
    mmap_truncated: bool,
    modules: [Module; MAX_MODULES],
    module_count: usize,
    info: PhysRange,
    mmap: PhysRange,
    module_array: PhysRange,
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    bytes
        .get(offset..offset + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    bytes
        .get(offset..offset + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn read_at<const N: usize>(mem: &impl PhysRead, addr: u64) -> Result<[u8; N], MultibootError> {
    let mut buf = [0; N];
    mem.read(addr, &mut buf)
        .map_err(|_| MultibootError::Unreadable(addr))?;
    Ok(buf)
}

impl BootInfo {
    /// Validates the structure at `info_addr`. `magic` is what the bootloader
    /// left in EAX.
    pub fn parse(mem: &impl PhysRead, magic: u32, info_addr: u64) -> Result<Self, MultibootError> {
        if magic != BOOTLOADER_MAGIC {
            return Err(MultibootError::BadMagic(magic));
        }
        let raw: [u8; INFO_READ] = read_at(mem, info_addr)?;
        let flags = u32_at(&raw, 0);
        let field = |offset| u32_at(&raw, offset);

        let empty_region = MemoryRegion {
            start: 0,
            len: 0,
            kind: RegionKind::Usable,
        };
        let empty_module = Module {
            start: 0,
            end: 0,
            cmdline: None,
        };
        let mut info = Self {
            mem_lower_kib: None,
            mem_upper_kib: None,
            cmdline: None,
            regions: [empty_region; MAX_REGIONS],
            region_count: 0,
            mmap_truncated: false,
            modules: [empty_module; MAX_MODULES],
            module_count: 0,
            info: PhysRange::new(info_addr, info_addr.saturating_add(INFO_SIZE)),
            mmap: PhysRange::new(0, 0),
            module_array: PhysRange::new(0, 0),
        };

        if flags & FLAG_MEMORY != 0 {
            info.mem_lower_kib = Some(field(4));
            info.mem_upper_kib = Some(field(8));
        }
        if flags & FLAG_CMDLINE != 0 {
            info.cmdline = Some(scan_str(mem, field(16).into())?);
        }
        if flags & FLAG_MMAP == 0 {
            return Err(MultibootError::NoMemoryMap);
        }
        info.parse_mmap(mem, field(48).into(), field(44).into())?;
        if flags & FLAG_MODS != 0 {
            info.parse_modules(mem, field(24).into(), field(20))?;
        }
        Ok(info)
    }

    /// Entries beyond `MAX_REGIONS` are dropped (see `memory_map_truncated`).
    fn parse_mmap(
        &mut self,
        mem: &impl PhysRead,
        addr: u64,
        length: u64,
    ) -> Result<(), MultibootError> {
        let bad = |offset, defect| MultibootError::BadMemoryMap { offset, defect };
        if length == 0 {
            return Err(bad(0, MmapDefect::Empty));
        }
        self.mmap = PhysRange::new(addr, addr + length);
        let mut offset = 0;
        while offset < length {
            if length - offset < 4 {
                return Err(bad(offset, MmapDefect::EntryOverrunsMap));
            }
            let size = u32::from_le_bytes(read_at(mem, addr + offset)?);
            if size < MMAP_ENTRY_MIN {
                return Err(bad(offset, MmapDefect::EntryTooSmall(size)));
            }
            let next = offset + 4 + u64::from(size);
            if next > length {
                return Err(bad(offset, MmapDefect::EntryOverrunsMap));
            }
            let entry: [u8; MMAP_ENTRY_MIN as usize] = read_at(mem, addr + offset + 4)?;
            let start = u64_at(&entry, 0);
            let len = u64_at(&entry, 8);
            if start.checked_add(len).is_none() {
                return Err(bad(offset, MmapDefect::RegionWraps));
            }
            if len != 0 {
                let Some(slot) = self.regions.get_mut(self.region_count) else {
                    self.mmap_truncated = true;
                    break;
                };
                *slot = MemoryRegion {
                    start,
                    len,
                    kind: RegionKind::from_type(u32_at(&entry, 16)),
                };
                self.region_count += 1;
            }
            offset = next;
        }
        Ok(())
    }

    fn parse_modules(
        &mut self,
        mem: &impl PhysRead,
        addr: u64,
        count: u32,
    ) -> Result<(), MultibootError> {
        if count as usize > MAX_MODULES {
            return Err(MultibootError::TooManyModules(count));
        }
        self.module_array = PhysRange::new(addr, addr + u64::from(count) * MODULE_SIZE);
        for (index, slot) in self.modules.iter_mut().take(count as usize).enumerate() {
            let raw: [u8; MODULE_SIZE as usize] = read_at(mem, addr + index as u64 * MODULE_SIZE)?;
            let start = u32_at(&raw, 0).into();
            let end = u32_at(&raw, 4).into();
            if end < start {
                return Err(MultibootError::BadModule { index, start, end });
            }
            let cmdline = match u32_at(&raw, 8) {
                0 => None,
                string => Some(scan_str(mem, string.into())?),
            };
            *slot = Module {
                start,
                end,
                cmdline,
            };
            self.module_count += 1;
        }
        Ok(())
    }

    /// The memory map, zero-length entries left out, in bootloader order.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        self.regions.get(..self.region_count).unwrap_or(&[])
    }

    /// True if the map had more than `MAX_REGIONS` entries and the rest was
    /// dropped. Only usable RAM is lost that way as long as the kernel frees
    /// `Usable` regions only, so boot may go on with a warning.
    pub fn memory_map_truncated(&self) -> bool {
        self.mmap_truncated
    }

    pub fn modules(&self) -> &[Module] {
        self.modules.get(..self.module_count).unwrap_or(&[])
    }

    /// The physical ranges the information occupies (the structure, the
    /// memory map, the module array and every string), for the frame
    /// allocator to reserve. The modules themselves are not included.
    pub fn footprint(&self) -> impl Iterator<Item = PhysRange> + '_ {
        [self.info, self.mmap, self.module_array]
            .into_iter()
            .chain(self.cmdline.map(|s| s.range()))
            .chain(
                self.modules()
                    .iter()
                    .filter_map(|m| m.cmdline.map(|s| s.range())),
            )
            .filter(|r| !r.is_empty())
    }
}

/// Finds the NUL ending the string at `addr` and checks the bytes before it
/// are UTF-8, reading 64-byte aligned chunks so no read crosses a page the
/// string does not reach.
fn scan_str(mem: &impl PhysRead, addr: u64) -> Result<PhysStr, MultibootError> {
    const CHUNK: usize = 64;
    // Room for a chunk plus up to 3 bytes of a UTF-8 sequence it split.
    let mut buf = [0u8; CHUNK + 3];
    let mut carry = 0;
    let mut scanned = 0;
    while scanned < MAX_STRING {
        let at = addr + scanned as u64;
        let n = (CHUNK - (at % CHUNK as u64) as usize).min(MAX_STRING - scanned);
        let chunk = buf
            .get_mut(carry..carry + n)
            .ok_or(MultibootError::StringUnreadable(addr))?;
        mem.read(at, chunk)
            .map_err(|_| MultibootError::StringUnreadable(addr))?;
        let nul = chunk.iter().position(|&b| b == 0);
        let text_len = carry + nul.unwrap_or(n);
        let text = buf.get(..text_len).unwrap_or(&[]);
        match core::str::from_utf8(text) {
            Ok(_) => carry = 0,
            Err(e) if nul.is_none() && e.error_len().is_none() => {
                buf.copy_within(e.valid_up_to()..text_len, 0);
                carry = text_len - e.valid_up_to();
            }
            Err(_) => return Err(MultibootError::StringNotUtf8(addr)),
        }
        if let Some(nul) = nul {
            return Ok(PhysStr {
                addr,
                len: scanned + nul,
            });
        }
        scanned += n;
    }
    Err(MultibootError::StringTooLong(addr))
}

/// Reads a string found by `BootInfo::parse` into `buf`.
pub fn read_str<'b>(
    mem: &impl PhysRead,
    s: &PhysStr,
    buf: &'b mut [u8],
) -> Result<&'b str, MultibootError> {
    let available = buf.len();
    let dst = buf.get_mut(..s.len).ok_or(MultibootError::BufferTooSmall {
        needed: s.len,
        available,
    })?;
    mem.read(s.addr, dst)
        .map_err(|_| MultibootError::StringUnreadable(s.addr))?;
    core::str::from_utf8(dst).map_err(|_| MultibootError::StringNotUtf8(s.addr))
}

/// Splits a module command line `"path/to/name args..."` into the basename of
/// the first word and the trimmed rest.
pub fn split_module_cmdline(s: &str) -> (&str, &str) {
    let s = s.trim();
    let (path, args) = s.split_once(char::is_whitespace).unwrap_or((s, ""));
    let name = path.rsplit('/').next().unwrap_or(path);
    (name, args.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const MEM_SIZE: usize = 0x10000;
    const INFO: u64 = 0x1000;
    const CMDLINE: u64 = 0x2000;
    const MMAP: u64 = 0x3000;
    const MODS: u64 = 0x4000;
    const STRINGS: u64 = 0x5000;

    /// Flat readable memory `[0, MEM_SIZE)`.
    struct FakeMem(Vec<u8>);

    impl PhysRead for FakeMem {
        fn read(&self, phys: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
            let start = usize::try_from(phys).map_err(|_| Unreadable)?;
            let src = self.0.get(start..start + buf.len()).ok_or(Unreadable)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    impl FakeMem {
        fn put(&mut self, addr: u64, bytes: &[u8]) {
            let a = addr as usize;
            self.0[a..a + bytes.len()].copy_from_slice(bytes);
        }
        fn put32(&mut self, addr: u64, v: u32) {
            self.put(addr, &v.to_le_bytes());
        }
        fn put_str(&mut self, addr: u64, s: &str) {
            self.put(addr, s.as_bytes());
            self.put(addr + s.len() as u64, &[0]);
        }
        /// Writes entries (size, base, len, type) and sets the map fields.
        fn put_mmap(&mut self, entries: &[(u32, u64, u64, u32)]) {
            let mut at = MMAP;
            for &(size, base, len, kind) in entries {
                self.put32(at, size);
                self.put(at + 4, &base.to_le_bytes());
                self.put(at + 12, &len.to_le_bytes());
                self.put32(at + 20, kind);
                at += 4 + u64::from(size);
            }
            self.put32(INFO + 44, (at - MMAP) as u32);
            self.put32(INFO + 48, MMAP as u32);
        }
    }

    const REGIONS: [(u32, u64, u64, u32); 7] = [
        (20, 0, 0x9_fc00, 1),
        (20, 0x9_fc00, 0x400, 2),
        (24, 0xf_0000, 0x1_0000, 2), // larger entry: the extra bytes are skipped
        (20, 0x10_0000, 0x7ee_0000, 1),
        (20, 0x7fe_0000, 0x2_0000, 3),
        (20, 0x800_0000, 0, 1), // empty: dropped
        (20, 0xfffc_0000, 0x4_0000, 4),
    ];

    fn valid() -> FakeMem {
        let mut m = FakeMem(vec![0; MEM_SIZE]);
        m.put32(INFO, FLAG_MEMORY | FLAG_CMDLINE | FLAG_MODS | FLAG_MMAP);
        m.put32(INFO + 4, 639);
        m.put32(INFO + 8, 129_920);
        m.put32(INFO + 16, CMDLINE as u32);
        m.put_str(CMDLINE, "console=com1 log=débug");
        m.put32(INFO + 20, 2);
        m.put32(INFO + 24, MODS as u32);
        m.put_mmap(&REGIONS);
        let modules = [
            (
                0x20_0000,
                0x20_8123,
                STRINGS,
                "/boot/roottask.elf  --verbose --cpus=2 ",
            ),
            (0x21_0000, 0x21_0000, STRINGS + 0x100, "uart"),
        ];
        for (i, (start, end, string, text)) in modules.into_iter().enumerate() {
            let at = MODS + 16 * i as u64;
            m.put32(at, start);
            m.put32(at + 4, end);
            m.put32(at + 8, string as u32);
            m.put_str(string, text);
        }
        m
    }

    fn parse(m: &FakeMem) -> Result<BootInfo, MultibootError> {
        BootInfo::parse(m, BOOTLOADER_MAGIC, INFO)
    }

    #[test]
    fn parses_valid_info() {
        let m = valid();
        let info = parse(&m).unwrap();
        assert_eq!(info.mem_lower_kib, Some(639));
        assert_eq!(info.mem_upper_kib, Some(129_920));

        let mut buf = [0u8; 64];
        let cmdline = info.cmdline.unwrap();
        assert_eq!(
            read_str(&m, &cmdline, &mut buf),
            Ok("console=com1 log=débug")
        );

        let map = info.memory_map();
        assert_eq!(map.len(), 6);
        assert!(!info.memory_map_truncated());
        assert_eq!(map[0].kind, RegionKind::Usable);
        assert_eq!(map[1].kind, RegionKind::Reserved(2));
        assert_eq!(map[2].range(), PhysRange::new(0xf_0000, 0x10_0000));
        assert_eq!(map[4].kind, RegionKind::AcpiReclaimable);
        assert_eq!(map[5].kind, RegionKind::Nvs);

        let mods = info.modules();
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].range(), PhysRange::new(0x20_0000, 0x20_8123));
        let text = read_str(&m, &mods[0].cmdline.unwrap(), &mut buf).unwrap();
        assert_eq!(
            split_module_cmdline(text),
            ("roottask.elf", "--verbose --cpus=2")
        );
        let text = read_str(&m, &mods[1].cmdline.unwrap(), &mut buf).unwrap();
        assert_eq!(split_module_cmdline(text), ("uart", ""));

        let footprint: Vec<PhysRange> = info.footprint().collect();
        let mmap_len = 6 * 24 + 28;
        assert_eq!(
            footprint,
            [
                PhysRange::new(INFO, INFO + 116),
                PhysRange::new(MMAP, MMAP + mmap_len),
                PhysRange::new(MODS, MODS + 32),
                PhysRange::new(CMDLINE, CMDLINE + 24),
                PhysRange::new(STRINGS, STRINGS + 40),
                PhysRange::new(STRINGS + 0x100, STRINGS + 0x105),
            ]
        );
    }

    #[test]
    fn optional_parts_absent() {
        let mut m = valid();
        m.put32(INFO, FLAG_MMAP);
        let info = parse(&m).unwrap();
        assert_eq!(info.mem_lower_kib, None);
        assert_eq!(info.cmdline, None);
        assert!(info.modules().is_empty());
        assert_eq!(info.footprint().count(), 2);
        // A module without a command line.
        let mut m = valid();
        m.put32(MODS + 8, 0);
        assert_eq!(parse(&m).unwrap().modules()[0].cmdline, None);
    }

    #[test]
    fn header_errors() {
        let m = valid();
        let err = BootInfo::parse(&m, 0x1bad_b002, INFO).unwrap_err();
        assert_eq!(err, MultibootError::BadMagic(0x1bad_b002));
        assert!(err.to_string().contains("Multiboot v1"));
        let beyond = MEM_SIZE as u64 - 20;
        assert_eq!(
            BootInfo::parse(&m, BOOTLOADER_MAGIC, beyond).unwrap_err(),
            MultibootError::Unreadable(beyond)
        );
        let mut m = valid();
        m.put32(INFO, FLAG_CMDLINE | FLAG_MODS);
        assert_eq!(parse(&m).unwrap_err(), MultibootError::NoMemoryMap);
    }

    #[test]
    fn memory_map_errors() {
        let bad = |entries: &[(u32, u64, u64, u32)], tweak: &dyn Fn(&mut FakeMem)| {
            let mut m = valid();
            m.put_mmap(entries);
            tweak(&mut m);
            parse(&m).unwrap_err()
        };
        let none = |_: &mut FakeMem| {};
        assert_eq!(
            bad(&[(20, 0, 0x1000, 1), (16, 0, 0x1000, 1)], &none),
            MultibootError::BadMemoryMap {
                offset: 24,
                defect: MmapDefect::EntryTooSmall(16)
            }
        );
        assert_eq!(
            bad(&[(20, u64::MAX - 5, 10, 1)], &none),
            MultibootError::BadMemoryMap {
                offset: 0,
                defect: MmapDefect::RegionWraps
            }
        );
        // mmap_length cutting the last entry or its size field short.
        for length in [24 + 10, 24 + 2] {
            let err = bad(&REGIONS[..2], &|m| m.put32(INFO + 44, length));
            assert_eq!(
                err,
                MultibootError::BadMemoryMap {
                    offset: 24,
                    defect: MmapDefect::EntryOverrunsMap
                }
            );
        }
        assert_eq!(
            bad(&[], &none),
            MultibootError::BadMemoryMap {
                offset: 0,
                defect: MmapDefect::Empty
            }
        );
        let beyond = MEM_SIZE as u64 - 2;
        assert_eq!(
            bad(&REGIONS, &|m| m.put32(INFO + 48, beyond as u32)),
            MultibootError::Unreadable(beyond)
        );
        assert!(MultibootError::BadMemoryMap {
            offset: 24,
            defect: MmapDefect::EntryTooSmall(16)
        }
        .to_string()
        .contains("20-byte minimum"));
    }

    #[test]
    fn memory_map_truncated_at_capacity() {
        let mut m = valid();
        let entries: Vec<_> = (0..70u64).map(|i| (20, i * 0x1000, 0x1000, 1)).collect();
        m.put_mmap(&entries);
        let info = parse(&m).unwrap();
        assert_eq!(info.memory_map().len(), MAX_REGIONS);
        assert!(info.memory_map_truncated());
        assert_eq!(info.memory_map()[63].start, 63 * 0x1000);
    }

    #[test]
    fn module_errors() {
        let mut m = valid();
        m.put32(MODS + 16 + 4, 0x20_ffff);
        assert_eq!(
            parse(&m).unwrap_err(),
            MultibootError::BadModule {
                index: 1,
                start: 0x21_0000,
                end: 0x20_ffff
            }
        );
        let mut m = valid();
        m.put32(INFO + 20, 17);
        assert_eq!(parse(&m).unwrap_err(), MultibootError::TooManyModules(17));
        let mut m = valid();
        m.put32(INFO + 24, (MEM_SIZE - 20) as u32);
        assert_eq!(
            parse(&m).unwrap_err(),
            MultibootError::Unreadable(MEM_SIZE as u64 - 20 + 16)
        );
    }

    #[test]
    fn string_errors() {
        let with_cmdline = |addr: u64, bytes: &[u8]| {
            let mut m = valid();
            m.put32(INFO + 16, addr as u32);
            m.put(addr, bytes);
            parse(&m).map(|info| info.cmdline.unwrap())
        };
        assert_eq!(
            with_cmdline(0x6000, &[b'a'; MAX_STRING]),
            Err(MultibootError::StringTooLong(0x6000))
        );
        assert_eq!(
            with_cmdline(0x6000, &[b'a'; MAX_STRING - 1]),
            Ok(PhysStr {
                addr: 0x6000,
                len: MAX_STRING - 1
            })
        );
        assert_eq!(
            with_cmdline(0x6000, b"caf\xe9\0"),
            Err(MultibootError::StringNotUtf8(0x6000))
        );
        // A sequence cut off by the NUL.
        assert_eq!(
            with_cmdline(0x6000, b"caf\xc3\0"),
            Err(MultibootError::StringNotUtf8(0x6000))
        );
        // A sequence split across the 64-byte chunk boundary is fine.
        let mut s = vec![b'x'; 63];
        s.extend_from_slice("é€\0".as_bytes());
        assert_eq!(
            with_cmdline(0x6000, &s),
            Ok(PhysStr {
                addr: 0x6000,
                len: 68
            })
        );
        // Running off the end of memory before any NUL.
        let end = MEM_SIZE as u64 - 3;
        assert_eq!(
            with_cmdline(end, b"abc"),
            Err(MultibootError::StringUnreadable(end))
        );
        // A string ending right at the end of memory is readable.
        assert_eq!(
            with_cmdline(end, b"ab\0"),
            Ok(PhysStr { addr: end, len: 2 })
        );

        let m = valid();
        let s = parse(&m).unwrap().cmdline.unwrap();
        let mut small = [0u8; 4];
        assert_eq!(
            read_str(&m, &s, &mut small),
            Err(MultibootError::BufferTooSmall {
                needed: 23,
                available: 4
            })
        );
        let bogus = PhysStr {
            addr: MEM_SIZE as u64,
            len: 2,
        };
        assert_eq!(
            read_str(&m, &bogus, &mut small),
            Err(MultibootError::StringUnreadable(MEM_SIZE as u64))
        );
    }

    #[test]
    fn splits_module_cmdlines() {
        assert_eq!(split_module_cmdline("a/b/c.elf x  y"), ("c.elf", "x  y"));
        assert_eq!(split_module_cmdline("  name\targ "), ("name", "arg"));
        assert_eq!(split_module_cmdline("dir/"), ("", ""));
        assert_eq!(split_module_cmdline(""), ("", ""));
    }
}
