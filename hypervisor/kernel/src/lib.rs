//! Kernel logic that does not touch the hardware, so it runs and is tested on
//! the host as well as in the kernel binary.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod arena;
pub mod cap;
pub mod chunked;
pub mod elf;
pub mod frame;
pub mod multiboot;
pub mod paging;
pub mod quota;
pub mod ring;
pub mod sched;
pub mod smp;
pub mod virt;
