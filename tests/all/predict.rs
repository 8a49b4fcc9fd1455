//! `prs predict` end to end on the tiny model: outputs at the original resolution agree with
//! the model's own forward and with an independent resampling, KV-cached batched generation
//! matches one-by-one decoding, seeded sampling, batch mode with resume, the authors' layout,
//! and the error messages (nothing partial left behind).

use crate::common;
use crate::infer_setup;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clap::Parser;
use common::{rel_err, tokenizer_model};
use image::{GrayImage, RgbImage};
use infer_setup::{opts, project_checkpoint, s, setup, synth};
use prs::data::preprocess::{clip_preprocess, load_image, sam_preprocess};
use prs::model::prs_med::{ModelBatch, PrsMed};
use prs::pipeline::build::{load_prs_med, Mode};
use prs::pipeline::generate::{predict_batch, sampler, GenerateOptions};
use prs::tokenizer;

const Q: &str = "Where is the tumor located in this brain CT scan?";

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: prs::commands::predict::PredictArgs,
}

fn predict(args: &[&str]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("prs").chain(args.iter().copied()))?;
    prs::commands::predict::run(&cli.a)
}

/// A textured RGB image with a bright blob (PNG).
fn make_image(path: &Path, w: u32, h: u32) {
    let img = RgbImage::from_fn(w, h, |x, y| {
        let d = ((x as f32 - w as f32 * 0.3).powi(2) + (y as f32 - h as f32 * 0.6).powi(2)).sqrt();
        let v = if d < 12.0 { 220 } else { ((x * 7 + y * 13) % 90) as u8 + 30 };
        image::Rgb([v, v.saturating_sub(20), v / 2])
    });
    img.save(path).unwrap();
}

fn grey(path: &Path) -> GrayImage {
    image::open(path).unwrap().into_luma8()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn batch_for(m: &PrsMed, cfg: &prs::config::Config, images: &[&Path], questions: &[&str]) -> ModelBatch {
    let tok = tokenizer::load(Path::new(&cfg.model.base)).unwrap();
    let clip_size = m.spec.llava.vision_config().unwrap().image_size;
    let (mut c, mut sm, mut p) = (vec![], vec![], vec![]);
    for (img, q) in images.iter().zip(questions) {
        let im = load_image(img).unwrap();
        c.push(clip_preprocess(&im, clip_size).unwrap());
        sm.push(sam_preprocess(&im, cfg.model.sam_image_size).unwrap());
        p.push(tokenizer::encode_prompt(&tok, &cfg.prompt.template, q, None).unwrap());
    }
    ModelBatch {
        clip_pixels: Tensor::stack(&c, 0).unwrap(),
        sam_pixels: Tensor::stack(&sm, 0).unwrap(),
        prompts: p,
        masks: None,
        modality: None,
    }
}

/// PyTorch's bilinear resize (align_corners = false), written out independently.
fn bilinear(src: &[f32], sh: usize, sw: usize, dh: usize, dw: usize) -> Vec<f32> {
    let coord = |o: usize, n_in: usize, n_out: usize| {
        let c = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
        let i0 = (c.floor() as usize).min(n_in - 1);
        (i0, (i0 + 1).min(n_in - 1), c - i0 as f64)
    };
    let mut out = vec![0f32; dh * dw];
    for y in 0..dh {
        let (y0, y1, fy) = coord(y, sh, dh);
        for x in 0..dw {
            let (x0, x1, fx) = coord(x, sw, dw);
            let v = |yy: usize, xx: usize| src[yy * sw + xx] as f64;
            let top = v(y0, x0) * (1.0 - fx) + v(y0, x1) * fx;
            let bot = v(y1, x0) * (1.0 - fx) + v(y1, x1) * fx;
            out[y * dw + x] = (top * (1.0 - fy) + bot * fy) as f32;
        }
    }
    out
}

#[test]
fn single_image_from_a_project_checkpoint_matches_the_model() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    make_image(&img, 96, 72);
    let out = st.dir.path().join("pred");
    predict(&[
        "--checkpoint",
        &s(&st.project),
        "--image",
        &s(&img),
        "--question",
        Q,
        "--out",
        &s(&out),
        "--save-logits",
        "--max-new-tokens",
        "12",
    ])
    .unwrap();
    for f in ["mask.png", "prob.png", "overlay.png", "result.json", "mask_logits.safetensors"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let res = json(&out.join("result.json"));
    let (mask, prob) = (grey(&out.join("mask.png")), grey(&out.join("prob.png")));
    assert_eq!(mask.dimensions(), (96, 72));
    assert_eq!(prob.dimensions(), (96, 72));
    assert_eq!(image::open(out.join("overlay.png")).unwrap().into_rgb8().dimensions(), (96, 72));

    // The saved logits are the model's own (uncached, unbatched) forward.
    let m = load_prs_med(&st.cfg, &opts(Mode::Infer, Some(&st.project))).unwrap();
    let b = batch_for(&m, &st.cfg, &[&img], &[Q]);
    let want = m.forward(&b, false).unwrap().mask_logits;
    let saved = candle_core::safetensors::load(out.join("mask_logits.safetensors"), &Device::Cpu).unwrap();
    let got = &saved["mask_logits"];
    assert_eq!(got.dims(), &[1, 1, 128, 128]);
    let err = rel_err(got, &want);
    assert!(err < 1e-4, "saved logits differ from the model's forward: {err}");
    // The greedy answer is the model's greedy answer.
    let (_, ids) = common::greedy_reference(&m, &b, 12).unwrap();
    let got_ids: Vec<u32> = serde_json::from_value(res["answer_ids"].clone()).unwrap();
    assert_eq!(got_ids, ids);
    let tok = tokenizer::load(Path::new(&st.cfg.model.base)).unwrap();
    assert_eq!(res["answer"].as_str().unwrap(), tok.decode(&ids, true).unwrap());
    assert_eq!(
        res["position"].as_str().unwrap(),
        prs::metrics::parse_position(res["answer"].as_str().unwrap()).as_str()
    );

    // prob.png = sigmoid(bilinear(logits)) at 96x72, rounded to 8 bits.
    let logits = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let up = bilinear(&logits, 128, 128, 72, 96);
    let mut worst = 0f32;
    for (p, l) in prob.as_raw().iter().zip(&up) {
        let want = 1.0 / (1.0 + (-l).exp());
        worst = worst.max((*p as f32 / 255.0 - want).abs());
    }
    assert!(worst <= 0.5 / 255.0 + 1e-4, "prob.png off by {worst}");

    // mask.png is exactly prob >= 0.5, i.e. 8-bit level >= 128; the stats describe it.
    let on: Vec<bool> = mask
        .as_raw()
        .iter()
        .map(|&v| {
            assert!(v == 0 || v == 255, "mask.png is not binary");
            v == 255
        })
        .collect();
    let from_prob: Vec<bool> = prob.as_raw().iter().map(|&v| v >= 128).collect();
    assert_eq!(on, from_prob);
    let n = on.iter().filter(|&&b| b).count() as u64;
    assert_eq!(res["area_px"].as_u64().unwrap(), n);
    assert!((res["area_fraction"].as_f64().unwrap() - n as f64 / (96.0 * 72.0)).abs() < 1e-12);
    assert_eq!(res["empty"].as_bool().unwrap(), n == 0);
    if n > 0 {
        let pix: Vec<(u32, u32)> = (0..96 * 72).filter(|&i| on[i as usize]).map(|i| (i % 96, i / 96)).collect();
        let bb = &res["bbox"];
        assert_eq!(bb["x0"].as_u64().unwrap() as u32, pix.iter().map(|p| p.0).min().unwrap());
        assert_eq!(bb["x1"].as_u64().unwrap() as u32, pix.iter().map(|p| p.0).max().unwrap());
        assert_eq!(bb["y0"].as_u64().unwrap() as u32, pix.iter().map(|p| p.1).min().unwrap());
        assert_eq!(bb["y1"].as_u64().unwrap() as u32, pix.iter().map(|p| p.1).max().unwrap());
        let cx = pix.iter().map(|p| p.0 as f64).sum::<f64>() / n as f64;
        assert!((res["centroid"][0].as_f64().unwrap() - cx).abs() < 1e-9);
        let mean: f64 =
            (0..on.len()).filter(|&i| on[i]).map(|i| prob.as_raw()[i] as f64 / 255.0).sum::<f64>() / n as f64;
        assert!((res["mean_prob_inside"].as_f64().unwrap() - mean).abs() <= 0.5 / 255.0 + 1e-6);
    } else {
        assert!(res["bbox"].is_null() && res["centroid"].is_null());
    }
    assert_eq!(res["model"]["checkpoint_format"], "project");
    assert_eq!(res["model"]["checkpoint_step"], 7);
    for k in ["load_s", "encode_s", "decode_s"] {
        assert!(res["timings"][k].as_f64().unwrap() > 0.0, "{k}");
    }
    assert!(!std::fs::read_dir(st.dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp-")));
}

#[test]
fn batched_cached_generation_matches_one_by_one() {
    let st = setup();
    let m = load_prs_med(&st.cfg, &opts(Mode::Infer, Some(&st.project))).unwrap();
    let imgs: Vec<PathBuf> = (0..3).map(|i| st.dir.path().join(format!("im{i}.png"))).collect();
    for (i, p) in imgs.iter().enumerate() {
        make_image(p, 80 + 16 * i as u32, 64);
    }
    let qs = ["Where is it?", Q, "Please identify the lesion and tell me where it is located in the image."];
    let refs: Vec<&Path> = imgs.iter().map(|p| p.as_path()).collect();
    let all = batch_for(&m, &st.cfg, &refs, &qs);
    let g = GenerateOptions { max_new_tokens: 10, ..Default::default() };
    let together = predict_batch(&m, &all, &g).unwrap();
    for i in 0..3 {
        let one = batch_for(&m, &st.cfg, &[refs[i]], &[qs[i]]);
        let alone = predict_batch(&m, &one, &g).unwrap();
        assert_eq!(together.answers[i], alone.answers[0], "sample {i}: padding changed the answer");
        let (_, greedy) = common::greedy_reference(&m, &one, 10).unwrap();
        assert_eq!(alone.answers[0], greedy, "sample {i}: the generation loop differs from the reference");
        let e = rel_err(&together.mask_logits.narrow(0, i, 1).unwrap(), &alone.mask_logits);
        assert!(e < 1e-4, "sample {i}: mask rel err {e}");
    }
    // Sampling: the same seed gives the same answer; seeds differ at a high temperature.
    let one = batch_for(&m, &st.cfg, &[refs[0]], &[qs[0]]);
    let hot = |seed| GenerateOptions { max_new_tokens: 8, temperature: 1.5, top_p: 0.95, seed, stop_at_eos: true };
    let a = predict_batch(&m, &one, &hot(1)).unwrap().answers;
    assert_eq!(a, predict_batch(&m, &one, &hot(1)).unwrap().answers);
    let others: Vec<_> = (2..6).map(|s| predict_batch(&m, &one, &hot(s)).unwrap().answers).collect();
    assert!(others.iter().any(|o| *o != a), "sampling ignores the seed");
    // A fixed-length run without EOS stopping generates exactly max_new_tokens tokens.
    let fixed = GenerateOptions { max_new_tokens: 6, stop_at_eos: false, ..Default::default() };
    assert_eq!(predict_batch(&m, &all, &fixed).unwrap().answers.iter().map(Vec::len).collect::<Vec<_>>(), vec![6; 3]);
}

#[test]
fn sampler_follows_temperature_and_top_p() {
    let logits = Tensor::new(&[0.0f32, 3f32.ln(), -30.0], &Device::Cpu).unwrap();
    let opts = |seed, temperature, top_p| GenerateOptions { seed, temperature, top_p, ..Default::default() };
    let draws = |o: GenerateOptions, logits: &Tensor, n: usize| -> Vec<u32> {
        let mut s = sampler(&o);
        (0..n).map(|_| s.sample(logits).unwrap()).collect()
    };
    // Greedy: the maximum.
    assert_eq!(draws(opts(0, 0.0, 1.0), &logits, 1), [1]);
    // T = 1: p = (0.25, 0.75, ~0).
    let n = 20000;
    let ones = draws(opts(42, 1.0, 1.0), &logits, n).iter().filter(|&&t| t == 1).count() as f64 / n as f64;
    assert!((ones - 0.75).abs() < 0.015, "P(token 1) = {ones}");
    // top-p 0.5 keeps only the 0.75 token.
    assert!(draws(opts(7, 1.0, 0.5), &logits, 500).iter().all(|&t| t == 1));
    // Seeded: identical draws.
    let va = draws(opts(9, 2.0, 0.9), &logits, 100);
    assert_eq!(va, draws(opts(9, 2.0, 0.9), &logits, 100));
    assert!(va.contains(&0) && va.contains(&1));
    // High temperature flattens: token 0 gets close to half.
    let two = logits.narrow(0, 0, 2).unwrap();
    let zeros = draws(opts(3, 100.0, 1.0), &two, n).iter().filter(|&&t| t == 0).count() as f64 / n as f64;
    assert!((zeros - 0.497).abs() < 0.02, "P(token 0) at T=100: {zeros}");
}

#[test]
fn batch_mode_folder_csv_and_resume() {
    let st = setup();
    let dir = st.dir.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (w, h)) in [(64, 64), (90, 60), (50, 70)].into_iter().enumerate() {
        make_image(&dir.join(format!("case{i}.png")), w, h);
    }
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    let out = st.dir.path().join("batch");
    let args = [
        "--checkpoint",
        &s(&st.project),
        "--images",
        &s(&dir),
        "--question",
        Q,
        "--out",
        &s(&out),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
    ];
    predict(&args).unwrap();
    let csv = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.lines().next().unwrap().starts_with("id,image,question,answer,position"));
    for (i, (w, h)) in [(64u32, 64u32), (90, 60), (50, 70)].into_iter().enumerate() {
        let d = out.join(format!("case{i}"));
        assert_eq!(grey(&d.join("prob.png")).dimensions(), (w, h));
        assert_eq!(json(&d.join("result.json"))["timings"]["batch_size"], if i < 2 { 2 } else { 1 });
    }
    // Resume: finished items are not touched, a missing one is redone, stale temporaries go.
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let keep = stamp(&out.join("case0/result.json"));
    let before = json(&out.join("case1/result.json"));
    std::fs::remove_dir_all(out.join("case1")).unwrap();
    std::fs::create_dir_all(out.join(".case2.tmp-999")).unwrap();
    let mut resume = args.to_vec();
    resume.push("--resume");
    predict(&resume).unwrap();
    assert_eq!(stamp(&out.join("case0/result.json")), keep, "a finished item was redone");
    let again = json(&out.join("case1/result.json"));
    assert_eq!(again["answer_ids"], before["answer_ids"]);
    assert!(!out.join(".case2.tmp-999").exists());
    assert_eq!(std::fs::read_to_string(out.join("predictions.csv")).unwrap().lines().count(), 4);

    // The authors' CSV: image_path names the mask; rows of one split.
    let data = synth(st.dir.path(), 2, 64);
    let csv_in = data.join("annotations/brain_tumors_ct_scan.csv");
    let out2 = st.dir.path().join("from_csv");
    predict(&[
        "--checkpoint",
        &s(&st.project),
        "--input",
        &s(&csv_in),
        "--split",
        "test",
        "--out",
        &s(&out2),
        "--max-new-tokens",
        "4",
    ])
    .unwrap();
    let rows = std::fs::read_to_string(out2.join("predictions.csv")).unwrap();
    assert_eq!(rows.lines().count(), 3, "{rows}");
    let ids: Vec<String> = std::fs::read_dir(&out2)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("brain_tumors_ct_scan__test_masks__"))
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    for id in ids {
        let r = json(&out2.join(&id).join("result.json"));
        assert!(r["image"].as_str().unwrap().contains("test_images"), "{r}");
        assert!(!r["question"].as_str().unwrap().is_empty());
    }
}

#[test]
fn authors_release_needs_a_configuration_then_predicts() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    make_image(&img, 64, 64);
    let out = st.dir.path().join("a");
    let err = predict(&["--checkpoint", &s(&st.authors), "--image", &s(&img), "--question", Q, "--out", &s(&out)])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("authors' PRS-Med release") && msg.contains("--config") && msg.contains("--base"), "{msg}");
    assert!(!out.exists());
    predict(&[
        "--checkpoint",
        &s(&st.authors),
        "--config",
        &s(&st.config_file),
        "--image",
        &s(&img),
        "--question",
        Q,
        "--out",
        &s(&out),
        "--max-new-tokens",
        "5",
    ])
    .unwrap();
    let r = json(&out.join("result.json"));
    assert_eq!(r["model"]["checkpoint_format"], "authors");
    assert_eq!(grey(&out.join("mask.png")).dimensions(), (64, 64));
    // The release's weights are used: its masks differ from the project checkpoint's.
    let out_p = st.dir.path().join("p");
    predict(&[
        "--checkpoint",
        &s(&st.project),
        "--image",
        &s(&img),
        "--question",
        Q,
        "--out",
        &s(&out_p),
        "--max-new-tokens",
        "1",
    ])
    .unwrap();
    assert_ne!(grey(&out.join("prob.png")).into_raw(), grey(&out_p.join("prob.png")).into_raw());
}

#[test]
fn input_errors_are_single_clear_messages_and_leave_nothing() {
    let st = setup();
    let out = st.dir.path().join("never");
    let ck = s(&st.project);
    let run = |img: &Path, q: &str| {
        let e = predict(&["--checkpoint", &ck, "--image", &s(img), "--question", q, "--out", &s(&out)]).unwrap_err();
        assert!(!out.exists(), "output left behind after: {e:#}");
        format!("{e:#}")
    };
    let good = st.dir.path().join("ok.png");
    make_image(&good, 32, 32);
    let e = run(&good, "   ");
    assert!(e.contains("empty question"), "{e}");
    let text = st.dir.path().join("text.png");
    std::fs::write(&text, "this is not an image").unwrap();
    let e = run(&text, Q);
    assert!(e.contains("cannot load image") && e.contains("text.png") && e.contains("PNG signature"), "{e}");
    let gif = st.dir.path().join("anim.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let e = run(&gif, Q);
    assert!(e.contains("cannot load image") && e.contains("anim.gif") && e.contains("Gif is not supported"), "{e}");
    let e = run(&st.dir.path().join("missing.png"), Q);
    assert!(e.contains("cannot load image") && e.contains("missing.png"), "{e}");
    let e = predict(&["--checkpoint", &ck, "--image", &s(&good), "--question", Q, "--out", &s(&out), "--top-p", "0"])
        .unwrap_err();
    assert!(format!("{e:#}").contains("--top-p"), "{e:#}");

    // A base with another hidden size: named as such, before any weight is read.
    let mut init = st.cfg.init.clone().unwrap();
    let hidden = init.llm.hidden_size;
    init.llm.hidden_size = 32;
    init.llm.intermediate_size = 64;
    let other = st.dir.path().join("llava32");
    prs::commands::init::write_llava(&other, &init, &tokenizer_model(), 1 << 20).unwrap();
    let e =
        predict(&["--checkpoint", &ck, "--base", &s(&other), "--image", &s(&good), "--question", Q, "--out", &s(&out)])
            .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains(&format!("hidden size {hidden}")) && e.contains("has 32") && e.contains("--base"), "{e}");
    // A checkpoint that records another vocabulary.
    let ck2 = st.dir.path().join("ckpt_vocab");
    project_checkpoint(
        &st.cfg,
        &ck2,
        Some(serde_json::json!({"base_config": {"vocab_size": 32064, "hidden_size": hidden}})),
    );
    let e = predict(&["--checkpoint", &s(&ck2), "--image", &s(&good), "--question", Q, "--out", &s(&out)]).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("vocab_size 32064") && e.contains("has 32000"), "{e}");
    assert!(!out.exists());
    // A write that fails midway (the output's parent is a file) leaves no temporary folder.
    let blocker = st.dir.path().join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    let e = predict(&[
        "--checkpoint",
        &ck,
        "--image",
        &s(&good),
        "--question",
        Q,
        "--out",
        &s(&blocker.join("o")),
        "--max-new-tokens",
        "1",
    ]);
    assert!(e.is_err());
    let leftovers: Vec<_> = std::fs::read_dir(st.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn outputs_never_replace_what_prs_did_not_write() {
    let st = setup();
    let ck = s(&st.project);
    let img = st.dir.path().join("scan.png");
    make_image(&img, 40, 40);
    let img_arg = s(&img);
    let single = |out: &Path, extra: &[&str]| {
        let mut a = vec!["--checkpoint", &ck, "--image", &img_arg, "--question", Q, "--max-new-tokens", "2"];
        let o = s(out);
        a.extend(["--out", &o]);
        a.extend(extra);
        predict(&a).map_err(|e| format!("{e:#}"))
    };
    // A folder of the user's documents: refused, untouched.
    let docs = st.dir.path().join("docs");
    std::fs::create_dir_all(docs.join("sub")).unwrap();
    std::fs::write(docs.join("thesis.txt"), "years of work").unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let e = single(&docs, extra).unwrap_err();
        assert!(e.contains("did not write") && e.contains("thesis.txt"), "{e}");
    }
    assert_eq!(entries(&docs), ["sub", "thesis.txt"]);
    assert_eq!(std::fs::read_to_string(docs.join("thesis.txt")).unwrap(), "years of work");
    // A file given as --out is refused too.
    let e = single(&docs.join("thesis.txt"), &["--overwrite"]).unwrap_err();
    assert!(e.contains("is a file"), "{e}");

    // Its own earlier prediction: replaced only with --overwrite.
    let out = st.dir.path().join("pred");
    single(&out, &[]).unwrap();
    let first = json(&out.join("result.json"));
    let e = single(&out, &[]).unwrap_err();
    assert!(e.contains("earlier prediction") && e.contains("--overwrite"), "{e}");
    single(&out, &["--overwrite"]).unwrap();
    assert_eq!(json(&out.join("result.json"))["answer_ids"], first["answer_ids"]);
    // ... unless the user has put something of theirs into it.
    std::fs::write(out.join("my-notes.md"), "keep me").unwrap();
    let e = single(&out, &["--overwrite"]).unwrap_err();
    assert!(e.contains("my-notes.md"), "{e}");
    assert!(out.join("my-notes.md").exists() && out.join("result.json").exists());

    // Batch mode: an existing folder that prs did not make is refused as a whole.
    let dir = st.dir.path().join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    make_image(&dir.join("a.png"), 32, 32);
    let e = predict(&["--checkpoint", &ck, "--images", &s(&dir), "--question", Q, "--out", &s(&docs)]).unwrap_err();
    assert!(format!("{e:#}").contains("not written by prs"), "{e:#}");
    assert_eq!(entries(&docs), ["sub", "thesis.txt"]);
}

#[test]
fn csv_ids_stay_inside_out_are_unique_and_bad_inputs_are_counted() {
    let st = setup();
    let ck = s(&st.project);
    let root = st.dir.path().join("in");
    std::fs::create_dir_all(&root).unwrap();
    for n in ["a", "b", "c", "d"] {
        make_image(&root.join(format!("{n}.png")), 36, 36);
    }
    // A file that exists with an image's name but does not decode.
    std::fs::write(root.join("broken.png"), "not a png at all").unwrap();
    let csv = root.join("list.csv");
    std::fs::write(
        &csv,
        "image,question,id\n\
         a.png,Where?,../escape\n\
         b.png,Where?,/tmp/absolute\n\
         c.png,Where?,same\n\
         d.png,Where?,SAME\n\
         broken.png,Where?,broken\n",
    )
    .unwrap();
    let out = st.dir.path().join("out");
    let args = ["--checkpoint", &ck, "--input", &s(&csv), "--out", &s(&out), "--max-new-tokens", "2"];
    let e = predict(&args).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("1 input(s) could not be predicted") && e.contains("broken"), "{e}");
    // Every folder is a direct child of --out; nothing escaped to the parent or elsewhere.
    assert!(!st.dir.path().join("escape").exists());
    let folders: Vec<String> = entries(&out).into_iter().filter(|n| out.join(n).is_dir()).collect();
    assert_eq!(folders, ["SAME-2", "_._escape", "_tmp_absolute", "same"]);
    let rows = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    assert_eq!(rows.lines().count(), 5, "4 predictions + header: {rows}");
    let failures = std::fs::read_to_string(out.join("failures.csv")).unwrap();
    assert!(failures.lines().count() == 2 && failures.contains("broken"), "{failures}");
    // --fail-fast stops at the bad input; --resume keeps the four good ones.
    let mut ff = args.to_vec();
    ff.extend(["--resume", "--fail-fast"]);
    let e = format!("{:#}", predict(&ff).unwrap_err());
    assert!(e.contains("broken"), "{e}");
    // Without the bad row, a resumed run succeeds and removes the stale failures.csv.
    std::fs::write(&csv, std::fs::read_to_string(&csv).unwrap().replace("broken.png,Where?,broken\n", "")).unwrap();
    let mut ok = args.to_vec();
    ok.push("--resume");
    predict(&ok).unwrap();
    assert!(!out.join("failures.csv").exists());
}
