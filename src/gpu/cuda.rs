//! The real GPU backend (feature `cuda-kernels`): cudarc with dynamic loading (no CUDA toolkit at build time),
//! kernels compiled at run time by NVRTC to cubin for the device's own architecture (PTX from a newer NVRTC
//! would not load on an older driver, e.g. JetPack 6's).

use super::shapes::{check_attention, check_quantize, check_shrink, SegmentShape};
use super::{kernel_source, GpuError, LayerSegments};
use crate::kvcache::quant::{Bits, PackedRows, ShiftMode};
use crate::kvcache::KvGeometry;
use crate::memory::{DeviceMemory, DeviceSample};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::f16;
use std::ffi::CString;
use std::sync::Arc;

pub(crate) fn drv(e: cudarc::driver::DriverError) -> GpuError {
    GpuError::Driver(e.to_string())
}

pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: String,
    quantize: CudaFunction,
    shrink: CudaFunction,
    attn: CudaFunction,
    combine: CudaFunction,
    pub(crate) fwd: Fwd,
}

/// The forward-pass kernels of `kernels/forward.cu`.
pub(crate) struct Fwd {
    pub embed: CudaFunction,
    pub quant8: CudaFunction,
    pub norm: CudaFunction,
    pub matmul_q: CudaFunction,
    pub matmul_qa: CudaFunction,
    pub matmul_f: CudaFunction,
    pub rope: CudaFunction,
    pub swiglu: CudaFunction,
    pub gather: CudaFunction,
    pub attention: CudaFunction,
    pub attn_combine: CudaFunction,
    pub kv_store: CudaFunction,
    pub qkv_post: CudaFunction,
    pub rotate: CudaFunction,
}

/// Mirror of `pk_seg` (kernels/forward.cu): one stored segment of one layer of one sequence.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SegArg {
    pub k_data: u64,
    pub k_scale: u64,
    pub k_off: u64,
    pub v_data: u64,
    pub v_scale: u64,
    pub v_off: u64,
    pub len: i32,
    pub bits: i32,
    /// Tokens in the sequence's earlier segments of this layer (`attention` bisects on it).
    pub start: i32,
    pub pad: i32,
}

/// Mirror of `pk_seq`: one sequence in one layer.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SeqArg {
    pub seg_start: i32,
    pub seg_count: i32,
    pub stored: i32,
    /// The cache's quantization group.
    pub g: i32,
    pub qscale: u64,
    pub kinv: u64,
    /// The layer's rotation signs (0: not rotated; `pk_rotate` then leaves the sequence's rows alone).
    pub signs: u64,
}

/// Mirror of `pk_dst`: where one new token's K and V go in one layer.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct DstArg {
    pub k_data: u64,
    pub k_scale: u64,
    pub k_off: u64,
    pub v_data: u64,
    pub v_scale: u64,
    pub v_off: u64,
    pub kinv: u64,
    pub bits: i32,
    /// The cache's quantization group.
    pub g: i32,
}

/// Mirror of `pk_out`: where a matmul's output rows go.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct OutArg {
    pub ptr: [u64; 3],
    pub ld: [i32; 3],
    pub start: [i32; 4],
    pub parts: i32,
    pub accumulate: i32,
}

// SAFETY: plain `#[repr(C)]` integers with the exact layout of the CUDA structs they mirror (checked against the
// kernel source compiled on the host by tests/cuda_warps.rs); copied by value into parameter buffers or device
// arrays.
unsafe impl DeviceRepr for SegArg {}
// SAFETY: as above.
unsafe impl DeviceRepr for SeqArg {}
// SAFETY: as above.
unsafe impl DeviceRepr for DstArg {}
// SAFETY: as above.
unsafe impl DeviceRepr for OutArg {}

/// Mirror of `pmkvq_segment` (kernels/kv_attention.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SegmentArg {
    data: u64,
    scale: u64,
    offset: u64,
    len: i32,
    bits: i32,
}

/// Mirror of `pmkvq_layer_view`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ViewArg {
    k: [SegmentArg; 3],
    v: [SegmentArg; 3],
    k_cur: u64,
    v_cur: u64,
}

// SAFETY: plain `#[repr(C)]` data (integers and device addresses) with the exact layout of the CUDA struct it
// mirrors; it is copied by value into the kernel's parameter buffer.
unsafe impl DeviceRepr for ViewArg {}

/// Compile one kernel file to cubin for `arch` with NVRTC.
fn compile_cubin(name: &str, arch: &str) -> Result<Vec<u8>, GpuError> {
    use cudarc::nvrtc::{result, sys};
    let src = kernel_source(name).ok_or_else(|| GpuError::Shape(format!("no kernel {name}")))?;
    let err = |log: String| GpuError::Compile {
        kernel: name.to_string(),
        arch: arch.to_string(),
        log,
    };
    let src = CString::new(src).map_err(|e| err(e.to_string()))?;
    let prog = result::create_program(&src, None).map_err(|e| err(e.to_string()))?;
    let opts = [format!("--gpu-architecture={arch}"), "-default-device".to_string()];
    // SAFETY: `prog` is a live program created above; it is destroyed exactly once, at the end of this function.
    let out = unsafe {
        match result::compile_program(prog, &opts) {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| String::from_utf8_lossy(&l.iter().map(|&c| c as u8).collect::<Vec<_>>()).into_owned())
                    .unwrap_or_default();
                Err(err(format!("{e}: {log}")))
            }
            Ok(()) => {
                let mut size = 0usize;
                let r = sys::nvrtcGetCUBINSize(prog, &mut size);
                if r != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(err(format!("nvrtcGetCUBINSize: {r:?}")))
                } else {
                    let mut buf = vec![0u8; size];
                    let r = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char);
                    if r != sys::nvrtcResult::NVRTC_SUCCESS {
                        Err(err(format!("nvrtcGetCUBIN: {r:?}")))
                    } else {
                        Ok(buf)
                    }
                }
            }
        }
    };
    // SAFETY: see above; `prog` is not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

impl Gpu {
    /// Open device `ordinal`: probe the libraries, create the context, compile and load every kernel.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: the probes only try to dlopen the libraries (cudarc would panic on first use without them).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        // SAFETY: as above, for NVRTC.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::NoNvrtc);
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().map_err(drv)?;
        // SAFETY: every launch and copy of this crate goes to the one stream below, which orders them; cudarc's
        // per-buffer events only matter across streams.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(drv)?;
        let load = |file: &str, func: &str| -> Result<CudaFunction, GpuError> {
            let cubin = compile_cubin(file, &arch)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(drv)?;
            module.load_function(func).map_err(drv)
        };
        let fwd_module = {
            let cubin = compile_cubin("forward.cu", &arch)?;
            ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)).map_err(drv)?
        };
        let f = |name: &str| fwd_module.load_function(name).map_err(drv);
        let fwd = Fwd {
            embed: f("pk_embed")?,
            quant8: f("pk_quant8")?,
            norm: f("pk_norm")?,
            matmul_q: f("pk_matmul_q")?,
            matmul_qa: f("pk_matmul_qa")?,
            matmul_f: f("pk_matmul_f")?,
            rope: f("pk_rope")?,
            swiglu: f("pk_swiglu")?,
            gather: f("pk_gather")?,
            attention: f("pk_attention")?,
            attn_combine: f("pk_attn_combine")?,
            kv_store: f("pk_kv_store")?,
            qkv_post: f("pk_qkv_post")?,
            rotate: f("pk_rotate")?,
        };
        Ok(Gpu {
            fwd,
            quantize: load("kv_quant.cu", "pmkvq_kv_quantize")?,
            shrink: load("kv_shrink.cu", "pmkvq_kv_shrink")?,
            attn: load("kv_attention.cu", "pmkvq_attn_decode")?,
            combine: load("kv_attention.cu", "pmkvq_attn_combine")?,
            ctx,
            stream,
            name,
            arch,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sm_XY` the kernels were compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// (free, total) device memory: `cuMemGetInfo`.
    pub fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        self.ctx.mem_get_info().map_err(drv)
    }

    fn up<T: DeviceRepr + Copy + Default>(&self, v: &[T]) -> Result<CudaSlice<T>, GpuError> {
        // Zero-length buffers are padded to one element (a zero-size allocation is an error for the driver).
        if v.is_empty() {
            return self.stream.clone_htod(&[T::default()]).map_err(drv);
        }
        self.stream.clone_htod(v).map_err(drv)
    }

    /// Copy packed codes and f16 parameters back into `out`.
    fn download(
        &self,
        out: &mut PackedRows,
        data: &CudaSlice<u8>,
        scale: &CudaSlice<u16>,
        offset: &CudaSlice<u16>,
    ) -> Result<(), GpuError> {
        let halves = |d: &CudaSlice<u16>| -> Result<Vec<f16>, GpuError> {
            Ok(self
                .stream
                .clone_dtoh(d)
                .map_err(drv)?
                .into_iter()
                .map(f16::from_bits)
                .collect())
        };
        out.data = self.stream.clone_dtoh(data).map_err(drv)?;
        out.scale = halves(scale)?;
        out.offset = halves(offset)?;
        Ok(())
    }

    fn halves(v: &[f16]) -> Vec<u16> {
        v.iter().map(|h| h.to_bits()).collect()
    }

    /// Quantize tokens (`x`: whole tokens of `kv_heads·head_dim`) into packed rows on the device.
    pub fn quantize(
        &self,
        x: &[f32],
        kv_heads: usize,
        head_dim: usize,
        g: usize,
        bits: Bits,
    ) -> Result<PackedRows, GpuError> {
        check_quantize(x.len(), kv_heads * head_dim, g)?;
        let groups = x.len() / g;
        let mut out = PackedRows::new(bits, g, kv_heads, head_dim, crate::kvcache::quant::OffsetMode::Stored);
        if groups == 0 {
            return Ok(out);
        }
        let dx = self.up(x)?;
        let mut data = self
            .stream
            .alloc_zeros::<u8>(groups * bits.group_bytes(g))
            .map_err(drv)?;
        let mut scale = self.stream.alloc_zeros::<u16>(groups).map_err(drv)?;
        let mut offset = self.stream.alloc_zeros::<u16>(groups).map_err(drv)?;
        let (n, gi, bi) = (groups as i32, g as i32, bits.count() as i32);
        let cfg = LaunchConfig {
            grid_dim: (groups.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.quantize);
        b.arg(&dx)
            .arg(&n)
            .arg(&gi)
            .arg(&bi)
            .arg(&mut data)
            .arg(&mut scale)
            .arg(&mut offset);
        // SAFETY: the argument list matches pmkvq_kv_quantize's signature; buffers hold `groups` groups as
        // checked above; the kernel guards its index.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        self.download(&mut out, &data, &scale, &offset)?;
        Ok(out)
    }

    /// Lower rows one level on the device.
    pub fn shrink(&self, rows: &PackedRows, mode: ShiftMode) -> Result<PackedRows, GpuError> {
        check_shrink(rows)?;
        let lower = rows.bits.halved().expect("checked: above the floor");
        let groups = rows.scale.len();
        let mut out = rows.empty_like(lower);
        if groups == 0 {
            return Ok(out);
        }
        let din = self.up(&rows.data)?;
        let mut dout = self.stream.alloc_zeros::<u8>(groups * out.group_bytes()).map_err(drv)?;
        let mut scale = self.up(&Self::halves(&rows.scale))?;
        let mut offset = self.up(&Self::halves(&rows.offset))?;
        let (n, gi, bi, m) = (groups as i32, rows.group as i32, rows.bits.count() as i32, mode as i32);
        let cfg = LaunchConfig {
            grid_dim: (groups.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.shrink);
        b.arg(&din)
            .arg(&n)
            .arg(&gi)
            .arg(&bi)
            .arg(&m)
            .arg(&mut dout)
            .arg(&mut scale)
            .arg(&mut offset);
        // SAFETY: arguments match pmkvq_kv_shrink; the input holds `groups` groups at `bits`, the output room for
        // them one level down, the parameters one entry per group (checked above).
        unsafe { b.launch(cfg) }.map_err(drv)?;
        self.download(&mut out, &dout, &scale, &offset)?;
        Ok(out)
    }

    /// Decode attention of one query token over one layer (split-K with `chunk` tokens per split).
    pub fn attention_decode(
        &self,
        g: KvGeometry,
        layer: &LayerSegments<'_>,
        q: &[f32],
        cur: Option<(&[f32], &[f32])>,
        chunk: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let shapes = |s: &[&PackedRows; 3]| [SegmentShape::of(s[0]), SegmentShape::of(s[1]), SegmentShape::of(s[2])];
        check_attention(
            g,
            q.len(),
            cur.map(|(k, v)| (k.len(), v.len())),
            &shapes(&layer.k),
            &shapes(&layer.v),
        )?;
        let chunk = chunk.clamp(32, 1 << 20);
        let mut keep = Vec::new();
        let mut seg = |r: &PackedRows| -> Result<SegmentArg, GpuError> {
            let data = self.up(&r.data)?;
            let scale = self.up(&Self::halves(&r.scale))?;
            let offset = self.up(&Self::halves(&r.offset))?;
            // One stream orders every use: the raw addresses outlive their guards safely.
            let d = data.device_ptr(&self.stream).0;
            let s = scale.device_ptr(&self.stream).0;
            let o = offset.device_ptr(&self.stream).0;
            let arg = SegmentArg {
                data: d,
                scale: s,
                offset: o,
                len: r.len() as i32,
                bits: r.bits.count() as i32,
            };
            keep.push((data, scale, offset));
            Ok(arg)
        };
        let mut view = ViewArg::default();
        for i in 0..3 {
            view.k[i] = seg(layer.k[i])?;
            view.v[i] = seg(layer.v[i])?;
        }
        let curs = match cur {
            Some((k, v)) => Some((self.up(k)?, self.up(v)?)),
            None => None,
        };
        if let Some((k, v)) = &curs {
            view.k_cur = k.device_ptr(&self.stream).0;
            view.v_cur = v.device_ptr(&self.stream).0;
        }
        let total = layer.k.iter().map(|s| s.len()).sum::<usize>() + usize::from(cur.is_some());
        let splits = total.div_ceil(chunk).max(1);
        let dq = self.up(q)?;
        let mut work = self
            .stream
            .alloc_zeros::<f32>(g.q_heads * splits * (2 + g.head_dim))
            .map_err(drv)?;
        let mut out = self.stream.alloc_zeros::<f32>(g.q_dim()).map_err(drv)?;
        let (qh, kvh, d, grp) = (
            g.q_heads as i32,
            g.kv_heads as i32,
            g.head_dim as i32,
            layer.k[1].group as i32,
        );
        let (sm, ch, sp) = (1.0f32 / (g.head_dim as f32).sqrt(), chunk as i32, splits as i32);
        let mut b = self.stream.launch_builder(&self.attn);
        b.arg(&view)
            .arg(&dq)
            .arg(&qh)
            .arg(&kvh)
            .arg(&d)
            .arg(&grp)
            .arg(&sm)
            .arg(&ch)
            .arg(&mut work);
        let cfg = LaunchConfig {
            grid_dim: (g.q_heads as u32, splits as u32, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match pmkvq_attn_decode; every segment's buffers were uploaded above and stay alive
        // (`keep`, `curs`) until the stream is synchronized by the copy back below; shapes checked on the host.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        let mut c = self.stream.launch_builder(&self.combine);
        c.arg(&work).arg(&sp).arg(&d).arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (g.q_heads as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match pmkvq_attn_combine; `work` holds q_heads × splits partials.
        unsafe { c.launch(cfg) }.map_err(drv)?;
        let res = self.stream.clone_dtoh(&out).map_err(drv)?;
        drop(keep);
        drop(curs);
        Ok(res)
    }
}

/// Buffers and copies for the forward pass and the device caches (all on the one stream).
impl Gpu {
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// An uninitialized-but-zeroed buffer of `n` elements (at least one: the driver refuses empty allocations).
    pub(crate) fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(drv)
    }

    /// The device address of a buffer (valid while the buffer lives; every use is on the one stream).
    pub(crate) fn ptr<T>(&self, b: &CudaSlice<T>) -> u64 {
        b.device_ptr(&self.stream).0
    }

    pub(crate) fn upload<T: DeviceRepr + Copy + Default>(&self, v: &[T]) -> Result<CudaSlice<T>, GpuError> {
        self.up(v)
    }

    pub(crate) fn htod<T: DeviceRepr>(&self, src: &[T], dst: &mut CudaSlice<T>) -> Result<(), GpuError> {
        if src.is_empty() {
            return Ok(());
        }
        if src.len() > dst.len() {
            return Err(GpuError::Shape(format!("copy of {} into {}", src.len(), dst.len())));
        }
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(0..src.len()))
            .map_err(drv)
    }

    /// The first `n` elements of `src`.
    pub(crate) fn dtoh<T: DeviceRepr>(&self, src: &CudaSlice<T>, n: usize) -> Result<Vec<T>, GpuError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > src.len() {
            return Err(GpuError::Shape(format!("read of {n} from {}", src.len())));
        }
        self.stream.clone_dtoh(&src.slice(0..n)).map_err(drv)
    }

    /// Copy the first `n` elements of `src` to the start of `dst`.
    pub(crate) fn dtod<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        n: usize,
    ) -> Result<(), GpuError> {
        if n == 0 {
            return Ok(());
        }
        if n > src.len() || n > dst.len() {
            return Err(GpuError::Shape(format!(
                "copy of {n} from {} into {}",
                src.len(),
                dst.len()
            )));
        }
        self.stream
            .memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(0..n))
            .map_err(drv)
    }

    /// An event that records time (profiling).
    pub(crate) fn timing_event(&self) -> Result<cudarc::driver::CudaEvent, GpuError> {
        let ev = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv)?;
        ev.record(&self.stream).map_err(drv)?;
        Ok(ev)
    }

    pub(crate) fn sync(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(drv)
    }

    /// Lower `groups` packed groups one level: codes from `input` into `out`, parameters updated in place.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn shrink_groups(
        &self,
        input: &CudaSlice<u8>,
        groups: usize,
        g: usize,
        bits_in: u32,
        mode: ShiftMode,
        out: &mut CudaSlice<u8>,
        scale: &mut CudaSlice<u16>,
        offset: &mut CudaSlice<u16>,
    ) -> Result<(), GpuError> {
        if groups == 0 {
            return Ok(());
        }
        let need_in = groups * g * bits_in as usize / 8;
        if bits_in <= 2
            || input.len() < need_in
            || out.len() < need_in / 2
            || scale.len() < groups
            || offset.len() < groups
        {
            return Err(GpuError::Shape(format!("shrink of {groups} groups at {bits_in} bits")));
        }
        let (n, gi, bi, m) = (groups as i32, g as i32, bits_in as i32, mode as i32);
        let cfg = LaunchConfig {
            grid_dim: (groups.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.shrink);
        b.arg(input)
            .arg(&n)
            .arg(&gi)
            .arg(&bi)
            .arg(&m)
            .arg(out)
            .arg(scale)
            .arg(offset);
        // SAFETY: arguments match pmkvq_kv_shrink; sizes checked above.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Store host K/V rows (`n` tokens of `kv_dim`) into the slots `dsts` names (a device cache's `append`).
    pub(crate) fn store_tokens(
        &self,
        dsts: &[DstArg],
        k: &[f32],
        v: &[f32],
        kv_dim: usize,
        g: usize,
    ) -> Result<(), GpuError> {
        let n = dsts.len();
        if n == 0 {
            return Ok(());
        }
        if k.len() != n * kv_dim || v.len() != n * kv_dim {
            return Err(GpuError::Shape("k/v rows for the store".into()));
        }
        let (dk, dv, dd) = (self.up(k)?, self.up(v)?, self.up(dsts)?);
        self.launch_kv_store(self.ptr(&dd), self.ptr(&dk), self.ptr(&dv), n, kv_dim, g)?;
        self.sync()
    }

    pub(crate) fn launch_kv_store(
        &self,
        dsts: u64,
        k: u64,
        v: u64,
        n: usize,
        kv_dim: usize,
        g: usize,
    ) -> Result<(), GpuError> {
        let threads = n * 2 * (kv_dim / g);
        let (ni, kd, gi) = (n as i32, kv_dim as i32, g as i32);
        let mut b = self.stream.launch_builder(&self.fwd.kv_store);
        b.arg(&dsts).arg(&k).arg(&v).arg(&ni).arg(&kd).arg(&gi);
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match pk_kv_store; `dsts` holds n slots, each naming room for one token of kv_dim in
        // buffers owned by the store that handed them out (alive until the stream passes this launch).
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }
}

/// `cuMemGetInfo` as a memory sampler for the budget policy.
pub struct CudaDeviceMemory {
    pub gpu: Arc<Gpu>,
}

impl DeviceMemory for CudaDeviceMemory {
    fn sample(&mut self) -> Option<DeviceSample> {
        self.gpu.mem_info().ok().map(|(free, total)| DeviceSample {
            total: total as u64,
            free: free as u64,
        })
    }
}
