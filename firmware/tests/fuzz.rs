//! Deterministic fuzzing of everything that takes outside input: kernel
//! images (mutated and random), layouts, AML names. Nothing may panic, and
//! whatever is accepted must satisfy the loaders' invariants.

mod common;

use common::{bz, bzimage, standard_vmlinux, Rng, MIB};
use firmware::e820::{self, E820Type};
use firmware::layout::{low, Window};
use firmware::{aml, linux, pvh, GuestLayout, Payload};

const RAM: usize = 24 * MIB;
const ITERATIONS: usize = 4000;

/// Mutates `img` in one of several ways, biased towards `hot` (the header).
fn mutate(rng: &mut Rng, img: &mut Vec<u8>, hot: std::ops::Range<usize>, fields: &[usize]) {
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let at = hot.start + rng.below(hot.len());
                if let Some(b) = img.get_mut(at) {
                    *b = rng.next() as u8;
                }
            }
        }
        1 => {
            let at = rng.below(img.len());
            img[at] ^= 1 << rng.below(8);
        }
        2 => img.truncate(rng.below(img.len() + 1)),
        _ => {
            let at = fields[rng.below(fields.len())];
            let width = [1, 2, 4, 8][rng.below(4)];
            let value = match rng.below(4) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << rng.below(64),
                _ => rng.next(),
            };
            if let Some(dst) = img.get_mut(at..at + width) {
                dst.copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
    }
}

fn check_linux(l: &linux::Loaded, ram: &[u8], initrd_len: Option<usize>) {
    assert!(l.kernel_addr >= MIB as u64 && l.kernel_end <= ram.len() as u64);
    assert_eq!(l.state.rip, l.kernel_addr + 0x200);
    assert_eq!(l.state.rsi, low::ZERO_PAGE);
    assert_eq!(&ram[low::ZERO_PAGE as usize + 0x202..][..4], b"HdrS");
    assert_eq!(l.initrd.map(|(_, s)| s as usize), initrd_len);
    if let Some((addr, size)) = l.initrd {
        assert_eq!(addr % 0x1000, 0);
        assert!(addr >= l.kernel_end && addr + size <= ram.len() as u64);
    }
}

#[test]
fn mutated_and_random_bzimages() {
    let good = bzimage(0x2000);
    let map = e820::memory_map(&GuestLayout::standard(RAM as u64, 1));
    let fields = [
        bz::SETUP_SECTS,
        bz::VERSION,
        bz::LOADFLAGS,
        bz::INITRD_ADDR_MAX,
        bz::KERNEL_ALIGNMENT,
        bz::RELOCATABLE,
        bz::XLOADFLAGS,
        bz::CMDLINE_SIZE,
        bz::PAYLOAD_OFFSET,
        bz::PAYLOAD_LENGTH,
        bz::PREF_ADDRESS,
        bz::INIT_SIZE,
        bz::JUMP + 1,
    ];
    let mut ram = vec![0u8; RAM];
    let big_initrd = vec![0x5a; 2 * RAM];
    let mut rng = Rng::new(0x5eed_0001);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..ITERATIONS {
        let img = if i % 4 == 3 {
            // Random bytes, sometimes with the magic numbers planted.
            let len = rng.below(0x1400);
            let mut img = rng.bytes(len);
            if rng.below(2) == 0 && img.len() > 0x206 {
                img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
                img[0x202..0x206].copy_from_slice(b"HdrS");
            }
            img
        } else {
            let mut img = good.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut rng, &mut img, 0x1f0..0x270, &fields);
            }
            img
        };
        let cmdline = vec![b'c'; rng.below(3000)];
        let initrd = match rng.below(4) {
            0 => None,
            1 => Some(&big_initrd[..RAM + rng.below(RAM)]),
            _ => Some(&big_initrd[..rng.below(0x1_0000)]),
        };
        let info = firmware::BootInfo {
            cmdline: &cmdline,
            initrd,
            e820: &map,
            rsdp: Some(0xe_0000),
        };
        match linux::load(&mut ram, &img, &info) {
            Ok(l) => {
                check_linux(&l, &ram, initrd.map(<[u8]>::len));
                accepted += 1;
            }
            Err(_) => refused += 1,
        }
    }
    assert!(
        accepted > ITERATIONS / 10 && refused > ITERATIONS / 10,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn mutated_and_random_elves() {
    let good = standard_vmlinux();
    let map = e820::memory_map(&GuestLayout::standard(RAM as u64, 1));
    let mut fields = vec![
        0x04,
        0x05,
        0x10,
        0x12,
        common::elf::PHOFF,
        common::elf::PHENTSIZE,
        common::elf::PHNUM,
    ];
    for ph in 0..3 {
        let at = common::elf::PHDR + ph * common::elf::PHDR_SIZE;
        fields.extend([at, at + 8, at + 24, at + 32, at + 40]);
    }
    let notes_at = common::elf::PHDR + 3 * common::elf::PHDR_SIZE;
    fields.extend((0..64).step_by(4).map(|o| notes_at + o));
    let mut ram = vec![0u8; RAM];
    let mut rng = Rng::new(0x5eed_0002);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..ITERATIONS {
        let img = if i % 4 == 3 {
            let len = rng.below(0x800);
            let mut img = rng.bytes(len);
            if img.len() > 0x40 {
                img[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
                img[0x10..0x14].copy_from_slice(&[2, 0, 62, 0]);
                img[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
            }
            img
        } else {
            let mut img = good.clone();
            for _ in 0..1 + rng.below(3) {
                mutate(&mut rng, &mut img, 0..notes_at + 80, &fields);
            }
            img
        };
        let initrd = (rng.below(2) == 0).then(|| vec![0x77; rng.below(0x8000)]);
        let info = firmware::BootInfo {
            cmdline: b"x",
            initrd: initrd.as_deref(),
            e820: &map,
            rsdp: None,
        };
        match pvh::load(&mut ram, &img, &info) {
            Ok(l) => {
                let entry = pvh::Vmlinux::parse(&img).unwrap().entry;
                assert_eq!(l.state.rip, u64::from(entry));
                assert!(u64::from(entry) >= MIB as u64 && l.kernel_end <= RAM as u64);
                assert_eq!(common::u32_at(&ram, low::PVH_START_INFO), 0x336e_c578);
                if let Some((addr, size)) = l.initrd {
                    assert!(
                        addr >= l.kernel_end && addr + size <= RAM as u64 && addr % 0x1000 == 0
                    );
                }
                accepted += 1;
            }
            Err(_) => refused += 1,
        }
    }
    assert!(
        accepted > ITERATIONS / 10 && refused > ITERATIONS / 10,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn random_layouts_are_refused_or_boot() {
    const MAX_RAM: usize = 48 * MIB;
    let kernel = bzimage(0x2000);
    let mut backing = vec![0u8; MAX_RAM];
    let mut rng = Rng::new(0x5eed_0003);
    let mut booted = 0;
    for _ in 0..ITERATIONS / 4 {
        let std = GuestLayout::standard(0, 1);
        let ram_size = (1 + rng.below(MAX_RAM / MIB) as u64) << 20;
        let vcpus = 1 + rng.below(8) as u64;
        // Either a few fields go wild or most do.
        let odds = if rng.below(2) == 0 { 40 } else { 4 };
        let mut pick = |usual: u64| match rng.below(odds) {
            0 => rng.next(),
            1 => rng.next() & 0xffff_f000,
            _ => usual,
        };
        let layout = GuestLayout {
            ram_size: pick(ram_size),
            mmio_hole_start: pick(std.mmio_hole_start),
            pci_mmio: Window::new(pick(std.pci_mmio.base), pick(std.pci_mmio.size)),
            ecam_base: Some(pick(0xe000_0000)),
            ioapic_base: pick(std.ioapic_base),
            ioapic_id: pick(0) as u8,
            ioapic_pins: 24,
            lapic_base: pick(std.lapic_base),
            acpi_pm_port: pick(0x600) as u16,
            pci_intx_gsi: [16, 17, 18, 19].map(|g| pick(g) as u32),
            vcpus: pick(vcpus) as u32,
            cmos_rtc: true,
            acpi_tables: Window::new(pick(std.acpi_tables.base), pick(std.acpi_tables.size)),
        };
        let len = (layout.low_ram_end() as usize).min(MAX_RAM);
        let ram = &mut backing[..len];
        // The pieces take unvalidated layouts without panicking too.
        let _ = firmware::acpi::build(ram, &layout);
        let _ = e820::memory_map(&layout);
        let payload = Payload {
            kernel: &kernel,
            cmdline: b"",
            initrd: None,
        };
        if let Ok(s) = firmware::boot_linux(ram, &layout, &payload) {
            booted += 1;
            assert!(layout.validate(len as u64).is_ok());
            assert_eq!(s.rip % 0x200, 0);
            let map = e820::memory_map(&layout);
            assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
            assert!(map.iter().all(|e| e.size > 0));
            assert!(map.iter().any(|e| e.kind == E820Type::Acpi));
        }
    }
    assert!(booted > 0);
}

#[test]
fn random_aml_names_and_strings() {
    let alphabet = b"\\^._ABZ09az.\0\x7f\xc3";
    let mut rng = Rng::new(0x5eed_0004);
    for _ in 0..ITERATIONS * 2 {
        let s: Vec<u8> = (0..rng.below(20))
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let Ok(s) = String::from_utf8(s) else {
            continue;
        };
        if let Ok(n) = aml::name_string(&s) {
            assert!(!n.is_empty());
            assert!(aml::name(&s, &aml::integer(1)).is_ok());
        }
        let _ = aml::string(&s);
        let _ = aml::eisa_id(&s);
        let _ = aml::resource::irq(rng.next() as u8);
        let (a, b) = (rng.next(), rng.next());
        let _ = aml::resource::dword_memory(aml::resource::Usage::Producer, a, b);
        let _ = aml::resource::qword_memory(aml::resource::Usage::Consumer, a, b >> rng.below(64));
        let _ = aml::resource::word_io(a as u16, b as u16);
    }
}
