//! What the CPU kernels share: reading and updating a tensor's f32 values in place, and
//! splitting work across candle's barrier pool, the threads its own element-wise kernels
//! run on, so that [`super::gemm`]'s products and [`super::fused`]'s kernels run on the
//! same threads, one per core.

use std::ops::Range;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Layout, Tensor};

/// Blocks start at multiples of this many rows or columns (the kernels' register tiles
/// divide it).
pub(crate) const ALIGN: usize = 16;

/// Whether the kernels here can take `t`: f32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Threads a product is split across: candle's barrier pool and the calling thread.
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f(thread, range)` for `threads()` contiguous ranges covering `0..n`, each start a
/// multiple of `align`, on candle's barrier pool (the calling thread takes the last range).
/// The split depends only on `n`, `align` and the thread count.
pub(crate) fn for_each_range(n: usize, align: usize, f: impl Fn(usize, Range<usize>) + Sync) {
    let t = threads();
    let chunk = n.div_ceil(t).next_multiple_of(align.max(1)).max(1);
    let range = |tid: usize| (tid * chunk).min(n)..((tid + 1) * chunk).min(n);
    if t == 1 || n <= chunk {
        f(0, 0..n);
        return;
    }
    candle_core::utils::barrier_pool().execute(|tid| {
        let r = range(tid);
        if !r.is_empty() {
            f(tid, r);
        }
    });
}

/// A pointer that may cross to the pool's threads; each writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: the threads given a `SharedMut` write disjoint blocks of the buffer it points
// into, and the caller waits for all of them before the buffer is used again.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer `offset` values on (a method, so that closures capture the whole
    /// `SharedMut` rather than its raw pointer).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Outputs smaller than this many values are filled on the calling thread alone.
const PARALLEL_VALUES: usize = 16384;

/// Splits two equally long outputs, rows of `width` values, into one block of whole rows
/// per thread and runs `f(thread, first row, block of out1, block of out2)` on each (on
/// the calling thread alone for small outputs). A kernel with one output passes an empty
/// second one.
pub(crate) fn for_each_row_block(
    out1: &mut [f32],
    out2: &mut [f32],
    width: usize,
    f: impl Fn(usize, usize, &mut [f32], &mut [f32]) + Sync,
) {
    let width = width.max(1);
    let rows = out1.len() / width;
    assert!(out2.is_empty() || out2.len() == out1.len());
    if out1.len() < PARALLEL_VALUES {
        f(0, 0, out1, out2);
        return;
    }
    let (p1, p2, two) = (
        SharedMut(out1.as_mut_ptr()),
        SharedMut(out2.as_mut_ptr()),
        !out2.is_empty(),
    );
    for_each_range(rows, 1, |tid, r| {
        let (at, len) = (r.start * width, r.len() * width);
        // SAFETY: the ranges of rows are disjoint and inside both outputs, which outlive
        // this call; `for_each_range` returns only when every block is done.
        let (b1, b2) = unsafe {
            (
                std::slice::from_raw_parts_mut(p1.at(at), len),
                if two {
                    std::slice::from_raw_parts_mut(p2.at(at), len)
                } else {
                    &mut []
                },
            )
        };
        f(tid, r.start, b1, b2);
    });
}

/// Splits equally long outputs and an input (empty, or as long) into one contiguous block
/// per thread (all on the calling thread when they are small) and runs
/// `f(blocks of the outputs, block of the input)` on each: element-wise updates of large
/// vectors. Each value is computed the same whatever the split.
pub(crate) fn for_each_block<const M: usize>(
    outs: [&mut [f32]; M],
    input: &[f32],
    f: impl Fn([&mut [f32]; M], &[f32]) + Sync,
) {
    let n = outs.first().map_or(input.len(), |o| o.len());
    assert!(outs.iter().all(|o| o.len() == n) && (input.is_empty() || input.len() == n));
    if n < PARALLEL_VALUES {
        f(outs, input);
        return;
    }
    let ptrs = outs.map(|o| SharedMut(o.as_mut_ptr()));
    for_each_range(n, ALIGN, |_, r| {
        // SAFETY: the ranges are disjoint and inside every output, which outlive this
        // call; `for_each_range` returns only when every block is done.
        let blocks =
            ptrs.map(|p| unsafe { std::slice::from_raw_parts_mut(p.at(r.start), r.len()) });
        f(blocks, if input.is_empty() { input } else { &input[r] });
    });
}

/// The contiguous f32 values of a CPU tensor, read in place.
pub(crate) fn with_values<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("fused kernels run on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// Runs `f(dst, src)` on the contiguous f32 values of `dst`, written in place, and of `src`
/// (`None`: an empty slice), when they are contiguous f32 tensors on the CPU, `src` as many
/// values as `dst` and in other memory; returns `Ok(false)` without calling `f` otherwise,
/// so the caller takes its general path. Tensors sharing `dst`'s memory see the change.
pub(crate) fn update_in_place(
    dst: &Tensor,
    src: Option<&Tensor>,
    f: impl FnOnce(&mut [f32], &[f32]) + Send,
) -> candle_core::Result<bool> {
    let fits = |t: &Tensor| applies(t) && t.is_contiguous();
    if !fits(dst) || src.is_some_and(|s| !fits(s) || s.elem_count() != dst.elem_count()) {
        return Ok(false);
    }
    let op = InPlace(Mutex::new(Some(f)));
    match src {
        Some(src) => dst.inplace_op2(src, &op)?,
        None => dst.inplace_op1(&op)?,
    }
    Ok(true)
}

/// The in-place op behind [`update_in_place`]; `f` runs once.
struct InPlace<F>(Mutex<Option<F>>);

impl<F: FnOnce(&mut [f32], &[f32])> InPlace<F> {
    fn run(&self, dst: &mut CpuStorage, dl: &Layout, src: &[f32]) -> candle_core::Result<()> {
        let CpuStorage::F32(values) = dst else {
            candle_core::bail!("in-place update of a non-f32 tensor");
        };
        let (start, end) = dl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("in-place update of a strided tensor".into()))?;
        let f = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("in-place update poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("in-place update applied twice".into()))?;
        f(&mut values[start..end], src);
        Ok(())
    }
}

impl<F: FnOnce(&mut [f32], &[f32])> candle_core::InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "update-in-place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        self.run(s, l, &[])
    }
}

impl<F: FnOnce(&mut [f32], &[f32])> candle_core::InplaceOp2 for InPlace<F> {
    fn name(&self) -> &'static str {
        "update-in-place"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        self.run(s1, l1, input(s2, l2)?)
    }
}

/// The contiguous f32 values of a kernel's input.
pub(crate) fn input<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernels take contiguous inputs".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers the kernels' tests share.
    use candle_core::{Device, Tensor};

    use crate::kernels::ops::{fnv1a, mix, normal_values};

    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        // The values `Weights::random` gives a tensor named "x".
        let seed = mix(seed, fnv1a(b"x"));
        Tensor::from_vec(normal_values(seed, n, 1.0), shape, &Device::Cpu).unwrap()
    }

    /// The gradients of `Σ y ⊙ probe`: a vector-Jacobian product of whatever made `y`.
    pub(crate) fn probed(y: &Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
        (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
