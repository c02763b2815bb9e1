//! Simulated clients: what each one does ([`Workload`]), how it is set up
//! ([`ClientSpec`]), its lifecycle, and the record of what it was handed that the
//! checks read.

use super::link::{Link, LinkConfig, LinkStats, RxCapacity};
use super::Sim;
use crate::bitmap::PageBitmap;
use crate::client::{Client, ClientConfig, ClientError};
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What a simulated client does once started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Fetch the whole image ([`Client::fetch_all`](crate::client::Client::fetch_all)).
    FetchAll,
    /// Fault on these pages one after another, like a vCPU: each fault waits for
    /// its page, then the next comes `think` later.
    Faults {
        /// Pages in fault order.
        pages: Vec<u64>,
        /// Time between getting one page and faulting on the next.
        think: Duration,
    },
    /// Join and do nothing else.
    Idle,
}

/// How one simulated client is set up.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Client settings; `server` is overwritten with the simulated server's address.
    pub config: ClientConfig,
    /// Server → client impairments (group and unicast).
    pub downlink: LinkConfig,
    /// Client → server impairments.
    pub uplink: LinkConfig,
    /// Receive capacity; `None` is unlimited.
    pub rx_capacity: Option<RxCapacity>,
    /// What the client does.
    pub workload: Workload,
    /// Virtual time at which the client starts.
    pub start_at: Duration,
    /// Virtual time at which the client crashes (stops sending and receiving).
    pub crash_at: Option<Duration>,
}

impl ClientSpec {
    /// A whole-image fetch over links with loss `p`, both ways, starting at once.
    pub fn fetch_all(loss: f64) -> ClientSpec {
        ClientSpec {
            config: ClientConfig::new(Sim::SERVER_ADDR),
            downlink: LinkConfig::lossy(loss),
            uplink: LinkConfig::lossy(loss),
            rx_capacity: None,
            workload: Workload::FetchAll,
            start_at: Duration::ZERO,
            crash_at: None,
        }
    }

    /// A demand-fault workload over links with loss `p`.
    pub fn faults(loss: f64, pages: Vec<u64>, think: Duration) -> ClientSpec {
        ClientSpec {
            workload: Workload::Faults { pages, think },
            ..ClientSpec::fetch_all(loss)
        }
    }
}

/// Lifecycle of a simulated client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Not started yet (late joiner).
    Waiting,
    /// Running.
    Running,
    /// Crashed: sends and receives nothing.
    Crashed,
}

/// A simulated client: the state machine, its links and what it was handed.
#[derive(Debug)]
pub struct SimClient {
    /// Its address.
    pub addr: SocketAddr,
    /// The state machine.
    pub client: Client,
    /// Lifecycle.
    pub state: ClientState,
    /// Pages handed over by [`ClientEvent::PageReady`](crate::client::ClientEvent::PageReady).
    pub ready: PageBitmap,
    /// Pages whose bytes differed from the source (must stay empty).
    pub mismatches: Vec<u64>,
    /// Pages reported ready more than once (must stay zero).
    pub double_ready: u64,
    /// Virtual time of [`ClientEvent::Complete`](crate::client::ClientEvent::Complete) (or of the last fault of a
    /// fault workload), since the client started.
    pub finished_after: Option<Duration>,
    /// The failure, if any, and when (since the simulation began).
    pub failed: Option<(Duration, ClientError)>,
    /// Fault latencies of a fault workload, in order.
    pub fault_latencies: Vec<Duration>,
    /// Datagrams dropped at a full receive queue.
    pub rx_overflows: u64,
    /// Datagrams received by this client (after the receive queue).
    pub rx_datagrams: u64,
    /// Times the client saw a session resume.
    pub resumes: u64,
    pub(super) spec: ClientSpec,
    pub(super) down: Link,
    pub(super) up: Link,
    pub(super) busy_until: Instant,
    pub(super) image: Option<Bytes>,
    pub(super) started_at: Option<Instant>,
    pub(super) fault_idx: usize,
    pub(super) fault_started: Option<Instant>,
    pub(super) next_fault_at: Option<Instant>,
}

impl SimClient {
    /// When the client's next timer runs: when it is due, or once a stall that
    /// holds it then ends (`base` is the simulation's start).
    pub(super) fn timer_at(&self, base: Instant) -> Option<Instant> {
        let t = self.client.poll_timeout()?;
        Some(match self.spec.rx_capacity.and_then(|c| c.stalls) {
            Some(st) if t > base => base + st.resume(t - base),
            _ => t,
        })
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &ClientSpec {
        &self.spec
    }
    /// Downlink counters.
    pub fn downlink_stats(&self) -> LinkStats {
        self.down.stats
    }
    /// Uplink counters.
    pub fn uplink_stats(&self) -> LinkStats {
        self.up.stats
    }
    /// True when the client completed its workload.
    pub fn finished(&self) -> bool {
        self.finished_after.is_some()
    }
    /// True once the client needs no more driving: finished, failed or crashed.
    pub fn settled(&self) -> bool {
        self.state == ClientState::Crashed || self.finished() || self.failed.is_some()
    }

    /// Issue the client's next fault (or finish its workload).
    pub(super) fn next_fault(&mut self, now: Instant) {
        let Workload::Faults { pages, .. } = &self.spec.workload else {
            return;
        };
        let Some(&pfn) = pages.get(self.fault_idx) else {
            if self.finished_after.is_none() {
                self.finished_after = self.started_at.map(|s| now.duration_since(s));
                self.client.leave(now, true);
            }
            return;
        };
        self.fault_started = Some(now);
        if self.client.session().is_some() && self.client.has_page(pfn) {
            self.fault_resolved(now);
        } else {
            self.client.request_page(now, pfn);
        }
    }

    /// A page the client handed over (lent, or in a `PageReady`): checked against the
    /// image, counted once, and the fault in progress resolved by it.
    pub(super) fn page_ready(&mut self, now: Instant, page_size: usize, pfn: u64, data: &[u8]) {
        if !self.ready.set(pfn) {
            self.double_ready += 1;
        }
        let ok = self
            .image
            .as_ref()
            .is_some_and(|img| super::page_matches(img, page_size, pfn, data));
        if !ok {
            self.mismatches.push(pfn);
        }
        if let Workload::Faults { pages, .. } = &self.spec.workload {
            if self.fault_started.is_some() && pages.get(self.fault_idx) == Some(&pfn) {
                self.fault_resolved(now);
            }
        }
    }

    /// Record the latency of the fault in progress and schedule the next one.
    pub(super) fn fault_resolved(&mut self, now: Instant) {
        let Workload::Faults { think, .. } = self.spec.workload else {
            return;
        };
        if let Some(t0) = self.fault_started.take() {
            self.fault_latencies.push(now.duration_since(t0));
        }
        self.fault_idx += 1;
        self.next_fault_at = Some(now + think);
    }
}
