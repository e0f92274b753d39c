//! AMD SVM: enabling SVM and installing the host save area. Guests come in a
//! later step.

use super::cpu::{read_msr, write_msr};

const IA32_EFER: u32 = 0xc000_0080;
const EFER_SVME: u64 = 1 << 12;
const VM_CR: u32 = 0xc001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
const VM_HSAVE_PA: u32 = 0xc001_0117;

#[derive(Debug)]
pub enum SvmError {
    DisabledByFirmware,
}

impl core::fmt::Display for SvmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SvmError::DisabledByFirmware => f.write_str("SVM is disabled in VM_CR by the firmware"),
        }
    }
}

/// Sets EFER.SVME and points VM_HSAVE_PA at `host_save_area`, a zeroed,
/// page-aligned frame the kernel gives to the CPU for good.
pub fn enable(host_save_area: u64) -> Result<(), SvmError> {
    if read_msr(VM_CR) & VM_CR_SVMDIS != 0 {
        return Err(SvmError::DisabledByFirmware);
    }
    write_msr(IA32_EFER, read_msr(IA32_EFER) | EFER_SVME);
    write_msr(VM_HSAVE_PA, host_save_area);
    Ok(())
}
pub mod vcpu;
