//! Prefill attention: a chunk of new queries of one sequence over the keys
//! it has cached in a paged pool (any slots, any positions: a rolling window) and the
//! chunk's own keys, causal within the sliding window.
//!
//! Flash-attention style: each work item (a KV head and a run of queries) walks the
//! keys in tiles with a running softmax per query row, so no `[queries, keys]` score
//! matrix is ever made and every key and value row is read once per item, for all
//! its query rows. The AVX-512 path keeps the item's query rows transposed, so that
//! the scores of a key for every row are vectors: the softmax bookkeeping runs across
//! rows in lanes, with no horizontal sums.

use super::common::Elem;
#[cfg(target_arch = "x86_64")]
use crate::isa::avx512;
use crate::operands::Input;
use crate::parallel::{for_each_index, SendPtr};
use std::cell::RefCell;

/// One prefill chunk's attention inputs.
#[derive(Clone, Copy)]
pub struct PrefillAttention<'a> {
    /// `[t, q_heads, head_dim]`, RoPE applied; query `i` is at position `start + i`.
    pub q: &'a [f32],
    /// The chunk's own keys and values, `[t, kv_heads, head_dim]`.
    pub k_new: Input<'a>,
    pub v_new: Input<'a>,
    /// The pools `[rows, kv_heads, head_dim]`, in the same dtype as the chunk's keys.
    pub k_pool: Input<'a>,
    pub v_pool: Input<'a>,
    /// `(pool row, position)` of each cached slot (positions before `start`).
    pub cached: &'a [(u32, u32)],
    pub start: usize,
    /// A query at position p sees keys at positions p − window < k ≤ p
    /// (`usize::MAX`: plain causal attention).
    pub window: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Query rows (query heads × queries) per work item, at most: four vectors of
/// scores per key.
const MAX_ROWS: usize = 64;
/// Keys per tile.
const TILE: usize = 32;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out` (`[t, q_heads * head_dim]`) = the chunk's attention, f32 accumulation.
///
/// Panics if the shapes or dtypes disagree.
pub fn prefill_attention(a: &PrefillAttention<'_>, out: &mut [f32]) {
    let (nq, nkv, hd) = (a.q_heads, a.kv_heads, a.head_dim);
    assert!(nkv > 0 && nq % nkv == 0, "{nq} query heads over {nkv} KV heads");
    let t = a.q.len() / (nq * hd).max(1);
    assert_eq!(a.q.len(), t * nq * hd, "q is not [t, q_heads, head_dim]");
    assert_eq!(a.k_new.len(), t * nkv * hd, "new keys are not [t, kv_heads, head_dim]");
    assert_eq!(
        a.v_new.len(),
        a.k_new.len(),
        "new values are not [t, kv_heads, head_dim]"
    );
    assert_eq!(a.k_pool.len(), a.v_pool.len(), "key and value pools differ in size");
    assert_eq!(out.len(), a.q.len(), "out is not [t, q_heads * head_dim]");
    let same = |x: Input<'_>, y: Input<'_>| std::mem::discriminant(&x) == std::mem::discriminant(&y);
    assert!(
        same(a.k_new, a.v_new) && same(a.k_new, a.k_pool) && same(a.k_new, a.v_pool),
        "keys, values and pools differ in dtype"
    );
    if t == 0 {
        return;
    }
    let group = nq / nkv;
    let per_item = (MAX_ROWS / group).clamp(1, 16);
    let blocks = t.div_ceil(per_item);
    let base = SendPtr(out.as_mut_ptr());
    for_each_index(nkv * blocks, |i| {
        let (g, b) = (i % nkv, i / nkv);
        let item = Item {
            a,
            g,
            queries: b * per_item..((b + 1) * per_item).min(t),
        };
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let len = item.scratch_len();
            if s.len() < len {
                s.resize(len, 0.0);
            }
            // SAFETY: items write disjoint (query, head) rows of `out`, which
            // outlives the call.
            unsafe { item.run(&mut s[..len], base.get()) }
        })
    });
}

/// One KV head's query heads for a run of queries.
struct Item<'a, 'b> {
    a: &'b PrefillAttention<'a>,
    g: usize,
    queries: std::ops::Range<usize>,
}

impl Item<'_, '_> {
    fn group(&self) -> usize {
        self.a.q_heads / self.a.kv_heads
    }

    /// Query rows: `(query, head)` in query-major order.
    fn rows(&self) -> usize {
        self.queries.len() * self.group()
    }

    /// Rows rounded up to whole vectors.
    fn padded(&self) -> usize {
        self.rows().div_ceil(16) * 16
    }

    fn scratch_len(&self) -> usize {
        let (rp, hd) = (self.padded(), self.a.head_dim);
        // Queries, outputs, scores, running max and sum, one tile of keys and of
        // values widened to f32.
        rp * hd + self.rows() * hd + TILE * rp + 2 * rp + 2 * TILE * hd
    }

    /// Position of query row `r`.
    fn row_pos(&self, r: usize) -> usize {
        self.a.start + self.queries.start + r / self.group()
    }

    /// Position of key `key`: the cached slots first, then the chunk's own.
    fn key_pos(&self, key: usize) -> usize {
        let n = self.a.cached.len();
        if key < n {
            self.a.cached[key].1 as usize
        } else {
            self.a.start + key - n
        }
    }

    fn visible(&self, qp: usize, kp: usize) -> bool {
        kp <= qp && qp - kp < self.a.window
    }

    /// # Safety
    /// `out` is the start of the `[t, q_heads * head_dim]` output.
    unsafe fn run(&self, scratch: &mut [f32], out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        if avx512() && self.a.head_dim.is_multiple_of(16) && self.padded() <= MAX_ROWS {
            return self.run_avx512(scratch, out);
        }
        self.run_portable(out)
    }

    /// Keys in tiles; returns each tile's key range and whether every query row
    /// sees every key of it (no masking needed), skipping tiles no row sees.
    fn tiles(&self) -> impl Iterator<Item = (std::ops::Range<usize>, bool)> + '_ {
        let total = self.a.cached.len() + self.queries.end;
        let (first, last) = (self.row_pos(0), self.row_pos(self.rows() - 1));
        (0..total).step_by(TILE).filter_map(move |k0| {
            let keys = k0..(k0 + TILE).min(total);
            let (mut lo, mut hi) = (usize::MAX, 0);
            for key in keys.clone() {
                let p = self.key_pos(key);
                lo = lo.min(p);
                hi = hi.max(p);
            }
            // Seen by some row: not after the last query, and within the window of
            // the first query at or after it.
            let seen = keys.clone().any(|key| {
                let p = self.key_pos(key);
                p <= last && (p >= first || first - p < self.a.window)
            });
            let all = hi <= first && last - lo < self.a.window;
            seen.then_some((keys, all))
        })
    }

    /// Key or value row `key` of this head: `(which, element offset)`.
    fn key_row(&self, key: usize) -> (bool, usize) {
        let (nkv, hd, n) = (self.a.kv_heads, self.a.head_dim, self.a.cached.len());
        if key < n {
            (true, (self.a.cached[key].0 as usize * nkv + self.g) * hd)
        } else {
            (false, ((key - n) * nkv + self.g) * hd)
        }
    }

    /// Row `key` of the keys (`values` false) or values, widened into `dst`.
    fn widen_row(&self, key: usize, values: bool, dst: &mut [f32]) {
        let (pooled, at) = self.key_row(key);
        let src = match (pooled, values) {
            (true, false) => self.a.k_pool,
            (true, true) => self.a.v_pool,
            (false, false) => self.a.k_new,
            (false, true) => self.a.v_new,
        };
        let hd = dst.len();
        match src {
            Input::F32(s) => dst.copy_from_slice(&s[at..at + hd]),
            Input::BF16(s) => widen(&s[at..at + hd], dst),
            Input::F16(s) => widen(&s[at..at + hd], dst),
        }
    }

    /// Row by row, key by key: the path for head sizes and CPUs the vector path
    /// does not take (the test models' head size of 8, non-x86 CPUs).
    ///
    /// # Safety
    /// As [`Self::run`]: `out` is the start of the `[t, q_heads * head_dim]` output, of
    /// which this task's (query, head) rows are written by no one else meanwhile.
    unsafe fn run_portable(&self, out: *mut f32) {
        let (nq, hd, group) = (self.a.q_heads, self.a.head_dim, self.group());
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut key, mut val) = (vec![0f32; hd], vec![0f32; hd]);
        let mut o = vec![0f32; hd];
        for r in 0..self.rows() {
            let (qi, h) = (self.queries.start + r / group, self.g * group + r % group);
            let q = &self.a.q[(qi * nq + h) * hd..][..hd];
            let qp = self.row_pos(r);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            o.fill(0.0);
            for kk in 0..self.a.cached.len() + self.queries.end {
                if !self.visible(qp, self.key_pos(kk)) {
                    continue;
                }
                self.widen_row(kk, false, &mut key);
                let s = q.iter().zip(&key).map(|(a, b)| a * b).sum::<f32>() * scale;
                let m_new = m.max(s);
                let alpha = (m - m_new).exp();
                let p = (s - m_new).exp();
                self.widen_row(kk, true, &mut val);
                l = l * alpha + p;
                for (o, v) in o.iter_mut().zip(&val) {
                    *o = *o * alpha + p * v;
                }
                m = m_new;
            }
            let dst = std::slice::from_raw_parts_mut(out.add((qi * nq + h) * hd), hd);
            for (d, x) in dst.iter_mut().zip(&o) {
                *d = x / l;
            }
        }
    }

    /// # Safety
    /// As [`Self::run_portable`], and the CPU has AVX-512F/BW/VL, FMA and F16C, the
    /// head size is a multiple of 16 and `scratch` holds what `run`'s caller allots.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    unsafe fn run_avx512(&self, scratch: &mut [f32], out: *mut f32) {
        let (nq, hd, group) = (self.a.q_heads, self.a.head_dim, self.group());
        let (rows, rp) = (self.rows(), self.padded());
        let (qt, rest) = scratch.split_at_mut(rp * hd);
        let (o, rest) = rest.split_at_mut(rows * hd);
        let (s, rest) = rest.split_at_mut(TILE * rp);
        let (m, rest) = rest.split_at_mut(rp);
        let (l, rest) = rest.split_at_mut(rp);
        let (kbuf, vbuf) = rest.split_at_mut(TILE * hd);
        // qt[d][r] = q[r][d] / √hd; padding rows stay 0 (their scores are 0 and
        // their outputs are never written).
        let scale = 1.0 / (hd as f32).sqrt();
        qt.fill(0.0);
        for r in 0..rows {
            let (qi, h) = (self.queries.start + r / group, self.g * group + r % group);
            for (d, x) in self.a.q[(qi * nq + h) * hd..][..hd].iter().enumerate() {
                qt[d * rp + r] = x * scale;
            }
        }
        o.fill(0.0);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        let f32_pools = matches!(self.a.k_pool, Input::F32(_));
        let mut kptr = [std::ptr::null::<f32>(); TILE];
        let mut vptr = [std::ptr::null::<f32>(); TILE];
        for (keys, all_visible) in self.tiles() {
            let kn = keys.len();
            for (j, key) in keys.clone().enumerate() {
                if f32_pools {
                    let (pooled, at) = self.key_row(key);
                    let (Input::F32(k), Input::F32(v)) = (
                        if pooled { self.a.k_pool } else { self.a.k_new },
                        if pooled { self.a.v_pool } else { self.a.v_new },
                    ) else {
                        unreachable!("f32 pools with f32 keys")
                    };
                    kptr[j] = k[at..at + hd].as_ptr();
                    vptr[j] = v[at..at + hd].as_ptr();
                } else {
                    self.widen_row(key, false, &mut kbuf[j * hd..(j + 1) * hd]);
                    self.widen_row(key, true, &mut vbuf[j * hd..(j + 1) * hd]);
                    kptr[j] = kbuf[j * hd..].as_ptr();
                    vptr[j] = vbuf[j * hd..].as_ptr();
                }
            }
            x86::scores(qt, rp, hd, &kptr[..kn], s);
            if !all_visible {
                for (j, key) in keys.enumerate() {
                    let kp = self.key_pos(key);
                    for r in 0..rows {
                        if !self.visible(self.row_pos(r), kp) {
                            s[j * rp + r] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            x86::softmax_step(s, rp, kn, m, l, o, rows, hd);
            x86::accumulate(s, rp, &vptr[..kn], hd, o, rows);
        }
        for (r, o) in o.chunks_exact(hd).enumerate() {
            let (qi, h) = (self.queries.start + r / group, self.g * group + r % group);
            let inv = 1.0 / l[r];
            let dst = std::slice::from_raw_parts_mut(out.add((qi * nq + h) * hd), hd);
            for (d, x) in dst.iter_mut().zip(o) {
                *d = x * inv;
            }
        }
    }
}

fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.f();
    }
}

/// The vector path's steps, in AVX-512 intrinsics so that accumulators stay in
/// registers over whole reductions.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use crate::elementwise::exp_nonpositive_avx512;
    use std::arch::x86_64::*;

    /// `s[j][r] = Σ_d k_j[d] · qt[d][r]` for the tile's keys: four keys at a time,
    /// each query vector loaded once for the four.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `qt` holds `hd` rows of `rp` (a multiple of 16)
    /// query values, each `keys[j]` points to `hd` readable f32s, and `s` holds
    /// `keys.len() · rp` scores.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(qt: &[f32], rp: usize, hd: usize, keys: &[*const f32], s: &mut [f32]) {
        let nv = rp / 16;
        assert!(rp.is_multiple_of(16) && nv <= 4 && qt.len() >= rp * hd && s.len() >= keys.len() * rp);
        let (qp, sp) = (qt.as_ptr(), s.as_mut_ptr());
        let mut j = 0;
        while j < keys.len() {
            let kn = (keys.len() - j).min(4);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for d in 0..hd {
                let q = [0, 1, 2, 3].map(|v| {
                    if v < nv {
                        _mm512_loadu_ps(qp.add(d * rp + 16 * v))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for (i, a) in acc.iter_mut().enumerate().take(kn) {
                    let k = _mm512_set1_ps(*keys[j + i].add(d));
                    for (v, a) in a.iter_mut().enumerate().take(nv) {
                        *a = _mm512_fmadd_ps(k, q[v], *a);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(kn) {
                for (v, a) in a.iter().enumerate().take(nv) {
                    _mm512_storeu_ps(sp.add((j + i) * rp + 16 * v), *a);
                }
            }
            j += kn;
        }
    }

    /// The running softmax over one tile of scores `s[j][r]`: per row, the new max,
    /// the old sum and outputs rescaled to it, the scores replaced by their weights
    /// (0 where masked) and added to the sum.
    ///
    /// # Safety
    /// The CPU has AVX-512F (the slices' lengths are checked; `rp` is a multiple of
    /// 16).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_step(
        s: &mut [f32],
        rp: usize,
        kn: usize,
        m: &mut [f32],
        l: &mut [f32],
        o: &mut [f32],
        rows: usize,
        hd: usize,
    ) {
        assert!(s.len() >= kn * rp && m.len() >= rp && l.len() >= rp && o.len() >= rows * hd);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut alpha = [0f32; 64];
        for v in 0..rp / 16 {
            let at = 16 * v;
            let m_old = _mm512_loadu_ps(m.as_ptr().add(at));
            let mut m_new = m_old;
            for j in 0..kn {
                m_new = _mm512_max_ps(m_new, _mm512_loadu_ps(s.as_ptr().add(j * rp + at)));
            }
            // Rows that have seen nothing yet keep a max of −inf; their weights are
            // masked to 0 below, and e^(x − 0) never overflows for them.
            let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, ninf);
            let safe = _mm512_mask_mov_ps(m_new, none, _mm512_setzero_ps());
            let a = exp_nonpositive_avx512(_mm512_sub_ps(m_old, safe));
            _mm512_storeu_ps(alpha.as_mut_ptr().add(at), a);
            _mm512_storeu_ps(m.as_mut_ptr().add(at), m_new);
            let mut sum = _mm512_mul_ps(_mm512_loadu_ps(l.as_ptr().add(at)), a);
            for j in 0..kn {
                let p = s.as_mut_ptr().add(j * rp + at);
                let x = _mm512_loadu_ps(p);
                let masked = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, ninf);
                let w = _mm512_mask_mov_ps(
                    exp_nonpositive_avx512(_mm512_sub_ps(x, safe)),
                    masked,
                    _mm512_setzero_ps(),
                );
                _mm512_storeu_ps(p, w);
                sum = _mm512_add_ps(sum, w);
            }
            _mm512_storeu_ps(l.as_mut_ptr().add(at), sum);
        }
        for (r, o) in o.chunks_exact_mut(hd).take(rows).enumerate() {
            if alpha[r] != 1.0 {
                o.iter_mut().for_each(|x| *x *= alpha[r]);
            }
        }
    }

    /// `o[r] += Σ_j w[j][r] · v_j` for every row: two rows and 128 output values
    /// (16 accumulators) at a time, each value vector loaded once for the two rows.
    ///
    /// # Safety
    /// The CPU has AVX-512F; each `vals[j]` points to `hd` readable f32s (a
    /// multiple of 16), `w` holds `vals.len() · rp` weights and `o` `rows · hd` outputs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate(w: &[f32], rp: usize, vals: &[*const f32], hd: usize, o: &mut [f32], rows: usize) {
        assert!(hd.is_multiple_of(16) && w.len() >= vals.len() * rp && o.len() >= rows * hd);
        let (wp, op) = (w.as_ptr(), o.as_mut_ptr());
        let mut r = 0;
        while r < rows {
            let rn = (rows - r).min(2);
            let mut c = 0;
            while c < hd {
                let lanes = (hd - c).min(128) / 16;
                let mut acc = [[_mm512_setzero_ps(); 8]; 2];
                for (i, a) in acc.iter_mut().enumerate().take(rn) {
                    for (l, a) in a.iter_mut().enumerate().take(lanes) {
                        *a = _mm512_loadu_ps(op.add((r + i) * hd + c + 16 * l));
                    }
                }
                for (j, &v) in vals.iter().enumerate() {
                    let x = [0, 1].map(|i| _mm512_set1_ps(*wp.add(j * rp + r + i.min(rn - 1))));
                    for l in 0..lanes {
                        let val = _mm512_loadu_ps(v.add(c + 16 * l));
                        for (i, a) in acc.iter_mut().enumerate().take(rn) {
                            a[l] = _mm512_fmadd_ps(x[i], val, a[l]);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate().take(rn) {
                    for (l, a) in a.iter().enumerate().take(lanes) {
                        _mm512_storeu_ps(op.add((r + i) * hd + c + 16 * l), *a);
                    }
                }
                c += lanes * 16;
            }
            r += rn;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Softmax attention of one query over explicit visible keys, in f64.
    fn naive(q: &[f32], keys: &[&[f32]], vals: &[&[f32]]) -> Vec<f32> {
        let hd = q.len();
        let s: Vec<f64> = keys
            .iter()
            .map(|k| q.iter().zip(*k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (hd as f64).sqrt())
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..hd)
            .map(|d| (e.iter().zip(vals).map(|(p, v)| p * v[d] as f64).sum::<f64>() / sum) as f32)
            .collect()
    }

    /// A sequence that has `cached` positions before `start` in a rolling buffer of
    /// `slots` slots (scattered over pool rows), and a chunk of `t` queries.
    #[allow(clippy::too_many_arguments)]
    fn check(nkv: usize, group: usize, hd: usize, t: usize, start: usize, slots: usize, window: usize, half: bool) {
        let nq = nkv * group;
        let val = |p: usize, h: usize, d: usize, kind: f32| {
            ((p as f32 * 0.37 + h as f32 * 1.3 + d as f32 * 0.11 + kind) * 1.7).sin()
        };
        // Cached positions: the last `slots` before start; slot = p % slots, pool row
        // = a scrambled slot.
        let held: Vec<usize> = (start.saturating_sub(slots)..start).collect();
        let pool_rows = slots + 3;
        let row_of = |slot: usize| (slot * 7 + 2) % pool_rows;
        let mut kpool = vec![0f32; pool_rows * nkv * hd];
        let mut vpool = kpool.clone();
        let mut cached = vec![(0u32, 0u32); held.len()];
        for &p in &held {
            let row = row_of(p % slots);
            cached[p % slots.max(1)] = (row as u32, p as u32);
            for h in 0..nkv {
                for d in 0..hd {
                    kpool[(row * nkv + h) * hd + d] = val(p, h, d, 0.0);
                    vpool[(row * nkv + h) * hd + d] = val(p, h, d, 1.0);
                }
            }
        }
        let cached: Vec<(u32, u32)> = cached.into_iter().take(held.len()).collect();
        let new = |kind: f32| -> Vec<f32> {
            (0..t * nkv * hd)
                .map(|i| val(start + i / (nkv * hd), (i / hd) % nkv, i % hd, kind))
                .collect()
        };
        let (knew, vnew) = (new(0.0), new(1.0));
        let q: Vec<f32> = (0..t * nq * hd).map(|i| (i as f32 * 0.13).cos()).collect();
        let rounded = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
        let (kp16, vp16, kn16, vn16) = (rounded(&kpool), rounded(&vpool), rounded(&knew), rounded(&vnew));
        let (k_new, v_new, k_pool, v_pool) = if half {
            (
                Input::BF16(&kn16),
                Input::BF16(&vn16),
                Input::BF16(&kp16),
                Input::BF16(&vp16),
            )
        } else {
            (
                Input::F32(&knew),
                Input::F32(&vnew),
                Input::F32(&kpool),
                Input::F32(&vpool),
            )
        };
        let a = PrefillAttention {
            q: &q,
            k_new,
            v_new,
            k_pool,
            v_pool,
            cached: &cached,
            start,
            window,
            q_heads: nq,
            kv_heads: nkv,
            head_dim: hd,
        };
        let mut out = vec![0f32; q.len()];
        prefill_attention(&a, &mut out);
        // The reference sees the values the kernel sees (rounded for bf16).
        let see = |x: f32| if half { bf16::from_f32(x).to_f32() } else { x };
        for i in 0..t {
            let qp = start + i;
            for h in 0..nq {
                let g = h / group;
                let visible: Vec<usize> = held
                    .iter()
                    .copied()
                    .chain(start..=qp)
                    .filter(|&p| p <= qp && qp - p < window)
                    .collect();
                let row = |p: usize, kind: f32| -> Vec<f32> { (0..hd).map(|d| see(val(p, g, d, kind))).collect() };
                let keys: Vec<Vec<f32>> = visible.iter().map(|&p| row(p, 0.0)).collect();
                let vals: Vec<Vec<f32>> = visible.iter().map(|&p| row(p, 1.0)).collect();
                let kr: Vec<&[f32]> = keys.iter().map(|k| k.as_slice()).collect();
                let vr: Vec<&[f32]> = vals.iter().map(|k| k.as_slice()).collect();
                let want = naive(&q[(i * nq + h) * hd..][..hd], &kr, &vr);
                let got = &out[(i * nq + h) * hd..][..hd];
                for d in 0..hd {
                    assert!(
                        (got[d] - want[d]).abs() <= 2e-5,
                        "nkv {nkv} group {group} hd {hd} t {t} start {start} window {window} half {half}: \
                         query {i} head {h} dim {d}: {} vs {}",
                        got[d],
                        want[d]
                    );
                }
            }
        }
    }

    #[test]
    fn matches_a_naive_attention_over_rolling_caches_and_windows() {
        // (nkv, group, hd, t, start, slots, window, bf16)
        let cases = [
            (2, 4, 128, 37, 0, 0, usize::MAX, false),
            (2, 4, 128, 50, 70, 70, usize::MAX, false),
            (1, 4, 32, 40, 100, 48, 48, false),
            (2, 3, 64, 70, 30, 40, 40, false),
            (2, 4, 128, 33, 90, 64, 64, true),
            (4, 1, 16, 9, 5, 8, 8, false),
            (1, 12, 16, 17, 20, 20, 21, false),
            (2, 4, 8, 19, 13, 10, 10, false),
            (2, 4, 8, 19, 13, 10, 10, true),
        ];
        for (nkv, group, hd, t, start, slots, window, half) in cases {
            check(nkv, group, hd, t, start, slots, window, half);
        }
    }
}
