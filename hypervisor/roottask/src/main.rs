//! The root task: the first user-mode program, started by the kernel from the
//! first boot module.
//!
//! Arguments (the module's command line after its name):
//! - `probe-syscalls`: make calls with bad numbers, pointers and lengths and
//!   check that each gets its documented status;
//! - `fault`: after the greeting, touch unmapped memory, to show that the
//!   kernel reports a faulting task and keeps running.
#![no_std]
#![no_main]

use moat_user::abi::{Call, Status, CONSOLE_WRITE_MAX};
use moat_user::println;
use moat_user::syscall::raw2;

moat_user::entry!(main);

fn main(args: &str) -> i32 {
    println!("roottask: hello from ring 3");
    let mut failures = 0;
    for arg in args.split_whitespace() {
        match arg {
            "probe-syscalls" => failures += probe_syscalls(),
            "fault" => {
                println!("roottask: touching unmapped memory on purpose");
                // SAFETY: not safe at all: this write faults deliberately, and
                // the kernel is expected to end the task and report it.
                unsafe { core::ptr::write_volatile(0x10 as *mut u64, 0xdead) };
            }
            other => println!("roottask: unknown argument '{other}'"),
        }
    }
    failures
}

/// Hostile calls, each with the status the ABI promises; returns how many
/// got something else.
fn probe_syscalls() -> i32 {
    let text = b"0123456789";
    let console = Call::ConsoleWrite.number();
    let kernel_half = 0xffff_8000_0000_0000;
    let probes: [(&str, usize, usize, usize, Status); 7] = [
        ("unknown call number", 999, 0, 0, Status::BadCall),
        ("call number usize::MAX", usize::MAX, 0, 0, Status::BadCall),
        (
            "kernel-half pointer",
            console,
            kernel_half,
            8,
            Status::BadAddress,
        ),
        ("unmapped pointer", console, 0x10, 8, Status::BadAddress),
        (
            "non-canonical pointer",
            console,
            0x0000_8000_0000_0000,
            8,
            Status::BadAddress,
        ),
        (
            "range wrapping around",
            console,
            usize::MAX - 2,
            8,
            Status::BadAddress,
        ),
        (
            "length over the limit",
            console,
            text.as_ptr() as usize,
            CONSOLE_WRITE_MAX + 1,
            Status::BadParameter,
        ),
    ];
    let mut failures = 0;
    for (what, number, a0, a1, expected) in probes {
        let got = raw2(number, a0, a1);
        if got != expected.code() {
            println!(
                "roottask: probe '{what}': expected {expected} ({}), got {got}",
                expected.code()
            );
            failures += 1;
        }
    }
    if failures == 0 {
        println!(
            "roottask: {} syscall probes got their documented status",
            probes.len()
        );
    }
    failures
}
