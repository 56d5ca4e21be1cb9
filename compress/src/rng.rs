//! Seeds and random streams: shared per-step seeds, fast uniforms, random-k index sets.

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// SplitMix64 finaliser: turns structured inputs (ids, steps, ranks) into
/// well-spread seeds.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Combines two seed components.
#[inline]
pub fn combine(a: u64, b: u64) -> u64 {
    mix(mix(a) ^ b.rotate_left(17))
}

/// A fast non-cryptographic generator for stochastic rounding and sampling.
pub fn stream(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Two uniforms in [0, 1) from one 64-bit draw (24-bit resolution each, the f32 mantissa).
#[inline]
pub fn uniform_pair(rng: &mut SmallRng) -> (f32, f32) {
    let r = rng.next_u64();
    const S: f32 = 1.0 / (1u32 << 24) as f32;
    (
        ((r >> 40) as u32) as f32 * S,
        (((r >> 8) as u32) >> 8) as f32 * S,
    )
}

/// A uniformly random `k`-subset of `0..n`, returned sorted in `idx`.
///
/// Robert Floyd's algorithm over a bitset: O(k) draws plus an O(n / 64) scan, no
/// hashing, and the bitset is the only O(n) state (n / 8 bytes, reused). The same
/// `(n, k, seed)` gives the same set on every rank, which is what makes random-k
/// all-reduce compatible.
pub fn randk_indices(n: usize, k: usize, seed: u64, bits: &mut Vec<u64>, idx: &mut Vec<u32>) {
    let k = k.min(n);
    bits.clear();
    bits.resize(n.div_ceil(64), 0);
    idx.clear();
    if k == 0 {
        return;
    }
    let mut rng = stream(seed);
    for j in (n - k)..n {
        let t = rng.random_range(0..=j);
        let (w, b) = (t / 64, t % 64);
        if bits[w] & (1 << b) != 0 {
            bits[j / 64] |= 1 << (j % 64);
        } else {
            bits[w] |= 1 << b;
        }
    }
    idx.reserve(k);
    for (w, &word) in bits.iter().enumerate() {
        let mut m = word;
        while m != 0 {
            let b = m.trailing_zeros() as usize;
            idx.push((w * 64 + b) as u32);
            m &= m - 1;
        }
    }
}
