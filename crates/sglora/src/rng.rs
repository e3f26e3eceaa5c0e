//! The portable noise generator: identical streams on every platform for the same seed.
//!
//! SplitMix64 expands the seed into the state of xoshiro256**; uniforms are the top 53 bits;
//! normals come in Box–Muller pairs computed with the pure-Rust `libm` (no platform libm), so a
//! seed gives bit-identical noise on x86-64, aarch64 and armv7. `models/pipeline/rng.py` is the
//! Python twin used by the pipeline.

/// xoshiro256** generator seeded through SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut s = [0u64; 4];
        for slot in &mut s {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *slot = z ^ (z >> 31);
        }
        Rng { s }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `n` standard normal samples (Box–Muller, pairs; an odd tail drops the second of a pair).
    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            let r = libm::sqrt(-2.0 * libm::log(u1));
            let a = 2.0 * std::f64::consts::PI * u2;
            out.push(r * libm::cos(a));
            out.push(r * libm::sin(a));
        }
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_seeding_matches_reference() {
        // First output of splitmix64(0) is the well-known 0xE220A8397B1DCDAF.
        let r = Rng::new(0);
        assert_eq!(r.s[0], 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        assert_eq!(Rng::new(5).normals(9), Rng::new(5).normals(9));
        assert_ne!(Rng::new(5).normals(4), Rng::new(6).normals(4));
    }

    #[test]
    fn normals_have_plausible_moments() {
        let v = Rng::new(99).normals(20_000);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
