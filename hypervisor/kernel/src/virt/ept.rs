//! Intel EPT: guest-physical tables in the extended-page-table format.
//!
//! Entry layout from the SDM Vol. 3C, chapter 29.3.2, tables "Format of an
//! EPT PML4 Entry" through "Format of an EPT Page-Table Entry that Maps a
//! 4-KByte Page"; EPTP from 25.6.11 "Extended-Page-Table Pointer (EPTP)".
//!
//! 2 MiB and 1 GiB leaves need IA32_VMX_EPT_VPID_CAP bits 16 and 17; the
//! caller checks them before asking for a large page.

use bitflags::bitflags;

use super::{EntryFormat, Flush, FlushScope, GuestRights, GuestSpace, MemoryType};

bitflags! {
    /// The flag bits of an EPT entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EptEntry: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXECUTE = 1 << 2;
        /// Leaf only: the guest's PAT does not take part in the memory type.
        const IGNORE_PAT = 1 << 6;
        /// Level 3 or 2 entry: maps a 1 GiB or 2 MiB page.
        const LARGE = 1 << 7;
        const ACCESSED = 1 << 8;
        const DIRTY = 1 << 9;
    }
}

/// EPT memory type of a leaf, bits 5:3.
const MEMORY_TYPE_SHIFT: u32 = 3;
const MEMORY_TYPE_MASK: u64 = 0b111 << MEMORY_TYPE_SHIFT;
/// Memory type encodings (SDM Vol. 3A, 13.3 "Methods of Caching Available").
const TYPE_UC: u64 = 0;
const TYPE_WB: u64 = 6;

/// EPTP bits 2:0: memory type used to access the EPT paging structures.
const EPTP_MEMORY_TYPE_WB: u64 = TYPE_WB;
/// EPTP bits 5:3: page-walk length minus one.
const EPTP_WALK_LENGTH_4: u64 = (4 - 1) << 3;
/// EPTP bit 6: the CPU sets accessed and dirty flags in EPT entries.
pub const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;

const RWX: u64 = EptEntry::READ.bits() | EptEntry::WRITE.bits() | EptEntry::EXECUTE.bits();

/// The EPT entry format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ept;

impl EntryFormat for Ept {
    const LARGE: u64 = EptEntry::LARGE.bits();

    fn table_entry(table: u64) -> u64 {
        table | RWX
    }

    fn leaf_entry(hpa: u64, rights: GuestRights, memory_type: MemoryType, large: bool) -> u64 {
        // GuestRights uses the EPT bit positions.
        let mut entry = hpa | u64::from(rights.bits());
        entry |= match memory_type {
            MemoryType::WriteBack => TYPE_WB << MEMORY_TYPE_SHIFT,
            MemoryType::Uncacheable => (TYPE_UC << MEMORY_TYPE_SHIFT) | EptEntry::IGNORE_PAT.bits(),
        };
        if large {
            entry |= EptEntry::LARGE.bits();
        }
        entry
    }

    /// An EPT entry is present if it grants any access.
    fn is_present(entry: u64) -> bool {
        entry & RWX != 0
    }

    fn rights(entry: u64) -> GuestRights {
        GuestRights::from_bits_truncate((entry & RWX) as u8)
    }

    fn memory_type(leaf: u64) -> MemoryType {
        if (leaf & MEMORY_TYPE_MASK) >> MEMORY_TYPE_SHIFT == TYPE_UC {
            MemoryType::Uncacheable
        } else {
            MemoryType::WriteBack
        }
    }

    /// EPTP: write-back paging structures, 4-level walk, no A/D flags.
    fn context(root: u64) -> u64 {
        root | EPTP_WALK_LENGTH_4 | EPTP_MEMORY_TYPE_WB
    }
}

impl GuestSpace<Ept> {
    /// The VMCS EPT-pointer value for this space.
    pub fn eptp(&self) -> u64 {
        self.context()
    }
}

/// INVEPT types (SDM Vol. 3C, "INVEPT—Invalidate Translations Derived from EPT").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum InveptType {
    SingleContext = 1,
    AllContext = 2,
}

/// What to execute for a [`Flush`]: INVEPT of `kind`, with `eptp` in the
/// first quadword of the descriptor (ignored for all-context).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invept {
    pub kind: InveptType,
    pub eptp: u64,
}

impl Flush<Ept> {
    /// Consumes the obligation into the INVEPT that discharges it. The kernel
    /// must execute it on every CPU that may have run the space.
    pub fn invept(self) -> Invept {
        match self.scope() {
            FlushScope::Space(eptp) => Invept {
                kind: InveptType::SingleContext,
                eptp,
            },
            FlushScope::All => Invept {
                kind: InveptType::AllContext,
                eptp: 0,
            },
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
        tests::all::<Ept>();
    }

    #[test]
    fn entry_bits() {
        let (mut mem, mut space) = tests::setup::<Ept>();
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
                GuestRights::READ,
                MemoryType::Uncacheable,
            )
            .unwrap();

        let pml4e = mem.read_entry(space.root(), 0);
        assert_eq!(pml4e & 0xfff, 0b111, "tables grant R, W and X");
        let pdpt = pml4e & !0xfff;
        let pd = mem.read_entry(pdpt, 0) & !0xfff;
        let pt = mem.read_entry(pd, 0) & !0xfff;
        // 4K leaf: R|W, WB (6) in bits 5:3, no IPAT, no large bit.
        assert_eq!(mem.read_entry(pt, 1), 0x1234_5000 | 0b011 | (6 << 3));
        // 2M leaf: R|W|X, WB, bit 7.
        assert_eq!(
            mem.read_entry(pd, 1),
            0x4000_0000 | 0b111 | (6 << 3) | (1 << 7)
        );
        // UC leaf: type 0 and ignore-PAT (bit 6).
        let pt2 = mem.read_entry(pd, 2) & !0xfff;
        assert_eq!(mem.read_entry(pt2, 0), 0xfee0_0000 | 0b001 | (1 << 6));
    }

    #[test]
    fn eptp_and_invept() {
        let (mut mem, mut space) = tests::setup::<Ept>();
        let root = space.root();
        // WB (6) in bits 2:0, walk length 4 - 1 in bits 5:3.
        assert_eq!(space.eptp(), root | 0x1e);
        assert_eq!(space.eptp() & EPTP_ACCESSED_DIRTY, 0);

        space
            .map(&mut mem, 0, 0, PageSize::Size4K, GuestRights::READ)
            .unwrap();
        let (_, _, flush) = space.unmap(&mut mem, 0).unwrap();
        assert_eq!(
            flush.invept(),
            Invept {
                kind: InveptType::SingleContext,
                eptp: root | 0x1e
            }
        );
        let all = Flush::<Ept>::new(FlushScope::All);
        assert_eq!(all.invept().kind as u64, 2);
    }
}
