//! A PyTorch `.pth` state dict read from a memory map (the reader behind `pth::open_pth`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::pickle::TensorInfo;
use candle_core::{Device, Tensor};

/// What `pth::check_pth` found: the pickled tensor descriptions and where each record's bytes lie
/// in the file.
pub(crate) struct PthIndex {
    pub infos: Vec<TensorInfo>,
    /// Record path -> (offset of its data in the file, length).
    pub records: HashMap<String, (usize, usize)>,
}

/// A `.pth` state dict mapped into memory. torch.save stores tensor records uncompressed, so
/// each tensor is copied straight out of the mapping, and the zip directory is parsed once
/// (candle's `PthTensors` re-opens and re-parses the zip for every tensor).
pub(crate) struct MappedPth {
    map: memmap2::Mmap,
    infos: HashMap<String, TensorInfo>,
    records: HashMap<String, (usize, usize)>,
}

impl MappedPth {
    /// # Safety
    /// The file must not change while mapped.
    pub(crate) unsafe fn open(path: &Path, index: PthIndex) -> Result<Self> {
        let file = std::fs::File::open(path)?;
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let infos = index.infos.into_iter().map(|i| (i.name.clone(), i)).collect();
        Ok(Self { map, infos, records: index.records })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }

    /// The tensor on the CPU, in its stored dtype; None when the state dict has no such key.
    pub(crate) fn get(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        let Some(info) = self.infos.get(name) else { return Ok(None) };
        let &(start, len) = self
            .records
            .get(&info.path)
            .ok_or_else(|| candle_core::Error::Msg(format!("record {} of `{name}` was not indexed", info.path)))?;
        let layout = &info.layout;
        // candle keeps the storage offset in bytes for pth tensors; check_pth checked the length.
        let n = layout.shape().elem_count() * info.dtype.size_in_bytes();
        let from = start + layout.start_offset();
        let bytes = self
            .map
            .get(from..from + n)
            .filter(|_| layout.start_offset() + n <= len)
            .ok_or_else(|| candle_core::Error::Msg(format!("record {} of `{name}` is truncated", info.path)))?;
        let dims = layout.dims();
        if layout.is_contiguous() || dims.len() < 2 {
            return Ok(Some(Tensor::from_raw_buffer(bytes, info.dtype, dims, &Device::Cpu)?));
        }
        // Column-major (check_pth allows only the two layouts): stored as the reversed shape.
        let reversed: Vec<usize> = dims.iter().rev().copied().collect();
        let t = Tensor::from_raw_buffer(bytes, info.dtype, &reversed, &Device::Cpu)?;
        let order: Vec<usize> = (0..dims.len()).rev().collect();
        Ok(Some(t.permute(order)?.contiguous()?))
    }
}
