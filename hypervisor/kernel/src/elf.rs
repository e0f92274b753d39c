//! Validation of the ELF64 executables user tasks are built as.
//!
//! A task is a static, non-PIE x86_64 executable (`ET_EXEC`). Parsing checks
//! the whole image once and describes its loadable segments; the kernel then
//! maps pages for each segment, copies `data` and zeroes the rest.

use core::fmt;
use core::ops::Range;

use bitflags::bitflags;

pub const MAX_SEGMENTS: usize = 16;

const PAGE_SIZE: u64 = 4096;
const MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: u16 = 56;

bitflags! {
    /// Segment permissions, at their `p_flags` bit positions.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SegmentFlags: u32 {
        const EXECUTE = 1 << 0;
        const WRITE = 1 << 1;
        const READ = 1 << 2;
    }
}

/// A loadable segment: `mem_size` bytes at `vaddr`, the first `data.len()`
/// of them from the file, the rest zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    pub vaddr: u64,
    pub mem_size: u64,
    pub data: &'a [u8],
    pub flags: SegmentFlags,
}

impl Segment<'_> {
    const EMPTY: Self = Self {
        vaddr: 0,
        mem_size: 0,
        data: &[],
        flags: SegmentFlags::empty(),
    };

    /// The page-aligned virtual range the segment occupies. Parsing checked
    /// that it does not overflow.
    pub fn pages(&self) -> Range<u64> {
        page_range(self.vaddr, self.mem_size).unwrap_or(0..0)
    }
}

/// A validated executable.
#[derive(Clone, Debug)]
pub struct ElfImage<'a> {
    pub entry: u64,
    segments: [Segment<'a>; MAX_SEGMENTS],
    count: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than an ELF header.
    TooShort {
        len: usize,
    },
    /// The program header table runs past the end of the file.
    Truncated {
        len: usize,
        needed: u64,
    },
    NotElf,
    Not64Bit(u8),
    NotLittleEndian(u8),
    WrongMachine(u16),
    NotExecutable(u16),
    BadProgramHeaderSize(u16),
    TooManySegments,
    /// A segment's file bytes lie (partly) outside the file.
    SegmentTruncated {
        index: usize,
        offset: u64,
        file_size: u64,
        len: usize,
    },
    FileSizeExceedsMemSize {
        index: usize,
        file_size: u64,
        mem_size: u64,
    },
    /// A segment lies outside the allowed user range or wraps around.
    SegmentOutOfRange {
        index: usize,
        vaddr: u64,
        mem_size: u64,
    },
    /// Two segments share a page (program header indices).
    OverlappingSegments {
        first: usize,
        second: usize,
    },
    EntryNotExecutable(u64),
    NoSegments,
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShort { len } => write!(
                f,
                "too short: the file is {len} bytes, less than the {EHDR_SIZE}-byte ELF header"
            ),
            Self::Truncated { len, needed } => write!(
                f,
                "truncated: the file is {len} bytes but its program headers end at {needed}"
            ),
            Self::NotElf => write!(f, "not an ELF file"),
            Self::Not64Bit(class) => write!(f, "not a 64-bit ELF file (class {class})"),
            Self::NotLittleEndian(data) => {
                write!(f, "not a little-endian ELF file (data encoding {data})")
            }
            Self::WrongMachine(machine) => {
                write!(f, "built for machine {machine}, not x86_64 ({EM_X86_64})")
            }
            Self::NotExecutable(ET_DYN) => write!(
                f,
                "a position-independent (ET_DYN) file: user tasks must be linked static non-PIE"
            ),
            Self::NotExecutable(kind) => write!(
                f,
                "ELF type {kind} is not an executable: user tasks must be linked static non-PIE"
            ),
            Self::BadProgramHeaderSize(size) => write!(
                f,
                "program header entries are {size} bytes, expected {PHDR_SIZE}"
            ),
            Self::TooManySegments => {
                write!(f, "more than {MAX_SEGMENTS} loadable segments")
            }
            Self::SegmentTruncated {
                index,
                offset,
                file_size,
                len,
            } => write!(
                f,
                "truncated: segment {index} needs file bytes {offset:#x}+{file_size:#x}, \
                 beyond the end of the {len}-byte file"
            ),
            Self::FileSizeExceedsMemSize {
                index,
                file_size,
                mem_size,
            } => write!(
                f,
                "segment {index}: file size {file_size:#x} exceeds memory size {mem_size:#x}"
            ),
            Self::SegmentOutOfRange {
                index,
                vaddr,
                mem_size,
            } => write!(
                f,
                "segment {index}: {vaddr:#x}+{mem_size:#x} is outside the user address range"
            ),
            Self::OverlappingSegments { first, second } => {
                write!(f, "segments {first} and {second} share a page")
            }
            Self::EntryNotExecutable(entry) => write!(
                f,
                "entry point {entry:#x} is not inside an executable segment"
            ),
            Self::NoSegments => write!(f, "no loadable segments"),
        }
    }
}

fn read<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    read(bytes, offset).map_or(0, u16::from_le_bytes)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    read(bytes, offset).map_or(0, u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    read(bytes, offset).map_or(0, u64::from_le_bytes)
}

/// `[vaddr, vaddr + size)` widened to whole pages, or `None` on overflow.
fn page_range(vaddr: u64, size: u64) -> Option<Range<u64>> {
    let end = vaddr.checked_add(size)?.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    Some(vaddr & !(PAGE_SIZE - 1)..end)
}

impl<'a> ElfImage<'a> {
    /// Validates `bytes`. `user` is the virtual range segments must stay in
    /// (page-rounded), e.g. `0x1000..0x0000_8000_0000_0000`.
    pub fn parse(bytes: &'a [u8], user: Range<u64>) -> Result<Self, ElfError> {
        if bytes.get(..MAGIC.len()).is_some_and(|magic| magic != MAGIC) {
            return Err(ElfError::NotElf);
        }
        let header: &[u8; EHDR_SIZE] = bytes
            .get(..EHDR_SIZE)
            .and_then(|h| h.try_into().ok())
            .ok_or(ElfError::TooShort { len: bytes.len() })?;
        if header[4] != ELFCLASS64 {
            return Err(ElfError::Not64Bit(header[4]));
        }
        if header[5] != ELFDATA2LSB {
            return Err(ElfError::NotLittleEndian(header[5]));
        }
        let kind = u16_at(header.as_slice(), 16);
        let machine = u16_at(header.as_slice(), 18);
        if machine != EM_X86_64 {
            return Err(ElfError::WrongMachine(machine));
        }
        if kind != ET_EXEC {
            return Err(ElfError::NotExecutable(kind));
        }
        let entry = u64_at(header.as_slice(), 24);
        let phoff = u64_at(header.as_slice(), 32);
        let phentsize = u16_at(header.as_slice(), 54);
        let phnum = u16_at(header.as_slice(), 56);
        if phnum == 0 {
            return Err(ElfError::NoSegments);
        }
        if phentsize != PHDR_SIZE {
            return Err(ElfError::BadProgramHeaderSize(phentsize));
        }
        let table_end = phoff.saturating_add(u64::from(phnum) * u64::from(PHDR_SIZE));
        let len = bytes.len();
        if table_end > len as u64 {
            return Err(ElfError::Truncated {
                len,
                needed: table_end,
            });
        }
        let table = usize::try_from(phoff)
            .ok()
            .and_then(|start| bytes.get(start..))
            .unwrap_or(&[]);

        let mut image = Self {
            entry,
            segments: [Segment::EMPTY; MAX_SEGMENTS],
            count: 0,
        };
        // Program header index of each kept segment, for error messages.
        let mut indices = [0usize; MAX_SEGMENTS];
        for (index, ph) in table
            .chunks_exact(PHDR_SIZE.into())
            .take(phnum.into())
            .enumerate()
        {
            if u32_at(ph, 0) != PT_LOAD {
                continue;
            }
            let flags = SegmentFlags::from_bits_truncate(u32_at(ph, 4));
            let offset = u64_at(ph, 8);
            let vaddr = u64_at(ph, 16);
            let file_size = u64_at(ph, 32);
            let mem_size = u64_at(ph, 40);
            if mem_size == 0 {
                continue;
            }
            if file_size > mem_size {
                return Err(ElfError::FileSizeExceedsMemSize {
                    index,
                    file_size,
                    mem_size,
                });
            }
            let data = if file_size == 0 {
                &[][..]
            } else {
                offset
                    .checked_add(file_size)
                    .filter(|&end| end <= len as u64)
                    .and_then(|end| {
                        bytes.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
                    })
                    .ok_or(ElfError::SegmentTruncated {
                        index,
                        offset,
                        file_size,
                        len,
                    })?
            };
            let in_range = page_range(vaddr, mem_size)
                .is_some_and(|pages| pages.start >= user.start && pages.end <= user.end);
            if !in_range {
                return Err(ElfError::SegmentOutOfRange {
                    index,
                    vaddr,
                    mem_size,
                });
            }
            let segment = Segment {
                vaddr,
                mem_size,
                data,
                flags,
            };
            let pages = segment.pages();
            for (prev, &prev_index) in image.segments().zip(indices.iter()) {
                let other = prev.pages();
                if pages.start < other.end && other.start < pages.end {
                    return Err(ElfError::OverlappingSegments {
                        first: prev_index,
                        second: index,
                    });
                }
            }
            let (Some(slot), Some(slot_index)) = (
                image.segments.get_mut(image.count),
                indices.get_mut(image.count),
            ) else {
                return Err(ElfError::TooManySegments);
            };
            *slot = segment;
            *slot_index = index;
            image.count += 1;
        }

        if image.count == 0 {
            return Err(ElfError::NoSegments);
        }
        let executable = image.segments().any(|s| {
            s.flags.contains(SegmentFlags::EXECUTE)
                && entry >= s.vaddr
                && entry - s.vaddr < s.mem_size
        });
        if !executable {
            return Err(ElfError::EntryNotExecutable(entry));
        }
        Ok(image)
    }

    pub fn segments(&self) -> impl Iterator<Item = &Segment<'a>> {
        self.segments.iter().take(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const USER: Range<u64> = 0x1000..0x0000_8000_0000_0000;
    const RX: u32 = 5;
    const RW: u32 = 6;

    struct Ph {
        kind: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        file_size: u64,
        mem_size: u64,
    }

    fn load(flags: u32, offset: u64, vaddr: u64, file_size: u64, mem_size: u64) -> Ph {
        Ph {
            kind: PT_LOAD,
            flags,
            offset,
            vaddr,
            file_size,
            mem_size,
        }
    }

    /// An ELF header, then the program headers, then `body` at offset 0x1000.
    fn build(entry: u64, phs: &[Ph], body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(&MAGIC);
        f[4] = ELFCLASS64;
        f[5] = ELFDATA2LSB;
        f[6] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&PHDR_SIZE.to_le_bytes());
        f[56..58].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        for (i, ph) in phs.iter().enumerate() {
            let o = 64 + i * 56;
            f[o..o + 4].copy_from_slice(&ph.kind.to_le_bytes());
            f[o + 4..o + 8].copy_from_slice(&ph.flags.to_le_bytes());
            f[o + 8..o + 16].copy_from_slice(&ph.offset.to_le_bytes());
            f[o + 16..o + 24].copy_from_slice(&ph.vaddr.to_le_bytes());
            f[o + 24..o + 32].copy_from_slice(&ph.vaddr.to_le_bytes());
            f[o + 32..o + 40].copy_from_slice(&ph.file_size.to_le_bytes());
            f[o + 40..o + 48].copy_from_slice(&ph.mem_size.to_le_bytes());
            f[o + 48..o + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        f.extend_from_slice(body);
        f
    }

    /// Text at 0x40_0000 (0x100 bytes), data at 0x40_1000 with bss, and a
    /// non-load header in between.
    fn good() -> Vec<u8> {
        let body: Vec<u8> = (0..0x180u32).map(|i| i as u8).collect();
        // A bss-only segment needs no file bytes, wherever its offset points.
        let bss = build(
            0x40_0000,
            &[
                load(RX, 0x1000, 0x40_0000, 0x10, 0x10),
                load(RW, u64::MAX, 0x40_1000, 0, 0x2000),
            ],
            &body,
        );
        let image = ElfImage::parse(&bss, USER).unwrap();
        assert!(image.segments().nth(1).unwrap().data.is_empty());
        let note = Ph {
            kind: 4,
            ..load(4, 0x1000, 0x40_0000, 8, 8)
        };
        build(
            0x40_0010,
            &[
                load(RX, 0x1000, 0x40_0000, 0x100, 0x100),
                note,
                load(RW, 0x1100, 0x40_1000, 0x80, 0x3000),
                load(RW, 0, 0x50_0000, 0, 0), // empty: ignored
            ],
            &body,
        )
    }

    #[test]
    fn parses_good_image() {
        let bytes = good();
        let image = ElfImage::parse(&bytes, USER).unwrap();
        assert_eq!(image.entry, 0x40_0010);
        let segs: Vec<_> = image.segments().collect();
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].vaddr, 0x40_0000);
        assert_eq!(segs[0].flags, SegmentFlags::READ | SegmentFlags::EXECUTE);
        assert_eq!(segs[0].data, &bytes[0x1000..0x1100]);
        assert_eq!(segs[1].mem_size, 0x3000);
        assert_eq!(segs[1].data.len(), 0x80);
        assert_eq!(segs[1].data[0], 0x00);
        assert_eq!(segs[1].pages(), 0x40_1000..0x40_4000);
    }

    fn parse_err(bytes: &[u8]) -> ElfError {
        ElfImage::parse(bytes, USER).unwrap_err()
    }

    fn with(mut bytes: Vec<u8>, offset: usize, value: &[u8]) -> Vec<u8> {
        bytes[offset..offset + value.len()].copy_from_slice(value);
        bytes
    }

    #[test]
    fn header_errors() {
        assert_eq!(parse_err(b"\x7fEL"), ElfError::TooShort { len: 3 });
        assert_eq!(parse_err(&good()[..63]), ElfError::TooShort { len: 63 });
        assert_eq!(parse_err(b"MZ\x90\x00 this is a PE file"), ElfError::NotElf);
        assert_eq!(ElfError::NotElf.to_string(), "not an ELF file");
        assert_eq!(parse_err(&with(good(), 4, &[1])), ElfError::Not64Bit(1));
        assert_eq!(
            parse_err(&with(good(), 5, &[2])),
            ElfError::NotLittleEndian(2)
        );
        assert_eq!(
            parse_err(&with(good(), 18, &[3, 0])),
            ElfError::WrongMachine(3)
        );
        let pie = parse_err(&with(good(), 16, &[3, 0]));
        assert_eq!(pie, ElfError::NotExecutable(ET_DYN));
        assert!(pie.to_string().contains("static non-PIE"));
        assert_eq!(
            parse_err(&with(good(), 16, &[1, 0])),
            ElfError::NotExecutable(1)
        );
        assert_eq!(
            parse_err(&with(good(), 54, &[32, 0])),
            ElfError::BadProgramHeaderSize(32)
        );
        assert_eq!(parse_err(&with(good(), 56, &[0, 0])), ElfError::NoSegments);
    }

    #[test]
    fn truncated_program_headers() {
        let bytes = with(good(), 32, &0xc00u64.to_le_bytes());
        let len = bytes.len();
        let err = parse_err(&bytes[..3000]);
        assert_eq!(
            err,
            ElfError::Truncated {
                len: 3000,
                needed: 0xc00 + 4 * 56
            }
        );
        assert_eq!(
            err.to_string(),
            "truncated: the file is 3000 bytes but its program headers end at 3296"
        );
        let huge = with(good(), 32, &u64::MAX.to_le_bytes());
        assert_eq!(
            parse_err(&huge),
            ElfError::Truncated {
                len,
                needed: u64::MAX
            }
        );
    }

    #[test]
    fn segment_errors() {
        let body = [0u8; 0x100];
        let one = |ph: Ph, entry: u64| parse_err(&build(entry, &[ph], &body));
        assert!(matches!(
            one(load(RX, 0x1080, 0x40_0000, 0x100, 0x100), 0x40_0000),
            ElfError::SegmentTruncated { index: 0, .. }
        ));
        assert!(matches!(
            one(load(RX, u64::MAX, 0x40_0000, 2, 2), 0x40_0000),
            ElfError::SegmentTruncated { .. }
        ));
        assert_eq!(
            one(load(RX, 0x1000, 0x40_0000, 0x100, 0x80), 0x40_0000),
            ElfError::FileSizeExceedsMemSize {
                index: 0,
                file_size: 0x100,
                mem_size: 0x80
            }
        );
        for vaddr in [0, 0x800, 0x7fff_ffff_f000, u64::MAX - 0x10] {
            assert!(
                matches!(
                    one(load(RX, 0x1000, vaddr, 0x100, 0x1001), vaddr),
                    ElfError::SegmentOutOfRange { .. }
                ),
                "{vaddr:#x}"
            );
        }
        assert_eq!(
            one(load(RW, 0x1000, 0x40_0000, 0x100, 0x100), 0x40_0000),
            ElfError::EntryNotExecutable(0x40_0000)
        );
        assert_eq!(
            one(load(RX, 0x1000, 0x40_0000, 0x100, 0x100), 0x40_0100),
            ElfError::EntryNotExecutable(0x40_0100)
        );
        assert_eq!(
            one(load(RX, 0x1000, 0x40_0000, 0, 0), 0x40_0000),
            ElfError::NoSegments
        );
        let note = Ph {
            kind: 4,
            ..load(RX, 0, 0, 0, 8)
        };
        assert_eq!(one(note, 0), ElfError::NoSegments);
    }

    #[test]
    fn overlapping_and_too_many_segments() {
        let body = [0u8; 0x100];
        // Different bytes, same page.
        let phs = [
            load(RX, 0x1000, 0x40_0000, 0x10, 0x10),
            load(RW, 0x1010, 0x40_0800, 0x10, 0x10),
        ];
        assert_eq!(
            parse_err(&build(0x40_0000, &phs, &body)),
            ElfError::OverlappingSegments {
                first: 0,
                second: 1
            }
        );
        let phs: Vec<Ph> = (0..17u64)
            .map(|i| load(RX, 0x1000, 0x40_0000 + i * 0x1000, 0x10, 0x10))
            .collect();
        assert_eq!(
            parse_err(&build(0x40_0000, &phs, &body)),
            ElfError::TooManySegments
        );
        let sixteen = build(0x40_0000, &phs[..16], &body);
        let image = ElfImage::parse(&sixteen, USER).unwrap();
        assert_eq!(image.segments().count(), 16);
    }

    #[test]
    fn never_panics_on_damaged_images() {
        let good = good();
        for len in 0..good.len() {
            let _ = ElfImage::parse(&good[..len], USER);
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let header_area = 64 + 4 * 56;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..1 + next() % 4 {
                let r = next();
                // Mostly hit the headers, where the interesting fields are.
                let pos = if r % 4 == 0 {
                    r as usize % bytes.len()
                } else {
                    r as usize % header_area
                };
                bytes[pos] = (next() >> 8) as u8;
            }
            let cut = if next() % 8 == 0 {
                next() as usize % bytes.len()
            } else {
                bytes.len()
            };
            if let Ok(image) = ElfImage::parse(&bytes[..cut], USER) {
                for s in image.segments() {
                    assert!(s.data.len() as u64 <= s.mem_size);
                    assert!(s.pages().start >= USER.start && s.pages().end <= USER.end);
                }
            }
        }
    }
}
