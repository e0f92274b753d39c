//! Intel VMX: entering VMX root operation at boot; vCPUs in `vcpu.rs`.

mod insn;
pub mod vcpu;

use super::cpu::{self, read_msr, write_msr};

const IA32_FEATURE_CONTROL: u32 = 0x3a;
const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMXON_OUTSIDE_SMX: u64 = 1 << 2;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const CR4_VMXE: u64 = 1 << 13;
const VMX_BASIC_REVISION: u64 = 0x7fff_ffff;

#[derive(Debug)]
pub enum VmxError {
    DisabledByFirmware,
    VmxonFailed(insn::VmFail),
}

impl core::fmt::Display for VmxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VmxError::DisabledByFirmware => {
                f.write_str("VMX is locked off in IA32_FEATURE_CONTROL by the firmware")
            }
            VmxError::VmxonFailed(fail) => write!(f, "VMXON failed: {fail}"),
        }
    }
}

/// Enters VMX root operation using the 4 KiB frame at `vmxon_region`
/// (physical), reachable for writing at `vmxon_region_virt`.
pub fn enable(vmxon_region: u64, vmxon_region_virt: &mut [u8; 4096]) -> Result<(), VmxError> {
    let control = read_msr(IA32_FEATURE_CONTROL);
    if control & FEATURE_CONTROL_LOCKED == 0 {
        write_msr(
            IA32_FEATURE_CONTROL,
            control | FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX,
        );
    } else if control & FEATURE_CONTROL_VMXON_OUTSIDE_SMX == 0 {
        return Err(VmxError::DisabledByFirmware);
    }

    let cr0 = (cpu::read_cr0() | read_msr(IA32_VMX_CR0_FIXED0)) & read_msr(IA32_VMX_CR0_FIXED1);
    let cr4 = (cpu::read_cr4() | CR4_VMXE | read_msr(IA32_VMX_CR4_FIXED0))
        & read_msr(IA32_VMX_CR4_FIXED1);
    // SAFETY: the fixed-bit MSRs only force bits the kernel already runs with
    // (PE, PG, NE; VMXE is new and only enables VMX instructions).
    unsafe {
        cpu::write_cr0(cr0);
        cpu::write_cr4(cr4);
    }

    let revision = (read_msr(IA32_VMX_BASIC) & VMX_BASIC_REVISION) as u32;
    vmxon_region_virt.fill(0);
    vmxon_region_virt[..4].copy_from_slice(&revision.to_le_bytes());
    insn::vmxon(vmxon_region).map_err(VmxError::VmxonFailed)
}
