//! The files a conversion reads file contents from: the image archive, gzip layers inflated
//! into the work area, and the files the converter injects. Tree nodes refer to them by index
//! ([`crate::tree::Content`]); the writer asks this module where a node's bytes are.

use std::fs::File;

use crate::tree::Content;

/// Every file that file contents are read from, by index.
#[derive(Default)]
pub(crate) struct Sources {
    files: Vec<File>,
}

impl Sources {
    /// Adds a source file; returns its index.
    pub fn add(&mut self, file: File) -> usize {
        self.files.push(file);
        self.files.len() - 1
    }

    pub fn file(&self, source: usize) -> &File {
        &self.files[source]
    }

    /// Where `content`'s bytes are.
    pub fn locate(&self, content: &Content) -> std::io::Result<Located<'_>> {
        Ok(Located {
            file: &self.files[content.source],
            offset: content.span.offset,
            len: content.span.len,
        })
    }
}

/// A file's content: `len` bytes at `offset` of [`Located::file`].
pub(crate) struct Located<'a> {
    file: &'a File,
    pub offset: u64,
    pub len: u64,
}

impl Located<'_> {
    pub fn file(&self) -> &File {
        self.file
    }
}
