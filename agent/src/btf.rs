//! A small reader for the kernel's BTF type information (`/sys/kernel/btf/vmlinux`, format in
//! the kernel's `Documentation/bpf/btf.rst`), just enough to find struct member offsets.
//!
//! Tapir cannot rely on libbpf's CO-RE relocations, so the offsets its kernel programs need
//! are looked up here at start-up ([`kernel_offsets`]) and handed to them as constants.
//!
//! Every read is bounds-checked: a malformed blob yields a [`BtfError`], never a panic.

use std::ops::Range;
use std::path::{Path, PathBuf};

use agent_common::KernelOffsets;

/// Where the running kernel exposes its own BTF.
pub const VMLINUX_PATH: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const VERSION: u8 = 1;
/// Size of the version-1 header; `hdr_len` may be larger (newer fields we ignore).
const HEADER_LEN: usize = 24;
/// `struct btf_type`: name_off, info, size/type.
const TYPE_LEN: usize = 12;
/// Cap on modifier/array chains and anonymous-member nesting. Real kernels need a handful;
/// the cap only stops reference cycles in malformed input from looping forever.
const MAX_DEPTH: u32 = 64;

// BTF kinds (`BTF_KIND_*`).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Bytes of kind-specific data that follow a `struct btf_type`, or `None` for an unknown
/// kind (whose length we cannot know, so the type list cannot be walked past it).
fn trailing_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT => 4,                         // encoding, bit offset, bit count
        KIND_ARRAY => 12,                      // struct btf_array
        KIND_STRUCT | KIND_UNION => vlen * 12, // struct btf_member
        KIND_ENUM => vlen * 8,                 // struct btf_enum
        KIND_FUNC_PROTO => vlen * 8,           // struct btf_param
        KIND_VAR => 4,                         // struct btf_var (linkage)
        KIND_DATASEC => vlen * 12,             // struct btf_var_secinfo
        KIND_DECL_TAG => 4,                    // struct btf_decl_tag (component_idx)
        KIND_ENUM64 => vlen * 12,              // struct btf_enum64
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        _ => return None,
    })
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        0 => "void",
        KIND_INT => "int",
        KIND_PTR => "ptr",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "fwd",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "func",
        KIND_FUNC_PROTO => "func_proto",
        KIND_VAR => "var",
        KIND_DATASEC => "datasec",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl_tag",
        KIND_TYPE_TAG => "type_tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown",
    }
}

/// Everything that can go wrong reading BTF or looking a member up in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read btf from {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a BTF blob (magic {0:#06x})")]
    BadMagic(u16),
    #[error("unsupported btf version {0}")]
    BadVersion(u8),
    #[error("malformed btf header: {0}")]
    BadHeader(&'static str),
    #[error("btf truncated at type #{0}")]
    Truncated(u32),
    #[error("unknown btf kind {kind} at type #{id}")]
    UnknownKind { id: u32, kind: u32 },
    #[error("btf string offset {0} is out of range or unterminated")]
    BadString(u32),
    #[error("btf type #{0} does not exist")]
    BadTypeId(u32),
    #[error("btf type #{id} ({kind}) has no size")]
    Unsized { id: u32, kind: &'static str },
    #[error("btf type chain at type #{0} is too deep (reference cycle?)")]
    TooDeep(u32),
    #[error("btf offset or size overflows at type #{0}")]
    Overflow(u32),
    #[error("no struct or union named `{0}` in btf")]
    NoStruct(String),
    #[error("struct `{strukt}` has no member `{member}`")]
    NoMember { strukt: String, member: String },
    #[error("bitfield `{strukt}.{member}` is unsupported")]
    Bitfield { strukt: String, member: String },
}

type Result<T, E = BtfError> = std::result::Result<T, E>;

/// Where a member sits in its (outermost) struct.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberInfo {
    /// Offset in bytes; for a bitfield, the byte holding its first bit.
    pub byte_offset: u32,
    /// Offset in bits from the start of the struct.
    pub bit_offset: u32,
    /// Width in bits if the member is a bitfield, else 0.
    pub bitfield_size: u32,
    /// Size in bytes of the member's type (through typedefs and qualifiers); for a bitfield,
    /// that of its underlying integer.
    pub size: u32,
    /// BTF id of the member's type.
    pub type_id: u32,
}

/// A named struct or union, for the name index (offsets into `Btf::data`, no copies).
struct NameEntry {
    start: usize,
    end: usize,
    id: u32,
}

/// The fixed part of one type record.
#[derive(Clone, Copy)]
struct RawType {
    id: u32,
    info: u32,
    /// `size` for sized kinds, `type` for referencing ones.
    size_or_type: u32,
    /// Offset in `Btf::data` of the kind-specific trailing data.
    extra: usize,
}

impl RawType {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> u32 {
        self.info & 0xffff
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }
    fn is_composite(&self) -> bool {
        matches!(self.kind(), KIND_STRUCT | KIND_UNION)
    }
}

/// Parsed BTF: the raw blob plus an index of where each type record starts.
pub struct Btf {
    data: Vec<u8>,
    big_endian: bool,
    strings: Range<usize>,
    /// `type_offsets[id - 1]` is where type `id` starts in `data` (id 0 is `void`).
    type_offsets: Vec<u32>,
    /// Named structs and unions sorted by name, ties kept in id order.
    composites: Vec<NameEntry>,
    /// Pointer size: BTF `PTR` has none, so it is taken from the `long` integer type.
    ptr_size: u32,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("bytes", &self.data.len())
            .field("types", &self.type_offsets.len())
            .field("composites", &self.composites.len())
            .field("big_endian", &self.big_endian)
            .finish()
    }
}

fn read_u32(data: &[u8], off: usize, big_endian: bool) -> Option<u32> {
    let bytes: [u8; 4] = data.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    })
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self> {
        Self::from_file(VMLINUX_PATH)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_vec(data)
    }

    /// Parses a raw BTF blob (header, type section, string section).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        Self::from_vec(bytes.to_vec())
    }

    fn from_vec(data: Vec<u8>) -> Result<Self> {
        let magic = match data.get(..2) {
            Some(&[a, b]) => u16::from_le_bytes([a, b]),
            _ => return Err(BtfError::BadHeader("shorter than its header")),
        };
        // The blob is in the byte order of the kernel that wrote it; accept either.
        let big_endian = match magic {
            MAGIC => false,
            m if m.swap_bytes() == MAGIC => true,
            m => return Err(BtfError::BadMagic(m)),
        };
        match data.get(2) {
            Some(&VERSION) => {}
            Some(&v) => return Err(BtfError::BadVersion(v)),
            None => return Err(BtfError::BadHeader("shorter than its header")),
        }
        // Offsets are stored as u32 below.
        if u32::try_from(data.len()).is_err() {
            return Err(BtfError::BadHeader("blob larger than 4 GiB"));
        }
        let field = |off| {
            read_u32(&data, off, big_endian)
                .map(|v| v as usize)
                .ok_or(BtfError::BadHeader("shorter than its header"))
        };
        let hdr_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        if hdr_len < HEADER_LEN || hdr_len > data.len() {
            return Err(BtfError::BadHeader("header length out of range"));
        }
        // Section offsets are relative to the end of the header.
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            let end = start.checked_add(len)?;
            (end <= data.len()).then_some(start..end)
        };
        let types =
            section(type_off, type_len).ok_or(BtfError::BadHeader("type section out of bounds"))?;
        let strings =
            section(str_off, str_len).ok_or(BtfError::BadHeader("string section out of bounds"))?;
        // Offset 0 must be the empty string: it names every anonymous type and member.
        if strings.is_empty() || data.get(strings.start) != Some(&0) {
            return Err(BtfError::BadHeader(
                "string section does not start with an empty string",
            ));
        }

        let mut btf = Btf {
            data: Vec::new(), // moved in once the walk below is done
            big_endian,
            strings,
            type_offsets: Vec::with_capacity(type_len / 16),
            composites: Vec::new(),
            ptr_size: std::mem::size_of::<usize>() as u32,
        };
        let mut off = types.start;
        let mut id: u32 = 1;
        while off < types.end {
            let rd = |o: usize| read_u32(&data, o, big_endian).ok_or(BtfError::Truncated(id));
            if off + TYPE_LEN > types.end {
                return Err(BtfError::Truncated(id));
            }
            let (name_off, info, size) = (rd(off)?, rd(off + 4)?, rd(off + 8)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = trailing_len(kind, vlen).ok_or(BtfError::UnknownKind { id, kind })?;
            let next = off + TYPE_LEN + extra;
            if next > types.end {
                return Err(BtfError::Truncated(id));
            }
            match kind {
                // Anonymous composites cannot be looked up by name: leave them out.
                KIND_STRUCT | KIND_UNION if name_off != 0 => {
                    let name = btf.str_range(&data, name_off)?;
                    btf.composites.push(NameEntry {
                        start: name.start,
                        end: name.end,
                        id,
                    });
                }
                KIND_INT if (1..=16).contains(&size) => {
                    let name = btf.str_range(&data, name_off)?;
                    if matches!(
                        data.get(name),
                        Some(b"long int" | b"long unsigned int" | b"long" | b"unsigned long")
                    ) {
                        btf.ptr_size = size;
                    }
                }
                _ => {}
            }
            btf.type_offsets.push(off as u32);
            off = next;
            id += 1;
        }
        btf.data = data;
        // Stable sort: among equal names the lowest id stays first.
        let bytes = &btf.data;
        btf.composites.sort_by(|a, b| {
            let name = |e: &NameEntry| bytes.get(e.start..e.end).unwrap_or_default();
            name(a).cmp(name(b))
        });
        Ok(btf)
    }

    /// Number of types, not counting `void` (so the highest id).
    pub fn type_count(&self) -> u32 {
        self.type_offsets.len() as u32
    }

    /// The bytes (without NUL) of the string at `name_off`, as a range of `data`.
    fn str_range(&self, data: &[u8], name_off: u32) -> Result<Range<usize>> {
        let bad = || BtfError::BadString(name_off);
        let start = self
            .strings
            .start
            .checked_add(name_off as usize)
            .ok_or_else(bad)?;
        let section = data.get(start..self.strings.end).ok_or_else(bad)?;
        let len = section.iter().position(|&b| b == 0).ok_or_else(bad)?;
        Ok(start..start + len)
    }

    fn name(&self, name_off: u32) -> Result<&[u8]> {
        let range = self.str_range(&self.data, name_off)?;
        self.data.get(range).ok_or(BtfError::BadString(name_off))
    }

    fn u32_at(&self, off: usize, id: u32) -> Result<u32> {
        read_u32(&self.data, off, self.big_endian).ok_or(BtfError::Truncated(id))
    }

    fn raw(&self, id: u32) -> Result<RawType> {
        let off = id
            .checked_sub(1)
            .and_then(|i| self.type_offsets.get(i as usize).copied())
            .ok_or(BtfError::BadTypeId(id))? as usize;
        Ok(RawType {
            id,
            info: self.u32_at(off + 4, id)?,
            size_or_type: self.u32_at(off + 8, id)?,
            extra: off + TYPE_LEN,
        })
    }

    /// Ids of the named structs and unions called `name`, lowest id first.
    fn composites_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u32> + 'a {
        let name = name.as_bytes();
        let entry_name = |e: &NameEntry| self.data.get(e.start..e.end).unwrap_or_default();
        let first = self.composites.partition_point(|e| entry_name(e) < name);
        self.composites[first..]
            .iter()
            .take_while(move |e| entry_name(e) == name)
            .map(|e| e.id)
    }

    /// Follows typedefs and qualifiers (const, volatile, restrict, type tags).
    fn skip_modifiers(&self, mut id: u32) -> Result<u32> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let t = self.raw(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::TooDeep(id))
    }

    /// Size in bytes of type `id`.
    pub fn type_size(&self, id: u32) -> Result<u32> {
        let start = id;
        let mut count: u32 = 1;
        let mut id = id;
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Err(BtfError::Unsized { id, kind: "void" });
            }
            let t = self.raw(id)?;
            let size = match t.kind() {
                KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION | KIND_FLOAT
                | KIND_DATASEC => t.size_or_type,
                KIND_PTR => self.ptr_size,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                    continue;
                }
                KIND_ARRAY => {
                    // btf_array: element type, index type, element count.
                    let nelems = self.u32_at(t.extra + 8, id)?;
                    count = count.checked_mul(nelems).ok_or(BtfError::Overflow(start))?;
                    id = self.u32_at(t.extra, id)?;
                    continue;
                }
                kind => {
                    return Err(BtfError::Unsized {
                        id,
                        kind: kind_name(kind),
                    })
                }
            };
            return count.checked_mul(size).ok_or(BtfError::Overflow(start));
        }
        Err(BtfError::TooDeep(start))
    }

    /// Size in bytes of the first complete struct or union called `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32> {
        let id = self
            .composites_named(name)
            .next()
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        self.type_size(id)
    }

    /// Where `member` sits in struct (or union) `strukt`, looking into anonymous nested
    /// structs and unions as C does. Among several types of that name, the first that has
    /// the member wins (forward declarations never do).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<MemberInfo> {
        let mut any = false;
        if !member.is_empty() {
            for id in self.composites_named(strukt) {
                any = true;
                if let Some(info) = self.find_member(id, member.as_bytes(), 0, 0)? {
                    return Ok(info);
                }
            }
        } else {
            any = self.composites_named(strukt).next().is_some();
        }
        if any {
            Err(BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })
        } else {
            Err(BtfError::NoStruct(strukt.to_owned()))
        }
    }

    /// Searches composite `id`, which starts `base` bits into the outermost struct.
    fn find_member(
        &self,
        id: u32,
        member: &[u8],
        base: u32,
        depth: u32,
    ) -> Result<Option<MemberInfo>> {
        if depth >= MAX_DEPTH {
            return Err(BtfError::TooDeep(id));
        }
        let t = self.raw(id)?;
        if !t.is_composite() {
            return Ok(None);
        }
        for i in 0..t.vlen() as usize {
            // btf_member: name_off, type, offset.
            let m = t.extra + i * 12;
            let (name_off, ty, raw_off) = (
                self.u32_at(m, id)?,
                self.u32_at(m + 4, id)?,
                self.u32_at(m + 8, id)?,
            );
            // With kind_flag, `offset` packs the bitfield width in its top byte.
            let (bit_off, bits) = if t.kind_flag() {
                (raw_off & 0x00ff_ffff, raw_off >> 24)
            } else {
                (raw_off, 0)
            };
            let at = base.checked_add(bit_off).ok_or(BtfError::Overflow(id))?;
            if name_off != 0 && self.name(name_off)? == member {
                return self.member_info(&t, ty, at, bits).map(Some);
            }
            if name_off == 0 {
                let inner = self.skip_modifiers(ty)?;
                if inner != 0 && self.raw(inner)?.is_composite() {
                    if let Some(found) = self.find_member(inner, member, at, depth + 1)? {
                        return Ok(Some(found));
                    }
                }
            }
        }
        Ok(None)
    }

    fn member_info(&self, parent: &RawType, ty: u32, at: u32, bits: u32) -> Result<MemberInfo> {
        let size = self.type_size(ty)?;
        let (mut at, mut bits) = (at, bits);
        if !parent.kind_flag() {
            // Without kind_flag a bitfield is encoded in the int type it refers to: fewer
            // bits than its size, possibly starting at an extra bit offset.
            let leaf = self.raw(self.skip_modifiers(ty)?)?;
            if leaf.kind() == KIND_INT {
                let enc = self.u32_at(leaf.extra, leaf.id)?;
                let (nr_bits, int_off) = (enc & 0xff, (enc >> 16) & 0xff);
                if int_off != 0 || u64::from(nr_bits) != u64::from(size) * 8 {
                    bits = nr_bits;
                    at = at
                        .checked_add(int_off)
                        .ok_or(BtfError::Overflow(parent.id))?;
                }
            }
        }
        Ok(MemberInfo {
            byte_offset: at / 8,
            bit_offset: at,
            bitfield_size: bits,
            size,
            type_id: ty,
        })
    }
}

/// Offset of a member that the kernel programs read whole: bitfields are refused.
fn plain_member(btf: &Btf, strukt: &str, member: &str) -> Result<MemberInfo> {
    let info = btf.member_offset(strukt, member)?;
    if info.bitfield_size != 0 {
        return Err(BtfError::Bitfield {
            strukt: strukt.to_owned(),
            member: member.to_owned(),
        });
    }
    Ok(info)
}

/// Fills every offset the kernel programs need from the kernel's BTF. The `skc_*` offsets
/// are relative to `struct sock` (which embeds `struct sock_common` as `__sk_common`).
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets> {
    let off = |s: &str, m: &str| plain_member(btf, s, m).map(|i| i.byte_offset);
    // `__sk_common` is at offset 0 on every kernel, but adding it costs nothing.
    let sk_common = off("sock", "__sk_common")?;
    let skc = |m: &str| {
        off("sock_common", m)?
            .checked_add(sk_common)
            .ok_or(BtfError::Overflow(0))
    };
    // Old kernels packed sk_protocol into a bitfield; the programs only read whole fields.
    let protocol = plain_member(btf, "sock", "sk_protocol")?;
    Ok(KernelOffsets {
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdtable_max_fds: off("fdtable", "max_fds")?,
        fdtable_fd: off("fdtable", "fd")?,
        file_private_data: off("file", "private_data")?,
        file_f_inode: off("file", "f_inode")?,
        inode_i_mode: off("inode", "i_mode")?,
        socket_type: off("socket", "type")?,
        socket_sk: off("socket", "sk")?,
        sock_protocol: protocol.byte_offset,
        skc_family: skc("skc_family")?,
        skc_daddr: skc("skc_daddr")?,
        skc_rcv_saddr: skc("skc_rcv_saddr")?,
        skc_dport: skc("skc_dport")?,
        skc_num: skc("skc_num")?,
        skc_v6_daddr: skc("skc_v6_daddr")?,
        skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
        sock_protocol_size: protocol.size,
        task_stack: off("task_struct", "stack")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds BTF blobs for tests; types get ids 1, 2, … in the order they are added.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
        big_endian: bool,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
                big_endian: false,
            }
        }

        fn put(buf: &mut Vec<u8>, v: u32, big_endian: bool) {
            buf.extend_from_slice(&if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        }

        fn u32(&mut self, v: u32) {
            Self::put(&mut self.types, v, self.big_endian);
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn ty(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size_or_type: u32) -> u32 {
            let name = self.str(name);
            self.u32(name);
            self.u32(u32::from(kflag) << 31 | kind << 24 | vlen);
            self.u32(size_or_type);
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32, bits: u32, bit_off: u32) -> u32 {
            let id = self.ty(name, KIND_INT, 0, false, size);
            self.u32(bit_off << 16 | bits);
            id
        }

        fn array(&mut self, elem: u32, index: u32, nelems: u32) -> u32 {
            let id = self.ty("", KIND_ARRAY, 0, false, 0);
            self.u32(elem);
            self.u32(index);
            self.u32(nelems);
            id
        }

        /// `members`: (name, type, raw offset field).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kflag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.ty(name, kind, members.len() as u32, kflag, size);
            for &(m, ty, off) in members {
                let m = self.str(m);
                self.u32(m);
                self.u32(ty);
                self.u32(off);
            }
            id
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.composite(KIND_STRUCT, name, size, false, members)
        }

        fn build(&self) -> Vec<u8> {
            let be = self.big_endian;
            let mut out = Vec::new();
            let magic = if be {
                MAGIC.to_be_bytes()
            } else {
                MAGIC.to_le_bytes()
            };
            out.extend_from_slice(&magic);
            out.extend_from_slice(&[VERSION, 0]);
            for v in [
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                Self::put(&mut out, v, be);
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// `struct sock_common` shaped like the kernel's: addresses in an anonymous union
    /// holding an anonymous struct.
    fn sock_common(b: &mut Builder) -> u32 {
        let u32_t = b.int("unsigned int", 4, 32, 0);
        let u64_t = b.int("long long unsigned int", 8, 64, 0);
        let be32 = b.ty("__be32", KIND_TYPEDEF, 0, false, u32_t);
        let inner = b.strukt(
            "",
            8,
            &[("skc_daddr", be32, 0), ("skc_rcv_saddr", be32, 32)],
        );
        let union = b.composite(
            KIND_UNION,
            "",
            8,
            false,
            &[("skc_addrpair", u64_t, 0), ("", inner, 0)],
        );
        b.strukt(
            "sock_common",
            24,
            &[
                ("skc_hash", u32_t, 0),
                ("", union, 64),
                ("skc_tail", u64_t, 128),
            ],
        )
    }

    #[test]
    fn finds_members_in_anonymous_nested_union() {
        let mut b = Builder::new();
        sock_common(&mut b);
        let btf = Btf::parse(&b.build()).unwrap();
        let daddr = btf.member_offset("sock_common", "skc_daddr").unwrap();
        assert_eq!(
            (daddr.byte_offset, daddr.bit_offset, daddr.size),
            (8, 64, 4)
        );
        assert_eq!(daddr.bitfield_size, 0);
        let saddr = btf.member_offset("sock_common", "skc_rcv_saddr").unwrap();
        assert_eq!((saddr.byte_offset, saddr.size), (12, 4));
        let pair = btf.member_offset("sock_common", "skc_addrpair").unwrap();
        assert_eq!((pair.byte_offset, pair.size), (8, 8));
        assert_eq!(
            btf.member_offset("sock_common", "skc_tail")
                .unwrap()
                .byte_offset,
            16
        );
        assert_eq!(btf.struct_size("sock_common").unwrap(), 24);
    }

    #[test]
    fn big_endian_blobs_parse_too() {
        let mut b = Builder::new();
        b.big_endian = true;
        sock_common(&mut b);
        let btf = Btf::parse(&b.build()).unwrap();
        let saddr = btf.member_offset("sock_common", "skc_rcv_saddr").unwrap();
        assert_eq!((saddr.byte_offset, saddr.size), (12, 4));
    }

    #[test]
    fn kind_flag_bitfields() {
        let mut b = Builder::new();
        let u32_t = b.int("unsigned int", 4, 32, 0);
        let u16_t = b.int("short unsigned int", 2, 16, 0);
        // struct { unsigned int a:4, b:12; u16 c; }
        b.composite(
            KIND_STRUCT,
            "bits",
            8,
            true,
            &[
                ("a", u32_t, 4 << 24),
                ("b", u32_t, 12 << 24 | 4),
                ("c", u16_t, 32),
            ],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        let a = btf.member_offset("bits", "a").unwrap();
        assert_eq!((a.bit_offset, a.bitfield_size, a.size), (0, 4, 4));
        let bf = btf.member_offset("bits", "b").unwrap();
        assert_eq!(
            (bf.byte_offset, bf.bit_offset, bf.bitfield_size),
            (0, 4, 12)
        );
        // A kind_flag struct member with width 0 is an ordinary member.
        let c = btf.member_offset("bits", "c").unwrap();
        assert_eq!((c.byte_offset, c.bitfield_size, c.size), (4, 0, 2));
    }

    #[test]
    fn legacy_int_encoded_bitfields() {
        let mut b = Builder::new();
        let u32_t = b.int("unsigned int", 4, 32, 0);
        let bits8 = b.int("unsigned int", 4, 8, 0);
        let bits3_at2 = b.int("unsigned int", 4, 3, 2);
        b.strukt(
            "old",
            8,
            &[
                ("whole", u32_t, 0),
                ("proto", bits8, 40),
                ("flags", bits3_at2, 48),
            ],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        let whole = btf.member_offset("old", "whole").unwrap();
        assert_eq!(whole.bitfield_size, 0);
        let proto = btf.member_offset("old", "proto").unwrap();
        assert_eq!(
            (proto.byte_offset, proto.bitfield_size, proto.size),
            (5, 8, 4)
        );
        let flags = btf.member_offset("old", "flags").unwrap();
        assert_eq!((flags.bit_offset, flags.bitfield_size), (50, 3));
    }

    #[test]
    fn sizes_resolve_through_typedef_chains_and_arrays() {
        let mut b = Builder::new();
        let u16_t = b.int("short unsigned int", 2, 16, 0);
        let td1 = b.ty("__u16", KIND_TYPEDEF, 0, false, u16_t);
        let cst = b.ty("", KIND_CONST, 0, false, td1);
        let vol = b.ty("", KIND_VOLATILE, 0, false, cst);
        let td2 = b.ty("umode_t", KIND_TYPEDEF, 0, false, vol);
        let idx = b.int("int", 4, 32, 0);
        let arr = b.array(td2, idx, 3);
        let arr2 = b.array(arr, idx, 2);
        let long = b.int("long int", 8, 64, 0);
        let tag = b.ty("rcu", KIND_TYPE_TAG, 0, false, long);
        let ptr = b.ty("", KIND_PTR, 0, false, tag);
        b.strukt(
            "inode",
            32,
            &[
                ("i_mode", td2, 0),
                ("grid", arr2, 16),
                ("p", ptr, 128),
                ("l", long, 192),
            ],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        let mode = btf.member_offset("inode", "i_mode").unwrap();
        assert_eq!((mode.size, mode.type_id), (2, td2));
        assert_eq!(btf.member_offset("inode", "grid").unwrap().size, 12);
        assert_eq!(btf.member_offset("inode", "p").unwrap().size, 8);
        assert_eq!(btf.member_offset("inode", "l").unwrap().byte_offset, 24);
    }

    #[test]
    fn first_complete_struct_with_the_member_wins() {
        let mut b = Builder::new();
        let u32_t = b.int("unsigned int", 4, 32, 0);
        b.ty("file", KIND_FWD, 0, false, 0);
        b.strukt("file", 4, &[("other", u32_t, 0)]);
        b.strukt("file", 16, &[("pad", u32_t, 0), ("f_inode", u32_t, 64)]);
        b.strukt("file", 16, &[("f_inode", u32_t, 96)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_offset("file", "f_inode").unwrap().byte_offset, 8);
        assert_eq!(btf.member_offset("file", "other").unwrap().byte_offset, 0);
    }

    #[test]
    fn lookup_errors_name_what_is_missing() {
        let mut b = Builder::new();
        let u32_t = b.int("unsigned int", 4, 32, 0);
        b.strukt("sock", 4, &[("sk_type", u32_t, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        let err = btf.member_offset("sock", "sk_protocol").unwrap_err();
        assert_eq!(err.to_string(), "struct `sock` has no member `sk_protocol`");
        let err = btf.member_offset("nope", "x").unwrap_err();
        assert_eq!(err.to_string(), "no struct or union named `nope` in btf");
        assert!(matches!(
            btf.member_offset("sock", ""),
            Err(BtfError::NoMember { .. })
        ));
        // "unsigned int" is an int, not a struct.
        assert!(matches!(
            btf.member_offset("unsigned int", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_bad_magic_and_version() {
        let mut blob = Builder::new().build();
        blob[0] = 0x7f;
        blob[1] = 0x45;
        let err = Btf::parse(&blob).unwrap_err();
        assert!(matches!(err, BtfError::BadMagic(0x457f)), "{err}");
        assert_eq!(err.to_string(), "not a BTF blob (magic 0x457f)");

        let mut blob = Builder::new().build();
        blob[2] = 2;
        assert!(matches!(Btf::parse(&blob), Err(BtfError::BadVersion(2))));
        assert!(matches!(Btf::parse(&[]), Err(BtfError::BadHeader(_))));
        assert!(matches!(
            Btf::parse(&blob[..10]),
            Err(BtfError::BadVersion(2))
        ));
    }

    #[test]
    fn truncated_blobs_are_rejected() {
        let mut b = Builder::new();
        sock_common(&mut b);
        let blob = b.build();
        // Cutting the file short leaves sections pointing past the end.
        for len in 0..blob.len() {
            assert!(Btf::parse(&blob[..len]).is_err(), "accepted {len} bytes");
        }
        // A type section ending inside a record: the inner struct (#4) loses its last
        // member; its string section moves along so that only the types are short.
        let mut cut = blob.clone();
        let struct4_end: u32 = 16 + 16 + 12 + (12 + 2 * 12); // int, int, typedef, struct
        cut[12..16].copy_from_slice(&(struct4_end - 5).to_le_bytes());
        let err = Btf::parse(&cut).unwrap_err();
        assert_eq!(err.to_string(), "btf truncated at type #4");
        // Only a header is left of #4.
        cut[12..16].copy_from_slice(&(struct4_end - 30).to_le_bytes());
        assert_eq!(
            Btf::parse(&cut).unwrap_err().to_string(),
            "btf truncated at type #4"
        );
        // Sanity: cutting exactly after #4 is fine.
        cut[12..16].copy_from_slice(&struct4_end.to_le_bytes());
        assert_eq!(Btf::parse(&cut).unwrap().type_count(), 4);
    }

    #[test]
    fn unknown_kind_and_bad_strings_are_errors() {
        let mut b = Builder::new();
        b.ty("x", 25, 0, false, 0);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::UnknownKind { id: 1, kind: 25 })
        ));
        let mut b = Builder::new();
        let id = b.ty("", KIND_STRUCT, 0, false, 0);
        assert_eq!(id, 1);
        let mut blob = b.build();
        blob[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(Btf::parse(&blob), Err(BtfError::BadString(1000))));
    }

    #[test]
    fn cycles_do_not_hang() {
        let mut b = Builder::new();
        // Typedef #1 → #2 → #1, and a struct whose anonymous member is itself.
        b.ty("a", KIND_TYPEDEF, 0, false, 2);
        b.ty("b", KIND_TYPEDEF, 0, false, 1);
        b.strukt("loop", 4, &[("", 3, 0), ("x", 1, 0)]);
        b.strukt("self", 4, &[("x", 1, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(matches!(btf.type_size(1), Err(BtfError::TooDeep(_))));
        assert!(matches!(
            btf.member_offset("loop", "x"),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_offset("self", "x"),
            Err(BtfError::TooDeep(_))
        ));
    }

    /// A tiny "kernel" with every struct `kernel_offsets` needs.
    fn fake_kernel(protocol_bitfield: bool) -> Vec<u8> {
        let mut b = Builder::new();
        let common = sock_common(&mut b); // ids 1..=6
        let u16_t = b.int("short unsigned int", 2, 16, 0);
        let u8_t = b.int("unsigned char", 1, 8, 0);
        let long = b.int("long unsigned int", 8, 64, 0);
        let void_ptr = b.ty("", KIND_PTR, 0, false, 0);
        let in6 = b.array(u8_t, u16_t, 16);
        let fields = [
            ("skc_dport", u16_t, 12 * 8),
            ("skc_num", u16_t, 14 * 8),
            ("skc_family", u16_t, 16 * 8),
            ("skc_v6_daddr", in6, 56 * 8),
            ("skc_v6_rcv_saddr", in6, 72 * 8),
        ];
        // Real sock_common keeps these in a second anonymous union; reuse the first layout
        // from `sock_common` via a wrapper to keep the test short.
        let extra = b.strukt("", 88, &fields);
        b.strukt("sock_common", 88, &[("", common, 0), ("", extra, 0)]);
        if protocol_bitfield {
            b.composite(
                KIND_STRUCT,
                "sock",
                128,
                true,
                &[
                    ("__sk_common", common, 0),
                    ("sk_protocol", u8_t, 8 << 24 | 800),
                ],
            )
        } else {
            b.strukt(
                "sock",
                128,
                &[("__sk_common", common, 0), ("sk_protocol", u16_t, 800)],
            )
        };
        b.strukt(
            "task_struct",
            64,
            &[("stack", void_ptr, 24 * 8), ("files", void_ptr, 40 * 8)],
        );
        b.strukt("files_struct", 64, &[("fdt", void_ptr, 32 * 8)]);
        b.strukt(
            "fdtable",
            16,
            &[("max_fds", u16_t, 0), ("fd", void_ptr, 64)],
        );
        b.strukt(
            "file",
            64,
            &[("f_inode", void_ptr, 64), ("private_data", long, 128)],
        );
        b.strukt("inode", 8, &[("i_mode", u16_t, 0)]);
        b.strukt("socket", 48, &[("type", u16_t, 32), ("sk", void_ptr, 192)]);
        b.build()
    }

    #[test]
    fn kernel_offsets_from_a_fake_kernel() {
        let btf = Btf::parse(&fake_kernel(false)).unwrap();
        let k = kernel_offsets(&btf).unwrap();
        assert_eq!((k.task_files, k.task_stack), (40, 24));
        assert_eq!(k.files_fdt, 32);
        assert_eq!((k.fdtable_max_fds, k.fdtable_fd), (0, 8));
        assert_eq!((k.file_f_inode, k.file_private_data), (8, 16));
        assert_eq!(k.inode_i_mode, 0);
        assert_eq!((k.socket_type, k.socket_sk), (4, 24));
        assert_eq!((k.sock_protocol, k.sock_protocol_size), (100, 2));
        // The first sock_common named so (the bare one from `sock_common`) lacks skc_num,
        // so the later complete one is used.
        assert_eq!((k.skc_daddr, k.skc_rcv_saddr), (8, 12));
        assert_eq!((k.skc_dport, k.skc_num, k.skc_family), (12, 14, 16));
        assert_eq!((k.skc_v6_daddr, k.skc_v6_rcv_saddr), (56, 72));
    }

    #[test]
    fn bitfield_sk_protocol_is_refused() {
        let btf = Btf::parse(&fake_kernel(true)).unwrap();
        let err = kernel_offsets(&btf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bitfield `sock.sk_protocol` is unsupported"
        );
    }

    #[test]
    fn real_vmlinux() {
        let read = std::time::Instant::now();
        let bytes = match std::fs::read(VMLINUX_PATH) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipping: cannot read {VMLINUX_PATH}: {e}");
                return;
            }
        };
        eprintln!("read {VMLINUX_PATH} in {:?}", read.elapsed());
        let start = std::time::Instant::now();
        let btf = Btf::parse(&bytes).unwrap();
        let parsed = start.elapsed();
        let k = kernel_offsets(&btf).unwrap();
        let total = start.elapsed();
        eprintln!(
            "parsed {} bytes of {VMLINUX_PATH} ({} types) in {parsed:?}, offsets in {total:?}",
            bytes.len(),
            btf.type_count()
        );
        eprintln!("{k:#?}");

        let common = btf.struct_size("sock_common").unwrap();
        assert!(k.skc_family < common && k.skc_family < 64);
        assert!(k.skc_v6_daddr + 16 <= common && k.skc_v6_rcv_saddr + 16 <= common);
        assert_ne!(k.skc_v6_daddr, k.skc_v6_rcv_saddr);
        // Layout facts stable for over a decade: address pair then port pair.
        assert_eq!(k.skc_rcv_saddr, k.skc_daddr + 4);
        assert_eq!(k.skc_num, k.skc_dport + 2);
        assert_eq!(k.sock_protocol_size, 2);
        assert!(k.sock_protocol >= common);
        assert_eq!(
            btf.member_offset("sock", "__sk_common")
                .unwrap()
                .byte_offset,
            0
        );
        assert_ne!(k.task_files, 0);
        assert_ne!(k.file_f_inode, k.file_private_data);
        assert_ne!(k.socket_type, k.socket_sk);
        assert_ne!(k.fdtable_max_fds, k.fdtable_fd);
        for (m, size) in [("skc_daddr", 4), ("skc_dport", 2), ("skc_family", 2)] {
            assert_eq!(
                btf.member_offset("sock_common", m).unwrap().size,
                size,
                "{m}"
            );
        }
        for (s, m) in [
            ("task_struct", "files"),
            ("socket", "sk"),
            ("file", "f_inode"),
        ] {
            assert_eq!(btf.member_offset(s, m).unwrap().size, 8, "{s}.{m}");
        }
    }

    fn poke_all_lookups(btf: &Btf) {
        let _ = kernel_offsets(btf);
        for name in ["sock_common", "bits", "loop", "", "x"] {
            for member in ["skc_daddr", "a", "x", ""] {
                let _ = btf.member_offset(name, member);
            }
            let _ = btf.struct_size(name);
        }
        for id in 0..btf.type_count().saturating_add(2) {
            let _ = btf.type_size(id);
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(btf) = Btf::parse(&bytes) {
                poke_all_lookups(&btf);
            }
        }

        #[test]
        fn random_body_behind_valid_header_never_panics(
            body in proptest::collection::vec(any::<u8>(), 0..1024),
            split in 0usize..1024,
            big_endian in any::<bool>(),
        ) {
            let split = split.min(body.len());
            let mut b = Builder::new();
            b.big_endian = big_endian;
            b.types = body[..split].to_vec();
            b.strings = body[split..].to_vec();
            if let Ok(btf) = Btf::parse(&b.build()) {
                poke_all_lookups(&btf);
            }
        }

        #[test]
        fn corrupted_valid_blobs_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut blob = fake_kernel(false);
            for (at, v) in edits {
                let n = blob.len();
                blob[at % n] = v;
            }
            if let Ok(btf) = Btf::parse(&blob) {
                poke_all_lookups(&btf);
            }
        }
    }
}
