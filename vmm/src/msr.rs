//! The MSRs a guest reaches through RDMSR/WRMSR exits, other than the
//! local APIC's (the machine routes those to its model). Every MSR exits
//! to the VMM; those the kernel switches (syscall, sysenter, PAT,
//! KERNEL_GS_BASE, FS/GS base, EFER) live in the vCPU state page, a few
//! are read-as-constant, and everything else gives #GP, as KVM does
//! without `ignore_msrs`.
//!
//! Machine checks and MTRRs, which stock Linux expects (without MCA it
//! says "Unable to init MCE device"; without MTRRs it turns PAT off too),
//! are the smallest a CPU may have: MCG_CAP with no error banks, and
//! MTRRcap with no fixed or variable ranges, the default type WB and
//! enabled. The guest's writes are checked as the CPU would and kept for
//! it to read back; they change nothing (guest memory types are the
//! host's business).
#![forbid(unsafe_code)]

use moat_abi::vcpu::{group, VcpuState};

use crate::pvclock;

pub const EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const SYSENTER_CS: u32 = 0x174;
pub const SYSENTER_ESP: u32 = 0x175;
pub const SYSENTER_EIP: u32 = 0x176;
pub const PAT: u32 = 0x277;
pub const TSC: u32 = 0x10;
pub const FEATURE_CONTROL: u32 = 0x3a;
pub const UCODE_REV: u32 = 0x8b;
pub const MISC_ENABLE: u32 = 0x1a0;
pub const DEBUGCTL: u32 = 0x1d9;
/// AMD: hardware configuration, system configuration, decode configuration
/// (read by Linux's AMD set-up with plain RDMSR).
pub const AMD_HWCR: u32 = 0xc001_0015;
pub const AMD_SYSCFG: u32 = 0xc001_0010;
pub const AMD_DE_CFG: u32 = 0xc001_1029;
/// AMD: interrupt-pending message (C1E), read by Linux's AMD idle set-up.
pub const AMD_INT_PENDING_MSG: u32 = 0xc001_0055;
pub const MTRR_CAP: u32 = 0xfe;
pub const MCG_CAP: u32 = 0x179;
pub const MCG_STATUS: u32 = 0x17a;
pub const MCG_CTL: u32 = 0x17b;
pub const MTRR_DEF_TYPE: u32 = 0x2ff;

const EFER_LMA: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const CR0_PG: u64 = 1 << 31;
/// SCE, LME, LMA, NXE: the bits a guest may have.
const EFER_VALID: u64 = 1 | (1 << 8) | EFER_LMA | (1 << 11);
/// IA32_FEATURE_CONTROL: locked, VMX off.
const FEATURE_CONTROL_LOCKED: u64 = 1;
/// IA32_MISC_ENABLE: fast strings.
const MISC_ENABLE_FAST_STRINGS: u64 = 1;
/// MTRRdefType: the default type (bits 7:0), FE (10), E (11).
const MTRR_DEF_TYPE_VALID: u64 = 0xcff;
const MTRR_ENABLED: u64 = 1 << 11;
const MEMORY_TYPE_WB: u64 = 6;
/// MCG_STATUS: RIPV, EIPV, MCIP, LMCES.
const MCG_STATUS_VALID: u64 = 0xf;

/// Memory types an MTRR may hold: UC, WC, WT, WP, WB.
fn valid_mtrr_type(value: u64) -> bool {
    matches!(value & 0xff, 0 | 1 | 4 | 5 | 6)
}

/// PAT memory types 0, 1, 4, 5, 6, 7 are valid in every byte.
fn valid_pat(value: u64) -> bool {
    value
        .to_le_bytes()
        .iter()
        .all(|&t| matches!(t, 0 | 1 | 4 | 5 | 6 | 7))
}

fn canonical(value: u64) -> bool {
    let top = (value as i64) >> 47;
    top == 0 || top == -1
}

/// What the VMM keeps for MSRs outside the state page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrState {
    /// Where the guest wants its `pvclock_vcpu_time_info`, once enabled.
    pub system_time: Option<u64>,
    /// A `pvclock_wall_clock` the guest asked to be filled.
    pub wall_clock_request: Option<u64>,
    /// IA32_MTRR_DEF_TYPE as the guest last wrote it.
    pub mtrr_def_type: u64,
    /// IA32_MCG_STATUS as the guest last wrote it.
    pub mcg_status: u64,
}

impl Default for MsrState {
    /// As at reset, after a BIOS that enabled the MTRRs with WB.
    fn default() -> Self {
        Self {
            system_time: None,
            wall_clock_request: None,
            mtrr_def_type: MTRR_ENABLED | MEMORY_TYPE_WB,
            mcg_status: 0,
        }
    }
}

/// A WRMSR the machine must act on beyond the state page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Write the time info at the address in [`MsrState::system_time`].
    SystemTime,
    /// Write the wall clock at this address.
    WallClock(u64),
}

impl MsrState {
    /// RDMSR `index`; `None`: #GP. `guest_tsc` is the guest's TSC now.
    pub fn read(&self, state: &VcpuState, index: u32, guest_tsc: u64) -> Option<u64> {
        Some(match index {
            EFER => state.efer,
            STAR => state.star,
            LSTAR => state.lstar,
            CSTAR => state.cstar,
            SFMASK => state.sfmask,
            FS_BASE => state.fs.base,
            GS_BASE => state.gs.base,
            KERNEL_GS_BASE => state.kernel_gs_base,
            SYSENTER_CS => state.sysenter_cs,
            SYSENTER_ESP => state.sysenter_esp,
            SYSENTER_EIP => state.sysenter_eip,
            PAT => state.pat,
            TSC => guest_tsc,
            FEATURE_CONTROL => FEATURE_CONTROL_LOCKED,
            MISC_ENABLE => MISC_ENABLE_FAST_STRINGS,
            UCODE_REV | DEBUGCTL | AMD_HWCR | AMD_SYSCFG | AMD_DE_CFG | AMD_INT_PENDING_MSG => 0,
            // No banks, no MCG_CTL_P, no ranges, no WC: all zero.
            MCG_CAP | MCG_CTL | MTRR_CAP => 0,
            MCG_STATUS => self.mcg_status,
            MTRR_DEF_TYPE => self.mtrr_def_type,
            pvclock::MSR_KVM_SYSTEM_TIME_NEW | pvclock::MSR_KVM_SYSTEM_TIME => self
                .system_time
                .map_or(0, |gpa| gpa | pvclock::SYSTEM_TIME_ENABLE),
            pvclock::MSR_KVM_WALL_CLOCK_NEW | pvclock::MSR_KVM_WALL_CLOCK => {
                self.wall_clock_request.unwrap_or(0)
            }
            _ => return None,
        })
    }

    /// WRMSR `index` = `value`; `None`: #GP.
    pub fn write(&mut self, state: &mut VcpuState, index: u32, value: u64) -> Option<Effect> {
        let mut dirty = group::MSRS;
        match index {
            EFER => {
                if value & !EFER_VALID != 0 {
                    return None;
                }
                // Changing LME with paging on is #GP on the CPU (SDM
                // Vol. 3, 2.2.1); let through, it left LMA without LME
                // and the next entry failed (found by the hostile guest).
                if state.cr0 & CR0_PG != 0 && (value ^ state.efer) & EFER_LME != 0 {
                    return None;
                }
                // LMA is the CPU's to set; keep what it is.
                state.efer = (value & !EFER_LMA) | (state.efer & EFER_LMA);
                dirty = group::CONTROL_REGISTERS;
            }
            STAR => state.star = value,
            LSTAR | CSTAR | KERNEL_GS_BASE | SYSENTER_ESP | SYSENTER_EIP | FS_BASE | GS_BASE
                if !canonical(value) =>
            {
                return None
            }
            LSTAR => state.lstar = value,
            CSTAR => state.cstar = value,
            SFMASK => state.sfmask = value & 0xffff_ffff,
            KERNEL_GS_BASE => state.kernel_gs_base = value,
            FS_BASE => {
                state.fs.base = value;
                dirty = group::SEGMENTS;
            }
            GS_BASE => {
                state.gs.base = value;
                dirty = group::SEGMENTS;
            }
            SYSENTER_CS => state.sysenter_cs = value & 0xffff,
            SYSENTER_ESP => state.sysenter_esp = value,
            SYSENTER_EIP => state.sysenter_eip = value,
            PAT if valid_pat(value) => state.pat = value,
            // Reading the microcode revision is preceded by clearing it.
            UCODE_REV | MISC_ENABLE | AMD_HWCR | AMD_DE_CFG => return Some(Effect::None),
            DEBUGCTL if value == 0 => return Some(Effect::None),
            MTRR_DEF_TYPE if value & !MTRR_DEF_TYPE_VALID == 0 && valid_mtrr_type(value) => {
                self.mtrr_def_type = value;
                return Some(Effect::None);
            }
            MCG_STATUS if value & !MCG_STATUS_VALID == 0 => {
                self.mcg_status = value;
                return Some(Effect::None);
            }
            // All banks' reporting on or off: there are none.
            MCG_CTL if value == 0 || value == u64::MAX => return Some(Effect::None),
            pvclock::MSR_KVM_SYSTEM_TIME_NEW | pvclock::MSR_KVM_SYSTEM_TIME => {
                return Some(if value & pvclock::SYSTEM_TIME_ENABLE != 0 {
                    self.system_time = Some(value & !pvclock::SYSTEM_TIME_ENABLE);
                    Effect::SystemTime
                } else {
                    self.system_time = None;
                    Effect::None
                });
            }
            pvclock::MSR_KVM_WALL_CLOCK_NEW | pvclock::MSR_KVM_WALL_CLOCK => {
                self.wall_clock_request = Some(value);
                return Some(Effect::WallClock(value));
            }
            _ => return None,
        }
        state.dirty |= dirty;
        Some(Effect::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_page_msrs_round_trip() {
        let mut msrs = MsrState::default();
        let mut state = VcpuState::default();
        for (index, value) in [
            (STAR, 0x0023_0010_0000_0000),
            (LSTAR, 0xffff_ffff_8100_0000),
            (KERNEL_GS_BASE, 0xffff_8880_0000_0000),
            (FS_BASE, 0x7f00_0000_1000),
            (GS_BASE, 0xffff_8880_1000_0000),
            (SYSENTER_EIP, 0xffff_ffff_8100_1000),
            (PAT, 0x0007_0406_0007_0406),
        ] {
            state.dirty = 0;
            assert_eq!(msrs.write(&mut state, index, value), Some(Effect::None));
            assert_ne!(state.dirty, 0, "{index:#x} marks its group dirty");
            assert_eq!(msrs.read(&state, index, 0), Some(value), "{index:#x}");
        }
        assert_eq!(state.dirty, group::MSRS);
        assert_eq!(state.fs.base, 0x7f00_0000_1000);
    }

    #[test]
    fn bad_values_and_unknown_msrs_fault() {
        let mut msrs = MsrState::default();
        let mut state = VcpuState::default();
        assert_eq!(msrs.write(&mut state, LSTAR, 0x8000_0000_0000_0000), None);
        assert_eq!(
            msrs.write(&mut state, PAT, 0x02),
            None,
            "type 2 is reserved"
        );
        assert_eq!(msrs.write(&mut state, EFER, 1 << 20), None);
        assert_eq!(msrs.write(&mut state, 0x48, 1), None, "SPEC_CTRL is hidden");
        assert_eq!(msrs.read(&state, 0x200, 0), None, "no variable MTRRs");
        assert_eq!(msrs.read(&state, 0x401, 0), None, "no machine-check banks");
        assert_eq!(msrs.write(&mut state, MCG_CAP, 0), None, "read-only");
        assert_eq!(
            msrs.write(&mut state, MTRR_DEF_TYPE, 2),
            None,
            "type 2 is reserved"
        );
        assert_eq!(msrs.write(&mut state, MTRR_DEF_TYPE, 1 << 12), None);
        assert_eq!(msrs.write(&mut state, MCG_STATUS, 1 << 4), None);
        assert_eq!(msrs.write(&mut state, DEBUGCTL, 1), None);
        assert_eq!(state, VcpuState::default(), "nothing changed");
    }

    /// What Linux's MCE and MTRR set-up reads and writes (issue 14).
    #[test]
    fn machine_checks_and_mtrrs_are_minimal() {
        let mut msrs = MsrState::default();
        let mut state = VcpuState::default();
        assert_eq!(msrs.read(&state, MCG_CAP, 0), Some(0), "no banks");
        assert_eq!(msrs.read(&state, MCG_STATUS, 0), Some(0));
        assert_eq!(msrs.read(&state, MCG_CTL, 0), Some(0));
        assert_eq!(msrs.read(&state, MTRR_CAP, 0), Some(0), "no ranges");
        assert_eq!(
            msrs.read(&state, MTRR_DEF_TYPE, 0),
            Some(0x806),
            "enabled, WB"
        );
        // Linux's MTRR update: disable, (nothing to set), restore.
        assert!(msrs.write(&mut state, MTRR_DEF_TYPE, 0x006).is_some());
        assert_eq!(msrs.read(&state, MTRR_DEF_TYPE, 0), Some(0x006));
        assert!(msrs.write(&mut state, MTRR_DEF_TYPE, 0x806).is_some());
        assert!(msrs.write(&mut state, MCG_STATUS, 0).is_some());
        assert!(msrs.write(&mut state, MCG_CTL, u64::MAX).is_some());
        assert_eq!(msrs.read(&state, MCG_CTL, 0), Some(0));
        assert_eq!(state, VcpuState::default(), "nothing in the state page");
    }

    /// Hostile guests (issue 11): a 64-bit guest clearing EFER.LME got
    /// LMA without LME, a state the next VM entry refused.
    #[test]
    fn efer_lme_cannot_change_while_paging_is_on() {
        let mut msrs = MsrState::default();
        let mut state = VcpuState {
            efer: EFER_LME | EFER_LMA,
            cr0: CR0_PG | 1,
            ..VcpuState::default()
        };
        assert_eq!(msrs.write(&mut state, EFER, 1 << 11), None);
        assert_eq!(state.efer, EFER_LME | EFER_LMA);
        // NXE alone may change.
        assert!(msrs.write(&mut state, EFER, EFER_LME | (1 << 11)).is_some());
        assert_eq!(state.efer, EFER_LME | EFER_LMA | (1 << 11));
        // With paging off, LME may be set (how long mode is entered).
        let mut real = VcpuState::default();
        assert!(msrs.write(&mut real, EFER, EFER_LME).is_some());
        assert_eq!(real.efer, EFER_LME);
    }

    #[test]
    fn efer_keeps_lma_and_kvm_clock_is_registered() {
        let mut msrs = MsrState::default();
        let mut state = VcpuState {
            efer: EFER_LMA | (1 << 8),
            ..VcpuState::default()
        };
        msrs.write(&mut state, EFER, (1 << 8) | (1 << 11) | 1)
            .unwrap();
        assert_eq!(state.efer, EFER_LMA | (1 << 8) | (1 << 11) | 1);
        assert_eq!(state.dirty, group::CONTROL_REGISTERS);

        let gpa = 0x1234_5000;
        let effect = msrs.write(&mut state, pvclock::MSR_KVM_SYSTEM_TIME_NEW, gpa | 1);
        assert_eq!(effect, Some(Effect::SystemTime));
        assert_eq!(msrs.system_time, Some(gpa));
        assert_eq!(
            msrs.read(&state, pvclock::MSR_KVM_SYSTEM_TIME_NEW, 0),
            Some(gpa | 1)
        );
        msrs.write(&mut state, pvclock::MSR_KVM_SYSTEM_TIME_NEW, 0);
        assert_eq!(msrs.system_time, None);
        assert_eq!(
            msrs.write(&mut state, pvclock::MSR_KVM_WALL_CLOCK_NEW, 0x9000),
            Some(Effect::WallClock(0x9000))
        );
    }
}
