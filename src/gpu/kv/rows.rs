//! Runs of tokens' K or V in device memory (`Rows`, a K/V `Pair`), their byte shapes, and the paged bodies of
//! the fixed-width caches.

use super::{gpu_err, DeviceStore, Layer, PAGE_TOKENS};
use crate::gpu::cuda::{DstArg, Gpu, SegArg};
use crate::gpu::GpuError;
use crate::kvcache::quant::{Bits, PackedRows, ShiftMode};
use crate::kvcache::KvError;
use cudarc::driver::CudaSlice;
use half::f16;

/// One run of tokens' K or V on the device: `cap` token slots, `len` filled. bits 0 = raw f16 rows.
pub(super) struct Rows {
    pub(super) bits: u32,
    pub(super) len: usize,
    pub(super) cap: usize,
    pub(super) data: CudaSlice<u8>,
    pub(super) scale: Option<CudaSlice<u16>>,
    pub(super) off: Option<CudaSlice<u16>>,
}

/// K and V of the same tokens.
pub(super) struct Pair {
    pub(super) k: Rows,
    pub(super) v: Rows,
}

/// Shape of a token row: groups per token, elements per group, values per token.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) gpt: usize,
    pub(super) g: usize,
    pub(super) kv_dim: usize,
}

impl Shape {
    pub(super) fn data_bytes(&self, bits: u32) -> usize {
        if bits == 0 {
            self.kv_dim * 2
        } else {
            self.gpt * self.g * bits as usize / 8
        }
    }
    /// Device bytes one token slot takes in one side (codes plus f16 scale and offset per group).
    pub(super) fn token_bytes(&self, bits: u32) -> usize {
        self.data_bytes(bits) + if bits == 0 { 0 } else { 4 * self.gpt }
    }
}

impl Rows {
    pub(super) fn alloc(gpu: &Gpu, s: Shape, bits: u32, cap: usize) -> Result<Rows, GpuError> {
        let n = cap.max(1);
        let params = |gpu: &Gpu| -> Result<Option<CudaSlice<u16>>, GpuError> {
            if bits == 0 {
                Ok(None)
            } else {
                gpu.alloc::<u16>(n * s.gpt).map(Some)
            }
        };
        Ok(Rows {
            bits,
            len: 0,
            cap,
            data: gpu.alloc::<u8>(n * s.data_bytes(bits))?,
            scale: params(gpu)?,
            off: params(gpu)?,
        })
    }
    pub(super) fn bytes(&self, s: Shape) -> usize {
        self.cap * s.token_bytes(self.bits)
    }
    /// Device addresses of slot `pos`: (data, scale, offset).
    pub(super) fn slot(&self, gpu: &Gpu, s: Shape, pos: usize) -> (u64, u64, u64) {
        let d = gpu.ptr(&self.data) + (pos * s.data_bytes(self.bits)) as u64;
        let p = |b: &Option<CudaSlice<u16>>| b.as_ref().map_or(0, |b| gpu.ptr(b) + (pos * s.gpt * 2) as u64);
        (d, p(&self.scale), p(&self.off))
    }
    /// Copy the first `n` tokens of `self` into `dst` at slot 0 (same width).
    pub(super) fn copy_into(&self, gpu: &Gpu, s: Shape, n: usize, dst: &mut Rows) -> Result<(), GpuError> {
        if n == 0 {
            return Ok(());
        }
        gpu.dtod(&self.data, &mut dst.data, n * s.data_bytes(self.bits))?;
        if let (Some(a), Some(b)) = (&self.scale, &mut dst.scale) {
            gpu.dtod(a, b, n * s.gpt)?;
        }
        if let (Some(a), Some(b)) = (&self.off, &mut dst.off) {
            gpu.dtod(a, b, n * s.gpt)?;
        }
        Ok(())
    }
    /// Lower one level (ERS or the configured shift) into a new, exactly sized run.
    pub(super) fn shrink(&mut self, gpu: &Gpu, s: Shape, mode: ShiftMode) -> Result<(), GpuError> {
        let lower = self.bits / 2;
        let mut out = Rows::alloc(gpu, s, lower, self.len)?;
        out.len = self.len;
        out.scale = self.scale.take();
        out.off = self.off.take();
        gpu.shrink_groups(
            &self.data,
            self.len * s.gpt,
            s.g,
            self.bits,
            mode,
            &mut out.data,
            out.scale.as_mut().expect("packed rows have scales"),
            out.off.as_mut().expect("packed rows have offsets"),
        )?;
        // the parameters were taken over; the scale/offset buffers have `cap` slots, more than `len` may need
        out.cap = self.len;
        *self = out;
        Ok(())
    }
    /// The first `len` tokens as host rows (the CPU store's representation).
    pub(super) fn download(&self, gpu: &Gpu, s: Shape, heads: usize, head_dim: usize) -> Result<PackedRows, GpuError> {
        let bits = Bits::from_count(self.bits).ok_or_else(|| GpuError::Shape("raw f16 rows".into()))?;
        let mut r = PackedRows::new(bits, s.g, heads, head_dim, crate::kvcache::quant::OffsetMode::Stored);
        let halves = |b: &Option<CudaSlice<u16>>| -> Result<Vec<f16>, GpuError> {
            let v = gpu.dtoh(b.as_ref().expect("packed"), self.len * s.gpt)?;
            Ok(v.into_iter().map(f16::from_bits).collect())
        };
        r.data = gpu.dtoh(&self.data, self.len * s.data_bytes(self.bits))?;
        r.scale = halves(&self.scale)?;
        r.offset = halves(&self.off)?;
        Ok(r)
    }
    pub(super) fn upload(gpu: &Gpu, s: Shape, rows: &PackedRows, cap: usize) -> Result<Rows, GpuError> {
        let mut out = Rows::alloc(gpu, s, rows.bits.count(), cap.max(rows.len()))?;
        out.len = rows.len();
        if out.len > 0 {
            gpu.htod(&rows.data, &mut out.data)?;
            let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<u16>>();
            gpu.htod(&bits(&rows.scale), out.scale.as_mut().expect("packed"))?;
            gpu.htod(&bits(&rows.offset), out.off.as_mut().expect("packed"))?;
        }
        Ok(out)
    }
}

impl Pair {
    pub(super) fn alloc(gpu: &Gpu, s: Shape, bits: u32, cap: usize) -> Result<Pair, GpuError> {
        Ok(Pair {
            k: Rows::alloc(gpu, s, bits, cap)?,
            v: Rows::alloc(gpu, s, bits, cap)?,
        })
    }
    pub(super) fn bytes(&self, s: Shape) -> usize {
        self.k.bytes(s) + self.v.bytes(s)
    }
    pub(super) fn seg(&self, gpu: &Gpu, s: Shape, len: usize) -> SegArg {
        let (kd, ks, ko) = self.k.slot(gpu, s, 0);
        let (vd, vs, vo) = self.v.slot(gpu, s, 0);
        SegArg {
            k_data: kd,
            k_scale: ks,
            k_off: ko,
            v_data: vd,
            v_scale: vs,
            v_off: vo,
            len: len as i32,
            bits: self.k.bits as i32,
            // set by `prepare`, which knows the segments before this one
            start: 0,
            pad: 0,
        }
    }
    pub(super) fn dst(&self, gpu: &Gpu, s: Shape, pos: usize, kinv: u64) -> DstArg {
        let (kd, ks, ko) = self.k.slot(gpu, s, pos);
        let (vd, vs, vo) = self.v.slot(gpu, s, pos);
        DstArg {
            k_data: kd,
            k_scale: ks,
            k_off: ko,
            v_data: vd,
            v_scale: vs,
            v_off: vo,
            kinv,
            bits: self.k.bits as i32,
            g: s.g as i32,
        }
    }
}

/// Slots for `n` tokens at the end of a paged body (fp16, rtn), allocating pages of [`PAGE_TOKENS`] as needed.
pub(super) fn paged_slots(
    l: &mut Layer,
    gpu: &Gpu,
    s: Shape,
    bits: u32,
    n: usize,
    kinv: u64,
    dsts: &mut Vec<DstArg>,
) -> Result<(), GpuError> {
    let mut left = n;
    let mut fill = l.body.last().map_or(0, |p| p.k.len);
    while left > 0 {
        let room = l.body.last().map_or(0, |p| p.k.cap - fill);
        if room == 0 {
            l.body.push(Pair::alloc(gpu, s, bits, PAGE_TOKENS)?);
            fill = 0;
            continue;
        }
        let p = l.body.last().expect("a page");
        let take = room.min(left);
        for i in 0..take {
            dsts.push(p.dst(gpu, s, fill + i, kinv));
        }
        fill += take;
        left -= take;
    }
    Ok(())
}

/// The lengths after `paged_slots` handed out `n` slots and the step filled them (pages fill in order).
pub(super) fn commit_pages(l: &mut Layer, n: usize) {
    let mut left = n;
    for p in l.body.iter_mut() {
        let take = (p.k.cap - p.k.len).min(left);
        p.k.len += take;
        p.v.len += take;
        left -= take;
    }
    l.body_len += n;
}

impl DeviceStore {
    /// The host-side copy of layer `li` in the CPU store's segments: (sink, body, window) of K and of V.
    pub(super) fn download_layer(&self, li: usize) -> Result<[[PackedRows; 3]; 2], KvError> {
        let (gpu, s, g) = (&self.gpu, self.shape, self.geom);
        let l = &self.layers[li];
        let empty = |bits: u32| {
            PackedRows::new(
                Bits::from_count(bits.max(2)).unwrap_or(Bits::B16),
                s.g,
                g.kv_heads,
                g.head_dim,
                crate::kvcache::quant::OffsetMode::Stored,
            )
        };
        let mut out: [[PackedRows; 3]; 2] = [
            [empty(16), empty(l.bits), empty(16)],
            [empty(16), empty(l.bits), empty(16)],
        ];
        let dl = |r: &Rows| r.download(gpu, s, g.kv_heads, g.head_dim).map_err(gpu_err);
        if let Some(p) = &l.sink {
            out[0][0] = dl(&p.k)?;
            out[1][0] = dl(&p.v)?;
        }
        for p in &l.body {
            out[0][1].append(&mut dl(&p.k)?);
            out[1][1].append(&mut dl(&p.v)?);
        }
        if let Some(p) = &l.window {
            out[0][2] = dl(&p.k)?;
            out[1][2] = dl(&p.v)?;
        }
        Ok(out)
    }
}
