//! The files a conversion reads file contents from: the image archive, gzip layers inflated
//! into the work area, the files the converter injects, and regular files of layer directories
//! (opened only when the writer asks for them, so a big image never holds one descriptor per
//! file). Tree nodes refer to them by index ([`crate::tree::Content`]); the writer asks this
//! module where a node's bytes are ([`builder_ext4::Contents`]).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::archive::lossy;
use crate::tree::Content;

/// Every file that file contents are read from, by index.
#[derive(Default)]
pub(crate) struct Sources {
    sources: Vec<Source>,
    /// Open layer directories (`<data-root>/overlay2/<id>/diff`), by index.
    layer_dirs: Vec<File>,
}

enum Source {
    /// A file opened up front.
    Open(File),
    /// The regular file at `path` (relative, as a layer tar names it) in layer directory
    /// `layer`.
    LayerFile { layer: usize, path: Box<[u8]> },
}

impl Sources {
    /// Adds an open source file; returns its index.
    pub fn add(&mut self, file: File) -> usize {
        self.sources.push(Source::Open(file));
        self.sources.len() - 1
    }

    /// Adds an open layer directory; returns its index for [`Sources::add_layer_file`].
    pub fn add_layer_dir(&mut self, dir: File) -> usize {
        self.layer_dirs.push(dir);
        self.layer_dirs.len() - 1
    }

    /// Adds the regular file at `path` in layer directory `layer`, opened when located;
    /// returns its index.
    pub fn add_layer_file(&mut self, layer: usize, path: Vec<u8>) -> usize {
        self.sources.push(Source::LayerFile {
            layer,
            path: path.into_boxed_slice(),
        });
        self.sources.len() - 1
    }

    /// An open source file (a layer tar, an injected file).
    pub fn file(&self, source: usize) -> &File {
        match &self.sources[source] {
            Source::Open(file) => file,
            Source::LayerFile { .. } => unreachable!("layer files are only read through locate"),
        }
    }

    /// Where `content`'s bytes are. A layer file is opened here, beneath its layer directory
    /// and through no symlink, and must still be a regular file of the size the tree recorded.
    pub fn locate(&self, content: &Content) -> io::Result<Located<'_>> {
        let file = match &self.sources[content.source] {
            Source::Open(file) => SourceFile::Borrowed(file),
            Source::LayerFile { layer, path } => {
                let file = open_beneath(&self.layer_dirs[*layer], path)?;
                let meta = file.metadata()?;
                let expected = content.span.offset + content.span.len;
                if !meta.is_file() || meta.size() != expected {
                    return Err(io::Error::other(format!(
                        "the layer file {:?} changed after its layer directory was read \
                         (now {} bytes, mode {:o}; expected a {expected}-byte regular file)",
                        lossy(path),
                        meta.size(),
                        meta.mode()
                    )));
                }
                SourceFile::Owned(file)
            }
        };
        Ok(Located {
            file,
            offset: content.span.offset,
        })
    }
}

impl builder_ext4::Contents for Sources {
    type File = Content;
    type Reader<'a> = Located<'a>;

    fn len(&self, content: &Content) -> u64 {
        content.span.len
    }

    fn open<'a>(&'a self, content: &'a Content) -> io::Result<Located<'a>> {
        self.locate(content)
    }
}

/// Opens `path` read-only beneath `dir`: `openat2` with `RESOLVE_BENEATH`,
/// `RESOLVE_NO_SYMLINKS` and `RESOLVE_NO_MAGICLINKS`, so neither `..`, an absolute path nor a
/// symlink anywhere on the way (the last component included) can lead out of the layer.
fn open_beneath(dir: &File, path: &[u8]) -> io::Result<File> {
    let cpath = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers, for which zero is valid (and means "unset").
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: cpath is NUL-terminated, how is a valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            cpath.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// A source file, borrowed from [`Sources`] or opened for this one read.
enum SourceFile<'a> {
    Borrowed(&'a File),
    Owned(File),
}

/// A file's content: its bytes start at `offset` of [`Located::file`].
pub(crate) struct Located<'a> {
    file: SourceFile<'a>,
    pub offset: u64,
}

impl Located<'_> {
    pub fn file(&self) -> &File {
        match &self.file {
            SourceFile::Borrowed(file) => file,
            SourceFile::Owned(file) => file,
        }
    }
}

impl builder_ext4::ReadContent for Located<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file().read_exact_at(buf, self.offset + offset)
    }

    /// The data between the holes of the source file (`SEEK_DATA`/`SEEK_HOLE`).
    fn data_ranges(&self, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let fd = self.file().as_raw_fd();
        let seek = |from: u64, whence: libc::c_int| -> Option<u64> {
            let from = libc::off_t::try_from(from).ok()?;
            // SAFETY: lseek on a descriptor we hold; only the offset changes, and every read
            // of content is positional (pread), so nothing depends on it.
            let at = unsafe { libc::lseek(fd, from, whence) };
            u64::try_from(at).ok()
        };
        let end = self.offset + len;
        let mut ranges = Vec::new();
        let mut pos = self.offset;
        while pos < end {
            let Some(data) = seek(pos, libc::SEEK_DATA).filter(|&d| d < end) else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            ranges.push((data - self.offset, hole - self.offset));
            pos = hole;
        }
        Ok(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Span;

    #[test]
    fn a_layer_file_is_opened_beneath_its_layer_and_never_through_a_symlink() {
        let scratch = tempfile::tempdir().unwrap();
        let layer = scratch.path().join("layer");
        std::fs::create_dir_all(layer.join("dir")).unwrap();
        std::fs::write(layer.join("dir/file"), b"inside").unwrap();
        std::fs::write(scratch.path().join("canary"), b"secret").unwrap();
        std::os::unix::fs::symlink("file", layer.join("dir/link")).unwrap();
        std::os::unix::fs::symlink(".", layer.join("self")).unwrap();
        let mut sources = Sources::default();
        let dir = sources.add_layer_dir(File::open(&layer).unwrap());
        let content = |sources: &mut Sources, path: &[u8], len| Content {
            source: sources.add_layer_file(dir, path.to_vec()),
            span: Span { offset: 0, len },
        };

        let file = content(&mut sources, b"dir/file", 6);
        let located = sources.locate(&file).unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut located.file(), &mut text).unwrap();
        assert_eq!((text.as_str(), located.offset), ("inside", 0));

        for (path, errno) in [
            (&b"../canary"[..], libc::EXDEV),
            (b"dir/link", libc::ELOOP),
            (b"self/dir/file", libc::ELOOP),
        ] {
            let content = content(&mut sources, path, 6);
            let err = sources.locate(&content).err().expect("refused");
            assert_eq!(err.raw_os_error(), Some(errno), "{}: {err}", lossy(path));
        }

        // Swapped for a symlink to a file of the same size outside, or grown, after the walk.
        std::fs::remove_file(layer.join("dir/file")).unwrap();
        std::os::unix::fs::symlink(scratch.path().join("canary"), layer.join("dir/file")).unwrap();
        assert_eq!(
            sources.locate(&file).err().unwrap().raw_os_error(),
            Some(libc::ELOOP)
        );
        std::fs::remove_file(layer.join("dir/file")).unwrap();
        std::fs::write(layer.join("dir/file"), b"inside, and more").unwrap();
        let err = sources.locate(&file).err().unwrap();
        assert!(err.to_string().contains("changed"), "{err}");
    }
}
