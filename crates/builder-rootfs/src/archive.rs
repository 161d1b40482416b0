//! The outer image archive: an index of its members (name → byte range) built in one pass over
//! the tar headers, without extracting anything, and a bounded reader over one byte range.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::ConvertError;

/// How many symlink members may be chained when resolving a member name.
const MAX_MEMBER_LINKS: usize = 8;

/// A byte range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub offset: u64,
    pub len: u64,
}

enum Member {
    File(Span),
    /// A symlink member; Docker 20.10's `docker save` writes `../<id>/layer.tar` links when
    /// two layers have the same content.
    Link(String),
}

/// The members of the outer archive.
pub(crate) struct ArchiveIndex {
    path: PathBuf,
    file: File,
    members: HashMap<String, Member>,
}

impl ArchiveIndex {
    /// Reads every tar header of `path` (seeking over the data) and records its members.
    pub fn open(path: &Path) -> Result<Self, ConvertError> {
        let file = File::open(path).map_err(|source| ConvertError::ReadArchive {
            path: path.to_owned(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| ConvertError::ReadArchive {
                path: path.to_owned(),
                source,
            })?
            .len();
        let corrupt = |reason: String| ConvertError::CorruptArchive {
            path: path.to_owned(),
            reason,
        };
        let mut members = HashMap::new();
        let mut archive = tar::Archive::new(Window::new(&file, Span { offset: 0, len }));
        let entries = archive
            .entries_with_seek()
            .map_err(|e| corrupt(e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| corrupt(e.to_string()))?;
            let raw_name = entry.path_bytes();
            let name = normalize_member(&raw_name)
                .ok_or_else(|| corrupt(format!("member name {:?} is invalid", lossy(&raw_name))))?;
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let span = Span {
                        offset: entry.raw_file_position(),
                        len: entry.size(),
                    };
                    if span
                        .offset
                        .checked_add(span.len)
                        .is_none_or(|end| end > len)
                    {
                        return Err(corrupt(format!(
                            "member {name:?} runs past the end of the file"
                        )));
                    }
                    Member::File(span)
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    Member::Link(String::from_utf8_lossy(&target).into_owned())
                }
                _ => continue,
            };
            if members.insert(name.clone(), member).is_some() {
                return Err(corrupt(format!("member {name:?} appears twice")));
            }
        }
        Ok(ArchiveIndex {
            path: path.to_owned(),
            file,
            members,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The byte range of member `name`, following symlink members that stay inside the archive.
    pub fn span(&self, name: &str) -> Result<Span, ConvertError> {
        let missing = |reason: &str| ConvertError::MissingMember {
            member: name.to_owned(),
            reason: reason.to_owned(),
        };
        let mut current = normalize_member(name.as_bytes())
            .ok_or_else(|| missing("the name is absolute or leaves the archive"))?;
        for _ in 0..=MAX_MEMBER_LINKS {
            match self.members.get(&current) {
                None => return Err(missing("no such member")),
                Some(Member::File(span)) => return Ok(*span),
                Some(Member::Link(target)) => {
                    let base = current.rsplit_once('/').map_or("", |(dir, _)| dir);
                    let joined = if target.starts_with('/') {
                        return Err(missing("a symlink member points outside the archive"));
                    } else if base.is_empty() {
                        target.clone()
                    } else {
                        format!("{base}/{target}")
                    };
                    current = normalize_member(joined.as_bytes())
                        .ok_or_else(|| missing("a symlink member points outside the archive"))?;
                }
            }
        }
        Err(missing("too many symlink members in a chain"))
    }

    /// Reads a whole member into memory (for small JSON documents), refusing anything over `max`.
    pub fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>, ConvertError> {
        let span = self.span(name)?;
        if span.len > max {
            return Err(ConvertError::InvalidMetadata {
                member: name.to_owned(),
                reason: format!(
                    "{} bytes is more than the {max} a metadata document may have",
                    span.len
                ),
            });
        }
        let mut buf = vec![0; span.len as usize];
        self.file
            .read_exact_at(&mut buf, span.offset)
            .map_err(|source| ConvertError::ReadArchive {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }
}

/// Normalizes a member name: drops `.` components and empty ones, resolves `..` without ever
/// climbing above the archive root (None if it would, or if the name is absolute).
fn normalize_member(name: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(name).ok()?;
    if name.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `Read + Seek` view of a byte range of a file, with reads positioned by `pread` so several
/// windows can share one file.
pub(crate) struct Window<'a> {
    file: &'a File,
    span: Span,
    pos: u64,
}

impl<'a> Window<'a> {
    pub fn new(file: &'a File, span: Span) -> Self {
        Window { file, span, pos: 0 }
    }
}

impl Read for Window<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.span.len.saturating_sub(self.pos);
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self
            .file
            .read_at(&mut buf[..want], self.span.offset + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.span.len.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_member;

    #[test]
    fn member_names_never_leave_the_archive() {
        assert_eq!(
            normalize_member(b"./abc/layer.tar").as_deref(),
            Some("abc/layer.tar")
        );
        assert_eq!(
            normalize_member(b"abc/../def/layer.tar").as_deref(),
            Some("def/layer.tar")
        );
        assert_eq!(normalize_member(b"../etc/passwd"), None);
        assert_eq!(normalize_member(b"/etc/passwd"), None);
        assert_eq!(normalize_member(b"a/../../b"), None);
    }
}
