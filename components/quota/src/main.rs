//! `quota`: creates semaphores until its kernel-memory quota is used up
//! (`create_sm` returns `QuotaExceeded`), revokes them all and creates one
//! more, which must succeed.
#![no_std]
#![no_main]

use moat_user::abi::{Space, Status};
use moat_user::{println, sys};

use common::sel;

moat_user::entry!(main);

const FIRST: u64 = sel::FIRST_OWN;
/// More than any quota a manifest gives: stop rather than loop for ever.
const LIMIT: u64 = 1 << 20;
/// `revoke` takes at most this many selectors at once.
const REVOKE_MAX: u64 = 65_536;

fn main(_args: &str) -> i32 {
    let mut created = 0;
    loop {
        match sys::create_sm(FIRST + created, sel::OWN_PD, 0) {
            Ok(()) => created += 1,
            Err(Status::QuotaExceeded) => break,
            Err(status) => {
                println!("quota: FAIL semaphore {created}: {status}");
                return 1;
            }
        }
        if created == LIMIT {
            println!("quota: FAIL {LIMIT} semaphores and no quota exceeded");
            return 1;
        }
    }
    println!("quota: exhausted after {created} semaphores (quota exceeded)");
    let mut base = FIRST;
    while base < FIRST + created {
        let count = (FIRST + created - base).min(REVOKE_MAX);
        if let Err(status) = sys::revoke(Space::Object, base, count, true) {
            println!("quota: FAIL revoking: {status}");
            return 1;
        }
        base += count;
    }
    match sys::create_sm(FIRST, sel::OWN_PD, 0) {
        Ok(()) => {
            println!("quota: recovered");
            0
        }
        Err(status) => {
            println!("quota: FAIL no semaphore after revoking: {status}");
            1
        }
    }
}
