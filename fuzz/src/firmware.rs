//! The guest firmware's loaders on untrusted kernel images: a bzImage
//! through the Linux boot protocol, an ELF vmlinux through PVH, a
//! Multiboot kernel with modules.
//!
//! Input layout: one byte of command-line length (times 16), two bytes of
//! initrd length (little endian, in bytes; for Multiboot the size of each
//! module, their number the low two bits of the command-line byte), then
//! the kernel image.

use firmware::e820::{self, E820Entry};
use firmware::layout::MIB;
use firmware::{linux, multiboot, pvh, BootInfo, GuestLayout};

/// Guest RAM below the hole: room for a kernel at 16 MiB and an initrd.
const RAM: usize = 24 * MIB as usize;
const RSDP: u64 = 0xe_0000;

struct Input<'a> {
    cmdline: Vec<u8>,
    initrd: Vec<u8>,
    image: &'a [u8],
}

fn split(data: &[u8]) -> Option<Input<'_>> {
    let (&[cmdline, lo, hi], image) = data.split_first_chunk::<3>()?;
    Some(Input {
        cmdline: vec![b'c'; usize::from(cmdline) * 16],
        initrd: vec![0x5a; usize::from(u16::from_le_bytes([lo, hi]))],
        image,
    })
}

fn memory_map() -> Vec<E820Entry> {
    e820::memory_map(&GuestLayout::standard(RAM as u64, 1))
}

/// `(addr, size)` lies inside RAM, after `after`.
fn initrd_fits(initrd: Option<(u64, u64)>, after: u64, ram: &[u8]) {
    if let Some((addr, size)) = initrd {
        assert!(
            addr >= after,
            "initrd at {addr:#x} below the kernel's end {after:#x}"
        );
        assert!(addr
            .checked_add(size)
            .is_some_and(|end| end <= ram.len() as u64));
    }
}

/// Runs `load` on the input's image with its command line and initrd in a
/// fresh RAM; `check` judges what it loaded.
fn load_with<L, E>(
    data: &[u8],
    load: impl FnOnce(&mut [u8], &[u8], &BootInfo<'_>) -> Result<L, E>,
    check: impl FnOnce(L, &[u8]),
) {
    let Some(input) = split(data) else { return };
    let map = memory_map();
    let mut ram = vec![0u8; RAM];
    let info = BootInfo {
        cmdline: &input.cmdline,
        initrd: (!input.initrd.is_empty()).then_some(&input.initrd[..]),
        e820: &map,
        rsdp: Some(RSDP),
    };
    if let Ok(loaded) = load(&mut ram, input.image, &info) {
        check(loaded, &ram);
    }
}

/// A bzImage through the 64-bit Linux boot protocol.
pub fn linux(data: &[u8]) {
    load_with(data, linux::load, |loaded, ram| {
        assert!(loaded.kernel_addr >= MIB && loaded.kernel_end <= RAM as u64);
        assert!(loaded.kernel_addr <= loaded.kernel_end);
        initrd_fits(loaded.initrd, loaded.kernel_end, ram);
    });
}

/// An ELF vmlinux through its PVH entry note.
pub fn pvh(data: &[u8]) {
    load_with(data, pvh::load, |loaded, ram| {
        assert!(loaded.kernel_end <= RAM as u64);
        initrd_fits(loaded.initrd, loaded.kernel_end, ram);
    });
}

/// A Multiboot kernel (a.out kludge or ELF) with up to three modules.
pub fn multiboot(data: &[u8]) {
    let Some(input) = split(data) else { return };
    let count = usize::from(data[0] & 3);
    let lines = [b"m0 a".as_slice(), b"m1", b""];
    let modules: Vec<_> = lines[..count]
        .iter()
        .map(|line| multiboot::Module {
            bytes: &input.initrd,
            cmdline: line,
        })
        .collect();
    let map = memory_map();
    let mut ram = vec![0u8; RAM];
    let Ok(loaded) = multiboot::load(&mut ram, input.image, &input.cmdline, &modules, &map) else {
        return;
    };
    assert!(loaded.kernel_end <= RAM as u64);
    assert_eq!(loaded.state.rax, u64::from(multiboot::BOOTLOADER_MAGIC));
    let mut floor = loaded.kernel_end;
    for &(start, end) in &loaded.modules {
        assert!(start >= floor && start % 4096 == 0 && end <= RAM as u64);
        assert_eq!(end - start, input.initrd.len() as u64);
        floor = end;
    }
}
