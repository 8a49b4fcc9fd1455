//! Sharded safetensors: checked opening (index, shard presence, headers, data lengths) before
//! candle mmaps anything, and atomic writers (temp file in the same folder + fsync + rename).
//!
//! candle's own errors for a missing shard or a truncated file do not say which file is at
//! fault, so every file is checked here first and errors name the file and the index.

use crate::files::write_atomic;
use crate::weights::checked::CheckedTensors;
pub use crate::weights::checked::TensorEntry;
use crate::weights::hub::ModelSource;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(target_endian = "big")]
compile_error!("checkpoint writers store host-order bytes and assume a little-endian target");

/// safetensors' own limit on the JSON header size.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// `model.safetensors.index.json` as written by `transformers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardIndex {
    #[serde(default)]
    pub metadata: IndexMetadata,
    pub weight_map: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IndexMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<u64>,
}

/// A checked set of safetensors files and a `VarBuilder` over all of them.
pub struct SafetensorsFiles {
    pub vb: VarBuilder<'static>,
    pub files: Vec<PathBuf>,
    /// The index the shards came from, if any.
    pub index: Option<PathBuf>,
    tensors: Arc<BTreeMap<String, TensorEntry>>,
}

impl SafetensorsFiles {
    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// What to call this checkpoint in messages (the index or the single file).
    pub fn describe(&self) -> String {
        match (&self.index, self.files.as_slice()) {
            (Some(i), f) => format!("{} ({} shards)", i.display(), f.len()),
            (None, [f]) => f.display().to_string(),
            (None, f) => format!("{} safetensors files starting with {}", f.len(), f[0].display()),
        }
    }

    /// Up to `n` names that look like `name` (shared leading and trailing dotted parts), for
    /// "did you mean" diagnostics when a key is missing.
    pub fn similar(&self, name: &str, n: usize) -> Vec<&str> {
        let want: Vec<&str> = name.split('.').collect();
        let mut scored: Vec<(usize, &str)> = self
            .names()
            .filter_map(|k| {
                let have: Vec<&str> = k.split('.').collect();
                let head = want.iter().zip(&have).take_while(|(a, b)| a == b).count();
                let tail = want.iter().rev().zip(have.iter().rev()).take_while(|(a, b)| a == b).count();
                let score = head + tail;
                (score > 0).then_some((score, k))
            })
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        scored.into_iter().take(n).map(|(_, k)| k).collect()
    }
}

/// Open `model.safetensors.index.json` (preferred) or `model.safetensors` from `source`.
pub fn open_safetensors(source: &ModelSource, dtype: DType, device: &Device) -> Result<SafetensorsFiles> {
    open_safetensors_stem(source, "model", dtype, device)
}

/// Like [`open_safetensors`] for `<stem>.safetensors[.index.json]` (e.g. `adapter_model`).
pub fn open_safetensors_stem(
    source: &ModelSource,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<SafetensorsFiles> {
    let index_name = format!("{stem}.safetensors.index.json");
    let single_name = format!("{stem}.safetensors");
    let found = if source.has(&index_name) {
        Found::Index(source.file(&index_name)?)
    } else if source.has(&single_name) {
        Found::Single(source.file(&single_name)?)
    } else {
        // Online, `has` relies on the hub's file listing; if that failed, let a direct fetch
        // either succeed or say why (network, auth) instead of a bare "not found".
        let msg = format!("neither {index_name} nor {single_name} found in {}", source.describe());
        match source {
            ModelSource::Hub(h) if !h.options.offline => match source.file(&index_name) {
                Ok(p) => Found::Index(p),
                Err(_) => Found::Single(source.file(&single_name).context(msg)?),
            },
            _ => bail!(msg),
        }
    };
    match found {
        Found::Single(p) => open_safetensors_paths(&[p], dtype, device),
        Found::Index(p) => open_indexed(source, p, dtype, device),
    }
}

enum Found {
    Index(PathBuf),
    Single(PathBuf),
}

fn open_indexed(source: &ModelSource, index_path: PathBuf, dtype: DType, device: &Device) -> Result<SafetensorsFiles> {
    let index = read_index(&index_path)?;
    let mut shard_names: Vec<&String> = index.weight_map.values().collect();
    shard_names.sort();
    shard_names.dedup();
    // Every shard must be there before anything is mapped.
    let mut files = Vec::with_capacity(shard_names.len());
    let mut missing = Vec::new();
    let mut first_err = None;
    for s in &shard_names {
        match source.file(s) {
            Ok(p) => files.push(p),
            Err(e) => {
                missing.push(s.as_str());
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.context(format!(
            "missing shard file(s) {} listed in {} ({})",
            missing.join(", "),
            index_path.display(),
            source.describe()
        )));
    }
    let headers = files.iter().map(|f| read_safetensors_header(f)).collect::<Result<Vec<_>>>()?;
    for (tensor, shard) in &index.weight_map {
        let i = shard_names.binary_search(&shard).expect("shard listed above");
        if !headers[i].tensors.contains_key(tensor) {
            bail!(
                "{} says tensor `{tensor}` is in {shard}, but {} does not contain it",
                index_path.display(),
                files[i].display()
            );
        }
    }
    open_checked(files, headers, Some(index_path), dtype, device)
}

/// Open explicit safetensors files (no index).
pub fn open_safetensors_paths(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<SafetensorsFiles> {
    ensure!(!paths.is_empty(), "no safetensors files given");
    for p in paths {
        ensure!(p.is_file(), "safetensors file {} not found", p.display());
    }
    let headers = paths.iter().map(|f| read_safetensors_header(f)).collect::<Result<Vec<_>>>()?;
    open_checked(paths.to_vec(), headers, None, dtype, device)
}

fn open_checked(
    files: Vec<PathBuf>,
    headers: Vec<SafetensorsHeader>,
    index: Option<PathBuf>,
    dtype: DType,
    device: &Device,
) -> Result<SafetensorsFiles> {
    let mut tensors = BTreeMap::new();
    for (i, h) in headers.into_iter().enumerate() {
        for (name, (dtype, shape)) in h.tensors {
            tensors.insert(name, TensorEntry { dtype, shape, file: i });
        }
    }
    let tensors = Arc::new(tensors);
    // Safety: the files were validated just above; mmapped checkpoints must not be modified
    // while the builder lives (the usual contract of candle's mmapped loading).
    let backend = unsafe { CheckedTensors::safetensors(&files, tensors.clone()) }
        .with_context(|| format!("memory-mapping {}", files[0].display()))?;
    // Every tensor read through `vb` is checked for a float dtype and finite values.
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    Ok(SafetensorsFiles { vb, files, index, tensors })
}

/// Parse and check an index file.
pub fn read_index(path: &Path) -> Result<ShardIndex> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading safetensors index {}", path.display()))?;
    let index: ShardIndex =
        serde_json::from_str(&text).with_context(|| format!("cannot parse safetensors index {}", path.display()))?;
    ensure!(!index.weight_map.is_empty(), "safetensors index {} has an empty weight_map", path.display());
    Ok(index)
}

/// The validated header of one safetensors file.
#[derive(Debug, Clone, Default)]
pub struct SafetensorsHeader {
    pub metadata: HashMap<String, String>,
    /// name -> (dtype, shape)
    pub tensors: HashMap<String, (String, Vec<usize>)>,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Read a safetensors header and check that the file holds exactly the bytes it describes.
pub fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    let shown = path.display();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening safetensors file {shown}"))?;
    let len = f.metadata()?.len();
    ensure!(len >= 8, "safetensors file {shown} is truncated ({len} bytes, no header)");
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    ensure!(n <= MAX_HEADER_BYTES, "safetensors file {shown} is not a valid safetensors file (header length {n})");
    ensure!(
        8 + n <= len,
        "safetensors file {shown} is truncated: its header needs {} bytes, the file has {len}",
        8 + n
    );
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).with_context(|| format!("safetensors file {shown} has a corrupt header"))?;
    let mut metadata = HashMap::new();
    let mut entries = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .with_context(|| format!("safetensors file {shown}: __metadata__ is not a string map"))?;
            continue;
        }
        let e: RawEntry = serde_json::from_value(value)
            .with_context(|| format!("safetensors file {shown}: bad header entry `{name}`"))?;
        let size = dtype_bytes(&e.dtype).with_context(|| format!("safetensors file {shown}: tensor `{name}`"))?;
        let want = e.shape.iter().product::<usize>() as u64 * size;
        ensure!(
            e.data_offsets.0 <= e.data_offsets.1 && e.data_offsets.1 - e.data_offsets.0 == want,
            "safetensors file {shown}: tensor `{name}` has data offsets {:?} but shape {:?} of {} needs {want} bytes",
            e.data_offsets,
            e.shape,
            e.dtype
        );
        entries.push((name, e));
    }
    // The data section must be covered exactly once, in order (what safetensors checks too).
    entries.sort_by_key(|(_, e)| e.data_offsets);
    let mut end = 0u64;
    for (name, e) in &entries {
        ensure!(
            e.data_offsets.0 == end,
            "safetensors file {shown}: tensor `{name}` data does not start where the previous one ends"
        );
        end = e.data_offsets.1;
    }
    let have = len - 8 - n;
    if have < end {
        let (name, e) = entries.iter().find(|(_, e)| e.data_offsets.1 > have).expect("some tensor ends past the file");
        bail!(
            "safetensors file {shown} is truncated: tensor `{name}` ends at data byte {} but only {have} data bytes are present",
            e.data_offsets.1
        );
    }
    ensure!(have == end, "safetensors file {shown} has {} unexpected bytes after the last tensor", have - end);
    let tensors = entries.into_iter().map(|(name, e)| (name, (e.dtype, e.shape))).collect();
    Ok(SafetensorsHeader { metadata, tensors })
}

fn dtype_bytes(name: &str) -> Result<u64> {
    Ok(match name {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        other => bail!("unsupported safetensors dtype {other}"),
    })
}

fn st_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I16 => "I16",
        DType::I32 => "I32",
        DType::I64 => "I64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        other => bail!("dtype {other:?} cannot be written to safetensors by this crate"),
    })
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // Safety: plain-old-data element types (numbers), read as bytes in host (little-endian) order.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Write the raw little-endian bytes of `t` (row-major), one host copy.
pub(crate) fn write_tensor_le(w: &mut impl Write, t: &Tensor) -> Result<()> {
    use half::{bf16, f16};
    let t = t.flatten_all()?;
    match t.dtype() {
        DType::U8 => w.write_all(&t.to_vec1::<u8>()?)?,
        DType::U32 => w.write_all(as_bytes(&t.to_vec1::<u32>()?))?,
        DType::I16 => w.write_all(as_bytes(&t.to_vec1::<i16>()?))?,
        DType::I32 => w.write_all(as_bytes(&t.to_vec1::<i32>()?))?,
        DType::I64 => w.write_all(as_bytes(&t.to_vec1::<i64>()?))?,
        DType::BF16 => w.write_all(as_bytes(&t.to_vec1::<bf16>()?))?,
        DType::F16 => w.write_all(as_bytes(&t.to_vec1::<f16>()?))?,
        DType::F32 => w.write_all(as_bytes(&t.to_vec1::<f32>()?))?,
        DType::F64 => w.write_all(as_bytes(&t.to_vec1::<f64>()?))?,
        other => bail!("cannot write tensor data of dtype {other:?}"),
    }
    Ok(())
}

/// Write one safetensors file atomically (`__metadata__` from `metadata`).
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let plan: Vec<PlannedTensor> = tensors
        .iter()
        .map(|(n, t)| PlannedTensor { name: n.clone(), dims: t.dims().to_vec(), dtype: t.dtype() })
        .collect();
    write_planned(path, &plan, metadata, |i| Ok(tensors[i].1.clone()))
}

/// A tensor to be written: its name, shape and stored dtype, the data produced only when
/// its bytes are due (so a file can be written from tensors that are never all in memory).
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: DType,
}

impl PlannedTensor {
    fn bytes(&self) -> u64 {
        (self.dims.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// Writes one safetensors file atomically; `fetch(i)` gives the data of `plan[i]` (which must
/// have the planned shape and dtype) when it is written.
fn write_planned(
    path: &Path,
    plan: &[PlannedTensor],
    metadata: Option<HashMap<String, String>>,
    fetch: impl Fn(usize) -> Result<Tensor>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for p in plan {
        ensure!(seen.insert(p.name.as_str()), "tensor `{}` given twice for {}", p.name, path.display());
    }
    // Data in safetensors' own order (larger dtypes first, then by name) keeps every tensor
    // aligned to its element size.
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by(|&a, &b| {
        let (pa, pb) = (&plan[a], &plan[b]);
        pb.dtype.size_in_bytes().cmp(&pa.dtype.size_in_bytes()).then(pa.name.cmp(&pb.name))
    });
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::to_value(m)?);
    }
    let mut offset = 0u64;
    for &i in &order {
        let p = &plan[i];
        header.insert(
            p.name.clone(),
            serde_json::json!({
                "dtype": st_dtype(p.dtype).with_context(|| format!("tensor `{}` for {}", p.name, path.display()))?,
                "shape": p.dims,
                "data_offsets": [offset, offset + p.bytes()],
            }),
        );
        offset += p.bytes();
    }
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomic(path, |f| {
        let mut w = BufWriter::with_capacity(8 << 20, f);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for &i in &order {
            let p = &plan[i];
            let t = fetch(i).with_context(|| format!("preparing tensor `{}`", p.name))?;
            ensure!(
                t.dtype() == p.dtype && t.dims() == p.dims.as_slice(),
                "tensor `{}` is {:?} {:?} but {:?} {:?} was planned",
                p.name,
                t.dtype(),
                t.dims(),
                p.dtype,
                p.dims
            );
            write_tensor_le(&mut w, &t).with_context(|| format!("writing tensor `{}`", p.name))?;
        }
        w.flush()?;
        Ok(())
    })
}

/// HF shard file name (1-based `k`).
pub fn shard_file_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Write `tensors` cast to `dtype` as `model-0000k-of-0000n.safetensors` shards of at most
/// `max_shard_bytes` (a larger tensor gets a shard of its own) plus
/// `model.safetensors.index.json`. Each file is written atomically, the index last; shards of
/// an earlier, differently split save are removed afterwards.
pub fn write_sharded(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: u64,
    dtype: DType,
) -> Result<ShardIndex> {
    st_dtype(dtype)?;
    let plan: Vec<PlannedTensor> =
        tensors.iter().map(|(n, t)| PlannedTensor { name: n.clone(), dims: t.dims().to_vec(), dtype }).collect();
    write_sharded_planned(dir, &plan, max_shard_bytes, |i| Ok(tensors[i].1.to_dtype(dtype)?))
}

/// [`write_sharded`] for planned tensors, each stored in its own dtype; `fetch(i)` produces
/// `plan[i]` when its bytes are due, so at most one tensor of the model is in memory.
pub fn write_sharded_planned(
    dir: &Path,
    plan: &[PlannedTensor],
    max_shard_bytes: u64,
    fetch: impl Fn(usize) -> Result<Tensor>,
) -> Result<ShardIndex> {
    ensure!(!plan.is_empty(), "no tensors to write to {}", dir.display());
    let mut seen = std::collections::HashSet::new();
    for p in plan {
        ensure!(seen.insert(p.name.as_str()), "tensor `{}` given twice for {}", p.name, dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Indices into `plan`, shard by shard.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut current = 0u64;
    let mut total = 0u64;
    for (i, p) in plan.iter().enumerate() {
        if current > 0 && current + p.bytes() > max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        current += p.bytes();
        total += p.bytes();
    }
    let n = shards.len();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut index = ShardIndex { metadata: IndexMetadata { total_size: Some(total) }, weight_map: BTreeMap::new() };
    for (k, shard) in shards.iter().enumerate() {
        let name = shard_file_name(k + 1, n);
        let sub: Vec<PlannedTensor> = shard.iter().map(|&i| plan[i].clone()).collect();
        write_planned(&dir.join(&name), &sub, Some(metadata.clone()), |j| fetch(shard[j]))?;
        index.weight_map.extend(sub.iter().map(|p| (p.name.clone(), name.clone())));
    }
    let json = serde_json::to_vec_pretty(&index)?;
    write_atomic(&dir.join("model.safetensors.index.json"), |f| Ok(f.write_all(&json)?))?;
    remove_stale_shards(dir, n)?;
    Ok(index)
}

fn remove_stale_shards(dir: &Path, n: usize) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("model-").and_then(|r| r.strip_suffix(".safetensors")) else { continue };
        let Some((k, of)) = rest.split_once("-of-") else { continue };
        let (Ok(k), Ok(of)) = (k.parse::<usize>(), of.parse::<usize>()) else { continue };
        if of != n || k == 0 || k > n {
            std::fs::remove_file(dir.join(name)).with_context(|| format!("removing stale shard {name}"))?;
        }
    }
    Ok(())
}
