//! `lent-fault`: a server that faults while it serves this EC's call,
//! with its exception handler — also in this PD — destroying it before
//! the handler replies. The call must come back `Dead` and this EC must
//! run again: its SC was lent on through the server to the exception
//! handler, and goes back to it when the handler's activation ends (the
//! kernel's `return_sc`; before it, this EC never ran again).

use moat_user::abi::{exception_reply, Space, Status};
use moat_user::{portal, println, sys, Stack};

moat_user::portal_entry!(chain_server_entry, serve);
moat_user::portal_entry!(chain_fault_entry, on_fault);

const SERVER_EC: u64 = 60;
const SERVER_PT: u64 = 61;
const FAULT_EC: u64 = 62;
const FAULT_PT: u64 = 63;
const SERVER_UTCB: u64 = 0x0000_7fff_e000_0000;
const FAULT_UTCB: u64 = 0x0000_7fff_e000_1000;
static SERVER_STACK: Stack<8192> = Stack::new();
static FAULT_STACK: Stack<8192> = Stack::new();

pub fn lent_fault() -> i32 {
    let made = sys::create_ec(FAULT_EC, 0, true, 0, 0, FAULT_STACK.top(), FAULT_UTCB, 1, 2)
        .and_then(|()| {
            sys::create_pt(
                FAULT_PT,
                0,
                FAULT_EC,
                portal::entry_address(chain_fault_entry),
                2,
            )
        })
        .and_then(|()| {
            sys::create_ec(
                SERVER_EC,
                0,
                true,
                0,
                0,
                SERVER_STACK.top(),
                SERVER_UTCB,
                FAULT_PT,
                3,
            )
        })
        .and_then(|()| {
            sys::create_pt(
                SERVER_PT,
                0,
                SERVER_EC,
                portal::entry_address(chain_server_entry),
                3,
            )
        });
    if let Err(status) = made {
        println!("ping: FAIL lent-fault setup: {status}");
        return 1;
    }
    match sys::call(SERVER_PT, [0; 6]) {
        Err(Status::Dead) => {
            println!("ping: lent-fault: the call came back dead and this EC runs again");
            0
        }
        other => {
            println!("ping: FAIL lent-fault: the call returned {other:?}");
            1
        }
    }
}

fn serve(_id: u64, _words: [u64; 6]) -> [u64; 6] {
    println!("ping: lent-fault: the server faults in the call");
    // SAFETY: not safe: the write faults on purpose; the exception
    // handler (`on_fault`) destroys this EC.
    unsafe { core::ptr::write_volatile(0x28 as *mut u64, 1) };
    [0; 6]
}

fn on_fault(_id: u64, _words: [u64; 6]) -> [u64; 6] {
    // The server waits for this reply, and its caller for the server's:
    // destroy it first, as a supervisor that restarts it may.
    match sys::revoke(Space::Object, SERVER_EC, 1, true) {
        Ok(()) => println!("ping: lent-fault: the exception handler destroyed the server"),
        Err(status) => println!("ping: FAIL lent-fault: revoke of the server: {status}"),
    }
    [exception_reply::KILL, 0, 0, 0, 0, 0]
}
