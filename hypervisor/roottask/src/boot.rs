//! What the kernel gives the root task: the boot information page, the
//! boot modules and the memory pool, as safe views.

use moat_abi::{layout, BootInfo, BootModule, PAGE_SIZE};

/// `moat_abi::BOOT_INFO_MAGIC` (not exported by the ABI crate).
const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"MOATBOOT");

/// The boot information page, if it carries the right magic.
pub fn info() -> Option<&'static BootInfo> {
    // SAFETY: the kernel maps the BootInfo page read-only at BOOT_INFO for
    // the root task's whole life and never changes it; `BootInfo` is plain
    // integers and byte arrays, valid for any content.
    let info = unsafe { &*(layout::BOOT_INFO as *const BootInfo) };
    (info.magic == BOOT_INFO_MAGIC).then_some(info)
}

pub fn module<'a>(info: &'a BootInfo, name: &str) -> Option<&'a BootModule> {
    info.modules().iter().find(|m| m.name() == name)
}

/// A module's bytes.
pub fn module_bytes(module: &BootModule) -> &'static [u8] {
    // SAFETY: the kernel maps every boot module read-only at `address`,
    // `size` bytes, for the root task's whole life (ABI README, "The root
    // task"), and nothing writes it.
    unsafe { core::slice::from_raw_parts(module.address as *const u8, module.size as usize) }
}

/// The memory pool, mapped read-write in the root task, handed out page
/// by page (page index 0 is the pool's first page).
pub struct Pool {
    address: u64,
    pages: u64,
}

impl Pool {
    /// The pool of `info`. There is one: the only way to get a `Pool` is
    /// through [`Pool::take`], once.
    pub fn take(info: &BootInfo) -> Option<Pool> {
        static TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        if TAKEN.swap(true, core::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        Some(Pool {
            address: info.pool_address,
            pages: info.pool_size / PAGE_SIZE,
        })
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The root task's page number of pool page `index`, to delegate it.
    pub fn root_page(&self, index: u64) -> u64 {
        self.address / PAGE_SIZE + index
    }

    /// Pool page `index`'s bytes.
    pub fn page_mut(&mut self, index: u64) -> &mut [u8] {
        assert!(index < self.pages, "pool page {index} out of range");
        let address = self.address + index * PAGE_SIZE;
        // SAFETY: the kernel maps the pool read-write at `pool_address`,
        // `pool_size` bytes (ABI README, "The root task"), `index` is inside
        // it, and this `Pool` is the only view of the pool (`take` hands
        // out one), so the `&mut self` borrow makes the slice unique.
        unsafe { core::slice::from_raw_parts_mut(address as *mut u8, PAGE_SIZE as usize) }
    }
}
