//! What the writer takes: a tree of nodes (directories, regular files, symlinks, device nodes,
//! fifos, sockets) with their metadata, in which a hardlink is a second name for the same
//! node, and the file contents behind a trait the caller implements ([`Contents`]): the
//! converter's are byte ranges of archive and layer files, a VM disk's are in memory
//! ([`InMemory`]).

use std::collections::BTreeMap;
use std::io;

/// A node's index in [`Tree::nodes`].
pub type NodeId = usize;
/// The root directory: always node 0.
pub const ROOT: NodeId = 0;

/// What a node is. `F` is the caller's handle on a regular file's content ([`Contents::File`]).
#[derive(Debug)]
pub enum Kind<F> {
    /// A directory and its entries by name (the same node under several names is a hardlink).
    Dir(BTreeMap<Vec<u8>, NodeId>),
    File(F),
    Symlink(Vec<u8>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

/// A node's metadata. Access, change and creation time are the modification time.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (the file type comes from the kind).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since 1970 (ext4 with 256-byte inodes stores 1901-12-13 to 2446-05-10).
    pub mtime: i64,
    /// Extended attributes as `getxattr` returns them (POSIX ACLs in the VFS format).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug)]
pub struct Node<F> {
    pub kind: Kind<F>,
    pub meta: Meta,
}

/// The file system's content: node [`ROOT`] is the root directory, every other node is
/// reached from it through directory entries.
#[derive(Debug)]
pub struct Tree<F> {
    pub nodes: Vec<Node<F>>,
}

impl<F> Tree<F> {
    /// A tree holding only the root directory.
    pub fn new(root: Meta) -> Self {
        Tree {
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: root,
            }],
        }
    }

    /// The entries of `dir`; `None` when it is not a directory.
    pub fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        match &self.nodes[dir].kind {
            Kind::Dir(children) => Some(children),
            _ => None,
        }
    }

    /// Adds `node` as `name` in directory `dir` and returns its id (a name already there now
    /// names the new node).
    ///
    /// # Panics
    /// When `dir` is not a directory.
    pub fn add(&mut self, dir: NodeId, name: &[u8], node: Node<F>) -> NodeId {
        self.nodes.push(node);
        let id = self.nodes.len() - 1;
        self.link(dir, name, id);
        id
    }

    /// Adds the existing node `target` as `name` in directory `dir` (a hardlink when `target`
    /// is not a directory).
    ///
    /// # Panics
    /// When `dir` is not a directory.
    pub fn link(&mut self, dir: NodeId, name: &[u8], target: NodeId) {
        match &mut self.nodes[dir].kind {
            Kind::Dir(children) => {
                children.insert(name.to_vec(), target);
            }
            _ => panic!("node {dir} is not a directory"),
        }
    }
}

/// Where the bytes of regular files come from.
pub trait Contents {
    /// The handle a [`Kind::File`] holds.
    type File;
    /// An open file, kept while its blocks are written.
    type Reader<'a>: ReadContent
    where
        Self: 'a;

    /// The size of `file` in bytes.
    fn len(&self, file: &Self::File) -> u64;

    /// Opens `file` for reading.
    fn open<'a>(&'a self, file: &'a Self::File) -> io::Result<Self::Reader<'a>>;
}

/// Positional reads of one file's content.
pub trait ReadContent {
    /// Fills `buf` with the bytes at `offset` of the content.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The byte ranges `[start, end)` of the first `len` bytes that hold data, in order; the
    /// rest are holes and stay holes in the file system. Asked only of large files.
    fn data_ranges(&self, len: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(vec![(0, len)])
    }
}

/// Contents held in memory: a [`Kind::File`] holds its bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct InMemory;

impl Contents for InMemory {
    type File = Vec<u8>;
    type Reader<'a> = &'a [u8];

    fn len(&self, file: &Vec<u8>) -> u64 {
        file.len() as u64
    }

    fn open<'a>(&'a self, file: &'a Vec<u8>) -> io::Result<&'a [u8]> {
        Ok(file)
    }
}

impl ReadContent for &[u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let part = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(part);
        Ok(())
    }
}
