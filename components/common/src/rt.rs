//! Kernel calls the components share: serving a portal, publishing it in
//! the root task's registry, blocking, and sleeping on a TSC deadline.

use moat_user::abi::{Status, TypedItem};
use moat_user::{sys, Sel};

use crate::{args, registry, sel};

/// Where a one-portal server (`serve`) keeps its objects: the first three
/// of its own selectors and a handler UTCB address nothing else uses.
pub mod server {
    use moat_user::Sel;

    pub const HANDLER_EC: Sel = crate::sel::FIRST_OWN;
    pub const PORTAL: Sel = crate::sel::FIRST_OWN + 1;
    /// The semaphore the server's first EC blocks on for good.
    pub const IDLE_SM: Sel = crate::sel::FIRST_OWN + 2;
    pub const HANDLER_UTCB: u64 = 0x0000_7fff_d000_0000;
}

/// Serves a portal published as `name`: a handler EC (its stack pointer
/// reset to `stack_top` at every call, its UTCB at `server::HANDLER_UTCB`,
/// faults reported to the root task) and the portal to it, entered at `rip`
/// with portal id `id`, registered with the root task.
pub fn serve(
    name: &str,
    stack_top: u64,
    rip: u64,
    id: u64,
    component_args: &str,
) -> Result<(), Status> {
    sys::create_ec(
        server::HANDLER_EC,
        sel::OWN_PD,
        true,
        moat_user::abi::CPU_OF_CALLER,
        0,
        stack_top,
        server::HANDLER_UTCB,
        sel::EXCEPTION_PORTAL,
        server::HANDLER_EC,
    )?;
    sys::create_pt(server::PORTAL, sel::OWN_PD, server::HANDLER_EC, rip, id)?;
    publish(name, server::PORTAL, component_args)
}

/// Publishes `portal` under `name` in the root task's registry. The
/// component's index comes from its arguments (`index=N`).
pub fn publish(name: &str, portal: Sel, component_args: &str) -> Result<(), Status> {
    let words = registry::publish_words(name).map_err(|_| Status::BadParameter)?;
    let index = args::number(component_args, "index", 0).map_err(|_| Status::BadParameter)?;
    let item = registry::publish_item(portal, index);
    let reply = call_with_items(sel::REGISTRY, words, &[item]);
    match reply?[0] {
        0 => Ok(()),
        code => Err(Status::from_code(code).unwrap_or(Status::BadCall)),
    }
}

/// A call with typed items in the first EC's UTCB and no extra words.
pub fn call_with_items(pt: Sel, words: [u64; 6], items: &[TypedItem]) -> Result<[u64; 6], Status> {
    let utcb = moat_user::utcb();
    utcb.untyped = 0;
    utcb.typed = items.len() as u64;
    for (slot, item) in utcb.words.chunks_exact_mut(TypedItem::WORDS).zip(items) {
        slot.copy_from_slice(&item.encode());
    }
    let reply = sys::call(pt, words);
    utcb.typed = 0;
    reply
}

/// Blocks the calling EC for good on a new semaphore `sm` that nobody ups:
/// a server's first EC waits here while its handler serves the portal.
pub fn block_forever(sm: Sel) -> ! {
    if let Err(status) = sys::create_sm(sm, sel::OWN_PD, 0) {
        moat_user::println!("block_forever: create_sm failed: {status}");
    }
    loop {
        // Only a failure (no semaphore) returns; blocking is all that counts.
        let _ = sys::sm_down(sm, 0, false);
    }
}

/// Sleeping on a private semaphore with a TSC deadline.
pub struct Sleeper {
    sm: Sel,
}

impl Sleeper {
    pub fn new(sm: Sel) -> Result<Self, Status> {
        sys::create_sm(sm, sel::OWN_PD, 0)?;
        Ok(Self { sm })
    }

    /// Returns once the TSC has passed `deadline`.
    pub fn until(&self, deadline: u64) -> Result<(), Status> {
        while moat_user::rdtsc() < deadline {
            match sys::sm_down(self.sm, deadline, false) {
                Ok(()) | Err(Status::Timeout) => {}
                Err(status) => return Err(status),
            }
        }
        Ok(())
    }

    pub fn for_ticks(&self, ticks: u64) -> Result<(), Status> {
        self.until(moat_user::rdtsc().saturating_add(ticks))
    }
}
