//! SMBIOS (DMI) tables: what a PC's BIOS says about the machine — its
//! maker and model, the processors, the memory — in the form Linux's
//! `dmi_scan_machine` finds without EFI: a 64-bit (SMBIOS 3.0) entry point
//! on a 16-byte boundary in `0xf0000..0x100000`, pointing at the structure
//! table right behind it (DMTF DSP0134 3.x, chapters 5 and 7).
//!
//! The structures: BIOS (type 0, marked as a virtual machine's), system
//! (1), chassis (3), one processor per vCPU (4), the memory array (16),
//! one memory device (17), the array's mapped ranges (19), system boot
//! (32) and the end marker (127). Each is its formatted part followed by
//! its strings, each NUL-terminated, and one more NUL.

use alloc::vec::Vec;

use crate::layout::{GuestLayout, HIGH_RAM_START, KIB, MIB, RAM_ABOVE_4G};
use crate::ram::{self, OutOfRam, PutLe};

/// Where legacy scanning looks for the entry point.
pub const SCAN_START: u64 = 0xf_0000;
pub const SCAN_END: u64 = 0x10_0000;

const ANCHOR: &[u8; 5] = b"_SM3_";
const ENTRY_LEN: usize = 0x18;
const ALIGN: u64 = 16;

/// What every structure names as its maker.
pub const VENDOR: &str = "Moat";
/// The system's product name (`/sys/class/dmi/id/product_name`).
pub const PRODUCT: &str = "Moat virtual machine";
/// The date the BIOS structure gives, as SMBIOS writes it.
const RELEASE_DATE: &str = "12/07/2026";

/// Handles: the structures that refer to others use these.
const MEMORY_ARRAY: u16 = 0x1000;
const NO_HANDLE: u16 = 0xffff;
const NO_ERROR_INFO: u16 = 0xfffe;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    Ram(OutOfRam),
    /// No room for the tables in `0xf0000..0x100000` after `from`.
    NoRoom,
}

impl From<OutOfRam> for Error {
    fn from(e: OutOfRam) -> Self {
        Error::Ram(e)
    }
}

/// Where the tables went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmbiosTables {
    pub entry: u64,
    pub table: u64,
    /// One past the last byte written.
    pub end: u64,
}

/// One structure: its formatted part (header included) and its strings.
struct Structure {
    formatted: Vec<u8>,
    strings: Vec<&'static str>,
}

impl Structure {
    /// A structure of `kind` with `len` formatted bytes, all zero past the
    /// header.
    fn new(kind: u8, len: u8, handle: u16) -> Self {
        let mut formatted = alloc::vec![0u8; usize::from(len)];
        formatted.put_u8(0, kind);
        formatted.put_u8(1, len);
        formatted.put_u16(2, handle);
        Self {
            formatted,
            strings: Vec::new(),
        }
    }

    /// Adds `text` to the strings and puts its number at `at`.
    fn string(&mut self, at: usize, text: &'static str) -> &mut Self {
        self.strings.push(text);
        self.formatted.put_u8(at, self.strings.len() as u8);
        self
    }

    fn u8(&mut self, at: usize, value: u8) -> &mut Self {
        self.formatted.put_u8(at, value);
        self
    }

    fn u16(&mut self, at: usize, value: u16) -> &mut Self {
        self.formatted.put_u16(at, value);
        self
    }

    fn u32(&mut self, at: usize, value: u32) -> &mut Self {
        self.formatted.put_u32(at, value);
        self
    }

    fn u64(&mut self, at: usize, value: u64) -> &mut Self {
        self.formatted.put_u64(at, value);
        self
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.formatted);
        if self.strings.is_empty() {
            out.extend_from_slice(&[0, 0]);
            return;
        }
        for s in &self.strings {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        out.push(0);
    }
}

fn bios() -> Structure {
    const CHARACTERISTICS_NOT_SUPPORTED: u64 = 1 << 3;
    const EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
    let mut s = Structure::new(0, 0x18, 0);
    s.string(0x04, VENDOR)
        .string(0x05, env!("CARGO_PKG_VERSION"))
        .u16(0x06, 0xf000)
        .string(0x08, RELEASE_DATE)
        .u64(0x0a, CHARACTERISTICS_NOT_SUPPORTED)
        .u8(0x13, EXT2_VIRTUAL_MACHINE)
        .u8(0x14, 0)
        .u8(0x15, 1)
        .u8(0x16, 0xff)
        .u8(0x17, 0xff);
    s
}

fn system() -> Structure {
    const WAKE_UP_POWER_SWITCH: u8 = 6;
    let mut s = Structure::new(1, 0x1b, 0x100);
    // UUID (0x08..0x18) all zero: the system has none.
    s.string(0x04, VENDOR)
        .string(0x05, PRODUCT)
        .string(0x06, env!("CARGO_PKG_VERSION"))
        .u8(0x18, WAKE_UP_POWER_SWITCH)
        .string(0x1a, "Virtual Machine");
    s
}

fn chassis() -> Structure {
    const OTHER: u8 = 1;
    const SAFE: u8 = 3;
    const SECURITY_UNKNOWN: u8 = 2;
    let mut s = Structure::new(3, 0x15, 0x300);
    s.string(0x04, VENDOR)
        .u8(0x05, OTHER)
        .u8(0x09, SAFE)
        .u8(0x0a, SAFE)
        .u8(0x0b, SAFE)
        .u8(0x0c, SECURITY_UNKNOWN);
    s
}

/// Socket names for the first vCPUs; later ones share the last name.
const SOCKETS: [&str; 8] = [
    "CPU 0", "CPU 1", "CPU 2", "CPU 3", "CPU 4", "CPU 5", "CPU 6", "CPU 7",
];

fn processor(index: u32) -> Structure {
    const CENTRAL: u8 = 3;
    const FAMILY_OTHER: u8 = 1;
    const POPULATED_ENABLED: u8 = 0x41;
    const UPGRADE_OTHER: u8 = 1;
    const CAPABLE_64_BIT: u16 = 1 << 2;
    let socket = SOCKETS[(index as usize).min(SOCKETS.len() - 1)];
    let mut s = Structure::new(4, 0x2a, 0x400 + index as u16);
    s.string(0x04, socket)
        .u8(0x05, CENTRAL)
        .u8(0x06, FAMILY_OTHER)
        .string(0x07, VENDOR)
        .u8(0x18, POPULATED_ENABLED)
        .u8(0x19, UPGRADE_OTHER)
        .u16(0x1a, NO_HANDLE)
        .u16(0x1c, NO_HANDLE)
        .u16(0x1e, NO_HANDLE)
        .u8(0x23, 1)
        .u8(0x24, 1)
        .u8(0x25, 1)
        .u16(0x26, CAPABLE_64_BIT)
        .u16(0x28, u16::from(FAMILY_OTHER));
    s
}

fn memory_array(ram_size: u64) -> Structure {
    const SYSTEM_BOARD: u8 = 3;
    const SYSTEM_MEMORY: u8 = 3;
    const NO_ECC: u8 = 3;
    const USE_EXTENDED: u32 = 0x8000_0000;
    let kib = ram_size / KIB;
    let mut s = Structure::new(16, 0x17, MEMORY_ARRAY);
    s.u8(0x04, SYSTEM_BOARD)
        .u8(0x05, SYSTEM_MEMORY)
        .u8(0x06, NO_ECC)
        .u16(0x0b, NO_ERROR_INFO)
        .u16(0x0d, 1);
    match u32::try_from(kib) {
        Ok(kib) if kib < USE_EXTENDED => s.u32(0x07, kib),
        _ => s.u32(0x07, USE_EXTENDED).u64(0x0f, ram_size),
    };
    s
}

fn memory_device(ram_size: u64) -> Structure {
    const DIMM: u8 = 9;
    const RAM: u8 = 7;
    const DETAIL_UNKNOWN: u16 = 1 << 2;
    const USE_EXTENDED: u16 = 0x7fff;
    let mib = ram_size / MIB;
    let mut s = Structure::new(17, 0x22, MEMORY_ARRAY + 1);
    s.u16(0x04, MEMORY_ARRAY)
        .u16(0x06, NO_ERROR_INFO)
        .u16(0x08, 0xffff)
        .u16(0x0a, 0xffff)
        .u8(0x0e, DIMM)
        .string(0x10, "DIMM 0")
        .u8(0x12, RAM)
        .u16(0x13, DETAIL_UNKNOWN)
        .string(0x17, VENDOR);
    match u16::try_from(mib) {
        Ok(mib) if mib < USE_EXTENDED => s.u16(0x0c, mib),
        _ => s
            .u16(0x0c, USE_EXTENDED)
            .u32(0x1c, u32::try_from(mib).unwrap_or(u32::MAX)),
    };
    s
}

/// One mapped range `[start, end)` of the memory array.
fn mapped_range(index: u16, start: u64, end: u64) -> Structure {
    let mut s = Structure::new(19, 0x1f, MEMORY_ARRAY + 2 + index);
    s.u16(0x0c, MEMORY_ARRAY).u8(0x0e, 1);
    let (first, last) = (start / KIB, (end - 1) / KIB);
    match (u32::try_from(first), u32::try_from(last)) {
        (Ok(first), Ok(last)) if last < u32::MAX => s.u32(0x04, first).u32(0x08, last),
        _ => s
            .u32(0x04, u32::MAX)
            .u32(0x08, u32::MAX)
            .u64(0x0f, start)
            .u64(0x17, end - 1),
    };
    s
}

fn boot_information() -> Structure {
    // Boot status 0 (byte 0x0a): no errors detected.
    Structure::new(32, 0x0b, 0x2000)
}

/// The structure table of `layout`: its bytes and how many structures.
pub fn structures(layout: &GuestLayout) -> (Vec<u8>, usize) {
    let mut list = Vec::from([bios(), system(), chassis()]);
    list.extend((0..layout.vcpus).map(processor));
    list.push(memory_array(layout.ram_size));
    list.push(memory_device(layout.ram_size));
    // The RAM the guest has: below the hole (its legacy holes are the
    // e820 map's business) and the rest above 4 GiB.
    list.push(mapped_range(0, 0, layout.low_ram_end().max(HIGH_RAM_START)));
    if layout.high_ram_size() > 0 {
        list.push(mapped_range(
            1,
            RAM_ABOVE_4G,
            RAM_ABOVE_4G + layout.high_ram_size(),
        ));
    }
    list.push(boot_information());
    list.push(Structure::new(127, 4, 0xfeff));
    let mut out = Vec::new();
    for s in &list {
        s.encode(&mut out);
    }
    (out, list.len())
}

/// The 64-bit entry point for a table of `len` bytes at `table`.
fn entry_point(table: u64, len: u32) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e.put(0, ANCHOR);
    e.put_u8(6, ENTRY_LEN as u8);
    e.put_u8(7, 3); // SMBIOS 3.0.0
    e.put_u8(8, 0);
    e.put_u8(9, 0);
    e.put_u8(10, 1); // entry point revision: 3.0
    e.put_u32(12, len);
    e.put_u64(16, table);
    let sum = e.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    e.put_u8(5, 0u8.wrapping_sub(sum));
    e
}

/// Writes the entry point at the first 16-byte boundary at or after both
/// `from` and [`SCAN_START`], and the structure table behind it; all of
/// it below [`SCAN_END`].
pub fn build(ram: &mut [u8], layout: &GuestLayout, from: u64) -> Result<SmbiosTables, Error> {
    let entry = from
        .max(SCAN_START)
        .checked_next_multiple_of(ALIGN)
        .ok_or(Error::NoRoom)?;
    let table = entry + ENTRY_LEN as u64;
    let (bytes, _) = structures(layout);
    let end = table + bytes.len() as u64;
    if end > SCAN_END {
        return Err(Error::NoRoom);
    }
    ram::write(ram, table, &bytes)?;
    ram::write(ram, entry, &entry_point(table, bytes.len() as u32))?;
    Ok(SmbiosTables { entry, table, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GIB;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x)) == 0
    }

    /// Walks the table: (type, formatted length, strings) per structure.
    fn walk(table: &[u8]) -> Vec<(u8, usize, Vec<String>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < table.len() {
            let (kind, len) = (table[at], usize::from(table[at + 1]));
            let mut strings = Vec::new();
            let mut p = at + len;
            if table[p] == 0 && table[p + 1] == 0 {
                p += 2;
            } else {
                while table[p] != 0 {
                    let n = table[p..].iter().position(|&b| b == 0).unwrap();
                    strings.push(String::from_utf8(table[p..p + n].to_vec()).unwrap());
                    p += n + 1;
                }
                p += 1;
            }
            out.push((kind, len, strings));
            at = p;
            if kind == 127 {
                break;
            }
        }
        assert_eq!(at, table.len(), "the end marker ends the table");
        out
    }

    #[test]
    fn entry_point_is_found_where_linux_scans_and_sums_to_zero() {
        let layout = GuestLayout::standard(256 * MIB, 2);
        let mut ram = vec![0u8; 256 * MIB as usize];
        let t = build(&mut ram, &layout, 0xe_1234).unwrap();
        assert_eq!(t.entry, SCAN_START);
        assert_eq!(t.entry % 16, 0);
        let e = &ram[t.entry as usize..][..ENTRY_LEN];
        assert_eq!(&e[..5], ANCHOR);
        assert!(sums_to_zero(e));
        let len = u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64;
        let at = u64::from_le_bytes(e[16..24].try_into().unwrap());
        assert_eq!((at, at + len), (t.table, t.end));
        assert!(t.end <= SCAN_END);
    }

    #[test]
    fn structures_name_the_machine_its_cpus_and_memory() {
        let layout = GuestLayout::standard(4 * GIB, 3);
        let (table, count) = structures(&layout);
        let list = walk(&table);
        assert_eq!(list.len(), count);
        let kinds: Vec<u8> = list.iter().map(|s| s.0).collect();
        assert_eq!(kinds, [0, 1, 3, 4, 4, 4, 16, 17, 19, 19, 32, 127]);
        assert_eq!(
            list[1].2,
            [
                VENDOR,
                PRODUCT,
                env!("CARGO_PKG_VERSION"),
                "Virtual Machine"
            ]
        );
        assert_eq!(list[5].2[0], "CPU 2");
        // 4 GiB of RAM: 3 GiB below the hole, 1 GiB above 4 GiB.
        let ranges: Vec<&[u8]> = {
            let mut at = 0;
            let mut found = Vec::new();
            for (kind, len, strings) in &list {
                if *kind == 19 {
                    found.push(&table[at..at + len]);
                }
                at += len
                    + if strings.is_empty() {
                        2
                    } else {
                        strings.iter().map(|s| s.len() + 1).sum::<usize>() + 1
                    };
            }
            found
        };
        let kib = |r: &[u8], at: usize| u32::from_le_bytes(r[at..at + 4].try_into().unwrap());
        assert_eq!(
            (kib(ranges[0], 4), kib(ranges[0], 8)),
            (0, (3 * GIB / KIB - 1) as u32)
        );
        assert_eq!(
            (kib(ranges[1], 4), kib(ranges[1], 8)),
            ((4 * GIB / KIB) as u32, (5 * GIB / KIB - 1) as u32)
        );
    }

    #[test]
    fn the_bios_says_it_is_a_virtual_machine() {
        let (table, _) = structures(&GuestLayout::standard(64 * MIB, 1));
        assert_eq!(table[0], 0);
        assert_eq!(table[0x13] & (1 << 4), 1 << 4);
    }

    #[test]
    fn many_vcpus_and_large_memory_use_the_extended_fields() {
        let layout = GuestLayout::standard(64 * 1024 * GIB, 200);
        let (table, count) = structures(&layout);
        assert_eq!(walk(&table).len(), count);
        assert_eq!(count, 3 + 200 + 2 + 2 + 2);
    }

    #[test]
    fn no_room_is_an_error_not_a_panic() {
        let layout = GuestLayout::standard(64 * MIB, 2);
        let mut ram = vec![0u8; 64 * MIB as usize];
        assert_eq!(build(&mut ram, &layout, SCAN_END - 8), Err(Error::NoRoom));
        assert_eq!(build(&mut ram, &layout, u64::MAX - 4), Err(Error::NoRoom));
        let mut small = vec![0u8; 0x8_0000];
        assert!(matches!(build(&mut small, &layout, 0), Err(Error::Ram(_))));
    }
}
