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

    /// The file and byte offset where `content` starts, and its length.
    pub fn locate(&self, content: &Content) -> (&File, u64, u64) {
        (
            &self.files[content.source],
            content.span.offset,
            content.span.len,
        )
    }
}
