//! The raw `syscall` instruction, per argument count.

use core::arch::asm;
use moat_abi::{Call, Status};

fn status(rax: usize) -> Status {
    // A code this runtime does not know is still a failure.
    Status::from_code(rax).unwrap_or(Status::BadCall)
}

pub fn call2(call: Call, a0: usize, a1: usize) -> Status {
    status(raw2(call.number(), a0, a1))
}

pub fn call1(call: Call, a0: usize) -> Status {
    call2(call, a0, 0)
}

/// Any call number with any two arguments; returns `rax` as the kernel left
/// it. For tests that feed the kernel bad input.
pub fn raw2(number: usize, a0: usize, a1: usize) -> usize {
    let rax: usize;
    // SAFETY: `syscall` enters the kernel, which preserves every register but
    // rax (status), rcx and r11 (clobbered by the instruction) and touches no
    // memory of ours except through the documented pointer arguments.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number => rax,
            in("rdi") a0,
            in("rsi") a1,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    rax
}
