//! `prs serve` under load on the tiny model (CPU, loopback only): BENCH_REQUESTS requests
//! (default 200) from BENCH_CLIENTS concurrent clients (default 8), over 8 distinct synthetic
//! scans, once per `--max-batch` in BENCH_MAX_BATCH (default "1,4"). Prints p50/p95 latency,
//! throughput and the mean batch the model ran; counts answers lost or given for another image
//! (none expected). Numbers only, never pass/fail.
//!
//!     PRS_TOKENIZER_MODEL=.cache/assets/tokenizer.model.v1 cargo run --release --example bench_serve

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use prs::pipeline::load::{load_model, ModelArgs};
use prs::serve::{bind, start, ServeOptions};

#[path = "support/tiny.rs"]
mod tiny;
use tiny::tiny;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn multipart(file: &str, image: &[u8], question: &str, tokens: usize) -> (String, Vec<u8>) {
    let b = "prs-bench-boundary";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{file}\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend(image);
    body.extend(
        format!(
            "\r\n--{b}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n{question}\r\n--{b}\r\n\
             Content-Disposition: form-data; name=\"max_new_tokens\"\r\n\r\n{tokens}\r\n--{b}--\r\n"
        )
        .as_bytes(),
    );
    (format!("multipart/form-data; boundary={b}"), body)
}

/// Posts and returns (latency, the answer's image name and answer ids, batch size).
fn post(url: &str, body: &(String, Vec<u8>)) -> Result<(f64, serde_json::Value)> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let t = Instant::now();
    let resp = agent.post(url).set("Content-Type", &body.0).send_bytes(&body.1)?;
    let mut text = String::new();
    resp.into_reader().read_to_string(&mut text)?;
    Ok((t.elapsed().as_secs_f64(), serde_json::from_str(&text)?))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let requests = env_usize("BENCH_REQUESTS", 200);
    let clients = env_usize("BENCH_CLIENTS", 8).max(1);
    let tokens = env_usize("BENCH_TOKENS", 16);
    let batches: Vec<usize> = std::env::var("BENCH_MAX_BATCH")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir = tempfile::tempdir()?;
    let (_, ckpt) = tiny(dir.path())?;
    let data = dir.path().join("data");
    prs::data::synth::generate(
        &data,
        &prs::data::synth::SynthConfig { train: 1, val: 0, test: 3, size: 128, seed: 0 },
        false,
    )?;
    let mut scans = vec![];
    for m in ["brain_tumors_ct_scan", "lung_Xray", "skin_rgbimage"] {
        let mut files: Vec<_> =
            std::fs::read_dir(data.join(m).join("test_images"))?.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let name = format!("{m}-{}", f.file_name().unwrap().to_string_lossy());
            scans.push((name, std::fs::read(&f)?));
        }
    }
    scans.truncate(8);
    let question = "Where is the lesion located in this image?";
    println!(
        "prs serve, tiny model on the CPU ({} threads): {requests} requests from {clients} clients, {} scans of 128 px, {tokens} new tokens at most",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        scans.len()
    );
    println!("max_batch  p50_ms  p95_ms  max_ms  req/s  mean_batch  lost  mixed_up");
    for &max_batch in &batches {
        let loaded = load_model(&ckpt, &ModelArgs { device: "cpu".into(), ..Default::default() })?;
        let opts = ServeOptions { max_batch, queue_size: clients * 2, ..Default::default() };
        let server = start(bind("127.0.0.1:0")?, loaded, opts)?;
        let url = server.url("/v1/predict");
        let bodies: Arc<Vec<(String, Vec<u8>)>> =
            Arc::new(scans.iter().map(|(n, b)| multipart(n, b, question, tokens)).collect());
        // Each scan's answer alone, to recognise a mixed-up reply.
        let alone: Vec<serde_json::Value> = bodies.iter().map(|b| post(&url, b).map(|r| r.1)).collect::<Result<_>>()?;
        let alone = Arc::new(alone);
        let t0 = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let (url, bodies, alone) = (url.clone(), bodies.clone(), alone.clone());
                let mine = (requests + clients - 1 - c) / clients;
                std::thread::spawn(move || {
                    let mut out = vec![];
                    for k in 0..mine {
                        let i = (c + k * 3) % bodies.len();
                        out.push(post(&url, &bodies[i]).map(|(s, v)| {
                            // Batching may move a pixel on the threshold, not a mask to another scan.
                            let area = |v: &serde_json::Value| v["area_px"].as_i64().unwrap_or(-1_000_000);
                            let same = v["answer_ids"] == alone[i]["answer_ids"]
                                && v["image"].as_str() == Some(scan_name(&bodies[i]).as_str())
                                && (area(&v) - area(&alone[i])).abs() <= 128 * 128 / 200;
                            (s, same, v["server"]["batch_size"].as_u64().unwrap_or(0))
                        }));
                    }
                    out
                })
            })
            .collect();
        let mut lat = vec![];
        let (mut lost, mut mixed, mut batch_sum) = (0, 0, 0);
        for t in threads {
            for r in t.join().expect("client thread") {
                match r {
                    Ok((s, same, b)) => {
                        lat.push(s);
                        mixed += (!same) as usize;
                        batch_sum += b;
                    }
                    Err(_) => lost += 1,
                }
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        ensure!(!lat.is_empty(), "no request was answered");
        lat.sort_by(f64::total_cmp);
        println!(
            "{max_batch:>9}  {:>6.0}  {:>6.0}  {:>6.0}  {:>5.1}  {:>10.2}  {lost:>4}  {mixed:>8}",
            percentile(&lat, 0.5) * 1e3,
            percentile(&lat, 0.95) * 1e3,
            lat[lat.len() - 1] * 1e3,
            lat.len() as f64 / wall,
            batch_sum as f64 / lat.len() as f64,
        );
        server.stop()?;
    }
    Ok(())
}

/// The file name inside a multipart body made by [`multipart`].
fn scan_name(body: &(String, Vec<u8>)) -> String {
    let head = String::from_utf8_lossy(&body.1[..body.1.len().min(300)]).into_owned();
    head.split("filename=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_string()
}
