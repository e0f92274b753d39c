//! The user runtime every Moat task links: the entry point ([`entry!`]), one
//! safe wrapper per kernel call ([`sys`]), console printing ([`print!`],
//! [`println!`]), a heap for `alloc` ([`heap`]), port I/O ([`io`]), portal handler entries
//! ([`portal_entry!`], [`Stack`]) and the panic handler (prints `panic: …`,
//! exits with [`PANIC_EXIT_CODE`]).
//!
//! The logic that needs no kernel (the heap's free list) is tested on the
//! host: `cargo test -p moat-user --lib`.
#![cfg_attr(not(test), no_std)]

pub use moat_abi as abi;

pub mod console;
pub mod heap;
pub mod io;
pub mod mmio;
pub mod portal;
mod rt;
pub mod sys;

pub use portal::Stack;
#[doc(hidden)]
pub use rt::panic;
#[doc(hidden)]
pub use rt::start as __start;
pub use sys::exit;

use moat_abi::Utcb;

/// A capability selector in the caller's object space.
pub use moat_abi::syscall::Sel;

/// What a task exits with when it panics.
pub const PANIC_EXIT_CODE: i64 = 101;

/// The UTCB of the task's first EC, at [`abi::layout::MAIN_UTCB`].
///
/// Each call hands out a new `&'static mut` to the same page: use one at a
/// time, from the first EC only (other ECs have their own UTCB, see
/// [`utcb_at`]).
pub fn utcb() -> &'static mut Utcb {
    // SAFETY: the kernel (root task) or the root task (components) maps the
    // first EC's UTCB page read-write at MAIN_UTCB for the task's whole life;
    // `Utcb` is exactly one page of plain integers, so any content is valid.
    unsafe { &mut *(abi::layout::MAIN_UTCB as *mut Utcb) }
}

/// The UTCB of another EC of this PD, mapped at `address` by `create_ec`.
///
/// # Safety
/// `address` must be the `utcb` given to a successful `create_ec` for an EC
/// of this PD, and no other reference to that UTCB may be live while the
/// returned one is used.
pub unsafe fn utcb_at(address: u64) -> &'static mut Utcb {
    // SAFETY: the caller promises the page is a mapped UTCB with no other
    // live reference; any bit pattern is a valid `Utcb`.
    unsafe { &mut *(address as *mut Utcb) }
}

/// The CPU's time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` reads a counter; it touches no memory and user mode may
    // execute it (the kernel leaves CR4.TSD clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Declares the task's `fn main(args: &str) -> i32`; the runtime calls it
/// with the task's argument string and exits with what it returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn moat_main(args: &str) -> i32 {
            let main: fn(&str) -> i32 = $main;
            main(args)
        }

        // In the task's own crate, not in this library: a std program that
        // links this library's logic (the guest tools, through the hostile
        // plan and `common` with the runtime that workspace builds unify
        // in; the fuzz targets, through `common::net`) must not get a
        // second panic handler, entry point or allocator.
        #[cfg(not(test))]
        #[panic_handler]
        fn moat_panic(info: &core::panic::PanicInfo) -> ! {
            $crate::panic(info)
        }

        #[cfg(not(test))]
        core::arch::global_asm!(
            ".pushsection .text._start, \"ax\"",
            ".global _start",
            "_start:",
            "    mov rdi, rsp",
            "    call {start}",
            "    ud2",
            ".popsection",
            start = sym $crate::__start,
        );

        #[cfg(not(test))]
        #[global_allocator]
        static MOAT_HEAP: $crate::heap::Global = $crate::heap::Global;
    };
}
