//! `echo`: the IPC benchmark server. Publishes the portal `echo`; a call
//! gets back each of its six words plus one and, when it carried extra
//! words in the UTCB, their wrapping sum as the one extra reply word.
//!
//! Arguments: `index=N` (its place in the manifest, for the registry).
#![no_std]
#![no_main]

use common::rt;
use moat_user::abi::UTCB_WORDS;
use moat_user::{portal, println, Stack};

moat_user::entry!(main);
moat_user::portal_entry!(echo_portal_entry, handle);

const HANDLER_EC: u64 = 16;
const PORTAL: u64 = 17;
const IDLE_SM: u64 = 18;
/// The handler EC's UTCB, in a part of the address space nothing else uses.
const HANDLER_UTCB: u64 = 0x0000_7fff_d000_0000;
const PORTAL_ID: u64 = 0xec40;

static HANDLER_STACK: Stack<16384> = Stack::new();

fn main(args: &str) -> i32 {
    let rip = portal::entry_address(echo_portal_entry);
    let serving = rt::create_portal(
        HANDLER_EC,
        PORTAL,
        HANDLER_STACK.top(),
        HANDLER_UTCB,
        rip,
        PORTAL_ID,
    )
    .and_then(|()| rt::publish("echo", PORTAL, args));
    if let Err(status) = serving {
        println!("echo: FAIL cannot serve: {status}");
        return 1;
    }
    println!("echo: serving");
    rt::block_forever(IDLE_SM)
}

fn handle(_id: u64, words: [u64; 6]) -> [u64; 6] {
    // SAFETY: HANDLER_UTCB was given to the successful create_ec of the
    // handler EC, which is running this; nothing else refers to that UTCB.
    let utcb = unsafe { moat_user::utcb_at(HANDLER_UTCB) };
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
