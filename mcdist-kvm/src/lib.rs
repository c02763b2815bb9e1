//! KVM + userfaultfd backend for mcdist (lazy clone memory, KVM clones). Work in progress.
