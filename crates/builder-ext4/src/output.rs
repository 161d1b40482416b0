//! The output file, written front to back exactly once, as a three-stage pipeline: the
//! planner's thread fills 4 KiB-aligned buffers, a hashing thread runs SHA-256 over every byte
//! (holes included, so the digest needs no read-back pass; only when asked for: a scratch
//! disk's gigabytes of holes are not worth hashing), and a writing thread writes each
//! buffer at its offset. Small gaps become zeros in the buffer, long ones holes in the sparse
//! file. An output that is synced at the end is opened `O_DIRECT` where the file system allows
//! it: the data goes from our buffers to the disk without being copied into (and later written
//! back from) the page cache; elsewhere (tmpfs) writes are buffered and their writeback
//! started at once. An output that is not synced (a VM disk used at once) stays in the page
//! cache.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::Create;

/// Alignment of buffers, offsets and lengths for `O_DIRECT`.
const ALIGN: usize = 4096;
/// Buffered bytes are handed on once there are this many.
const FLUSH_AT: usize = 4 << 20;
/// Zero runs at least this long are left as holes.
const HOLE_FROM: u64 = 64 << 10;

/// A fixed-capacity, 4 KiB-aligned byte buffer: an anonymous mapping, so its pages are zero
/// and cost nothing until first written (a small output touches a few of them).
struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively; it is moved between threads, never shared.
unsafe impl Send for Buffer {}

impl Buffer {
    fn new() -> Self {
        // SAFETY: a new anonymous private mapping (no file, no address hint); the result is
        // checked before use and unmapped only in `drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FLUSH_AT,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let ptr = NonNull::new(ptr.cast::<u8>())
            .filter(|_| ptr != libc::MAP_FAILED)
            .unwrap_or_else(|| {
                alloc::handle_alloc_error(
                    Layout::from_size_align(FLUSH_AT, ALIGN).expect("a valid layout"),
                )
            });
        Buffer { ptr, len: 0 }
    }

    fn room(&self) -> usize {
        FLUSH_AT - self.len
    }

    fn filled(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialized (the mapping is zeroed).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Grows by `n` bytes (at most `room()`) and returns them, keeping whatever they held.
    fn grow(&mut self, n: usize) -> &mut [u8] {
        assert!(n <= self.room(), "buffer overflow");
        let start = self.len;
        self.len += n;
        // SAFETY: within the mapping, initialized (zero when mapped, then only written).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), n) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length, and no slice of it outlives the buffer.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), FLUSH_AT);
        }
    }
}

enum Chunk {
    /// `buffer.filled()` belongs at `offset`.
    Data {
        buffer: Buffer,
        offset: u64,
    },
    Zeros(u64),
}

pub(crate) struct Output {
    file: File,
    buf: Buffer,
    /// File offset of the buffer's first byte.
    buf_start: u64,
    /// Zeros after the buffer, not yet placed.
    pending_zeros: u64,
    to_hasher: Option<SyncSender<Chunk>>,
    sync: bool,
    recycled: Receiver<Buffer>,
    hasher: Option<JoinHandle<Option<[u8; 32]>>>,
    writer: Option<JoinHandle<io::Result<()>>>,
}

impl Output {
    /// Creates `path` as `create` says, never following a symlink; `hash` says whether to
    /// compute the SHA-256, `sync` whether [`Output::finish`] syncs.
    pub fn create(path: &Path, create: Create, hash: bool, sync: bool) -> io::Result<Self> {
        let open = |direct: bool| {
            let mut options = OpenOptions::new();
            options.write(true);
            match create {
                Create::Replace => options.create(true).truncate(true),
                Create::NewPrivate => options.create_new(true).mode(0o600),
            };
            options
                .custom_flags(
                    libc::O_NOFOLLOW | libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 },
                )
                .open(path)
        };
        let (file, direct) = match sync.then(|| open(true)) {
            Some(Ok(file)) => (file, true),
            Some(Err(e)) if e.raw_os_error() != Some(libc::EINVAL) => return Err(e),
            _ => (open(false)?, false),
        };
        let (to_hasher, for_hasher) = mpsc::sync_channel::<Chunk>(2);
        let (to_writer, for_writer) = mpsc::sync_channel::<(Buffer, u64)>(2);
        let (recycle, recycled) = mpsc::channel::<Buffer>();
        let hasher = std::thread::Builder::new()
            .name("ext4-sha256".into())
            .spawn(move || {
                static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
                let mut sha = hash.then(Sha256::new);
                for chunk in for_hasher {
                    match (chunk, &mut sha) {
                        (Chunk::Data { buffer, offset }, sha) => {
                            if let Some(sha) = sha {
                                sha.update(buffer.filled());
                            }
                            if to_writer.send((buffer, offset)).is_err() {
                                break; // the writer failed; `finish` reports why
                            }
                        }
                        (Chunk::Zeros(_), None) => {}
                        (Chunk::Zeros(mut n), Some(sha)) => {
                            while n > 0 {
                                let step = n.min(ZEROS.len() as u64);
                                sha.update(
                                    &ZEROS[..usize::try_from(step).expect("at most 64 KiB")],
                                );
                                n -= step;
                            }
                        }
                    }
                }
                sha.map(|sha| sha.finalize().into())
            })?;
        let out = file.try_clone()?;
        let writer = std::thread::Builder::new()
            .name("ext4-write".into())
            .spawn(move || -> io::Result<()> {
                for (buffer, offset) in for_writer {
                    out.write_all_at(buffer.filled(), offset)?;
                    if sync && !direct {
                        // Start writeback now, so the disk works while the next buffer fills
                        // and the final sync only waits for the tail (a hint: errors show at
                        // the sync).
                        // SAFETY: a plain system call on a descriptor this thread owns.
                        unsafe {
                            libc::sync_file_range(
                                out.as_raw_fd(),
                                offset as libc::off64_t,
                                buffer.len as libc::off64_t,
                                libc::SYNC_FILE_RANGE_WRITE,
                            );
                        }
                    }
                    let _ = recycle.send(buffer);
                }
                Ok(())
            })?;
        Ok(Output {
            file,
            buf: Buffer::new(),
            buf_start: 0,
            pending_zeros: 0,
            to_hasher: Some(to_hasher),
            sync,
            recycled,
            hasher: Some(hasher),
            writer: Some(writer),
        })
    }

    /// The offset the next byte goes to.
    fn position(&self) -> u64 {
        self.buf_start + self.buf.len as u64 + self.pending_zeros
    }

    /// Zeros up to `offset`.
    pub fn skip_to(&mut self, offset: u64) {
        debug_assert!(offset >= self.position(), "the output only moves forward");
        self.pending_zeros += offset - self.position();
    }

    pub fn zeros(&mut self, n: u64) {
        self.pending_zeros += n;
    }

    pub fn put(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        self.settle()?;
        while !bytes.is_empty() {
            if self.buf.room() == 0 {
                self.flush()?;
            }
            let n = bytes.len().min(self.buf.room());
            self.buf.grow(n).copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// `n` bytes (at most 1 MiB) of the output to fill in place.
    pub fn tail(&mut self, n: usize) -> io::Result<&mut [u8]> {
        self.settle()?;
        if self.buf.room() < n {
            self.flush()?;
        }
        Ok(self.buf.grow(n))
    }

    /// Places pending zeros: in the buffer when few; as a hole when many, in whole blocks so
    /// every write stays aligned.
    fn settle(&mut self) -> io::Result<()> {
        if self.pending_zeros >= HOLE_FROM {
            let misalign = (self.buf_start + self.buf.len as u64) % ALIGN as u64;
            let pad = (ALIGN as u64 - misalign) % ALIGN as u64;
            self.fill_zeros(pad)?;
            self.pending_zeros -= pad;
            let hole = self.pending_zeros / ALIGN as u64 * ALIGN as u64;
            self.flush()?;
            debug_assert_eq!(self.buf.len, 0);
            self.send(Chunk::Zeros(hole))?;
            self.buf_start += hole;
            self.pending_zeros -= hole;
        }
        let n = std::mem::take(&mut self.pending_zeros);
        self.fill_zeros(n)
    }

    fn fill_zeros(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.buf.room() == 0 {
                self.flush()?;
            }
            let step = usize::try_from(n).map_or(self.buf.room(), |n| n.min(self.buf.room()));
            self.buf.grow(step).fill(0);
            n -= step as u64;
        }
        Ok(())
    }

    /// Hands the whole blocks of the buffer on; a partial last block moves to the next one.
    fn flush(&mut self) -> io::Result<()> {
        let whole = self.buf.len / ALIGN * ALIGN;
        if whole == 0 {
            return Ok(());
        }
        let mut next = self.recycled.try_recv().unwrap_or_else(|_| Buffer::new());
        next.len = 0;
        let rest = self.buf.len - whole;
        next.grow(rest).copy_from_slice(&self.buf.filled()[whole..]);
        let mut full = std::mem::replace(&mut self.buf, next);
        full.len = whole;
        let offset = self.buf_start;
        self.buf_start += whole as u64;
        self.send(Chunk::Data {
            buffer: full,
            offset,
        })
    }

    fn send(&mut self, chunk: Chunk) -> io::Result<()> {
        let sent = self.to_hasher.as_ref().map(|tx| tx.send(chunk).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // A stage stopped: the writer's error says why.
        Err(self
            .join()
            .err()
            .unwrap_or_else(|| io::Error::other("the output pipeline stopped")))
    }

    /// Ends the pipeline: waits for both threads; the digest (if hashed), or the writer's error.
    fn join(&mut self) -> io::Result<Option<[u8; 32]>> {
        self.to_hasher = None;
        let digest = self.hasher.take().map(|h| {
            h.join()
                .map_err(|_| io::Error::other("the hashing thread panicked"))
        });
        let written = self.writer.take().map(|w| {
            w.join()
                .map_err(|_| io::Error::other("the writing thread panicked"))
        });
        if let Some(result) = written {
            result??;
        }
        digest.unwrap_or_else(|| Err(io::Error::other("the output pipeline already ended")))
    }

    /// Writes what is left, sizes the file to `len` (a whole number of blocks; the rest a
    /// hole), syncs it if asked to, and returns the SHA-256 of all `len` bytes when hashing.
    pub fn finish(mut self, len: u64) -> io::Result<Option<[u8; 32]>> {
        debug_assert_eq!(len % ALIGN as u64, 0);
        self.skip_to(len);
        self.settle()?;
        self.flush()?;
        debug_assert_eq!(self.buf.len, 0, "the output ends on a block boundary");
        let digest = self.join()?;
        self.file.set_len(len)?;
        if self.sync {
            self.file.sync_all()?;
        }
        Ok(digest)
    }
}
