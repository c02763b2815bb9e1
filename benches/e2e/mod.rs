//! The end-to-end bench's runners and reports (used by the `mcdist-bench` binary).
//!
//! Each run starts the receivers of one tool in hosts 1..=N of a namespace
//! topology and its sender in host 0, injects receive-side loss with nftables
//! (`numgen random`) when asked, waits for every process, verifies every copy
//! against the image's BLAKE3 digest and reads the sender's interface byte
//! counter before and after.
//!
//! | module   | owns                                                             |
//! |----------|------------------------------------------------------------------|
//! | `tool`   | the compared tools, their names, whether each can run here       |
//! | `run`    | shared settings, scratch space, the image, one measured run      |
//! | `runner` | each tool's command lines as a launch plan, and the one runner   |
//! | `netns`  | MTU, injected loss, interface counters, CPU time                 |
//! | `pressure` | a core kept busy, receivers stopped in turn (`SIGSTOP`)        |
//! | `report` | results, text and Markdown tables, CSV, medians, summary         |
//! | `plot`   | the SVG plot                                                     |

mod netns;
mod plot;
mod pressure;
mod report;
mod run;
mod runner;
#[cfg(test)]
mod tests;
mod tool;

pub use netns::{set_mtu, set_slow_link};
pub use plot::to_svg;
pub use pressure::{SlowLink, StallSpec};
pub use report::{from_csv, medians, summary, to_csv, to_markdown, RunResult};
pub use run::{Bench, WorkDir};
pub use tool::{mcdist_next_to_me, Tool};
