//! The machine's network for `--hostfwd` (and the configuration's
//! `hostfwd`) and for the system tests that use it: QEMU's user
//! networking (slirp) behind a virtio-net PCI device, which the `net`
//! component drives as the virtual switch's uplink, with TCP ports of the
//! host's 127.0.0.1 forwarded to the guest.

use std::net::{Ipv4Addr, TcpListener};

use crate::{Error, Result};

/// A TCP port of the host's 127.0.0.1 forwarded to a port of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

/// The MAC address of QEMU's virtio-net device (the uplink's; the
/// switch's clients have their own).
pub const UPLINK_MAC: &str = "52:54:00:00:00:01";

/// `HOST_PORT:GUEST_PORT`, both 1 to 65535.
pub fn parse_forward(text: &str) -> std::result::Result<Forward, String> {
    let bad = || format!("expected HOST_PORT:GUEST_PORT (e.g. 8080:80), not {text:?}");
    let (host, guest) = text.split_once(':').ok_or_else(bad)?;
    let port = |t: &str| -> std::result::Result<u16, String> {
        match t.parse::<u16>() {
            Ok(0) => Err(format!("port 0 in {text:?}: ports are 1 to 65535")),
            Ok(p) => Ok(p),
            Err(_) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
                Err(format!("port {t} in {text:?} is above 65535"))
            }
            Err(_) => Err(bad()),
        }
    };
    Ok(Forward {
        host: port(host)?,
        guest: port(guest)?,
    })
}

/// Fails with a clear message if the host's 127.0.0.1:`port` is taken
/// (QEMU would only say so once it runs).
pub fn check_free(port: u16) -> Result<()> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map(drop)
        .map_err(|e| {
            Error::Other(format!(
                "cannot forward port {port} of 127.0.0.1 on the host: {e}"
            ))
        })
}

/// A port of the host's 127.0.0.1 that is free now.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::Other(format!("no free port on 127.0.0.1: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Other(format!("no free port on 127.0.0.1: {e}")))
}

/// QEMU's arguments for the uplink: the `q35` machine (its MCFG gives the
/// driver its device's configuration page), user networking with the
/// forwards (each to a guest's address), and the virtio-net device
/// (modern interface only, as the driver expects).
pub fn qemu_args(forwards: &[(Ipv4Addr, Forward)]) -> Vec<String> {
    let mut netdev = String::from("user,id=n0");
    for (to, f) in forwards {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-{to}:{}",
            f.host, f.guest
        ));
    }
    [
        "-machine".to_string(),
        "q35".to_string(),
        "-netdev".to_string(),
        netdev,
        "-device".to_string(),
        format!("virtio-net-pci,netdev=n0,mac={UPLINK_MAC},disable-legacy=on,disable-modern=off"),
    ]
    .to_vec()
}

/// The first forwarded host port in QEMU's arguments.
pub fn forwarded_port(args: &[String]) -> Option<u16> {
    const MARK: &str = "hostfwd=tcp:127.0.0.1:";
    let arg = args.iter().find(|a| a.contains(MARK))?;
    let rest = &arg[arg.find(MARK)? + MARK.len()..];
    rest.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_from_text() {
        assert_eq!(
            parse_forward("8080:80"),
            Ok(Forward {
                host: 8080,
                guest: 80
            })
        );
        for bad in ["8080", "8080:", ":80", "a:80", "80:80:80", "-1:80", ""] {
            assert!(
                parse_forward(bad)
                    .unwrap_err()
                    .contains("HOST_PORT:GUEST_PORT"),
                "{bad}"
            );
        }
        assert!(parse_forward("0:80").unwrap_err().contains("port 0"));
        assert!(parse_forward("70000:80")
            .unwrap_err()
            .contains("above 65535"));
    }

    #[test]
    fn a_taken_port_is_refused() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let e = check_free(port).unwrap_err().to_string();
        assert!(e.contains(&format!("cannot forward port {port}")), "{e}");
        drop(listener);
        assert!(check_free(free_port().unwrap()).is_ok());
    }

    #[test]
    fn qemu_gets_the_forwards_and_they_are_found_again() {
        let args = qemu_args(&[
            (
                Ipv4Addr::new(10, 0, 2, 15),
                Forward {
                    host: 18080,
                    guest: 80,
                },
            ),
            (
                Ipv4Addr::new(10, 0, 2, 16),
                Forward {
                    host: 2222,
                    guest: 22,
                },
            ),
        ]);
        assert_eq!(
            args[3],
            "user,id=n0,hostfwd=tcp:127.0.0.1:18080-10.0.2.15:80,\
             hostfwd=tcp:127.0.0.1:2222-10.0.2.16:22"
        );
        assert!(args[5].starts_with("virtio-net-pci,netdev=n0,"));
        assert_eq!(forwarded_port(&args), Some(18080));
        assert_eq!(forwarded_port(&[]), None);
    }
}
