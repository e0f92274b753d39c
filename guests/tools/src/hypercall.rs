//! The guest IPC hypercall instruction (hypervisor/abi/README.md, "The guest
//! IPC hypercall"), written once for every tool that makes it, and the
//! time-stamp counter the benchmarks read: the only module of the library
//! with `unsafe`.

use std::arch::asm;
use std::arch::x86_64::{__cpuid, _rdtsc};

use crate::ipc::{self, Insn, Message};

/// The time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter; Linux leaves it to user space
    // (CR4.TSD clear), so it does not fault.
    unsafe { _rdtsc() }
}

/// The vendor string of the CPU this runs on (CPUID leaf 0).
pub fn cpu_vendor() -> [u8; 12] {
    let leaf0 = __cpuid(0);
    ipc::vendor(leaf0.ebx, leaf0.edx, leaf0.ecx)
}

/// The hypercall instruction of the CPU this runs on.
pub fn this_cpu_insn() -> Insn {
    Insn::for_vendor(&cpu_vendor())
}

/// One hypercall: `rax` in, status out; the message words in `rdi`, `rsi`,
/// `rdx`, `r10`, `r8`, `r9`, the reply in the same.
///
/// Under Moat, `rax` of the IPC hypercall is [`ipc::call_rax`]; any other
/// value goes to the VMM, which answers it as KVM answers an unknown
/// hypercall.
// Inlined, as when it was part of `ipcbench`, which times it: no call
// into the library between the two TSC reads.
#[inline]
pub fn call(insn: Insn, rax: u64, message: Message) -> (u64, Message) {
    let [mut w0, mut w1, mut w2, mut w3, mut w4, mut w5] = message;
    let mut status = rax;
    match insn {
        // SAFETY: the hypervisor changes only the registers named here
        // (hypervisor/abi/README.md, "The guest IPC hypercall") and touches
        // no memory of this process; where nothing handles the instruction
        // it raises #UD, which ends the process (SIGILL) before it returns.
        Insn::Vmcall => unsafe {
            asm!(
                "vmcall",
                inout("rax") status,
                inout("rdi") w0,
                inout("rsi") w1,
                inout("rdx") w2,
                inout("r10") w3,
                inout("r8") w4,
                inout("r9") w5,
                options(nostack),
            );
        },
        // SAFETY: as above; VMMCALL is the same call on AMD.
        Insn::Vmmcall => unsafe {
            asm!(
                "vmmcall",
                inout("rax") status,
                inout("rdi") w0,
                inout("rsi") w1,
                inout("rdx") w2,
                inout("r10") w3,
                inout("r8") w4,
                inout("r9") w5,
                options(nostack),
            );
        },
    }
    (status, [w0, w1, w2, w3, w4, w5])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register order of the vendor string, checked against what the
    /// host's Linux read from the same CPUID leaf (where it shows it).
    #[test]
    fn vendor_matches_the_kernels_view() {
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let Some(listed) = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .and_then(|rest| rest.split(':').nth(1))
        else {
            return;
        };
        let vendor = cpu_vendor();
        assert_eq!(std::str::from_utf8(&vendor), Ok(listed.trim()));
        assert_eq!(this_cpu_insn(), Insn::for_vendor(&vendor));
    }
}
