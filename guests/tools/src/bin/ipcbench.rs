//! `ipcbench`: round trips of the guest IPC hypercall from guest user space.

use std::arch::asm;
use std::arch::x86_64::{__cpuid, _rdtsc};
use std::process::ExitCode;

use moat_guest_tools::args::{Parsed, EXIT_USAGE};
use moat_guest_tools::ipc::{self, Insn, Message, Options};
use moat_guest_tools::stats::Summary;

const USAGE: &str = "\
usage: ipcbench [--calls N] [--portal SEL] [--expect echo|none]

Calls the native portal SEL (default 20) of the VM's object space N times
(default 1000) with the Moat guest IPC hypercall (VMCALL on Intel, VMMCALL on
AMD), a different message each time, times each call with the TSC and prints
  ipcbench: N calls, median X cycles, min Y cycles
Every reply must have status 0 and, with --expect echo (the default), each
word plus one, as the native echo server answers; --expect none checks the
status only. Else it prints `ipcbench: FAIL ...` and exits 1 (2: usage).
Under Moat a VM made without USER_HYPERCALLS answers status 5 (insufficient
rights). Elsewhere: KVM answers user-mode hypercalls with -1 (0xffff...);
where nothing handles the instruction (no hypervisor, QEMU without
acceleration), it raises #UD and the process dies with SIGILL.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Options::parse(&args) {
        Ok(Parsed::Run(opts)) => opts,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("ipcbench: {}\n{USAGE}", e.0);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let leaf0 = __cpuid(0);
    let insn = Insn::for_vendor(&ipc::vendor(leaf0.ebx, leaf0.edx, leaf0.ecx));
    let rax = ipc::call_rax(opts.portal);
    let mut samples = Vec::new();
    if samples.try_reserve_exact(opts.calls).is_err() {
        return fail(&format!("cannot keep {} samples", opts.calls));
    }
    for call in 0..opts.calls as u64 {
        let sent = ipc::payload(call);
        let start = rdtsc();
        let (status, reply) = hypercall(insn, rax, sent);
        let end = rdtsc();
        if status != 0 {
            return fail(&format!(
                "call {call} ({} to portal {}): status {}",
                insn.name(),
                opts.portal,
                ipc::status_text(status)
            ));
        }
        if let Err(e) = opts.expect.check(&sent, &reply) {
            return fail(&format!("call {call}: {e}"));
        }
        samples.push(end.wrapping_sub(start));
    }
    match Summary::of(&mut samples) {
        Some(summary) => {
            println!("{}", ipc::report(&summary));
            ExitCode::SUCCESS
        }
        None => fail("no samples"),
    }
}

/// One guest IPC hypercall: `rax` in, status out; the message words in
/// `rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9`, the reply in the same.
fn hypercall(insn: Insn, rax: u64, message: Message) -> (u64, Message) {
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

/// The time-stamp counter.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter; Linux leaves it to user space
    // (CR4.TSD clear), so it does not fault.
    unsafe { _rdtsc() }
}

fn fail(why: &str) -> ExitCode {
    println!("ipcbench: FAIL {why}");
    ExitCode::FAILURE
}
