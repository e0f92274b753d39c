//! Portal handler ECs: a stack type and the activation entry.
//!
//! A handler EC (`create_ec` with `handler = true`) runs when one of its
//! portals is called: the kernel enters it at the portal's `rip` with
//! `rsp` = the stack given to `create_ec`, `rax` = the portal id and
//! `rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9` = message words 0–5.
//! [`portal_entry!`] makes such an entry for a plain Rust function:
//!
//! ```ignore
//! use moat_user::{portal_entry, portal, Stack, sys};
//!
//! static ECHO_STACK: Stack<8192> = Stack::new();
//! portal_entry!(echo_entry, echo);
//!
//! fn echo(id: u64, words: [u64; 6]) -> [u64; 6] {
//!     words
//! }
//!
//! sys::create_ec(EC, 0, true, 0, ECHO_STACK.top(), ECHO_UTCB, u64::MAX, 0)?;
//! sys::create_pt(PT, 0, EC, portal::entry_address(echo_entry), 7)?;
//! ```
//!
//! The handler's return value is the reply's words 0–5. The reply also
//! carries the handler EC's UTCB: whatever `untyped` and `typed` say is sent
//! back. A handler that received typed items or extra words must reset
//! those counts (or set what it means to send) before it returns.
//!
//! One handler EC runs one activation at a time; its stack is reused by
//! every activation, so nothing on it survives a reply.

use core::cell::UnsafeCell;

use moat_abi::Status;

use crate::sys;

/// What a handler EC exits with when `reply` says it is not handling a call
/// (which the kernel only says if the stub was entered some other way).
pub const NOT_IN_CALL_EXIT_CODE: i64 = 102;

/// A stack for an EC, 16-byte aligned, to put in a `static`.
#[repr(C, align(16))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: no Rust reference to the bytes is ever made; they are only used
// as a stack, through `rsp`, by the one EC the stack is given to.
unsafe impl<const N: usize> Sync for Stack<N> {}

impl<const N: usize> Stack<N> {
    const SIZE_OK: () = assert!(
        N >= 256 && N.is_multiple_of(16),
        "a stack is a multiple of 16 bytes, at least 256"
    );

    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        let () = Self::SIZE_OK;
        Self(UnsafeCell::new([0; N]))
    }

    /// The initial stack pointer: the end of the stack, 16-byte aligned.
    pub fn top(&'static self) -> u64 {
        self.0.get() as u64 + N as u64
    }
}

/// The address of an entry made by [`portal_entry!`], to pass as `rip` to
/// `create_pt`.
pub fn entry_address(entry: unsafe extern "C" fn()) -> u64 {
    entry as usize as u64
}

/// A handler's reply: `handler(id, words)`, then `reply` until the
/// activation ends. Never returns: the next activation starts afresh at the
/// entry. Used by [`portal_entry!`].
pub fn serve(id: u64, words: [u64; 6], handler: fn(u64, [u64; 6]) -> [u64; 6]) -> ! {
    let reply = handler(id, words);
    loop {
        match sys::reply(reply) {
            // The caller is gone; the next reply just ends the activation.
            Status::Aborted => continue,
            _ => sys::exit(NOT_IN_CALL_EXIT_CODE),
        }
    }
}

/// `portal_entry!(entry_symbol, handler)` defines the assembly entry
/// `entry_symbol` (declared as `unsafe extern "C" fn()`; pass
/// [`entry_address`]`(entry_symbol)` to `create_pt`) that calls
/// `handler(id: u64, words: [u64; 6]) -> [u64; 6]` on each activation and
/// replies with its result. The entry symbol is global: pick a name that is
/// unique in the task. The macro also defines a module of that name (for
/// the Rust trampoline), so `handler` may be a name in scope or a path.
#[macro_export]
macro_rules! portal_entry {
    ($entry:ident, $handler:path) => {
        extern "C" {
            fn $entry();
        }

        /// The Rust side of the portal entry of the same name.
        #[doc(hidden)]
        mod $entry {
            #[allow(unused_imports)]
            use super::*;

            extern "C" fn trampoline(id: u64, words: &mut [u64; 6]) -> ! {
                $crate::portal::serve(id, *words, $handler)
            }

            // At entry rsp is 16-byte aligned; 48 bytes of words keep it so
            // for the call.
            ::core::arch::global_asm!(
                ".pushsection .text.moat_portal_entry, \"ax\"",
                concat!(".global ", stringify!($entry)),
                ".p2align 4",
                concat!(stringify!($entry), ":"),
                "    sub rsp, 48",
                "    mov [rsp], rdi",
                "    mov [rsp + 8], rsi",
                "    mov [rsp + 16], rdx",
                "    mov [rsp + 24], r10",
                "    mov [rsp + 32], r8",
                "    mov [rsp + 40], r9",
                "    mov rdi, rax",
                "    mov rsi, rsp",
                "    call {trampoline}",
                "    ud2",
                ".popsection",
                trampoline = sym trampoline,
            );
        }
    };
}
