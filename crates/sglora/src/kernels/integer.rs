//! Exact integer products: int8 activations × int8 weights, summed in int32.
//!
//! Integer addition is associative, so every tiling, vector width and summation order gives the
//! same int32 sums; the instruction sets differ only in speed. That is what lets the encoder's
//! matmuls use each CPU's integer dot-product instructions and still give the same bits on x86-64,
//! aarch64 and armv7.
//!
//! What is computed, for activations `x` (`rows × k`, f32) and weights `q` (`k × n`, int8):
//!
//! 1. each row is quantised symmetrically ([`quantize_rows`]): `s = max|x| / 127`,
//!    `xq[i] = trunc(y ± 0.5)` for `y = x[i] · (127 / max|x|)` (rounding half away from zero, up to
//!    the addition's own rounding), in `-127..=127`; a row of zeros has `s = 0`;
//!    with two levels (the encoder's setting) the residual `x[i] − xq₁[i] · s₁` is quantised the
//!    same way into a second int8 row, so `s₁ · xq₁ + s₂ · xq₂` carries about 14 bits;
//! 2. `acc[r][j] = Σᵢ xq[r][i] · q[i][j]` in int32 for every quantised row ([`matmul`];
//!    `|acc| ≤ k · 127 · 128`, so `k` up to 132,000 cannot overflow);
//! 3. the caller scales: `y = (acc₁ as f32 · s₁ + acc₂ as f32 · s₂) · scale[j] + bias[j]`, in
//!    that order (one level: `(acc₁ as f32 · s₁) · scale[j] + bias[j]`).
//!
//! One level alone is what onnxruntime's dynamic quantisation does; on MiniLM it moved
//! embeddings by up to 0.019 in cosine from PyTorch fp32 and changed the retrieved experts of a
//! fifth of 1,468 varied texts (models/README.md, "Integer kernels"), so the encoder uses two.
//!
//! Storage ([`Packed`]): columns in panels of [`PANEL`] (16), inputs in groups of four; group `g`
//! of panel `p` is 64 contiguous bytes, column `c`'s four weights `q[4g..4g+4][16p + c]` at bytes
//! `4c..4c+4`. That is one AVX-512 register, two AVX2 ones or four NEON ones, and the unit each
//! instruction set's 4-way dot product (`vpdpbusd`, `sdot`) or pairwise multiply-add
//! (`vpmaddubsw`, `smull` + `sadalp`) consumes. `k` and `n` are padded with zero weights to
//! multiples of 4 and 16; padded columns are computed and dropped.
//!
//! Paths, picked at run time by [`matmul`] (each one tested against [`matmul_reference`] bit for
//! bit on the CPUs that run it):
//! - x86-64: AVX-512 VNNI (`vpdpbusd` on 512 bits), AVX-VNNI (`vpdpbusd` on 256 bits), AVX2
//!   (`vpmaddubsw` + `vpmaddwd`); the VNNI forms multiply unsigned by signed bytes, so the
//!   activations enter as `xq + 128` and `128 · Σᵢ q[i][j]` (kept per column) is subtracted; the
//!   AVX2 form takes `|q|` and `xq` with `q`'s sign, whose pair sums (≤ 2 · 127 · 128) cannot
//!   saturate 16 bits.
//! - aarch64: `sdot` where the CPU has the dot-product extension, `smull` + `sadalp` otherwise.
//! - anything else (armv7, x86 without AVX2): the scalar reference.

/// Columns per panel.
pub const PANEL: usize = 16;
/// Inputs per group.
pub const GROUP: usize = 4;
/// Bytes of one group of one panel.
const BLOCK: usize = PANEL * GROUP;

/// int8 weights `[k, n]` in the panel layout described in the module documentation.
#[derive(Debug, Clone)]
pub struct Packed {
    k: usize,
    n: usize,
    /// `k` rounded up to a multiple of [`GROUP`].
    kp: usize,
    /// `n` rounded up to a multiple of [`PANEL`].
    np: usize,
    data: Vec<i8>,
    /// `128 · Σᵢ q[i][j]` per (padded) column, for the unsigned-times-signed paths.
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(dead_code)
    )]
    offset: Vec<i32>,
}

impl Packed {
    /// Pack row-major `q` (`k × n`, `q[i * n + j]`).
    #[cfg(test)]
    pub fn new(q: &[i8], k: usize, n: usize) -> Packed {
        Packed::from_fn(k, n, |i, j| q[i * n + j])
    }

    /// Pack the weights `w(i, j)` for `i < k`, `j < n`.
    pub fn from_fn(k: usize, n: usize, w: impl Fn(usize, usize) -> i8) -> Packed {
        let kp = k.div_ceil(GROUP) * GROUP;
        let np = n.div_ceil(PANEL) * PANEL;
        let mut data = vec![0i8; kp * np];
        let mut offset = vec![0i32; np];
        for i in 0..k {
            for j in 0..n {
                let v = w(i, j);
                data[index(kp, i, j)] = v;
                offset[j] += 128 * i32::from(v);
            }
        }
        Packed {
            k,
            n,
            kp,
            np,
            data,
            offset,
        }
    }

    /// Inputs.
    pub fn inputs(&self) -> usize {
        self.k
    }

    /// Outputs.
    pub fn outputs(&self) -> usize {
        self.n
    }

    /// Inputs as padded (the row stride of quantised activations).
    pub fn padded_inputs(&self) -> usize {
        self.kp
    }

    /// Outputs as padded (the row stride of [`matmul`]'s sums).
    pub fn padded_outputs(&self) -> usize {
        self.np
    }

    /// `q[i][j]`.
    pub fn get(&self, i: usize, j: usize) -> i8 {
        self.data[index(self.kp, i, j)]
    }
}

/// Position of `q[i][j]` in the packed data of a matrix with `kp` padded inputs.
#[inline(always)]
fn index(kp: usize, i: usize, j: usize) -> usize {
    (j / PANEL) * kp * PANEL + (i / GROUP) * BLOCK + (j % PANEL) * GROUP + i % GROUP
}

/// Quantise each `k`-wide row of `x` to `levels` (1 or 2) int8 rows, as the module
/// documentation says: `xq` gets `rows × levels × kp` values (row `r`'s level `l` at row
/// `r · levels + l`; the padding zero), `scales` one scale per quantised row. Level 2 quantises
/// what level 1 left, `x[i] − xq₁[i] · s₁`, the same way, so `s₁ · xq₁ + s₂ · xq₂` is about 127
/// times closer to `x` than level 1 alone.
pub fn quantize_rows(
    x: &[f32],
    k: usize,
    kp: usize,
    levels: usize,
    xq: &mut Vec<i8>,
    scales: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected. The body is plain Rust: wider vectors, the same operations.
        unsafe { quantize_rows_avx2(x, k, kp, levels, xq, scales) };
        return;
    }
    quantize_rows_body(x, k, kp, levels, xq, scales)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_rows_avx2(
    x: &[f32],
    k: usize,
    kp: usize,
    levels: usize,
    xq: &mut Vec<i8>,
    scales: &mut Vec<f32>,
) {
    quantize_rows_body(x, k, kp, levels, xq, scales)
}

#[inline(always)]
fn quantize_rows_body(
    x: &[f32],
    k: usize,
    kp: usize,
    levels: usize,
    xq: &mut Vec<i8>,
    scales: &mut Vec<f32>,
) {
    let rows = x.len() / k;
    xq.clear();
    xq.resize(rows * levels * kp, 0);
    scales.clear();
    let mut residual = vec![0.0f32; if levels > 1 { k } else { 0 }];
    for (xr, qr) in x.chunks_exact(k).zip(xq.chunks_exact_mut(levels * kp)) {
        let s1 = quantize_row(xr, &mut qr[..kp]);
        scales.push(s1);
        if levels > 1 {
            for ((r, &v), &q) in residual.iter_mut().zip(xr).zip(&qr[..kp]) {
                *r = v - f32::from(q) * s1;
            }
            let s2 = if s1.is_nan() {
                f32::NAN
            } else {
                quantize_row(&residual, &mut qr[kp..2 * kp])
            };
            scales.push(s2);
        }
    }
}

/// One row: its scale, and `q` (at least `x.len()` long) filled.
#[inline(always)]
fn quantize_row(xr: &[f32], qr: &mut [i8]) -> f32 {
    // max|x| in 16 independent lanes (max is exact in any order, so this is the plain maximum;
    // the lanes let it vectorise); anything not finite marks the row.
    let mut lanes = [0.0f32; 16];
    let mut bad = false;
    let chunks = xr.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            bad |= !a.is_finite();
            *m = if a > *m { a } else { *m };
        }
    }
    for (m, &v) in lanes.iter_mut().zip(tail) {
        let a = v.abs();
        bad |= !a.is_finite();
        *m = if a > *m { a } else { *m };
    }
    let max = lanes.iter().fold(0.0f32, |m, &a| if a > m { a } else { m });
    if bad {
        // No meaningful scale: the row's outputs become NaN, as a float product's would.
        return f32::NAN;
    }
    if max < TINY {
        // Zeros, or values so small that 127 / max would overflow: the row counts as zero.
        return 0.0;
    }
    let inv = 127.0 / max;
    for (q, &v) in qr.iter_mut().zip(xr) {
        *q = round(v * inv) as i8;
    }
    max / 127.0
}

/// `y` rounded half away from zero and clamped to `-127..=127`, as `trunc(y ± 0.5)`: one IEEE
/// addition and a truncating conversion, so the same on every CPU, vectorisable, and no call to
/// the C library's `roundf` (which x86-64's baseline has no instruction for).
#[inline(always)]
fn round(y: f32) -> i32 {
    let r = y + 0.5f32.copysign(y);
    // `y` is finite here: the row is, and so is 127 / max for max ≥ TINY.
    let r = r.clamp(-127.0, 127.0);
    // SAFETY: `r` is finite and within -127..=127, so the conversion is exact truncation.
    unsafe { r.to_int_unchecked::<i32>() }
}

/// Rows whose largest magnitude is below this count as zero (127 / TINY is still finite).
const TINY: f32 = 1e-30;

/// The definition: `acc[r * np + j] = Σᵢ xq[r * kp + i] · q[i][j]` for every padded column.
pub fn matmul_reference(xq: &[i8], w: &Packed, acc: &mut [i32]) {
    let rows = xq.len() / w.kp;
    for r in 0..rows {
        let xr = &xq[r * w.kp..(r + 1) * w.kp];
        for j in 0..w.np {
            let mut s = 0i32;
            for (i, &x) in xr.iter().enumerate() {
                s += i32::from(x) * i32::from(w.data[index(w.kp, i, j)]);
            }
            acc[r * w.np + j] = s;
        }
    }
}

/// Which integer path [`matmul`] takes on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The scalar reference.
    Scalar,
    /// x86-64 AVX2 `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// x86-64 AVX-VNNI `vpdpbusd` (256 bits).
    AvxVnni,
    /// x86-64 AVX-512 VNNI `vpdpbusd` (512 bits).
    Avx512Vnni,
    /// aarch64 `smull` + `sadalp`.
    Neon,
    /// aarch64 `sdot`.
    NeonDot,
}

impl Path {
    /// Every path this CPU can run, fastest first.
    pub fn available() -> Vec<Path> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512vnni") && has!("avx512bw") && has!("avx512f") {
                v.push(Path::Avx512Vnni);
            }
            if has!("avxvnni") && has!("avx2") {
                v.push(Path::AvxVnni);
            }
            if has!("avx2") {
                v.push(Path::Avx2);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                v.push(Path::NeonDot);
            }
            v.push(Path::Neon);
        }
        v.push(Path::Scalar);
        v
    }

    /// The fastest path this CPU runs (detected once).
    pub fn best() -> Path {
        static BEST: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Path::available()[0])
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Avx2 => "avx2",
            Path::AvxVnni => "avx-vnni",
            Path::Avx512Vnni => "avx512-vnni",
            Path::Neon => "neon",
            Path::NeonDot => "neon-dotprod",
        }
    }
}

/// The sums of [`matmul_reference`] on the fastest path of this CPU. `xq` holds whole rows of
/// `w.padded_inputs()` values; `acc` gets `rows × w.padded_outputs()`.
pub fn matmul(xq: &[i8], w: &Packed, acc: &mut [i32]) {
    matmul_on(Path::best(), xq, w, acc)
}

/// [`matmul`] on a given path.
///
/// # Panics
/// If this CPU cannot run `path` (see [`Path::available`]), or the lengths do not fit.
pub fn matmul_on(path: Path, xq: &[i8], w: &Packed, acc: &mut [i32]) {
    let rows = xq.len() / w.kp;
    assert!(xq.len() == rows * w.kp && acc.len() == rows * w.np);
    // The best path was detected once; only another one is checked against the CPU here (this
    // runs for every matmul of every token block).
    assert!(
        path == Path::Scalar || path == Path::best() || Path::available().contains(&path),
        "this CPU cannot run the {} path",
        path.name()
    );
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU runs the path (checked above); lengths checked above.
        Path::Avx512Vnni => unsafe { x86::avx512vnni(xq, rows, w, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::AvxVnni => unsafe { x86::avxvnni(xq, rows, w, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Path::Avx2 => unsafe { x86::avx2(xq, rows, w, acc) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Path::NeonDot => unsafe { aarch64::dotprod(xq, rows, w, acc) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of the aarch64 baseline; lengths checked above.
        Path::Neon => unsafe { aarch64::neon(xq, rows, w, acc) },
        _ => matmul_reference(xq, w, acc),
    }
}

/// Run `$tile::<R, P>(x, panel, acc)` over the matrix: panels outermost (a panel's weights,
/// `kp · 16` bytes, stay in L1 while every block of rows passes), then blocks of up to `$rows`
/// rows; `P` panels at a time where `$panels` is 2, the last odd panel alone.
#[allow(unused_macros)]
macro_rules! tiles {
    ($x:ident, $rows:ident, $w:ident, $acc:ident, $tile:ident, $max_rows:literal, $panels:literal) => {{
        let (kp, np) = ($w.kp, $w.np);
        let panels = np / PANEL;
        let mut p = 0;
        while p < panels {
            let two = $panels == 2 && p + 1 < panels;
            let wp = $w.data.as_ptr().add(p * kp * PANEL);
            let mut r0 = 0;
            while r0 < $rows {
                let rb = ($rows - r0).min($max_rows);
                let xp = $x.as_ptr().add(r0 * kp);
                let ap = $acc.as_mut_ptr().add(r0 * np + p * PANEL);
                let off = $w.offset.as_ptr().add(p * PANEL);
                macro_rules! go {
                    ($r:literal) => {
                        if two {
                            $tile::<$r, 2>(xp, wp, off, ap, kp, np)
                        } else {
                            $tile::<$r, 1>(xp, wp, off, ap, kp, np)
                        }
                    };
                }
                match rb {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    4 => go!(4),
                    5 => go!(5),
                    6 => go!(6),
                    7 => go!(7),
                    _ => go!($max_rows),
                }
                r0 += rb;
            }
            p += if two { 2 } else { 1 };
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
mod aarch64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(rows: usize, k: usize, n: usize, seed: u64, full: bool) -> (Vec<i8>, Packed) {
        let mut rng = Rng::new(seed);
        // `full`: weights over the whole int8 range, -128 included (the AVX2 path's sign trick
        // must handle it); activations are always in -127..=127, as quantize_rows makes them.
        let wmin: i64 = if full { -128 } else { -127 };
        let span = (127 - wmin + 1) as u64;
        let q: Vec<i8> = (0..k * n)
            .map(|_| (wmin + (rng.next_u64() % span) as i64) as i8)
            .collect();
        let w = Packed::new(&q, k, n);
        let mut x = vec![0i8; rows * w.kp];
        for r in 0..rows {
            for i in 0..k {
                x[r * w.kp + i] = ((rng.next_u64() % 255) as i64 - 127) as i8;
            }
        }
        (x, w)
    }

    /// Every path this CPU runs equals the reference bit for bit: row counts of every block size
    /// and remainder, odd panel counts, inputs not a multiple of four, extreme values.
    #[test]
    fn every_integer_path_matches_the_reference() {
        let paths = Path::available();
        println!("integer paths on this CPU: {paths:?}");
        for &(rows, k, n) in &[
            (1, 384, 384),
            (9, 384, 1536),
            (17, 1536, 384),
            (13, 50, 40),
            (6, 3, 33),
            (8, 7, 16),
            (3, 4, 48),
        ] {
            for full in [false, true] {
                let (x, w) = random(rows, k, n, (rows * k + n) as u64 + full as u64, full);
                let mut want = vec![0i32; rows * w.np];
                matmul_reference(&x, &w, &mut want);
                for &p in &paths {
                    let mut got = vec![i32::MIN; rows * w.np];
                    matmul_on(p, &x, &w, &mut got);
                    assert_eq!(got, want, "{} rows {rows} k {k} n {n}", p.name());
                }
            }
        }
        // The largest magnitudes: every product −127 · −128 or 127 · 127.
        let k = 1536;
        let w = Packed::from_fn(k, 32, |_, j| if j % 2 == 0 { -128 } else { 127 });
        for xv in [-127i8, 127] {
            let x: Vec<i8> = (0..2 * k).map(|_| xv).collect();
            let mut want = vec![0i32; 2 * 32];
            matmul_reference(&x, &w, &mut want);
            assert_eq!(want[0], i32::from(xv) * -128 * k as i32);
            for &p in &paths {
                let mut got = vec![0i32; 2 * 32];
                matmul_on(p, &x, &w, &mut got);
                assert_eq!(got, want, "{} at the extremes", p.name());
            }
        }
    }

    #[test]
    fn the_reference_is_the_plain_sum() {
        let q = [1i8, -2, 3, 4, 5, -6]; // 2 × 3
        let w = Packed::new(&q, 2, 3);
        assert_eq!((w.kp, w.np), (4, 16));
        let x = [10i8, 1, 0, 0];
        let mut acc = vec![0; 16];
        matmul_reference(&x, &w, &mut acc);
        assert_eq!(&acc[..3], &[14, -15, 24]);
        assert!(acc[3..].iter().all(|&v| v == 0));
        assert_eq!(w.get(1, 2), -6);
    }

    #[test]
    fn rows_quantise_symmetrically() {
        let (mut xq, mut s) = (Vec::new(), Vec::new());
        quantize_rows(&[0.5, -1.0, 0.25, 0.0, 0.0, 0.0], 3, 4, 1, &mut xq, &mut s);
        assert_eq!(xq, vec![64, -127, 32, 0, 0, 0, 0, 0]);
        assert_eq!(s, vec![1.0 / 127.0, 0.0]);
        quantize_rows(&[f32::NAN, 1.0], 2, 4, 1, &mut xq, &mut s);
        assert!(s[0].is_nan());
        // Two levels: the second quantises the first's error, 127 times finer.
        let x = [0.3f32, -0.71, 0.05];
        quantize_rows(&x, 3, 4, 2, &mut xq, &mut s);
        assert_eq!(s.len(), 2);
        assert!(s[1] <= s[0] / 2.0 + 1e-9);
        for i in 0..3 {
            let one = f32::from(xq[i]) * s[0];
            let two = one + f32::from(xq[4 + i]) * s[1];
            assert!((two - x[i]).abs() <= s[1] / 2.0 + 1e-7, "{i}");
            assert!((one - x[i]).abs() <= s[0] / 2.0 + 1e-7, "{i}");
        }
    }
}
