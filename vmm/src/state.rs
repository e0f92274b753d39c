//! The kernel's vCPU state page as the rest of the VMM uses it: the
//! emulator's [`CpuState`] copied out and back, event injection, skipping
//! an instruction.
#![forbid(unsafe_code)]

use moat_abi::vcpu::{event_kind, group, Inject, Segment as AbiSegment, VcpuState};

use crate::cpu::{CpuState, Segment};
use crate::Exception;

/// The groups the VMM reads on every exit: the emulator needs the mode and
/// the page-table root, and injection needs RFLAGS.IF and the shadow.
pub const WANT: u64 = group::GPRS
    | group::RIP_RFLAGS
    | group::CONTROL_REGISTERS
    | group::SEGMENTS
    | group::MSRS
    | group::INTERRUPTIBILITY;

/// STI and MOV SS blocking.
pub const SHADOW: u32 = 0b11;
/// Blocking by NMI: the guest handles one (until its IRET).
pub const NMI_BLOCKED: u32 = 1 << 3;
pub const NMI: u8 = 2;
pub const RFLAGS_IF: u64 = 1 << 9;

fn segment(s: &AbiSegment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        access: s.access,
    }
}

fn put_segment(dst: &mut AbiSegment, s: &Segment) {
    dst.selector = s.selector;
    dst.base = s.base;
    dst.limit = s.limit;
    dst.access = s.access;
}

/// The emulator's view of `state`.
pub fn cpu_state(state: &VcpuState) -> CpuState {
    let s = state;
    CpuState {
        gpr: [
            s.rax, s.rcx, s.rdx, s.rbx, s.rsp, s.rbp, s.rsi, s.rdi, s.r8, s.r9, s.r10, s.r11,
            s.r12, s.r13, s.r14, s.r15,
        ],
        rip: s.rip,
        rflags: s.rflags,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        cs: segment(&s.cs),
        ss: segment(&s.ss),
        ds: segment(&s.ds),
        es: segment(&s.es),
        fs: segment(&s.fs),
        gs: segment(&s.gs),
    }
}

/// Writes back what the emulator may change (GPRs, RIP, RFLAGS) and marks
/// it dirty.
pub fn store_cpu_state(state: &mut VcpuState, cpu: &CpuState) {
    let [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15] = cpu.gpr;
    state.rax = rax;
    state.rcx = rcx;
    state.rdx = rdx;
    state.rbx = rbx;
    state.rsp = rsp;
    state.rbp = rbp;
    state.rsi = rsi;
    state.rdi = rdi;
    state.r8 = r8;
    state.r9 = r9;
    state.r10 = r10;
    state.r11 = r11;
    state.r12 = r12;
    state.r13 = r13;
    state.r14 = r14;
    state.r15 = r15;
    state.rip = cpu.rip;
    state.rflags = cpu.rflags;
    state.dirty |= group::GPRS | group::RIP_RFLAGS;
}

/// Copies the segment registers the guest changed through MSRs
/// (FS/GS bases) back.
pub fn store_segments(state: &mut VcpuState, cpu: &CpuState) {
    put_segment(&mut state.fs, &cpu.fs);
    put_segment(&mut state.gs, &cpu.gs);
    state.dirty |= group::SEGMENTS;
}

/// Skips `len` bytes of instruction; that ends an STI or MOV SS shadow.
pub fn advance(state: &mut VcpuState, len: u64) {
    state.rip = state.rip.wrapping_add(len);
    state.dirty |= group::RIP_RFLAGS;
    end_shadow(state);
}

pub fn end_shadow(state: &mut VcpuState) {
    if state.interruptibility & SHADOW != 0 {
        state.interruptibility &= !SHADOW;
        state.dirty |= group::INTERRUPTIBILITY;
    }
}

pub fn inject(state: &mut VcpuState, vector: u8, kind: u8, error_code: Option<u32>) {
    state.inject = Inject {
        vector,
        kind,
        has_error_code: u8::from(error_code.is_some()),
        reserved: 0,
        error_code: error_code.unwrap_or(0),
    };
    state.dirty |= group::INJECT;
}

pub fn inject_exception(state: &mut VcpuState, exception: Exception) {
    if let Some(cr2) = exception.cr2 {
        state.cr2 = cr2;
        state.dirty |= group::CONTROL_REGISTERS;
    }
    inject(
        state,
        exception.vector,
        event_kind::HARDWARE_EXCEPTION,
        exception.error_code,
    );
}

pub const UD: u8 = 6;
pub const GP: u8 = 13;

pub fn inject_ud(state: &mut VcpuState) {
    inject(state, UD, event_kind::HARDWARE_EXCEPTION, None);
}

pub fn inject_gp(state: &mut VcpuState) {
    inject(state, GP, event_kind::HARDWARE_EXCEPTION, Some(0));
}

/// Whether the guest takes an external interrupt at the next entry.
pub fn interruptible(state: &VcpuState) -> bool {
    state.rflags & RFLAGS_IF != 0 && state.interruptibility & SHADOW == 0
}

/// CR0 after INIT: CD, NW and ET (SDM Vol. 3A Table 9-1).
const CR0_AFTER_INIT: u64 = 0x6000_0010;
/// VMX access rights of real-mode segments: present, accessed; code
/// readable, data writable. A busy TSS; LDTR unusable.
const REAL_CODE: u32 = 0x9b;
const REAL_DATA: u32 = 0x93;
const BUSY_TSS: u32 = 0x8b;
const UNUSABLE: u32 = 1 << 16;
const REAL_LIMIT: u32 = 0xffff;
/// IA32_PAT at reset: WB, WT, UC-, UC, twice.
pub const POWER_ON_PAT: u64 = 0x0007_0406_0007_0406;

/// The state a STARTUP IPI with `vector` gives a vCPU waiting for it:
/// real mode at `vector << 12` (CS selector `vector << 8`, base `vector
/// << 12`, IP 0), everything else as after INIT (SDM Vol. 3A 9.1.1, 10.4.4).
/// Keeps `old`'s TSC offset; wants [`WANT`]; every group is loaded.
pub fn startup(vector: u8, old: &VcpuState) -> VcpuState {
    let data = AbiSegment {
        limit: REAL_LIMIT,
        access: REAL_DATA,
        ..AbiSegment::default()
    };
    let mut state = VcpuState {
        dirty: group::ALL & !group::INJECT,
        want: WANT,
        tsc_offset: old.tsc_offset,
        rflags: 2,
        cr0: CR0_AFTER_INIT,
        xcr0: 1,
        cs: AbiSegment {
            selector: u16::from(vector) << 8,
            base: u64::from(vector) << 12,
            limit: REAL_LIMIT,
            access: REAL_CODE,
            ..AbiSegment::default()
        },
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: AbiSegment {
            limit: REAL_LIMIT,
            access: BUSY_TSS,
            ..AbiSegment::default()
        },
        pat: POWER_ON_PAT,
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        ..VcpuState::default()
    };
    state.ldtr.access = UNUSABLE;
    state.gdtr.limit = REAL_LIMIT.into();
    state.idtr.limit = REAL_LIMIT.into();
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_the_emulator_view() {
        let mut state = VcpuState {
            rax: 1,
            rcx: 2,
            rdx: 3,
            rbx: 4,
            rsp: 5,
            rbp: 6,
            rsi: 7,
            rdi: 8,
            r15: 16,
            rip: 0x1000,
            ..VcpuState::default()
        };
        state.cs.access = 0xa09b;
        let mut cpu = cpu_state(&state);
        assert_eq!(&cpu.gpr[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(cpu.gpr[15], 16);
        assert_eq!(cpu.cs.access, 0xa09b);
        cpu.gpr[3] = 44;
        cpu.rip = 0x1003;
        store_cpu_state(&mut state, &cpu);
        assert_eq!((state.rbx, state.rip), (44, 0x1003));
        assert_eq!(state.dirty, group::GPRS | group::RIP_RFLAGS);
    }

    #[test]
    fn startup_is_real_mode_at_the_vector() {
        let old = VcpuState {
            tsc_offset: 77,
            rip: 0x1234,
            cr0: 0x8000_0011,
            ..VcpuState::default()
        };
        let s = startup(0x9a, &old);
        assert_eq!((s.cs.selector, s.cs.base, s.rip), (0x9a00, 0x9a000, 0));
        assert_eq!(s.cr0 & 1, 0, "real mode");
        assert_eq!((s.tsc_offset, s.want), (77, WANT));
        assert_eq!(s.dirty & group::INJECT, 0);
        assert_ne!(s.dirty & group::SEGMENTS, 0);
    }

    #[test]
    fn advancing_ends_the_shadow() {
        let mut state = VcpuState {
            rip: 10,
            interruptibility: 1,
            rflags: RFLAGS_IF,
            ..VcpuState::default()
        };
        assert!(!interruptible(&state));
        advance(&mut state, 2);
        assert_eq!(state.rip, 12);
        assert!(interruptible(&state));
        assert_ne!(state.dirty & group::INTERRUPTIBILITY, 0);
    }
}
