//! The vCPU state page: shared between the kernel and the VMM that runs the
//! vCPU. On `vcpu_run` the kernel loads the groups the VMM marked in
//! `dirty`; on an exit it stores the exit record and the groups asked for
//! in `want`, and clears `dirty`.

/// Groups of guest state, for `dirty` and `want`.
pub mod group {
    /// rax..r15 (rsp included).
    pub const GPRS: u64 = 1 << 0;
    /// rip and rflags.
    pub const RIP_RFLAGS: u64 = 1 << 1;
    /// cr0, cr2, cr3, cr4, cr8, efer, xcr0.
    pub const CONTROL_REGISTERS: u64 = 1 << 2;
    /// es, cs, ss, ds, fs, gs.
    pub const SEGMENTS: u64 = 1 << 3;
    /// ldtr, tr, gdtr, idtr.
    pub const SYSTEM_SEGMENTS: u64 = 1 << 4;
    /// star, lstar, cstar, sfmask, kernel_gs_base, sysenter_*, pat.
    pub const MSRS: u64 = 1 << 5;
    /// dr0-dr3, dr6, dr7.
    pub const DEBUG: u64 = 1 << 6;
    /// interruptibility and activity state.
    pub const INTERRUPTIBILITY: u64 = 1 << 7;
    /// `inject` holds an event to deliver on entry.
    pub const INJECT: u64 = 1 << 8;
    /// `exit_on` (interrupt-window and NMI-window exiting).
    pub const EXIT_ON: u64 = 1 << 9;
    /// `tsc_offset`: the guest reads the host TSC plus this.
    pub const TSC_OFFSET: u64 = 1 << 10;
    pub const ALL: u64 = (1 << 11) - 1;
}

/// Why `vcpu_run` returned (`VcpuState::exit.reason`).
pub mod exit_reason {
    /// `vcpu_poke` asked for it (nothing happened in the guest).
    pub const POKED: u32 = 1;
    /// Port I/O: `exit.port`, `exit.size`, `exit.flags` (IO_* bits).
    pub const IO: u32 = 2;
    /// Guest-physical access to memory the VM was not given: `exit.gpa`,
    /// `exit.flags` (ACCESS_* bits).
    pub const MEMORY: u32 = 3;
    pub const CPUID: u32 = 4;
    /// RDMSR (ecx in the GPRs).
    pub const MSR_READ: u32 = 5;
    /// WRMSR (ecx, edx:eax in the GPRs).
    pub const MSR_WRITE: u32 = 6;
    pub const HLT: u32 = 7;
    /// VMCALL/VMMCALL that is not the kernel's IPC hypercall.
    pub const HYPERCALL: u32 = 8;
    /// The guest can take an interrupt now (asked for by `exit_on`).
    pub const INTERRUPT_WINDOW: u32 = 9;
    /// The guest can take an NMI now (asked for by `exit_on`).
    pub const NMI_WINDOW: u32 = 10;
    /// An intercepted exception: `exit.vector`, `exit.error_code`.
    pub const EXCEPTION: u32 = 11;
    /// Triple fault / shutdown: the guest is dead until the VMM resets it.
    pub const SHUTDOWN: u32 = 12;
    /// The CPU refused the guest state (VM-entry failure / VMEXIT_INVALID).
    pub const INVALID_STATE: u32 = 13;
    /// Anything else: `exit.raw` holds the vendor's exit code.
    pub const OTHER: u32 = 14;
    /// XSETBV (ecx = register, edx:eax = value): the VMM decides, sets
    /// `xcr0` and marks CONTROL_REGISTERS dirty.
    pub const XSETBV: u32 = 15;
}

/// `exit.flags` bits.
pub mod exit_flags {
    pub const IO_IN: u32 = 1 << 0;
    pub const IO_STRING: u32 = 1 << 1;
    pub const IO_REP: u32 = 1 << 2;
    pub const ACCESS_READ: u32 = 1 << 3;
    pub const ACCESS_WRITE: u32 = 1 << 4;
    pub const ACCESS_EXECUTE: u32 = 1 << 5;
    pub const ERROR_CODE_VALID: u32 = 1 << 6;
}

/// `exit_on` bits.
pub mod exit_on {
    pub const INTERRUPT_WINDOW: u32 = 1 << 0;
    pub const NMI_WINDOW: u32 = 1 << 1;
}

/// Event kinds for `Inject::kind`.
pub mod event_kind {
    pub const EXTERNAL_INTERRUPT: u8 = 0;
    pub const NMI: u8 = 2;
    pub const HARDWARE_EXCEPTION: u8 = 3;
    pub const SOFTWARE_INTERRUPT: u8 = 4;
}

/// A segment register; `access` in the VMX access-rights layout (type 0-3,
/// S 4, DPL 5-6, P 7, AVL 12, L 13, D/B 14, G 15, unusable 16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub reserved: u16,
    pub access: u32,
    pub limit: u32,
    pub reserved2: u32,
    pub base: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub limit: u64,
    pub base: u64,
}

/// An event for the kernel to deliver on the next entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inject {
    pub vector: u8,
    pub kind: u8,
    pub has_error_code: u8,
    pub reserved: u8,
    pub error_code: u32,
}

/// What the last exit was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exit {
    pub reason: u32,
    pub flags: u32,
    /// I/O: port and access size in bytes.
    pub port: u16,
    pub size: u8,
    /// Exception exits: the vector.
    pub vector: u8,
    pub error_code: u32,
    /// Guest-physical address (MEMORY exits).
    pub gpa: u64,
    /// Length of the exiting instruction when the CPU reports it, else 0
    /// (QEMU's SVM has no NRIP save: the VMM decodes it).
    pub instruction_length: u64,
    /// The vendor's raw exit code and qualification / EXITINFO1.
    pub raw: u64,
    pub qualification: u64,
    /// An event whose delivery the exit interrupted (valid if `Inject`'s
    /// `kind` != 0xff); the VMM re-injects it.
    pub pending: Inject,
    pub pending_valid: u32,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// Groups the VMM changed: loaded on the next entry.
    pub dirty: u64,
    /// Groups the VMM wants stored on every exit (GPRS and RIP_RFLAGS
    /// always are).
    pub want: u64,
    pub exit: Exit,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// The task priority the guest sees in CR8 (bits 3:0). Virtual: it
    /// never reaches the host's; the VMM compares it with the interrupts it
    /// wants to inject.
    pub cr8: u64,
    pub efer: u64,
    /// The guest's XCR0 (bit 0 always set; the kernel refuses values the
    /// CPU does not support and keeps the previous one).
    pub xcr0: u64,
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub dr0: u64,
    pub dr1: u64,
    pub dr2: u64,
    pub dr3: u64,
    pub dr6: u64,
    pub dr7: u64,
    /// VMX interruptibility-state bits (STI 0, MOV SS 1, NMI 3).
    pub interruptibility: u32,
    /// 0 active, 1 HLT.
    pub activity: u32,
    pub inject: Inject,
    /// `exit_on` bits.
    pub exit_on: u32,
    pub reserved: u32,
    /// Added to the host TSC for the guest's RDTSC (two's complement).
    pub tsc_offset: u64,
}

const _: () = assert!(core::mem::size_of::<VcpuState>() <= 4096);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_distinct_bits() {
        let all = [
            group::GPRS,
            group::RIP_RFLAGS,
            group::CONTROL_REGISTERS,
            group::SEGMENTS,
            group::SYSTEM_SEGMENTS,
            group::MSRS,
            group::DEBUG,
            group::INTERRUPTIBILITY,
            group::INJECT,
            group::EXIT_ON,
            group::TSC_OFFSET,
        ];
        let mut seen = 0;
        for g in all {
            assert_eq!(g.count_ones(), 1);
            assert_eq!(seen & g, 0);
            seen |= g;
        }
        assert_eq!(seen, group::ALL);
    }

    #[test]
    fn the_state_fits_its_page() {
        assert!(core::mem::size_of::<VcpuState>() <= 4096);
        assert_eq!(core::mem::size_of::<Segment>(), 24);
    }
}
