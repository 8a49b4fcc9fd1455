use clap::Parser;

use prs::cli::exit_kind;
use prs::exit::{ExitKind, OOM_HINT};

fn main() {
    prs::process::keep_freed_memory();
    // clap exits by itself on bad usage (status 2) and for --help / --version (0).
    let cli = prs::cli::Cli::parse();
    prs::logging::init(cli.verbose, cli.quiet);
    if let Err(e) = prs::cli::run(cli) {
        // One message, with its causes, and a status that says what kind of failure it was.
        eprintln!("error: {e:#}");
        let kind = exit_kind(&e);
        if kind == ExitKind::OutOfMemory {
            eprintln!("{OOM_HINT}");
        }
        std::process::exit(kind as i32);
    }
}
