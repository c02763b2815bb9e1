//! The driver: virtual time, the event queue, and the step loop that flushes
//! every node's transmits onto the links, advances to the next instant that
//! matters and feeds datagrams and timeouts back in.

use super::node::{ClientState, SimClient, Workload};
use super::{Sim, SimError, SimNode};
use crate::bitmap::PageBitmap;
use crate::client::ClientEvent;
use crate::Dest;
use bytes::Bytes;
use std::cmp::Ordering;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Node {
    Server,
    Client(usize),
}

#[derive(Debug)]
pub(super) struct Ev {
    at: Instant,
    seq: u64,
    to: Node,
    from: SocketAddr,
    data: Bytes,
    /// Already passed the receiver's queue.
    queued: bool,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, insertion order).
        o.at.cmp(&self.at).then(o.seq.cmp(&self.seq))
    }
}

impl Sim {
    pub(super) fn push(
        &mut self,
        at: Instant,
        to: Node,
        from: SocketAddr,
        data: Bytes,
        queued: bool,
    ) {
        self.ev_seq += 1;
        self.queue.push(Ev {
            at,
            seq: self.ev_seq,
            to,
            from,
            data,
            queued,
        });
    }

    /// Run until every client is settled (finished, failed or crashed) or until
    /// `limit` of virtual time has passed since the simulation began. Returns
    /// true when every client settled.
    pub fn drive(&mut self, limit: Duration) -> Result<bool, SimError> {
        let deadline = self.base + limit;
        loop {
            if self.all_settled() {
                return Ok(true);
            }
            if !self.step(deadline)? {
                return Ok(self.all_settled());
            }
        }
    }

    /// Run until `at` (virtual time since the simulation began), whatever the clients do.
    pub fn run_until(&mut self, at: Duration) -> Result<(), SimError> {
        let deadline = self.base + at;
        while self.step(deadline)? {}
        Ok(())
    }

    /// True when every client is finished, failed or crashed.
    pub fn all_settled(&self) -> bool {
        self.clients.iter().all(SimClient::settled)
    }

    /// One step: flush outputs, advance to the next instant that matters, feed
    /// inputs. Returns false when the deadline was reached.
    fn step(&mut self, deadline: Instant) -> Result<bool, SimError> {
        self.steps += 1;
        self.flush();
        let mut next = deadline;
        if let Some(ev) = self.queue.peek() {
            next = next.min(ev.at);
        }
        if let Some(t) = self.server.poll_timeout() {
            next = next.min(t);
        }
        for c in &self.clients {
            match c.state {
                ClientState::Waiting => next = next.min(self.base + c.spec.start_at),
                ClientState::Running => {
                    if let Some(t) = c.timer_at(self.base) {
                        next = next.min(t);
                    }
                    if let Some(t) = c.next_fault_at {
                        next = next.min(t);
                    }
                    if let Some(t) = c.spec.crash_at {
                        next = next.min(self.base + t);
                    }
                }
                ClientState::Crashed => {}
            }
        }
        if next >= deadline && self.queue.peek().is_none_or(|e| e.at > deadline) {
            self.now = self.now.max(deadline);
            self.fire_timers();
            self.flush();
            return Ok(false);
        }
        if next <= self.now {
            // Something wants to run now; time must still move after a
            // bounded number of steps at one instant.
            if self.steps > 200_000 {
                return Err(SimError::Stalled {
                    at: self.elapsed(),
                    who: self.stale_node(),
                });
            }
        } else {
            self.now = next;
            self.steps = 0;
        }
        // Deliver datagrams due now.
        while self.queue.peek().is_some_and(|e| e.at <= self.now) {
            let Some(ev) = self.queue.pop() else { break };
            self.deliver(ev);
        }
        self.fire_timers();
        Ok(true)
    }

    fn stale_node(&self) -> SimNode {
        if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
            return SimNode::Server;
        }
        for (i, c) in self.clients.iter().enumerate() {
            if c.state == ClientState::Running
                && (c.timer_at(self.base).is_some_and(|t| t <= self.now)
                    || c.next_fault_at.is_some_and(|t| t <= self.now))
            {
                return SimNode::Client(i);
            }
        }
        SimNode::EventQueue
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            match c.state {
                ClientState::Waiting if self.base + c.spec.start_at <= now => {
                    c.state = ClientState::Running;
                    c.started_at = Some(now);
                    c.busy_until = now;
                    if c.spec.workload == Workload::FetchAll {
                        c.client.fetch_all(now);
                    }
                    if let Workload::Faults { .. } = c.spec.workload {
                        c.next_fault_at = Some(now);
                    }
                }
                ClientState::Running => {}
                _ => continue,
            }
            if c.spec.crash_at.is_some_and(|t| self.base + t <= now) {
                c.state = ClientState::Crashed;
                continue;
            }
            if c.timer_at(self.base).is_some_and(|t| t <= now) {
                c.client.handle_timeout(now);
            }
            if c.next_fault_at.is_some_and(|t| t <= now) {
                c.next_fault_at = None;
                c.next_fault(now);
            }
            self.drain_client_events(i);
        }
    }

    /// A page lent by the client's sink.
    fn client_page(&mut self, i: usize, pfn: u64, data: &[u8]) {
        let (now, page_size) = (self.now, self.page_size);
        self.clients[i].page_ready(now, page_size, pfn, data);
    }

    fn drain_client_events(&mut self, i: usize) {
        let now = self.now;
        let elapsed = self.elapsed();
        let page_size = self.page_size;
        let c = &mut self.clients[i];
        while let Some(e) = c.client.poll_event() {
            match e {
                ClientEvent::SessionStarted(s) => {
                    c.ready = PageBitmap::new(s.page_count);
                    c.image = self
                        .images
                        .iter()
                        .rev()
                        .find(|(d, _)| *d == s.digest)
                        .map(|(_, img)| img.clone());
                }
                ClientEvent::SessionResumed(_) => c.resumes += 1,
                // Simulated clients fault on their traces; they do not prefetch.
                ClientEvent::WorkingSetHint(_) => {}
                ClientEvent::PageReady { pfn, data } => c.page_ready(now, page_size, pfn, &data),
                ClientEvent::Complete => {
                    if c.spec.workload == Workload::FetchAll && c.finished_after.is_none() {
                        c.finished_after = c.started_at.map(|s| now.duration_since(s));
                        c.client.leave(now, true);
                    }
                }
                ClientEvent::Failed(err) => {
                    if c.failed.is_none() {
                        c.failed = Some((elapsed, err));
                    }
                }
            }
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev.to {
            Node::Server => {
                self.server_rx_datagrams += 1;
                self.server.handle_datagram(now, ev.from, &ev.data);
            }
            Node::Client(i) => {
                let c = &mut self.clients[i];
                if c.state != ClientState::Running {
                    return;
                }
                if let (Some(cap), false) = (c.spec.rx_capacity, ev.queued) {
                    let rate = cap.bytes_per_sec.max(1) as f64;
                    let mut start = c.busy_until.max(now);
                    // What waits in the queue is the work ahead, not the stalls between.
                    let mut ahead = start.duration_since(now);
                    if let Some(st) = cap.stalls {
                        let (from, to) = (now - self.base, start - self.base);
                        ahead = ahead.saturating_sub(st.stalled_between(from, to));
                        start = self.base + st.resume(to);
                    }
                    let backlog = ahead.as_secs_f64() * rate;
                    let len = ev.data.len() as f64;
                    if backlog + len > cap.queue_bytes as f64 {
                        // The kernel counts these for the socket (SO_RXQ_OVFL);
                        // the driver hands the count to the client.
                        c.rx_overflows += 1;
                        c.client.note_socket_drops(c.rx_overflows);
                        return;
                    }
                    let done = start + Duration::from_secs_f64(len / rate);
                    c.busy_until = done;
                    if done > now {
                        self.push(done, ev.to, ev.from, ev.data, true);
                        return;
                    }
                }
                c.rx_datagrams += 1;
                // The drivers' entry point: a page that arrived whole is lent, the rest
                // come as events (each checked the same way below).
                let mut lent = std::mem::take(&mut self.lent);
                c.client
                    .handle_datagram_borrowed(now, ev.from, &ev.data, &mut |pfn, page| {
                        lent.push((pfn, Bytes::copy_from_slice(page)))
                    });
                for (pfn, data) in lent.drain(..) {
                    self.client_page(i, pfn, &data);
                }
                self.lent = lent;
                self.drain_client_events(i);
            }
        }
    }

    /// Hand every pending transmit of every node to the links.
    fn flush(&mut self) {
        let now = self.now;
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(t) = self.server.poll_transmit(now, &mut buf) {
            let data = Bytes::copy_from_slice(&buf[..t.len]);
            self.capture(true, &data);
            // A shared bottleneck queues every datagram the server sends and
            // drops it, for every receiver, when its queue is full.
            let Some(wait) = self.bottleneck_admit(data.len()) else {
                continue;
            };
            match t.dest {
                Dest::Group => {
                    self.group_datagrams += 1;
                    if data.get(3) != Some(&(crate::wire::Kind::Announce as u8)) {
                        self.group_data_bytes += data.len() as u64;
                    }
                    for i in 0..self.clients.len() {
                        if self.clients[i].state == ClientState::Running {
                            self.send_down(i, data.clone(), wait);
                        }
                    }
                }
                Dest::Peer(a) => {
                    self.server_unicast_datagrams += 1;
                    *self.unicast_bytes.entry(a).or_default() += data.len() as u64;
                    match self.by_addr.get(&a).copied() {
                        Some(i) if self.clients[i].state == ClientState::Running => {
                            self.send_down(i, data, wait)
                        }
                        _ => self.undeliverable += 1,
                    }
                }
            }
        }
        while let Some(e) = self.server.poll_event() {
            self.server_events.push((self.elapsed(), e));
        }
        for i in 0..self.clients.len() {
            if self.clients[i].state != ClientState::Running {
                continue;
            }
            while let Some(t) = self.clients[i].client.poll_transmit(now, &mut buf) {
                self.client_datagrams += 1;
                let data = Bytes::copy_from_slice(&buf[..t.len]);
                self.capture(false, &data);
                if t.dest != Dest::Peer(Sim::SERVER_ADDR) {
                    self.undeliverable += 1;
                    continue;
                }
                let from = self.clients[i].addr;
                let (arrivals, n) = self.clients[i].up.transmit();
                for d in arrivals.iter().take(n).flatten() {
                    self.push(now + *d, Node::Server, from, data.clone(), false);
                }
            }
            self.drain_client_events(i);
        }
        self.buf = buf;
    }

    /// The delay of one datagram of `len` bytes through the shared bottleneck
    /// (zero without one), or `None` when its queue is full and it is dropped.
    fn bottleneck_admit(&mut self, len: usize) -> Option<Duration> {
        let Some(cap) = self.bottleneck else {
            return Some(Duration::ZERO);
        };
        let rate = cap.bytes_per_sec.max(1) as f64;
        let start = self.bottleneck_busy_until.max(self.now);
        let backlog = start.duration_since(self.now).as_secs_f64() * rate;
        if backlog + len as f64 > cap.queue_bytes as f64 {
            self.bottleneck_drops += 1;
            return None;
        }
        let done = start + Duration::from_secs_f64(len as f64 / rate);
        self.bottleneck_busy_until = done;
        Some(done.duration_since(self.now))
    }

    fn send_down(&mut self, i: usize, data: Bytes, wait: Duration) {
        let (arrivals, n) = self.clients[i].down.transmit();
        for d in arrivals.iter().take(n).flatten() {
            self.push(
                self.now + wait + *d,
                Node::Client(i),
                Sim::SERVER_ADDR,
                data.clone(),
                false,
            );
        }
    }
}
