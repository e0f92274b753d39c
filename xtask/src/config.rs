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
use crate::linux;

/// What `cargo xtask run` boots without `--config`.
pub const DEFAULT_CONFIG: &str = "examples/default.toml";
/// Paths starting with this name a file of the pinned Linux test guest
/// (`cargo xtask linux build`, built when first needed).
pub const PINNED_PREFIX: &str = "pinned:";
const PINNED_FILES: [&str; 2] = ["bzImage", "initramfs.cpio"];

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
const MAX_RESTARTS: u32 = 1000;

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
    pub initrd: Spanned<String>,
    pub cmdline: Option<Spanned<String>>,
    pub memory: Option<Spanned<Size>>,
    pub vcpus: Option<Spanned<u32>>,
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
    pub epoch: Option<u64>,
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
        let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let shift = match unit.trim_start() {
            "K" | "KiB" | "k" => 10,
            "M" | "MiB" | "m" => 20,
            "G" | "GiB" | "g" => 30,
            "" if !number.is_empty() => {
                return Err(format!(
                    "\"{text}\" has no unit: expected {SIZE_EXPECTED}"
                ))
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
    pub excerpt: Option<(String, Range<usize>)>,
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
        if let Some((text, cols)) = &self.excerpt {
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
    fn error(&self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
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
        let end = span.end.clamp(start, (line_start + line_text.len()).max(start));
        let cols = (column - 1)..(column - 1 + self.text[start..end].chars().count());
        ConfigError {
            file: self.name.to_string(),
            line: self.text[..start].matches('\n').count() + 1,
            column,
            field,
            message: message.into(),
            excerpt: Some((line_text.to_string(), cols)),
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
            let is_here = offset < line_start + line.len() || line_start + line.len() == self.text.len();
            if let Some(name) = trimmed.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
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
            let span = if span == (0..0) { 0..1.min(self.text.len()) } else { span };
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
}

impl GuestOverride {
    pub fn is_empty(&self) -> bool {
        *self == GuestOverride::default()
    }

    /// Applies the options to `file`'s console guest, or its only guest.
    pub fn apply(&self, file: &mut ConfigFile) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        let index = match file.guests.iter().position(GuestEntry::owns_console) {
            Some(i) => i,
            None if file.guests.len() == 1 => 0,
            None => {
                return Err(format!(
                    "--kernel, --initrd, --append, --memory and --vcpus change the guest that \
                     owns the console, and this configuration has {} guests, none with \
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
            guest.initrd = from_cli(initrd.clone());
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
    let source = Source { name: &name, text: &text };
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
    fn err<T>(&self, span: Range<usize>, field: &str, message: impl Into<String>) -> Result<T, ConfigError> {
        Err(self.source.error(span, field, message))
    }

    /// A guest file: `pinned:NAME` or a path relative to the file.
    fn guest_file(&self, value: &Spanned<String>, field: &str) -> Result<(PathBuf, bool, u64), ConfigError> {
        let text = value.get_ref();
        let (path, pinned) = match text.strip_prefix(PINNED_PREFIX) {
            Some(name) if PINNED_FILES.contains(&name) => (
                crate::util::workspace_root().join(linux::LINUX_DIR).join(name),
                true,
            ),
            Some(name) => {
                return self.err(
                    value.span(),
                    field,
                    format!(
                        "the pinned guest has no file \"{name}\" (expected {})",
                        PINNED_FILES.map(|f| format!("\"{PINNED_PREFIX}{f}\"")).join(" or ")
                    ),
                )
            }
            None if text.is_empty() => return self.err(value.span(), field, "expected a file's path, not \"\""),
            None => (self.base.join(text), false),
        };
        // The pinned files may not be built yet: their size is known only
        // afterwards; a rough one serves the quota.
        let size = match (self.size_of)(&path) {
            Ok(size) => size,
            Err(_) if pinned => 16 << 20,
            Err(why) => return self.err(value.span(), field, format!("cannot use {}: {why}", path.display())),
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
            entries.push((Entry { name: g.name.get_ref(), field: field.clone() }, g.name.span(), GUEST_NAME_MAX));
        }
        for (i, c) in file.components.iter().enumerate() {
            let field = format!("component[{i}]");
            entries.push((Entry { name: c.name.get_ref(), field }, c.name.span(), COMPONENT_NAME_MAX));
        }
        for (entry, span, max) in &entries {
            if !name_ok(entry.name, *max) {
                return self.err(
                    span.clone(),
                    &format!("{}.name", entry.field),
                    format!("expected 1 to {max} of A-Z a-z 0-9 _ - . , not \"{}\"", entry.name),
                );
            }
            if let Some(first) = names.insert(entry.name, entry.field.clone()) {
                return self.err(
                    span.clone(),
                    &format!("{}.name", entry.field),
                    format!("\"{}\" is already the name of {first}; names must be unique", entry.name),
                );
            }
        }
        if file.guests.is_empty() && file.components.is_empty() {
            return self.err(0..1.min(self.source.text.len()), "", "no [[guest]] and no [[component]]: nothing to boot");
        }

        // Services: who provides what.
        let mut providers: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, c) in file.components.iter().enumerate() {
            if let Some(p) = &c.provides {
                let field = format!("component[{i}].provides");
                if !name_ok(p.get_ref(), PORTAL_NAME_MAX) {
                    return self.err(p.span(), &field, format!("expected 1 to {PORTAL_NAME_MAX} of A-Z a-z 0-9 _ - . , not \"{}\"", p.get_ref()));
                }
                if let Some(first) = providers.insert(p.get_ref(), c.name.get_ref()) {
                    return self.err(p.span(), &field, format!("\"{}\" is already provided by '{first}'", p.get_ref()));
                }
            }
        }
        let check_provided = |s: &Spanned<String>, field: &str, me: &str| -> Result<(), ConfigError> {
            match providers.get(s.get_ref().as_str()) {
                None => {
                    let known: Vec<_> = providers.keys().map(|k| format!("\"{k}\"")).collect();
                    self.err(
                        s.span(),
                        field,
                        format!(
                            "no component provides \"{}\" (provided: {})",
                            s.get_ref(),
                            if known.is_empty() { "nothing".to_string() } else { known.join(", ") }
                        ),
                    )
                }
                Some(&p) if p == me => self.err(s.span(), field, format!("'{me}' cannot use its own service")),
                Some(_) => Ok(()),
            }
        };

        let mut manifest = String::from(
            "# Written by cargo xtask from a system configuration; do not edit.\n",
        );
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
                return self.err(module_span, &f("module"), "the VMM is started for each [[guest]]: describe the guest there");
            }
            if module == crate::image::ROOT_TASK || !USER_TASKS.iter().any(|t| t.binary == module) {
                let known: Vec<_> = USER_TASKS
                    .iter()
                    .map(|t| t.binary)
                    .filter(|b| *b != crate::image::ROOT_TASK && *b != VMM_MODULE)
                    .collect();
                return self.err(module_span, &f("module"), format!("no component module \"{module}\" (xtask builds: {})", known.join(", ")));
            }
            let priority = c.priority.as_ref().map_or(DEFAULT_COMPONENT_PRIORITY, |p| *p.get_ref());
            if let Some(p) = &c.priority {
                if *p.get_ref() > 63 {
                    return self.err(p.span(), &f("priority"), format!("expected a priority from 0 to 63, not {}", p.get_ref()));
                }
            }
            if let Some(cpu) = &c.cpu {
                if *cpu.get_ref() != 0 {
                    return self.err(cpu.span(), &f("cpu"), format!("tasks run on CPU 0 only for now, not CPU {}", cpu.get_ref()));
                }
            }
            let memory = self.page_size(c.memory.as_ref(), DEFAULT_COMPONENT_MEMORY, &f("memory"))?;
            let quota = self.page_size(c.quota.as_ref(), DEFAULT_COMPONENT_QUOTA, &f("quota"))?;
            manifest += &format!(
                "component {name}\n    module {module}\n    priority {priority}\n    memory {}\n    quota {}\n",
                manifest_size(memory),
                manifest_size(quota)
            );
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
                    return self.err(r.span(), &f("restart"), format!("expected at most {MAX_RESTARTS} restarts, not {}", r.get_ref()));
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

        // Guests, each under its VMM.
        let mut files: Vec<PlannedModule> = Vec::new();
        let mut uses_pinned_linux = false;
        let mut console: Option<(usize, Range<usize>)> = None;
        let mut trailer = String::new();
        let mut file_sizes: u64 = 0;
        for (i, g) in file.guests.iter().enumerate() {
            let f = |name: &str| format!("guest[{i}].{name}");
            let name = g.name.get_ref().as_str();
            let memory = match &g.memory {
                None => DEFAULT_GUEST_MEMORY,
                Some(m) => {
                    let bytes = m.get_ref().0;
                    if bytes < GUEST_MIN_MEMORY || !bytes.is_multiple_of(GUEST_MEMORY_ALIGN) {
                        return self.err(m.span(), &f("memory"), format!(
                            "a guest's memory is a multiple of 2M and at least {}M, not {} bytes",
                            GUEST_MIN_MEMORY >> 20,
                            bytes
                        ));
                    }
                    if bytes > MAX_MACHINE_MEMORY {
                        return self.err(m.span(), &f("memory"), format!(
                            "{} MiB is more than the machine's most, {} MiB",
                            bytes >> 20,
                            MAX_MACHINE_MEMORY >> 20
                        ));
                    }
                    bytes
                }
            };
            if let Some(v) = &g.vcpus {
                if *v.get_ref() != 1 {
                    return self.err(v.span(), &f("vcpus"), format!(
                        "a guest has exactly 1 vCPU for now (the VMM runs one; issue 12), not {}",
                        v.get_ref()
                    ));
                }
            }
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
                if let Some((first, _)) = &console {
                    return self.err(g.console_span(), &f("console"), format!(
                        "guest '{}' already owns the console; at most one guest may",
                        file.guests[*first].name.get_ref()
                    ));
                }
                console = Some((i, g.console_span()));
            }
            let cmdline = g.cmdline.as_ref().map_or("", |c| c.get_ref().as_str());
            if cmdline.len() > CMDLINE_MAX || cmdline.contains(['\0', '\n']) {
                let span = g.cmdline.as_ref().map_or(g.name.span(), |c| c.span());
                return self.err(span, &f("cmdline"), format!(
                    "expected one line of at most {CMDLINE_MAX} bytes"
                ));
            }

            let (kernel, k_pinned, kernel_size) = self.guest_file(&g.kernel, &f("kernel"))?;
            let (initrd, i_pinned, initrd_size) = self.guest_file(&g.initrd, &f("initrd"))?;
            uses_pinned_linux |= k_pinned || i_pinned;
            let kernel_module = file_module(&mut files, &kernel, "kernel", i);
            let initrd_module = file_module(&mut files, &initrd, "initrd", i);
            let mut line = cmdline.trim().to_string();
            let disk_size = if g.test_disk {
                if !files.iter().any(|m| m.source == ModuleSource::TestDisk) {
                    files.push(PlannedModule {
                        name: "disk.img".into(),
                        source: ModuleSource::TestDisk,
                    });
                }
                let disk = linux::TestDisk::for_image(&linux::test_disk_image());
                for arg in disk.kernel_args() {
                    if !line.is_empty() {
                        line.push(' ');
                    }
                    line += &arg;
                }
                (linux::DISK_SECTORS * linux::SECTOR) as u64
            } else {
                0
            };
            line.push('\n');
            let cmdline_module = format!("{name}.cmdline");
            files.push(PlannedModule {
                name: cmdline_module.clone(),
                source: ModuleSource::Text(line.clone()),
            });

            let heap = (VMM_HEAP_BASE + disk_size).next_multiple_of(1 << 20);
            let mapped = memory + heap + kernel_size + initrd_size + disk_size + line.len() as u64;
            let quota = (VMM_QUOTA_BASE + mapped / VMM_QUOTA_DIVISOR).next_multiple_of(1 << 20);
            let mut mappings = vec![
                format!("ram guest {}", manifest_size(memory)),
                format!("ram heap {}", manifest_size(heap)),
                format!("file kernel {kernel_module}"),
                format!("file initrd {initrd_module}"),
            ];
            if g.test_disk {
                mappings.push("file disk disk.img".into());
            }
            mappings.push(format!("file cmdline {cmdline_module}"));
            manifest += &format!(
                "component {name}\n    module {VMM_MODULE}\n    priority {priority}\n    ceiling {VMM_CEILING}\n    \
                 memory {}\n    stack {}\n    quota {}\n    restart 0\n",
                manifest_size(VMM_MEMORY),
                manifest_size(VMM_STACK),
                manifest_size(quota)
            );
            for (slot, mapping) in mappings.iter().enumerate() {
                manifest += &format!("    {mapping} at {:#x}\n", MAPPING_BASE + slot as u64 * MAPPING_SLOT);
            }
            let mut uses = Vec::new();
            for called in &g.calls {
                check_provided(called, &f("calls"), name)?;
                if uses.contains(&called.get_ref().as_str()) {
                    return self.err(called.span(), &f("calls"), format!("\"{}\" named twice", called.get_ref()));
                }
                uses.push(called.get_ref().as_str());
            }
            let calls = uses.len();
            if let Some(modem) = &g.modem {
                check_provided(modem, &f("modem"), name)?;
                uses.push(modem.get_ref().as_str());
            }
            let mut args = Vec::new();
            if let Some(epoch) = g.epoch {
                args.push(format!("epoch={epoch}"));
            }
            if g.owns_console() {
                args.push("console-input".to_string());
            }
            let mut portals = Vec::new();
            for (n, service) in uses.iter().enumerate() {
                let sel = self.selector(n, g.name.span(), &f("calls"))?;
                manifest += &format!("    uses {service} at {sel}\n");
                if n < calls {
                    portals.push(sel.to_string());
                } else {
                    args.push(format!("modem={sel}"));
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
            if !args.is_empty() {
                manifest += &format!("    args {}\n", args.join(" "));
            }
            if g.owns_console() {
                trailer += &format!("ioports 0x3f8-0x3ff to {name}\nirq 4 to {name}\n");
            }
            if !tasks.iter().any(|t| t == VMM_MODULE) {
                tasks.push(VMM_MODULE.to_string());
            }
            pool += VMM_MEMORY + VMM_STACK + memory + heap;
            ram_regions += 2;
            quotas += quota;
            file_sizes += kernel_size + initrd_size + disk_size;
        }
        manifest += &trailer;

        // The root's pool holds every component's memory, stack and RAM
        // mappings (a tenth more for 2 MiB alignment of large runs); its
        // kernel quota is half of what the pool leaves free.
        let pool_mib = mib_up(pool + pool / 10) + 2 * ram_regions + 16;
        let quota_mib = mib_up(quotas) + file.components.len() as u64 + file.guests.len() as u64;
        let free_needed = (pool_mib * 4).div_ceil(3).max(pool_mib + 2 * quota_mib);
        let needed = MACHINE_OVERHEAD + (file_sizes.next_multiple_of(1 << 20)) + (free_needed << 20);
        let memory = match &file.machine.memory {
            Some(m) => {
                let bytes = m.get_ref().0;
                if !bytes.is_multiple_of(1 << 20) || bytes > MAX_MACHINE_MEMORY {
                    return self.err(m.span(), "machine.memory", format!(
                        "expected a whole number of MiB up to {}M, not {bytes} bytes",
                        MAX_MACHINE_MEMORY >> 20
                    ));
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
            None => needed.next_multiple_of(MACHINE_MEMORY_STEP).max(DEFAULT_MACHINE_MEMORY),
        };
        if memory > MAX_MACHINE_MEMORY {
            let (span, field) = file
                .guests
                .iter()
                .enumerate()
                .max_by_key(|(_, g)| g.memory.as_ref().map_or(0, |m| m.get_ref().0))
                .and_then(|(i, g)| g.memory.as_ref().map(|m| (m.span(), format!("guest[{i}].memory"))))
                .unwrap_or((0..1.min(self.source.text.len()), String::new()));
            return self.err(span, &field, format!(
                "the guests and components need {} MiB of the machine's memory, more than the \
                 {} MiB an emulated machine has",
                mib_up(needed),
                MAX_MACHINE_MEMORY >> 20
            ));
        }
        let cpus = match &file.machine.cpus {
            None => 1,
            Some(c) if (1..=MAX_CPUS).contains(c.get_ref()) => *c.get_ref(),
            Some(c) => return self.err(c.span(), "machine.cpus", format!("expected 1 to {MAX_CPUS} CPUs, not {}", c.get_ref())),
        };

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
                return self.err(0..1.min(self.source.text.len()), "", format!(
                    "two boot modules would be named \"{}\"; rename the file or the guest",
                    m.name
                ));
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
        })
    }

    fn page_size(&self, size: Option<&Spanned<Size>>, default: u64, field: &str) -> Result<u64, ConfigError> {
        match size {
            None => Ok(default),
            Some(s) if s.get_ref().0.is_multiple_of(4096) && s.get_ref().0 <= 1 << 30 => Ok(s.get_ref().0),
            Some(s) => self.err(s.span(), field, format!(
                "expected a multiple of 4K up to 1G, not {} bytes",
                s.get_ref().0
            )),
        }
    }

    fn selector(&self, n: usize, span: Range<usize>, field: &str) -> Result<u64, ConfigError> {
        let sel = FIRST_USE_SELECTOR + n as u64;
        if sel > LAST_USE_SELECTOR {
            return self.err(span, field, format!(
                "at most {} services per component",
                LAST_USE_SELECTOR - FIRST_USE_SELECTOR + 1
            ));
        }
        Ok(sel)
    }

    fn check_args(&self, args: &Spanned<String>, field: &str) -> Result<(), ConfigError> {
        let text = args.get_ref();
        if text.contains(['\n', '\r', '#']) || text.len() > ARGS_MAX {
            return self.err(args.span(), field, format!(
                "expected words on one line, without '#', at most {ARGS_MAX} bytes"
            ));
        }
        Ok(())
    }
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
    if !plan.uses_pinned_linux {
        return Ok(plan);
    }
    linux::build()?;
    load(path, overrides, &file_size)
}
