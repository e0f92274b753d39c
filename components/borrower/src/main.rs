//! `borrower`: borrows a page from `lender` (its portal at selector 20),
//! checks the pattern (`borrower: read the lent page`), asks the lender to
//! revoke it and touches it again — which must fault, for the root task to
//! report (its manifest entry does not restart it).
//!
//! With `reader-cpu=N` the touching is done by a second EC bound to CPU N
//! that reads the page in a loop while this EC (on another CPU) has it
//! revoked: once the revoke has returned, the reader's next read must
//! fault — which it does only if the kernel flushed CPU N's TLB (the
//! shootdown) before the revoke returned.
#![no_std]
#![no_main]

use common::lend::{pattern_word, OP_LEND, OP_REVOKE, PAGE_WORDS};
use common::{args, rt};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use moat_user::abi::{Space, TypedItem};
use moat_user::{println, sys};

moat_user::entry!(main);

const LENDER: u64 = 20;
/// Where the lent page lands: unused by anything else in this task.
const WINDOW: u64 = 0x0000_4000_0000_0000;

fn main(args: &str) -> i32 {
    let reader_cpu = args::value(args, "reader-cpu").and_then(args::parse_number);
    match borrow(reader_cpu, args::tsc_hz(args)) {
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

fn borrow(reader_cpu: Option<u64>, tsc_hz: u64) -> Result<(), &'static str> {
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
    if let Some(cpu) = reader_cpu {
        return revoke_under_reader(cpu, tsc_hz);
    }

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

const READER_EC: u64 = 41;
const READER_SC: u64 = 42;
const SLEEP_SM: u64 = 43;
const READER_UTCB: u64 = 0x0000_7fff_c000_0000;
static READER_STACK: moat_user::Stack<8192> = moat_user::Stack::new();
/// Set once the revoke call has returned.
static REVOKED: AtomicBool = AtomicBool::new(false);
/// Reads the reader made.
static READS: AtomicU64 = AtomicU64::new(0);

/// Starts the reader on `cpu`, lets it read, has the page revoked from
/// this CPU and waits for the reader's fault to end this task.
fn revoke_under_reader(cpu: u64, tsc_hz: u64) -> Result<(), &'static str> {
    sys::create_ec(
        READER_EC,
        0,
        false,
        cpu,
        reader as *const () as u64,
        READER_STACK.top() - 8,
        READER_UTCB,
        1,
        1,
    )
    .map_err(|_| "cannot create the reader EC")?;
    sys::create_sc(READER_SC, 0, READER_EC, 10, 10_000).map_err(|_| "cannot start the reader")?;
    let sleeper = rt::Sleeper::new(SLEEP_SM).map_err(|_| "cannot create a semaphore")?;
    let tick = common::ms_to_ticks(tsc_hz, 10);
    for _ in 0..200 {
        if READS.load(Ordering::Relaxed) >= 10_000 {
            break;
        }
        let _ = sleeper.for_ticks(tick);
    }
    let before = READS.load(Ordering::Relaxed);
    if before < 10_000 {
        return Err("the reader on the other CPU does not run");
    }
    // Said before: once the revoke returns, the reader's fault may end this
    // task at any moment.
    println!("borrower: revoking while the reader on cpu {cpu} reads ({before} reads so far)");
    let reply =
        sys::call(LENDER, [OP_REVOKE, 0, 0, 0, 0, 0]).map_err(|_| "the revoke call failed")?;
    if reply[0] != 0 {
        return Err("the lender could not revoke");
    }
    REVOKED.store(true, Ordering::Release);
    for _ in 0..200 {
        let _ = sleeper.for_ticks(tick);
    }
    Err("the reader on the other CPU still reads the revoked page")
}

/// Reads the lent page until the revoke has returned — and once more,
/// which must fault.
extern "C" fn reader() -> ! {
    loop {
        let revoked = REVOKED.load(Ordering::Acquire);
        let word = read(0);
        READS.fetch_add(1, Ordering::Relaxed);
        if revoked {
            println!(
                "borrower: FAIL the reader read {word:#x} from the page after the revoke returned"
            );
            sys::exit(1);
        }
    }
}
