use clap::Parser;

fn main() {
    // candle's CPU element-wise pool spin-waits at barriers; with all cores in it, the data
    // loader's workers and gemm's threads starve it (measured on 2 cores: a tiny-model step
    // took twice as long). Unless the user chose, leave half the cores to the rest.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("CANDLE_NUM_THREADS", (cores / 2).max(1).to_string());
    }
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
