//! Network-namespace helpers for tests, the demo and benchmarks: every mcdist packet they
//! send stays inside namespaces created here (loopback or a private bridge).

use std::io;
use std::process::Command;

/// Errors managing namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {msg}")]
    Ip {
        /// Arguments.
        args: String,
        /// Output or error.
        msg: String,
    },
    /// Entering a namespace failed.
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        /// Namespace.
        name: String,
        /// OS error.
        source: io::Error,
    },
}

/// Runs `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetnsError::Ip {
            args: args.join(" "),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` (replacing a stale one) with `lo` up and the
    /// 239.255.0.0/16 multicast route on `lo`.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.exec(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adds the multicast route for 239.255.0.0/16 via `dev`.
    pub fn multicast_route(&self, dev: &str) -> Result<(), NetnsError> {
        self.exec(&["route", "add", "239.255.0.0/16", "dev", dev])
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread (and threads it spawns later) into this namespace.
    pub fn enter(&self) -> Result<(), NetnsError> {
        let path = std::path::Path::new("/var/run/netns").join(&self.name);
        crate::sys::setns_net(&path).map_err(|source| NetnsError::Enter {
            name: self.name.clone(),
            source,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A private bridge network: one namespace holding the bridge and `hosts` namespaces, each
/// linked to it by a veth pair with address 10.77.0.(i+1)/24 on its `eth0`.
#[derive(Debug)]
pub struct BridgeNet {
    /// Host namespaces, in order.
    pub hosts: Vec<Netns>,
    switch: Netns,
}

impl BridgeNet {
    /// Builds the network; namespace names start with `prefix`.
    pub fn create(prefix: &str, hosts: usize) -> Result<Self, NetnsError> {
        let switch = Netns::create(&format!("{prefix}sw"))?;
        switch.exec(&["link", "add", "br0", "type", "bridge"])?;
        switch.exec(&["link", "set", "br0", "up"])?;
        let mut v = Vec::new();
        for i in 0..hosts {
            let ns = Netns::create(&format!("{prefix}h{i}"))?;
            let port = format!("p{i}");
            switch.exec(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            switch.exec(&["link", "set", &port, "master", "br0"])?;
            switch.exec(&["link", "set", &port, "up"])?;
            let addr = format!("{}/24", Self::addr(i));
            ns.exec(&["addr", "add", &addr, "dev", "eth0"])?;
            ns.exec(&["link", "set", "eth0", "up"])?;
            ns.multicast_route("eth0")?;
            v.push(ns);
        }
        Ok(Self { hosts: v, switch })
    }

    /// Address of host `i`.
    pub fn addr(i: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 77, 0, (i + 1) as u8)
    }

    /// The switch namespace's name.
    pub fn switch_name(&self) -> &str {
        self.switch.name()
    }
}
