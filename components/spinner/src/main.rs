//! `spinner`: burns CPU without system calls for `ms` milliseconds of TSC
//! time and counts how often it was preempted — a gap of more than 1 ms
//! between two consecutive TSC reads means another component ran. Two
//! spinners of equal priority must both see gaps when the kernel shares
//! the CPU round-robin; without preemption the first would run to its end
//! untouched and the second would only start afterwards.
//!
//! Prints `spinner NAME: preempted N times` and, if N is 0,
//! `spinner NAME: never preempted`. Arguments: `name=...`, `ms=N`
//! (default 300), `tsc_hz=N`.
#![no_std]
#![no_main]

use common::{args, ms_to_ticks};
use moat_user::{println, rdtsc};

moat_user::entry!(main);

fn main(args: &str) -> i32 {
    let Ok(ms) = args::number(args, "ms", 300) else {
        println!("spinner: FAIL bad arguments '{args}'");
        return 2;
    };
    let name = args
        .split_whitespace()
        .find_map(|word| word.strip_prefix("name="))
        .unwrap_or("?");
    let tsc_hz = args::tsc_hz(args);
    let gap = ms_to_ticks(tsc_hz, 1);
    let end = rdtsc().saturating_add(ms_to_ticks(tsc_hz, ms));
    let mut preempted = 0u64;
    let mut last = rdtsc();
    while last < end {
        let now = rdtsc();
        if now.saturating_sub(last) > gap {
            preempted += 1;
        }
        last = now;
    }
    println!("spinner {name}: preempted {preempted} times");
    if preempted == 0 {
        println!("spinner {name}: never preempted");
    }
    0
}
