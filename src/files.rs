//! Writing to the user's disk without ever losing what is there: atomic file writes, atomic
//! folder replacement, ownership markers on the output folders prs creates, and an exclusive
//! lock per run folder.
//!
//! The rule every command follows: an output folder is written only when it is new, empty, or
//! recognisably prs's own (it holds the [`OWNER_MARKER`] file); anything else is refused with a
//! message naming what is there, because a wrong `--out` must never delete a user's documents.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::exit::InputError;

/// Marker file in every output folder prs creates; its content names what the folder holds.
pub const OWNER_MARKER: &str = ".prs-output";

/// The folder a path lives in ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes `path` through a temporary file in the same folder, synced and renamed into place:
/// readers see the old file or the new one, never a half-written one, and a failed write
/// leaves no temporary file behind.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    let dir = parent_dir(path);
    let file_name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {} to write {}", dir.display(), path.display()))?;
    write(tmp.as_file_mut()).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // tempfile creates 0600; outputs are ordinary files.
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming the temporary file onto {}", path.display()))?;
    sync_dir(dir);
    Ok(())
}

/// `write_atomic` of a byte string.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| Ok(f.write_all(bytes)?))
}

/// Writes an image as PNG atomically.
pub fn write_png_atomic<P, C>(img: &image::ImageBuffer<P, C>, path: &Path) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    write_atomic(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        img.write_to(&mut w, image::ImageFormat::Png).with_context(|| format!("encoding {}", path.display()))?;
        w.flush()?;
        Ok(())
    })
}

/// Makes renames in `dir` durable (best effort: not every filesystem syncs folders).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A fresh temporary sibling folder for building `dir` (`.NAME.tmp-PID`), removed first if a
/// crashed process with the same pid left one.
pub fn temp_sibling_dir(dir: &Path) -> Result<PathBuf> {
    let parent = parent_dir(dir);
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir.file_name().with_context(|| format!("bad folder path {}", dir.display()))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

/// Builds a folder completely under a temporary name, then moves it to `dir` (replacing an
/// earlier `dir`, which the caller has checked is prs's own). On error nothing is left behind.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling_dir(dir)?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing {}", dir.display())));
    }
    replace_dir(&tmp, dir)
}

/// Moves the finished folder `tmp` to `dir`. An existing `dir` is first renamed aside
/// (`.NAME.old-PID`) and removed only afterwards, so a crash between the two renames leaves
/// both copies on disk ([`remove_stale_temporaries`] tidies them at the next start).
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        let name = dir.file_name().with_context(|| format!("bad folder path {}", dir.display()))?;
        let old = parent_dir(dir).join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        std::fs::rename(dir, &old).with_context(|| format!("moving the old {} aside", dir.display()))?;
        std::fs::rename(tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    }
    sync_dir(parent_dir(dir));
    Ok(())
}

/// Removes what interrupted writers leave in `dir`: `.NAME.tmp-PID` folders and files,
/// `.NAME.old-PID` folders, and `.NAME.*.tmp` files of [`write_atomic`]. Only call it on a
/// folder no other process writes to (hold its [`DirLock`], or own it otherwise).
pub fn remove_stale_temporaries(dir: &Path) -> Result<usize> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') || !(name.contains(".tmp-") || name.contains(".old-") || name.ends_with(".tmp")) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        r.with_context(|| format!("removing the stale temporary {}", p.display()))?;
        removed += 1;
    }
    Ok(removed)
}

/// What is at an output path.
#[derive(Debug, PartialEq)]
pub enum Existing {
    Absent,
    Empty,
    /// A folder prs wrote (its marker names `kind`, or it holds only the files of `kind`).
    Ours,
    /// Anything else; a few of the entries found, for the message.
    Foreign(Vec<String>),
}

/// Looks at `dir` before writing: `known` lists every entry a folder of this kind may hold;
/// `None` means the kind is recognised by its marker alone (a folder of folders).
pub fn inspect_output(dir: &Path, kind: &str, known: Option<&[&str]>) -> Result<Existing> {
    if !dir.exists() && !dir.is_symlink() {
        return Ok(Existing::Absent);
    }
    if !dir.is_dir() {
        return Ok(Existing::Foreign(vec![format!("{} is a file, not a folder", dir.display())]));
    }
    let mut entries: BTreeSet<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    // A lock file alone is what a command that stopped before writing anything leaves.
    entries.remove(DirLock::FILE);
    if entries.is_empty() {
        return Ok(Existing::Empty);
    }
    let marked = std::fs::read_to_string(dir.join(OWNER_MARKER)).is_ok_and(|k| k.trim() == kind);
    let Some(known) = known else {
        return Ok(if marked { Existing::Ours } else { Existing::Foreign(entries.into_iter().take(5).collect()) });
    };
    let strangers: Vec<String> =
        entries.iter().filter(|e| *e != OWNER_MARKER && !known.contains(&e.as_str())).take(5).cloned().collect();
    // Folders written before markers existed are recognised by their files alone.
    if strangers.is_empty() && (marked || entries.len() > usize::from(entries.contains(OWNER_MARKER))) {
        Ok(Existing::Ours)
    } else if strangers.is_empty() {
        Ok(Existing::Empty)
    } else {
        Ok(Existing::Foreign(strangers))
    }
}

/// Writes the ownership marker into a folder prs is filling.
pub fn mark_output(dir: &Path, kind: &str) -> Result<()> {
    write_bytes_atomic(&dir.join(OWNER_MARKER), format!("{kind}\n").as_bytes())
}

/// Creates (or reuses) a folder of folders that prs owns, e.g. predict's `--out` in batch mode.
/// `flag` names the option in the refusal.
pub fn claim_output_root(dir: &Path, kind: &str, flag: &str) -> Result<()> {
    match inspect_output(dir, kind, None)? {
        Existing::Absent | Existing::Empty => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            mark_output(dir, kind)
        }
        Existing::Ours => Ok(()),
        Existing::Foreign(found) => bail!(InputError(format!(
            "{flag} {} already exists and was not written by prs (it holds {}); give a new or empty folder \
             so that nothing of yours is overwritten",
            dir.display(),
            found.join(", ")
        ))),
    }
}

/// An exclusive lock on a folder (`.prs-lock`, `flock`), held while the value lives. The
/// kernel releases it when the process ends, however it ends, so a crash leaves no stale lock.
pub struct DirLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl DirLock {
    pub const FILE: &'static str = ".prs-lock";

    /// Takes the lock, or fails at once naming the process that holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(Self::FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        if !try_lock_exclusive(&file)? {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            bail!(
                "{what} {} is in use by another prs process{}; wait for it to finish or stop it \
                 (two processes writing one run would corrupt its checkpoints)",
                dir.display(),
                if holder.is_empty() { String::new() } else { format!(" ({holder})") }
            );
        }
        file.set_len(0)?;
        let cmd: Vec<String> = std::env::args().collect();
        write!(file, "pid {}: {}", std::process::id(), cmd.join(" "))?;
        file.flush()?;
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(unix)]
fn try_lock_exclusive(file: &std::fs::File) -> Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor this function borrows; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err).context("locking the run folder")
    }
}

#[cfg(not(unix))]
fn try_lock_exclusive(_file: &std::fs::File) -> Result<bool> {
    Ok(true)
}

/// Test hook for crash safety: when the environment variable `PRS_CRASH_AT` is `point` (or
/// `point@N`: the Nth time the process passes it), the process kills itself there (SIGKILL: no
/// destructor, no flush), as a power cut or the OOM killer would. Tests put a kill between any
/// two filesystem operations of saving a checkpoint.
pub fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<(String, usize)>> = std::sync::OnceLock::new();
    static HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let at = AT.get_or_init(|| {
        let v = std::env::var("PRS_CRASH_AT").ok()?;
        Some(match v.split_once('@') {
            Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
            None => (v, 1),
        })
    });
    let Some((name, nth)) = at else { return };
    if name == point && HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == *nth {
        #[cfg(unix)]
        // SAFETY: raising a signal on our own process.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
        std::process::abort();
    }
}
