//! Multiboot v1 entry: the loader enters `_start` in 32-bit protected mode
//! with paging off, `eax` = the Multiboot magic and `ebx` = the physical
//! address of the Multiboot information. The code below builds boot page
//! tables (the first 4 GiB identity mapped, at the direct map and, for the
//! kernel image, at `KERNEL_VMA`), enters long mode and calls `kernel_main`.
//! Rust code replaces these tables with its own as soon as it can.

use super::layout::{BOOT_STACK_SIZE, DIRECT_MAP_BASE, KERNEL_VMA};

const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
/// Page-align modules, give memory info, and load by the header's addresses.
const MULTIBOOT_FLAGS: u32 = (1 << 0) | (1 << 1) | (1 << 16);

#[repr(C, align(4096))]
pub struct BootStack(pub [u8; BOOT_STACK_SIZE]);

/// The stack of the boot CPU; later the kernel stack for entries from user mode.
pub static mut BOOT_STACK: BootStack = BootStack([0; BOOT_STACK_SIZE]);

core::arch::global_asm!(
    // ---- Multiboot header (in the first 8 KiB of the file) ----
    ".pushsection .multiboot, \"a\"",
    ".balign 4",
    "multiboot_header:",
    ".long {mb_magic}",
    ".long {mb_flags}",
    ".long -({mb_magic} + {mb_flags})",
    ".long multiboot_header",
    ".long __load_start_phys",
    ".long __load_end_phys",
    ".long __bss_end_phys",
    ".long _start",
    ".popsection",

    // ---- boot page tables and GDT (identity-linked, zeroed by the loader) ----
    ".pushsection .boot.data, \"aw\"",
    ".balign 4096",
    "boot_pml4: .fill 512, 8, 0",
    "boot_pdpt_low: .fill 512, 8, 0",
    "boot_pdpt_high: .fill 512, 8, 0",
    "boot_pd: .fill 2048, 8, 0",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff", // 0x08: 64-bit code
    ".quad 0x00cf92000000ffff", // 0x10: data
    "boot_gdt_end:",
    "boot_gdt_ptr:",
    ".word boot_gdt_end - boot_gdt - 1",
    ".long boot_gdt",
    ".popsection",

    // ---- 32-bit entry ----
    ".pushsection .boot.text, \"ax\"",
    ".code32",
    ".global _start",
    "_start:",
    "    cli",
    "    cld",
    "    mov edi, eax",
    "    mov esi, ebx",
    // No long mode: report on COM1 and stop, rather than fault.
    "    mov eax, 0x80000000",
    "    cpuid",
    "    cmp eax, 0x80000001",
    "    jb 9f",
    "    mov eax, 0x80000001",
    "    cpuid",
    "    bt edx, 29",
    "    jnc 9f",
    "    mov ebp, edx", // keep the extended features: bit 20 is NX
    // 2048 x 2 MiB = 4 GiB, present + writable + large.
    "    lea ebx, [boot_pd]",
    "    xor ecx, ecx",
    "2:",
    "    mov eax, ecx",
    "    shl eax, 21",
    "    or eax, 0x83",
    "    mov [ebx + ecx * 8], eax",
    "    mov eax, ecx",
    "    shr eax, 11",
    "    mov [ebx + ecx * 8 + 4], eax",
    "    inc ecx",
    "    cmp ecx, 2048",
    "    jb 2b",
    // PDPT low: four 1 GiB slots -> the four page directories.
    "    lea eax, [boot_pd + 3]",
    "    mov [boot_pdpt_low + 0], eax",
    "    add eax, 4096",
    "    mov [boot_pdpt_low + 8], eax",
    "    add eax, 4096",
    "    mov [boot_pdpt_low + 16], eax",
    "    add eax, 4096",
    "    mov [boot_pdpt_low + 24], eax",
    // PDPT high: slot 510 (-2 GiB) -> the first GiB, for the kernel image.
    "    lea eax, [boot_pd + 3]",
    "    mov [boot_pdpt_high + 510 * 8], eax",
    // PML4: identity (0), direct map (256), kernel (511).
    "    lea eax, [boot_pdpt_low + 3]",
    "    mov [boot_pml4 + 0], eax",
    "    mov [boot_pml4 + {dm_slot} * 8], eax",
    "    lea eax, [boot_pdpt_high + 3]",
    "    mov [boot_pml4 + 511 * 8], eax",
    "    lea eax, [boot_pml4]",
    "    mov cr3, eax",
    "    mov eax, cr4",
    "    or eax, 1 << 5", // PAE
    "    mov cr4, eax",
    "    mov ecx, 0xC0000080", // EFER
    "    rdmsr",
    "    or eax, (1 << 8) | (1 << 0)", // LME, SCE
    "    bt ebp, 20",
    "    jnc 3f",
    "    or eax, 1 << 11", // NXE
    "3:",
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, (1 << 31) | (1 << 16) | (1 << 5) | 1", // PG, WP, NE, PE
    "    mov cr0, eax",
    "    lgdt [boot_gdt_ptr]",
    // ljmp 0x08:4f (encoded by hand: assemblers disagree on the syntax).
    "    .byte 0xea",
    "    .long 4f",
    "    .word 0x08",
    // Halt with a message on COM1 (no long mode).
    "9:",
    "    lea esi, [no_long_mode_msg]",
    "8:",
    "    mov al, [esi]",
    "    test al, al",
    "    jz 7f",
    "    mov dx, 0x3f8",
    "    out dx, al",
    "    inc esi",
    "    jmp 8b",
    "7:",
    "    hlt",
    "    jmp 7b",
    "no_long_mode_msg: .asciz \"moat: this CPU has no long mode\\r\\n\"",

    ".code64",
    "4:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    xor eax, eax",
    "    mov fs, ax",
    "    mov gs, ax",
    "    mov edi, edi",
    "    mov esi, esi",
    "    movabs rax, offset boot_higher_half",
    "    jmp rax",
    ".popsection",

    // ---- 64-bit, higher half ----
    ".pushsection .text.boot64, \"ax\"",
    "boot_higher_half:",
    "    lea rsp, [rip + {stack} + {stack_size}]",
    "    xor ebp, ebp",
    "    call {main}",
    "6:",
    "    hlt",
    "    jmp 6b",
    ".popsection",

    mb_magic = const MULTIBOOT_MAGIC,
    mb_flags = const MULTIBOOT_FLAGS,
    dm_slot = const (DIRECT_MAP_BASE >> 39) & 511,
    stack_size = const BOOT_STACK_SIZE,
    main = sym crate::kernel_main,
    stack = sym BOOT_STACK,
);

const _: () = assert!(
    KERNEL_VMA == 0xffff_ffff_8000_0000,
    "boot.rs maps the kernel at -2 GiB"
);
