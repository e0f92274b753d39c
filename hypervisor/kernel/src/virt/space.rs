//! Guest-physical address spaces: 4-level tables with 4 KiB, 2 MiB and 1 GiB
//! leaves, shared by EPT and NPT. The entry format is the only difference and
//! comes in through [`EntryFormat`].
//!
//! Intermediate entries grant everything; every restriction lives on the
//! leaf. Adding a mapping needs no invalidation (neither EPT nor NPT caches
//! not-present entries); removing or changing one returns a [`Flush`] the
//! caller owes. Emptied tables stay in place until [`GuestSpace::destroy`].
//!
//! 4 KiB pages are folded into a 2 MiB leaf once a whole aligned 2 MiB of
//! guest-physical space maps 2 MiB of contiguous, aligned host memory with
//! one set of rights: the guest TLB then needs one entry instead of 512.
//! The 4 KiB table stays behind the large leaf, unchanged, so unmapping or
//! protecting one page later unfolds it without allocating anything.

use alloc::vec::Vec;
use core::marker::PhantomData;

use super::{
    Flush, FlushScope, GuestMapError, GuestRights, GuestTranslation, MemoryType, PageSize,
    TableMemory, GUEST_PHYS_LIMIT,
};
use crate::paging::{ENTRIES, PHYS_LIMIT};

/// The entry layout of one kind of guest-physical table.
pub trait EntryFormat {
    /// Page-size bit of a level 3 or level 2 entry that is a leaf.
    const LARGE: u64;

    /// Entry referencing the next-level table at host-physical `table`.
    fn table_entry(table: u64) -> u64;
    /// Leaf mapping `hpa`; `large` for a 2 MiB or 1 GiB page.
    fn leaf_entry(hpa: u64, rights: GuestRights, memory_type: MemoryType, large: bool) -> u64;
    fn is_present(entry: u64) -> bool;
    /// Rights the entry grants (for a table entry: to everything below).
    fn rights(entry: u64) -> GuestRights;
    fn memory_type(leaf: u64) -> MemoryType;
    /// The value the CPU is given for the space whose top table is `root`
    /// (the EPTP or nCR3), which also names it in invalidations.
    fn context(root: u64) -> u64;
}

/// Address bits 12..52 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

const fn leaf_level(size: PageSize) -> u32 {
    match size {
        PageSize::Size4K => 1,
        PageSize::Size2M => 2,
        PageSize::Size1G => 3,
    }
}

const fn size_of_level(level: u32) -> PageSize {
    match level {
        3 => PageSize::Size1G,
        2 => PageSize::Size2M,
        _ => PageSize::Size4K,
    }
}

fn leaf_addr(entry: u64, level: u32) -> u64 {
    entry & ADDR_MASK & !(size_of_level(level).bytes() - 1)
}

fn is_leaf<F: EntryFormat>(entry: u64, level: u32) -> bool {
    level == 1 || (level <= 3 && entry & F::LARGE != 0)
}

/// A guest-physical address space of format `F`.
pub struct GuestSpace<F> {
    root: u64,
    /// `(gpa, table)` of each folded 2 MiB region and the 4 KiB table kept
    /// behind its large leaf; sorted by gpa.
    folded: Vec<(u64, u64)>,
    /// Regions folded over the space's life (a region folded twice counts
    /// twice).
    folds: u64,
    format: PhantomData<F>,
}

/// Where a walk for a leaf ended.
struct Leaf {
    table: u64,
    index: usize,
    entry: u64,
    level: u32,
}

impl<F: EntryFormat> GuestSpace<F> {
    /// A new, empty space.
    pub fn new(mem: &mut impl TableMemory) -> Result<Self, GuestMapError> {
        let root = mem.alloc_table().ok_or(GuestMapError::OutOfMemory)?;
        Ok(Self {
            root,
            folded: Vec::new(),
            folds: 0,
            format: PhantomData,
        })
    }

    /// Host-physical address of the top-level table.
    pub const fn root(&self) -> u64 {
        self.root
    }

    /// The value the CPU is given for this space (EPTP or nCR3).
    pub fn context(&self) -> u64 {
        F::context(self.root)
    }

    /// Maps the page at `gpa` to `hpa` as write-back memory.
    pub fn map(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        rights: GuestRights,
    ) -> Result<(), GuestMapError> {
        self.map_with_type(mem, gpa, hpa, size, rights, MemoryType::WriteBack)
    }

    pub fn map_with_type(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        rights: GuestRights,
        memory_type: MemoryType,
    ) -> Result<(), GuestMapError> {
        let bytes = size.bytes();
        if !gpa.is_multiple_of(bytes) || !hpa.is_multiple_of(bytes) {
            return Err(GuestMapError::Misaligned {
                gpa,
                hpa,
                align: bytes,
            });
        }
        if gpa
            .checked_add(bytes)
            .is_none_or(|end| end > GUEST_PHYS_LIMIT)
        {
            return Err(GuestMapError::GpaOutOfRange(gpa));
        }
        if hpa.checked_add(bytes).is_none_or(|end| end > PHYS_LIMIT) {
            return Err(GuestMapError::HpaOutOfRange(hpa));
        }
        if !rights.contains(GuestRights::READ) {
            return Err(GuestMapError::InvalidRights(rights));
        }

        let leaf_level = leaf_level(size);
        let mut table = self.root;
        let mut parent = table;
        for level in (leaf_level + 1..=4).rev() {
            let i = index(gpa, level);
            let entry = mem.read_entry(table, i);
            parent = table;
            if !F::is_present(entry) {
                let next = mem.alloc_table().ok_or(GuestMapError::OutOfMemory)?;
                mem.write_entry(table, i, F::table_entry(next));
                table = next;
            } else if is_leaf::<F>(entry, level) {
                return Err(GuestMapError::AlreadyMapped(gpa));
            } else {
                table = entry & ADDR_MASK;
            }
        }

        let i = index(gpa, leaf_level);
        if F::is_present(mem.read_entry(table, i)) {
            return Err(GuestMapError::AlreadyMapped(gpa));
        }
        let leaf = F::leaf_entry(hpa, rights, memory_type, leaf_level > 1);
        mem.write_entry(table, i, leaf);
        if leaf_level == 1 {
            self.try_fold(mem, parent, table, gpa);
        }
        Ok(())
    }

    /// Replaces the level 2 entry of `gpa` in `parent` by a 2 MiB leaf if
    /// its 4 KiB `table` maps one contiguous, aligned 2 MiB block with one
    /// set of rights and memory type. No flush is owed: both translations
    /// agree, and the table stays as it was.
    fn try_fold(&mut self, mem: &mut impl TableMemory, parent: u64, table: u64, gpa: u64) {
        let first = mem.read_entry(table, 0);
        let base = first & ADDR_MASK;
        let same = |i: usize| {
            let entry = mem.read_entry(table, i);
            F::is_present(entry)
                && entry & ADDR_MASK == base + (i as u64) * PageSize::Size4K.bytes()
                && F::rights(entry) == F::rights(first)
                && F::memory_type(entry) == F::memory_type(first)
        };
        // The last entry first: while a region fills in order, that check
        // fails at once and mapping stays O(1).
        if !F::is_present(first)
            || !base.is_multiple_of(PageSize::Size2M.bytes())
            || !(1..ENTRIES).rev().all(same)
        {
            return;
        }
        let region = gpa & !(PageSize::Size2M.bytes() - 1);
        // Folding is an optimisation: without room to remember the table,
        // the region simply stays in 4 KiB pages.
        if self.folded.try_reserve(1).is_err() {
            return;
        }
        let at = self.folded.partition_point(|&(g, _)| g < region);
        self.folded.insert(at, (region, table));
        self.folds += 1;
        let leaf = F::leaf_entry(base, F::rights(first), F::memory_type(first), true);
        mem.write_entry(parent, index(gpa, 2), leaf);
    }

    /// Puts the 4 KiB table back behind a folded region containing `gpa`;
    /// the caller is about to change one of its pages and owes a flush.
    fn unfold(&mut self, mem: &mut impl TableMemory, gpa: u64) {
        let region = gpa & !(PageSize::Size2M.bytes() - 1);
        let Ok(at) = self.folded.binary_search_by_key(&region, |&(g, _)| g) else {
            return;
        };
        let (_, table) = self.folded.remove(at);
        let parent = self.level2_table(mem, gpa);
        mem.write_entry(parent, index(gpa, 2), F::table_entry(table));
    }

    /// The level 2 table on the path to `gpa`, which must exist (a 4 KiB or
    /// folded mapping is there).
    fn level2_table(&self, mem: &impl TableMemory, gpa: u64) -> u64 {
        [4, 3].into_iter().fold(self.root, |table, level| {
            mem.read_entry(table, index(gpa, level)) & ADDR_MASK
        })
    }

    /// How many 2 MiB regions were folded so far.
    pub fn folds(&self) -> u64 {
        self.folds
    }

    /// Whether `gpa` lies in a folded 2 MiB region (for tests and callers
    /// that report the page size the guest gets).
    pub fn is_folded(&self, gpa: u64) -> bool {
        let region = gpa & !(PageSize::Size2M.bytes() - 1);
        self.folded
            .binary_search_by_key(&region, |&(g, _)| g)
            .is_ok()
    }

    /// Finds the leaf that starts at `gpa`.
    fn find_leaf(&self, mem: &impl TableMemory, gpa: u64) -> Result<Leaf, GuestMapError> {
        if gpa >= GUEST_PHYS_LIMIT {
            return Err(GuestMapError::GpaOutOfRange(gpa));
        }
        let mut table = self.root;
        for level in (1..=4).rev() {
            let i = index(gpa, level);
            let entry = mem.read_entry(table, i);
            if !F::is_present(entry) {
                return Err(GuestMapError::NotMapped(gpa));
            }
            if is_leaf::<F>(entry, level) {
                let align = size_of_level(level).bytes();
                if !gpa.is_multiple_of(align) {
                    return Err(GuestMapError::Misaligned {
                        gpa,
                        hpa: leaf_addr(entry, level),
                        align,
                    });
                }
                return Ok(Leaf {
                    table,
                    index: i,
                    entry,
                    level,
                });
            }
            table = entry & ADDR_MASK;
        }
        Err(GuestMapError::NotMapped(gpa))
    }

    /// Removes the page starting at `gpa` (its first address, whatever its
    /// size) and returns where it pointed, with the flush now owed.
    pub fn unmap(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
    ) -> Result<(u64, PageSize, Flush<F>), GuestMapError> {
        self.unfold(mem, gpa);
        let leaf = self.find_leaf(mem, gpa)?;
        mem.write_entry(leaf.table, leaf.index, 0);
        Ok((
            leaf_addr(leaf.entry, leaf.level),
            size_of_level(leaf.level),
            self.flush(),
        ))
    }

    /// Changes the rights of the page starting at `gpa`. Any change returns a
    /// flush: a reduction must not be bypassed through a stale translation,
    /// and with EPT an extension would otherwise cause one spurious violation
    /// exit (SDM Vol. 3C, 29.4.3.3 "Guidelines for Use of the INVEPT
    /// Instruction").
    pub fn protect(
        &mut self,
        mem: &mut impl TableMemory,
        gpa: u64,
        rights: GuestRights,
    ) -> Result<Option<Flush<F>>, GuestMapError> {
        if !rights.contains(GuestRights::READ) {
            return Err(GuestMapError::InvalidRights(rights));
        }
        if self.is_folded(gpa) {
            if self.translate(mem, gpa).map(|t| t.rights) == Some(rights) {
                return Ok(None);
            }
            self.unfold(mem, gpa);
        }
        let leaf = self.find_leaf(mem, gpa)?;
        if F::rights(leaf.entry) == rights {
            return Ok(None);
        }
        let entry = F::leaf_entry(
            leaf_addr(leaf.entry, leaf.level),
            rights,
            F::memory_type(leaf.entry),
            leaf.level > 1,
        );
        mem.write_entry(leaf.table, leaf.index, entry);
        if leaf.level == 1 {
            let parent = self.level2_table(mem, gpa);
            self.try_fold(mem, parent, leaf.table, gpa);
        }
        Ok(Some(self.flush()))
    }

    pub fn translate(&self, mem: &impl TableMemory, gpa: u64) -> Option<GuestTranslation> {
        if gpa >= GUEST_PHYS_LIMIT {
            return None;
        }
        let mut table = self.root;
        let mut rights = GuestRights::all();
        for level in (1..=4).rev() {
            let entry = mem.read_entry(table, index(gpa, level));
            if !F::is_present(entry) {
                return None;
            }
            rights &= F::rights(entry);
            if is_leaf::<F>(entry, level) {
                let size = size_of_level(level);
                return Some(GuestTranslation {
                    hpa: leaf_addr(entry, level) | (gpa & (size.bytes() - 1)),
                    size,
                    rights,
                    memory_type: F::memory_type(entry),
                });
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    /// Frees at most `budget` of the tables below the root — those kept
    /// behind folded regions first, then the tree's, the deepest first,
    /// clearing each entry that pointed to a freed table (so the next call
    /// goes on where this one stopped); whether none are left. `destroy`
    /// then frees the root. For a dying VM, whose space no vCPU uses any
    /// more: its tables go in steps, between which other CPUs may take the
    /// kernel lock.
    pub fn free_tables_some(&mut self, mem: &mut impl TableMemory, budget: &mut usize) -> bool {
        while let Some(&(_, table)) = self.folded.last() {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            self.folded.pop();
            mem.free_table(table);
        }
        (0..ENTRIES).all(|i| free_entry::<F>(mem, self.root, i, 4, budget))
    }

    /// Frees all tables of the space. The mapped frames are the caller's
    /// business; the returned flush must be done before the tables' frames
    /// are reused, since the CPU may still cache entries from them.
    pub fn destroy(self, mem: &mut impl TableMemory) -> Flush<F> {
        let flush = self.flush();
        free_subtree::<F>(mem, self.root, 4);
        for &(_, table) in &self.folded {
            mem.free_table(table);
        }
        flush
    }

    fn flush(&self) -> Flush<F> {
        Flush::new(FlushScope::Space(self.context()))
    }
}

/// Frees the table entry `index` of `table` (of `level`) points to and
/// the tables below it, within `budget`, and clears the entry; whether it
/// did.
fn free_entry<F: EntryFormat>(
    mem: &mut impl TableMemory,
    table: u64,
    index: usize,
    level: u32,
    budget: &mut usize,
) -> bool {
    let entry = mem.read_entry(table, index);
    if !F::is_present(entry) || is_leaf::<F>(entry, level) {
        return true;
    }
    let child = entry & ADDR_MASK;
    if !(0..ENTRIES).all(|i| free_entry::<F>(mem, child, i, level - 1, budget)) {
        return false;
    }
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    mem.free_table(child);
    mem.write_entry(table, index, 0);
    true
}

/// Frees the table at `table` (of `level`) and every table below it.
fn free_subtree<F: EntryFormat>(mem: &mut impl TableMemory, table: u64, level: u32) {
    if level > 1 {
        for i in 0..ENTRIES {
            let entry = mem.read_entry(table, i);
            if F::is_present(entry) && !is_leaf::<F>(entry, level) {
                free_subtree::<F>(mem, entry & ADDR_MASK, level - 1);
            }
        }
    }
    mem.free_table(table);
}

/// A table-memory fake and format-independent tests, run for EPT and NPT.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const K4: u64 = 1 << 12;
    pub const M2: u64 = 1 << 21;
    pub const G1: u64 = 1 << 30;

    pub use crate::paging::fake::FakeMemory;

    pub fn setup<F: EntryFormat>() -> (FakeMemory, GuestSpace<F>) {
        let mut mem = FakeMemory::new(64);
        let space = GuestSpace::new(&mut mem).unwrap();
        (mem, space)
    }

    /// Runs every generic test for format `F`.
    pub fn all<F: EntryFormat + core::fmt::Debug + PartialEq>() {
        map_translate_unmap::<F>();
        errors::<F>();
        overlapping::<F>();
        protect_and_flush::<F>();
        out_of_memory_and_destroy::<F>();
        fold_and_unfold::<F>();
        free_in_steps::<F>();
    }

    /// A space's tables go a budget at a time, the folded ones included;
    /// `destroy` then frees only the root.
    fn free_in_steps<F: EntryFormat>() {
        let mut mem = FakeMemory::new(64);
        let mut space = GuestSpace::<F>::new(&mut mem).unwrap();
        let rw = GuestRights::READ | GuestRights::WRITE;
        map_region(&mut mem, &mut space, 0x4020_0000, 0x1_0060_0000, rw);
        space.map(&mut mem, 0, 0, PageSize::Size4K, rw).unwrap();
        space
            .map(&mut mem, 1 << 39, 0, PageSize::Size2M, rw)
            .unwrap();
        // Below the root: an L3 shared by page 0 and the folded region,
        // an L2 and L1 for page 0, an L2 and the kept L1 for the folded
        // region, an L3 and L2 for the 2M page.
        let below_root = mem.tables.len() - 1;
        assert_eq!(below_root, 7);
        let mut steps = 0;
        loop {
            let mut budget = 2;
            steps += 1;
            if space.free_tables_some(&mut mem, &mut budget) {
                break;
            }
            assert_eq!(budget, 0);
        }
        assert_eq!(steps, below_root.div_ceil(2));
        assert_eq!(mem.freed, below_root);
        assert_eq!(space.translate(&mem, 0), None);
        let _ = space.destroy(&mut mem);
        assert_eq!(mem.freed, below_root + 1);
        assert!(mem.tables.is_empty());
    }

    /// Maps the 512 pages of the 2 MiB region at `gpa` to `hpa` on.
    fn map_region<F: EntryFormat>(
        mem: &mut FakeMemory,
        space: &mut GuestSpace<F>,
        gpa: u64,
        hpa: u64,
        rights: GuestRights,
    ) {
        for page in 0..512 {
            let off = page * K4;
            space
                .map(mem, gpa + off, hpa + off, PageSize::Size4K, rights)
                .unwrap();
            assert_eq!(space.is_folded(gpa), page == 511, "page {page}");
        }
    }

    fn fold_and_unfold<F: EntryFormat>() {
        let (mut mem, mut space) = setup::<F>();
        let rw = GuestRights::READ | GuestRights::WRITE;
        let (gpa, hpa) = (0x4020_0000, 0x1_0060_0000);
        map_region(&mut mem, &mut space, gpa, hpa, rw);
        let tables = mem.tables.len();
        let big = space.translate(&mem, gpa + 0x1_2345).unwrap();
        assert_eq!((big.hpa, big.size), (hpa + 0x1_2345, PageSize::Size2M));
        assert_eq!(
            space.map(&mut mem, gpa + K4, 0, PageSize::Size4K, rw),
            Err(GuestMapError::AlreadyMapped(gpa + K4))
        );

        // Same rights: nothing to do, the region stays folded.
        assert!(space.protect(&mut mem, gpa + K4, rw).unwrap().is_none());
        assert!(space.is_folded(gpa));
        // One page read-only: unfolded, the rest keeps its rights.
        assert!(space
            .protect(&mut mem, gpa + K4, GuestRights::READ)
            .unwrap()
            .is_some());
        assert!(!space.is_folded(gpa));
        assert_eq!(
            space.translate(&mem, gpa + K4).unwrap().rights,
            GuestRights::READ
        );
        let next = space.translate(&mem, gpa + 2 * K4).unwrap();
        assert_eq!((next.size, next.rights), (PageSize::Size4K, rw));
        // Rights made uniform again: folded again.
        space.protect(&mut mem, gpa + K4, rw).unwrap();
        assert!(space.is_folded(gpa));
        assert_eq!(space.folds(), 2);

        // Unmapping one page splits without allocating; its neighbours stay.
        let (unmapped, size, _flush) = space.unmap(&mut mem, gpa + 5 * K4).unwrap();
        assert_eq!((unmapped, size), (hpa + 5 * K4, PageSize::Size4K));
        assert_eq!(mem.tables.len(), tables);
        assert_eq!(space.translate(&mem, gpa + 5 * K4), None);
        assert_eq!(
            space.translate(&mem, gpa + 4 * K4).unwrap().hpa,
            hpa + 4 * K4
        );
        space
            .map(&mut mem, gpa + 5 * K4, hpa + 5 * K4, PageSize::Size4K, rw)
            .unwrap();
        assert!(space.is_folded(gpa));

        // No fold: host memory not contiguous, or not 2 MiB aligned, or
        // mixed rights.
        let (mut mem2, mut other) = setup::<F>();
        for page in 0..512u64 {
            let hpa = if page == 300 {
                0x9000_0000
            } else {
                0x20_0000 + page * K4
            };
            other
                .map(&mut mem2, page * K4, hpa, PageSize::Size4K, rw)
                .unwrap();
            let shifted = 0x40_1000 + page * K4;
            other
                .map(&mut mem2, M2 + page * K4, shifted, PageSize::Size4K, rw)
                .unwrap();
            let rights = if page == 7 { GuestRights::RWX } else { rw };
            other
                .map(
                    &mut mem2,
                    2 * M2 + page * K4,
                    0x80_0000 + page * K4,
                    PageSize::Size4K,
                    rights,
                )
                .unwrap();
        }
        assert!(!other.is_folded(0) && !other.is_folded(M2) && !other.is_folded(2 * M2));

        // Destroy frees the tables behind folded leaves too.
        let before = mem.tables.len();
        let _ = space.destroy(&mut mem);
        assert!(mem.tables.is_empty());
        assert_eq!(mem.freed, before);
    }

    fn map_translate_unmap<F: EntryFormat + core::fmt::Debug + PartialEq>() {
        let (mut mem, mut space) = setup::<F>();
        let rw = GuestRights::READ | GuestRights::WRITE;
        let cases = [
            (0x1000, 0x1234_5000, PageSize::Size4K, rw),
            (0x20_0000, 0x8000_0000, PageSize::Size2M, GuestRights::RWX),
            (
                0x80_4000_0000,
                0x1_4000_0000,
                PageSize::Size1G,
                GuestRights::READ,
            ),
            // Guest-physical addresses need no canonical form: bit 47 is fine.
            (
                GUEST_PHYS_LIMIT - K4,
                0xf_ffff_ffff_f000,
                PageSize::Size4K,
                rw,
            ),
        ];
        for (gpa, hpa, size, rights) in cases {
            space.map(&mut mem, gpa, hpa, size, rights).unwrap();
        }
        for (gpa, hpa, size, rights) in cases {
            let off = size.bytes() - 8;
            let t = space.translate(&mem, gpa + off).unwrap();
            assert_eq!(
                t,
                GuestTranslation {
                    hpa: hpa + off,
                    size,
                    rights,
                    memory_type: MemoryType::WriteBack
                }
            );
        }
        let context = space.context();
        for (gpa, hpa, size, _) in cases {
            let (unmapped_hpa, unmapped_size, flush) = space.unmap(&mut mem, gpa).unwrap();
            assert_eq!((unmapped_hpa, unmapped_size), (hpa, size));
            assert_eq!(flush.scope(), FlushScope::Space(context));
            assert_eq!(space.translate(&mem, gpa), None);
            assert!(matches!(
                space.unmap(&mut mem, gpa),
                Err(GuestMapError::NotMapped(g)) if g == gpa
            ));
        }
        // Emptied tables are reused.
        let tables = mem.tables.len();
        space
            .map(&mut mem, 0x1000, 0x5000, PageSize::Size4K, rw)
            .unwrap();
        assert_eq!(mem.tables.len(), tables);

        let mmio = 0xfee0_0000;
        space
            .map_with_type(
                &mut mem,
                mmio,
                mmio,
                PageSize::Size4K,
                rw,
                MemoryType::Uncacheable,
            )
            .unwrap();
        assert_eq!(
            space.translate(&mem, mmio).unwrap().memory_type,
            MemoryType::Uncacheable
        );
    }

    fn errors<F: EntryFormat>() {
        let (mut mem, mut space) = setup::<F>();
        let r = GuestRights::READ;
        assert_eq!(
            space.map(&mut mem, 0x1000, 0x20_0000, PageSize::Size2M, r),
            Err(GuestMapError::Misaligned {
                gpa: 0x1000,
                hpa: 0x20_0000,
                align: M2
            })
        );
        assert!(matches!(
            space.map(&mut mem, 0x4000_0000, 0x20_0000, PageSize::Size1G, r),
            Err(GuestMapError::Misaligned { align: G1, .. })
        ));
        assert!(matches!(
            space.map(&mut mem, 0x123, 0, PageSize::Size4K, r),
            Err(GuestMapError::Misaligned { .. })
        ));
        assert_eq!(
            space.map(&mut mem, GUEST_PHYS_LIMIT, 0, PageSize::Size4K, r),
            Err(GuestMapError::GpaOutOfRange(GUEST_PHYS_LIMIT))
        );
        let last_g = !(G1 - 1);
        assert_eq!(
            space.map(&mut mem, last_g, 0, PageSize::Size1G, r),
            Err(GuestMapError::GpaOutOfRange(last_g))
        );
        assert_eq!(
            space.map(&mut mem, 0, PHYS_LIMIT, PageSize::Size4K, r),
            Err(GuestMapError::HpaOutOfRange(PHYS_LIMIT))
        );
        let last_k = !(K4 - 1);
        assert_eq!(
            space.map(&mut mem, 0, last_k, PageSize::Size4K, r),
            Err(GuestMapError::HpaOutOfRange(last_k))
        );
        for bad in [
            GuestRights::empty(),
            GuestRights::WRITE,
            GuestRights::EXECUTE,
            GuestRights::WRITE | GuestRights::EXECUTE,
        ] {
            assert_eq!(
                space.map(&mut mem, 0, 0, PageSize::Size4K, bad),
                Err(GuestMapError::InvalidRights(bad))
            );
        }
        assert_eq!(
            space
                .unmap(&mut mem, GUEST_PHYS_LIMIT)
                .map(|(h, s, _)| (h, s)),
            Err(GuestMapError::GpaOutOfRange(GUEST_PHYS_LIMIT))
        );
        assert_eq!(space.translate(&mem, GUEST_PHYS_LIMIT), None);
        assert_eq!(space.translate(&mem, u64::MAX), None);
        // Unmapping or protecting from inside a large page is refused.
        space.map(&mut mem, M2, 0, PageSize::Size2M, r).unwrap();
        assert!(matches!(
            space.unmap(&mut mem, M2 + K4),
            Err(GuestMapError::Misaligned { align: M2, .. })
        ));
        assert!(matches!(
            space.protect(&mut mem, M2 + K4, GuestRights::RWX),
            Err(GuestMapError::Misaligned { align: M2, .. })
        ));
        assert!(space.translate(&mem, M2 + K4).is_some());
        assert!(matches!(
            space.protect(&mut mem, 0, GuestRights::RWX),
            Err(GuestMapError::NotMapped(0))
        ));
        assert!(matches!(
            space.protect(&mut mem, M2, GuestRights::WRITE),
            Err(GuestMapError::InvalidRights(GuestRights::WRITE))
        ));
    }

    fn overlapping<F: EntryFormat>() {
        let (mut mem, mut space) = setup::<F>();
        let r = GuestRights::READ;
        space.map(&mut mem, G1, 0, PageSize::Size1G, r).unwrap();
        space.map(&mut mem, M2, 0, PageSize::Size2M, r).unwrap();
        space.map(&mut mem, K4, 0, PageSize::Size4K, r).unwrap();
        let busy = [
            (G1, PageSize::Size1G),
            (G1 + M2, PageSize::Size2M), // inside the 1G page
            (G1 + 5 * K4, PageSize::Size4K),
            (M2, PageSize::Size2M),
            (M2 + 3 * K4, PageSize::Size4K), // inside the 2M page
            (K4, PageSize::Size4K),
            (0, PageSize::Size2M), // a table is already there
            (0, PageSize::Size1G),
        ];
        for (gpa, size) in busy {
            assert_eq!(
                space.map(&mut mem, gpa, 0, size, r),
                Err(GuestMapError::AlreadyMapped(gpa)),
                "{gpa:#x} {size:?}"
            );
        }
    }

    fn protect_and_flush<F: EntryFormat>() {
        let (mut mem, mut space) = setup::<F>();
        let rw = GuestRights::READ | GuestRights::WRITE;
        space
            .map(
                &mut mem,
                M2,
                0x4000_0000,
                PageSize::Size2M,
                GuestRights::RWX,
            )
            .unwrap();
        let flush = space.protect(&mut mem, M2, rw).unwrap().unwrap();
        assert_eq!(flush.scope(), FlushScope::Space(space.context()));
        let t = space.translate(&mem, M2 + 0x10).unwrap();
        assert_eq!(
            (t.hpa, t.size, t.rights),
            (0x4000_0010, PageSize::Size2M, rw)
        );
        // The same rights again: nothing to flush.
        assert!(space.protect(&mut mem, M2, rw).unwrap().is_none());
        let extend = space.protect(&mut mem, M2, GuestRights::RWX).unwrap();
        assert!(extend.is_some());
        // Memory type survives a rights change.
        space
            .map_with_type(
                &mut mem,
                0,
                0xfed0_0000,
                PageSize::Size4K,
                rw,
                MemoryType::Uncacheable,
            )
            .unwrap();
        let _flush = space.protect(&mut mem, 0, GuestRights::READ).unwrap();
        let t = space.translate(&mem, 0).unwrap();
        assert_eq!(
            (t.rights, t.memory_type),
            (GuestRights::READ, MemoryType::Uncacheable)
        );
    }

    fn out_of_memory_and_destroy<F: EntryFormat>() {
        let mut mem = FakeMemory::new(0);
        assert!(matches!(
            GuestSpace::<F>::new(&mut mem),
            Err(GuestMapError::OutOfMemory)
        ));
        let mut mem = FakeMemory::new(2);
        let mut space = GuestSpace::<F>::new(&mut mem).unwrap();
        assert_eq!(
            space.map(&mut mem, 0, 0, PageSize::Size4K, GuestRights::READ),
            Err(GuestMapError::OutOfMemory)
        );
        // A 1G page needs only the level 3 table that is already there.
        space
            .map(&mut mem, G1, 0, PageSize::Size1G, GuestRights::READ)
            .unwrap();

        let (mut mem, mut space) = setup::<F>();
        space
            .map(&mut mem, 0, 0, PageSize::Size4K, GuestRights::READ)
            .unwrap();
        space
            .map(&mut mem, 1 << 39, 0, PageSize::Size2M, GuestRights::READ)
            .unwrap();
        let context = space.context();
        let flush = space.destroy(&mut mem);
        assert_eq!(flush.scope(), FlushScope::Space(context));
        // Root; L3, L2, L1 for page 0; L3, L2 for the 2M page.
        assert_eq!(mem.freed, 6);
        assert!(mem.tables.is_empty());
    }
}
