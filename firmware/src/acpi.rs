//! ACPI tables for a hardware-reduced PC: RSDP, XSDT, FADT, MADT, MCFG and
//! a DSDT, written into the layout's table window (ACPI 6.4, chapter 5).
//!
//! Hardware-reduced ACPI (FADT flag `HW_REDUCED_ACPI`) means no PM1
//! event/control blocks, no GPEs, no SCI and no FACS: sleep and reset go
//! through the sleep control/status and reset registers, which the VMM's
//! ACPI PM model decodes at `acpi_pm_port + 0/1/2`. Linux then uses no
//! PIC and no PIT; it reads the CMOS RTC if `cmos_rtc` says one exists.

use alloc::vec::Vec;

use crate::aml::{self, resource, resource::Usage};
use crate::layout::{GuestLayout, ACPI_PM_PORTS};
use crate::ram::{self, OutOfRam, PutLe};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    Ram(OutOfRam),
    Aml(aml::Error),
    /// The tables do not fit the layout's table window.
    NoRoom,
}

impl From<OutOfRam> for Error {
    fn from(e: OutOfRam) -> Self {
        Error::Ram(e)
    }
}

impl From<aml::Error> for Error {
    fn from(e: aml::Error) -> Self {
        Error::Aml(e)
    }
}

const OEM_ID: &[u8; 6] = b"MOAT  ";
const OEM_TABLE_ID: &[u8; 8] = b"MOATVM  ";
const CREATOR_ID: &[u8; 4] = b"MOAT";
const TABLE_ALIGN: u64 = 16;

const SDT_HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
const RSDP_V1_LEN: usize = 20;
const FADT_LEN: usize = 276;
const FADT_REVISION: u8 = 6;
const DSDT_REVISION: u8 = 2; // 64-bit AML integers

/// Makes `bytes` sum to zero (mod 256) by setting the byte at `at`.
fn set_checksum(bytes: &mut [u8], at: usize) {
    bytes.put_u8(at, 0);
    let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    bytes.put_u8(at, 0u8.wrapping_sub(sum));
}

/// A system description table: the standard header, then `body`.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(SDT_HEADER_LEN + body.len());
    t.resize(SDT_HEADER_LEN, 0);
    t.put(0, signature);
    t.put_u32(4, (SDT_HEADER_LEN + body.len()) as u32);
    t.put_u8(8, revision);
    t.put(10, OEM_ID);
    t.put(16, OEM_TABLE_ID);
    t.put_u32(24, 1);
    t.put(28, CREATOR_ID);
    t.put_u32(32, 1);
    t.extend_from_slice(body);
    set_checksum(&mut t, 9);
    t
}

/// Generic Address Structure for an 8-bit register in I/O port space.
fn gas_io8(port: u16) -> [u8; 12] {
    const SYSTEM_IO: u8 = 1;
    const BYTE_ACCESS: u8 = 1;
    let mut g = [0u8; 12];
    g[..4].copy_from_slice(&[SYSTEM_IO, 8, 0, BYTE_ACCESS]);
    g[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// ACPI PM register offsets from `acpi_pm_port`, as the VMM's model decodes them.
pub const SLEEP_CONTROL_OFFSET: u16 = 0;
pub const SLEEP_STATUS_OFFSET: u16 = 1;
pub const RESET_OFFSET: u16 = 2;
/// The pvpanic device's port and ACPI ID (QEMU's, which Linux's
/// `pvpanic-mmio` driver binds to, port or memory alike).
pub const PVPANIC_PORT: u16 = 0x505;
pub const PVPANIC_HID: &str = "QEMU0001";
/// The value that resets the machine when written to the reset register.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 (soft off), as `\_S5_` declares it.
pub const SLP_TYP_S5: u64 = 5;

mod fadt {
    pub const FLAG_WBINVD: u32 = 1 << 0;
    pub const FLAG_PWR_BUTTON: u32 = 1 << 4;
    pub const FLAG_SLP_BUTTON: u32 = 1 << 5;
    pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    pub const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

    pub const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
    pub const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

    pub const IAPC_BOOT_ARCH: usize = 109;
    pub const FLAGS: usize = 112;
    pub const RESET_REG: usize = 116;
    pub const RESET_VALUE: usize = 128;
    pub const X_DSDT: usize = 140;
    pub const SLEEP_CONTROL_REG: usize = 244;
    pub const SLEEP_STATUS_REG: usize = 256;
}

fn build_fadt(layout: &GuestLayout, dsdt: u64) -> Vec<u8> {
    use fadt::*;
    let mut body = [0u8; FADT_LEN - SDT_HEADER_LEN];
    let at = |off: usize| off - SDT_HEADER_LEN;
    // Legacy devices and the 8042 are absent (their flags stay clear).
    let mut boot_arch = BOOT_ARCH_VGA_NOT_PRESENT;
    if !layout.cmos_rtc {
        boot_arch |= BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    }
    body.put_u16(at(IAPC_BOOT_ARCH), boot_arch);
    let flags =
        FLAG_WBINVD | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP | FLAG_HW_REDUCED_ACPI;
    body.put_u32(at(FLAGS), flags);
    let port = |off: u16| layout.acpi_pm_port.wrapping_add(off);
    body.put(at(RESET_REG), &gas_io8(port(RESET_OFFSET)));
    body.put_u8(at(RESET_VALUE), crate::acpi::RESET_VALUE);
    body.put_u64(at(X_DSDT), dsdt);
    body.put(at(SLEEP_CONTROL_REG), &gas_io8(port(SLEEP_CONTROL_OFFSET)));
    body.put(at(SLEEP_STATUS_REG), &gas_io8(port(SLEEP_STATUS_OFFSET)));
    sdt(b"FACP", FADT_REVISION, &body)
}

fn build_madt(layout: &GuestLayout) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1 << 0;
    const LOCAL_APIC: u8 = 0;
    const IO_APIC: u8 = 1;
    const SOURCE_OVERRIDE: u8 = 2;
    const LOCAL_APIC_NMI: u8 = 4;
    const ENABLED: u32 = 1 << 0;
    const ALL_PROCESSORS: u8 = 0xff;
    const LINT1: u8 = 1;
    const ISA_BUS: u8 = 0;
    const CONFORMING: u16 = 0;
    // The PIT's IRQ 0 is wired to IOAPIC pin 2, as on every PC.
    const PIT_IRQ: u8 = 0;
    const PIT_GSI: u32 = 2;

    let mut body = Vec::new();
    body.extend_from_slice(&(layout.lapic_base as u32).to_le_bytes());
    body.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for id in 0..layout.vcpus.min(255) as u8 {
        body.extend_from_slice(&[LOCAL_APIC, 8, id, id]);
        body.extend_from_slice(&ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[IO_APIC, 12, layout.ioapic_id, 0]);
    body.extend_from_slice(&(layout.ioapic_base as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&[SOURCE_OVERRIDE, 10, ISA_BUS, PIT_IRQ]);
    body.extend_from_slice(&PIT_GSI.to_le_bytes());
    body.extend_from_slice(&CONFORMING.to_le_bytes());
    body.extend_from_slice(&[LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    body.extend_from_slice(&CONFORMING.to_le_bytes());
    body.push(LINT1);
    sdt(b"APIC", 5, &body)
}

fn build_mcfg(ecam_base: u64) -> Vec<u8> {
    let mut body = [0u8; 8 + 16];
    body.put_u64(8, ecam_base);
    // Segment 0, buses 0..=0: what the DSDT's PCI0 declares.
    sdt(b"MCFG", 1, &body)
}

fn build_xsdt(tables: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = tables.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

fn build_rsdp(xsdt: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r.put(0, b"RSD PTR ");
    r.put(9, OEM_ID);
    r.put_u8(15, 2);
    r.put_u32(20, RSDP_LEN as u32);
    r.put_u64(24, xsdt);
    set_checksum(&mut r[..RSDP_V1_LEN], 8);
    set_checksum(&mut r, 32);
    r
}

/// The DSDT's AML: `\_S5_`, the PCI host bridge `\_SB.PCI0` (bus 0, config
/// ports, I/O and 32-bit memory windows, INTx routing), COM1, the CMOS RTC
/// (if the layout has one), the pvpanic device (QEMU's `QEMU0001`, through
/// which the guest reports a panic), and a motherboard-resources device
/// claiming the ACPI PM ports and ECAM.
pub fn dsdt_aml(layout: &GuestLayout) -> Result<Vec<u8>, aml::Error> {
    use aml::{device, eisa_id, integer, name, package, resource_template, scope};
    const PCI_CONFIG_PORT: u16 = 0xcf8;
    const PCI_CONFIG_LEN: u8 = 8;
    const COM1_PORT: u16 = 0x3f8;
    const COM1_IRQ: u8 = 4;
    const RTC_PORT: u16 = 0x70;
    const RTC_IRQ: u8 = 8;
    const PCI_SLOTS: u32 = 32;
    const ANY_FUNCTION: u32 = 0xffff;

    let s5 = name(
        "_S5_",
        &package(&[integer(SLP_TYP_S5), integer(0), integer(0), integer(0)])?,
    )?;

    let pci_crs = resource_template(&[
        resource::word_bus_number(0, 0)?,
        resource::io(PCI_CONFIG_PORT, PCI_CONFIG_LEN),
        resource::word_io(0, PCI_CONFIG_PORT - 1)?,
        resource::word_io(0xd00, 0xffff)?,
        resource::dword_memory(Usage::Producer, layout.pci_mmio.base, layout.pci_mmio.size)?,
    ])?;
    let mut prt = Vec::new();
    for slot in 0..PCI_SLOTS {
        for pin in 0..4u32 {
            let gsi = layout.pci_intx_gsi[((pin + slot) % 4) as usize];
            let addr = (slot << 16) | ANY_FUNCTION;
            prt.push(package(&[
                integer(addr.into()),
                integer(pin.into()),
                integer(0),
                integer(gsi.into()),
            ])?);
        }
    }
    let pci0 = [
        name("_HID", &eisa_id("PNP0A08")?)?,
        name("_CID", &eisa_id("PNP0A03")?)?,
        name("_SEG", &integer(0))?,
        name("_BBN", &integer(0))?,
        name("_UID", &integer(0))?,
        name("_CRS", &pci_crs)?,
        name("_PRT", &package(&prt)?)?,
    ]
    .concat();

    let com1_crs = resource_template(&[resource::io(COM1_PORT, 8), resource::irq(COM1_IRQ)?])?;
    let com1 = [
        name("_HID", &eisa_id("PNP0501")?)?,
        name("_UID", &integer(0))?,
        name("_CRS", &com1_crs)?,
    ]
    .concat();

    let mut board = Vec::from([resource::io(layout.acpi_pm_port, ACPI_PM_PORTS as u8)]);
    if let Some(ecam) = layout.ecam() {
        board.push(resource::qword_memory(
            Usage::Consumer,
            ecam.base,
            ecam.size,
        )?);
    }
    let mbrd = [
        name("_HID", &eisa_id("PNP0C02")?)?,
        name("_UID", &integer(0))?,
        name("_CRS", &resource_template(&board)?)?,
    ]
    .concat();

    let pvpanic = [
        name("_HID", &aml::string(PVPANIC_HID)?)?,
        name("_UID", &integer(0))?,
        name(
            "_CRS",
            &resource_template(&[resource::io(PVPANIC_PORT, 1)])?,
        )?,
    ]
    .concat();

    let mut sb = [
        device("PCI0", &pci0)?,
        device("COM1", &com1)?,
        device("PEVT", &pvpanic)?,
        device("MBRD", &mbrd)?,
    ]
    .concat();
    if layout.cmos_rtc {
        let rtc = [
            name("_HID", &eisa_id("PNP0B00")?)?,
            name(
                "_CRS",
                &resource_template(&[resource::io(RTC_PORT, 2), resource::irq(RTC_IRQ)?])?,
            )?,
        ]
        .concat();
        sb.extend(device("RTC_", &rtc)?);
    }
    Ok([s5, scope("\\_SB", &sb)?].concat())
}

/// Where each table went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub mcfg: Option<u64>,
    pub dsdt: u64,
    /// One past the last byte written.
    pub end: u64,
}

/// Writes the tables into `ram` at the layout's table window, RSDP first.
/// Use a validated `layout`: an unvalidated one gives errors or tables
/// describing nonsense, but never a panic.
pub fn build(ram: &mut [u8], layout: &GuestLayout) -> Result<AcpiTables, Error> {
    let window = layout.acpi_tables;
    let limit = window.end().ok_or(Error::NoRoom)?;
    let align = |a: u64| a.checked_next_multiple_of(TABLE_ALIGN).ok_or(Error::NoRoom);
    let rsdp = align(window.base)?;
    let mut cursor = rsdp
        .checked_add(RSDP_LEN as u64)
        .filter(|&e| e <= limit)
        .ok_or(Error::NoRoom)?;
    let mut place = |ram: &mut [u8], bytes: &[u8]| -> Result<u64, Error> {
        let at = align(cursor)?;
        let end = at
            .checked_add(bytes.len() as u64)
            .filter(|&e| e <= limit)
            .ok_or(Error::NoRoom)?;
        ram::write(ram, at, bytes)?;
        cursor = end;
        Ok(at)
    };

    let dsdt = place(ram, &sdt(b"DSDT", DSDT_REVISION, &dsdt_aml(layout)?))?;
    let fadt = place(ram, &build_fadt(layout, dsdt))?;
    let madt = place(ram, &build_madt(layout))?;
    let mcfg = layout
        .ecam_base
        .map(|b| place(ram, &build_mcfg(b)))
        .transpose()?;
    let mut entries = Vec::from([fadt, madt]);
    entries.extend(mcfg);
    let xsdt = place(ram, &build_xsdt(&entries))?;
    let end = cursor;
    ram::write(ram, rsdp, &build_rsdp(xsdt))?;
    Ok(AcpiTables {
        rsdp,
        xsdt,
        fadt,
        madt,
        mcfg,
        dsdt,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Window, MIB};

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_land_in_the_window_with_valid_checksums() {
        let layout = GuestLayout::standard(16 * MIB, 2);
        let mut ram = vec![0u8; 16 * MIB as usize];
        let t = build(&mut ram, &layout).unwrap();
        assert_eq!(t.rsdp, 0xe_0000);
        assert!(t.end <= 0x10_0000);
        let rsdp = &ram[t.rsdp as usize..][..RSDP_LEN];
        assert!(sums_to_zero(&rsdp[..RSDP_V1_LEN]) && sums_to_zero(rsdp));
        for addr in [t.xsdt, t.fadt, t.madt, t.mcfg.unwrap(), t.dsdt] {
            let len =
                u32::from_le_bytes(ram[addr as usize + 4..][..4].try_into().unwrap()) as usize;
            assert_eq!(addr % TABLE_ALIGN, 0);
            assert!(
                sums_to_zero(&ram[addr as usize..][..len]),
                "table at {addr:#x}"
            );
        }
    }

    #[test]
    fn a_window_too_small_is_refused() {
        let mut ram = vec![0u8; 2 * MIB as usize];
        for size in [0x10, 0x100, 0x800] {
            let layout = GuestLayout {
                acpi_tables: Window::new(0xe_0000, size),
                ..GuestLayout::standard(2 * MIB, 1)
            };
            assert_eq!(build(&mut ram, &layout), Err(Error::NoRoom));
        }
        let layout = GuestLayout::standard(2 * MIB, 1);
        assert!(matches!(
            build(&mut ram[..0xe_0100], &layout),
            Err(Error::Ram(_))
        ));
    }

    #[test]
    fn fadt_fields() {
        let layout = GuestLayout {
            cmos_rtc: false,
            ..GuestLayout::standard(2 * MIB, 1)
        };
        let f = build_fadt(&layout, 0x1234_5678);
        assert_eq!(f.len(), FADT_LEN);
        assert_eq!(f[fadt::IAPC_BOOT_ARCH..][..2], 0x24u16.to_le_bytes());
        assert_eq!(
            f[fadt::RESET_REG..][..12],
            [1, 8, 0, 1, 0x02, 0x06, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(f[fadt::RESET_VALUE], 1);
        assert_eq!(f[fadt::X_DSDT..][..8], 0x1234_5678u64.to_le_bytes());
    }
}
