//! `mbtest`: a Multiboot v1 test kernel. It is an x86_64 ELF whose
//! Multiboot header sets the a.out kludge (QEMU's `-kernel` loads a 64-bit
//! ELF only so), entered in 32-bit protected mode; `_start` records the
//! entry state, builds identity page tables for the first GiB, enters long
//! mode and calls [`mbtest_main`], which checks what the loader gave:
//!
//! - EAX = 0x2BADB002, paging off and protection on, interrupts off;
//! - bss zeroed (its page tables and a canary live there);
//! - the information structure: memory, command line, modules and memory
//!   map present; the command line contains `mbtest`; two modules, page
//!   aligned, above the kernel, not overlapping, with the contents and
//!   command lines the system test gives them ([`MODULES`]);
//! - the memory map: sorted, non-overlapping, RAM from 0 and from 1 MiB,
//!   `mem_lower`/`mem_upper` agreeing with it, the kernel and the modules
//!   inside RAM.
//!
//! Each check prints `MBTEST ok NAME` or `MBTEST FAIL NAME: why` on COM1,
//! then `MBTEST done checks=N failed=M`, and the kernel ends through QEMU's
//! isa-debug-exit port with the value given as `exit=V` on its command
//! line if every check passed, else with [`FAILED`].
#![no_std]
#![no_main]

use core::fmt::{self, Write};

/// The modules the system test passes: their exact contents and command
/// lines.
const MODULES: [(&[u8], &[u8]); 2] = [
    (b"MOAT Multiboot module one\n", b"mod-one first"),
    (
        b"module two: 0123456789abcdefghijklmnopqrstuvwxyz\n",
        b"mod-two second=2",
    ),
];
/// The debug-exit value when a check failed (QEMU status 3).
const FAILED: u32 = 1;
/// Without `exit=` on the command line.
const DEFAULT_EXIT: u32 = 0x10;

const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
const DEBUG_EXIT_PORT: u16 = 0xf4;
const COM1: u16 = 0x3f8;
const COM1_LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
const CR0_PE: u32 = 1 << 0;
const CR0_PG: u32 = 1 << 31;
const RFLAGS_IF: u32 = 1 << 9;
const MIB: u64 = 1 << 20;
/// What `_start` maps (identity, 2 MiB pages): every address read here.
const MAPPED: u64 = 1 << 30;

mod info {
    pub const FLAGS: u64 = 0;
    pub const MEM_LOWER: u64 = 4;
    pub const MEM_UPPER: u64 = 8;
    pub const CMDLINE: u64 = 16;
    pub const MODS_COUNT: u64 = 20;
    pub const MODS_ADDR: u64 = 24;
    pub const MMAP_LENGTH: u64 = 44;
    pub const MMAP_ADDR: u64 = 48;
    pub const SIZE: u64 = 52;
    pub const HAS_MEMORY: u32 = 1 << 0;
    pub const HAS_CMDLINE: u32 = 1 << 2;
    pub const HAS_MODS: u32 = 1 << 3;
    pub const HAS_MMAP: u32 = 1 << 6;
    pub const MMAP_RAM: u32 = 1;
}

core::arch::global_asm!(
    ".pushsection .multiboot, \"a\"",
    ".balign 4",
    "multiboot_header:",
    ".long {magic}",
    ".long {flags}",
    ".long -({magic} + {flags})",
    ".long multiboot_header",
    ".long __load_start",
    ".long __load_end",
    ".long __bss_end",
    ".long _start",
    ".popsection",
    "",
    ".pushsection .bss.boot, \"aw\", @nobits",
    ".balign 4096",
    "mbtest_pml4: .skip 4096",
    "mbtest_pdpt: .skip 4096",
    "mbtest_pd: .skip 4096",
    "mbtest_stack: .skip 16384",
    "mbtest_stack_top:",
    ".popsection",
    "",
    ".pushsection .data.boot, \"aw\"",
    ".balign 8",
    "mbtest_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff", // 0x08: 64-bit code
    ".quad 0x00cf92000000ffff", // 0x10: data
    "mbtest_gdt_end:",
    "mbtest_gdtr:",
    ".word mbtest_gdt_end - mbtest_gdt - 1",
    ".quad mbtest_gdt",
    ".popsection",
    "",
    ".pushsection .text.boot, \"ax\"",
    ".code32",
    ".globl _start",
    "_start:",
    // What the loader left: EDI magic, ESI info, EBP CR0, EBX EFLAGS.
    "    mov %eax, %edi",
    "    mov %ebx, %esi",
    "    mov %cr0, %ebp",
    "    pushf",
    "    pop %ebx",
    "    cli",
    "    mov $mbtest_stack_top, %esp",
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 x 2 MiB, the first GiB.
    "    mov $mbtest_pdpt + 3, %eax",
    "    mov %eax, mbtest_pml4",
    "    mov $mbtest_pd + 3, %eax",
    "    mov %eax, mbtest_pdpt",
    "    xor %ecx, %ecx",
    "1:  mov %ecx, %eax",
    "    shl $21, %eax",
    "    or $0x83, %eax",
    "    mov %eax, mbtest_pd(,%ecx,8)",
    "    inc %ecx",
    "    cmp $512, %ecx",
    "    jne 1b",
    "    mov $mbtest_pml4, %eax",
    "    mov %eax, %cr3",
    "    mov %cr4, %eax",
    "    or $0x20, %eax", // PAE
    "    mov %eax, %cr4",
    "    mov $0xc0000080, %ecx", // EFER
    "    rdmsr",
    "    or $0x100, %eax", // LME
    "    wrmsr",
    "    mov %cr0, %eax",
    "    or $0x80000001, %eax", // PG, PE
    "    mov %eax, %cr0",
    "    lgdt mbtest_gdtr",
    "    ljmp $0x08, $2f",
    ".code64",
    "2:  mov $0x10, %ax",
    "    mov %ax, %ds",
    "    mov %ax, %es",
    "    mov %ax, %ss",
    "    mov $mbtest_stack_top, %rsp",
    "    mov %edi, %edi",
    "    mov %esi, %esi",
    "    mov %ebp, %edx",
    "    mov %ebx, %ecx",
    "    call {main}",
    "3:  hlt",
    "    jmp 3b",
    ".popsection",
    magic = const 0x1bad_b002u32,
    // Page-aligned modules, memory information, the a.out kludge.
    flags = const (1u32 << 0) | (1 << 1) | (1 << 16),
    main = sym mbtest_main,
    options(att_syntax),
);

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to COM1 and the debug-exit port, the devices this
    // kernel drives; it touches no memory.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack))
    };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`; reading COM1's line status has no effect.
    unsafe {
        core::arch::asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack))
    };
    value
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            while inb(COM1_LSR) & LSR_THR_EMPTY == 0 {}
            outb(COM1, byte);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {
        let _ = writeln!(Com1, $($arg)*);
    };
}

/// Physical memory below `limit`, identity mapped by `_start`.
struct Phys {
    limit: u64,
}

impl Phys {
    fn bytes(&self, addr: u64, len: u64) -> Result<&'static [u8], Reason> {
        match addr.checked_add(len) {
            Some(end) if end <= self.limit => {
                // SAFETY: `[addr, end)` lies below `limit`, which is at most
                // the RAM the memory map reports and below `MAPPED`, all
                // identity mapped and readable; nothing writes it while the
                // checks run.
                Ok(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
            }
            _ => Err(Reason::from_args(format_args!(
                "{addr:#x}+{len:#x} beyond readable memory {:#x}",
                self.limit
            ))),
        }
    }

    fn u32_at(&self, addr: u64) -> Result<u32, Reason> {
        let b = self.bytes(addr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_at(&self, addr: u64) -> Result<u64, Reason> {
        Ok(u64::from(self.u32_at(addr)?) | (u64::from(self.u32_at(addr + 4)?) << 32))
    }

    /// The NUL-terminated string at `addr` (at most 4 KiB).
    fn c_str(&self, addr: u64) -> Result<&'static [u8], Reason> {
        let room = self.limit.saturating_sub(addr).min(4096);
        let bytes = self.bytes(addr, room)?;
        let len = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Reason::from_str("string without NUL"))?;
        Ok(&bytes[..len])
    }
}

/// A small fixed-capacity string for failure reasons (no allocator here).
struct Reason {
    buf: [u8; 112],
    len: usize,
}

impl Reason {
    fn from_args(args: fmt::Arguments) -> Self {
        let mut s = Reason {
            buf: [0; 112],
            len: 0,
        };
        let _ = s.write_fmt(args);
        s
    }

    fn from_str(text: &str) -> Self {
        Self::from_args(format_args!("{text}"))
    }
}

impl Write for Reason {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?"))
    }
}

macro_rules! fail {
    ($($arg:tt)*) => {
        return Err(Reason::from_args(format_args!($($arg)*)))
    };
}

/// Checks done and failed.
struct Tally {
    checks: u32,
    failed: u32,
}

impl Tally {
    fn check(&mut self, name: &str, result: Result<(), Reason>) -> bool {
        self.checks += 1;
        match result {
            Ok(()) => {
                say!("MBTEST ok {name}");
                true
            }
            Err(why) => {
                self.failed += 1;
                say!("MBTEST FAIL {name}: {why}");
                false
            }
        }
    }
}

/// A bss canary: the loader must have zeroed it.
static mut CANARY: [u64; 64] = [0; 64];

extern "C" {
    static __bss_end: u8;
}

fn kernel_end() -> u64 {
    (&raw const __bss_end) as u64
}

/// A memory map entry.
#[derive(Clone, Copy)]
struct Range {
    base: u64,
    len: u64,
    kind: u32,
}

#[no_mangle]
extern "C" fn mbtest_main(magic: u32, info: u32, cr0: u32, eflags: u32) -> ! {
    say!("MBTEST start magic={magic:#x} info={info:#x} cr0={cr0:#x} eflags={eflags:#x}");
    let mut t = Tally {
        checks: 0,
        failed: 0,
    };
    t.check(
        "magic",
        match magic {
            BOOTLOADER_MAGIC => Ok(()),
            m => Err(Reason::from_args(format_args!("EAX {m:#x}"))),
        },
    );
    t.check("entry-state", entry_state(cr0, eflags));
    t.check("bss-zeroed", {
        let canary = (&raw const CANARY).cast::<u64>();
        // Volatile, so that the compiler cannot assume the zeroes.
        // SAFETY: CANARY is 64 words, only ever read, here.
        match (0..64).all(|i| unsafe { canary.add(i).read_volatile() } == 0) {
            true => Ok(()),
            false => Err(Reason::from_str("the canary in bss is not zero")),
        }
    });
    let exit = match boot_info(&mut t, u64::from(info)) {
        Ok(exit) => exit,
        Err(why) => {
            t.check("info", Err(why));
            FAILED
        }
    };
    let value = if t.failed == 0 { exit } else { FAILED };
    say!(
        "MBTEST done checks={} failed={} exit={value:#x}",
        t.checks,
        t.failed
    );
    outl(DEBUG_EXIT_PORT, value);
    say!("MBTEST FAIL debug-exit: still running after the write to port 0xf4");
    loop {
        // SAFETY: halting with interrupts off ends this kernel's work.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

fn entry_state(cr0: u32, eflags: u32) -> Result<(), Reason> {
    if cr0 & CR0_PG != 0 || cr0 & CR0_PE == 0 {
        fail!("CR0 {cr0:#x}: protection must be on, paging off");
    }
    if eflags & RFLAGS_IF != 0 {
        fail!("EFLAGS {eflags:#x}: interrupts must be off");
    }
    Ok(())
}

/// Checks the information structure; gives the exit value the command
/// line asks for.
fn boot_info(t: &mut Tally, at: u64) -> Result<u32, Reason> {
    let low = Phys { limit: MIB };
    let flags = low.u32_at(at + info::FLAGS)?;
    let wanted = info::HAS_MEMORY | info::HAS_CMDLINE | info::HAS_MODS | info::HAS_MMAP;
    t.check(
        "info-flags",
        match flags & wanted {
            w if w == wanted => Ok(()),
            _ => Err(Reason::from_args(format_args!(
                "flags {flags:#x} lack some of {wanted:#x}"
            ))),
        },
    );
    low.bytes(at, info::SIZE)?;
    let mem_lower = u64::from(low.u32_at(at + info::MEM_LOWER)?);
    let mem_upper = u64::from(low.u32_at(at + info::MEM_UPPER)?);
    let ram = Phys {
        limit: (MIB + mem_upper * 1024).min(MAPPED),
    };
    say!("MBTEST memory lower={mem_lower} KiB upper={mem_upper} KiB");

    let map = memory_map(&ram, at)?;
    t.check("memory-map", check_map(&map, mem_lower, mem_upper));

    let cmdline = ram.c_str(u64::from(low.u32_at(at + info::CMDLINE)?))?;
    let text = core::str::from_utf8(cmdline).unwrap_or("");
    say!("MBTEST cmdline \"{text}\"");
    t.check(
        "cmdline",
        match text.split_whitespace().any(|w| w == "mbtest") {
            true => Ok(()),
            false => Err(Reason::from_str("no word `mbtest`")),
        },
    );
    let exit = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("exit="))
        .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or(DEFAULT_EXIT);

    let count = low.u32_at(at + info::MODS_COUNT)?;
    let list = u64::from(low.u32_at(at + info::MODS_ADDR)?);
    t.check(
        "module-count",
        match count as usize {
            n if n == MODULES.len() => Ok(()),
            n => Err(Reason::from_args(format_args!(
                "{n} modules, {} expected",
                MODULES.len()
            ))),
        },
    );
    let mut floor = kernel_end();
    for (i, (content, line)) in MODULES.iter().enumerate().take(count as usize) {
        let entry = list + 16 * i as u64;
        let (start, end) = (
            u64::from(ram.u32_at(entry)?),
            u64::from(ram.u32_at(entry + 4)?),
        );
        let name = ["module-1", "module-2"][i];
        let placed = check_module(&ram, &map, (start, end), floor, content);
        let got = ram.c_str(u64::from(ram.u32_at(entry + 8)?))?;
        // QEMU puts the module's file name first.
        let named =
            match got == *line || got.ends_with(line) && got[got.len() - line.len() - 1] == b' ' {
                true => Ok(()),
                false => Err(Reason::from_args(format_args!(
                    "command line \"{}\"",
                    core::str::from_utf8(got).unwrap_or("?")
                ))),
            };
        t.check(name, placed.and(named));
        floor = end;
    }
    Ok(exit)
}

fn memory_map(ram: &Phys, at: u64) -> Result<[Option<Range>; 32], Reason> {
    let low = Phys { limit: MIB };
    let len = u64::from(low.u32_at(at + info::MMAP_LENGTH)?);
    let mut entry = u64::from(low.u32_at(at + info::MMAP_ADDR)?);
    let end = entry + len;
    let mut map = [None; 32];
    let mut n = 0;
    while entry < end {
        let size = u64::from(ram.u32_at(entry)?);
        if size < 20 || n == map.len() {
            fail!(
                "memory map entry {n}: size {size}, or more than {} entries",
                map.len()
            );
        }
        let r = Range {
            base: ram.u64_at(entry + 4)?,
            len: ram.u64_at(entry + 12)?,
            kind: ram.u32_at(entry + 20)?,
        };
        say!(
            "MBTEST mmap {:#x}..{:#x} type {}",
            r.base,
            r.base.saturating_add(r.len),
            r.kind
        );
        map[n] = Some(r);
        n += 1;
        entry += size + 4;
    }
    Ok(map)
}

/// Sorted and non-overlapping; RAM from 0 gives `mem_lower`, RAM from 1
/// MiB gives `mem_upper`, and the kernel lies in it.
fn check_map(map: &[Option<Range>], mem_lower: u64, mem_upper: u64) -> Result<(), Reason> {
    let ranges = || map.iter().flatten();
    if ranges().count() == 0 {
        fail!("empty");
    }
    let mut previous_end = 0;
    for r in ranges() {
        if r.base < previous_end || r.len == 0 {
            fail!("{:#x}+{:#x} unsorted, overlapping or empty", r.base, r.len);
        }
        previous_end = r.base.saturating_add(r.len);
    }
    let ram_at = |addr: u64| {
        ranges().find(|r| r.kind == info::MMAP_RAM && r.base <= addr && addr - r.base < r.len)
    };
    match ram_at(0) {
        Some(r) if r.len.min(640 * 1024) / 1024 == mem_lower => {}
        _ => fail!("no RAM from 0 that gives mem_lower {mem_lower} KiB"),
    }
    match ram_at(MIB) {
        Some(r) if (r.base + r.len - MIB) / 1024 == mem_upper => {
            if r.base + r.len < kernel_end() {
                fail!("the kernel ends at {:#x}, beyond RAM", kernel_end());
            }
        }
        _ => fail!("no RAM from 1 MiB that gives mem_upper {mem_upper} KiB"),
    }
    Ok(())
}

fn check_module(
    ram: &Phys,
    map: &[Option<Range>],
    (start, end): (u64, u64),
    floor: u64,
    content: &[u8],
) -> Result<(), Reason> {
    if start % 4096 != 0 {
        fail!("at {start:#x}, not page-aligned");
    }
    if start < floor || end < start {
        fail!("{start:#x}..{end:#x} overlaps the kernel or the module before ({floor:#x})");
    }
    let in_ram = map
        .iter()
        .flatten()
        .any(|r| r.kind == info::MMAP_RAM && r.base <= start && end <= r.base + r.len);
    if !in_ram {
        fail!("{start:#x}..{end:#x} not in RAM");
    }
    let bytes = ram.bytes(start, end - start)?;
    if bytes != content {
        fail!(
            "{} bytes at {start:#x}, not the {} expected",
            bytes.len(),
            content.len()
        );
    }
    Ok(())
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("MBTEST FAIL panic: {info}");
    outl(DEBUG_EXIT_PORT, FAILED);
    loop {
        // SAFETY: as in `mbtest_main`.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
