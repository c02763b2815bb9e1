//! The demo guest program and its job parameters.
//!
//! The guest (`guest/hash32.S`, assembled by `build.rs`) runs in 32-bit flat protected mode
//! without paging. The parent fills a table with a linear congruential sequence, asks to be
//! cloned (port [`PORT_CLONE_ME`]), and each clone hashes its own slice of the table (32-bit
//! FNV-1a over the entries) and reports the hash on port [`PORT_RESULT`]. The clone id
//! arrives in `%ebx`, like fork's return value.
//!
//! Table entries are 32-bit words `stride` bytes apart. A stride of one page makes the guest
//! touch every page of its slice with one load each, which keeps guest run time short on
//! hosts where every guest instruction is expensive (nested virtualization) while the memory
//! access pattern, which is what lazy cloning cares about, stays that of a full scan.

/// The assembled guest program.
pub const GUEST_CODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hash32.bin"));
/// Guest physical address of the mailbox page (job parameters and result).
pub const MAILBOX_GPA: u64 = 0x1000;
/// Guest physical address where the program is loaded and starts.
pub const CODE_GPA: u64 = 0x2000;
/// Guest physical address of the data table.
pub const TABLE_GPA: u64 = 0x10_0000;
/// Port written by the guest to ask for clones.
pub const PORT_CLONE_ME: u16 = 0x10;
/// Port on which a clone reports its 32-bit result.
pub const PORT_RESULT: u16 = 0x11;

/// Errors in job parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The table and slices do not fit the guest memory or the 32-bit address space.
    #[error("table of {table_bytes} bytes at {TABLE_GPA:#x} does not fit {mem_size} bytes of guest memory")]
    TableTooLarge {
        /// Table size.
        table_bytes: u64,
        /// Guest memory size.
        mem_size: u64,
    },
    /// Slices of the clones go past the table.
    #[error("{clones} slices of {slice_words} words exceed the table of {table_words} words")]
    SlicesTooLarge {
        /// Clones.
        clones: u32,
        /// Words per slice.
        slice_words: u32,
        /// Words in the table.
        table_words: u32,
    },
}

/// The work the demo guest does: fill `table_words` entries (`stride` bytes apart), then each
/// clone hashes `slice_words` entries starting at entry `id * slice_words`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashJob {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Entries the parent fills.
    pub table_words: u32,
    /// Seed of the fill sequence.
    pub seed: u32,
    /// Entries hashed by each clone.
    pub slice_words: u32,
    /// Bytes between entries (a multiple of 4; 4 = dense table, 4096 = one entry per page).
    pub stride: u32,
}

impl HashJob {
    /// A job whose table spans `table_fraction` of memory and whose clones each scan
    /// `slice_fraction` of memory (fractions of the guest memory size), one entry every
    /// `stride` bytes.
    pub fn new(
        mem_size: u64,
        table_fraction: f64,
        slice_fraction: f64,
        seed: u32,
        stride: u32,
    ) -> Self {
        let stride = stride.max(4) & !3;
        let words = |f: f64| ((mem_size as f64 * f) / f64::from(stride)) as u64;
        let max_words = (mem_size.saturating_sub(TABLE_GPA)) / u64::from(stride);
        let table_words = words(table_fraction)
            .min(max_words)
            .min(u64::from(u32::MAX)) as u32;
        let slice_words = words(slice_fraction).min(u64::from(table_words)) as u32;
        Self {
            mem_size,
            table_words,
            seed,
            slice_words,
            stride,
        }
    }

    /// Checks that `clones` slices fit.
    pub fn validate(&self, clones: u32) -> Result<(), JobError> {
        let table_bytes = u64::from(self.table_words) * u64::from(self.stride);
        if self.stride < 4
            || self.stride % 4 != 0
            || TABLE_GPA + table_bytes > self.mem_size
            || self.mem_size > 0xC000_0000
        {
            return Err(JobError::TableTooLarge {
                table_bytes,
                mem_size: self.mem_size,
            });
        }
        if u64::from(clones) * u64::from(self.slice_words) > u64::from(self.table_words) {
            return Err(JobError::SlicesTooLarge {
                clones,
                slice_words: self.slice_words,
                table_words: self.table_words,
            });
        }
        Ok(())
    }

    /// The mailbox page contents for this job.
    pub fn mailbox(&self) -> [u8; 32] {
        let mut m = [0u8; 32];
        m[0..4].copy_from_slice(b"MCDK");
        m[4..8].copy_from_slice(&(TABLE_GPA as u32).to_le_bytes());
        m[8..12].copy_from_slice(&self.table_words.to_le_bytes());
        m[12..16].copy_from_slice(&self.seed.to_le_bytes());
        m[16..20].copy_from_slice(&self.slice_words.to_le_bytes());
        m[28..32].copy_from_slice(&self.stride.to_le_bytes());
        m
    }

    /// The host's own computation of clone `id`'s result.
    pub fn expected(&self, id: u32) -> u32 {
        let start = u64::from(id) * u64::from(self.slice_words);
        // Jump the LCG to word `start`: x_{n+1} = a x_n + c; compose affine maps by squaring.
        let (mut a, mut c) = (1u32, 0u32);
        let (mut ma, mut mc) = (1_664_525u32, 1_013_904_223u32);
        let mut n = start + 1;
        while n > 0 {
            if n & 1 == 1 {
                // (a, c) := step(ma, mc) after (a, c)
                c = ma.wrapping_mul(c).wrapping_add(mc);
                a = ma.wrapping_mul(a);
            }
            mc = ma.wrapping_mul(mc).wrapping_add(mc);
            ma = ma.wrapping_mul(ma);
            n >>= 1;
        }
        let mut x = a.wrapping_mul(self.seed).wrapping_add(c);
        let mut h = 2_166_136_261u32;
        for _ in 0..self.slice_words {
            h = (h ^ x).wrapping_mul(16_777_619);
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        }
        h
    }

    /// Pages a clone touches: its slice, the mailbox and the code (upper bound).
    pub fn pages_touched_per_clone(&self, page_size: u64) -> u64 {
        (u64::from(self.slice_words) * u64::from(self.stride)).div_ceil(page_size) + 3
    }

    /// Bytes the table spans.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_words) * u64::from(self.stride)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_matches_a_direct_fill() {
        let job = HashJob {
            mem_size: 8 << 20,
            table_words: 1000,
            seed: 7,
            slice_words: 100,
            stride: 4,
        };
        let mut x = job.seed;
        let table: Vec<u32> = (0..job.table_words)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                x
            })
            .collect();
        for id in 0..10u32 {
            let s = (id * job.slice_words) as usize;
            let mut h = 2_166_136_261u32;
            for w in &table[s..s + job.slice_words as usize] {
                h = (h ^ w).wrapping_mul(16_777_619);
            }
            assert_eq!(job.expected(id), h, "clone {id}");
        }
    }
}
