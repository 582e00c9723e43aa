//! Separate hosts on one network: a network namespace per host, each with
//! an `eth0` on a veth pair whose other end is a port of a bridge in a
//! namespace of its own (the switch). Hosts get `10.123.0.1`,
//! `10.123.0.2`, ... in the order named. Needs root and iproute2; where
//! namespaces cannot be made, [`Lab::new`] says why and the test skips
//! (or fails under `QPQ_NETNS_TESTS=require`, as CI sets).
//!
//! Links are cut the way a network fails: [`Lab::unplug`] takes a host's
//! port off the switch (it reaches nobody), [`Lab::cut`] drops the traffic
//! between two hosts only (blackhole routes both ways; both still reach
//! everyone else).

#![allow(dead_code)]

use std::process::Command;

/// The network of one test; its namespaces go when it is dropped.
pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
}

/// Runs `ip` with `args`; the error names the command.
fn ip(args: &[&str]) -> Result<(), String> {
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

/// Whether a missing permission must fail the test instead of skipping it.
pub fn required() -> bool {
    std::env::var("QPQ_NETNS_TESTS").is_ok_and(|v| v == "require")
}

impl Lab {
    /// Makes the switch and one namespace per host, or says why it cannot.
    pub fn new(hosts: &[&str]) -> Result<Lab, String> {
        // Short and unique per process and lab: interface names have at
        // most 15 bytes.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("qpq{}x{n}", std::process::id() % 100_000);
        let lab = Lab {
            prefix,
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        };
        lab.build()?;
        Ok(lab)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h == host)
            .unwrap_or_else(|| panic!("no host {host} in the lab"))
    }

    /// The switch's port for `host`.
    fn port(&self, host: &str) -> String {
        format!("{}p{}", self.prefix, self.index(host))
    }

    /// The address of `host`.
    pub fn addr(&self, host: &str) -> String {
        format!("10.123.0.{}", self.index(host) + 1)
    }

    fn build(&self) -> Result<(), String> {
        let sw = self.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for host in &self.hosts {
            let ns = self.ns(host);
            let port = self.port(host);
            let eth = format!("{}h{}", self.prefix, self.index(host));
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["link", "add", &eth, "type", "veth", "peer", "name", &port])?;
            ip(&["link", "set", &eth, "netns", &ns])?;
            ip(&["link", "set", &port, "netns", &sw])?;
            ip(&["-n", &ns, "link", "set", &eth, "name", "eth0"])?;
            let cidr = format!("{}/24", self.addr(host));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
        }
        Ok(())
    }

    /// `program` run on `host`.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    /// Takes `host` off the network.
    pub fn unplug(&self, host: &str) {
        self.set_port(host, "down");
    }

    /// Puts `host` back on the network.
    pub fn plug(&self, host: &str) {
        self.set_port(host, "up");
    }

    fn set_port(&self, host: &str, state: &str) {
        let (sw, port) = (self.switch(), self.port(host));
        ip(&["-n", &sw, "link", "set", &port, state]).unwrap();
    }

    /// Drops all traffic between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        for (from, to) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.addr(to));
            ip(&["-n", &self.ns(from), "route", "add", "blackhole", &dst]).unwrap();
        }
    }

    /// Undoes [`Lab::cut`].
    pub fn mend(&self, a: &str, b: &str) {
        for (from, to) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.addr(to));
            ip(&["-n", &self.ns(from), "route", "del", "blackhole", &dst]).unwrap();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces, and a veth's peer
        // with it.
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &self.ns(host)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}
