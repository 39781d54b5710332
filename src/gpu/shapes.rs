//! Host-side shape checks for every launch (tested without a GPU): a wrong size is an error before any device
//! memory is touched.

use super::GpuError;
use crate::kvcache::quant::{Bits, PackedRows};
use crate::kvcache::KvGeometry;

fn bad(msg: String) -> Result<(), GpuError> {
    Err(GpuError::Shape(msg))
}

/// `x` holds whole tokens of `kv_dim` values, split into groups of `g` (a multiple of 4, at most 256).
pub fn check_quantize(x_len: usize, kv_dim: usize, g: usize) -> Result<(), GpuError> {
    if g == 0 || !g.is_multiple_of(4) || g > 256 || !kv_dim.is_multiple_of(g) {
        return bad(format!(
            "group {g} must be a multiple of 4, at most 256, dividing kv_dim {kv_dim}"
        ));
    }
    if !x_len.is_multiple_of(kv_dim) {
        return bad(format!("{x_len} values are not whole tokens of {kv_dim}"));
    }
    Ok(())
}

/// Shrink needs a width above the floor and a stored offset per group.
pub fn check_shrink(rows: &PackedRows) -> Result<(), GpuError> {
    if rows.bits == Bits::B2 {
        return bad("2-bit rows cannot be lowered further".into());
    }
    if rows.offset.len() != rows.scale.len() {
        return bad("the kernel lowers rows with stored offsets only".into());
    }
    if rows.data.len() != rows.scale.len() * rows.group_bytes() || rows.group > 256 {
        return bad("rows' codes and parameters disagree".into());
    }
    Ok(())
}

/// What the attention kernel needs of one segment.
#[derive(Clone, Copy, Debug)]
pub struct SegmentShape {
    pub len: usize,
    pub group: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub data_len: usize,
    pub scales: usize,
    pub offsets: usize,
    pub group_bytes: usize,
}

impl SegmentShape {
    pub fn of(r: &PackedRows) -> Self {
        SegmentShape {
            len: r.len(),
            group: r.group,
            kv_heads: r.kv_heads,
            head_dim: r.head_dim,
            data_len: r.data.len(),
            scales: r.scale.len(),
            offsets: r.offset.len(),
            group_bytes: r.group_bytes(),
        }
    }
}

/// Decode attention: one query token (`q_heads·d`), current K/V (`kv_dim` each, or none), six segments sharing
/// the geometry, `d ≤ 128`, groups a multiple of 16, K and V segments of equal lengths.
pub fn check_attention(
    g: KvGeometry,
    q_len: usize,
    cur: Option<(usize, usize)>,
    k: &[SegmentShape; 3],
    v: &[SegmentShape; 3],
) -> Result<(), GpuError> {
    if g.head_dim > 128 || !g.head_dim.is_multiple_of(32) {
        return bad(format!("head_dim {} must be a multiple of 32, at most 128", g.head_dim));
    }
    if g.kv_heads == 0 || !g.q_heads.is_multiple_of(g.kv_heads) {
        return bad(format!(
            "{} query heads do not group over {} kv heads",
            g.q_heads, g.kv_heads
        ));
    }
    if q_len != g.q_dim() {
        return bad(format!("q has {q_len} values, the geometry wants {}", g.q_dim()));
    }
    if let Some((kc, vc)) = cur {
        if kc != g.kv_dim() || vc != g.kv_dim() {
            return bad(format!("current K/V have {kc}/{vc} values, want {}", g.kv_dim()));
        }
    }
    let group = k[0].group;
    for (i, s) in k.iter().chain(v).enumerate() {
        if s.group != group || !s.group.is_multiple_of(16) || !g.head_dim.is_multiple_of(s.group) {
            return bad(format!(
                "segment {i}: group {} must be one multiple of 16 dividing head_dim",
                s.group
            ));
        }
        if s.kv_heads != g.kv_heads || s.head_dim != g.head_dim {
            return bad(format!("segment {i}: geometry differs from the layer's"));
        }
        let groups = s.len * g.kv_dim() / s.group;
        if s.scales != groups || s.offsets != groups || s.data_len != groups * s.group_bytes {
            return bad(format!(
                "segment {i}: codes and parameters do not match {} tokens",
                s.len
            ));
        }
    }
    if (0..3).any(|i| k[i].len != v[i].len) {
        return bad("K and V segments hold different token counts".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::quant::OffsetMode;

    fn rows(bits: Bits, tokens: usize) -> PackedRows {
        let mut r = PackedRows::new(bits, 64, 3, 64, OffsetMode::Stored);
        let x: Vec<f32> = (0..192).map(|i| i as f32 * 0.01).collect();
        for _ in 0..tokens {
            r.push_token(&x);
        }
        r
    }

    fn geom() -> KvGeometry {
        KvGeometry {
            layers: 1,
            q_heads: 9,
            kv_heads: 3,
            head_dim: 64,
        }
    }

    #[test]
    fn quantize_shapes() {
        assert!(check_quantize(192 * 5, 192, 64).is_ok());
        assert!(check_quantize(192 * 5 + 1, 192, 64).is_err());
        assert!(check_quantize(192, 192, 6).is_err());
        assert!(check_quantize(512, 512, 512).is_err());
    }

    #[test]
    fn shrink_shapes() {
        assert!(check_shrink(&rows(Bits::B16, 3)).is_ok());
        assert!(check_shrink(&rows(Bits::B2, 3)).is_err());
        let mut r = rows(Bits::B8, 3);
        r.data.pop();
        assert!(check_shrink(&r).is_err());
    }

    #[test]
    fn attention_shapes() {
        let (a, b, c) = (rows(Bits::B16, 1), rows(Bits::B2, 10), rows(Bits::B16, 5));
        let k = [SegmentShape::of(&a), SegmentShape::of(&b), SegmentShape::of(&c)];
        let g = geom();
        assert!(check_attention(g, 9 * 64, Some((192, 192)), &k, &k).is_ok());
        assert!(check_attention(g, 9 * 64 - 1, None, &k, &k).is_err(), "q size");
        assert!(
            check_attention(g, 9 * 64, Some((191, 192)), &k, &k).is_err(),
            "current token size"
        );
        let short = [k[0], SegmentShape::of(&rows(Bits::B2, 9)), k[2]];
        assert!(check_attention(g, 9 * 64, None, &k, &short).is_err(), "K/V lengths");
        let mut broken = k;
        broken[1].scales -= 1;
        assert!(
            check_attention(g, 9 * 64, None, &broken, &broken).is_err(),
            "parameters"
        );
        let wide = KvGeometry { head_dim: 256, ..g };
        assert!(check_attention(wide, 9 * 256, None, &k, &k).is_err(), "head_dim");
        let odd = KvGeometry { q_heads: 8, ..g };
        assert!(check_attention(odd, 8 * 64, None, &k, &k).is_err(), "GQA grouping");
    }
}
