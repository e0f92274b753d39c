//! The virtio-pci transport with each virtio device, and the split
//! virtqueue behind a scripted device, driven as a guest driver would
//! (through `vdev::virtio::mock`: CF8/CFC, BAR accesses, rings in RAM) and
//! then abused: hostile descriptor chains and indices written straight
//! into the rings, register writes in any order, host input at any time.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Debug;
use std::rc::Rc;

use arbitrary::{Arbitrary, Unstructured};
use vdev::pci::config::{BAR0, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use vdev::virtio::block::{Block, MemDisk, SECTOR_SIZE};
use vdev::virtio::console::{Console, PortBackend};
use vdev::virtio::mock::{Driver, Machine, MMIO_BASE};
use vdev::virtio::net::{EchoPeer, Net, ECHO_PEER_IP, ECHO_PEER_MAC};
use vdev::virtio::pci::{common, BAR_SIZE, STATUS_DRIVER_OK};
use vdev::virtio::queue::QueueError;
use vdev::virtio::rng::{Rng, SplitMix64};
use vdev::virtio::{
    DeviceIo, VirtioDevice, DEVICE_TYPE_BLOCK, DEVICE_TYPE_CONSOLE, DEVICE_TYPE_ENTROPY,
    DEVICE_TYPE_NET,
};
use vdev::BusDevice;

use crate::{for_each_op, Access};

/// Guest RAM the buffers point into (after the rings).
const DATA_LEN: u64 = 0x1_0000;
/// Entries of the one indirect table the driver reuses.
const INDIRECT_MAX: usize = 16;
const MAX_BUFFERS: usize = 8;
/// Bring-ups again per input (each may take fresh rings from RAM).
const MAX_AGAINS: usize = 32;

/// Where a buffer lies: in the data area, or anywhere at all.
#[derive(Arbitrary, Debug)]
enum Buffer {
    Data { offset: u16, len: u16 },
    Wild { addr: u64, len: u32 },
}

#[derive(Arbitrary, Debug)]
struct BufferSpec {
    buffer: Buffer,
    writable: bool,
}

/// How the driver brings the device up before the operations start.
#[derive(Arbitrary, Debug)]
struct BringUp {
    /// Device features the driver declines (0: take all)...
    decline: u64,
    /// ...or, if set, exactly these.
    offer: Option<u64>,
    msix: bool,
    /// Per queue: 0 takes the offered size, else this many entries.
    sizes: [u8; 4],
    vectors: [Option<u16>; 4],
    driver_ok: bool,
}

#[derive(Arbitrary, Debug)]
enum Op<H> {
    Add {
        queue: u8,
        buffers: Vec<BufferSpec>,
    },
    AddIndirect {
        queue: u8,
        buffers: Vec<BufferSpec>,
    },
    Kick(u16),
    Used(u8),
    /// Any register of the BAR (common, ISR, device config, notify, MSI-X).
    Bar(Access),
    /// Configuration space through CF8/CFC.
    Config {
        register: u8,
        width: u8,
        value: u32,
        write: bool,
    },
    /// Guest memory anywhere from the rings to the end of the data area:
    /// descriptors, ring indices and flags, buffers.
    Poke {
        at: u32,
        bytes: Vec<u8>,
    },
    SetAvailIdx {
        queue: u8,
        idx: u16,
    },
    /// Reset the device and bring it up again.
    Again(BringUp),
    Host(H),
}

/// A virtio device with its host-side inputs of type `H`.
trait Harness {
    type Device: VirtioDevice + 'static;
    type Host: for<'a> Arbitrary<'a> + Debug;
    const TYPE: u16;
    fn device(&self) -> Self::Device;
    fn host(&self, device: &mut Self::Device, op: Self::Host);
}

fn bring_up(driver: &mut Driver<'_>, queues: u16, how: &BringUp) {
    let features = match how.offer {
        Some(features) => features,
        None => driver.device_features() & !how.decline,
    };
    driver.negotiate(features);
    if how.msix {
        driver.enable_msix();
        driver.write(common::MSIX_CONFIG, 2, 0);
    }
    for q in 0..queues.min(4) {
        let size = match how.sizes[usize::from(q)] {
            0 => None,
            n => Some(u16::from(n)),
        };
        let vector = how.vectors[usize::from(q)].unwrap_or(q + 1);
        driver.setup_queue(q, size, vector);
    }
    if how.driver_ok {
        driver.set_status(driver.status() | STATUS_DRIVER_OK);
    }
}

fn run<T: Harness>(data: &[u8], harness: T) {
    let mut u = Unstructured::new(data);
    let Ok(first) = BringUp::arbitrary(&mut u) else {
        return;
    };
    let m = Machine::new();
    let device = m.plug(harness.device());
    let queues = device.borrow().device().queue_count();
    let mut driver = Driver::probe(&m, T::TYPE);
    bring_up(&mut driver, queues, &first);
    let ring_start = 0x1_0000;
    let indirect = m.alloc(16 * INDIRECT_MAX as u64, 16);
    let data_base = m.alloc(DATA_LEN, 16);
    let span = data_base + DATA_LEN - ring_start;
    let mut agains = 0;
    let buffers = |specs: &[BufferSpec]| -> Vec<(u64, u32, bool)> {
        specs
            .iter()
            .take(MAX_BUFFERS)
            .map(|spec| match spec.buffer {
                Buffer::Data { offset, len } => {
                    (data_base + u64::from(offset), u32::from(len), spec.writable)
                }
                Buffer::Wild { addr, len } => (addr, len, spec.writable),
            })
            .collect()
    };
    for_each_op(&mut u, |op: Op<T::Host>| match op {
        Op::Add { queue, buffers: b } => {
            if let Some(q) = pick(&driver, queue) {
                driver.queues[q].add(&m.mem, &buffers(&b));
            }
        }
        Op::AddIndirect { queue, buffers: b } => {
            let list = buffers(&b);
            if let Some(q) = pick(&driver, queue).filter(|_| !list.is_empty()) {
                driver.queues[q].add_indirect(&m.mem, indirect, &list);
            }
        }
        Op::Kick(queue) => driver.kick(queue),
        Op::Used(queue) => {
            if let Some(q) = pick(&driver, queue) {
                driver.queues[q].used(&m.mem);
            }
        }
        Op::Bar(a) => {
            let offset = driver.bar - MMIO_BASE + u64::from(a.offset) % (BAR_SIZE + 8);
            let width = a.width.bytes();
            let mut raw = a.value.to_le_bytes();
            if a.write {
                m.mmio.borrow_mut().write(offset, &raw[..width]);
            } else {
                m.mmio.borrow_mut().read(offset, &mut raw[..width]);
            }
        }
        Op::Config {
            register,
            width,
            value,
            write,
        } => {
            let width = [1, 2, 4][usize::from(width % 3)];
            let register = register & !(width as u8 - 1);
            if write {
                m.cfg_write(driver.slot, register, width, value);
            } else {
                m.cfg_read(driver.slot, register, width);
            }
        }
        Op::Poke { at, bytes } => {
            let at = ring_start + u64::from(at) % span;
            let len = bytes.len().min((ring_start + span - at) as usize);
            m.mem.put(at, &bytes[..len]);
        }
        Op::SetAvailIdx { queue, idx } => {
            if let Some(q) = pick(&driver, queue) {
                driver.queues[q].set_avail_idx(&m.mem, idx);
            }
        }
        Op::Again(how) => {
            // As a driver probing again: its BAR where it put it, decoding.
            m.cfg_write(driver.slot, BAR0 as u8, 4, driver.bar as u32);
            m.cfg_write(driver.slot, BAR0 as u8 + 4, 4, (driver.bar >> 32) as u32);
            let command = COMMAND_MEMORY | COMMAND_BUS_MASTER;
            m.cfg_write(driver.slot, COMMAND as u8, 2, u32::from(command));
            if agains < MAX_AGAINS {
                agains += 1;
                bring_up(&mut driver, queues, &how);
            }
        }
        Op::Host(op) => device.borrow_mut().update(|d| harness.host(d, op)),
    });
    device.borrow().last_error();
}

/// Queue `raw` of the driver's, if it set any up.
fn pick(driver: &Driver<'_>, raw: u8) -> Option<usize> {
    let n = driver.queues.len();
    (n > 0 && driver.queues[usize::from(raw) % n].size > 0).then(|| usize::from(raw) % n)
}

struct Discard;

impl PortBackend for Discard {
    fn output(&mut self, _data: &[u8]) {}
}

#[derive(Arbitrary, Debug)]
enum ConsoleHost {
    Input { port: u8, data: Vec<u8> },
    Open { port: u8, open: bool },
}

struct ConsoleHarness;

impl Harness for ConsoleHarness {
    type Device = Console;
    type Host = ConsoleHost;
    const TYPE: u16 = DEVICE_TYPE_CONSOLE;

    fn device(&self) -> Console {
        Console::new(Box::new(Discard), vec![("moat0", Box::new(Discard))])
    }

    fn host(&self, console: &mut Console, op: ConsoleHost) {
        match op {
            ConsoleHost::Input { port, data } => {
                console.port_input(u32::from(port % 4), &data);
            }
            ConsoleHost::Open { port, open } => console.set_host_open(u32::from(port % 4), open),
        }
    }
}

/// virtio-console with hvc0 and one named port (multiport control queues).
pub fn console(data: &[u8]) {
    run(data, ConsoleHarness);
}

struct BlockHarness;

const DISK_SECTORS: usize = 64;

impl Harness for BlockHarness {
    type Device = Block<MemDisk>;
    type Host = ();
    const TYPE: u16 = DEVICE_TYPE_BLOCK;

    fn device(&self) -> Block<MemDisk> {
        Block::new(
            MemDisk::new(vec![0; DISK_SECTORS * SECTOR_SIZE as usize]),
            b"fuzz",
        )
    }

    fn host(&self, _block: &mut Block<MemDisk>, _op: ()) {}
}

/// virtio-blk on a 32 KiB disk in memory.
pub fn block(data: &[u8]) {
    run(data, BlockHarness);
}

struct NetHarness;

impl Harness for NetHarness {
    type Device = Net<EchoPeer>;
    type Host = Vec<u8>;
    const TYPE: u16 = DEVICE_TYPE_NET;

    fn device(&self) -> Net<EchoPeer> {
        Net::new(
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            EchoPeer::new(ECHO_PEER_MAC, ECHO_PEER_IP),
        )
    }

    fn host(&self, net: &mut Net<EchoPeer>, frame: Vec<u8>) {
        net.receive(&frame);
    }
}

/// virtio-net wired to the VMM's echo peer (which parses what the guest
/// sends: ARP, IPv4, ICMP).
pub fn net(data: &[u8]) {
    run(data, NetHarness);
}

struct RngHarness;

impl Harness for RngHarness {
    type Device = Rng;
    type Host = ();
    const TYPE: u16 = DEVICE_TYPE_ENTROPY;

    fn device(&self) -> Rng {
        Rng::new(Box::new(SplitMix64(0x5eed)))
    }

    fn host(&self, _rng: &mut Rng, _op: ()) {}
}

/// virtio-rng.
pub fn rng(data: &[u8]) {
    run(data, RngHarness);
}

/// What the scripted device does with each chain it pops, one byte each
/// from the script (an empty script pushes every chain back unread).
#[derive(Default)]
struct Scripted {
    script: Rc<RefCell<VecDeque<u8>>>,
}

/// A device type no model has: the queue alone is under test.
const SCRIPTED_TYPE: u16 = 0x1f;

impl VirtioDevice for Scripted {
    fn device_type(&self) -> u16 {
        SCRIPTED_TYPE
    }
    fn queue_count(&self) -> u16 {
        2
    }
    fn features(&self) -> u64 {
        0
    }
    fn config_len(&self) -> usize {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn reset(&mut self) {}

    fn process(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let mut script = self.script.borrow_mut();
        let mut next = || script.pop_front().unwrap_or(0);
        for queue in 0..2 {
            while let Some(chain) = io.pop(queue)? {
                let readable = chain.readable_len();
                let writable = chain.writable_len();
                let mut reader = chain.reader();
                let mut writer = chain.writer(u64::from(next()) << (next() % 24));
                let mut buf = vec![0u8; usize::from(next()) * 16];
                for _ in 0..next() % 8 {
                    match next() % 4 {
                        0 => {
                            let n = reader.read(io.mem(), &mut buf).unwrap_or(0);
                            assert!(n <= buf.len());
                        }
                        1 => {
                            let n = writer.write(io.mem(), &buf).unwrap_or(0);
                            assert!(n <= buf.len());
                        }
                        2 => reader.skip(u64::from(next()) << (next() % 40)),
                        _ => writer.skip(u64::from(next()) << (next() % 40)),
                    }
                    assert!(reader.done() <= readable && writer.done() <= writable);
                }
                let len = u32::from_le_bytes([next(), next(), next(), next()]);
                io.push(queue, &chain, len)?;
            }
        }
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum QueueHost {
    /// Bytes the device's next chains are handled by.
    Script(Vec<u8>),
}

struct QueueHarness {
    script: Rc<RefCell<VecDeque<u8>>>,
}

impl Harness for QueueHarness {
    type Device = Scripted;
    type Host = QueueHost;
    const TYPE: u16 = SCRIPTED_TYPE;

    fn device(&self) -> Scripted {
        Scripted {
            script: self.script.clone(),
        }
    }

    fn host(&self, _device: &mut Scripted, op: QueueHost) {
        let QueueHost::Script(bytes) = op;
        self.script.borrow_mut().extend(bytes);
    }
}

/// The split virtqueue: pop (chain walks, indirect tables), the chain
/// cursors, push, interrupt suppression.
pub fn queue(data: &[u8]) {
    run(
        data,
        QueueHarness {
            script: Rc::default(),
        },
    );
}
