//! The root task: the first user task, started by the kernel from the first
//! boot module. It reads the boot module named `manifest`, starts the
//! components it lists (`loader.rs`), runs the registry of published
//! portals and the exception handler (`handlers.rs`), and supervises: a
//! component that faults or exits with an error is destroyed and restarted
//! with back-off (`supervisor.rs`). When every component is done it exits.
//! The logic that runs on the host is in the library (`lib.rs`), with the
//! manifest format and the selectors every component finds.
//!
//! Arguments (the module's command line after its name):
//! - `probe-syscalls`: first make calls with bad numbers, pointers,
//!   selectors and counts and check that each gets its documented status;
//! - `fault`: after the greeting, touch unmapped memory, to show that the
//!   kernel reports a faulting task and keeps running.
#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod devices;
mod handlers;
mod loader;
mod probe;
mod supervisor;

use alloc::vec::Vec;

use moat_abi::PAGE_SIZE;
use moat_roottask::manifest;
use moat_roottask::ranges::RangeAllocator;
use moat_roottask::registry::SLOT_BASE;
use moat_user::{println, sys};

use loader::Loader;
use supervisor::Supervisor;

moat_user::entry!(main);

fn main(args: &str) -> i32 {
    println!("roottask: hello from ring 3");
    let mut failures = 0;
    for arg in args.split_whitespace() {
        match arg {
            "probe-syscalls" => failures += probe::syscalls(),
            "fault" => {
                println!("roottask: touching unmapped memory on purpose");
                // SAFETY: not safe at all: this write faults deliberately, and
                // the kernel is expected to end the task and report it.
                unsafe { core::ptr::write_volatile(0x10 as *mut u64, 0xdead) };
            }
            other => println!("roottask: unknown argument '{other}'"),
        }
    }
    match supervise() {
        // Passed on to the kernel, which ends the machine with it.
        Ok(Some(value)) if failures == 0 => (moat_abi::EXIT_WITH_VALUE + u64::from(value)) as i32,
        Ok(_) => failures,
        Err(()) => failures + 1,
    }
}

/// Starts and supervises the manifest's components, if there is a manifest;
/// gives the debug-exit value a component asked for.
fn supervise() -> Result<Option<u8>, ()> {
    let Some(info) = boot::info() else {
        println!("roottask: no boot information page");
        return Err(());
    };
    let Some(module) = boot::module(info, "manifest") else {
        println!("roottask: no 'manifest' boot module: nothing to start");
        return Ok(None);
    };
    let text = core::str::from_utf8(boot::module_bytes(module)).map_err(|e| {
        println!("roottask: the manifest is not UTF-8: {e}");
    })?;
    let manifest = manifest::parse(text).map_err(|e| println!("roottask: {e}"))?;

    let provides = manifest
        .components
        .iter()
        .map(|c| c.provides.clone())
        .collect();
    handlers::install(provides)
        .map_err(|(what, status)| println!("roottask: cannot {what}: {status}"))?;
    let Some(mut pool) = boot::Pool::take(info) else {
        return Err(());
    };
    let mut pages = RangeAllocator::new(0..pool.pages());
    let mut selectors = RangeAllocator::new(handlers::FIRST_ALLOCATED..SLOT_BASE);
    let mut semaphores = Vec::new();
    for semaphore in &manifest.semaphores {
        let created = selectors
            .alloc(1)
            .ok_or(moat_abi::Status::QuotaExceeded)
            .and_then(|sel| sys::create_sm(sel, 0, semaphore.count).map(|()| sel));
        match created {
            Ok(sel) => semaphores.push(sel),
            Err(status) => {
                println!(
                    "roottask: cannot create semaphore '{}': {status}",
                    semaphore.name
                );
                return Err(());
            }
        }
    }
    let mut shared = Vec::new();
    for (name, bytes) in &manifest.shared {
        let mut runs = Vec::new();
        let mut left = bytes / PAGE_SIZE;
        while left > 0 {
            let Some(run) = pages.alloc_upto(left) else {
                println!("roottask: no pool memory for shared memory '{name}'");
                return Err(());
            };
            for page in run.clone() {
                pool.page_mut(page).fill(0);
            }
            left -= run.end - run.start;
            runs.push(run);
        }
        shared.push(runs);
    }
    let devices = devices::discover(info, &manifest);
    println!(
        "roottask: {} component(s), pool {} KiB, kernel quota {} KiB",
        manifest.components.len(),
        pool.pages() * PAGE_SIZE / 1024,
        info.kernel_quota / 1024
    );
    let loader = Loader {
        info,
        pool,
        pages,
        selectors,
        semaphores,
        shared,
        devices,
    };
    Ok(Supervisor::new(loader, manifest).run())
}
