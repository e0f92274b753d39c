//! The VMCS: field encodings, control bits and their adjustment to what the
//! CPU allows.
//!
//! Encodings from the SDM Vol. 3D, Appendix B "Field Encoding in VMCS"; the
//! layout of an encoding from Vol. 3C, 25.11.2 "VMREAD, VMWRITE, and
//! Encodings of VMCS Fields" (Table "Structure of VMCS Component Encoding").

use core::fmt;

use bitflags::bitflags;

use super::SegmentRegister;

/// Width of a VMCS field, encoding bits 14:13.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    Bits16,
    Bits64,
    Bits32,
    /// 64 bits on a CPU supporting Intel 64.
    Natural,
}

/// Kind of a VMCS field, encoding bits 11:10.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    Control,
    /// VM-exit information: read-only.
    ExitInformation,
    GuestState,
    HostState,
}

const WIDTH_SHIFT: u32 = 13;
const TYPE_SHIFT: u32 = 10;
const TWO_BITS: u32 = 0b11;

macro_rules! vmcs_fields {
    ($($(#[$doc:meta])* $name:ident = $encoding:literal,)*) => {
        /// A VMCS field, with its encoding as the discriminant.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum VmcsField {
            $($(#[$doc])* $name = $encoding,)*
        }

        impl VmcsField {
            /// Every field the kernel uses.
            pub const ALL: &'static [Self] = &[$(Self::$name,)*];

            /// The field with `encoding`, if the kernel knows it.
            pub const fn from_encoding(encoding: u32) -> Option<Self> {
                match encoding {
                    $($encoding => Some(Self::$name),)*
                    _ => None,
                }
            }
        }
    };
}

vmcs_fields! {
    // 16-bit control (B.1.1).
    Vpid = 0x0000,

    // 16-bit guest state (B.1.2).
    GuestEsSelector = 0x0800,
    GuestCsSelector = 0x0802,
    GuestSsSelector = 0x0804,
    GuestDsSelector = 0x0806,
    GuestFsSelector = 0x0808,
    GuestGsSelector = 0x080a,
    GuestLdtrSelector = 0x080c,
    GuestTrSelector = 0x080e,

    // 16-bit host state (B.1.3).
    HostEsSelector = 0x0c00,
    HostCsSelector = 0x0c02,
    HostSsSelector = 0x0c04,
    HostDsSelector = 0x0c06,
    HostFsSelector = 0x0c08,
    HostGsSelector = 0x0c0a,
    HostTrSelector = 0x0c0c,

    // 64-bit control (B.2.1), full access.
    IoBitmapA = 0x2000,
    IoBitmapB = 0x2002,
    MsrBitmap = 0x2004,
    TscOffset = 0x2010,
    VirtualApicPage = 0x2012,
    EptPointer = 0x201a,

    // 64-bit read-only data (B.2.2).
    GuestPhysicalAddress = 0x2400,

    // 64-bit guest state (B.2.3).
    VmcsLinkPointer = 0x2800,
    GuestDebugCtl = 0x2802,
    GuestPat = 0x2804,
    GuestEfer = 0x2806,
    GuestPdpte0 = 0x280a,
    GuestPdpte1 = 0x280c,
    GuestPdpte2 = 0x280e,
    GuestPdpte3 = 0x2810,

    // 64-bit host state (B.2.4).
    HostPat = 0x2c00,
    HostEfer = 0x2c02,

    // 32-bit control (B.3.1).
    PinBasedControls = 0x4000,
    PrimaryProcessorControls = 0x4002,
    ExceptionBitmap = 0x4004,
    PageFaultErrorCodeMask = 0x4006,
    PageFaultErrorCodeMatch = 0x4008,
    Cr3TargetCount = 0x400a,
    ExitControls = 0x400c,
    ExitMsrStoreCount = 0x400e,
    ExitMsrLoadCount = 0x4010,
    EntryControls = 0x4012,
    EntryMsrLoadCount = 0x4014,
    EntryInterruptionInfo = 0x4016,
    EntryExceptionErrorCode = 0x4018,
    EntryInstructionLength = 0x401a,
    TprThreshold = 0x401c,
    SecondaryProcessorControls = 0x401e,

    // 32-bit read-only data (B.3.2).
    VmInstructionError = 0x4400,
    ExitReason = 0x4402,
    ExitInterruptionInfo = 0x4404,
    ExitInterruptionErrorCode = 0x4406,
    IdtVectoringInfo = 0x4408,
    IdtVectoringErrorCode = 0x440a,
    ExitInstructionLength = 0x440c,
    ExitInstructionInfo = 0x440e,

    // 32-bit guest state (B.3.3).
    GuestEsLimit = 0x4800,
    GuestCsLimit = 0x4802,
    GuestSsLimit = 0x4804,
    GuestDsLimit = 0x4806,
    GuestFsLimit = 0x4808,
    GuestGsLimit = 0x480a,
    GuestLdtrLimit = 0x480c,
    GuestTrLimit = 0x480e,
    GuestGdtrLimit = 0x4810,
    GuestIdtrLimit = 0x4812,
    GuestEsAccessRights = 0x4814,
    GuestCsAccessRights = 0x4816,
    GuestSsAccessRights = 0x4818,
    GuestDsAccessRights = 0x481a,
    GuestFsAccessRights = 0x481c,
    GuestGsAccessRights = 0x481e,
    GuestLdtrAccessRights = 0x4820,
    GuestTrAccessRights = 0x4822,
    GuestInterruptibility = 0x4824,
    GuestActivityState = 0x4826,
    GuestSysenterCs = 0x482a,
    PreemptionTimerValue = 0x482e,

    // 32-bit host state (B.3.4).
    HostSysenterCs = 0x4c00,

    // Natural-width control (B.4.1).
    Cr0GuestHostMask = 0x6000,
    Cr4GuestHostMask = 0x6002,
    Cr0ReadShadow = 0x6004,
    Cr4ReadShadow = 0x6006,

    // Natural-width read-only data (B.4.2).
    ExitQualification = 0x6400,
    GuestLinearAddress = 0x640a,

    // Natural-width guest state (B.4.3).
    GuestCr0 = 0x6800,
    GuestCr3 = 0x6802,
    GuestCr4 = 0x6804,
    GuestEsBase = 0x6806,
    GuestCsBase = 0x6808,
    GuestSsBase = 0x680a,
    GuestDsBase = 0x680c,
    GuestFsBase = 0x680e,
    GuestGsBase = 0x6810,
    GuestLdtrBase = 0x6812,
    GuestTrBase = 0x6814,
    GuestGdtrBase = 0x6816,
    GuestIdtrBase = 0x6818,
    GuestDr7 = 0x681a,
    GuestRsp = 0x681c,
    GuestRip = 0x681e,
    GuestRflags = 0x6820,
    GuestPendingDebugExceptions = 0x6822,
    GuestSysenterEsp = 0x6824,
    GuestSysenterEip = 0x6826,

    // Natural-width host state (B.4.4).
    HostCr0 = 0x6c00,
    HostCr3 = 0x6c02,
    HostCr4 = 0x6c04,
    HostFsBase = 0x6c06,
    HostGsBase = 0x6c08,
    HostTrBase = 0x6c0a,
    HostGdtrBase = 0x6c0c,
    HostIdtrBase = 0x6c0e,
    HostSysenterEsp = 0x6c10,
    HostSysenterEip = 0x6c12,
    HostRsp = 0x6c14,
    HostRip = 0x6c16,
}

impl VmcsField {
    pub const fn encoding(self) -> u32 {
        self as u32
    }

    pub const fn width(self) -> Width {
        match (self.encoding() >> WIDTH_SHIFT) & TWO_BITS {
            0 => Width::Bits16,
            1 => Width::Bits64,
            2 => Width::Bits32,
            _ => Width::Natural,
        }
    }

    pub const fn field_type(self) -> FieldType {
        match (self.encoding() >> TYPE_SHIFT) & TWO_BITS {
            0 => FieldType::Control,
            1 => FieldType::ExitInformation,
            2 => FieldType::GuestState,
            _ => FieldType::HostState,
        }
    }

    /// Exit-information fields cannot be written (without the "VMWRITE to
    /// any field" capability, which the kernel does not rely on).
    pub const fn is_read_only(self) -> bool {
        matches!(self.field_type(), FieldType::ExitInformation)
    }

    /// The selector, base, limit and access-rights fields of a guest segment.
    pub const fn guest_segment(reg: SegmentRegister) -> SegmentFields {
        use VmcsField::*;
        let (selector, base, limit, access_rights) = match reg {
            SegmentRegister::Es => (
                GuestEsSelector,
                GuestEsBase,
                GuestEsLimit,
                GuestEsAccessRights,
            ),
            SegmentRegister::Cs => (
                GuestCsSelector,
                GuestCsBase,
                GuestCsLimit,
                GuestCsAccessRights,
            ),
            SegmentRegister::Ss => (
                GuestSsSelector,
                GuestSsBase,
                GuestSsLimit,
                GuestSsAccessRights,
            ),
            SegmentRegister::Ds => (
                GuestDsSelector,
                GuestDsBase,
                GuestDsLimit,
                GuestDsAccessRights,
            ),
            SegmentRegister::Fs => (
                GuestFsSelector,
                GuestFsBase,
                GuestFsLimit,
                GuestFsAccessRights,
            ),
            SegmentRegister::Gs => (
                GuestGsSelector,
                GuestGsBase,
                GuestGsLimit,
                GuestGsAccessRights,
            ),
            SegmentRegister::Ldtr => (
                GuestLdtrSelector,
                GuestLdtrBase,
                GuestLdtrLimit,
                GuestLdtrAccessRights,
            ),
            SegmentRegister::Tr => (
                GuestTrSelector,
                GuestTrBase,
                GuestTrLimit,
                GuestTrAccessRights,
            ),
        };
        SegmentFields {
            selector,
            base,
            limit,
            access_rights,
        }
    }
}

/// The four VMCS fields describing one guest segment register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentFields {
    pub selector: VmcsField,
    pub base: VmcsField,
    pub limit: VmcsField,
    pub access_rights: VmcsField,
}

bitflags! {
    /// Pin-based VM-execution controls (SDM Vol. 3C, 25.6.1, Table
    /// "Definitions of Pin-Based VM-Execution Controls").
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PinControls: u32 {
        const EXTERNAL_INTERRUPT_EXITING = 1 << 0;
        const NMI_EXITING = 1 << 3;
        const VIRTUAL_NMIS = 1 << 5;
        const PREEMPTION_TIMER = 1 << 6;
        const POSTED_INTERRUPTS = 1 << 7;
    }

    /// Primary processor-based VM-execution controls (25.6.2, Table
    /// "Definitions of Primary Processor-Based VM-Execution Controls").
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PrimaryControls: u32 {
        const INTERRUPT_WINDOW_EXITING = 1 << 2;
        const USE_TSC_OFFSETTING = 1 << 3;
        const HLT_EXITING = 1 << 7;
        const INVLPG_EXITING = 1 << 9;
        const MWAIT_EXITING = 1 << 10;
        const RDPMC_EXITING = 1 << 11;
        const RDTSC_EXITING = 1 << 12;
        const CR3_LOAD_EXITING = 1 << 15;
        const CR3_STORE_EXITING = 1 << 16;
        const CR8_LOAD_EXITING = 1 << 19;
        const CR8_STORE_EXITING = 1 << 20;
        const USE_TPR_SHADOW = 1 << 21;
        const NMI_WINDOW_EXITING = 1 << 22;
        const MOV_DR_EXITING = 1 << 23;
        const UNCONDITIONAL_IO_EXITING = 1 << 24;
        const USE_IO_BITMAPS = 1 << 25;
        const MONITOR_TRAP_FLAG = 1 << 27;
        const USE_MSR_BITMAPS = 1 << 28;
        const MONITOR_EXITING = 1 << 29;
        const PAUSE_EXITING = 1 << 30;
        const ACTIVATE_SECONDARY_CONTROLS = 1 << 31;
    }

    /// Secondary processor-based VM-execution controls (25.6.2, Table
    /// "Definitions of Secondary Processor-Based VM-Execution Controls").
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SecondaryControls: u32 {
        const VIRTUALIZE_APIC_ACCESSES = 1 << 0;
        const ENABLE_EPT = 1 << 1;
        const DESCRIPTOR_TABLE_EXITING = 1 << 2;
        const ENABLE_RDTSCP = 1 << 3;
        const VIRTUALIZE_X2APIC = 1 << 4;
        const ENABLE_VPID = 1 << 5;
        const WBINVD_EXITING = 1 << 6;
        const UNRESTRICTED_GUEST = 1 << 7;
        const PAUSE_LOOP_EXITING = 1 << 10;
        const RDRAND_EXITING = 1 << 11;
        const ENABLE_INVPCID = 1 << 12;
        const RDSEED_EXITING = 1 << 16;
        const ENABLE_XSAVES = 1 << 20;
        const MODE_BASED_EPT_EXECUTE = 1 << 22;
        const USE_TSC_SCALING = 1 << 25;
    }

    /// Primary VM-exit controls (25.7.1, Table "Definitions of Primary
    /// VM-Exit Controls").
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ExitControls: u32 {
        const SAVE_DEBUG_CONTROLS = 1 << 2;
        const HOST_ADDRESS_SPACE_SIZE = 1 << 9;
        const LOAD_PERF_GLOBAL_CTRL = 1 << 12;
        const ACK_INTERRUPT_ON_EXIT = 1 << 15;
        const SAVE_PAT = 1 << 18;
        const LOAD_PAT = 1 << 19;
        const SAVE_EFER = 1 << 20;
        const LOAD_EFER = 1 << 21;
        const SAVE_PREEMPTION_TIMER = 1 << 22;
    }

    /// VM-entry controls (25.8.1, Table "Definitions of VM-Entry Controls").
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EntryControls: u32 {
        const LOAD_DEBUG_CONTROLS = 1 << 2;
        const IA32E_MODE_GUEST = 1 << 9;
        const ENTRY_TO_SMM = 1 << 10;
        const DEACTIVATE_DUAL_MONITOR = 1 << 11;
        const LOAD_PERF_GLOBAL_CTRL = 1 << 13;
        const LOAD_PAT = 1 << 14;
        const LOAD_EFER = 1 << 15;
    }

    /// Guest interruptibility state (25.4.2, Table "Format of
    /// Interruptibility State").
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Interruptibility: u32 {
        const BLOCKING_BY_STI = 1 << 0;
        const BLOCKING_BY_MOV_SS = 1 << 1;
        const BLOCKING_BY_SMI = 1 << 2;
        const BLOCKING_BY_NMI = 1 << 3;
    }
}

/// Guest activity state (25.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ActivityState {
    Active = 0,
    Hlt = 1,
    Shutdown = 2,
    WaitForSipi = 3,
}

impl ActivityState {
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Active),
            1 => Some(Self::Hlt),
            2 => Some(Self::Shutdown),
            3 => Some(Self::WaitForSipi),
            _ => None,
        }
    }
}

/// The VMX capability MSRs (SDM Vol. 4, Table 2-2; their use in Vol. 3D,
/// Appendix A "VMX Capability Reporting Facility").
pub mod msr {
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    /// IA32_VMX_BASIC bit 55: the TRUE control MSRs exist (A.1).
    pub const BASIC_TRUE_CONTROLS: u64 = 1 << 55;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The CPU does not allow these desired bits to be 1.
    Unsupported { bits: u32 },
    /// The capability MSR requires bits to be 1 that it does not allow to be
    /// 1 (not seen on real hardware; a broken emulator).
    Contradictory { bits: u32 },
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Unsupported { bits } => {
                write!(f, "VMX controls {bits:#010x} are not supported by this CPU")
            }
            Self::Contradictory { bits } => write!(
                f,
                "VMX capability MSR requires controls {bits:#010x} it does not allow"
            ),
        }
    }
}

/// The value to write to a 32-bit control field: `desired` plus the bits the
/// CPU requires, according to `capability` (SDM Vol. 3D, A.3 ff.: the low 32
/// bits are the allowed 0-settings, a 1 there means the bit must be 1; the
/// high 32 bits are the allowed 1-settings, a 0 there means the bit must be
/// 0). Use the TRUE MSR when IA32_VMX_BASIC reports it, so that default-1
/// controls the kernel does not want (e.g. CR3-load exiting) can be cleared.
pub fn adjust_controls(desired: u32, capability: u64) -> Result<u32, ControlError> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    let contradictory = must_be_one & !may_be_one;
    if contradictory != 0 {
        return Err(ControlError::Contradictory {
            bits: contradictory,
        });
    }
    let unsupported = desired & !may_be_one;
    if unsupported != 0 {
        return Err(ControlError::Unsupported { bits: unsupported });
    }
    Ok(desired | must_be_one)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn widths_and_types_match_the_sdm() {
        use VmcsField::*;
        let cases = [
            (Vpid, 0x0000, Width::Bits16, FieldType::Control),
            (
                GuestCsSelector,
                0x0802,
                Width::Bits16,
                FieldType::GuestState,
            ),
            (HostTrSelector, 0x0c0c, Width::Bits16, FieldType::HostState),
            (EptPointer, 0x201a, Width::Bits64, FieldType::Control),
            (TscOffset, 0x2010, Width::Bits64, FieldType::Control),
            (VirtualApicPage, 0x2012, Width::Bits64, FieldType::Control),
            (
                GuestPhysicalAddress,
                0x2400,
                Width::Bits64,
                FieldType::ExitInformation,
            ),
            (
                VmcsLinkPointer,
                0x2800,
                Width::Bits64,
                FieldType::GuestState,
            ),
            (HostEfer, 0x2c02, Width::Bits64, FieldType::HostState),
            (PinBasedControls, 0x4000, Width::Bits32, FieldType::Control),
            (
                SecondaryProcessorControls,
                0x401e,
                Width::Bits32,
                FieldType::Control,
            ),
            (
                ExitReason,
                0x4402,
                Width::Bits32,
                FieldType::ExitInformation,
            ),
            (
                VmInstructionError,
                0x4400,
                Width::Bits32,
                FieldType::ExitInformation,
            ),
            (
                GuestTrAccessRights,
                0x4822,
                Width::Bits32,
                FieldType::GuestState,
            ),
            (
                PreemptionTimerValue,
                0x482e,
                Width::Bits32,
                FieldType::GuestState,
            ),
            (HostSysenterCs, 0x4c00, Width::Bits32, FieldType::HostState),
            (Cr4ReadShadow, 0x6006, Width::Natural, FieldType::Control),
            (
                ExitQualification,
                0x6400,
                Width::Natural,
                FieldType::ExitInformation,
            ),
            (
                GuestLinearAddress,
                0x640a,
                Width::Natural,
                FieldType::ExitInformation,
            ),
            (GuestRip, 0x681e, Width::Natural, FieldType::GuestState),
            (GuestRflags, 0x6820, Width::Natural, FieldType::GuestState),
            (HostRip, 0x6c16, Width::Natural, FieldType::HostState),
        ];
        for (field, encoding, width, kind) in cases {
            assert_eq!(field.encoding(), encoding, "{field:?}");
            assert_eq!(field.width(), width, "{field:?}");
            assert_eq!(field.field_type(), kind, "{field:?}");
            assert_eq!(
                field.is_read_only(),
                kind == FieldType::ExitInformation,
                "{field:?}"
            );
        }
    }

    #[test]
    fn encodings_are_well_formed() {
        let mut seen = HashSet::new();
        for &field in VmcsField::ALL {
            let e = field.encoding();
            assert!(seen.insert(e), "{field:?} duplicated");
            assert_eq!(VmcsField::from_encoding(e), Some(field));
            // Bit 0 (high half of a 64-bit field) is clear: full access;
            // bits 12 and 15..31 are reserved.
            assert_eq!(e & 1, 0, "{field:?}");
            assert_eq!(e & !0x6fff, 0, "{field:?}");
        }
        assert_eq!(VmcsField::from_encoding(0x2001), None);
        assert_eq!(VmcsField::from_encoding(u32::MAX), None);
        let ro: Vec<_> = VmcsField::ALL.iter().filter(|f| f.is_read_only()).collect();
        assert_eq!(ro.len(), 11);
    }

    #[test]
    fn guest_segments() {
        let ss = VmcsField::guest_segment(SegmentRegister::Ss);
        assert_eq!(
            (
                ss.selector.encoding(),
                ss.base.encoding(),
                ss.limit.encoding(),
                ss.access_rights.encoding()
            ),
            (0x0804, 0x680a, 0x4804, 0x4818)
        );
        for (i, reg) in SegmentRegister::ALL.into_iter().enumerate() {
            let f = VmcsField::guest_segment(reg);
            let step = 2 * i as u32;
            assert_eq!(f.selector.encoding(), 0x0800 + step);
            assert_eq!(f.limit.encoding(), 0x4800 + step);
            assert_eq!(f.access_rights.encoding(), 0x4814 + step);
            assert_eq!(f.base.encoding(), 0x6806 + step);
        }
    }

    #[test]
    fn adjust_controls_applies_the_capability() {
        // Typical TRUE pin-based MSR: bits 1, 2, 4 must be 1; 0-7 may be 1.
        let pin = 0x0000_00ff_0000_0016;
        let want = PinControls::EXTERNAL_INTERRUPT_EXITING | PinControls::NMI_EXITING;
        assert_eq!(adjust_controls(want.bits(), pin), Ok(want.bits() | 0x16));
        assert_eq!(adjust_controls(0, pin), Ok(0x16));
        // Posted interrupts are allowed here, bit 8 is not.
        assert_eq!(
            adjust_controls(1 << 8 | 1, pin),
            Err(ControlError::Unsupported { bits: 1 << 8 })
        );

        // Non-TRUE primary MSR forces CR3-load/store exiting on; TRUE allows 0.
        let primary = 0xfff9_fffe_0401_e172;
        let true_primary = 0xfff9_fffe_0400_6172;
        let want = PrimaryControls::HLT_EXITING | PrimaryControls::USE_IO_BITMAPS;
        let cr3 = (PrimaryControls::CR3_LOAD_EXITING | PrimaryControls::CR3_STORE_EXITING).bits();
        assert_ne!(adjust_controls(want.bits(), primary).unwrap() & cr3, 0);
        assert_eq!(adjust_controls(want.bits(), true_primary).unwrap() & cr3, 0);

        // Secondary controls have no required bits; unsupported EPT fails.
        let no_ept = 0xffff_fffd_0000_0000;
        assert_eq!(
            adjust_controls(SecondaryControls::ENABLE_EPT.bits(), no_ept),
            Err(ControlError::Unsupported { bits: 1 << 1 })
        );
        assert_eq!(adjust_controls(0, u64::MAX), Ok(u32::MAX));
        assert_eq!(
            adjust_controls(u32::MAX, 0xffff_ffff_0000_0000),
            Ok(u32::MAX)
        );
        assert_eq!(
            adjust_controls(0, 0x0000_0001_0000_0003),
            Err(ControlError::Contradictory { bits: 2 })
        );
        assert!(ControlError::Unsupported { bits: 2 }
            .to_string()
            .contains("0x00000002"));
    }

    #[test]
    fn activity_state() {
        for raw in 0..4 {
            assert_eq!(ActivityState::from_raw(raw).unwrap() as u32, raw);
        }
        assert_eq!(ActivityState::from_raw(4), None);
    }
}
