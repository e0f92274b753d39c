//! `fuzzer`: the hostile component. Makes seeded, reproducible system
//! calls with random numbers, flags, selectors, rights and pointers (the
//! rules in `common::fuzz`) and checks that each returns a status of the
//! ABI. Prints `fuzzer: N calls, every call returned a status` and a
//! histogram, or `fuzzer: BAD status …` for each call that did not.
//!
//! Arguments: `seed=N` (default 0x5eed), `calls=N` (default 100000).
#![no_std]
#![no_main]

use core::fmt::Write;

use common::args;
use common::fuzz::{Generator, Layout, Syscall, MAX_ITEMS};
use moat_user::abi::{layout, Call, Status, PAGE_SIZE};
use moat_user::{println, rdtsc, sys};

moat_user::entry!(main);

const DEFAULT_SEED: u64 = 0x5eed;
/// Where the fuzzer delegates its own pages to (nothing else is there).
const SCRATCH: u64 = 0x0000_5000_0000_0000;
const SCRATCH_PAGES: u64 = 64;
/// Assumed below the stack top; pointers beyond the real stack are just unmapped.
const STACK_SPAN: u64 = 1 << 20;
const PROGRESS_EVERY: u64 = 10_000;

/// What `console_write` may print of this task's memory.
static NOISE: [u8; 16] = *b"~~~~~~~~~~~~~~~~";

extern "C" {
    /// The end of the loaded image, defined by the linker.
    static _end: u8;
}

fn layout() -> Layout {
    let end = (&raw const _end) as u64;
    let noise = NOISE.as_ptr() as u64;
    Layout {
        // Everything below the end counts as the image: nothing else is mapped there.
        image: PAGE_SIZE..end.next_multiple_of(PAGE_SIZE),
        stack: layout::STACK_TOP - STACK_SPAN..layout::STACK_TOP,
        utcb: layout::MAIN_UTCB..layout::MAIN_UTCB + PAGE_SIZE,
        scratch: SCRATCH..SCRATCH + SCRATCH_PAGES * PAGE_SIZE,
        noise: noise..noise + NOISE.len() as u64,
    }
}

fn main(args: &str) -> i32 {
    let (Ok(seed), Ok(calls)) = (
        args::number(args, "seed", DEFAULT_SEED),
        args::number(args, "calls", 100_000),
    ) else {
        println!("fuzzer: FAIL bad arguments '{args}'");
        return 2;
    };
    println!("fuzzer: seed {seed:#x}, {calls} calls");
    let mut generator = Generator::new(seed, layout());
    let mut histogram = [0u64; Status::ALL.len()];
    let mut bad = 0u64;
    for i in 1..=calls {
        let call = generator.next(rdtsc());
        if call.word().number == Call::Call.number() {
            load_utcb(&call, &mut generator);
        }
        let (rax, _) = sys::raw(call.rax, call.args);
        match Status::from_code(rax) {
            Ok(status) => histogram[status.code() as usize] += 1,
            Err(code) => {
                bad += 1;
                println!(
                    "fuzzer: BAD status {code} from call {i}: rax {:#x} args {:#x?}",
                    call.rax, call.args
                );
            }
        }
        if i % PROGRESS_EVERY == 0 {
            println!("fuzzer: {i} calls");
        }
    }
    if bad == 0 {
        println!("fuzzer: {calls} calls, every call returned a status");
    } else {
        println!("fuzzer: {bad} of {calls} calls returned no status");
    }
    print_histogram(&histogram);
    i32::from(bad != 0)
}

/// Writes the message part of an IPC into the UTCB: extra words, items, windows.
fn load_utcb(call: &Syscall, generator: &mut Generator) {
    let utcb = moat_user::utcb();
    let words = call.words_to_write();
    for word in &mut utcb.words[..words] {
        *word = generator.word();
    }
    for (slot, item) in utcb.words[words..]
        .chunks_exact_mut(3)
        .zip(&call.items[..MAX_ITEMS])
    {
        slot.copy_from_slice(item);
    }
    utcb.untyped = call.untyped;
    utcb.typed = call.typed;
    utcb.recv_obj_base = call.recv[0];
    utcb.recv_obj_count = call.recv[1];
    utcb.recv_mem_base = call.recv[2];
    utcb.recv_mem_count = call.recv[3];
}

/// One line: `fuzzer: statuses Success=N BadCall=N …`.
fn print_histogram(histogram: &[u64]) {
    let mut line = Line::default();
    let _ = write!(line, "fuzzer: statuses");
    for (status, count) in Status::ALL.iter().zip(histogram) {
        let _ = write!(line, " {status:?}={count}");
    }
    println!("{}", line.as_str());
}

/// A fixed buffer to build one console line in.
struct Line {
    bytes: [u8; 512],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            bytes: [0; 512],
            len: 0,
        }
    }
}

impl Line {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        let slot = self.bytes.get_mut(self.len..end).ok_or(core::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
