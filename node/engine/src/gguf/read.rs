//! GGUF v2/v3 parsing from a byte slice (the memory-mapped file). Every
//! length and count read from the file is checked against the bytes that
//! remain before anything is allocated, so a hostile file cannot make the
//! parser allocate more than the file's own size.

use super::types::GgmlType;
use super::{Error, Header, TensorInfo, Value};

/// Nesting allowed for array values (arrays of arrays).
const MAX_DEPTH: usize = 4;
/// Longest tensor name accepted (ggml's limit is 64 bytes).
pub const MAX_NAME: usize = 256;
/// Most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: usize = 4;
/// Default alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        if n > self.remaining() {
            return Err(Error::Truncated {
                what: what.to_owned(),
                offset: self.pos as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long, checked against
    /// what is left of the file.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, Error> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_size.max(1)) as u64;
        if n > fits {
            return Err(Error::ImplausibleCount {
                what: what.to_owned(),
                count: n,
                offset: at,
                room: self.remaining() as u64,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, Error> {
        let at = self.pos as u64;
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::BadString {
            what: what.to_owned(),
            offset: at,
        })
    }
}

/// Parses the header, metadata and tensor table; checks that every tensor's
/// data lies inside the file, aligned, without overlapping another.
pub fn parse(bytes: &[u8]) -> Result<Header, Error> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(Error::BadMagic { found: magic });
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::UnsupportedVersion(version));
    }
    // A tensor info is at least 8 (name len) + 4 + 4 + 8 bytes; a KV at
    // least 8 (key len) + 4 (type) + 1 (value).
    let tensor_count = c.count("tensor count", 24)?;
    let kv_count = c.count("metadata count", 13)?;

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(kv_count.min(1024));
    for _ in 0..kv_count {
        let key = c.string("metadata key")?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(Error::DuplicateKey(key));
        }
        let ty = c.u32("metadata type")?;
        let value = value(&mut c, ty, &key, 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => return Err(Error::BadAlignment(format!("{v:?}"))),
        },
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count.min(4096));
    for _ in 0..tensor_count {
        tensors.push(tensor_info(&mut c)?);
    }

    let data_offset = align(c.pos as u64, alignment);
    let data_len = (bytes.len() as u64).saturating_sub(data_offset);
    check_tensors(&tensors, alignment, data_len)?;

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn value(c: &mut Cursor<'_>, ty: u32, key: &str, depth: usize) -> Result<Value, Error> {
    let what = || format!("value of {key}");
    Ok(match ty {
        0 => Value::U8(c.array::<1>(&what())?[0]),
        1 => Value::I8(i8::from_le_bytes(c.array(&what())?)),
        2 => Value::U16(u16::from_le_bytes(c.array(&what())?)),
        3 => Value::I16(i16::from_le_bytes(c.array(&what())?)),
        4 => Value::U32(c.u32(&what())?),
        5 => Value::I32(i32::from_le_bytes(c.array(&what())?)),
        6 => Value::F32(f32::from_le_bytes(c.array(&what())?)),
        7 => match c.array::<1>(&what())?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => {
                return Err(Error::BadValue {
                    key: key.to_owned(),
                    problem: format!("bool byte is {b}, not 0 or 1"),
                });
            }
        },
        8 => Value::String(c.string(&what())?),
        9 => {
            if depth >= MAX_DEPTH {
                return Err(Error::BadValue {
                    key: key.to_owned(),
                    problem: format!("arrays nested deeper than {MAX_DEPTH}"),
                });
            }
            let elem = c.u32(&what())?;
            let min = match elem {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                8 | 10..=12 => 8,
                9 => 12,
                other => {
                    return Err(Error::BadValue {
                        key: key.to_owned(),
                        problem: format!("array of unknown value type {other}"),
                    });
                }
            };
            let n = c.count(&format!("length of array {key}"), min)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(value(c, elem, key, depth + 1)?);
            }
            Value::Array(items)
        }
        10 => Value::U64(c.u64(&what())?),
        11 => Value::I64(i64::from_le_bytes(c.array(&what())?)),
        12 => Value::F64(f64::from_le_bytes(c.array(&what())?)),
        other => {
            return Err(Error::BadValue {
                key: key.to_owned(),
                problem: format!("unknown value type {other}"),
            });
        }
    })
}

fn tensor_info(c: &mut Cursor<'_>) -> Result<TensorInfo, Error> {
    let name = c.string("tensor name")?;
    if name.len() > MAX_NAME {
        return Err(Error::BadTensor {
            name: name.chars().take(64).collect(),
            problem: format!("its name is {} bytes long (at most {MAX_NAME})", name.len()),
        });
    }
    let n_dims = c.u32("tensor dimension count")? as usize;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(Error::BadTensor {
            name,
            problem: format!("it has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
        });
    }
    let mut dims = Vec::with_capacity(n_dims);
    for _ in 0..n_dims {
        dims.push(c.u64("tensor dimension")?);
    }
    let type_id = c.u32("tensor type")?;
    let offset = c.u64("tensor offset")?;
    let ty = GgmlType::from_id(type_id).map_err(|unknown| Error::UnknownTensorType {
        name: name.clone(),
        ty: unknown,
    })?;
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n > 0 && n <= 1 << 48)
        .ok_or_else(|| Error::BadTensor {
            name: name.clone(),
            problem: format!("its shape {dims:?} is empty or absurdly large"),
        })?;
    let size = ty
        .byte_size(dims[0], elements)
        .ok_or_else(|| Error::BadTensor {
            name: name.clone(),
            problem: format!(
                "its rows have {} elements, not a multiple of {} as type {ty} needs",
                dims[0],
                ty.block_elements()
            ),
        })?;
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        size,
    })
}

fn check_tensors(tensors: &[TensorInfo], alignment: u64, data_len: u64) -> Result<(), Error> {
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(Error::BadTensor {
                name: t.name.clone(),
                problem: format!(
                    "its data offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                ),
            });
        }
        if t.offset
            .checked_add(t.size)
            .is_none_or(|end| end > data_len)
        {
            return Err(Error::TensorOutOfBounds {
                name: t.name.clone(),
                offset: t.offset,
                size: t.size,
                data_len,
            });
        }
    }
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    for pair in order.windows(2) {
        if pair[0].name == pair[1].name {
            return Err(Error::DuplicateTensor(pair[0].name.clone()));
        }
    }
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        if pair[0].offset + pair[0].size > pair[1].offset {
            return Err(Error::OverlappingTensors {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}
