//! A small QMP client: JSON lines over QEMU's unix socket, one command at a time; events that
//! arrive in between are kept.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU sent something that is not JSON.
    #[error("QMP: malformed reply: {0}")]
    Json(#[from] serde_json::Error),
    /// QEMU closed the socket.
    #[error("QMP: QEMU closed the connection")]
    Closed,
    /// A command failed.
    #[error("QMP command {command} failed: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's description.
        desc: String,
    },
    /// A migration did not complete.
    #[error("migration ended in state {0}")]
    Migration(String),
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path` (retrying until `timeout` while QEMU creates it) and negotiates
    /// capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            events: Vec::new(),
        };
        q.read_msg()?; // greeting
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = serde_json::to_vec(&msg)?;
        text.push(b'\n');
        self.writer.write_all(&text)?;
        loop {
            let v = self.read_msg()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    desc: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            self.events.push(v);
        }
    }

    /// Turns on the `x-ignore-shared` migration capability.
    pub fn ignore_shared(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )
        .map(drop)
    }

    /// Polls `query-migrate` until the migration leaves its active states; errors unless it
    /// completed.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let start = Instant::now();
        loop {
            let r = self.execute("query-migrate", None)?;
            let status = r
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string();
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => return Err(QmpError::Migration(status)),
                _ if start.elapsed() > timeout => return Err(QmpError::Migration(status)),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}
