//! Random layouts of a sparse binary code, for the `fec_codec` study beside mcdist's own
//! layout (`mcdist::fec::code::Layers`, every source symbol in exactly `C` rows of a
//! layer): repair symbol `j` is the XOR of `d` source symbols drawn at random for it.
//! Both decode with mcdist's decoder (`mcdist::fec::code::decode`), which works over any
//! layout ([`Rows`]).

use mcdist::fec::code::Rows;

/// SplitMix64: a small, fast generator; the same seed gives the same rows everywhere.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` distinct numbers below `below`, drawn from `seed`.
fn distinct(seed: u64, n: usize, below: usize) -> Vec<u32> {
    let n = n.clamp(1, below.max(1));
    let mut state = seed ^ 0x6d63_6469_7374_0001;
    let mut taken = vec![false; below];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let i = (splitmix(&mut state) % below as u64) as usize;
        if !taken[i] {
            taken[i] = true;
            out.push(i as u32);
        }
    }
    out
}

/// `r` repair symbols of a block of `k`, each the XOR of `d` sources drawn at random.
pub struct Random {
    rows: Vec<Vec<u32>>,
}

impl Random {
    pub fn new(k: usize, d: usize, r: usize) -> Random {
        Random {
            rows: (0..r as u64).map(|j| distinct(j, d, k)).collect(),
        }
    }

    /// Mean sources per repair symbol.
    pub fn density(&self) -> usize {
        self.rows.iter().map(Vec::len).sum::<usize>() / self.rows.len().max(1)
    }
}

impl Rows for Random {
    fn row(&mut self, index: u32) -> &[u32] {
        self.rows.get(index as usize).map_or(&[], Vec::as_slice)
    }
}

/// Repair symbols `0..r` of `data` (`t`-byte symbols) under the layout `rows`.
pub fn encode(rows: &mut impl Rows, data: &[u8], t: usize, r: usize) -> Vec<(u32, Vec<u8>)> {
    (0..r as u32)
        .map(|j| {
            let mut s = vec![0u8; t];
            for &i in rows.row(j) {
                let src = &data[i as usize * t..(i as usize + 1) * t];
                for (a, b) in s.iter_mut().zip(src) {
                    *a ^= *b;
                }
            }
            (j, s)
        })
        .collect()
}
