//! The launch helpers of the forward pass: one method per kernel of `kernels/forward.cu` the step enqueues, each
//! passing that kernel's argument list in order.

use super::weights::{DevLinear, DevProj};
use super::{cfg1, Act, ArgRef, GpuModel};
use crate::gpu::cuda::{drv, OutArg};
use crate::gpu::GpuError;
use crate::model::RopeLayout;
use cudarc::driver::{CudaSlice, LaunchConfig};

/// Tokens per matmul tile (`PK_TT`).
pub const TOKEN_TILE: usize = 8;

/// Where a matmul's 8-bit activation blocks come from.
#[derive(Clone, Copy)]
pub(super) enum Source {
    /// Made beforehand (pk_norm, pk_swiglu, pk_quant8) into these buffers.
    Q8(Act),
    /// Made by the matmul itself (`pk_matmul_qa`, one tile of tokens, block weights) from f32 rows: mode 0,
    /// RMSNorm of the residual rows `x` with weight `aux`; mode 1, SwiGLU of gate `x` and up `aux`.
    Own { mode: i32, x: u64, aux: u64 },
}

/// Shared memory `pk_matmul_qa` takes for a tile's blocks of `cols` values: codes, then scales and sums.
fn own_blocks_bytes(cols: usize) -> usize {
    TOKEN_TILE * cols + 2 * TOKEN_TILE * (cols / 32) * 4
}

/// Whether a matmul over `cols` inputs may make its own blocks: within the 48 KiB of shared memory every device
/// gives a block without opting in.
pub(super) fn own_blocks_fit(cols: usize) -> bool {
    own_blocks_bytes(cols) <= 48 * 1024
}

impl GpuModel {
    pub(super) fn launch(
        &self,
        name: &'static str,
        f: &cudarc::driver::CudaFunction,
        cfg: LaunchConfig,
        args: &[&dyn ArgRef],
    ) -> Result<(), GpuError> {
        let mut b = self.gpu.stream().launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: every caller passes the argument list of the named kernel in forward.cu, in order and with its
        // C types (pointers as u64 device addresses of live buffers sized for the launch's rows); grids are sized
        // so each kernel's own bounds checks cover the tail.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        self.mark(name)
    }

    pub(super) fn norm(&self, x: u64, w: &CudaSlice<f32>, rows: usize, dim: usize, out: Act) -> Result<(), GpuError> {
        let (d, eps, wp) = (dim as i32, self.cfg.rms_eps, self.gpu.ptr(w));
        self.launch(
            "norm",
            &self.gpu.fwd.norm,
            cfg1((rows as u32, 1, 1), 256),
            &[&x, &wp, &d, &eps, &out.f, &out.qs, &out.qd, &out.qsum],
        )
    }

    /// `lin` times the step's activations into `out`'s parts.
    pub(super) fn matmul(&self, lin: &DevLinear, input: Source, t: usize, out: OutArg) -> Result<(), GpuError> {
        let (rows, cols, ti) = (lin.rows as i32, lin.cols as i32, t as i32);
        let w = self.gpu.ptr(&lin.w);
        let bias = lin.bias.as_ref().map_or(0u64, |b| self.gpu.ptr(b));
        let grid = (lin.rows.div_ceil(4) as u32, t.div_ceil(TOKEN_TILE) as u32, 1);
        let input = match input {
            Source::Q8(a) => a,
            Source::Own { mode, x, aux } => {
                debug_assert!(lin.fmt >= 2 && t <= TOKEN_TILE && own_blocks_fit(lin.cols));
                let eps = self.cfg.rms_eps;
                let cfg = LaunchConfig {
                    shared_mem_bytes: own_blocks_bytes(lin.cols) as u32,
                    ..cfg1(grid, 128)
                };
                return self.launch(
                    "matmul+blocks",
                    &self.gpu.fwd.matmul_qa,
                    cfg,
                    &[&w, &lin.fmt, &rows, &cols, &ti, &bias, &out, &mode, &x, &aux, &eps],
                );
            }
        };
        if lin.fmt >= 2 {
            self.launch(
                "matmul",
                &self.gpu.fwd.matmul_q,
                cfg1(grid, 128),
                &[
                    &w,
                    &lin.fmt,
                    &rows,
                    &cols,
                    &input.qs,
                    &input.qd,
                    &input.qsum,
                    &ti,
                    &bias,
                    &out,
                ],
            )
        } else {
            self.launch(
                "matmul",
                &self.gpu.fwd.matmul_f,
                cfg1(grid, 128),
                &[&w, &lin.fmt, &rows, &cols, &input.f, &ti, &bias, &out],
            )
        }
    }

    pub(super) fn project(
        &self,
        p: &DevProj,
        input: Source,
        t: usize,
        bufs: &[(u64, usize)],
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let out = |parts: &[(u64, usize)]| {
            let mut o = OutArg {
                parts: parts.len() as i32,
                accumulate: accumulate as i32,
                ..OutArg::default()
            };
            let mut start = 0i32;
            for (i, &(ptr, w)) in parts.iter().enumerate() {
                o.ptr[i] = ptr;
                o.ld[i] = w as i32;
                o.start[i] = start;
                start += w as i32;
            }
            o.start[parts.len()] = start;
            o
        };
        match p {
            DevProj::Fused(l) => self.matmul(l, input, t, out(bufs)),
            DevProj::Split(parts) => {
                for (l, b) in parts.iter().zip(bufs) {
                    self.matmul(l, input, t, out(std::slice::from_ref(b)))?;
                }
                Ok(())
            }
        }
    }

    pub(super) fn quant8(&self, x: u64, values: usize, out: Act) -> Result<(), GpuError> {
        let nb = values / 32;
        let n = nb as i32;
        self.launch(
            "quant8",
            &self.gpu.fwd.quant8,
            cfg1((nb.div_ceil(8) as u32, 1, 1), 256),
            &[&x, &n, &out.qs, &out.qd, &out.qsum],
        )
    }

    /// `pk_qkv_post` over the step's rows: RoPE on q and k, then for rows of rotated sequences (`seqs` = [the
    /// layer's pk_seq table or 0 when none rotates, row_seq]) the key scales and the rotation, then each row's K and
    /// V into its slot (`dsts`: the layer's pk_dst per row; `g_min`: the batch's smallest group). One launch.
    pub(super) fn qkv_post(
        &self,
        [q, k, v]: [u64; 3],
        t: usize,
        [cos, sin]: [u64; 2],
        [seqs, row_seq]: [u64; 2],
        dsts: u64,
        g_min: usize,
    ) -> Result<(), GpuError> {
        let c = &self.cfg;
        let (qh, kvh, di) = (c.heads as i32, c.kv_heads as i32, c.head_dim as i32);
        let neox = matches!(c.rope.layout, RopeLayout::Neox) as i32;
        let (block, scale) = self.rotation();
        let gm = g_min as i32;
        self.launch(
            "qkv_post",
            &self.gpu.fwd.qkv_post,
            cfg1((t as u32, 1, 1), 128),
            &[
                &q, &k, &v, &qh, &kvh, &di, &cos, &sin, &neox, &seqs, &row_seq, &block, &scale, &dsts, &gm,
            ],
        )
    }

    /// RoPE on the step's q and k rows (the unfused plan; `qkv_post` does it otherwise).
    pub(super) fn rope(&self, q: u64, k: u64, t: usize, cos: u64, sin: u64) -> Result<(), GpuError> {
        let c = &self.cfg;
        let (qh, kvh, di) = (c.heads as i32, c.kv_heads as i32, c.head_dim as i32);
        let neox = matches!(c.rope.layout, RopeLayout::Neox) as i32;
        self.launch(
            "rope",
            &self.gpu.fwd.rope,
            cfg1((t as u32, 1, 1), 128),
            &[&q, &k, &qh, &kvh, &di, &cos, &sin, &neox],
        )
    }

    /// `pk_rotate` over the step's rows (`x`: q, k, v, or the attention output alone for the inverse); rows of
    /// sequences whose cache does not rotate are left alone (the unfused plan).
    pub(super) fn rotate(&self, seqp: u64, row_seq: u64, x: [u64; 3], t: usize, inverse: bool) -> Result<(), GpuError> {
        let c = &self.cfg;
        let (bl, scale) = self.rotation();
        let (qh, kvh, di, inv) = (c.heads as i32, c.kv_heads as i32, c.head_dim as i32, inverse as i32);
        self.launch(
            if inverse { "unrotate" } else { "rotate" },
            &self.gpu.fwd.rotate,
            cfg1((t as u32, 1, 1), 32),
            &[&seqp, &row_seq, &x[0], &x[1], &x[2], &qh, &kvh, &di, &bl, &scale, &inv],
        )
    }

    /// The rotation's Walsh–Hadamard block and 1/√block for this model's heads (block 1 where none applies).
    pub(super) fn rotation(&self) -> (i32, f32) {
        let block = crate::kvcache::rotate::rotation_block(self.cfg.head_dim).unwrap_or(1);
        (block as i32, crate::kvcache::rotate::rotation_scale(block))
    }
}
