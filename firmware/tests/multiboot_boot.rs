//! Multiboot v1: the a.out kludge and ELF32/ELF64 kernels, modules with
//! command lines, the information structure and memory map, the entry
//! state, and every malformed header refused with its own error.

mod common;

use common::*;
use firmware::cpu::{ar, cr0};
use firmware::e820::{memory_map, E820Type};
use firmware::layout::low;
use firmware::multiboot::{self, flags, info, Error, Module, BOOTLOADER_MAGIC, HEADER_MAGIC};
use firmware::{boot_detected, boot_multiboot, GuestLayout, KernelFormat, Payload};

const RAM: usize = 8 * MIB;
const LOAD: u32 = 0x10_0000;
/// Where the header sits in the test images.
const HEADER_OFFSET: usize = 0x40;
const BSS: u32 = 0x3000;

/// Multiboot header words: magic, flags, checksum, then the kludge fields.
fn header(flags: u32, kludge: Option<[u32; 5]>) -> Vec<u8> {
    let mut words = vec![
        HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
    ];
    words.extend(kludge.unwrap_or_default());
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// An a.out-kludge kernel of `len` patterned bytes loaded at 1 MiB, its
/// header at [`HEADER_OFFSET`], entry 0x80 in, [`BSS`] bytes of bss.
fn kludge_kernel(len: usize) -> Vec<u8> {
    let mut img: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
    let fields = [
        LOAD + HEADER_OFFSET as u32, // header_addr
        LOAD,                        // load_addr
        LOAD + len as u32,           // load_end_addr
        LOAD + len as u32 + BSS,     // bss_end_addr
        LOAD + 0x80,                 // entry_addr
    ];
    let h = header(
        flags::AOUT_KLUDGE | flags::PAGE_ALIGN | flags::MEMORY_INFO,
        Some(fields),
    );
    put(&mut img, HEADER_OFFSET, &h);
    img
}

/// Rewrites the kludge field `index` (0 header_addr … 4 entry_addr).
fn set_field(img: &mut [u8], index: usize, value: u32) {
    put_u32(img, HEADER_OFFSET + 12 + 4 * index, value);
}

/// An ELF kernel (32- or 64-bit) with one PT_LOAD: `code` at virtual
/// `vaddr`, physical `paddr`, `bss` more bytes in memory; entry `entry`
/// (virtual). The Multiboot header (no kludge) is the first code bytes.
fn elf_kernel(class64: bool, vaddr: u64, paddr: u64, entry: u64, code_len: usize) -> Vec<u8> {
    let (ehsize, phsize) = if class64 { (64, 56) } else { (52, 32) };
    let code_at = 0x100;
    let mut img = vec![0u8; code_at + code_len];
    for (i, b) in img[code_at..].iter_mut().enumerate() {
        *b = (i * 3 + 1) as u8;
    }
    put(
        &mut img,
        code_at,
        &header(flags::PAGE_ALIGN | flags::MEMORY_INFO, None),
    );
    put(&mut img, 0, b"\x7fELF");
    img[4] = if class64 { 2 } else { 1 };
    img[5] = 1; // little-endian
    img[6] = 1; // version
    put_u16(&mut img, 0x10, 2); // ET_EXEC
    put_u16(&mut img, 0x12, if class64 { 62 } else { 3 });
    put_u32(&mut img, 0x14, 1);
    let ph = ehsize;
    if class64 {
        put_u64(&mut img, 0x18, entry);
        put_u64(&mut img, 0x20, ph as u64);
        put_u16(&mut img, 0x34, ehsize as u16);
        put_u16(&mut img, 0x36, phsize as u16);
        put_u16(&mut img, 0x38, 1);
        put_u32(&mut img, ph, 1); // PT_LOAD
        put_u32(&mut img, ph + 4, 5);
        put_u64(&mut img, ph + 8, code_at as u64);
        put_u64(&mut img, ph + 16, vaddr);
        put_u64(&mut img, ph + 24, paddr);
        put_u64(&mut img, ph + 32, code_len as u64);
        put_u64(&mut img, ph + 40, code_len as u64 + u64::from(BSS));
    } else {
        put_u32(&mut img, 0x18, entry as u32);
        put_u32(&mut img, 0x1c, ph as u32);
        put_u16(&mut img, 0x28, ehsize as u16);
        put_u16(&mut img, 0x2a, phsize as u16);
        put_u16(&mut img, 0x2c, 1);
        put_u32(&mut img, ph, 1); // PT_LOAD
        put_u32(&mut img, ph + 4, code_at as u32);
        put_u32(&mut img, ph + 8, vaddr as u32);
        put_u32(&mut img, ph + 12, paddr as u32);
        put_u32(&mut img, ph + 16, code_len as u32);
        put_u32(&mut img, ph + 20, code_len as u32 + BSS);
    }
    img
}

fn layout() -> GuestLayout {
    GuestLayout::standard(RAM as u64, 1)
}

fn boot(
    kernel: &[u8],
    cmdline: &[u8],
    modules: &[Module],
) -> (Vec<u8>, Result<firmware::BootState, firmware::Error>) {
    let mut ram = vec![0u8; RAM];
    let state = boot_multiboot(&mut ram, &layout(), kernel, cmdline, modules);
    (ram, state)
}

fn load(kernel: &[u8], modules: &[Module]) -> Result<multiboot::Loaded, Error> {
    let mut ram = vec![0u8; RAM];
    multiboot::load(&mut ram, kernel, b"", modules, &memory_map(&layout()))
}

fn c_string(ram: &[u8], at: u64) -> &[u8] {
    let s = &ram[at as usize..];
    &s[..s.iter().position(|&b| b == 0).unwrap()]
}

#[test]
fn kludge_kernel_with_two_modules_gets_everything_the_spec_promises() {
    let kernel = kludge_kernel(0x2345);
    let mod_a = b"first module".to_vec();
    let mod_b: Vec<u8> = (0..10_000).map(|i| (i % 251) as u8).collect();
    let modules = [
        Module {
            bytes: &mod_a,
            cmdline: b"mod-a alpha=1",
        },
        Module {
            bytes: &mod_b,
            cmdline: b"mod-b",
        },
    ];
    let mut ram = vec![0xaau8; RAM];
    let state = boot_multiboot(&mut ram, &layout(), &kernel, b"kernel verbose", &modules).unwrap();

    // The entry state: protected mode, paging off, flat 32-bit segments.
    assert_eq!(state.rax, u64::from(BOOTLOADER_MAGIC));
    assert_eq!(state.rbx, multiboot::INFO_AT);
    assert_eq!(state.rip, u64::from(LOAD) + 0x80);
    assert_eq!(state.cr0 & (cr0::PE | cr0::PG), cr0::PE);
    assert_eq!(state.efer, 0);
    assert_eq!(state.cs.access_rights, ar::CODE32);
    assert_eq!((state.cs.base, state.cs.limit), (0, u32::MAX));
    assert_eq!(
        (state.ds.base, state.ds.limit, state.ds.access_rights),
        (0, u32::MAX, ar::DATA)
    );
    assert_eq!(state.rflags & (1 << 9), 0, "interrupts off");

    // The kernel's bytes at load_addr, its bss zeroed.
    let load = LOAD as usize;
    assert_eq!(ram[load..load + kernel.len()], kernel[..]);
    assert!(ram[load + kernel.len()..][..BSS as usize]
        .iter()
        .all(|&b| b == 0));

    let at = multiboot::INFO_AT;
    let flags = u32_at(&ram, at);
    for bit in [
        info::HAS_MEMORY,
        info::HAS_CMDLINE,
        info::HAS_MODS,
        info::HAS_MMAP,
    ] {
        assert_ne!(flags & bit, 0, "info flag {bit:#x}");
    }
    assert_eq!(u32_at(&ram, at + info::MEM_LOWER as u64), 639);
    assert_eq!(
        u32_at(&ram, at + info::MEM_UPPER as u64),
        (RAM as u32 - 0x10_0000) / 1024
    );
    assert_eq!(
        c_string(&ram, u32_at(&ram, at + 16).into()),
        b"kernel verbose"
    );
    assert_eq!(c_string(&ram, u32_at(&ram, at + 64).into()), b"moat");

    // Modules: in order, page-aligned, above the kernel and its bss, not
    // overlapping, each with its bytes and command line.
    assert_eq!(u32_at(&ram, at + info::MODS_COUNT as u64), 2);
    let list = u64::from(u32_at(&ram, at + info::MODS_ADDR as u64));
    let mut floor = u64::from(LOAD) + kernel.len() as u64 + u64::from(BSS);
    for (i, m) in modules.iter().enumerate() {
        let entry = list + (i * info::MODULE_SIZE) as u64;
        let (start, end) = (
            u64::from(u32_at(&ram, entry)),
            u64::from(u32_at(&ram, entry + 4)),
        );
        assert_eq!(start % 4096, 0);
        assert!(start >= floor, "module {i} at {start:#x} below {floor:#x}");
        assert_eq!(end - start, m.bytes.len() as u64);
        assert_eq!(ram[start as usize..end as usize], m.bytes[..]);
        assert_eq!(c_string(&ram, u32_at(&ram, entry + 8).into()), m.cmdline);
        floor = end;
    }

    // The memory map is the layout's e820, in Multiboot's form.
    let map = memory_map(&layout());
    let mmap_len = u32_at(&ram, at + info::MMAP_LENGTH as u64) as usize;
    let mmap_at = u64::from(u32_at(&ram, at + info::MMAP_ADDR as u64));
    assert_eq!(mmap_len, map.len() * info::MMAP_ENTRY_SIZE);
    for (i, e) in map.iter().enumerate() {
        let entry = mmap_at + (i * info::MMAP_ENTRY_SIZE) as u64;
        assert_eq!(u32_at(&ram, entry), 20);
        assert_eq!(u64_at(&ram, entry + 4), e.addr);
        assert_eq!(u64_at(&ram, entry + 12), e.size);
        assert_eq!(u32_at(&ram, entry + 20), e.kind as u32);
    }
    assert!(map
        .iter()
        .any(|e| e.kind == E820Type::Ram && e.addr == 0x10_0000));
    // Nothing the guest is given overlaps its stack or GDT.
    assert!(mmap_at + mmap_len as u64 <= low::STACK_TOP - 0x1000);
}

#[test]
fn kludge_load_end_zero_loads_the_rest_of_the_file_and_bss_end_zero_means_none() {
    let mut kernel = kludge_kernel(0x1800);
    set_field(&mut kernel, 2, 0);
    set_field(&mut kernel, 3, 0);
    let loaded = load(&kernel, &[]).unwrap();
    assert_eq!(loaded.kernel_end, u64::from(LOAD) + 0x1800);
    // A header further into the file: the load starts before it.
    let mut later = vec![0u8; 0x1000];
    later.extend(kludge_kernel(0x1000));
    set_field(
        &mut later[0x1000..],
        0,
        LOAD + 0x1000 + HEADER_OFFSET as u32,
    );
    set_field(&mut later[0x1000..], 2, LOAD + 0x2000);
    set_field(&mut later[0x1000..], 3, 0);
    let mut ram = vec![0u8; RAM];
    multiboot::load(&mut ram, &later, b"", &[], &memory_map(&layout())).unwrap();
    assert_eq!(ram[LOAD as usize..][..0x2000], later[..]);
}

#[test]
fn elf32_kernel_is_loaded_by_physical_address_with_its_entry_moved() {
    let kernel = elf_kernel(false, 0xc010_0000, 0x20_0000, 0xc010_0040, 0x900);
    assert_eq!(KernelFormat::detect(&kernel), KernelFormat::Multiboot);
    let (ram, state) = boot(&kernel, b"", &[]);
    let state = state.unwrap();
    assert_eq!(state.rip, 0x20_0040);
    assert_eq!(ram[0x20_0000..0x20_0900], kernel[0x100..0xa00]);
    assert_eq!(u32_at(&ram, multiboot::INFO_AT) & info::HAS_MODS, 0);
    assert_eq!(
        c_string(&ram, u32_at(&ram, multiboot::INFO_AT + 16).into()),
        b""
    );
}

#[test]
fn elf64_kernel_is_loaded_as_grub_does() {
    let kernel = elf_kernel(true, 0x30_0000, 0x30_0000, 0x30_0010, 0x400);
    let (ram, state) = boot(&kernel, b"x", &[]);
    assert_eq!(state.unwrap().rip, 0x30_0010);
    assert_eq!(ram[0x30_0000..0x30_0400], kernel[0x100..0x500]);
}

#[test]
fn format_detection_follows_qemu() {
    assert_eq!(
        KernelFormat::detect(&bzimage(0x4000)),
        KernelFormat::BzImage
    );
    assert_eq!(
        KernelFormat::detect(&kludge_kernel(0x1000)),
        KernelFormat::Multiboot
    );
    assert_eq!(KernelFormat::detect(&[0u8; 0x3000]), KernelFormat::Unknown);
    // A magic past 8 KiB or misaligned is no header.
    let mut late = vec![0u8; 0x3000];
    put_u32(&mut late, 0x2000, HEADER_MAGIC);
    put_u32(&mut late, 0x1002, HEADER_MAGIC);
    assert_eq!(KernelFormat::detect(&late), KernelFormat::Unknown);
    let mut ram = vec![0u8; RAM];
    let payload = Payload {
        kernel: &late,
        cmdline: b"",
        initrd: None,
    };
    let error = boot_detected(&mut ram, &layout(), &payload, &[]).unwrap_err();
    assert_eq!(error, firmware::Error::UnknownFormat);
    assert!(error.to_string().contains("neither a bzImage"), "{error}");
}

#[test]
fn bad_headers_are_refused_by_name() {
    let good = kludge_kernel(0x2000);
    let refuse = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut img = good.clone();
        edit(&mut img);
        load(&img, &[]).unwrap_err()
    };
    let fix_checksum = |img: &mut Vec<u8>| {
        let f = u32_at(img, HEADER_OFFSET as u64 + 4);
        put_u32(
            img,
            HEADER_OFFSET + 8,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(f),
        );
    };
    assert!(matches!(
        refuse(&|i| put_u32(i, HEADER_OFFSET + 8, 0x1234)),
        Error::BadChecksum {
            checksum: 0x1234,
            ..
        }
    ));
    assert_eq!(
        refuse(&|i| {
            put_u32(i, HEADER_OFFSET + 4, flags::AOUT_KLUDGE | 1 << 5);
            fix_checksum(i);
        }),
        Error::UnsupportedFlags(1 << 5)
    );
    // Load addresses outside RAM: below 1 MiB, past its end, wrapping.
    let below = refuse(&|i| {
        set_field(i, 0, 0x8_0000 + HEADER_OFFSET as u32);
        set_field(i, 1, 0x8_0000);
        set_field(i, 2, 0x8_2000);
        set_field(i, 3, 0);
        set_field(i, 4, 0x8_0080);
    });
    assert_eq!(
        below,
        Error::OutsideRam {
            start: 0x8_0000,
            end: 0x8_2000
        }
    );
    assert!(below.to_string().contains("outside guest RAM"), "{below}");
    let above = refuse(&|i| set_field(i, 3, RAM as u32 + 0x1000));
    assert!(matches!(above, Error::OutsideRam { end, .. } if end == RAM as u64 + 0x1000));
    // The entry outside the image, and outside with bss only just past it.
    assert_eq!(
        refuse(&|i| set_field(i, 4, 0x50_0000)),
        Error::EntryOutsideImage(0x50_0000)
    );
    let end = LOAD + 0x2000 + BSS;
    assert_eq!(
        refuse(&|i| set_field(i, 4, end)),
        Error::EntryOutsideImage(end.into())
    );
    // Contradictory fields.
    assert_eq!(refuse(&|i| set_field(i, 0, LOAD - 4)), Error::BadAddresses);
    assert_eq!(
        refuse(&|i| set_field(i, 0, LOAD + 0x1000)),
        Error::BadAddresses
    );
    assert_eq!(refuse(&|i| set_field(i, 2, LOAD - 1)), Error::BadAddresses);
    assert_eq!(
        refuse(&|i| set_field(i, 3, LOAD + 0x10)),
        Error::BadAddresses
    );
    // A file shorter than the header says.
    assert_eq!(
        refuse(&|i| i.truncate(0x1000)),
        Error::ImageTruncated {
            needed: 0x2000,
            size: 0x1000
        }
    );
    assert_eq!(
        refuse(&|i| i.truncate(HEADER_OFFSET + 20)),
        Error::HeaderTruncated
    );
    assert_eq!(refuse(&|i| i.truncate(HEADER_OFFSET)), Error::NoHeader);
    // No kludge: then it must be an ELF file.
    assert_eq!(
        refuse(&|i| {
            put_u32(i, HEADER_OFFSET + 4, 0);
            fix_checksum(i);
        }),
        Error::NotElf
    );
}

#[test]
fn bad_elf_kernels_are_refused() {
    let good = elf_kernel(false, 0x10_0000, 0x10_0000, 0x10_0000, 0x400);
    let refuse = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut img = good.clone();
        edit(&mut img);
        load(&img, &[]).unwrap_err()
    };
    assert!(matches!(
        refuse(&|i| put_u16(i, 0x12, 62)),
        Error::BadElf(_)
    ));
    assert!(matches!(refuse(&|i| put_u16(i, 0x10, 3)), Error::BadElf(_)));
    assert!(matches!(refuse(&|i| i[5] = 2), Error::BadElf(_)));
    assert!(matches!(
        refuse(&|i| put_u32(i, 52 + 16, 0x10_0000)),
        Error::BadElf(_)
    ));
    assert!(matches!(
        refuse(&|i| put_u32(i, 52 + 20, 1)),
        Error::BadElf(_)
    ));
    assert!(matches!(
        refuse(&|i| put_u32(i, 52, 0)),
        Error::BadElf("no loadable segment")
    ));
    assert_eq!(
        refuse(&|i| put_u32(i, 0x18, 0x9000_0000)),
        Error::EntryOutsideImage(0x9000_0000)
    );
    assert!(matches!(
        refuse(&|i| put_u32(i, 52 + 12, 0x1000)),
        Error::OutsideRam { start: 0x1000, .. }
    ));
}

#[test]
fn modules_and_command_lines_that_do_not_fit_are_refused() {
    let kernel = kludge_kernel(0x1000);
    let big = vec![1u8; RAM];
    let refused = load(
        &kernel,
        &[
            Module {
                bytes: b"ok",
                cmdline: b"",
            },
            Module {
                bytes: &big,
                cmdline: b"",
            },
        ],
    );
    assert_eq!(refused.unwrap_err(), Error::ModuleDoesNotFit(1));
    let nul = load(
        &kernel,
        &[Module {
            bytes: b"",
            cmdline: b"a\0b",
        }],
    );
    assert_eq!(nul.unwrap_err(), Error::CmdlineHasNul);
    let long = vec![b'x'; 0x1_0000];
    let too_long = load(
        &kernel,
        &[Module {
            bytes: b"",
            cmdline: &long,
        }],
    );
    assert_eq!(too_long.unwrap_err(), Error::CmdlineTooLong);
    let many = vec![
        Module {
            bytes: b"m",
            cmdline: b""
        };
        1000
    ];
    assert_eq!(load(&kernel, &many).unwrap_err(), Error::TooManyModules);
    // Empty modules are fine, each still page-aligned and distinct.
    let empty = [
        Module {
            bytes: b"",
            cmdline: b"e1",
        },
        Module {
            bytes: b"",
            cmdline: b"e2",
        },
    ];
    let loaded = load(&kernel, &empty).unwrap();
    assert_eq!(loaded.modules.len(), 2);
    assert!(loaded.modules.iter().all(|&(s, e)| s == e && s % 4096 == 0));
}

#[test]
fn a_kernel_bigger_than_ram_is_refused() {
    let kernel = kludge_kernel(RAM);
    assert!(matches!(
        load(&kernel, &[]).unwrap_err(),
        Error::OutsideRam { .. }
    ));
}

#[test]
fn mutated_multiboot_kernels_never_panic() {
    let mut rng = Rng::new(0x03b0_07ed);
    let seeds = [
        kludge_kernel(0x1800),
        elf_kernel(false, 0xc010_0000, 0x10_0000, 0xc010_0000, 0x800),
        elf_kernel(true, 0x10_0000, 0x10_0000, 0x10_0000, 0x800),
    ];
    let map = memory_map(&GuestLayout::standard(4 * MIB as u64, 1));
    let mut ram = vec![0u8; 4 * MIB];
    for round in 0..3000 {
        let mut img = seeds[round % seeds.len()].clone();
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(0x180);
            if at < img.len() {
                img[at] = rng.next() as u8;
            }
        }
        if rng.below(8) == 0 {
            img.truncate(rng.below(img.len()));
        }
        let modules = [Module {
            bytes: &img[..rng.below(img.len())],
            cmdline: b"m",
        }];
        if let Ok(loaded) = multiboot::load(&mut ram, &img, b"c", &modules, &map) {
            assert!(loaded.kernel_end <= ram.len() as u64);
            assert_eq!(loaded.state.rax, u64::from(BOOTLOADER_MAGIC));
        }
    }
}
