//! `ticker`: prints `ticker: 1`, `ticker: 2`, … one every period, then
//! `ticker: done`. Proof of progress while other components misbehave.
//!
//! Arguments: `count=N` (default 100), `period_ms=N` (default 20),
//! `tsc_hz=N` (from the root task; default 1 GHz).
#![no_std]
#![no_main]

use common::rt::Sleeper;
use common::{args, ms_to_ticks};
use moat_user::{println, rdtsc};

moat_user::entry!(main);

const SLEEP_SM: u64 = 16;

fn main(args: &str) -> i32 {
    let (Ok(count), Ok(period_ms)) = (
        args::number(args, "count", 100),
        args::number(args, "period_ms", 20),
    ) else {
        println!("ticker: FAIL bad arguments '{args}'");
        return 2;
    };
    let period = ms_to_ticks(args::tsc_hz(args), period_ms);
    let sleeper = match Sleeper::new(SLEEP_SM) {
        Ok(sleeper) => sleeper,
        Err(status) => {
            println!("ticker: FAIL no semaphore to sleep on: {status}");
            return 1;
        }
    };
    // Deadlines from one start, so a late wake-up does not shift the rest.
    let start = rdtsc();
    for n in 1..=count {
        if let Err(status) = sleeper.until(start.saturating_add(n.saturating_mul(period))) {
            println!("ticker: FAIL sleeping: {status}");
            return 1;
        }
        println!("ticker: {n}");
    }
    println!("ticker: done");
    0
}
