//! Hostile calls, each with the status the ABI promises.

use moat_abi::{Call, CallWord, Status, CONSOLE_WRITE_MAX};
use moat_user::println;
use moat_user::sys::raw;

/// Makes each probe; returns how many got something else than promised.
pub fn syscalls() -> i32 {
    let text = b"0123456789";
    let word = |call: Call, sel: u64| CallWord::new(call, 0, sel).encode();
    let console = word(Call::ConsoleWrite, 0);
    let kernel_half = 0xffff_8000_0000_0000;
    let empty_selector = 4000;
    let probes: [(&str, u64, [u64; 6], Status); 14] = [
        ("unknown call number", 0xe7, [0; 6], Status::BadCall),
        ("call number 0xff", u64::MAX, [0; 6], Status::BadCall),
        (
            "kernel-half pointer",
            console,
            [kernel_half, 8, 0, 0, 0, 0],
            Status::BadAddress,
        ),
        (
            "unmapped pointer",
            console,
            [0x10, 8, 0, 0, 0, 0],
            Status::BadAddress,
        ),
        (
            "non-canonical pointer",
            console,
            [0x0000_8000_0000_0000, 8, 0, 0, 0, 0],
            Status::BadAddress,
        ),
        (
            "range wrapping around",
            console,
            [u64::MAX - 2, 8, 0, 0, 0, 0],
            Status::BadAddress,
        ),
        (
            "length over the limit",
            console,
            [
                text.as_ptr() as u64,
                CONSOLE_WRITE_MAX as u64 + 1,
                0,
                0,
                0,
                0,
            ],
            Status::BadParameter,
        ),
        (
            "call on an empty selector",
            word(Call::Call, empty_selector),
            [0; 6],
            Status::BadCapability,
        ),
        (
            "sm_up on a PD",
            word(Call::SmUp, 0),
            [0; 6],
            Status::BadCapability,
        ),
        (
            "create_sm on an occupied selector",
            word(Call::CreateSm, 0),
            [0; 6],
            Status::Occupied,
        ),
        (
            "reply outside a call",
            word(Call::Reply, 0),
            [0; 6],
            Status::BadCall,
        ),
        (
            "delegate into space 9",
            word(Call::Delegate, 0),
            [9, 0, 0, 1, 0, 0],
            Status::BadParameter,
        ),
        (
            "delegate of port 0x70 to the key of port 0x3f8",
            word(Call::Delegate, 0),
            [2, 0x70, 0x3f8, 1, 0xff, 0],
            Status::BadParameter,
        ),
        (
            "revoke of count 0",
            word(Call::Revoke, 0),
            [0, 100, 0, 0, 0, 0],
            Status::BadParameter,
        ),
    ];
    let mut failures = 0;
    for (what, rax, args, expected) in probes {
        let (got, _) = raw(rax, args);
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
