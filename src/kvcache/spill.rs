//! Spilling a preempted sequence's cache to disk and reading it back bit-exactly: a small little-endian codec
//! the stores write themselves with, and the spill file (read back through a memory map, so a resumed
//! sequence's codes are paged in once and copied straight into the store).

use super::quant::{Bits, OffsetMode, PackedRows};
use super::KvError;
use half::f16;
use std::path::{Path, PathBuf};

/// First bytes of every spill (format version 1).
pub const MAGIC: &[u8; 8] = b"PMKVQSP1";

/// Writes the codec to any `Write` (a spill file, or a `Vec` in tests), remembering the first error so the
/// stores' encoders stay plain sequences of calls; [`Writer::finish`] reports it.
pub struct Writer<'w> {
    out: &'w mut dyn std::io::Write,
    err: Option<std::io::Error>,
}

impl<'w> Writer<'w> {
    pub fn new(out: &'w mut dyn std::io::Write, kind: &str) -> Self {
        let mut w = Writer { out, err: None };
        w.raw(MAGIC);
        w.bytes(kind.as_bytes());
        w
    }
    fn raw(&mut self, b: &[u8]) {
        if self.err.is_none() {
            if let Err(e) = self.out.write_all(b) {
                self.err = Some(e);
            }
        }
    }
    pub fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.raw(b);
    }
    /// A count, then the values' little-endian bytes, gathered in slices so a buffered file sees a few large
    /// writes rather than one per value.
    fn values<const N: usize>(&mut self, n: usize, mut bytes: impl Iterator<Item = [u8; N]>) {
        self.u64(n as u64);
        let mut buf = [0u8; 512];
        loop {
            let mut len = 0;
            for (o, b) in buf.chunks_exact_mut(N).zip(bytes.by_ref()) {
                o.copy_from_slice(&b);
                len += N;
            }
            if len == 0 {
                return;
            }
            self.raw(&buf[..len]);
        }
    }
    pub fn f16s(&mut self, v: &[f16]) {
        self.values(v.len(), v.iter().map(|x| x.to_bits().to_le_bytes()));
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.values(v.len(), v.iter().map(|x| x.to_bits().to_le_bytes()));
    }
    /// Packed rows: bit-width, codes, scales, offsets.
    pub fn rows(&mut self, r: &PackedRows) {
        self.u64(r.bits.count() as u64);
        self.bytes(&r.data);
        self.f16s(&r.scale);
        self.f16s(&r.offset);
    }
    /// The first write error, if any.
    pub fn finish(self) -> Result<(), KvError> {
        self.err.map_or(Ok(()), |e| Err(e.into()))
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
    /// Packed rows as [`Writer::rows`] wrote them, laid out as `template` (group, heads, head size, offsets; its
    /// bit-width is read), every length checked: whole tokens, codes matching the scales, offsets as the mode says.
    pub fn rows(&mut self, template: &PackedRows) -> Result<PackedRows, KvError> {
        let bits = u32::try_from(self.u64()?)
            .ok()
            .and_then(Bits::from_count)
            .ok_or_else(|| corrupt("bad bit-width"))?;
        let mut rows = template.empty_like(bits);
        rows.data = self.bytes()?.to_vec();
        rows.scale = self.f16s()?;
        rows.offset = self.f16s()?;
        let groups = rows.scale.len();
        let offsets_ok = match rows.offset_mode {
            OffsetMode::Stored => rows.offset.len() == groups,
            OffsetMode::Symmetric { .. } => rows.offset.is_empty(),
        };
        if !groups.is_multiple_of(rows.groups_per_token())
            || rows.data.len() != groups * rows.group_bytes()
            || !offsets_ok
        {
            return Err(corrupt("segment sizes disagree"));
        }
        Ok(rows)
    }
    pub fn finish(self) -> Result<(), KvError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}

/// Last bytes of every spill file: a 64-bit FNV-1a checksum of what precedes it, then this tag.
const SUM_TAG: &[u8; 8] = b"PMKVQSUM";

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a_update(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn fnv1a(data: &[u8]) -> u64 {
    fnv1a_update(FNV_START, data)
}

/// The spill file as it is written: buffered, checksummed as it goes, and refusing bytes past the quota.
struct SpillSink {
    file: std::io::BufWriter<std::fs::File>,
    sum: u64,
    written: u64,
    /// Bytes this file may take (`None`: no quota).
    room: Option<u64>,
}

impl std::io::Write for SpillSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(room) = self.room {
            if self.written + buf.len() as u64 > room {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!("spill quota engine.spill_max_bytes reached ({room} bytes left for this file)"),
                ));
            }
        }
        let n = self.file.write(buf)?;
        self.sum = fnv1a_update(self.sum, &buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn io_err(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, what)
}

/// The directory preempted sequences spill to: private to this user (mode 0700, owned by us, a real directory
/// and not a symlink — a symlink, a file or someone else's directory is refused; our own directory with a looser
/// mode is closed to 0700), with a quota on the bytes held in it.
#[derive(Debug)]
pub struct SpillDir {
    path: PathBuf,
    /// Bytes of spill files this process may hold at once (`None` = no quota).
    pub quota: Option<u64>,
    held: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SpillDir {
    /// Create (0700) or check `path`, then delete the spill files a dead pmkvqd process left there.
    pub fn open(path: &Path, quota: Option<u64>) -> std::io::Result<SpillDir> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let md = std::fs::symlink_metadata(path)?;
        let shown = path.display();
        if md.file_type().is_symlink() || !md.is_dir() {
            return Err(io_err(format!(
                "spill directory {shown} is not a directory (a symlink or a file): refused"
            )));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if md.uid() != me {
            return Err(io_err(format!(
                "spill directory {shown} belongs to uid {}, not to us (uid {me}): refused",
                md.uid()
            )));
        }
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            // Ours and a real directory (checked above, and a sticky /tmp keeps others from swapping it): an older
            // pmkvqd created it with the default mode. Close it rather than refuse to start.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
            tracing::warn!(path = %shown, mode = format!("{mode:o}"), "spill directory was open to others: now 0700");
        }
        let dir = SpillDir {
            path: path.to_path_buf(),
            quota,
            held: Default::default(),
        };
        dir.remove_stale();
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of spill files held now.
    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Remove `pmkvq-<pid>-<n>.kv` files whose process is gone (a crash or kill leaves them behind).
    fn remove_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("pmkvq-"))
                .and_then(|n| n.strip_suffix(".kv"))
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
            if !alive {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => tracing::info!(path = %e.path().display(), "removed a stale spill file"),
                    Err(err) => {
                        tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale spill file")
                    }
                }
            }
        }
    }

    /// Write `data` to a new file `name`; see [`SpillDir::write_with`].
    pub fn write(&self, name: &str, data: &[u8]) -> std::io::Result<SpillFile> {
        self.write_with(name, |w| Ok(w.write_all(data)?))
    }

    /// Stream a spill into a new file `name` (created exclusively, mode 0600, never through a symlink) through
    /// `fill`, then its checksum: no copy of the whole spill is ever held in memory. Past the quota, or on any
    /// write error (a full disk), the file is removed and nothing is left behind.
    pub fn write_with(
        &self,
        name: &str,
        fill: impl FnOnce(&mut dyn std::io::Write) -> Result<(), KvError>,
    ) -> std::io::Result<SpillFile> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let room = match self.quota {
            None => None,
            Some(q) => match q.checked_sub(self.held() + 16) {
                Some(r) => Some(r),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        format!(
                            "spill quota engine.spill_max_bytes ({q} bytes) reached: {} held",
                            self.held()
                        ),
                    ))
                }
            },
        };
        if name.contains('/') || name.starts_with('.') {
            return Err(io_err(format!("bad spill file name `{name}`")));
        }
        let path = self.path.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        let mut sink = SpillSink {
            file: std::io::BufWriter::with_capacity(1 << 16, file),
            sum: FNV_START,
            written: 0,
            room,
        };
        let written = fill(&mut sink)
            .map_err(|e| match e {
                // the quota's and the disk's errors keep their kind
                KvError::Spill { kind, msg } => std::io::Error::new(kind, msg),
                e => std::io::Error::other(e.to_string()),
            })
            .and_then(|()| {
                let (sum, bytes) = (sink.sum, sink.written);
                sink.file.write_all(&sum.to_le_bytes())?;
                sink.file.write_all(SUM_TAG)?;
                sink.file.flush()?;
                Ok(bytes)
            });
        drop(sink);
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        self.held.fetch_add(bytes + 16, std::sync::atomic::Ordering::Relaxed);
        Ok(SpillFile {
            path,
            bytes: bytes as usize,
            held: Some(self.held.clone()),
        })
    }
}

/// A spill on disk; removed when dropped.
#[derive(Debug)]
pub struct SpillFile {
    path: PathBuf,
    pub bytes: usize,
    /// The directory's byte count this file adds to (given back when it is removed).
    held: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// A spill file mapped for reading, its checksum verified: derefs to the store's bytes.
pub struct SpillMap {
    map: memmap2::Mmap,
}

impl std::fmt::Debug for SpillMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpillMap({} bytes)", self.map.len())
    }
}

impl std::ops::Deref for SpillMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[..self.map.len() - 16]
    }
}

impl SpillFile {
    /// Write `data` to `dir/name` with no private-directory checks or quota (tests and tools); the daemon
    /// writes through [`SpillDir::write`].
    pub fn write(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<SpillFile> {
        std::fs::create_dir_all(dir)?;
        SpillDir {
            path: dir.to_path_buf(),
            quota: None,
            held: Default::default(),
        }
        .write(name, data)
    }

    /// Map the file and check its length and checksum; a file that was truncated, altered or swapped for
    /// something else is an error, never a panic.
    pub fn map(&self) -> Result<SpillMap, KvError> {
        let shown = self.path.display();
        let f = std::fs::File::open(&self.path).map_err(|e| KvError::Corrupt(format!("{shown}: {e}")))?;
        // SAFETY: the file is private to this process (created exclusively, mode 0600, in a 0700 directory) and
        // nothing writes to or truncates it while the map lives; the map is dropped before the file is removed.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| KvError::Corrupt(format!("{shown}: {e}")))?;
        let n = map.len();
        if n != self.bytes + 16 || &map[n - 8..] != SUM_TAG {
            return Err(KvError::Corrupt(format!(
                "{shown}: not the spill file written ({n} bytes)"
            )));
        }
        let sum = u64::from_le_bytes(map[n - 16..n - 8].try_into().expect("8 bytes"));
        if fnv1a(&map[..n - 16]) != sum {
            return Err(KvError::Corrupt(format!("{shown}: checksum mismatch")));
        }
        Ok(SpillMap { map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(h) = &self.held {
            h.fetch_sub(self.bytes as u64 + 16, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pmkvq-spilltest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_directory_is_private_and_a_shared_one_is_refused() {
        let d = tmp("private");
        let dir = SpillDir::open(&d, None).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let f = dir.write("pmkvq-1-1.kv", b"abc").unwrap();
        assert_eq!(std::fs::metadata(f.path()).unwrap().permissions().mode() & 0o777, 0o600);
        // an existing name is never reused or followed
        assert!(dir.write("pmkvq-1-1.kv", b"x").is_err());
        std::os::unix::fs::symlink("/etc/hostname", d.join("pmkvq-1-2.kv")).unwrap();
        assert!(
            dir.write("pmkvq-1-2.kv", b"x").is_err(),
            "a planted symlink is not followed"
        );
        assert!(dir.write("../escape.kv", b"x").is_err());
        drop(f);
        // ours but open to others (an older version's default): closed to 0700 on open
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        SpillDir::open(&d, None).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let link = tmp("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = SpillDir::open(&link, None).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_truncated_or_swapped_file_is_an_error() {
        let d = tmp("corrupt");
        let dir = SpillDir::open(&d, None).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let f = dir.write("pmkvq-1-1.kv", &data).unwrap();
        assert_eq!(&*f.map().unwrap(), &data[..]);
        let mut raw = std::fs::read(f.path()).unwrap();
        raw[500] ^= 1;
        std::fs::write(f.path(), &raw).unwrap();
        assert!(f.map().unwrap_err().to_string().contains("checksum"));
        raw[500] ^= 1;
        std::fs::write(f.path(), &raw[..raw.len() - 1]).unwrap();
        assert!(f.map().is_err(), "truncated");
        let other = dir.write("pmkvq-1-2.kv", &data[..999]).unwrap();
        std::fs::copy(other.path(), f.path()).unwrap();
        assert!(f.map().is_err(), "another sequence's file");
        drop((f, other));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_quota_counts_what_is_held_and_stale_files_go_at_start() {
        let d = tmp("quota");
        let dir = SpillDir::open(&d, Some(100)).unwrap();
        let a = dir.write("pmkvq-1-1.kv", &[0; 50]).unwrap();
        assert_eq!(dir.held(), 66);
        let e = dir.write("pmkvq-1-2.kv", &[0; 50]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
        assert!(!d.join("pmkvq-1-2.kv").exists(), "no partial file");
        drop(a);
        assert_eq!(dir.held(), 0);
        let b = dir.write("pmkvq-1-3.kv", &[0; 50]).unwrap();
        // a file of a process that is gone (pid far above any live one) is removed when the directory opens;
        // ours stays
        std::fs::write(d.join("pmkvq-4000000000-7.kv"), b"old").unwrap();
        std::fs::write(d.join("notes.txt"), b"keep").unwrap();
        let _again = SpillDir::open(&d, None).unwrap();
        assert!(!d.join("pmkvq-4000000000-7.kv").exists());
        assert!(d.join("notes.txt").exists() && b.path().exists());
        drop(b);
        let _ = std::fs::remove_dir_all(&d);
    }
}
