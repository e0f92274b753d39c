//! The VMX backend's decisions that need no hardware: which controls to ask
//! the CPU for, guest CR0/CR4 under the VMX fixed bits, EFER.LMA, the
//! preemption-timer count, the ABI's events in the VMX format and the
//! interruptibility fix-ups the SDM asks of the VMM.
//!
//! References: SDM Vol. 3C, 25.6 "VM-Execution Control Fields" ff., 26.3.1
//! "Checks on the Guest State Area", 26.6.3 (event injection), 27.2.3
//! "Information About NMI Unblocking Due to IRET", Vol. 3D, A.6–A.8 (fixed
//! CR bits, IA32_VMX_MISC, EPT/VPID capabilities).

use moat_abi::vcpu::{group, DescriptorTable, Segment, VcpuState};

use super::event::Event;
use super::vmcs::{
    adjust_controls, msr, ControlError, EntryControls, ExitControls, Interruptibility, PinControls,
    PrimaryControls, SecondaryControls,
};

/// The VMX capability MSRs the controls are chosen from, as read from the
/// CPU. The TRUE ones are read only if `basic` reports them (else 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCapabilities {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub procbased2: u64,
    pub exit: u64,
    pub entry: u64,
    pub true_pinbased: u64,
    pub true_procbased: u64,
    pub true_exit: u64,
    pub true_entry: u64,
    pub misc: u64,
    pub ept_vpid: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

/// IA32_VMX_EPT_VPID_CAP bits (SDM Vol. 3D, A.10).
mod ept_vpid_cap {
    pub const INVEPT: u64 = 1 << 20;
    pub const INVEPT_SINGLE_CONTEXT: u64 = 1 << 25;
    pub const INVEPT_ALL_CONTEXT: u64 = 1 << 26;
    pub const INVVPID: u64 = 1 << 32;
    pub const INVVPID_SINGLE_CONTEXT: u64 = 1 << 41;
    pub const INVVPID_ALL_CONTEXT: u64 = 1 << 42;
}

/// IA32_VMX_MISC bits (SDM Vol. 3D, A.6).
mod vmx_misc {
    /// Bits 4:0: the preemption timer counts down once every 2^X TSC ticks.
    pub const TIMER_RATE_MASK: u64 = 0x1f;
    /// Bit 6: the HLT activity state is supported.
    pub const ACTIVITY_HLT: u64 = 1 << 6;
}

const CR0_PE: u64 = 1 << 0;
const CR0_PG: u64 = 1 << 31;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How a TLB invalidation is done on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidateScope {
    /// Only the one EPTP / VPID.
    SingleContext,
    /// Everything (the CPU cannot do single-context).
    AllContext,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    Controls(ControlError),
    /// EPT without INVEPT, or VPIDs without INVVPID.
    NoInvalidation,
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Controls(error) => error.fmt(f),
            Self::NoInvalidation => {
                f.write_str("the CPU has EPT/VPID but no single- or all-context INVEPT/INVVPID")
            }
        }
    }
}

impl From<ControlError> for SetupError {
    fn from(error: ControlError) -> Self {
        Self::Controls(error)
    }
}

/// What a vCPU's VMCS is set up with, chosen once from the capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxSetup {
    pub pin: PinControls,
    /// Without the window-exiting bits, which follow `exit_on`.
    pub primary: PrimaryControls,
    pub secondary: SecondaryControls,
    pub exit: ExitControls,
    /// Without IA-32e mode guest, which follows the guest's EFER.LMA.
    pub entry: EntryControls,
    pub cr0: FixedBits,
    pub cr4: FixedBits,
    pub invept: InvalidateScope,
    pub invvpid: InvalidateScope,
    /// IA32_VMX_MISC bits 4:0.
    pub timer_rate: u32,
    pub activity_hlt: bool,
}

impl VmxSetup {
    pub fn preemption_timer(&self) -> bool {
        self.pin.contains(PinControls::PREEMPTION_TIMER)
    }

    pub fn pat(&self) -> bool {
        self.entry.contains(EntryControls::LOAD_PAT)
    }
}

/// `required | (optional & allowed)`, adjusted to what `capability` forces.
fn choose(required: u32, optional: u32, capability: u64) -> Result<u32, ControlError> {
    let allowed = (capability >> 32) as u32;
    adjust_controls(required | (optional & allowed), capability)
}

fn allows(capability: u64, bits: u32) -> bool {
    (capability >> 32) as u32 & bits == bits
}

/// The controls of every vCPU: host interrupts, NMIs and the preemption
/// timer exit; HLT, every port and every MSR exit; EPT with VPIDs and
/// unrestricted guests; EFER (and PAT when possible) switched by the CPU.
/// Exceptions never exit (the guest handles its own).
pub fn setup(caps: &VmxCapabilities) -> Result<VmxSetup, SetupError> {
    let true_controls = caps.basic & msr::BASIC_TRUE_CONTROLS != 0;
    let pick = |plain: u64, tru: u64| if true_controls { tru } else { plain };
    let pin_cap = pick(caps.pinbased, caps.true_pinbased);
    let primary_cap = pick(caps.procbased, caps.true_procbased);
    let exit_cap = pick(caps.exit, caps.true_exit);
    let entry_cap = pick(caps.entry, caps.true_entry);

    let pin = choose(
        (PinControls::EXTERNAL_INTERRUPT_EXITING
            | PinControls::NMI_EXITING
            | PinControls::VIRTUAL_NMIS)
            .bits(),
        PinControls::PREEMPTION_TIMER.bits(),
        pin_cap,
    )?;
    // A guest's MOV to CR8 must never set the host's task priority: with a
    // TPR shadow it goes to the vCPU's virtual-APIC page, without one it
    // exits.
    let cr8 = if allows(primary_cap, PrimaryControls::USE_TPR_SHADOW.bits()) {
        PrimaryControls::USE_TPR_SHADOW
    } else {
        PrimaryControls::CR8_LOAD_EXITING | PrimaryControls::CR8_STORE_EXITING
    };
    // MONITOR and MWAIT exit (not offered to guests: the VMM answers #UD);
    // RDTSCP raises #UD in the guest by itself, "enable RDTSCP" being off.
    let primary = choose(
        (PrimaryControls::HLT_EXITING
            | PrimaryControls::MWAIT_EXITING
            | PrimaryControls::MONITOR_EXITING
            | PrimaryControls::USE_IO_BITMAPS
            | PrimaryControls::USE_MSR_BITMAPS
            | PrimaryControls::ACTIVATE_SECONDARY_CONTROLS
            | cr8
            | PrimaryControls::USE_TSC_OFFSETTING)
            .bits(),
        0,
        primary_cap,
    )?;
    let windows = PrimaryControls::INTERRUPT_WINDOW_EXITING | PrimaryControls::NMI_WINDOW_EXITING;
    if !allows(primary_cap, windows.bits()) {
        return Err(ControlError::Unsupported {
            bits: windows.bits() & !((primary_cap >> 32) as u32),
        }
        .into());
    }
    let secondary = choose(
        (SecondaryControls::ENABLE_EPT
            | SecondaryControls::ENABLE_VPID
            | SecondaryControls::UNRESTRICTED_GUEST)
            .bits(),
        0,
        caps.procbased2,
    )?;
    let pin = PinControls::from_bits_retain(pin);
    let mut optional_exit = (ExitControls::SAVE_PAT | ExitControls::LOAD_PAT).bits();
    let mut optional_entry = EntryControls::LOAD_PAT.bits();
    if !allows(exit_cap, optional_exit) || !allows(entry_cap, optional_entry) {
        optional_exit = 0;
        optional_entry = 0;
    }
    if pin.contains(PinControls::PREEMPTION_TIMER) {
        optional_exit |= ExitControls::SAVE_PREEMPTION_TIMER.bits();
    }
    let exit = choose(
        (ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::SAVE_DEBUG_CONTROLS
            | ExitControls::SAVE_EFER
            | ExitControls::LOAD_EFER)
            .bits(),
        optional_exit,
        exit_cap,
    )?;
    // IA-32e mode guest is chosen per entry; check now that it may be 1.
    let entry = choose(
        (EntryControls::LOAD_DEBUG_CONTROLS | EntryControls::LOAD_EFER).bits(),
        optional_entry,
        entry_cap,
    )?;
    adjust_controls(entry | EntryControls::IA32E_MODE_GUEST.bits(), entry_cap)?;

    let scope = |single: u64, all: u64| {
        if caps.ept_vpid & single != 0 {
            Some(InvalidateScope::SingleContext)
        } else if caps.ept_vpid & all != 0 {
            Some(InvalidateScope::AllContext)
        } else {
            None
        }
    };
    use ept_vpid_cap as e;
    let invept = scope(e::INVEPT_SINGLE_CONTEXT, e::INVEPT_ALL_CONTEXT)
        .filter(|_| caps.ept_vpid & e::INVEPT != 0)
        .ok_or(SetupError::NoInvalidation)?;
    let invvpid = scope(e::INVVPID_SINGLE_CONTEXT, e::INVVPID_ALL_CONTEXT)
        .filter(|_| caps.ept_vpid & e::INVVPID != 0)
        .ok_or(SetupError::NoInvalidation)?;

    let entry = EntryControls::from_bits_retain(entry);
    Ok(VmxSetup {
        pin,
        primary: PrimaryControls::from_bits_retain(primary),
        secondary: SecondaryControls::from_bits_retain(secondary),
        exit: ExitControls::from_bits_retain(exit),
        entry: entry - EntryControls::IA32E_MODE_GUEST,
        cr0: FixedBits::cr0(caps.cr0_fixed0, caps.cr0_fixed1, true),
        cr4: FixedBits::new(caps.cr4_fixed0, caps.cr4_fixed1),
        invept,
        invvpid,
        timer_rate: (caps.misc & vmx_misc::TIMER_RATE_MASK) as u32,
        activity_hlt: caps.misc & vmx_misc::ACTIVITY_HLT != 0,
    })
}

/// The bits of CR0 or CR4 that VMX operation forces (IA32_VMX_CRx_FIXED0:
/// 1 = must be 1; FIXED1: 0 = must be 0). The host owns the forced-1 bits
/// through the guest/host mask, so the guest reads its own value from the
/// read shadow; a guest write that changes one exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedBits {
    pub fixed0: u64,
    pub fixed1: u64,
}

impl FixedBits {
    pub const fn new(fixed0: u64, fixed1: u64) -> Self {
        Self { fixed0, fixed1 }
    }

    /// CR0; with unrestricted guests PE and PG are the guest's own
    /// (26.3.1.1), so real mode and unpaged protected mode run natively.
    pub const fn cr0(fixed0: u64, fixed1: u64, unrestricted: bool) -> Self {
        let fixed0 = if unrestricted {
            fixed0 & !(CR0_PE | CR0_PG)
        } else {
            fixed0
        };
        Self { fixed0, fixed1 }
    }

    /// The guest/host mask: the bits the host forces to 1. (Bits the CPU
    /// forces to 0 are reserved ones a guest write faults on natively.)
    pub const fn mask(self) -> u64 {
        self.fixed0
    }

    /// The value the CPU runs the guest with when it asked for `value`.
    pub const fn actual(self, value: u64) -> u64 {
        (value | self.fixed0) & self.fixed1
    }

    /// What the guest sees: its own bits from the register, the host's from
    /// the read shadow.
    pub const fn visible(self, actual: u64, shadow: u64) -> u64 {
        let mask = self.mask();
        (actual & !mask) | (shadow & mask)
    }
}

const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;

/// Whether MOV to CR0 of `value` raises #GP (SDM Vol. 2B, "MOV—Move
/// to/from Control Registers"): high bits, PG without PE, NW without CD,
/// paging on in long mode without PAE, paging off from 64-bit code or with
/// PCIDE. `cs_long`: the guest runs 64-bit code.
pub const fn cr0_write_faults(value: u64, cr4: u64, efer: u64, cs_long: bool) -> bool {
    let pg = value & CR0_PG != 0;
    value >> 32 != 0
        || (pg && value & CR0_PE == 0)
        || (value & CR0_NW != 0 && value & CR0_CD == 0)
        || (pg && efer & EFER_LME != 0 && cr4 & CR4_PAE == 0)
        || (!pg && (cs_long || cr4 & CR4_PCIDE != 0))
}

/// Whether MOV to CR4 of `value` raises #GP: bits the CPU does not allow
/// (FIXED1 clear), bits the host keeps (`host_owned`, e.g. VMXE: a guest
/// sees no VMX), PAE off in long mode.
pub const fn cr4_write_faults(value: u64, fixed: FixedBits, host_owned: u64, efer: u64) -> bool {
    value & !fixed.fixed1 != 0
        || value & host_owned != 0
        || (efer & EFER_LMA != 0 && value & CR4_PAE == 0)
}

/// EFER as VM entry wants it: LMA = LME && CR0.PG (26.3.1.1), whatever the
/// VMM wrote there.
pub const fn entry_efer(efer: u64, cr0: u64) -> u64 {
    if efer & EFER_LME != 0 && cr0 & CR0_PG != 0 {
        efer | EFER_LMA
    } else {
        efer & !EFER_LMA
    }
}

/// The "IA-32e mode guest" entry control must equal EFER.LMA.
pub const fn ia32e_mode(efer: u64) -> bool {
    efer & EFER_LMA != 0
}

/// Timer ticks for `period_tsc` TSC ticks when the timer counts once every
/// 2^`rate` TSC ticks; at least 1 (0 would exit before the first
/// instruction).
pub fn preemption_timer_value(period_tsc: u64, rate: u32) -> u32 {
    (period_tsc >> rate.min(63)).clamp(1, u64::from(u32::MAX)) as u32
}

/// The guest's privilege level: SS.DPL (26.3.1.2 ties it to the CPL).
pub const fn cpl(ss_access_rights: u32) -> u8 {
    ((ss_access_rights >> 5) & 3) as u8
}

/// The event as VM entry accepts it for a guest with CR0.PE = `protected`:
/// no error code in real mode (26.2.1.3).
pub fn entry_event(event: Event, protected: bool) -> Event {
    Event {
        error_code: event.error_code.filter(|_| protected),
        ..event
    }
}

/// Longest x86 instruction.
const MAX_INSTRUCTION_LENGTH: u64 = 15;
/// `INT n` (CD ib).
const INT_N_LENGTH: u32 = 2;

/// VM-entry instruction length for a software interrupt the VMM injects:
/// the length of the instruction the last exit reported (right when the
/// VMM re-injects an interrupted INT n), else that of `INT n`.
pub fn software_interrupt_length(last_exit_length: u64) -> u32 {
    if (1..=MAX_INSTRUCTION_LENGTH).contains(&last_exit_length) {
        last_exit_length as u32
    } else {
        INT_N_LENGTH
    }
}

/// Interruption information: valid 31, error code 11, type 10:8, vector
/// 7:0; bit 12 of the IDT-vectoring field is undefined and must not go
/// into the entry field (26.2.1.3: bits 30:12 reserved).
const INTERRUPTION_INFO_BITS: u32 = (1 << 31) | (1 << 11) | (0b111 << 8) | 0xff;
const INTERRUPTION_VALID: u32 = 1 << 31;
/// Exit interruption information / EPT-violation qualification bit 12.
const NMI_UNBLOCKED_BY_IRET: u64 = 1 << 12;
const DOUBLE_FAULT: u32 = 8;
const VECTOR_MASK: u32 = 0xff;

/// The VM-entry interruption information that re-delivers the event an
/// exit interrupted (27.2.4), if one was.
pub const fn reinjection(idt_vectoring_info: u32) -> Option<u32> {
    if idt_vectoring_info & INTERRUPTION_VALID == 0 {
        None
    } else {
        Some(idt_vectoring_info & INTERRUPTION_INFO_BITS)
    }
}

/// Whether the guest executed an IRET that unblocked NMIs and then faulted
/// into an exit: with virtual NMIs the VMM must set blocking by NMI again
/// before resuming the IRET (27.2.3). Reported for EPT violations (in the
/// qualification) and exception exits (in the exit interruption info),
/// never if the exit interrupted an event delivery.
pub const fn nmi_unblocked_by_iret(
    basic_reason: u16,
    qualification: u64,
    exit_interruption_info: u32,
    idt_vectoring_info: u32,
) -> bool {
    use super::exit::vmx_reason as r;
    if idt_vectoring_info & INTERRUPTION_VALID != 0 {
        return false;
    }
    match basic_reason {
        r::EPT_VIOLATION => qualification & NMI_UNBLOCKED_BY_IRET != 0,
        r::EXCEPTION_OR_NMI => {
            exit_interruption_info & INTERRUPTION_VALID != 0
                && exit_interruption_info & VECTOR_MASK != DOUBLE_FAULT
                && exit_interruption_info as u64 & NMI_UNBLOCKED_BY_IRET != 0
        }
        _ => false,
    }
}

/// Interruptibility for the next entry when the VMM did not set it: if it
/// moved RIP (emulated or skipped the instruction), the STI / MOV SS
/// shadow belonged to that instruction and is over — as the CPU would have
/// it, and as VM entry requires before an external interrupt is injected
/// (26.3.1.5).
pub const fn interruptibility_after(current: u32, rip_moved: bool) -> u32 {
    if rip_moved {
        current
            & !(Interruptibility::BLOCKING_BY_STI.bits()
                | Interruptibility::BLOCKING_BY_MOV_SS.bits())
    } else {
        current
    }
}

const RESET_CR0: u64 = 0x6000_0010;
const RESET_RIP: u64 = 0xfff0;
const RESET_CS_SELECTOR: u16 = 0xf000;
const RESET_CS_BASE: u64 = 0xffff_0000;
const REAL_MODE_LIMIT: u32 = 0xffff;
/// Present, S, type 11 (code, read, accessed).
const RESET_CODE_ACCESS: u32 = 0x9b;
/// Present, S, type 3 (data, write, accessed).
const RESET_DATA_ACCESS: u32 = 0x93;
/// Present, type 2 (LDT).
const RESET_LDTR_ACCESS: u32 = 0x82;
/// Present, type 11 (busy 32-bit TSS).
const RESET_TR_ACCESS: u32 = 0x8b;
const RFLAGS_RESERVED_ONE: u64 = 1 << 1;
const RESET_DR7: u64 = 0x400;
/// The power-on PAT.
const RESET_PAT: u64 = 0x0007_0406_0007_0406;

/// The power-on state (SDM Vol. 3A, Table "IA-32 and Intel 64 Processor
/// States Following Power-up, Reset, or INIT"), every group dirty: what a
/// new VMCS holds until the VMM sets its own.
pub fn reset_state() -> VcpuState {
    let data = Segment {
        limit: REAL_MODE_LIMIT,
        access: RESET_DATA_ACCESS,
        ..Segment::default()
    };
    let table = DescriptorTable {
        limit: REAL_MODE_LIMIT.into(),
        base: 0,
    };
    VcpuState {
        dirty: group::ALL & !group::INJECT,
        rip: RESET_RIP,
        rflags: RFLAGS_RESERVED_ONE,
        cr0: RESET_CR0,
        cs: Segment {
            selector: RESET_CS_SELECTOR,
            base: RESET_CS_BASE,
            limit: REAL_MODE_LIMIT,
            access: RESET_CODE_ACCESS,
            ..Segment::default()
        },
        ss: data,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ldtr: Segment {
            limit: REAL_MODE_LIMIT,
            access: RESET_LDTR_ACCESS,
            ..Segment::default()
        },
        tr: Segment {
            limit: REAL_MODE_LIMIT,
            access: RESET_TR_ACCESS,
            ..Segment::default()
        },
        gdtr: table,
        idtr: table,
        pat: RESET_PAT,
        dr7: RESET_DR7,
        ..VcpuState::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::event::EventKind;
    use super::super::exit::vmx_reason;
    use super::*;

    /// A CPU that allows everything and forces the usual default-1 bits.
    fn caps() -> VmxCapabilities {
        let all = 0xffff_ffff_0000_0000;
        VmxCapabilities {
            basic: msr::BASIC_TRUE_CONTROLS,
            pinbased: all | 0x16,
            procbased: all | 0x0401_e172,
            procbased2: all,
            exit: all | 0x0003_6dff,
            entry: all | 0x0000_11ff,
            true_pinbased: all | 0x16,
            true_procbased: all | 0x0400_6172,
            true_exit: all | 0x0003_6dfb,
            true_entry: all | 0x0000_11fb,
            misc: 5 | vmx_misc::ACTIVITY_HLT,
            ept_vpid: ept_vpid_cap::INVEPT
                | ept_vpid_cap::INVEPT_SINGLE_CONTEXT
                | ept_vpid_cap::INVEPT_ALL_CONTEXT
                | ept_vpid_cap::INVVPID
                | ept_vpid_cap::INVVPID_ALL_CONTEXT,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x003f_ffff,
        }
    }

    #[test]
    fn controls_use_the_true_msrs() {
        let s = setup(&caps()).unwrap();
        assert!(s.pin.contains(
            PinControls::EXTERNAL_INTERRUPT_EXITING
                | PinControls::NMI_EXITING
                | PinControls::VIRTUAL_NMIS
                | PinControls::PREEMPTION_TIMER
        ));
        // Default-1 CR3-load/store exiting is 1 in the plain MSR, 0 in TRUE.
        assert!(!s.primary.contains(PrimaryControls::CR3_LOAD_EXITING));
        assert!(s.primary.contains(
            PrimaryControls::HLT_EXITING
                | PrimaryControls::USE_IO_BITMAPS
                | PrimaryControls::USE_MSR_BITMAPS
                | PrimaryControls::ACTIVATE_SECONDARY_CONTROLS
                | PrimaryControls::USE_TPR_SHADOW
        ));
        assert!(!s
            .primary
            .intersects(PrimaryControls::CR8_LOAD_EXITING | PrimaryControls::CR8_STORE_EXITING));
        assert!(!s
            .primary
            .intersects(PrimaryControls::INTERRUPT_WINDOW_EXITING));
        assert_eq!(
            s.secondary,
            SecondaryControls::ENABLE_EPT
                | SecondaryControls::ENABLE_VPID
                | SecondaryControls::UNRESTRICTED_GUEST
        );
        assert!(s.exit.contains(
            ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_EFER
                | ExitControls::LOAD_EFER
                | ExitControls::SAVE_PAT
                | ExitControls::LOAD_PAT
                | ExitControls::SAVE_PREEMPTION_TIMER
        ));
        assert!(s
            .entry
            .contains(EntryControls::LOAD_EFER | EntryControls::LOAD_PAT));
        assert!(!s.entry.contains(EntryControls::IA32E_MODE_GUEST));
        assert_eq!(s.invept, InvalidateScope::SingleContext);
        assert_eq!(s.invvpid, InvalidateScope::AllContext);
        assert_eq!(s.timer_rate, 5);
        assert!(s.activity_hlt);
        assert!(s.pat() && s.preemption_timer());
    }

    #[test]
    fn control_register_writes_that_fault() {
        let (pe, pg, cd, nw, pae) = (CR0_PE, CR0_PG, CR0_CD, CR0_NW, CR4_PAE);
        // Linux's real-mode reboot path: caches off, paging off.
        assert!(!cr0_write_faults(cd | nw | 0x10 | pe, 0, 0, false));
        assert!(!cr0_write_faults(pg | pe | 0x20, pae, EFER_LME, true));
        assert!(cr0_write_faults(pg, 0, 0, false), "PG without PE");
        assert!(cr0_write_faults(nw | pe, 0, 0, false), "NW without CD");
        assert!(cr0_write_faults(1 << 32 | pe, 0, 0, false));
        assert!(
            cr0_write_faults(pg | pe, 0, EFER_LME, false),
            "long mode without PAE"
        );
        assert!(
            cr0_write_faults(pe, pae, EFER_LME | EFER_LMA, true),
            "paging off in 64-bit code"
        );
        assert!(cr0_write_faults(pe, CR4_PCIDE, 0, false));

        let fixed = FixedBits::new(0x2000, 0x003f_ffff);
        assert!(!cr4_write_faults(pae | 0x80, fixed, 0x2000, 0));
        assert!(
            cr4_write_faults(0x2000, fixed, 0x2000, 0),
            "VMXE is the host's"
        );
        assert!(
            cr4_write_faults(1 << 30, fixed, 0x2000, 0),
            "not allowed by FIXED1"
        );
        assert!(
            cr4_write_faults(0x80, fixed, 0x2000, EFER_LMA),
            "PAE off in long mode"
        );
    }

    #[test]
    fn without_a_tpr_shadow_cr8_exits() {
        let mut c = caps();
        c.true_procbased &= !(u64::from(PrimaryControls::USE_TPR_SHADOW.bits()) << 32);
        let s = setup(&c).unwrap();
        assert!(!s.primary.contains(PrimaryControls::USE_TPR_SHADOW));
        assert!(s
            .primary
            .contains(PrimaryControls::CR8_LOAD_EXITING | PrimaryControls::CR8_STORE_EXITING));
    }

    #[test]
    fn without_true_msrs_the_default_ones_stay() {
        let mut c = caps();
        c.basic = 0;
        let s = setup(&c).unwrap();
        assert!(s.primary.contains(PrimaryControls::CR3_LOAD_EXITING));
    }

    #[test]
    fn optional_controls_are_left_out_and_required_ones_fail() {
        let mut c = caps();
        // No preemption timer, no PAT switching.
        c.true_pinbased &= !(u64::from(PinControls::PREEMPTION_TIMER.bits()) << 32);
        c.true_entry &= !(u64::from(EntryControls::LOAD_PAT.bits()) << 32);
        let s = setup(&c).unwrap();
        assert!(!s.preemption_timer() && !s.pat());
        assert!(!s
            .exit
            .intersects(ExitControls::SAVE_PREEMPTION_TIMER | ExitControls::LOAD_PAT));

        let mut c = caps();
        c.procbased2 &= !(u64::from(SecondaryControls::UNRESTRICTED_GUEST.bits()) << 32);
        assert!(matches!(
            setup(&c),
            Err(SetupError::Controls(ControlError::Unsupported { .. }))
        ));

        let mut c = caps();
        c.ept_vpid &= !ept_vpid_cap::INVVPID;
        assert_eq!(setup(&c), Err(SetupError::NoInvalidation));
    }

    #[test]
    fn real_mode_cr0_under_unrestricted_guest() {
        let cr0 = FixedBits::cr0(0x8000_0021, 0xffff_ffff, true);
        // Only NE is forced: a real-mode guest keeps PE = PG = 0.
        assert_eq!(cr0.mask(), 0x20);
        let actual = cr0.actual(RESET_CR0);
        assert_eq!(actual, 0x6000_0030);
        assert_eq!(cr0.visible(actual, RESET_CR0), RESET_CR0);
        // The guest turned on PE itself: it sees PE and its shadowed NE = 0.
        assert_eq!(cr0.visible(actual | 1, RESET_CR0), RESET_CR0 | 1);
        let restricted = FixedBits::cr0(0x8000_0021, 0xffff_ffff, false);
        assert_eq!(restricted.actual(0), 0x8000_0021);
    }

    #[test]
    fn cr4_hides_vmxe_and_drops_unsupported_bits() {
        let cr4 = FixedBits::new(0x2000, 0x003f_ffff);
        assert_eq!(cr4.actual(0x20), 0x2020);
        assert_eq!(cr4.actual(1 << 23), 0x2000);
        assert_eq!(cr4.visible(0x2020, 0x20), 0x20);
    }

    #[test]
    fn lma_follows_lme_and_paging() {
        assert_eq!(entry_efer(EFER_LME, CR0_PG | CR0_PE), EFER_LME | EFER_LMA);
        assert_eq!(entry_efer(EFER_LME | EFER_LMA, CR0_PE), EFER_LME);
        assert_eq!(entry_efer(EFER_LMA, CR0_PG | CR0_PE), 0);
        assert!(ia32e_mode(EFER_LME | EFER_LMA));
        assert!(!ia32e_mode(EFER_LME));
    }

    #[test]
    fn timer_value() {
        assert_eq!(preemption_timer_value(10_000_000, 5), 312_500);
        assert_eq!(preemption_timer_value(3, 5), 1);
        assert_eq!(preemption_timer_value(u64::MAX, 0), u32::MAX);
    }

    #[test]
    fn cpl_from_ss() {
        assert_eq!(cpl(0x93), 0);
        assert_eq!(cpl(0xf3), 3);
        assert_eq!(cpl(0xc093 | (1 << 5)), 1);
    }

    #[test]
    fn real_mode_events_carry_no_error_code() {
        let gp = Event {
            vector: 13,
            kind: EventKind::HardwareException,
            error_code: Some(0),
        };
        assert_eq!(entry_event(gp, false).error_code, None);
        assert_eq!(entry_event(gp, true).error_code, Some(0));
    }

    #[test]
    fn software_interrupt_lengths() {
        assert_eq!(software_interrupt_length(3), 3);
        assert_eq!(software_interrupt_length(0), 2);
        assert_eq!(software_interrupt_length(16), 2);
    }

    #[test]
    fn reinjection_drops_undefined_bits() {
        assert_eq!(reinjection(0x0000_0b0e), None);
        assert_eq!(reinjection(0x8000_1b0e), Some(0x8000_0b0e));
        assert_eq!(reinjection(0x8000_0020), Some(0x8000_0020));
    }

    #[test]
    fn nmi_unblocking() {
        let ept = vmx_reason::EPT_VIOLATION;
        assert!(nmi_unblocked_by_iret(ept, 1 << 12, 0, 0));
        assert!(!nmi_unblocked_by_iret(ept, 1 << 12, 0, 0x8000_0202));
        assert!(!nmi_unblocked_by_iret(ept, 0x2, 0, 0));
        let exc = vmx_reason::EXCEPTION_OR_NMI;
        assert!(nmi_unblocked_by_iret(exc, 0, 0x8000_1b0e, 0));
        assert!(!nmi_unblocked_by_iret(exc, 0, 0x8000_1b08, 0), "#DF");
        assert!(!nmi_unblocked_by_iret(vmx_reason::CPUID, 1 << 12, 0, 0));
    }

    #[test]
    fn moving_rip_ends_the_interrupt_shadow() {
        let sti_nmi =
            (Interruptibility::BLOCKING_BY_STI | Interruptibility::BLOCKING_BY_NMI).bits();
        assert_eq!(
            interruptibility_after(sti_nmi, true),
            Interruptibility::BLOCKING_BY_NMI.bits()
        );
        assert_eq!(interruptibility_after(sti_nmi, false), sti_nmi);
    }

    #[test]
    fn reset_state_is_real_mode_at_the_reset_vector() {
        let s = reset_state();
        assert_eq!(s.cs.base + s.rip, 0xffff_fff0);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), 0);
        assert_eq!(s.rflags, 2);
        assert_eq!(s.dirty & group::INJECT, 0);
        assert_eq!(s.dirty | group::INJECT, group::ALL);
        assert_eq!(cpl(s.ss.access), 0);
    }
}
