//! Who a request came from when a proxy forwarded it: the client's address
//! and scheme from `X-Forwarded-For` / `X-Forwarded-Proto`, or, when a
//! request has no `X-Forwarded-For`, from `Forwarded` (RFC 7239), believed
//! only from peers listed as trusted.
//!
//! `X-Forwarded-For` comes first because it is what proxies set (nginx,
//! HAProxy, Caddy, Traefik, Envoy), and most of them pass a `Forwarded`
//! header a client sent through untouched: read first, that one would let
//! the client name its own address. A proxy that sets only `Forwarded`
//! must drop a client's `X-Forwarded-For`.
//!
//! The chain is read from the right, the hop nearest us first: each hop a
//! trusted proxy appended names the client it heard from; the first address
//! that is not itself a trusted proxy is the client. Anything an untrusted
//! peer says is ignored, so a client cannot choose its own address by
//! sending the header itself (it lands to the left of what the proxy
//! appends, past the first untrusted address).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network: an address and a prefix length (`10.0.0.0/8`,
/// `fd00::/8`), or one address (`127.0.0.1`, `::1`). What
/// [`ServerBuilder::trusted_proxies`](crate::ServerBuilder::trusted_proxies)
/// lists.
///
/// # Examples
///
/// ```
/// let net: ssed::IpNet = "10.1.0.0/16".parse()?;
/// assert!(net.contains("10.1.2.3".parse()?));
/// assert!(!net.contains("10.2.0.1".parse()?));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not an [`IpNet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpNetError(String);

impl fmt::Display for IpNetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IpNetError {}

impl IpNet {
    /// Whether `ip` lies in this network. An IPv4 address mapped into IPv6
    /// (`::ffff:10.0.0.1`, as a dual-stack socket reports it) counts as the
    /// IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| IpNetError(format!("{s:?} is not an IP address or network: {why}"));
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("write an address (10.0.0.1, ::1) or a network (10.0.0.0/8)"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(bad(&format!("the prefix length must be 0 to {max}"))),
            },
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Where a request came from, as far as the trusted proxies tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    /// The client's address: the TCP peer, or the address a trusted proxy
    /// names.
    pub client: IpAddr,
    /// Whether the client reached the first trusted proxy over HTTPS.
    pub https: bool,
}

/// One hop of a forwarding chain: the address a proxy heard the request
/// from (none when it gave no usable address: `unknown`, an obfuscated
/// name) and the scheme it heard it over, if said.
struct Hop {
    addr: Option<IpAddr>,
    https: Option<bool>,
}

/// Reads the client's address and scheme from `headers`, believing them
/// only when `peer` is in `trusted` (and each further hop only while the
/// address before it is too).
pub(crate) fn origin<'a>(
    peer: IpAddr,
    headers: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    trusted: &[IpNet],
) -> Origin {
    let peer = peer.to_canonical();
    let direct = Origin {
        client: peer,
        https: false,
    };
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return direct;
    }
    let lines = |name: &'static str| {
        headers
            .clone()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    let use_forwarded =
        lines("x-forwarded-for").next().is_none() && lines("forwarded").next().is_some();
    let (hops, mut https) = if use_forwarded {
        (lines("forwarded").flat_map(forwarded_hops).collect(), None)
    } else {
        let addrs: Vec<Option<IpAddr>> = lines("x-forwarded-for")
            .flat_map(|v| v.split(','))
            .map(node)
            .collect();
        let protos: Vec<bool> = lines("x-forwarded-proto")
            .flat_map(|v| v.split(','))
            .map(is_https)
            .collect();
        if protos.len() == addrs.len() {
            let hops = addrs
                .into_iter()
                .zip(protos)
                .map(|(addr, p)| Hop {
                    addr,
                    https: Some(p),
                })
                .collect();
            (hops, None)
        } else {
            // The proto list does not line up with the addresses: believe
            // what the proxy nearest us set.
            let hops = addrs
                .into_iter()
                .map(|addr| Hop { addr, https: None })
                .collect::<Vec<_>>();
            (hops, protos.last().copied())
        }
    };
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(addr) = hop.addr else { break };
        client = addr;
        if hop.https.is_some() {
            https = hop.https;
        }
        if !is_trusted(addr) {
            break;
        }
    }
    Origin {
        client,
        https: https.unwrap_or(false),
    }
}

fn is_https(proto: &str) -> bool {
    proto.trim().trim_matches('"').eq_ignore_ascii_case("https")
}

/// The hops of one `Forwarded` line: `for=…;proto=…, for=…`.
fn forwarded_hops(line: &str) -> Vec<Hop> {
    split_quoted(line, ',')
        .into_iter()
        .map(|element| {
            // A hop that does not say its scheme is not known to be https.
            let mut hop = Hop {
                addr: None,
                https: Some(false),
            };
            for pair in split_quoted(element, ';') {
                let Some((k, v)) = pair.split_once('=') else {
                    continue;
                };
                match k.trim() {
                    k if k.eq_ignore_ascii_case("for") => hop.addr = node(v),
                    k if k.eq_ignore_ascii_case("proto") => hop.https = Some(is_https(v)),
                    _ => {}
                }
            }
            hop
        })
        .collect()
}

/// Splits at `sep` outside double quotes.
fn split_quoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A node as proxies write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `[2001:db8::1]`, `"[2001:db8::1]:4711"`, `2001:db8::1`; `None` for
/// `unknown`, obfuscated names and anything else.
fn node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, _) = rest.split_once(']')?;
        return inner
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| IpAddr::V6(a).to_canonical());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn of(peer: &str, headers: &[(&str, &str)], trusted: &[&str]) -> (String, bool) {
        let o = origin(ip(peer), headers.iter().copied(), &nets(trusted));
        (o.client.to_string(), o.https)
    }

    #[test]
    fn networks_parse_and_contain() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.255.1.2")));
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(!n.contains(ip("::1")));
        let one: IpNet = "::1".parse().unwrap();
        assert!(one.contains(ip("::1")));
        assert!(!one.contains(ip("::2")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12:3456::1")));
        assert_eq!(n.to_string(), "10.0.0.0/8");
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "example.com",
            "10.0.0.1/x",
            "1.2.3",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let h = [
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
        ];
        assert_eq!(of("10.0.0.5", &h, &[]), ("10.0.0.5".into(), false));
        assert_eq!(
            of("10.0.0.5", &h, &["127.0.0.1"]),
            ("10.0.0.5".into(), false)
        );
        let h = [("Forwarded", "for=1.2.3.4;proto=https")];
        assert_eq!(
            of("10.0.0.5", &h, &["127.0.0.1"]),
            ("10.0.0.5".into(), false)
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let t = ["127.0.0.1"];
        let h = [
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
        ];
        assert_eq!(of("127.0.0.1", &h, &t), ("203.0.113.7".into(), true));
        // The client's own claim sits left of what the proxy appended.
        let h = [("x-forwarded-for", "6.6.6.6, 203.0.113.7")];
        assert_eq!(of("127.0.0.1", &h, &t), ("203.0.113.7".into(), false));
        // Two trusted proxies in a row, headers on two lines.
        let h = [
            ("X-Forwarded-For", "6.6.6.6, 203.0.113.7"),
            ("X-Forwarded-For", "10.0.0.2"),
        ];
        assert_eq!(
            of("127.0.0.1", &h, &["127.0.0.1", "10.0.0.0/8"]),
            ("203.0.113.7".into(), false)
        );
        // All trusted: the leftmost.
        let h = [("X-Forwarded-For", "10.0.0.3, 10.0.0.2")];
        assert_eq!(
            of("127.0.0.1", &h, &["127.0.0.1", "10.0.0.0/8"]),
            ("10.0.0.3".into(), false)
        );
        // A port, a bracketed IPv6 literal.
        let h = [("X-Forwarded-For", "203.0.113.7:5555")];
        assert_eq!(of("127.0.0.1", &h, &t), ("203.0.113.7".into(), false));
        let h = [("X-Forwarded-For", "[2001:db8::1]:80")];
        assert_eq!(of("127.0.0.1", &h, &t), ("2001:db8::1".into(), false));
        // Nothing forwarded: the proxy itself.
        assert_eq!(of("127.0.0.1", &[], &t), ("127.0.0.1".into(), false));
        // Only the scheme.
        let h = [("X-Forwarded-Proto", "https")];
        assert_eq!(of("127.0.0.1", &h, &t), ("127.0.0.1".into(), true));
        // Garbage: stop at the last address known.
        let h = [("X-Forwarded-For", "not-an-address")];
        assert_eq!(of("127.0.0.1", &h, &t), ("127.0.0.1".into(), false));
    }

    #[test]
    fn forwarded_is_read_without_x_forwarded_for_as_rfc_7239_says() {
        let t = ["127.0.0.1"];
        // A client's own `Forwarded`, passed through by a proxy that set
        // `X-Forwarded-For`: not believed.
        let h = [
            ("Forwarded", "for=6.6.6.6;proto=https"),
            ("X-Forwarded-For", "9.9.9.9"),
        ];
        assert_eq!(of("127.0.0.1", &h, &t), ("9.9.9.9".into(), false));
        let h = [(
            "Forwarded",
            r#"for="[2001:db8:cafe::17]:4711";proto=https, for=192.0.2.60;proto=http;by=203.0.113.43"#,
        )];
        assert_eq!(of("127.0.0.1", &h, &t), ("192.0.2.60".into(), false));
        // The client's hop says nothing of its scheme: not https, whatever
        // a nearer hop says.
        let h = [("Forwarded", "for=192.0.2.60, for=10.0.0.2;proto=https")];
        assert_eq!(
            of("127.0.0.1", &h, &["127.0.0.1", "10.0.0.0/8"]),
            ("192.0.2.60".into(), false)
        );
        let h = [("Forwarded", r#"For="[2001:db8:cafe::17]:4711";Proto=HTTPS"#)];
        assert_eq!(of("127.0.0.1", &h, &t), ("2001:db8:cafe::17".into(), true));
        let h = [("Forwarded", "for=unknown;proto=https")];
        assert_eq!(of("127.0.0.1", &h, &t), ("127.0.0.1".into(), false));
        let h = [("Forwarded", r#"for=_hidden, for="10.0.0.1""#)];
        assert_eq!(
            of("127.0.0.1", &h, &["127.0.0.1", "10.0.0.1"]),
            ("10.0.0.1".into(), false)
        );
    }

    #[test]
    fn the_scheme_follows_the_hop_of_the_client() {
        let both = ["127.0.0.1", "10.0.0.0/8"];
        // A CDN heard https, the inner proxy appended its own http.
        let h = [
            ("X-Forwarded-For", "203.0.113.7, 10.0.0.2"),
            ("X-Forwarded-Proto", "https, http"),
        ];
        assert_eq!(of("127.0.0.1", &h, &both), ("203.0.113.7".into(), true));
        // One proto for several hops: the nearest proxy's word.
        let h = [
            ("X-Forwarded-For", "203.0.113.7, 10.0.0.2"),
            ("X-Forwarded-Proto", "https"),
        ];
        assert_eq!(of("127.0.0.1", &h, &both), ("203.0.113.7".into(), true));
    }
}
