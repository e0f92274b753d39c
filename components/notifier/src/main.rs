//! `notifier`: ups the shared semaphore (selector 21) `count` times,
//! `interval_ms` apart, then prints `notifier: N ups`.
//!
//! Arguments: `count=N` (default 100), `interval_ms=N` (default 5),
//! `tsc_hz=N` (default 1 GHz).
#![no_std]
#![no_main]

use common::rt::Sleeper;
use common::{args, ms_to_ticks};
use moat_user::{println, sys};

moat_user::entry!(main);

const SHARED_SM: u64 = 21;
const SLEEP_SM: u64 = 16;

fn main(args: &str) -> i32 {
    let (Ok(count), Ok(interval_ms)) = (
        args::number(args, "count", 100),
        args::number(args, "interval_ms", 5),
    ) else {
        println!("notifier: FAIL bad arguments '{args}'");
        return 2;
    };
    let interval = ms_to_ticks(args::tsc_hz(args), interval_ms);
    let sleeper = match Sleeper::new(SLEEP_SM) {
        Ok(sleeper) => sleeper,
        Err(status) => {
            println!("notifier: FAIL no semaphore to sleep on: {status}");
            return 1;
        }
    };
    for n in 0..count {
        // Some ups find the waiter blocked, some a count to add to.
        if interval != 0 && n % 10 != 9 {
            if let Err(status) = sleeper.for_ticks(interval) {
                println!("notifier: FAIL sleeping: {status}");
                return 1;
            }
        }
        if let Err(status) = sys::sm_up(SHARED_SM) {
            println!("notifier: FAIL up {n}: {status}");
            return 1;
        }
    }
    println!("notifier: {count} ups");
    0
}
