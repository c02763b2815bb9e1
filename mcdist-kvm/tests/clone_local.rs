//! Real KVM clones as threads with pages from the frozen parent image in this process.

use std::sync::Arc;
use std::time::Duration;

use mcdist_kvm::clone::{CloneOptions, LocalLauncher};
use mcdist_kvm::guest::HashJob;
use mcdist_kvm::Descriptor;
use mcdist_kvm::DescriptorFile;

mod common;
use common::{fork, have_kvm};

#[test]
fn parent_forks_clones_that_compute_correct_slices() {
    if !have_kvm() {
        return;
    }
    let job = HashJob::new(32 << 20, 0.5, 0.05, 42, 4096);
    let mut frozen = fork(job);
    let desc = frozen.descriptor(None);
    // The descriptor round-trips and stays small.
    let bytes = desc.encode();
    assert!(bytes.len() < 8192, "descriptor is {} bytes", bytes.len());
    let desc = Arc::new(Descriptor::decode(&bytes).expect("decode"));
    let ticket = frozen.request_ticket(4).expect("ticket");
    let launcher = LocalLauncher {
        source: frozen.image(),
        opts: CloneOptions::default(),
    };
    let set = frozen.clone_vms(&ticket, &desc, &launcher);
    let results = set.join(Duration::from_secs(60));
    assert_eq!(results.len(), 4);
    for (id, r) in results {
        let r = r.unwrap_or_else(|e| panic!("clone {id}: {e}"));
        assert_eq!(r.result, job.expected(id), "clone {id} result");
        let touched = job.pages_touched_per_clone(4096);
        assert!(
            r.stats.pages_fetched() <= touched,
            "clone {id} fetched {} > {touched}",
            r.stats.pages_fetched()
        );
        assert!(r.stats.pages_fetched() >= touched - 3);
        assert_eq!(r.stats.zero_pages_received, 0);
    }
    // Tickets hand out fresh ids and refuse slices past the table.
    assert_eq!(frozen.request_ticket(2).expect("second ticket").ids(), 4..6);
    assert!(frozen.request_ticket(1000).is_err());
}
