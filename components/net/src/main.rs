//! `net`: a user-level driver for the machine's virtio-net PCI device
//! (virtio 1.x, modern interface) and the virtual switch behind it. The
//! device is the switch's port 0, the uplink; client N (a guest's VMM, a
//! native component) is port N + 1.
//!
//! One component rather than a driver and a switch apart: the uplink is
//! then just a port, a frame crosses one copy between the device's DMA
//! buffers and a client's ring (no third party and no second copy), and
//! one semaphore wakes the whole thing. A crash of either half would take
//! the other's traffic anyway.
//!
//! From the manifest it gets the device (`pci dev 1af4:1041`), DMA memory
//! (`dma dma 136K`: two queue pages, 32 receive and 32 transmit buffers of
//! 2 KiB), and per client a region `nN` (`shared`, [`net::REGION`] bytes)
//! and its MAC address `nN.mac=`, which is the only source address the
//! port may send from and the only one that reaches it. Semaphores:
//! selector 30 is upped by the clients when they queued frames and by the
//! device's MSI-X message (both queues' vector), 31 + N by us when client
//! N has frames. Frames are checked and forwarded by `common::net`'s
//! [`Switch`]; what it drops is counted, and the first drop of each kind
//! on each port is reported. A frame whose one destination has no room
//! is not dropped at once: it stays in the device's receive queue or the
//! sender's transmit ring, and that source waits, until the destination
//! makes room (it ups us: `common::net`'s `rx_wanted`) or [`HOLD_MS`]
//! pass.
//!
//! The root task restarts it when it crashes (the manifest's `restart`):
//! the regions and semaphores outlive it, so a new instance resets the
//! device, resumes every client's rings where they stand, bumps their
//! `switch_starts` and ups their semaphores. For the system test that
//! shows it, `crash-len=N` makes it fault on purpose when a client sends
//! a frame of exactly N bytes.
#![no_std]
#![no_main]

use common::args;
use common::net::{self, Drop, Forward, MacText, Switch, MAX_FRAME};
use common::virtio_pci::{Transport, DESC_WRITE};
use core::sync::atomic::{fence, Ordering};
use moat_user::mmio::{window_arg, Window};
use moat_user::{println, sys};

moat_user::entry!(main);

const SWITCH_SM: u64 = 30;
const CLIENT_SM_BASE: u64 = 31;
const MAX_CLIENTS: usize = net::MAX_PORTS - 1;
const UPLINK: usize = 0;

/// VIRTIO_NET_F_MAC.
const FEATURE_MAC: u32 = 1 << 5;
/// `virtio_net_hdr` of VERSION_1 (with `num_buffers`), in front of every
/// frame both ways; we ask for no offloads, so ours is all zeros.
const NET_HDR: u64 = 12;
const RX: u16 = 0;
const TX: u16 = 1;
const QUEUE_ENTRIES: u16 = 32;

// The DMA memory: a page per queue, then the receive and the transmit
// buffers, two to a page (none straddles a page: the pages need not be
// physically contiguous).
const DESC_AT: u64 = 0;
const AVAIL_AT: u64 = 0x200;
const USED_AT: u64 = 0x400;
const PAGE: u64 = 4096;
const BUFFER: u64 = 2048;
const RX_BUFFERS_PAGE: u64 = 2;
const TX_BUFFERS_PAGE: u64 = RX_BUFFERS_PAGE + QUEUE_ENTRIES as u64 * BUFFER / PAGE;
const DMA_PAGES: usize = (TX_BUFFERS_PAGE + QUEUE_ENTRIES as u64 * BUFFER / PAGE) as usize;
/// Passes over all rings per wake-up before waiting again (a busy
/// client cannot keep the switch from waiting on its semaphore for long,
/// and what is left is found at the next wake-up).
const MAX_PASSES: usize = 8;
/// How long a frame for a port without room is held where it is (the
/// device's receive queue, the sender's transmit ring) before it is
/// dropped.
const HOLD_MS: u64 = 20;
/// After a hold ran out, frames for that port that find no room are
/// dropped at once for this many [`HOLD_MS`]: a port that keeps its
/// ring full holds the others up for at most 1/50 of the time.
const HOLD_COOLDOWN: u64 = 50;

fn fail(what: &str) -> i32 {
    println!("net: FAIL {what}");
    1
}

fn main(args: &str) -> i32 {
    // SAFETY: the root task maps what these arguments name (manifest
    // `pci` and `dma` lines).
    let (config, dma) = unsafe { (window_arg(args, "dev"), window_arg(args, "dma")) };
    let (Some(config), Some(dma)) = (config, dma) else {
        return fail("no 'dev' or 'dma' mapping in the arguments");
    };
    let Some(msi) = args::value(args, "dev.msi")
        .and_then(|v| v.split(',').next())
        .and_then(args::parse_number)
    else {
        return fail("no MSIs");
    };
    let device = match Device::start(args, config, dma, msi) {
        Ok(device) => device,
        Err(what) => return fail(what),
    };
    println!(
        "net: virtio-net ready: uplink MAC {}, {} receive buffers, completion by MSI-X",
        MacText::new(&device.mac).as_str(),
        device.rx_size
    );

    let mut clients: [Option<Client>; MAX_CLIENTS] = [None; MAX_CLIENTS];
    let mut ports = 1;
    let mut macs = [None; MAX_CLIENTS];
    for (i, client) in clients.iter_mut().enumerate() {
        let name = [b'n', b'0' + i as u8];
        let name = core::str::from_utf8(&name).unwrap_or("");
        // SAFETY: as above (manifest `shared` lines).
        let Some(region) = (unsafe { window_arg(args, name) }) else {
            continue;
        };
        let mut key = [0u8; 6];
        key[..2].copy_from_slice(name.as_bytes());
        key[2..].copy_from_slice(b".mac");
        let mac = core::str::from_utf8(&key)
            .ok()
            .and_then(|k| args::value(args, k))
            .and_then(net::parse_mac);
        let Some(mac) = mac else {
            println!("net: client {i} has no MAC address (n{i}.mac=): left out");
            continue;
        };
        if region.len() < net::REGION as u64 {
            println!("net: client {i}'s region is too small: left out");
            continue;
        }
        println!(
            "net: port {}: client {i}, MAC {}",
            i + 1,
            MacText::new(&mac).as_str()
        );
        macs[i] = Some(mac);
        ports = i + 2;
        *client = Some(Client {
            region,
            tx_tail: region.read::<u32>(net::TX_TAIL as u64),
            rx_head: region.read::<u32>(net::RX_HEAD as u64),
            broken: false,
            wake: false,
        });
    }
    let crash_len = match args::number(args, "crash-len", 0) {
        Ok(len) => len as usize,
        Err(_) => return fail("crash-len= is not a number"),
    };
    let mut switch = Switch::new(ports);
    for (i, mac) in macs.iter().enumerate() {
        if let Some(mac) = mac {
            if !switch.fix(i + 1, *mac) {
                println!("net: client {i}'s MAC is a group address or another's: left out");
                clients[i] = None;
            }
        }
    }
    let mut node = Node {
        device,
        clients,
        switch,
        reported: [[false; 6]; net::MAX_PORTS],
        crash_len,
        hold_ticks: args::tsc_hz(args) / 1000 * HOLD_MS,
        held_since: [None; net::MAX_PORTS],
        no_hold_until: [0; net::MAX_PORTS],
    };
    // Each client learns that this instance started (its `switch_starts`
    // moves) and looks at its rings: after a restart, frames may wait.
    let mut starts = 0;
    for client in node.clients.iter_mut().flatten() {
        starts = client
            .region
            .read::<u32>(net::SWITCH_STARTS as u64)
            .wrapping_add(1);
        client
            .region
            .write::<u32>(net::SWITCH_STARTS as u64, starts);
        client.wake = true;
    }
    if starts > 1 {
        println!("net: restarted (start {starts}): resuming the clients' rings");
    }
    let _ = sys::sm_up(SWITCH_SM);
    loop {
        // A held frame is looked at again when its port makes room (it
        // ups us) or when its time is up, whichever comes first.
        let deadline = node
            .held_since
            .iter()
            .flatten()
            .min()
            .map_or(0, |since| since + node.hold_ticks.max(1));
        match sys::sm_down(SWITCH_SM, deadline, false) {
            Ok(()) | Err(moat_user::abi::Status::Timeout) => {}
            Err(status) => {
                println!("net: FAIL sm_down: {status}");
                return 1;
            }
        }
        for _ in 0..MAX_PASSES {
            if !node.pass() {
                break;
            }
        }
        node.device.kick();
        node.wake_clients();
    }
}

struct Node {
    device: Device,
    clients: [Option<Client>; MAX_CLIENTS],
    switch: Switch,
    /// Drops reported, per port and kind (the first of each only).
    reported: [[bool; 6]; net::MAX_PORTS],
    /// A client's frame of this length crashes us (0: none does).
    crash_len: usize,
    /// [`HOLD_MS`] in TSC ticks.
    hold_ticks: u64,
    /// Per source port: since when (TSC) its next frame waits for room
    /// at its destination.
    held_since: [Option<u64>; net::MAX_PORTS],
    /// Per destination port: until when (TSC) frames for it are not held
    /// (a frame for it waited [`HOLD_MS`] in vain: [`HOLD_COOLDOWN`]).
    no_hold_until: [u64; net::MAX_PORTS],
}

impl Node {
    /// Moves what waits in the device's receive queue and the clients'
    /// transmit rings; true if anything moved.
    fn pass(&mut self) -> bool {
        let mut moved = false;
        self.device.reclaim_tx();
        let mut frame = [0u8; MAX_FRAME];
        for _ in 0..QUEUE_ENTRIES {
            let Some((id, len)) = self.device.peek_rx(&mut frame) else {
                self.held_since[UPLINK] = None;
                break;
            };
            if matches!(len, Some(len) if self.must_hold(UPLINK, &frame[..len])) {
                break;
            }
            self.device.take_rx(id);
            moved = true;
            match len {
                Some(len) => self.route(UPLINK, &frame[..len]),
                None => self.dropped(UPLINK, Drop::Oversized),
            }
        }
        for i in 0..MAX_CLIENTS {
            for _ in 0..net::RING {
                let Some(client) = self.clients[i].as_mut() else {
                    break;
                };
                let taken = client.peek(&mut frame);
                if matches!(taken, Taken::Nothing | Taken::Broken) {
                    self.held_since[i + 1] = None;
                }
                if matches!(taken, Taken::Frame(len) if self.must_hold(i + 1, &frame[..len])) {
                    break;
                }
                if let Some(client) = self.clients[i].as_mut() {
                    client.advance(&taken);
                }
                match taken {
                    Taken::Nothing => break,
                    Taken::Broken => {
                        println!("net: client {i}'s transmit ring is broken: ignored from now on");
                        break;
                    }
                    Taken::TooLong => {
                        moved = true;
                        self.switch.count_drop(i + 1, Drop::Oversized);
                        self.dropped(i + 1, Drop::Oversized);
                    }
                    Taken::Frame(len) if self.crash_len != 0 && len == self.crash_len => {
                        crash(i, len)
                    }
                    Taken::Frame(len) => {
                        moved = true;
                        self.route(i + 1, &frame[..len]);
                    }
                }
            }
        }
        moved
    }

    /// Whether the frame at the front of port `from`'s queue must stay
    /// there for now: it has one destination and that has no room. A
    /// client without room is asked to up us when it makes some, and
    /// told at once that it has frames; the device's transmit queue ups
    /// us by its interrupt. After [`HOLD_MS`] the frame goes on (to be
    /// dropped and counted), and frames for that port are not held for
    /// a while ([`HOLD_COOLDOWN`]).
    fn must_hold(&mut self, from: usize, frame: &[u8]) -> bool {
        let Some(to) = self.switch.destination(frame).filter(|&to| to != from) else {
            self.held_since[from] = None;
            return false;
        };
        let now = moat_user::rdtsc();
        if self.has_room(to) || now < self.no_hold_until[to] {
            self.held_since[from] = None;
            return false;
        }
        let since = *self.held_since[from].get_or_insert(now);
        if now.wrapping_sub(since) >= self.hold_ticks {
            self.no_hold_until[to] = now.saturating_add(self.hold_ticks * HOLD_COOLDOWN);
            self.held_since[from] = None;
            return false;
        }
        if let Some((i, client)) = self.client_mut(to) {
            if client.want_room() {
                // It made room meanwhile.
                self.held_since[from] = None;
                return false;
            }
            if core::mem::take(&mut client.wake) {
                let _ = sys::sm_up(CLIENT_SM_BASE + i as u64);
            }
        }
        true
    }

    /// Whether port `to` can take a frame now.
    fn has_room(&mut self, to: usize) -> bool {
        if to == UPLINK {
            return self.device.can_transmit();
        }
        self.client_mut(to).is_some_and(|(_, c)| c.has_room())
    }

    /// Port `port`'s client, with its index.
    fn client_mut(&mut self, port: usize) -> Option<(usize, &mut Client)> {
        let i = port.checked_sub(1)?;
        Some((i, self.clients.get_mut(i)?.as_mut()?))
    }

    /// Ups the semaphore of each client given frames (or room in its
    /// transmit ring, which it waited for) since it was last told.
    fn wake_clients(&mut self) {
        for (i, client) in self.clients.iter_mut().enumerate() {
            if let Some(client) = client.as_mut().filter(|c| c.wake) {
                client.wake = false;
                let _ = sys::sm_up(CLIENT_SM_BASE + i as u64);
            }
        }
    }

    fn route(&mut self, from: usize, frame: &[u8]) {
        match self.switch.forward(from, frame) {
            Forward::Port(to) => self.deliver(to, frame),
            Forward::Flood => {
                for to in (0..self.switch.ports()).filter(|&to| to != from) {
                    self.deliver(to, frame);
                }
            }
            Forward::Drop(why) => self.dropped(from, why),
        }
    }

    fn deliver(&mut self, to: usize, frame: &[u8]) {
        let delivered = if to == UPLINK {
            self.device.transmit(frame)
        } else {
            match self.clients.get_mut(to - 1).and_then(Option::as_mut) {
                Some(client) => client.put(frame),
                None => return,
            }
        };
        if delivered {
            self.switch.count_sent(to);
        } else {
            self.switch.count_full(to);
            self.dropped(to, Drop::Full);
        }
    }

    /// Reports the first drop of each kind on each port.
    fn dropped(&mut self, port: usize, why: Drop) {
        let kind = Drop::ALL.iter().position(|&d| d == why).unwrap_or(0);
        if port >= net::MAX_PORTS || self.reported[port][kind] {
            return;
        }
        self.reported[port][kind] = true;
        match port {
            UPLINK => println!(
                "net: uplink: dropped a frame ({}; first of its kind)",
                why.name()
            ),
            _ => println!(
                "net: client {}: dropped a frame ({}; first of its kind)",
                port - 1,
                why.name()
            ),
        }
    }
}

/// Faults on purpose (`crash-len=`), so that the root task restarts us.
fn crash(client: usize, len: usize) -> ! {
    println!("net: crashing on purpose: client {client} sent a frame of {len} bytes (crash-len)");
    // SAFETY: not safe: the write faults on purpose (nothing is mapped at
    // the bottom of the address space), which is the point.
    unsafe { core::ptr::write_volatile(0x28 as *mut u64, 1) };
    sys::exit(3)
}

#[derive(Clone, Copy)]
struct Client {
    region: Window,
    /// The switch's own copies of the indices it owns.
    tx_tail: u32,
    rx_head: u32,
    broken: bool,
    /// Frames were put in its receive ring since it was last told.
    wake: bool,
}

enum Taken {
    Nothing,
    Broken,
    /// A slot whose length is more than a frame may be.
    TooLong,
    Frame(usize),
}

impl Client {
    /// The next frame of its transmit ring, copied out but left there
    /// until [`advance`](Self::advance).
    fn peek(&mut self, frame: &mut [u8; MAX_FRAME]) -> Taken {
        if self.broken {
            return Taken::Nothing;
        }
        let head = self.region.read::<u32>(net::TX_HEAD as u64);
        match net::pending(head, self.tx_tail) {
            None => {
                self.broken = true;
                return Taken::Broken;
            }
            Some(0) => return Taken::Nothing,
            Some(_) => {}
        }
        fence(Ordering::SeqCst);
        let at = net::slot(net::TX_RING, self.tx_tail) as u64;
        let len = self.region.read::<u32>(at);
        let taken = if len as usize > MAX_FRAME {
            Taken::TooLong
        } else {
            self.region.read_bytes(at + 4, &mut frame[..len as usize]);
            Taken::Frame(len as usize)
        };
        taken
    }

    /// Takes the frame [`peek`](Self::peek) saw off the transmit ring;
    /// a client that waits for room is woken (after this pass).
    fn advance(&mut self, taken: &Taken) {
        if !matches!(taken, Taken::Frame(_) | Taken::TooLong) {
            return;
        }
        self.tx_tail = self.tx_tail.wrapping_add(1);
        self.region.write::<u32>(net::TX_TAIL as u64, self.tx_tail);
        fence(Ordering::SeqCst);
        if self.region.read::<u32>(net::TX_WANTED as u64) != 0 {
            self.region.write::<u32>(net::TX_WANTED as u64, 0);
            self.wake = true;
        }
    }

    /// Whether its receive ring has room for a frame.
    fn has_room(&self) -> bool {
        if self.broken {
            return true;
        }
        let tail = self.region.read::<u32>(net::RX_TAIL as u64);
        matches!(net::pending(self.rx_head, tail), Some(n) if n < net::RING)
    }

    /// Asks it to up us when it takes a frame from its receive ring;
    /// true if it has made room meanwhile.
    fn want_room(&self) -> bool {
        self.region.write::<u32>(net::RX_WANTED as u64, 1);
        fence(Ordering::SeqCst);
        self.has_room()
    }

    /// Puts a frame in its receive ring; false if the ring is full.
    fn put(&mut self, frame: &[u8]) -> bool {
        if self.broken || !self.has_room() {
            return false;
        }
        let at = net::slot(net::RX_RING, self.rx_head) as u64;
        self.region.write::<u32>(at, frame.len() as u32);
        self.region.write_bytes(at + 4, frame);
        fence(Ordering::SeqCst);
        self.rx_head = self.rx_head.wrapping_add(1);
        self.region.write::<u32>(net::RX_HEAD as u64, self.rx_head);
        self.wake = true;
        true
    }
}

/// One split virtqueue in a DMA page.
struct Queue {
    notify: Window,
    size: u16,
    /// Offset of its page in the DMA window.
    page: u64,
    avail_idx: u16,
    used_idx: u16,
}

struct Device {
    dma: Window,
    /// Physical addresses of the DMA pages.
    phys: [u64; DMA_PAGES],
    mac: [u8; 6],
    rx: Queue,
    tx: Queue,
    rx_size: u16,
    /// Transmit descriptors (= buffers) free, as a stack.
    tx_free: [u16; QUEUE_ENTRIES as usize],
    tx_free_len: usize,
    /// Frames added to the transmit queue since the last notification.
    tx_added: bool,
    /// Receive buffers given back since the last notification.
    rx_posted: bool,
}

/// The BAR window an argument `dev.barN` names.
fn bar(args: &str, index: u8) -> Option<Window> {
    let key = [b'd', b'e', b'v', b'.', b'b', b'a', b'r', b'0' + index];
    let key = core::str::from_utf8(&key).ok()?;
    // SAFETY: the root task maps the BARs it names.
    unsafe { window_arg(args, key) }
}

impl Device {
    fn start(args: &str, config: Window, dma: Window, msi: u64) -> Result<Device, &'static str> {
        if dma.len() < DMA_PAGES as u64 * PAGE {
            return Err("the dma mapping is smaller than 34 pages");
        }
        let mut phys = [0; DMA_PAGES];
        for (i, p) in phys.iter_mut().enumerate() {
            *p = sys::mem_phys(dma.base() / PAGE + i as u64)
                .map_err(|_| "mem_phys refused the dma pages")?;
        }
        let bar = |index| bar(args, index);
        let transport = Transport::find(&config, &bar)?;
        // MSI-X entry 0 ups the switch's semaphore, as a client does.
        let (address, data) =
            sys::irq_assign_msi(SWITCH_SM, msi).map_err(|_| "irq_assign of the MSI")?;
        transport.enable_msix(&config, &bar, address, data)?;
        let low = transport.negotiate(FEATURE_MAC)?;
        for page in 0..DMA_PAGES as u64 {
            for offset in (0..PAGE).step_by(8) {
                dma.write::<u64>(page * PAGE + offset, 0);
            }
        }
        let queue = |index: u16| -> Result<Queue, &'static str> {
            let base = phys[usize::from(index)];
            let (size, notify) = transport.queue(
                index,
                QUEUE_ENTRIES,
                base + DESC_AT,
                base + AVAIL_AT,
                base + USED_AT,
            )?;
            Ok(Queue {
                notify,
                size,
                page: u64::from(index) * PAGE,
                avail_idx: 0,
                used_idx: 0,
            })
        };
        let rx = queue(RX)?;
        let tx = queue(TX)?;
        let mut mac = [0u8; 6];
        if low & FEATURE_MAC != 0 {
            for (i, byte) in mac.iter_mut().enumerate() {
                *byte = transport.device.read::<u8>(i as u64);
            }
        }
        let mut tx_free = [0; QUEUE_ENTRIES as usize];
        for (i, slot) in tx_free.iter_mut().enumerate().take(tx.size.into()) {
            *slot = i as u16;
        }
        let mut device = Device {
            dma,
            phys,
            mac,
            rx_size: rx.size,
            tx_free_len: tx.size.into(),
            rx,
            tx,
            tx_free,
            tx_added: false,
            rx_posted: false,
        };
        for id in 0..device.rx.size {
            device.post_rx(id);
        }
        transport.driver_ok();
        device.rx.notify.write::<u16>(0, RX);
        Ok(device)
    }

    /// Where buffer `id` of a queue lies: (offset in the DMA window,
    /// physical address).
    fn buffer(&self, first_page: u64, id: u16) -> (u64, u64) {
        let offset = first_page * PAGE + u64::from(id) * BUFFER;
        let page = (offset / PAGE) as usize;
        (offset, self.phys[page] + offset % PAGE)
    }

    fn descriptor(&self, queue: &Queue, id: u16, address: u64, len: u32, flags: u16) {
        let at = queue.page + DESC_AT + u64::from(id) * 16;
        self.dma.write::<u64>(at, address);
        self.dma.write::<u32>(at + 8, len);
        self.dma.write::<u16>(at + 12, flags);
        self.dma.write::<u16>(at + 14, 0);
    }

    fn make_available(dma: &Window, queue: &mut Queue, id: u16) {
        let slot = u64::from(queue.avail_idx % queue.size);
        dma.write::<u16>(queue.page + AVAIL_AT + 4 + slot * 2, id);
        fence(Ordering::SeqCst);
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        dma.write::<u16>(queue.page + AVAIL_AT + 2, queue.avail_idx);
    }

    /// Gives receive buffer `id` to the device.
    fn post_rx(&mut self, id: u16) {
        let (_, phys) = self.buffer(RX_BUFFERS_PAGE, id);
        self.descriptor(&self.rx, id, phys, BUFFER as u32, DESC_WRITE);
        Self::make_available(&self.dma, &mut self.rx, id);
    }

    /// The next used entry of a queue: (descriptor id, length written).
    fn next_used(dma: &Window, queue: &mut Queue) -> Option<(u16, u32)> {
        let used = Self::peek_used(dma, queue)?;
        queue.used_idx = queue.used_idx.wrapping_add(1);
        Some(used)
    }

    /// The next used entry of a queue, left there.
    fn peek_used(dma: &Window, queue: &Queue) -> Option<(u16, u32)> {
        fence(Ordering::SeqCst);
        if dma.read::<u16>(queue.page + USED_AT + 2) == queue.used_idx {
            return None;
        }
        let slot = u64::from(queue.used_idx % queue.size);
        let at = queue.page + USED_AT + 4 + slot * 8;
        let id = dma.read::<u32>(at);
        let len = dma.read::<u32>(at + 4);
        // An id that is no descriptor of ours becomes one that is none.
        Some((u16::try_from(id).unwrap_or(u16::MAX), len))
    }

    /// The next received frame copied into `frame`, left in the queue
    /// until [`take_rx`](Self::take_rx): its descriptor id and
    /// `Some(len)`, or `None` for one the device made too long for us;
    /// `None` if there is none.
    fn peek_rx(&mut self, frame: &mut [u8; MAX_FRAME]) -> Option<(u16, Option<usize>)> {
        let (id, len) = Self::peek_used(&self.dma, &self.rx)?;
        if id >= self.rx.size {
            // Not a descriptor of ours.
            return Some((id, None));
        }
        let (offset, _) = self.buffer(RX_BUFFERS_PAGE, id);
        let len = u64::from(len).saturating_sub(NET_HDR);
        let result = (len as usize <= MAX_FRAME).then(|| {
            self.dma
                .read_bytes(offset + NET_HDR, &mut frame[..len as usize]);
            len as usize
        });
        Some((id, result))
    }

    /// Takes the frame [`peek_rx`](Self::peek_rx) saw off the queue and
    /// gives its buffer back to the device.
    fn take_rx(&mut self, id: u16) {
        self.rx.used_idx = self.rx.used_idx.wrapping_add(1);
        if id < self.rx.size {
            self.post_rx(id);
            self.rx_posted = true;
        }
    }

    /// Takes back the transmit buffers the device is done with.
    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = Self::next_used(&self.dma, &mut self.tx) {
            if id < self.tx.size && self.tx_free_len < self.tx_free.len() {
                self.tx_free[self.tx_free_len] = id;
                self.tx_free_len += 1;
            }
        }
    }

    /// Whether a transmit buffer is free (or can be taken back).
    fn can_transmit(&mut self) -> bool {
        if self.tx_free_len == 0 {
            self.reclaim_tx();
        }
        self.tx_free_len > 0
    }

    /// Queues a frame for the wire; false if every buffer is in flight.
    fn transmit(&mut self, frame: &[u8]) -> bool {
        if !self.can_transmit() {
            return false;
        }
        self.tx_free_len -= 1;
        let id = self.tx_free[self.tx_free_len];
        let (offset, phys) = self.buffer(TX_BUFFERS_PAGE, id);
        for i in (0..NET_HDR).step_by(4) {
            self.dma.write::<u32>(offset + i, 0);
        }
        self.dma.write_bytes(offset + NET_HDR, frame);
        let len = (NET_HDR as usize + frame.len()) as u32;
        self.descriptor(&self.tx, id, phys, len, 0);
        Self::make_available(&self.dma, &mut self.tx, id);
        self.tx_added = true;
        true
    }

    /// Tells the device about the frames queued and the receive buffers
    /// given back since the last time (one register write each, not one
    /// per frame: each is an exit to the emulator or hypervisor).
    fn kick(&mut self) {
        fence(Ordering::SeqCst);
        if core::mem::take(&mut self.rx_posted) {
            self.rx.notify.write::<u16>(0, RX);
        }
        if core::mem::take(&mut self.tx_added) {
            self.tx.notify.write::<u16>(0, TX);
        }
    }
}
