//! Host ACPI tables, parsed with the `acpi` crate: the MADT tells which CPUs,
//! IOAPICs and ISA interrupt overrides the machine has; the MCFG where PCI
//! Express configuration space (ECAM) lies, which the root task is told.

use super::layout::{phys_to_virt, BOOT_DIRECT_MAP_SIZE};
use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use moat_kernel::smp::MAX_CPUS;

pub const MAX_IOAPICS: usize = 8;
pub const MAX_OVERRIDES: usize = 16;

#[derive(Clone, Copy, Debug, Default)]
pub struct IoApic {
    pub id: u8,
    pub address: u32,
    pub gsi_base: u32,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Override {
    pub irq: u8,
    pub gsi: u32,
}

#[derive(Clone, Debug)]
pub struct Platform {
    /// Enabled CPUs in the MADT, also those past `MAX_CPUS`.
    pub cpus: u32,
    /// Their APIC ids in MADT order (the first `MAX_CPUS`).
    apic_ids: [u32; MAX_CPUS],
    pub ioapics: [IoApic; MAX_IOAPICS],
    pub ioapic_count: usize,
    pub overrides: [Override; MAX_OVERRIDES],
    pub override_count: usize,
    pub has_8259: bool,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            cpus: 0,
            apic_ids: [0; MAX_CPUS],
            ioapics: [IoApic::default(); MAX_IOAPICS],
            ioapic_count: 0,
            overrides: [Override::default(); MAX_OVERRIDES],
            override_count: 0,
            has_8259: false,
        }
    }
}

impl Platform {
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..(self.cpus as usize).min(MAX_CPUS)]
    }

    fn add_cpu(&mut self, apic_id: u32) {
        if let Some(slot) = self.apic_ids.get_mut(self.cpus as usize) {
            *slot = apic_id;
        }
        self.cpus += 1;
    }

    pub fn ioapics(&self) -> &[IoApic] {
        &self.ioapics[..self.ioapic_count]
    }

    pub fn overrides(&self) -> &[Override] {
        &self.overrides[..self.override_count]
    }
}

/// Tables are read through the direct map, which covers them: firmware puts
/// them below 4 GiB.
#[derive(Clone, Copy)]
struct DirectMap;

impl AcpiHandler for DirectMap {
    unsafe fn map_physical_region<T>(
        &self,
        physical: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let end = (physical as u64).saturating_add(size as u64);
        assert!(
            end <= BOOT_DIRECT_MAP_SIZE,
            "ACPI table above the direct map"
        );
        let virt = phys_to_virt(physical as u64) as *mut T;
        // SAFETY: `virt` is the direct-map address of `physical`, never null,
        // and mapped for `size` bytes (checked above); the caller of this
        // trait method guarantees a `T` lives there.
        unsafe { PhysicalMapping::new(physical, NonNull::new_unchecked(virt), size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Segment 0's ECAM base (0: none) and last bus, from the MCFG.
static ECAM_BASE: AtomicU64 = AtomicU64::new(0);
static ECAM_BUS_END: AtomicU64 = AtomicU64::new(0);

/// Segment 0's ECAM: physical base (for bus 0) and last bus, if the
/// machine has an MCFG.
pub fn ecam() -> Option<(u64, u64)> {
    let base = ECAM_BASE.load(Ordering::Relaxed);
    (base != 0).then(|| (base, ECAM_BUS_END.load(Ordering::Relaxed)))
}

#[derive(Debug)]
pub enum AcpiProblem {
    Tables(acpi::AcpiError),
}

impl core::fmt::Display for AcpiProblem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiProblem::Tables(error) => write!(f, "ACPI tables unusable: {error:?}"),
        }
    }
}

pub fn discover() -> Result<Platform, AcpiProblem> {
    // SAFETY: the BIOS areas searched for the RSDP (EBDA, 0xe0000-0xfffff)
    // are ordinary memory below 4 GiB, reachable through the direct map, and
    // reading them has no side effects.
    let tables =
        unsafe { AcpiTables::search_for_rsdp_bios(DirectMap) }.map_err(AcpiProblem::Tables)?;
    if let Ok(mcfg) = tables.find_table::<Mcfg>() {
        let segment0 = mcfg
            .get()
            .entries()
            .iter()
            .find(|e| e.pci_segment_group == 0 && e.bus_number_start == 0)
            .map(|e| (e.base_address, e.bus_number_end));
        if let Some((base, bus_end)) = segment0 {
            log::info!("acpi: pci express configuration space at {base:#x}, buses 0-{bus_end}");
            ECAM_BASE.store(base, Ordering::Relaxed);
            ECAM_BUS_END.store(bus_end.into(), Ordering::Relaxed);
        }
    }
    let madt = tables.find_table::<Madt>().map_err(AcpiProblem::Tables)?;
    let madt = madt.get();
    let mut platform = Platform {
        has_8259: madt.supports_8259(),
        ..Platform::default()
    };
    for entry in madt.entries() {
        match entry {
            // Bit 0, enabled: the CPU is there and may be started.
            MadtEntry::LocalApic(lapic) => {
                let flags = lapic.flags;
                if flags & 1 != 0 {
                    platform.add_cpu(lapic.apic_id.into());
                }
            }
            MadtEntry::LocalX2Apic(lapic) => {
                let flags = lapic.flags;
                if flags & 1 != 0 {
                    platform.add_cpu(lapic.x2apic_id);
                }
            }
            MadtEntry::IoApic(ioapic) => {
                if let Some(slot) = platform.ioapics.get_mut(platform.ioapic_count) {
                    *slot = IoApic {
                        id: ioapic.io_apic_id,
                        address: ioapic.io_apic_address,
                        gsi_base: ioapic.global_system_interrupt_base,
                    };
                    platform.ioapic_count += 1;
                } else {
                    log::warn!("acpi: more than {MAX_IOAPICS} IOAPICs, ignoring the rest");
                }
            }
            MadtEntry::InterruptSourceOverride(entry) => {
                if let Some(slot) = platform.overrides.get_mut(platform.override_count) {
                    *slot = Override {
                        irq: entry.irq,
                        gsi: entry.global_system_interrupt,
                    };
                    platform.override_count += 1;
                }
            }
            _ => {}
        }
    }
    Ok(platform)
}

pub fn log_banner(platform: &Platform) {
    for ioapic in platform.ioapics() {
        log::info!(
            "acpi: {} cpu(s), ioapic {} at {:#x}, gsi base {}",
            platform.cpus,
            ioapic.id,
            ioapic.address,
            ioapic.gsi_base
        );
    }
    if platform.ioapic_count == 0 {
        log::info!("acpi: {} cpu(s), no ioapic", platform.cpus);
    }
    let mut line = crate::util::LineBuffer::<160>::new();
    for o in platform.overrides() {
        let _ = core::fmt::write(&mut line, format_args!(" irq{}->gsi{}", o.irq, o.gsi));
    }
    log::info!(
        "acpi: {} interrupt override(s):{}, legacy pic {}",
        platform.override_count,
        line.as_str(),
        if platform.has_8259 {
            "present"
        } else {
            "absent"
        }
    );
}
