//! A CLI that explains itself: every argument has help, every subcommand's help ends with
//! examples that parse, exit statuses say what kind of failure happened (and are documented),
//! -q leaves results and errors, completions list the subcommands, and a CUDA device on a CPU
//! build is refused before any work.

use std::path::Path;
use std::process::{Command, Output};

use clap::{CommandFactory, Parser};
use prs::cli::Cli;

use crate::common::{tiny_model, tokenizer_model};

fn prs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prs"))
        .args(args)
        .env("PRS_TOKENIZER_MODEL", tokenizer_model())
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every command of the tree with its path of names (`["prs", "data", "check"]`).
fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
    out.push((path.clone(), cmd.clone()));
    for sub in cmd.get_subcommands() {
        let mut p = path.clone();
        p.push(sub.get_name().to_string());
        walk(sub, p, out);
    }
}

fn commands() -> Vec<(Vec<String>, clap::Command)> {
    let mut out = vec![];
    walk(&Cli::command(), vec!["prs".into()], &mut out);
    out
}

#[test]
fn every_argument_of_every_subcommand_has_help() {
    let mut missing = vec![];
    let all = commands();
    assert!(all.len() >= 13, "the walk found only {} commands", all.len());
    for (path, cmd) in &all {
        for arg in cmd.get_arguments() {
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{} {}", path.join(" "), arg.get_id()));
            }
        }
    }
    assert!(missing.is_empty(), "arguments without help text:\n{}", missing.join("\n"));
}

/// Splits an example line as a shell would (double quotes group words); stops at a redirection.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut cur, mut quoted, mut any) = (vec![], String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => (quoted, any) = (!quoted, true),
            ' ' if !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            _ => (cur, any) = (cur + &c.to_string(), true),
        }
    }
    if any {
        words.push(cur);
    }
    words.into_iter().take_while(|w| w != ">" && w != "|").collect()
}

#[test]
fn every_subcommand_ends_its_help_with_examples_that_parse() {
    assert_eq!(shell_words(r#"prs a "b c" > f"#), ["prs", "a", "b c"]);
    let mut checked = 0;
    for (path, cmd) in commands() {
        let help = cmd.get_after_help().map(|h| h.to_string()).unwrap_or_default();
        let examples = help.split_once("Examples:").map(|(_, e)| e).unwrap_or_else(|| {
            panic!("`{} --help` has no Examples: block", path.join(" "));
        });
        let lines: Vec<&str> = examples.lines().map(str::trim).filter(|l| l.starts_with("prs ")).collect();
        assert!(!lines.is_empty(), "`{} --help`: no example lines", path.join(" "));
        for line in lines {
            let words = shell_words(line);
            // An example of `prs data` shows `prs data ...`.
            assert_eq!(&words[..path.len()], &path[..], "example `{line}` is not under `{}`", path.join(" "));
            if let Err(e) = Cli::try_parse_from(&words) {
                panic!("example `{line}` does not parse:\n{e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} examples");
}

#[test]
fn exit_statuses_are_in_prs_help_and_the_readme() {
    let help = Cli::command().render_long_help().to_string();
    assert!(help.contains(prs::exit::EXIT_CODES_HELP), "{help}");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    // One entry per status; an indented line continues the one above.
    let table = prs::exit::EXIT_CODES_HELP.replace("\n     ", " ");
    for code in ["0", "1", "2", "3", "4"] {
        let line = table.lines().find(|l| l.trim_start().starts_with(code)).unwrap();
        let what = line.trim_start()[1..].trim();
        assert!(
            readme.contains(&format!("| {code} | {what} |")),
            "README.md does not document exit status {code}: {what}"
        );
    }
    // The flags every command has, before or after the subcommand.
    let cli = Cli::try_parse_from(["prs", "data", "check", "-vv", "--data-root", "d"]).unwrap();
    assert_eq!((cli.verbose, cli.quiet), (2, false));
    let cli = Cli::try_parse_from(["prs", "-q", "tokenize", "--model", "m", "x"]).unwrap();
    assert!(cli.quiet);
    assert!(Cli::try_parse_from(["prs", "-q", "-v", "tokenize", "--model", "m", "x"]).is_err());
}

#[test]
fn exit_status_says_what_kind_of_failure_it_was() {
    let dir = tempfile::tempdir().unwrap();
    // Bad usage: clap's own status.
    let o = prs(&["finetune", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    // A missing data root and a missing config file: bad input.
    let o = prs(&["data", "check", "--data-root", "/nonexistent/data"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr).matches("error:").count(), 1, "one error line: {}", text(&o.stderr));
    let o = prs(&["train", "--config", "/nonexistent/c.toml"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    // An invalid config value.
    let conf = dir.path().join("c.toml");
    let tiny = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")).unwrap();
    std::fs::write(&conf, tiny).unwrap();
    let o = prs(&["finetune", "--dry-run", "--config", conf.to_str().unwrap(), "--set", "train.learning_rate=-1"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("train.learning_rate"), "{}", text(&o.stderr));
    // A corrupt image in a dataset row.
    let data = dir.path().join("data");
    prs::data::synth::generate(
        &data,
        &prs::data::synth::SynthConfig { train: 2, val: 1, test: 1, size: 64, seed: 3 },
        false,
    )
    .unwrap();
    let rows = prs::data::dataset::read_rows(&data, &Default::default()).unwrap().rows;
    std::fs::write(&rows[0].image, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let o = prs(&["data", "check", "--data-root", data.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains(&format!("{}:{}", rows[0].csv.display(), rows[0].line)), "{}", text(&o.stderr));
}

#[test]
fn quiet_leaves_results_and_errors_and_status_lines_go_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_model(dir.path());
    let data = dir.path().join("data");
    prs::data::synth::generate(
        &data,
        &prs::data::synth::SynthConfig { train: 2, val: 1, test: 1, size: 64, seed: 4 },
        false,
    )
    .unwrap();
    cfg.data.root = Some(data.display().to_string());
    let conf = dir.path().join("c.toml");
    std::fs::write(&conf, cfg.to_toml().unwrap()).unwrap();
    let out = dir.path().join("run");
    let args = [
        "finetune",
        "--dry-run",
        "--device",
        "cpu",
        "--config",
        conf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let o = prs(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    // The plan is a status line (stderr); the verdict is the result (stdout).
    assert!(stderr.contains("plan:") && !stdout.contains("plan:"), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("dry run: configuration, weights and dataset are valid"), "{stdout}");
    let o = prs(&[&["-q"], &args[..]].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "", "-q printed status lines");
    assert!(text(&o.stdout).contains("dry run: configuration"), "{}", text(&o.stdout));
    // -v adds debug lines, marked as such.
    let o = prs(&[&args[..], &["-v"]].concat());
    assert!(text(&o.stderr).lines().any(|l| l.starts_with("debug: ")), "{}", text(&o.stderr));
}

#[test]
fn completions_list_the_subcommands() {
    let o = prs(&["completions", "bash"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let script = text(&o.stdout);
    for sub in ["finetune", "profile-memory", "data", "export", "completions"] {
        assert!(script.contains(sub), "bash completion does not mention {sub}");
    }
    let o = prs(&["completions", "nushell-or-not"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_cuda_device_on_a_cpu_build_is_refused_before_any_work() {
    if cfg!(feature = "cuda") {
        return; // a CUDA build has the device
    }
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    let conf = conf.to_str().unwrap();
    for args in [
        vec!["profile-memory", "--config", conf, "--device", "cuda:0", "--batch-sizes", "1"],
        vec!["profile-memory", "--config", conf, "--device", "cuda:0", "--predict-only"],
        vec!["bench", "train", "--config", conf, "--device", "cuda:0"],
    ] {
        let o = prs(&args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("built without CUDA") && err.contains("make build-cuda"), "{err}");
        // Nothing ran first: no trial line, no table, no candle message.
        assert!(!err.contains("batch 1") && !err.contains("candle crate"), "{err}");
        assert_eq!(text(&o.stdout), "", "{:?}", args);
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // The analytic plan for a GPU needs no GPU.
    let o = prs(&["profile-memory", "--config", conf, "--device", "cuda:0", "--predict-only", "--gpu-memory", "24GiB"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}
