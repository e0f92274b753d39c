//! What Moat's native components share that needs no kernel: reading their
//! arguments, the root task's registry message, a seeded PRNG, statistics
//! over samples and the fuzzer's rules. Tested on the host
//! (`cargo test -p moat-component-common`). With the `runtime` feature,
//! [`rt`] adds the kernel calls they share (portals, publishing, sleeping),
//! `blk_client` the block service's client, `net_client` a port of the
//! virtual switch and `virtio_pci` the drivers' virtio PCI transport.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod args;
pub mod blk;
#[cfg(feature = "runtime")]
pub mod blk_client;
pub mod cmos;
pub mod fuzz;
pub mod lend;
pub mod modem;
pub mod modem_at;
pub mod modem_link;
pub mod net;
#[cfg(feature = "runtime")]
pub mod net_client;
pub mod registry;
pub mod rng;
#[cfg(feature = "runtime")]
pub mod rt;
pub mod stats;
#[cfg(feature = "runtime")]
pub mod virtio_pci;

/// Test operations of the `echo` server, in word 0 of a call (values no
/// ordinary `ping` message uses).
pub mod echo_ops {
    /// The handler faults during the call: the caller must get `Dead`.
    pub const CRASH: u64 = 0xec40_0000_dead_0001;
    /// The handler sleeps about 200 ms before replying, and reports a
    /// reply that comes back `Aborted` (the caller died meanwhile).
    pub const SLOW: u64 = 0xec40_0000_dead_0002;
}

/// Selectors every component finds, set by the root task.
pub mod sel {
    /// The component's own PD (`PD_CONTROL`).
    pub const OWN_PD: u64 = 0;
    /// The component's exception portal (a portal into the root task).
    pub const EXCEPTION_PORTAL: u64 = 1;
    /// The root task's registry portal.
    pub const REGISTRY: u64 = 2;
    /// The first selector a component may use for its own objects
    /// (manifest `uses ... at N` selectors start at 20 by convention).
    pub const FIRST_OWN: u64 = moat_abi::selectors::FIRST_FREE;
}

/// TSC ticks for `ms` milliseconds at `tsc_hz`.
pub const fn ms_to_ticks(tsc_hz: u64, ms: u64) -> u64 {
    tsc_hz / 1000 * ms
}
