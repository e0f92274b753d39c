//! The root task's logic that needs no kernel, tested on the host
//! (`cargo test -p moat-roottask --lib`): the boot manifest, restart
//! back-off, the page and selector allocator, component images, the
//! registry protocol and exception reports. `main.rs` is the task itself.
//!
//! # What every component finds
//!
//! | selector | capability |
//! | --- | --- |
//! | 0 | its own PD (`PD_CONTROL`), from the kernel |
//! | 1 | its exception portal: a portal into the root's exception handler (id = the component instance); `exit` and faults of its first EC are reported there, and the component passes 1 to `create_ec` for ECs it wants supervised |
//! | 2 | the registry portal ([`registry`]) |
//! | from 3 | what the manifest gives: `uses` portals and semaphores at the selectors it names |
//!
//! Memory: its ELF segments at their addresses, a stack ending at
//! `layout::STACK_TOP` with the start record (argument string) on top, the
//! first EC's UTCB at `layout::MAIN_UTCB`. I/O ports and GSIs from the
//! manifest at their own numbers. Its argument string is the manifest's
//! `args` (else the boot module's), followed by ` index=N tsc_hz=H`: its
//! place in the manifest (for the registry) and the TSC frequency.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod exception;
pub mod image;
pub mod manifest;
pub mod pci;
pub mod ranges;
pub mod registry;
pub mod restart;

/// A component's exception portal.
pub const EXCEPTION_PORTAL: u64 = 1;
/// A component's registry portal.
pub const REGISTRY_PORTAL: u64 = 2;
