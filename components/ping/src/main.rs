//! `ping`: the client of `echo` (its portal at selector 20).
//!
//! Arguments: `calls=N` (default 10000) payload-checked calls, then
//! `ping: N calls, payload checked`; with `bench`, instead the round-trip
//! benchmark: `iterations=N` (default 10000) timed calls per case, one line
//! `bench ipc <case> median=<ticks> min=<ticks> iterations=<n>` per case;
//! with `throughput` or `wakeup-cpu=K`, the SMP benchmarks (`smp`); with
//! `lent-fault`, a server of its own that faults in a call and is destroyed
//! by its exception handler (`chain`).
#![no_std]
#![no_main]

extern crate alloc;

mod chain;
mod smp;

use alloc::vec::Vec;
use common::{args, echo_ops, rt, stats};
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
    if args::flag(args, "crash-server") {
        return crash_server(args::tsc_hz(args));
    }
    if args::flag(args, "lent-fault") {
        return chain::lent_fault();
    }
    if args::flag(args, "die-during-call") {
        return die_during_call(args::tsc_hz(args));
    }
    let smp = if args::flag(args, "throughput") {
        Some(smp::throughput(args, calls))
    } else {
        args::value(args, "wakeup-cpu")
            .and_then(args::parse_number)
            .map(|to| smp::wakeup(args, to, iterations.max(1)))
    };
    if let Some(result) = smp {
        return match result {
            Ok(()) => 0,
            Err(why) => {
                println!("ping: FAIL {why}");
                1
            }
        };
    }
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

/// Makes `echo` crash inside a call: the call must fail with `Dead`; then
/// waits for the restarted server (the root gives us its new portal at the
/// same selector) to answer.
fn crash_server(tsc_hz: u64) -> i32 {
    match sys::call(ECHO, [echo_ops::CRASH, 0, 0, 0, 0, 0]) {
        Err(Status::Dead) => println!("ping: the server died during the call: {}", Status::Dead),
        other => {
            println!("ping: FAIL crashing call returned {other:?}");
            return 1;
        }
    }
    let sleeper = match rt::Sleeper::new(SLEEP_SM) {
        Ok(sleeper) => sleeper,
        Err(status) => {
            println!("ping: FAIL create_sm: {status}");
            return 1;
        }
    };
    for _ in 0..200 {
        if sys::call(ECHO, [1, 2, 3, 4, 5, 6]) == Ok([2, 3, 4, 5, 6, 7]) {
            println!("ping: the restarted server answers");
            return 0;
        }
        let _ = sleeper.for_ticks(common::ms_to_ticks(tsc_hz, 10));
    }
    println!("ping: FAIL the restarted server never answered");
    1
}

static SECOND_STACK: moat_user::Stack<8192> = moat_user::Stack::new();
static TSC: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// A second EC that faults 50 ms from now, while the main EC waits in a
/// slow call: the root then destroys this PD with the call outstanding,
/// and `echo` must see its reply come back `Aborted`.
fn die_during_call(tsc_hz: u64) -> i32 {
    TSC.store(tsc_hz, core::sync::atomic::Ordering::Relaxed);
    let rip = second_ec as *const () as u64;
    let made = sys::create_ec(
        SECOND_EC,
        0,
        false,
        moat_user::abi::CPU_OF_CALLER,
        rip,
        SECOND_STACK.top() - 8,
        SECOND_UTCB,
        1,
        1,
    )
    .and_then(|()| sys::create_sc(SECOND_SC, 0, SECOND_EC, 40, 10_000));
    if let Err(status) = made {
        println!("ping: FAIL second EC: {status}");
        return 1;
    }
    println!("ping: calling the slow server; this PD dies before the reply");
    let result = sys::call(ECHO, [echo_ops::SLOW, 0, 0, 0, 0, 0]);
    println!("ping: FAIL the slow call returned {result:?} although this PD was destroyed");
    1
}

extern "C" fn second_ec() -> ! {
    let tsc_hz = TSC.load(core::sync::atomic::Ordering::Relaxed);
    if let Ok(sleeper) = rt::Sleeper::new(SECOND_SM) {
        let _ = sleeper.for_ticks(common::ms_to_ticks(tsc_hz, 50));
    }
    // SAFETY: not safe: faults on purpose so the root destroys this PD.
    unsafe { core::ptr::write_volatile(0x30 as *mut u64, 1) };
    sys::exit(3)
}

const SLEEP_SM: u64 = 40;
const SECOND_EC: u64 = 41;
const SECOND_SC: u64 = 42;
const SECOND_SM: u64 = 43;
const SECOND_UTCB: u64 = 0x0000_7fff_c000_0000;

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
