//! What a device store does to its inputs before it stores them, as the host stores' taps do: keys times 1/λ and
//! queries times λ (the calibrated reparameterization), then the rotation (`MethodSpec::rotate`).
//!
//! Without rotation the kernels apply the scales themselves (`pk_attention` to queries and fresh keys,
//! `pk_kv_store` to stored keys). With it, `pk_rotate` scales and rotates the step's rows in place, in the host
//! taps' order (`KeyScaled` over `Rotated`), and the other kernels take them as they are (`pk_seq.signs` set, the
//! stores' `kinv` 0). Rows appended from the host are rotated on the host by the same code as the host stores.

use super::gpu_err;
use crate::gpu::cuda::Gpu;
use crate::kvcache::reparam::{inverse_scales, scale_keys};
use crate::kvcache::rotate::Rotation;
use crate::kvcache::{KvError, KvGeometry, MethodSpec, ROTATION_SEED};
use cudarc::driver::CudaSlice;

pub(super) struct Inputs {
    /// Per layer on the device: (λ, 1/λ).
    scales: Option<Vec<(CudaSlice<f32>, CudaSlice<f32>)>>,
    rotation: Option<DeviceRotation>,
}

/// The rotation: its signs on the device (one row of `head_dim` per layer) for `pk_rotate`, and on the host with
/// the keys' 1/λ for rows appended from the host.
struct DeviceRotation {
    signs: CudaSlice<f32>,
    host: Rotation,
    kinv: Option<Vec<Vec<f32>>>,
}

impl Inputs {
    pub(super) fn new(gpu: &Gpu, spec: &MethodSpec, geom: KvGeometry) -> Result<Self, KvError> {
        // 1/λ once: uploaded for the kernels, kept on the host for a rotated store's host path
        let inverses = spec.key_scales.as_ref().map(|s| inverse_scales(s));
        let scales = match (&spec.key_scales, &inverses) {
            (Some(s), Some(inverses)) => {
                if s.len() != geom.layers || s.iter().any(|l| l.len() != geom.kv_dim()) {
                    return Err(KvError::BadShape {
                        layer: 0,
                        expected: geom.kv_dim(),
                        got: s.first().map_or(0, Vec::len),
                    });
                }
                let mut v = Vec::with_capacity(s.len());
                for (l, inv) in s.iter().zip(inverses) {
                    v.push((gpu.upload(l).map_err(gpu_err)?, gpu.upload(inv).map_err(gpu_err)?));
                }
                Some(v)
            }
            _ => None,
        };
        let rotation = match spec.rotate {
            false => None,
            true => {
                let host = Rotation::new(geom, ROTATION_SEED)?;
                let signs: Vec<f32> = (0..geom.layers)
                    .flat_map(|l| host.signs(l).unwrap_or(&[]).to_vec())
                    .collect();
                Some(DeviceRotation {
                    signs: gpu.upload(&signs).map_err(gpu_err)?,
                    host,
                    kinv: inverses,
                })
            }
        };
        Ok(Inputs { scales, rotation })
    }

    /// The 1/λ the store kernel multiplies keys by: none for a rotated store (`pk_rotate` scaled them already).
    pub(super) fn store_kinv(&self, gpu: &Gpu, li: usize) -> u64 {
        match self.rotation {
            Some(_) => 0,
            None => self.scales.as_ref().map_or(0, |s| gpu.ptr(&s[li].1)),
        }
    }

    /// (λ, 1/λ) device addresses for layer `li` (0, 0 without reparameterization).
    pub(super) fn key_scales(&self, gpu: &Gpu, li: usize) -> (u64, u64) {
        self.scales
            .as_ref()
            .map_or((0, 0), |s| (gpu.ptr(&s[li].0), gpu.ptr(&s[li].1)))
    }

    /// Device address of layer `li`'s signs (0 without rotation).
    pub(super) fn signs(&self, gpu: &Gpu, li: usize, head_dim: usize) -> u64 {
        self.rotation.as_ref().map_or(0, |r| {
            gpu.ptr(&r.signs) + (li * head_dim * std::mem::size_of::<f32>()) as u64
        })
    }

    /// `(R(k∘1/λ), R(v))` for rows appended from the host, in the host taps' order and rounding (`KeyScale`, then
    /// `Rotation`); `None` when the store does not rotate (the store kernel applies 1/λ itself then).
    pub(super) fn host_rotated(&self, layer: usize, k: &[f32], v: &[f32]) -> Option<(Vec<f32>, Vec<f32>)> {
        let r = self.rotation.as_ref()?;
        let mut k = k.to_vec();
        if let Some(inv) = r.kinv.as_ref().and_then(|s| s.get(layer)) {
            scale_keys(inv, &mut k);
        }
        let mut v = v.to_vec();
        r.host.forward(layer, &mut k);
        r.host.forward(layer, &mut v);
        Some((k, v))
    }
}
