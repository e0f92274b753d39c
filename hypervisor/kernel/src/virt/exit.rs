//! Exit decoding: the raw exit information of either vendor into one
//! [`Exit`] the kernel and the VMM work with. Nothing here panics: anything
//! not understood becomes [`Exit::Unknown`] with the raw reason.

use super::event::{Event, EventKind};

/// Basic exit reasons (SDM Vol. 3D, Appendix C "VMX Basic Exit Reasons").
pub mod vmx_reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const SIPI: u16 = 4;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const NMI_WINDOW: u16 = 8;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const INVLPG: u16 = 14;
    pub const RDPMC: u16 = 15;
    pub const RDTSC: u16 = 16;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMLAUNCH: u16 = 20;
    pub const VMPTRLD: u16 = 21;
    pub const VMPTRST: u16 = 22;
    pub const VMREAD: u16 = 23;
    pub const VMRESUME: u16 = 24;
    pub const VMWRITE: u16 = 25;
    pub const VMXOFF: u16 = 26;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const DR_ACCESS: u16 = 29;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const INVALID_GUEST_STATE: u16 = 33;
    pub const MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR: u16 = 39;
    pub const PAUSE: u16 = 40;
    pub const MACHINE_CHECK_DURING_ENTRY: u16 = 41;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const RDTSCP: u16 = 51;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
    pub const VMFUNC: u16 = 59;

    /// Exit-reason bits 15:0 hold the basic reason.
    pub const BASIC_MASK: u32 = 0xffff;
    /// Exit-reason bit 31: VM-entry failure.
    pub const ENTRY_FAILURE: u32 = 1 << 31;
}

/// EXITCODE values (APM Vol. 2, Appendix C "SVM Intercept Exit Codes").
pub mod svm_exitcode {
    /// Reads of CR0–15: 00h + n; writes: 10h + n.
    pub const CR_READ: u64 = 0x00;
    pub const CR_WRITE: u64 = 0x10;
    /// Reads of DR0–15: 20h + n; writes: 30h + n.
    pub const DR_READ: u64 = 0x20;
    pub const DR_WRITE: u64 = 0x30;
    /// Exception vector n: 40h + n.
    pub const EXCEPTION: u64 = 0x40;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const SMI: u64 = 0x62;
    pub const INIT: u64 = 0x63;
    pub const VINTR: u64 = 0x64;
    pub const CR0_SEL_WRITE: u64 = 0x65;
    pub const RDTSC: u64 = 0x6e;
    pub const RDPMC: u64 = 0x6f;
    pub const CPUID: u64 = 0x72;
    pub const IRET: u64 = 0x74;
    pub const INVD: u64 = 0x76;
    pub const PAUSE: u64 = 0x77;
    pub const HLT: u64 = 0x78;
    pub const INVLPG: u64 = 0x79;
    pub const INVLPGA: u64 = 0x7a;
    pub const IOIO: u64 = 0x7b;
    pub const MSR: u64 = 0x7c;
    pub const TASK_SWITCH: u64 = 0x7d;
    pub const SHUTDOWN: u64 = 0x7f;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    pub const RDTSCP: u64 = 0x87;
    pub const WBINVD: u64 = 0x89;
    pub const MONITOR: u64 = 0x8a;
    pub const MWAIT: u64 = 0x8b;
    pub const MWAIT_CONDITIONAL: u64 = 0x8c;
    pub const XSETBV: u64 = 0x8d;
    pub const NPF: u64 = 0x400;
    /// VMEXIT_INVALID (-1): VMRUN found invalid guest state.
    pub const INVALID: u64 = u64::MAX;
    /// The same, as QEMU stores it: only the low 32 bits.
    pub const INVALID_32: u64 = 0xffff_ffff;
    /// VMEXIT_BUSY (-2).
    pub const BUSY: u64 = u64::MAX - 1;
    pub const BUSY_32: u64 = 0xffff_fffe;
}

/// What the exit information of a VMX exit consists of (VMREADs of the
/// exit-reason, exit-qualification, guest-physical-address and VM-exit
/// interruption fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxExitInfo {
    pub reason: u32,
    pub qualification: u64,
    pub guest_physical: u64,
    pub interruption_info: u32,
    pub interruption_error: u32,
}

/// The VMCB's EXITCODE, EXITINFO1 and EXITINFO2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmExitInfo {
    pub exitcode: u64,
    pub exitinfo1: u64,
    pub exitinfo2: u64,
}

/// How a control register was accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CR from general-purpose register `gpr` (0 = RAX … 15 = R15),
    /// `None` if the CPU did not say (SVM without decode assists, LMSW/CLTS
    /// on SVM).
    Write {
        gpr: Option<u8>,
    },
    Read {
        gpr: Option<u8>,
    },
    Clts,
    Lmsw {
        source: u16,
    },
}

/// A VM exit, vendor-neutral.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// IN/OUT/INS/OUTS; `write` for OUT. `size` is 1, 2 or 4 bytes.
    Io {
        port: u16,
        size: u8,
        write: bool,
        string: bool,
        rep: bool,
    },
    /// An access the guest-physical tables do not allow: unmapped memory
    /// (MMIO) when `!mapped`, otherwise a rights violation.
    NestedPageFault {
        gpa: u64,
        read: bool,
        write: bool,
        fetch: bool,
        mapped: bool,
    },
    /// The guest-physical tables are malformed at `gpa` (a kernel bug).
    NestedMisconfig {
        gpa: u64,
    },
    Cpuid,
    /// RDMSR or WRMSR; the index is in the guest's RCX.
    Msr {
        write: bool,
    },
    Hlt,
    /// VMCALL / VMMCALL.
    Hypercall,
    InterruptWindow,
    NmiWindow,
    /// An intercepted exception; `address` is the faulting linear address of
    /// a #PF.
    Exception {
        vector: u8,
        error_code: Option<u32>,
        address: Option<u64>,
    },
    /// A host interrupt arrived; the vector if the CPU acknowledged it.
    ExternalInterrupt {
        vector: Option<u8>,
    },
    Nmi,
    PreemptionTimer,
    /// Triple fault or shutdown.
    Shutdown,
    ControlRegister {
        cr: u8,
        access: CrAccess,
    },
    /// MOV to (`write`) or from DR `dr`.
    DebugRegister {
        dr: u8,
        write: bool,
        gpr: Option<u8>,
    },
    Invlpg {
        address: Option<u64>,
    },
    Rdtsc,
    Rdtscp,
    Rdpmc,
    Pause,
    Invd,
    Wbinvd,
    Xsetbv,
    Monitor,
    Mwait,
    TaskSwitch,
    /// SVM only: IRET intercepted (SVM's way to find the NMI window).
    Iret,
    Init,
    Sipi {
        vector: u8,
    },
    /// A VMX or SVM instruction executed by the guest (it gets #UD).
    VirtualizationInstruction,
    /// VM entry refused the guest state (VMX reason 33, VMEXIT_INVALID).
    InvalidGuestState,
    /// Any other failed VM entry; `reason` is the raw value.
    EntryFailure {
        reason: u64,
    },
    Unknown {
        raw: u64,
    },
}

/// Exceptions that push an error code (SDM Vol. 3A, Table "Protected-Mode
/// Exceptions and Interrupts"; APM Vol. 2, Table 8-1).
const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

const PAGE_FAULT: u8 = 14;

/// I/O-instruction exit qualification (SDM Vol. 3C, 28.2.1, Table "Exit
/// Qualification for I/O Instructions").
mod vmx_io {
    pub const SIZE_MASK: u64 = 0b111;
    pub const IN: u64 = 1 << 3;
    pub const STRING: u64 = 1 << 4;
    pub const REP: u64 = 1 << 5;
    pub const PORT_SHIFT: u32 = 16;
}

/// EPT-violation exit qualification (Table "Exit Qualification for EPT
/// Violations").
mod vmx_ept {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const FETCH: u64 = 1 << 2;
    /// Bits 5:3: the rights the translation grants; any set means mapped.
    pub const GRANTED: u64 = 0b111 << 3;
}

/// Control-register access qualification (Table "Exit Qualification for
/// Control-Register Accesses").
mod vmx_cr {
    pub const NUMBER_MASK: u64 = 0xf;
    pub const TYPE_SHIFT: u32 = 4;
    pub const TYPE_MASK: u64 = 0b11;
    pub const MOV_TO_CR: u64 = 0;
    pub const MOV_FROM_CR: u64 = 1;
    pub const CLTS: u64 = 2;
    pub const GPR_SHIFT: u32 = 8;
    pub const GPR_MASK: u64 = 0xf;
    pub const LMSW_SOURCE_SHIFT: u32 = 16;
}

/// MOV-DR qualification (Table "Exit Qualification for MOV DR").
mod vmx_dr {
    pub const NUMBER_MASK: u64 = 0b111;
    pub const FROM_DR: u64 = 1 << 4;
    pub const GPR_SHIFT: u32 = 8;
    pub const GPR_MASK: u64 = 0xf;
}

/// INIT-SIPI: qualification bits 7:0 are the SIPI vector.
const SIPI_VECTOR_MASK: u64 = 0xff;

/// I/O operand size from its encoding (0 = byte, 1 = word, 3 = doubleword).
const fn vmx_io_size(encoding: u64) -> Option<u8> {
    match encoding {
        0 => Some(1),
        1 => Some(2),
        3 => Some(4),
        _ => None,
    }
}

pub fn decode_vmx(info: &VmxExitInfo) -> Exit {
    use vmx_reason as r;
    let unknown = Exit::Unknown {
        raw: u64::from(info.reason),
    };
    let basic = (info.reason & r::BASIC_MASK) as u16;
    let q = info.qualification;
    if info.reason & r::ENTRY_FAILURE != 0 && basic != r::INVALID_GUEST_STATE {
        return Exit::EntryFailure {
            reason: u64::from(info.reason),
        };
    }
    match basic {
        r::EXCEPTION_OR_NMI => {
            match Event::from_vmx(info.interruption_info, info.interruption_error) {
                Some(Event {
                    kind: EventKind::Nmi,
                    ..
                }) => Exit::Nmi,
                Some(Event {
                    vector,
                    kind:
                        EventKind::HardwareException
                        | EventKind::SoftwareException
                        | EventKind::PrivilegedSoftwareException,
                    error_code,
                }) => Exit::Exception {
                    vector,
                    error_code,
                    address: (vector == PAGE_FAULT).then_some(q),
                },
                _ => unknown,
            }
        }
        r::EXTERNAL_INTERRUPT => Exit::ExternalInterrupt {
            vector: Event::from_vmx(info.interruption_info, 0).map(|e| e.vector),
        },
        r::TRIPLE_FAULT => Exit::Shutdown,
        r::INIT => Exit::Init,
        r::SIPI => Exit::Sipi {
            vector: (q & SIPI_VECTOR_MASK) as u8,
        },
        r::INTERRUPT_WINDOW => Exit::InterruptWindow,
        r::NMI_WINDOW => Exit::NmiWindow,
        r::TASK_SWITCH => Exit::TaskSwitch,
        r::CPUID => Exit::Cpuid,
        r::HLT => Exit::Hlt,
        r::INVD => Exit::Invd,
        r::INVLPG => Exit::Invlpg { address: Some(q) },
        r::RDPMC => Exit::Rdpmc,
        r::RDTSC => Exit::Rdtsc,
        r::VMCALL => Exit::Hypercall,
        r::VMCLEAR..=r::VMXON | r::INVEPT | r::INVVPID | r::VMFUNC => {
            Exit::VirtualizationInstruction
        }
        r::CR_ACCESS => {
            let gpr = Some(((q >> vmx_cr::GPR_SHIFT) & vmx_cr::GPR_MASK) as u8);
            let access = match (q >> vmx_cr::TYPE_SHIFT) & vmx_cr::TYPE_MASK {
                vmx_cr::MOV_TO_CR => CrAccess::Write { gpr },
                vmx_cr::MOV_FROM_CR => CrAccess::Read { gpr },
                vmx_cr::CLTS => CrAccess::Clts,
                _ => CrAccess::Lmsw {
                    source: (q >> vmx_cr::LMSW_SOURCE_SHIFT) as u16,
                },
            };
            Exit::ControlRegister {
                cr: (q & vmx_cr::NUMBER_MASK) as u8,
                access,
            }
        }
        r::DR_ACCESS => Exit::DebugRegister {
            dr: (q & vmx_dr::NUMBER_MASK) as u8,
            write: q & vmx_dr::FROM_DR == 0,
            gpr: Some(((q >> vmx_dr::GPR_SHIFT) & vmx_dr::GPR_MASK) as u8),
        },
        r::IO_INSTRUCTION => match vmx_io_size(q & vmx_io::SIZE_MASK) {
            Some(size) => Exit::Io {
                port: (q >> vmx_io::PORT_SHIFT) as u16,
                size,
                write: q & vmx_io::IN == 0,
                string: q & vmx_io::STRING != 0,
                rep: q & vmx_io::REP != 0,
            },
            None => unknown,
        },
        r::RDMSR => Exit::Msr { write: false },
        r::WRMSR => Exit::Msr { write: true },
        r::INVALID_GUEST_STATE => Exit::InvalidGuestState,
        r::MSR_LOADING | r::MACHINE_CHECK_DURING_ENTRY => Exit::EntryFailure {
            reason: u64::from(info.reason),
        },
        r::MWAIT => Exit::Mwait,
        r::MONITOR => Exit::Monitor,
        r::PAUSE => Exit::Pause,
        r::EPT_VIOLATION => Exit::NestedPageFault {
            gpa: info.guest_physical,
            read: q & vmx_ept::READ != 0,
            write: q & vmx_ept::WRITE != 0,
            fetch: q & vmx_ept::FETCH != 0,
            mapped: q & vmx_ept::GRANTED != 0,
        },
        r::EPT_MISCONFIG => Exit::NestedMisconfig {
            gpa: info.guest_physical,
        },
        r::RDTSCP => Exit::Rdtscp,
        r::PREEMPTION_TIMER => Exit::PreemptionTimer,
        r::WBINVD => Exit::Wbinvd,
        r::XSETBV => Exit::Xsetbv,
        _ => unknown,
    }
}

/// IOIO intercept EXITINFO1 (APM Vol. 2, 15.10.2, Figure "EXITINFO1 for
/// IOIO Intercept").
mod svm_io {
    pub const IN: u64 = 1 << 0;
    pub const STRING: u64 = 1 << 2;
    pub const REP: u64 = 1 << 3;
    pub const SIZE_8: u64 = 1 << 4;
    pub const SIZE_16: u64 = 1 << 5;
    pub const SIZE_32: u64 = 1 << 6;
    pub const SIZE_MASK: u64 = SIZE_8 | SIZE_16 | SIZE_32;
    pub const PORT_SHIFT: u32 = 16;
}

/// NPF EXITINFO1: a page-fault error code (APM Vol. 2, 15.25.6 "Nested
/// versus Guest Page Faults, Fault Ordering").
mod svm_npf {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const RESERVED: u64 = 1 << 3;
    pub const FETCH: u64 = 1 << 4;
}

/// MOV CR intercepts with decode assists (APM Vol. 2, 15.33): bit 63 says
/// a MOV instruction caused it, bits 3:0 name its GPR.
const SVM_MOV_CR: u64 = 1 << 63;
const SVM_GPR_MASK: u64 = 0xf;
/// MSR intercept EXITINFO1: 0 = RDMSR, 1 = WRMSR.
const SVM_MSR_READ: u64 = 0;
const SVM_MSR_WRITE: u64 = 1;
const SVM_LOW_NIBBLE: u64 = 0xf;

pub fn decode_svm(info: &SvmExitInfo) -> Exit {
    use svm_exitcode as c;
    let code = info.exitcode;
    let info1 = info.exitinfo1;
    let unknown = Exit::Unknown { raw: code };
    match code {
        c::CR_READ..=0x0f | c::CR_WRITE..=0x1f => {
            let gpr = (info1 & SVM_MOV_CR != 0).then_some((info1 & SVM_GPR_MASK) as u8);
            let access = if code >= c::CR_WRITE {
                CrAccess::Write { gpr }
            } else {
                CrAccess::Read { gpr }
            };
            Exit::ControlRegister {
                cr: (code & SVM_LOW_NIBBLE) as u8,
                access,
            }
        }
        c::CR0_SEL_WRITE => Exit::ControlRegister {
            cr: 0,
            access: CrAccess::Write {
                gpr: (info1 & SVM_MOV_CR != 0).then_some((info1 & SVM_GPR_MASK) as u8),
            },
        },
        c::DR_READ..=0x3f => Exit::DebugRegister {
            dr: (code & SVM_LOW_NIBBLE) as u8,
            write: code >= c::DR_WRITE,
            gpr: None,
        },
        c::EXCEPTION..=0x5f => {
            let vector = (code - c::EXCEPTION) as u8;
            Exit::Exception {
                vector,
                error_code: has_error_code(vector).then_some(info1 as u32),
                address: (vector == PAGE_FAULT).then_some(info.exitinfo2),
            }
        }
        c::INTR => Exit::ExternalInterrupt { vector: None },
        c::NMI => Exit::Nmi,
        c::INIT => Exit::Init,
        c::VINTR => Exit::InterruptWindow,
        c::RDTSC => Exit::Rdtsc,
        c::RDPMC => Exit::Rdpmc,
        c::CPUID => Exit::Cpuid,
        c::IRET => Exit::Iret,
        c::INVD => Exit::Invd,
        c::PAUSE => Exit::Pause,
        c::HLT => Exit::Hlt,
        c::INVLPG => Exit::Invlpg { address: None },
        c::IOIO => {
            let size = match info1 & svm_io::SIZE_MASK {
                svm_io::SIZE_8 => 1,
                svm_io::SIZE_16 => 2,
                svm_io::SIZE_32 => 4,
                _ => return unknown,
            };
            Exit::Io {
                port: (info1 >> svm_io::PORT_SHIFT) as u16,
                size,
                write: info1 & svm_io::IN == 0,
                string: info1 & svm_io::STRING != 0,
                rep: info1 & svm_io::REP != 0,
            }
        }
        c::MSR => match info1 {
            SVM_MSR_READ => Exit::Msr { write: false },
            SVM_MSR_WRITE => Exit::Msr { write: true },
            _ => unknown,
        },
        c::TASK_SWITCH => Exit::TaskSwitch,
        c::SHUTDOWN => Exit::Shutdown,
        c::VMMCALL => Exit::Hypercall,
        c::VMRUN | c::VMLOAD | c::VMSAVE | c::STGI | c::CLGI | c::SKINIT | c::INVLPGA => {
            Exit::VirtualizationInstruction
        }
        c::RDTSCP => Exit::Rdtscp,
        c::WBINVD => Exit::Wbinvd,
        c::MONITOR => Exit::Monitor,
        c::MWAIT | c::MWAIT_CONDITIONAL => Exit::Mwait,
        c::XSETBV => Exit::Xsetbv,
        c::NPF if info1 & svm_npf::RESERVED != 0 => Exit::NestedMisconfig {
            gpa: info.exitinfo2,
        },
        c::NPF => {
            let write = info1 & svm_npf::WRITE != 0;
            let fetch = info1 & svm_npf::FETCH != 0;
            Exit::NestedPageFault {
                gpa: info.exitinfo2,
                read: !write && !fetch,
                write,
                fetch,
                mapped: info1 & svm_npf::PRESENT != 0,
            }
        }
        c::INVALID | c::INVALID_32 => Exit::InvalidGuestState,
        c::BUSY | c::BUSY_32 => Exit::EntryFailure { reason: code },
        _ => unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmx(reason: u16, qualification: u64) -> Exit {
        decode_vmx(&VmxExitInfo {
            reason: u32::from(reason),
            qualification,
            ..VmxExitInfo::default()
        })
    }

    fn svm(exitcode: u64, exitinfo1: u64, exitinfo2: u64) -> Exit {
        decode_svm(&SvmExitInfo {
            exitcode,
            exitinfo1,
            exitinfo2,
        })
    }

    #[test]
    fn vmx_io() {
        // OUT DX, AL to 0x3f8: size 0, direction out, DX operand.
        assert_eq!(
            vmx(30, 0x03f8_0000),
            Exit::Io {
                port: 0x3f8,
                size: 1,
                write: true,
                string: false,
                rep: false
            }
        );
        // REP INSD from 0x1f0: size 3, in, string, rep.
        assert_eq!(
            vmx(30, 0x01f0_0000 | 0b11_1011),
            Exit::Io {
                port: 0x1f0,
                size: 4,
                write: false,
                string: true,
                rep: true
            }
        );
        // IN AX, 0x60 (immediate operand, bit 6).
        assert_eq!(
            vmx(30, 0x0060_0000 | 1 << 6 | 1 << 3 | 1),
            Exit::Io {
                port: 0x60,
                size: 2,
                write: false,
                string: false,
                rep: false
            }
        );
        // Size encoding 2 is reserved.
        assert_eq!(vmx(30, 2), Exit::Unknown { raw: 30 });
    }

    #[test]
    fn vmx_ept() {
        let exit = |q| {
            decode_vmx(&VmxExitInfo {
                reason: 48,
                qualification: q,
                guest_physical: 0xfee0_0030,
                ..VmxExitInfo::default()
            })
        };
        // Write to unmapped memory.
        assert_eq!(
            exit(0b10),
            Exit::NestedPageFault {
                gpa: 0xfee0_0030,
                read: false,
                write: true,
                fetch: false,
                mapped: false
            }
        );
        // Fetch from a readable, non-executable page.
        assert_eq!(
            exit(0b100 | 0b001 << 3 | 1 << 7 | 1 << 8),
            Exit::NestedPageFault {
                gpa: 0xfee0_0030,
                read: false,
                write: false,
                fetch: true,
                mapped: true
            }
        );
        let misconfig = decode_vmx(&VmxExitInfo {
            reason: 49,
            guest_physical: 0x1000,
            ..VmxExitInfo::default()
        });
        assert_eq!(misconfig, Exit::NestedMisconfig { gpa: 0x1000 });
    }

    #[test]
    fn vmx_simple_reasons() {
        let cases = [
            (2, Exit::Shutdown),
            (3, Exit::Init),
            (7, Exit::InterruptWindow),
            (8, Exit::NmiWindow),
            (9, Exit::TaskSwitch),
            (10, Exit::Cpuid),
            (12, Exit::Hlt),
            (13, Exit::Invd),
            (15, Exit::Rdpmc),
            (16, Exit::Rdtsc),
            (18, Exit::Hypercall),
            (19, Exit::VirtualizationInstruction),
            (27, Exit::VirtualizationInstruction),
            (50, Exit::VirtualizationInstruction),
            (53, Exit::VirtualizationInstruction),
            (59, Exit::VirtualizationInstruction),
            (31, Exit::Msr { write: false }),
            (32, Exit::Msr { write: true }),
            (36, Exit::Mwait),
            (39, Exit::Monitor),
            (40, Exit::Pause),
            (51, Exit::Rdtscp),
            (52, Exit::PreemptionTimer),
            (54, Exit::Wbinvd),
            (55, Exit::Xsetbv),
            (5, Exit::Unknown { raw: 5 }),
            (0xffff, Exit::Unknown { raw: 0xffff }),
        ];
        for (reason, exit) in cases {
            assert_eq!(vmx(reason, 0), exit, "reason {reason}");
        }
        assert_eq!(vmx(4, 0x9a), Exit::Sipi { vector: 0x9a });
        assert_eq!(
            vmx(14, 0xffff_8000_1234_5000),
            Exit::Invlpg {
                address: Some(0xffff_8000_1234_5000)
            }
        );
    }

    #[test]
    fn vmx_entry_failures() {
        let exit = |reason| {
            decode_vmx(&VmxExitInfo {
                reason,
                ..VmxExitInfo::default()
            })
        };
        assert_eq!(exit(0x8000_0021), Exit::InvalidGuestState);
        assert_eq!(exit(33), Exit::InvalidGuestState);
        assert_eq!(
            exit(0x8000_0022),
            Exit::EntryFailure {
                reason: 0x8000_0022
            }
        );
        assert_eq!(
            exit(0x8000_0029),
            Exit::EntryFailure {
                reason: 0x8000_0029
            }
        );
        // Bits above the basic reason (e.g. 29, pending MTF) are ignored.
        assert_eq!(exit(1 << 29 | 10), Exit::Cpuid);
    }

    #[test]
    fn vmx_events() {
        let exit = |info, error, q| {
            decode_vmx(&VmxExitInfo {
                reason: 0,
                qualification: q,
                interruption_info: info,
                interruption_error: error,
                ..VmxExitInfo::default()
            })
        };
        // #PF with error code: hardware exception, error code valid.
        assert_eq!(
            exit(0x8000_0b0e, 0x6, 0xdead_b000),
            Exit::Exception {
                vector: 14,
                error_code: Some(6),
                address: Some(0xdead_b000)
            }
        );
        // #BP from INT3: software exception, no error code.
        assert_eq!(
            exit(0x8000_0603, 0, 0),
            Exit::Exception {
                vector: 3,
                error_code: None,
                address: None
            }
        );
        assert_eq!(exit(0x8000_0202, 0, 0), Exit::Nmi);
        assert_eq!(exit(0x0000_0b0e, 0, 0), Exit::Unknown { raw: 0 });
        assert_eq!(exit(0x8000_0020, 0, 0), Exit::Unknown { raw: 0 });

        let interrupt = |info| {
            decode_vmx(&VmxExitInfo {
                reason: 1,
                interruption_info: info,
                ..VmxExitInfo::default()
            })
        };
        assert_eq!(
            interrupt(0x8000_0030),
            Exit::ExternalInterrupt { vector: Some(0x30) }
        );
        assert_eq!(interrupt(0), Exit::ExternalInterrupt { vector: None });
    }

    #[test]
    fn vmx_register_accesses() {
        // MOV CR3, RBX: cr 3, type 0, GPR 3.
        assert_eq!(
            vmx(28, 3 | 3 << 8),
            Exit::ControlRegister {
                cr: 3,
                access: CrAccess::Write { gpr: Some(3) }
            }
        );
        // MOV R15, CR8.
        assert_eq!(
            vmx(28, 8 | 1 << 4 | 15 << 8),
            Exit::ControlRegister {
                cr: 8,
                access: CrAccess::Read { gpr: Some(15) }
            }
        );
        assert_eq!(
            vmx(28, 2 << 4),
            Exit::ControlRegister {
                cr: 0,
                access: CrAccess::Clts
            }
        );
        assert_eq!(
            vmx(28, 3 << 4 | 0x0011 << 16),
            Exit::ControlRegister {
                cr: 0,
                access: CrAccess::Lmsw { source: 0x11 }
            }
        );
        // MOV RAX, DR6 and MOV DR7, RCX.
        assert_eq!(
            vmx(29, 6 | 1 << 4),
            Exit::DebugRegister {
                dr: 6,
                write: false,
                gpr: Some(0)
            }
        );
        assert_eq!(
            vmx(29, 7 | 1 << 8),
            Exit::DebugRegister {
                dr: 7,
                write: true,
                gpr: Some(1)
            }
        );
    }

    #[test]
    fn svm_io() {
        // OUT DX, AL to 0x3f8: type out, SZ8.
        assert_eq!(
            svm(0x7b, 0x03f8_0000 | 1 << 4, 0),
            Exit::Io {
                port: 0x3f8,
                size: 1,
                write: true,
                string: false,
                rep: false
            }
        );
        // REP INSW from 0x1f0 with 64-bit addresses (A64, bit 9).
        assert_eq!(
            svm(0x7b, 0x01f0_0000 | 1 << 9 | 1 << 5 | 1 << 3 | 1 << 2 | 1, 0),
            Exit::Io {
                port: 0x1f0,
                size: 2,
                write: false,
                string: true,
                rep: true
            }
        );
        assert!(matches!(svm(0x7b, 1 << 6, 0), Exit::Io { size: 4, .. }));
        // No size bit, or two of them: not decodable.
        assert_eq!(svm(0x7b, 0, 0), Exit::Unknown { raw: 0x7b });
        assert_eq!(svm(0x7b, 0b11 << 4, 0), Exit::Unknown { raw: 0x7b });
    }

    #[test]
    fn svm_npf() {
        // Read of an unmapped page: US (nested walks are user accesses) and
        // the final-translation bit 32.
        assert_eq!(
            svm(0x400, 1 << 32 | 1 << 2, 0xfee0_0000),
            Exit::NestedPageFault {
                gpa: 0xfee0_0000,
                read: true,
                write: false,
                fetch: false,
                mapped: false
            }
        );
        // Write to a read-only page.
        assert_eq!(
            svm(0x400, 1 << 32 | 0b111, 0x1000),
            Exit::NestedPageFault {
                gpa: 0x1000,
                read: false,
                write: true,
                fetch: false,
                mapped: true
            }
        );
        // Fetch from an NX page.
        assert!(matches!(
            svm(0x400, 1 << 32 | 1 << 4 | 0b101, 0x2000),
            Exit::NestedPageFault {
                fetch: true,
                read: false,
                mapped: true,
                ..
            }
        ));
        assert_eq!(
            svm(0x400, 1 << 3 | 1, 0x3000),
            Exit::NestedMisconfig { gpa: 0x3000 }
        );
    }

    #[test]
    fn svm_simple_codes() {
        let cases = [
            (0x60, Exit::ExternalInterrupt { vector: None }),
            (0x61, Exit::Nmi),
            (0x63, Exit::Init),
            (0x64, Exit::InterruptWindow),
            (0x6e, Exit::Rdtsc),
            (0x6f, Exit::Rdpmc),
            (0x72, Exit::Cpuid),
            (0x74, Exit::Iret),
            (0x76, Exit::Invd),
            (0x77, Exit::Pause),
            (0x78, Exit::Hlt),
            (0x79, Exit::Invlpg { address: None }),
            (0x7a, Exit::VirtualizationInstruction),
            (0x7d, Exit::TaskSwitch),
            (0x7f, Exit::Shutdown),
            (0x80, Exit::VirtualizationInstruction),
            (0x81, Exit::Hypercall),
            (0x86, Exit::VirtualizationInstruction),
            (0x87, Exit::Rdtscp),
            (0x89, Exit::Wbinvd),
            (0x8a, Exit::Monitor),
            (0x8b, Exit::Mwait),
            (0x8c, Exit::Mwait),
            (0x8d, Exit::Xsetbv),
            (0x62, Exit::Unknown { raw: 0x62 }),
            (0x401, Exit::Unknown { raw: 0x401 }),
            (u64::MAX, Exit::InvalidGuestState),
            (0xffff_ffff, Exit::InvalidGuestState),
            (
                u64::MAX - 1,
                Exit::EntryFailure {
                    reason: u64::MAX - 1,
                },
            ),
            (
                0xffff_fffe,
                Exit::EntryFailure {
                    reason: 0xffff_fffe,
                },
            ),
        ];
        for (code, exit) in cases {
            assert_eq!(svm(code, 0, 0), exit, "exitcode {code:#x}");
        }
        assert_eq!(svm(0x7c, 0, 0), Exit::Msr { write: false });
        assert_eq!(svm(0x7c, 1, 0), Exit::Msr { write: true });
        assert_eq!(svm(0x7c, 2, 0), Exit::Unknown { raw: 0x7c });
    }

    #[test]
    fn svm_exceptions_and_registers() {
        // #GP(0x10) and #PF at CR2 0x1000 with error code 2.
        assert_eq!(
            svm(0x4d, 0x10, 0),
            Exit::Exception {
                vector: 13,
                error_code: Some(0x10),
                address: None
            }
        );
        assert_eq!(
            svm(0x4e, 2, 0x1000),
            Exit::Exception {
                vector: 14,
                error_code: Some(2),
                address: Some(0x1000)
            }
        );
        assert_eq!(
            svm(0x46, 0xdead, 0),
            Exit::Exception {
                vector: 6,
                error_code: None,
                address: None
            }
        );
        assert!(matches!(
            svm(0x5f, 0, 0),
            Exit::Exception { vector: 31, .. }
        ));
        // MOV CR4, RDX with decode assists; CR8 read without.
        assert_eq!(
            svm(0x14, 1 << 63 | 2, 0),
            Exit::ControlRegister {
                cr: 4,
                access: CrAccess::Write { gpr: Some(2) }
            }
        );
        assert_eq!(
            svm(0x08, 0, 0),
            Exit::ControlRegister {
                cr: 8,
                access: CrAccess::Read { gpr: None }
            }
        );
        assert_eq!(
            svm(0x65, 0, 0),
            Exit::ControlRegister {
                cr: 0,
                access: CrAccess::Write { gpr: None }
            }
        );
        assert_eq!(
            svm(0x37, 0, 0),
            Exit::DebugRegister {
                dr: 7,
                write: true,
                gpr: None
            }
        );
        assert_eq!(
            svm(0x26, 0, 0),
            Exit::DebugRegister {
                dr: 6,
                write: false,
                gpr: None
            }
        );
    }

    /// xorshift64: deterministic pseudo-random values for the sweep.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_raw_values_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..200_000 {
            // Half the reasons near the defined ones, half anywhere.
            let small = i % 2 == 0;
            let reason = rng.next() as u32;
            let reason = if small { reason % 80 } else { reason };
            let vmx_exit = decode_vmx(&VmxExitInfo {
                reason,
                qualification: rng.next(),
                guest_physical: rng.next(),
                interruption_info: rng.next() as u32,
                interruption_error: rng.next() as u32,
            });
            if let Exit::Io { size, .. } = vmx_exit {
                assert!(matches!(size, 1 | 2 | 4));
            }
            let code = rng.next();
            let code = if small { code % 0x410 } else { code };
            let svm_exit = decode_svm(&SvmExitInfo {
                exitcode: code,
                exitinfo1: rng.next(),
                exitinfo2: rng.next(),
            });
            if let Exit::Exception { vector, .. } = svm_exit {
                assert!(vector < 32);
            }
        }
    }
}
