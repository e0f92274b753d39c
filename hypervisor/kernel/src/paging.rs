//! x86_64 4-level page tables with 4 KiB, 2 MiB and 1 GiB leaves.
//!
//! The builder reaches table memory through [`TableMemory`], so the kernel
//! plugs in its direct map and the host tests a fake. Intermediate entries are
//! always `PRESENT | WRITABLE` (plus `USER` when a user leaf sits below them);
//! every restriction lives on the leaf.
//!
//! Nothing here flushes the TLB: after `unmap` or a permission change the
//! caller must invalidate (and shoot down on other CPUs). Unmapping leaves the
//! emptied tables in place; they are reused by later mappings and returned by
//! [`AddressSpace::free_tables`].

use core::fmt;
use core::ops::Range;

use bitflags::bitflags;

/// How the builder reaches page-table memory.
pub trait TableMemory {
    /// Entry `index` (< 512) of the 4 KiB table at physical address `table`.
    fn read_entry(&self, table: u64, index: usize) -> u64;
    fn write_entry(&mut self, table: u64, index: usize, value: u64);
    /// Physical address of a fresh, zeroed 4 KiB frame.
    fn alloc_table(&mut self) -> Option<u64>;
    fn free_table(&mut self, table: u64);
}

bitflags! {
    /// Leaf permissions and caching, at their page-table-entry bit positions.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MapFlags: u64 {
        const WRITABLE = 1 << 1;
        const USER = 1 << 2;
        const WRITE_THROUGH = 1 << 3;
        const CACHE_DISABLE = 1 << 4;
        const GLOBAL = 1 << 8;
        const NO_EXECUTE = 1 << 63;
    }
}

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = MapFlags::WRITABLE.bits();
const USER: u64 = MapFlags::USER.bits();
/// Page size bit: the entry in a level 3 or level 2 table is a leaf.
const HUGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = MapFlags::NO_EXECUTE.bits();
/// Physical address bits 12..52 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// One past the highest physical address an entry can hold.
pub const PHYS_LIMIT: u64 = 1 << 52;
pub const ENTRIES: usize = 512;
/// Top-level entries `[0, 256)` map the lower (user) half, `[256, 512)` the
/// upper (kernel) half.
pub const LOWER_HALF: Range<usize> = 0..256;
pub const UPPER_HALF: Range<usize> = 256..512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 1 << 12,
            Self::Size2M => 1 << 21,
            Self::Size1G => 1 << 30,
        }
    }

    /// Level of the table holding a leaf of this size (1 = page table).
    const fn leaf_level(self) -> u32 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }

    const fn of_leaf_level(level: u32) -> Self {
        match level {
            3 => Self::Size1G,
            2 => Self::Size2M,
            _ => Self::Size4K,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// `virt` or `phys` is not aligned to `align`, or a length is not a
    /// multiple of it.
    Misaligned {
        virt: u64,
        phys: u64,
        align: u64,
    },
    /// The address (or the end of the range starting there) is outside the
    /// canonical 48-bit space.
    NonCanonical(u64),
    /// The physical range reaches beyond what a page-table entry can hold.
    PhysOutOfRange(u64),
    /// Something is already mapped at `virt`: a page, a large page covering
    /// it, or a table where a large page should go.
    AlreadyMapped(u64),
    NotMapped(u64),
    OutOfMemory,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Misaligned { virt, phys, align } => write!(
                f,
                "cannot map virtual {virt:#x} to physical {phys:#x}: \
                 addresses and length must be multiples of {align:#x}"
            ),
            Self::NonCanonical(virt) => {
                write!(f, "virtual address range at {virt:#x} is not canonical")
            }
            Self::PhysOutOfRange(phys) => write!(
                f,
                "physical range at {phys:#x} is beyond the 52-bit physical address space"
            ),
            Self::AlreadyMapped(virt) => {
                write!(f, "virtual address {virt:#x} is already mapped")
            }
            Self::NotMapped(virt) => write!(f, "virtual address {virt:#x} is not mapped"),
            Self::OutOfMemory => write!(f, "out of memory for page tables"),
        }
    }
}

/// Where a virtual address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the translated byte.
    pub phys: u64,
    pub size: PageSize,
    /// Effective permissions: `WRITABLE` and `USER` only if every level grants
    /// them, `NO_EXECUTE` if any level sets it; caching bits and `GLOBAL` from
    /// the leaf.
    pub flags: MapFlags,
}

/// `virt` with bits 63:48 copied from bit 47: the canonical address the
/// CPU would accept where `virt` is not.
pub const fn canonicalize(virt: u64) -> u64 {
    (((virt << 16) as i64) >> 16) as u64
}

pub const fn is_canonical(virt: u64) -> bool {
    (((virt << 16) as i64) >> 16) as u64 == virt
}

const fn index(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

fn leaf_addr_mask(level: u32) -> u64 {
    // Bit 12 of a large leaf is PAT, not address.
    ADDR_MASK & !(PageSize::of_leaf_level(level).bytes() - 1)
}

pub struct AddressSpace {
    root: u64,
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new(mem: &mut impl TableMemory) -> Result<Self, MapError> {
        mem.alloc_table()
            .map(Self::from_root)
            .ok_or(MapError::OutOfMemory)
    }

    /// Takes over existing tables (e.g. the ones built at boot).
    pub const fn from_root(root: u64) -> Self {
        Self { root }
    }

    /// Physical address of the top-level table, for CR3.
    pub const fn root(&self) -> u64 {
        self.root
    }

    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        virt: u64,
        phys: u64,
        size: PageSize,
        flags: MapFlags,
    ) -> Result<(), MapError> {
        let bytes = size.bytes();
        if !virt.is_multiple_of(bytes) || !phys.is_multiple_of(bytes) {
            return Err(MapError::Misaligned {
                virt,
                phys,
                align: bytes,
            });
        }
        if !is_canonical(virt) {
            return Err(MapError::NonCanonical(virt));
        }
        if phys.checked_add(bytes).is_none_or(|end| end > PHYS_LIMIT) {
            return Err(MapError::PhysOutOfRange(phys));
        }

        let user = flags.contains(MapFlags::USER);
        let leaf_level = size.leaf_level();
        let mut table = self.root;
        for level in (leaf_level + 1..=4).rev() {
            let i = index(virt, level);
            let entry = mem.read_entry(table, i);
            if entry & PRESENT == 0 {
                let next = mem.alloc_table().ok_or(MapError::OutOfMemory)?;
                let user_bit = if user { USER } else { 0 };
                mem.write_entry(table, i, next | PRESENT | WRITABLE | user_bit);
                table = next;
            } else if entry & HUGE != 0 && level <= 3 {
                return Err(MapError::AlreadyMapped(virt));
            } else {
                let wanted = entry | WRITABLE | if user { USER } else { 0 };
                if wanted != entry {
                    mem.write_entry(table, i, wanted);
                }
                table = entry & ADDR_MASK;
            }
        }

        let i = index(virt, leaf_level);
        if mem.read_entry(table, i) & PRESENT != 0 {
            return Err(MapError::AlreadyMapped(virt));
        }
        let huge = if leaf_level > 1 { HUGE } else { 0 };
        mem.write_entry(table, i, phys | PRESENT | huge | flags.bits());
        Ok(())
    }

    /// Maps `[virt, virt + len)` to `[phys, phys + len)`, using 2 MiB and
    /// 1 GiB pages where `allow_large` and the alignment of both addresses
    /// permit. On failure nothing of the range stays mapped.
    pub fn map_range(
        &mut self,
        mem: &mut impl TableMemory,
        virt: u64,
        phys: u64,
        len: u64,
        flags: MapFlags,
        allow_large: bool,
    ) -> Result<(), MapError> {
        let small = PageSize::Size4K.bytes();
        if !virt.is_multiple_of(small) || !phys.is_multiple_of(small) || !len.is_multiple_of(small)
        {
            return Err(MapError::Misaligned {
                virt,
                phys,
                align: small,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let last = virt
            .checked_add(len - 1)
            .ok_or(MapError::NonCanonical(virt))?;
        // Both ends canonical and in the same half: no hole in between.
        if !is_canonical(virt) || !is_canonical(last) || (virt ^ last) >> 63 != 0 {
            return Err(MapError::NonCanonical(virt));
        }
        if phys.checked_add(len).is_none_or(|end| end > PHYS_LIMIT) {
            return Err(MapError::PhysOutOfRange(phys));
        }

        let mut done = 0;
        while done < len {
            let (v, p) = (virt + done, phys + done);
            let size = [PageSize::Size1G, PageSize::Size2M]
                .into_iter()
                .find(|s| {
                    let b = s.bytes();
                    allow_large && v.is_multiple_of(b) && p.is_multiple_of(b) && len - done >= b
                })
                .unwrap_or(PageSize::Size4K);
            if let Err(err) = self.map(mem, v, p, size, flags) {
                self.unmap_mapped_prefix(mem, virt, done);
                return Err(err);
            }
            done += size.bytes();
        }
        Ok(())
    }

    /// Undoes the first `len` bytes of a `map_range` that succeeded so far.
    fn unmap_mapped_prefix(&mut self, mem: &mut impl TableMemory, virt: u64, len: u64) {
        let mut off = 0;
        while off < len {
            match self.unmap(mem, virt + off) {
                Ok((_, size)) => off += size.bytes(),
                Err(_) => off += PageSize::Size4K.bytes(),
            }
        }
    }

    /// Removes the page starting at `virt` and returns where it pointed.
    /// `virt` must be the first address of the page, whatever its size.
    pub fn unmap(
        &mut self,
        mem: &mut impl TableMemory,
        virt: u64,
    ) -> Result<(u64, PageSize), MapError> {
        if !is_canonical(virt) {
            return Err(MapError::NonCanonical(virt));
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let i = index(virt, level);
            let entry = mem.read_entry(table, i);
            if entry & PRESENT == 0 {
                return Err(MapError::NotMapped(virt));
            }
            if level == 1 || (level <= 3 && entry & HUGE != 0) {
                let size = PageSize::of_leaf_level(level);
                let phys = entry & leaf_addr_mask(level);
                if !virt.is_multiple_of(size.bytes()) {
                    return Err(MapError::Misaligned {
                        virt,
                        phys,
                        align: size.bytes(),
                    });
                }
                mem.write_entry(table, i, 0);
                return Ok((phys, size));
            }
            table = entry & ADDR_MASK;
        }
        Err(MapError::NotMapped(virt))
    }

    pub fn translate(&self, mem: &impl TableMemory, virt: u64) -> Option<Translation> {
        if !is_canonical(virt) {
            return None;
        }
        let mut table = self.root;
        let mut all = WRITABLE | USER;
        let mut any_nx = 0;
        for level in (1..=4).rev() {
            let entry = mem.read_entry(table, index(virt, level));
            if entry & PRESENT == 0 {
                return None;
            }
            all &= entry;
            any_nx |= entry & NO_EXECUTE;
            if level == 1 || (level <= 3 && entry & HUGE != 0) {
                let size = PageSize::of_leaf_level(level);
                let leaf_only =
                    MapFlags::GLOBAL | MapFlags::WRITE_THROUGH | MapFlags::CACHE_DISABLE;
                let flags = MapFlags::from_bits_truncate(all | any_nx)
                    | (MapFlags::from_bits_truncate(entry) & leaf_only);
                return Some(Translation {
                    phys: (entry & leaf_addr_mask(level)) | (virt & (size.bytes() - 1)),
                    size,
                    flags,
                });
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    /// Copies top-level entries `range` of the table at `other_root` into
    /// this one, so both share the tables below (used for the kernel half).
    /// Indices past 511 are ignored.
    pub fn share_top_entries(
        &mut self,
        mem: &mut impl TableMemory,
        other_root: u64,
        range: Range<usize>,
    ) {
        for i in range.start..range.end.min(ENTRIES) {
            let entry = mem.read_entry(other_root, i);
            mem.write_entry(self.root, i, entry);
        }
    }

    /// Frees the tables reachable from top-level entries `owned` and then the
    /// root itself. Shared entries (e.g. the kernel half) must be outside
    /// `owned`. The mapped frames themselves are the caller's business.
    pub fn free_tables(self, mem: &mut impl TableMemory, owned: Range<usize>) {
        for i in owned.start..owned.end.min(ENTRIES) {
            free_subtree(mem, mem.read_entry(self.root, i), 3);
        }
        mem.free_table(self.root);
    }
}

impl AddressSpace {
    /// Frees at most `budget` of the tables below top-level entries
    /// `owned`, the deepest first, clearing each entry that pointed to a
    /// freed table (so the next call goes on where this one stopped);
    /// whether none are left. The root stays ([`AddressSpace::free_tables`]
    /// frees it): a dying PD's tables go in steps, between which other
    /// CPUs may take the kernel lock.
    pub fn free_tables_some(
        &self,
        mem: &mut impl TableMemory,
        owned: Range<usize>,
        budget: &mut usize,
    ) -> bool {
        for i in owned.start..owned.end.min(ENTRIES) {
            if !free_entry(mem, self.root, i, 3, budget) {
                return false;
            }
        }
        true
    }
}

/// Frees the table entry `index` of `table` points to (of `level`) and the
/// tables below it, within `budget`, and clears the entry; whether it did.
fn free_entry(
    mem: &mut impl TableMemory,
    table: u64,
    index: usize,
    level: u32,
    budget: &mut usize,
) -> bool {
    let entry = mem.read_entry(table, index);
    if entry & PRESENT == 0 || entry & HUGE != 0 || level == 0 {
        return true;
    }
    let child = entry & ADDR_MASK;
    if level > 1 {
        for i in 0..ENTRIES {
            if !free_entry(mem, child, i, level - 1, budget) {
                return false;
            }
        }
    }
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    mem.free_table(child);
    mem.write_entry(table, index, 0);
    true
}

/// Frees the table `entry` points to (at `level`) and all tables below it.
fn free_subtree(mem: &mut impl TableMemory, entry: u64, level: u32) {
    if entry & PRESENT == 0 || entry & HUGE != 0 || level == 0 {
        return;
    }
    let table = entry & ADDR_MASK;
    if level > 1 {
        for i in 0..ENTRIES {
            free_subtree(mem, mem.read_entry(table, i), level - 1);
        }
    }
    mem.free_table(table);
}

/// A table-memory fake for host tests (here and in `virt`): tables live in
/// a map; allocation fails once `limit` tables exist.
#[cfg(test)]
pub(crate) mod fake {
    use super::{TableMemory, ENTRIES};
    use std::collections::HashMap;

    pub struct FakeMemory {
        pub tables: HashMap<u64, [u64; ENTRIES]>,
        next: u64,
        limit: usize,
        pub freed: usize,
    }

    impl FakeMemory {
        pub fn new(limit: usize) -> Self {
            Self {
                tables: HashMap::new(),
                next: 0x10_0000,
                limit,
                freed: 0,
            }
        }
    }

    impl TableMemory for FakeMemory {
        fn read_entry(&self, table: u64, index: usize) -> u64 {
            self.tables[&table][index]
        }
        fn write_entry(&mut self, table: u64, index: usize, value: u64) {
            self.tables.get_mut(&table).expect("write to a non-table")[index] = value;
        }
        fn alloc_table(&mut self) -> Option<u64> {
            if self.tables.len() >= self.limit {
                return None;
            }
            let table = self.next;
            self.next += 1 << 12;
            self.tables.insert(table, [0; ENTRIES]);
            Some(table)
        }
        fn free_table(&mut self, table: u64) {
            assert!(self.tables.remove(&table).is_some(), "double free of table");
            self.freed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: u64 = 1 << 12;
    const M2: u64 = 1 << 21;
    const G1: u64 = 1 << 30;

    use crate::paging::fake::FakeMemory;

    fn setup() -> (FakeMemory, AddressSpace) {
        let mut mem = FakeMemory::new(64);
        let space = AddressSpace::new(&mut mem).unwrap();
        (mem, space)
    }

    #[test]
    fn canonicalize_yields_canonical_addresses() {
        for virt in [
            0,
            0x7fff_ffff_ffff,
            0x8000_0000_0000,
            u64::MAX,
            0x1234_5678_9abc_def0,
        ] {
            let fixed = canonicalize(virt);
            assert!(is_canonical(fixed));
            assert_eq!(fixed & 0xffff_ffff_ffff, virt & 0xffff_ffff_ffff);
            if is_canonical(virt) {
                assert_eq!(fixed, virt);
            }
        }
    }

    #[test]
    fn map_translate_unmap_all_sizes() {
        let (mut mem, mut space) = setup();
        let rw = MapFlags::WRITABLE | MapFlags::NO_EXECUTE;
        let cases = [
            (0x40_0000_1000, 0x1234_5000, PageSize::Size4K),
            (0x40_0020_0000, 0x8000_0000, PageSize::Size2M),
            (0x80_4000_0000, 0x1_4000_0000, PageSize::Size1G),
            (0xffff_8000_0000_0000, 0x2000, PageSize::Size4K),
        ];
        for (virt, phys, size) in cases {
            space.map(&mut mem, virt, phys, size, rw).unwrap();
        }
        for (virt, phys, size) in cases {
            let off = size.bytes() - 8;
            let t = space.translate(&mem, virt + off).unwrap();
            assert_eq!(t.phys, phys + off);
            assert_eq!(t.size, size);
            assert_eq!(t.flags, rw);
        }
        for (virt, phys, size) in cases {
            assert_eq!(space.unmap(&mut mem, virt), Ok((phys, size)));
            assert_eq!(space.translate(&mem, virt), None);
            assert_eq!(space.unmap(&mut mem, virt), Err(MapError::NotMapped(virt)));
        }
        // Emptied tables are reused; a large page still cannot replace one.
        let tables = mem.tables.len();
        space
            .map(&mut mem, 0x40_0000_1000, 0x5000, PageSize::Size4K, rw)
            .unwrap();
        assert_eq!(mem.tables.len(), tables);
        assert_eq!(
            space.map(&mut mem, 0x40_0000_0000, 0, PageSize::Size2M, rw),
            Err(MapError::AlreadyMapped(0x40_0000_0000))
        );
    }

    #[test]
    fn effective_flags() {
        let (mut mem, mut space) = setup();
        let user_code = MapFlags::USER;
        space
            .map(&mut mem, 0x40_0000, 0x1000, PageSize::Size4K, user_code)
            .unwrap();
        let kernel_data = MapFlags::WRITABLE | MapFlags::NO_EXECUTE | MapFlags::GLOBAL;
        space
            .map(&mut mem, 0x40_1000, 0x2000, PageSize::Size4K, kernel_data)
            .unwrap();
        let mmio = MapFlags::WRITABLE | MapFlags::CACHE_DISABLE | MapFlags::WRITE_THROUGH;
        space
            .map(&mut mem, 0x40_2000, 0xfee0_0000, PageSize::Size4K, mmio)
            .unwrap();

        assert_eq!(space.translate(&mem, 0x40_0123).unwrap().flags, user_code);
        assert_eq!(space.translate(&mem, 0x40_1000).unwrap().flags, kernel_data);
        assert_eq!(space.translate(&mem, 0x40_2000).unwrap().flags, mmio);

        // The intermediate entries carry USER because a user leaf is below,
        // yet the kernel leaf stays supervisor-only.
        let l4 = mem.read_entry(space.root(), 0);
        assert_eq!(l4 & (PRESENT | WRITABLE | USER), PRESENT | WRITABLE | USER);
        assert_eq!(l4 & NO_EXECUTE, 0);

        // Restrictions at an upper level win: strip W and U from the top
        // entry and set NX there.
        mem.write_entry(space.root(), 0, (l4 & !(WRITABLE | USER)) | NO_EXECUTE);
        let t = space.translate(&mem, 0x40_2000).unwrap();
        assert_eq!(
            t.flags,
            MapFlags::NO_EXECUTE | MapFlags::CACHE_DISABLE | MapFlags::WRITE_THROUGH
        );
        assert_eq!(
            space.translate(&mem, 0x40_0000).unwrap().flags,
            MapFlags::NO_EXECUTE
        );
    }

    #[test]
    fn misaligned_noncanonical_and_phys_errors() {
        let (mut mem, mut space) = setup();
        let f = MapFlags::WRITABLE;
        assert!(matches!(
            space.map(&mut mem, 0x1000, 0x20_0000, PageSize::Size2M, f),
            Err(MapError::Misaligned { align: M2, .. })
        ));
        assert!(matches!(
            space.map(&mut mem, 0x20_0000, 0x1000, PageSize::Size2M, f),
            Err(MapError::Misaligned { .. })
        ));
        assert!(matches!(
            space.map(&mut mem, 0x123, 0, PageSize::Size4K, f),
            Err(MapError::Misaligned { .. })
        ));
        assert!(matches!(
            space.map_range(&mut mem, 0x1000, 0x1000, 0x1800, f, true),
            Err(MapError::Misaligned { .. })
        ));
        let hole = 0x0000_8000_0000_0000;
        assert_eq!(
            space.map(&mut mem, hole, 0, PageSize::Size4K, f),
            Err(MapError::NonCanonical(hole))
        );
        assert_eq!(
            space.unmap(&mut mem, hole),
            Err(MapError::NonCanonical(hole))
        );
        assert_eq!(space.translate(&mem, hole), None);
        // A range running off the end of the lower half or of the space.
        let below = hole - 0x1000;
        assert_eq!(
            space.map_range(&mut mem, below, 0, 0x2000, f, false),
            Err(MapError::NonCanonical(below))
        );
        let top = !0xfff;
        assert_eq!(
            space.map_range(&mut mem, top, 0, 0x2000, f, false),
            Err(MapError::NonCanonical(top))
        );
        assert_eq!(
            space.map(&mut mem, 0x1000, PHYS_LIMIT, PageSize::Size4K, f),
            Err(MapError::PhysOutOfRange(PHYS_LIMIT))
        );
        assert_eq!(
            space.map_range(&mut mem, 0x1000, PHYS_LIMIT - 0x1000, 0x2000, f, false),
            Err(MapError::PhysOutOfRange(PHYS_LIMIT - 0x1000))
        );
        assert_eq!(space.map_range(&mut mem, 0x1000, 0, 0, f, true), Ok(()));
        // Unmapping from inside a large page is refused.
        space
            .map(&mut mem, 0x20_0000, 0, PageSize::Size2M, f)
            .unwrap();
        assert!(matches!(
            space.unmap(&mut mem, 0x20_1000),
            Err(MapError::Misaligned { align: M2, .. })
        ));
        assert!(space.translate(&mem, 0x20_1000).is_some());
        assert!(MapError::NonCanonical(hole)
            .to_string()
            .contains("not canonical"));
    }

    #[test]
    fn overlapping_mappings() {
        let (mut mem, mut space) = setup();
        let f = MapFlags::WRITABLE;
        space
            .map(&mut mem, 0x4000_0000, 0, PageSize::Size1G, f)
            .unwrap();
        space
            .map(&mut mem, 0x20_0000, 0, PageSize::Size2M, f)
            .unwrap();
        space.map(&mut mem, 0x1000, 0, PageSize::Size4K, f).unwrap();
        let busy = [
            (0x4000_0000, PageSize::Size1G), // the same page
            (0x4020_0000, PageSize::Size2M), // inside the 1G page
            (0x4000_5000, PageSize::Size4K),
            (0x20_0000, PageSize::Size2M),
            (0x20_3000, PageSize::Size4K), // inside the 2M page
            (0x1000, PageSize::Size4K),
            (0, PageSize::Size2M), // a table is already there
            (0, PageSize::Size1G),
        ];
        for (virt, size) in busy {
            assert_eq!(
                space.map(&mut mem, virt, 0, size, f),
                Err(MapError::AlreadyMapped(virt)),
                "{virt:#x} {size:?}"
            );
        }
        assert_eq!(
            space.map_range(&mut mem, 0x3f_f000, 0, 0x20_0000, f, true),
            Err(MapError::AlreadyMapped(0x3f_f000))
        );
    }

    #[test]
    fn map_range_picks_large_pages() {
        let (mut mem, mut space) = setup();
        let f = MapFlags::WRITABLE;
        // 4K up to the 2M boundary, 2M pages to the 1G boundary, one 1G page,
        // then a 2M page and a 4K tail.
        let virt = G1 - M2 - K4;
        let len = K4 + M2 + G1 + M2 + K4;
        space.map_range(&mut mem, virt, virt, len, f, true).unwrap();
        let expect = [
            (virt, PageSize::Size4K),
            (G1 - M2, PageSize::Size2M),
            (G1, PageSize::Size1G),
            (2 * G1, PageSize::Size2M),
            (2 * G1 + M2, PageSize::Size4K),
        ];
        for (v, size) in expect {
            let t = space.translate(&mem, v).unwrap();
            assert_eq!((t.phys, t.size), (v, size), "{v:#x}");
        }
        assert_eq!(space.translate(&mem, 2 * G1 + M2 + K4), None);
        assert_eq!(space.translate(&mem, virt - K4), None);

        // Phys alignment matters too, and large pages can be refused.
        space
            .map_range(&mut mem, 4 * G1, 0x1000, 2 * M2, f, true)
            .unwrap();
        assert_eq!(
            space.translate(&mem, 4 * G1).unwrap().size,
            PageSize::Size4K
        );
        space.map_range(&mut mem, 5 * G1, 0, M2, f, false).unwrap();
        assert_eq!(
            space.translate(&mem, 5 * G1).unwrap().size,
            PageSize::Size4K
        );
    }

    #[test]
    fn map_range_rolls_back() {
        // Out of tables halfway: root + L3 + L2 + one L1 = 4 tables.
        let mut mem = FakeMemory::new(4);
        let mut space = AddressSpace::new(&mut mem).unwrap();
        let f = MapFlags::WRITABLE | MapFlags::USER;
        let virt = M2 - 2 * K4;
        assert_eq!(
            space.map_range(&mut mem, virt, 0, 4 * K4, f, true),
            Err(MapError::OutOfMemory)
        );
        for off in (0..4 * K4).step_by(K4 as usize) {
            assert_eq!(space.translate(&mem, virt + off), None);
        }

        // Running into an existing mapping undoes the pages before it.
        let mut mem = FakeMemory::new(64);
        let mut space = AddressSpace::new(&mut mem).unwrap();
        space.map(&mut mem, 3 * M2, 0, PageSize::Size4K, f).unwrap();
        assert_eq!(
            space.map_range(&mut mem, 0, 0, 4 * M2, f, true),
            Err(MapError::AlreadyMapped(3 * M2))
        );
        for v in [0, M2, 2 * M2, 3 * M2 + K4] {
            assert_eq!(space.translate(&mem, v), None, "{v:#x}");
        }
        assert!(space.translate(&mem, 3 * M2).is_some());
    }

    #[test]
    fn out_of_memory() {
        let mut mem = FakeMemory::new(0);
        assert!(matches!(
            AddressSpace::new(&mut mem),
            Err(MapError::OutOfMemory)
        ));
        let mut mem = FakeMemory::new(2);
        let mut space = AddressSpace::new(&mut mem).unwrap();
        assert_eq!(
            space.map(&mut mem, 0x1000, 0, PageSize::Size4K, MapFlags::empty()),
            Err(MapError::OutOfMemory)
        );
        // A 1G page needs only the L3 table that is already there.
        space
            .map(&mut mem, G1, 0, PageSize::Size1G, MapFlags::empty())
            .unwrap();
    }

    #[test]
    fn share_and_free() {
        let mut mem = FakeMemory::new(64);
        let mut kernel = AddressSpace::new(&mut mem).unwrap();
        let kva = 0xffff_ffff_8000_0000;
        kernel
            .map_range(&mut mem, kva, 0x10_0000, 3 * K4, MapFlags::GLOBAL, false)
            .unwrap();

        let mut task = AddressSpace::new(&mut mem).unwrap();
        task.share_top_entries(&mut mem, kernel.root(), UPPER_HALF.start..usize::MAX);
        task.map(
            &mut mem,
            0x40_0000,
            0x5000,
            PageSize::Size4K,
            MapFlags::USER,
        )
        .unwrap();
        assert_eq!(task.translate(&mem, kva + K4).unwrap().phys, 0x10_1000);
        assert_eq!(kernel.translate(&mem, 0x40_0000), None);

        let before = mem.tables.len();
        task.free_tables(&mut mem, LOWER_HALF);
        // Root, L3, L2, L1 of the task; the kernel tables stay.
        assert_eq!(mem.freed, 4);
        assert_eq!(mem.tables.len(), before - 4);
        assert_eq!(kernel.translate(&mem, kva).unwrap().phys, 0x10_0000);
    }

    #[test]
    fn tables_go_in_steps_of_the_budget_and_the_rest_with_the_root() {
        let mut mem = FakeMemory::new(256);
        let mut space = AddressSpace::new(&mut mem).unwrap();
        // 8 page tables under one PD table under one PDPT, and a page
        // under a second PDPT (its PD and page table): 13 below the root.
        for i in 0..8u64 {
            let virt = 0x40_0000_0000 + i * M2;
            space
                .map(&mut mem, virt, 0x5000, PageSize::Size4K, MapFlags::USER)
                .unwrap();
        }
        space
            .map(
                &mut mem,
                0x80_0000_0000,
                0x6000,
                PageSize::Size4K,
                MapFlags::USER,
            )
            .unwrap();
        let below_root = mem.tables.len() - 1;
        assert_eq!(below_root, 13);
        let mut steps = 0;
        loop {
            let mut budget = 4;
            let done = space.free_tables_some(&mut mem, LOWER_HALF, &mut budget);
            steps += 1;
            if done {
                break;
            }
            assert_eq!(budget, 0, "a step that stops has used its budget");
            assert!(steps < 10);
        }
        assert_eq!(steps, below_root.div_ceil(4));
        assert_eq!(mem.freed, below_root);
        assert_eq!(space.translate(&mem, 0x40_0000_0000), None);
        space.free_tables(&mut mem, LOWER_HALF);
        assert_eq!(mem.freed, below_root + 1);
        assert!(mem.tables.is_empty());
    }
}
