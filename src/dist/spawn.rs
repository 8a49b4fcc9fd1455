//! The built-in launcher, `prs finetune --nproc-per-node N`: starts N copies of the same
//! command on this machine, each with PRS_RANK, PRS_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
//! set, prints their output line by line behind a `[rank r]` prefix, and when one of them
//! fails, stops the others and fails naming it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::launch::{PRS_RANK, PRS_WORLD_SIZE};

/// Runs `n` ranks of this process's own command line and waits for them.
pub fn run_ranks(n: usize) -> Result<()> {
    let exe = std::env::current_exe().context("finding the prs executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p,
        // A port free now; the race with another program taking it first is accepted.
        Err(_) => std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port().to_string(),
    };
    tracing::info!("starting {n} ranks on this machine (rank 0 at {addr}:{port})");
    let mut children: Vec<Option<Child>> = vec![];
    let mut forwarders = vec![];
    for r in 0..n {
        let child = Command::new(&exe)
            .args(&args)
            .env(PRS_RANK, r.to_string())
            .env(PRS_WORLD_SIZE, n.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", &port)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                return Err(e).with_context(|| format!("starting rank {r} ({})", exe.display()));
            }
        };
        let (out, err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        forwarders.push(std::thread::spawn(move || forward(out, r, false)));
        forwarders.push(std::thread::spawn(move || forward(err, r, true)));
        children.push(Some(child));
    }
    let failed = wait_all(&mut children);
    for f in forwarders {
        let _ = f.join();
    }
    if let Some((r, status)) = failed {
        bail!(
            "rank {r} failed ({status}); the other ranks were stopped. Its output above, prefixed [rank {r}], says why"
        );
    }
    Ok(())
}

/// Waits until every child has exited successfully, or one failed: then kills the rest.
/// Returns the first failure.
fn wait_all(children: &mut [Option<Child>]) -> Option<(usize, ExitStatus)> {
    loop {
        for r in 0..children.len() {
            let Some(c) = children[r].as_mut() else { continue };
            match c.try_wait() {
                Ok(Some(st)) if st.success() => children[r] = None,
                Ok(Some(st)) => {
                    children[r] = None;
                    stop(children);
                    return Some((r, st));
                }
                Ok(None) => {}
                Err(_) => {
                    // Cannot watch it: treat as failed rather than wait forever.
                    let st = c.wait().ok()?;
                    children[r] = None;
                    stop(children);
                    return Some((r, st));
                }
            }
        }
        if children.iter().all(Option::is_none) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(children: &mut [Option<Child>]) {
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Copies a child's stream line by line with its rank in front (progress-bar redraws end
/// their line with `\r`, counted as a line end too).
fn forward(stream: impl Read, rank: usize, to_stderr: bool) {
    let mut reader = BufReader::new(stream);
    let mut line = vec![];
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                for part in String::from_utf8_lossy(&line).split(['\n', '\r']).filter(|p| !p.is_empty()) {
                    let text = format!("[rank {rank}] {part}\n");
                    // Output is best effort: a closed terminal must not stop training.
                    let _ = if to_stderr {
                        std::io::stderr().lock().write_all(text.as_bytes())
                    } else {
                        std::io::stdout().lock().write_all(text.as_bytes())
                    };
                }
            }
        }
    }
}
