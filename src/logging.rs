//! Status lines (`tracing`) on stderr, so stdout holds only a command's results and `-q` leaves
//! results and errors. Only `main` installs the subscriber: library callers (tests) see nothing.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The level `-v`/`-q` select: info by default, debug with -v, trace with -vv; errors only
/// with -q.
pub fn level(verbose: u8, quiet: bool) -> Level {
    match (quiet, verbose) {
        (true, _) => Level::ERROR,
        (false, 0) => Level::INFO,
        (false, 1) => Level::DEBUG,
        _ => Level::TRACE,
    }
}

/// Installs the stderr subscriber (once, from `main`).
pub fn init(verbose: u8, quiet: bool) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(level(verbose, quiet))
        .with_writer(std::io::stderr)
        .event_format(Compact)
        .try_init();
}

/// Whether progress bars should draw: they are info-level output (off with -q, and off where no
/// subscriber is installed, as in tests).
pub fn progress_enabled() -> bool {
    tracing::enabled!(Level::INFO)
}

/// Info lines are the bare message; other levels say theirs (`warning: ...`, `debug: ...`),
/// as compilers do.
struct Compact;

impl<S, N> FormatEvent<S, N> for Compact
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        match *event.metadata().level() {
            Level::INFO => {}
            Level::WARN => write!(w, "warning: ")?,
            Level::ERROR => write!(w, "error: ")?,
            Level::DEBUG => write!(w, "debug: ")?,
            Level::TRACE => write!(w, "trace: ")?,
        }
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_flags_pick_the_level() {
        assert_eq!(level(0, false), Level::INFO);
        assert_eq!(level(1, false), Level::DEBUG);
        assert_eq!(level(3, false), Level::TRACE);
        assert_eq!(level(0, true), Level::ERROR);
        // Without a subscriber (library use, tests) nothing is enabled, so no bar draws.
        assert!(!progress_enabled());
    }
}
