//! Which addresses neither the worker nor the queue calls on a job's say-so: a job's input URL
//! (the worker's fetch) and a job's webhook (the mock queue) must not reach the machine's own
//! services, the network behind it or a cloud's metadata endpoint.

use std::net::IpAddr;

/// Whether `ip` is internal: private, loopback, link-local, unspecified, shared (CGNAT),
/// documentation, broadcast or multicast.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a >= 240
                || a == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::from(
                    (u32::from(hi) << 16) | u32::from(lo),
                ))
            };
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address inside.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_internal(embedded(segments[6], segments[7]));
            }
            if segments[0] == 0x2002 {
                return is_internal(embedded(segments[1], segments[2]));
            }
            let first = segments[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
        }
    }
}
