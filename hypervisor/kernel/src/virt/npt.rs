//! AMD nested paging: guest-physical tables in the ordinary long-mode
//! page-table format (APM Vol. 2, 15.25 "Nested Paging"; entry formats in
//! 5.3.3 "4-Kbyte Page Translation" ff.).
//!
//! Every nested walk counts as a user access (APM Vol. 2, 15.25.5 "Nested
//! Table Walk"), so every level carries the user bit; a guest NPF therefore
//! reports US = 1 in EXITINFO1. Execute permission is NX (bit 63), honoured
//! when the host runs with EFER.NXE, as Moat does.

use bitflags::bitflags;

use super::vmcb::TlbControl;
use super::{EntryFormat, Flush, FlushScope, GuestRights, GuestSpace, MemoryType};

bitflags! {
    /// The flag bits of a long-mode page-table entry used by NPT.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct NptEntry: u64 {
        const PRESENT = 1 << 0;
        const WRITABLE = 1 << 1;
        const USER = 1 << 2;
        const WRITE_THROUGH = 1 << 3;
        const CACHE_DISABLE = 1 << 4;
        const ACCESSED = 1 << 5;
        const DIRTY = 1 << 6;
        /// Level 3 or 2 entry: maps a 1 GiB or 2 MiB page.
        const LARGE = 1 << 7;
        const NO_EXECUTE = 1 << 63;
    }
}

/// PWT | PCD select PAT entry 3, uncacheable with the power-on PAT value.
const UNCACHEABLE: u64 = NptEntry::WRITE_THROUGH.bits() | NptEntry::CACHE_DISABLE.bits();

/// The NPT entry format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Npt;

impl EntryFormat for Npt {
    const LARGE: u64 = NptEntry::LARGE.bits();

    fn table_entry(table: u64) -> u64 {
        table | (NptEntry::PRESENT | NptEntry::WRITABLE | NptEntry::USER).bits()
    }

    fn leaf_entry(hpa: u64, rights: GuestRights, memory_type: MemoryType, large: bool) -> u64 {
        let mut flags = NptEntry::PRESENT | NptEntry::USER;
        flags.set(NptEntry::WRITABLE, rights.contains(GuestRights::WRITE));
        flags.set(NptEntry::NO_EXECUTE, !rights.contains(GuestRights::EXECUTE));
        flags.set(NptEntry::LARGE, large);
        let caching = match memory_type {
            MemoryType::WriteBack => 0,
            MemoryType::Uncacheable => UNCACHEABLE,
        };
        hpa | flags.bits() | caching
    }

    fn is_present(entry: u64) -> bool {
        entry & NptEntry::PRESENT.bits() != 0
    }

    fn rights(entry: u64) -> GuestRights {
        let flags = NptEntry::from_bits_truncate(entry);
        let mut rights = GuestRights::empty();
        rights.set(GuestRights::READ, flags.contains(NptEntry::PRESENT));
        rights.set(GuestRights::WRITE, flags.contains(NptEntry::WRITABLE));
        rights.set(GuestRights::EXECUTE, !flags.contains(NptEntry::NO_EXECUTE));
        rights
    }

    fn memory_type(leaf: u64) -> MemoryType {
        if leaf & NptEntry::CACHE_DISABLE.bits() != 0 {
            MemoryType::Uncacheable
        } else {
            MemoryType::WriteBack
        }
    }

    /// nCR3: the top table, accessed write-back (PWT = PCD = 0).
    fn context(root: u64) -> u64 {
        root
    }
}

impl GuestSpace<Npt> {
    /// The VMCB N_CR3 value for this space.
    pub fn ncr3(&self) -> u64 {
        self.context()
    }
}

impl Flush<Npt> {
    /// Consumes the obligation into the VMCB TLB_CONTROL value that
    /// discharges it: the next VMRUN of every vCPU of the VM (on every CPU
    /// that may hold its ASID's entries) must carry it.
    pub fn tlb_control(self) -> TlbControl {
        match self.scope() {
            FlushScope::Space(_) => TlbControl::FlushGuest,
            FlushScope::All => TlbControl::FlushAll,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::space::tests::{self, K4, M2};
    use super::super::{PageSize, TableMemory};
    use super::*;

    #[test]
    fn generic_behaviour() {
        tests::all::<Npt>();
    }

    #[test]
    fn entry_bits() {
        let (mut mem, mut space) = tests::setup::<Npt>();
        let rw = GuestRights::READ | GuestRights::WRITE;
        space
            .map(&mut mem, K4, 0x1234_5000, PageSize::Size4K, rw)
            .unwrap();
        space
            .map(
                &mut mem,
                M2,
                0x4000_0000,
                PageSize::Size2M,
                GuestRights::RWX,
            )
            .unwrap();
        space
            .map_with_type(
                &mut mem,
                2 * M2,
                0xfee0_0000,
                PageSize::Size4K,
                GuestRights::READ | GuestRights::EXECUTE,
                MemoryType::Uncacheable,
            )
            .unwrap();

        let pml4e = mem.read_entry(space.root(), 0);
        assert_eq!(pml4e & 0xfff, 0b111, "tables are present, writable, user");
        assert_eq!(pml4e >> 63, 0, "tables are executable");
        let pdpt = pml4e & 0x000f_ffff_ffff_f000;
        let pdpte = mem.read_entry(pdpt, 0);
        assert_eq!(pdpte & 0xfff, 0b111);
        let pd = pdpte & 0x000f_ffff_ffff_f000;
        let pt = mem.read_entry(pd, 0) & 0x000f_ffff_ffff_f000;
        // 4K leaf: P|W|U, NX.
        assert_eq!(mem.read_entry(pt, 1), 0x1234_5000 | 0b111 | (1 << 63));
        // 2M leaf: P|W|U|PS, executable.
        assert_eq!(mem.read_entry(pd, 1), 0x4000_0000 | 0b111 | (1 << 7));
        // UC leaf: P|U|PWT|PCD, read-only, executable.
        let pt2 = mem.read_entry(pd, 2) & 0x000f_ffff_ffff_f000;
        assert_eq!(mem.read_entry(pt2, 0), 0xfee0_0000 | 0b101 | (0b11 << 3));

        let t = space.translate(&mem, 2 * M2 + 4).unwrap();
        assert_eq!(t.rights, GuestRights::READ | GuestRights::EXECUTE);
    }

    #[test]
    fn ncr3_and_tlb_control() {
        let (mut mem, mut space) = tests::setup::<Npt>();
        assert_eq!(space.ncr3(), space.root());
        space
            .map(&mut mem, 0, 0, PageSize::Size4K, GuestRights::READ)
            .unwrap();
        let (_, _, flush) = space.unmap(&mut mem, 0).unwrap();
        assert_eq!(flush.scope(), FlushScope::Space(space.root()));
        assert_eq!(flush.tlb_control(), TlbControl::FlushGuest);
        assert_eq!(
            Flush::<Npt>::new(FlushScope::All).tlb_control(),
            TlbControl::FlushAll
        );
    }
}
