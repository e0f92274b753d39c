//! The user runtime: the task entry point, safe wrappers around the kernel
//! calls, console printing and the panic handler.
#![no_std]

pub use moat_abi as abi;

pub mod syscall;

pub mod console;
mod rt;

pub use rt::exit;

/// Declares the task's `main(args: &str) -> i32`; the runtime calls it with
/// the task's command-line arguments and exits with what it returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        fn moat_main(args: &str) -> i32 {
            let main: fn(&str) -> i32 = $main;
            main(args)
        }
    };
}
