//! Checkpoint I/O: safetensors (single and sharded), `.pth`, hub cache resolution, and the
//! error messages for broken checkpoints.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use prs::files::write_atomic;
use prs::nn::param::{Init, ParamBuilder, TrainedParams};
use prs::weights::hub::{HubOptions, ModelSource};
use prs::weights::pth::{open_pth, pth_tensor_names, write_pth_atomic};
use prs::weights::shards::{
    open_safetensors, open_safetensors_paths, read_index, read_safetensors_header, shard_file_name,
    write_safetensors_atomic, write_sharded,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/weights");

fn cpu() -> Device {
    Device::Cpu
}

/// Deterministic values with a fractional part (so dtype casts are visible).
fn ramp(shape: &[usize], start: f32, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let t = Tensor::arange(0u32, n as u32, &cpu())?.to_dtype(DType::F32)?;
    Ok(((t * 0.37)? + start as f64)?.sin()?.reshape(shape)?.to_dtype(dtype)?)
}

fn assert_identical(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(a, b, "{what}: values");
    Ok(())
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

fn sample_tensors(dtype: DType) -> Result<Vec<(String, Tensor)>> {
    Ok(vec![
        ("model.embed_tokens.weight".into(), ramp(&[10, 8], 0.1, dtype)?),
        ("model.layers.0.self_attn.q_proj.weight".into(), ramp(&[8, 8], 0.2, dtype)?),
        ("model.layers.0.self_attn.k_proj.weight".into(), ramp(&[4, 8], 0.3, dtype)?),
        ("model.layers.0.input_layernorm.weight".into(), ramp(&[8], 0.4, dtype)?),
        ("model.layers.1.self_attn.q_proj.weight".into(), ramp(&[8, 8], 0.5, dtype)?),
        ("model.norm.weight".into(), ramp(&[8], 0.6, dtype)?),
        ("lm_head.weight".into(), ramp(&[10, 8], 0.7, dtype)?),
    ])
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

// ---------------------------------------------------------------- safetensors

#[test]
fn safetensors_atomic_round_trip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("weights.safetensors");
    let tensors = vec![
        ("a.f32".to_string(), ramp(&[3, 5], 0.0, DType::F32)?),
        ("b.bf16".to_string(), ramp(&[7], 1.0, DType::BF16)?),
        ("c.f16".to_string(), ramp(&[2, 3, 2], 2.0, DType::F16)?),
        ("d.i64".to_string(), Tensor::new(&[3i64, -4, 5], &cpu())?),
        // A non-contiguous view must be written in logical (row-major) order.
        ("e.t".to_string(), ramp(&[4, 3], 3.0, DType::F32)?.t()?),
    ];
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_safetensors_atomic(&path, &tensors, Some(meta.clone()))?;
    assert_eq!(dir_entries(dir.path()), vec!["weights.safetensors"], "no temporary file left behind");

    let header = read_safetensors_header(&path)?;
    assert_eq!(header.metadata, meta);
    // candle's own reader sees the original dtypes and values.
    let back = candle_core::safetensors::load(&path, &cpu())?;
    assert_eq!(back.len(), tensors.len());
    for (name, t) in &tensors {
        assert_identical(&back[name], &t.contiguous()?, name)?;
    }
    // And through the checked VarBuilder, cast on load.
    let files = open_safetensors_paths(std::slice::from_ref(&path), DType::F32, &cpu())?;
    assert_eq!(files.names().collect::<Vec<_>>(), vec!["a.f32", "b.bf16", "c.f16", "d.i64", "e.t"]);
    let c = files.vb.get((2, 3, 2), "c.f16")?;
    assert_identical(&c, &tensors[2].1.to_dtype(DType::F32)?, "c.f16 as f32")?;
    Ok(())
}

#[test]
fn sharded_write_open_identical() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tensors = sample_tensors(DType::F32)?;
    // 80 bf16 elements = 160 bytes; a 200-byte limit forces several shards.
    let index = write_sharded(dir.path(), &tensors, 200, DType::BF16)?;
    let n = index.weight_map.values().collect::<std::collections::BTreeSet<_>>().len();
    assert!(n >= 4, "expected several shards, got {n}");
    let total: usize = tensors.iter().map(|(_, t)| t.elem_count() * 2).sum();
    assert_eq!(index.metadata.total_size, Some(total as u64));
    let mut expected_files: Vec<String> = (1..=n).map(|k| shard_file_name(k, n)).collect();
    expected_files.push("model.safetensors.index.json".into());
    expected_files.sort();
    assert_eq!(dir_entries(dir.path()), expected_files);

    // The index on disk has HF's fields.
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.safetensors.index.json"))?)?;
    assert_eq!(raw["metadata"]["total_size"], serde_json::json!(total));
    assert_eq!(raw["weight_map"]["lm_head.weight"], serde_json::json!(shard_file_name(n, n)));
    assert_eq!(read_index(&dir.path().join("model.safetensors.index.json"))?, index);

    let files = open_safetensors(&ModelSource::local(dir.path()), DType::BF16, &cpu())?;
    assert_eq!(files.files.len(), n);
    assert_eq!(files.len(), tensors.len());
    for (name, t) in &tensors {
        let got = files.vb.get(t.dims(), name)?;
        assert_identical(&got, &t.to_dtype(DType::BF16)?, name)?;
        assert_eq!(files.entry(name).unwrap().dtype, "BF16");
    }

    // Re-saving with fewer shards replaces the old split completely.
    write_sharded(dir.path(), &tensors, 1 << 20, DType::F32)?;
    assert_eq!(dir_entries(dir.path()), vec![shard_file_name(1, 1), "model.safetensors.index.json".to_string()]);
    let files = open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu())?;
    for (name, t) in &tensors {
        assert_identical(&files.vb.get(t.dims(), name)?, t, name)?;
    }
    Ok(())
}

#[test]
fn single_file_model_is_found_without_index() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tensors = sample_tensors(DType::F32)?;
    write_safetensors_atomic(&dir.path().join("model.safetensors"), &tensors, None)?;
    let files = open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu())?;
    assert!(files.index.is_none());
    assert_eq!(files.describe(), dir.path().join("model.safetensors").display().to_string());
    assert_identical(&files.vb.get((8,), "model.norm.weight")?, &tensors[5].1, "norm")?;

    let empty = tempfile::tempdir()?;
    let e = err_text(open_safetensors(&ModelSource::local(empty.path()), DType::F32, &cpu()).err().unwrap());
    assert!(e.contains("model.safetensors.index.json") && e.contains("model.safetensors"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------- broken checkpoints

fn sharded_dir() -> Result<(tempfile::TempDir, usize)> {
    let dir = tempfile::tempdir()?;
    let index = write_sharded(dir.path(), &sample_tensors(DType::F32)?, 400, DType::F32)?;
    let n = index.weight_map.values().collect::<std::collections::BTreeSet<_>>().len();
    assert!(n >= 3);
    Ok((dir, n))
}

#[test]
fn missing_shard_names_shard_and_index() -> Result<()> {
    let (dir, n) = sharded_dir()?;
    let gone = shard_file_name(2, n);
    std::fs::remove_file(dir.path().join(&gone))?;
    let e = err_text(open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu()).err().unwrap());
    assert!(e.contains(&format!("missing shard file(s) {gone} listed in")), "{e}");
    assert!(e.contains(&dir.path().join("model.safetensors.index.json").display().to_string()), "{e}");
    Ok(())
}

#[test]
fn truncated_shard_names_file() -> Result<()> {
    let (dir, n) = sharded_dir()?;
    let shard = dir.path().join(shard_file_name(n, n));
    let len = std::fs::metadata(&shard)?.len();
    std::fs::OpenOptions::new().write(true).open(&shard)?.set_len(len - 5)?;
    let e = err_text(open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu()).err().unwrap());
    assert!(e.contains(&format!("safetensors file {} is truncated", shard.display())), "{e}");

    // Cut inside the header too.
    std::fs::OpenOptions::new().write(true).open(&shard)?.set_len(20)?;
    let e = err_text(open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu()).err().unwrap());
    assert!(e.contains(&format!("safetensors file {} is truncated", shard.display())), "{e}");
    Ok(())
}

#[test]
fn corrupt_index_names_index() -> Result<()> {
    let (dir, _) = sharded_dir()?;
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, "{\"weight_map\": {\"a\": ")?;
    let e = err_text(open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu()).err().unwrap());
    assert!(e.starts_with(&format!("cannot parse safetensors index {}", index.display())), "{e}");
    Ok(())
}

#[test]
fn index_pointing_at_wrong_shard_is_reported() -> Result<()> {
    let (dir, n) = sharded_dir()?;
    let path = dir.path().join("model.safetensors.index.json");
    let mut index = read_index(&path)?;
    index.weight_map.insert("lm_head.weight".into(), shard_file_name(1, n));
    std::fs::write(&path, serde_json::to_vec(&index)?)?;
    let e = err_text(open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu()).err().unwrap());
    assert!(e.contains("tensor `lm_head.weight` is in") && e.contains("does not contain it"), "{e}");
    Ok(())
}

#[test]
fn missing_and_misshaped_tensor_name_key_and_file() -> Result<()> {
    let (dir, _) = sharded_dir()?;
    let files = open_safetensors(&ModelSource::local(dir.path()), DType::F32, &cpu())?;
    let registry = TrainedParams::new();
    let pb = ParamBuilder::from_checkpoint(files.vb.clone(), files.describe(), "base", false, DType::F32, &registry);
    let index = dir.path().join("model.safetensors.index.json").display().to_string();

    let e = err_text(
        pb.pp("model").pp("layers").pp(0).pp("self_attn").get((8, 8), "v_proj.weight", Init::Zeros).err().unwrap(),
    );
    assert!(e.contains("missing tensor `model.layers.0.self_attn.v_proj.weight`"), "{e}");
    assert!(e.contains(&index), "{e}");
    // Look-alike keys for the diagnostic.
    let similar = files.similar("model.layers.0.self_attn.v_proj.weight", 2);
    assert_eq!(similar, vec!["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"]);

    let e = err_text(pb.pp("model").get((8, 9), "norm.weight", Init::Zeros).err().unwrap());
    assert!(e.contains("tensor `model.norm.weight`") && e.contains("[8]") && e.contains("[8, 9]"), "{e}");
    assert!(e.contains(&index), "{e}");

    // And the good ones load, frozen, in the requested dtype.
    let p = pb.pp("model").get(8, "norm.weight", Init::Zeros)?;
    assert!(!p.is_trained());
    assert_identical(p.tensor(), &ramp(&[8], 0.6, DType::F32)?, "norm")?;
    Ok(())
}

// ---------------------------------------------------------------- atomic writes

#[test]
fn failed_writes_leave_no_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("out.bin");

    // Failure after bytes were written: nothing appears, no temporary remains.
    let e = write_atomic(&target, |f| {
        use std::io::Write;
        f.write_all(b"half of a checkpoint")?;
        anyhow::bail!("simulated failure mid-way")
    })
    .err()
    .unwrap();
    assert!(err_text(e).contains("simulated failure mid-way"));
    assert!(dir_entries(dir.path()).is_empty(), "{:?}", dir_entries(dir.path()));

    // An existing file is left intact by a failed replacement.
    std::fs::write(&target, b"old")?;
    let _ = write_atomic(&target, |f| {
        use std::io::Write;
        f.write_all(b"new but broken")?;
        anyhow::bail!("boom")
    });
    assert_eq!(std::fs::read(&target)?, b"old");
    assert_eq!(dir_entries(dir.path()), vec!["out.bin"]);

    // A tensor that cannot be stored (u32 has no PyTorch storage; f8 none in our writers).
    let good = ("ok".to_string(), ramp(&[4], 0.0, DType::F32)?);
    let pth = dir.path().join("bad.pth");
    let bad = ("bad.idx".to_string(), Tensor::new(&[1u32, 2], &cpu())?);
    let e = err_text(write_pth_atomic(&pth, &[good.clone(), bad]).err().unwrap());
    assert!(e.contains("tensor `bad.idx`"), "{e}");
    let st = dir.path().join("bad.safetensors");
    let f8 = ("bad.f8".to_string(), ramp(&[4], 0.0, DType::F32)?.to_dtype(DType::F8E4M3)?);
    let e = err_text(write_safetensors_atomic(&st, &[good.clone(), f8], None).err().unwrap());
    assert!(e.contains("tensor `bad.f8`"), "{e}");
    let e = err_text(write_safetensors_atomic(&st, &[good.clone(), good.clone()], None).err().unwrap());
    assert!(e.contains("given twice"), "{e}");
    assert_eq!(dir_entries(dir.path()), vec!["out.bin"]);

    // Unwritable destinations: a missing folder, a "folder" that is a file.
    let e = err_text(
        write_safetensors_atomic(&dir.path().join("no/such/dir/x.safetensors"), std::slice::from_ref(&good), None)
            .err()
            .unwrap(),
    );
    assert!(e.contains("cannot create a temporary file"), "{e}");
    let e = err_text(write_pth_atomic(&target.join("x.pth"), &[good]).err().unwrap());
    assert!(e.contains("cannot create a temporary file"), "{e}");
    assert_eq!(dir_entries(dir.path()), vec!["out.bin"]);
    Ok(())
}

// ---------------------------------------------------------------- .pth

#[test]
fn pth_round_trip_f32_f16_bf16() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let tensors = vec![
            ("image_encoder.patch_embed.seq.0.c.weight".to_string(), ramp(&[4, 3, 3, 3], 0.1, dtype)?),
            ("image_encoder.neck.0.weight".to_string(), ramp(&[300, 2], 0.2, dtype)?), // BININT2 sizes
            ("mask_decoder.iou_token.weight".to_string(), ramp(&[1, 8], 0.3, dtype)?),
            ("cls.scale".to_string(), ramp(&[], 0.4, dtype)?), // rank 0
            ("cls.fc.weight".to_string(), ramp(&[5, 3], 0.5, dtype)?.t()?), // non-contiguous view
            ("sam.empty".to_string(), Tensor::zeros((0, 4), dtype, &cpu())?),
            ("image_encoder.bn.num_batches_tracked".to_string(), Tensor::new(9i64, &cpu())?),
        ];
        let path = dir.path().join(format!("w_{dtype:?}.pth"));
        write_pth_atomic(&path, &tensors)?;
        let mut names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        assert_eq!(pth_tensor_names(&path)?, names);

        let all: HashMap<String, Tensor> = candle_core::pickle::read_all(&path)?.into_iter().collect();
        let vb = open_pth(&path, dtype, &cpu())?;
        for (name, t) in &tensors {
            assert_identical(&all[name], &t.contiguous()?, name)?;
            if t.dtype() == dtype {
                assert_identical(&vb.get(t.dims(), name)?, t, name)?;
            }
        }
    }
    assert_eq!(dir_entries(dir.path()).len(), 3, "only the three checkpoints, no temporaries");
    Ok(())
}

#[test]
fn pth_with_many_tensors_round_trips() -> Result<()> {
    // More than one SETITEMS batch (1000 pairs).
    let dir = tempfile::tempdir()?;
    let tensors: Vec<(String, Tensor)> =
        (0..1203).map(|i| Ok((format!("t.{i}"), Tensor::full(i as f32, 2, &cpu())?))).collect::<Result<_>>()?;
    let path = dir.path().join("many.pth");
    write_pth_atomic(&path, &tensors)?;
    let all: HashMap<String, Tensor> = candle_core::pickle::read_all(&path)?.into_iter().collect();
    assert_eq!(all.len(), 1203);
    for (name, t) in &tensors {
        assert_identical(&all[name], t, name)?;
    }
    Ok(())
}

#[test]
fn torch_saved_pth_reads_as_expected() -> Result<()> {
    // Written by torch.save (scripts/fixtures/gen_weights.py), including a Fortran-order tensor.
    let path = Path::new(FIXTURES).join("torch_state_dict.pth");
    let expected =
        candle_core::safetensors::load(Path::new(FIXTURES).join("torch_state_dict_expected.safetensors"), &cpu())?;
    let mut names: Vec<String> = expected.keys().cloned().collect();
    names.sort();
    assert_eq!(pth_tensor_names(&path)?, names);
    let all: HashMap<String, Tensor> = candle_core::pickle::read_all(&path)?.into_iter().collect();
    for (name, t) in &expected {
        assert_identical(&all[name], t, name)?;
    }
    let vb = open_pth(&path, DType::F32, &cpu())?;
    let w = vb.get((2, 6), "cls.proj.weight")?;
    assert_identical(&w, &expected["cls.proj.weight"], "fortran-order tensor")?;
    // Every tensor read from the memory map equals torch's values, in the stored dtype.
    for (name, t) in &expected {
        let got = open_pth(&path, t.dtype(), &cpu())?.get(t.shape(), name)?;
        assert_identical(&got, t, name)?;
    }
    Ok(())
}

#[test]
fn a_compressed_pth_record_is_refused_by_name() -> Result<()> {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir()?;
    let stored = dir.path().join("stored.pth");
    write_pth_atomic(&stored, &[("w".into(), ramp(&[8, 8], 0.0, DType::F32)?)])?;
    // The same archive with every entry deflated (torch.save never compresses).
    let mut src = zip::ZipArchive::new(std::fs::File::open(&stored)?)?;
    let deflated = dir.path().join("deflated.pth");
    let mut out = zip::ZipWriter::new(std::fs::File::create(&deflated)?);
    for i in 0..src.len() {
        let mut f = src.by_index(i)?;
        let mut data = Vec::new();
        f.read_to_end(&mut data)?;
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        out.start_file(f.name()?.to_string(), opts)?;
        out.write_all(&data)?;
    }
    out.finish()?;
    let e = err_text(open_pth(&deflated, DType::F32, &cpu()).err().unwrap());
    assert!(e.contains(&deflated.display().to_string()) && e.contains("is compressed"), "{e}");
    Ok(())
}

#[test]
fn invalid_pth_names_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let not_zip = dir.path().join("image_encoder.pth");
    std::fs::write(&not_zip, b"\x80\x02}q\x00.")?; // a legacy (non-zip) pickle
    let e = err_text(open_pth(&not_zip, DType::F32, &cpu()).err().unwrap());
    assert!(e.starts_with(&format!("{} is not a valid PyTorch zip checkpoint", not_zip.display())), "{e}");

    let missing = dir.path().join("cls.pth");
    let e = err_text(pth_tensor_names(&missing).err().unwrap());
    assert!(e.contains(&format!("opening PyTorch checkpoint {}", missing.display())), "{e}");

    // A truncated checkpoint (the zip directory at the end is cut off).
    let good = dir.path().join("mask_decoder.pth");
    write_pth_atomic(&good, &[("w".into(), ramp(&[64, 64], 0.0, DType::F32)?)])?;
    let bytes = std::fs::read(&good)?;
    std::fs::write(&good, &bytes[..bytes.len() / 2])?;
    let e = err_text(open_pth(&good, DType::F32, &cpu()).err().unwrap());
    assert!(e.contains(&good.display().to_string()) && e.contains("not a valid PyTorch zip"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------- hub cache

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

/// A cache laid out like huggingface_hub's: blobs + snapshot symlinks + refs.
fn fake_cache(root: &Path, repo_folder: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let repo = root.join(repo_folder);
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::create_dir_all(repo.join("blobs"))?;
    std::fs::write(repo.join("refs/main"), format!("{HASH}\n"))?;
    let snap = repo.join("snapshots").join(HASH);
    std::fs::create_dir_all(&snap)?;
    for (i, (name, data)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("etag{i}"));
        std::fs::write(&blob, data)?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(format!("etag{i}")), snap.join(name))?;
        #[cfg(not(unix))]
        std::fs::copy(&blob, snap.join(name))?;
    }
    Ok(snap)
}

#[test]
fn hub_resolves_from_cache_offline() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let snap =
        fake_cache(cache.path(), "models--microsoft--llava-med-v1.5-mistral-7b", &[("config.json", b"{\"a\": 1}")])?;
    let src =
        ModelSource::parse_with("microsoft/llava-med-v1.5-mistral-7b", HubOptions::with_cache(cache.path(), true))?;
    let p = src.file("config.json")?;
    assert_eq!(p, snap.join("config.json"));
    assert_eq!(std::fs::read_to_string(&p)?, "{\"a\": 1}");
    assert!(src.has("config.json"));
    assert!(!src.has("tokenizer.json"));

    // Explicit revisions: a branch ref and a bare commit hash (no ref file for it).
    let repo = cache.path().join("models--microsoft--llava-med-v1.5-mistral-7b");
    std::fs::write(repo.join("refs/v1"), HASH)?;
    let opts = HubOptions::with_cache(cache.path(), true);
    assert_eq!(
        ModelSource::parse_with("microsoft/llava-med-v1.5-mistral-7b@v1", opts.clone())?.file("config.json")?,
        p
    );
    let by_hash = format!("microsoft/llava-med-v1.5-mistral-7b@{HASH}");
    assert_eq!(ModelSource::parse_with(&by_hash, opts.clone())?.file("config.json")?, p);
    assert!(!ModelSource::parse_with("microsoft/llava-med-v1.5-mistral-7b@v2", opts)?.has("config.json"));
    Ok(())
}

#[test]
fn an_unreachable_hub_is_said_once_with_what_to_do() -> Result<()> {
    let cache = tempfile::tempdir()?;
    // Nothing listens on the discard port: the connection is refused at once.
    let opts =
        HubOptions { endpoint: Some("http://127.0.0.1:9".into()), ..HubOptions::with_cache(cache.path(), false) };
    let src = ModelSource::parse_with("org/name", opts)?;
    let e = err_text(src.file("config.json").err().unwrap());
    assert_eq!(e.matches("cannot reach the Hugging Face hub at http://127.0.0.1:9").count(), 1, "{e}");
    assert_eq!(e.matches("the connection failed").count(), 1, "{e}");
    assert!(e.contains("`config.json` of org/name@main") && e.contains("HF_HUB_OFFLINE=1"), "{e}");
    assert!(!e.contains("request error"), "ureq's nested message is not repeated: {e}");
    Ok(())
}

#[test]
fn hub_offline_miss_is_one_clear_error() -> Result<()> {
    let cache = tempfile::tempdir()?;
    fake_cache(cache.path(), "models--org--name", &[("config.json", b"{}")])?;
    let src = ModelSource::parse_with("org/name", HubOptions::with_cache(cache.path(), true))?;
    let e = err_text(src.file("model.safetensors").err().unwrap());
    assert!(e.contains("`model.safetensors`") && e.contains("org/name@main") && e.contains("HF_HUB_OFFLINE"), "{e}");
    assert!(e.contains(&cache.path().join("models--org--name").display().to_string()), "{e}");

    let e = err_text(open_safetensors(&src, DType::F32, &cpu()).err().unwrap());
    assert!(
        e.contains("neither model.safetensors.index.json nor model.safetensors found in hub repo org/name@main"),
        "{e}"
    );
    assert!(e.contains("offline, cache"), "{e}");

    // A repo that was never cached, and a dangling snapshot link (blob deleted).
    let other = ModelSource::parse_with("org/other", HubOptions::with_cache(cache.path(), true))?;
    assert!(err_text(other.file("config.json").err().unwrap()).contains("org/other@main"));
    std::fs::remove_file(cache.path().join("models--org--name/blobs/etag0"))?;
    assert!(!src.has("config.json"));
    assert!(src.file("config.json").is_err());
    Ok(())
}

#[test]
fn hub_sharded_checkpoint_opens_from_cache() -> Result<()> {
    let staging = tempfile::tempdir()?;
    let tensors = sample_tensors(DType::F32)?;
    write_sharded(staging.path(), &tensors, 300, DType::BF16)?;
    let files: Vec<(String, Vec<u8>)> = dir_entries(staging.path())
        .into_iter()
        .map(|n| Ok((n.clone(), std::fs::read(staging.path().join(&n))?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let cache = tempfile::tempdir()?;
    fake_cache(cache.path(), "models--org--tiny", &refs)?;
    let src = ModelSource::parse_with("org/tiny", HubOptions::with_cache(cache.path(), true))?;
    let st = open_safetensors(&src, DType::F32, &cpu())?;
    for (name, t) in &tensors {
        assert_identical(&st.vb.get(t.dims(), name)?, &t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?, name)?;
    }

    // A shard missing from the cache while offline: the error names it and the index.
    let snap = cache.path().join("models--org--tiny/snapshots").join(HASH);
    let n = st.files.len();
    std::fs::remove_file(snap.join(shard_file_name(n, n)))?;
    let e = err_text(open_safetensors(&src, DType::F32, &cpu()).err().unwrap());
    assert!(e.contains(&shard_file_name(n, n)) && e.contains("model.safetensors.index.json"), "{e}");
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    Ok(())
}

#[test]
fn hub_options_and_specs() -> Result<()> {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    let o = HubOptions::from_vars(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HF_HUB_OFFLINE", "1")]));
    assert_eq!((o.cache_dir, o.offline), (PathBuf::from("/c"), true));
    let o = HubOptions::from_vars(env(&[("HF_HOME", "/h"), ("HF_HUB_OFFLINE", "0"), ("HOME", "/home/u")]));
    assert_eq!((o.cache_dir, o.offline), (PathBuf::from("/h/hub"), false));
    let o = HubOptions::from_vars(env(&[("HOME", "/home/u"), ("HF_HUB_OFFLINE", "TRUE")]));
    assert_eq!((o.cache_dir, o.offline), (PathBuf::from("/home/u/.cache/huggingface/hub"), true));

    let dir = tempfile::tempdir()?;
    let opts = HubOptions::with_cache(dir.path(), true);
    assert!(matches!(ModelSource::parse_with(dir.path().to_str().unwrap(), opts.clone())?, ModelSource::Local(_)));
    match ModelSource::parse_with("org/name@refs/pr/1", opts.clone())? {
        ModelSource::Hub(h) => assert_eq!((h.repo_id.as_str(), h.revision.as_str()), ("org/name", "refs/pr/1")),
        other => panic!("{other:?}"),
    }
    let e = err_text(ModelSource::parse_with("./no/such/model/dir", opts.clone()).err().unwrap());
    assert!(e.contains("neither an existing directory nor a hub repo id"), "{e}");
    let e = err_text(ModelSource::local(dir.path()).file("config.json").err().unwrap());
    assert!(e.contains("`config.json`") && e.contains(&dir.path().display().to_string()), "{e}");
    Ok(())
}

/// Manual cross-check with PyTorch (not run by default: the tests must not need Python):
/// `PRS_PTH_OUT=/tmp/pth cargo test --test weights_io -- --ignored write_files_for_torch_check`
/// then `torch.load(f, weights_only=True)` each `.pth` and compare it with the `.safetensors`
/// twin via `safetensors.torch.load_file`.
#[test]
#[ignore]
fn write_files_for_torch_check() -> Result<()> {
    let out = PathBuf::from(std::env::var("PRS_PTH_OUT").expect("set PRS_PTH_OUT"));
    std::fs::create_dir_all(&out)?;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let tensors = vec![
            ("image_encoder.patch_embed.seq.0.c.weight".to_string(), ramp(&[4, 3, 3, 3], 0.1, dtype)?),
            ("image_encoder.neck.0.weight".to_string(), ramp(&[300, 2], 0.2, dtype)?),
            ("mask_decoder.iou_token.weight".to_string(), ramp(&[1, 8], 0.3, dtype)?),
            ("cls.scale".to_string(), ramp(&[], 0.4, dtype)?),
            ("cls.fc.weight".to_string(), ramp(&[5, 3], 0.5, dtype)?.t()?),
            ("sam.empty".to_string(), Tensor::zeros((0, 4), dtype, &cpu())?),
            ("image_encoder.bn.num_batches_tracked".to_string(), Tensor::new(9i64, &cpu())?),
        ];
        write_pth_atomic(&out.join(format!("{dtype:?}.pth")), &tensors)?;
        write_safetensors_atomic(&out.join(format!("{dtype:?}.safetensors")), &tensors, None)?;
    }
    let many: Vec<(String, Tensor)> =
        (0..1203).map(|i| Ok((format!("t.{i}"), Tensor::full(i as f32, 2, &cpu())?))).collect::<Result<_>>()?;
    write_pth_atomic(&out.join("many.pth"), &many)?;
    write_safetensors_atomic(&out.join("many.safetensors"), &many, None)?;
    Ok(())
}
