//! Guest debug registers. The host sets no breakpoints, so DR0-DR3 and DR6
//! can hold a guest's values between its runs: they are loaded right
//! before entry and read back right after the exit. DR7, which arms them,
//! is switched by the VMCS/VMCB (the host's is inactive).

use core::arch::asm;

/// Values the VMM asks for, made loadable: a non-canonical DR0-DR3 or a
/// DR6 with bits 63:32 set would make MOV to DRn fault in the kernel.
pub fn sanitize(values: [u64; 5]) -> [u64; 5] {
    use moat_kernel::paging::canonicalize as canonical;
    [
        canonical(values[0]),
        canonical(values[1]),
        canonical(values[2]),
        canonical(values[3]),
        values[4] & 0xffff_ffff,
    ]
}

/// Loads DR0-DR3 and DR6 from `values` (as `sanitize` returns them).
pub fn load(values: &[u64; 5]) {
    // SAFETY: writing debug registers in ring 0 only changes breakpoint
    // addresses and status; with the host's DR7 inactive nothing triggers.
    unsafe {
        asm!("mov dr0, {}", in(reg) values[0], options(nomem, nostack));
        asm!("mov dr1, {}", in(reg) values[1], options(nomem, nostack));
        asm!("mov dr2, {}", in(reg) values[2], options(nomem, nostack));
        asm!("mov dr3, {}", in(reg) values[3], options(nomem, nostack));
        asm!("mov dr6, {}", in(reg) values[4], options(nomem, nostack));
    }
}

/// Reads DR0-DR3 and DR6 into `values`.
pub fn save(values: &mut [u64; 5]) {
    // SAFETY: reading debug registers has no side effects.
    unsafe {
        asm!("mov {}, dr0", out(reg) values[0], options(nomem, nostack));
        asm!("mov {}, dr1", out(reg) values[1], options(nomem, nostack));
        asm!("mov {}, dr2", out(reg) values[2], options(nomem, nostack));
        asm!("mov {}, dr3", out(reg) values[3], options(nomem, nostack));
        asm!("mov {}, dr6", out(reg) values[4], options(nomem, nostack));
    }
}
