//! Every subcommand with hostile flag values (zero, negative, NaN, infinite, out of range, not
//! a number): each gives an error or runs, and none panics (exit 101 with a backtrace).

use crate::common;
use std::path::Path;
use std::process::Command;

use common::{tiny_model, tokenizer_model};

fn prs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prs"));
    c.env("PRS_TOKENIZER_MODEL", tokenizer_model()).env_remove("RUST_BACKTRACE");
    c
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

const HOSTILE: [&str; 6] = ["0", "-1", "nan", "inf", "1e400", "abc"];

#[test]
fn no_hostile_value_of_any_flag_makes_a_command_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = tiny_model(d);
    let data = d.join("data");
    prs::data::synth::generate(
        &data,
        &prs::data::synth::SynthConfig { train: 2, val: 1, test: 1, size: 64, seed: 1 },
        false,
    )
    .unwrap();
    let conf = d.join("c.toml");
    let mut c = cfg.clone();
    c.data.root = Some(s(&data));
    c.train.warmup_steps = 0;
    std::fs::write(&conf, c.to_toml().unwrap()).unwrap();
    let run = d.join("run");
    let st = prs()
        .args(["finetune", "--quiet", "--device", "cpu", "--max-steps", "1", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(&run)
        .status();
    assert!(st.unwrap().success());
    let ck = s(&run.join("best"));
    let image =
        std::fs::read_dir(data.join("brain_tumors_ct_scan/test_images")).unwrap().next().unwrap().unwrap().path();
    let (conf, data, image, base) = (s(&conf), s(&data), s(&image), cfg.model.base.clone());
    let images = s(Path::new(&image).parent().unwrap());

    let mut cases: Vec<Vec<String>> = vec![];
    let mut add = |args: &[&str]| cases.push(args.iter().map(|a| a.to_string()).collect());
    for (i, v) in HOSTILE.iter().enumerate() {
        let out = s(&d.join(format!("o{i}")));
        let ft = ["finetune", "--quiet", "--device", "cpu", "--dry-run", "--config", &conf, "--out", &out];
        for flag in [
            "--batch-size",
            "--gradient-accumulation-steps",
            "--learning-rate",
            "--num-epochs",
            "--image-size",
            "--max-steps",
            "--num-workers",
            "--seed",
            "--nproc-per-node",
        ] {
            add(&[&ft[..], &[flag, v]].concat());
        }
        for key in [
            "train.batch_size",
            "train.learning_rate",
            "train.adam_eps",
            "train.adam_betas",
            "train.max_grad_norm",
            "train.divergence_factor",
            "train.max_consecutive_nonfinite",
            "data.val_fraction",
            "model.sam_image_size",
            "model.lora.r",
            "model.lora.dropout",
            "model.decoder.cross_heads",
        ] {
            add(&[&ft[..], &["--set", &format!("{key}={v}")]].concat());
        }
        add(&["finetune", "--quiet", "--resume", &s(&run), "--batch-size", v]);
        let pr = [
            "predict",
            "--device",
            "cpu",
            "--checkpoint",
            &ck,
            "--image",
            &image,
            "--question",
            "Where?",
            "--out",
            &out,
        ];
        for flag in ["--threshold", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--dtype", "--device"] {
            add(&[&pr[..], &[flag, v]].concat());
        }
        add(&[
            "predict",
            "--checkpoint",
            &ck,
            "--images",
            &images,
            "--question",
            "Where?",
            "--out",
            &out,
            "--batch-size",
            v,
        ]);
        let ev = ["evaluate", "--device", "cpu", "--checkpoint", &ck, "--data-root", &data, "--out", &out];
        for flag in [
            "--threshold",
            "--batch-size",
            "--limit",
            "--worst",
            "--empty",
            "--protocol",
            "--max-new-tokens",
            "--split",
        ] {
            add(&[&ev[..], &[flag, v]].concat());
        }
        add(&[&ev[..], &["--hd95", "--spacing", &format!("{v},{v}")]].concat());
        let pm = ["profile-memory", "--config", &conf, "--device", "cpu", "--predict-only"];
        for flag in [
            "--batch-sizes",
            "--effective-batch",
            "--safety-margin",
            "--seq-len",
            "--max-batch",
            "--gpu-memory",
            "--precision",
            "--checkpointing",
        ] {
            add(&[&pm[..], &[flag, v]].concat());
        }
        add(&[
            "profile-memory",
            "--config",
            &conf,
            "--device",
            "cpu",
            "--batch-sizes",
            "1",
            "--effective-batch",
            "1",
            "--steps",
            v,
        ]);
        for flag in ["--steps", "--batch-size", "--seq-len", "--warmup", "--precision", "--peak-tflops"] {
            add(&["bench", "train", "--config", &conf, "--device", "cpu", "--steps", "1", "--warmup", "0", flag, v]);
        }
        add(&["bench", "predict", "--config", &conf, "--device", "cpu", "--steps", "1", "--max-new-tokens", v]);
        add(&["bench", v, "--config", &conf]);
        for flag in ["--train", "--val", "--size", "--seed"] {
            add(&["synth-data", "--out", &out, "--train", "1", "--val", "1", "--test", "1", flag, v]);
        }
        add(&["init", "--config", &conf, "--out", &out, "--max-shard-bytes", v]);
        add(&["demo", "--out", &out, "--device", "cpu", "--train-images", v]);
        add(&["tokenize", "--model", &base, v]);
    }
    let mut panics = vec![];
    for args in &cases {
        let out = prs().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code().is_none_or(|c| c == 101) || stderr.contains("panicked") {
            panics.push(format!("prs {}: {:?}\n{stderr}", args.join(" "), out.status));
        }
    }
    assert!(panics.is_empty(), "{} of {} commands panicked:\n{}", panics.len(), cases.len(), panics.join("\n"));
}

#[test]
fn init_never_writes_random_weights_over_a_folder_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    let model = dir.path().join("llava-med");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), "{\"real\": true}").unwrap();
    let init = |out: &Path| prs().args(["init", "--config"]).arg(&conf).arg("--out").arg(out).output().unwrap();
    let o = init(&model);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not written by prs"));
    assert_eq!(std::fs::read_to_string(model.join("config.json")).unwrap(), "{\"real\": true}");
    // Its own output: written, then written again.
    let fresh = dir.path().join("random");
    assert!(init(&fresh).status.success());
    assert!(init(&fresh).status.success());
    assert!(fresh.join("tinysam.pth").exists() && fresh.join("config.json").exists());
}

#[test]
fn train_and_memory_profile_are_listed_aliases_of_finetune_and_profile_memory() {
    use clap::{CommandFactory, Parser};
    use prs::cli::{Cli, Command as Sub};
    let help = Cli::command().render_help().to_string();
    for (name, alias) in [("finetune", "train"), ("profile-memory", "memory-profile")] {
        let line = help.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or_else(|| panic!("{help}"));
        assert!(line.contains(alias), "`prs --help` does not list {alias} beside {name}: {line}");
    }
    let cli = Cli::try_parse_from(["prs", "train", "--config", "c.toml", "--batch-size", "3", "--dry-run"]).unwrap();
    assert!(matches!(cli.command, Sub::Finetune(ref a) if a.batch_size == Some(3) && a.dry_run));
    let cli = Cli::try_parse_from(["prs", "memory-profile", "--config", "c.toml"]).unwrap();
    assert!(matches!(cli.command, Sub::ProfileMemory(_)));
    // And through the binary: the alias runs the same command (the same error for a missing file).
    let o = prs().args(["train", "--config", "/nonexistent/c.toml"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/nonexistent/c.toml"));
}
