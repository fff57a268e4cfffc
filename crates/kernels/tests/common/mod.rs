//! Checks shared by the kernels' test files.

use sirocco_kernels::{matmul_to_vec, Input, PackedMatrix};

/// Each of the `m` rows of `x` (`[m, k]`) gives the same bits multiplied in the
/// batch as alone: decode tiles must not make a row's result depend on its batch.
pub fn assert_rows_as_alone(pm: &PackedMatrix, x: &[f32], m: usize, what: &str) {
    let (n, k) = (pm.n(), pm.k());
    let batch = matmul_to_vec(Input::F32(x), m, pm);
    for i in 0..m {
        let alone = matmul_to_vec(Input::F32(&x[i * k..(i + 1) * k]), 1, pm);
        assert!(
            alone
                .iter()
                .zip(&batch[i * n..(i + 1) * n])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: row {i} of {m} differs from the row alone"
        );
    }
}
