//! `cargo xtask bench exits`: three round trips measured in one run, in
//! TSC ticks (instructions under QEMU `-icount shift=0` and Bochs
//! `sync=none`):
//! - `cpuid`: a CPUID exit handled by this VMM — from `vcpu_run` to the
//!   next `vcpu_run` returning, timed here;
//! - `hypercall`: the guest IPC hypercall to the native `echo` server,
//!   handled by the kernel without this VMM — timed by the guest with RDTSC
//!   around VMCALL/VMMCALL and stored in guest RAM;
//! - `native`: a call from this VMM to the same `echo` portal, for
//!   reference.
//!
//! Prints `bench exits <case> median=<ticks> min=<ticks> iterations=<n>`.

use super::{checked, ram, start, teardown, KernelCall, ECHO, STATE_BASE, VM_BASE};
use alloc::vec::Vec;
use common::stats;
use moat_abi::vcpu::{exit_reason, group, VcpuState};
use moat_abi::HYPERCALL_IPC;
use moat_testvm::ECHO_SELECTOR;
use moat_testvmm::setup;
use moat_user::{println, rdtsc, sys};

const ITERATIONS: usize = 10_000;
const WARMUP: usize = 100;
/// Where the hypercall loop stores its samples in guest RAM.
const SAMPLES: usize = 0x1_0000;

/// `1: xor eax, eax; cpuid; jmp 1b`
const CPUID_LOOP: [u8; 6] = [0x31, 0xc0, 0x0f, 0xa2, 0xeb, 0xfa];
const CPUID_LENGTH: u64 = 2;

/// r12 = sample buffer, r14 = count; each round: rdtsc, hypercall, rdtsc,
/// store the difference; then hlt. Byte 38 is the hypercall's last opcode
/// byte (VMCALL c1 / VMMCALL d9), patched by vendor.
fn hypercall_loop(count: u32, selector: u64) -> [u8; 72] {
    let mut code = [0u8; 72];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        code[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&[0x49, 0xc7, 0xc4]); // mov r12, SAMPLES
    put(&(SAMPLES as u32).to_le_bytes());
    put(&[0x49, 0xc7, 0xc6]); // mov r14, count
    put(&count.to_le_bytes());
    // loop:
    put(&[0x0f, 0x31]); // rdtsc
    put(&[0x48, 0xc1, 0xe2, 0x20]); // shl rdx, 32
    put(&[0x48, 0x09, 0xd0]); // or rax, rdx
    put(&[0x49, 0x89, 0xc5]); // mov r13, rax
    put(&[0x48, 0xb8]); // movabs rax, HYPERCALL_IPC + selector
    put(&(HYPERCALL_IPC + selector).to_le_bytes());
    put(&[0x0f, 0x01, 0xc1]); // vmcall (patched to vmmcall on AMD)
    put(&[0x0f, 0x31]); // rdtsc
    put(&[0x48, 0xc1, 0xe2, 0x20]); // shl rdx, 32
    put(&[0x48, 0x09, 0xd0]); // or rax, rdx
    put(&[0x4c, 0x29, 0xe8]); // sub rax, r13
    put(&[0x49, 0x89, 0x04, 0x24]); // mov [r12], rax
    put(&[0x49, 0x83, 0xc4, 0x08]); // add r12, 8
    put(&[0x49, 0xff, 0xce]); // dec r14
    put(&[0x75, 0xce]); // jnz loop (-50)
    put(&[0xf4]); // hlt
    code
}

const HYPERCALL_OPCODE_BYTE: usize = 14 + 2 + 4 + 3 + 3 + 10 + 2;

fn amd() -> bool {
    let r = core::arch::x86_64::__cpuid(0);
    r.ebx == u32::from_le_bytes(*b"Auth")
}

fn report(case: &str, samples: &mut [u32]) {
    match stats::median_min(samples) {
        Some((median, min)) => println!(
            "bench exits {case} median={median} min={min} iterations={}",
            samples.len()
        ),
        None => println!("testvmm: FAIL bench {case}: no samples"),
    }
}

fn state(page: u64) -> &'static mut VcpuState {
    // SAFETY: create_vcpu mapped the state page at `page`; the vCPU runs
    // only inside vcpu_run, while this thread waits.
    unsafe { &mut *(page as *mut VcpuState) }
}

fn cpuid(vm: u64, vcpu: u64, page: u64) -> Result<Vec<u32>, KernelCall> {
    // SAFETY: the VMM's RAM buffer; no VM runs from it now.
    let initial =
        setup::prepare_long_mode_code(&CPUID_LOOP, unsafe { ram() }).map_err(|_| KernelCall {
            call: "setup",
            status: moat_abi::Status::BadParameter,
        })?;
    start(vm, vcpu, page, initial)?;
    let mut samples = Vec::with_capacity(ITERATIONS);
    for i in 0..WARMUP + ITERATIONS {
        let before = rdtsc();
        checked("vcpu_run", sys::vcpu_run(vcpu))?;
        let after = rdtsc();
        let st = state(page);
        if st.exit.reason != exit_reason::CPUID {
            println!(
                "testvmm: FAIL bench cpuid: exit {} at {:#x}",
                st.exit.reason, st.rip
            );
            break;
        }
        st.rip += CPUID_LENGTH;
        st.dirty = group::RIP_RFLAGS;
        if i >= WARMUP {
            samples.push((after - before) as u32);
        }
    }
    Ok(samples)
}

fn hypercall(vm: u64, vcpu: u64, page: u64) -> Result<Vec<u32>, KernelCall> {
    let total = (WARMUP + ITERATIONS) as u32;
    let mut code = hypercall_loop(total, ECHO_SELECTOR);
    if amd() {
        code[HYPERCALL_OPCODE_BYTE] = 0xd9;
    }
    // SAFETY: the VMM's RAM buffer; no VM runs from it now.
    let initial =
        setup::prepare_long_mode_code(&code, unsafe { ram() }).map_err(|_| KernelCall {
            call: "setup",
            status: moat_abi::Status::BadParameter,
        })?;
    start(vm, vcpu, page, initial)?;
    checked("vcpu_run", sys::vcpu_run(vcpu))?;
    let st = state(page);
    if st.exit.reason != exit_reason::HLT {
        println!(
            "testvmm: FAIL bench hypercall: exit {} at {:#x}",
            st.exit.reason, st.rip
        );
        return Ok(Vec::new());
    }
    // SAFETY: the guest has halted; its RAM is the VMM's buffer.
    let ram = unsafe { ram() };
    let samples = (WARMUP..WARMUP + ITERATIONS)
        .map(|i| {
            let at = SAMPLES + 8 * i;
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&ram[at..at + 8]);
            u64::from_le_bytes(bytes) as u32
        })
        .collect();
    Ok(samples)
}

fn native() -> Vec<u32> {
    let mut samples = Vec::with_capacity(ITERATIONS);
    for i in 0..WARMUP + ITERATIONS {
        let before = rdtsc();
        let reply = sys::call(ECHO, [1, 2, 3, 4, 5, 6]);
        let after = rdtsc();
        if reply != Ok([2, 3, 4, 5, 6, 7]) {
            println!("testvmm: FAIL bench native: {reply:?}");
            break;
        }
        if i >= WARMUP {
            samples.push((after - before) as u32);
        }
    }
    samples
}

pub fn run() -> i32 {
    {
        let mut samples = native();
        report("native", &mut samples);
    }
    for (n, case) in [("cpuid", 0u64), ("hypercall", 1)] {
        let vm = VM_BASE + 2 * case;
        let vcpu = vm + 1;
        let page = STATE_BASE + case * moat_abi::PAGE_SIZE;
        let result = if n == "cpuid" {
            cpuid(vm, vcpu, page)
        } else {
            hypercall(vm, vcpu, page)
        };
        match result {
            Ok(mut samples) => report(n, &mut samples),
            Err(error) => println!("testvmm: FAIL bench {n}: {error}"),
        }
        if let Err(error) = teardown(vm, vcpu) {
            println!("testvmm: FAIL bench {n}: {error}");
        }
    }
    println!("testvmm: bench done");
    0
}
