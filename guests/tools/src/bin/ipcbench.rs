//! `ipcbench`: round trips of the guest IPC hypercall from guest user space.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::hypercall::{self, rdtsc};
use moat_guest_tools::ipc::{self, Options};
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
    let opts = match run_or_exit("ipcbench", USAGE, Options::parse) {
        Ok(opts) => opts,
        Err(code) => return code,
    };
    let insn = hypercall::this_cpu_insn();
    let rax = ipc::call_rax(opts.portal);
    let mut samples = Vec::new();
    if samples.try_reserve_exact(opts.calls).is_err() {
        return fail(&format!("cannot keep {} samples", opts.calls));
    }
    for call in 0..opts.calls as u64 {
        let sent = ipc::payload(call);
        let start = rdtsc();
        let (status, reply) = hypercall::call(insn, rax, sent);
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

fn fail(why: &str) -> ExitCode {
    println!("ipcbench: FAIL {why}");
    ExitCode::FAILURE
}
