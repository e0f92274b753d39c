//! The system configuration (docs/configuration.md): a TOML file that
//! describes the guests and native components of a Moat system. xtask
//! turns it into the root task's manifest (addresses, selectors, the VMM's
//! heap and kernel quota, the root's pool, the machine's RAM all computed
//! here) and the list of boot modules.
//!
//! Parsing is serde + toml with `deny_unknown_fields`; every error, the
//! parser's and the checks' after it, names the file, line, column and
//! field ([`ConfigError`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::build::USER_TASKS;
use crate::debian;
use crate::linux;

/// What `cargo xtask run` boots without `--config`.
pub const DEFAULT_CONFIG: &str = "examples/default.toml";
/// Paths starting with this name a file of the pinned Linux test guest
/// (`cargo xtask linux build`, built when first needed).
pub const PINNED_PREFIX: &str = "pinned:";
const PINNED_FILES: [&str; 3] = ["bzImage", "initramfs.cpio", DEBIAN_INITRD];
/// The Debian example's initrd and root disk (`cargo xtask debian build`).
const DEBIAN_INITRD: &str = "debian-initrd.cpio";
const DEBIAN_DISK: &str = "debian.img";
/// `pinned:mbtest`: the Multiboot test kernel (guests/mbtest), a task
/// that xtask builds; its size for the quota, roughly.
const MBTEST: &str = "mbtest";
const MBTEST_SIZE: u64 = 1 << 20;

/// The files of each of the recipe's other kernels: `pinned:NAME/bzImage`
/// and `pinned:NAME/initramfs.cpio` (`linux::build_other`).
const OTHER_KERNEL_FILES: [&str; 2] = ["bzImage", "initramfs.cpio"];

/// The other kernel (guests/linux/recipe.toml) whose file `name` (after
/// `pinned:`) is, and that file's path; `Err` says what is wrong with a
/// name of that shape, `Ok(None)` that it has another shape.
fn pinned_other_kernel(name: &str) -> Result<Option<(String, PathBuf)>, String> {
    let Some((kernel, file)) = name.split_once('/') else {
        return Ok(None);
    };
    let recipe = linux::load_recipe().map_err(|e| e.to_string())?;
    if recipe.other_kernel(kernel).is_none() {
        return Err(format!(
            "\"{PINNED_PREFIX}{kernel}/...\": {} has no other kernel \"{kernel}\" (it has: {})",
            linux::RECIPE,
            linux::other_kernel_names(&recipe)
        ));
    }
    if !OTHER_KERNEL_FILES.contains(&file) {
        return Err(format!(
            "an other kernel's pinned files are {}",
            OTHER_KERNEL_FILES
                .map(|f| format!("\"{PINNED_PREFIX}{kernel}/{f}\""))
                .join(" and ")
        ));
    }
    let path = crate::util::workspace_root()
        .join(linux::OTHER_KERNELS_DIR)
        .join(kernel)
        .join(file);
    Ok(Some((kernel.to_string(), path)))
}

/// Where a pinned file lies, and whether it is the Debian system's.
fn pinned_path(name: &str) -> (PathBuf, bool) {
    let root = crate::util::workspace_root();
    match name {
        DEBIAN_INITRD => (root.join(debian::DEBIAN_DIR).join(debian::INITRD), true),
        DEBIAN_DISK => (root.join(debian::DEBIAN_DIR).join(debian::DISK), true),
        _ => (root.join(linux::LINUX_DIR).join(name), false),
    }
}

/// Manifest selectors for `uses` start here (below the VMM's own, 64 on).
pub const FIRST_USE_SELECTOR: u64 = 20;
const LAST_USE_SELECTOR: u64 = 63;
/// `ram`/`file` mappings lie in 1 TiB slots from 1 TiB on (the manifest's
/// mapping range is 1..112 TiB); no mapping reaches 1 TiB.
const MAPPING_BASE: u64 = 1 << 40;
const MAPPING_SLOT: u64 = 1 << 40;

/// The VMM: its image and stack, its ECs' highest priority, its heap
/// before the disk copy.
const VMM_MODULE: &str = "vmm";
const VMM_MEMORY: u64 = 2 << 20;
const VMM_STACK: u64 = 64 << 10;
const VMM_CEILING: u8 = 30;
/// The VMM's input EC runs at 25: a guest's vCPU must be below.
const GUEST_MAX_PRIORITY: u8 = 24;
const VMM_HEAP_BASE: u64 = 16 << 20;
/// The VMM's kernel quota: a base plus one eighth of what it maps
/// (capability slots and page tables for every 4 KiB page, twice: in its
/// own space and in the guest's).
const VMM_QUOTA_BASE: u64 = 8 << 20;
/// Kernel memory of each vCPU past the first: its EC, SC, semaphore, its
/// VMCB or VMCS and state page in the VM, and their page tables.
const VMM_QUOTA_PER_VCPU: u64 = 256 << 10;
/// The VMM's limit (its selectors: 4 per vCPU from 80, capacity 256).
const MAX_GUEST_VCPUS: u32 = 32;
const VMM_QUOTA_DIVISOR: u64 = 8;

const GUEST_MIN_MEMORY: u64 = 16 << 20;
const GUEST_MEMORY_ALIGN: u64 = 2 << 20;
const DEFAULT_GUEST_MEMORY: u64 = 256 << 20;
const DEFAULT_GUEST_PRIORITY: u8 = 10;
/// Longest guest name: its `NAME.cmdline` module must fit the root's
/// 31-character module names.
const GUEST_NAME_MAX: usize = 23;
const COMPONENT_NAME_MAX: usize = 32;
const PORTAL_NAME_MAX: usize = 40;
const MODULE_NAME_MAX: usize = 31;
/// Linux's COMMAND_LINE_SIZE less its terminating zero.
const CMDLINE_MAX: usize = 2047;
/// The manifest's limit less the root's ` index=N tsc_hz=H`.
const ARGS_MAX: usize = 960;

const DEFAULT_COMPONENT_PRIORITY: u8 = 10;
const DEFAULT_COMPONENT_MEMORY: u64 = 256 << 10;
const DEFAULT_COMPONENT_QUOTA: u64 = 64 << 10;
/// The manifest's default stack of a component's first EC.
const DEFAULT_STACK: u64 = 16 << 10;
/// The machine's clock, added for guests without a fixed `epoch`: the
/// `rtc` driver in its `serve` mode (`common::cmos::service`).
const CLOCK_COMPONENT: &str = "clock";
const CLOCK_MODULE: &str = "rtc";
const CLOCK_SERVICE: &str = "clock";
const CLOCK_MEMORY: u64 = 128 << 10;
const MAX_RESTARTS: u32 = 1000;
/// The block service xtask adds for a guest's persistent disk: the `blk`
/// driver, its device, DMA pages and its client's shared region.
const BLK_COMPONENT: &str = "blk";
const BLK_MEMORY: u64 = 256 << 10;
const BLK_QUOTA: u64 = 128 << 10;
const BLK_PRIORITY: u8 = 20;
const BLK_DMA: u64 = (16 << 10) + (1 << 20);
const BLK_REGION: u64 = (1 << 20) + (4 << 10);
/// The VMM's semaphores for the block service (`vmm/src/disk.rs`): the
/// service's at 30, the answers' at 31; its services stay below.
const VMM_BLK_SEMAPHORES: u64 = 30;
/// The virtual switch xtask adds for a guest with `hostfwd`: the `net`
/// driver, its device, DMA pages and its client's shared region.
const NET_COMPONENT: &str = "net";
const NET_MEMORY: u64 = 256 << 10;
const NET_QUOTA: u64 = 128 << 10;
const NET_PRIORITY: u8 = 20;
const NET_DMA: u64 = 136 << 10;
const NET_REGION: u64 = 132 << 10;
/// Where the switch maps client N's region: N strides past the first.
const NET_REGION_STRIDE: u64 = MAPPING_SLOT / 16;
/// The drivers' (`blk`, `net`) restarts after a crash: their clients'
/// rings and semaphores outlive them, and a new instance resumes them.
const DRIVER_RESTART: &str = "5 backoff 10ms";
/// The VMM's semaphores for its switch port (`vmm/src/net.rs`): the
/// switch's at 32, the port's at 33.
const VMM_NET_SEMAPHORES: u64 = 32;
/// The switch's semaphore in the `net` component, and its client's.
const NET_SWITCH_SM: u64 = 30;
/// The first guest's MAC address on the switch (the VMM's default); the
/// next guest with a port gets the next address, and so on.
const GUEST_MAC_FIRST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The address the first guest with a port configures (QEMU's user
/// networking's default guest address); the next gets the next.
pub const GUEST_ADDRESS_FIRST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 15);
/// Guests with a port at most: one port of the switch's is the uplink.
const MAX_NET_GUESTS: usize = 7;

/// The emulated machine: the kernel, tasks, boot structures and the
/// kernel's reserve, besides the modules and the root's pool and quota.
const MACHINE_OVERHEAD: u64 = 64 << 20;
/// The machine's RAM when the file does not say (what the Linux system
/// tests have always had), unless the system needs more.
const DEFAULT_MACHINE_MEMORY: u64 = 1 << 30;
/// Most RAM an emulated machine gets: QEMU's `pc` puts RAM above 3 GiB
/// beyond the 4 GiB hole, which Moat has not been tried with.
const MAX_MACHINE_MEMORY: u64 = 3 << 30;
const MACHINE_MEMORY_STEP: u64 = 256 << 20;
/// The kernel starts at most this many CPUs.
const MAX_CPUS: u32 = 64;

// ---------------------------------------------------------------- the file

/// A configuration file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub machine: MachineEntry,
    #[serde(default, rename = "guest")]
    pub guests: Vec<GuestEntry>,
    #[serde(default, rename = "component")]
    pub components: Vec<ComponentEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineEntry {
    pub memory: Option<Spanned<Size>>,
    pub cpus: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnPanic {
    /// The VMM reports the panic and ends; the rest of the system goes on.
    #[default]
    Stop,
    /// The VMM boots the guest again.
    Restart,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GuestEntry {
    pub name: Spanned<String>,
    pub kernel: Spanned<String>,
    pub initrd: Option<Spanned<String>>,
    /// A Multiboot kernel's modules, in order.
    #[serde(default)]
    pub modules: Vec<Spanned<GuestModule>>,
    /// QEMU's isa-debug-exit device (ports 0xf4-0xf7) for the guest.
    #[serde(default)]
    pub debug_exit: bool,
    pub cmdline: Option<Spanned<String>>,
    pub memory: Option<Spanned<Size>>,
    pub vcpus: Option<Spanned<u32>>,
    #[serde(default)]
    pub vcpu_cpus: Option<Spanned<Vec<u32>>>,
    pub priority: Option<Spanned<u8>>,
    pub console: Option<Spanned<bool>>,
    #[serde(default)]
    pub on_panic: OnPanic,
    #[serde(default)]
    pub calls: Vec<Spanned<String>>,
    pub modem: Option<Spanned<String>>,
    #[serde(default)]
    pub user_hypercalls: bool,
    #[serde(default)]
    pub test_disk: bool,
    /// A host image file: the guest's persistent virtio disk, through the
    /// `blk` driver and block service (QEMU's virtio-blk device).
    pub disk: Option<Spanned<String>>,
    /// The size `disk` is created with when the file is missing.
    pub disk_size: Option<Spanned<Size>>,
    /// `HOST_PORT:GUEST_PORT` forwards from the host's 127.0.0.1 to the
    /// guest: its virtio-net is then a port of the virtual switch (the
    /// `net` driver on QEMU's virtio-net device, user networking).
    pub hostfwd: Option<Spanned<Vec<Spanned<String>>>>,
    pub epoch: Option<u64>,
}

/// One Multiboot module: a file and its command line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestModule {
    pub file: Spanned<String>,
    pub cmdline: Option<Spanned<String>>,
}

impl GuestEntry {
    fn owns_console(&self) -> bool {
        self.console.as_ref().is_some_and(|c| *c.get_ref())
    }

    fn console_span(&self) -> Range<usize> {
        self.console.as_ref().map_or(self.name.span(), |c| c.span())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ComponentEntry {
    pub name: Spanned<String>,
    pub module: Option<Spanned<String>>,
    pub priority: Option<Spanned<u8>>,
    pub cpu: Option<Spanned<u32>>,
    pub memory: Option<Spanned<Size>>,
    pub quota: Option<Spanned<Size>>,
    pub provides: Option<Spanned<String>>,
    #[serde(default)]
    pub uses: Vec<Spanned<String>>,
    pub args: Option<Spanned<String>>,
    pub restart: Option<Spanned<u32>>,
}

/// A size in bytes, written as a string: a number and `K`, `M` or `G`
/// (binary units; `KiB`, `MiB`, `GiB` too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

pub const SIZE_EXPECTED: &str = "a size such as \"256M\" (a number with K, M or G)";

impl Size {
    pub fn parse(text: &str) -> Result<Size, String> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let shift = match unit.trim_start() {
            "K" | "KiB" | "k" => 10,
            "M" | "MiB" | "m" => 20,
            "G" | "GiB" | "g" => 30,
            "" if !number.is_empty() => {
                return Err(format!("\"{text}\" has no unit: expected {SIZE_EXPECTED}"))
            }
            _ => return Err(format!("expected {SIZE_EXPECTED}, not \"{text}\"")),
        };
        let value: u64 = number
            .parse()
            .map_err(|_| format!("expected {SIZE_EXPECTED}, not \"{text}\""))?;
        let bytes = value
            .checked_mul(1 << shift)
            .filter(|&b| b > 0)
            .ok_or_else(|| format!("\"{text}\" is not a usable size (zero or too large)"))?;
        Ok(Size(bytes))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(SIZE_EXPECTED)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Size, E> {
                Size::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(SizeVisitor)
    }
}

/// `256M`, `64K`, `1G` or a byte count, as the manifest writes sizes.
pub fn manifest_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

// ---------------------------------------------------------------- errors

/// A problem in a configuration, where it is and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the value came from the command line.
    pub line: usize,
    pub column: usize,
    /// `guest[1].memory`, `component[0]`, … (empty when not known).
    pub field: String,
    pub message: String,
    /// The line the error points into, and the span's columns on it.
    pub excerpt: Option<Box<(String, Range<usize>)>>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)?;
        if let Some((text, cols)) = self.excerpt.as_deref() {
            let number = self.line.to_string();
            let pad = " ".repeat(number.len());
            let marks = "^".repeat(cols.len().max(1));
            write!(
                f,
                "\n {pad} |\n {number} | {text}\n {pad} | {}{marks}",
                " ".repeat(cols.start)
            )?;
        }
        Ok(())
    }
}

/// A configuration's text and name, for locating errors.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// An error at `span` (an empty span at 0: a command-line value).
    fn error(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let field = field.into();
        if span == (0..0) {
            return ConfigError {
                file: "command line".into(),
                line: 0,
                column: 0,
                field,
                message: message.into(),
                excerpt: None,
            };
        }
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        let line_text = self.text[line_start..line_end].trim_end_matches('\r');
        let column = self.text[line_start..start].chars().count() + 1;
        let end = span
            .end
            .clamp(start, (line_start + line_text.len()).max(start));
        let cols = (column - 1)..(column - 1 + self.text[start..end].chars().count());
        ConfigError {
            file: self.name.to_string(),
            line: self.text[..start].matches('\n').count() + 1,
            column,
            field,
            message: message.into(),
            excerpt: Some(Box::new((line_text.to_string(), cols))),
        }
    }

    /// The field at `offset`: the key on that line (if any) inside the
    /// nearest `[table]` or `[[array]]` header before it, numbered.
    fn field_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let mut table = String::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut line_start = 0;
        let mut key = String::new();
        for line in self.text.split_inclusive('\n') {
            let trimmed = line.trim();
            let is_here =
                offset < line_start + line.len() || line_start + line.len() == self.text.len();
            if let Some(name) = trimmed
                .strip_prefix("[[")
                .and_then(|r| r.split("]]").next())
            {
                let name = name.trim().to_string();
                let n = counts.entry(name.clone()).or_insert(0);
                table = format!("{name}[{n}]");
                *n += 1;
            } else if let Some(name) = trimmed.strip_prefix('[').and_then(|r| r.split(']').next()) {
                table = name.trim().to_string();
            } else if is_here {
                if let Some((k, _)) = trimmed.split_once('=') {
                    key = k.trim().trim_matches('"').to_string();
                }
            }
            if is_here {
                break;
            }
            line_start += line.len();
        }
        match (table.is_empty(), key.is_empty()) {
            (_, true) => table,
            (true, false) => key,
            (false, false) => format!("{table}.{key}"),
        }
    }

    /// Parses the text; a TOML or schema error located and named.
    pub fn parse(&self) -> Result<ConfigFile, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let span = if span == (0..0) {
                0..1.min(self.text.len())
            } else {
                span
            };
            let field = self.field_at(span.start);
            self.error(span, field, e.message().trim().to_string())
        })
    }
}

// ---------------------------------------------------------------- overrides

/// The quick form's options (`run --kernel … --memory …`): they replace
/// the console guest's values (or the only guest's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestOverride {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub memory: Option<Size>,
    pub vcpus: Option<u32>,
    /// `--disk FILE[:SIZE]`.
    pub disk: Option<DiskOption>,
    /// `run --cpus N`: the machine's CPUs, and the vCPUs of the guest the
    /// other options change, unless `--vcpus` or its `vcpus` says.
    pub cpus: Option<u32>,
    /// `--hostfwd HOST_PORT:GUEST_PORT`, each time it is given.
    pub hostfwd: Vec<crate::net::Forward>,
}

/// `--disk FILE[:SIZE]`: the guest's persistent disk, created with SIZE
/// when missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOption {
    pub file: String,
    pub size: Option<Size>,
}

impl DiskOption {
    /// `FILE` or `FILE:SIZE` (a suffix after the last `:` that is not a
    /// size belongs to the file's name).
    pub fn parse(text: &str) -> Result<DiskOption, String> {
        let (file, size) = match text.rsplit_once(':') {
            Some((file, size)) if size.starts_with(|c: char| c.is_ascii_digit()) => {
                (file, Some(Size::parse(size)?))
            }
            _ => (text, None),
        };
        if file.is_empty() {
            return Err(format!("expected FILE or FILE:SIZE, not \"{text}\""));
        }
        Ok(DiskOption {
            file: file.to_string(),
            size,
        })
    }
}

impl GuestOverride {
    pub fn is_empty(&self) -> bool {
        *self == GuestOverride::default()
    }

    /// Applies the options to `file`'s console guest, or its only guest.
    pub fn apply(&self, file: &mut ConfigFile) -> Result<(), String> {
        if let Some(cpus) = self.cpus {
            file.machine.cpus = Some(from_cli(cpus));
            let guest = file
                .guests
                .iter()
                .position(GuestEntry::owns_console)
                .or((file.guests.len() == 1).then_some(0));
            if let Some(guest) = guest.map(|i| &mut file.guests[i]) {
                if self.vcpus.is_none() && guest.vcpus.is_none() {
                    guest.vcpus = Some(from_cli(cpus.min(MAX_GUEST_VCPUS)));
                }
            }
        }
        let for_guest = GuestOverride {
            cpus: None,
            ..self.clone()
        };
        if for_guest.is_empty() {
            return Ok(());
        }
        let index = match file.guests.iter().position(GuestEntry::owns_console) {
            Some(i) => i,
            None if file.guests.len() == 1 => 0,
            None => {
                return Err(format!(
                    "--kernel, --initrd, --append, --memory, --vcpus, --disk and --hostfwd change the guest \
                     that owns the console, and this configuration has {} guests, none with \
                     `console = true`",
                    file.guests.len()
                ))
            }
        };
        let guest = &mut file.guests[index];
        if let Some(kernel) = &self.kernel {
            guest.kernel = from_cli(kernel.clone());
        }
        if let Some(initrd) = &self.initrd {
            guest.initrd = Some(from_cli(initrd.clone()));
        }
        if let Some(append) = &self.append {
            guest.cmdline = Some(from_cli(append.clone()));
        }
        if let Some(memory) = self.memory {
            guest.memory = Some(from_cli(memory));
        }
        if let Some(vcpus) = self.vcpus {
            guest.vcpus = Some(from_cli(vcpus));
        }
        if let Some(disk) = &self.disk {
            // The user's disk replaces the test disk.
            guest.test_disk = false;
            guest.disk = Some(from_cli(disk.file.clone()));
            guest.disk_size = disk.size.map(from_cli);
        }
        if !self.hostfwd.is_empty() {
            let forwards = self.hostfwd.iter();
            let forwards = forwards.map(|f| from_cli(format!("{}:{}", f.host, f.guest)));
            guest.hostfwd = Some(from_cli(forwards.collect()));
        }
        Ok(())
    }
}

/// A value from the command line: an empty span at 0, which no value in
/// a file has.
fn from_cli<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

// ---------------------------------------------------------------- the plan

/// Where a boot module's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleSource {
    /// A user task as built (`build::USER_TASKS`' binary name).
    Task(String),
    /// A file of the user's (absolute, or relative to the workspace).
    File(PathBuf),
    /// Bytes xtask writes (the manifest, a command line).
    Text(String),
    /// The Linux test guest's check disk (`linux::write_test_disk`).
    TestDisk,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedModule {
    pub name: String,
    pub source: ModuleSource,
}

/// What a configuration boots: modules in order (the root task first,
/// then the manifest), the root's pool and the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub manifest: String,
    pub modules: Vec<PlannedModule>,
    /// The kernel's `pool=` (MiB).
    pub pool_mib: u64,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Some file is the pinned Linux guest's (build it first).
    pub uses_pinned_linux: bool,
    /// Some file is the Debian example's (`cargo xtask debian build`).
    pub uses_pinned_debian: bool,
    /// The other kernels (`pinned:NAME/...`) some file is of, each once.
    pub other_kernels: Vec<String>,
    /// A guest's persistent disk: QEMU's virtio-blk device on this file.
    pub disk: Option<DiskPlan>,
    /// A guest's network through the virtual switch: QEMU's virtio-net
    /// device with these forwards.
    pub net: Option<NetPlan>,
}

/// The guests' network, as planned: one port of the virtual switch per
/// guest with `hostfwd`, in the order of the file; the host ports are
/// checked free by [`NetPlan::prepare`] before anything boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPlan {
    pub ports: Vec<NetPort>,
}

/// One guest's port: client `index` of the switch (its region `nINDEX`),
/// with its MAC address, the address the guest is expected to configure
/// (where its forwards go) and the forwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPort {
    pub guest: String,
    pub index: usize,
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub forwards: Vec<crate::net::Forward>,
}

impl NetPort {
    fn new(guest: &str, index: usize, forwards: Vec<crate::net::Forward>) -> Self {
        let [a, b, c, d, e, f] = GUEST_MAC_FIRST;
        let [w, x, y, z] = GUEST_ADDRESS_FIRST.octets();
        Self {
            guest: guest.to_string(),
            index,
            mac: format!(
                "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{:02x}",
                f + index as u8
            ),
            address: std::net::Ipv4Addr::new(w, x, y, z + index as u8),
            forwards,
        }
    }
}

impl NetPlan {
    pub fn prepare(&self) -> Result<(), String> {
        for port in &self.ports {
            for f in &port.forwards {
                crate::net::check_free(f.host)
                    .map_err(|e| format!("guest '{}': {e}", port.guest))?;
            }
        }
        Ok(())
    }

    pub fn qemu_args(&self) -> Vec<String> {
        let forwards: Vec<_> = self
            .ports
            .iter()
            .flat_map(|p| p.forwards.iter().map(|f| (p.address, *f)))
            .collect();
        crate::net::qemu_args(&forwards)
    }
}

/// A guest's persistent disk, as planned (the file is checked, and
/// created if missing, by [`DiskPlan::prepare`] before anything boots).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskPlan {
    pub guest: String,
    pub path: PathBuf,
    /// Its size: the file's, or the one it is created with.
    pub size: u64,
    /// The file is missing: create it with `size`.
    pub create: bool,
    /// Created as a copy of this image, not empty (the Debian example's
    /// `pinned:debian.img`, from the pristine root disk).
    pub template: Option<PathBuf>,
}

/// The smallest and largest persistent disk.
pub const DISK_MIN: u64 = 1 << 20;
pub const DISK_MAX: u64 = (u32::MAX as u64) * linux::SECTOR as u64;

impl DiskPlan {
    /// Creates the file if it is missing, and checks that it can be
    /// written and is a usable disk, so that a bad one is reported before
    /// anything boots.
    pub fn prepare(&self) -> Result<(), String> {
        let path = self.path.display();
        if let Some(template) = self.template.as_ref().filter(|_| !self.path.exists()) {
            println!(
                "run: guest '{}': its disk {path} is a fresh copy of {}",
                self.guest,
                template.display()
            );
            debian::copy_image(template, &self.path)
                .map_err(|e| format!("guest '{}': cannot make the disk {path}: {e}", self.guest))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(self.create)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| format!("guest '{}': cannot write the disk {path}: {e}", self.guest))?;
        let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
        if !meta.is_file() {
            return Err(format!(
                "guest '{}': the disk {path} is not a file",
                self.guest
            ));
        }
        if self.create && meta.len() == 0 {
            file.set_len(self.size)
                .map_err(|e| format!("guest '{}': cannot size the disk {path}: {e}", self.guest))?;
        }
        let size = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
        check_disk_size(size)
            .map_err(|why| format!("guest '{}': the disk {path}: {why}", self.guest))
    }

    /// QEMU's arguments for the disk: the q35 machine (its MCFG gives the
    /// driver its device's configuration page) and the virtio-blk device.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-machine".into(),
            "q35".into(),
            "-drive".into(),
            format!(
                "if=none,file={},format=raw,id=d0",
                self.path.display().to_string().replace(',', ",,")
            ),
            "-device".into(),
            "virtio-blk-pci,drive=d0,disable-legacy=on,disable-modern=off".into(),
        ]
    }
}

/// Whether `size` bytes make a disk: whole sectors, from [`DISK_MIN`] to
/// [`DISK_MAX`].
fn check_disk_size(size: u64) -> Result<(), String> {
    if size < DISK_MIN {
        Err(format!("{size} bytes is too small: a disk has at least 1M"))
    } else if size > DISK_MAX {
        Err(format!("{size} bytes is more than the block service's 2T"))
    } else if !size.is_multiple_of(linux::SECTOR as u64) {
        Err(format!("{size} bytes is not whole 512-byte sectors"))
    } else {
        Ok(())
    }
}

impl Plan {
    /// The kernel arguments the plan needs (besides `debug-exit`).
    pub fn kernel_args(&self) -> Vec<String> {
        vec![format!("pool={}", self.pool_mib)]
    }
}

/// Reads and plans the configuration file at `path` (relative paths in it
/// are relative to its directory), with the quick form's `overrides`.
/// `size_of` gives the size of a guest file (kernel, initrd).
pub fn load(
    path: &Path,
    overrides: &GuestOverride,
    size_of: &dyn Fn(&Path) -> Result<u64, String>,
) -> crate::Result<Plan> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        crate::Error::Other(format!("cannot read configuration {}: {e}", path.display()))
    })?;
    let name = path.display().to_string();
    let source = Source {
        name: &name,
        text: &text,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    plan_text(&source, base, overrides, size_of).map_err(|e| crate::Error::Other(e.to_string()))
}

/// Parses and plans a configuration's text.
pub fn plan_text(
    source: &Source,
    base: &Path,
    overrides: &GuestOverride,
    size_of: &dyn Fn(&Path) -> Result<u64, String>,
) -> Result<Plan, ConfigError> {
    let mut file = source.parse()?;
    overrides
        .apply(&mut file)
        .map_err(|message| source.error(0..0, "", message))?;
    Planner {
        source,
        base,
        size_of,
    }
    .plan(&file)
}

struct Planner<'a> {
    source: &'a Source<'a>,
    base: &'a Path,
    size_of: &'a dyn Fn(&Path) -> Result<u64, String>,
}

/// A checked component or guest, before the text is written.
struct Entry<'a> {
    name: &'a str,
    field: String,
}

fn name_ok(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

impl Planner<'_> {
    fn err<T>(
        &self,
        span: Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(self.source.error(span, field, message))
    }

    /// A component xtask adds (`name`, `what` it is and who needs it)
    /// must not share its name with one of the file's.
    fn service_name_free(
        &self,
        file: &ConfigFile,
        name: &str,
        what: &str,
    ) -> Result<(), ConfigError> {
        match file
            .components
            .iter()
            .enumerate()
            .find(|(_, c)| c.name.get_ref() == name)
        {
            Some((i, c)) => self.err(
                c.name.span(),
                &format!("component[{i}].name"),
                format!("'{name}' is the name of {what}: give this component another name"),
            ),
            None => Ok(()),
        }
    }

    /// A guest file: `pinned:NAME` or a path relative to the file.
    fn guest_file(
        &self,
        value: &Spanned<String>,
        field: &str,
    ) -> Result<(PathBuf, bool, u64), ConfigError> {
        let text = value.get_ref();
        let (path, pinned) = match text.strip_prefix(PINNED_PREFIX) {
            Some(name) if PINNED_FILES.contains(&name) => (pinned_path(name).0, true),
            Some(name) if name.contains('/') => match pinned_other_kernel(name) {
                Ok(Some((_, path))) => (path, true),
                Ok(None) => unreachable!("a name with '/' has the other kernels' shape"),
                Err(why) => return self.err(value.span(), field, why),
            },
            Some(name) => {
                return self.err(
                    value.span(),
                    field,
                    format!(
                        "the pinned guest has no file \"{name}\" (expected {})",
                        PINNED_FILES
                            .map(|f| format!("\"{PINNED_PREFIX}{f}\""))
                            .join(" or ")
                    ),
                )
            }
            None if text.is_empty() => {
                return self.err(value.span(), field, "expected a file's path, not \"\"")
            }
            None => (self.base.join(text), false),
        };
        // The pinned files may not be built yet: their size is known only
        // afterwards; a rough one serves the quota.
        let size = match (self.size_of)(&path) {
            Ok(size) => size,
            Err(_) if pinned => 16 << 20,
            Err(why) => {
                return self.err(
                    value.span(),
                    field,
                    format!("cannot use {}: {why}", path.display()),
                )
            }
        };
        Ok((path, pinned, size))
    }

    fn plan(&self, file: &ConfigFile) -> Result<Plan, ConfigError> {
        // Names: unique among guests and components (each is a manifest
        // component).
        let mut names: BTreeMap<&str, String> = BTreeMap::new();
        let mut entries = Vec::new();
        for (i, g) in file.guests.iter().enumerate() {
            let field = format!("guest[{i}]");
            entries.push((
                Entry {
                    name: g.name.get_ref(),
                    field: field.clone(),
                },
                g.name.span(),
                GUEST_NAME_MAX,
            ));
        }
        for (i, c) in file.components.iter().enumerate() {
            let field = format!("component[{i}]");
            entries.push((
                Entry {
                    name: c.name.get_ref(),
                    field,
                },
                c.name.span(),
                COMPONENT_NAME_MAX,
            ));
        }
        for (entry, span, max) in &entries {
            if !name_ok(entry.name, *max) {
                return self.err(
                    span.clone(),
                    &format!("{}.name", entry.field),
                    format!(
                        "expected 1 to {max} of A-Z a-z 0-9 _ - . , not \"{}\"",
                        entry.name
                    ),
                );
            }
            if let Some(first) = names.insert(entry.name, entry.field.clone()) {
                return self.err(
                    span.clone(),
                    &format!("{}.name", entry.field),
                    format!(
                        "\"{}\" is already the name of {first}; names must be unique",
                        entry.name
                    ),
                );
            }
        }
        if file.guests.is_empty() && file.components.is_empty() {
            return self.err(
                0..1.min(self.source.text.len()),
                "",
                "no [[guest]] and no [[component]]: nothing to boot",
            );
        }

        let cpus = match &file.machine.cpus {
            None => 1,
            Some(c) if (1..=MAX_CPUS).contains(c.get_ref()) => *c.get_ref(),
            Some(c) => {
                return self.err(
                    c.span(),
                    "machine.cpus",
                    format!("expected 1 to {MAX_CPUS} CPUs, not {}", c.get_ref()),
                )
            }
        };

        // Services: who provides what.
        let mut providers: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, c) in file.components.iter().enumerate() {
            if let Some(p) = &c.provides {
                let field = format!("component[{i}].provides");
                if !name_ok(p.get_ref(), PORTAL_NAME_MAX) {
                    return self.err(
                        p.span(),
                        &field,
                        format!(
                            "expected 1 to {PORTAL_NAME_MAX} of A-Z a-z 0-9 _ - . , not \"{}\"",
                            p.get_ref()
                        ),
                    );
                }
                if let Some(first) = providers.insert(p.get_ref(), c.name.get_ref()) {
                    return self.err(
                        p.span(),
                        &field,
                        format!("\"{}\" is already provided by '{first}'", p.get_ref()),
                    );
                }
            }
        }
        let check_provided =
            |s: &Spanned<String>, field: &str, me: &str| -> Result<(), ConfigError> {
                match providers.get(s.get_ref().as_str()) {
                    None => {
                        let known: Vec<_> = providers.keys().map(|k| format!("\"{k}\"")).collect();
                        self.err(
                            s.span(),
                            field,
                            format!(
                                "no component provides \"{}\" (provided: {})",
                                s.get_ref(),
                                if known.is_empty() {
                                    "nothing".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        )
                    }
                    Some(&p) if p == me => self.err(
                        s.span(),
                        field,
                        format!("'{me}' cannot use its own service"),
                    ),
                    Some(_) => Ok(()),
                }
            };

        let mut manifest =
            String::from("# Written by cargo xtask from a system configuration; do not edit.\n");
        let mut tasks: Vec<String> = Vec::new();
        let mut pool: u64 = 0;
        let mut ram_regions: u64 = 0;
        let mut quotas: u64 = 0;

        // Native components.
        for (i, c) in file.components.iter().enumerate() {
            let f = |name: &str| format!("component[{i}].{name}");
            let name = c.name.get_ref();
            let module = c.module.as_ref().map_or(name.as_str(), |m| m.get_ref());
            let module_span = c.module.as_ref().map_or(c.name.span(), |m| m.span());
            if module == VMM_MODULE {
                return self.err(
                    module_span,
                    &f("module"),
                    "the VMM is started for each [[guest]]: describe the guest there",
                );
            }
            if module == crate::image::ROOT_TASK || !USER_TASKS.iter().any(|t| t.binary == module) {
                let known: Vec<_> = USER_TASKS
                    .iter()
                    .map(|t| t.binary)
                    .filter(|b| *b != crate::image::ROOT_TASK && *b != VMM_MODULE)
                    .collect();
                return self.err(
                    module_span,
                    &f("module"),
                    format!(
                        "no component module \"{module}\" (xtask builds: {})",
                        known.join(", ")
                    ),
                );
            }
            let priority = c
                .priority
                .as_ref()
                .map_or(DEFAULT_COMPONENT_PRIORITY, |p| *p.get_ref());
            if let Some(p) = &c.priority {
                if *p.get_ref() > 63 {
                    return self.err(
                        p.span(),
                        &f("priority"),
                        format!("expected a priority from 0 to 63, not {}", p.get_ref()),
                    );
                }
            }
            let cpu = match &c.cpu {
                None => 0,
                Some(cpu) if *cpu.get_ref() < cpus => *cpu.get_ref(),
                Some(cpu) => {
                    return self.err(
                        cpu.span(),
                        &f("cpu"),
                        format!(
                            "the machine has {cpus} CPU(s) ([machine] cpus), numbered from 0, \
                             so no CPU {}",
                            cpu.get_ref()
                        ),
                    )
                }
            };
            let memory =
                self.page_size(c.memory.as_ref(), DEFAULT_COMPONENT_MEMORY, &f("memory"))?;
            let quota = self.page_size(c.quota.as_ref(), DEFAULT_COMPONENT_QUOTA, &f("quota"))?;
            manifest += &format!(
                "component {name}\n    module {module}\n    priority {priority}\n    memory {}\n    quota {}\n",
                manifest_size(memory),
                manifest_size(quota)
            );
            if cpu != 0 {
                manifest += &format!("    cpu {cpu}\n");
            }
            if let Some(p) = &c.provides {
                manifest += &format!("    provides {}\n", p.get_ref());
            }
            for (n, used) in c.uses.iter().enumerate() {
                check_provided(used, &f("uses"), name)?;
                let sel = self.selector(n, used.span(), &f("uses"))?;
                manifest += &format!("    uses {} at {sel}\n", used.get_ref());
            }
            if let Some(r) = &c.restart {
                if *r.get_ref() > MAX_RESTARTS {
                    return self.err(
                        r.span(),
                        &f("restart"),
                        format!(
                            "expected at most {MAX_RESTARTS} restarts, not {}",
                            r.get_ref()
                        ),
                    );
                }
                manifest += &format!("    restart {}\n", r.get_ref());
            }
            if let Some(args) = &c.args {
                self.check_args(args, &f("args"))?;
                if !args.get_ref().trim().is_empty() {
                    manifest += &format!("    args {}\n", args.get_ref().trim());
                }
            }
            if !tasks.iter().any(|t| t == module) {
                tasks.push(module.to_string());
            }
            pool += memory + DEFAULT_STACK;
            quotas += quota;
        }

        // The machine's clock, for guests without a fixed `epoch`: the
        // `rtc` driver serving `clock`, unless a component provides it.
        let mut trailer = String::new();
        let clock_needed = file.guests.iter().any(|g| g.epoch.is_none());
        let mut extra_components = 0;
        if clock_needed && !providers.contains_key(CLOCK_SERVICE) {
            self.service_name_free(
                file,
                CLOCK_COMPONENT,
                "the machine's clock, which a guest without `epoch` needs",
            )?;
            manifest += &format!(
                "component {CLOCK_COMPONENT}\n    module {CLOCK_MODULE}\n    priority {DEFAULT_COMPONENT_PRIORITY}\n    \
                 memory {}\n    quota {}\n    provides {CLOCK_SERVICE}\n    args serve\n",
                manifest_size(CLOCK_MEMORY),
                manifest_size(DEFAULT_COMPONENT_QUOTA)
            );
            trailer += &format!("ioports 0x70-0x71 to {CLOCK_COMPONENT}\n");
            if !tasks.iter().any(|t| t == CLOCK_MODULE) {
                tasks.push(CLOCK_MODULE.to_string());
            }
            pool += CLOCK_MEMORY + DEFAULT_STACK;
            quotas += DEFAULT_COMPONENT_QUOTA;
            extra_components = 1;
        }

        // Guests, each under its VMM.
        let mut files: Vec<PlannedModule> = Vec::new();
        let mut uses_pinned_linux = false;
        let mut uses_pinned_debian = false;
        let mut other_kernels: Vec<String> = Vec::new();
        let mut note_other_kernel = |value: &Spanned<String>| {
            let name = value.get_ref().strip_prefix(PINNED_PREFIX).unwrap_or("");
            if let Ok(Some((kernel, _))) = pinned_other_kernel(name) {
                if !other_kernels.contains(&kernel) {
                    other_kernels.push(kernel);
                }
            }
        };
        let mut console: Option<usize> = None;
        let mut file_sizes: u64 = 0;
        let mut disk: Option<DiskPlan> = None;
        let mut net_ports: Vec<NetPort> = Vec::new();
        for (i, g) in file.guests.iter().enumerate() {
            let f = |name: &str| format!("guest[{i}].{name}");
            let name = g.name.get_ref().as_str();
            let memory = match &g.memory {
                None => DEFAULT_GUEST_MEMORY,
                Some(m) => {
                    let bytes = m.get_ref().0;
                    if bytes < GUEST_MIN_MEMORY || !bytes.is_multiple_of(GUEST_MEMORY_ALIGN) {
                        return self.err(
                            m.span(),
                            &f("memory"),
                            format!(
                            "a guest's memory is a multiple of 2M and at least {}M, not {} bytes",
                            GUEST_MIN_MEMORY >> 20,
                            bytes
                        ),
                        );
                    }
                    if bytes > MAX_MACHINE_MEMORY {
                        return self.err(
                            m.span(),
                            &f("memory"),
                            format!(
                                "{} MiB is more than the machine's most, {} MiB",
                                bytes >> 20,
                                MAX_MACHINE_MEMORY >> 20
                            ),
                        );
                    }
                    bytes
                }
            };
            let vcpus = match &g.vcpus {
                None => 1,
                Some(v) if (1..=MAX_GUEST_VCPUS).contains(v.get_ref()) => *v.get_ref(),
                Some(v) => {
                    return self.err(
                        v.span(),
                        &f("vcpus"),
                        format!("expected 1 to {MAX_GUEST_VCPUS} vCPUs, not {}", v.get_ref()),
                    )
                }
            };
            // vCPU i on the CPU the list names, else on CPU i mod the
            // machine's CPUs.
            let vcpu_cpus: Vec<u32> = match &g.vcpu_cpus {
                None => (0..vcpus).map(|i| i % cpus).collect(),
                Some(list) => {
                    let given = list.get_ref();
                    if given.len() != vcpus as usize {
                        return self.err(
                            list.span(),
                            &f("vcpu-cpus"),
                            format!("expected one CPU per vCPU ({vcpus}), not {}", given.len()),
                        );
                    }
                    if let Some(cpu) = given.iter().find(|&&c| c >= cpus) {
                        return self.err(
                            list.span(),
                            &f("vcpu-cpus"),
                            format!(
                                "the machine has {cpus} CPU(s) ([machine] cpus), numbered from 0, \
                                 so no CPU {cpu}"
                            ),
                        );
                    }
                    given.clone()
                }
            };
            let priority = match &g.priority {
                None => DEFAULT_GUEST_PRIORITY,
                Some(p) if (1..=GUEST_MAX_PRIORITY).contains(p.get_ref()) => *p.get_ref(),
                Some(p) => {
                    return self.err(p.span(), &f("priority"), format!(
                        "expected a guest priority from 1 to {GUEST_MAX_PRIORITY} (below the VMM's own threads), not {}",
                        p.get_ref()
                    ))
                }
            };
            if g.owns_console() {
                if let Some(first) = console {
                    return self.err(
                        g.console_span(),
                        &f("console"),
                        format!(
                            "guest '{}' already owns the console; at most one guest may",
                            file.guests[first].name.get_ref()
                        ),
                    );
                }
                console = Some(i);
            }
            let cmdline = g.cmdline.as_ref().map_or("", |c| c.get_ref().as_str());
            if cmdline.len() > CMDLINE_MAX || cmdline.contains(['\0', '\n']) {
                let span = g.cmdline.as_ref().map_or(g.name.span(), |c| c.span());
                return self.err(
                    span,
                    &f("cmdline"),
                    format!("expected one line of at most {CMDLINE_MAX} bytes"),
                );
            }

            let (kernel_module, k_pinned, kernel_size) =
                if g.kernel.get_ref() == &format!("{PINNED_PREFIX}{MBTEST}") {
                    // The Multiboot test kernel, a task xtask builds.
                    if !files.iter().any(|m| m.name == MBTEST) {
                        files.push(PlannedModule {
                            name: MBTEST.into(),
                            source: ModuleSource::Task(MBTEST.into()),
                        });
                    }
                    (MBTEST.to_string(), false, MBTEST_SIZE)
                } else {
                    let (kernel, pinned, size) = self.guest_file(&g.kernel, &f("kernel"))?;
                    (file_module(&mut files, &kernel, "kernel", i), pinned, size)
                };
            let mut file_mappings = vec![format!("file kernel {kernel_module}")];
            let mut files_size = kernel_size;
            uses_pinned_linux |= k_pinned;
            note_other_kernel(&g.kernel);
            if let (Some(initrd), Some(module)) = (&g.initrd, g.modules.first()) {
                let span = module.span().start.min(initrd.span().start)
                    ..module.span().end.max(initrd.span().end);
                return self.err(
                    span,
                    &f("modules"),
                    "a Linux kernel's `initrd` or a Multiboot kernel's `modules`, not both",
                );
            }
            if let Some(initrd) = &g.initrd {
                let (path, pinned, size) = self.guest_file(initrd, &f("initrd"))?;
                uses_pinned_linux |= pinned;
                uses_pinned_debian |= path == pinned_path(DEBIAN_INITRD).0;
                note_other_kernel(initrd);
                let module = file_module(&mut files, &path, "initrd", i);
                file_mappings.push(format!("file initrd {module}"));
                files_size += size;
            }
            let mut module_lines = String::new();
            for (n, module) in g.modules.iter().enumerate() {
                let field = f(&format!("modules[{n}]"));
                let m = module.get_ref();
                let (path, pinned, size) = self.guest_file(&m.file, &format!("{field}.file"))?;
                uses_pinned_linux |= pinned;
                note_other_kernel(&m.file);
                let name = file_module(&mut files, &path, "mod", i);
                file_mappings.push(format!("file mod{} {name}", n + 1));
                files_size += size;
                let line = m.cmdline.as_ref().map_or("", |c| c.get_ref().as_str());
                if line.len() > CMDLINE_MAX || line.contains(['\0', '\n']) {
                    let span = m.cmdline.as_ref().map_or(module.span(), |c| c.span());
                    return self.err(
                        span,
                        &format!("{field}.cmdline"),
                        format!("expected one line of at most {CMDLINE_MAX} bytes"),
                    );
                }
                module_lines += line.trim();
                module_lines.push('\n');
            }
            if !g.modules.is_empty() {
                let lines_module = format!("{name}.mods");
                files_size += module_lines.len() as u64;
                files.push(PlannedModule {
                    name: lines_module.clone(),
                    source: ModuleSource::Text(module_lines),
                });
                file_mappings.push(format!("file modcmdlines {lines_module}"));
            }
            let mut line = cmdline.trim().to_string();
            let disk_size = if g.test_disk {
                if !files.iter().any(|m| m.source == ModuleSource::TestDisk) {
                    files.push(PlannedModule {
                        name: "disk.img".into(),
                        source: ModuleSource::TestDisk,
                    });
                }
                for arg in test_disk_args() {
                    if !line.is_empty() {
                        line.push(' ');
                    }
                    line += arg;
                }
                (linux::DISK_SECTORS * linux::SECTOR) as u64
            } else {
                0
            };
            let guest_disk = self.guest_disk(g, &f, disk.as_ref())?;
            uses_pinned_debian |= guest_disk.as_ref().is_some_and(|d| d.template.is_some());
            let guest_net = self.guest_net(g, &f, &net_ports)?;
            line.push('\n');
            let cmdline_module = format!("{name}.cmdline");
            files.push(PlannedModule {
                name: cmdline_module.clone(),
                source: ModuleSource::Text(line.clone()),
            });

            let heap = (VMM_HEAP_BASE + disk_size).next_multiple_of(1 << 20);
            let mapped = memory + heap + files_size + disk_size + line.len() as u64;
            let quota = (VMM_QUOTA_BASE
                + mapped / VMM_QUOTA_DIVISOR
                + u64::from(vcpus - 1) * VMM_QUOTA_PER_VCPU)
                .next_multiple_of(1 << 20);
            let mut mappings = vec![
                format!("ram guest {}", manifest_size(memory)),
                format!("ram heap {}", manifest_size(heap)),
            ];
            mappings.extend(file_mappings);
            if g.test_disk {
                mappings.push("file disk disk.img".into());
            }
            if guest_disk.is_some() {
                mappings.push(format!("shared c0 {}", manifest_size(BLK_REGION)));
            }
            if let Some(port) = &guest_net {
                mappings.push(format!(
                    "shared n{} {}",
                    port.index,
                    manifest_size(NET_REGION)
                ));
            }
            mappings.push(format!("file cmdline {cmdline_module}"));
            manifest += &format!(
                "component {name}\n    module {VMM_MODULE}\n    priority {priority}\n    ceiling {VMM_CEILING}\n    \
                 memory {}\n    stack {}\n    quota {}\n    restart 0\n",
                manifest_size(VMM_MEMORY),
                manifest_size(VMM_STACK),
                manifest_size(quota)
            );
            // vCPU 0 runs in the VMM's first EC, so on the VMM's CPU.
            if vcpu_cpus[0] != 0 {
                manifest += &format!("    cpu {}\n", vcpu_cpus[0]);
            }
            for (slot, mapping) in mappings.iter().enumerate() {
                manifest += &format!(
                    "    {mapping} at {:#x}\n",
                    MAPPING_BASE + slot as u64 * MAPPING_SLOT
                );
            }
            let mut uses = Vec::new();
            for called in &g.calls {
                check_provided(called, &f("calls"), name)?;
                if uses.contains(&called.get_ref().as_str()) {
                    return self.err(
                        called.span(),
                        &f("calls"),
                        format!("\"{}\" named twice", called.get_ref()),
                    );
                }
                uses.push(called.get_ref().as_str());
            }
            let calls = uses.len();
            let mut arg_of = Vec::new();
            if let Some(modem) = &g.modem {
                check_provided(modem, &f("modem"), name)?;
                uses.push(modem.get_ref().as_str());
                arg_of.push("modem");
            }
            let mut args = Vec::new();
            if vcpus > 1 {
                let rest: Vec<String> = vcpu_cpus[1..].iter().map(u32::to_string).collect();
                args.push(format!("vcpus={vcpus}"));
                args.push(format!("vcpu-cpus={}", rest.join(",")));
                args.push(format!("vcpu-priority={priority}"));
            }
            match g.epoch {
                Some(epoch) => args.push(format!("epoch={epoch}")),
                None => {
                    uses.push(CLOCK_SERVICE);
                    arg_of.push("clock");
                }
            }
            if g.owns_console() {
                args.push("console-input".to_string());
            }
            let mut portals = Vec::new();
            for (n, service) in uses.iter().enumerate() {
                let sel = self.selector(n, g.name.span(), &f("calls"))?;
                manifest += &format!("    uses {service} at {sel}\n");
                match n.checked_sub(calls) {
                    None => portals.push(sel.to_string()),
                    Some(k) => args.push(format!("{}={sel}", arg_of[k])),
                }
            }
            if !portals.is_empty() {
                args.push(format!("vm-portals={}", portals.join(",")));
            }
            if g.user_hypercalls {
                args.push("user-hypercalls".to_string());
            }
            if g.on_panic == OnPanic::Restart {
                args.push("on-panic=restart".to_string());
            }
            if g.debug_exit {
                args.push("debug-exit".to_string());
            }
            if let Some(planned) = guest_disk {
                if FIRST_USE_SELECTOR + uses.len() as u64 > VMM_BLK_SEMAPHORES {
                    return self.err(
                        g.name.span(),
                        &f("calls"),
                        format!(
                            "a guest with a `disk` uses at most {} services (selectors {} on \
                             are the block service's semaphores)",
                            VMM_BLK_SEMAPHORES - FIRST_USE_SELECTOR,
                            VMM_BLK_SEMAPHORES
                        ),
                    );
                }
                args.push("blk=c0".to_string());
                disk = Some(planned);
            }
            if let Some(planned) = guest_net {
                if FIRST_USE_SELECTOR + uses.len() as u64 > VMM_BLK_SEMAPHORES {
                    return self.err(
                        g.name.span(),
                        &f("calls"),
                        format!(
                            "a guest with `hostfwd` uses at most {} services (selectors {} on \
                             are the switch's and block service's semaphores)",
                            VMM_BLK_SEMAPHORES - FIRST_USE_SELECTOR,
                            VMM_BLK_SEMAPHORES
                        ),
                    );
                }
                args.push(format!("net=n{} mac={}", planned.index, planned.mac));
                net_ports.push(planned);
            }
            if !args.is_empty() {
                manifest += &format!("    args {}\n", args.join(" "));
            }
            if g.owns_console() {
                // COM1, and the kernel's debug event (a state dump, GSI
                // 255: docs/architecture.md, "A stalled run explains
                // itself") for the guest the user sees.
                trailer +=
                    &format!("ioports 0x3f8-0x3ff to {name}\nirq 4 to {name}\nirq 255 to {name}\n");
            }
            if !tasks.iter().any(|t| t == VMM_MODULE) {
                tasks.push(VMM_MODULE.to_string());
            }
            pool += VMM_MEMORY + VMM_STACK + memory + heap;
            ram_regions += 2;
            quotas += quota;
            file_sizes += files_size + disk_size;
        }
        // The block service for the guest's persistent disk: the `blk`
        // driver with QEMU's virtio-blk device, the guest's VMM its client.
        if let Some(d) = &disk {
            let what = format!(
                "the block service, which guest '{}' needs for its `disk`",
                d.guest
            );
            self.service_name_free(file, BLK_COMPONENT, &what)?;
            manifest += &format!(
                "component {BLK_COMPONENT}\n    module blk\n    priority {BLK_PRIORITY}\n    \
                 memory {}\n    quota {}\n    restart {DRIVER_RESTART}\n    pci dev 1af4:1042 at {:#x}\n    \
                 dma dma {} at {:#x}\n    shared c0 {} at {:#x}\n    args c0.disk=0,{}\n",
                manifest_size(BLK_MEMORY),
                manifest_size(BLK_QUOTA),
                MAPPING_BASE + MAPPING_SLOT,
                manifest_size(BLK_DMA),
                MAPPING_BASE + 2 * MAPPING_SLOT,
                manifest_size(BLK_REGION),
                MAPPING_BASE,
                d.size / linux::SECTOR as u64,
            );
            trailer += &format!(
                "semaphore blkreq up {0} at {1} down {BLK_COMPONENT} at {1}\n\
                 semaphore blkanswer up {BLK_COMPONENT} at {2} down {0} at {2}\n",
                d.guest,
                VMM_BLK_SEMAPHORES,
                VMM_BLK_SEMAPHORES + 1
            );
            if !tasks.iter().any(|t| t == BLK_COMPONENT) {
                tasks.push(BLK_COMPONENT.to_string());
            }
            pool += BLK_MEMORY + DEFAULT_STACK + BLK_DMA + 2 * BLK_REGION;
            quotas += BLK_QUOTA;
            extra_components += 1;
        }
        // The virtual switch for the guests' network: the `net` driver with
        // QEMU's virtio-net device as the uplink, the guests' VMMs its
        // clients, each on its own port.
        let net = (!net_ports.is_empty()).then_some(NetPlan { ports: net_ports });
        if let Some(n) = &net {
            let what = format!(
                "the virtual switch, which guest '{}' needs for its `hostfwd`",
                n.ports[0].guest
            );
            self.service_name_free(file, NET_COMPONENT, &what)?;
            manifest += &format!(
                "component {NET_COMPONENT}\n    module net\n    priority {NET_PRIORITY}\n    \
                 memory {}\n    quota {}\n    restart {DRIVER_RESTART}\n    pci dev 1af4:1041 at {:#x}\n    \
                 dma dma {} at {:#x}\n",
                manifest_size(NET_MEMORY),
                manifest_size(NET_QUOTA),
                MAPPING_BASE + MAPPING_SLOT,
                manifest_size(NET_DMA),
                MAPPING_BASE + 2 * MAPPING_SLOT,
            );
            let mut macs = Vec::new();
            let mut switch_sm =
                format!("semaphore netswitch updown {NET_COMPONENT} at {NET_SWITCH_SM}");
            for port in &n.ports {
                let k = port.index;
                manifest += &format!(
                    "    shared n{k} {} at {:#x}\n",
                    manifest_size(NET_REGION),
                    MAPPING_BASE + k as u64 * NET_REGION_STRIDE,
                );
                macs.push(format!("n{k}.mac={}", port.mac));
                switch_sm += &format!(" up {} at {VMM_NET_SEMAPHORES}", port.guest);
            }
            manifest += &format!("    args {}\n", macs.join(" "));
            trailer += &switch_sm;
            trailer.push('\n');
            for port in &n.ports {
                trailer += &format!(
                    "semaphore netport{0} up {NET_COMPONENT} at {1} down {2} at {3}\n",
                    port.index,
                    NET_SWITCH_SM + 1 + port.index as u64,
                    port.guest,
                    VMM_NET_SEMAPHORES + 1,
                );
            }
            if !tasks.iter().any(|t| t == NET_COMPONENT) {
                tasks.push(NET_COMPONENT.to_string());
            }
            pool += NET_MEMORY + DEFAULT_STACK + NET_DMA + 2 * NET_REGION * n.ports.len() as u64;
            quotas += NET_QUOTA;
            extra_components += 1;
        }
        manifest += &trailer;

        // The root's pool holds every component's memory, stack and RAM
        // mappings (a tenth more for 2 MiB alignment of large runs); its
        // kernel quota is half of what the pool leaves free.
        let pool_mib = mib_up(pool + pool / 10) + 2 * ram_regions + 16;
        let quota_mib = mib_up(quotas)
            + (file.components.len() + extra_components) as u64
            + file.guests.len() as u64;
        let free_needed = (pool_mib * 4).div_ceil(3).max(pool_mib + 2 * quota_mib);
        let needed =
            MACHINE_OVERHEAD + (file_sizes.next_multiple_of(1 << 20)) + (free_needed << 20);
        let memory = match &file.machine.memory {
            Some(m) => {
                let bytes = m.get_ref().0;
                if !bytes.is_multiple_of(1 << 20) || bytes > MAX_MACHINE_MEMORY {
                    return self.err(
                        m.span(),
                        "machine.memory",
                        format!(
                            "expected a whole number of MiB up to {}M, not {bytes} bytes",
                            MAX_MACHINE_MEMORY >> 20
                        ),
                    );
                }
                if bytes < needed {
                    return self.err(m.span(), "machine.memory", format!(
                        "{} MiB is too little: the guests and components need {} MiB of the \
                         machine's memory (the root's pool {pool_mib} MiB, kernel quotas, boot modules)",
                        bytes >> 20,
                        mib_up(needed)
                    ));
                }
                bytes
            }
            None => needed
                .next_multiple_of(MACHINE_MEMORY_STEP)
                .max(DEFAULT_MACHINE_MEMORY),
        };
        if memory > MAX_MACHINE_MEMORY {
            let (span, field) = file
                .guests
                .iter()
                .enumerate()
                .max_by_key(|(_, g)| g.memory.as_ref().map_or(0, |m| m.get_ref().0))
                .and_then(|(i, g)| {
                    g.memory
                        .as_ref()
                        .map(|m| (m.span(), format!("guest[{i}].memory")))
                })
                .unwrap_or((0..1.min(self.source.text.len()), String::new()));
            return self.err(
                span,
                &field,
                format!(
                    "the guests and components need {} MiB of the machine's memory, more than the \
                 {} MiB an emulated machine has",
                    mib_up(needed),
                    MAX_MACHINE_MEMORY >> 20
                ),
            );
        }

        let mut modules = vec![
            PlannedModule {
                name: crate::image::ROOT_TASK.into(),
                source: ModuleSource::Task(crate::image::ROOT_TASK.into()),
            },
            PlannedModule {
                name: crate::manifests::MANIFEST_MODULE.into(),
                source: ModuleSource::Text(manifest.clone()),
            },
        ];
        modules.extend(tasks.into_iter().map(|t| PlannedModule {
            name: t.clone(),
            source: ModuleSource::Task(t),
        }));
        for m in files {
            if modules.iter().any(|n| n.name == m.name) {
                return self.err(
                    0..1.min(self.source.text.len()),
                    "",
                    format!(
                        "two boot modules would be named \"{}\"; rename the file or the guest",
                        m.name
                    ),
                );
            }
            modules.push(m);
        }
        Ok(Plan {
            manifest,
            modules,
            pool_mib,
            memory_mib: (memory >> 20) as u32,
            cpus,
            uses_pinned_linux,
            uses_pinned_debian,
            other_kernels,
            disk,
            net,
        })
    }

    /// A guest's port on the switch (`hostfwd`), checked: at most
    /// [`MAX_NET_GUESTS`] guests have one, each forward a
    /// `HOST_PORT:GUEST_PORT`, no host port twice (in any guest). The
    /// guest gets the next MAC address and guest address after those
    /// `taken` has.
    fn guest_net(
        &self,
        g: &GuestEntry,
        f: &dyn Fn(&str) -> String,
        taken: &[NetPort],
    ) -> Result<Option<NetPort>, ConfigError> {
        let Some(list) = &g.hostfwd else {
            return Ok(None);
        };
        if taken.len() >= MAX_NET_GUESTS {
            return self.err(
                list.span(),
                &f("hostfwd"),
                format!(
                    "the virtual switch has {MAX_NET_GUESTS} ports for guests, and guests '{}' \
                     to '{}' have them",
                    taken[0].guest,
                    taken[taken.len() - 1].guest
                ),
            );
        }
        let mut forwards: Vec<crate::net::Forward> = Vec::new();
        for entry in list.get_ref() {
            let forward = crate::net::parse_forward(entry.get_ref())
                .or_else(|why| self.err(entry.span(), &f("hostfwd"), why))?;
            if forwards.iter().any(|o| o.host == forward.host) {
                return self.err(
                    entry.span(),
                    &f("hostfwd"),
                    format!("host port {} forwarded twice", forward.host),
                );
            }
            if let Some(other) = taken
                .iter()
                .find(|p| p.forwards.iter().any(|o| o.host == forward.host))
            {
                return self.err(
                    entry.span(),
                    &f("hostfwd"),
                    format!(
                        "host port {} is forwarded to guest '{}' already",
                        forward.host, other.guest
                    ),
                );
            }
            forwards.push(forward);
        }
        Ok(Some(NetPort::new(g.name.get_ref(), taken.len(), forwards)))
    }

    /// A guest's persistent disk (`disk`, `disk-size`), checked: one
    /// guest may have one, not beside the test disk, an existing file of a
    /// usable size or a size to create it with.
    fn guest_disk(
        &self,
        g: &GuestEntry,
        f: &dyn Fn(&str) -> String,
        taken: Option<&DiskPlan>,
    ) -> Result<Option<DiskPlan>, ConfigError> {
        let Some(value) = &g.disk else {
            if let Some(size) = &g.disk_size {
                return self.err(
                    size.span(),
                    &f("disk-size"),
                    "`disk-size` is the size a missing `disk` is created with: name the disk",
                );
            }
            return Ok(None);
        };
        let text = value.get_ref();
        if g.test_disk {
            return self.err(
                value.span(),
                &f("disk"),
                "a guest has one virtio disk: `disk` or `test-disk`, not both",
            );
        }
        if let Some(other) = taken {
            return self.err(
                value.span(),
                &f("disk"),
                format!(
                    "guest '{}' already has a persistent disk; one guest may have one for now \
                     (the blk driver drives one virtio-blk device)",
                    other.guest
                ),
            );
        }
        if text.is_empty() {
            return self.err(value.span(), &f("disk"), "expected a file's path, not \"\"");
        }
        if let Some(name) = text.strip_prefix(PINNED_PREFIX) {
            return self.pinned_disk(g, f, value, name);
        }
        let path = self.base.join(text);
        let (size, create) = match ((self.size_of)(&path), &g.disk_size) {
            (Ok(size), _) => {
                check_disk_size(size).or_else(|why| {
                    self.err(
                        value.span(),
                        &f("disk"),
                        format!("{}: {why}", path.display()),
                    )
                })?;
                (size, false)
            }
            (Err(_), Some(size)) if !path.exists() => {
                check_disk_size(size.get_ref().0)
                    .or_else(|why| self.err(size.span(), &f("disk-size"), why))?;
                (size.get_ref().0, true)
            }
            (Err(why), _) => {
                let hint = if path.exists() {
                    String::new()
                } else {
                    "; to create it, give its size (`disk-size`, or --disk FILE:SIZE)".to_string()
                };
                return self.err(
                    value.span(),
                    &f("disk"),
                    format!("cannot use {}: {why}{hint}", path.display()),
                );
            }
        };
        Ok(Some(DiskPlan {
            guest: g.name.get_ref().clone(),
            path,
            size,
            create,
            template: None,
        }))
    }

    /// `disk = "pinned:debian.img"`: the Debian example's root disk, a
    /// copy of the pristine image made when missing (its size is the
    /// image's; before the first build, the recipe's).
    fn pinned_disk(
        &self,
        g: &GuestEntry,
        f: &dyn Fn(&str) -> String,
        value: &Spanned<String>,
        name: &str,
    ) -> Result<Option<DiskPlan>, ConfigError> {
        if name != DEBIAN_DISK {
            return self.err(
                value.span(),
                &f("disk"),
                format!("the pinned disk is \"{PINNED_PREFIX}{DEBIAN_DISK}\", not \"{name}\""),
            );
        }
        if let Some(size) = &g.disk_size {
            return self.err(
                size.span(),
                &f("disk-size"),
                "the pinned Debian disk has its image's size (guests/debian/recipe.toml)",
            );
        }
        let (path, _) = pinned_path(DEBIAN_DISK);
        let template = path.with_file_name(debian::ROOTFS);
        let (size, create) = match (self.size_of)(&path) {
            Ok(size) => (size, false),
            Err(_) => ((self.size_of)(&template).unwrap_or(1 << 30), true),
        };
        check_disk_size(size).or_else(|why| {
            self.err(
                value.span(),
                &f("disk"),
                format!("{}: {why}", path.display()),
            )
        })?;
        Ok(Some(DiskPlan {
            guest: g.name.get_ref().clone(),
            path,
            size,
            create,
            template: Some(template),
        }))
    }

    fn page_size(
        &self,
        size: Option<&Spanned<Size>>,
        default: u64,
        field: &str,
    ) -> Result<u64, ConfigError> {
        match size {
            None => Ok(default),
            Some(s) if s.get_ref().0.is_multiple_of(4096) && s.get_ref().0 <= 1 << 30 => {
                Ok(s.get_ref().0)
            }
            Some(s) => self.err(
                s.span(),
                field,
                format!(
                    "expected a multiple of 4K up to 1G, not {} bytes",
                    s.get_ref().0
                ),
            ),
        }
    }

    fn selector(&self, n: usize, span: Range<usize>, field: &str) -> Result<u64, ConfigError> {
        let sel = FIRST_USE_SELECTOR + n as u64;
        if sel > LAST_USE_SELECTOR {
            return self.err(
                span,
                field,
                format!(
                    "at most {} services per component",
                    LAST_USE_SELECTOR - FIRST_USE_SELECTOR + 1
                ),
            );
        }
        Ok(sel)
    }

    fn check_args(&self, args: &Spanned<String>, field: &str) -> Result<(), ConfigError> {
        let text = args.get_ref();
        if text.contains(['\n', '\r', '#']) || text.len() > ARGS_MAX {
            return self.err(
                args.span(),
                field,
                format!("expected words on one line, without '#', at most {ARGS_MAX} bytes"),
            );
        }
        Ok(())
    }
}

/// What `/init` must know about the test disk (computed once: the image
/// is 1 MiB of generated bytes).
fn test_disk_args() -> &'static [String; 2] {
    static ARGS: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
    ARGS.get_or_init(|| linux::TestDisk::for_image(&linux::test_disk_image()).kernel_args())
}

/// The module for a guest file: its own name if free (one module for
/// guests that share a file), else `KIND-GUEST_INDEX`.
fn file_module(files: &mut Vec<PlannedModule>, path: &Path, kind: &str, guest: usize) -> String {
    let source = ModuleSource::File(path.to_path_buf());
    if let Some(m) = files.iter().find(|m| m.source == source) {
        return m.name.clone();
    }
    let base = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let reserved = [crate::manifests::MANIFEST_MODULE, "disk.img"];
    let taken = |name: &str| {
        files.iter().any(|m| m.name == name)
            || reserved.contains(&name)
            || USER_TASKS.iter().any(|t| t.binary == name)
            || name.ends_with(".cmdline")
            || name.ends_with(".mods")
    };
    let name = if name_ok(base, MODULE_NAME_MAX) && !taken(base) {
        base.to_string()
    } else {
        format!("{kind}-{guest}")
    };
    files.push(PlannedModule {
        name: name.clone(),
        source,
    });
    name
}

/// The size of a file, for [`load`].
pub fn file_size(path: &Path) -> Result<u64, String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(m.len()),
        Ok(_) => Err("not a file".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// [`load`] with the files' real sizes; when the configuration names the
/// pinned Linux guest, that is built first (`cargo xtask linux build`),
/// so that its sizes count.
pub fn load_pinned_aware(path: &Path, overrides: &GuestOverride) -> crate::Result<Plan> {
    let plan = load(path, overrides, &file_size)?;
    if !build_pinned(&plan)? {
        return Ok(plan);
    }
    load(path, overrides, &file_size)
}

/// Builds the pinned files the plan names (the Linux guest, the Debian
/// example); whether there were any.
pub fn build_pinned(plan: &Plan) -> crate::Result<bool> {
    if plan.uses_pinned_debian {
        debian::build()?;
    } else if plan.uses_pinned_linux {
        linux::build()?;
    }
    for name in &plan.other_kernels {
        linux::build_other(name)?;
    }
    Ok(plan.uses_pinned_linux || plan.uses_pinned_debian)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every guest file is 8 MiB here, except names with `missing`.
    fn fake_size(path: &Path) -> Result<u64, String> {
        if path.to_string_lossy().contains("missing") {
            Err("No such file or directory (os error 2)".into())
        } else {
            Ok(8 << 20)
        }
    }

    fn plan(text: &str) -> Result<Plan, ConfigError> {
        plan_with(text, &GuestOverride::default())
    }

    fn plan_with(text: &str, overrides: &GuestOverride) -> Result<Plan, ConfigError> {
        let source = Source {
            name: "test.toml",
            text,
        };
        plan_text(&source, Path::new("/cfg"), overrides, &fake_size)
    }

    /// The error's location, field and message, for matching.
    fn error(text: &str) -> (usize, usize, String, String) {
        let e = plan(text).expect_err("the configuration should be refused");
        assert_eq!(e.file, "test.toml");
        (e.line, e.column, e.field, e.message)
    }

    const GUEST: &str = "[[guest]]\nname = \"g\"\nkernel = \"bzImage\"\ninitrd = \"initrd.cpio\"\n";

    fn example(name: &str) -> String {
        let path = crate::util::workspace_root().join("examples").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn example_plan(name: &str, overrides: &GuestOverride) -> Plan {
        let text = example(name);
        let source = Source { name, text: &text };
        plan_text(&source, Path::new("/examples"), overrides, &fake_size)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn root_parse(manifest: &str) -> moat_roottask::manifest::Manifest {
        moat_roottask::manifest::parse(manifest).unwrap_or_else(|e| panic!("{e}\n{manifest}"))
    }

    #[test]
    fn every_example_parses_and_the_root_task_accepts_its_manifest() {
        let dir = crate::util::workspace_root().join("examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let plan = example_plan(&name, &GuestOverride::default());
            root_parse(&plan.manifest);
            assert_eq!(plan.modules[0].name, "roottask", "{name}");
            assert_eq!(plan.modules[1].name, "manifest", "{name}");
            assert!(plan.memory_mib >= 1024, "{name}");
            seen += 1;
        }
        assert!(seen >= 2, "examples/ has default.toml and two-guests.toml");
    }

    #[test]
    fn the_debian_example_boots_its_root_disk_through_the_block_service() {
        let debian = example_plan("debian.toml", &GuestOverride::default());
        let plan_of = plan;
        let plan = debian;
        assert!(plan.uses_pinned_linux && plan.uses_pinned_debian);
        let disk = plan.disk.as_ref().expect("a persistent disk");
        assert_eq!(disk.guest, "debian");
        assert!(disk.path.ends_with("target/debian/disk.img"), "{disk:?}");
        let template = disk.template.as_ref().expect("copied from the image");
        assert!(
            template.ends_with("target/debian/rootfs.ext4"),
            "{template:?}"
        );
        let m = root_parse(&plan.manifest);
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["clock", "debian", "blk"]);
        // The disk is not copied into the VMM's heap: 512 MiB of RAM and
        // the base heap, whatever the disk's size.
        let vmm = &plan.manifest[plan.manifest.find("component debian").unwrap()..];
        let vmm = &vmm[..vmm.find("component blk").unwrap()];
        assert!(vmm.contains("    ram guest 512M at "), "{vmm}");
        assert!(vmm.contains("    ram heap 16M at "), "{vmm}");
        assert!(vmm.contains(" blk=c0"), "{vmm}");
        let ModuleSource::Text(line) = &plan.modules.last().unwrap().source else {
            panic!("no command line");
        };
        assert_eq!(line, "console=ttyS0 root=/dev/vda rw panic=-1\n");
        assert!(plan.modules.iter().any(|m| m.source
            == ModuleSource::File(
                crate::util::workspace_root().join("target/debian/initrd.cpio")
            )));
        // A size for the pinned disk is refused: it is the image's.
        let text = example("debian.toml").replace(
            "disk = \"pinned:debian.img\"",
            "disk = \"pinned:debian.img\"\ndisk-size = \"2G\"",
        );
        let e = plan_of(&text).unwrap_err();
        assert_eq!(e.field, "guest[0].disk-size", "{e}");
        let e = plan_of(&example("debian.toml").replace("pinned:debian.img", "pinned:x.img"))
            .unwrap_err();
        assert!(
            e.message
                .contains("the pinned disk is \"pinned:debian.img\""),
            "{e}"
        );
    }

    #[test]
    fn a_multiboot_guest_takes_modules_and_debug_exit() {
        let plan = example_plan("mbtest.toml", &GuestOverride::default());
        let m = root_parse(&plan.manifest);
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mbtest"], "a fixed epoch: no clock");
        let vmm = &plan.manifest[plan.manifest.find("component mbtest").unwrap()..];
        for want in [
            "    file kernel mbtest at ",
            "    file mod1 module-one.txt at ",
            "    file mod2 module-two.txt at ",
            "    file modcmdlines mbtest.mods at ",
            "    ram guest 16M at ",
            " debug-exit",
        ] {
            assert!(vmm.contains(want), "{want} in {vmm}");
        }
        assert!(!vmm.contains("file initrd"), "{vmm}");
        assert!(plan
            .modules
            .iter()
            .any(|m| m.name == "mbtest" && m.source == ModuleSource::Task("mbtest".into())));
        assert!(plan.modules.iter().any(|m| m.name == "mbtest.mods"
            && m.source == ModuleSource::Text("mod-one first\nmod-two second=2\n".into())));
        assert!(!plan.uses_pinned_linux && !plan.uses_pinned_debian);
    }

    #[test]
    fn modules_and_an_initrd_do_not_mix_and_are_checked() {
        let both = format!("{DISK_GUEST}modules = [{{ file = \"m\" }}]\n");
        let e = plan(&both).unwrap_err();
        assert_eq!(e.field, "guest[0].modules", "{e}");
        assert!(e.message.contains("not both"), "{e}");
        let guest = "[[guest]]\nname = \"g\"\nkernel = \"k\"\n";
        let unknown = format!("{guest}modules = [{{ file = \"m\", cmd = \"x\" }}]\n");
        assert!(plan(&unknown)
            .unwrap_err()
            .message
            .contains("unknown field `cmd`"));
        let missing = format!("{guest}modules = [{{ file = \"missing.txt\" }}]\n");
        let e = plan(&missing).unwrap_err();
        assert_eq!(e.field, "guest[0].modules[0].file", "{e}");
        let two_lines = format!("{guest}modules = [{{ file = \"m\", cmdline = \"a\\nb\" }}]\n");
        let e = plan(&two_lines).unwrap_err();
        assert_eq!(e.field, "guest[0].modules[0].cmdline", "{e}");
        // No initrd and no modules: a kernel alone (as QEMU's -kernel).
        let plan = plan(&format!("{guest}debug-exit = true\n")).unwrap();
        assert!(
            plan.manifest.contains("    args clock=20 debug-exit\n"),
            "{}",
            plan.manifest
        );
    }

    #[test]
    fn the_default_example_is_the_system_run_always_booted() {
        let plan = example_plan("default.toml", &GuestOverride::default());
        let m = root_parse(&plan.manifest);
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["echo", "modem", "clock", "linux"]);
        let linux = &m.components[3];
        assert_eq!(linux.module, "vmm");
        assert_eq!((linux.priority, linux.ceiling), (10, 30));
        assert_eq!(linux.restart.max_restarts, 0);
        // The guest's portals at the selectors its command line names.
        let uses: Vec<_> = linux
            .uses
            .iter()
            .map(|u| (u.name.as_str(), u.selector))
            .collect();
        assert_eq!(uses, [("echo", 20), ("modem", 21), ("clock", 22)]);
        assert_eq!(
            linux.args.as_deref(),
            Some("console-input modem=21 clock=22 vm-portals=20 user-hypercalls")
        );
        // The machine's clock: the rtc driver with the CMOS ports.
        let clock = &m.components[2];
        assert_eq!(clock.module, "rtc");
        assert_eq!(clock.provides.as_deref(), Some("clock"));
        assert_eq!(clock.args.as_deref(), Some("serve"));
        assert_eq!(
            (clock.ioports[0].first, clock.ioports[0].last),
            (0x70, 0x71)
        );
        let mappings: Vec<_> = linux
            .mappings
            .iter()
            .map(|m| (m.name.as_str(), m.address))
            .collect();
        assert_eq!(
            mappings,
            [
                ("guest", 0x100_0000_0000),
                ("heap", 0x200_0000_0000),
                ("kernel", 0x300_0000_0000),
                ("initrd", 0x400_0000_0000),
                ("disk", 0x500_0000_0000),
                ("cmdline", 0x600_0000_0000),
            ]
        );
        use moat_roottask::manifest::MappingSource;
        assert_eq!(linux.mappings[0].source, MappingSource::Ram(256 << 20));
        // 16 MiB and the disk's copy.
        assert_eq!(linux.mappings[1].source, MappingSource::Ram(17 << 20));
        assert!(linux.quota >= 32 << 20);
        // COM1 goes to the console guest.
        assert_eq!(linux.ioports.len(), 1);
        assert_eq!(
            (linux.ioports[0].first, linux.ioports[0].last),
            (0x3f8, 0x3ff)
        );
        assert_eq!(linux.irqs, [4, 255]);
        let modem = &m.components[1];
        assert_eq!(modem.priority, 40);
        assert_eq!(modem.args.as_deref(), Some("report_every=10000"));
        assert_eq!(modem.provides.as_deref(), Some("modem"));

        let names: Vec<_> = plan.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "roottask",
                "manifest",
                "echo",
                "modem",
                "rtc",
                "vmm",
                "bzImage",
                "initramfs.cpio",
                "disk.img",
                "linux.cmdline"
            ]
        );
        let root = crate::util::workspace_root();
        assert_eq!(
            plan.modules[6].source,
            ModuleSource::File(root.join("target/linux/bzImage"))
        );
        assert!(plan.uses_pinned_linux);
        let ModuleSource::Text(cmdline) = &plan.modules[9].source else {
            panic!("the command line is written by xtask");
        };
        let disk = linux::TestDisk::for_image(&linux::test_disk_image());
        assert_eq!(
            *cmdline,
            format!(
                "console=ttyS0 panic=-1 moat.modem=1 moat.ipc=20 moat.shell=1 {}\n",
                disk.kernel_args().join(" ")
            )
        );
        // The guest's 256 MiB and its heap fit the pool, the pool three
        // quarters of the 1 GiB machine the Linux tests always had.
        assert!(
            plan.pool_mib >= 256 + 17 + 2 && plan.pool_mib <= 768,
            "{}",
            plan.pool_mib
        );
        assert_eq!((plan.memory_mib, plan.cpus), (1024, 1));
        assert_eq!(plan.kernel_args(), [format!("pool={}", plan.pool_mib)]);
    }

    #[test]
    fn the_quick_form_with_the_pinned_guest_is_the_default() {
        let root = crate::util::workspace_root();
        let quick = GuestOverride {
            kernel: Some(
                root.join("target/linux/bzImage")
                    .to_string_lossy()
                    .into_owned(),
            ),
            initrd: Some(
                root.join("target/linux/initramfs.cpio")
                    .to_string_lossy()
                    .into_owned(),
            ),
            append: Some("console=ttyS0 panic=-1 moat.modem=1 moat.ipc=20 moat.shell=1".into()),
            memory: Some(Size(256 << 20)),
            vcpus: Some(1),
            disk: None,
            cpus: None,
            hostfwd: Vec::new(),
        };
        assert_eq!(
            example_plan("default.toml", &quick),
            Plan {
                // The files are the user's now, not the pinned names.
                uses_pinned_linux: false,
                ..example_plan("default.toml", &GuestOverride::default())
            }
        );
        // What the quick form changes.
        let other = GuestOverride {
            kernel: Some("/home/u/vmlinuz".into()),
            append: Some("console=ttyS0 quiet".into()),
            memory: Some(Size(512 << 20)),
            ..GuestOverride::default()
        };
        let plan = example_plan("default.toml", &other);
        let m = root_parse(&plan.manifest);
        assert!(plan.manifest.contains("ram guest 512M at"));
        assert!(plan.manifest.contains("file kernel vmlinuz at"));
        assert!(plan
            .modules
            .iter()
            .any(|m| m.source == ModuleSource::File("/home/u/vmlinuz".into())));
        assert_eq!(m.components.len(), 4);
        let ModuleSource::Text(line) = &plan.modules.last().unwrap().source else {
            panic!("no command line");
        };
        assert!(line.starts_with("console=ttyS0 quiet moat.disk_sum="));
        let many = GuestOverride {
            vcpus: Some(33),
            ..GuestOverride::default()
        };
        let e = plan_with(&example("default.toml"), &many).unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.field.as_str()),
            ("command line", 0, "guest[0].vcpus")
        );
        assert!(e.message.contains("expected 1 to 32 vCPUs"), "{e}");
        let two = GuestOverride {
            vcpus: Some(2),
            ..GuestOverride::default()
        };
        let plan = plan_with(&example("default.toml"), &two).unwrap();
        assert!(
            plan.manifest
                .contains("vcpus=2 vcpu-cpus=0 vcpu-priority=10"),
            "{}",
            plan.manifest
        );
    }

    const DISK_GUEST: &str = "[[guest]]\nname = \"g\"\nkernel = \"bz\"\ninitrd = \"rd\"\n";

    #[test]
    fn a_persistent_disk_brings_the_block_service() {
        let plan = plan(&format!("{DISK_GUEST}disk = \"g.img\"\n")).unwrap();
        let m = root_parse(&plan.manifest);
        assert_eq!(
            plan.disk,
            Some(DiskPlan {
                guest: "g".into(),
                path: "/cfg/g.img".into(),
                size: 8 << 20,
                create: false,
                template: None,
            })
        );
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["clock", "g", "blk"]);
        let vmm = &plan.manifest[plan.manifest.find("component g").unwrap()..];
        let vmm = &vmm[..vmm.find("component blk").unwrap()];
        assert!(vmm.contains("    shared c0 1028K at "), "{vmm}");
        assert!(vmm.contains(" blk=c0"), "{vmm}");
        let blk = &plan.manifest[plan.manifest.find("component blk").unwrap()..];
        for line in [
            "    pci dev 1af4:1042 at ",
            "    dma dma 1040K at ",
            "    shared c0 1028K at ",
            "    args c0.disk=0,16384\n",
            "semaphore blkreq up g at 30 down blk at 30\n",
            "semaphore blkanswer up blk at 31 down g at 31\n",
        ] {
            assert!(blk.contains(line), "{line} in {blk}");
        }
        assert!(plan.modules.iter().any(|m| m.name == "blk"));
        assert!(!plan.modules.iter().any(|m| m.name == "disk.img"));
        assert_eq!(
            plan.disk.unwrap().qemu_args()[..4],
            [
                "-machine",
                "q35",
                "-drive",
                "if=none,file=/cfg/g.img,format=raw,id=d0"
            ]
        );

        // A missing file is created with `disk-size`.
        let created = super::tests::plan(&format!(
            "{DISK_GUEST}disk = \"missing.img\"\ndisk-size = \"64M\"\n"
        ))
        .unwrap();
        let disk = created.disk.unwrap();
        assert_eq!((disk.size, disk.create), (64 << 20, true));
        assert!(created.manifest.contains("args c0.disk=0,131072\n"));
    }

    #[test]
    fn bad_disks_are_errors() {
        for (more, field, message) in [
            (
                "disk = \"missing.img\"\n",
                "guest[0].disk",
                "to create it, give its size",
            ),
            (
                "disk = \"missing.img\"\ndisk-size = \"512K\"\n",
                "guest[0].disk-size",
                "524288 bytes is too small: a disk has at least 1M",
            ),
            (
                "disk-size = \"1G\"\n",
                "guest[0].disk-size",
                "name the disk",
            ),
            ("disk = \"\"\n", "guest[0].disk", "expected a file's path"),
            (
                "disk = \"g.img\"\ntest-disk = true\n",
                "guest[0].disk",
                "`disk` or `test-disk`, not both",
            ),
            (
                "disk = \"g.img\"\n[[guest]]\nname = \"h\"\nkernel = \"bz\"\ninitrd = \"rd\"\n\
                 disk = \"h.img\"\n",
                "guest[1].disk",
                "guest 'g' already has a persistent disk",
            ),
            (
                "disk = \"g.img\"\n[[component]]\nname = \"blk\"\nmodule = \"echo\"\n",
                "component[0].name",
                "'blk' is the name of the block service",
            ),
        ] {
            let (_, _, got_field, got) = error(&format!("{DISK_GUEST}{more}"));
            assert_eq!(got_field, field, "{more}");
            assert!(got.contains(message), "{more}: {got}");
        }
    }

    #[test]
    fn hostfwd_brings_the_virtual_switch() {
        let plan = plan(&format!(
            "{DISK_GUEST}hostfwd = [\"8080:80\", \"2222:22\"]\ndisk = \"g.img\"\n"
        ))
        .unwrap();
        let m = root_parse(&plan.manifest);
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["clock", "g", "blk", "net"]);
        let net = plan.net.clone().unwrap();
        assert_eq!(net.ports.len(), 1);
        let port = &net.ports[0];
        assert_eq!(port.guest, "g");
        assert_eq!(port.mac, "52:54:00:12:34:56");
        assert_eq!(port.address.to_string(), "10.0.2.15");
        assert_eq!(
            port.forwards,
            [
                crate::net::Forward {
                    host: 8080,
                    guest: 80
                },
                crate::net::Forward {
                    host: 2222,
                    guest: 22
                }
            ]
        );
        let vmm = &plan.manifest[plan.manifest.find("component g").unwrap()..];
        let vmm = &vmm[..vmm.find("component blk").unwrap()];
        assert!(vmm.contains("    shared n0 132K at "), "{vmm}");
        assert!(
            vmm.contains(" blk=c0 net=n0 mac=52:54:00:12:34:56"),
            "{vmm}"
        );
        let switch = &plan.manifest[plan.manifest.find("component net").unwrap()..];
        for line in [
            "    pci dev 1af4:1041 at ",
            "    dma dma 136K at ",
            "    shared n0 132K at ",
            "    args n0.mac=52:54:00:12:34:56\n",
            "    restart 5 backoff 10ms\n",
            "semaphore netswitch updown net at 30 up g at 32\n",
            "semaphore netport0 up net at 31 down g at 33\n",
        ] {
            assert!(switch.contains(line), "{line} in {switch}");
        }
        assert!(plan.modules.iter().any(|m| m.name == "net"));
        // The disk's QEMU arguments, then the network's.
        let image = crate::image::boot_spec_devices(&plan);
        assert!(image
            .contains(&"virtio-blk-pci,drive=d0,disable-legacy=on,disable-modern=off".to_string()));
        assert!(image.contains(
            &"user,id=n0,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,\
              hostfwd=tcp:127.0.0.1:2222-10.0.2.15:22"
                .to_string()
        ));
        // An empty list: the switch and the uplink, nothing forwarded.
        let plan = super::tests::plan(&format!("{DISK_GUEST}hostfwd = []\n")).unwrap();
        assert!(plan.net.unwrap().ports[0].forwards.is_empty());
        assert!(plan.manifest.contains("component net\n"));
        assert!(super::tests::plan(DISK_GUEST).unwrap().net.is_none());
    }

    #[test]
    fn each_guest_with_hostfwd_has_its_own_port() {
        let two = format!(
            "{DISK_GUEST}hostfwd = [\"8080:80\"]\n[[guest]]\nname = \"h\"\nkernel = \"bz\"\n\
             initrd = \"rd\"\nhostfwd = [\"2222:22\"]\n"
        );
        let planned = plan(&two).unwrap();
        let plan_of = plan;
        let plan = planned;
        let m = root_parse(&plan.manifest);
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["clock", "g", "h", "net"]);
        let ports = &plan.net.as_ref().unwrap().ports;
        let seen: Vec<_> = ports
            .iter()
            .map(|p| {
                (
                    p.guest.as_str(),
                    p.index,
                    p.mac.as_str(),
                    p.address.to_string(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("g", 0, "52:54:00:12:34:56", "10.0.2.15".to_string()),
                ("h", 1, "52:54:00:12:34:57", "10.0.2.16".to_string()),
            ]
        );
        let h = &plan.manifest[plan.manifest.find("component h").unwrap()..];
        let h = &h[..h.find("component net").unwrap()];
        assert!(h.contains("    shared n1 132K at "), "{h}");
        assert!(h.contains(" net=n1 mac=52:54:00:12:34:57"), "{h}");
        let switch = &plan.manifest[plan.manifest.find("component net").unwrap()..];
        for line in [
            "    shared n0 132K at 0x10000000000\n",
            "    shared n1 132K at 0x11000000000\n",
            "    args n0.mac=52:54:00:12:34:56 n1.mac=52:54:00:12:34:57\n",
            "semaphore netswitch updown net at 30 up g at 32 up h at 32\n",
            "semaphore netport0 up net at 31 down g at 33\n",
            "semaphore netport1 up net at 32 down h at 33\n",
        ] {
            assert!(switch.contains(line), "{line} in {switch}");
        }
        // The root task's parser agrees: both guests are the switch's
        // clients, so it stops when both are done.
        let net = names.iter().position(|&n| n == "net").unwrap();
        assert!(m.serves(net, 1) && m.serves(net, 2));
        assert_eq!(
            crate::image::boot_spec_devices(&plan)[3],
            "user,id=n0,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,\
             hostfwd=tcp:127.0.0.1:2222-10.0.2.16:22"
        );
        // Seven guests have ports; an eighth is refused.
        let mut eight = String::new();
        for i in 0..8 {
            eight += &format!(
                "[[guest]]\nname = \"g{i}\"\nkernel = \"bz\"\ninitrd = \"rd\"\nhostfwd = []\n\
                 memory = \"64M\"\n"
            );
        }
        let (_, _, field, message) = error(&eight);
        assert_eq!(field, "guest[7].hostfwd");
        assert!(message.contains("7 ports for guests"), "{message}");
        assert!(plan_of(&eight.replacen("hostfwd = []\n", "", 1)).is_ok());
    }

    #[test]
    fn bad_hostfwds_are_errors() {
        for (more, field, message) in [
            (
                "hostfwd = [\"8080\"]\n",
                "guest[0].hostfwd",
                "expected HOST_PORT:GUEST_PORT",
            ),
            ("hostfwd = [\"0:80\"]\n", "guest[0].hostfwd", "port 0"),
            (
                "hostfwd = [\"99999:80\"]\n",
                "guest[0].hostfwd",
                "above 65535",
            ),
            (
                "hostfwd = [\"8080:80\", \"8080:81\"]\n",
                "guest[0].hostfwd",
                "host port 8080 forwarded twice",
            ),
            (
                "hostfwd = \"8080:80\"\n",
                "guest[0].hostfwd",
                "invalid type",
            ),
            (
                "hostfwd = [\"8080:80\"]\n[[guest]]\nname = \"h\"\nkernel = \"bz\"\n\
                 initrd = \"rd\"\nhostfwd = [\"8080:22\"]\n",
                "guest[1].hostfwd",
                "host port 8080 is forwarded to guest 'g' already",
            ),
            (
                "hostfwd = []\n[[component]]\nname = \"net\"\nmodule = \"echo\"\n",
                "component[0].name",
                "'net' is the name of the virtual switch",
            ),
        ] {
            let (_, _, got_field, got) = error(&format!("{DISK_GUEST}{more}"));
            assert_eq!(got_field, field, "{more}");
            assert!(got.contains(message), "{more}: {got}");
        }
    }

    #[test]
    fn the_quick_form_hostfwd_gives_the_console_guest_the_network() {
        let quick = GuestOverride {
            hostfwd: vec![crate::net::parse_forward("18080:80").unwrap()],
            ..GuestOverride::default()
        };
        let plan = example_plan("default.toml", &quick);
        root_parse(&plan.manifest);
        assert!(plan.manifest.contains("component net\n"));
        let net = plan.net.unwrap();
        assert_eq!(net.ports[0].guest, "linux");
        assert_eq!(net.ports[0].forwards[0].host, 18080);
    }

    #[test]
    fn the_quick_form_disk_replaces_the_test_disk() {
        let quick = GuestOverride {
            disk: Some(DiskOption::parse("/home/u/d.img:2G").unwrap()),
            ..GuestOverride::default()
        };
        let plan = example_plan("default.toml", &quick);
        root_parse(&plan.manifest);
        assert!(!plan.manifest.contains("file disk disk.img"));
        assert!(plan.manifest.contains("component blk\n"));
        let disk = plan.disk.unwrap();
        assert_eq!(disk.path, PathBuf::from("/home/u/d.img"));
        assert_eq!(disk.size, 8 << 20, "an existing file keeps its size");
        let ModuleSource::Text(line) = &plan.modules.last().unwrap().source else {
            panic!("no command line");
        };
        assert!(!line.contains("moat.disk_sum="), "{line}");

        let parse = |t: &str| DiskOption::parse(t).map(|d| (d.file, d.size.map(|s| s.0)));
        assert_eq!(parse("a.img"), Ok(("a.img".into(), None)));
        assert_eq!(parse("a.img:64M"), Ok(("a.img".into(), Some(64 << 20))));
        assert_eq!(parse("a:b.img"), Ok(("a:b.img".into(), None)));
        assert!(parse("a.img:64").is_err(), "a size needs its unit");
        assert!(parse(":64M").is_err());
    }

    #[test]
    fn a_disk_is_created_and_checked_before_the_boot() {
        let dir = std::env::temp_dir().join(format!("xtask-blkdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = |name: &str, create: bool| DiskPlan {
            guest: "g".into(),
            path: dir.join(name),
            size: 4 << 20,
            create,
            template: None,
        };
        disk("new.img", true).prepare().unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("new.img")).unwrap().len(),
            4 << 20
        );
        // Kept as it is the next time.
        std::fs::write(dir.join("new.img"), vec![7u8; 2 << 20]).unwrap();
        disk("new.img", false).prepare().unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("new.img")).unwrap().len(),
            2 << 20
        );
        std::fs::write(dir.join("small.img"), [0u8; 4096]).unwrap();
        let e = disk("small.img", false).prepare().unwrap_err();
        assert!(e.contains("4096 bytes is too small"), "{e}");
        std::fs::create_dir_all(dir.join("a-dir")).unwrap();
        let e = disk("a-dir", false).prepare().unwrap_err();
        assert!(e.starts_with("guest 'g': cannot write the disk "), "{e}");
        let e = disk("no/such/dir.img", true).prepare().unwrap_err();
        assert!(e.contains("cannot write the disk"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_pinned_disk_is_a_copy_of_its_image_made_once() {
        let dir = std::env::temp_dir().join(format!("xtask-pinneddisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("rootfs.ext4");
        let mut bytes = vec![0u8; 2 << 20];
        bytes[..4].copy_from_slice(b"ext4");
        std::fs::write(&image, &bytes).unwrap();
        let disk = DiskPlan {
            guest: "debian".into(),
            path: dir.join("disk.img"),
            size: 2 << 20,
            create: true,
            template: Some(image.clone()),
        };
        disk.prepare().unwrap();
        assert_eq!(std::fs::read(&disk.path).unwrap(), bytes);
        // What the guest wrote is kept: an existing disk is not copied again.
        std::fs::write(&disk.path, vec![7u8; 2 << 20]).unwrap();
        disk.prepare().unwrap();
        assert_eq!(std::fs::read(&disk.path).unwrap()[0], 7);
        // Without its image (not built), a clear error.
        let missing = DiskPlan {
            path: dir.join("other.img"),
            template: Some(dir.join("missing.ext4")),
            ..disk
        };
        let e = missing.prepare().unwrap_err();
        assert!(e.contains("cannot make the disk"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_guests_each_get_a_vmm_and_share_the_files() {
        let plan = example_plan("two-guests.toml", &GuestOverride::default());
        let m = root_parse(&plan.manifest);
        let vmms: Vec<_> = m
            .components
            .iter()
            .filter(|c| c.module == "vmm")
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(vmms, ["linux", "second"]);
        // One copy of the kernel, initramfs, disk and VMM; a command line each.
        let names: Vec<_> = plan.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "roottask",
                "manifest",
                "echo",
                "rtc",
                "vmm",
                "bzImage",
                "initramfs.cpio",
                "disk.img",
                "linux.cmdline",
                "second.cmdline"
            ]
        );
        // One clock for both.
        assert_eq!(m.components[1].name, "clock");
        for guest in &m.components[2..] {
            assert!(guest.args.as_deref().unwrap().contains("clock=21"));
        }
        // Only the console guest gets COM1 (and the debug event, GSI 255).
        assert_eq!(m.components[2].irqs, [4, 255]);
        assert!(m.components[3].irqs.is_empty());
        assert!(m.components[3]
            .args
            .as_deref()
            .unwrap()
            .contains("vm-portals=20"));
        assert!(!m.components[3]
            .args
            .as_deref()
            .unwrap()
            .contains("console-input"));
        assert!(plan.pool_mib >= 2 * (256 + 17) - 64, "{}", plan.pool_mib);
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let (line, column, field, message) = error(&format!("{GUEST}kernal = \"x\"\n"));
        assert_eq!((line, column, field.as_str()), (5, 1, "guest[0].kernal"));
        assert!(message.contains("unknown field `kernal`"), "{message}");
        assert!(message.contains("expected one of"), "{message}");
        let (line, _, field, _) = error("[machine]\nram = \"1G\"\n");
        assert_eq!((line, field.as_str()), (2, "machine.ram"));
        let (line, _, field, message) = error("[[guests]]\nname = \"x\"\n");
        assert_eq!((line, field.as_str()), (1, "guests[0]"));
        assert!(message.contains("unknown field `guests`"), "{message}");
    }

    #[test]
    fn a_wrong_type_is_an_error_saying_what_was_expected() {
        let (line, column, field, message) = error(&format!("{GUEST}memory = 256\n"));
        assert_eq!((line, column, field.as_str()), (5, 10, "guest[0].memory"));
        assert_eq!(
            message,
            format!("invalid type: integer `256`, expected {SIZE_EXPECTED}")
        );
        let (line, _, field, message) = error(&format!("{GUEST}vcpus = \"one\"\n"));
        assert_eq!((line, field.as_str()), (5, "guest[0].vcpus"));
        assert!(message.contains("expected u32"), "{message}");
        let (_, _, field, message) = error(&format!("{GUEST}console = \"yes\"\n"));
        assert_eq!(field, "guest[0].console");
        assert!(message.contains("expected a boolean"), "{message}");
        let (_, _, field, message) = error(&format!("{GUEST}on-panic = \"reboot\"\n"));
        assert_eq!(field, "guest[0].on-panic");
        assert!(
            message.contains("unknown variant `reboot`, expected `stop` or `restart`"),
            "{message}"
        );
        let (line, _, _, message) = error("[[guest]\n");
        assert_eq!(line, 1);
        assert!(!message.is_empty());
    }

    #[test]
    fn a_guest_without_a_kernel_is_an_error() {
        let (line, _, field, message) = error("[[guest]]\nname = \"g\"\ninitrd = \"i\"\n");
        assert_eq!((line, field.as_str()), (1, "guest[0]"));
        assert_eq!(message, "missing field `kernel`");
        let (line, _, field, message) = error(&GUEST.replace("bzImage", "missing-bzImage"));
        assert_eq!((line, field.as_str()), (3, "guest[0].kernel"));
        assert!(
            message.starts_with("cannot use /cfg/missing-bzImage: No such file"),
            "{message}"
        );
        let (_, _, field, message) = error(&GUEST.replace("\"bzImage\"", "\"pinned:vmlinuz\""));
        assert_eq!(field, "guest[0].kernel");
        assert!(
            message.contains("the pinned guest has no file \"vmlinuz\""),
            "{message}"
        );
    }

    /// `pinned:NAME/bzImage` and `pinned:NAME/initramfs.cpio`: the other
    /// kernels of guests/linux/recipe.toml, each built when named.
    #[test]
    fn other_kernels_are_pinned_by_name() {
        let text = GUEST
            .replace("\"bzImage\"", "\"pinned:6.12/bzImage\"")
            .replace("\"initrd.cpio\"", "\"pinned:6.12/initramfs.cpio\"");
        let plan = plan(&text).unwrap();
        assert_eq!(plan.other_kernels, ["6.12"]);
        assert!(plan.uses_pinned_linux);
        let dir = crate::util::workspace_root().join("target/linux/kernels/6.12");
        for file in ["bzImage", "initramfs.cpio"] {
            let source = ModuleSource::File(dir.join(file));
            assert!(plan.modules.iter().any(|m| m.source == source), "{file}");
        }
        // Two guests, two other kernels and the pinned one.
        let two = format!(
            "{text}{}",
            GUEST
                .replace("\"g\"", "\"h\"")
                .replace("\"bzImage\"", "\"pinned:cloud/bzImage\"")
                .replace("\"initrd.cpio\"", "\"pinned:initramfs.cpio\"")
        );
        assert_eq!(
            plan_with(&two, &GuestOverride::default())
                .unwrap()
                .other_kernels,
            ["6.12", "cloud"]
        );
        assert!(plan_with(GUEST, &GuestOverride::default())
            .unwrap()
            .other_kernels
            .is_empty());

        let (line, _, field, message) =
            error(&GUEST.replace("\"bzImage\"", "\"pinned:5.10/bzImage\""));
        assert_eq!((line, field.as_str()), (3, "guest[0].kernel"));
        assert!(
            message.contains("has no other kernel \"5.10\" (it has: \"6.12\", \"cloud\")"),
            "{message}"
        );
        let (_, _, field, message) =
            error(&GUEST.replace("\"initrd.cpio\"", "\"pinned:cloud/initrd.img\""));
        assert_eq!(field, "guest[0].initrd");
        assert_eq!(
            message,
            "an other kernel's pinned files are \"pinned:cloud/bzImage\" and \
             \"pinned:cloud/initramfs.cpio\""
        );
    }

    #[test]
    fn two_guests_cannot_both_own_the_console() {
        let text = format!(
            "{GUEST}console = true\n{}console = true\n",
            GUEST.replace("\"g\"", "\"h\"")
        );
        let (line, column, field, message) = error(&text);
        assert_eq!((line, column, field.as_str()), (10, 11, "guest[1].console"));
        assert_eq!(
            message,
            "guest 'g' already owns the console; at most one guest may"
        );
    }

    #[test]
    fn memory_over_the_machines_is_an_error() {
        let (line, _, field, message) = error(&format!(
            "[machine]\nmemory = \"1G\"\n{GUEST}memory = \"1G\"\n"
        ));
        assert_eq!((line, field.as_str()), (2, "machine.memory"));
        assert!(
            message.starts_with("1024 MiB is too little: the guests and components need "),
            "{message}"
        );
        let (line, _, field, message) = error(&format!("{GUEST}memory = \"3G\"\n"));
        assert_eq!((line, field.as_str()), (5, "guest[0].memory"));
        assert!(
            message.contains("more than the 3072 MiB an emulated machine has"),
            "{message}"
        );
        let (_, _, field, message) = error(&format!("{GUEST}memory = \"8G\"\n"));
        assert_eq!(field, "guest[0].memory");
        assert!(
            message.contains("more than the machine's most, 3072 MiB"),
            "{message}"
        );
        // Without [machine], the machine grows with the guests.
        let plan = plan(&format!("{GUEST}memory = \"1G\"\n")).unwrap();
        assert!(
            plan.memory_mib >= 1024 + 512 && plan.memory_mib.is_multiple_of(256),
            "{}",
            plan.memory_mib
        );
    }

    #[test]
    fn bad_sizes_are_errors() {
        for (value, wanted) in [
            ("\"lots\"", "expected a size such as \"256M\""),
            ("\"256\"", "\"256\" has no unit"),
            ("\"0M\"", "not a usable size"),
            ("\"99999999999G\"", "not a usable size"),
            ("\"12M\"", "at least 16M"),
            ("\"255M\"", "a multiple of 2M"),
        ] {
            let (line, column, field, message) = error(&format!("{GUEST}memory = {value}\n"));
            assert_eq!(
                (line, column, field.as_str()),
                (5, 10, "guest[0].memory"),
                "{value}"
            );
            assert!(message.contains(wanted), "{value}: {message}");
        }
        let text = "[[component]]\nname = \"echo\"\nmemory = \"1000\"\n";
        assert!(error(text).3.contains("no unit"));
        let text = "[[component]]\nname = \"echo\"\nquota = \"6000K\"\nmemory = \"5K\"\n";
        let (line, _, field, message) = error(text);
        assert_eq!((line, field.as_str()), (4, "component[0].memory"));
        assert!(message.contains("multiple of 4K"), "{message}");
        assert_eq!(Size::parse("16 MiB"), Ok(Size(16 << 20)));
        assert_eq!(Size::parse("64K"), Ok(Size(64 << 10)));
        assert_eq!(manifest_size(17 << 20), "17M");
        assert_eq!(manifest_size(5000), "5000");
    }

    #[test]
    fn names_services_and_limits_are_checked() {
        let cases: &[(&str, &str, &str)] = &[
            ("[[component]]\nname = \"a b\"\n", "component[0].name", "expected 1 to 32 of"),
            (&format!("{GUEST}{}", GUEST), "guest[1].name", "\"g\" is already the name of guest[0]"),
            ("[[component]]\nname = \"x\"\nmodule = \"nosuch\"\n", "component[0].module", "no component module \"nosuch\" (xtask builds: echo"),
            ("[[component]]\nname = \"x\"\nmodule = \"vmm\"\n", "component[0].module", "the VMM is started for each [[guest]]"),
            ("[[component]]\nname = \"ping\"\nuses = [\"echo\"]\n", "component[0].uses", "no component provides \"echo\" (provided: nothing)"),
            ("[[component]]\nname = \"echo\"\nprovides = \"echo\"\nuses = [\"echo\"]\n", "component[0].uses", "cannot use its own service"),
            ("[[component]]\nname = \"echo\"\nprovides = \"e\"\n[[component]]\nname = \"ping\"\nprovides = \"e\"\n", "component[1].provides", "already provided by 'echo'"),
            ("[[component]]\nname = \"echo\"\ncpu = 1\n", "component[0].cpu", "no CPU 1"),
            ("[[component]]\nname = \"echo\"\npriority = 64\n", "component[0].priority", "from 0 to 63"),
            ("[[component]]\nname = \"echo\"\nargs = \"a # b\"\n", "component[0].args", "without '#'"),
            ("[[component]]\nname = \"echo\"\nrestart = 5000\n", "component[0].restart", "at most 1000"),
            (&format!("{GUEST}priority = 30\n"), "guest[0].priority", "from 1 to 24"),
            (&format!("{GUEST}calls = [\"echo\"]\n"), "guest[0].calls", "no component provides \"echo\""),
            (&format!("{GUEST}modem = \"modem\"\n"), "guest[0].modem", "no component provides \"modem\""),
            (&format!("{GUEST}vcpus = 0\n"), "guest[0].vcpus", "expected 1 to 32 vCPUs, not 0"),
            (&format!("{GUEST}vcpus = 2\nvcpu-cpus = [0]\n"), "guest[0].vcpu-cpus", "one CPU per vCPU (2), not 1"),
            (&format!("{GUEST}vcpus = 2\nvcpu-cpus = [0, 1]\n"), "guest[0].vcpu-cpus", "no CPU 1"),
            (&format!("[[component]]\nname = \"clock\"\nmodule = \"echo\"\n{GUEST}"), "component[0].name", "the name of the machine's clock"),
            ("[machine]\ncpus = 0\n[[component]]\nname = \"echo\"\n", "machine.cpus", "expected 1 to 64 CPUs"),
            ("", "", "nothing to boot"),
        ];
        for (text, field, wanted) in cases {
            let e = plan(text).expect_err(text);
            assert_eq!(e.field, *field, "{text}: {e}");
            assert!(e.message.contains(wanted), "{text}: {e}");
        }
    }

    #[test]
    fn vcpus_spread_over_the_cpus_or_go_where_named() {
        // The guest's VMM, `g` (beside the machine's clock).
        fn vmm(m: &moat_roottask::manifest::Manifest) -> &moat_roottask::manifest::Component {
            m.components.iter().find(|c| c.name == "g").unwrap()
        }
        let default = plan(&format!("[machine]\ncpus = 2\n{GUEST}vcpus = 4\n")).unwrap();
        let m = root_parse(&default.manifest);
        assert_eq!(vmm(&m).cpu, 0, "vCPU 0 runs in the VMM's EC");
        assert!(
            default
                .manifest
                .contains("vcpus=4 vcpu-cpus=1,0,1 vcpu-priority=10"),
            "{}",
            default.manifest
        );
        let on_cpu_0 = plan(&format!(
            "[machine]\ncpus = 2\n{GUEST}vcpus = 4\nvcpu-cpus = [0, 0, 0, 0]\n"
        ))
        .unwrap();
        assert!(on_cpu_0
            .manifest
            .contains("vcpus=4 vcpu-cpus=0,0,0 vcpu-priority=10"));
        let named = plan(&format!(
            "[machine]\ncpus = 2\n{GUEST}vcpus = 2\nvcpu-cpus = [1, 1]\npriority = 12\n"
        ))
        .unwrap();
        let m = root_parse(&named.manifest);
        assert_eq!(vmm(&m).cpu, 1);
        assert!(named
            .manifest
            .contains("vcpus=2 vcpu-cpus=1 vcpu-priority=12"));
        let one = plan(&format!("[machine]\ncpus = 2\n{GUEST}")).unwrap();
        assert!(!one.manifest.contains("vcpus="), "one vCPU: no arguments");
        // `run --cpus 2`: the machine's CPUs and the guest's vCPUs.
        let cpus = GuestOverride {
            cpus: Some(2),
            ..GuestOverride::default()
        };
        let two = plan_with(&example("default.toml"), &cpus).unwrap();
        assert_eq!(two.cpus, 2);
        assert!(
            two.manifest.contains("vcpus=2 vcpu-cpus=1 vcpu-priority="),
            "{}",
            two.manifest
        );
    }

    #[test]
    fn guests_get_the_machines_clock_unless_their_epoch_is_fixed() {
        let fixed = plan(&format!("{GUEST}epoch = 1764000000\n")).unwrap();
        let m = root_parse(&fixed.manifest);
        assert_eq!(m.components.len(), 1, "no clock: {}", fixed.manifest);
        assert_eq!(m.components[0].args.as_deref(), Some("epoch=1764000000"));
        let real = plan(GUEST).unwrap();
        let m = root_parse(&real.manifest);
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["clock", "g"]);
        assert_eq!(m.components[1].args.as_deref(), Some("clock=20"));
        assert!(real.modules.iter().any(|m| m.name == "rtc"));
        // A component of the user's that provides `clock` serves instead.
        let own = plan(&format!(
            "[[component]]\nname = \"myclock\"\nmodule = \"rtc\"\nprovides = \"clock\"\n\
             args = \"serve\"\n{GUEST}"
        ))
        .unwrap();
        let m = root_parse(&own.manifest);
        let names: Vec<_> = m.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["myclock", "g"]);
    }

    #[test]
    fn a_component_runs_on_the_cpu_it_names() {
        let text =
            "[machine]\ncpus = 2\n[[component]]\nname = \"echo\"\nprovides = \"echo\"\ncpu = 1\n\
                    [[component]]\nname = \"ping\"\nuses = [\"echo\"]\n";
        let plan = plan(text).unwrap();
        let m = root_parse(&plan.manifest);
        assert_eq!((m.components[0].cpu, m.components[1].cpu), (1, 0));
        assert_eq!(plan.cpus, 2);
    }

    #[test]
    fn errors_show_file_line_column_and_the_line() {
        let e = plan(&format!("{GUEST}memory = \"lots\"\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "test.toml:5:10: guest[0].memory: expected {SIZE_EXPECTED}, not \"lots\"\n   |\n \
                 5 | memory = \"lots\"\n   |          ^^^^^^"
            )
        );
    }

    #[test]
    fn nothing_panics_on_arbitrary_text() {
        // Truncations of a whole example at every byte: an error or a plan.
        let text = example("two-guests.toml");
        for end in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
            let _ = plan(&text[..end]).map_err(|e| e.to_string());
        }
        // Each byte replaced by characters that matter to TOML or to sizes.
        let bytes = example("default.toml").into_bytes();
        for i in 0..bytes.len() {
            for b in [b'"', b'=', b'[', b']', b'\n', b'0', b'x', b'G', 0xff] {
                let mut mutated = bytes.clone();
                mutated[i] = b;
                if let Ok(text) = String::from_utf8(mutated) {
                    let _ = plan(&text).map_err(|e| e.to_string());
                }
            }
        }
    }
}
