//! The boot manifest: which components the root task starts, with what
//! memory, quota, priority and capabilities, and how it restarts them.
//!
//! A text file, one statement per line; `#` starts a comment; indentation
//! is only for the reader. A `component` line opens a component, and the
//! property lines after it describe it until the next `component` or
//! top-level line.
//!
//! ```text
//! component NAME                 # opens a component
//!     module MODULE              # boot module with its ELF file (required)
//!     priority 0..63             # (required)
//!     ceiling PRIORITY           # highest priority its SCs may have
//!                                # (>= priority; default: its priority)
//!     budget DURATION            # SC budget per period; bare number = µs (default 10ms)
//!     cpu N                      # the CPU its first EC runs on (default 0; a
//!                                # CPU that is not online means CPU 0)
//!     memory SIZE                # RAM for ELF segments + stack (required)
//!     stack SIZE                 # of the first EC (default 16K)
//!     quota SIZE                 # kernel memory for the PD (required)
//!     capacity N                 # object-space capacity (default 256)
//!     args TEXT...               # argument string (default: the module's own)
//!     provides NAME              # the one portal it registers under NAME
//!     ram NAME SIZE at ADDR      # zeroed read/write/execute memory at ADDR
//!                                # (e.g. a guest's RAM, a VMM's heap)
//!     file NAME MODULE at ADDR   # boot module MODULE, read-only at ADDR
//!                                # each ram/file adds ` NAME=ADDR,SIZE` to
//!                                # the arguments (hex; SIZE in bytes)
//!     shared NAME SIZE at ADDR    # zeroed read/write memory at ADDR that every
//!                                # component naming NAME shares (same SIZE);
//!                                # made once, kept across restarts
//!     dma NAME SIZE at ADDR       # zeroed read/write memory whose physical
//!                                # addresses the component may learn
//!                                # (`mem_phys`), to hand to a device. Without
//!                                # an IOMMU a device reaches ALL memory: give
//!                                # `dma` and `pci` only to trusted drivers
//!     pci NAME VENDOR:DEVICE at ADDR
//!                                # the next PCI function (bus 0) with these
//!                                # ids: its configuration space (ECAM page)
//!                                # at ADDR, memory BAR n at ADDR + (n+1)*16M
//!                                # (uncached), 2 MSIs; adds ` NAME=ADDR,4096`,
//!                                # ` NAME.barN=ADDR,SIZE` per BAR and
//!                                # ` NAME.msi=FIRST,COUNT` (IRQ-space keys)
//!                                # each ram/file/shared/dma adds
//!                                # ` NAME=ADDR,SIZE` to the arguments
//!     uses NAME at SEL           # gets NAME's portal at selector SEL
//!     restart N [backoff DURATION] [doubling|fixed]
//!                                # at most N restarts; first after DURATION
//!                                # (bare number = ms; default: 3 10ms doubling)
//! semaphore NAME [count N] (up|down|updown COMPONENT at SEL)...
//! ioports PORT[-PORT] to COMPONENT
//! irq GSI to COMPONENT
//! ```
//!
//! SIZE is a number with an optional `K`, `M` or `G` (binary) suffix;
//! DURATION a number with an optional `us`, `ms` or `s`. Numbers are
//! decimal or `0x` hex. Selectors 0–2 are the kernel's and the root's (own
//! PD, exception portal, registry portal); a manifest gives selectors from 3
//! to below the component's capacity, each once.
//!
//! Parsing never panics: every problem is a [`ManifestError`] naming the line.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// Components a manifest may list.
pub const MAX_COMPONENTS: usize = 64;
/// Longest component, module and portal names.
pub const COMPONENT_NAME_MAX: usize = 32;
pub const MODULE_NAME_MAX: usize = 31;
pub const PORTAL_NAME_MAX: usize = 40;
/// Longest argument string.
pub const ARGS_MAX: usize = 1024;
/// Selectors below this are set by the root task in every component.
pub const FIRST_MANIFEST_SELECTOR: u64 = 3;

pub const DEFAULT_BUDGET_US: u64 = 10_000;
pub const DEFAULT_CAPACITY: u64 = 256;
pub const DEFAULT_STACK: u64 = 16 * 1024;
pub const DEFAULT_RESTART: RestartPolicy = RestartPolicy {
    max_restarts: 3,
    backoff_ms: 10,
    doubling: true,
};
const MAX_CAPACITY: u64 = 1 << 20;
const MAX_RESTARTS: u64 = 1000;
const MAX_BACKOFF_MS: u64 = 3_600_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub components: Vec<Component>,
    pub semaphores: Vec<Semaphore>,
    /// The `shared` regions by name, with their sizes, in order of first
    /// mention ([`MappingSource::Shared`] indexes this).
    pub shared: Vec<(String, u64)>,
    /// The `pci` lines, in manifest order ([`MappingSource::Pci`] indexes
    /// this): which device each wants.
    pub devices: Vec<PciRequest>,
}

/// A `pci` line: the `nth` function (among the lines naming the same ids)
/// with `vendor:device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciRequest {
    pub vendor: u16,
    pub device: u16,
    pub nth: usize,
}

/// MSIs each `pci` line gets.
pub const MSIS_PER_DEVICE: u64 = 2;
/// Where a `pci` mapping puts BAR n: `ADDR + (n + 1) * BAR_SLOT`.
pub const BAR_SLOT: u64 = 16 << 20;
/// The address space a `pci` mapping takes: the page and six BAR slots.
pub const PCI_SPAN: u64 = 7 * BAR_SLOT;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub module: String,
    pub priority: u8,
    /// The highest priority the kernel lets the component's SCs have.
    pub ceiling: u8,
    pub budget_us: u64,
    /// The CPU its first EC is bound to.
    pub cpu: u16,
    /// Bytes, a multiple of the page size.
    pub memory: u64,
    pub stack: u64,
    pub quota: u64,
    pub capacity: u64,
    /// `None`: the boot module's own arguments.
    pub args: Option<String>,
    pub provides: Option<String>,
    pub uses: Vec<Use>,
    pub ioports: Vec<PortRange>,
    pub irqs: Vec<u64>,
    pub restart: RestartPolicy,
    /// `ram` and `file` lines, in order.
    pub mappings: Vec<Mapping>,
    /// The `component` line.
    pub line: usize,
}

/// A portal a component calls: `name`'s at `selector`; `provider` is the
/// index of the component that provides it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Use {
    pub name: String,
    pub selector: u64,
    pub provider: usize,
}

/// Memory mapped into a component besides its image, and named in its
/// arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub name: String,
    /// Page aligned, in [`MAPPING_RANGE`].
    pub address: u64,
    pub source: MappingSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingSource {
    /// Fresh zeroed pages, this many bytes (a multiple of the page size).
    Ram(u64),
    /// A boot module, read-only.
    Module(String),
    /// Memory shared with the other components that name it: the index
    /// into [`Manifest::shared`] (resolved after parsing), and its size.
    Shared { index: usize, bytes: u64 },
    /// Fresh zeroed pages whose physical addresses the component may
    /// learn, this many bytes.
    Dma(u64),
    /// A PCI device: the index into [`Manifest::devices`].
    Pci(usize),
}

impl MappingSource {
    /// The bytes of address space it takes, where known before loading
    /// (a module's size is known only then).
    pub fn span(&self) -> Option<u64> {
        match *self {
            MappingSource::Ram(bytes)
            | MappingSource::Dma(bytes)
            | MappingSource::Shared { bytes, .. } => Some(bytes),
            MappingSource::Pci(_) => Some(PCI_SPAN),
            MappingSource::Module(_) => None,
        }
    }

    /// Fresh pool pages this mapping takes for its component alone.
    pub fn own_pages(&self) -> u64 {
        match self {
            MappingSource::Ram(bytes) | MappingSource::Dma(bytes) => bytes / 4096,
            _ => 0,
        }
    }
}

/// Where `ram` and `file` mappings may lie: above the component's image
/// and below its stack, UTCBs and the root's windows.
pub const MAPPING_RANGE: core::ops::Range<u64> = 0x0000_0100_0000_0000..0x0000_7000_0000_0000;
/// Longest `ram` mapping: a guest's RAM.
pub const MAX_RAM: u64 = 64 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn count(&self) -> u64 {
        u64::from(self.last) - u64::from(self.first) + 1
    }

    fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts after which a component that fails again stays down.
    pub max_restarts: u32,
    /// Delay before the first restart.
    pub backoff_ms: u64,
    /// Whether each further restart waits twice as long as the one before.
    pub doubling: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Semaphore {
    pub name: String,
    pub count: u64,
    pub grants: Vec<SemaphoreGrant>,
    pub line: usize,
}

/// Semaphore access for one component, at its `selector`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SemaphoreGrant {
    pub component: usize,
    pub selector: u64,
    pub up: bool,
    pub down: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub line: usize,
    pub kind: ErrorKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    UnknownKeyword(String),
    /// A property line before any `component` line (or after a top-level one).
    OutsideComponent(String),
    /// `what` is missing at the end of the line.
    Missing(&'static str),
    /// A word where `expected` should be.
    Unexpected {
        word: String,
        expected: &'static str,
    },
    BadNumber(String),
    OutOfRange {
        what: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    BadName {
        what: &'static str,
        name: String,
        max: usize,
    },
    DuplicateProperty(&'static str),
    DuplicateComponent(String),
    UnknownComponent(String),
    /// A required property is missing from the component opened at this line.
    MissingProperty {
        component: String,
        property: &'static str,
    },
    SecondPortal(String),
    ProvidedTwice {
        name: String,
        first: String,
    },
    NotProvided(String),
    SelectorReserved(u64),
    SelectorBeyondCapacity {
        selector: u64,
        capacity: u64,
    },
    SelectorTaken {
        component: String,
        selector: u64,
    },
    PortsTaken {
        first: u16,
        last: u16,
        owner: String,
    },
    IrqTaken {
        gsi: u64,
        owner: String,
    },
    TooManyComponents,
    ArgsTooLong(usize),
    NoComponents,
    /// A `ram` or `file` address not page aligned or outside
    /// [`MAPPING_RANGE`].
    BadMappingAddress(u64),
    /// A `ram` mapping overlapping an earlier one of the component.
    MappingOverlap(String),
    DuplicateMapping(String),
    /// Two `shared` lines with one name and different sizes.
    SharedSizeMismatch(String),
    /// More `pci` lines than the kernel has MSIs for.
    TooManyDevices,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "manifest line {}: ", self.line)?;
        match &self.kind {
            ErrorKind::UnknownKeyword(word) => write!(f, "unknown keyword '{word}'"),
            ErrorKind::OutsideComponent(word) => {
                write!(
                    f,
                    "'{word}' outside a component (properties follow a 'component' line)"
                )
            }
            ErrorKind::Missing(what) => write!(f, "{what} missing"),
            ErrorKind::Unexpected { word, expected } => {
                write!(f, "'{word}' where {expected} should be")
            }
            ErrorKind::BadNumber(word) => write!(f, "'{word}' is not a number"),
            ErrorKind::OutOfRange {
                what,
                value,
                min,
                max,
            } => write!(f, "{what} {value} is outside {min}..={max}"),
            ErrorKind::BadName { what, name, max } => {
                write!(f, "bad {what} '{name}' (1 to {max} of A-Z a-z 0-9 _ - .)")
            }
            ErrorKind::DuplicateProperty(what) => write!(f, "'{what}' given twice"),
            ErrorKind::DuplicateComponent(name) => write!(f, "component '{name}' defined twice"),
            ErrorKind::UnknownComponent(name) => write!(f, "no component '{name}'"),
            ErrorKind::MissingProperty {
                component,
                property,
            } => write!(f, "component '{component}' has no '{property}'"),
            ErrorKind::SecondPortal(name) => write!(
                f,
                "a component provides one portal; '{name}' is a second (serve several \
                 operations through one portal)"
            ),
            ErrorKind::ProvidedTwice { name, first } => {
                write!(f, "'{name}' is already provided by '{first}'")
            }
            ErrorKind::NotProvided(name) => write!(f, "no component provides '{name}'"),
            ErrorKind::SelectorReserved(sel) => write!(
                f,
                "selector {sel} is reserved (0 own PD, 1 exception portal, 2 registry)"
            ),
            ErrorKind::SelectorBeyondCapacity { selector, capacity } => write!(
                f,
                "selector {selector} is beyond the component's capacity {capacity}"
            ),
            ErrorKind::SelectorTaken {
                component,
                selector,
            } => write!(f, "selector {selector} of '{component}' is already given"),
            ErrorKind::PortsTaken { first, last, owner } => {
                write!(f, "ports {first:#x}-{last:#x} overlap ports of '{owner}'")
            }
            ErrorKind::IrqTaken { gsi, owner } => write!(f, "GSI {gsi} already goes to '{owner}'"),
            ErrorKind::TooManyComponents => {
                write!(f, "more than {MAX_COMPONENTS} components")
            }
            ErrorKind::ArgsTooLong(len) => {
                write!(f, "arguments are {len} bytes, more than {ARGS_MAX}")
            }
            ErrorKind::NoComponents => write!(f, "no components"),
            ErrorKind::BadMappingAddress(address) => write!(
                f,
                "mapping address {address:#x} is not page aligned in {:#x}..{:#x}",
                MAPPING_RANGE.start, MAPPING_RANGE.end
            ),
            ErrorKind::MappingOverlap(name) => {
                write!(f, "'{name}' overlaps an earlier ram mapping")
            }
            ErrorKind::DuplicateMapping(name) => write!(f, "mapping '{name}' named twice"),
            ErrorKind::SharedSizeMismatch(name) => {
                write!(f, "shared memory '{name}' given two different sizes")
            }
            ErrorKind::TooManyDevices => write!(
                f,
                "more than {} pci lines (the kernel has {} MSIs, {MSIS_PER_DEVICE} each)",
                moat_abi::MSI_COUNT / MSIS_PER_DEVICE,
                moat_abi::MSI_COUNT
            ),
        }
    }
}

type Result<T> = core::result::Result<T, ErrorKind>;

/// The words of one line after its keyword.
struct Words<'a> {
    iter: core::str::SplitWhitespace<'a>,
}

impl<'a> Words<'a> {
    fn next(&mut self, what: &'static str) -> Result<&'a str> {
        self.iter.next().ok_or(ErrorKind::Missing(what))
    }

    fn peek_is(&self, word: &str) -> bool {
        self.iter.clone().next() == Some(word)
    }

    fn keyword(&mut self, keyword: &'static str) -> Result<()> {
        let word = self.next(keyword)?;
        if word == keyword {
            Ok(())
        } else {
            Err(ErrorKind::Unexpected {
                word: word.to_string(),
                expected: keyword,
            })
        }
    }

    fn end(mut self) -> Result<()> {
        match self.iter.next() {
            None => Ok(()),
            Some(word) => Err(ErrorKind::Unexpected {
                word: word.to_string(),
                expected: "the end of the line",
            }),
        }
    }
}

fn number(word: &str) -> Result<u64> {
    let parsed = match word.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => word.parse(),
    };
    parsed.map_err(|_| ErrorKind::BadNumber(word.to_string()))
}

fn ranged(what: &'static str, value: u64, min: u64, max: u64) -> Result<u64> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ErrorKind::OutOfRange {
            what,
            value,
            min,
            max,
        })
    }
}

/// Splits `word` into its leading number and a suffix.
fn number_with_suffix(word: &str) -> Result<(u64, &str)> {
    let digits = if word.starts_with("0x") {
        word.len()
    } else {
        word.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(word.len())
    };
    let (value, suffix) = word.split_at(digits);
    Ok((
        number(value).map_err(|_| ErrorKind::BadNumber(word.to_string()))?,
        suffix,
    ))
}

fn size(what: &'static str, word: &str) -> Result<u64> {
    let (value, suffix) = number_with_suffix(word)?;
    let shift = match suffix {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(ErrorKind::BadNumber(word.to_string())),
    };
    let bytes = value
        .checked_mul(1 << shift)
        .ok_or(ErrorKind::BadNumber(word.to_string()))?;
    ranged(what, bytes, 1, 1 << 40)
}

/// Microseconds; a bare number is in `bare` units (1 = µs, 1000 = ms).
fn duration_us(word: &str, bare: u64) -> Result<u64> {
    let (value, suffix) = number_with_suffix(word)?;
    let unit = match suffix {
        "" => bare,
        "us" => 1,
        "ms" => 1000,
        "s" => 1_000_000,
        _ => return Err(ErrorKind::BadNumber(word.to_string())),
    };
    value
        .checked_mul(unit)
        .ok_or(ErrorKind::BadNumber(word.to_string()))
}

fn name(what: &'static str, word: &str, max: usize) -> Result<String> {
    let ok = !word.is_empty()
        && word.len() <= max
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(word.to_string())
    } else {
        Err(ErrorKind::BadName {
            what,
            name: word.to_string(),
            max,
        })
    }
}

/// A component as read, before the required properties are checked.
#[derive(Default)]
struct Draft {
    name: String,
    line: usize,
    module: Option<String>,
    priority: Option<u8>,
    ceiling: Option<u8>,
    budget_us: Option<u64>,
    cpu: Option<u16>,
    memory: Option<u64>,
    stack: Option<u64>,
    quota: Option<u64>,
    capacity: Option<u64>,
    args: Option<String>,
    provides: Option<String>,
    /// (name, selector, line)
    uses: Vec<(String, u64, usize)>,
    restart: Option<RestartPolicy>,
    mappings: Vec<Mapping>,
    /// Its `pci` lines, indexed by the drafts' `MappingSource::Pci`.
    pci: Vec<PciRequest>,
}

fn set<T>(slot: &mut Option<T>, what: &'static str, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(ErrorKind::DuplicateProperty(what));
    }
    *slot = Some(value);
    Ok(())
}

fn page_round(bytes: u64) -> u64 {
    bytes.div_ceil(4096) * 4096
}

impl Draft {
    fn property(&mut self, keyword: &str, rest: &str, mut words: Words, line: usize) -> Result<()> {
        match keyword {
            "module" => {
                let module = name("module name", words.next("module name")?, MODULE_NAME_MAX)?;
                set(&mut self.module, "module", module)?;
            }
            "priority" => {
                let priority = ranged("priority", number(words.next("priority")?)?, 0, 63)?;
                set(&mut self.priority, "priority", priority as u8)?;
            }
            "cpu" => {
                let cpu = ranged("cpu", number(words.next("cpu")?)?, 0, 63)?;
                set(&mut self.cpu, "cpu", cpu as u16)?;
            }
            "ceiling" => {
                let ceiling = ranged("ceiling", number(words.next("ceiling")?)?, 0, 63)?;
                set(&mut self.ceiling, "ceiling", ceiling as u8)?;
            }
            "budget" => {
                let budget = duration_us(words.next("budget")?, 1)?;
                let budget = ranged("budget (µs)", budget, 1, 10_000_000)?;
                set(&mut self.budget_us, "budget", budget)?;
            }
            "memory" => {
                let memory = size("memory", words.next("memory size")?)?;
                set(&mut self.memory, "memory", page_round(memory))?;
            }
            "stack" => {
                let stack = ranged(
                    "stack",
                    size("stack", words.next("stack size")?)?,
                    4096,
                    1 << 30,
                )?;
                set(&mut self.stack, "stack", page_round(stack))?;
            }
            "quota" => {
                let quota = size("quota", words.next("quota size")?)?;
                set(&mut self.quota, "quota", quota)?;
            }
            "capacity" => {
                let capacity = ranged(
                    "capacity",
                    number(words.next("capacity")?)?,
                    16,
                    MAX_CAPACITY,
                )?;
                set(&mut self.capacity, "capacity", capacity)?;
            }
            "args" => {
                if rest.len() > ARGS_MAX {
                    return Err(ErrorKind::ArgsTooLong(rest.len()));
                }
                return set(&mut self.args, "args", rest.to_string());
            }
            "provides" => {
                let portal = name("portal name", words.next("portal name")?, PORTAL_NAME_MAX)?;
                if self.provides.is_some() {
                    return Err(ErrorKind::SecondPortal(portal));
                }
                self.provides = Some(portal);
            }
            "uses" => {
                let portal = name("portal name", words.next("portal name")?, PORTAL_NAME_MAX)?;
                words.keyword("at")?;
                let selector = number(words.next("selector")?)?;
                self.uses.push((portal, selector, line));
            }
            "ram" | "file" => {
                let key = name("mapping name", words.next("mapping name")?, MODULE_NAME_MAX)?;
                let source = if keyword == "ram" {
                    let bytes = ranged("ram", size("ram", words.next("ram size")?)?, 1, MAX_RAM)?;
                    MappingSource::Ram(page_round(bytes))
                } else {
                    let module = name("module name", words.next("module name")?, MODULE_NAME_MAX)?;
                    MappingSource::Module(module)
                };
                words.keyword("at")?;
                let address = number(words.next("address")?)?;
                self.add_mapping(Mapping {
                    name: key,
                    address,
                    source,
                })?;
            }
            "shared" | "dma" => {
                let key = name("mapping name", words.next("mapping name")?, MODULE_NAME_MAX)?;
                let what = if keyword == "dma" { "dma" } else { "shared" };
                let bytes = ranged(what, size(what, words.next("size")?)?, 1, MAX_RAM)?;
                let bytes = page_round(bytes);
                words.keyword("at")?;
                let address = number(words.next("address")?)?;
                let source = if keyword == "dma" {
                    MappingSource::Dma(bytes)
                } else {
                    MappingSource::Shared { index: 0, bytes }
                };
                self.add_mapping(Mapping {
                    name: key,
                    address,
                    source,
                })?;
            }
            "pci" => {
                let key = name("mapping name", words.next("mapping name")?, MODULE_NAME_MAX)?;
                let ids = words.next("VENDOR:DEVICE")?;
                let (vendor, device) = ids.split_once(':').ok_or(ErrorKind::Unexpected {
                    word: ids.to_string(),
                    expected: "VENDOR:DEVICE (hex, e.g. 1af4:1042)",
                })?;
                let hex = |w: &str| {
                    u16::from_str_radix(w.trim_start_matches("0x"), 16)
                        .map_err(|_| ErrorKind::BadNumber(w.to_string()))
                };
                let (vendor, device) = (hex(vendor)?, hex(device)?);
                words.keyword("at")?;
                let address = number(words.next("address")?)?;
                self.pci.push(PciRequest {
                    vendor,
                    device,
                    nth: 0,
                });
                self.add_mapping(Mapping {
                    name: key,
                    address,
                    source: MappingSource::Pci(self.pci.len() - 1),
                })?;
            }
            "restart" => {
                let max = ranged(
                    "restarts",
                    number(words.next("number of restarts")?)?,
                    0,
                    MAX_RESTARTS,
                )?;
                let mut policy = RestartPolicy {
                    max_restarts: max as u32,
                    ..DEFAULT_RESTART
                };
                if words.peek_is("backoff") {
                    words.keyword("backoff")?;
                    let us = duration_us(words.next("back-off")?, 1000)?;
                    policy.backoff_ms = ranged("back-off (ms)", us / 1000, 0, MAX_BACKOFF_MS)?;
                }
                match words.iter.next() {
                    None => {}
                    Some("doubling") => policy.doubling = true,
                    Some("fixed") => policy.doubling = false,
                    Some(word) => {
                        return Err(ErrorKind::Unexpected {
                            word: word.to_string(),
                            expected: "'backoff', 'doubling' or 'fixed'",
                        })
                    }
                }
                set(&mut self.restart, "restart", policy)?;
            }
            other => return Err(ErrorKind::UnknownKeyword(other.to_string())),
        }
        words.end()
    }

    /// Module sizes are known only at load time; their overlaps are the
    /// kernel's to refuse then.
    fn add_mapping(&mut self, mapping: Mapping) -> Result<()> {
        let address = mapping.address;
        if !address.is_multiple_of(4096) || !MAPPING_RANGE.contains(&address) {
            return Err(ErrorKind::BadMappingAddress(address));
        }
        if self.mappings.iter().any(|m| m.name == mapping.name) {
            return Err(ErrorKind::DuplicateMapping(mapping.name));
        }
        if let Some(bytes) = mapping.source.span() {
            let end = address
                .checked_add(bytes)
                .filter(|&end| end <= MAPPING_RANGE.end)
                .ok_or(ErrorKind::BadMappingAddress(address))?;
            let overlaps = self.mappings.iter().any(|m| match m.source.span() {
                Some(other) => address < m.address + other && m.address < end,
                None => false,
            });
            if overlaps {
                return Err(ErrorKind::MappingOverlap(mapping.name));
            }
        }
        self.mappings.push(mapping);
        Ok(())
    }

    fn finish(self) -> core::result::Result<Component, ManifestError> {
        let missing = |property| ManifestError {
            line: self.line,
            kind: ErrorKind::MissingProperty {
                component: self.name.clone(),
                property,
            },
        };
        let priority = self.priority.ok_or_else(|| missing("priority"))?;
        let ceiling = self.ceiling.unwrap_or(priority);
        if ceiling < priority {
            return Err(ManifestError {
                line: self.line,
                kind: ErrorKind::OutOfRange {
                    what: "ceiling (below the priority)",
                    value: u64::from(ceiling),
                    min: u64::from(priority),
                    max: 63,
                },
            });
        }
        Ok(Component {
            module: self.module.clone().ok_or_else(|| missing("module"))?,
            priority,
            ceiling,
            memory: self.memory.ok_or_else(|| missing("memory"))?,
            quota: self.quota.ok_or_else(|| missing("quota"))?,
            budget_us: self.budget_us.unwrap_or(DEFAULT_BUDGET_US),
            cpu: self.cpu.unwrap_or(0),
            stack: self.stack.unwrap_or(DEFAULT_STACK),
            capacity: self.capacity.unwrap_or(DEFAULT_CAPACITY),
            restart: self.restart.unwrap_or(DEFAULT_RESTART),
            args: self.args,
            provides: self.provides,
            // Resolved once every component is known.
            uses: Vec::new(),
            ioports: Vec::new(),
            irqs: Vec::new(),
            mappings: self.mappings,
            name: self.name,
            line: self.line,
        })
    }
}

/// A top-level line that names components, resolved after all are read.
enum Grant {
    /// (semaphore index, component name, selector, up, down)
    Semaphore(usize, String, u64, bool, bool),
    Ports(PortRange, String),
    Irq(u64, String),
}

fn semaphore_line(mut words: Words, index: usize, line: usize) -> Result<(Semaphore, Vec<Grant>)> {
    let name = name(
        "semaphore name",
        words.next("semaphore name")?,
        COMPONENT_NAME_MAX,
    )?;
    let mut count = 0;
    if words.peek_is("count") {
        words.keyword("count")?;
        count = number(words.next("count")?)?;
    }
    let mut grants = Vec::new();
    while let Some(role) = words.iter.next() {
        let (up, down) = match role {
            "up" => (true, false),
            "down" => (false, true),
            "updown" => (true, true),
            word => {
                return Err(ErrorKind::Unexpected {
                    word: word.to_string(),
                    expected: "'up', 'down' or 'updown'",
                })
            }
        };
        let component = words.next("component name")?.to_string();
        words.keyword("at")?;
        let selector = number(words.next("selector")?)?;
        grants.push(Grant::Semaphore(index, component, selector, up, down));
    }
    if grants.is_empty() {
        return Err(ErrorKind::Missing(
            "'up', 'down' or 'updown' COMPONENT at SELECTOR",
        ));
    }
    let semaphore = Semaphore {
        name,
        count,
        grants: Vec::new(),
        line,
    };
    Ok((semaphore, grants))
}

fn ports_line(mut words: Words) -> Result<Grant> {
    let range = words.next("port range")?;
    let (first, last) = range.split_once('-').unwrap_or((range, range));
    let first = ranged("port", number(first)?, 0, 0xffff)? as u16;
    let last = ranged("port", number(last)?, u64::from(first), 0xffff)? as u16;
    words.keyword("to")?;
    let component = words.next("component name")?.to_string();
    words.end()?;
    Ok(Grant::Ports(PortRange { first, last }, component))
}

fn irq_line(mut words: Words) -> Result<Grant> {
    let gsi = ranged("GSI", number(words.next("GSI")?)?, 0, 255)?;
    words.keyword("to")?;
    let component = words.next("component name")?.to_string();
    words.end()?;
    Ok(Grant::Irq(gsi, component))
}

/// Reads a manifest.
pub fn parse(text: &str) -> core::result::Result<Manifest, ManifestError> {
    let mut drafts: Vec<Draft> = Vec::new();
    let mut semaphores = Vec::new();
    let mut grants: Vec<(Grant, usize)> = Vec::new();
    // Whether property lines go to the last draft.
    let mut in_component = false;

    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let fail = |kind| ManifestError { line, kind };
        let content = raw.split('#').next().unwrap_or("").trim();
        let Some(keyword) = content.split_whitespace().next() else {
            continue;
        };
        let rest = content[keyword.len()..].trim();
        let mut words = Words {
            iter: rest.split_whitespace(),
        };
        match keyword {
            "component" => {
                let name = name(
                    "component name",
                    words.next("component name").map_err(fail)?,
                    COMPONENT_NAME_MAX,
                )
                .map_err(fail)?;
                words.end().map_err(fail)?;
                if drafts.iter().any(|d| d.name == name) {
                    return Err(fail(ErrorKind::DuplicateComponent(name)));
                }
                if drafts.len() == MAX_COMPONENTS {
                    return Err(fail(ErrorKind::TooManyComponents));
                }
                drafts.push(Draft {
                    name,
                    line,
                    ..Draft::default()
                });
                in_component = true;
            }
            "semaphore" => {
                in_component = false;
                let (semaphore, more) =
                    semaphore_line(words, semaphores.len(), line).map_err(fail)?;
                semaphores.push(semaphore);
                grants.extend(more.into_iter().map(|g| (g, line)));
            }
            "ioports" => {
                in_component = false;
                grants.push((ports_line(words).map_err(fail)?, line));
            }
            "irq" => {
                in_component = false;
                grants.push((irq_line(words).map_err(fail)?, line));
            }
            _ => match drafts.last_mut() {
                Some(draft) if in_component => {
                    draft.property(keyword, rest, words, line).map_err(fail)?;
                }
                _ => {
                    let kind = if KNOWN_PROPERTIES.contains(&keyword) {
                        ErrorKind::OutsideComponent(keyword.to_string())
                    } else {
                        ErrorKind::UnknownKeyword(keyword.to_string())
                    };
                    return Err(fail(kind));
                }
            },
        }
    }

    resolve(drafts, semaphores, grants)
}

const KNOWN_PROPERTIES: &[&str] = &[
    "module", "priority", "ceiling", "budget", "memory", "stack", "quota", "capacity", "args",
    "provides", "uses", "restart", "ram", "file", "shared", "dma", "pci",
];

/// Checks a selector a manifest gives to `component` and records it.
fn claim_selector(
    taken: &mut Vec<(usize, u64)>,
    component: &Component,
    index: usize,
    selector: u64,
) -> Result<()> {
    if selector < FIRST_MANIFEST_SELECTOR {
        return Err(ErrorKind::SelectorReserved(selector));
    }
    if selector >= component.capacity {
        return Err(ErrorKind::SelectorBeyondCapacity {
            selector,
            capacity: component.capacity,
        });
    }
    if taken.contains(&(index, selector)) {
        return Err(ErrorKind::SelectorTaken {
            component: component.name.clone(),
            selector,
        });
    }
    taken.push((index, selector));
    Ok(())
}

fn resolve(
    drafts: Vec<Draft>,
    mut semaphores: Vec<Semaphore>,
    grants: Vec<(Grant, usize)>,
) -> core::result::Result<Manifest, ManifestError> {
    let uses: Vec<Vec<(String, u64, usize)>> = drafts.iter().map(|d| d.uses.clone()).collect();
    let mut devices: Vec<PciRequest> = Vec::new();
    let mut shared: Vec<(String, u64)> = Vec::new();
    let mut drafts = drafts;
    for draft in drafts.iter_mut() {
        let first_device = devices.len();
        for request in &draft.pci {
            let nth = devices
                .iter()
                .filter(|d| (d.vendor, d.device) == (request.vendor, request.device))
                .count();
            devices.push(PciRequest { nth, ..*request });
        }
        if devices.len() as u64 * MSIS_PER_DEVICE > moat_abi::MSI_COUNT {
            return Err(ManifestError {
                line: draft.line,
                kind: ErrorKind::TooManyDevices,
            });
        }
        for mapping in draft.mappings.iter_mut() {
            match &mut mapping.source {
                MappingSource::Pci(index) => *index += first_device,
                MappingSource::Shared { index, bytes } => {
                    match shared.iter().position(|(n, _)| *n == mapping.name) {
                        Some(at) if shared[at].1 == *bytes => *index = at,
                        Some(_) => {
                            return Err(ManifestError {
                                line: draft.line,
                                kind: ErrorKind::SharedSizeMismatch(mapping.name.clone()),
                            })
                        }
                        None => {
                            *index = shared.len();
                            shared.push((mapping.name.clone(), *bytes));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut components = drafts
        .into_iter()
        .map(Draft::finish)
        .collect::<core::result::Result<Vec<_>, _>>()?;
    if components.is_empty() {
        return Err(ManifestError {
            line: 1,
            kind: ErrorKind::NoComponents,
        });
    }

    for (i, component) in components.iter().enumerate() {
        if let Some(portal) = &component.provides {
            if let Some(first) = components[..i]
                .iter()
                .find(|c| c.provides.as_ref() == Some(portal))
            {
                return Err(ManifestError {
                    line: component.line,
                    kind: ErrorKind::ProvidedTwice {
                        name: portal.clone(),
                        first: first.name.clone(),
                    },
                });
            }
        }
    }

    let mut taken: Vec<(usize, u64)> = Vec::new();
    for (index, list) in uses.into_iter().enumerate() {
        for (portal, selector, line) in list {
            let fail = |kind| ManifestError { line, kind };
            let provider = components
                .iter()
                .position(|c| c.provides.as_ref() == Some(&portal))
                .ok_or_else(|| fail(ErrorKind::NotProvided(portal.clone())))?;
            claim_selector(&mut taken, &components[index], index, selector).map_err(fail)?;
            components[index].uses.push(Use {
                name: portal,
                selector,
                provider,
            });
        }
    }

    for (grant, line) in grants {
        let fail = |kind| ManifestError { line, kind };
        let find = |name: &str| {
            components
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| fail(ErrorKind::UnknownComponent(name.to_string())))
        };
        match grant {
            Grant::Semaphore(sm, name, selector, up, down) => {
                let component = find(&name)?;
                claim_selector(&mut taken, &components[component], component, selector)
                    .map_err(fail)?;
                semaphores[sm].grants.push(SemaphoreGrant {
                    component,
                    selector,
                    up,
                    down,
                });
            }
            Grant::Ports(range, name) => {
                let component = find(&name)?;
                if let Some(owner) = components
                    .iter()
                    .find(|c| c.ioports.iter().any(|r| r.overlaps(&range)))
                {
                    return Err(fail(ErrorKind::PortsTaken {
                        first: range.first,
                        last: range.last,
                        owner: owner.name.clone(),
                    }));
                }
                components[component].ioports.push(range);
            }
            Grant::Irq(gsi, name) => {
                let component = find(&name)?;
                if let Some(owner) = components.iter().find(|c| c.irqs.contains(&gsi)) {
                    return Err(fail(ErrorKind::IrqTaken {
                        gsi,
                        owner: owner.name.clone(),
                    }));
                }
                components[component].irqs.push(gsi);
            }
        }
    }

    Ok(Manifest {
        components,
        semaphores,
        shared,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
# ping calls echo
component echo
    module echo
    priority 20
    memory 256K
    quota 64K
    provides echo
    restart 5 backoff 20ms fixed

component ping   # the client
    module ping
    priority 10
    budget 2ms
    memory 1M
    stack 32K
    quota 0x10000
    capacity 64
    uses echo at 20
    args calls=10000 verbose
component uart
    module uart
    priority 30
    memory 64K
    quota 16K
semaphore tick count 1 up ping at 21 down uart at 21 updown echo at 9
ioports 0x3f8-0x3ff to uart
ioports 0x60 to uart
irq 4 to uart
";

    fn error(text: &str) -> ManifestError {
        parse(text).expect_err("should not parse")
    }

    fn with(component_lines: &str) -> String {
        alloc::format!(
            "component a\n module a\n priority 1\n memory 8K\n quota 4K\n{component_lines}"
        )
    }

    #[test]
    fn ceiling_defaults_to_the_priority_and_may_not_be_below_it() {
        let base = "component a\nmodule a\npriority 10\nmemory 8K\nquota 4K\n";
        assert_eq!(parse(base).unwrap().components[0].ceiling, 10);
        let m = parse(&format!("{base}ceiling 30\n")).unwrap();
        assert_eq!(
            (m.components[0].priority, m.components[0].ceiling),
            (10, 30)
        );
        let err = parse(&format!("{base}ceiling 9\n")).unwrap_err();
        assert!(
            matches!(
                err.kind,
                ErrorKind::OutOfRange {
                    value: 9,
                    min: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(parse(&format!("{base}ceiling 64\n")).is_err());
        assert!(parse(&format!("{base}ceiling 30\nceiling 31\n")).is_err());
    }

    #[test]
    fn ram_and_file_mappings() {
        let m = parse(&with(
            "ram guest 256M at 0x10000000000\n file kernel vmlinuz at 0x20000000000\n \
             ram heap 5000 at 0x30000000000",
        ))
        .unwrap();
        assert_eq!(
            m.components[0].mappings,
            [
                Mapping {
                    name: "guest".into(),
                    address: 0x100_0000_0000,
                    source: MappingSource::Ram(256 << 20),
                },
                Mapping {
                    name: "kernel".into(),
                    address: 0x200_0000_0000,
                    source: MappingSource::Module("vmlinuz".into()),
                },
                Mapping {
                    name: "heap".into(),
                    address: 0x300_0000_0000,
                    source: MappingSource::Ram(8192),
                },
            ]
        );
        let bad: &[(&str, ErrorKind)] = &[
            (
                "ram guest 1M at 0x10000000001",
                ErrorKind::BadMappingAddress(0x100_0000_0001),
            ),
            (
                "ram guest 1M at 0x1000",
                ErrorKind::BadMappingAddress(0x1000),
            ),
            (
                "ram guest 4M at 0x6fffffe00000",
                ErrorKind::BadMappingAddress(0x6fff_ffe0_0000),
            ),
            (
                "ram guest 65G at 0x10000000000",
                ErrorKind::OutOfRange {
                    what: "ram",
                    value: 65 << 30,
                    min: 1,
                    max: MAX_RAM,
                },
            ),
            (
                "ram a 2M at 0x10000000000\n ram b 1M at 0x10000100000",
                ErrorKind::MappingOverlap("b".into()),
            ),
            (
                "ram a 2M at 0x10000000000\n file a m at 0x20000000000",
                ErrorKind::DuplicateMapping("a".into()),
            ),
            (
                "file k vmlinuz 0x20000000000",
                ErrorKind::Unexpected {
                    word: "0x20000000000".into(),
                    expected: "at",
                },
            ),
            ("ram g 1M at", ErrorKind::Missing("address")),
        ];
        for (lines, kind) in bad {
            assert_eq!(&error(&with(lines)).kind, kind, "{lines}");
        }
    }

    #[test]
    fn reads_a_good_manifest() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.components.len(), 3);
        let echo = &m.components[0];
        assert_eq!(echo.name, "echo");
        assert_eq!(echo.module, "echo");
        assert_eq!(echo.priority, 20);
        assert_eq!(echo.memory, 256 * 1024);
        assert_eq!(echo.quota, 64 * 1024);
        assert_eq!(echo.budget_us, DEFAULT_BUDGET_US);
        assert_eq!(echo.capacity, DEFAULT_CAPACITY);
        assert_eq!(echo.stack, DEFAULT_STACK);
        assert_eq!(echo.provides.as_deref(), Some("echo"));
        assert_eq!(echo.args, None);
        assert_eq!(
            echo.restart,
            RestartPolicy {
                max_restarts: 5,
                backoff_ms: 20,
                doubling: false
            }
        );
        assert_eq!(echo.line, 2);

        let ping = &m.components[1];
        assert_eq!(ping.budget_us, 2000);
        assert_eq!(ping.memory, 1 << 20);
        assert_eq!(ping.stack, 32 * 1024);
        assert_eq!(ping.quota, 0x10000);
        assert_eq!(ping.capacity, 64);
        assert_eq!(ping.args.as_deref(), Some("calls=10000 verbose"));
        assert_eq!(ping.restart, DEFAULT_RESTART);
        assert_eq!(
            ping.uses,
            [Use {
                name: "echo".into(),
                selector: 20,
                provider: 0
            }]
        );

        let uart = &m.components[2];
        assert_eq!(
            uart.ioports,
            [
                PortRange {
                    first: 0x3f8,
                    last: 0x3ff
                },
                PortRange {
                    first: 0x60,
                    last: 0x60
                }
            ]
        );
        assert_eq!(uart.ioports[0].count(), 8);
        assert_eq!(uart.irqs, [4]);

        assert_eq!(m.semaphores.len(), 1);
        let tick = &m.semaphores[0];
        assert_eq!((tick.name.as_str(), tick.count, tick.line), ("tick", 1, 25));
        assert_eq!(
            tick.grants,
            [
                SemaphoreGrant {
                    component: 1,
                    selector: 21,
                    up: true,
                    down: false
                },
                SemaphoreGrant {
                    component: 2,
                    selector: 21,
                    up: false,
                    down: true
                },
                SemaphoreGrant {
                    component: 0,
                    selector: 9,
                    up: true,
                    down: true
                },
            ]
        );
    }

    #[test]
    fn sizes_durations_and_rounding() {
        let m = parse(&with("budget 500us\nstack 5000\nrestart 2 backoff 1s\n")).unwrap();
        let c = &m.components[0];
        assert_eq!(c.budget_us, 500);
        assert_eq!(c.stack, 8192);
        assert_eq!(c.restart.backoff_ms, 1000);
        assert!(c.restart.doubling);
        let m = parse(&with(
            "budget 3\nrestart 0 backoff 7\nmemory_is_not_here_twice 1",
        ))
        .map(|_| ());
        assert!(m.is_err());
        let m = parse(&with("budget 3\nrestart 0 backoff 7\n")).unwrap();
        assert_eq!(m.components[0].budget_us, 3);
        assert_eq!(m.components[0].restart.backoff_ms, 7);
        assert_eq!(m.components[0].restart.max_restarts, 0);
        let m = parse("component b\nmodule b\npriority 63\nmemory 1\nquota 1G\nargs\n").unwrap();
        assert_eq!(m.components[0].memory, 4096);
        assert_eq!(m.components[0].quota, 1 << 30);
        assert_eq!(m.components[0].args.as_deref(), Some(""));
    }

    #[test]
    fn every_malformed_line_is_named() {
        let cases: &[(&str, usize, ErrorKind)] = &[
            ("", 1, ErrorKind::NoComponents),
            ("# nothing\n\n", 1, ErrorKind::NoComponents),
            (
                "frobnicate 3\n",
                1,
                ErrorKind::UnknownKeyword("frobnicate".into()),
            ),
            (
                "priority 3\n",
                1,
                ErrorKind::OutsideComponent("priority".into()),
            ),
            ("component\n", 1, ErrorKind::Missing("component name")),
            (
                "component a b\n",
                1,
                ErrorKind::Unexpected {
                    word: "b".into(),
                    expected: "the end of the line",
                },
            ),
            (
                "component a/b\n",
                1,
                ErrorKind::BadName {
                    what: "component name",
                    name: "a/b".into(),
                    max: COMPONENT_NAME_MAX,
                },
            ),
        ];
        for (text, line, kind) in cases {
            let e = error(text);
            assert_eq!((e.line, &e.kind), (*line, kind), "{text:?}");
        }
    }

    #[test]
    fn bad_property_values() {
        let cases: &[(&str, ErrorKind)] = &[
            (
                "priority 64",
                ErrorKind::OutOfRange {
                    what: "priority",
                    value: 64,
                    min: 0,
                    max: 63,
                },
            ),
            ("priority x", ErrorKind::BadNumber("x".into())),
            ("priority", ErrorKind::Missing("priority")),
            (
                "capacity 20 30",
                ErrorKind::Unexpected {
                    word: "30".into(),
                    expected: "the end of the line",
                },
            ),
            ("memory 12Q", ErrorKind::BadNumber("12Q".into())),
            (
                "memory 0",
                ErrorKind::OutOfRange {
                    what: "memory",
                    value: 0,
                    min: 1,
                    max: 1 << 40,
                },
            ),
            (
                "memory 99999999999999999999",
                ErrorKind::BadNumber("99999999999999999999".into()),
            ),
            ("memory 0xK", ErrorKind::BadNumber("0xK".into())),
            (
                "quota 99999999999G",
                ErrorKind::BadNumber("99999999999G".into()),
            ),
            (
                "budget 0",
                ErrorKind::OutOfRange {
                    what: "budget (µs)",
                    value: 0,
                    min: 1,
                    max: 10_000_000,
                },
            ),
            ("budget 5h", ErrorKind::BadNumber("5h".into())),
            (
                "stack 1K",
                ErrorKind::OutOfRange {
                    what: "stack",
                    value: 1024,
                    min: 4096,
                    max: 1 << 30,
                },
            ),
            (
                "capacity 8",
                ErrorKind::OutOfRange {
                    what: "capacity",
                    value: 8,
                    min: 16,
                    max: MAX_CAPACITY,
                },
            ),
            ("module", ErrorKind::Missing("module name")),
            ("module a", ErrorKind::DuplicateProperty("module")),
            ("uses", ErrorKind::Missing("portal name")),
            ("uses x", ErrorKind::Missing("at")),
            (
                "uses x in 3",
                ErrorKind::Unexpected {
                    word: "in".into(),
                    expected: "at",
                },
            ),
            ("uses x at", ErrorKind::Missing("selector")),
            (
                "provides a\nprovides b",
                ErrorKind::SecondPortal("b".into()),
            ),
            ("restart", ErrorKind::Missing("number of restarts")),
            ("restart 3 backoff", ErrorKind::Missing("back-off")),
            (
                "restart 3 often",
                ErrorKind::Unexpected {
                    word: "often".into(),
                    expected: "'backoff', 'doubling' or 'fixed'",
                },
            ),
            (
                "restart 3 fixed now",
                ErrorKind::Unexpected {
                    word: "now".into(),
                    expected: "the end of the line",
                },
            ),
            (
                "restart 1001",
                ErrorKind::OutOfRange {
                    what: "restarts",
                    value: 1001,
                    min: 0,
                    max: MAX_RESTARTS,
                },
            ),
            (
                "restart 1\nrestart 2",
                ErrorKind::DuplicateProperty("restart"),
            ),
            ("args a\nargs b", ErrorKind::DuplicateProperty("args")),
            ("colour blue", ErrorKind::UnknownKeyword("colour".into())),
        ];
        for (lines, kind) in cases {
            let text = with(lines);
            let e = error(&text);
            assert_eq!(&e.kind, kind, "{lines:?}");
            assert_eq!(e.line, text.lines().count(), "{lines:?}");
        }
        let long = alloc::format!("args {}", "x".repeat(ARGS_MAX + 1));
        assert_eq!(
            error(&with(&long)).kind,
            ErrorKind::ArgsTooLong(ARGS_MAX + 1)
        );
    }

    #[test]
    fn missing_required_properties_name_the_component_line() {
        let e = error("component a\nmodule a\n\ncomponent b\nmodule b\npriority 1\nmemory 8K\n");
        assert_eq!(e.line, 1);
        assert_eq!(
            e.kind,
            ErrorKind::MissingProperty {
                component: "a".into(),
                property: "priority"
            }
        );
        assert_eq!(
            e.to_string(),
            "manifest line 1: component 'a' has no 'priority'"
        );
    }

    #[test]
    fn references_and_conflicts() {
        let two = "component a\n module a\n priority 1\n memory 8K\n quota 4K\n provides p\n\
                   component b\n module b\n priority 1\n memory 8K\n quota 4K\n capacity 16\n";
        let cases: &[(&str, usize, ErrorKind)] = &[
            (" uses q at 5\n", 13, ErrorKind::NotProvided("q".into())),
            (" uses p at 2\n", 13, ErrorKind::SelectorReserved(2)),
            (
                " uses p at 16\n",
                13,
                ErrorKind::SelectorBeyondCapacity {
                    selector: 16,
                    capacity: 16,
                },
            ),
            (
                " uses p at 5\nsemaphore s up b at 5\n",
                14,
                ErrorKind::SelectorTaken {
                    component: "b".into(),
                    selector: 5,
                },
            ),
            (
                " provides p\n",
                7,
                ErrorKind::ProvidedTwice {
                    name: "p".into(),
                    first: "a".into(),
                },
            ),
            (
                "component a\n",
                13,
                ErrorKind::DuplicateComponent("a".into()),
            ),
            (
                "semaphore s up c at 5\n",
                13,
                ErrorKind::UnknownComponent("c".into()),
            ),
            (
                "semaphore s\n",
                13,
                ErrorKind::Missing("'up', 'down' or 'updown' COMPONENT at SELECTOR"),
            ),
            (
                "semaphore s sideways a at 3\n",
                13,
                ErrorKind::Unexpected {
                    word: "sideways".into(),
                    expected: "'up', 'down' or 'updown'",
                },
            ),
            ("semaphore s up a\n", 13, ErrorKind::Missing("at")),
            (
                "semaphore s\n priority 3\n",
                13,
                ErrorKind::Missing("'up', 'down' or 'updown' COMPONENT at SELECTOR"),
            ),
            (
                "semaphore s up a at 3\n priority 3\n",
                14,
                ErrorKind::OutsideComponent("priority".into()),
            ),
            (
                "ioports 0x3f8-0x3ff to a\nioports 0x3fa to b\n",
                14,
                ErrorKind::PortsTaken {
                    first: 0x3fa,
                    last: 0x3fa,
                    owner: "a".into(),
                },
            ),
            (
                "ioports 0x3ff-0x3f8 to a\n",
                13,
                ErrorKind::OutOfRange {
                    what: "port",
                    value: 0x3f8,
                    min: 0x3ff,
                    max: 0xffff,
                },
            ),
            (
                "ioports 0x10000 to a\n",
                13,
                ErrorKind::OutOfRange {
                    what: "port",
                    value: 0x10000,
                    min: 0,
                    max: 0xffff,
                },
            ),
            (
                "ioports 0x60 a\n",
                13,
                ErrorKind::Unexpected {
                    word: "a".into(),
                    expected: "to",
                },
            ),
            (
                "ioports 0x60 to nobody\n",
                13,
                ErrorKind::UnknownComponent("nobody".into()),
            ),
            (
                "irq 4 to a\nirq 4 to b\n",
                14,
                ErrorKind::IrqTaken {
                    gsi: 4,
                    owner: "a".into(),
                },
            ),
            (
                "irq 256 to a\n",
                13,
                ErrorKind::OutOfRange {
                    what: "GSI",
                    value: 256,
                    min: 0,
                    max: 255,
                },
            ),
        ];
        for (more, line, kind) in cases {
            let text = alloc::format!("{two}{more}");
            let e = error(&text);
            assert_eq!((e.line, &e.kind), (*line, kind), "{more:?}");
        }
    }

    #[test]
    fn too_many_components() {
        let mut text = String::new();
        for i in 0..=MAX_COMPONENTS {
            text.push_str(&alloc::format!(
                "component c{i}\nmodule m\npriority 1\nmemory 4K\nquota 4K\n"
            ));
        }
        let e = error(&text);
        assert_eq!(
            (e.line, e.kind),
            (5 * MAX_COMPONENTS + 1, ErrorKind::TooManyComponents)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let words = [
            "component",
            "module",
            "priority",
            "memory",
            "quota",
            "uses",
            "at",
            "provides",
            "semaphore",
            "up",
            "down",
            "ioports",
            "to",
            "irq",
            "restart",
            "backoff",
            "args",
            "1",
            "0x",
            "-",
            "64K",
            "99999999999999999999999",
            "#",
            "\n",
            "a",
            "b",
            "3",
            "0x3f8-0x3ff",
            "é",
            "\t",
            "",
        ];
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(words[(seed % words.len() as u64) as usize]);
                text.push(if seed & 0x100 == 0 { ' ' } else { '\n' });
            }
            seed = seed.wrapping_add(1);
            let _ = parse(&text);
        }
        let m = parse(GOOD).unwrap();
        assert!(m
            .components
            .iter()
            .all(|c| c.uses.iter().all(|u| u.provider < m.components.len())));
    }

    #[test]
    fn shared_dma_and_pci_lines() {
        let text = "\
component drv
    module blk
    priority 20
    memory 256K
    quota 64K
    pci dev 1af4:1042 at 0x20000000000
    pci dev2 1af4:1042 at 0x21000000000
    dma dma 16K at 0x30000000000
    shared c0 64K at 0x10000000000
component client
    module blktest
    priority 10
    memory 128K
    quota 64K
    shared c0 64K at 0x10000000000
";
        let m = parse(text).expect("parses");
        assert_eq!(m.shared, [("c0".to_string(), 64 * 1024)]);
        assert_eq!(m.devices.len(), 2);
        assert_eq!((m.devices[0].nth, m.devices[1].nth), (0, 1));
        assert_eq!(m.devices[1].vendor, 0x1af4);
        let sources: Vec<_> = m.components[0]
            .mappings
            .iter()
            .map(|x| x.source.clone())
            .collect();
        assert_eq!(
            sources,
            [
                MappingSource::Pci(0),
                MappingSource::Pci(1),
                MappingSource::Dma(16 * 1024),
                MappingSource::Shared {
                    index: 0,
                    bytes: 64 * 1024
                },
            ]
        );
        assert_eq!(m.components[0].mappings[2].source.own_pages(), 4);
        let mismatch = format!(
            "{text}component other\n module blktest\n priority 1\n memory 128K\n quota 64K\n shared c0 8K at 0x10000000000\n"
        );
        assert!(parse(&mismatch).is_err());
        let overlapping = text.replace("0x21000000000", "0x20000001000");
        assert!(matches!(
            parse(&overlapping).map_err(|e| e.kind),
            Err(ErrorKind::MappingOverlap(_))
        ));
        assert!(parse(&text.replace("1af4:1042", "1af4")).is_err());
    }
}
