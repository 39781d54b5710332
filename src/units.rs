//! Units in config files and on command lines: byte sizes (`512MiB`) and durations (`250ms`).
//!
//! A bottom-layer module with no imports of ours, so `config`, `memory`, `kvcache` and the binaries parse the
//! same spellings the same way.

use std::time::Duration;

/// Parse a byte size: `123`, `512KiB`, `64MiB`, `1.5GiB`, `2GB` (SI units are powers of 1000).
pub fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        _ => return None,
    };
    let bytes = v * mult;
    (bytes.is_finite() && bytes >= 0.0 && bytes < usize::MAX as f64).then_some(bytes as usize)
}

/// Parse `30s`, `250ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => v / 1e3,
        "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return None,
    };
    // `try_`: a value past what a Duration holds (`99999999999999999999s`) is a bad value, not a panic
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_bytes("2 MB"), Some(2_000_000));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-5"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(
            parse_duration("99999999999999999999s"),
            None,
            "overflow is an error, not a panic"
        );
        assert_eq!(parse_duration("1e400s"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
