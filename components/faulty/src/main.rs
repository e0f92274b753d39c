//! `faulty`: prints `faulty: run`, waits a little, then writes to an
//! unmapped address — for the root task to report and restart it.
//!
//! Arguments: `delay_ms=N` (default 30), `tsc_hz=N` (default 1 GHz).
#![no_std]
#![no_main]

use common::rt::Sleeper;
use common::{args, ms_to_ticks};
use moat_user::println;

moat_user::entry!(main);

const SLEEP_SM: u64 = 16;
/// In the never-mapped first page.
const UNMAPPED: u64 = 0x18;

fn main(args: &str) -> i32 {
    println!("faulty: run");
    let delay = ms_to_ticks(
        args::tsc_hz(args),
        args::number(args, "delay_ms", 30).unwrap_or(30),
    );
    if let Err(status) = Sleeper::new(SLEEP_SM).and_then(|s| s.for_ticks(delay)) {
        println!("faulty: cannot sleep ({status}), faulting at once");
    }
    println!("faulty: writing to {UNMAPPED:#x}");
    // SAFETY: not safe at all, on purpose: the write faults, and the root
    // task is expected to see the page fault and restart this component.
    unsafe { core::ptr::write_volatile(UNMAPPED as *mut u64, 0xfa17) };
    println!("faulty: FAIL the write to {UNMAPPED:#x} did not fault");
    1
}
