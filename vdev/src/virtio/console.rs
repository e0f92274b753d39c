//! virtio console with VIRTIO_CONSOLE_F_MULTIPORT. Port 0 is the console
//! (hvc0); further ports carry a name (Linux shows it in
//! `/sys/class/virtio-ports/vport*/name`).
//!
//! Port life cycle over the control queues, device side:
//! DEVICE_READY from the driver → PORT_ADD for every port; PORT_READY for
//! a port → CONSOLE_PORT (port 0), PORT_NAME (named ports), PORT_OPEN if
//! the host side is open; PORT_OPEN from the driver tells the back end the
//! guest opened or closed the port. A driver without MULTIPORT gets port 0
//! on queues 0 and 1 and nothing else.
//!
//! Host-to-guest bytes wait in a bounded per-port buffer until the guest
//! has the port open and has posted receive buffers.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::queue::QueueError;
use super::{read_config_image, DeviceIo, VirtioDevice, DEVICE_TYPE_CONSOLE};

pub const CONSOLE_F_MULTIPORT: u64 = 1 << 1;

pub const DEVICE_READY: u16 = 0;
pub const PORT_ADD: u16 = 1;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

const CONTROL_RX: u16 = 2;
const CONTROL_TX: u16 = 3;
const CONTROL_LEN: usize = 8;
/// Control messages waiting for buffers: a guest that sends requests but
/// never posts buffers for the answers cannot grow this without bound.
const CONTROL_BACKLOG: usize = 64;
pub const MAX_PORTS: usize = 16;
/// Host bytes held per port until the guest takes them.
pub const PORT_INPUT_MAX: usize = 64 * 1024;
/// Bytes taken from one transmit buffer at most; the rest is discarded.
const OUTPUT_PER_BUFFER: u64 = 64 * 1024;
const CHUNK: usize = 1024;
/// cols, rows, max_nr_ports, emerg_wr.
const CONFIG_LEN: usize = 12;

/// The host end of one port.
pub trait PortBackend {
    /// Bytes the guest wrote to the port.
    fn output(&mut self, data: &[u8]);
    /// The guest opened (or closed) its end.
    fn guest_open(&mut self, _open: bool) {}
}

struct Port {
    name: Vec<u8>,
    backend: Box<dyn PortBackend>,
    input: VecDeque<u8>,
    /// The driver announced the port (PORT_READY).
    ready: bool,
    guest_open: bool,
    host_open: bool,
}

pub struct Console {
    ports: Vec<Port>,
    control: VecDeque<Vec<u8>>,
}

fn receive_queue(port: usize) -> u16 {
    match port {
        0 => 0,
        n => 2 * (n as u16 + 1),
    }
}

impl Console {
    /// Port 0 is the console; `named` become ports 1, 2, ... (at most
    /// `MAX_PORTS - 1`, the rest are left out). All host ends start open.
    pub fn new(console: Box<dyn PortBackend>, named: Vec<(&str, Box<dyn PortBackend>)>) -> Self {
        let port = |name: &[u8], backend| Port {
            name: name.to_vec(),
            backend,
            input: VecDeque::new(),
            ready: false,
            guest_open: false,
            host_open: true,
        };
        let mut ports = Vec::from([port(b"", console)]);
        for (name, backend) in named.into_iter().take(MAX_PORTS - 1) {
            ports.push(port(name.as_bytes(), backend));
        }
        Self {
            ports,
            control: VecDeque::new(),
        }
    }

    /// Queue bytes for the guest on `port`; returns how many were taken
    /// (fewer when the buffer is full, none if the host end is closed).
    pub fn port_input(&mut self, port: u32, data: &[u8]) -> usize {
        let Some(port) = self.ports.get_mut(port as usize).filter(|p| p.host_open) else {
            return 0;
        };
        let taken = data.len().min(PORT_INPUT_MAX - port.input.len());
        port.input.extend(&data[..taken]);
        taken
    }

    /// Open or close the host end; the guest sees PORT_OPEN (a reader gets
    /// end-of-file or a hang-up). Closing drops undelivered input.
    pub fn set_host_open(&mut self, port: u32, open: bool) {
        let Some(p) = self.ports.get_mut(port as usize) else {
            return;
        };
        if p.host_open == open {
            return;
        }
        p.host_open = open;
        if !open {
            p.input.clear();
        }
        if p.ready {
            self.send(port, PORT_OPEN, u16::from(open), &[]);
        }
    }

    pub fn guest_open(&self, port: u32) -> bool {
        self.ports.get(port as usize).is_some_and(|p| p.guest_open)
    }

    fn send(&mut self, id: u32, event: u16, value: u16, payload: &[u8]) {
        if self.control.len() >= CONTROL_BACKLOG {
            return;
        }
        let mut message = Vec::with_capacity(CONTROL_LEN + payload.len());
        message.extend_from_slice(&id.to_le_bytes());
        message.extend_from_slice(&event.to_le_bytes());
        message.extend_from_slice(&value.to_le_bytes());
        message.extend_from_slice(payload);
        self.control.push_back(message);
    }

    fn handle_control(&mut self, id: u32, event: u16, value: u16) {
        match event {
            DEVICE_READY if value == 1 => {
                for port in 0..self.ports.len() as u32 {
                    self.send(port, PORT_ADD, 0, &[]);
                }
            }
            PORT_READY if value == 1 => {
                let Some(port) = self.ports.get_mut(id as usize) else {
                    return;
                };
                port.ready = true;
                let name = port.name.clone();
                let host_open = port.host_open;
                if id == 0 {
                    self.send(id, CONSOLE_PORT, 1, &[]);
                }
                if !name.is_empty() {
                    self.send(id, PORT_NAME, 1, &name);
                }
                if host_open {
                    self.send(id, PORT_OPEN, 1, &[]);
                }
            }
            PORT_OPEN => {
                if let Some(port) = self.ports.get_mut(id as usize) {
                    port.guest_open = value != 0;
                    port.backend.guest_open(value != 0);
                }
            }
            _ => {}
        }
    }

    fn take_control(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let mem = io.mem();
        while let Some(chain) = io.pop(CONTROL_TX)? {
            let mut message = [0u8; CONTROL_LEN];
            if chain.reader().read(mem, &mut message)? == CONTROL_LEN {
                let id = u32::from_le_bytes([message[0], message[1], message[2], message[3]]);
                let event = u16::from_le_bytes([message[4], message[5]]);
                let value = u16::from_le_bytes([message[6], message[7]]);
                self.handle_control(id, event, value);
            }
            io.push(CONTROL_TX, &chain, 0)?;
        }
        Ok(())
    }

    fn give_control(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let mem = io.mem();
        while !self.control.is_empty() {
            let Some(chain) = io.pop(CONTROL_RX)? else {
                break;
            };
            let Some(message) = self.control.pop_front() else {
                break;
            };
            let written = chain.writer(u64::MAX).write(mem, &message)?;
            io.push(CONTROL_RX, &chain, written as u32)?;
        }
        Ok(())
    }

    fn take_output(&mut self, io: &mut DeviceIo<'_>, port: usize) -> Result<(), QueueError> {
        let mem = io.mem();
        let queue = receive_queue(port) + 1;
        while let Some(chain) = io.pop(queue)? {
            let mut reader = chain.reader();
            let mut chunk = [0u8; CHUNK];
            while reader.done() < OUTPUT_PER_BUFFER {
                let len = reader.read(mem, &mut chunk)?;
                if len == 0 {
                    break;
                }
                self.ports[port].backend.output(&chunk[..len]);
            }
            io.push(queue, &chain, 0)?;
        }
        Ok(())
    }

    fn give_input(&mut self, io: &mut DeviceIo<'_>, port: usize) -> Result<(), QueueError> {
        let mem = io.mem();
        let queue = receive_queue(port);
        let input = &mut self.ports[port].input;
        while !input.is_empty() {
            let Some(chain) = io.pop(queue)? else {
                break;
            };
            let mut writer = chain.writer(u64::MAX);
            let (front, back) = input.as_slices();
            writer.write(mem, front)?;
            writer.write(mem, back)?;
            let written = writer.done() as usize;
            input.drain(..written);
            io.push(queue, &chain, written as u32)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_CONSOLE
    }

    /// Port 0's pair, the control pair, then a pair per further port.
    fn queue_count(&self) -> u16 {
        2 * (self.ports.len() as u16 + 1)
    }

    fn features(&self) -> u64 {
        CONSOLE_F_MULTIPORT
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut image = [0u8; CONFIG_LEN];
        image[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        read_config_image(&image, offset, data);
    }

    fn reset(&mut self) {
        self.control.clear();
        for port in &mut self.ports {
            port.ready = false;
            if core::mem::take(&mut port.guest_open) {
                port.backend.guest_open(false);
            }
        }
    }

    fn process(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let multiport = io.negotiated(CONSOLE_F_MULTIPORT);
        let ports = if multiport { self.ports.len() } else { 1 };
        if multiport {
            self.take_control(io)?;
        }
        for port in 0..ports {
            self.take_output(io, port)?;
        }
        if multiport {
            self.give_control(io)?;
        }
        for port in 0..ports {
            if !multiport || self.ports[port].guest_open {
                self.give_input(io, port)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mock::{Driver, Machine};
    use crate::virtio::pci::VirtioPci;
    use crate::virtio::{VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
    use crate::Shared;
    use alloc::collections::BTreeMap;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | CONSOLE_F_MULTIPORT;
    const BAD_ID: u32 = u32::MAX;

    #[derive(Default)]
    struct Log {
        output: Vec<u8>,
        opens: Vec<bool>,
    }

    #[derive(Clone, Default)]
    struct Recorder(Rc<RefCell<Log>>);

    impl PortBackend for Recorder {
        fn output(&mut self, data: &[u8]) {
            self.0.borrow_mut().output.extend_from_slice(data);
        }
        fn guest_open(&mut self, open: bool) {
            self.0.borrow_mut().opens.push(open);
        }
    }

    /// The guest side of the console: control buffers it keeps posted, and
    /// the messages it received.
    struct Guest<'m> {
        driver: Driver<'m>,
        control_bufs: BTreeMap<u32, u64>,
    }

    type Message = (u32, u16, u16, Vec<u8>);

    impl<'m> Guest<'m> {
        fn post_control(&mut self) {
            let buf = self.driver.m.alloc(4096, 16);
            let head = self.driver.add(CONTROL_RX, &[(buf, 4096, true)]);
            self.control_bufs.insert(u32::from(head), buf);
        }

        fn send_control(&mut self, id: u32, event: u16, value: u16) {
            let mut message = id.to_le_bytes().to_vec();
            message.extend_from_slice(&event.to_le_bytes());
            message.extend_from_slice(&value.to_le_bytes());
            let buf = self.driver.m.alloc_data(&message);
            self.driver.add(CONTROL_TX, &[(buf, 8, false)]);
            self.driver.kick(CONTROL_TX);
            assert!(
                self.driver.used(CONTROL_TX).is_some(),
                "control_tx answered synchronously"
            );
        }

        /// Take what the device put in the control receive queue,
        /// reposting each buffer as Linux does.
        fn received(&mut self) -> Vec<Message> {
            let mut messages = Vec::new();
            while let Some((head, len)) = self.driver.used(CONTROL_RX) {
                let buf = self.control_bufs.remove(&head).expect("a control buffer");
                let raw = self.driver.m.mem.bytes(buf, len as usize);
                let id = u32::from_le_bytes(raw[0..4].try_into().unwrap());
                let event = u16::from_le_bytes([raw[4], raw[5]]);
                let value = u16::from_le_bytes([raw[6], raw[7]]);
                messages.push((id, event, value, raw[8..].to_vec()));
                self.post_control();
            }
            self.driver.kick(CONTROL_RX);
            messages
        }

        fn write(&mut self, port: usize, data: &[u8]) {
            let queue = receive_queue(port) + 1;
            let buf = self.driver.m.alloc_data(data);
            self.driver.add(queue, &[(buf, data.len() as u32, false)]);
            self.driver.kick(queue);
            assert!(self.driver.used(queue).is_some());
        }

        fn post_input(&mut self, port: usize, len: u32) -> u64 {
            let buf = self.driver.m.alloc(u64::from(len), 16);
            self.driver.add(receive_queue(port), &[(buf, len, true)]);
            self.driver.kick(receive_queue(port));
            buf
        }

        fn input(&mut self, port: usize, buf: u64) -> Option<Vec<u8>> {
            let (_, len) = self.driver.used(receive_queue(port))?;
            Some(self.driver.m.mem.bytes(buf, len as usize))
        }
    }

    fn machine() -> (Machine, Recorder, Recorder) {
        let (console, modem) = (Recorder::default(), Recorder::default());
        let m = Machine::new();
        (m, console, modem)
    }

    fn plug(m: &Machine, console: &Recorder, modem: &Recorder) -> Shared<VirtioPci<Console>> {
        m.plug(Console::new(
            Box::new(console.clone()),
            vec![("modem", Box::new(modem.clone()))],
        ))
    }

    /// Linux's virtcons_probe with multiport, up to the ports being open.
    fn linux_bring_up(m: &Machine) -> Guest<'_> {
        let mut driver = Driver::probe(m, DEVICE_TYPE_CONSOLE);
        assert_eq!(driver.config_read(4, 4), 2, "max_nr_ports");
        driver.bring_up(FEATURES, 6);
        let mut guest = Guest {
            driver,
            control_bufs: BTreeMap::new(),
        };
        for _ in 0..8 {
            guest.post_control();
        }
        guest.driver.kick(CONTROL_RX);
        guest.send_control(BAD_ID, DEVICE_READY, 1);
        assert_eq!(
            guest.received(),
            vec![(0, PORT_ADD, 0, vec![]), (1, PORT_ADD, 0, vec![])]
        );
        guest.send_control(0, PORT_READY, 1);
        assert_eq!(
            guest.received(),
            vec![(0, CONSOLE_PORT, 1, vec![]), (0, PORT_OPEN, 1, vec![])]
        );
        guest.send_control(0, PORT_OPEN, 1);
        guest.send_control(1, PORT_READY, 1);
        assert_eq!(
            guest.received(),
            vec![
                (1, PORT_NAME, 1, b"modem".to_vec()),
                (1, PORT_OPEN, 1, vec![])
            ]
        );
        guest
    }

    #[test]
    fn multiport_handshake_then_data_both_ways() {
        let (m, console, modem) = machine();
        let device = plug(&m, &console, &modem);
        let mut guest = linux_bring_up(&m);
        assert_eq!(console.0.borrow().opens, vec![true]);
        assert!(device.borrow().device().guest_open(0));
        assert!(!device.borrow().device().guest_open(1));

        guest.write(0, b"login: ");
        guest.write(1, b"ATZ\r");
        assert_eq!(console.0.borrow().output, b"login: ");
        assert_eq!(modem.0.borrow().output, b"ATZ\r");

        // Host input waits until the guest opens the port.
        let buf = guest.post_input(1, 64);
        assert_eq!(
            device.borrow_mut().update(|c| c.port_input(1, b"OK\r\n")),
            4
        );
        assert_eq!(guest.input(1, buf), None);
        guest.send_control(1, PORT_OPEN, 1);
        assert_eq!(modem.0.borrow().opens, vec![true]);
        assert_eq!(guest.input(1, buf).as_deref(), Some(&b"OK\r\n"[..]));
        assert_eq!(
            m.msi.count(receive_queue(1) + 1),
            1,
            "port 1 input on its own vector"
        );

        // Input larger than the buffers spreads over several.
        let bufs = [guest.post_input(0, 3), guest.post_input(0, 3)];
        assert_eq!(device.borrow_mut().update(|c| c.port_input(0, b"hello")), 5);
        assert_eq!(guest.input(0, bufs[0]).as_deref(), Some(&b"hel"[..]));
        assert_eq!(guest.input(0, bufs[1]).as_deref(), Some(&b"lo"[..]));
    }

    #[test]
    fn host_side_close_and_guest_side_close() {
        let (m, console, modem) = machine();
        let device = plug(&m, &console, &modem);
        let mut guest = linux_bring_up(&m);
        guest.send_control(1, PORT_OPEN, 1);
        device.borrow_mut().update(|c| c.set_host_open(1, false));
        assert_eq!(guest.received(), vec![(1, PORT_OPEN, 0, vec![])]);
        assert_eq!(device.borrow_mut().update(|c| c.port_input(1, b"lost")), 0);
        device.borrow_mut().update(|c| c.set_host_open(1, true));
        assert_eq!(guest.received(), vec![(1, PORT_OPEN, 1, vec![])]);
        guest.send_control(1, PORT_OPEN, 0);
        assert_eq!(modem.0.borrow().opens, vec![true, false]);

        // A reset closes the guest ends it had open.
        guest.driver.set_status(0);
        assert_eq!(console.0.borrow().opens, vec![true, false]);
        assert!(!device.borrow().device().guest_open(0));
    }

    #[test]
    fn without_multiport_only_the_console_exists() {
        let (m, console, modem) = machine();
        let device = plug(&m, &console, &modem);
        let mut driver = Driver::probe(&m, DEVICE_TYPE_CONSOLE);
        driver.bring_up(VIRTIO_F_VERSION_1, 2);
        let mut guest = Guest {
            driver,
            control_bufs: BTreeMap::new(),
        };
        guest.write(0, b"early boot");
        assert_eq!(console.0.borrow().output, b"early boot");
        let buf = guest.post_input(0, 16);
        device.borrow_mut().update(|c| {
            c.port_input(0, b"root\n");
            c.port_input(1, b"unseen");
        });
        assert_eq!(guest.input(0, buf).as_deref(), Some(&b"root\n"[..]));
        assert!(modem.0.borrow().output.is_empty());
    }

    #[test]
    fn hostile_control_traffic_is_bounded() {
        let (m, console, modem) = machine();
        let device = plug(&m, &console, &modem);
        let mut driver = Driver::probe(&m, DEVICE_TYPE_CONSOLE);
        driver.bring_up(FEATURES, 6);
        let mut guest = Guest {
            driver,
            control_bufs: BTreeMap::new(),
        };
        // Answers pile up with no control buffers posted: capped.
        for _ in 0..100 {
            guest.send_control(BAD_ID, DEVICE_READY, 1);
        }
        guest.send_control(7, PORT_READY, 1);
        guest.send_control(7, PORT_OPEN, 1);
        guest.send_control(0, 99, 1);
        let short = guest.driver.m.alloc_data(&[0; 3]);
        guest.driver.add(CONTROL_TX, &[(short, 3, false)]);
        guest.driver.kick(CONTROL_TX);
        assert!(guest.driver.used(CONTROL_TX).is_some());
        assert_eq!(device.borrow().device().control.len(), CONTROL_BACKLOG);
        for _ in 0..CONTROL_BACKLOG + 4 {
            guest.post_control();
        }
        guest.driver.kick(CONTROL_RX);
        assert_eq!(guest.received().len(), CONTROL_BACKLOG);

        // Host input is capped per port.
        let big = vec![b'x'; PORT_INPUT_MAX + 10];
        assert_eq!(
            device.borrow_mut().update(|c| c.port_input(0, &big)),
            PORT_INPUT_MAX
        );
        assert_eq!(device.borrow_mut().update(|c| c.port_input(0, b"more")), 0);
        assert_eq!(
            device.borrow_mut().update(|c| c.port_input(9, b"nowhere")),
            0
        );

        // One huge transmit buffer: only its first part is taken.
        let huge = guest.driver.m.alloc(2 * OUTPUT_PER_BUFFER, 16);
        guest
            .driver
            .add(1, &[(huge, 2 * OUTPUT_PER_BUFFER as u32, false)]);
        guest.driver.kick(1);
        assert!(guest.driver.used(1).is_some());
        assert_eq!(console.0.borrow().output.len() as u64, OUTPUT_PER_BUFFER);
    }
}
