//! Extended (AVX) state is per vCPU: VM A loads a pattern into YMM0 and
//! exits; the VMM runs VM B, which loads another pattern into YMM0; A
//! resumes and must find its own pattern. Without the kernel's XSAVE
//! switching, B's pattern would still be in the register.
//!
//! Prints `testvmm: xsave: ok` (or `FAIL ...`).

use super::{checked, start_with_ram, teardown, KernelCall, STATE_BASE, VM_BASE};
use moat_abi::vcpu::{exit_reason, group, VcpuState};
use moat_abi::PAGE_SIZE;
use moat_testvm::layout::RAM_SIZE;
use moat_testvmm::setup;
use moat_user::{println, sys};

core::arch::global_asm!(
    ".pushsection .testvmm_ram, \"awx\", @nobits",
    ".balign 4096",
    ".globl testvmm_ram2",
    "testvmm_ram2:",
    ".zero {size}",
    ".popsection",
    size = const RAM_SIZE,
);

extern "C" {
    static mut testvmm_ram2: [u8; RAM_SIZE as usize];
}

/// The second VM's memory.
///
/// # Safety
/// No VM may run while the slice is used.
pub(crate) unsafe fn ram2() -> &'static mut [u8] {
    // SAFETY: a static of RAM_SIZE bytes; the caller keeps guests stopped.
    unsafe {
        core::slice::from_raw_parts_mut((&raw mut testvmm_ram2).cast::<u8>(), RAM_SIZE as usize)
    }
}

const PATTERN: usize = 0x1800;
/// The CPUID leaf at which the VMM switches to VM B.
const SWITCH_LEAF: u32 = 0x4000_0012;

/// Both guests: CR4.OSXSAVE, XCR0 = x87|SSE|AVX, YMM0 <- [0x1800].
const PROLOGUE: [u8; 31] = [
    0x0f, 0x20, 0xe0, // mov %cr4, %rax
    0x48, 0x0d, 0x00, 0x00, 0x04, 0x00, // or $0x40000, %rax
    0x0f, 0x22, 0xe0, // mov %rax, %cr4
    0x31, 0xc9, // xor %ecx, %ecx
    0xb8, 0x07, 0x00, 0x00, 0x00, // mov $7, %eax
    0x31, 0xd2, // xor %edx, %edx
    0x0f, 0x01, 0xd1, // xsetbv
    0xc5, 0xfe, 0x6f, 0x04, 0x25, 0x00, 0x18, // vmovdqu 0x1800, %ymm0 (disp32 ...
];

/// A: the prologue, then CPUID SWITCH_LEAF, YMM0 -> [0x1900], compare with
/// [0x1800], OUT 'Y' or 'N' to 0xe9, HLT.
fn guest_a() -> [u8; 80] {
    let mut code = [0u8; 80];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        code[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&PROLOGUE);
    put(&[0x00, 0x00]); // ... 00 00)
    put(&[0xb8]);
    put(&SWITCH_LEAF.to_le_bytes()); // mov $SWITCH_LEAF, %eax
    put(&[0x31, 0xc9, 0x0f, 0xa2]); // xor %ecx, %ecx; cpuid
    put(&[0xc5, 0xfe, 0x7f, 0x04, 0x25, 0x00, 0x19, 0x00, 0x00]); // vmovdqu %ymm0, 0x1900
    put(&[0xbe, 0x00, 0x18, 0x00, 0x00]); // mov $0x1800, %esi
    put(&[0xbf, 0x00, 0x19, 0x00, 0x00]); // mov $0x1900, %edi
    put(&[0xb9, 0x20, 0x00, 0x00, 0x00]); // mov $32, %ecx
    put(&[0xfc, 0xf3, 0xa6]); // cld; repe cmpsb
    put(&[0xb0, b'Y', 0x74, 0x02, 0xb0, b'N']); // 'Y', or 'N' if they differ
    put(&[0xe6, 0xe9, 0xf4]); // out %al, $0xe9; hlt
    code
}

/// B: the prologue, then HLT.
fn guest_b() -> [u8; 40] {
    let mut code = [0u8; 40];
    code[..PROLOGUE.len()].copy_from_slice(&PROLOGUE);
    code[PROLOGUE.len()..PROLOGUE.len() + 3].copy_from_slice(&[0x00, 0x00, 0xf4]);
    code
}

fn state(page: u64) -> &'static mut VcpuState {
    // SAFETY: create_vcpu mapped the state page there; the vCPU runs only
    // inside vcpu_run, while this thread waits.
    unsafe { &mut *(page as *mut VcpuState) }
}

/// Runs a vCPU until an exit other than XSETBV (which it grants).
fn run_until(vcpu: u64, page: u64) -> Result<u32, KernelCall> {
    loop {
        checked("vcpu_run", sys::vcpu_run(vcpu))?;
        let st = state(page);
        if st.exit.reason != exit_reason::XSETBV {
            return Ok(st.exit.reason);
        }
        st.xcr0 = (st.rdx << 32) | (st.rax & 0xffff_ffff);
        st.rip += 3;
        st.dirty |= group::CONTROL_REGISTERS;
    }
}

fn check() -> Result<Result<(), &'static str>, KernelCall> {
    let (a_vm, b_vm) = (VM_BASE + 40, VM_BASE + 42);
    let (a_page, b_page) = (STATE_BASE + 40 * PAGE_SIZE, STATE_BASE + 41 * PAGE_SIZE);
    // SAFETY: no VM runs yet.
    let (ram_a, ram_b) = unsafe { (super::ram(), ram2()) };
    let state_a = setup::prepare_long_mode_code(&guest_a(), ram_a).map_err(|_| setup_failed())?;
    let state_b = setup::prepare_long_mode_code(&guest_b(), ram_b).map_err(|_| setup_failed())?;
    for i in 0..32 {
        ram_a[PATTERN + i] = 0x11 + i as u8;
        ram_b[PATTERN + i] = 0xee;
    }
    let (ram_a_address, ram_b_address) = (ram_a.as_ptr() as u64, ram_b.as_ptr() as u64);
    start_with_ram(a_vm, a_vm + 1, a_page, state_a, ram_a_address)?;
    start_with_ram(b_vm, b_vm + 1, b_page, state_b, ram_b_address)?;
    let verdict = (|| {
        if run_until(a_vm + 1, a_page)? != exit_reason::CPUID {
            return Ok(Err("A did not reach its CPUID"));
        }
        if run_until(b_vm + 1, b_page)? != exit_reason::HLT {
            return Ok(Err("B did not halt"));
        }
        let a = state(a_page);
        a.rip += 2;
        a.dirty |= group::RIP_RFLAGS;
        if run_until(a_vm + 1, a_page)? != exit_reason::IO || a.exit.port != 0xe9 {
            return Ok(Err("A did not report"));
        }
        Ok(if a.rax as u8 == b'Y' {
            Ok(())
        } else {
            Err("A's YMM0 changed while B ran")
        })
    })();
    let down_a = teardown(a_vm, a_vm + 1);
    let down_b = teardown(b_vm, b_vm + 1);
    let verdict = verdict?;
    down_a?;
    down_b?;
    Ok(verdict)
}

fn setup_failed() -> KernelCall {
    KernelCall {
        call: "setup",
        status: moat_abi::Status::BadParameter,
    }
}

pub fn run() -> bool {
    match check() {
        Ok(Ok(())) => {
            println!("testvmm: xsave: ok");
            true
        }
        Ok(Err(why)) => {
            println!("testvmm: xsave: FAIL {why}");
            false
        }
        Err(error) => {
            println!("testvmm: xsave: FAIL {error}");
            false
        }
    }
}
