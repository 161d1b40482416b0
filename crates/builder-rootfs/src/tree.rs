//! The merged root filesystem as an in-memory tree: layers are applied in order with Docker's
//! layer semantics (a later entry replaces an earlier one, whiteouts and opaque directories
//! hide lower layers, hardlinks share an inode), and every entry is validated as hostile input.
//! File contents stay in the archive: a node only records where its bytes are. The nodes are
//! the ext4 writer's own ([`builder_ext4::Tree`]), so the merged tree is its input as is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;

use crate::archive::{lossy, Span, Window};
use crate::error::{ConvertError, EntryProblem};
pub(crate) use builder_ext4::{Meta, NodeId, ROOT};

/// Deepest directory nesting accepted.
pub(crate) const MAX_DEPTH: usize = 256;
/// Longest name ext4 can store.
const MAX_NAME: usize = 255;
/// Longest symlink target ext4 can store with 4 KiB blocks.
const MAX_SYMLINK_TARGET: usize = 4095;
/// Timestamp for directories the image creates implicitly (a parent no entry describes).
pub(crate) const DEFAULT_MTIME: i64 = 1;
/// ext4 with 256-byte inodes stores seconds up to 2446-05-10.
const MAX_MTIME: u64 = 0x3_7FFF_FFFF;

pub(crate) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Directories every container has, whether or not its image defines them.
const MOUNT_POINTS: &[&[u8]] = &[b"dev", b"proc", b"sys"];
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
pub(crate) const OPAQUE: &[u8] = b".wh..wh..opq";

/// Where a regular file's bytes are: a span of one of the source files.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Content {
    pub source: usize,
    pub span: Span,
}

pub(crate) type Kind = builder_ext4::Kind<Content>;
pub(crate) type Node = builder_ext4::Node<Content>;

/// What the converter gives an entry no layer describes: owned by root, no xattrs,
/// [`DEFAULT_MTIME`].
fn synthetic(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: DEFAULT_MTIME,
        xattrs: Vec::new(),
    }
}

/// Limits on what one image may contain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_entries: u64,
}

pub(crate) struct Tree {
    /// The nodes, as the ext4 writer takes them.
    pub fs: builder_ext4::Tree<Content>,
    /// Tar entries applied so far (all layers), checked against `Limits::max_entries`.
    applied: u64,
    limits: Limits,
}

/// (parent, name) pairs one layer has put in place so far: whiteouts and opaque markers only
/// hide what lower layers provided.
#[derive(Default)]
pub(crate) struct Unpacked(HashSet<(NodeId, Vec<u8>)>);

/// A layer being applied: where its tar is and what it has unpacked so far.
pub(crate) struct LayerInput<'a> {
    /// Name used in error messages (the archive member).
    pub name: &'a str,
    pub file: &'a File,
    pub source: usize,
    pub span: Span,
}

impl Tree {
    pub fn new(limits: Limits) -> Self {
        Tree {
            fs: builder_ext4::Tree::new(synthetic(0o755)),
            applied: 0,
            limits,
        }
    }

    pub fn children(&self, id: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        self.fs.children(id)
    }

    fn children_mut(&mut self, id: NodeId) -> &mut BTreeMap<Vec<u8>, NodeId> {
        match &mut self.fs.nodes[id].kind {
            Kind::Dir(children) => children,
            _ => unreachable!("only directories are resolved as parents"),
        }
    }

    /// Adds the directories the container runtime (and our init) mounts on, when the image
    /// lacks them: `docker export` shows them too, as empty 0755 root directories. An image
    /// entry of another type at one of these names is left alone.
    pub fn add_mount_points(&mut self) {
        for name in MOUNT_POINTS {
            if self.children(ROOT).is_some_and(|c| !c.contains_key(*name)) {
                self.add_synthetic_dir(ROOT, name);
            }
        }
    }

    /// Puts a directory of our own at `/<dir>`, holding `files` (name, mode, content), owned by
    /// root. Whatever the image had at that name is replaced, as a later layer would replace
    /// it, so an image cannot redirect the injection with a planted symlink.
    pub fn inject(&mut self, dir: &[u8], files: &[(&[u8], u32, Content)]) {
        let mut children = BTreeMap::new();
        for &(name, mode, content) in files {
            self.fs.nodes.push(Node {
                kind: Kind::File(content),
                meta: synthetic(mode),
            });
            children.insert(name.to_vec(), self.fs.nodes.len() - 1);
        }
        self.fs.nodes.push(Node {
            kind: Kind::Dir(children),
            meta: synthetic(0o755),
        });
        let id = self.fs.nodes.len() - 1;
        self.children_mut(ROOT).insert(dir.to_vec(), id);
    }

    /// Applies one layer tar on top of the tree.
    pub fn apply_layer(&mut self, layer: &LayerInput<'_>) -> Result<(), ConvertError> {
        let corrupt = |source| ConvertError::CorruptLayer {
            layer: layer.name.to_owned(),
            source,
        };
        let mut pax = read_extension_headers(layer).map_err(corrupt)??;
        let mut unpacked = Unpacked::default();
        let mut archive = tar::Archive::new(Window::new(layer.file, layer.span));
        for entry in archive.entries_with_seek().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            self.count_entry()?;
            let raw_path = entry.path_bytes().into_owned();
            let invalid = |problem| ConvertError::InvalidEntry {
                layer: layer.name.to_owned(),
                entry: lossy(&raw_path),
                problem,
            };
            let entry_pax = pax.remove(&entry.raw_header_position());
            let parsed = parse_entry(&mut entry, layer, entry_pax).map_err(|e| match e {
                ParseError::Corrupt(io) => corrupt(io),
                ParseError::Invalid(problem) => invalid(problem),
            })?;
            let Some(parsed) = parsed else { continue };
            self.apply_path(&raw_path, Some(parsed), &mut unpacked)
                .map_err(invalid)?;
        }
        Ok(())
    }

    /// Counts one more layer entry against [`Limits::max_entries`].
    pub fn count_entry(&mut self) -> Result<(), ConvertError> {
        self.applied += 1;
        if self.applied > self.limits.max_entries {
            return Err(ConvertError::LimitExceeded {
                what: "tar entries",
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Applies one layer entry at `path`, a path as a layer tar names it. `entry` is `None` for
    /// a marker whose name says everything (`.wh.NAME`, `.wh..wh..opq`): how a layer directory's
    /// whiteouts and opaque directories are given.
    pub fn apply_path(
        &mut self,
        path: &[u8],
        entry: Option<Parsed>,
        unpacked: &mut Unpacked,
    ) -> Result<(), EntryProblem> {
        let components = split_path(path)?;
        self.apply_entry(components, entry, &mut unpacked.0)
    }

    fn apply_entry(
        &mut self,
        components: Vec<&[u8]>,
        entry: Option<Parsed>,
        unpacked: &mut HashSet<(NodeId, Vec<u8>)>,
    ) -> Result<(), EntryProblem> {
        let Some((name, parents)) = components.split_last() else {
            // The root directory itself. Its metadata never shows in a container: Docker
            // mounts the image under a root directory of its own (the container layer's).
            return match entry.map(|e| e.kind) {
                Some(ParsedKind::Dir) => Ok(()),
                _ => Err(EntryProblem::ReplacesRoot),
            };
        };
        if *name == OPAQUE {
            if let Some(dir) = self.lookup_dir(parents)? {
                self.make_opaque(dir, unpacked);
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if name.starts_with(WHITEOUT_META_PREFIX) {
                // Other AUFS metadata (.wh..wh.plnk, ...) carries nothing; Docker skips it.
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(EntryProblem::BadWhiteout);
            }
            if let Some(dir) = self.lookup_dir(parents)? {
                if !unpacked.contains(&(dir, hidden.to_vec())) {
                    self.children_mut(dir).remove(hidden);
                }
            }
            return Ok(());
        }
        let Some(entry) = entry else {
            return Err(EntryProblem::BadWhiteout);
        };
        let parent = self.make_parents(parents)?;
        let existing = self.children(parent).and_then(|c| c.get(*name)).copied();
        if let (Some(id), ParsedKind::Dir) = (existing, &entry.kind) {
            if matches!(self.fs.nodes[id].kind, Kind::Dir(_)) {
                self.fs.nodes[id].meta = entry.meta;
                unpacked.insert((parent, name.to_vec()));
                return Ok(());
            }
        }
        if existing.is_some() {
            self.children_mut(parent).remove(*name);
        }
        let id = match entry.kind {
            ParsedKind::Hardlink(target) => self.resolve_hardlink(&target)?,
            kind => {
                let kind = match kind {
                    ParsedKind::Dir => Kind::Dir(BTreeMap::new()),
                    ParsedKind::Other(kind) => kind,
                    ParsedKind::Hardlink(_) => unreachable!("handled above"),
                };
                self.fs.nodes.push(Node {
                    kind,
                    meta: entry.meta,
                });
                self.fs.nodes.len() - 1
            }
        };
        self.children_mut(parent).insert(name.to_vec(), id);
        unpacked.insert((parent, name.to_vec()));
        Ok(())
    }

    /// Removes everything below `dir` that this layer did not put there.
    fn make_opaque(&mut self, dir: NodeId, unpacked: &HashSet<(NodeId, Vec<u8>)>) {
        let names: Vec<Vec<u8>> = self
            .children(dir)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            if unpacked.contains(&(dir, name.clone())) {
                let child = self.children(dir).and_then(|c| c.get(&name)).copied();
                if let Some(child) =
                    child.filter(|&c| matches!(self.fs.nodes[c].kind, Kind::Dir(_)))
                {
                    self.make_opaque(child, unpacked);
                }
            } else {
                self.children_mut(dir).remove(&name);
            }
        }
    }

    /// `node`, reached through `path`, if it can be a parent: a real directory, not a symlink
    /// to one (that could lead anywhere) nor any other kind of entry.
    fn as_parent(&self, node: NodeId, path: &[&[u8]]) -> Result<NodeId, EntryProblem> {
        match &self.fs.nodes[node].kind {
            Kind::Dir(_) => Ok(node),
            Kind::Symlink(_) => Err(EntryProblem::ThroughSymlink {
                symlink: lossy(&path.join(&b'/')),
            }),
            _ => Err(EntryProblem::ThroughNonDirectory {
                component: lossy(&path.join(&b'/')),
            }),
        }
    }

    /// Adds an empty root-owned 0755 directory `name` under `parent`, as Docker creates a
    /// parent no entry describes.
    fn add_synthetic_dir(&mut self, parent: NodeId, name: &[u8]) -> NodeId {
        self.fs.nodes.push(Node {
            kind: Kind::Dir(BTreeMap::new()),
            meta: synthetic(0o755),
        });
        let id = self.fs.nodes.len() - 1;
        self.children_mut(parent).insert(name.to_vec(), id);
        id
    }

    /// Walks `components` from the root; each must be an existing real directory.
    /// `Ok(None)` when one is missing.
    fn lookup_dir(&self, components: &[&[u8]]) -> Result<Option<NodeId>, EntryProblem> {
        let mut current = ROOT;
        for (i, component) in components.iter().enumerate() {
            let Some(&child) = self.children(current).and_then(|c| c.get(*component)) else {
                return Ok(None);
            };
            current = self.as_parent(child, &components[..=i])?;
        }
        Ok(Some(current))
    }

    /// Like `lookup_dir`, but creates missing directories (root-owned, 0755) as Docker does.
    fn make_parents(&mut self, components: &[&[u8]]) -> Result<NodeId, EntryProblem> {
        let mut current = ROOT;
        for (i, component) in components.iter().enumerate() {
            let child = match self.children(current).and_then(|c| c.get(*component)) {
                Some(&child) => child,
                None => self.add_synthetic_dir(current, component),
            };
            current = self.as_parent(child, &components[..=i])?;
        }
        Ok(current)
    }

    fn resolve_hardlink(&self, target: &[u8]) -> Result<NodeId, EntryProblem> {
        let shown = lossy(target);
        let components = split_path(target).map_err(|problem| match problem {
            EntryProblem::AbsolutePath => EntryProblem::HardlinkAbsolute {
                target: shown.clone(),
            },
            EntryProblem::ParentComponent => EntryProblem::HardlinkParent {
                target: shown.clone(),
            },
            _ => EntryProblem::HardlinkMissing {
                target: shown.clone(),
            },
        })?;
        let Some((name, parents)) = components.split_last() else {
            return Err(EntryProblem::HardlinkToDirectory { target: shown });
        };
        let dir = self.lookup_dir(parents).map_err(|problem| match problem {
            EntryProblem::ThroughSymlink { symlink } => EntryProblem::HardlinkThroughSymlink {
                target: shown.clone(),
                symlink,
            },
            _ => EntryProblem::HardlinkMissing {
                target: shown.clone(),
            },
        })?;
        let node = dir
            .and_then(|dir| self.children(dir).and_then(|c| c.get(*name)).copied())
            .ok_or_else(|| EntryProblem::HardlinkMissing {
                target: shown.clone(),
            })?;
        if matches!(self.fs.nodes[node].kind, Kind::Dir(_)) {
            return Err(EntryProblem::HardlinkToDirectory { target: shown });
        }
        Ok(node)
    }
}

/// What a layer entry is, as far as the tree is concerned.
pub(crate) enum ParsedKind {
    Dir,
    /// A hardlink to the entry at this path (as a layer tar names it).
    Hardlink(Vec<u8>),
    Other(Kind),
}

/// One layer entry, read and checked.
pub(crate) struct Parsed {
    pub kind: ParsedKind,
    pub meta: Meta,
}

enum ParseError {
    Corrupt(std::io::Error),
    Invalid(EntryProblem),
}

impl From<EntryProblem> for ParseError {
    fn from(problem: EntryProblem) -> Self {
        ParseError::Invalid(problem)
    }
}

/// Reads type, metadata and xattrs (from `pax`, its PAX records) of one tar entry; `None` for
/// entries that carry nothing (PAX global headers).
fn parse_entry(
    entry: &mut tar::Entry<'_, Window<'_>>,
    layer: &LayerInput<'_>,
    pax: Option<EntryPax>,
) -> Result<Option<Parsed>, ParseError> {
    let header = entry.header();
    let entry_type = header.entry_type();
    if entry_type.is_pax_global_extensions() {
        return Ok(None);
    }
    let mode = header.mode().map_err(ParseError::Corrupt)? & 0o7777;
    let uid = header.uid().map_err(ParseError::Corrupt)?;
    let gid = header.gid().map_err(ParseError::Corrupt)?;
    let mtime = header.mtime().map_err(ParseError::Corrupt)?;
    check_mtime(mtime)?;
    let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
        (Ok(uid), Ok(gid)) => (uid, gid),
        _ => {
            return Err(ParseError::Corrupt(std::io::Error::other(
                "uid or gid above 2^32",
            )))
        }
    };
    let device = |entry: &tar::Entry<'_, Window<'_>>| -> Result<(u32, u32), ParseError> {
        let major = entry
            .header()
            .device_major()
            .map_err(ParseError::Corrupt)?
            .unwrap_or(0);
        let minor = entry
            .header()
            .device_minor()
            .map_err(ParseError::Corrupt)?
            .unwrap_or(0);
        Ok((major, minor))
    };
    let kind = match entry_type {
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let offset = entry.raw_file_position();
            let size = entry.size();
            if offset
                .checked_add(size)
                .is_none_or(|end| end > layer.span.len)
            {
                return Err(EntryProblem::Truncated {
                    offset,
                    size,
                    layer_size: layer.span.len,
                }
                .into());
            }
            ParsedKind::Other(Kind::File(Content {
                source: layer.source,
                span: Span {
                    offset: layer.span.offset + offset,
                    len: size,
                },
            }))
        }
        tar::EntryType::Directory => ParsedKind::Dir,
        tar::EntryType::Link => {
            ParsedKind::Hardlink(entry.link_name_bytes().unwrap_or_default().into_owned())
        }
        tar::EntryType::Symlink => {
            symlink(entry.link_name_bytes().unwrap_or_default().into_owned())?
        }
        tar::EntryType::Char => {
            let (major, minor) = device(entry)?;
            ParsedKind::Other(Kind::CharDevice { major, minor })
        }
        tar::EntryType::Block => {
            let (major, minor) = device(entry)?;
            ParsedKind::Other(Kind::BlockDevice { major, minor })
        }
        tar::EntryType::Fifo => ParsedKind::Other(Kind::Fifo),
        tar::EntryType::GNUSparse => return Err(EntryProblem::SparseUnsupported.into()),
        other => return Err(EntryProblem::UnsupportedType(other.as_byte() as char).into()),
    };
    let EntryPax {
        mut xattrs,
        gnu_sparse,
    } = pax.unwrap_or_default();
    if gnu_sparse {
        return Err(EntryProblem::SparseUnsupported.into());
    }
    let mut xattr_bytes = 0;
    for (name, value) in &xattrs {
        check_xattr(name, value, &mut xattr_bytes)?;
    }
    xattrs.sort();
    Ok(Some(Parsed {
        kind,
        meta: Meta {
            mode,
            uid,
            gid,
            mtime: mtime as i64,
            xattrs,
        },
    }))
}

/// Refuses an mtime (seconds since 1970) that ext4 cannot store.
pub(crate) fn check_mtime(mtime: u64) -> Result<(), EntryProblem> {
    if mtime > MAX_MTIME {
        return Err(EntryProblem::BadMtime { mtime });
    }
    Ok(())
}

/// A symlink to `target`, refused when ext4 cannot store the target.
pub(crate) fn symlink(target: Vec<u8>) -> Result<ParsedKind, EntryProblem> {
    if target.is_empty() || target.len() > MAX_SYMLINK_TARGET || target.contains(&0) {
        return Err(EntryProblem::BadSymlinkTarget);
    }
    Ok(ParsedKind::Other(Kind::Symlink(target)))
}

/// Checks one extended attribute of an entry: ext4 must be able to store its name (`user.`,
/// `trusted.`, `security.`, POSIX ACLs), and all of the entry's attributes must fit in one
/// xattr block. Adds its size to `total` (what the entry's attributes take so far).
pub(crate) fn check_xattr(
    name: &[u8],
    value: &[u8],
    total: &mut usize,
) -> Result<(), EntryProblem> {
    let footprint = (name.len() <= MAX_NAME && !name.contains(&0))
        .then(|| builder_ext4::xattr_footprint(name, value))
        .flatten()
        .ok_or_else(|| EntryProblem::BadXattrName { name: lossy(name) })?;
    *total += footprint;
    if *total > builder_ext4::XATTR_ROOM {
        return Err(EntryProblem::XattrsTooLarge {
            bytes: *total,
            max: builder_ext4::XATTR_ROOM,
        });
    }
    Ok(())
}

/// Largest PAX or GNU long-name header body accepted: the tar reader holds them in memory.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// What an entry's PAX extended header says that the converter uses.
#[derive(Default)]
struct EntryPax {
    /// `SCHILY.xattr.NAME` records: (NAME, value).
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A `GNU.sparse.*` record: the entry is a sparse file in a form not supported.
    gnu_sparse: bool,
}

/// Walks the raw headers of a layer before the tar reader does, refusing extension headers
/// (`x`, `g`, `L`, `K`) whose body would have to be held in memory whole, and reads each PAX
/// header's records by their lengths (values are binary: a `security.capability` can hold a
/// newline byte, which the tar crate's own record parser splits at). Returns them by the
/// position of the header they apply to. Stops quietly at anything it does not understand (bad
/// checksum, sparse entries, the end): the tar reader then reports that properly.
fn read_extension_headers(
    layer: &LayerInput<'_>,
) -> std::io::Result<Result<HashMap<u64, EntryPax>, ConvertError>> {
    use std::os::unix::fs::FileExt;
    let mut header = [0u8; 512];
    let mut pos = 0u64;
    let mut pax_size: Option<u64> = None;
    let mut pending = EntryPax::default();
    let mut by_entry = HashMap::new();
    while pos + 512 <= layer.span.len {
        layer
            .file
            .read_exact_at(&mut header, layer.span.offset + pos)?;
        let stored: u32 = std::str::from_utf8(&header[148..156])
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim_matches(|c| c == ' ' || c == '\0'), 8).ok())
            .unwrap_or(u32::MAX);
        let sum: u32 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        if header.iter().all(|&b| b == 0) || stored != sum {
            break;
        }
        let Some(size) = header_size(&header[124..136]) else {
            break;
        };
        let kind = header[156];
        let size = match kind {
            b'x' | b'g' | b'L' | b'K' => {
                if size > MAX_EXTENSION_BYTES {
                    let name = header[..100].split(|&b| b == 0).next().unwrap_or_default();
                    return Ok(Err(ConvertError::InvalidEntry {
                        layer: layer.name.to_owned(),
                        entry: lossy(name),
                        problem: EntryProblem::ExtensionTooLarge {
                            size,
                            max: MAX_EXTENSION_BYTES,
                        },
                    }));
                }
                if kind == b'x' && pos + 512 + size <= layer.span.len {
                    let mut body = vec![0; size as usize];
                    layer
                        .file
                        .read_exact_at(&mut body, layer.span.offset + pos + 512)?;
                    for (key, value) in pax_records(&body) {
                        if key == b"size" {
                            pax_size = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                        } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                            pending.xattrs.push((name.to_vec(), value.to_vec()));
                        } else if key.starts_with(b"GNU.sparse.") {
                            pending.gnu_sparse = true;
                        }
                    }
                }
                size
            }
            b'S' => break,
            _ => {
                let pax = std::mem::take(&mut pending);
                if !pax.xattrs.is_empty() || pax.gnu_sparse {
                    by_entry.insert(pos, pax);
                }
                pax_size.take().unwrap_or(size)
            }
        };
        let Some(next) = size
            .checked_next_multiple_of(512)
            .and_then(|s| (pos + 512).checked_add(s))
        else {
            break;
        };
        pos = next;
    }
    Ok(Ok(by_entry))
}

/// A tar numeric field: octal text, or base-256 when the high bit of the first byte is set.
fn header_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        return field[1..]
            .iter()
            .try_fold(u64::from(field[0] & 0x7f), |acc, &b| {
                acc.checked_mul(256).map(|v| v | u64::from(b))
            });
    }
    let text = std::str::from_utf8(field)
        .ok()?
        .trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The records (key, value) of a PAX extended header body, each `LEN KEY=VALUE\n` with LEN
/// counting the whole record; stops at the first malformed one.
fn pax_records(body: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut records = Vec::new();
    let mut rest = body;
    while let Some(space) = rest.iter().position(|&b| b == b' ') {
        let Some(len) = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|&l| l > space + 1 && l <= rest.len() && rest[l - 1] == b'\n')
        else {
            break;
        };
        let record = &rest[space + 1..len - 1];
        let Some(equals) = record.iter().position(|&b| b == b'=') else {
            break;
        };
        records.push((&record[..equals], &record[equals + 1..]));
        rest = &rest[len..];
    }
    records
}

/// Splits a layer path into components: `.` and empty components are dropped, absolute paths,
/// `..`, over-long names and over-deep paths are rejected. An empty result is the root.
fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, EntryProblem> {
    if path.is_empty() {
        return Err(EntryProblem::EmptyPath);
    }
    if path[0] == b'/' {
        return Err(EntryProblem::AbsolutePath);
    }
    let mut components = Vec::new();
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(EntryProblem::ParentComponent),
            name if name.len() > MAX_NAME => return Err(EntryProblem::NameTooLong),
            name => components.push(name),
        }
    }
    if components.len() > MAX_DEPTH {
        return Err(EntryProblem::TooDeep { max: MAX_DEPTH });
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_are_read_by_length_so_values_may_hold_newlines() {
        let value = b"\x01\x00\x00\x02\x0a\x00\x00\x00";
        let record = |key: &[u8], value: &[u8]| {
            // LEN counts itself: settle its digit count.
            let bare = key.len() + value.len() + 3; // space, '=', newline
            let mut len = bare + 1;
            while bare + len.to_string().len() != len {
                len = bare + len.to_string().len();
            }
            [format!("{len} ").as_bytes(), key, b"=", value, b"\n"].concat()
        };
        let body = [
            record(b"SCHILY.xattr.security.capability", value),
            record(b"size", b"12"),
        ]
        .concat();
        let records = pax_records(&body);
        assert_eq!(
            records,
            vec![
                (&b"SCHILY.xattr.security.capability"[..], &value[..]),
                (&b"size"[..], &b"12"[..])
            ]
        );
        assert!(
            pax_records(b"99 path=x\n").is_empty(),
            "a length past the end"
        );
    }

    #[test]
    fn paths_are_split_and_checked() {
        assert_eq!(split_path(b"./a//b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(split_path(b"./").unwrap().is_empty());
        assert!(matches!(
            split_path(b"/etc"),
            Err(EntryProblem::AbsolutePath)
        ));
        assert!(matches!(
            split_path(b"a/../../x"),
            Err(EntryProblem::ParentComponent)
        ));
        assert!(matches!(
            split_path(&[b'a'; 256]),
            Err(EntryProblem::NameTooLong)
        ));
    }
}
