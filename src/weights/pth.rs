//! PyTorch `.pth` state dicts: checked reading through candle and an atomic writer producing
//! what `torch.save(OrderedDict)` produces (a zip holding `archive/data.pkl`, a protocol-2
//! pickle, and one raw little-endian record per tensor under `archive/data/<key>`), loadable by
//! `torch.load(..., weights_only=True)`.

use crate::files::write_atomic;
use crate::weights::checked::CheckedTensors;
use crate::weights::pth_map::{MappedPth, PthIndex};
use crate::weights::shards::write_tensor_le;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Record folder inside the zip (torch uses the file stem or `archive`; readers accept any).
const ARCHIVE: &str = "archive";
/// torch aligns record data to 64 bytes so it can mmap them.
const ALIGN: u16 = 64;
/// Python's pickler writes SETITEMS in batches of this many pairs.
const BATCH: usize = 1000;

/// Write `tensors` (f32, f16, bf16, f64, u8 or i64) as a PyTorch state dict, atomically.
pub fn write_pth_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (name, _) in tensors {
        ensure!(seen.insert(name.as_str()), "tensor `{name}` given twice for {}", path.display());
    }
    let pickle = state_dict_pickle(tensors).with_context(|| format!("writing {}", path.display()))?;
    let id = serialization_id(&pickle);
    write_atomic(path, |f| {
        let mut zip = zip::ZipWriter::new(BufWriter::with_capacity(8 << 20, f));
        let opts = |bytes: u64| {
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .last_modified_time(zip::DateTime::default())
                .with_alignment(ALIGN)
                .large_file(bytes >= u32::MAX as u64)
        };
        let small = |zip: &mut zip::ZipWriter<_>, name: &str, data: &[u8]| -> Result<()> {
            zip.start_file(format!("{ARCHIVE}/{name}"), opts(data.len() as u64))?;
            zip.write_all(data)?;
            Ok(())
        };
        small(&mut zip, "data.pkl", &pickle)?;
        small(&mut zip, "byteorder", b"little")?;
        for (key, (name, t)) in tensors.iter().enumerate() {
            let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            zip.start_file(format!("{ARCHIVE}/data/{key}"), opts(bytes))?;
            write_tensor_le(&mut zip, t).with_context(|| format!("writing tensor `{name}`"))?;
        }
        small(&mut zip, "version", b"3\n")?;
        small(&mut zip, ".data/serialization_id", id.as_bytes())?;
        zip.finish()?.flush()?;
        Ok(())
    })
}

/// Open a `.pth` state dict as a `VarBuilder`, after checking that it is a PyTorch zip whose
/// tensor records are all present and long enough (candle's own errors name neither). Tensors
/// read through it are checked for a float dtype and finite values ([`super::checked`]).
pub fn open_pth(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let index = check_pth(path)?;
    // SAFETY: checkpoints must not change while a model loads from them (as for safetensors).
    let pth = unsafe { MappedPth::open(path, index) }
        .with_context(|| format!("opening PyTorch checkpoint {}", path.display()))?;
    Ok(VarBuilder::from_backend(Box::new(CheckedTensors::pth(pth, path.to_path_buf())), dtype, device.clone()))
}

/// Tensor names of a `.pth` state dict, sorted.
pub fn pth_tensor_names(path: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = check_pth(path)?.infos.into_iter().map(|i| i.name).collect();
    names.sort();
    Ok(names)
}

fn check_pth(path: &Path) -> Result<PthIndex> {
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("opening PyTorch checkpoint {shown}"))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        anyhow::anyhow!("{shown} is not a valid PyTorch zip checkpoint (torch.save's zip format is required): {e}")
    })?;
    ensure!(
        zip.file_names().any(|n| n.is_ok_and(|n| n.ends_with("data.pkl"))),
        "{shown} is a zip file but not a PyTorch checkpoint (no data.pkl inside)"
    );
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None)
        .with_context(|| format!("reading the pickled state dict of {shown}"))?;
    ensure!(
        !infos.is_empty(),
        "{shown} holds no tensors at its top level (a state dict nested under a key such as `model` is not supported)"
    );
    let mut records = HashMap::new();
    for info in &infos {
        let layout = &info.layout;
        ensure!(
            layout.is_contiguous() || layout.is_fortran_contiguous(),
            "{shown}: tensor `{}` is stored with non-contiguous strides {:?}",
            info.name,
            layout.stride()
        );
        // candle keeps the storage offset in bytes for pth tensors.
        let need = (layout.start_offset() + layout.shape().elem_count() * info.dtype.size_in_bytes()) as u64;
        let (have, start) = match zip.by_name(&info.path) {
            Ok(f) => {
                ensure!(
                    f.compression() == zip::CompressionMethod::Stored,
                    "{shown}: record {} of tensor `{}` is compressed ({}); torch.save stores records \
                     uncompressed: re-save the state dict with torch.save",
                    info.path,
                    info.name,
                    f.compression()
                );
                (f.size(), f.data_start())
            }
            Err(_) => bail!("{shown}: record {} of tensor `{}` is missing", info.path, info.name),
        };
        ensure!(
            have >= need,
            "{shown} is truncated: tensor `{}` needs {need} bytes of record {} but it has {have}",
            info.name,
            info.path
        );
        let start = start.with_context(|| format!("{shown}: no data offset for record {}", info.path))?;
        records.insert(info.path.clone(), (start as usize, have as usize));
    }
    Ok(PthIndex { infos, records })
}

fn storage_class(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "FloatStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F64 => "DoubleStorage",
        DType::U8 => "ByteStorage",
        DType::I64 => "LongStorage",
        other => bail!("dtype {other:?} has no PyTorch storage candle can read"),
    })
}

/// A protocol-2 pickle of `OrderedDict{name: _rebuild_tensor_v2(storage, 0, size, stride,
/// False, OrderedDict())}`, storage `i` being `persistent_load(('storage', <Storage>, 'i',
/// 'cpu', numel))`, i.e. what `torch.save` emits for a contiguous state dict.
fn state_dict_pickle(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut p = Pickler::default();
    p.out.extend_from_slice(&[0x80, 2]); // PROTO 2
    p.global("collections", "OrderedDict");
    p.out.extend_from_slice(b")R"); // EMPTY_TUPLE REDUCE
    for (b, batch) in tensors.chunks(BATCH).enumerate() {
        p.out.push(b'('); // MARK
        for (i, (name, t)) in batch.iter().enumerate() {
            let key = b * BATCH + i;
            let class = storage_class(t.dtype()).with_context(|| format!("tensor `{name}`"))?;
            p.unicode(name);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.out.extend_from_slice(b"(("); // MARK (args) MARK (persistent id)
            p.memo_unicode("storage");
            p.global("torch", class);
            p.unicode(&key.to_string());
            p.memo_unicode("cpu");
            p.int(t.elem_count() as u64);
            p.out.extend_from_slice(b"tQ"); // TUPLE BINPERSID
            p.int(0); // storage offset
            p.tuple(t.dims());
            p.tuple(&contiguous_strides(t.dims()));
            p.out.push(0x89); // NEWFALSE: requires_grad
            p.global("collections", "OrderedDict");
            p.out.extend_from_slice(b")R"); // backward hooks: OrderedDict()
            p.out.extend_from_slice(b"tR"); // TUPLE REDUCE
        }
        p.out.push(b'u'); // SETITEMS
    }
    p.out.push(b'.'); // STOP
    Ok(p.out)
}

fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

/// Just the pickle opcodes a state dict needs; repeated globals and constant strings go
/// through the memo like Python's pickler does.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    memo: HashMap<String, u32>,
}

impl Pickler {
    fn memoized(&mut self, id: &str) -> bool {
        if let Some(&m) = self.memo.get(id) {
            match u8::try_from(m) {
                Ok(m) => self.out.extend_from_slice(&[b'h', m]), // BINGET
                Err(_) => {
                    self.out.push(b'j'); // LONG_BINGET
                    self.out.extend_from_slice(&m.to_le_bytes());
                }
            }
            return true;
        }
        false
    }

    fn put(&mut self, id: &str) {
        let m = self.memo.len() as u32;
        self.memo.insert(id.to_string(), m);
        match u8::try_from(m) {
            Ok(m) => self.out.extend_from_slice(&[b'q', m]), // BINPUT
            Err(_) => {
                self.out.push(b'r'); // LONG_BINPUT
                self.out.extend_from_slice(&m.to_le_bytes());
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        let id = format!("g:{module}.{name}");
        if !self.memoized(&id) {
            self.out.push(b'c'); // GLOBAL
            self.out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self.put(&id);
        }
    }

    fn unicode(&mut self, s: &str) {
        self.out.push(b'X'); // BINUNICODE
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn memo_unicode(&mut self, s: &str) {
        let id = format!("s:{s}");
        if !self.memoized(&id) {
            self.unicode(s);
            self.put(&id);
        }
    }

    fn int(&mut self, v: u64) {
        if v < 0x100 {
            self.out.extend_from_slice(&[b'K', v as u8]); // BININT1
        } else if v < 0x1_0000 {
            self.out.push(b'M'); // BININT2
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= i32::MAX as u64 {
            self.out.push(b'J'); // BININT
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, shortest form with a clear sign bit.
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] & 0x80 == 0 {
                bytes.pop();
            }
            if bytes[bytes.len() - 1] & 0x80 != 0 {
                bytes.push(0);
            }
            self.out.extend_from_slice(&[0x8a, bytes.len() as u8]);
            self.out.extend_from_slice(&bytes);
        }
    }

    fn tuple(&mut self, items: &[usize]) {
        if items.is_empty() {
            self.out.push(b')'); // EMPTY_TUPLE
            return;
        }
        self.out.push(b'('); // MARK
        for &i in items {
            self.int(i as u64);
        }
        self.out.push(b't'); // TUPLE
    }
}

/// torch writes a per-file id in `.data/serialization_id`; any 40-character string will do,
/// so derive it from the content to keep outputs deterministic.
fn serialization_id(pickle: &[u8]) -> String {
    use crate::hash::{fnv1a, FNV_OFFSET, GOLDEN};
    format!("{:020}{:020}", fnv1a(FNV_OFFSET, pickle), fnv1a(FNV_OFFSET ^ GOLDEN, pickle))
}
