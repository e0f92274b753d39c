//! Checks that the kernel file loads correctly by its Multiboot header.
//!
//! The header uses the "a.out kludge" (flag 16): loaders copy the file from
//! the header's offset minus (`header_addr` − `load_addr`) up to
//! `load_end_addr`, zero up to `bss_end_addr`, and jump to `entry_addr`,
//! ignoring the ELF program headers. That is only right if every ELF
//! segment sits in the file at the same offset-to-address distance as the
//! header, inside the loaded range, so a linker-script slip would boot a
//! scrambled kernel. This check catches it at build time.

use std::fmt;

const MAGIC: u32 = 0x1BAD_B002;
const FLAG_ADDRESSES: u32 = 1 << 16;
const SEARCH_LIMIT: usize = 8192;
const PT_LOAD: u32 = 1;

#[derive(Debug, PartialEq, Eq)]
pub enum LayoutError {
    NoHeader,
    BadChecksum,
    NoAddressFields,
    NotElf64,
    Truncated(&'static str),
    BadRange(&'static str),
    SegmentMisplaced {
        index: usize,
        paddr: u64,
        offset: u64,
    },
    EntryOutside(u32),
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHeader => write!(f, "no Multiboot header in the first {SEARCH_LIMIT} bytes"),
            Self::BadChecksum => f.write_str("the Multiboot header checksum is wrong"),
            Self::NoAddressFields => f.write_str("the Multiboot header lacks flag 16 (load addresses)"),
            Self::NotElf64 => f.write_str("not a 64-bit ELF file"),
            Self::Truncated(what) => write!(f, "the file ends inside {what}"),
            Self::BadRange(what) => write!(f, "the Multiboot header's {what} are out of order"),
            Self::SegmentMisplaced { index, paddr, offset } => write!(
                f,
                "ELF segment {index} (physical {paddr:#x}, file offset {offset:#x}) is not where the Multiboot load addresses put it"
            ),
            Self::EntryOutside(entry) => write!(f, "the entry point {entry:#x} is outside the loaded image"),
        }
    }
}

fn u16_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u16, LayoutError> {
    let b = bytes.get(at..at + 2).ok_or(LayoutError::Truncated(what))?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u32, LayoutError> {
    let b = bytes.get(at..at + 4).ok_or(LayoutError::Truncated(what))?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u64, LayoutError> {
    let lo = u32_at(bytes, at, what)?;
    let hi = u32_at(bytes, at + 4, what)?;
    Ok(u64::from(lo) | (u64::from(hi) << 32))
}

/// Checks `file` (the kernel ELF) as described in the module comment.
pub fn check(file: &[u8]) -> Result<(), LayoutError> {
    let header_offset = (0..SEARCH_LIMIT.min(file.len().saturating_sub(32)))
        .step_by(4)
        .find(|&at| u32_at(file, at, "the header") == Ok(MAGIC))
        .ok_or(LayoutError::NoHeader)?;
    let field = |i: usize| u32_at(file, header_offset + 4 * i, "the Multiboot header");
    let (flags, checksum) = (field(1)?, field(2)?);
    if MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(LayoutError::BadChecksum);
    }
    if flags & FLAG_ADDRESSES == 0 {
        return Err(LayoutError::NoAddressFields);
    }
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(3)?, field(4)?, field(5)?, field(6)?, field(7)?);
    if !(load_addr <= header_addr && header_addr < load_end && load_end <= bss_end) {
        return Err(LayoutError::BadRange("load, header, end and bss addresses"));
    }
    // The file offset of physical address `load_addr`.
    let base_offset = (header_offset as u64)
        .checked_sub(u64::from(header_addr - load_addr))
        .ok_or(LayoutError::BadRange("header and load addresses"))?;
    if base_offset + u64::from(load_end - load_addr) > file.len() as u64 {
        return Err(LayoutError::Truncated("the loaded image"));
    }
    if !(load_addr..bss_end).contains(&entry) {
        return Err(LayoutError::EntryOutside(entry));
    }

    if file.get(..5) != Some(b"\x7fELF\x02") {
        return Err(LayoutError::NotElf64);
    }
    let phoff = u64_at(file, 0x20, "the ELF header")? as usize;
    let phentsize = usize::from(u16_at(file, 0x36, "the ELF header")?);
    let phnum = usize::from(u16_at(file, 0x38, "the ELF header")?);
    for index in 0..phnum {
        let ph = phoff + index * phentsize;
        if u32_at(file, ph, "a program header")? != PT_LOAD {
            continue;
        }
        let offset = u64_at(file, ph + 0x08, "a program header")?;
        let paddr = u64_at(file, ph + 0x18, "a program header")?;
        let file_size = u64_at(file, ph + 0x20, "a program header")?;
        let mem_size = u64_at(file, ph + 0x28, "a program header")?;
        let misplaced = LayoutError::SegmentMisplaced {
            index,
            paddr,
            offset,
        };
        let loaded_from = paddr.checked_sub(u64::from(load_addr)).ok_or(misplaced)?;
        let in_file = file_size == 0 || base_offset + loaded_from == offset;
        let inside =
            paddr + file_size <= u64::from(load_end) && paddr + mem_size <= u64::from(bss_end);
        if !(in_file && inside) {
            return Err(LayoutError::SegmentMisplaced {
                index,
                paddr,
                offset,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_LOAD and a Multiboot header at 0x1000.
    fn image(segment_offset: u64, load_end: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x3000];
        f[..5].copy_from_slice(b"\x7fELF\x02");
        f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 0x08..ph + 0x10].copy_from_slice(&segment_offset.to_le_bytes());
        f[ph + 0x18..ph + 0x20].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[ph + 0x20..ph + 0x28].copy_from_slice(&0x1000u64.to_le_bytes());
        f[ph + 0x28..ph + 0x30].copy_from_slice(&0x2000u64.to_le_bytes());
        let flags = FLAG_ADDRESSES | 3;
        let fields = [
            MAGIC,
            flags,
            0u32.wrapping_sub(MAGIC.wrapping_add(flags)),
            0x10_0000,
            0x10_0000,
            load_end,
            0x10_2000,
            0x10_0020,
        ];
        for (i, v) in fields.iter().enumerate() {
            f[0x1000 + 4 * i..0x1004 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        f
    }

    #[test]
    fn consistent_layout_passes() {
        assert_eq!(check(&image(0x1000, 0x10_1000)), Ok(()));
    }

    #[test]
    fn segment_at_another_offset_fails() {
        assert!(matches!(
            check(&image(0x2000, 0x10_1000)),
            Err(LayoutError::SegmentMisplaced { index: 0, .. })
        ));
    }

    #[test]
    fn segment_beyond_load_end_fails() {
        assert!(matches!(
            check(&image(0x1000, 0x10_0800)),
            Err(LayoutError::SegmentMisplaced { .. })
        ));
    }

    #[test]
    fn header_problems_are_reported() {
        let mut f = image(0x1000, 0x10_1000);
        f[0x1008] ^= 1;
        assert_eq!(check(&f), Err(LayoutError::BadChecksum));
        assert_eq!(check(&[0u8; 64]), Err(LayoutError::NoHeader));
        let mut truncated = image(0x1000, 0x10_1000);
        truncated.truncate(0x1800);
        assert_eq!(
            check(&truncated),
            Err(LayoutError::Truncated("the loaded image"))
        );
    }
}
