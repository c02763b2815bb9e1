//! An in-memory network of endpoints, in real time, for threaded tests and
//! embedding without sockets. Group datagrams reach every other endpoint that
//! joined the group; peer datagrams reach the endpoint with that address.

use super::{Capabilities, Received, Transport, Wake};
use crate::Dest;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

enum Item {
    Datagram(SocketAddr, Bytes),
    Wake,
}

#[derive(Default)]
struct Hub {
    endpoints: HashMap<SocketAddr, (Sender<Item>, bool)>,
}

/// A shared in-memory network.
#[derive(Clone, Default)]
pub struct MemNetwork {
    hub: Arc<Mutex<Hub>>,
    max_datagram: usize,
}

impl std::fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNetwork").finish_non_exhaustive()
    }
}

impl MemNetwork {
    /// A network carrying datagrams of up to `max_datagram` bytes.
    pub fn new(max_datagram: usize) -> MemNetwork {
        MemNetwork {
            hub: Arc::default(),
            max_datagram,
        }
    }

    /// Attach an endpoint at `addr`; `join_group` makes it receive group datagrams.
    pub fn endpoint(&self, addr: SocketAddr, join_group: bool) -> MemTransport {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.hub
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .endpoints
            .insert(addr, (tx.clone(), join_group));
        MemTransport {
            net: self.clone(),
            addr,
            rx,
            waker: Arc::new(MemWaker(tx)),
        }
    }
}

struct MemWaker(Sender<Item>);

impl Wake for MemWaker {
    fn wake(&self) {
        let _ = self.0.send(Item::Wake);
    }
}

/// One endpoint of a [`MemNetwork`].
pub struct MemTransport {
    net: MemNetwork,
    addr: SocketAddr,
    rx: Receiver<Item>,
    waker: Arc<MemWaker>,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTransport")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        self.net
            .hub
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .endpoints
            .remove(&self.addr);
    }
}

impl Transport for MemTransport {
    fn send(&mut self, dest: Dest, data: &[u8]) -> io::Result<()> {
        if data.len() > self.net.max_datagram {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "datagram larger than the network carries",
            ));
        }
        let bytes = Bytes::copy_from_slice(data);
        let hub = self.net.hub.lock().unwrap_or_else(PoisonError::into_inner);
        match dest {
            Dest::Group => {
                for (addr, (tx, joined)) in &hub.endpoints {
                    if *joined && *addr != self.addr {
                        let _ = tx.send(Item::Datagram(self.addr, bytes.clone()));
                    }
                }
            }
            Dest::Peer(p) => {
                if let Some((tx, _)) = hub.endpoints.get(&p) {
                    let _ = tx.send(Item::Datagram(self.addr, bytes));
                }
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<Option<Received>> {
        let item = match timeout {
            Some(Duration::ZERO) => match self.rx.try_recv() {
                Ok(i) => i,
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => return Ok(None),
            },
            Some(t) => match self.rx.recv_timeout(t) {
                Ok(i) => i,
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            },
            None => match self.rx.recv() {
                Ok(i) => i,
                Err(_) => return Ok(None),
            },
        };
        match item {
            Item::Wake => Ok(None),
            Item::Datagram(from, data) => {
                let len = data.len().min(buf.len());
                buf[..len].copy_from_slice(&data[..len]);
                Ok(Some(Received { len, from }))
            }
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_datagram: self.net.max_datagram,
            batch: 1,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
