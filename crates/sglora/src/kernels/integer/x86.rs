//! x86-64 integer tiles: AVX-512 VNNI, AVX-VNNI and AVX2. Each computes the same int32 sums as
//! [`super::matmul_reference`]; the tiles differ only in how many columns and rows they hold in
//! registers.

use super::{Packed, BLOCK, GROUP, PANEL};
use std::arch::x86_64::*;

/// Four activations of row `r`, group `g`, as one 32-bit lane; `flip` turns them into the
/// unsigned `xq + 128` the VNNI instructions multiply.
#[inline(always)]
unsafe fn quad(x: *const i8, kp: usize, r: usize, g: usize, flip: bool) -> i32 {
    let v = x.add(r * kp + g * GROUP).cast::<i32>().read_unaligned();
    if flip {
        v ^ 0x8080_8080u32 as i32
    } else {
        v
    }
}

/// `R` rows × `P` panels: one zmm accumulator per row and panel.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile512<const R: usize, const P: usize>(
    x: *const i8,
    w: *const i8,
    off: *const i32,
    acc: *mut i32,
    kp: usize,
    np: usize,
) {
    let mut a = [[_mm512_setzero_si512(); P]; R];
    for g in 0..kp / GROUP {
        let mut wv = [_mm512_setzero_si512(); P];
        for (p, v) in wv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(w.add(p * kp * PANEL + g * BLOCK).cast());
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let xb = _mm512_set1_epi32(quad(x, kp, r, g, true));
            for (av, &v) in ar.iter_mut().zip(&wv) {
                *av = _mm512_dpbusd_epi32(*av, xb, v);
            }
        }
    }
    for p in 0..P {
        let o = _mm512_loadu_si512(off.add(p * PANEL).cast());
        for (r, ar) in a.iter().enumerate() {
            _mm512_storeu_si512(
                acc.add(r * np + p * PANEL).cast(),
                _mm512_sub_epi32(ar[p], o),
            );
        }
    }
}

/// `R` rows × `P` panels: two ymm accumulators per row and panel.
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn tile_vnni<const R: usize, const P: usize>(
    x: *const i8,
    w: *const i8,
    off: *const i32,
    acc: *mut i32,
    kp: usize,
    np: usize,
) {
    let mut a = [[[_mm256_setzero_si256(); 2]; P]; R];
    for g in 0..kp / GROUP {
        let mut wv = [[_mm256_setzero_si256(); 2]; P];
        for (p, v) in wv.iter_mut().enumerate() {
            let b = w.add(p * kp * PANEL + g * BLOCK);
            v[0] = _mm256_loadu_si256(b.cast());
            v[1] = _mm256_loadu_si256(b.add(32).cast());
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let xb = _mm256_set1_epi32(quad(x, kp, r, g, true));
            for (av, v) in ar.iter_mut().zip(&wv) {
                av[0] = _mm256_dpbusd_avx_epi32(av[0], xb, v[0]);
                av[1] = _mm256_dpbusd_avx_epi32(av[1], xb, v[1]);
            }
        }
    }
    for p in 0..P {
        for h in 0..2 {
            let o = _mm256_loadu_si256(off.add(p * PANEL + 8 * h).cast());
            for (r, ar) in a.iter().enumerate() {
                let dst = acc.add(r * np + p * PANEL + 8 * h);
                _mm256_storeu_si256(dst.cast(), _mm256_sub_epi32(ar[p][h], o));
            }
        }
    }
}

/// `R` rows × `P` panels with `vpmaddubsw`: `|q|` (unsigned) times `xq` carrying `q`'s sign,
/// pairs summed in 16 bits (at most 2 · 128 · 127, no saturation), then `vpmaddwd` by ones.
#[target_feature(enable = "avx2")]
unsafe fn tile256<const R: usize, const P: usize>(
    x: *const i8,
    w: *const i8,
    _off: *const i32,
    acc: *mut i32,
    kp: usize,
    np: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut a = [[[_mm256_setzero_si256(); 2]; P]; R];
    for g in 0..kp / GROUP {
        let mut wv = [[_mm256_setzero_si256(); 2]; P];
        let mut aw = [[_mm256_setzero_si256(); 2]; P];
        for p in 0..P {
            let b = w.add(p * kp * PANEL + g * BLOCK);
            for h in 0..2 {
                wv[p][h] = _mm256_loadu_si256(b.add(32 * h).cast());
                aw[p][h] = _mm256_abs_epi8(wv[p][h]);
            }
        }
        for (r, ar) in a.iter_mut().enumerate() {
            let xb = _mm256_set1_epi32(quad(x, kp, r, g, false));
            for p in 0..P {
                for h in 0..2 {
                    let sx = _mm256_sign_epi8(xb, wv[p][h]);
                    let pairs = _mm256_maddubs_epi16(aw[p][h], sx);
                    ar[p][h] = _mm256_add_epi32(ar[p][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (p, ap) in ar.iter().enumerate() {
            for (h, v) in ap.iter().enumerate() {
                _mm256_storeu_si256(acc.add(r * np + p * PANEL + 8 * h).cast(), *v);
            }
        }
    }
}

/// # Safety
/// The CPU must have AVX-512F, AVX-512BW and AVX-512 VNNI; `xq` holds `rows × kp` values and
/// `acc` `rows × np`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn avx512vnni(x: &[i8], rows: usize, w: &Packed, acc: &mut [i32]) {
    tiles!(x, rows, w, acc, tile512, 8, 2)
}

/// # Safety
/// The CPU must have AVX2 and AVX-VNNI; lengths as for [`avx512vnni`].
#[target_feature(enable = "avx2,avxvnni")]
pub(super) unsafe fn avxvnni(x: &[i8], rows: usize, w: &Packed, acc: &mut [i32]) {
    tiles!(x, rows, w, acc, tile_vnni, 6, 1)
}

/// # Safety
/// The CPU must have AVX2; lengths as for [`avx512vnni`].
#[target_feature(enable = "avx2")]
pub(super) unsafe fn avx2(x: &[i8], rows: usize, w: &Packed, acc: &mut [i32]) {
    tiles!(x, rows, w, acc, tile256, 4, 1)
}
