//! Data parallel on the CPU: batch-plan shares, and the tiny model trained by 2 ranks (threads
//! on the in-process backend, or processes through `prs finetune --nproc-per-node 2`) against
//! 1 rank with doubled accumulation; resume on another world size; agreed skips and early
//! stopping.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use prs::config::Config;
use prs::data::loader::rank_share;
use prs::dist::Collective;
use prs::train::trainer::{train, TrainOptions, TrainSummary};

use crate::common::tiny_model;
use crate::finetune::{prs, synth, write_config};

#[test]
fn shares_are_disjoint_complete_and_follow_the_groups() {
    for world in 1..=5 {
        for accum in 1..=3 {
            let group = world * accum;
            for n in 0..=13 {
                for start in (0..=n).filter(|s| s % group == 0 || *s == n) {
                    let shares: Vec<Vec<usize>> = (0..world).map(|r| rank_share(n, start, group, r, world)).collect();
                    let mut all: Vec<usize> = shares.concat();
                    all.sort();
                    assert_eq!(all, (start..n).collect::<Vec<_>>(), "world {world} accum {accum} n {n} start {start}");
                    // One rank with accumulation W x A runs everything, in order.
                    assert_eq!(rank_share(n, start, group, 0, 1), (start..n).collect::<Vec<_>>());
                    // Each rank takes at most `accum` of every group, and at most one more than
                    // any other rank (the short last group).
                    for g in (start..n).step_by(group) {
                        let counts: Vec<usize> =
                            shares.iter().map(|s| s.iter().filter(|&&i| i >= g && i < g + group).count()).collect();
                        assert!(counts.iter().all(|&c| c <= accum), "{counts:?}");
                        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{counts:?}");
                    }
                }
            }
        }
    }
}

/// A tiny run: 12 training rows, micro-batches of 2 (6 per epoch).
fn setup(dir: &Path, extra: &str) -> Config {
    let cfg = tiny_model(dir);
    let data = synth(dir, 4);
    let conf = write_config(dir, &cfg, &data, &format!("train.batch_size=2 train.eval_every=2 {extra}"));
    Config::load(&conf).unwrap()
}

/// Trains `cfg` on `world` threads (in-process backend) with accumulation `accum` per rank;
/// `poison` makes one rank's loss NaN at one step. Returns every rank's summary.
fn train_ranks(
    cfg: &Config,
    run: &Path,
    world: usize,
    accum: usize,
    resume: bool,
    poison: Option<(usize, u64)>,
) -> Vec<TrainSummary> {
    let mut cfg = cfg.clone();
    cfg.train.gradient_accumulation_steps = accum;
    let hub = prs::dist::local::ranks(world, Duration::from_secs(600));
    std::thread::scope(|s| {
        let handles: Vec<_> = hub
            .into_iter()
            .map(|c| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let poison = poison.filter(|p| p.0 == c.rank()).map(|p| p.1);
                    train(options(cfg, run, resume, std::sync::Arc::new(c), poison))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    })
}

fn options(
    cfg: Config,
    run: &Path,
    resume: bool,
    ranks: std::sync::Arc<dyn Collective>,
    poison_step: Option<u64>,
) -> TrainOptions {
    TrainOptions {
        cfg,
        run_dir: run.to_path_buf(),
        device: Device::Cpu,
        resume,
        dry_run: false,
        progress: false,
        ranks,
        poison_step,
    }
}

/// Largest |a - b| over all tensors of two summaries (same keys in the same order).
fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((ka, ta), (kb, tb))| {
            assert_eq!(ka, kb);
            (ta - tb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn two_ranks_equal_one_rank_with_doubled_accumulation_and_resume_on_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    // Frozen BatchNorm: with batch statistics each rank's running statistics follow its own
    // micro-batches (averaged after each step), and validation, which uses them, would differ.
    let cfg = setup(dir.path(), "train.max_steps=6 train.num_epochs=3 train.batchnorm=frozen");
    let one = train_ranks(&cfg, &dir.path().join("one"), 1, 2, false, None).remove(0);
    let two = train_ranks(&cfg, &dir.path().join("two"), 2, 1, false, None);
    assert_eq!(one.state.step, 6);
    for r in &two {
        assert_eq!(
            (r.state.step, r.state.epoch, r.state.batch_in_epoch),
            (one.state.step, one.state.epoch, one.state.batch_in_epoch)
        );
        assert_eq!(r.state.loss_level, one.state.loss_level, "the ranks' agreed losses are the single run's");
        // Validation sums come in rank order: equal up to rounding.
        assert!((r.state.best_dice.unwrap() - one.state.best_dice.unwrap()).abs() < 1e-9);
    }
    assert_eq!(max_diff(&two[0].trained, &two[1].trained), 0.0, "the ranks' weights differ");
    let d = max_diff(&one.trained, &two[0].trained);
    println!("2 ranks x accumulation 1 vs 1 rank x accumulation 2: max |weight difference| {d:e}");
    assert!(d <= 1e-6, "{d}");
    // Only rank 0 wrote the run folder, with every step logged once.
    let steps: Vec<u64> = prs::report::read_metrics(&dir.path().join("two/metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.loss.is_some())
        .map(|r| r.step)
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());

    // Resume 2 -> 1: the 2-rank run's step-4 checkpoint (mid-epoch) continued on one rank
    // with accumulation 2 ends where the uninterrupted 1-rank run ends.
    let two_dir = dir.path().join("two");
    assert!(two_dir.join("checkpoints/step-0000004").exists());
    std::fs::write(two_dir.join("last"), "checkpoints/step-0000004\n").unwrap();
    let resumed = train_ranks(&cfg, &two_dir, 1, 2, true, None).remove(0);
    assert_eq!(resumed.state.step, 6);
    let d = max_diff(&one.trained, &resumed.trained);
    println!("resumed 2 -> 1 vs uninterrupted: max |weight difference| {d:e}");
    assert!(d <= 1e-6, "{d}");
    // Another accumulation on resume (a different global group) is refused.
    let mut c3 = cfg.clone();
    c3.train.gradient_accumulation_steps = 3;
    let e = train(options(c3, &two_dir, true, prs::dist::single(), None)).unwrap_err();
    assert!(format!("{e:#}").contains("gradient accumulation x ranks 2 -> 3"), "{e:#}");
}

#[test]
fn four_ranks_with_short_last_groups_equal_one_rank() {
    // 6 micro-batches per epoch in groups of 4: the second group of each epoch has 2, so
    // ranks 2 and 3 contribute zeros there.
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "train.max_steps=4 train.num_epochs=2 train.batchnorm=frozen train.eval_every=0");
    let one = train_ranks(&cfg, &dir.path().join("one"), 1, 4, false, None).remove(0);
    let four = train_ranks(&cfg, &dir.path().join("four"), 4, 1, false, None);
    assert_eq!((one.state.step, one.state.epoch), (4, 2));
    for r in &four {
        assert_eq!(max_diff(&r.trained, &four[0].trained), 0.0, "the ranks' weights differ");
        assert_eq!((r.state.step, r.state.samples_seen), (one.state.step, one.state.samples_seen));
    }
    let d = max_diff(&one.trained, &four[0].trained);
    println!("4 ranks x accumulation 1 vs 1 rank x accumulation 4: max |weight difference| {d:e}");
    assert!(d <= 1e-6, "{d}");
}

#[test]
fn ranks_agree_on_a_non_finite_step_and_on_early_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "train.max_steps=4 train.num_epochs=2");
    // Rank 1 alone sees a NaN loss at step 2: both skip it, neither waits forever.
    let two = train_ranks(&cfg, &dir.path().join("nan"), 2, 1, false, Some((1, 2)));
    for r in &two {
        assert_eq!((r.state.step, r.state.skipped_steps), (4, 1));
    }
    // Bit-identical on both ranks, BatchNorm running statistics included (batch mode: they
    // are averaged in the step's bucket).
    assert!(two[0].trained.iter().any(|(k, _)| k.contains("running_")));
    assert_eq!(max_diff(&two[0].trained, &two[1].trained), 0.0);
    // Rank 0's log: the agreed (NaN, written as null) loss at step 2, finite ones elsewhere.
    let finite: Vec<u64> = prs::report::read_metrics(&dir.path().join("nan/metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.loss.is_some_and(f64::is_finite))
        .map(|r| r.step)
        .collect();
    assert_eq!(finite, vec![1, 3, 4]);

    // A learning rate too small to change a prediction (and BatchNorm on its running
    // statistics, which then do not move): the second evaluation is no better, and with
    // patience 1 both ranks stop there together.
    let mut c = cfg.clone();
    c.train.batchnorm = prs::config::BatchNormMode::Frozen;
    c.train.learning_rate = 1e-12;
    c.train.min_learning_rate = 0.0;
    c.train.eval_every = 1;
    c.train.early_stopping_patience = 1;
    c.train.max_steps = 6;
    let two = train_ranks(&c, &dir.path().join("early"), 2, 1, false, None);
    for r in &two {
        assert_eq!((r.state.step, r.state.evals_since_best), (2, 1), "{:?}", r.state);
    }
}

fn last_checkpoint(run: &Path) -> PathBuf {
    run.join(std::fs::read_to_string(run.join("last")).unwrap().trim())
}

/// Largest |a - b| over the tensors of two runs' last checkpoints.
fn checkpoint_diff(a: &Path, b: &Path) -> f32 {
    let (a, b) = (last_checkpoint(a), last_checkpoint(b));
    let mut worst = 0f32;
    for f in
        ["adapter_model.safetensors", "image_encoder.safetensors", "mask_decoder.safetensors", "classifier.safetensors"]
    {
        let ta = candle_core::safetensors::load(a.join(f), &Device::Cpu).unwrap();
        let tb = candle_core::safetensors::load(b.join(f), &Device::Cpu).unwrap();
        assert_eq!(ta.len(), tb.len(), "{f}");
        for (k, x) in &ta {
            let d =
                (x - &tb[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn nproc_per_node_2_on_the_cpu_equals_one_process_with_doubled_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    // Frozen BatchNorm: the checkpoint's running statistics are then the same too.
    let conf = write_config(dir.path(), &cfg, &data, "train.batch_size=2 train.max_steps=4 train.batchnorm=frozen");
    let run = |out: &str, extra: &[&str]| {
        // Not --quiet: rank 1's only line ("rank 1 of 2 on cpu") is an info line.
        let o = prs()
            .args(["finetune", "--device", "cpu", "--config"])
            .arg(&conf)
            .arg("--out")
            .arg(dir.path().join(out))
            .args(extra)
            .env("PRS_DIST_TIMEOUT", "300")
            .output()
            .unwrap();
        let text = format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        (o.status.success(), text)
    };
    let (ok, text) = run("two", &["--nproc-per-node", "2"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("[rank 0] finished: 4 optimizer steps") && text.contains("[rank 1] rank 1 of 2 on cpu"),
        "{text}"
    );
    assert!(!text.contains("[rank 1] finished"), "only rank 0 reports: {text}");
    let (ok, text) = run("one", &["--gradient-accumulation-steps", "2"]);
    assert!(ok, "{text}");
    let worst = checkpoint_diff(&dir.path().join("one"), &dir.path().join("two"));
    println!("prs finetune --nproc-per-node 2 vs 1 process x accumulation 2: max |difference| {worst:e}");
    assert!(worst <= 1e-6, "{worst}");
    // One rank through the TCP backend (PRS_DIST_FORCE=1, the GPU check's route for NCCL)
    // equals the plain run bit for bit.
    let o = prs()
        .args(["finetune", "--quiet", "--device", "cpu", "--gradient-accumulation-steps", "2", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(dir.path().join("forced"))
        .env("PRS_DIST_FORCE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(checkpoint_diff(&dir.path().join("one"), &dir.path().join("forced")), 0.0);

    // A rank that dies (rank 0 is killed once it has written a checkpoint) ends the job,
    // naming it; the other rank is stopped.
    let o = prs()
        .args(["finetune", "--quiet", "--device", "cpu", "--nproc-per-node", "2", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(dir.path().join("dies"))
        .env("PRS_CRASH_AT", "checkpoint:written")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rank 0 failed") && err.contains("other ranks were stopped"), "{err}");
    // Inconsistent launch variables are refused before anything loads.
    let o = prs()
        .args(["finetune", "--quiet", "--device", "cpu", "--config"])
        .arg(&conf)
        .arg("--out")
        .arg(dir.path().join("bad"))
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("LOCAL_RANK"), "{err}");
    assert!(!dir.path().join("bad").exists());
}
