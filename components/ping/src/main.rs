//! `ping`: the client of `echo` (its portal at selector 20).
//!
//! Arguments: `calls=N` (default 10000) payload-checked calls, then
//! `ping: N calls, payload checked`; with `bench`, instead the round-trip
//! benchmark: `iterations=N` (default 10000) timed calls per case, one line
//! `bench ipc <case> median=<ticks> min=<ticks> iterations=<n>` per case.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use common::{args, stats};
use moat_user::abi::Status;
use moat_user::{println, rdtsc, sys};

moat_user::entry!(main);

const ECHO: u64 = 20;
/// Extra words in the UTCB for a 64-word message (6 travel in registers).
const UTCB_EXTRA: usize = 58;
/// Every this many checked calls also carries [`UTCB_EXTRA`] words.
const LONG_EVERY: u64 = 16;
const WARMUP: u64 = 100;

fn main(args: &str) -> i32 {
    let (Ok(calls), Ok(iterations)) = (
        args::number(args, "calls", 10_000),
        args::number(args, "iterations", 10_000),
    ) else {
        println!("ping: FAIL bad arguments '{args}'");
        return 2;
    };
    let result = if args::flag(args, "bench") {
        bench(iterations.max(1))
    } else {
        pingpong(calls)
    };
    match result {
        Ok(()) => 0,
        Err(why) => {
            println!("ping: FAIL {why}");
            1
        }
    }
}

/// Why a call went wrong.
enum Failure {
    Status {
        call: u64,
        status: Status,
    },
    Payload {
        call: u64,
        word: usize,
        got: u64,
        want: u64,
    },
    UtcbSum {
        call: u64,
        got: u64,
        want: u64,
    },
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Failure::Status { call, status } => write!(f, "call {call}: {status}"),
            Failure::Payload {
                call,
                word,
                got,
                want,
            } => {
                write!(
                    f,
                    "call {call}: word {word} is {got:#x}, expected {want:#x}"
                )
            }
            Failure::UtcbSum { call, got, want } => {
                write!(f, "call {call}: UTCB sum is {got:#x}, expected {want:#x}")
            }
        }
    }
}

/// Words of call `i`: distinct within and across calls.
fn message(i: u64) -> [u64; 6] {
    core::array::from_fn(|k| (i << 8 | k as u64) ^ 0x5a5a_0000_0000_0000)
}

/// Puts `extra` words for call `i` in the UTCB; returns their wrapping sum.
fn load_utcb(i: u64, extra: usize) -> u64 {
    let utcb = moat_user::utcb();
    utcb.typed = 0;
    utcb.untyped = extra as u64;
    let mut sum = 0u64;
    for (j, word) in utcb.words[..extra].iter_mut().enumerate() {
        *word = i.wrapping_mul(1000).wrapping_add(j as u64);
        sum = sum.wrapping_add(*word);
    }
    sum
}

fn checked_call(i: u64, extra: usize) -> Result<(), Failure> {
    let words = message(i);
    let sum = load_utcb(i, extra);
    let reply = sys::call(ECHO, words).map_err(|status| Failure::Status { call: i, status })?;
    for (k, (&got, &sent)) in reply.iter().zip(&words).enumerate() {
        let want = sent.wrapping_add(1);
        if got != want {
            return Err(Failure::Payload {
                call: i,
                word: k,
                got,
                want,
            });
        }
    }
    let utcb = moat_user::utcb();
    let (got, want) = match extra {
        0 => (utcb.untyped, 0),
        _ if utcb.untyped != 1 => (utcb.untyped, 1),
        _ => (utcb.words[0], sum),
    };
    if got != want {
        return Err(Failure::UtcbSum { call: i, got, want });
    }
    Ok(())
}

fn pingpong(calls: u64) -> Result<(), Failure> {
    for i in 0..calls {
        let extra = if i % LONG_EVERY == 0 { UTCB_EXTRA } else { 0 };
        checked_call(i, extra)?;
    }
    println!("ping: {calls} calls, payload checked");
    Ok(())
}

struct Case {
    name: &'static str,
    words: bool,
    extra: usize,
}

const CASES: [Case; 3] = [
    Case {
        name: "null",
        words: false,
        extra: 0,
    },
    Case {
        name: "words6",
        words: true,
        extra: 0,
    },
    Case {
        name: "words64",
        words: true,
        extra: UTCB_EXTRA,
    },
];

fn bench(iterations: u64) -> Result<(), Failure> {
    println!("ping: bench, {iterations} round trips per case, in TSC ticks");
    let mut samples: Vec<u32> = Vec::with_capacity(iterations as usize);
    for case in &CASES {
        samples.clear();
        for i in 0..WARMUP + iterations {
            let words = if case.words { message(i) } else { [0; 6] };
            load_utcb(i, case.extra);
            let start = rdtsc();
            let reply = sys::call(ECHO, words);
            let end = rdtsc();
            let reply = reply.map_err(|status| Failure::Status { call: i, status })?;
            if reply[0] != words[0].wrapping_add(1) {
                let want = words[0].wrapping_add(1);
                return Err(Failure::Payload {
                    call: i,
                    word: 0,
                    got: reply[0],
                    want,
                });
            }
            if i >= WARMUP {
                samples.push(u32::try_from(end.wrapping_sub(start)).unwrap_or(u32::MAX));
            }
        }
        if let Some((median, min)) = stats::median_min(&mut samples) {
            println!(
                "bench ipc {} median={median} min={min} iterations={iterations}",
                case.name
            );
        }
    }
    Ok(())
}
