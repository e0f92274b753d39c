//! `probe`: root inside the Linux guest tries to reach what its VM was not
//! given — portals by hypercall, other memory through `/dev/mem` — and
//! counts the refusals.

use std::arch::asm;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;

use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::hypercall;
use moat_guest_tools::ipc;
use moat_guest_tools::probe::{self, MemoryTally, Options, PortalReport, Portals, Report, PAGE};

const USAGE: &str = "\
usage: probe [--portals FIRST-LAST [--given SEL,...]] [--memory]

Run as root inside the Linux guest under Moat: tries to leave the VM and
counts how every attempt is refused.
--portals  makes the guest IPC hypercall (VMCALL on Intel, VMMCALL on AMD)
           to every selector from FIRST to LAST except the --given ones, and
           a few malformed hypercalls (rax not the IPC hypercall's); each
           must fail (status not 0). Each --given portal is called once and
           must answer with status 0, which shows the probe can reach what
           the VM holds.
--memory   reads 8 bytes through /dev/mem at guest-physical pages that
           neither RAM nor a device claims in /proc/iomem: every 64 MiB from
           the end of RAM below 4 GiB up to 4 GiB, and 4, 16 and 64 GiB and
           the last page inside the physical address width where they lie
           above RAM. Each read must fail or find nothing (all ones or all
           zeros).
Prints one line per class, then `probe: ok` (exit 0) or `probe: FAIL ...`
(exit 1); 2 on a usage error.
";

/// Linux x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
const SYS_MMAP: u64 = 9;
const SYS_MUNMAP: u64 = 11;
/// `PROT_READ` and `MAP_SHARED` (asm-generic/mman-common.h, mman.h).
const PROT_READ: u64 = 1;
const MAP_SHARED: u64 = 1;
/// `O_SYNC` (asm-generic/fcntl.h): Linux maps `/dev/mem` uncached then,
/// as a driver maps a device's registers.
const O_SYNC: i32 = 0o4010000;
/// System calls return -errno in this range.
const MAX_ERRNO: u64 = 4095;

fn main() -> ExitCode {
    let opts = match run_or_exit("probe", USAGE, Options::parse) {
        Ok(opts) => opts,
        Err(code) => return code,
    };
    let mut report = Report::default();
    if let Some(portals) = &opts.portals {
        report.portals = Some(probe_portals(portals));
    }
    if opts.memory {
        match probe_memory() {
            Ok(tally) => report.memory = Some(tally),
            Err(problem) => report.problems.push(problem),
        }
    }
    for line in report.lines() {
        println!("{line}");
    }
    if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn probe_portals(portals: &Portals) -> PortalReport {
    let insn = hypercall::this_cpu_insn();
    let mut report = PortalReport::default();
    let call = |rax: u64, n: u64| hypercall::call(insn, rax, ipc::payload(n)).0;
    for (n, &sel) in (0..).zip(&portals.given) {
        report.given.push((sel, call(ipc::call_rax(sel), n)));
    }
    for sel in portals.ungiven() {
        let status = call(ipc::call_rax(sel), sel);
        report
            .range
            .record(status, || format!("portal {sel} ({})", insn.name()));
    }
    for (n, m) in (0..).zip(probe::malformed(portals)) {
        let status = call(m.rax, n);
        report.malformed.record(status, || {
            format!("malformed hypercall ({}, rax {:#x})", m.what, m.rax)
        });
    }
    report
}

fn probe_memory() -> Result<MemoryTally, String> {
    let read = |path: &str| fs::read_to_string(path).map_err(|e| format!("{path}: {e}"));
    let map = probe::parse_iomem(&read("/proc/iomem")?)?;
    let bits = probe::phys_bits(&read("/proc/cpuinfo")?)?;
    let addresses = probe::probe_addresses(&map, bits)?;
    let mem = File::options()
        .read(true)
        .custom_flags(O_SYNC)
        .open("/dev/mem")
        .map_err(|e| format!("/dev/mem: {e}"))?;
    let mut tally = MemoryTally::default();
    for addr in addresses {
        tally.record(addr, read_phys(&mem, addr));
    }
    Ok(tally)
}

/// The 8 bytes at physical `addr`, through a mapping of its page, or the
/// errno that refused the mapping. Not `read()`: Linux serves that only
/// below the end of RAM (x86 `valid_phys_addr_range`), so every address
/// worth probing would fail in Linux without reaching the hypervisor.
fn read_phys(mem: &File, addr: u64) -> Result<u64, i32> {
    let page = addr - addr % PAGE;
    let mapping = PhysPage::map(mem, page)?;
    Ok(mapping.read_u64(addr - page))
}

/// One page of `/dev/mem` mapped read-only into this process; unmapped
/// when dropped.
struct PhysPage {
    base: u64,
}

impl PhysPage {
    fn map(mem: &File, phys: u64) -> Result<PhysPage, i32> {
        let fd = mem.as_raw_fd() as u64;
        // SAFETY: without an address hint or MAP_FIXED, Linux maps fresh
        // pages of this process's address space and changes no others.
        let ret = unsafe { syscall6(SYS_MMAP, [0, PAGE, PROT_READ, MAP_SHARED, fd, phys]) };
        if ret > u64::MAX - MAX_ERRNO {
            return Err(ret.wrapping_neg() as i32);
        }
        Ok(PhysPage { base: ret })
    }

    /// One 8-byte load at `offset`: a single instruction, so the
    /// hypervisor sees one 8-byte access.
    fn read_u64(&self, offset: u64) -> u64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= PAGE,
            "offset {offset:#x}"
        );
        let at = (self.base + offset) as *const u64;
        // SAFETY: `at` is aligned and inside the page this mapping owns,
        // readable until `drop`; a volatile load, as the memory behind it
        // is not RAM this process wrote.
        unsafe { at.read_volatile() }
    }
}

impl Drop for PhysPage {
    fn drop(&mut self) {
        // SAFETY: the page at `base` is this mapping's own, and no
        // reference into it outlives `self`. Nothing to do if it fails: the
        // page stays mapped until exit.
        unsafe { syscall6(SYS_MUNMAP, [self.base, PAGE, 0, 0, 0, 0]) };
    }
}

/// A Linux system call on x86-64; its raw return value (-errno on
/// failure).
///
/// # Safety
/// The call must not change memory or mappings the program still uses.
unsafe fn syscall6(number: u64, args: [u64; 6]) -> u64 {
    let ret;
    // SAFETY: the `syscall` instruction clobbers only `rax` (the result),
    // `rcx` and `r11`; what the call itself does is the caller's promise.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number => ret,
            in("rdi") args[0],
            in("rsi") args[1],
            in("rdx") args[2],
            in("r10") args[3],
            in("r8") args[4],
            in("r9") args[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A page-sized file with a known word at byte 8, standing in for
    /// `/dev/mem` (which a host test must not read).
    fn page_file(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("probe-{name}-{}", std::process::id()));
        let mut bytes = vec![0u8; PAGE as usize];
        bytes[8..16].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
        File::create(&path).unwrap().write_all(&bytes).unwrap();
        path
    }

    #[test]
    fn reads_a_word_through_a_mapping() {
        let path = page_file("read");
        let file = File::open(&path).unwrap();
        assert_eq!(read_phys(&file, 8), Ok(0x0123_4567_89ab_cdef));
        assert_eq!(read_phys(&file, 0), Ok(0));
        // Each read unmaps its page again.
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        assert!(!maps.contains(path.to_str().unwrap()), "{maps}");
        fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_refused_mapping_gives_its_errno() {
        let path = page_file("refused");
        let write_only = File::options().write(true).open(&path).unwrap();
        // EACCES: a read-only mapping of a file opened for writing only.
        assert_eq!(read_phys(&write_only, 8), Err(13));
        fs::remove_file(path).unwrap();
    }
}
