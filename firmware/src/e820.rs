//! The guest memory map (BIOS e820 form), shared by the Linux zero page and
//! the PVH memory map table.

use alloc::vec::Vec;

use crate::layout::{GuestLayout, Window, HIGH_RAM_START, LOW_RAM_END, RAM_ABOVE_4G};

/// e820 range types, as Linux and the PVH memory map number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

impl E820Entry {
    fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Sorted, non-overlapping ranges; a later [`insert`](Self::insert) wins
/// over what it covers.
#[derive(Clone, Debug, Default)]
struct E820Map(Vec<E820Entry>);

impl E820Map {
    fn insert(&mut self, w: Window, kind: E820Type) {
        let end = w.end().unwrap_or(u64::MAX);
        if w.size == 0 {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + 2);
        for e in self.0.drain(..) {
            if e.end() <= w.base || e.addr >= end {
                out.push(e);
                continue;
            }
            if e.addr < w.base {
                out.push(E820Entry {
                    size: w.base - e.addr,
                    ..e
                });
            }
            if e.end() > end {
                out.push(E820Entry {
                    addr: end,
                    size: e.end() - end,
                    ..e
                });
            }
        }
        out.push(E820Entry {
            addr: w.base,
            size: end - w.base,
            kind,
        });
        out.sort_unstable_by_key(|e| e.addr);
        self.0 = out;
    }
}

/// The memory map of `layout`: conventional RAM up to the EBDA, the
/// EBDA/VGA/BIOS area reserved up to 1 MiB, RAM from 1 MiB to the MMIO
/// hole, RAM above 4 GiB for the rest; the ACPI table window as ACPI data
/// and the ECAM window reserved (Linux uses MMCONFIG only where e820 or
/// ACPI reserves it). Sorted by address, non-overlapping.
pub fn memory_map(layout: &GuestLayout) -> Vec<E820Entry> {
    let mut map = E820Map::default();
    let low_end = layout.low_ram_end();
    map.insert(Window::new(0, LOW_RAM_END.min(low_end)), E820Type::Ram);
    map.insert(
        Window::new(LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END),
        E820Type::Reserved,
    );
    map.insert(
        Window::new(HIGH_RAM_START, low_end.saturating_sub(HIGH_RAM_START)),
        E820Type::Ram,
    );
    map.insert(
        Window::new(RAM_ABOVE_4G, layout.high_ram_size()),
        E820Type::Ram,
    );
    map.insert(layout.acpi_tables, E820Type::Acpi);
    if let Some(ecam) = layout.ecam() {
        map.insert(ecam, E820Type::Reserved);
    }
    map.0
}

/// RAM ranges of `map`, clipped to `[lo, hi)`, lowest first.
fn ram_ranges(
    map: &[E820Entry],
    lo: u64,
    hi: u64,
) -> impl DoubleEndedIterator<Item = (u64, u64)> + '_ {
    map.iter()
        .filter(|e| e.kind == E820Type::Ram)
        .map(move |e| (e.addr.max(lo), e.end().min(hi)))
        .filter(|(s, e)| s < e)
}

/// Whether `[addr, addr + size)` lies inside one RAM entry of `map`.
pub fn is_ram(map: &[E820Entry], addr: u64, size: u64) -> bool {
    let Some(end) = addr.checked_add(size) else {
        return false;
    };
    map.iter()
        .any(|e| e.kind == E820Type::Ram && e.addr <= addr && end <= e.end())
}

/// The lowest `align`-aligned address of `size` bytes of RAM in `[lo, hi)`.
/// `align` must be a power of two.
pub fn lowest_fit(map: &[E820Entry], size: u64, lo: u64, hi: u64, align: u64) -> Option<u64> {
    ram_ranges(map, lo, hi).find_map(|(start, end)| {
        let at = start.checked_next_multiple_of(align)?;
        (at.checked_add(size)? <= end).then_some(at)
    })
}

/// The highest `align`-aligned address of `size` bytes of RAM in `[lo, hi)`.
/// `align` must be a power of two.
pub fn highest_fit(map: &[E820Entry], size: u64, lo: u64, hi: u64, align: u64) -> Option<u64> {
    ram_ranges(map, lo, hi).rev().find_map(|(start, end)| {
        let at = end.checked_sub(size)? & !(align - 1);
        (at >= start).then_some(at)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{GIB, MIB};

    fn e(addr: u64, size: u64, kind: E820Type) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn standard_map_below_the_hole() {
        let map = memory_map(&GuestLayout::standard(512 * MIB, 1));
        assert_eq!(
            map,
            [
                e(0, 0x9_fc00, E820Type::Ram),
                e(0x9_fc00, 0xe_0000 - 0x9_fc00, E820Type::Reserved),
                e(0xe_0000, 0x2_0000, E820Type::Acpi),
                e(MIB, 511 * MIB, E820Type::Ram),
                e(0xe000_0000, MIB, E820Type::Reserved),
            ]
        );
    }

    #[test]
    fn ram_above_the_hole_moves_past_4g() {
        let map = memory_map(&GuestLayout {
            ecam_base: None,
            ..GuestLayout::standard(4 * GIB, 1)
        });
        assert_eq!(map[3], e(MIB, 3 * GIB - MIB, E820Type::Ram));
        assert_eq!(map[4], e(4 * GIB, GIB, E820Type::Ram));
        assert_eq!(map.len(), 5);
    }

    #[test]
    fn acpi_window_in_ram_is_carved_out() {
        let layout = GuestLayout {
            acpi_tables: Window::new(64 * MIB, MIB),
            ..GuestLayout::standard(128 * MIB, 1)
        };
        let map = memory_map(&layout);
        assert_eq!(map[1], e(0x9_fc00, 0x6_0400, E820Type::Reserved));
        assert_eq!(map[2], e(MIB, 63 * MIB, E820Type::Ram));
        assert_eq!(map[3], e(64 * MIB, MIB, E820Type::Acpi));
        assert_eq!(map[4], e(65 * MIB, 63 * MIB, E820Type::Ram));
        for w in map.windows(2) {
            assert!(w[0].end() <= w[1].addr, "{map:?}");
        }
    }

    #[test]
    fn placement_stays_in_ram() {
        let map = memory_map(&GuestLayout::standard(64 * MIB, 1));
        assert!(is_ram(&map, MIB, 63 * MIB));
        assert!(!is_ram(&map, MIB, 63 * MIB + 1));
        assert!(!is_ram(&map, 0x9_f000, 0x2000));
        assert!(!is_ram(&map, u64::MAX, 2));
        assert_eq!(
            lowest_fit(&map, MIB, 0x1000, u64::MAX, 2 * MIB),
            Some(2 * MIB)
        );
        assert_eq!(
            lowest_fit(&map, 0x1000, 0x1000, u64::MAX, 0x1000),
            Some(0x1000)
        );
        assert_eq!(lowest_fit(&map, 64 * MIB, 0, u64::MAX, 1), None);
        assert_eq!(
            highest_fit(&map, 0x1800, 0, u64::MAX, 0x1000),
            Some(64 * MIB - 0x2000)
        );
        assert_eq!(
            highest_fit(&map, 0x1800, 0, 32 * MIB + 0x100, 0x1000),
            Some(32 * MIB - 0x2000)
        );
        assert_eq!(highest_fit(&map, MIB, 63 * MIB + 1, u64::MAX, 0x1000), None);
        // Too big for the top entry, so it lands in conventional memory.
        assert_eq!(
            highest_fit(&map, 0x1000, 0, MIB + 0x800, 0x1000),
            Some(0x9_e000)
        );
    }

    #[test]
    fn tiny_ram_has_no_empty_entries() {
        let map = memory_map(&GuestLayout {
            ecam_base: None,
            ..GuestLayout::standard(0x8_0000, 1)
        });
        assert_eq!(map[0], e(0, 0x8_0000, E820Type::Ram));
        assert!(map.iter().all(|e| e.size > 0));
    }
}
