//! Which rank this process is, read from the launcher's environment, checked before anything
//! loads:
//! - torchrun (`torchrun --no-python --nproc-per-node N prs finetune ...`): RANK, WORLD_SIZE,
//!   LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
//! - Slurm (`srun prs finetune ...`): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (and
//!   SLURM_NTASKS_PER_NODE), with MASTER_ADDR and MASTER_PORT exported by the job script;
//! - ours (`prs finetune --nproc-per-node N`): the parent sets PRS_RANK and PRS_WORLD_SIZE
//!   (and MASTER_ADDR/MASTER_PORT) for each child it starts on this machine.
//!
//! torchrun's variables win over Slurm's (`srun torchrun ...` has both, legitimately
//! different); ours win over both, and must agree with any torchrun values present.

use anyhow::{bail, ensure, Context, Result};

pub const PRS_RANK: &str = "PRS_RANK";
pub const PRS_WORLD_SIZE: &str = "PRS_WORLD_SIZE";
/// A sanity limit on `--nproc-per-node` (a typo must not start thousands of processes).
const MAX_LOCAL_RANKS: usize = 256;

/// Who started this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    Single,
    Torchrun,
    Slurm,
    Prs,
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    /// Rank on this machine: the GPU it uses (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub local_world: usize,
    /// Rank 0's address and port (set whenever `world > 1`).
    pub master: Option<(String, u16)>,
    pub launcher: Launcher,
}

/// What `prs finetune` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launch {
    /// Train as this rank.
    Run(Rank),
    /// Start this many ranks of the same command on this machine (`--nproc-per-node N`).
    Spawn(usize),
}

impl Rank {
    pub fn single() -> Self {
        Self { rank: 0, world: 1, local_rank: 0, local_world: 1, master: None, launcher: Launcher::Single }
    }

    /// The `--device` this rank uses: with several ranks, `auto` and `cuda` mean
    /// `cuda:LOCAL_RANK` (the CPU when there is no GPU), and a fixed `cuda:N` is refused.
    pub fn device_flag(&self, flag: &str) -> Result<String> {
        if self.world == 1 {
            return Ok(flag.to_string());
        }
        let gpu = format!("cuda:{}", self.local_rank);
        Ok(match flag {
            "cpu" => flag.to_string(),
            "cuda" => gpu,
            "auto" if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() => gpu,
            "auto" => "cpu".into(),
            other => bail!(
                "--device {other} with {} ranks: each rank uses cuda:LOCAL_RANK; give --device cuda (or auto, or cpu)",
                self.world
            ),
        })
    }
}

/// Reads the launch from `env` (a variable lookup: `std::env::var` in the binary, a map in
/// tests) and the `--nproc-per-node` flag. Refuses inconsistent settings, naming the
/// variables that disagree.
pub fn from_env(env: &dyn Fn(&str) -> Option<String>, nproc_per_node: Option<usize>) -> Result<Launch> {
    let num = |k: &str| -> Result<Option<usize>> {
        env(k)
            .map(|v| v.trim().parse::<usize>().with_context(|| format!("{k}={v} is not a non-negative integer")))
            .transpose()
    };
    let (prs_rank, prs_world) = (num(PRS_RANK)?, num(PRS_WORLD_SIZE)?);
    let torch = [num("RANK")?, num("WORLD_SIZE")?, num("LOCAL_RANK")?, num("LOCAL_WORLD_SIZE")?];
    let slurm_world = num("SLURM_NTASKS")?;

    let rank = if prs_rank.is_some() || prs_world.is_some() {
        let (Some(rank), Some(world)) = (prs_rank, prs_world) else {
            bail!(
                "{PRS_RANK} and {PRS_WORLD_SIZE} are set together by `prs finetune --nproc-per-node`; only one is set"
            )
        };
        if let Some(n) = nproc_per_node.filter(|&n| n != world) {
            bail!("--nproc-per-node {n} but {PRS_WORLD_SIZE}={world}");
        }
        for (name, ours, theirs) in [("RANK", rank, torch[0]), ("WORLD_SIZE", world, torch[1])] {
            if let Some(t) = theirs.filter(|&t| t != ours) {
                bail!("PRS_{name}={ours} but {name}={t}: the launch variables disagree");
            }
        }
        Rank { rank, world, local_rank: rank, local_world: world, master: None, launcher: Launcher::Prs }
    } else if let Some(n) = nproc_per_node {
        let outer = torch[1].map(|w| ("WORLD_SIZE", w)).or(slurm_world.map(|w| ("SLURM_NTASKS", w)));
        if let Some((name, w)) = outer.filter(|(_, w)| *w > 1) {
            bail!(
                "--nproc-per-node {n} starts the ranks itself, but this process is already one of {w} ranks \
                 ({name}={w}): leave --nproc-per-node out under torchrun or srun"
            );
        }
        ensure!(n >= 1, "--nproc-per-node must be at least 1");
        ensure!(n <= MAX_LOCAL_RANKS, "--nproc-per-node {n}: more than {MAX_LOCAL_RANKS} ranks on one machine");
        if n > 1 {
            return Ok(Launch::Spawn(n));
        }
        Rank::single()
    } else if torch[..3].iter().any(Option::is_some) {
        let [Some(rank), Some(world), Some(local_rank), local_world] = torch else {
            let set: Vec<&str> =
                ["RANK", "WORLD_SIZE", "LOCAL_RANK"].into_iter().zip(torch).filter_map(|(k, v)| v.map(|_| k)).collect();
            bail!("torchrun sets RANK, WORLD_SIZE and LOCAL_RANK together; only {} is set", set.join(" and "));
        };
        // `srun` starting every rank with RANK exported too: both must name the same rank.
        if let (Some(sr), Some(sw)) = (num("SLURM_PROCID")?, slurm_world) {
            if sw == world && sr != rank {
                bail!("RANK={rank} but SLURM_PROCID={sr} (WORLD_SIZE = SLURM_NTASKS = {world}): the launch variables disagree");
            }
        }
        Rank {
            rank,
            world,
            local_rank,
            local_world: local_world.unwrap_or(world),
            master: None,
            launcher: Launcher::Torchrun,
        }
    } else if let Some(world) = slurm_world.filter(|&w| w > 1) {
        let (Some(rank), Some(local_rank)) = (num("SLURM_PROCID")?, num("SLURM_LOCALID")?) else {
            bail!("SLURM_NTASKS={world} but SLURM_PROCID or SLURM_LOCALID is not set: start the ranks with srun");
        };
        // SLURM_NTASKS_PER_NODE is a plain number when every node runs as many tasks.
        let local_world = num("SLURM_NTASKS_PER_NODE").ok().flatten().unwrap_or(world);
        Rank { rank, world, local_rank, local_world, master: None, launcher: Launcher::Slurm }
    } else {
        Rank::single()
    };
    check(rank, env).map(Launch::Run)
}

/// Ranges, and rank 0's address whenever there are several ranks.
fn check(mut r: Rank, env: &dyn Fn(&str) -> Option<String>) -> Result<Rank> {
    let (names, how) = match r.launcher {
        Launcher::Single => return Ok(r),
        Launcher::Torchrun => (["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"], "torchrun"),
        Launcher::Slurm => (["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"], "srun"),
        Launcher::Prs => ([PRS_RANK, PRS_WORLD_SIZE, PRS_RANK, PRS_WORLD_SIZE], "prs --nproc-per-node"),
    };
    ensure!(r.world >= 1, "{}=0: a job has at least one rank", names[1]);
    ensure!(r.rank < r.world, "{}={} is not below {}={}", names[0], r.rank, names[1], r.world);
    ensure!(r.local_world <= r.world, "{}={} is above {}={}", names[3], r.local_world, names[1], r.world);
    ensure!(r.local_rank < r.local_world, "{}={} is not below {}={}", names[2], r.local_rank, names[3], r.local_world);
    if r.world == 1 {
        return Ok(r);
    }
    let addr = env("MASTER_ADDR").filter(|a| !a.trim().is_empty());
    let port = env("MASTER_PORT");
    let (Some(addr), Some(port)) = (addr, port) else {
        bail!(
            "{}={} {}={} ({how}) but MASTER_ADDR and MASTER_PORT are not both set: every rank needs rank 0's \
             address{}",
            names[0],
            r.rank,
            names[1],
            r.world,
            if r.launcher == Launcher::Slurm {
                " (export them in the job script, e.g. MASTER_ADDR=$(scontrol show hostnames | head -n1))"
            } else {
                ""
            }
        );
    };
    let port = port
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0 && p < u16::MAX)
        .with_context(|| format!("MASTER_PORT={port} is not a port number (1..65534)"))?;
    r.master = Some((addr.trim().to_string(), port));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)], nproc: Option<usize>) -> Result<Launch> {
        let map: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_env(&|k| map.get(k).cloned(), nproc)
    }

    fn run(vars: &[(&str, &str)], nproc: Option<usize>) -> Rank {
        match launch(vars, nproc).unwrap() {
            Launch::Run(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn err(vars: &[(&str, &str)], nproc: Option<usize>) -> String {
        format!("{:#}", launch(vars, nproc).unwrap_err())
    }

    const MASTER: [(&str, &str); 2] = [("MASTER_ADDR", "node1"), ("MASTER_PORT", "29500")];

    #[test]
    fn torchrun() {
        let r = run(
            &[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4"), MASTER[0], MASTER[1]],
            None,
        );
        assert_eq!((r.rank, r.world, r.local_rank, r.local_world), (5, 8, 1, 4));
        assert_eq!((r.master.clone(), r.launcher), (Some(("node1".into(), 29500)), Launcher::Torchrun));
        assert_eq!(r.device_flag("auto").unwrap().as_str(), if cfg!(feature = "cuda") { "cuda:1" } else { "cpu" });
        assert_eq!(r.device_flag("cuda").unwrap(), "cuda:1");
        assert!(r.device_flag("cuda:3").unwrap_err().to_string().contains("cuda:LOCAL_RANK"));
        // A world of one needs no address.
        assert_eq!(run(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")], None).world, 1);
    }

    #[test]
    fn slurm() {
        let v = [
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "2"),
            MASTER[0],
            MASTER[1],
        ];
        let r = run(&v, None);
        assert_eq!((r.rank, r.world, r.local_rank, r.local_world, r.launcher), (3, 4, 1, 2, Launcher::Slurm));
        // An sbatch shell of one task is a plain run; srun torchrun is torchrun's.
        assert_eq!(run(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")], None), Rank::single());
        let r = run(
            &[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("RANK", "6"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "2")]
                .into_iter()
                .chain(MASTER)
                .collect::<Vec<_>>(),
            None,
        );
        assert_eq!((r.rank, r.launcher), (6, Launcher::Torchrun));
        assert!(err(&v[..4], None).contains("MASTER_ADDR and MASTER_PORT") && err(&v[..4], None).contains("scontrol"));
    }

    #[test]
    fn ours() {
        assert_eq!(launch(&[], Some(4)).unwrap(), Launch::Spawn(4));
        assert!(err(&[], Some(100_000)).contains("more than 256 ranks"));
        assert_eq!(run(&[], Some(1)), Rank::single());
        assert_eq!(run(&[], None), Rank::single());
        let child = [(PRS_RANK, "1"), (PRS_WORLD_SIZE, "4"), MASTER[0], MASTER[1]];
        let r = run(&child, Some(4));
        assert_eq!((r.rank, r.world, r.local_rank, r.launcher), (1, 4, 1, Launcher::Prs));
    }

    #[test]
    fn conflicts_are_refused_naming_the_variables() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<usize>, &'a [&'a str]);
        let cases: &[Case] = &[
            (&[("RANK", "1"), ("WORLD_SIZE", "2")], None, &["RANK and WORLD_SIZE", "LOCAL_RANK"]),
            (&[("LOCAL_RANK", "0")], None, &["only LOCAL_RANK"]),
            (
                &[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), MASTER[0], MASTER[1]],
                None,
                &["RANK=2", "WORLD_SIZE=2"],
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "3"),
                    ("LOCAL_WORLD_SIZE", "2"),
                    MASTER[0],
                    MASTER[1],
                ],
                None,
                &["LOCAL_RANK=3", "LOCAL_WORLD_SIZE=2"],
            ),
            (&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")], None, &["MASTER_ADDR", "torchrun"]),
            (
                &[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), MASTER[0], ("MASTER_PORT", "http")],
                None,
                &["MASTER_PORT=http"],
            ),
            (&[("RANK", "x")], None, &["RANK=x"]),
            (
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "4"),
                    ("LOCAL_RANK", "0"),
                    ("SLURM_PROCID", "2"),
                    ("SLURM_NTASKS", "4"),
                    MASTER[0],
                    MASTER[1],
                ],
                None,
                &["RANK=0", "SLURM_PROCID=2"],
            ),
            (&[("SLURM_NTASKS", "4"), MASTER[0], MASTER[1]], None, &["SLURM_PROCID", "srun"]),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")],
                Some(2),
                &["--nproc-per-node 2", "WORLD_SIZE=4"],
            ),
            (&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")], Some(2), &["SLURM_NTASKS=2"]),
            (
                &[(PRS_RANK, "1"), (PRS_WORLD_SIZE, "2"), ("RANK", "0"), MASTER[0], MASTER[1]],
                Some(2),
                &["PRS_RANK=1", "RANK=0"],
            ),
            (
                &[(PRS_RANK, "1"), (PRS_WORLD_SIZE, "2"), MASTER[0], MASTER[1]],
                Some(3),
                &["--nproc-per-node 3", "PRS_WORLD_SIZE=2"],
            ),
            (&[(PRS_RANK, "1")], Some(2), &["only one is set"]),
        ];
        for (vars, nproc, want) in cases {
            let e = err(vars, *nproc);
            for w in *want {
                assert!(e.contains(w), "{vars:?}: `{e}` does not name {w}");
            }
        }
    }
}
