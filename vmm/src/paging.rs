//! Guest page walk: linear address to guest-physical, with the access
//! checks and accessed/dirty updates the hardware would do.
//!
//! Paging structures are read through [`Platform::read_ram`]; a structure
//! outside RAM is an error for the VMM, never a panic. PAE PDPTEs are read
//! from memory at each walk (the hardware caches them at CR3 load). Not
//! modelled: protection keys, HLAT, segment-limit checks.
#![forbid(unsafe_code)]

use crate::cpu::{cr0, cr4, efer, rflags, CpuState};
use crate::{Exception, NotRam, Platform};

/// Paging-structure entry bits.
pub mod pte {
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    /// Page size: the entry maps a large page (PDE, or PDPTE in long mode).
    pub const PS: u64 = 1 << 7;
    pub const XD: u64 = 1 << 63;
}

/// Page-fault error code bits.
pub mod pf {
    pub const P: u32 = 1 << 0;
    pub const W: u32 = 1 << 1;
    pub const U: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const ID: u32 = 1 << 4;
}

pub const PAGE_SIZE: u64 = 4096;
const FRAME_32: u64 = 0xffff_f000;
/// CR3 bits 31:5 locate the PAE page-directory-pointer table.
const PDPT_BASE_PAE: u64 = 0xffff_ffe0;
const PDPTE_RESERVED_PAE: u64 = 0b1_1110_0110;
/// PSE-36: bits 20:13 of a 4 MiB PDE hold physical-address bits 39:32.
const PSE36_SHIFT: u32 = 13;
const PSE36_LIMIT_BITS: u32 = 40;
/// Bit 21 of a 4 MiB PDE is always reserved.
const PDE4M_RESERVED: u64 = 1 << 21;
/// Entry bits 51:12 may hold a physical address.
const WIDE_ADDR_BITS: u64 = 0x000f_ffff_ffff_f000;
/// In PAE paging entry bits 62:52 are reserved (IA-32e ignores them).
const PAE_HIGH_RESERVED: u64 = 0x7ff0_0000_0000_0000;
/// Tries at setting accessed/dirty bits while the guest changes entries.
const AD_RETRIES: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// A #PF to inject.
    PageFault(Exception),
    /// A paging-structure entry is not in RAM (a sane guest never does this).
    TableNotRam(u64),
    /// The guest kept changing an entry while its accessed/dirty bits were
    /// being set; resume it and let it retry.
    Raced,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Legacy32,
    Pae,
    Long4,
    Long5,
}

/// The entries one walk used, root first, for the accessed/dirty update.
#[derive(Default)]
struct Walk {
    entries: [(u64, u64); 5],
    len: usize,
    gpa: u64,
}

/// Translate `linear` for an access of `kind` by the vCPU in `cpu`'s state
/// (CPL, CR0.WP, CR4.SMEP/SMAP, RFLAGS.AC, EFER.NXE).
pub fn translate<P: Platform + ?Sized>(
    platform: &mut P,
    cpu: &CpuState,
    linear: u64,
    kind: AccessKind,
) -> Result<u64, WalkError> {
    if cpu.cr0 & cr0::PG == 0 {
        return Ok(linear);
    }
    for _ in 0..AD_RETRIES {
        let walk = walk(platform, cpu, linear, kind)?;
        if set_accessed_dirty(platform, &walk, kind)? {
            return Ok(walk.gpa);
        }
    }
    Err(WalkError::Raced)
}

fn walk<P: Platform + ?Sized>(
    platform: &mut P,
    cpu: &CpuState,
    linear: u64,
    kind: AccessKind,
) -> Result<Walk, WalkError> {
    let format = if cpu.cr4 & cr4::PAE == 0 {
        Format::Legacy32
    } else if cpu.efer & efer::LMA == 0 {
        Format::Pae
    } else if cpu.cr4 & cr4::LA57 == 0 {
        Format::Long4
    } else {
        Format::Long5
    };
    let wide = format != Format::Legacy32;
    let nxe = wide && cpu.efer & efer::NXE != 0;
    let phys_bits = platform.phys_addr_bits().clamp(32, 52);
    let addr_mask = ((1u64 << phys_bits) - 1) & !(PAGE_SIZE - 1);
    let mut reserved = WIDE_ADDR_BITS & !addr_mask;
    if format == Format::Pae {
        reserved |= PAE_HIGH_RESERVED;
    }
    if !nxe {
        reserved |= pte::XD;
    }
    let fault = Fault::new(cpu, kind, linear);

    let (mut table, levels) = match format {
        Format::Legacy32 => (cpu.cr3 & FRAME_32, 2),
        Format::Pae => {
            let gpa = (cpu.cr3 & PDPT_BASE_PAE) | (((linear >> 30) & 3) * 8);
            let pdpte = read_entry(platform, gpa, 8)?;
            if pdpte & pte::P == 0 {
                return Err(fault.raise(0));
            }
            if pdpte & (PDPTE_RESERVED_PAE | (WIDE_ADDR_BITS & !addr_mask) | pte::XD) != 0 {
                return Err(fault.raise(pf::P | pf::RSVD));
            }
            (pdpte & addr_mask, 2)
        }
        Format::Long4 => (cpu.cr3 & addr_mask, 4),
        Format::Long5 => (cpu.cr3 & addr_mask, 5),
    };

    let (mut writable, mut user, mut no_exec) = (true, true, false);
    let mut walk = Walk::default();
    // Level 1 is the page table, 2 the page directory, and so on up.
    for level in (1..=levels).rev() {
        let (index_bits, entry_size) = if wide { (9, 8) } else { (10, 4) };
        let shift = 12 + index_bits * (level - 1);
        let index = (linear >> shift) & ((1 << index_bits) - 1);
        let gpa = table | (index * entry_size);
        let entry = read_entry(platform, gpa, entry_size)?;
        if entry & pte::P == 0 {
            return Err(fault.raise(0));
        }
        let page_mask = (1u64 << shift) - 1;
        let large = entry & pte::PS != 0
            && match level {
                2 => wide || cpu.cr4 & cr4::PSE != 0,
                3 => wide && format != Format::Pae,
                _ => false,
            };
        let mut bad = if wide { entry & reserved } else { 0 };
        if wide && level >= 4 && entry & pte::PS != 0 {
            bad |= pte::PS;
        }
        if large {
            // Bits from 13 (above PAT) up to the page size are reserved.
            bad |= if wide {
                entry & page_mask & !(2 * PAGE_SIZE - 1)
            } else {
                let pse36_bits = phys_bits.min(PSE36_LIMIT_BITS) - 32;
                let pse36_reserved = ((1u64 << 8) - 1) << (PSE36_SHIFT + pse36_bits);
                entry & (PDE4M_RESERVED | (pse36_reserved & page_mask))
            };
        }
        if bad != 0 {
            return Err(fault.raise(pf::P | pf::RSVD));
        }
        writable &= entry & pte::RW != 0;
        user &= entry & pte::US != 0;
        no_exec |= nxe && entry & pte::XD != 0;
        walk.entries[walk.len] = (gpa, entry);
        walk.len += 1;

        if level == 1 || large {
            let frame = if wide {
                entry & addr_mask & !page_mask
            } else if large {
                let high = (entry >> PSE36_SHIFT) & 0xff;
                (entry & FRAME_32 & !page_mask) | (high << 32)
            } else {
                entry & FRAME_32
            };
            if !allowed(cpu, kind, writable, user, no_exec) {
                return Err(fault.raise(pf::P));
            }
            walk.gpa = frame | (linear & page_mask);
            return Ok(walk);
        }
        table = if wide {
            entry & addr_mask
        } else {
            entry & FRAME_32
        };
    }
    // Level 1 always returns above; keep the compiler and a hostile
    // zero-level format honest without a panic.
    Err(fault.raise(0))
}

fn read_entry<P: Platform + ?Sized>(
    platform: &mut P,
    gpa: u64,
    size: u64,
) -> Result<u64, WalkError> {
    let mut bytes = [0u8; 8];
    let buf = &mut bytes[..size as usize];
    platform
        .read_ram(gpa, buf)
        .map_err(|NotRam(at)| WalkError::TableNotRam(at))?;
    Ok(u64::from_le_bytes(bytes))
}

/// The SDM's access-rights rules (Vol. 3A 4.6) for the combined rights of
/// every level.
fn allowed(
    cpu: &CpuState,
    kind: AccessKind,
    writable: bool,
    user_page: bool,
    no_exec: bool,
) -> bool {
    let user_mode = cpu.cpl() == 3;
    let smap_blocks = user_page && cpu.cr4 & cr4::SMAP != 0 && cpu.rflags & rflags::AC == 0;
    let smep_blocks = user_page && cpu.cr4 & cr4::SMEP != 0;
    let wp = cpu.cr0 & cr0::WP != 0;
    match (kind, user_mode) {
        (AccessKind::Fetch, true) => user_page && !no_exec,
        (AccessKind::Fetch, false) => !(no_exec || smep_blocks),
        (AccessKind::Read, true) => user_page,
        (AccessKind::Read, false) => !smap_blocks,
        (AccessKind::Write, true) => user_page && writable,
        (AccessKind::Write, false) => !smap_blocks && (writable || !wp),
    }
}

/// Builds the #PF for one access; the caller adds P/RSVD.
struct Fault {
    base: u32,
    linear: u64,
}

impl Fault {
    fn new(cpu: &CpuState, kind: AccessKind, linear: u64) -> Self {
        let mut base = 0;
        if kind == AccessKind::Write {
            base |= pf::W;
        }
        if cpu.cpl() == 3 {
            base |= pf::U;
        }
        let nx_paging = cpu.cr4 & cr4::PAE != 0 && cpu.efer & efer::NXE != 0;
        if kind == AccessKind::Fetch && (cpu.cr4 & cr4::SMEP != 0 || nx_paging) {
            base |= pf::ID;
        }
        Self { base, linear }
    }

    fn raise(&self, bits: u32) -> WalkError {
        WalkError::PageFault(Exception::page_fault(self.base | bits, self.linear))
    }
}

/// Set A in every entry used and D in the leaf for a write, each with a
/// compare-exchange so a concurrent guest change is not overwritten;
/// `Ok(false)` if an entry changed under us (walk again).
fn set_accessed_dirty<P: Platform + ?Sized>(
    platform: &mut P,
    walk: &Walk,
    kind: AccessKind,
) -> Result<bool, WalkError> {
    let used = walk.entries.get(..walk.len).unwrap_or(&[]);
    for (i, &(gpa, entry)) in used.iter().enumerate() {
        let mut want = entry | pte::A;
        if i + 1 == used.len() && kind == AccessKind::Write {
            want |= pte::D;
        }
        if want == entry {
            continue;
        }
        // A and D live in the low dword of 8-byte entries too.
        match platform.cmpxchg_ram_u32(gpa, entry as u32, want as u32) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(NotRam(at)) => return Err(WalkError::TableNotRam(at)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
