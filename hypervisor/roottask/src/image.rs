//! What a component's address space holds: its ELF segments and its first
//! stack with the argument string on top, as pages to fill and delegate.

use alloc::vec::Vec;
use core::ops::Range;

use moat_abi::{layout, rights, PAGE_SIZE};
use moat_kernel::elf::{ElfImage, SegmentFlags};

/// Where a component's ELF segments may lie: above the null page, below
/// the stack, UTCB and the root's fixed windows.
pub const USER_RANGE: Range<u64> = 0x1000..0x0000_7fff_0000_0000;

/// Pages of a component's address space with the same rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First virtual page number.
    pub first_page: u64,
    pub pages: u64,
    pub rights: u8,
}

/// Memory rights for a segment: always read; write and execute as flagged.
pub fn segment_rights(flags: SegmentFlags) -> u8 {
    let mut r = rights::MEM_READ;
    if flags.contains(SegmentFlags::WRITE) {
        r |= rights::MEM_WRITE;
    }
    if flags.contains(SegmentFlags::EXECUTE) {
        r |= rights::MEM_EXECUTE;
    }
    r
}

/// The segments' regions, in file order.
pub fn segment_regions(image: &ElfImage) -> Vec<Region> {
    image
        .segments()
        .map(|s| {
            let pages = s.pages();
            Region {
                first_page: pages.start / PAGE_SIZE,
                pages: (pages.end - pages.start) / PAGE_SIZE,
                rights: segment_rights(s.flags),
            }
        })
        .collect()
}

/// The stack region: `stack_bytes` (a multiple of the page size) ending at
/// [`layout::STACK_TOP`], read-write.
pub fn stack_region(stack_bytes: u64) -> Region {
    let pages = stack_bytes / PAGE_SIZE;
    Region {
        first_page: layout::STACK_TOP / PAGE_SIZE - pages,
        pages,
        rights: rights::MEM_READ | rights::MEM_WRITE,
    }
}

/// Fills `page` (one page at virtual `page_vaddr`) with the part of a
/// segment that falls in it: file bytes `data` from `seg_vaddr` on, zero
/// elsewhere.
pub fn fill_page(page: &mut [u8], page_vaddr: u64, seg_vaddr: u64, data: &[u8]) {
    page.fill(0);
    let data_end = seg_vaddr.saturating_add(data.len() as u64);
    let page_end = page_vaddr.saturating_add(page.len() as u64);
    let start = seg_vaddr.max(page_vaddr);
    let end = data_end.min(page_end);
    if start >= end {
        return;
    }
    let src = (start - seg_vaddr) as usize..(end - seg_vaddr) as usize;
    let dst = (start - page_vaddr) as usize..(end - page_vaddr) as usize;
    page[dst].copy_from_slice(&data[src]);
}

/// The start record at the top of a new task's stack: a `u64` length, the
/// argument bytes, zero padding to a multiple of 16 so that `rsp` (the
/// record's start) is 16-byte aligned. Goes at `STACK_TOP - len`.
pub fn start_record(args: &[u8]) -> Vec<u8> {
    let len = (8 + args.len()).div_ceil(16) * 16;
    let mut record = Vec::with_capacity(len);
    record.extend_from_slice(&(args.len() as u64).to_le_bytes());
    record.extend_from_slice(args);
    record.resize(len, 0);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_follow_flags() {
        assert_eq!(segment_rights(SegmentFlags::READ), rights::MEM_READ);
        assert_eq!(
            segment_rights(SegmentFlags::READ | SegmentFlags::EXECUTE),
            rights::MEM_READ | rights::MEM_EXECUTE
        );
        assert_eq!(
            segment_rights(SegmentFlags::WRITE),
            rights::MEM_READ | rights::MEM_WRITE
        );
    }

    #[test]
    fn pages_get_their_part_of_the_segment() {
        let data: Vec<u8> = (1..=100).collect();
        let mut page = [0xffu8; 4096];
        // The segment starts 4000 bytes into the page: 96 bytes land here.
        fill_page(&mut page, 0x1000, 0x1000 + 4000, &data);
        assert!(page[..4000].iter().all(|&b| b == 0));
        assert_eq!(&page[4000..], &data[..96]);
        // The next page gets the remaining 4 bytes, then zeroes (bss).
        fill_page(&mut page, 0x2000, 0x1000 + 4000, &data);
        assert_eq!(&page[..4], &data[96..]);
        assert!(page[4..].iter().all(|&b| b == 0));
        // A page past the file bytes is all zero.
        fill_page(&mut page, 0x3000, 0x1000 + 4000, &data);
        assert!(page.iter().all(|&b| b == 0));
    }

    #[test]
    fn start_record_keeps_rsp_aligned() {
        for args in ["", "a", "calls=10000", "exactly8"] {
            let record = start_record(args.as_bytes());
            assert_eq!(record.len() % 16, 0);
            assert_eq!(&record[..8], &(args.len() as u64).to_le_bytes());
            assert_eq!(&record[8..8 + args.len()], args.as_bytes());
            assert!(record.len() >= 8 + args.len());
        }
        assert_eq!(start_record(b"").len(), 16);
        assert_eq!(start_record(b"12345678").len(), 16);
        assert_eq!(start_record(b"123456789").len(), 32);
    }

    #[test]
    fn stack_ends_at_the_top() {
        let region = stack_region(16 * 1024);
        assert_eq!(region.pages, 4);
        assert_eq!(
            (region.first_page + region.pages) * PAGE_SIZE,
            layout::STACK_TOP
        );
    }
}
