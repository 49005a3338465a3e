//! A network namespace of a test's own, joined to this one by a veth pair
//! on addresses of its own (`10.233.N.0/30`): a client that is not on
//! loopback, or whose link the test can cut. Removed on drop. Needs root
//! and `ip` (iproute2); without them a test says why and passes, except
//! under `CI=true`, where it fails.

use std::process::Command;

/// Whether this runs under CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Runs `ip args…`; its error output when it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with a veth pair to this one: this side has
/// `10.233.N.1/30`, the namespace's side `10.233.N.2/30`. Removed on drop.
pub struct Netns {
    pub name: String,
    outer: String,
    inner: String,
    /// This side's address, `10.233.N.1`.
    pub server: String,
}

impl Netns {
    pub fn make(n: u8) -> Result<Netns, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root: cannot make a network namespace".into());
        }
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let ns = Netns {
            name: format!("ssed-t-{tag}"),
            outer: format!("sdpa{tag}"),
            inner: format!("sdpb{tag}"),
            server: format!("10.233.{n}.1"),
        };
        let client = format!("10.233.{n}.2/30");
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop removes what was made.
        ip(&[
            "link", "add", &ns.outer, "type", "veth", "peer", "name", &ns.inner, "netns", &ns.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.server),
            "dev",
            &ns.outer,
        ])?;
        ip(&["link", "set", &ns.outer, "up"])?;
        ns.exec(&["ip", "addr", "add", &client, "dev", &ns.inner])?;
        ns.exec(&["ip", "link", "set", &ns.inner, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `args…` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair with it.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
        let _ = ip(&["link", "del", &self.outer]);
    }
}

/// The namespace numbered `n`, or `None` after saying why not (a failure
/// under CI).
pub fn netns(test: &str, n: u8) -> Option<Netns> {
    match Netns::make(n) {
        Ok(ns) => Some(ns),
        Err(why) if in_ci() => panic!("{test}: {why} (CI=true: this test must run)"),
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}
