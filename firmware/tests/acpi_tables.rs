//! The ACPI tables read back by the `acpi` crate (as an OS would), and the
//! DSDT's AML read back by a grammar-driven reader.

mod common;

use std::ptr::NonNull;

use acpi::address::AddressSpace;
use acpi::fadt::Fadt;
use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
use common::aml_reader::{self, eisa_text, Resource, Value};
use common::MIB;
use firmware::acpi::AcpiTables as Built;
use firmware::GuestLayout;

/// Maps guest-physical addresses onto a test's RAM buffer, which must
/// outlive every mapping and not change while they exist.
#[derive(Clone)]
struct RamHandler {
    base: NonNull<u8>,
    len: usize,
}

impl RamHandler {
    fn new(ram: &[u8]) -> Self {
        Self {
            base: NonNull::from(ram).cast(),
            len: ram.len(),
        }
    }
}

impl AcpiHandler for RamHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        assert!(
            physical_address
                .checked_add(size)
                .is_some_and(|end| end <= self.len),
            "mapping outside RAM"
        );
        // SAFETY: the range was just checked to lie inside the RAM buffer.
        let virt = unsafe { self.base.add(physical_address) }.cast::<T>();
        // SAFETY: `virt` points at `size` readable bytes of the buffer,
        // which outlives the mapping (see the type's contract).
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

struct Guest {
    ram: Vec<u8>,
    layout: GuestLayout,
    built: Built,
}

fn guest(layout: GuestLayout) -> Guest {
    let mut ram = vec![0u8; layout.low_ram_end() as usize];
    layout.validate(ram.len() as u64).unwrap();
    let built = firmware::acpi::build(&mut ram, &layout).unwrap();
    Guest { ram, layout, built }
}

fn tables(g: &Guest) -> AcpiTables<RamHandler> {
    // SAFETY: the RSDP address is inside the RAM buffer the handler maps.
    unsafe { AcpiTables::from_rsdp(RamHandler::new(&g.ram), g.built.rsdp as usize) }.unwrap()
}

#[test]
fn rsdp_is_found_by_address_and_by_legacy_scan() {
    let g = guest(GuestLayout::standard(64 * MIB as u64, 1));
    assert_eq!(g.built.rsdp, 0xe_0000);
    let by_addr = tables(&g);
    assert_eq!(by_addr.revision(), 2);
    // SAFETY: the scan reads the BDA and 0xe0000..0x100000, all inside RAM.
    let scanned = unsafe { AcpiTables::search_for_rsdp_bios(RamHandler::new(&g.ram)) }.unwrap();
    let sigs = |t: &AcpiTables<RamHandler>| {
        t.headers()
            .map(|h| h.signature.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(sigs(&by_addr), ["FACP", "APIC", "MCFG"]);
    assert_eq!(sigs(&scanned), sigs(&by_addr));
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let g = guest(GuestLayout::standard(64 * MIB as u64, 1));
    let t = tables(&g);
    let fadt = t.find_table::<Fadt>().unwrap();
    assert!(fadt.header().revision >= 5);
    let flags = fadt.flags;
    assert!(flags.system_is_hw_reduced_acpi());
    assert!(flags.supports_system_reset_via_fadt());
    let boot = fadt.iapc_boot_arch;
    assert!(boot.dont_probe_vga());
    assert!(!boot.motherboard_implements_8042());
    assert!(!boot.legacy_devices_are_accessible());
    assert_eq!(boot_arch_raw(&g) & (1 << 5), 0, "a CMOS RTC is present");

    let reset = fadt.reset_register().unwrap();
    assert_eq!(
        (reset.address_space, reset.bit_width, reset.address),
        (AddressSpace::SystemIo, 8, 0x602)
    );
    assert_eq!(fadt.reset_value, 1);
    let ctl = fadt.sleep_control_register().unwrap().unwrap();
    assert_eq!(
        (ctl.address_space, ctl.bit_width, ctl.address),
        (AddressSpace::SystemIo, 8, 0x600)
    );
    let sts = fadt.sleep_status_register().unwrap().unwrap();
    assert_eq!(
        (sts.address_space, sts.bit_width, sts.address),
        (AddressSpace::SystemIo, 8, 0x601)
    );

    // No PM1 blocks, no SCI, no FACS on a hardware-reduced platform.
    assert!(fadt.pm1a_control_block().is_err() || fadt.pm1a_control_block().unwrap().address == 0);
    assert_eq!({ fadt.sci_interrupt }, 0);
    assert!(fadt.facs_address().is_err());
    assert_eq!(fadt.dsdt_address().unwrap() as u64, g.built.dsdt);
}

/// The FADT's IAPC_BOOT_ARCH field, whose CMOS bit the `acpi` crate does not decode.
fn boot_arch_raw(g: &Guest) -> u16 {
    common::u16_at(&g.ram, g.built.fadt + 109)
}

#[test]
fn cmos_rtc_absence_is_reported() {
    let g = guest(GuestLayout {
        cmos_rtc: false,
        ..GuestLayout::standard(64 * MIB as u64, 1)
    });
    assert_ne!(boot_arch_raw(&g) & (1 << 5), 0);
}

#[test]
fn madt_lists_cpus_ioapic_and_overrides() {
    let g = guest(GuestLayout::standard(64 * MIB as u64, 3));
    let t = tables(&g);
    let mapping = t.find_table::<Madt>().unwrap();
    let madt = mapping.get();
    assert_eq!({ madt.local_apic_address }, 0xfee0_0000);
    assert!(madt.supports_8259());
    let (mut cpus, mut ioapics, mut overrides, mut nmis) = (vec![], vec![], vec![], vec![]);
    for e in madt.entries() {
        match e {
            MadtEntry::LocalApic(l) => cpus.push((l.processor_id, l.apic_id, { l.flags })),
            MadtEntry::IoApic(io) => ioapics.push((io.io_apic_id, { io.io_apic_address }, {
                io.global_system_interrupt_base
            })),
            MadtEntry::InterruptSourceOverride(o) => {
                overrides.push((o.bus, o.irq, { o.global_system_interrupt }, { o.flags }))
            }
            MadtEntry::LocalApicNmi(n) => nmis.push((n.processor_id, n.nmi_line)),
            other => panic!("unexpected MADT entry {other:?}"),
        }
    }
    assert_eq!(cpus, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapics, [(0, 0xfec0_0000, 0)]);
    assert_eq!(overrides, [(0, 0, 2, 0)]);
    assert_eq!(nmis, [(0xff, 1)]);
}

#[test]
fn mcfg_follows_the_ecam_base() {
    let g = guest(GuestLayout::standard(64 * MIB as u64, 1));
    let t = tables(&g);
    let mcfg = t.find_table::<Mcfg>().unwrap();
    let e = mcfg.entries();
    assert_eq!(e.len(), 1);
    assert_eq!(
        ({ e[0].base_address }, { e[0].pci_segment_group }),
        (0xe000_0000, 0)
    );
    assert_eq!((e[0].bus_number_start, e[0].bus_number_end), (0, 0));

    let g = guest(GuestLayout {
        ecam_base: None,
        ..GuestLayout::standard(64 * MIB as u64, 1)
    });
    let t = tables(&g);
    assert!(t.find_table::<Mcfg>().is_err());
    assert_eq!(g.built.mcfg, None);
}

fn dsdt(g: &Guest) -> aml_reader::Namespace {
    let t = tables(g);
    let aml = t.dsdt().unwrap();
    aml_reader::parse(&g.ram[aml.address..][..aml.length as usize]).unwrap()
}

fn buffer(ns: &aml_reader::Namespace, path: &str) -> Vec<Resource> {
    match ns.get(path) {
        Some(Value::Buf(b)) => aml_reader::resources(b).unwrap(),
        other => panic!("{path}: {other:?}"),
    }
}

fn eisa(ns: &aml_reader::Namespace, path: &str) -> String {
    match ns.get(path) {
        Some(Value::Int(v)) => eisa_text(*v),
        other => panic!("{path}: {other:?}"),
    }
}

#[test]
fn dsdt_declares_s5_and_the_pci_root() {
    let g = guest(GuestLayout::standard(64 * MIB as u64, 1));
    let ns = dsdt(&g);
    let ints = |v: &[u64]| Value::Pkg(v.iter().map(|i| Value::Int(*i)).collect());
    assert_eq!(ns.get("\\_S5_"), Some(&ints(&[5, 0, 0, 0])));
    assert_eq!(ns.get("\\_SB_.PCI0"), Some(&Value::Scope));
    assert_eq!(eisa(&ns, "\\_SB_.PCI0._HID"), "PNP0A08");
    assert_eq!(eisa(&ns, "\\_SB_.PCI0._CID"), "PNP0A03");
    for n in ["_SEG", "_BBN", "_UID"] {
        assert_eq!(
            ns.get(&format!("\\_SB_.PCI0.{n}")),
            Some(&Value::Int(0)),
            "{n}"
        );
    }

    let crs = buffer(&ns, "\\_SB_.PCI0._CRS");
    // Producer, MinFixed, MaxFixed, PosDecode.
    let window = |kind, min, max, width| Resource::Address {
        kind,
        flags: 0x0c,
        type_flags: if kind == 1 {
            3
        } else if kind == 0 {
            1
        } else {
            0
        },
        min,
        max,
        len: max - min + 1,
        width,
    };
    assert_eq!(
        crs,
        [
            window(2, 0, 0, 2),
            Resource::Io {
                min: 0xcf8,
                max: 0xcf8,
                align: 1,
                len: 8
            },
            window(1, 0, 0xcf7, 2),
            window(1, 0xd00, 0xffff, 2),
            window(0, 0xc000_0000, 0xdfff_ffff, 4),
        ]
    );
}

#[test]
fn dsdt_routes_pci_intx_with_the_swizzle() {
    let g = guest(GuestLayout::standard(64 * MIB as u64, 1));
    let ns = dsdt(&g);
    let Some(Value::Pkg(prt)) = ns.get("\\_SB_.PCI0._PRT") else {
        panic!("no _PRT")
    };
    assert_eq!(prt.len(), 32 * 4);
    let entry = |slot: u64, pin: u64| {
        prt.iter()
            .find_map(|e| match e {
                Value::Pkg(v) if v[..2] == [Value::Int((slot << 16) | 0xffff), Value::Int(pin)] => {
                    Some(v.clone())
                }
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        entry(0, 0),
        [
            Value::Int(0xffff),
            Value::Int(0),
            Value::Int(0),
            Value::Int(16)
        ]
    );
    assert_eq!(entry(1, 0)[3], Value::Int(17));
    assert_eq!(entry(3, 2)[3], Value::Int(17));
    assert_eq!(entry(31, 3)[3], Value::Int(18));
}

#[test]
fn dsdt_has_com1_and_motherboard_resources() {
    let g = guest(GuestLayout::standard(64 * MIB as u64, 1));
    let ns = dsdt(&g);
    assert_eq!(eisa(&ns, "\\_SB_.COM1._HID"), "PNP0501");
    assert_eq!(
        buffer(&ns, "\\_SB_.COM1._CRS"),
        [
            Resource::Io {
                min: 0x3f8,
                max: 0x3f8,
                align: 1,
                len: 8
            },
            Resource::Irq { mask: 1 << 4 }
        ]
    );
    assert_eq!(
        ns.get("\\_SB_.PEVT._HID"),
        Some(&aml_reader::Value::Str("QEMU0001".into()))
    );
    assert_eq!(
        buffer(&ns, "\\_SB_.PEVT._CRS"),
        [Resource::Io {
            min: 0x505,
            max: 0x505,
            align: 1,
            len: 1
        }]
    );
    assert_eq!(eisa(&ns, "\\_SB_.RTC_._HID"), "PNP0B00");
    assert_eq!(
        buffer(&ns, "\\_SB_.RTC_._CRS"),
        [
            Resource::Io {
                min: 0x70,
                max: 0x70,
                align: 1,
                len: 2
            },
            Resource::Irq { mask: 1 << 8 }
        ]
    );
    assert_eq!(eisa(&ns, "\\_SB_.MBRD._HID"), "PNP0C02");
    let ecam = Resource::Address {
        kind: 0,
        flags: 0x0d,
        type_flags: 1,
        min: 0xe000_0000,
        max: 0xe00f_ffff,
        len: 0x10_0000,
        width: 8,
    };
    assert_eq!(
        buffer(&ns, "\\_SB_.MBRD._CRS"),
        [
            Resource::Io {
                min: 0x600,
                max: 0x600,
                align: 1,
                len: 3
            },
            ecam
        ]
    );

    let g = guest(GuestLayout {
        ecam_base: None,
        acpi_pm_port: 0xb000,
        ..g.layout.clone()
    });
    let ns = dsdt(&g);
    assert_eq!(
        buffer(&ns, "\\_SB_.MBRD._CRS"),
        [Resource::Io {
            min: 0xb000,
            max: 0xb000,
            align: 1,
            len: 3
        }]
    );
}

#[test]
fn table_window_in_ram_works_too() {
    let layout = GuestLayout {
        acpi_tables: firmware::Window::new(32 * MIB as u64, 0x1_0000),
        ..GuestLayout::standard(64 * MIB as u64, 1)
    };
    let g = guest(layout);
    assert_eq!(g.built.rsdp, 32 * MIB as u64);
    assert!(g.built.end <= 32 * MIB as u64 + 0x1_0000);
    assert!(dsdt(&g).contains_key("\\_S5_"));
}
