//! VMX instructions. Each reports VMfailInvalid (CF) and VMfailValid (ZF)
//! from inside its own asm block, where the flags are still those the
//! instruction set.

use core::arch::asm;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// CF=1: no current VMCS, or the operand is invalid.
    Invalid,
    /// ZF=1: the error number is in the VM-instruction error field.
    Valid,
}

impl core::fmt::Display for VmFail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            VmFail::Invalid => "VMfailInvalid",
            VmFail::Valid => "VMfailValid",
        })
    }
}

fn result(carry: u8, zero: u8) -> Result<(), VmFail> {
    match (carry, zero) {
        (0, 0) => Ok(()),
        (0, _) => Err(VmFail::Valid),
        _ => Err(VmFail::Invalid),
    }
}

/// VMXON with the region at physical address `region`.
pub fn vmxon(region: u64) -> Result<(), VmFail> {
    let carry: u8;
    let zero: u8;
    // SAFETY: `region` is a page-aligned frame owned by the kernel that holds
    // the VMCS revision identifier; CR0/CR4 satisfy the VMX fixed bits and
    // IA32_FEATURE_CONTROL allows VMXON (checked by the caller).
    unsafe {
        asm!(
            "vmxon [{region}]",
            "setc {carry}",
            "setz {zero}",
            region = in(reg) &region,
            carry = out(reg_byte) carry,
            zero = out(reg_byte) zero,
            options(nostack),
        );
    }
    result(carry, zero)
}
