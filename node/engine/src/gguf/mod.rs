//! GGUF: the container of llama.cpp and bitnet.cpp model files (BITNET.md
//! §2b). [`GgufFile::open`] memory-maps a file and parses its header; tensor
//! data is borrowed from the map, never copied. [`Writer`] writes files that
//! llama.cpp's own gguf-py reads back.
//!
//! - [`types`]: ggml tensor type ids and sizes.
//! - `read`: the bounds-checked parser (pure; fuzzed).
//! - `write`: the writer.

mod read;
pub mod types;
mod write;

use std::fmt;
use std::path::Path;

pub use read::{DEFAULT_ALIGNMENT, MAX_DIMS, MAX_NAME, parse};
pub use types::{GgmlType, UnknownType};
pub use write::Writer;

use std::sync::Arc;

use crate::mmap::{Bytes, Mapped};

/// Why bytes are not a GGUF file Trine can read. Messages say what is wrong
/// and what to do; the caller adds the file name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error(
        "not a GGUF file (it starts with {found:02x?}, not \"GGUF\"); give a .gguf model file or a Hugging Face model directory"
    )]
    BadMagic { found: [u8; 4] },
    #[error(
        "GGUF version {0} is not supported (Trine reads versions 2 and 3); re-export the model with a current llama.cpp or gguf-py"
    )]
    UnsupportedVersion(u32),
    #[error(
        "the file ends inside the {what} at byte {offset}; it is truncated (an interrupted download or copy?): fetch it again"
    )]
    Truncated { what: String, offset: u64 },
    #[error(
        "the {what} at byte {offset} claims {count} entries but only {room} bytes remain; the file is corrupt: fetch it again"
    )]
    ImplausibleCount {
        what: String,
        count: u64,
        offset: u64,
        room: u64,
    },
    #[error("the {what} at byte {offset} is not valid UTF-8; the file is corrupt: fetch it again")]
    BadString { what: String, offset: u64 },
    #[error("metadata key {0} appears twice; the file is corrupt or badly written: re-export it")]
    DuplicateKey(String),
    #[error("metadata {key}: {problem}; the file is corrupt or badly written: re-export it")]
    BadValue { key: String, problem: String },
    #[error(
        "general.alignment is {0}, not a power of two up to 1 MiB; the file is corrupt: re-export it"
    )]
    BadAlignment(String),
    #[error("tensor {name}: {problem}; the file is corrupt or badly written: re-export it")]
    BadTensor { name: String, problem: String },
    #[error(
        "tensor {name} has {ty}, which Trine cannot read; re-export the model as I2_S, TQ2_0 or TQ1_0 (ternary weights) with F16/BF16/F32/Q8_0 for the rest"
    )]
    UnknownTensorType { name: String, ty: UnknownType },
    #[error(
        "tensor {name} lies outside the file (bytes {offset}..{} of a {data_len}-byte data section); the file is truncated: fetch it again",
        offset + size
    )]
    TensorOutOfBounds {
        name: String,
        offset: u64,
        size: u64,
        data_len: u64,
    },
    #[error("tensor {0} appears twice; the file is corrupt or badly written: re-export it")]
    DuplicateTensor(String),
    #[error(
        "tensors {first} and {second} overlap in the data section; the file is corrupt or badly written: re-export it"
    )]
    OverlappingTensors { first: String, second: String },
}

/// A metadata value.
#[derive(Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// GGUF's value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl fmt::Debug for Value {
    /// Short: long arrays show their length and first items only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) if s.chars().count() > 80 => {
                let head: String = s.chars().take(77).collect();
                write!(f, "{head:?}... ({} bytes)", s.len())
            }
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(items) if items.len() > 6 => {
                write!(f, "[{} items: {:?}, ...]", items.len(), &items[..3])
            }
            Value::Array(items) => f.debug_list().entries(items).finish(),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] (ne0) is the contiguous one (the K of a weight).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Relative to the start of the data section.
    pub offset: u64,
    /// Bytes of data, checked to lie inside the file.
    pub size: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Everything before the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// An open, memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    map: Arc<Mapped>,
    pub header: Header,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, crate::Error> {
        let map = Mapped::open(path)?;
        let header = parse(map.bytes()).map_err(|source| crate::Error::Gguf {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            map: Arc::new(map),
            header,
        })
    }

    /// The data of `tensor` (bounds were checked at open).
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + tensor.offset) as usize;
        &self.map.bytes()[start..start + tensor.size as usize]
    }

    /// The data of `tensor` as shared bytes of the mapping (no copy).
    pub fn bytes(&self, tensor: &TensorInfo) -> Bytes {
        let start = (self.header.data_offset + tensor.offset) as usize;
        Bytes::mapped(self.map.clone(), start..start + tensor.size as usize)
    }

    pub fn file_len(&self) -> u64 {
        self.map.bytes().len() as u64
    }
}
