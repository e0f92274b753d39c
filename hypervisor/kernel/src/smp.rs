//! Starting the other CPUs, the parts that need no hardware: which CPUs to
//! start and in what order, and where the real-mode trampoline can go.
//! The INIT-SIPI-SIPI sequence itself is in `arch/x86_64/smp.rs`.

use crate::frame::{first_fit, PhysRange, PAGE_SIZE};

/// CPUs the kernel keeps per-CPU data for; the MADT may list more.
pub const MAX_CPUS: usize = 64;

/// Where a trampoline may start: a STARTUP IPI names a 4 KiB page below
/// 1 MiB by its number (the vector), and vectors 0xa0-0xbf are reserved
/// (SDM Vol. 3A, "Startup IPI"); page 0 holds the real-mode interrupt table
/// and the BIOS data area, and 0xa0000 up is video memory and ROM.
pub const TRAMPOLINE_WINDOW: PhysRange = PhysRange::new(0x1000, 0xa_0000);

/// The STARTUP IPI vector that starts a CPU at `addr`, if it can.
pub fn sipi_vector(addr: u64) -> Option<u8> {
    if !addr.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    let vector = u8::try_from(addr / PAGE_SIZE).ok()?;
    (!(0xa0..=0xbf).contains(&vector)).then_some(vector)
}

/// The lowest `pages` contiguous whole pages of usable RAM inside
/// [`TRAMPOLINE_WINDOW`] that overlap nothing reserved (boot information,
/// modules: what the kernel still reads after the APs start).
pub fn place_trampoline(usable: &[PhysRange], reserved: &[PhysRange], pages: u64) -> Option<u64> {
    let size = pages.checked_mul(PAGE_SIZE)?;
    usable
        .iter()
        .filter_map(|range| {
            let clipped = PhysRange::new(
                range.start.max(TRAMPOLINE_WINDOW.start),
                range.end.min(TRAMPOLINE_WINDOW.end),
            );
            first_fit(clipped.page_align_inward(), reserved, size)
        })
        .map(|found| found.start)
        .min()
}

/// One CPU the boot CPU is to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ap {
    /// The kernel's number for it: 1.. in MADT order (the boot CPU is 0).
    pub index: usize,
    pub apic_id: u32,
}

/// The CPUs to start, in MADT order with the boot CPU (`bsp_apic_id`) left
/// out, numbered from 1, so that at most `limit` CPUs run counting the boot
/// CPU (`None`: all of them; a limit of 0 counts as 1). APIC ids past
/// [`MAX_CPUS`] CPUs are not started.
pub fn plan(
    apic_ids: &[u32],
    bsp_apic_id: u32,
    limit: Option<usize>,
) -> impl Iterator<Item = Ap> + '_ {
    let limit = limit.unwrap_or(usize::MAX).clamp(1, MAX_CPUS);
    apic_ids
        .iter()
        .copied()
        .filter(move |&id| id != bsp_apic_id)
        .enumerate()
        .map(|(i, apic_id)| Ap {
            index: i + 1,
            apic_id,
        })
        .take(limit - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sipi_vectors() {
        assert_eq!(sipi_vector(0x8000), Some(0x08));
        assert_eq!(sipi_vector(0x9f000), Some(0x9f));
        assert_eq!(sipi_vector(0x8001), None);
        assert_eq!(sipi_vector(0xa0000), None);
        assert_eq!(sipi_vector(0xbf000), None);
        assert_eq!(sipi_vector(0xc0000), Some(0xc0));
        assert_eq!(sipi_vector(0x10_0000), None);
    }

    #[test]
    fn trampoline_avoids_reserved_and_stays_low() {
        let usable = [
            PhysRange::new(0, 0x9fc00),
            PhysRange::new(0x10_0000, 0x2000_0000),
        ];
        // Nothing reserved: the first page above page 0.
        assert_eq!(place_trampoline(&usable, &[], 4), Some(0x1000));
        // Boot information at 0x1800..0x2100 and 0x9000: the next fit.
        let reserved = [
            PhysRange::new(0x1800, 0x2100),
            PhysRange::new(0x5000, 0x5001),
            PhysRange::new(0x10_0000, 0x40_0000),
        ];
        assert_eq!(place_trampoline(&usable, &reserved, 2), Some(0x3000));
        assert_eq!(place_trampoline(&usable, &reserved, 4), Some(0x6000));
        // The partial page at the top of low RAM is not used.
        let reserved = [PhysRange::new(0x1000, 0x9c000)];
        assert_eq!(place_trampoline(&usable, &reserved, 4), None);
        assert_eq!(place_trampoline(&usable, &reserved, 3), Some(0x9c000));
        // Usable RAM only above 1 MiB: no place.
        assert_eq!(place_trampoline(&usable[1..], &[], 1), None);
        for addr in [0x1000, 0x3000, 0x6000, 0x9c000] {
            assert!(sipi_vector(addr).is_some());
        }
    }

    #[test]
    fn plan_skips_the_boot_cpu_and_honours_the_limit() {
        let ids = [0, 1, 2, 3];
        let all: Vec<_> = plan(&ids, 0, None)
            .map(|ap| (ap.index, ap.apic_id))
            .collect();
        assert_eq!(all, [(1, 1), (2, 2), (3, 3)]);
        // The boot CPU need not come first in the MADT.
        let later: Vec<_> = plan(&[4, 6, 2], 6, None)
            .map(|ap| (ap.index, ap.apic_id))
            .collect();
        assert_eq!(later, [(1, 4), (2, 2)]);
        assert_eq!(plan(&ids, 0, Some(2)).count(), 1);
        assert_eq!(plan(&ids, 0, Some(1)).count(), 0);
        assert_eq!(plan(&ids, 0, Some(0)).count(), 0);
        assert_eq!(plan(&ids, 0, Some(99)).count(), 3);
        let many: Vec<u32> = (0..200).collect();
        assert_eq!(plan(&many, 0, None).count(), MAX_CPUS - 1);
    }
}
