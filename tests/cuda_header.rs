//! The CUDA kernels' header mirrors the Rust enums and layout constants: pin every value.

use pmkvq::kvcache::quant::{pack, Bits, ShiftMode};
use std::collections::HashMap;

fn defines() -> HashMap<String, i64> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/pmkvq_kv.h");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#define")).then_some(())?;
            let name = w.next()?.to_string();
            let value = w.next()?.parse::<i64>().ok()?;
            Some((name, value))
        })
        .collect()
}

#[test]
fn header_mirrors_bit_widths_and_shift_modes() {
    let d = defines();
    for b in [Bits::B2, Bits::B4, Bits::B8, Bits::B16] {
        assert_eq!(d[&format!("PMKVQ_BITS_{}", b.count())], b as i32 as i64);
    }
    assert_eq!(d["PMKVQ_SHIFT_EQUIVALENT"], ShiftMode::Equivalent as i32 as i64);
    assert_eq!(d["PMKVQ_SHIFT_DIRECT"], ShiftMode::Direct as i32 as i64);
    assert_eq!(d["PMKVQ_SHIFT_MODIFIED"], ShiftMode::Modified as i32 as i64);
    assert_eq!(d["PMKVQ_SHIFT_FITTED"], ShiftMode::Fitted as i32 as i64);
    assert!(d["PMKVQ_MAX_HEAD_DIM"] >= 128);
}

#[test]
fn header_documents_the_packed_layout_the_rust_code_writes() {
    // The layout comment in the header is what the kernels implement; check the Rust packer agrees with it.
    let g = 16;
    let codes: Vec<u16> = (0..g as u16).collect();
    let mut b4 = vec![0u8; 8];
    pack(&codes.iter().map(|c| c & 15).collect::<Vec<_>>(), Bits::B4, &mut b4);
    assert_eq!(
        b4[1], 0x91,
        "4-bit: byte j holds codes j (low nibble) and j + G/2 (high nibble)"
    );
    let mut b2 = vec![0u8; 4];
    pack(&codes.iter().map(|c| c & 3).collect::<Vec<_>>(), Bits::B2, &mut b2);
    // codes 1, 5, 9, 13 (each & 3 = 1) at bits 0, 2, 4, 6
    assert_eq!(b2[1], 0b0101_0101, "2-bit: byte j holds codes j, j+G/4, j+G/2, j+3G/4");
    let mut b16 = vec![0u8; 2 * g];
    pack(&[0x1234; 16], Bits::B16, &mut b16);
    assert_eq!(&b16[..2], &[0x34, 0x12], "16-bit: little-endian u16");
}
