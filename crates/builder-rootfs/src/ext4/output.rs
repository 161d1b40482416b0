//! The output file, written front to back exactly once: small gaps become zeros in the write
//! buffer, long ones holes in the (sparse) file. Writeback of each flushed buffer starts at
//! once, so the disk is busy while the next one fills. Every byte, holes included, goes
//! through SHA-256 on a second thread as it is written, so the digest costs no extra pass.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// Buffered bytes are written once there are this many.
const FLUSH_AT: usize = 8 << 20;
/// Zero runs at least this long are left as holes.
const HOLE_FROM: u64 = 64 << 10;

enum Chunk {
    Data(Vec<u8>),
    Zeros(u64),
}

pub(crate) struct Output {
    file: File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_start: u64,
    /// Zeros after the buffer, not yet placed.
    pending_zeros: u64,
    to_hasher: SyncSender<Chunk>,
    recycled: Receiver<Vec<u8>>,
    hasher: JoinHandle<[u8; 32]>,
}

impl Output {
    pub fn new(file: File) -> Self {
        let (to_hasher, chunks) = mpsc::sync_channel::<Chunk>(2);
        let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
        let hasher = std::thread::Builder::new()
            .name("ext4-sha256".into())
            .spawn(move || {
                static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
                let mut sha = Sha256::new();
                for chunk in chunks {
                    match chunk {
                        Chunk::Data(buf) => {
                            sha.update(&buf);
                            let _ = recycle.send(buf);
                        }
                        Chunk::Zeros(mut n) => {
                            while n > 0 {
                                let step = n.min(ZEROS.len() as u64);
                                sha.update(&ZEROS[..step as usize]);
                                n -= step;
                            }
                        }
                    }
                }
                sha.finalize().into()
            })
            .expect("spawning a thread");
        Output {
            file,
            buf: Vec::with_capacity(FLUSH_AT + (1 << 20)),
            buf_start: 0,
            pending_zeros: 0,
            to_hasher,
            recycled,
            hasher,
        }
    }

    /// The offset the next byte goes to.
    pub fn position(&self) -> u64 {
        self.buf_start + self.buf.len() as u64 + self.pending_zeros
    }

    /// Zeros up to `offset`.
    pub fn skip_to(&mut self, offset: u64) {
        debug_assert!(offset >= self.position(), "the output only moves forward");
        self.pending_zeros += offset - self.position();
    }

    pub fn zeros(&mut self, n: u64) {
        self.pending_zeros += n;
    }

    pub fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.settle()?;
        self.buf.extend_from_slice(bytes);
        self.flush_if_full()
    }

    /// `n` bytes of the output to fill in place (then call [`Output::filled`]).
    pub fn tail(&mut self, n: usize) -> io::Result<&mut [u8]> {
        self.settle()?;
        let len = self.buf.len();
        self.buf.resize(len + n, 0);
        Ok(&mut self.buf[len..])
    }

    pub fn filled(&mut self) -> io::Result<()> {
        self.flush_if_full()
    }

    /// Places pending zeros: in the buffer when few, as a hole when many.
    fn settle(&mut self) -> io::Result<()> {
        if self.pending_zeros == 0 {
            return Ok(());
        }
        if self.pending_zeros >= HOLE_FROM {
            self.flush()?;
            self.send(Chunk::Zeros(self.pending_zeros))?;
            self.buf_start += self.pending_zeros;
        } else {
            let len = self.buf.len() + self.pending_zeros as usize;
            self.buf.resize(len, 0);
        }
        self.pending_zeros = 0;
        Ok(())
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.buf, self.buf_start)?;
        // Start writing these pages back now, so the disk works while the next buffer fills
        // and the final sync only waits for the tail. (Only a hint: errors show at the sync.)
        // SAFETY: a plain system call on a descriptor this struct owns.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.buf_start as libc::off64_t,
                self.buf.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.buf_start += self.buf.len() as u64;
        let mut next = self
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(FLUSH_AT + (1 << 20)));
        next.clear();
        let full = std::mem::replace(&mut self.buf, next);
        self.send(Chunk::Data(full))
    }

    fn send(&self, chunk: Chunk) -> io::Result<()> {
        self.to_hasher
            .send(chunk)
            .map_err(|_| io::Error::other("the hashing thread stopped"))
    }

    /// Writes what is buffered, sizes the file to `len` (the rest a hole), syncs it, and
    /// returns the SHA-256 of all `len` bytes.
    pub fn finish(mut self, len: u64) -> io::Result<[u8; 32]> {
        self.skip_to(len);
        let tail = self.pending_zeros;
        self.pending_zeros = 0;
        self.flush()?;
        if tail > 0 {
            self.send(Chunk::Zeros(tail))?;
        }
        self.file.set_len(len)?;
        self.file.sync_all()?;
        drop(self.to_hasher);
        self.hasher
            .join()
            .map_err(|_| io::Error::other("the hashing thread panicked"))
    }
}
