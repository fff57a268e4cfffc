//! Unpacking of each supported checkpoint format into a [`QuantizedTensor`].

use super::scheme::{QuantFormat, QuantScheme};
use super::source::{RawTensor, TensorLookup};
use super::QuantizedTensor;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::Dtype;

/// AWQ GEMM: output column `8c + o` sits in nibble `AWQ_NIBBLE[o]` of word `c` (the inverse
/// of AutoAWQ's pack order `[0, 2, 4, 6, 1, 3, 5, 7]`).
const AWQ_NIBBLE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Loads the quantized linear `prefix` (e.g. `model.layers.0.self_attn.q_proj`) of shape
/// `[n, k]` (`[out_features, in_features]`) as `scheme` says it is stored, validated.
/// A GPTQ act-order checkpoint whose `g_idx` is a real permutation is refused: use
/// [`load_quantized_act_order`].
pub fn load_quantized(
    st: &dyn TensorLookup,
    prefix: &str,
    scheme: &QuantScheme,
    n: usize,
    k: usize,
) -> Result<QuantizedTensor> {
    let (t, perm) = load_quantized_act_order(st, prefix, scheme, n, k)?;
    if perm.is_some() {
        bail!(
            "`{prefix}.g_idx` is an act-order (desc_act) permutation: the input columns of each \
             quantization group are not contiguous; load it with load_quantized_act_order, which \
             permutes the columns and returns the permutation the activations need"
        );
    }
    Ok(t)
}

/// As [`load_quantized`], and for a GPTQ `g_idx` that is a real permutation, permutes the
/// input columns so that each group is contiguous: returns `Some(perm)` where canonical
/// column `p` is checkpoint column `perm[p]` (the caller gathers `x'[p] = x[perm[p]]`).
/// `None` when the columns are in checkpoint order.
pub fn load_quantized_act_order(
    st: &dyn TensorLookup,
    prefix: &str,
    scheme: &QuantScheme,
    n: usize,
    k: usize,
) -> Result<(QuantizedTensor, Option<Vec<u32>>)> {
    ensure!(n > 0 && k > 0, "`{prefix}`: empty weight shape [{n}, {k}]");
    let group_size = scheme.group_size_for(k);
    if !k.is_multiple_of(group_size) {
        bail!(
            "`{prefix}`: quantization_config group_size {group_size} does not divide the layer's \
             {k} input features"
        );
    }
    let (t, perm) = match &scheme.format {
        QuantFormat::Gptq { zero_minus_one, .. } => gptq(st, prefix, scheme, *zero_minus_one, n, k, group_size)?,
        QuantFormat::AwqGemm => (awq(st, prefix, scheme, n, k, group_size)?, None),
        QuantFormat::CtPackQuantized => (ct_packed(st, prefix, scheme, n, k, group_size)?, None),
        QuantFormat::CtIntQuantized => (ct_int(st, prefix, scheme, n, k, group_size)?, None),
    };
    t.validate(prefix)?;
    Ok((t, perm))
}

fn get<'a>(st: &'a dyn TensorLookup, name: &str) -> Result<RawTensor<'a>> {
    st.raw(name)
        .with_context(|| format!("quantized checkpoint has no tensor `{name}`"))
}

/// Tensor `<prefix>.<suffix>`, which must be there with one of `dtypes` and `shape`.
fn required<'a>(
    st: &'a dyn TensorLookup,
    prefix: &str,
    suffix: &str,
    dtypes: &[Dtype],
    shape: &[usize],
    layout: &str,
) -> Result<RawTensor<'a>> {
    let name = format!("{prefix}.{suffix}");
    let t = get(st, &name)?;
    check(&t, &name, dtypes, shape, layout)?;
    Ok(t)
}

fn check(t: &RawTensor, name: &str, dtypes: &[Dtype], shape: &[usize], layout: &str) -> Result<()> {
    if !dtypes.contains(&t.dtype) {
        bail!(
            "tensor `{name}` is stored as {:?}; expected {dtypes:?} ({layout})",
            t.dtype
        );
    }
    if t.shape != shape {
        bail!("tensor `{name}` has shape {:?}, expected {shape:?} ({layout})", t.shape);
    }
    let elems: usize = shape.iter().product();
    if t.data.len() * 8 != elems * t.dtype.bitsize() {
        bail!("tensor `{name}`: its data size does not match its shape");
    }
    Ok(())
}

fn words(t: &RawTensor) -> Vec<u32> {
    t.data
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Integer tensor (i8, i32 or i64) as i64 values.
fn ints(t: &RawTensor) -> Vec<i64> {
    match t.dtype {
        Dtype::I8 => t.data.iter().map(|&b| b as i8 as i64).collect(),
        Dtype::I32 => t
            .data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
            .collect(),
        Dtype::I64 => t
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        _ => unreachable!("checked dtype"),
    }
}

const FLOATS: &[Dtype] = &[Dtype::F16, Dtype::BF16, Dtype::F32];

fn floats(t: &RawTensor) -> Vec<f32> {
    match t.dtype {
        Dtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        _ => unreachable!("checked dtype"),
    }
}

/// `[groups, n]` (GPTQ / AWQ order) to canonical `[n, groups]`.
fn transpose<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for c in 0..cols {
        for r in 0..rows {
            out.push(v[r * cols + c]);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn gptq(
    st: &dyn TensorLookup,
    prefix: &str,
    scheme: &QuantScheme,
    zero_minus_one: bool,
    n: usize,
    k: usize,
    group_size: usize,
) -> Result<(QuantizedTensor, Option<Vec<u32>>)> {
    let bits = scheme.bits as usize;
    let pf = 32 / bits;
    let mask = (1u32 << bits) - 1;
    let groups = k / group_size;
    ensure!(
        k.is_multiple_of(pf) && n.is_multiple_of(pf),
        "`{prefix}`: GPTQ {bits}-bit packs {pf} values per int32; the weight's shape [{n}, {k}] is not a multiple"
    );
    let qw = required(
        st,
        prefix,
        "qweight",
        &[Dtype::I32],
        &[k / pf, n],
        "GPTQ: [k / (32/bits), n], packed along k",
    )?;
    let qz = required(
        st,
        prefix,
        "qzeros",
        &[Dtype::I32],
        &[groups, n / pf],
        "GPTQ: [groups, n / (32/bits)], packed along n",
    )?;
    let sc = required(st, prefix, "scales", FLOATS, &[groups, n], "GPTQ: [groups, n]")?;

    // Group of each checkpoint input column.
    let gi_name = format!("{prefix}.g_idx");
    let g_idx: Vec<usize> = match st.raw(&gi_name) {
        None => (0..k).map(|j| j / group_size).collect(),
        Some(t) => {
            check(&t, &gi_name, &[Dtype::I32, Dtype::I64], &[k], "GPTQ: [k]")?;
            let v = ints(&t);
            if let Some(j) = v.iter().position(|&g| g < 0 || g as usize >= groups) {
                bail!(
                    "tensor `{gi_name}`: g_idx[{j}] = {} is not a group index in 0..{groups}",
                    v[j]
                );
            }
            v.into_iter().map(|g| g as usize).collect()
        }
    };
    let trivial = g_idx.iter().enumerate().all(|(j, &g)| g == j / group_size);
    let perm: Option<Vec<u32>> = if trivial {
        None
    } else {
        let mut count = vec![0usize; groups];
        for &g in &g_idx {
            count[g] += 1;
        }
        if let Some(g) = count.iter().position(|&c| c != group_size) {
            bail!(
                "tensor `{gi_name}`: group {g} has {} input columns, not group_size = {group_size}; \
                 such an act-order layout cannot be made contiguous",
                count[g]
            );
        }
        let mut p: Vec<u32> = (0..k as u32).collect();
        p.sort_by_key(|&j| g_idx[j as usize]);
        Some(p)
    };

    // qweight[r][i]: input columns r*pf .. r*pf+pf of output i, low bits first.
    let qwv = words(&qw);
    let mut q = vec![0u8; n * k];
    for r in 0..k / pf {
        for i in 0..n {
            let w = qwv[r * n + i];
            for s in 0..pf {
                q[i * k + r * pf + s] = ((w >> (bits * s)) & mask) as u8;
            }
        }
    }
    if let Some(p) = &perm {
        let src = q.clone();
        for i in 0..n {
            for (dst, &j) in q[i * k..(i + 1) * k].iter_mut().zip(p) {
                *dst = src[i * k + j as usize];
            }
        }
    }
    let qzv = words(&qz);
    let mut zeros_gn = vec![0u8; groups * n];
    for g in 0..groups {
        for c in 0..n / pf {
            let w = qzv[g * (n / pf) + c];
            for s in 0..pf {
                let stored = (w >> (bits * s)) & mask;
                let zero = if zero_minus_one { stored + 1 } else { stored };
                if zero > mask {
                    bail!(
                        "tensor `{prefix}.qzeros`: group {g}, output {} stores {stored}, i.e. zero point {zero} \
                         under checkpoint_format \"gptq\" (stored = zero - 1), which {bits} bits cannot hold; \
                         re-save the checkpoint as \"gptq_v2\"",
                        c * pf + s
                    );
                }
                zeros_gn[g * n + c * pf + s] = zero as u8;
            }
        }
    }
    let t = QuantizedTensor {
        bits: scheme.bits,
        group_size,
        n,
        k,
        q,
        zeros: transpose(&zeros_gn, groups, n).into_iter().map(f32::from).collect(),
        scales: transpose(&floats(&sc), groups, n),
    };
    Ok((t, perm))
}

fn awq(
    st: &dyn TensorLookup,
    prefix: &str,
    scheme: &QuantScheme,
    n: usize,
    k: usize,
    group_size: usize,
) -> Result<QuantizedTensor> {
    ensure!(scheme.bits == 4, "`{prefix}`: AWQ GEMM stores 4-bit weights only");
    ensure!(
        n.is_multiple_of(8),
        "`{prefix}`: AWQ packs 8 output features per int32; the layer has {n}"
    );
    let groups = k / group_size;
    let qw = required(
        st,
        prefix,
        "qweight",
        &[Dtype::I32],
        &[k, n / 8],
        "AWQ GEMM: [k, n / 8], packed along n",
    )?;
    let qz = required(
        st,
        prefix,
        "qzeros",
        &[Dtype::I32],
        &[groups, n / 8],
        "AWQ GEMM: [groups, n / 8], packed along n",
    )?;
    let sc = required(st, prefix, "scales", FLOATS, &[groups, n], "AWQ GEMM: [groups, n]")?;
    let unpack = |w: u32, o: usize| ((w >> (4 * AWQ_NIBBLE[o])) & 0xf) as u8;
    let qwv = words(&qw);
    let mut q = vec![0u8; n * k];
    for j in 0..k {
        for c in 0..n / 8 {
            let w = qwv[j * (n / 8) + c];
            for o in 0..8 {
                q[(c * 8 + o) * k + j] = unpack(w, o);
            }
        }
    }
    let qzv = words(&qz);
    let mut zeros = vec![0u8; n * groups];
    for g in 0..groups {
        for c in 0..n / 8 {
            let w = qzv[g * (n / 8) + c];
            for o in 0..8 {
                zeros[(c * 8 + o) * groups + g] = unpack(w, o);
            }
        }
    }
    Ok(QuantizedTensor {
        bits: 4,
        group_size,
        n,
        k,
        q,
        zeros: zeros.into_iter().map(f32::from).collect(),
        scales: transpose(&floats(&sc), groups, n),
    })
}

/// compressed-tensors `weight_scale`: `[n, groups]` (`[n, 1]` per channel), or one value
/// (`[1]`, `[1, 1]` or `[]`) for `strategy: tensor`, broadcast to every row.
fn ct_scales(st: &dyn TensorLookup, prefix: &str, scheme: &QuantScheme, n: usize, groups: usize) -> Result<Vec<f32>> {
    let name = format!("{prefix}.weight_scale");
    let sc = get(st, &name)?;
    if scheme.granularity == super::Granularity::Tensor {
        let elems: usize = sc.shape.iter().product();
        if elems != 1 || !FLOATS.contains(&sc.dtype) {
            bail!(
                "tensor `{name}` is {:?} {:?}; expected one float value (strategy: tensor)",
                sc.dtype,
                sc.shape
            );
        }
        return Ok(vec![floats(&sc)[0]; n]);
    }
    check(&sc, &name, FLOATS, &[n, groups], "compressed-tensors: [n, groups]")?;
    Ok(floats(&sc))
}

fn ct_packed(
    st: &dyn TensorLookup,
    prefix: &str,
    scheme: &QuantScheme,
    n: usize,
    k: usize,
    group_size: usize,
) -> Result<QuantizedTensor> {
    let bits = scheme.bits as usize;
    let pf = 32 / bits;
    let mask = (1u32 << bits) - 1;
    let groups = k / group_size;
    let offset = 1u8 << (bits - 1);
    ensure!(
        k.is_multiple_of(pf),
        "`{prefix}`: pack-quantized {bits}-bit packs {pf} input features per int32; the layer has {k}"
    );
    let shape_name = format!("{prefix}.weight_shape");
    if let Some(ws) = st.raw(&shape_name) {
        check(
            &ws,
            &shape_name,
            &[Dtype::I32, Dtype::I64],
            &[2],
            "compressed-tensors: [2]",
        )?;
        let v = ints(&ws);
        if v != [n as i64, k as i64] {
            bail!("tensor `{shape_name}` = {v:?}, but config.json gives this layer shape [{n}, {k}]");
        }
    }
    let wp = required(
        st,
        prefix,
        "weight_packed",
        &[Dtype::I32],
        &[n, k / pf],
        "pack-quantized: [n, k / (32/bits)], packed along k",
    )?;
    let wv = words(&wp);
    let mut q = vec![0u8; n * k];
    for (c, &w) in wv.iter().enumerate() {
        for s in 0..pf {
            q[c * pf + s] = ((w >> (bits * s)) & mask) as u8;
        }
    }
    let scales = ct_scales(st, prefix, scheme, n, groups)?;
    let tensor = scheme.granularity == super::Granularity::Tensor;
    let zp_name = format!("{prefix}.weight_zero_point");
    let zeros: Vec<u8> = match st.raw(&zp_name) {
        None if scheme.symmetric => vec![offset; n * groups],
        None => bail!("quantized checkpoint has no tensor `{zp_name}` (asymmetric quantization needs zero points)"),
        Some(zp) if tensor => {
            let elems: usize = zp.shape.iter().product();
            if elems != 1 || !matches!(zp.dtype, Dtype::I8 | Dtype::I32) {
                bail!(
                    "tensor `{zp_name}` is {:?} {:?}; expected one integer (strategy: tensor)",
                    zp.dtype,
                    zp.shape
                );
            }
            signed_to_unsigned(&vec![ints(&zp)[0]; n], bits, &zp_name)?
        }
        Some(zp) if zp.dtype == Dtype::I32 => {
            // Packed along n (packed_dim=0): output o in word (o / pf, g), lane o % pf.
            let rows = n.div_ceil(pf);
            check(
                &zp,
                &zp_name,
                &[Dtype::I32],
                &[rows, groups],
                "pack-quantized: [n / (32/bits), groups], packed along n",
            )?;
            let zv = words(&zp);
            let mut z = vec![0u8; n * groups];
            for o in 0..n {
                for g in 0..groups {
                    z[o * groups + g] = ((zv[(o / pf) * groups + g] >> (bits * (o % pf))) & mask) as u8;
                }
            }
            z
        }
        Some(zp) => {
            check(
                &zp,
                &zp_name,
                &[Dtype::I8],
                &[n, groups],
                "compressed-tensors: i8 [n, groups]",
            )?;
            signed_to_unsigned(&ints(&zp), bits, &zp_name)?
        }
    };
    Ok(QuantizedTensor {
        bits: scheme.bits,
        group_size,
        n,
        k,
        q,
        zeros: zeros.into_iter().map(f32::from).collect(),
        scales,
    })
}

fn signed_to_unsigned(v: &[i64], bits: usize, name: &str) -> Result<Vec<u8>> {
    let half = 1i64 << (bits - 1);
    v.iter()
        .enumerate()
        .map(|(p, &x)| {
            if x < -half || x >= half {
                bail!("tensor `{name}`: value {x} at {p} is out of the signed {bits}-bit range");
            }
            Ok((x + half) as u8)
        })
        .collect()
}

fn ct_int(
    st: &dyn TensorLookup,
    prefix: &str,
    scheme: &QuantScheme,
    n: usize,
    k: usize,
    group_size: usize,
) -> Result<QuantizedTensor> {
    let bits = scheme.bits as usize;
    let groups = k / group_size;
    let w = required(
        st,
        prefix,
        "weight",
        &[Dtype::I8],
        &[n, k],
        "int-quantized: signed codes [n, k]",
    )?;
    let q = signed_to_unsigned(&ints(&w), bits, &format!("{prefix}.weight"))?;
    let scales = ct_scales(st, prefix, scheme, n, groups)?;
    let tensor = scheme.granularity == super::Granularity::Tensor;
    let zp_name = format!("{prefix}.weight_zero_point");
    let zeros = match st.raw(&zp_name) {
        None if scheme.symmetric => vec![1u8 << (bits - 1); n * groups],
        None => bail!("quantized checkpoint has no tensor `{zp_name}` (asymmetric quantization needs zero points)"),
        Some(zp) => {
            let v = if tensor {
                let elems: usize = zp.shape.iter().product();
                if elems != 1 || !matches!(zp.dtype, Dtype::I8 | Dtype::I32) {
                    bail!(
                        "tensor `{zp_name}` is {:?} {:?}; expected one integer (strategy: tensor)",
                        zp.dtype,
                        zp.shape
                    );
                }
                vec![ints(&zp)[0]; n]
            } else {
                check(
                    &zp,
                    &zp_name,
                    &[Dtype::I8, Dtype::I32],
                    &[n, groups],
                    "compressed-tensors: [n, groups]",
                )?;
                ints(&zp)
            };
            signed_to_unsigned(&v, bits, &zp_name)?
        }
    };
    Ok(QuantizedTensor {
        bits: scheme.bits,
        group_size,
        n,
        k,
        q,
        zeros: zeros.into_iter().map(f32::from).collect(),
        scales,
    })
}
