//! `waiter`: downs the shared semaphore (selector 21) `count` times and
//! prints `waiter: N notifications`.
//!
//! Arguments: `count=N` (default 100), `timeout_ms=N` for each down
//! (default 10000), `tsc_hz=N` (default 1 GHz); `then-none`: after the
//! `count` downs, one more must time out (nothing was counted twice).
#![no_std]
#![no_main]

use common::{args, ms_to_ticks};
use moat_user::{println, rdtsc, sys};

moat_user::entry!(main);

const SHARED_SM: u64 = 21;

fn main(args: &str) -> i32 {
    let (Ok(count), Ok(timeout_ms)) = (
        args::number(args, "count", 100),
        args::number(args, "timeout_ms", 10_000),
    ) else {
        println!("waiter: FAIL bad arguments '{args}'");
        return 2;
    };
    let timeout = ms_to_ticks(args::tsc_hz(args), timeout_ms);
    for n in 0..count {
        if let Err(status) = sys::sm_down(SHARED_SM, rdtsc().saturating_add(timeout), false) {
            println!("waiter: FAIL after {n} notifications: {status}");
            return 1;
        }
    }
    if args::flag(args, "then-none") {
        let deadline = rdtsc().saturating_add(ms_to_ticks(args::tsc_hz(args), 200));
        match sys::sm_down(SHARED_SM, deadline, false) {
            Err(moat_user::abi::Status::Timeout) => {
                println!("waiter: {count} notifications, then none");
                return 0;
            }
            other => {
                println!("waiter: FAIL one more notification than ups: {other:?}");
                return 1;
            }
        }
    }
    println!("waiter: {count} notifications");
    0
}
