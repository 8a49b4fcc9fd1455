use clap::Parser;

fn main() {
    prs::process::keep_freed_memory();
    let cli = prs::cli::Cli::parse();
    if let Err(e) = prs::cli::run(cli) {
        // One message, with its causes, and a non-zero exit.
        let msg = format!("{e:#}");
        eprintln!("error: {msg}");
        if msg.contains("CUDA_ERROR_OUT_OF_MEMORY") {
            eprintln!(
                "hint: this step does not fit in the GPU's memory. `prs profile-memory --config FILE --device cuda:0` \
                 measures what fits; a smaller --batch-size with more --gradient-accumulation-steps keeps the \
                 effective batch, and --gradient-checkpointing trades time for memory"
            );
        }
        std::process::exit(1);
    }
}
