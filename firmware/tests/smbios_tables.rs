//! The SMBIOS tables read back by an independent decoder (the `dmidecode`
//! crate), as Linux's DMI scan would find them.

use dmidecode::{EntryPoint, Structure};
use firmware::layout::{GuestLayout, GIB, MIB};
use firmware::smbios::{self, PRODUCT, SCAN_END, SCAN_START, VENDOR};

fn decode(ram_size: u64, vcpus: u32) -> (usize, usize, usize, usize) {
    let layout = GuestLayout::standard(ram_size, vcpus);
    let mut ram = vec![0u8; SCAN_END as usize];
    let tables = smbios::build(&mut ram, &layout, 0xe_2000).unwrap();
    // Found as Linux scans: the anchor on a 16-byte boundary.
    let found = (SCAN_START..SCAN_END)
        .step_by(16)
        .find(|&at| ram[at as usize..].starts_with(b"_SM3_"));
    assert_eq!(found, Some(tables.entry));
    // (`search` takes the buffer's length as a u8: give it the entry alone.)
    let at = tables.entry as usize;
    let entry = EntryPoint::search(&ram[at..at + 0x20]).expect("a valid entry point");
    assert_eq!(entry.major(), 3);
    assert_eq!(entry.smbios_address(), tables.table);
    let table = &ram[tables.table as usize..tables.end as usize];
    let (mut systems, mut processors, mut devices, mut ranges) = (0, 0, 0, 0);
    for structure in entry.structures(table) {
        match structure.expect("every structure decodes") {
            Structure::System(system) => {
                assert_eq!(system.manufacturer, VENDOR);
                assert_eq!(system.product, PRODUCT);
                systems += 1;
            }
            Structure::Bios(bios) => assert_eq!(bios.vendor, VENDOR),
            Structure::Processor(_) => processors += 1,
            Structure::MemoryDevice(_) => devices += 1,
            Structure::MemoryArrayMappedAddress(_) => ranges += 1,
            _ => {}
        }
    }
    (systems, processors, devices, ranges)
}

#[test]
fn one_system_a_processor_per_vcpu_and_the_memory() {
    assert_eq!(decode(256 * MIB, 1), (1, 1, 1, 1));
    assert_eq!(decode(8 * GIB, 4), (1, 4, 1, 2));
}
