//! A private network of Linux network namespaces, so a test can cut a member off and heal it.
//!
//! A "switch" namespace holds a bridge. Each member gets its own namespace with one interface
//! plugged into the bridge (`10.213.<n>.<id>`), and the test's own namespace gets one too
//! (`10.213.<n>.254`), so agents and clients started by the test reach every member. Cutting a
//! member takes its bridge port down: it loses every peer, agent and client at once, as a host
//! whose switch port dies would; healing brings the port back. Needs root and iproute2.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_NETWORK: AtomicU32 = AtomicU32::new(0);

pub struct PrivateNet {
    /// Names every namespace and interface of this network: `rw<n>`.
    prefix: String,
    /// First three octets of its /24.
    subnet: String,
    size: u64,
}

impl PrivateNet {
    /// Builds a network for members `1..=size`. Leftovers of an earlier run with the same
    /// number are removed first.
    pub fn create(size: u64) -> Result<Self, String> {
        let number = (std::process::id() + NEXT_NETWORK.fetch_add(1, Ordering::Relaxed)) % 250;
        let network = Self {
            prefix: format!("rw{number}"),
            subnet: format!("10.213.{number}"),
            size,
        };
        network.remove();
        network.build().inspect_err(|_| network.remove())?;
        Ok(network)
    }

    fn build(&self) -> Result<(), String> {
        let switch = self.switch();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for id in 1..=self.size {
            let namespace = self.namespace(id);
            let port = self.port(id);
            ip(&["netns", "add", &namespace])?;
            ip(&[
                "link", "add", &port, "netns", &switch, "type", "veth", "peer", "name", "eth0",
                "netns", &namespace,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            let address = format!("{}/24", self.address(id));
            ip(&["-n", &namespace, "addr", "add", &address, "dev", "eth0"])?;
            ip(&["-n", &namespace, "link", "set", "eth0", "up"])?;
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        }
        let host = format!("{}-host", self.prefix);
        let uplink = format!("{}-up", self.prefix);
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", &uplink, "netns", &switch,
        ])?;
        ip(&["-n", &switch, "link", "set", &uplink, "master", "br0", "up"])?;
        let address = format!("{}.254/24", self.subnet);
        ip(&["addr", "add", &address, "dev", &host])?;
        ip(&["link", "set", &host, "up"])
    }

    /// Member `id`'s IP address.
    pub fn address(&self, id: u64) -> String {
        format!("{}.{id}", self.subnet)
    }

    /// The namespace member `id` runs in.
    pub fn namespace(&self, id: u64) -> String {
        format!("{}-m{id}", self.prefix)
    }

    /// Cuts member `id` off from everyone.
    pub fn cut(&self, id: u64) -> Result<(), String> {
        ip(&["-n", &self.switch(), "link", "set", &self.port(id), "down"])
    }

    /// Plugs member `id` back in.
    pub fn heal(&self, id: u64) -> Result<(), String> {
        ip(&["-n", &self.switch(), "link", "set", &self.port(id), "up"])
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    fn port(&self, id: u64) -> String {
        format!("{}-p{id}", self.prefix)
    }

    /// Deleting the namespaces deletes the veth pairs in them; errors mean "was not there".
    fn remove(&self) {
        for id in 1..=self.size {
            let _ = ip(&["netns", "del", &self.namespace(id)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
        let _ = ip(&["link", "del", &format!("{}-host", self.prefix)]);
    }
}

impl Drop for PrivateNet {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).output().map_err(|error| {
        format!(
            "run ip {}: {error} (iproute2 is needed, and root: apt-get install iproute2)",
            args.join(" ")
        )
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {} (network namespaces need root)",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
