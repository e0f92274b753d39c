//! The guest's physical address map, as the VMM builds it, and where this
//! crate puts its boot structures in low memory.

/// A range of guest-physical addresses `[base, base + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub base: u64,
    pub size: u64,
}

impl Window {
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// One past the last address; `None` if the window wraps.
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    fn overlaps(&self, other: &Window) -> bool {
        match (self.end(), other.end()) {
            (Some(a), Some(b)) => self.base < b && other.base < a,
            _ => true,
        }
    }

    fn within(&self, lo: u64, hi: u64) -> bool {
        self.base >= lo && self.end().is_some_and(|e| e <= hi)
    }
}

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const PAGE_SIZE: u64 = 4 * KIB;

/// End of the conventional RAM below the EBDA.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Start of RAM above the legacy VGA/BIOS area.
pub const HIGH_RAM_START: u64 = MIB;
/// Where RAM continues above the MMIO hole.
pub const RAM_ABOVE_4G: u64 = 4 * GIB;

/// ISA IRQs, which the IOAPIC's first pins receive.
const ISA_IRQS: u32 = 16;
/// Ports of the ACPI PM register block: sleep control, sleep status, reset.
pub const ACPI_PM_PORTS: u16 = 3;

/// Bytes of ECAM configuration space per PCI bus (32 devices, 8
/// functions, 4 KiB each).
pub const ECAM_BUS_SIZE: u64 = MIB;

/// Boot structures this crate writes below [`LOW_RAM_END`], all in RAM the
/// guest may reuse once it has copied what it needs.
pub mod low {
    /// The GDT (four 8-byte descriptors).
    pub const GDT: u64 = 0x500;
    /// PVH `hvm_start_info`, followed by its module list and memory map.
    pub const PVH_START_INFO: u64 = 0x6000;
    pub const PVH_INFO_END: u64 = 0x7000;
    /// The Linux `boot_params` ("zero page").
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Initial stack pointer (the stack grows down into 0x8000..0x8ff0).
    pub const STACK_TOP: u64 = 0x8ff0;
    /// Identity-map page tables: PML4, PDPT, then one page directory per GiB.
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// The kernel command line, NUL-terminated.
    pub const CMDLINE: u64 = 0x2_0000;
    pub const CMDLINE_MAX: u64 = 0x1_0000;
}

/// What the VMM gives the guest: RAM, the MMIO hole below 4 GiB with the
/// PCI window, ECAM and interrupt controllers in it, the ACPI PM ports,
/// the vCPUs, and where the ACPI tables go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    /// Total guest RAM in bytes: `[0, min(ram_size, mmio_hole_start))` and,
    /// for the remainder, from 4 GiB up.
    pub ram_size: u64,
    /// Where RAM below 4 GiB stops and device space begins.
    pub mmio_hole_start: u64,
    /// The 32-bit PCI memory window (BARs), inside the hole.
    pub pci_mmio: Window,
    /// PCI Express enhanced configuration space for bus 0, if the VMM has it.
    pub ecam_base: Option<u64>,
    pub ioapic_base: u64,
    pub ioapic_id: u8,
    /// Number of IOAPIC inputs (GSIs `0..ioapic_pins`).
    pub ioapic_pins: u32,
    pub lapic_base: u64,
    /// The ACPI PM register block: sleep control at +0, sleep status at
    /// +1, reset at +2.
    pub acpi_pm_port: u16,
    /// GSIs the PCI INTA#..INTD# lines of slot 0 reach; slot `s` is swizzled
    /// by `s` (INTx of slot s reaches `pci_intx_gsi[(pin + s) % 4]`).
    pub pci_intx_gsi: [u32; 4],
    /// vCPUs, with local APIC IDs `0..vcpus`.
    pub vcpus: u32,
    /// Whether the VMM models the CMOS RTC at ports 0x70/0x71 (told to
    /// Linux through the FADT's IAPC_BOOT_ARCH).
    pub cmos_rtc: bool,
    /// Where the ACPI tables go; the RSDP comes first, so a window in
    /// `0xe0000..0x100000` lets legacy scanning find it.
    pub acpi_tables: Window,
}

/// Why a [`GuestLayout`] cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The hole must start page-aligned between 1 MiB and 4 GiB.
    MmioHole,
    /// The PCI window must lie in the hole and miss the other devices.
    PciWindow,
    /// ECAM must lie in the hole and miss the other devices.
    Ecam,
    /// The IOAPIC or LAPIC page lies outside the hole.
    InterruptController,
    /// Fewer IOAPIC pins than ISA IRQs (16), or a PCI INTx GSI beyond them.
    IoapicPins,
    /// The ACPI PM register block wraps past port 0xffff.
    AcpiPmPort,
    /// vCPU count 0, or more than xAPIC IDs allow (255, 0xff is broadcast).
    Vcpus,
    /// The ACPI table window must lie in the BIOS area or in low RAM.
    AcpiTables,
    /// The RAM slice given reaches past the RAM below the hole.
    RamSlice,
}

impl GuestLayout {
    /// Moat's standard PC layout: hole at 3 GiB, a 512 MiB PCI window at
    /// its start, ECAM for bus 0 at 0xe000_0000, IOAPIC (ID 0, 24 pins) at
    /// 0xfec0_0000, LAPIC at 0xfee0_0000, ACPI PM ports at 0x600, PCI INTx
    /// on GSIs 16..19, a CMOS RTC, ACPI tables in 0xe0000..0x100000.
    pub const fn standard(ram_size: u64, vcpus: u32) -> Self {
        Self {
            ram_size,
            mmio_hole_start: 0xc000_0000,
            pci_mmio: Window::new(0xc000_0000, 0x2000_0000),
            ecam_base: Some(0xe000_0000),
            ioapic_base: 0xfec0_0000,
            ioapic_id: 0,
            ioapic_pins: 24,
            lapic_base: 0xfee0_0000,
            acpi_pm_port: 0x600,
            pci_intx_gsi: [16, 17, 18, 19],
            vcpus,
            cmos_rtc: true,
            acpi_tables: Window::new(0xe_0000, 0x2_0000),
        }
    }

    /// End of the RAM below the MMIO hole.
    pub fn low_ram_end(&self) -> u64 {
        self.ram_size.min(self.mmio_hole_start)
    }

    /// Bytes of RAM relocated above 4 GiB.
    pub fn high_ram_size(&self) -> u64 {
        self.ram_size.saturating_sub(self.mmio_hole_start)
    }

    /// The ECAM window (bus 0 only), if any.
    pub fn ecam(&self) -> Option<Window> {
        self.ecam_base.map(|b| Window::new(b, ECAM_BUS_SIZE))
    }

    /// Checks the layout is self-consistent and that `ram_slice_len` bytes
    /// of RAM from address 0 are all below the hole.
    pub fn validate(&self, ram_slice_len: u64) -> Result<(), LayoutError> {
        let hole = self.mmio_hole_start;
        if !(HIGH_RAM_START..=RAM_ABOVE_4G).contains(&hole) || !hole.is_multiple_of(PAGE_SIZE) {
            return Err(LayoutError::MmioHole);
        }
        let page = |base| Window::new(base, PAGE_SIZE);
        let (ioapic, lapic) = (page(self.ioapic_base), page(self.lapic_base));
        if !ioapic.within(hole, RAM_ABOVE_4G)
            || !lapic.within(hole, RAM_ABOVE_4G)
            || ioapic.overlaps(&lapic)
        {
            return Err(LayoutError::InterruptController);
        }
        let pci = self.pci_mmio;
        if pci.size == 0
            || !pci.within(hole, RAM_ABOVE_4G)
            || pci.overlaps(&ioapic)
            || pci.overlaps(&lapic)
        {
            return Err(LayoutError::PciWindow);
        }
        if let Some(ecam) = self.ecam() {
            let clash = [pci, ioapic, lapic].iter().any(|w| w.overlaps(&ecam));
            if !ecam.within(hole, RAM_ABOVE_4G) || clash || !ecam.base.is_multiple_of(ECAM_BUS_SIZE)
            {
                return Err(LayoutError::Ecam);
            }
        }
        let pins = self.ioapic_pins;
        if pins < ISA_IRQS || self.pci_intx_gsi.iter().any(|&g| g >= pins) {
            return Err(LayoutError::IoapicPins);
        }
        if self.acpi_pm_port.checked_add(ACPI_PM_PORTS - 1).is_none() {
            return Err(LayoutError::AcpiPmPort);
        }
        if self.vcpus == 0 || self.vcpus > 255 {
            return Err(LayoutError::Vcpus);
        }
        let t = self.acpi_tables;
        let in_bios_area = t.within(LOW_RAM_END, HIGH_RAM_START);
        let in_low_ram = t.within(HIGH_RAM_START, self.low_ram_end());
        if t.size == 0 || !(in_bios_area || in_low_ram) {
            return Err(LayoutError::AcpiTables);
        }
        if ram_slice_len > self.low_ram_end() {
            return Err(LayoutError::RamSlice);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_layout_is_valid() {
        let l = GuestLayout::standard(512 * MIB, 1);
        assert_eq!(l.validate(512 * MIB), Ok(()));
        assert_eq!(l.low_ram_end(), 512 * MIB);
        assert_eq!(l.high_ram_size(), 0);
        let big = GuestLayout::standard(5 * GIB, 4);
        assert_eq!(big.low_ram_end(), 3 * GIB);
        assert_eq!(big.high_ram_size(), 2 * GIB);
        assert_eq!(big.validate(3 * GIB), Ok(()));
        assert_eq!(big.validate(3 * GIB + 1), Err(LayoutError::RamSlice));
    }

    #[test]
    fn inconsistent_layouts_are_refused() {
        use LayoutError::*;
        let with = |f: &dyn Fn(&mut GuestLayout)| {
            let mut l = GuestLayout::standard(256 * MIB, 1);
            f(&mut l);
            l.validate(0)
        };
        assert_eq!(with(&|l| l.mmio_hole_start = 5 * GIB), Err(MmioHole));
        assert_eq!(with(&|l| l.mmio_hole_start = 0xc000_0001), Err(MmioHole));
        assert_eq!(
            with(&|l| l.pci_mmio = Window::new(0xbfff_0000, MIB)),
            Err(PciWindow)
        );
        assert_eq!(
            with(&|l| l.pci_mmio = Window::new(0xfe00_0000, 32 * MIB)),
            Err(PciWindow)
        );
        assert_eq!(
            with(&|l| l.pci_mmio = Window::new(u64::MAX, 2)),
            Err(PciWindow)
        );
        assert_eq!(with(&|l| l.ecam_base = Some(0xd000_0000)), Err(Ecam));
        assert_eq!(with(&|l| l.ecam_base = Some(0xe000_1000)), Err(Ecam));
        assert_eq!(with(&|l| l.ioapic_base = 0x1000), Err(InterruptController));
        assert_eq!(
            with(&|l| l.lapic_base = l.ioapic_base),
            Err(InterruptController)
        );
        assert_eq!(with(&|l| l.ioapic_pins = 15), Err(IoapicPins));
        assert_eq!(with(&|l| l.pci_intx_gsi[3] = 24), Err(IoapicPins));
        assert_eq!(with(&|l| l.acpi_pm_port = 0xfffe), Err(AcpiPmPort));
        assert_eq!(with(&|l| l.vcpus = 0), Err(Vcpus));
        assert_eq!(with(&|l| l.vcpus = 256), Err(Vcpus));
        assert_eq!(
            with(&|l| l.acpi_tables = Window::new(0x9_0000, 0x1_0000)),
            Err(AcpiTables)
        );
        assert_eq!(
            with(&|l| l.acpi_tables = Window::new(255 * MIB, 2 * MIB)),
            Err(AcpiTables)
        );
        assert_eq!(
            with(&|l| l.acpi_tables = Window::new(255 * MIB, MIB)),
            Ok(())
        );
        assert_eq!(with(&|l| l.ecam_base = None), Ok(()));
    }
}
