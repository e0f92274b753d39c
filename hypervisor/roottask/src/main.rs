//! The root task: the first user-mode program, started by the kernel from the
//! first boot module.
//!
//! Arguments (the module's command line after its name):
//! - `fault`: after the greeting, touch unmapped memory, to show that the
//!   kernel reports a faulting task and keeps running.
#![no_std]
#![no_main]

use moat_user::println;

moat_user::entry!(main);

fn main(args: &str) -> i32 {
    println!("roottask: hello from ring 3");
    if args.split_whitespace().any(|arg| arg == "fault") {
        println!("roottask: touching unmapped memory on purpose");
        // SAFETY: not safe at all: this write faults deliberately, and the
        // kernel is expected to end the task and report it.
        unsafe { core::ptr::write_volatile(0x10 as *mut u64, 0xdead) };
    }
    0
}
