//! The routes of `prs serve`. Every error is a JSON `{"error": ...}` with the status that
//! names its kind: 400 for a bad request (the message says which field and why), 401 without
//! the token, 413 for an upload over the limit, 503 (with Retry-After) when the queue is full,
//! 500 only when the model itself fails.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{oneshot, Semaphore};

use super::worker::{Done, Job, Queue, Refused};
use super::{ServeOptions, DEFAULT_QUESTION, MAX_NEW_TOKENS_LIMIT};
use crate::data::preprocess::decode_image_bytes;
use crate::pipeline::load::Loaded;
use crate::pipeline::predict::{prepare_image, render, write_prediction_dir, ItemMeta, ItemResult};

const PAGE: &str = include_str!("page.html");

pub struct AppState {
    loaded: Arc<Loaded>,
    queue: Queue,
    opts: ServeOptions,
    /// Requests being handled (reading, preparing, waiting, running): bounds the memory that
    /// uploads can take, whatever the clients do.
    admission: Arc<Semaphore>,
    results: Mutex<ResultStore>,
    started: Instant,
}

impl AppState {
    pub fn new(loaded: Arc<Loaded>, queue: Queue, opts: ServeOptions) -> Arc<Self> {
        let admission = Arc::new(Semaphore::new(opts.queue_size.max(1) + opts.max_batch.max(1)));
        let results = Mutex::new(ResultStore::new(opts.keep_results));
        Arc::new(Self { loaded, queue, opts, admission, results, started: Instant::now() })
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    // The multipart framing around the limit: a file of exactly the limit still fits.
    let body_limit = state.opts.max_upload_bytes + 64 * 1024;
    Router::new()
        .route("/", get(page))
        .route("/v1/health", get(health))
        .route("/v1/info", get(info))
        .route("/v1/predict", post(predict).layer(DefaultBodyLimit::max(body_limit)))
        .route("/v1/results/{id}/{file}", get(result_file))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route: see GET /v1/info for the API") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// A JSON error response.
fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn bad_request(msg: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, msg)
}

/// The page and the health check are open; the API and results need the token when one is set.
async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/" | "/v1/health");
    if let (Some(token), false) = (&state.opts.token, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.as_bytes(), token.as_bytes()) {
            // Read what the client is sending (up to the upload limit): a client still writing
            // its upload would otherwise see a broken connection instead of this answer.
            let _ = axum::body::to_bytes(req.into_body(), state.opts.max_upload_bytes + 64 * 1024).await;
            let mut r = error(StatusCode::UNAUTHORIZED, "this server needs its token: Authorization: Bearer <token>");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so timing tells nothing of the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn page() -> Response {
    let mut r = Html(PAGE).into_response();
    // Everything the page needs is inside it: nothing else may load.
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'",
        ),
    );
    r
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let s = &state.queue.stats;
    Json(json!({
        "status": "ok",
        "waiting": state.queue.waiting(),
        "running": s.running.load(Ordering::Relaxed),
        "predicted": s.predicted.load(Ordering::Relaxed),
        "uptime_s": state.started.elapsed().as_secs_f64(),
    }))
    .into_response()
}

async fn info(State(state): State<Arc<AppState>>) -> Response {
    let o = &state.opts;
    let s = &state.queue.stats;
    Json(json!({
        "name": "prs",
        "version": env!("CARGO_PKG_VERSION"),
        "model": state.loaded.info,
        "checkpoint": o.checkpoint,
        "device": state.loaded.info.device,
        "dtype": state.loaded.info.dtype,
        "defaults": {
            "question": DEFAULT_QUESTION,
            "threshold": o.threshold,
            "max_new_tokens": o.gen.max_new_tokens,
            "temperature": o.gen.temperature,
            "top_p": o.gen.top_p,
            "seed": o.gen.seed,
        },
        "limits": {
            "max_upload_bytes": o.max_upload_bytes,
            "max_pixels": o.max_pixels,
            "max_new_tokens": MAX_NEW_TOKENS_LIMIT,
            "queue_size": state.queue.capacity(),
            "max_batch": o.max_batch,
        },
        "stats": {
            "predicted": s.predicted.load(Ordering::Relaxed),
            "batches": s.batches.load(Ordering::Relaxed),
            "refused_queue_full": s.refused_full.load(Ordering::Relaxed),
            "mean_batch_ms": s.batch_ms.load(Ordering::Relaxed),
        },
        "saves_uploads": o.save_dir.is_some(),
        "auth": o.token.is_some(),
        "endpoints": ["GET /", "GET /v1/health", "GET /v1/info", "POST /v1/predict (multipart: image, question, threshold, max_new_tokens, temperature, top_p, seed)", "GET /v1/results/{id}/{mask.png|prob.png|overlay.png|result.json}"],
    }))
    .into_response()
}

/// The fields of a predict request.
struct Form {
    image: Bytes,
    file_name: String,
    question: String,
    threshold: f32,
    gen: crate::pipeline::generate::GenerateOptions,
}

/// A request refused while its form is read: the status and the message.
struct Refusal(StatusCode, String);

fn invalid(msg: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, msg.into())
}

/// Reads and checks the multipart form; the error is the response to send.
async fn read_form(mut mp: Multipart, opts: &ServeOptions) -> Result<Form, Refusal> {
    let mut image: Option<(Bytes, String)> = None;
    let mut question: Option<String> = None;
    let mut threshold = opts.threshold;
    let mut gen = opts.gen.clone();
    let multipart_err = |e: axum::extract::multipart::MultipartError| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the upload is over the server's limit of {} bytes", opts.max_upload_bytes)
        } else {
            format!("malformed multipart body: {}", e.body_text())
        };
        Refusal(status, msg)
    };
    while let Some(field) = mp.next_field().await.map_err(multipart_err)? {
        let name = field.name().unwrap_or("").to_string();
        if name == "image" {
            let file_name = field.file_name().unwrap_or("upload").to_string();
            let bytes = field.bytes().await.map_err(multipart_err)?;
            if bytes.len() > opts.max_upload_bytes {
                return Err(Refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "image `{file_name}` has {} bytes, over the limit of {}",
                        bytes.len(),
                        opts.max_upload_bytes
                    ),
                ));
            }
            image = Some((bytes, file_name));
            continue;
        }
        let text = field.text().await.map_err(multipart_err)?;
        let value = text.trim();
        let number = |what: &str| -> Result<f64, Refusal> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| invalid(format!("field `{what}`: `{value}` is not a finite number")))
        };
        match name.as_str() {
            "question" => question = Some(text),
            "threshold" => {
                let v = number("threshold")?;
                if !(0.0..=1.0).contains(&v) {
                    return Err(invalid(format!("field `threshold`: {v} is not in [0, 1]")));
                }
                threshold = v as f32;
            }
            "max_new_tokens" => {
                gen.max_new_tokens = value
                    .parse::<usize>()
                    .ok()
                    .filter(|v| (1..=MAX_NEW_TOKENS_LIMIT).contains(v))
                    .ok_or_else(|| {
                        invalid(format!(
                            "field `max_new_tokens`: `{value}` is not a whole number in 1..={MAX_NEW_TOKENS_LIMIT}"
                        ))
                    })?;
            }
            "temperature" => gen.temperature = number("temperature")?,
            "top_p" => gen.top_p = number("top_p")?,
            "seed" => {
                gen.seed = value
                    .parse()
                    .map_err(|_| invalid(format!("field `seed`: `{value}` is not a whole number")))?
            }
            other => {
                return Err(invalid(format!(
                    "unknown field `{other}` (expected image, question, threshold, max_new_tokens, temperature, top_p, seed)"
                )))
            }
        }
    }
    gen.validate().map_err(|e| invalid(format!("{e:#}")))?;
    let Some((image, file_name)) = image else {
        return Err(invalid("missing field `image` (a PNG or JPEG file)"));
    };
    if image.is_empty() {
        return Err(invalid(format!("image `{file_name}` is empty")));
    }
    let Some(question) = question else { return Err(invalid("missing field `question`")) };
    if question.trim().is_empty() {
        return Err(invalid("field `question` is empty"));
    }
    Ok(Form { image, file_name, question, threshold, gen })
}

/// `POST /v1/predict`: `result.json` of `prs predict`, the mask as base64 PNG, and the URLs of
/// the result's files.
#[derive(Serialize)]
struct PredictResponse {
    #[serde(flatten)]
    result: ItemResult,
    mask_png_base64: String,
    mask_url: String,
    prob_url: String,
    overlay_url: String,
    result_url: String,
    server: ServerTimings,
}

#[derive(Serialize)]
struct ServerTimings {
    queue_s: f64,
    model_s: f64,
    total_s: f64,
    batch_size: usize,
}

async fn predict(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> Response {
    let t0 = Instant::now();
    let id = request_id();
    let response = predict_inner(&state, &headers, mp, &id, t0).await;
    tracing::info!("predict {id}: {} in {:.0} ms", response.status().as_u16(), t0.elapsed().as_secs_f64() * 1000.0);
    response
}

async fn predict_inner(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
    id: &str,
    t0: Instant,
) -> Response {
    let opts = &state.opts;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > opts.max_upload_bytes + 64 * 1024) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request has {} bytes, over the server's limit of {}",
                declared.unwrap(),
                opts.max_upload_bytes
            ),
        );
    }
    let mp = match mp {
        Ok(mp) => mp,
        Err(e) => return bad_request(format!("expected a multipart/form-data body: {}", e.body_text())),
    };
    let Ok(_permit) = state.admission.clone().try_acquire_owned() else {
        discard(mp).await;
        return busy(state.queue.retry_after_s());
    };
    let form = match read_form(mp, opts).await {
        Ok(f) => f,
        Err(Refusal(status, msg)) => return error(status, msg),
    };
    // Decoding and resizing take CPU time: off the HTTP threads.
    let loaded = state.loaded.clone();
    let (bytes, name, question) = (form.image.clone(), form.file_name.clone(), form.question.clone());
    let max_pixels = opts.max_pixels;
    let prepared = tokio::task::spawn_blocking(move || {
        if let Some((w, h)) = image_dimensions(&bytes) {
            if w as u64 * h as u64 > max_pixels {
                return Err(format!(
                    "image `{name}` is {w}x{h}: more than the server's limit of {max_pixels} pixels (--max-megapixels)"
                ));
            }
        }
        let img = decode_image_bytes(&bytes, Some(Path::new(&name)))
            .map_err(|e| format!("image `{name}` cannot be decoded: {e:#}"))?;
        prepare_image(&loaded, img, &question, &format!("image `{name}`")).map_err(|e| format!("{e:#}"))
    })
    .await;
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(msg)) => return bad_request(msg),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("preparing the input failed: {e}")),
    };
    let meta = ItemMeta {
        id: id.to_string(),
        image: form.file_name.clone(),
        question: form.question.clone(),
        threshold: form.threshold,
    };
    let (reply, answer) = oneshot::channel();
    let job = Job { prepared, meta, gen: form.gen.clone(), queued_at: Instant::now(), reply };
    match state.queue.submit(job) {
        Ok(()) => tracing::debug!("predict {id}: queued ({} waiting)", state.queue.waiting()),
        Err(Refused::Full { retry_after_s }) => return busy(retry_after_s),
        Err(Refused::Stopped) => return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"),
    }
    let done = match answer.await {
        Ok(Ok(done)) => done,
        Ok(Err(msg)) => return error(StatusCode::INTERNAL_SERVER_ERROR, msg),
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "the model stopped before answering"),
    };
    let state2 = state.clone();
    let (id2, upload) = (id.to_string(), form.image);
    let finished = tokio::task::spawn_blocking(move || finish(&state2, &id2, done, &upload, t0)).await;
    match finished {
        Ok(Ok(body)) => Json(body).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("writing the result failed: {e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("writing the result failed: {e}")),
    }
}

/// The size an encoded image states in its header (None: the decoder will say what is wrong).
fn image_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

/// Reads a form to its end and drops it, so that the client, done sending, reads the answer.
async fn discard(mut mp: Multipart) {
    while let Ok(Some(field)) = mp.next_field().await {
        if field.bytes().await.is_err() {
            return;
        }
    }
}

/// 503 with a Retry-After of about one batch time per batch ahead.
fn busy(secs: u64) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, format!("the queue is full: retry in about {secs} s"));
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// Draws and encodes the pictures, keeps them for their URLs (and on disk with --save-dir).
fn finish(state: &AppState, id: &str, done: Done, upload: &[u8], t0: Instant) -> anyhow::Result<PredictResponse> {
    let Done { result, prob, image, run } = done;
    let pictures = render(&image, &prob, result.mask.threshold)?;
    let png = |img: &dyn Fn(&mut std::io::Cursor<Vec<u8>>) -> image::ImageResult<()>| -> anyhow::Result<Vec<u8>> {
        let mut c = std::io::Cursor::new(Vec::new());
        img(&mut c)?;
        Ok(c.into_inner())
    };
    let fmt = image::ImageFormat::Png;
    let mask_png = png(&|c| pictures.mask.write_to(c, fmt))?;
    let prob_png = png(&|c| pictures.prob.write_to(c, fmt))?;
    let overlay_png = png(&|c| pictures.overlay.write_to(c, fmt))?;
    if let Some(dir) = &state.opts.save_dir {
        let ext = Path::new(&result.image).extension().and_then(|e| e.to_str()).unwrap_or("bin").to_lowercase();
        let upload_name =
            format!("upload.{}", if ext.chars().all(|c| c.is_ascii_alphanumeric()) { &ext } else { "bin" });
        write_prediction_dir(&dir.join(id), &image, &prob, None, &result, &[(upload_name.as_str(), upload)])?;
    }
    let url = |f: &str| format!("/v1/results/{id}/{f}");
    let body = PredictResponse {
        mask_png_base64: base64::engine::general_purpose::STANDARD.encode(&mask_png),
        mask_url: url("mask.png"),
        prob_url: url("prob.png"),
        overlay_url: url("overlay.png"),
        result_url: url("result.json"),
        server: ServerTimings {
            queue_s: run.queue_s,
            model_s: run.model_s,
            total_s: t0.elapsed().as_secs_f64(),
            batch_size: run.batch_size,
        },
        result,
    };
    let json = serde_json::to_vec_pretty(&body.result)?;
    let files = StoredResult { mask_png, prob_png, overlay_png, json };
    state.results.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), files);
    Ok(body)
}

async fn result_file(State(state): State<Arc<AppState>>, UrlPath((id, file)): UrlPath<(String, String)>) -> Response {
    let store = state.results.lock().unwrap_or_else(|e| e.into_inner());
    let Some(r) = store.get(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no result `{id}` (results are kept while the server runs, the newest {} of them)",
                state.opts.keep_results
            ),
        );
    };
    let (bytes, kind) = match file.as_str() {
        "mask.png" => (&r.mask_png, "image/png"),
        "prob.png" => (&r.prob_png, "image/png"),
        "overlay.png" => (&r.overlay_png, "image/png"),
        "result.json" => (&r.json, "application/json"),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no file `{file}`: mask.png, prob.png, overlay.png or result.json"),
            )
        }
    };
    let disposition = format!("inline; filename=\"{id}-{file}\"");
    ([(header::CONTENT_TYPE, kind.to_string()), (header::CONTENT_DISPOSITION, disposition)], bytes.clone())
        .into_response()
}

/// A random id: it names the result's URLs, so it is not guessable.
fn request_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..16).map(|_| format!("{:x}", rng.gen_range(0..16u8))).collect()
}

struct StoredResult {
    mask_png: Vec<u8>,
    prob_png: Vec<u8>,
    overlay_png: Vec<u8>,
    json: Vec<u8>,
}

/// The newest results' files, for their URLs: at most `keep` of them and [`STORE_BYTES`] in all
/// (large scans make large overlays), the oldest going first.
struct ResultStore {
    keep: usize,
    bytes: usize,
    order: VecDeque<String>,
    files: HashMap<String, StoredResult>,
}

/// The most the result store holds, in bytes.
const STORE_BYTES: usize = 512 << 20;

impl StoredResult {
    fn bytes(&self) -> usize {
        self.mask_png.len() + self.prob_png.len() + self.overlay_png.len() + self.json.len()
    }
}

impl ResultStore {
    fn new(keep: usize) -> Self {
        Self { keep, bytes: 0, order: VecDeque::new(), files: HashMap::new() }
    }

    fn insert(&mut self, id: String, r: StoredResult) {
        if self.keep == 0 || r.bytes() > STORE_BYTES {
            return;
        }
        while self.order.len() >= self.keep || self.bytes + r.bytes() > STORE_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(gone) = self.files.remove(&old) {
                self.bytes -= gone.bytes();
            }
        }
        self.bytes += r.bytes();
        self.order.push_back(id.clone());
        self.files.insert(id, r);
    }

    fn get(&self, id: &str) -> Option<&StoredResult> {
        self.files.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(n: usize) -> StoredResult {
        StoredResult { mask_png: vec![0; n], prob_png: vec![], overlay_png: vec![], json: vec![] }
    }

    #[test]
    fn the_store_keeps_the_newest_within_count_and_bytes() {
        let mut s = ResultStore::new(3);
        for i in 0..5 {
            s.insert(format!("r{i}"), result(10));
        }
        assert!(s.get("r0").is_none() && s.get("r1").is_none());
        assert!(s.get("r2").is_some() && s.get("r4").is_some());
        assert_eq!(s.bytes, 30);
        // A large result pushes out as many old ones as its bytes need.
        s.insert("big".into(), result(STORE_BYTES - 15));
        assert!(s.get("r3").is_none() && s.get("r4").is_some() && s.get("big").is_some());
        assert_eq!(s.bytes, STORE_BYTES - 5);
        // One larger than the whole store is not kept, and evicts nothing.
        s.insert("huge".into(), result(STORE_BYTES + 1));
        assert!(s.get("huge").is_none() && s.get("big").is_some());
        assert!(ResultStore::new(0).files.is_empty());
    }
}
