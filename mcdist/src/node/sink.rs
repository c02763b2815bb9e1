//! Where a client's pages go: the [`PageSink`] an embedder implements (called
//! on the client's I/O thread, once per page that arrives with data), the
//! typed [`SinkError`] a sink refuses a page with, and two sinks of the
//! library's own ([`NullSink`], [`MemorySink`]).

use super::NodeError;
use crate::SessionInfo;
use std::io;
use std::sync::{Mutex, PoisonError};
use thiserror::Error;

/// Why a [`PageSink`] refused a page; the session then fails with
/// [`NodeError::Sink`].
#[derive(Debug, Error)]
pub enum SinkError {
    /// The page was delivered twice to a sink that takes each page once.
    #[error("page {pfn} delivered twice")]
    Duplicate {
        /// The page.
        pfn: u64,
    },
    /// The page does not fit the sink: past its end, or not a page long.
    #[error(
        "page {pfn} of {len} bytes does not fit a store of {pages} pages of {page_size} bytes"
    )]
    DoesNotFit {
        /// The page.
        pfn: u64,
        /// Its length.
        len: usize,
        /// Pages the sink holds.
        pages: u64,
        /// The sink's page size.
        page_size: usize,
    },
    /// The consumer the sink hands pages to has stopped.
    #[error("the page consumer has stopped")]
    Stopped,
    /// Storing the page failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Receives pages on the client's I/O thread.
pub trait PageSink: Send + Sync + 'static {
    /// Page `pfn` is present; called exactly once per page that arrives with
    /// data (zero pages from the session's zero map are not delivered).
    /// Returning an error fails the session.
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError>;
    /// The client joined a session (or found its server again after a restart with the
    /// same image); called before any page of that session is delivered.
    fn session_started(&self, _info: &SessionInfo) {}
    /// The session failed.
    fn failed(&self, _error: &NodeError) {}
}

/// A sink that ignores pages (for measuring the protocol alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl PageSink for NullSink {
    fn page_ready(&self, _pfn: u64, _data: &[u8]) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A sink that keeps every page in memory, keyed by page number, and fails the session if a
/// page is delivered twice (small images and tests).
#[derive(Debug, Default)]
pub struct MemorySink(Mutex<std::collections::HashMap<u64, Vec<u8>>>);

impl MemorySink {
    /// The pages received so far.
    pub fn pages(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Vec<u8>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// Number of pages received so far.
    pub fn len(&self) -> usize {
        self.pages().len()
    }
    /// True when no page has arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PageSink for MemorySink {
    fn page_ready(&self, pfn: u64, data: &[u8]) -> Result<(), SinkError> {
        if self.pages().insert(pfn, data.to_vec()).is_some() {
            return Err(SinkError::Duplicate { pfn });
        }
        Ok(())
    }
}
