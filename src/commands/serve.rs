//! `prs serve`: loads a trained model once and serves a page and an HTTP API for it (see
//! `serve`). Binds to localhost unless `--host` says otherwise; elsewhere it warns, and a
//! `--token` (or PRS_SERVE_TOKEN) makes every API call carry `Authorization: Bearer <token>`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Result};

use super::args::{at_least_one, unit_interval_f32};
use super::predict::GenArgs;
use crate::files;
use crate::pipeline::load::{load_model, ModelArgs};
use crate::serve::{self, ServeOptions};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Trained checkpoint: a project checkpoint, the authors' release layout, or a merged export.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; anything but a loopback address exposes the scans sent to it.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Bearer token that API calls must carry (the page asks for it once).
    #[arg(long, env = "PRS_SERVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Keep each request's upload and prediction folder here (default: nothing is written).
    #[arg(long)]
    pub save_dir: Option<PathBuf>,
    /// Requests that may wait for the model; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub queue_size: usize,
    /// Requests waiting together run as one batch of at most this many.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub max_batch: usize,
    /// Largest upload, in MiB (413 above).
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    pub max_upload_mb: usize,
    /// Largest image, in megapixels (checked from its header before it is decoded).
    #[arg(long, default_value_t = 40.0, value_parser = super::args::positive)]
    pub max_megapixels: f64,
    /// Results whose files stay downloadable from the server (newest first).
    #[arg(long, default_value_t = 100)]
    pub keep_results: usize,
    /// Default mask threshold (a request may give its own).
    #[arg(long, default_value_t = 0.5, value_parser = unit_interval_f32)]
    pub threshold: f32,
    #[command(flatten)]
    pub gen: GenArgs,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let gen = args.gen.options();
    gen.validate()?;
    ensure!(
        gen.max_new_tokens <= serve::MAX_NEW_TOKENS_LIMIT,
        "--max-new-tokens must be at most {}",
        serve::MAX_NEW_TOKENS_LIMIT
    );
    if let Some(token) = &args.token {
        ensure!(token.trim().len() >= 8, "--token must have at least 8 characters");
    }
    if let Some(dir) = &args.save_dir {
        files::claim_output_root(dir, "serve-uploads", "--save-dir")?;
    }
    // Bind before loading: a taken port fails in a second, not after the model has loaded.
    let listener = serve::bind(&format_host_port(&args.host, args.port))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "listening on {addr}, not on localhost: the scans sent here cross the network{}",
            if args.token.is_some() { "" } else { " and anyone who reaches it can use it (set --token)" }
        );
    }
    let loaded = load_model(&args.checkpoint, &args.model)?;
    let opts = ServeOptions {
        gen,
        threshold: args.threshold,
        queue_size: args.queue_size,
        max_batch: args.max_batch,
        max_upload_bytes: args.max_upload_mb << 20,
        max_pixels: (args.max_megapixels * 1e6) as u64,
        token: args.token.clone(),
        save_dir: args.save_dir.clone(),
        keep_results: args.keep_results,
        checkpoint: args.checkpoint.display().to_string(),
    };
    let mut out = std::io::stdout();
    writeln!(
        out,
        "prs serve: {} on {} ({}), listening on http://{addr}",
        opts.checkpoint, loaded.info.device, loaded.info.dtype
    )?;
    out.flush()?;
    serve::run(listener, loaded, opts)?;
    // Whoever read the address may have closed stdout since (`prs serve | head -1`).
    let _ = writeln!(std::io::stdout(), "prs serve: stopped");
    Ok(())
}

/// `host:port`, with brackets around an IPv6 address.
fn format_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
