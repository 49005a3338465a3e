//! Streams one client may hold at once (`max_streams_per_client`).
//!
//! A client is its address (what a trusted proxy names, else the TCP
//! peer's); an IPv6 client is its /64, the block one host or one home
//! network is given, so a client cannot step past its limit by taking the
//! next address of its own block. Or a client is a name its handler gives
//! it once the request is authenticated (the daemon: a JWT's subject). Only clients that hold a stream have an
//! entry, so the table never holds more entries than streams are open,
//! whatever addresses arrive.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Counts each client's open streams against a limit.
#[derive(Debug)]
pub(crate) struct ClientStreams {
    max: usize,
    open: Mutex<HashMap<ClientKey, u32>>,
}

/// Who is counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    Address(IpAddr),
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    Named(Box<str>),
}

/// One open stream of a client: gives its place back when dropped (the
/// stream ended, or never started).
#[derive(Debug)]
pub(crate) struct ClientSlot {
    owner: Arc<ClientStreams>,
    key: ClientKey,
}

impl ClientStreams {
    /// A table for `max` streams per client; 0: no limit.
    pub(crate) fn new(max: usize) -> Self {
        ClientStreams {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The limit; 0 when there is none.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Takes a place for one more stream of `client`; `None` when it holds
    /// its limit already. With no limit, always a place, and no entry.
    pub(crate) fn acquire(self: &Arc<Self>, client: IpAddr) -> Option<Option<ClientSlot>> {
        self.acquire_key(ClientKey::Address(key(client)))
    }

    /// [`acquire`](ClientStreams::acquire) for a client known by name.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn acquire_named(self: &Arc<Self>, name: &str) -> Option<Option<ClientSlot>> {
        self.acquire_key(ClientKey::Named(name.into()))
    }

    fn acquire_key(self: &Arc<Self>, key: ClientKey) -> Option<Option<ClientSlot>> {
        if self.max == 0 {
            return Some(None);
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(key.clone()).or_insert(0);
        if *n as usize >= self.max {
            return None;
        }
        *n += 1;
        Some(Some(ClientSlot {
            owner: Arc::clone(self),
            key,
        }))
    }

    /// Clients holding a stream now.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .owner
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What a client is counted as: its IPv4 address, or its IPv6 /64.
pub(crate) fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !(u128::MAX >> 64)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_holds_at_most_its_limit_and_others_are_apart() {
        let t = Arc::new(ClientStreams::new(2));
        let a1 = t.acquire(ip("10.0.0.1")).unwrap();
        let a2 = t.acquire(ip("10.0.0.1")).unwrap();
        assert!(t.acquire(ip("10.0.0.1")).is_none());
        let b = t.acquire(ip("10.0.0.2")).unwrap();
        assert!(b.is_some());
        drop(a1);
        let a3 = t.acquire(ip("10.0.0.1")).unwrap();
        assert!(t.acquire(ip("::ffff:10.0.0.1")).is_none(), "mapped = v4");
        drop((a2, a3, b));
        assert_eq!(t.clients(), 0, "no entry outlives its streams");
    }

    #[test]
    fn named_clients_are_apart_from_addresses() {
        let t = Arc::new(ClientStreams::new(1));
        let _a = t.acquire_named("sub:42").unwrap();
        assert!(t.acquire_named("sub:42").is_none());
        assert!(t.acquire_named("sub:43").unwrap().is_some());
        assert!(t.acquire(ip("10.0.0.1")).unwrap().is_some());
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let t = Arc::new(ClientStreams::new(1));
        let _a = t.acquire(ip("2001:db8:1:2::1")).unwrap();
        assert!(t.acquire(ip("2001:db8:1:2:ffff::9")).is_none());
        assert!(t.acquire(ip("2001:db8:1:3::1")).is_some());
        assert_eq!(key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn no_limit_keeps_no_table() {
        let t = Arc::new(ClientStreams::new(0));
        let slots: Vec<_> = (0..100)
            .map(|_| t.acquire(ip("10.0.0.1")).unwrap())
            .collect();
        assert!(slots.iter().all(Option::is_none));
        assert_eq!(t.clients(), 0);
    }
}
