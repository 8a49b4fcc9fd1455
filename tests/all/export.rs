//! `prs export` on the tiny model: the merged folder predicts what checkpoint + adapter predict
//! (bit for bit against the adapter merged at load; answer ids identical and mask logits within
//! f32 rounding against the separate branch) and holds W + scale * B A under the
//! base's own key names; the authors' layout reads back to identical tensors; bad input errors
//! without writing anything.

use std::path::Path;

use candle_core::{DType, Device};
use clap::Parser;
use prs::model::prs_med::ModelBatch;
use prs::pipeline::export::load_for_export;
use prs::pipeline::generate::{predict_batch, BatchOutput, GenerateOptions};
use prs::pipeline::load::{load_model, Loaded, ModelArgs};
use prs::weights::pth::pth_tensor_names;
use prs::weights::shards::{open_safetensors_paths, read_index};

use crate::common::rel_err;
use crate::infer_setup::{project_checkpoint, s, setup, synth};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: prs::commands::export::ExportArgs,
}

fn export(args: &[&str]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("prs").chain(args.iter().copied()))?;
    prs::commands::export::run(&cli.a)
}

fn cpu() -> ModelArgs {
    ModelArgs { device: "cpu".into(), ..Default::default() }
}

fn predict(l: &Loaded, image: &Path) -> BatchOutput {
    let im = prs::data::preprocess::load_image(image).unwrap();
    let clip = l.model.spec.llava.vision_config().unwrap().image_size;
    let q = "Where is the tumour in this CT scan?";
    let batch = ModelBatch {
        clip_pixels: prs::data::preprocess::clip_preprocess(&im, clip).unwrap().unsqueeze(0).unwrap(),
        sam_pixels: prs::data::preprocess::sam_preprocess(&im, l.cfg.model.sam_image_size)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
        prompts: vec![prs::tokenizer::encode_prompt(&l.tokenizer, &l.cfg.prompt.template, q, None).unwrap()],
        masks: None,
        modality: None,
    };
    let g = GenerateOptions { max_new_tokens: 8, stop_at_eos: false, ..Default::default() };
    predict_batch(&l.model, &batch, &g).unwrap()
}

fn first_image(data: &Path) -> std::path::PathBuf {
    let dir = data.join("brain_tumors_ct_scan/test_images");
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v.remove(0)
}

#[test]
fn merged_export_predicts_what_the_adapter_does() {
    let st = setup();
    let out = st.dir.path().join("merged");
    export(&["--checkpoint", &s(&st.project), "--out", &s(&out), "--merge-lora"]).unwrap();
    for f in ["model.safetensors.index.json", "config.json", "tokenizer.model", "prs_checkpoint.json"] {
        assert!(out.join(f).is_file(), "{f} missing from the merged export");
    }
    for f in ["image_encoder.safetensors", "mask_decoder.safetensors", "classifier.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing from the merged export");
    }
    assert!(!out.join("adapter_config.json").exists() && !out.join("adapter_model.safetensors").exists());
    // Exactly the base's key names, sharded like the base.
    let base = Path::new(&st.cfg.model.base);
    let bi = read_index(&base.join("model.safetensors.index.json")).unwrap();
    let mi = read_index(&out.join("model.safetensors.index.json")).unwrap();
    assert_eq!(bi.weight_map.keys().collect::<Vec<_>>(), mi.weight_map.keys().collect::<Vec<_>>());
    assert!(mi.weight_map.values().collect::<std::collections::BTreeSet<_>>().len() > 1, "not sharded");
    assert!(mi.weight_map.keys().any(|k| k.starts_with("model.vision_tower.vision_tower.vision_model.")));

    // W + scale * B A, recomputed here from the files.
    let open = |dir: &Path| {
        let files: Vec<_> = read_index(&dir.join("model.safetensors.index.json"))
            .unwrap()
            .weight_map
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|f| dir.join(f))
            .collect();
        open_safetensors_paths(&files, DType::F32, &Device::Cpu).unwrap().vb
    };
    let (bvb, mvb) = (open(base), open(&out));
    let adapter =
        open_safetensors_paths(&[st.project.join("adapter_model.safetensors")], DType::F32, &Device::Cpu).unwrap().vb;
    let key = "model.layers.0.self_attn.q_proj";
    let w = bvb.get_unchecked(&format!("{key}.weight")).unwrap();
    let a = adapter.get_unchecked(&format!("base_model.model.{key}.lora_A.weight")).unwrap();
    let b = adapter.get_unchecked(&format!("base_model.model.{key}.lora_B.weight")).unwrap();
    let want = (&w + (b.matmul(&a).unwrap() * st.cfg.model.lora.scale()).unwrap()).unwrap();
    let got = mvb.get_unchecked(&format!("{key}.weight")).unwrap();
    assert!(rel_err(&w, &got) > 1e-3, "the merged weight is the base's: no LoRA was folded in");
    assert!(rel_err(&want, &got) < 1e-6, "merged weight differs from W + scale B A");
    let norm = "model.norm.weight";
    assert_eq!(
        bvb.get_unchecked(norm).unwrap().to_vec1::<f32>().unwrap(),
        mvb.get_unchecked(norm).unwrap().to_vec1::<f32>().unwrap()
    );

    // Loaded with no adapter, it predicts what the checkpoint with its adapter predicts: bit for
    // bit when the checkpoint's adapter is merged at load (the same f32 arithmetic), within f32
    // rounding when it runs as a separate branch.
    let at_load = load_model(&st.project, &cpu()).unwrap();
    let separate = load_model(&st.project, &ModelArgs { no_merge_lora: true, ..cpu() }).unwrap();
    let merged = load_model(&out, &cpu()).unwrap();
    assert_eq!(merged.info.checkpoint_format, "merged");
    assert_eq!(
        (at_load.info.lora.as_str(), separate.info.lora.as_str(), merged.info.lora.as_str()),
        ("merged", "separate", "none")
    );
    assert!(merged.model.spec.lora.target_modules.is_empty() && merged.model.trained.group("lora").is_empty());
    let image = first_image(&synth(st.dir.path(), 1, 64));
    let (l, u, m) = (predict(&at_load, &image), predict(&separate, &image), predict(&merged, &image));
    assert_eq!(l.answers, m.answers);
    let bits = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(bits(&l.mask_logits), bits(&m.mask_logits), "merged at load vs merged export");
    assert_eq!(u.answers, m.answers);
    let e = rel_err(&u.mask_logits, &m.mask_logits);
    assert!(e < 1e-5, "mask logits differ by {e} (relative)");
    let d = (&u.mask_logits - &m.mask_logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("merged vs separate adapter: answers {:?}, mask logits max |diff| {d:.2e}, relative {e:.2e}", m.answers);
    // And through `prs predict --checkpoint`.
    let cli = <PredictCli as Parser>::try_parse_from([
        "prs",
        "--checkpoint",
        &s(&out),
        "--image",
        &s(&image),
        "--question",
        "Where?",
        "--out",
        &s(&st.dir.path().join("pred")),
        "--device",
        "cpu",
    ])
    .unwrap();
    prs::commands::predict::run(&cli.a).unwrap();

    // An existing export is replaced only with --overwrite.
    let again = || export(&["--checkpoint", &s(&st.project), "--out", &s(&out), "--merge-lora"]);
    let e = format!("{:#}", again().unwrap_err());
    assert!(e.contains("--overwrite"), "{e}");
    export(&["--checkpoint", &s(&st.project), "--out", &s(&out), "--merge-lora", "--overwrite"]).unwrap();
    // A merged export is not exported again.
    let e = format!(
        "{:#}",
        export(&["--checkpoint", &s(&out), "--out", &s(&st.dir.path().join("x")), "--merge-lora"]).unwrap_err()
    );
    assert!(e.contains("already a merged export"), "{e}");
}

#[derive(Parser)]
struct PredictCli {
    #[command(flatten)]
    a: prs::commands::predict::PredictArgs,
}

#[test]
fn authors_layout_round_trips_to_identical_tensors() {
    let st = setup();
    // The authors' layout has no projector file: a run that kept the base's projector.
    let mut cfg = st.cfg.clone();
    cfg.model.trainable.projector = false;
    let ck = st.dir.path().join("ckpt-noproj");
    project_checkpoint(&cfg, &ck, None);
    let rel = st.dir.path().join("release");
    std::fs::remove_dir_all(&rel).unwrap();
    export(&["--checkpoint", &s(&ck), "--out", &s(&rel), "--format", "authors"]).unwrap();

    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rel.join("lora_adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["r"], cfg.model.lora.r);
    let lora =
        prs::weights::shards::read_safetensors_header(&rel.join("lora_adapter/adapter_model.safetensors")).unwrap();
    assert!(!lora.tensors.is_empty());
    assert!(lora.tensors.keys().all(|k| k.starts_with("base_model.model.model.layers.") && k.contains(".lora_")));
    let enc = pth_tensor_names(&rel.join("image_encoder.pth")).unwrap();
    let plain: Vec<_> = enc.iter().filter_map(|k| k.strip_prefix("image_encoder.")).collect();
    let sam: Vec<_> = enc.iter().filter_map(|k| k.strip_prefix("sam.image_encoder.")).collect();
    assert!(!plain.is_empty() && plain == sam && plain.len() + sam.len() == enc.len());
    assert!(!pth_tensor_names(&rel.join("mask_decoder.pth")).unwrap().is_empty());
    assert!(!pth_tensor_names(&rel.join("cls.pth")).unwrap().is_empty());

    // Read back: every trained tensor identical.
    let before = load_for_export(&ck, &cpu()).unwrap();
    let after = load_for_export(&rel, &ModelArgs { config: Some(st.config_file.clone()), ..cpu() }).unwrap();
    for g in ["lora", "image_encoder", "mask_decoder", "classifier"] {
        let (x, y) = (before.model.trained.group(g), after.model.trained.group(g));
        assert!(!x.is_empty());
        assert_eq!(x.iter().map(|p| &p.key).collect::<Vec<_>>(), y.iter().map(|p| &p.key).collect::<Vec<_>>(), "{g}");
        for (p, q) in x.iter().zip(&y) {
            let d = (p.var.as_tensor() - q.var.as_tensor()).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{g}/{} changed in the round trip", p.key);
        }
    }

    // A trained projector has no place in their layout: refused, nothing written.
    let other = st.dir.path().join("release2");
    let e = format!(
        "{:#}",
        export(&["--checkpoint", &s(&st.project), "--out", &s(&other), "--format", "authors"]).unwrap_err()
    );
    assert!(e.contains("mm_projector") && e.contains("--merge-lora"), "{e}");
    assert!(!other.exists());
}

#[test]
fn export_refuses_bad_input_without_writing() {
    let st = setup();
    let d = st.dir.path();
    let out = d.join("o");
    let e =
        format!("{:#}", export(&["--checkpoint", &s(&d.join("nope")), "--out", &s(&out), "--merge-lora"]).unwrap_err());
    assert!(e.contains("nope") && e.contains("not a folder"), "{e}");
    assert!(!out.exists());
    let e = format!("{:#}", export(&["--checkpoint", &s(&st.project), "--out", &s(&out)]).unwrap_err());
    assert!(e.contains("--merge-lora") && e.contains("--format authors"), "{e}");
    // A folder of the user's: refused, left as it was.
    let mine = d.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    let (project, mine_s) = (s(&st.project), s(&mine));
    for extra in [None, Some("--overwrite")] {
        let mut args = vec!["--checkpoint", project.as_str(), "--out", mine_s.as_str(), "--merge-lora"];
        args.extend(extra);
        let e = format!("{:#}", export(&args).unwrap_err());
        assert!(e.contains("not written by prs export") && e.contains("notes.txt"), "{e}");
    }
    assert_eq!(std::fs::read_to_string(mine.join("notes.txt")).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 1);
    // No temporary folder left beside it either.
    let stray: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}
