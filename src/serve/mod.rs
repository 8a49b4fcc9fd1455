//! `prs serve`: one loaded model behind a local web page and an HTTP API.
//!
//! `http` holds the routes (the page, `/v1/predict`, health, info, the results' files),
//! `worker` the model thread and its bounded queue, `page.html` the page (in the binary, no
//! external assets). Scans are medical data: the server binds to localhost unless told
//! otherwise, can require a bearer token, and writes uploads to disk only with `save_dir`.

mod http;
mod worker;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use crate::pipeline::generate::GenerateOptions;
use crate::pipeline::load::Loaded;

/// The question the page starts with.
pub const DEFAULT_QUESTION: &str = "Where is the lesion located in this image?";
/// The most tokens one request may ask for.
pub const MAX_NEW_TOKENS_LIMIT: usize = 512;

/// How the server runs (the flags of `prs serve`).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Generation defaults; a request may change max_new_tokens, temperature, top_p and seed.
    pub gen: GenerateOptions,
    pub threshold: f32,
    /// Prepared requests that may wait for the model; more are answered 503.
    pub queue_size: usize,
    /// Requests that wait together run as one batch of at most this many.
    pub max_batch: usize,
    /// Largest request body, in bytes (413 above).
    pub max_upload_bytes: usize,
    /// Largest image, in pixels, checked from its header before decoding (a small file can
    /// claim a huge image; outputs are drawn at the image's size).
    pub max_pixels: u64,
    /// Bearer token every API call must carry (the page asks for it).
    pub token: Option<String>,
    /// Where each request's upload and prediction folder are kept; none: nothing is written.
    pub save_dir: Option<PathBuf>,
    /// Results whose files stay downloadable (the oldest go first).
    pub keep_results: usize,
    /// The checkpoint as given (for /v1/info).
    pub checkpoint: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            gen: GenerateOptions { max_new_tokens: 64, ..Default::default() },
            threshold: 0.5,
            queue_size: 16,
            max_batch: 4,
            max_upload_bytes: 20 << 20,
            max_pixels: 40_000_000,
            token: None,
            save_dir: None,
            keep_results: 100,
            checkpoint: String::new(),
        }
    }
}

/// A server running on its own threads (tests, benchmarks): dropping it, or `stop`, finishes
/// the requests in flight and joins them.
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ServerHandle {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting, finishes what is in flight, and returns the server's own result.
    pub fn stop(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Binds `addr` (port 0: any free port).
pub fn bind(addr: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `loaded` on `listener` from background threads until the handle stops.
pub fn start(listener: TcpListener, loaded: Loaded, opts: ServeOptions) -> Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("prs-serve".into()).spawn(move || {
        serve(listener, loaded, opts, async {
            let _ = stopped.await;
        })
    })?;
    Ok(ServerHandle { addr, stop: Some(stop), thread: Some(thread) })
}

/// Serves `loaded` on `listener` until SIGTERM or Ctrl-C, then finishes the requests in flight.
pub fn run(listener: TcpListener, loaded: Loaded, opts: ServeOptions) -> Result<()> {
    serve(listener, loaded, opts, termination())
}

async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("stopping: finishing the requests in flight");
}

fn serve(
    listener: TcpListener,
    loaded: Loaded,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let loaded = Arc::new(loaded);
    let (queue, worker) = worker::start(loaded.clone(), opts.queue_size.max(1), opts.max_batch);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("prs-serve-http")
        .build()
        .context("starting the HTTP runtime")?;
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = http::router(http::AppState::new(loaded, queue, opts));
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    });
    // The router (and with it the queue's sender) is gone: the worker ends once it is idle.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    worker.join().map_err(|_| anyhow::anyhow!("the model thread panicked"))?;
    served.context("serving HTTP")
}
