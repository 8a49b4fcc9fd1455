//! `prs serve` over real HTTP on an ephemeral port, with the tiny model: a prediction equals
//! `prs predict`'s on the same image and question, every bad request gets its status and a
//! message naming the problem (and the server lives on), the token, the full queue, 200
//! requests from 8 clients each answered for its own image, --save-dir, and SIGTERM finishing
//! the requests in flight.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use base64::Engine;
use image::RgbImage;
use prs::pipeline::load::{load_model, ModelArgs};
use prs::serve::{bind, start, ServeOptions, ServerHandle};
use serde_json::Value;

use crate::infer_setup::{s, setup, Setup};

const Q: &str = "Where is the tumor located in this brain CT scan?";

/// A textured image with a bright blob whose place depends on `k` (so each image has its own mask).
fn scan(path: &Path, size: u32, k: u32) {
    let (cx, cy) = (size as f32 * (0.2 + 0.15 * (k % 5) as f32), size as f32 * (0.25 + 0.12 * (k / 5 % 5) as f32));
    let img = RgbImage::from_fn(size, size, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        let v = if d < size as f32 / 6.0 { 230 } else { ((x * (7 + k) + y * 13) % 90) as u8 + 20 };
        image::Rgb([v, v.saturating_sub(15), v / 2])
    });
    img.save(path).unwrap();
}

fn server(st: &Setup, opts: ServeOptions) -> ServerHandle {
    server_of(&st.project, None, opts)
}

fn server_of(checkpoint: &Path, config: Option<&Path>, opts: ServeOptions) -> ServerHandle {
    let args = ModelArgs { device: "cpu".into(), config: config.map(Path::to_path_buf), ..Default::default() };
    let loaded = load_model(checkpoint, &args).unwrap();
    start(bind("127.0.0.1:0").unwrap(), loaded, ServeOptions { checkpoint: s(checkpoint), ..opts }).unwrap()
}

/// A part of a multipart/form-data body: (field name, file name, bytes).
type Part<'a> = (&'a str, Option<&'a str>, Vec<u8>);

fn multipart(parts: &[Part]) -> (String, Vec<u8>) {
    let boundary = "prs-test-boundary-7d3f";
    let mut body = vec![];
    for (name, file, data) in parts {
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
        if let Some(f) = file {
            body.extend(format!("; filename=\"{f}\"\r\nContent-Type: application/octet-stream").as_bytes());
        }
        body.extend(b"\r\n\r\n");
        body.extend(data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

struct Reply {
    status: u16,
    retry_after: Option<String>,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error message: {}", self.text())).to_string()
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(300)).build()
}

fn send(req: ureq::Request, body: Option<(String, Vec<u8>)>) -> Reply {
    let r = match body {
        Some((ct, bytes)) => req.set("Content-Type", &ct).send_bytes(&bytes),
        None => req.call(),
    };
    let resp = match r {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let retry_after = resp.header("retry-after").map(str::to_string);
    let content_type = resp.header("content-type").unwrap_or("").to_string();
    let mut body = vec![];
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).unwrap();
    Reply { status, retry_after, content_type, body }
}

fn get(h: &ServerHandle, path: &str) -> Reply {
    send(agent().get(&h.url(path)), None)
}

fn post(h: &ServerHandle, parts: &[Part]) -> Reply {
    send(agent().post(&h.url("/v1/predict")), Some(multipart(parts)))
}

fn image_parts<'a>(name: &'a str, bytes: Vec<u8>, question: &str) -> Vec<Part<'a>> {
    vec![("image", Some(name), bytes), ("question", None, question.as_bytes().to_vec())]
}

/// A PNG signature, an IHDR stating `w` x `h` (8-bit grey), a token IDAT and IEND: the header
/// of a decompression bomb without its payload.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
        out
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn decode_mask(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().into_luma8().into_raw()
}

fn prs(args: &[&str]) {
    let cli = <prs::cli::Cli as clap::Parser>::try_parse_from(std::iter::once("prs").chain(args.iter().copied()));
    prs::cli::run(cli.unwrap()).unwrap();
}

/// `prs predict` on `img`, then the same image and question through the server: the same
/// answer ids, figures and mask. Returns the server's JSON and the mask PNG.
fn same_as_prs_predict(
    h: &ServerHandle,
    checkpoint: &Path,
    extra: &[&str],
    img: &Path,
    out: &Path,
) -> (Value, Vec<u8>) {
    let (ck, im, o) = (s(checkpoint), s(img), s(out));
    let mut args =
        vec!["predict", "--checkpoint", &ck, "--image", &im, "--question", Q, "--out", &o, "--device", "cpu"];
    args.extend(extra);
    prs(&args);
    let want: Value = serde_json::from_str(&std::fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    let want_mask = decode_mask(&std::fs::read(out.join("mask.png")).unwrap());
    let r = post(h, &image_parts("scan.png", std::fs::read(img).unwrap(), Q));
    assert_eq!(r.status, 200, "{}", r.text());
    let got = r.json();
    assert_eq!(got["answer_ids"], want["answer_ids"]);
    assert_eq!(got["answer"], want["answer"]);
    for k in ["position", "mask_position", "area_px", "bbox", "threshold", "width", "height", "generation", "model"] {
        assert_eq!(got[k], want[k], "{k}");
    }
    assert_eq!(got["image"], "scan.png");
    let png = base64::engine::general_purpose::STANDARD.decode(got["mask_png_base64"].as_str().unwrap()).unwrap();
    assert_eq!(decode_mask(&png), want_mask, "the mask differs from prs predict's");
    (got, png)
}

#[test]
fn a_prediction_equals_prs_predict_and_its_files_are_served() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    scan(&img, 96, 3);
    let h = server(&st, ServeOptions::default());
    let (got, png) = same_as_prs_predict(&h, &st.project, &[], &img, &st.dir.path().join("pred"));
    let want = &got;
    // The result's URLs serve the same mask, the picture files and the JSON.
    let mask = get(&h, got["mask_url"].as_str().unwrap());
    assert_eq!((mask.status, mask.content_type.as_str()), (200, "image/png"));
    assert_eq!(mask.body, png);
    for (k, dims) in [("prob_url", (96, 96)), ("overlay_url", (96, 96))] {
        let f = get(&h, got[k].as_str().unwrap());
        assert_eq!(f.status, 200, "{k}");
        assert_eq!(image::load_from_memory(&f.body).unwrap().to_rgb8().dimensions(), dims, "{k}");
    }
    let json = get(&h, got["result_url"].as_str().unwrap()).json();
    assert_eq!(json["answer_ids"], want["answer_ids"]);
    assert_eq!(get(&h, "/v1/results/0000000000000000/mask.png").status, 404);
    assert_eq!(get(&h, &format!("/v1/results/{}/secret.txt", got["id"].as_str().unwrap())).status, 404);

    // The page is one self-contained document; health and info describe the server.
    let page = get(&h, "/");
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    let html = page.text();
    for needed in ["<canvas id=\"overlay\"", "id=\"question\"", "id=\"threshold\"", "/v1/predict", "id=\"history\""] {
        assert!(html.contains(needed), "the page lacks {needed}");
    }
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!html.contains(external), "the page loads something from outside: {external}");
    }
    assert_eq!(get(&h, "/v1/health").json()["status"], "ok");
    let info = get(&h, "/v1/info").json();
    assert_eq!(info["model"]["checkpoint_format"], "project");
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["dtype"], "f32");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["stats"]["predicted"], 1);
    h.stop().unwrap();
}

/// The authors' release layout and a merged export serve as `prs predict` runs them.
#[test]
fn the_authors_release_and_a_merged_export_serve_too() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    scan(&img, 80, 7);
    let cfg = s(&st.config_file);
    let h = server_of(&st.authors, Some(&st.config_file), ServeOptions::default());
    let (got, _) = same_as_prs_predict(&h, &st.authors, &["--config", &cfg], &img, &st.dir.path().join("p1"));
    assert_eq!(got["model"]["checkpoint_format"], "authors");
    h.stop().unwrap();
    let merged = st.dir.path().join("merged");
    prs(&["export", "--checkpoint", &s(&st.project), "--merge-lora", "--out", &s(&merged)]);
    let h = server_of(&merged, None, ServeOptions::default());
    let (got, _) = same_as_prs_predict(&h, &merged, &[], &img, &st.dir.path().join("p2"));
    assert_eq!(got["model"]["checkpoint_format"], "merged");
    assert_eq!(get(&h, "/v1/info").json()["model"], got["model"]);
    h.stop().unwrap();
}

#[test]
fn bad_requests_get_their_status_and_a_message_and_the_server_lives_on() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    scan(&img, 64, 1);
    let png = std::fs::read(&img).unwrap();
    let limit = 100_000;
    let h = server(&st, ServeOptions { max_upload_bytes: limit, ..Default::default() });
    let q = Q.as_bytes().to_vec();
    let with = |extra: Vec<Part<'static>>| -> Vec<Part<'static>> {
        let mut p = image_parts("scan.png", png.clone(), Q);
        p.extend(extra);
        p
    };
    let long_question = "where is the lesion ".repeat(400);
    // A PNG whose header claims 20000 x 20000 pixels (1.2 GB as RGB): refused from its header.
    let bomb = png_claiming(20_000, 20_000);
    let cases: Vec<(&str, Vec<Part>, u16, &str)> = vec![
        ("no image", vec![("question", None, q.clone())], 400, "missing field `image`"),
        ("no question", vec![("image", Some("scan.png"), png.clone())], 400, "missing field `question`"),
        ("empty question", image_parts("scan.png", png.clone(), "   "), 400, "`question` is empty"),
        ("empty image", image_parts("scan.png", vec![], Q), 400, "is empty"),
        ("text as image", image_parts("notes.png", b"hello, not a picture".to_vec(), Q), 400, "cannot be decoded"),
        ("truncated PNG", image_parts("cut.png", png[..png.len() / 2].to_vec(), Q), 400, "truncated PNG"),
        ("threshold NaN", with(vec![("threshold", None, b"NaN".to_vec())]), 400, "`threshold`"),
        ("threshold 1.5", with(vec![("threshold", None, b"1.5".to_vec())]), 400, "not in [0, 1]"),
        ("max_new_tokens 0", with(vec![("max_new_tokens", None, b"0".to_vec())]), 400, "`max_new_tokens`"),
        ("max_new_tokens huge", with(vec![("max_new_tokens", None, b"100000".to_vec())]), 400, "`max_new_tokens`"),
        ("negative temperature", with(vec![("temperature", None, b"-1".to_vec())]), 400, "temperature"),
        ("unknown field", with(vec![("colour", None, b"red".to_vec())]), 400, "unknown field `colour`"),
        ("over-long question", image_parts("scan.png", png.clone(), &long_question), 400, "question for image"),
        (
            "a small file claiming a huge image",
            image_parts("bomb.png", bomb.clone(), Q),
            400,
            "more than the server's limit",
        ),
        ("file over the limit", image_parts("big.png", vec![0u8; limit + 10_000], Q), 413, "over the limit"),
    ];
    for (what, parts, status, msg) in cases {
        let r = post(&h, &parts);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let e = r.error();
        assert!(e.contains(msg), "{what}: `{e}` does not say `{msg}`");
    }
    // A request whose Content-Length is over the limit is refused from its headers, before its
    // body is sent (a raw socket: an HTTP client would still be writing the body).
    {
        use std::io::Write;
        let mut sock = std::net::TcpStream::connect(h.addr).unwrap();
        let head = format!(
            "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            50 * limit
        );
        sock.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut sock, &mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("over the server's limit"), "{answer}");
    }
    // Bodies that are not a multipart form at all.
    let url = h.url("/v1/predict");
    let raw = |ct: &str, body: &[u8]| send(agent().post(&url), Some((ct.to_string(), body.to_vec())));
    for (ct, body) in [
        ("application/json", &b"{\"question\": \"x\"}"[..]),
        ("multipart/form-data", &b"no boundary"[..]),
        ("multipart/form-data; boundary=zzz", &b"\x00\x01garbage without any boundary"[..]),
    ] {
        let r = raw(ct, body);
        assert_eq!(r.status, 400, "{ct}: {}", r.text());
        assert!(!r.error().is_empty());
    }
    assert_eq!(send(agent().post(&url), None).status, 400, "no body at all");
    let nowhere = get(&h, "/v2/predict");
    assert_eq!((nowhere.status, nowhere.error().contains("no such route")), (404, true));
    assert_eq!(get(&h, "/v1/predict").status, 405);
    assert_eq!(send(agent().delete(&h.url("/v1/info")), None).status, 405);
    // Still serving, and nothing was predicted by the bad requests.
    let ok = post(&h, &image_parts("scan.png", png.clone(), Q));
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(get(&h, "/v1/info").json()["stats"]["predicted"], 1);
    // A threshold reads back as it was sent (not as its f32 widened to f64).
    let mut parts = image_parts("scan.png", png.clone(), Q);
    parts.push(("threshold", None, b"0.8".to_vec()));
    let r = post(&h, &parts);
    assert_eq!(r.json()["threshold"], serde_json::json!(0.8), "{}", r.text());
    h.stop().unwrap();
}

#[test]
fn the_token_guards_the_api_not_the_page() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    scan(&img, 64, 2);
    let token = "s3cret-token-for-tests";
    let h = server(&st, ServeOptions { token: Some(token.into()), ..Default::default() });
    assert_eq!(get(&h, "/").status, 200);
    assert_eq!(get(&h, "/v1/health").status, 200);
    let denied = get(&h, "/v1/info");
    assert_eq!(denied.status, 401);
    assert!(denied.error().contains("token"));
    assert_eq!(send(agent().get(&h.url("/v1/info")).set("Authorization", "Bearer wrong"), None).status, 401);
    assert_eq!(post(&h, &image_parts("scan.png", std::fs::read(&img).unwrap(), Q)).status, 401);
    // A large upload without the token still gets its 401 (the server reads it, then answers).
    assert_eq!(post(&h, &image_parts("big.png", vec![7u8; 3 << 20], Q)).status, 401);
    let auth = format!("Bearer {token}");
    assert_eq!(send(agent().get(&h.url("/v1/info")).set("Authorization", &auth), None).status, 200);
    let parts = multipart(&image_parts("scan.png", std::fs::read(&img).unwrap(), Q));
    let r = send(agent().post(&h.url("/v1/predict")).set("Authorization", &auth), Some(parts));
    assert_eq!(r.status, 200, "{}", r.text());
    // The result's files are the patient's too.
    assert_eq!(get(&h, r.json()["mask_url"].as_str().unwrap()).status, 401);
    h.stop().unwrap();
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_loses_nothing() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    scan(&img, 512, 4);
    let png = std::fs::read(&img).unwrap();
    let h = Arc::new(server(&st, ServeOptions { queue_size: 1, max_batch: 1, ..Default::default() }));
    let clients = 12;
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (h, barrier, png) = (h.clone(), barrier.clone(), png.clone());
            std::thread::spawn(move || {
                barrier.wait();
                post(&h, &image_parts("scan.png", png, Q))
            })
        })
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + busy.len(), clients, "statuses: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(ok >= 1 && !busy.is_empty(), "{ok} answered, {} refused", busy.len());
    for r in busy {
        let secs: u64 = r.retry_after.as_deref().expect("Retry-After").parse().unwrap();
        assert!(secs >= 1);
        assert!(r.error().contains("queue is full"));
    }
    let info = get(&h, "/v1/info").json();
    assert_eq!(info["stats"]["predicted"], ok as u64);
}

#[test]
fn two_hundred_requests_from_eight_clients_each_get_their_own_answer() {
    let st = setup();
    let n_images = 8;
    let images: Vec<(String, Vec<u8>)> = (0..n_images)
        .map(|k| {
            let p = st.dir.path().join(format!("scan{k}.png"));
            scan(&p, 64, k as u32 * 3 + 1);
            (format!("scan{k}.png"), std::fs::read(&p).unwrap())
        })
        .collect();
    let h = Arc::new(server(&st, ServeOptions { queue_size: 32, max_batch: 4, ..Default::default() }));
    let few_tokens = || ("max_new_tokens", None, b"8".to_vec());
    // What each image gets alone, one request at a time.
    let alone: Vec<Value> = images
        .iter()
        .map(|(name, bytes)| {
            let mut parts = image_parts(name, bytes.clone(), Q);
            parts.push(few_tokens());
            let r = post(&h, &parts);
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()
        })
        .collect();
    let masks: Vec<Vec<u8>> = alone
        .iter()
        .map(|v| {
            decode_mask(
                &base64::engine::general_purpose::STANDARD.decode(v["mask_png_base64"].as_str().unwrap()).unwrap(),
            )
        })
        .collect();
    for i in 1..n_images {
        assert_ne!(masks[i], masks[0], "images 0 and {i} have the same mask: a mix-up could not be seen");
    }
    let (clients, per_client) = (8, 25);
    let images = Arc::new(images);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (h, images) = (h.clone(), images.clone());
            std::thread::spawn(move || {
                (0..per_client)
                    .map(|k| {
                        let i = (c * 7 + k * 3) % images.len();
                        let mut parts = image_parts(&images[i].0, images[i].1.clone(), Q);
                        parts.push(("max_new_tokens", None, b"8".to_vec()));
                        (i, post(&h, &parts))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut batched = 0;
    let mut ids = std::collections::HashSet::new();
    for t in threads {
        for (i, r) in t.join().unwrap() {
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            assert_eq!(v["image"], alone[i]["image"], "an answer for another image");
            assert_eq!(v["answer_ids"], alone[i]["answer_ids"], "image {i}: another answer than alone");
            let m = decode_mask(
                &base64::engine::general_purpose::STANDARD.decode(v["mask_png_base64"].as_str().unwrap()).unwrap(),
            );
            // Batching may move a pixel that sits on the threshold, never a mask to another image.
            let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
            let own = differ(&m, &masks[i]);
            assert!(own <= m.len() / 200, "image {i}: {own} pixels differ from its mask alone");
            for (j, other) in masks.iter().enumerate().filter(|(j, _)| *j != i) {
                assert!(own < differ(&m, other), "image {i}'s answer is closer to image {j}'s mask");
            }
            batched += (v["server"]["batch_size"].as_u64().unwrap() > 1) as usize;
            assert!(ids.insert(v["id"].as_str().unwrap().to_string()), "a request id was given twice");
        }
    }
    assert_eq!(ids.len(), clients * per_client);
    assert_eq!(get(&h, "/v1/info").json()["stats"]["predicted"], (clients * per_client + n_images) as u64);
    eprintln!("{batched} of {} requests ran in batches of more than one", clients * per_client);
}

#[test]
fn save_dir_keeps_uploads_and_predictions_and_nothing_is_written_without_it() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    scan(&img, 64, 5);
    let save = st.dir.path().join("served");
    let h = server(&st, ServeOptions { save_dir: Some(save.clone()), ..Default::default() });
    let r = post(&h, &image_parts("patient 7.png", std::fs::read(&img).unwrap(), Q));
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let dir = save.join(&id);
    assert_eq!(std::fs::read(dir.join("upload.png")).unwrap(), std::fs::read(&img).unwrap());
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(saved["answer_ids"], r.json()["answer_ids"]);
    for f in ["mask.png", "prob.png", "overlay.png"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    h.stop().unwrap();

    // Without --save-dir the server's working folder gets nothing.
    let before = listing(st.dir.path());
    let h = server(&st, ServeOptions::default());
    assert_eq!(post(&h, &image_parts("scan.png", std::fs::read(&img).unwrap(), Q)).status, 200);
    h.stop().unwrap();
    assert_eq!(listing(st.dir.path()), before);
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            }
            all.push(e.path());
        }
    }
    all.sort();
    all
}

/// The binary: SIGTERM lets every request already taken finish with its answer, then exits 0.
#[cfg(unix)]
#[test]
fn sigterm_finishes_the_requests_in_flight() {
    let st = setup();
    let img = st.dir.path().join("scan.png");
    scan(&img, 160, 6);
    let png = std::fs::read(&img).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_prs"))
        .args(["-v", "serve", "--checkpoint", &s(&st.project), "--device", "cpu", "--port", "0", "--max-batch", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let base =
        line.split("listening on ").nth(1).unwrap_or_else(|| panic!("no address in `{line}`")).trim().to_string();
    let (queued_tx, queued_rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let log = std::thread::spawn(move || {
        let mut lines = vec![];
        for l in stderr.lines().map_while(Result::ok) {
            if l.contains("queued") {
                let _ = queued_tx.send(());
            }
            lines.push(l);
        }
        lines
    });
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (base, png) = (base.clone(), png.clone());
            std::thread::spawn(move || {
                send(agent().post(&format!("{base}/v1/predict")), Some(multipart(&image_parts("scan.png", png, Q))))
            })
        })
        .collect();
    for _ in 0..4 {
        queued_rx.recv_timeout(Duration::from_secs(120)).expect("a request was not queued");
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "a request in flight at SIGTERM: {}", r.text());
    }
    let status = child.wait().unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "exit {status:?}: {}", log.join("\n"));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.contains("stopped"), "{rest}");
    assert!(log.iter().any(|l| l.contains("finishing the requests in flight")), "{}", log.join("\n"));
}

/// Listening beyond localhost warns; PRS_SERVE_TOKEN then guards the API; a short token and a
/// taken port are refused before the model loads.
#[cfg(unix)]
#[test]
fn binding_beyond_localhost_warns_and_the_token_comes_from_the_environment() {
    let st = setup();
    let prs_bin = env!("CARGO_BIN_EXE_prs");
    let mut child = std::process::Command::new(prs_bin)
        .args(["serve", "--checkpoint", &s(&st.project), "--device", "cpu", "--host", "0.0.0.0", "--port", "0"])
        .env("PRS_SERVE_TOKEN", "token-from-the-environment")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.trim().rsplit(':').next().unwrap().to_string();
    let info = format!("http://127.0.0.1:{port}/v1/info");
    assert_eq!(send(agent().get(&info), None).status, 401);
    let ok = send(agent().get(&info).set("Authorization", "Bearer token-from-the-environment"), None);
    assert_eq!(ok.status, 200);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("not on localhost"), "no warning: {err}");
    assert!(!err.contains("set --token"), "the token was given: {err}");

    let refused = |args: &[&str]| {
        let o = std::process::Command::new(prs_bin).arg("serve").args(args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let ck = s(&st.project);
    assert!(refused(&["--checkpoint", &ck, "--token", "short"]).contains("at least 8 characters"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    assert!(refused(&["--checkpoint", &ck, "--port", &port]).contains("cannot listen on"));
}
