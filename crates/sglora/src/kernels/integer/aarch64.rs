//! aarch64 integer tiles: `sdot` (the dot-product extension, detected at run time) and
//! `smull` + `sadalp` (baseline NEON). Each computes the same int32 sums as
//! [`super::matmul_reference`].

use super::{Packed, BLOCK, GROUP, PANEL};
use std::arch::aarch64::*;

/// Four activations of row `r`, group `g`, repeated across a q register.
#[inline(always)]
unsafe fn quad(x: *const i8, kp: usize, r: usize, g: usize) -> int8x16_t {
    let v = x.add(r * kp + g * GROUP).cast::<i32>().read_unaligned();
    vreinterpretq_s8_s32(vdupq_n_s32(v))
}

/// `sdot acc.4s, w.16b, x.16b`: four 4-way int8 dot products added to four int32 lanes. (The
/// intrinsic `vdotq_s32` is not stable Rust yet; the instruction is.)
#[inline(always)]
unsafe fn sdot(mut acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    std::arch::asm!(
        "sdot {a:v}.4s, {w:v}.16b, {x:v}.16b",
        a = inout(vreg) acc,
        w = in(vreg) w,
        x = in(vreg) x,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// `R` rows × `P` panels: four q accumulators (four columns each) per row and panel.
#[target_feature(enable = "dotprod")]
unsafe fn tile_dot<const R: usize, const P: usize>(
    x: *const i8,
    w: *const i8,
    _off: *const i32,
    acc: *mut i32,
    kp: usize,
    np: usize,
) {
    let mut a = [[[vdupq_n_s32(0); 4]; P]; R];
    for g in 0..kp / GROUP {
        let mut wv = [[vdupq_n_s8(0); 4]; P];
        for (p, v) in wv.iter_mut().enumerate() {
            let b = w.add(p * kp * PANEL + g * BLOCK);
            for (c, vc) in v.iter_mut().enumerate() {
                *vc = vld1q_s8(b.add(16 * c));
            }
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let xb = quad(x, kp, r, g);
            for (ap, v) in ar.iter_mut().zip(&wv) {
                for c in 0..4 {
                    ap[c] = sdot(ap[c], v[c], xb);
                }
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (p, ap) in ar.iter().enumerate() {
            for (c, v) in ap.iter().enumerate() {
                vst1q_s32(acc.add(r * np + p * PANEL + 4 * c), *v);
            }
        }
    }
}

/// `R` rows × `P` panels with `smull` (int8 × int8 → int16, exact) and `sadalp` (pairs added into
/// int32): eight accumulators per row and panel, each two columns × two partial sums, folded
/// with `addp` at the end.
#[inline(always)]
unsafe fn tile_neon<const R: usize, const P: usize>(
    x: *const i8,
    w: *const i8,
    _off: *const i32,
    acc: *mut i32,
    kp: usize,
    np: usize,
) {
    let mut a = [[[vdupq_n_s32(0); 8]; P]; R];
    for g in 0..kp / GROUP {
        let mut wv = [[vdupq_n_s8(0); 4]; P];
        for (p, v) in wv.iter_mut().enumerate() {
            let b = w.add(p * kp * PANEL + g * BLOCK);
            for (c, vc) in v.iter_mut().enumerate() {
                *vc = vld1q_s8(b.add(16 * c));
            }
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let xb = quad(x, kp, r, g);
            let xl = vget_low_s8(xb);
            for (ap, v) in ar.iter_mut().zip(&wv) {
                for c in 0..4 {
                    ap[2 * c] = vpadalq_s16(ap[2 * c], vmull_s8(vget_low_s8(v[c]), xl));
                    ap[2 * c + 1] = vpadalq_s16(ap[2 * c + 1], vmull_high_s8(v[c], xb));
                }
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (p, ap) in ar.iter().enumerate() {
            for c in 0..4 {
                let s = vpaddq_s32(ap[2 * c], ap[2 * c + 1]);
                vst1q_s32(acc.add(r * np + p * PANEL + 4 * c), s);
            }
        }
    }
}

/// # Safety
/// The CPU must have the dot-product extension; `xq` holds `rows × kp` values and `acc`
/// `rows × np`.
#[target_feature(enable = "dotprod")]
pub(super) unsafe fn dotprod(x: &[i8], rows: usize, w: &Packed, acc: &mut [i32]) {
    tiles!(x, rows, w, acc, tile_dot, 6, 1)
}

/// # Safety
/// Lengths as for [`dotprod`].
pub(super) unsafe fn neon(x: &[i8], rows: usize, w: &Packed, acc: &mut [i32]) {
    tiles!(x, rows, w, acc, tile_neon, 3, 1)
}
