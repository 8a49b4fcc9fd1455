//! Inputs checked where they enter: truncated image files, non-binary masks (and the option to
//! read label masks), weight tensors of the wrong dtype or with non-finite values, LoRA targets
//! that name no module, prompts longer than the model's positions.

use crate::common;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use image::{DynamicImage, GrayImage, ImageBuffer, ImageFormat, Luma, Rgb, RgbImage};
use prs::data::dataset::{
    binarise_mask, binarise_mask_with, load_mask, load_mask_with, read_rows, DatasetOptions, MaskError, MaskRule,
    ValidationError,
};
use prs::data::prepare::{check_rows, prepare, PrepareOptions};
use prs::data::preprocess::{decode_image, load_image};
use prs::data::sample::{check_prompt_lengths, SampleBuilder};
use prs::pipeline::build::{load_prs_med, read_llava_config, LoadOptions, Mode};
use prs::tokenizer::{check_prompt_length, encode_prompt, PromptIds, PromptLimits};
use prs::weights::hub::ModelSource;
use prs::weights::shards::{open_safetensors_paths, read_index, write_safetensors_atomic};

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A textured RGB picture (so JPEG scan data is most of the file).
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([((x * 7 + y * 3) % 256) as u8, ((x * x + y * 5) % 251) as u8, ((x ^ y) * 9 % 256) as u8])
    })
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

// ---------------------------------------------------------------- truncated images

/// Every cut of a PNG, JPEG or BMP (headers, image data, the trailer, the last byte) is an error
/// naming the file; the whole file decodes to the original.
#[test]
fn truncated_png_and_jpeg_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = DynamicImage::ImageRgb8(picture(96, 64));
    let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_fn(40, 30, |x, y| Luma([(x * 1500 + y * 7) as u16])));
    let cases = [
        ("rgb.png", encode(&rgb, ImageFormat::Png)),
        ("grey16.png", encode(&grey16, ImageFormat::Png)),
        ("rgb.jpg", encode(&rgb, ImageFormat::Jpeg)),
        ("grey.jpg", encode(&DynamicImage::ImageLuma8(rgb.to_luma8()), ImageFormat::Jpeg)),
        ("rgb.bmp", encode(&rgb, ImageFormat::Bmp)),
    ];
    for (name, bytes) in &cases {
        let full = dir.path().join(name);
        std::fs::write(&full, bytes).unwrap();
        let img = decode_image(&full).unwrap();
        assert_eq!(img.width() * img.height(), if name.starts_with("grey16") { 1200 } else { 96 * 64 }, "{name}");
        let n = bytes.len();
        let cuts = [40, n / 10, n * 3 / 10, n * 6 / 10, n * 9 / 10, n - 2, n - 1];
        for cut in cuts {
            let path = dir.path().join(format!("cut{cut}_{name}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = err_text(decode_image(&path));
            assert!(e.contains(&path.display().to_string()), "{name} cut at {cut}/{n}: {e}");
            assert!(e.contains("truncated"), "{name} cut at {cut}/{n}: {e}");
            // Images and masks share the decoder.
            assert!(err_text(load_image(&path)).contains("truncated"));
            assert!(err_text(load_mask(&path)).contains(&path.display().to_string()));
        }
    }
}

/// An end-of-image marker inside an embedded thumbnail (before the scan) does not make a
/// JPEG cut inside its scan look complete; bytes after the real end are accepted.
#[test]
fn jpeg_completeness_follows_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(80, 80)), ImageFormat::Jpeg);
    // An APP15 segment (ignored by decoders) holding a thumbnail-like FF D8 ... FF DA ... FF D9.
    let payload = [0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x11, 0xFF, 0xD9];
    let mut with_app = jpeg[..2].to_vec();
    with_app.extend([0xFF, 0xEF, 0x00, (payload.len() + 2) as u8]);
    with_app.extend(payload);
    with_app.extend(&jpeg[2..]);
    let full = dir.path().join("app.jpg");
    std::fs::write(&full, &with_app).unwrap();
    assert_eq!(decode_image(&full).unwrap().width(), 80);
    let cut = dir.path().join("app_cut.jpg");
    std::fs::write(&cut, &with_app[..with_app.len() * 6 / 10]).unwrap();
    let e = err_text(decode_image(&cut));
    assert!(e.contains("truncated JPEG") && e.contains("inside its image data"), "{e}");

    let mut padded = jpeg.clone();
    padded.extend([0u8; 64]);
    let p = dir.path().join("padded.jpg");
    std::fs::write(&p, &padded).unwrap();
    assert_eq!(decode_image(&p).unwrap().width(), 80, "trailing bytes after EOI are harmless");
}

/// A truncated file in a dataset is reported on its CSV row.
#[test]
fn truncated_image_in_a_dataset_is_reported_on_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let jpeg = encode(&DynamicImage::ImageRgb8(picture(32, 32)), ImageFormat::Jpeg);
    std::fs::write(root.join("a.jpg"), &jpeg[..jpeg.len() * 6 / 10]).unwrap();
    GrayImage::from_fn(32, 32, |x, _| Luma([if x > 20 { 255 } else { 0 }])).save(root.join("a_mask.png")).unwrap();
    let csv = root.join("plain.csv");
    std::fs::write(&csv, "image,mask,question,answer,modality\na.jpg,a_mask.png,Where?,Right.,polyp_endoscopy\n")
        .unwrap();
    let read = read_rows(&csv, &DatasetOptions::default()).unwrap();
    let e = check_rows(read.rows, vec![], false).unwrap_err();
    let v = e.downcast_ref::<ValidationError>().unwrap();
    assert_eq!((v.problems.len(), v.problems[0].line), (1, 2), "{e}");
    let text = e.to_string();
    assert!(text.contains(&format!("{}:2: image: cannot load image", csv.display())), "{text}");
    assert!(text.contains("truncated JPEG"), "{text}");
}

// ---------------------------------------------------------------- mask values

fn grey(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> DynamicImage {
    DynamicImage::ImageLuma8(GrayImage::from_fn(w, h, |x, y| Luma([f(x, y)])))
}

fn fg(img: &GrayImage) -> usize {
    assert!(img.as_raw().iter().all(|&v| v == 0 || v == 255), "not 0/255");
    img.as_raw().iter().filter(|&&v| v == 255).count()
}

/// A 16x16 mask whose left 4 columns hold `a` and columns 4..8 hold `b`, the rest 0.
fn bands(a: u8, b: u8) -> DynamicImage {
    grey(16, 16, |x, _| {
        if x < 4 {
            a
        } else if x < 8 {
            b
        } else {
            0
        }
    })
}

#[test]
fn binary_masks_in_every_stored_form_are_accepted() {
    // 0/255, 0/1, empty, and the same square in each.
    assert_eq!(fg(&binarise_mask(&bands(255, 255)).unwrap()), 128);
    assert_eq!(fg(&binarise_mask(&bands(1, 1)).unwrap()), 128);
    assert_eq!(fg(&binarise_mask(&bands(0, 0)).unwrap()), 0);
    // A red outline on black (colour masks: channel maximum).
    let red = RgbImage::from_fn(16, 16, |x, y| if x == 3 || y == 3 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 0]) });
    assert_eq!(fg(&binarise_mask(&DynamicImage::ImageRgb8(red)).unwrap()), 31);
    // 16-bit files are read at 16 bits: 0/1 is not rounded to an empty 8-bit mask.
    let m16 =
        |v: u16| DynamicImage::ImageLuma16(ImageBuffer::from_fn(16, 16, |x, _| Luma([if x < 4 { v } else { 0 }])));
    assert_eq!(fg(&binarise_mask(&m16(1)).unwrap()), 64);
    assert_eq!(fg(&binarise_mask(&m16(u16::MAX)).unwrap()), 64);
    // Anti-aliased / JPEG-like: near 0 and near 255 with a thin mid-grey edge.
    let soft = grey(16, 16, |x, y| match x {
        0..=3 => 250 - (y % 3) as u8,
        4 => 130,
        5 => 90,
        _ => (y % 4) as u8,
    });
    assert_eq!(fg(&binarise_mask(&soft).unwrap()), 80, "values >= 128 are lesion");
}

#[test]
fn masks_that_are_not_binary_are_reported_with_their_values() {
    // Class ids.
    let ids = grey(16, 16, |x, _| (x / 4) as u8);
    let e = binarise_mask(&ids).unwrap_err();
    assert!(matches!(e, MaskError::NotBinary { .. }));
    assert!(e.to_string().starts_with("has values {0, 1, 2, 3}: not a binary mask"), "{e}");
    assert!(e.to_string().contains("mask_nonzero_is_lesion"), "the message names the option: {e}");
    // 0/128 (would have been all lesion), 0/100 (all background), 0/2 (one class id).
    for (v, want) in [(128u8, "{0, 128}"), (100, "{0, 100}"), (2, "{0, 2}")] {
        let e = binarise_mask(&bands(v, v)).unwrap_err().to_string();
        assert!(e.starts_with(&format!("has values {want}: not a binary mask")), "{e}");
    }
    // A photograph: many values listed briefly.
    let photo = grey(32, 32, |x, y| ((x * 8 + y) % 256) as u8);
    let e = binarise_mask(&photo).unwrap_err();
    assert!(matches!(e, MaskError::LooksLikeImage { .. }), "{e}");
    let t = e.to_string();
    assert!(t.contains("is not binary") && t.contains("distinct") && t.len() < 300, "{t}");
}

#[test]
fn nonzero_rule_reads_label_masks() {
    let ids = grey(16, 16, |x, _| (x / 4) as u8); // 0, 1, 2, 3 in four bands
    assert_eq!(fg(&binarise_mask_with(&ids, MaskRule::NonZero).unwrap()), 3 * 64);
    assert_eq!(fg(&binarise_mask_with(&bands(128, 0), MaskRule::NonZero).unwrap()), 64);
    let ids16 = DynamicImage::ImageLuma16(ImageBuffer::from_fn(16, 16, |x, _| Luma([(x / 4) as u16 * 300])));
    assert_eq!(fg(&binarise_mask_with(&ids16, MaskRule::NonZero).unwrap()), 3 * 64);
    // Too many values for a label mask: a photo or lossy noise would all become lesion.
    let photo = grey(32, 32, |x, y| ((x * 8 + y) % 256) as u8);
    assert!(matches!(binarise_mask_with(&photo, MaskRule::NonZero), Err(MaskError::NotLabels { .. })));
}

/// A plain-CSV dataset: row 2 a good 0/255 mask, row 3 class ids, row 4 a 0/128 mask.
fn label_dataset(root: &Path) -> PathBuf {
    let img = picture(16, 16);
    img.save(root.join("img.png")).unwrap();
    if let DynamicImage::ImageLuma8(g) = bands(255, 255) {
        g.save(root.join("good.png")).unwrap();
    }
    if let DynamicImage::ImageLuma8(g) = grey(16, 16, |x, _| (x / 4) as u8) {
        g.save(root.join("ids.png")).unwrap();
    }
    if let DynamicImage::ImageLuma8(g) = bands(128, 0) {
        g.save(root.join("half.png")).unwrap();
    }
    let csv = root.join("plain.csv");
    std::fs::write(
        &csv,
        "image,mask,question,answer,modality\n\
         img.png,good.png,Where?,Left.,polyp_endoscopy\n\
         img.png,ids.png,Where?,Left.,polyp_endoscopy\n\
         img.png,half.png,Where?,Left.,polyp_endoscopy\n",
    )
    .unwrap();
    csv
}

fn tokenizer() -> Arc<tokenizers::Tokenizer> {
    Arc::new(prs::tokenizer::from_sentencepiece(&common::tokenizer_model()).unwrap())
}

fn builder(sam: usize) -> SampleBuilder {
    SampleBuilder {
        tokenizer: tokenizer(),
        template: prs::tokenizer::DEFAULT_PROMPT_TEMPLATE.into(),
        clip_size: 28,
        sam_size: sam,
    }
}

#[test]
fn non_binary_mask_rows_are_reported_and_the_option_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let csv = label_dataset(dir.path());
    let e = prepare(&csv, &PrepareOptions { val_fraction: 0.0, ..Default::default() }).unwrap_err();
    let v = e.downcast_ref::<ValidationError>().unwrap();
    assert_eq!(v.problems.iter().map(|p| p.line).collect::<Vec<_>>(), [3, 4], "{e}");
    let text = e.to_string();
    let ids = dir.path().join("ids.png");
    let want = format!("{}:3: mask {} has values {{0, 1, 2, 3}}: not a binary mask", csv.display(), ids.display());
    assert!(text.contains(&want), "{text}");
    assert!(text.contains("has values {0, 128}"), "{text}");

    // With the option every row passes, and the rule travels with the rows to the loader.
    let opts = PrepareOptions {
        val_fraction: 0.0,
        dataset: DatasetOptions { mask_rule: MaskRule::NonZero, ..Default::default() },
        ..Default::default()
    };
    let p = prepare(&csv, &opts).unwrap();
    assert_eq!(p.train.len(), 3);
    assert!(p.train.iter().all(|r| r.mask_rule == MaskRule::NonZero));
    assert_eq!(fg(&load_mask_with(&ids, MaskRule::NonZero).unwrap()), 3 * 64);
    let builder = builder(64);
    let sample = builder.prepare(&p.train[1], true).unwrap();
    let mask = sample.mask.unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(mask, (48 * 64) as f32, "three of the four bands are lesion at 64x64");
    // The default rule refuses the same row in the loader too.
    let strict = read_rows(&csv, &DatasetOptions::default()).unwrap().rows;
    assert!(err_text(builder.prepare(&strict[1], true)).contains("not a binary mask"));
}

#[test]
fn the_option_comes_from_config_and_flags() {
    // Older configs (no such key) parse, with the option off.
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    let cfg = prs::config::Config::load(&tiny).unwrap();
    assert!(!cfg.data.mask_nonzero_is_lesion);
    assert_eq!(PrepareOptions::from_config(&cfg).dataset.mask_rule, MaskRule::Binary);
    let cli = prs::cli::Cli::try_parse_from(["prs", "finetune", "--config", tiny.to_str().unwrap(), "--seed", "9"]);
    let prs::cli::Command::Finetune(a) = cli.unwrap().command else { panic!("not finetune") };
    assert!(!prs::commands::finetune::resolve_config(&a).unwrap().data.mask_nonzero_is_lesion);

    let cli = prs::cli::Cli::try_parse_from([
        "prs",
        "finetune",
        "--config",
        tiny.to_str().unwrap(),
        "--mask-nonzero-is-lesion",
        "--seed",
        "9",
    ]);
    let prs::cli::Command::Finetune(a) = cli.unwrap().command else { panic!("not finetune") };
    let cfg = prs::commands::finetune::resolve_config(&a).unwrap();
    assert!(cfg.data.mask_nonzero_is_lesion);
    let o = PrepareOptions::from_config(&cfg);
    assert_eq!((o.dataset.mask_rule, o.seed, o.val_fraction), (MaskRule::NonZero, 9, cfg.data.val_fraction));
    // The saved config keeps it.
    assert!(prs::config::Config::parse(&cfg.to_toml().unwrap(), &[]).unwrap().data.mask_nonzero_is_lesion);
    let set = prs::config::Config::parse(
        &std::fs::read_to_string(&tiny).unwrap(),
        &["data.mask_nonzero_is_lesion=true".to_string()],
    );
    assert!(set.unwrap().data.mask_nonzero_is_lesion);
}

#[derive(Parser)]
struct EvalCli {
    #[command(flatten)]
    a: prs::commands::evaluate::EvaluateArgs,
}

/// `prs evaluate --pred-dir` reads the ground truth through the same rule.
#[test]
fn evaluate_reports_label_masks_and_reads_them_with_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let m = data.join("polyp_endoscopy");
    for d in ["test_images", "test_masks"] {
        std::fs::create_dir_all(m.join(d)).unwrap();
    }
    std::fs::create_dir_all(data.join("annotations")).unwrap();
    picture(16, 16).save(m.join("test_images/1.png")).unwrap();
    if let DynamicImage::ImageLuma8(g) = grey(16, 16, |x, _| (x / 4) as u8) {
        g.save(m.join("test_masks/1.png")).unwrap();
    }
    std::fs::write(
        data.join("annotations/polyp.csv"),
        "image_path,image_name,question,answer,position,split\n\
         polyp_endoscopy/test_masks/1.png,1.png,Where?,Right.,right,test\n",
    )
    .unwrap();
    // A perfect prediction of "non-zero is lesion".
    let preds = dir.path().join("preds/polyp_endoscopy");
    std::fs::create_dir_all(&preds).unwrap();
    GrayImage::from_fn(16, 16, |x, _| Luma([if x >= 4 { 255 } else { 0 }])).save(preds.join("1.png")).unwrap();
    let run = |extra: &[&str], out: &str| {
        let p = dir.path().join("preds").display().to_string();
        let (d, o) = (data.display().to_string(), dir.path().join(out).display().to_string());
        let mut args = vec!["prs", "--pred-dir", &p, "--data-root", &d, "--out", &o];
        args.extend(extra);
        prs::commands::evaluate::run(&EvalCli::try_parse_from(args).unwrap().a)
    };
    let e = err_text(run(&[], "strict"));
    assert!(e.contains("polyp.csv:2") && e.contains("has values {0, 1, 2, 3}: not a binary mask"), "{e}");
    run(&["--mask-nonzero-is-lesion"], "labels").unwrap();
    let sum: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("labels/summary.json")).unwrap()).unwrap();
    assert_eq!(sum["overall"]["dice"]["mean"], 1.0, "{}", sum["overall"]);
}

// ---------------------------------------------------------------- weights

fn cpu_opts(mode: Mode, ckpt: Option<&Path>) -> LoadOptions<'_> {
    LoadOptions { device: Device::Cpu, dtype: DType::F32, mode, checkpoint: ckpt, seed: 3 }
}

/// Rewrites the safetensors file holding `name` (a shard of the base model) with `f` applied to it.
fn edit_safetensors(file: &Path, name: &str, f: impl Fn(&Tensor) -> Tensor) {
    let all = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    assert!(all.contains_key(name), "{name} not in {}", file.display());
    let tensors: Vec<(String, Tensor)> =
        all.into_iter().map(|(k, t)| if k == name { (k, f(&t)) } else { (k, t) }).collect();
    write_safetensors_atomic(file, &tensors, None).unwrap();
}

fn shard_of(base: &Path, name: &str) -> PathBuf {
    let index = read_index(&base.join("model.safetensors.index.json")).unwrap();
    base.join(&index.weight_map[name])
}

/// `t` with element `i` (flat) set to `v`.
fn with_value(t: &Tensor, i: usize, v: f32) -> Tensor {
    let mut data = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    data[i] = v;
    Tensor::from_vec(data, t.shape(), &Device::Cpu).unwrap().to_dtype(t.dtype()).unwrap()
}

#[test]
fn nan_or_integer_base_weights_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_model(dir.path());
    let base = PathBuf::from(&cfg.model.base);
    let name = "model.layers.1.self_attn.v_proj.weight";
    let shard = shard_of(&base, name);
    let pristine = std::fs::read(&shard).unwrap();

    edit_safetensors(&shard, name, |t| with_value(t, 5, f32::NAN));
    let e = err_text(load_prs_med(&cfg, &cpu_opts(Mode::Infer, None)));
    assert!(e.contains(&format!("tensor `{name}` in {}", shard.display())), "{e}");
    assert!(e.contains("holds 1 NaN and 0 infinite value(s)"), "{e}");
    // Training loads the same way.
    assert!(err_text(load_prs_med(&cfg, &cpu_opts(Mode::Train, None))).contains(name));

    std::fs::write(&shard, &pristine).unwrap();
    edit_safetensors(&shard, name, |t| with_value(t, 0, f32::NEG_INFINITY));
    let e = err_text(load_prs_med(&cfg, &cpu_opts(Mode::Infer, None)));
    assert!(e.contains(name) && e.contains("0 NaN and 1 infinite"), "{e}");

    std::fs::write(&shard, &pristine).unwrap();
    edit_safetensors(&shard, name, |t| t.to_dtype(DType::I64).unwrap());
    let e = err_text(load_prs_med(&cfg, &cpu_opts(Mode::Infer, None)));
    assert!(e.contains(&format!("tensor `{name}` in {} is stored as I64", shard.display())), "{e}");
    assert!(e.contains("must be a float tensor"), "{e}");

    std::fs::write(&shard, &pristine).unwrap();
    load_prs_med(&cfg, &cpu_opts(Mode::Infer, None)).expect("the restored model loads");
}

#[test]
fn bad_tensors_in_pth_and_trained_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_model(dir.path());
    // TinySAM .pth: a NaN in a frozen conv weight (inference keeps TinySAM frozen without a checkpoint).
    let pth = PathBuf::from(&cfg.model.tinysam);
    let all = candle_core::pickle::read_all(&pth).unwrap();
    let name =
        all.iter().map(|(k, _)| k.clone()).find(|k| k.ends_with(".weight") && k.contains("patch_embed")).unwrap();
    let pristine = std::fs::read(&pth).unwrap();
    let edited: Vec<(String, Tensor)> =
        all.iter().map(|(k, t)| (k.clone(), if *k == name { with_value(t, 1, f32::NAN) } else { t.clone() })).collect();
    prs::weights::pth::write_pth_atomic(&pth, &edited).unwrap();
    let e = err_text(load_prs_med(&cfg, &cpu_opts(Mode::Infer, None)));
    assert!(e.contains(&format!("tensor `{name}` in {}", pth.display())) && e.contains("NaN"), "{e}");
    std::fs::write(&pth, &pristine).unwrap();

    // A project checkpoint whose mask decoder holds a NaN (a diverged run saved anyway).
    let m = load_prs_med(&cfg, &cpu_opts(Mode::Train, None)).unwrap();
    let ckpt = dir.path().join("ckpt");
    let meta = prs::weights::checkpoint::CheckpointMeta::new(
        &cfg.model.base,
        &cfg.model.tinysam,
        toml::to_string(&cfg.model).unwrap(),
    );
    prs::weights::checkpoint::save_checkpoint(&ckpt, &m.trained, &m.spec.lora, meta).unwrap();
    load_prs_med(&cfg, &cpu_opts(Mode::Infer, Some(&ckpt))).expect("the saved checkpoint loads");
    let file = ckpt.join("mask_decoder.safetensors");
    let key = m.trained.group("mask_decoder")[0].key.clone();
    edit_safetensors(&file, &key, |t| with_value(t, 0, f32::NAN));
    let e = err_text(load_prs_med(&cfg, &cpu_opts(Mode::Infer, Some(&ckpt))));
    assert!(e.contains(&format!("tensor `{key}` in {}", file.display())) && e.contains("NaN"), "{e}");
}

#[test]
fn weight_checks_at_the_file_level() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let dev = Device::Cpu;
    let tensors = vec![
        ("big".to_string(), Tensor::full(1.0e6f32, (2, 2), &dev).unwrap()),
        // Every element finite, but their sum overflows: the one-reduction scan must not refuse it.
        ("many".to_string(), Tensor::full(3.0e38f32, 4096, &dev).unwrap()),
        ("ids".to_string(), Tensor::new(&[3i64, 4, 5], &dev).unwrap()),
        ("flags".to_string(), Tensor::new(&[1u8, 0], &dev).unwrap()),
    ];
    write_safetensors_atomic(&path, &tensors, None).unwrap();
    let st = open_safetensors_paths(std::slice::from_ref(&path), DType::F32, &dev).unwrap();
    let many = st.vb.get(4096, "many").unwrap();
    assert_eq!(many.max(0).unwrap().to_scalar::<f32>().unwrap(), 3.0e38);
    // F32 values beyond F16's range: an overflow of the conversion, said as such.
    let f16 = open_safetensors_paths(std::slice::from_ref(&path), DType::F16, &dev).unwrap();
    let e = f16.vb.get((2, 2), "big").unwrap_err().to_string();
    assert!(e.contains("tensor `big`") && e.contains("overflow F16") && e.contains("1e6"), "{e}");
    assert!(st.vb.get((2, 2), "big").is_ok());
    // Integer tensors cannot be read as weights, but can be read as what they are.
    assert!(st.vb.get(3, "ids").unwrap_err().to_string().contains("stored as I64"));
    assert!(st.vb.get(2, "flags").unwrap_err().to_string().contains("stored as U8"));
    let ids = st.vb.get_unchecked_dtype("ids", DType::I64).unwrap();
    assert_eq!(ids.to_vec1::<i64>().unwrap(), [3, 4, 5]);
}

// ---------------------------------------------------------------- LoRA targets

#[test]
fn lora_targets_that_name_no_module_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_model(dir.path());
    let with = |targets: &[&str], r: usize| {
        let mut c = cfg.clone();
        c.model.lora.target_modules = targets.iter().map(|s| s.to_string()).collect();
        c.model.lora.r = r;
        load_prs_med(&c, &cpu_opts(Mode::Train, None))
    };
    let e = err_text(with(&["q_proj", "qproj", "v_proj"], 8));
    assert!(e.contains("model.lora.target_modules: `qproj` (did you mean `q_proj`?)"), "{e}");
    assert!(e.contains("valid names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"), "{e}");
    let e = err_text(with(&["self_attn", "mlp.down_proj"], 8));
    assert!(e.contains("`self_attn`, `mlp.down_proj`"), "{e}");
    assert!(err_text(with(&["q_proj"], 0)).contains("model.lora.r must be at least 1"));
    // Valid names still build LoRA on exactly those projections.
    let m = with(&["q_proj", "down_proj"], 8).unwrap();
    let layers = cfg.init.as_ref().unwrap().llm.num_hidden_layers;
    assert_eq!(m.trained.group("lora").len(), layers * 2 * 2);
}

// ---------------------------------------------------------------- prompt length

#[test]
fn prompt_length_is_checked_against_the_positions() {
    let limits = PromptLimits { image_tokens: 64, max_positions: 100 };
    let p = |text: usize, answer: usize| PromptIds {
        before_image: vec![1],
        after_image: vec![5; text - 1],
        answer: vec![7; answer],
    };
    assert_eq!(check_prompt_length(&p(36, 0), limits).unwrap(), 0, "exactly full");
    assert_eq!(check_prompt_length(&p(30, 0), limits).unwrap(), 6, "room left to generate");
    assert_eq!(check_prompt_length(&p(30, 5), limits).unwrap(), 0, "answer + EOS count");
    let e = err_text(check_prompt_length(&p(30, 6), limits));
    assert!(e.contains("needs 101 positions (30 text + 64 image + 7 answer and EOS)"), "{e}");
    assert!(e.contains("at most 100 (max_position_embeddings)"), "{e}");
    assert!(err_text(check_prompt_length(&p(37, 0), limits)).contains("needs 101 positions (37 text + 64 image)"));
}

#[test]
fn over_long_rows_are_reported_with_csv_and_row_and_the_model_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_model(dir.path());
    let llava = read_llava_config(&ModelSource::parse(&cfg.model.base).unwrap()).unwrap();
    let limits = llava.prompt_limits().unwrap();
    assert_eq!(limits, PromptLimits { image_tokens: 64, max_positions: 2048 });

    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    picture(16, 16).save(root.join("img.png")).unwrap();
    if let DynamicImage::ImageLuma8(g) = bands(255, 0) {
        g.save(root.join("m.png")).unwrap();
    }
    let long = "where is the lesion ".repeat(600); // ~2400 tokens
    let csv = root.join("plain.csv");
    std::fs::write(
        &csv,
        format!(
            "image,mask,question,answer,modality\nimg.png,m.png,Where?,Left.,polyp_endoscopy\n\
             img.png,m.png,{long},Left.,polyp_endoscopy\nimg.png,m.png,Where is it?,Left.,polyp_endoscopy\n"
        ),
    )
    .unwrap();
    let rows = read_rows(&csv, &DatasetOptions::default()).unwrap().rows;
    let b = SampleBuilder { template: cfg.prompt.template.clone(), ..builder(64) };
    let e = check_prompt_lengths(rows.clone(), &b, limits, true, false).unwrap_err();
    let v = e.downcast_ref::<ValidationError>().unwrap();
    assert_eq!(v.problems.iter().map(|p| p.line).collect::<Vec<_>>(), [3]);
    let text = e.to_string();
    assert!(text.contains(&format!("{}:3: the prompt is too long", csv.display())), "{text}");
    assert!(text.contains("but the model takes at most 2048"), "{text}");
    let kept = check_prompt_lengths(rows.clone(), &b, limits, true, true).unwrap();
    assert_eq!((kept.rows.iter().map(|r| r.line).collect::<Vec<_>>(), kept.dropped.len()), (vec![2, 4], 1));
    // The counts kept for the batch plan are those of the row's own training sequence.
    let p = encode_prompt(&b.tokenizer, &cfg.prompt.template, &rows[2].question, Some(&rows[2].answer)).unwrap();
    let t = kept.tokens[1];
    assert_eq!(t.text, p.before_image.len() + p.after_image.len() + p.answer.len());
    assert_eq!(t.supervised, p.answer.len() + 1);
    assert_ne!(kept.tokens[0].text, t.text, "two questions of different length");

    // The model itself refuses such an input (the guard behind every caller).
    let m = load_prs_med(&cfg, &cpu_opts(Mode::Infer, None)).unwrap();
    assert_eq!(m.prompt_limits().unwrap(), limits);
    let prompt = encode_prompt(&b.tokenizer, &cfg.prompt.template, &rows[1].question, None).unwrap();
    let image = Tensor::zeros((1, 64, llava.llm.hidden_size), DType::F32, &Device::Cpu).unwrap();
    let e = err_text(m.llm_inputs(&[prompt], &image, false));
    assert!(e.contains("sample 0 of the batch needs") && e.contains("max_position_embeddings is 2048"), "{e}");
    let short = encode_prompt(&b.tokenizer, &cfg.prompt.template, "Where?", None).unwrap();
    assert!(m.llm_inputs(&[short], &image, false).is_ok());
}
