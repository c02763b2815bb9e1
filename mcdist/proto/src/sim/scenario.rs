//! Building and disturbing a scenario: adding clients (late joiners, crashes),
//! restarting the server, injecting arbitrary datagrams and recording traffic.

use super::driver::Node;
use super::link::Link;
use super::node::{ClientSpec, ClientState, SimClient};
use super::{Sim, SimError};
use crate::bitmap::PageBitmap;
use crate::client::Client;
use crate::server::ServerConfig;
use bytes::Bytes;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A datagram captured by [`Sim::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// True when the server sent it, false when a client did.
    pub from_server: bool,
    /// The datagram.
    pub data: Bytes,
}

impl Sim {
    /// Capture the first `max` datagrams sent from now on (e.g. for a fuzzing corpus).
    pub fn record(&mut self, max: usize) {
        self.record = Some((max, Vec::new()));
    }

    /// Datagrams captured since [`Sim::record`].
    pub fn recorded(&self) -> &[Recorded] {
        self.record.as_ref().map_or(&[], |r| &r.1)
    }

    pub(super) fn capture(&mut self, from_server: bool, data: &Bytes) {
        if let Some((max, v)) = &mut self.record {
            if v.len() < *max {
                v.push(Recorded {
                    from_server,
                    data: data.clone(),
                });
            }
        }
    }

    /// Add a client; returns its index. Its address is derived from the index.
    pub fn add_client(&mut self, mut spec: ClientSpec) -> usize {
        let i = self.clients.len();
        let addr = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 2)),
            9000,
        );
        spec.config.server = Sim::SERVER_ADDR;
        let mix = |k: u64| {
            self.seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add((i as u64) << 8 | k)
        };
        spec.config.seed = mix(1);
        let start = self.base + spec.start_at;
        let client = Client::new(spec.config.clone(), start.max(self.now));
        self.clients.push(SimClient {
            addr,
            client,
            state: ClientState::Waiting,
            ready: PageBitmap::new(0),
            mismatches: Vec::new(),
            double_ready: 0,
            finished_after: None,
            failed: None,
            fault_latencies: Vec::new(),
            rx_overflows: 0,
            rx_datagrams: 0,
            resumes: 0,
            down: Link::new(spec.downlink, mix(2)),
            up: Link::new(spec.uplink, mix(3)),
            busy_until: self.now,
            image: None,
            started_at: None,
            fault_idx: 0,
            fault_started: None,
            next_fault_at: None,
            spec,
        });
        self.by_addr.insert(addr, i);
        i
    }

    /// Crash client `i` now: it sends and receives nothing from here on.
    pub fn crash_client(&mut self, i: usize) {
        self.clients[i].state = ClientState::Crashed;
    }

    /// Replace the server with a fresh one serving `image` (same address), as if
    /// the server process restarted. Datagrams in flight reach the new server.
    pub fn restart_server(
        &mut self,
        mut cfg: ServerConfig,
        image: impl Into<Bytes>,
    ) -> Result<(), SimError> {
        let image = image.into();
        cfg.seed
            .get_or_insert(self.seed ^ (self.images.len() as u64) << 32);
        self.server = super::serve_image(cfg, image.clone(), self.page_size, self.now)?;
        self.server_image = image.clone();
        self.images.push((*blake3::hash(&image).as_bytes(), image));
        Ok(())
    }

    /// Schedule an arbitrary datagram to the server (`to == None`) or to client
    /// `to`, from `from`, after `delay`. For hostile-input tests.
    pub fn inject(&mut self, to: Option<usize>, from: SocketAddr, data: Bytes, delay: Duration) {
        let node = to.map_or(Node::Server, Node::Client);
        let at = self.now + delay;
        self.push(at, node, from, data, false);
    }
}
