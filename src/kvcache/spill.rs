//! Spilling a preempted sequence's cache to disk and reading it back bit-exactly: a small little-endian codec
//! the stores write themselves with, and the spill file (read back through a memory map, so a resumed
//! sequence's codes are paged in once and copied straight into the store).

use super::KvError;
use half::f16;
use std::path::{Path, PathBuf};

/// First bytes of every spill (format version 1).
pub const MAGIC: &[u8; 8] = b"PMKVQSP1";

#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new(kind: &str) -> Self {
        let mut w = Writer { buf: MAGIC.to_vec() };
        w.bytes(kind.as_bytes());
        w
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    pub fn f16s(&mut self, v: &[f16]) {
        self.u64(v.len() as u64);
        for x in v {
            self.buf.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.buf.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }
}

pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

fn corrupt(what: &str) -> KvError {
    KvError::Corrupt(what.to_string())
}

impl<'a> Reader<'a> {
    /// Check the magic and the store kind.
    pub fn new(data: &'a [u8], kind: &str) -> Result<Self, KvError> {
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let mut r = Reader { data, pos: MAGIC.len() };
        let k = r.bytes()?;
        if k != kind.as_bytes() {
            return Err(KvError::Corrupt(format!(
                "written by a `{}` cache, read by `{kind}`",
                String::from_utf8_lossy(k)
            )));
        }
        Ok(r)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], KvError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u64(&mut self) -> Result<u64, KvError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn len(&mut self, elem: usize) -> Result<usize, KvError> {
        let n = self.u64()? as usize;
        if n.checked_mul(elem).is_none_or(|b| b > self.data.len() - self.pos) {
            return Err(corrupt("length past the end"));
        }
        Ok(n)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], KvError> {
        let n = self.len(1)?;
        self.take(n)
    }
    pub fn f16s(&mut self) -> Result<Vec<f16>, KvError> {
        let n = self.len(2)?;
        let b = self.take(2 * n)?;
        Ok(b.chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect())
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>, KvError> {
        let n = self.len(4)?;
        let b = self.take(4 * n)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect())
    }
    pub fn finish(self) -> Result<(), KvError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}

/// A spill on disk; removed when dropped.
#[derive(Debug)]
pub struct SpillFile {
    path: PathBuf,
    pub bytes: usize,
}

impl SpillFile {
    /// Write `data` to `dir/name` (the directory is created if needed).
    pub fn write(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<SpillFile> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        std::fs::write(&path, data)?;
        Ok(SpillFile {
            path,
            bytes: data.len(),
        })
    }

    /// Map the file for reading.
    pub fn map(&self) -> std::io::Result<memmap2::Mmap> {
        let f = std::fs::File::open(&self.path)?;
        // SAFETY: the file is private to this process (written by `write` under a name only this spill knows) and
        // nothing writes to or truncates it while the map lives; the map is dropped before the file is removed.
        unsafe { memmap2::Mmap::map(&f) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
