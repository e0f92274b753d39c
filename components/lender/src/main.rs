//! `lender`: publishes the portal `lender`. A call with `OP_LEND` gets one
//! of its pages (read-only, filled with a known pattern) as a typed item
//! into the caller's window; `OP_REVOKE` revokes everything lent from it.
//!
//! Arguments: `index=N` (its place in the manifest, for the registry).
#![no_std]
#![no_main]

use common::lend::{pattern_page, OP_LEND, OP_REVOKE, PAGE_WORDS};
use common::rt;
use moat_user::abi::{rights, Space, Status, TypedItem};
use moat_user::{portal, println, sys, Stack};

moat_user::entry!(main);
moat_user::portal_entry!(lender_portal_entry, handle);

const PORTAL_ID: u64 = 0x1e4d;

/// The lent page: alone in its page, read-only.
#[repr(C, align(4096))]
struct Page([u64; PAGE_WORDS]);

static LENT: Page = Page(pattern_page());

static HANDLER_STACK: Stack<16384> = Stack::new();

fn main(args: &str) -> i32 {
    let rip = portal::entry_address(lender_portal_entry);
    let serving = rt::serve("lender", HANDLER_STACK.top(), rip, PORTAL_ID, args);
    if let Err(status) = serving {
        println!("lender: FAIL cannot serve: {status}");
        return 1;
    }
    println!("lender: serving page {:#x}", lent_page());
    rt::block_forever(rt::server::IDLE_SM)
}

fn lent_page() -> u64 {
    core::ptr::addr_of!(LENT) as u64 >> 12
}

fn handle(_id: u64, words: [u64; 6]) -> [u64; 6] {
    // SAFETY: server::HANDLER_UTCB was given to the successful create_ec of
    // handler EC, which is running this; nothing else refers to that UTCB.
    let utcb = unsafe { moat_user::utcb_at(rt::server::HANDLER_UTCB) };
    utcb.untyped = 0;
    utcb.typed = 0;
    let status = match words[0] {
        OP_LEND => {
            let item = TypedItem {
                space: Space::Memory,
                rights: rights::MEM_READ,
                count: 1,
                source: lent_page(),
                destination: words[1],
            };
            utcb.words[..TypedItem::WORDS].copy_from_slice(&item.encode());
            utcb.typed = 1;
            println!(
                "lender: lending page {:#x} to page {:#x}",
                lent_page(),
                words[1]
            );
            Status::Success
        }
        OP_REVOKE => {
            // Said first: on several CPUs the borrower's reader may fault,
            // and the borrower be destroyed with this call (on its SC),
            // before the revoke returns here.
            println!("lender: revoking the lent page");
            revoke()
        }
        _ => Status::BadCall,
    };
    [status.code(), 0, 0, 0, 0, 0]
}

fn revoke() -> Status {
    match sys::revoke(Space::Memory, lent_page(), 1, false) {
        Ok(()) => {
            println!("lender: revoked the lent page");
            Status::Success
        }
        Err(status) => {
            println!("lender: FAIL revoke: {status}");
            status
        }
    }
}
