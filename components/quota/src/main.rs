//! `quota`: first checks its priority ceiling (the root task gives it its
//! priority, 10): a PD with a higher ceiling and an SC above it are both
//! refused. Then creates semaphores until its kernel-memory quota is used
//! up (`create_sm` returns `QuotaExceeded`), revokes them all and creates
//! one more, which must succeed.
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

/// The ceiling its manifest entry gives it (its priority).
const CEILING: u8 = 10;
/// Kernel memory for the PD made for the ceiling check.
const SPARE_QUOTA: u64 = 8192;
/// Where the EC made for the ceiling check would have its UTCB.
const SPARE_UTCB: u64 = 0x0000_7fff_c000_0000;

fn main(_args: &str) -> i32 {
    if let Err(why) = ceiling_holds() {
        println!("quota: FAIL {why}");
        return 1;
    }
    println!("quota: ceiling {CEILING} holds: a PD and an SC above it are refused");
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

/// The kernel refuses what would run above this PD's ceiling; what stays
/// within it works. Says what went wrong.
fn ceiling_holds() -> Result<(), &'static str> {
    let (pd, ec, sc) = (FIRST, FIRST + 1, FIRST + 2);
    if sys::create_pd(pd, sel::OWN_PD, SPARE_QUOTA, 16, CEILING + 1)
        != Err(Status::InsufficientRights)
    {
        return Err("create_pd above the ceiling was not refused");
    }
    if let Err(status) = sys::create_pd(pd, sel::OWN_PD, SPARE_QUOTA, 16, CEILING) {
        println!("quota: create_pd at the ceiling: {status}");
        return Err("create_pd at the ceiling failed");
    }
    sys::revoke(Space::Object, pd, 1, true).map_err(|_| "revoke failed")?;
    // An EC that never runs: its SC is refused.
    sys::create_ec(
        ec,
        sel::OWN_PD,
        false,
        moat_user::abi::CPU_OF_CALLER,
        0x1000,
        0x2000,
        SPARE_UTCB,
        u64::MAX,
        1,
    )
    .map_err(|status| {
        println!("quota: create_ec: {status}");
        "create_ec failed"
    })?;
    if sys::create_sc(sc, sel::OWN_PD, ec, CEILING + 1, 1000) != Err(Status::InsufficientRights) {
        return Err("create_sc above the ceiling was not refused");
    }
    sys::revoke(Space::Object, ec, 1, true).map_err(|_| "revoke failed")
}
