//! Setup shared by the integration tests: datagram building, addresses, and the
//! network-namespace preamble (skip when unavailable, test image, topology,
//! `mcdist serve` / `mcdist fetch` command lines) of the netns tests.
//!
//! Each test crate includes this with `mod common;` and uses only part of it.
#![allow(dead_code)]

use mcdist::testnet::{unavailable, write_test_image, Topology};
use mcdist::wire::{
    encode_ranges, ranges_from_encoded, Body, HeaderFlags, Message, PageRange, Request,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `mcdist` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mcdist");

/// Parse a socket address written by the test.
pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A plain message of `session` (sequence 1, no header flags) as bytes.
pub fn emit(session: u64, body: Body<'_>) -> Vec<u8> {
    let m = Message {
        session,
        seq: 1,
        flags: HeaderFlags::empty(),
        body,
    };
    let mut buf = vec![0u8; m.buffer_len()];
    m.emit(&mut buf).expect("buffer sized by buffer_len");
    buf
}

/// A namespace topology (host 0 serves, the others receive) with a test image
/// in a scratch directory.
pub struct Bridge {
    /// Scratch directory; holds `image`.
    pub dir: tempfile::TempDir,
    /// The test image.
    pub img: PathBuf,
    /// The namespaces.
    pub topo: Topology,
    /// The server's unicast address (host 0, port 7001).
    pub listen: String,
    subnet: u8,
}

impl Bridge {
    /// Build the topology `tag` of `hosts` hosts in `subnet` with a test image of
    /// `mib` MiB plus `tail` bytes (see [`write_test_image`]); `None`, after
    /// printing why, when network namespaces are unavailable here.
    pub fn new(
        tag: &str,
        hosts: usize,
        subnet: u8,
        mib: usize,
        zero_every: Option<usize>,
        tail: usize,
    ) -> Option<Bridge> {
        if let Some(why) = unavailable() {
            eprintln!("skipping: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("image");
        write_test_image(&img, mib, zero_every, tail).unwrap();
        let topo = Topology::create(tag, hosts, subnet).expect("building the namespace topology");
        let listen = format!("{}:7001", topo.hosts[0].addr);
        Some(Bridge {
            dir,
            img,
            topo,
            listen,
            subnet,
        })
    }

    /// Multicast group `239.255.<subnet>.<last>:7000`.
    pub fn group(&self, last: usize) -> String {
        format!("239.255.{}.{last}:7000", self.subnet)
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `mcdist serve` of the image in host 0 to `group`, listening on [`Bridge::listen`].
    pub fn serve(&self, group: &str) -> Command {
        let mut c = self.topo.command(0, BIN);
        c.args(["serve", "--image"]).arg(&self.img).args([
            "--group",
            group,
            "--iface",
            &self.topo.hosts[0].iface,
            "--listen",
            &self.listen,
        ]);
        c
    }

    /// `mcdist fetch` in `host` from `group` into `out`, giving up after `timeout` seconds.
    pub fn fetch(&self, host: usize, group: &str, timeout: &str, out: &Path) -> Command {
        let mut c = self.topo.command(host, BIN);
        c.args(["fetch", "--group", group])
            .args(["--iface", &self.topo.hosts[host].iface])
            .args(["--server", &self.listen, "--timeout", timeout, "--out"])
            .arg(out);
        c
    }
}

/// A demand request (or with `flags`, a retry) of `ranges` in `session`.
pub fn request(session: u64, flags: mcdist::wire::RequestFlags, ranges: &[PageRange]) -> Vec<u8> {
    let mut raw = Vec::new();
    encode_ranges(ranges, &mut raw);
    emit(
        session,
        Body::Request(Request {
            rx_rate: 0,
            loss_permille: 0,
            flags,
            heard_seq: 0,
            ranges: ranges_from_encoded(&raw),
        }),
    )
}
