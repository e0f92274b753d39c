//! The vCPU state a boot path hands to the VMM, and the GDT and page
//! tables it relies on.

use crate::layout::{low, GIB, PAGE_SIZE};
use crate::ram::{self, OutOfRam};

pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const PG: u64 = 1 << 31;
}

pub mod cr4 {
    pub const PAE: u64 = 1 << 5;
}

pub mod efer {
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
}

/// RFLAGS with only the always-one bit 1 set (interrupts off).
pub const RFLAGS_DEFAULT: u64 = 1 << 1;

/// Segment access rights in the VMX form (Intel SDM Vol. 3, 25.4.1): bits
/// 0-3 type, 4 S, 5-6 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G. SVM's VMCB
/// `attrib` is the same with bits 8-11 dropped: see [`Segment::svm_attrib`].
pub mod ar {
    pub const TYPE_CODE_EXEC_READ_ACCESSED: u32 = 0xb;
    pub const TYPE_DATA_READ_WRITE_ACCESSED: u32 = 0x3;
    pub const TYPE_TSS_BUSY: u32 = 0xb;
    pub const S: u32 = 1 << 4;
    pub const P: u32 = 1 << 7;
    pub const L: u32 = 1 << 13;
    pub const DB: u32 = 1 << 14;
    pub const G: u32 = 1 << 15;

    pub const CODE64: u32 = TYPE_CODE_EXEC_READ_ACCESSED | S | P | L | G;
    pub const CODE32: u32 = TYPE_CODE_EXEC_READ_ACCESSED | S | P | DB | G;
    pub const DATA: u32 = TYPE_DATA_READ_WRITE_ACCESSED | S | P | DB | G;
    pub const TSS: u32 = TYPE_TSS_BUSY | P;
}

/// A segment register with its hidden part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Byte-granular limit, as VMX and SVM take it.
    pub limit: u32,
    /// VMX form, see [`ar`].
    pub access_rights: u32,
}

impl Segment {
    /// The access rights in SVM's 12-bit VMCB `attrib` form.
    pub fn svm_attrib(&self) -> u16 {
        let ar = self.access_rights;
        ((ar & 0xff) | ((ar >> 4) & 0xf00)) as u16
    }

    /// The GDT descriptor for a flat segment (base 0, 4 GiB, page-granular).
    fn flat_descriptor(access_rights: u32) -> u64 {
        const LIMIT_4G_PAGES: u64 = 0xf_ffff;
        let ar = u64::from(access_rights);
        (LIMIT_4G_PAGES & 0xffff)
            | ((ar & 0xff) << 40)
            | ((LIMIT_4G_PAGES >> 16) << 48)
            | (((ar >> 12) & 0xf) << 52)
    }

    const fn flat(selector: u16, access_rights: u32) -> Self {
        Self {
            selector,
            base: 0,
            limit: u32::MAX,
            access_rights,
        }
    }
}

/// The Linux boot protocol's selectors: code at 0x10 (`__BOOT_CS`), data
/// at 0x18 (`__BOOT_DS`); entries 0 and 1 are null.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const GDT_ENTRIES: usize = 4;
const TSS_LIMIT: u32 = 0x67;

/// The initial vCPU state the VMM loads before the first run.
///
/// `ds` stands for DS, ES, FS, GS and SS alike. LDTR is unusable. The VMM
/// or kernel adds whatever fixed CR0/CR4 bits the CPU's virtualization
/// mode demands (NE is already set: VMX requires it and Linux sets it
/// anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootState {
    pub rip: u64,
    pub rsp: u64,
    /// Multiboot: the boot loader's magic.
    pub rax: u64,
    /// Linux 64-bit protocol: the `boot_params` address.
    pub rsi: u64,
    /// PVH: the `hvm_start_info` address.
    pub rbx: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub cs: Segment,
    pub ds: Segment,
    pub tr: Segment,
}

/// Writes the GDT for `code_ar` at [`low::GDT`] and returns the state with
/// segments and descriptor table set, registers zero.
fn flat_state(ram: &mut [u8], code_ar: u32) -> Result<BootState, OutOfRam> {
    let mut gdt = [0u8; GDT_ENTRIES * 8];
    let code = Segment::flat_descriptor(code_ar).to_le_bytes();
    let data = Segment::flat_descriptor(ar::DATA).to_le_bytes();
    gdt[usize::from(BOOT_CS)..][..8].copy_from_slice(&code);
    gdt[usize::from(BOOT_DS)..][..8].copy_from_slice(&data);
    ram::write(ram, low::GDT, &gdt)?;
    Ok(BootState {
        rip: 0,
        rsp: low::STACK_TOP,
        rax: 0,
        rsi: 0,
        rbx: 0,
        rflags: RFLAGS_DEFAULT,
        cr0: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
        gdt_base: low::GDT,
        gdt_limit: (gdt.len() - 1) as u16,
        cs: Segment::flat(BOOT_CS, code_ar),
        ds: Segment::flat(BOOT_DS, ar::DATA),
        tr: Segment {
            selector: 0,
            base: 0,
            limit: TSS_LIMIT,
            access_rights: ar::TSS,
        },
    })
}

/// Page-table entry bits.
mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const HUGE: u64 = 1 << 7;
}

/// GiB identity-mapped by [`long_mode`]'s page tables.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
const PAGE_2M: u64 = 2 << 20;

/// Writes identity-map page tables for the first 4 GiB (2 MiB pages) and a
/// GDT with flat 64-bit code and data, and returns a long-mode state with
/// paging on and CR3 at the tables.
pub fn long_mode(ram: &mut [u8]) -> Result<BootState, OutOfRam> {
    const ENTRIES: u64 = 512;
    let table = |base: u64, index: u64| base + index * 8;
    ram::zero(ram, low::PML4, PAGE_SIZE * (2 + IDENTITY_MAPPED_GIB))?;
    ram::write(
        ram,
        low::PML4,
        &(low::PDPT | pte::PRESENT | pte::WRITABLE).to_le_bytes(),
    )?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = low::PD + gib * PAGE_SIZE;
        ram::write(
            ram,
            table(low::PDPT, gib),
            &(pd | pte::PRESENT | pte::WRITABLE).to_le_bytes(),
        )?;
        for i in 0..ENTRIES {
            let frame = gib * GIB + i * PAGE_2M;
            let entry = frame | pte::PRESENT | pte::WRITABLE | pte::HUGE;
            ram::write(ram, table(pd, i), &entry.to_le_bytes())?;
        }
    }
    let mut s = flat_state(ram, ar::CODE64)?;
    s.cr0 = cr0::PE | cr0::ET | cr0::NE | cr0::PG;
    s.cr3 = low::PML4;
    s.cr4 = cr4::PAE;
    s.efer = efer::LME | efer::LMA;
    Ok(s)
}

/// Writes a GDT with flat 32-bit code and data and returns a 32-bit
/// protected-mode state with paging off (the PVH and Multiboot entry state).
pub fn protected_mode(ram: &mut [u8]) -> Result<BootState, OutOfRam> {
    let mut s = flat_state(ram, ar::CODE32)?;
    s.cr0 = cr0::PE | cr0::ET | cr0::NE;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_access_rights() {
        assert_eq!(Segment::flat_descriptor(ar::CODE64), 0x00af_9b00_0000_ffff);
        assert_eq!(Segment::flat_descriptor(ar::CODE32), 0x00cf_9b00_0000_ffff);
        assert_eq!(Segment::flat_descriptor(ar::DATA), 0x00cf_9300_0000_ffff);
        assert_eq!(Segment::flat(BOOT_CS, ar::CODE64).svm_attrib(), 0xa9b);
        assert_eq!(Segment::flat(BOOT_DS, ar::DATA).svm_attrib(), 0xc93);
    }

    #[test]
    fn states_need_low_ram() {
        assert!(long_mode(&mut [0u8; 0xa000]).is_err());
        assert!(protected_mode(&mut [0u8; 0x500]).is_err());
        let mut ram = vec![0u8; 0x10000];
        let s = protected_mode(&mut ram).unwrap();
        assert_eq!(
            (s.cr0 & cr0::PG, s.efer, s.cs.access_rights),
            (0, 0, ar::CODE32)
        );
        assert_eq!(
            ram[0x510..0x520],
            [0xff, 0xff, 0, 0, 0, 0x9b, 0xcf, 0, 0xff, 0xff, 0, 0, 0, 0x93, 0xcf, 0]
        );
    }
}
