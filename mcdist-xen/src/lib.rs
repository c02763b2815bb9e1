//! Xen memtap backend for mcdist (vm_event / mem_paging). Work in progress.
