//! `echo`: the IPC benchmark server. Publishes the portal `echo`; a call
//! gets back each of its six words plus one and, when it carried extra
//! words in the UTCB, their wrapping sum as the one extra reply word.
//!
//! Arguments: `index=N` (its place in the manifest, for the registry);
//! `service=NAME` publishes the portal as NAME instead (several echo
//! servers in one system, `cargo xtask bench smp`).
#![no_std]
#![no_main]

use common::{args, echo_ops, ms_to_ticks, rt};
use core::sync::atomic::{AtomicU64, Ordering};
use moat_user::abi::{Status, UTCB_WORDS};
use moat_user::{portal, println, rdtsc, sys, Stack};

moat_user::entry!(main);
moat_user::portal_entry!(echo_portal_entry, handle);

const PORTAL_ID: u64 = 0xec40;
/// The handler sleeps on this semaphore for `echo_ops::SLOW`.
const SLEEP_SM: u64 = 19;

static TSC_HZ: AtomicU64 = AtomicU64::new(1_000_000_000);

static HANDLER_STACK: Stack<16384> = Stack::new();

fn main(args: &str) -> i32 {
    TSC_HZ.store(args::tsc_hz(args), Ordering::Relaxed);
    if let Err(status) = sys::create_sm(SLEEP_SM, 0, 0) {
        println!("echo: FAIL create_sm: {status}");
        return 1;
    }
    let rip = portal::entry_address(echo_portal_entry);
    let name = args::value(args, "service").unwrap_or("echo");
    let serving = rt::serve(name, HANDLER_STACK.top(), rip, PORTAL_ID, args);
    if let Err(status) = serving {
        println!("echo: FAIL cannot serve: {status}");
        return 1;
    }
    println!("echo: serving");
    rt::block_forever(rt::server::IDLE_SM)
}

fn handle(_id: u64, words: [u64; 6]) -> [u64; 6] {
    match words[0] {
        echo_ops::CRASH => {
            println!("echo: crashing during a call, as asked");
            // SAFETY: not safe: the write faults on purpose, so the kernel
            // ends this handler and the caller gets `Dead`.
            unsafe { core::ptr::write_volatile(0x28 as *mut u64, 1) };
        }
        echo_ops::SLOW => {
            let ticks = ms_to_ticks(TSC_HZ.load(Ordering::Relaxed), 200);
            let _ = sys::sm_down(SLEEP_SM, rdtsc().saturating_add(ticks), false);
            match sys::reply(words) {
                Status::Aborted => println!("echo: reply aborted, the caller is gone"),
                other => println!("echo: FAIL the slow reply came back {other}"),
            }
            // Ends the activation (the runtime replies once more, to nobody).
            return words;
        }
        _ => {}
    }
    // SAFETY: server::HANDLER_UTCB was given to the successful create_ec of
    // handler EC, which is running this; nothing else refers to that UTCB.
    let utcb = unsafe { moat_user::utcb_at(rt::server::HANDLER_UTCB) };
    let extra = (utcb.untyped as usize).min(UTCB_WORDS);
    let sum = utcb.words[..extra]
        .iter()
        .fold(0u64, |sum, word| sum.wrapping_add(*word));
    utcb.typed = 0;
    utcb.untyped = 0;
    if extra > 0 {
        utcb.words[0] = sum;
        utcb.untyped = 1;
    }
    words.map(|word| word.wrapping_add(1))
}
