//! A sparse binary linear erasure code, for comparison with RaptorQ only (mcdist does
//! not use it): what a code whose decoding cost follows the losses would cost on
//! mcdist's blocks, and how often it fails to decode where RaptorQ would not.
//!
//! Repair symbol `j` of a block of `k` source symbols is the XOR of some of them: `d`
//! drawn at random for it ([`Sparse::random`]), or with every source in exactly `c` of
//! the `R` repair symbols ([`Sparse::regular`]). A
//! receiver missing `m` source symbols XORs the symbols it holds out of each repair symbol
//! it uses (about `d` symbol XORs each), then solves the `m` unknowns by Gauss–Jordan
//! elimination over GF(2) on what is left (at most `m` symbol XORs per unknown). With
//! `d` about `c × k / R` for `R` repair symbols sent, the first step costs about
//! `c × (m + e) / R` passes over the block for `m + e` repair symbols used: with
//! `R` a few times `m`, a couple of passes, where RaptorQ's decoder solves for every
//! intermediate symbol of the block whatever was lost.

/// The code for blocks of `k` symbols of `t` bytes: the source symbols each of the first
/// `rows.len()` repair symbols is the XOR of.
pub struct Sparse {
    pub k: usize,
    pub t: usize,
    pub rows: Vec<Vec<usize>>,
}

/// SplitMix64: a small, fast generator; the same seed gives the same rows everywhere.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` distinct numbers below `below`, drawn from `seed`.
fn distinct(seed: u64, n: usize, below: usize) -> Vec<usize> {
    let n = n.clamp(1, below.max(1));
    let mut state = seed ^ 0x6d63_6469_7374_0001;
    let mut taken = vec![false; below];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let i = (splitmix(&mut state) % below as u64) as usize;
        if !taken[i] {
            taken[i] = true;
            out.push(i);
        }
    }
    out
}

fn xor(dst: &mut [u8], src: &[u8]) {
    for (a, b) in dst.iter_mut().zip(src) {
        *a ^= *b;
    }
}

/// Why a decode failed.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The repair symbols in hand do not determine every lost source symbol.
    TooFew,
}

impl Sparse {
    /// `r` repair symbols, each the XOR of `d` sources drawn at random for it.
    pub fn random(k: usize, t: usize, d: usize, r: usize) -> Sparse {
        let rows = (0..r as u64).map(|j| distinct(j, d, k)).collect();
        Sparse { k, t, rows }
    }

    /// `r` repair symbols in which every source appears exactly `c` times (at rows drawn
    /// at random for it): no lost source is left out of every repair symbol unless all
    /// `c` of its repair symbols are lost too.
    pub fn regular(k: usize, t: usize, c: usize, r: usize) -> Sparse {
        let mut rows = vec![Vec::new(); r];
        for i in 0..k {
            for j in distinct(i as u64 ^ (1 << 40), c, r) {
                rows[j].push(i);
            }
        }
        Sparse { k, t, rows }
    }

    /// Mean sources per repair symbol.
    pub fn density(&self) -> usize {
        self.rows.iter().map(Vec::len).sum::<usize>() / self.rows.len().max(1)
    }

    /// Repair symbol `j` of `data` (`k × t` bytes) into `out` (`t` bytes).
    pub fn encode(&self, data: &[u8], j: u32, out: &mut [u8]) {
        out.fill(0);
        for &i in &self.rows[j as usize] {
            xor(out, &data[i * self.t..(i + 1) * self.t]);
        }
    }

    /// Restore the source symbols of `data` that `have` says are missing, from the repair
    /// symbols `repairs` (index, bytes), using at most `spare` more of them than symbols
    /// are missing. Returns how many symbols were restored.
    pub fn decode(
        &self,
        data: &mut [u8],
        have: &[bool],
        repairs: &[(u32, Vec<u8>)],
        spare: usize,
    ) -> Result<usize, DecodeError> {
        let t = self.t;
        let missing: Vec<usize> = (0..self.k).filter(|&i| !have[i]).collect();
        let m = missing.len();
        if m == 0 {
            return Ok(0);
        }
        let mut col = vec![usize::MAX; self.k];
        for (c, &i) in missing.iter().enumerate() {
            col[i] = c;
        }
        let words = m.div_ceil(64);
        // Each repair symbol used, with the symbols held XORed out: the lost ones it names
        // (a bit set over the missing) and what they XOR to.
        let mut bits: Vec<Vec<u64>> = Vec::new();
        let mut syms: Vec<Vec<u8>> = Vec::new();
        for (j, bytes) in repairs.iter().take(m + spare) {
            let mut sym = bytes.clone();
            let mut b = vec![0u64; words];
            for &i in &self.rows[*j as usize] {
                match col[i] {
                    usize::MAX => xor(&mut sym, &data[i * t..(i + 1) * t]),
                    c => b[c / 64] ^= 1 << (c % 64),
                }
            }
            if b.iter().any(|&w| w != 0) {
                bits.push(b);
                syms.push(sym);
            }
        }
        // Gauss–Jordan over GF(2): row `c` ends up naming lost symbol `c` alone.
        let rows = bits.len();
        for c in 0..m {
            let (w, bit) = (c / 64, 1u64 << (c % 64));
            let p = (c..rows)
                .find(|&r| bits[r][w] & bit != 0)
                .ok_or(DecodeError::TooFew)?;
            bits.swap(c, p);
            syms.swap(c, p);
            let (pb, ps) = (bits[c].clone(), syms[c].clone());
            for r in 0..rows {
                if r != c && bits[r][w] & bit != 0 {
                    for (a, b) in bits[r].iter_mut().zip(&pb) {
                        *a ^= *b;
                    }
                    xor(&mut syms[r], &ps);
                }
            }
        }
        for (c, &i) in missing.iter().enumerate() {
            data[i * t..(i + 1) * t].copy_from_slice(&syms[c]);
        }
        Ok(m)
    }
}
