//! Where things are in the kernel's virtual address space.

/// The kernel image runs at `KERNEL_VMA + physical address` (the top 2 GiB).
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;
/// All of physical memory is mapped at `DIRECT_MAP_BASE + physical address`.
pub const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;
/// The boot page tables cover this much of physical memory at the direct map.
pub const BOOT_DIRECT_MAP_SIZE: u64 = 4 << 30;
/// The first PML4 slot that belongs to the kernel; user space is below.
pub const KERNEL_PML4_FIRST: usize = 256;
/// User virtual addresses are in `USER_START..USER_END`.
pub const USER_START: u64 = 0x1000;
pub const USER_END: u64 = moat_abi::layout::USER_END;

pub const BOOT_STACK_SIZE: usize = 64 * 1024;
pub const IST_STACK_SIZE: usize = 16 * 1024;

/// The virtual address at which the kernel reaches physical address `phys`.
pub const fn phys_to_virt(phys: u64) -> u64 {
    DIRECT_MAP_BASE + phys
}

/// The physical address of a kernel-image address (code or static data).
pub fn kernel_virt_to_phys(virt: u64) -> u64 {
    virt - KERNEL_VMA
}
