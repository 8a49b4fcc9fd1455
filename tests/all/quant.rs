//! The quantised frozen base (`model.base_quant`): the block formats against an independent
//! reading of ggml's layouts, error bounds on Gaussian weights, gradients through a quantised
//! weight equal those through its dequantised copy (checkpointed too), weights whose width is
//! not a multiple of the block stay dense, a tiny run on a 4-bit base learns and resumes
//! exactly, its adapter loads on an unquantised base, and the memory model against RSS.

use crate::common;
use crate::finetune::{assert_kill_and_resume_equal_the_full_run, prs, synth, write_config};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;
use half::f16;
use prs::config::{BaseQuant, Checkpointing, Config};
use prs::nn::checkpoint::Checkpointer;
use prs::nn::linear::{Linear, LoraConfig};
use prs::nn::param::{Param, ParamBuilder, TrainedParams};
use prs::nn::quant::QuantWeight;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::Value;

fn gaussian(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = Normal::new(0.0f32, 1.0).unwrap();
    let v: Vec<f32> = (0..rows * cols).map(|_| n.sample(&mut rng)).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// ||a - b||_F / ||b||_F.
fn rel_fro(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's Q8_0 read from its bytes: per 32 values, an f16 scale then 32 int8.
fn decode_q8_0(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks(34).flat_map(|b| (0..32).map(move |j| f16_at(b, 0) * (b[2 + j] as i8) as f32)).collect()
}

/// ggml's Q8_0 written independently: scale = max |x| / 127 (stored as f16), q = round(x / scale).
fn encode_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// ggml's Q4_K read from its bytes: per 256 values, f16 d and dmin, 12 bytes of 6-bit
/// sub-block scales and minimums, 128 bytes of nibbles (64 values per 32 bytes: low nibbles
/// first, with sub-block scale 2j, then high nibbles with 2j + 1).
fn decode_q4k(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![];
    for b in bytes.chunks(144) {
        let (d, dmin, sc, qs) = (f16_at(b, 0), f16_at(b, 2), &b[4..16], &b[16..144]);
        let scale_min = |j: usize| -> (f32, f32) {
            if j < 4 {
                ((sc[j] & 63) as f32, (sc[j + 4] & 63) as f32)
            } else {
                (((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)) as f32, ((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)) as f32)
            }
        };
        for j in 0..4 {
            let q = &qs[32 * j..32 * j + 32];
            let (s1, m1) = scale_min(2 * j);
            let (s2, m2) = scale_min(2 * j + 1);
            out.extend(q.iter().map(|v| d * s1 * (v & 0xF) as f32 - dmin * m1));
            out.extend(q.iter().map(|v| d * s2 * (v >> 4) as f32 - dmin * m2));
        }
    }
    out
}

/// QLoRA's NF4 (blocks of 64, an f32 absmax each): for the error comparison only.
fn nf4_roundtrip(x: &[f32]) -> Vec<f32> {
    const L: [f32; 16] = [
        -1.0,
        -0.696_192_8,
        -0.525_073_05,
        -0.394_917_5,
        -0.284_441_38,
        -0.184_773_43,
        -0.091_050_036,
        0.0,
        0.079_580_3,
        0.160_930_2,
        0.246_112_3,
        0.337_915_24,
        0.440_709_83,
        0.562_617,
        0.722_956_84,
        1.0,
    ];
    x.chunks(64)
        .flat_map(|b| {
            let a = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            b.iter().map(move |v| {
                let t = v / a;
                a * *L.iter().min_by(|p, q| (*p - t).abs().total_cmp(&(*q - t).abs())).unwrap()
            })
        })
        .collect()
}

#[test]
fn block_formats_match_an_independent_reading_and_their_error_bounds() {
    let (rows, cols) = (256, 1024);
    let w = gaussian(rows, cols, 1);
    let x = gaussian(64, cols, 2);
    let wv = values(&w);
    let y = values(&x.matmul(&w.t().unwrap()).unwrap());
    let err = |deq: &Tensor| (rel_fro(&values(deq), &wv), rel_fro(&values(&x.matmul(&deq.t().unwrap()).unwrap()), &y));

    let q8 = QuantWeight::quantize(&w, BaseQuant::Int8).unwrap().unwrap();
    let q8_bytes = q8.blocks().unwrap();
    assert_eq!(q8.storage_bytes(), rows * cols / 32 * 34);
    assert_eq!(q8_bytes, encode_q8_0(&wv), "Q8_0 blocks differ from the independent encoder");
    let q8_deq = q8.dequantize(DType::F32).unwrap();
    assert_eq!(values(&q8_deq), decode_q8_0(&q8_bytes));

    let q4 = QuantWeight::quantize(&w, BaseQuant::Int4).unwrap().unwrap();
    assert_eq!(q4.storage_bytes(), rows * cols / 256 * 144);
    let q4_deq = q4.dequantize(DType::F32).unwrap();
    let reference = decode_q4k(&q4.blocks().unwrap());
    let worst = values(&q4_deq).iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-6, "Q4_K dequantisation differs from the independent reading by {worst}");
    // Row-parallel quantisation equals candle's whole-tensor quantisation.
    let whole = candle_core::quantized::QTensor::quantize(&w, q4.format()).unwrap();
    assert_eq!(whole.data().unwrap().as_ref(), q4.blocks().unwrap().as_slice());

    let (e8w, e8y) = err(&q8_deq);
    let (e4w, e4y) = err(&q4_deq);
    let nf4 = Tensor::from_vec(nf4_roundtrip(&wv), (rows, cols), &Device::Cpu).unwrap();
    let (enw, eny) = err(&nf4);
    println!("relative Frobenius error on N(0,1) weights ({rows}x{cols}), of W and of x@W^T:");
    println!("  Q8_0 (8.5 bits): {e8w:.5} {e8y:.5}");
    println!("  Q4_K (4.5 bits): {e4w:.5} {e4y:.5}");
    println!("  NF4/64 (4.5 bits with f32 absmax, reference only): {enw:.5} {eny:.5}");
    assert!(e8w < 0.008 && e8y < 0.008, "Q8_0 error {e8w} {e8y}");
    assert!(e4w < 0.1 && e4y < 0.1, "Q4_K error {e4w} {e4y}");
    // An f16 or bf16 copy comes from the same blocks.
    let bf = q4.dequantize(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    assert!(rel_fro(&values(&bf), &values(&q4_deq)) < 4e-3);
}

/// Our one-pass dequantisation against candle's own (`QTensor::dequantize`, f32): bit for bit in
/// f32, and each half-precision value is that f32 value rounded once (to nearest even).
#[test]
fn dequantisation_equals_candles_bit_for_bit_and_rounds_once() {
    use candle_core::quantized::{QStorage, QTensor};
    let w = (gaussian(96, 512, 5) * 0.03).unwrap();
    for mode in [BaseQuant::Int4, BaseQuant::Int8] {
        let q = QuantWeight::quantize(&w, mode).unwrap().unwrap();
        let bytes = q.blocks().unwrap();
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&bytes), &Device::Cpu, q.format()).unwrap();
        let candle = QTensor::new(storage, (96, 512)).unwrap().dequantize(&Device::Cpu).unwrap();
        let ours = q.dequantize(DType::F32).unwrap();
        let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&candle), "{mode} f32");
        for dt in [DType::BF16, DType::F16] {
            let want = candle.to_dtype(dt).unwrap();
            let got = q.dequantize(dt).unwrap();
            assert_eq!((got.dtype(), got.dims()), (dt, &[96usize, 512][..]));
            let as_f32 = |t: &Tensor| bits(&t.to_dtype(DType::F32).unwrap());
            assert_eq!(as_f32(&got), as_f32(&want), "{mode} {dt:?}");
        }
    }
}

/// Timings and errors of every candidate format on a 4096 x 4096 Gaussian weight (printed for
/// BENCHMARKS.md; run with --ignored --nocapture).
#[test]
#[ignore]
fn candidate_formats_error_and_cpu_speed() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let n = 4096;
    let w = gaussian(n, n, 3);
    let x = gaussian(64, n, 4);
    let wv = values(&w);
    let y = values(&x.matmul(&w.t().unwrap()).unwrap());
    for g in [GgmlDType::Q8_0, GgmlDType::Q6K, GgmlDType::Q5K, GgmlDType::Q4K, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let t0 = Instant::now();
        let q = QTensor::quantize(&w, g).unwrap();
        let tq = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let d = q.dequantize(&Device::Cpu).unwrap();
        let td = t0.elapsed().as_secs_f64();
        let bits = q.storage_size_in_bytes() as f64 * 8.0 / (n * n) as f64;
        let ey = rel_fro(&values(&x.matmul(&d.t().unwrap()).unwrap()), &y);
        println!(
            "{g:?}: {bits:.2} bits, error W {:.5}, x@W^T {ey:.5}, quantise {tq:.3} s (1 thread), dequantise {td:.3} s",
            rel_fro(&values(&d), &wv)
        );
    }
    let t0 = Instant::now();
    let q = QuantWeight::quantize(&w, BaseQuant::Int4).unwrap().unwrap();
    println!("Q4_K row-parallel quantise: {:.3} s", t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let nf = nf4_roundtrip(&wv);
    println!("NF4/64: error W {:.5} (test-code loop {:.3} s)", rel_fro(&nf, &wv), t0.elapsed().as_secs_f64());
    drop(q);
}

/// `lin` (out 64) with a rank-4 LoRA whose B is non-zero; the same values for every `group`.
fn with_test_lora(lin: Linear, reg: &TrainedParams, group: &str) -> Linear {
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into()] };
    let lpb = ParamBuilder::fresh(7, group, true, DType::F32, &Device::Cpu, reg);
    let lin = lin.with_lora(&lpb, &cfg).unwrap();
    if let Some(Param::Trained(b)) = lin.lora().map(|l| &l.b) {
        b.set(&(gaussian(64, 4, 8) * 0.1).unwrap()).unwrap();
    }
    lin
}

#[test]
fn gradients_through_a_quantised_weight_equal_those_through_its_dequantised_copy() {
    for quant in [BaseQuant::Int4, BaseQuant::Int8] {
        let reg = TrainedParams::new();
        let pb = ParamBuilder::fresh(5, "llm", false, DType::F32, &Device::Cpu, &reg).with_quant(quant);
        let qlin = Linear::new(&pb, 256, 64, false).unwrap();
        let copy = qlin.quantized().expect("256 in-features quantise").dequantize(DType::F32).unwrap();
        let dlin = Linear::from_params(Param::Frozen(copy), None).unwrap();
        let (qlin, dlin) = (with_test_lora(qlin, &reg, "lora_q"), with_test_lora(dlin, &reg, "lora_d"));
        let r = gaussian(3 * 5, 64, 9).reshape((3, 5, 64)).unwrap();
        let x0 = gaussian(3 * 5, 256, 10).reshape((3, 5, 256)).unwrap();
        let ckpt = Checkpointer::new(&reg);
        let grads = |lin: &Linear, checkpointed: bool| -> Vec<Vec<f32>> {
            let x = Var::from_tensor(&x0).unwrap();
            let y = if checkpointed {
                let l = lin.clone();
                ckpt.run(x.as_tensor(), move |x| l.forward(x)).unwrap()
            } else {
                lin.forward(x.as_tensor()).unwrap()
            };
            let mut g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            ckpt.merge_into(&mut g).unwrap();
            let l = lin.lora().unwrap();
            let [Param::Trained(a), Param::Trained(b)] = [&l.a, &l.b] else { panic!("LoRA not trained") };
            [x.as_tensor(), a.as_tensor(), b.as_tensor()].iter().map(|t| values(g.get(t).unwrap())).collect()
        };
        let want = grads(&dlin, false);
        for checkpointed in [false, true] {
            let got = grads(&qlin, checkpointed);
            for (name, (g, w)) in ["dx", "dA", "dB"].iter().zip(got.iter().zip(&want)) {
                let e = rel_fro(g, w);
                assert!(e < 1e-6, "{quant} checkpointed {checkpointed}: {name} differs by {e}");
                assert!(w.iter().any(|v| *v != 0.0), "{name} is zero: the comparison would be empty");
            }
        }
    }
}

#[test]
fn widths_that_are_not_a_multiple_of_the_block_stay_dense() {
    let reg = TrainedParams::new();
    let pb = |q| ParamBuilder::fresh(1, "llm", false, DType::F32, &Device::Cpu, &reg).with_quant(q);
    // 4bit blocks are 256 wide, 8bit blocks 32.
    for (q, in_dim, quantised) in [
        (BaseQuant::Int4, 512, true),
        (BaseQuant::Int4, 96, false),
        (BaseQuant::Int8, 96, true),
        (BaseQuant::Int8, 48, false),
        (BaseQuant::None, 512, false),
    ] {
        let lin = Linear::new(&pb(q), in_dim, 16, false).unwrap();
        assert_eq!(lin.quantized().is_some(), quantised, "{q} with {in_dim} in-features");
        assert_eq!(lin.weight().is_none(), quantised);
        // Either way the layer computes (a dense fallback is the plain weight).
        let y = lin.forward(&gaussian(2, in_dim, 2)).unwrap();
        assert_eq!(y.dims(), &[2, 16]);
        assert_eq!(q.weight_bytes(16, in_dim).is_some(), quantised);
    }
    // Trained weights are never quantised.
    let lin = Linear::new(&pb(BaseQuant::Int4).train(true), 256, 8, false).unwrap();
    assert!(lin.quantized().is_none() && lin.weight().unwrap().is_trained());
}

#[test]
fn config_and_flags_spell_the_settings() {
    let tiny = prs::commands::demo::TINY_CONFIG;
    let parse = |o: &[&str]| Config::parse(tiny, &o.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    assert_eq!(parse(&[]).model.base_quant, BaseQuant::None);
    assert_eq!(parse(&["model.base_quant=4bit"]).model.base_quant, BaseQuant::Int4);
    assert_eq!(parse(&["model.base_quant=\"8bit\""]).model.base_quant, BaseQuant::Int8);
    assert!(Config::parse(tiny, &["model.base_quant=3bit".into()]).is_err());
    // The old boolean keeps its meaning; the new names.
    for (v, want) in [
        ("true", Checkpointing::All),
        ("false", Checkpointing::Off),
        ("llm", Checkpointing::Llm),
        ("all", Checkpointing::All),
    ] {
        assert_eq!(parse(&[&format!("train.gradient_checkpointing={v}")]).train.gradient_checkpointing, want, "{v}");
    }
    let err = Config::parse(tiny, &["train.gradient_checkpointing=some".into()]).unwrap_err();
    assert!(format!("{err:#}").contains("off, llm or all"), "{err:#}");
    // A saved config round-trips.
    let c = parse(&["model.base_quant=4bit", "train.gradient_checkpointing=llm"]);
    let back = Config::parse(&c.to_toml().unwrap(), &[]).unwrap();
    assert_eq!((back.model.base_quant, back.train.gradient_checkpointing), (BaseQuant::Int4, Checkpointing::Llm));

    let finetune = |args: &[&str]| {
        let cli = prs::cli::Cli::try_parse_from([&["prs", "finetune", "--config", "c.toml"], args].concat()).unwrap();
        let prs::cli::Command::Finetune(a) = cli.command else { panic!("not finetune") };
        a
    };
    assert_eq!(finetune(&["--load_in_4bit"]).quant.get(), Some(BaseQuant::Int4));
    assert_eq!(finetune(&["--load-in-8bit"]).quant.get(), Some(BaseQuant::Int8));
    assert_eq!(finetune(&["--base-quant", "none"]).quant.get(), Some(BaseQuant::None));
    assert_eq!(finetune(&[]).quant.get(), None);
    assert_eq!(finetune(&["--gradient-checkpointing"]).gradient_checkpointing, Some(Checkpointing::All));
    assert_eq!(finetune(&["--gradient-checkpointing", "llm"]).gradient_checkpointing, Some(Checkpointing::Llm));
    assert!(prs::cli::Cli::try_parse_from(["prs", "finetune", "--load_in_4bit", "--base-quant", "8bit"]).is_err());
    let cli =
        prs::cli::Cli::try_parse_from(["prs", "predict", "--checkpoint", "c", "--image", "i.png", "--load_in_4bit"])
            .unwrap();
    assert!(format!("{:?}", cli.command).contains("load_in_4bit: true"));
}

/// Runs `prs profile-memory ARGS --json` and returns the report.
fn profile(args: &[&str]) -> Value {
    let out = prs().arg("profile-memory").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "prs profile-memory failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tiny_config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")
}

#[test]
fn tiny_4bit_memory_prediction_against_measured_rss() {
    let cfg = tiny_config_path();
    let report = profile(&[
        "--config",
        cfg.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch-sizes",
        "1,2",
        "--precision",
        "f32",
        "--base-quant",
        "4bit",
        "--checkpointing",
        "off,llm",
        "--effective-batch",
        "2",
    ]);
    for r in report["rows"].as_array().unwrap() {
        let err = r["error_pct"].as_f64().unwrap();
        println!(
            "tiny 4bit batch {} checkpointing {}: predicted {:.1} MB, measured {:.1} MB, error {err:+.1}% (target 10%)",
            r["batch"],
            r["checkpointing"].as_str().unwrap(),
            r["predicted_bytes"].as_f64().unwrap() / 1e6,
            r["measured_bytes"].as_f64().unwrap() / 1e6
        );
        assert_eq!(r["base_quant"], "4bit");
        // The bound the f32 sweep holds (profile_memory.rs).
        assert!(err.abs() <= 15.0, "error {err:.1}%");
    }
    // The LLM weight term is what the built model holds.
    let c = Config::parse(&std::fs::read_to_string(&cfg).unwrap(), &["model.base_quant=4bit".into()]).unwrap();
    let spec = prs::pipeline::random::spec_for_config(&c).unwrap();
    let opts = prs::pipeline::random::RandomOptions::from_config(
        &c,
        Device::Cpu,
        DType::F32,
        prs::pipeline::build::Mode::Train,
        0,
    );
    let m = prs::pipeline::random::random_prs_med(&spec, &opts).unwrap();
    let s = m.llm.quant_summary();
    assert_eq!((s.quantized, s.dense), (7 * c.init.as_ref().unwrap().llm.num_hidden_layers, 0));
    let (total, _) = prs::memory::estimate::llm_weight_bytes(&spec, BaseQuant::Int4, 4).unwrap();
    let (dense, _) = prs::memory::estimate::llm_weight_bytes(&spec, BaseQuant::None, 4).unwrap();
    let l = &spec.llava.llm;
    let proj = l.num_hidden_layers * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512);
    assert_eq!(l.hidden_size, 256);
    assert_eq!(dense - total, (proj * 4 - s.bytes) as u64);
}

#[test]
fn the_7b_prediction_table_and_a_16_gib_recommendation() {
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/prs-med-7b.toml");
    let base = ["--config", cfg.to_str().unwrap(), "--device", "cuda:0", "--predict-only", "--seq-len", "640"];
    let report = profile(
        &[
            &base[..],
            &[
                "--gpu-memory",
                "80GB",
                "--batch-sizes",
                "1,2,3,4,5,6,7,8",
                "--precision",
                "bf16",
                "--checkpointing",
                "off,llm,all",
            ],
        ]
        .concat(),
    );
    let rows = report["rows"].as_array().unwrap();
    let pred = |q: &str, ck: &str, b: u64| -> f64 {
        rows.iter()
            .find(|r| r["base_quant"] == q && r["checkpointing"] == ck && r["batch"].as_u64() == Some(b))
            .unwrap()["predicted_bytes"]
            .as_f64()
            .unwrap()
            / 1e9
    };
    println!("PRS-Med 7B, bf16 compute, sequence 640, 1024 px: PREDICTED peak GB (analytic, not measured)");
    println!("{:>5} {:>5} {}", "quant", "ckpt", (1..=8).map(|b| format!("{:>7}", format!("b{b}"))).collect::<String>());
    for q in ["none", "8bit", "4bit"] {
        for ck in ["off", "llm", "all"] {
            let cells: String = (1..=8).map(|b| format!("{:7.2}", pred(q, ck, b))).collect();
            println!("{q:>5} {ck:>5} {cells}");
        }
    }
    for b in 1..=8 {
        for ck in ["off", "llm", "all"] {
            assert!(pred("4bit", ck, b) < pred("8bit", ck, b) && pred("8bit", ck, b) < pred("none", ck, b));
        }
        assert!(pred("4bit", "all", b) <= pred("4bit", "llm", b) && pred("4bit", "llm", b) < pred("4bit", "off", b));
    }
    // The weights alone: bf16 ~15 GB; 4bit saves about 3/4 of the projections' 14 GB.
    assert!(pred("none", "all", 1) - pred("4bit", "all", 1) > 9.0);

    // 16 GiB: the recommendation quantises, keeps the effective batch, and fits.
    let r16 = profile(&[&base[..], &["--gpu-memory", "16GiB", "--precision", "bf16"]].concat());
    let rec = &r16["recommended"];
    println!("16 GiB recommendation: {rec}");
    assert!(rec.is_object(), "nothing recommended for 16 GiB");
    assert_ne!(rec["base_quant"], "none");
    assert_eq!(rec["batch"].as_u64().unwrap() * rec["accumulation"].as_u64().unwrap(), 8);
    assert!(rec["predicted_bytes"].as_f64().unwrap() <= 0.9 * 16.0 * (1u64 << 30) as f64);
    // 4 GiB: nothing fits, said plainly.
    let out = prs()
        .args(["profile-memory"])
        .args(base)
        .args(["--gpu-memory", "4GiB", "--precision", "bf16"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("nothing fits") && text.contains("the smallest tried"), "{text}");
}

#[test]
fn a_tiny_run_on_a_4bit_base_learns_resumes_exactly_and_its_adapter_loads_unquantised() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_model(dir.path());
    let data = synth(dir.path(), 4);
    let conf = write_config(
        dir.path(),
        &cfg,
        &data,
        "train.max_steps=10 model.base_quant=4bit train.gradient_checkpointing=llm",
    );
    let full = assert_kill_and_resume_equal_the_full_run(dir.path(), &conf);
    let losses: Vec<f64> =
        prs::report::read_metrics(&full.join("metrics.jsonl")).unwrap().iter().filter_map(|r| r.loss).collect();
    let (first, last) = (losses[..2].iter().sum::<f64>() / 2.0, losses[losses.len() - 2..].iter().sum::<f64>() / 2.0);
    println!("4bit base: train loss {first:.3} -> {last:.3} over {} steps: {losses:.3?}", losses.len());
    assert!(last < 0.9 * first, "loss did not fall: {losses:?}");

    // The checkpoint records the 4-bit base; its adapter loads on the unquantised base too and
    // computes there (the outputs differ: the adapter was fitted to the quantised base, and on
    // this random tiny model that difference is large; the number is printed).
    let ckpt = full.join("best");
    let load = |q: BaseQuant| {
        let mut args = prs::pipeline::load::ModelArgs { device: "cpu".into(), ..Default::default() };
        args.quant.base_quant = Some(q);
        prs::pipeline::load::load_model(&ckpt, &args).unwrap()
    };
    let (q4, plain) = (load(BaseQuant::Int4), load(BaseQuant::None));
    assert_eq!(plain.cfg.model.base_quant, BaseQuant::None);
    assert!(q4.model.llm.quant_summary().quantized > 0);
    assert_eq!(plain.model.llm.quant_summary().quantized, 0);
    let resolved = prs::pipeline::load::resolve_config(
        &prs::weights::checkpoint::TrainedCheckpoint::open(&ckpt).unwrap(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(resolved.model.base_quant, BaseQuant::Int4, "the checkpoint records its base's storage");
    let batch = prs::memory::measure::synthetic_batch(
        &plain.model,
        1,
        &prs::memory::SeqShape { before: 3, after: 8, answer: 4 },
        1,
    )
    .unwrap();
    let (a, b) = (q4.model.forward(&batch, true).unwrap(), plain.model.forward(&batch, true).unwrap());
    let (la, lb) = (a.answer_logits.unwrap(), b.answer_logits.unwrap());
    let e = common::rel_err(&la, &lb);
    println!("answer logits, 4bit vs unquantised base: relative error {e:.4}");
    assert!(e > 0.0 && e.is_finite(), "{e}");
}
