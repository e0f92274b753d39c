//! `borrower`: borrows a page from `lender` (its portal at selector 20),
//! checks the pattern (`borrower: read the lent page`), asks the lender to
//! revoke it and touches it again — which must fault, for the root task to
//! report (its manifest entry does not restart it).
#![no_std]
#![no_main]

use common::lend::{pattern_word, OP_LEND, OP_REVOKE, PAGE_WORDS};
use moat_user::abi::{Space, TypedItem};
use moat_user::{println, sys};

moat_user::entry!(main);

const LENDER: u64 = 20;
/// Where the lent page lands: unused by anything else in this task.
const WINDOW: u64 = 0x0000_4000_0000_0000;

fn main(_args: &str) -> i32 {
    match borrow() {
        Ok(()) => {
            println!("borrower: FAIL the page is still readable after the revoke");
            1
        }
        Err(why) => {
            println!("borrower: FAIL {why}");
            1
        }
    }
}

fn borrow() -> Result<(), &'static str> {
    let utcb = moat_user::utcb();
    utcb.untyped = 0;
    utcb.typed = 0;
    utcb.recv_mem_base = WINDOW >> 12;
    utcb.recv_mem_count = 1;
    let reply = sys::call(LENDER, [OP_LEND, WINDOW >> 12, 0, 0, 0, 0])
        .map_err(|_| "the lend call failed")?;
    if reply[0] != 0 {
        return Err("the lender refused to lend");
    }
    let start = utcb.untyped as usize;
    let arrived = utcb
        .words
        .get(start..start + TypedItem::WORDS)
        .and_then(|w| TypedItem::decode([w[0], w[1], w[2]]));
    let landed = utcb.typed == 1
        && arrived
            .is_some_and(|item| item.space == Space::Memory && item.destination == WINDOW >> 12);
    if !landed {
        return Err("no page arrived in the window");
    }
    for i in 0..PAGE_WORDS {
        if read(i) != pattern_word(i) {
            return Err("the lent page does not hold the pattern");
        }
    }
    println!("borrower: read the lent page");

    let reply =
        sys::call(LENDER, [OP_REVOKE, 0, 0, 0, 0, 0]).map_err(|_| "the revoke call failed")?;
    if reply[0] != 0 {
        return Err("the lender could not revoke");
    }
    println!("borrower: the page was revoked, touching it again");
    read(0);
    Ok(())
}

/// Word `i` of the window.
fn read(i: usize) -> u64 {
    let word = (WINDOW as *const u64).wrapping_add(i);
    // SAFETY: the window was free in this task and the kernel mapped the lent
    // page there (the typed item reported it); after the revoke the read is
    // meant to fault, which ends this task and nothing else.
    unsafe { core::ptr::read_volatile(word) }
}
