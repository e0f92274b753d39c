//! A guest's RAM and first vCPU state.

use moat_abi::vcpu::{group, DescriptorTable, Segment, VcpuState};
use moat_testvm::layout::{GDT, PD, PDPT, PDS, PML4, RAM_SIZE, STACK_TOP, TSS};
use moat_testvm::{selector, Mode, TestGuest};

/// Segment access rights (VMX layout, as in `moat_abi::vcpu::Segment`).
pub mod access {
    /// Present, DPL 0, code, execute/read, accessed.
    pub const CODE: u32 = 0x9b;
    /// Present, DPL 0, data, read/write, accessed.
    pub const DATA: u32 = 0x93;
    /// Present, system, busy TSS (busy 16-bit TSS in real mode, busy
    /// 64-bit TSS in long mode: both type 11).
    pub const BUSY_TSS: u32 = 0x8b;
    pub const LONG: u32 = 1 << 13;
    pub const DEFAULT_BIG: u32 = 1 << 14;
    pub const GRANULARITY: u32 = 1 << 15;
    pub const UNUSABLE: u32 = 1 << 16;
}

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const RFLAGS_FIXED: u64 = 1 << 1;
pub const RFLAGS_IF: u64 = 1 << 9;
pub const RFLAGS_DF: u64 = 1 << 10;
/// The power-on PAT.
pub const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;
/// DR7's reserved bit 10, as after reset.
pub const DEFAULT_DR7: u64 = 0x400;

/// Groups the VMM wants on every exit: it decodes at CS:RIP, needs EFER
/// for the code size and emulates EFER writes, and clears the STI shadow
/// when it skips an instruction.
pub const WANT: u64 = group::GPRS
    | group::RIP_RFLAGS
    | group::CONTROL_REGISTERS
    | group::SEGMENTS
    | group::INTERRUPTIBILITY
    | group::DEBUG;

/// Loaded on the first entry: everything but `inject` (an all-zero
/// `Inject` would be external interrupt 0).
pub const FIRST_DIRTY: u64 = group::ALL & !group::INJECT;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// RAM is not the size of `layout::RAM_SIZE`.
    RamSize,
    /// The code does not fit below the VMM's structures.
    CodeTooBig,
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SetupError::RamSize => write!(f, "guest RAM has the wrong size"),
            SetupError::CodeTooBig => write!(f, "guest code does not fit"),
        }
    }
}

/// Zeroes `ram`, copies the guest's code and, for a long-mode start, the
/// GDT, TSS and identity page tables; returns the first vCPU state.
pub fn prepare(guest: &TestGuest, ram: &mut [u8]) -> Result<VcpuState, SetupError> {
    if ram.len() as u64 != RAM_SIZE {
        return Err(SetupError::RamSize);
    }
    ram.fill(0);
    let code = guest.code();
    let start = guest.load_address as usize;
    let end = start
        .checked_add(code.len())
        .filter(|&end| end as u64 <= STACK_TOP - 0x1000)
        .ok_or(SetupError::CodeTooBig)?;
    ram[start..end].copy_from_slice(code);
    let state = match guest.start_mode {
        Mode::Real => real_mode(guest.entry),
        Mode::Long => {
            write_long_mode_structures(ram);
            long_mode(guest.entry)
        }
    };
    Ok(state)
}

/// Like `prepare`, for raw 64-bit code (the benchmark loops): loaded at
/// `layout::LOAD_ADDRESS` and entered in long mode.
pub fn prepare_long_mode_code(code: &[u8], ram: &mut [u8]) -> Result<VcpuState, SetupError> {
    if ram.len() as u64 != RAM_SIZE {
        return Err(SetupError::RamSize);
    }
    ram.fill(0);
    let start = moat_testvm::layout::LOAD_ADDRESS as usize;
    let end = start
        .checked_add(code.len())
        .filter(|&end| end as u64 <= STACK_TOP - 0x1000)
        .ok_or(SetupError::CodeTooBig)?;
    ram[start..end].copy_from_slice(code);
    write_long_mode_structures(ram);
    Ok(long_mode(moat_testvm::layout::LOAD_ADDRESS))
}

fn put(ram: &mut [u8], address: u64, value: u64) {
    let at = address as usize;
    ram[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Present, writable; with PS a 2 MiB page.
const PRESENT_WRITABLE: u64 = 0x3;
const LARGE: u64 = 0x80;

/// The GDT at `layout::GDT` (null, 64-bit code, data, TSS) and identity
/// paging of the first 4 GiB in 2 MiB pages at `layout::PML4`.
fn write_long_mode_structures(ram: &mut [u8]) {
    put(ram, GDT, 0);
    put(
        ram,
        GDT + u64::from(selector::CODE64),
        0x00af_9b00_0000_ffff,
    );
    put(ram, GDT + u64::from(selector::DATA), 0x00cf_9300_0000_ffff);
    let (low, high) = tss_descriptor(TSS, 0x67);
    put(ram, GDT + u64::from(selector::TSS), low);
    put(ram, GDT + u64::from(selector::TSS) + 8, high);
    put(ram, PML4, PDPT | PRESENT_WRITABLE);
    for i in 0..PDS {
        let pd = PD + i * 0x1000;
        put(ram, PDPT + i * 8, pd | PRESENT_WRITABLE);
        for j in 0..512 {
            let page = (i * 512 + j) << 21;
            put(ram, pd + j * 8, page | LARGE | PRESENT_WRITABLE);
        }
    }
}

/// A busy 64-bit TSS descriptor (two words).
fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | u64::from(access::BUSY_TSS) << 40
        | (limit >> 16 & 0xf) << 48
        | (base >> 24 & 0xff) << 56;
    (low, base >> 32)
}

fn segment(selector: u16, access: u32, limit: u32, base: u64) -> Segment {
    Segment {
        selector,
        access,
        limit,
        base,
        ..Segment::default()
    }
}

fn common(entry: u64) -> VcpuState {
    VcpuState {
        dirty: FIRST_DIRTY,
        want: WANT,
        rip: entry,
        rflags: RFLAGS_FIXED,
        ldtr: segment(0, access::UNUSABLE, 0, 0),
        pat: DEFAULT_PAT,
        dr7: DEFAULT_DR7,
        ..VcpuState::default()
    }
}

/// Real mode at 0:`entry`, as after reset but for CS.
pub fn real_mode(entry: u64) -> VcpuState {
    let data = segment(0, access::DATA, 0xffff, 0);
    VcpuState {
        cr0: CR0_ET,
        cs: segment(0, access::CODE, 0xffff, 0),
        ds: data,
        es: data,
        ss: data,
        fs: data,
        gs: data,
        tr: segment(0, access::BUSY_TSS, 0xffff, 0),
        gdtr: DescriptorTable {
            limit: 0xffff,
            base: 0,
        },
        idtr: DescriptorTable {
            limit: 0x3ff,
            base: 0,
        },
        ..common(entry)
    }
}

/// 64-bit mode at `entry` on the structures `prepare` wrote.
pub fn long_mode(entry: u64) -> VcpuState {
    let flat = 0xffff_ffff;
    let data = segment(
        selector::DATA,
        access::DATA | access::DEFAULT_BIG | access::GRANULARITY,
        flat,
        0,
    );
    VcpuState {
        cr0: CR0_PG | CR0_NE | CR0_ET | CR0_PE,
        cr3: PML4,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        cs: segment(
            selector::CODE64,
            access::CODE | access::LONG | access::GRANULARITY,
            flat,
            0,
        ),
        ds: data,
        es: data,
        ss: data,
        fs: data,
        gs: data,
        tr: segment(selector::TSS, access::BUSY_TSS, 0x67, TSS),
        gdtr: DescriptorTable {
            limit: 4 * 8 + 7,
            base: GDT,
        },
        idtr: DescriptorTable { limit: 0, base: 0 },
        rsp: STACK_TOP,
        ..common(entry)
    }
}

/// The entry's guest-physical address, as the guest's page tables would
/// translate it (identity for the tables `prepare` writes).
pub fn code_address(state: &VcpuState) -> u64 {
    let ip = if state.efer & EFER_LMA != 0 && state.cs.access & access::LONG != 0 {
        state.rip
    } else if state.cs.access & access::DEFAULT_BIG != 0 {
        state.rip & 0xffff_ffff
    } else {
        state.rip & 0xffff
    };
    state.cs.base.wrapping_add(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testvm::layout::LOAD_ADDRESS as LOAD;

    fn word(ram: &[u8], address: u64) -> u64 {
        let at = address as usize;
        u64::from_le_bytes(ram[at..at + 8].try_into().unwrap())
    }

    /// Walks the tables `prepare` wrote, as the CPU would.
    fn translate(ram: &[u8], cr3: u64, linear: u64) -> Option<u64> {
        let mask = 0x000f_ffff_ffff_f000;
        let pml4e = word(ram, cr3 + (linear >> 39 & 511) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = word(ram, (pml4e & mask) + (linear >> 30 & 511) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = word(ram, (pdpte & mask) + (linear >> 21 & 511) * 8);
        if pde & 1 == 0 || pde & LARGE == 0 {
            return None;
        }
        Some((pde & 0x000f_ffff_ffe0_0000) | (linear & 0x1f_ffff))
    }

    #[test]
    fn long_mode_guests_get_identity_paging_of_4_gib() {
        let guest = moat_testvm::find("mmio").unwrap();
        let mut ram = vec![0xaa; RAM_SIZE as usize];
        let state = prepare(guest, &mut ram).unwrap();
        for address in [
            0,
            LOAD,
            STACK_TOP - 8,
            moat_testvm::mmio::BASE,
            moat_testvm::NOT_GIVEN,
            0xffff_f000,
        ] {
            assert_eq!(translate(&ram, state.cr3, address), Some(address));
        }
        assert_eq!(translate(&ram, state.cr3, 1 << 32), None);
        assert_eq!(&ram[LOAD as usize..][..guest.code().len()], guest.code());
        assert_eq!(ram[0x500], 0, "RAM is zeroed");
    }

    #[test]
    fn the_gdt_matches_the_segment_registers() {
        let mut ram = vec![0; RAM_SIZE as usize];
        let state = prepare(moat_testvm::find("portio").unwrap(), &mut ram).unwrap();
        let descriptor = |sel: u16| word(&ram, state.gdtr.base + u64::from(sel));
        // Access byte (bits 40..48) and flags nibble (52..56) of the GDT
        // entry against the VMX access rights in the state.
        for seg in [state.cs, state.ss, state.ds] {
            let d = descriptor(seg.selector);
            assert_eq!((d >> 40 & 0xff) as u32, seg.access & 0xff);
            assert_eq!((d >> 52 & 0xf) as u32, seg.access >> 12 & 0xf);
        }
        let tss = descriptor(state.tr.selector);
        assert_eq!(tss & 0xffff, 0x67);
        assert_eq!((tss >> 16 & 0xff_ffff) | (tss >> 56 & 0xff) << 24, TSS);
        assert_eq!(tss >> 40 & 0xff, 0x8b);
        assert!(u64::from(state.tr.selector) + 15 <= state.gdtr.limit);
        assert_eq!(state.rsp, STACK_TOP);
        assert_eq!(code_address(&state), LOAD);
    }

    #[test]
    fn real_mode_starts_like_after_reset() {
        let mut ram = vec![0; RAM_SIZE as usize];
        let state = prepare(moat_testvm::find("modes").unwrap(), &mut ram).unwrap();
        assert_eq!(state.cr0, CR0_ET);
        assert_eq!(state.efer, 0);
        assert_eq!(
            (state.cs.selector, state.cs.base, state.cs.limit),
            (0, 0, 0xffff)
        );
        assert_eq!(state.cs.access, 0x9b);
        assert_eq!(state.ds.access, 0x93);
        assert_eq!(state.tr.access, 0x8b);
        assert_eq!(state.ldtr.access, access::UNUSABLE);
        assert_eq!(state.rip, LOAD);
        assert_eq!(state.rflags, 2);
        assert_eq!(state.dirty & group::INJECT, 0);
        assert_eq!(code_address(&state), LOAD);
        // Nothing but the code: the guest builds its own tables.
        assert!(ram[PML4 as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn wrong_ram_is_refused() {
        let guest = moat_testvm::find("modes").unwrap();
        assert_eq!(
            prepare(guest, &mut [0; 4096]).err(),
            Some(SetupError::RamSize)
        );
    }
}
