//! Deterministic, virtual-time network simulation (placeholder; filled below).
