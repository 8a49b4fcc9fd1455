use clap::Parser;

fn main() {
    let cli = prs::cli::Cli::parse();
    if let Err(e) = prs::cli::run(cli) {
        // One message, with its causes, and a non-zero exit.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
