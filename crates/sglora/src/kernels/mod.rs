//! Fixed-order numeric kernels: the same inputs give bit-identical outputs on every platform.
//!
//! A seed must give the same adapter bytes on an x86 build server, an aarch64 board and an armv7
//! one. General-purpose kernels (tract's, BLAS) split and reorder sums differently per
//! instruction set, so their last bits differ between machines. Here every result is defined
//! independently of the instruction set:
//!
//! - **int8 × int8 products** ([`Linear::with_int8_activations`], the encoder's matmuls by
//!   default): the activations are quantised per row to int8 and multiplied by the int8 weights
//!   in int32 ([`integer`]). Integer sums are exact in any order, so each CPU uses its integer
//!   dot-product instructions (AVX-512 VNNI, AVX-VNNI, AVX2, aarch64 `sdot` / `smull`) and all of
//!   them agree with the scalar reference; the scaling to f32 is then one fixed sequence of
//!   operations per output.
//! - **int8 weights, f32 activations** ([`Linear`] with [`Weights::I8`], the `int8` runtime):
//!   each output is one chain of fused multiply-adds in input order, `acc = fma(x[i], q[i][j],
//!   acc)` for `i = 0, 1, …` from `+0.0`, then `y = acc · scale[j] + bias[j]`. Vector code
//!   (AVX-512, AVX2, NEON) only runs *independent* chains side by side, one output column per
//!   lane. A fused multiply-add is exactly rounded by IEEE 754 on x86 (FMA3), aarch64 and in
//!   software (`f32::mul_add`), so every path agrees, but without hardware FMA (armv7) it is slow.
//! - **fp32 products** ([`Weights::F32`], the CVAE's small matrices, LoRA factors): the same
//!   chain with a plain multiply then add, `acc = acc + x[i] · w[i][j]`, which the compiler may
//!   vectorise across columns but never reorders (rustc does not contract or reassociate float
//!   operations).
//! - Everything else (layer norm, softmax, GELU, attention) is plain scalar Rust. `exp` and `erf`
//!   are our own branch-free polynomials of plain multiplies and adds ([`exp`], [`erf`]:
//!   vectorisable, and independent of the platform's C library); other functions come from the
//!   pure-Rust `libm`.

pub mod integer;

use crate::error::{unsupported, Unsupported};

/// Weights of a [`Linear`] map, `[inputs, outputs]` row-major: row `i` holds input `i`'s weight
/// for every output.
#[derive(Debug, Clone)]
pub enum Weights {
    /// int8 with one scale per output column: `w[i][j] = q[i][j] · scale[j]`.
    I8 {
        /// Quantised values, `inputs × outputs` row-major as given to [`Linear::new`], which
        /// repacks them into column panels for the kernels.
        q: Vec<i8>,
        /// Per-output-column scale.
        scale: Vec<f32>,
    },
    /// fp32 values, `inputs × outputs`.
    F32(Vec<f32>),
    /// int8 as [`Weights::I8`], multiplied by int8 activations ([`Linear::with_int8_activations`]).
    Integer {
        /// The weights in [`integer`]'s panel layout.
        packed: integer::Packed,
        /// Per-output-column scale.
        scale: Vec<f32>,
        /// Activation levels: 1 (int8) or 2 (int8 plus an int8 residual, [`integer::quantize_rows`]).
        levels: usize,
    },
}

/// A linear map `y = x·W + b` over rows of `x`, computed in the fixed order described above.
#[derive(Debug, Clone)]
pub struct Linear {
    inputs: usize,
    outputs: usize,
    weights: Weights,
    bias: Option<Vec<f32>>,
}

/// Scratch space of the int8 × int8 path, one per thread.
#[derive(Default)]
struct Scratch {
    xq: Vec<i8>,
    scales: Vec<f32>,
    acc: Vec<i32>,
}

impl Weights {
    /// The per-output-column scales of int8 weights (none for fp32).
    fn scale(&self) -> &[f32] {
        match self {
            Weights::I8 { scale, .. } | Weights::Integer { scale, .. } => scale,
            Weights::F32(_) => &[],
        }
    }
}

/// Rows of `x` an fp32 [`Linear`] runs side by side.
const F32_ROWS: usize = 8;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl Linear {
    /// A map from `inputs` to `outputs` values; checks every length.
    pub fn new(
        inputs: usize,
        outputs: usize,
        weights: Weights,
        bias: Option<Vec<f32>>,
    ) -> Result<Linear, Unsupported> {
        let cells = inputs
            .checked_mul(outputs)
            .ok_or_else(|| unsupported!("{inputs}×{outputs} weights overflow"))?;
        let (len, scales) = match &weights {
            Weights::I8 { q, scale } => (q.len(), Some(scale.len())),
            Weights::F32(w) => (w.len(), None),
            Weights::Integer { packed, scale, .. } => {
                if (packed.inputs(), packed.outputs()) != (inputs, outputs) {
                    return Err(unsupported!(
                        "packed weights are {}×{}, expected {inputs}×{outputs}",
                        packed.inputs(),
                        packed.outputs()
                    ));
                }
                (cells, Some(scale.len()))
            }
        };
        if inputs == 0 || outputs == 0 || len != cells {
            return Err(unsupported!(
                "weights hold {len} values, expected {inputs}×{outputs}"
            ));
        }
        if let Some(s) = scales.filter(|&s| s != outputs) {
            return Err(unsupported!("{s} scales for {outputs} outputs"));
        }
        if let Some(b) = bias.as_ref().filter(|b| b.len() != outputs) {
            return Err(unsupported!("{} biases for {outputs} outputs", b.len()));
        }
        let weights = match weights {
            Weights::I8 { q, scale } => Weights::I8 {
                q: int8::pack(&q, inputs, outputs),
                scale,
            },
            w => w,
        };
        Ok(Linear {
            inputs,
            outputs,
            weights,
            bias,
        })
    }

    /// The same map with int8 weights multiplied by int8 activations, each row of `x` quantised
    /// symmetrically on the fly ([`integer`]); exact integer sums, so the fastest instructions of
    /// every CPU give the same bits. fp32 weights are kept as they are.
    pub fn with_int8_activations(self, levels: usize) -> Linear {
        let (k, n) = (self.inputs, self.outputs);
        let weights = match self.weights {
            Weights::I8 { q, scale } => Weights::Integer {
                packed: integer::Packed::from_fn(k, n, |i, j| q[int8::at(k, n, i, j)]),
                scale,
                levels: levels.clamp(1, 2),
            },
            w => w,
        };
        Linear { weights, ..self }
    }

    /// One map computing `parts`' outputs side by side (`[rows, Σ outputs]`, in `parts`' order)
    /// from the same inputs, so the inputs are read (and, on the integer path, quantised) once
    /// for all of them. Each output is the same bits its own map gives: a column's sum and
    /// scaling never see another column.
    pub fn side_by_side(parts: &[Linear]) -> Result<Linear, Unsupported> {
        let first = parts.first().ok_or("no maps to put side by side")?;
        let k = first.inputs;
        if parts.iter().any(|p| p.inputs != k) {
            return Err(unsupported!(
                "maps side by side must share their input width {k}"
            ));
        }
        let same_kind = |l: &Linear| match (&first.weights, &l.weights) {
            (Weights::Integer { levels: a, .. }, Weights::Integer { levels: b, .. }) => a == b,
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        };
        if !parts.iter().all(same_kind) {
            return Err("maps side by side must share their weight type".into());
        }
        if parts
            .iter()
            .any(|l| l.bias.is_some() != first.bias.is_some())
        {
            return Err("maps side by side must all have a bias or none".into());
        }
        // (part, column within it) of every output column.
        let cols: Vec<(&Linear, usize)> = parts
            .iter()
            .flat_map(|l| (0..l.outputs).map(move |j| (l, j)))
            .collect();
        let n = cols.len();
        let bias = first.bias.as_ref().map(|_| {
            cols.iter()
                .map(|&(l, j)| l.bias.as_ref().map_or(0.0, |b| b[j]))
                .collect()
        });
        let scale = || cols.iter().map(|&(l, j)| l.weights.scale()[j]).collect();
        let weights = match &first.weights {
            Weights::I8 { .. } => Weights::I8 {
                q: (0..k * n)
                    .map(|c| cols[c % n].0.int8_at(c / n, cols[c % n].1))
                    .collect(),
                scale: scale(),
            },
            Weights::Integer { levels, .. } => Weights::Integer {
                packed: integer::Packed::from_fn(k, n, |i, c| cols[c].0.int8_at(i, cols[c].1)),
                scale: scale(),
                levels: *levels,
            },
            Weights::F32(_) => Weights::F32(
                (0..k * n)
                    .map(|c| {
                        let (l, j) = cols[c % n];
                        let Weights::F32(w) = &l.weights else {
                            unreachable!("same kind")
                        };
                        w[(c / n) * l.outputs + j]
                    })
                    .collect(),
            ),
        };
        Linear::new(k, n, weights, bias)
    }

    /// The int8 weight `q[i][j]` of an int8 or integer map (0 for fp32 weights).
    fn int8_at(&self, i: usize, j: usize) -> i8 {
        match &self.weights {
            Weights::I8 { q, .. } => q[int8::at(self.inputs, self.outputs, i, j)],
            Weights::Integer { packed, .. } => packed.get(i, j),
            Weights::F32(_) => 0,
        }
    }

    /// Input width.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output width.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `out[r] = x[r]·W + b` for the `x.len() / inputs` rows of `x`; `out` is resized.
    pub fn forward(&self, x: &[f32], out: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected. Plain Rust compiled once more with wider vectors: rustc
            // never reassociates or contracts float operations, so the bits are the same.
            return unsafe { self.forward_avx2(x, out) };
        }
        self.forward_body(x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn forward_avx2(&self, x: &[f32], out: &mut Vec<f32>) {
        self.forward_body(x, out)
    }

    #[inline(always)]
    fn forward_body(&self, x: &[f32], out: &mut Vec<f32>) {
        let rows = x.len() / self.inputs;
        let x = &x[..rows * self.inputs];
        out.clear();
        let scale = match &self.weights {
            Weights::Integer {
                packed,
                scale,
                levels,
            } => {
                // Every output is written there: no zeroing first.
                self.forward_integer(x, rows, packed, scale, *levels, out);
                return;
            }
            Weights::I8 { q, scale } => {
                out.resize(rows * self.outputs, 0.0);
                int8::forward(x, rows, self.inputs, self.outputs, q, out);
                Some(scale)
            }
            Weights::F32(w) => {
                out.resize(rows * self.outputs, 0.0);
                // Each output is Σ_i x[r][i]·w[i][j] in i order from +0.0; F32_ROWS rows' chains
                // run side by side (a narrow map, an adapter's x·Aᵀ with r outputs, is otherwise
                // one add's latency per input) and each weight row is read once per block.
                let (k, n) = (self.inputs, self.outputs);
                for (xb, yb) in x.chunks(F32_ROWS * k).zip(out.chunks_mut(F32_ROWS * n)) {
                    for (i, wr) in w.chunks_exact(n).enumerate() {
                        for (xr, yr) in xb.chunks_exact(k).zip(yb.chunks_exact_mut(n)) {
                            let xi = xr[i];
                            for (y, &wv) in yr.iter_mut().zip(wr) {
                                *y += xi * wv;
                            }
                        }
                    }
                }
                None
            }
        };
        // One pass over the outputs: `acc · scale` (int8), then `+ bias`.
        if scale.is_some() || self.bias.is_some() {
            for row in out.chunks_exact_mut(self.outputs) {
                for (j, y) in row.iter_mut().enumerate() {
                    if let Some(s) = scale {
                        *y *= s[j];
                    }
                    if let Some(b) = &self.bias {
                        *y += b[j];
                    }
                }
            }
        }
    }
}

impl Linear {
    /// `y = ((acc₁ · s₁[r]) + (acc₂ · s₂[r])) · scale[j] + bias[j]` from the exact int32 sums
    /// of each activation level (one level: `(acc₁ · s₁[r]) · scale[j] + bias[j]`).
    #[inline(always)]
    fn forward_integer(
        &self,
        x: &[f32],
        rows: usize,
        packed: &integer::Packed,
        scale: &[f32],
        levels: usize,
        out: &mut Vec<f32>,
    ) {
        let (k, n) = (self.inputs, self.outputs);
        let np = packed.padded_outputs();
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            let kp = packed.padded_inputs();
            integer::quantize_rows(x, k, kp, levels, &mut s.xq, &mut s.scales);
            let qrows = rows * levels;
            s.acc.resize(qrows * np, 0);
            integer::matmul(&s.xq, packed, &mut s.acc[..qrows * np]);
            out.reserve(rows * n);
            for r in 0..rows {
                let at = r * levels * np;
                let (a1, s1) = (&s.acc[at..at + n], s.scales[r * levels]);
                if levels == 1 {
                    out.extend(a1.iter().zip(scale).map(|(&a, &sw)| a as f32 * s1 * sw));
                } else {
                    let (a2, s2) = (&s.acc[at + np..at + np + n], s.scales[r * levels + 1]);
                    out.extend(
                        a1.iter()
                            .zip(a2)
                            .zip(scale)
                            .map(|((&a, &b), &sw)| (a as f32 * s1 + b as f32 * s2) * sw),
                    );
                }
                if let Some(b) = &self.bias {
                    for (y, &b) in out[r * n..].iter_mut().zip(b) {
                        *y += b;
                    }
                }
            }
        });
    }
}

/// The int8 chains: `acc[r][j] = fma(x[r][i], q[i][j], acc[r][j])` for `i` in order, from `+0.0`.
///
/// Storage: the first `n / PANEL · PANEL` columns in panels of [`PANEL`] columns, each panel
/// `k × PANEL` contiguous (so a tile streams its weights sequentially), then the remaining
/// columns as one `k × rest` row-major block.
mod int8 {
    /// Columns per panel.
    pub(super) const PANEL: usize = 32;

    /// Index of `q[i][j]` in the packed layout.
    #[inline(always)]
    pub(super) fn at(k: usize, n: usize, i: usize, j: usize) -> usize {
        let cols = n / PANEL * PANEL;
        if j < cols {
            (j / PANEL) * k * PANEL + i * PANEL + j % PANEL
        } else {
            cols * k + i * (n - cols) + (j - cols)
        }
    }

    /// Repack row-major `[k, n]` into panels.
    pub(super) fn pack(q: &[i8], k: usize, n: usize) -> Vec<i8> {
        let mut out = vec![0i8; q.len()];
        for i in 0..k {
            for j in 0..n {
                out[at(k, n, i, j)] = q[i * n + j];
            }
        }
        out
    }

    /// Dispatch to the widest kernel this CPU runs; all of them give the same bits.
    pub(super) fn forward(x: &[f32], rows: usize, k: usize, n: usize, q: &[i8], out: &mut [f32]) {
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(q.len(), k * n);
        debug_assert_eq!(out.len(), rows * n);
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features the kernel is compiled for were detected above.
                unsafe { x86::forward_avx512(x, rows, k, n, q, out) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                unsafe { x86::forward_avx2(x, rows, k, n, q, out) };
                return;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            // NEON is part of the aarch64 baseline.
            neon::forward(x, rows, k, n, q, out);
            return;
        }
        #[allow(unreachable_code)]
        scalar_columns(x, rows, k, n, q, out, 0)
    }

    /// The reference definition, for columns `from..n` (the tail the vector kernels leave).
    #[inline(always)]
    pub(super) fn scalar_columns(
        x: &[f32],
        rows: usize,
        k: usize,
        n: usize,
        q: &[i8],
        out: &mut [f32],
        from: usize,
    ) {
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            for j in from..n {
                let mut acc = 0.0f32;
                for (i, &xi) in xr.iter().enumerate() {
                    acc = xi.mul_add(f32::from(q[at(k, n, i, j)]), acc);
                }
                out[r * n + j] = acc;
            }
        }
    }

    /// Run `tile::<R>` (`$width` columns of a panel) for every block of rows, `R` up to `MAX`,
    /// then the scalar tail columns. (armv7 has no vector path: only the scalar columns.)
    #[cfg_attr(
        not(any(target_arch = "x86_64", target_arch = "aarch64")),
        allow(unused_macros)
    )]
    macro_rules! by_row_blocks {
        ($x:ident, $rows:ident, $k:ident, $n:ident, $q:ident, $out:ident, $width:expr, $tile:ident, $max:expr) => {{
            let cols = $n / PANEL * PANEL;
            let mut r0 = 0;
            while r0 < $rows {
                let rb = ($rows - r0).min($max);
                for c in (0..cols).step_by($width) {
                    let (xp, op) = ($x.as_ptr().add(r0 * $k), $out.as_mut_ptr().add(r0 * $n + c));
                    let qp = $q.as_ptr().add((c / PANEL) * $k * PANEL + c % PANEL);
                    match rb {
                        1 => $tile::<1>(xp, qp, op, $k, $n),
                        2 => $tile::<2>(xp, qp, op, $k, $n),
                        3 => $tile::<3>(xp, qp, op, $k, $n),
                        4 => $tile::<4>(xp, qp, op, $k, $n),
                        5 => $tile::<5>(xp, qp, op, $k, $n),
                        _ => $tile::<$max>(xp, qp, op, $k, $n),
                    }
                }
                r0 += rb;
            }
            if cols < $n {
                scalar_columns($x, $rows, $k, $n, $q, $out, cols);
            }
        }};
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) mod x86 {
        use super::{scalar_columns, PANEL};
        use std::arch::x86_64::*;

        /// 32 columns (one panel) × `R` rows: two zmm accumulators per row.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn tile512<const R: usize>(
            x: *const f32,
            q: *const i8,
            out: *mut f32,
            k: usize,
            n: usize,
        ) {
            let mut a0 = [_mm512_setzero_ps(); R];
            let mut a1 = [_mm512_setzero_ps(); R];
            for i in 0..k {
                let p = q.add(i * PANEL);
                let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())));
                let w1 =
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16).cast())));
                for r in 0..R {
                    let xv = _mm512_set1_ps(*x.add(r * k + i));
                    a0[r] = _mm512_fmadd_ps(xv, w0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(xv, w1, a1[r]);
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out.add(r * n), a0[r]);
                _mm512_storeu_ps(out.add(r * n + 16), a1[r]);
            }
        }

        /// 16 columns (half a panel) × `R` rows: two ymm accumulators per row.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile256<const R: usize>(
            x: *const f32,
            q: *const i8,
            out: *mut f32,
            k: usize,
            n: usize,
        ) {
            let mut a0 = [_mm256_setzero_ps(); R];
            let mut a1 = [_mm256_setzero_ps(); R];
            for i in 0..k {
                let p = q.add(i * PANEL);
                let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())));
                let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8).cast())));
                for r in 0..R {
                    let xv = _mm256_set1_ps(*x.add(r * k + i));
                    a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out.add(r * n), a0[r]);
                _mm256_storeu_ps(out.add(r * n + 8), a1[r]);
            }
        }

        /// # Safety
        /// The CPU must have AVX-512F and FMA; slice lengths as in [`super::forward`].
        #[target_feature(enable = "avx512f,fma")]
        pub(in crate::kernels) unsafe fn forward_avx512(
            x: &[f32],
            rows: usize,
            k: usize,
            n: usize,
            q: &[i8],
            out: &mut [f32],
        ) {
            by_row_blocks!(x, rows, k, n, q, out, 32, tile512, 6)
        }

        /// # Safety
        /// The CPU must have AVX2 and FMA; slice lengths as in [`super::forward`].
        #[target_feature(enable = "avx2,fma")]
        pub(in crate::kernels) unsafe fn forward_avx2(
            x: &[f32],
            rows: usize,
            k: usize,
            n: usize,
            q: &[i8],
            out: &mut [f32],
        ) {
            by_row_blocks!(x, rows, k, n, q, out, 16, tile256, 6)
        }
    }

    #[cfg(target_arch = "aarch64")]
    mod neon {
        use super::{scalar_columns, PANEL};
        use std::arch::aarch64::*;

        /// 16 columns (half a panel) × `R` rows: four q-register accumulators per row.
        #[inline(always)]
        unsafe fn tile<const R: usize>(
            x: *const f32,
            q: *const i8,
            out: *mut f32,
            k: usize,
            n: usize,
        ) {
            let mut a = [[vdupq_n_f32(0.0); 4]; R];
            for i in 0..k {
                let b = vld1q_s8(q.add(i * PANEL));
                let lo = vmovl_s8(vget_low_s8(b));
                let hi = vmovl_s8(vget_high_s8(b));
                let w = [
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
                    vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))),
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
                    vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))),
                ];
                for r in 0..R {
                    let xv = vdupq_n_f32(*x.add(r * k + i));
                    for c in 0..4 {
                        // vfmaq_f32(a, b, c) = a + b·c, fused.
                        a[r][c] = vfmaq_f32(a[r][c], xv, w[c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..4 {
                    vst1q_f32(out.add(r * n + 4 * c), a[r][c]);
                }
            }
        }

        pub(in super::super) fn forward(
            x: &[f32],
            rows: usize,
            k: usize,
            n: usize,
            q: &[i8],
            out: &mut [f32],
        ) {
            // SAFETY: NEON is baseline on aarch64; every pointer stays inside its slice (rows and
            // columns are bounded by the block loop).
            unsafe { by_row_blocks!(x, rows, k, n, q, out, 16, tile, 4) }
        }
    }
}

/// `out[r] = Σ_e f64(rows[r][e]) · f64(q[e])` for every row of `rows` (`[n, q.len()]` row-major;
/// nothing for an empty `q`),
/// each sum one chain in element order from `-0.0` (as `Iterator::sum` does) — the retrieval scores and the key-space
/// projection. The f64 product of two f32 values is exact, so a result depends only on that
/// order; [`DOT_LANES`] rows run side by side (independent chains, so the compiler may keep them
/// in vector lanes) instead of one latency-bound chain after another.
pub fn dots_f64(rows: &[f32], q: &[f32], out: &mut Vec<f64>) {
    out.clear();
    let d = q.len();
    if d == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above).
        unsafe { dots_f64_avx2(rows, q, out) };
        return;
    }
    dots_f64_lanes(rows, q, out);
}

/// Rows processed together by [`dots_f64`].
pub const DOT_LANES: usize = 8;

/// [`dots_f64_lanes`] with AVX2: each block of 8 rows × 8 elements is transposed in registers,
/// so lane `l` of the two f64 accumulators holds row `l`'s chain, fed element by element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_f64_avx2(rows: &[f32], q: &[f32], out: &mut Vec<f64>) {
    use std::arch::x86_64::*;
    let d = q.len();
    let mut blocks = rows.chunks_exact(d * DOT_LANES);
    let whole = d / 8 * 8;
    for block in &mut blocks {
        let mut lo = _mm256_set1_pd(-0.0);
        let mut hi = _mm256_set1_pd(-0.0);
        let p = block.as_ptr();
        let mut e = 0;
        while e < whole {
            // SAFETY: rows l·d + e .. + 8 lie inside the block (e + 8 ≤ d).
            let r: [__m256; 8] = std::array::from_fn(|l| _mm256_loadu_ps(p.add(l * d + e)));
            // 8×8 transpose: t[i] = element e + i of rows 0..8.
            let a0 = _mm256_unpacklo_ps(r[0], r[1]);
            let a1 = _mm256_unpackhi_ps(r[0], r[1]);
            let a2 = _mm256_unpacklo_ps(r[2], r[3]);
            let a3 = _mm256_unpackhi_ps(r[2], r[3]);
            let a4 = _mm256_unpacklo_ps(r[4], r[5]);
            let a5 = _mm256_unpackhi_ps(r[4], r[5]);
            let a6 = _mm256_unpacklo_ps(r[6], r[7]);
            let a7 = _mm256_unpackhi_ps(r[6], r[7]);
            let b0 = _mm256_shuffle_ps::<0x44>(a0, a2);
            let b1 = _mm256_shuffle_ps::<0xEE>(a0, a2);
            let b2 = _mm256_shuffle_ps::<0x44>(a1, a3);
            let b3 = _mm256_shuffle_ps::<0xEE>(a1, a3);
            let b4 = _mm256_shuffle_ps::<0x44>(a4, a6);
            let b5 = _mm256_shuffle_ps::<0xEE>(a4, a6);
            let b6 = _mm256_shuffle_ps::<0x44>(a5, a7);
            let b7 = _mm256_shuffle_ps::<0xEE>(a5, a7);
            let t = [
                _mm256_permute2f128_ps::<0x20>(b0, b4),
                _mm256_permute2f128_ps::<0x20>(b1, b5),
                _mm256_permute2f128_ps::<0x20>(b2, b6),
                _mm256_permute2f128_ps::<0x20>(b3, b7),
                _mm256_permute2f128_ps::<0x31>(b0, b4),
                _mm256_permute2f128_ps::<0x31>(b1, b5),
                _mm256_permute2f128_ps::<0x31>(b2, b6),
                _mm256_permute2f128_ps::<0x31>(b3, b7),
            ];
            for (i, t) in t.into_iter().enumerate() {
                let qe = _mm256_set1_pd(f64::from(q[e + i]));
                let l = _mm256_cvtps_pd(_mm256_castps256_ps128(t));
                let h = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(t));
                lo = _mm256_add_pd(lo, _mm256_mul_pd(l, qe));
                hi = _mm256_add_pd(hi, _mm256_mul_pd(h, qe));
            }
            e += 8;
        }
        let mut acc = [0.0f64; DOT_LANES];
        _mm256_storeu_pd(acc.as_mut_ptr(), lo);
        _mm256_storeu_pd(acc.as_mut_ptr().add(4), hi);
        lanes_from(&mut acc, block, q, whole);
        out.extend_from_slice(&acc);
    }
    remainder_dots(blocks.remainder(), q, out);
}

#[inline(always)]
fn dots_f64_lanes(rows: &[f32], q: &[f32], out: &mut Vec<f64>) {
    let d = q.len();
    let mut blocks = rows.chunks_exact(d * DOT_LANES);
    for block in &mut blocks {
        let mut acc = [-0.0f64; DOT_LANES];
        lanes_from(&mut acc, block, q, 0);
        out.extend_from_slice(&acc);
    }
    remainder_dots(blocks.remainder(), q, out);
}

/// Carry the [`DOT_LANES`] chains of `block` (`DOT_LANES` rows of `q.len()`) on from element
/// `from` to the end.
#[inline(always)]
fn lanes_from(acc: &mut [f64; DOT_LANES], block: &[f32], q: &[f32], from: usize) {
    let d = q.len();
    for (e, &qe) in q.iter().enumerate().skip(from) {
        let qe = f64::from(qe);
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f64::from(block[l * d + e]) * qe;
        }
    }
}

/// The rows after the last whole block, one reference chain each.
#[inline(always)]
fn remainder_dots(rows: &[f32], q: &[f32], out: &mut Vec<f64>) {
    out.extend(rows.chunks_exact(q.len()).map(|row| dot_f64(row, q)));
}

/// The reference chain of [`dots_f64`] for one row.
pub fn dot_f64(row: &[f32], q: &[f32]) -> f64 {
    row.iter()
        .zip(q)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

/// `Σ f(x[i])` in a fixed order that vectorises: eight running sums (element `i` into sum
/// `i % 8`, in index order), then `((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`. The same
/// bits on every platform, whatever vector width the compiler picks.
#[inline(always)]
pub fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut l = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in l.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in l.iter_mut().zip(tail) {
        *a += f(v);
    }
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// The largest element (`-∞` for none; NaNs are skipped). Exact in any order; eight lanes so it
/// vectorises.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut l = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in l.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in l.iter_mut().zip(tail) {
        *a = if v > *a { v } else { *a };
    }
    l.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Layer normalisation of each `gamma.len()`-wide row in place: `(x − mean)/sqrt(var + eps)·γ + β`,
/// both sums by [`sum_by`].
#[inline(always)]
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    for row in x.chunks_exact_mut(d) {
        let mean = sum_by(row, |v| v) / d as f32;
        let ss = sum_by(row, |v| {
            let c = v - mean;
            c * c
        });
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// `eˣ` for `x` in about `[-87, 88]` (clamped there), relative error below 3·10⁻⁷: Cephes'
/// `expf` (Cody–Waite reduction by ln 2, degree-6 polynomial, exponent set by bits).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)`, absolute error below 10⁻⁶: the odd/even rational approximation on `[-4, 4]` used by
/// Eigen and tract (±1 beyond, to single precision).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_1e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_3e-3;
    q = x2 * q + -1.426_473_9e-2;
    x * p / q
}

/// GELU as BERT exports it: `x · (1 + erf(x/√2)) · 0.5`.
#[inline(always)]
pub fn gelu(x: &mut [f32]) {
    for v in x {
        *v = *v * (1.0 + erf(*v / std::f32::consts::SQRT_2)) * 0.5;
    }
}

/// Softmax of one row in place: max-shifted [`exp`], the sum by [`sum_by`].
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let m = max(x);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    let s = sum_by(x, |v| v);
    for v in x.iter_mut() {
        *v /= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_int8(rows: usize, k: usize, n: usize, seed: u64) -> (Vec<f32>, Linear) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = rng.normals(rows * k).iter().map(|v| *v as f32).collect();
        let q: Vec<i8> = (0..k * n)
            .map(|_| (rng.next_u64() % 255) as i16 as i8)
            .collect();
        let scale: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-5).collect();
        let bias: Vec<f32> = (0..n).map(|j| (j as f32 - 7.0) * 0.01).collect();
        let l = Linear::new(k, n, Weights::I8 { q, scale }, Some(bias)).unwrap();
        (x, l)
    }

    /// Maps side by side give each part's outputs with the bits the part gives alone, on every
    /// weight type (int8 FMA chains, integer at one and two levels, fp32), for row counts that
    /// leave tails; maps of other input widths or weight types are refused.
    #[test]
    fn maps_side_by_side_give_each_maps_bits() {
        for (rows, widths) in [(1, [384, 384, 384]), (13, [40, 7, 33]), (9, [16, 16, 1])] {
            let k = 50 + rows;
            let kinds: [fn(Linear) -> Linear; 4] = [
                |l| l,
                |l| l.with_int8_activations(1),
                |l| l.with_int8_activations(2),
                |l| {
                    let (k, n) = (l.inputs, l.outputs);
                    let Weights::I8 { q, scale } = &l.weights else {
                        unreachable!()
                    };
                    let w = (0..k * n)
                        .map(|c| f32::from(q[int8::at(k, n, c / n, c % n)]) * scale[c % n])
                        .collect();
                    Linear::new(k, n, Weights::F32(w), l.bias.clone()).unwrap()
                },
            ];
            for (t, kind) in kinds.iter().enumerate() {
                let mut x = Vec::new();
                let parts: Vec<Linear> = widths
                    .iter()
                    .enumerate()
                    .map(|(p, &n)| {
                        let (xs, l) = random_int8(rows, k, n, (7 * p + n + t) as u64);
                        x = xs;
                        kind(l)
                    })
                    .collect();
                let both = Linear::side_by_side(&parts).unwrap();
                let mut got = Vec::new();
                both.forward(&x, &mut got);
                let total: usize = widths.iter().sum();
                let mut at = 0;
                for (p, part) in parts.iter().enumerate() {
                    let mut want = Vec::new();
                    part.forward(&x, &mut want);
                    for r in 0..rows {
                        let n = widths[p];
                        let g = &got[r * total + at..r * total + at + n];
                        let w = &want[r * n..(r + 1) * n];
                        assert!(
                            g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "kind {t}, rows {rows}, part {p}, row {r}"
                        );
                    }
                    at += widths[p];
                }
            }
        }
        let (_, a) = random_int8(1, 8, 4, 1);
        let (_, b) = random_int8(1, 9, 4, 2);
        assert!(
            Linear::side_by_side(&[a.clone(), b]).is_err(),
            "input widths"
        );
        let (_, c) = random_int8(1, 8, 4, 3);
        assert!(
            Linear::side_by_side(&[a.clone(), c.with_int8_activations(1)]).is_err(),
            "weight types"
        );
        assert!(Linear::side_by_side(&[]).is_err(), "no maps");
        assert!(Linear::side_by_side(&[a]).is_ok(), "one map");
    }

    /// The dispatched kernel must equal the scalar definition bit for bit, for every row count
    /// (each block size and tail) and column counts that leave a scalar tail.
    #[test]
    fn vector_int8_kernels_match_the_scalar_definition_bit_for_bit() {
        for &(rows, k, n) in &[(1, 384, 384), (7, 384, 1536), (13, 50, 40), (6, 3, 33)] {
            let (x, l) = random_int8(rows, k, n, (rows * k + n) as u64);
            let mut got = Vec::new();
            l.forward(&x, &mut got);
            let Weights::I8 { q, scale } = &l.weights else {
                unreachable!()
            };
            let mut want = vec![0.0f32; rows * n];
            int8::scalar_columns(&x, rows, k, n, q, &mut want, 0);
            // The narrower x86 kernel too, where this CPU runs it (the dispatcher picks one).
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                let mut avx2 = vec![0.0f32; rows * n];
                // SAFETY: features detected above.
                unsafe { int8::x86::forward_avx2(&x, rows, k, n, q, &mut avx2) };
                for (a, b) in avx2.iter().zip(&want) {
                    assert_eq!(a.to_bits(), b.to_bits(), "avx2, rows {rows} k {k} n {n}");
                }
            }
            for (r, row) in want.chunks_exact_mut(n).enumerate() {
                for (j, y) in row.iter_mut().enumerate() {
                    *y = *y * scale[j] + l.bias.as_ref().unwrap()[j];
                }
                for j in 0..n {
                    assert_eq!(
                        got[r * n + j].to_bits(),
                        row[j].to_bits(),
                        "rows {rows} k {k} n {n}: row {r} column {j}"
                    );
                }
            }
        }
    }

    /// The int8 × int8 map is its definition (quantise, exact sums, scale in the documented
    /// order) bit for bit, and two levels are far closer to the real product than one.
    #[test]
    fn int8_activation_products_follow_their_definition() {
        for (rows, k, n) in [(5, 384, 48), (2, 50, 33)] {
            let (x, l) = random_int8(rows, k, n, 11 + k as u64);
            let Weights::I8 { q, scale } = l.weights.clone() else {
                unreachable!()
            };
            let bias = l.bias.clone().unwrap();
            let real = |r: usize, j: usize| {
                let mut s = 0.0f64;
                for i in 0..k {
                    s += f64::from(x[r * k + i])
                        * f64::from(q[int8::at(k, n, i, j)])
                        * f64::from(scale[j]);
                }
                s + f64::from(bias[j])
            };
            let mut err = [0.0f64; 2];
            for levels in [1usize, 2] {
                let li = l.clone().with_int8_activations(levels);
                let mut got = Vec::new();
                li.forward(&x, &mut got);
                let packed = integer::Packed::from_fn(k, n, |i, j| q[int8::at(k, n, i, j)]);
                let (kp, np) = (packed.padded_inputs(), packed.padded_outputs());
                let (mut xq, mut sx) = (Vec::new(), Vec::new());
                integer::quantize_rows(&x, k, kp, levels, &mut xq, &mut sx);
                let mut acc = vec![0i32; rows * levels * np];
                integer::matmul_reference(&xq, &packed, &mut acc);
                for r in 0..rows {
                    for j in 0..n {
                        let a = |l: usize| acc[(r * levels + l) * np + j] as f32;
                        let s = |l: usize| sx[r * levels + l];
                        let want = if levels == 1 {
                            a(0) * s(0) * scale[j] + bias[j]
                        } else {
                            (a(0) * s(0) + a(1) * s(1)) * scale[j] + bias[j]
                        };
                        assert_eq!(got[r * n + j].to_bits(), want.to_bits(), "{levels} {r} {j}");
                        err[levels - 1] =
                            err[levels - 1].max((f64::from(got[r * n + j]) - real(r, j)).abs());
                    }
                }
            }
            println!(
                "k {k}: max abs error one level {:e}, two levels {:e}",
                err[0], err[1]
            );
            assert!(err[1] * 20.0 < err[0], "{err:?}");
        }
    }

    #[test]
    fn int8_product_is_close_to_the_real_product() {
        let (x, l) = random_int8(3, 64, 48, 9);
        let mut got = Vec::new();
        l.forward(&x, &mut got);
        let Weights::I8 { q, scale } = &l.weights else {
            unreachable!()
        };
        for r in 0..3 {
            for j in 0..48 {
                let mut s = 0.0f64;
                for i in 0..64 {
                    s += f64::from(x[r * 64 + i])
                        * f64::from(q[int8::at(64, 48, i, j)])
                        * f64::from(scale[j]);
                }
                s += f64::from(l.bias.as_ref().unwrap()[j]);
                assert!((s - f64::from(got[r * 48 + j])).abs() < 1e-4, "{r} {j}");
            }
        }
    }

    #[test]
    fn f32_product_and_shape_checks() {
        let l = Linear::new(2, 3, Weights::F32(vec![1., 2., 3., 4., 5., 6.]), None).unwrap();
        let mut y = Vec::new();
        l.forward(&[1.0, 10.0, 0.5, 0.0], &mut y);
        assert_eq!(y, vec![41.0, 52.0, 63.0, 0.5, 1.0, 1.5]);
        assert!(Linear::new(2, 3, Weights::F32(vec![0.0; 5]), None).is_err());
        assert!(Linear::new(2, 3, Weights::F32(vec![0.0; 6]), Some(vec![0.0; 2])).is_err());
        let q = Weights::I8 {
            q: vec![0; 6],
            scale: vec![1.0; 2],
        };
        assert!(Linear::new(2, 3, q, None).is_err());
        assert!(Linear::new(usize::MAX, 3, Weights::F32(vec![]), None).is_err());
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut worst = (0.0f64, 0.0f64);
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let e = f64::from(x).exp();
            worst.0 = worst.0.max((f64::from(exp(x)) - e).abs() / e);
            let x = i as f32 * 0.0007;
            worst.1 = worst
                .1
                .max((f64::from(erf(x)) - libm::erf(f64::from(x))).abs());
        }
        println!(
            "exp max relative error {:e}, erf max absolute error {:e}",
            worst.0, worst.1
        );
        assert!(worst.0 < 3e-7, "exp: {}", worst.0);
        assert!(worst.1 < 1e-6, "erf: {}", worst.1);
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(0.0) == 1.0 && erf(0.0) == 0.0 && erf(9.0) > 0.999_999);
    }

    #[test]
    fn softmax_layer_norm_and_gelu_reference_values() {
        let mut s = vec![1.0f32, 2.0, 3.0];
        softmax(&mut s);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let t: f64 = e.iter().sum();
        for (a, b) in s.iter().zip(&e) {
            assert!((f64::from(*a) - b / t).abs() < 1e-6);
        }
        let mut x = vec![1.0f32, 3.0];
        layer_norm(&mut x, &[2.0, 2.0], &[0.5, 0.5], 0.0);
        assert_eq!(x, vec![-1.5, 2.5]);
        let mut g = vec![0.0f32, 1.0, -3.0];
        gelu(&mut g);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 0.841_344_7).abs() < 1e-6);
        assert!((g[2] + 0.004_049_7).abs() < 1e-6);
    }
    #[test]
    fn dots_f64_match_the_reference_chain_bit_for_bit() {
        let mut rng = crate::rng::Rng::new(11);
        for (n, d) in [
            (0, 5),
            (1, 1),
            (7, 3),
            (8, 8),
            (9, 16),
            (8, 395),
            (29, 384),
            (2772, 17),
        ] {
            let rows: Vec<f32> = rng.normals(n * d).iter().map(|v| *v as f32).collect();
            let q: Vec<f32> = rng.normals(d).iter().map(|v| *v as f32).collect();
            let want: Vec<u64> = rows
                .chunks_exact(d)
                .map(|r| dot_f64(r, &q).to_bits())
                .collect();
            let mut got = vec![1.0];
            dots_f64(&rows, &q, &mut got);
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
            let mut lanes = Vec::new();
            dots_f64_lanes(&rows, &q, &mut lanes);
            assert_eq!(lanes.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
        }
    }
}
