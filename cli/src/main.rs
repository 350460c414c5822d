//! `swbd`: the Switchboard command — relay, daemon, client commands and the demo.
//!
//! Thin by design: every command parses flags, calls into `swb-relay` or
//! `swb-daemon`, and formats the result. Usage errors exit 2 (clap), runtime
//! errors exit 1 with one line on stderr that says what to do.

/// mimalloc instead of the system allocator: the relay and the daemon
/// allocate and free many small buffers per message (measured with
/// `swbd-bench rate` and `idle`; see the README's performance section).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that returns: a reader that went away (`swbd peers | head -1`)
/// ends the command quietly through [`StdoutClosed`] instead of the panic
/// `println!` gives on a closed pipe. Use it where `?` returns `anyhow`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::stdout_line(format_args!($($arg)*))?
    };
}

mod client;
mod demo;
mod docs;
mod keys;
mod relay;
mod service;
mod status;
mod up;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Switchboard: reach machines without public addresses through a relay mesh.
#[derive(Debug, Parser)]
#[command(name = "swbd", version, propagate_version = true, max_term_width = 100)]
pub(crate) struct Cli {
    /// Control socket of the local daemon (`swbd up` creates it; the other
    /// commands talk to it).
    #[arg(long, global = true, env = "SWB_CONTROL", value_name = "PATH")]
    control: Option<PathBuf>,
    /// Print data as JSON (one object per line) instead of human text.
    #[arg(long, global = true)]
    json: bool,
    /// More log output (repeat for more); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log lines as human text or as JSON objects (one per line, for log
    /// collectors). Logs go to stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SWB_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a dev relay and two peers in this process, exchange messages, and
    /// print what happened and how to do it with separate processes.
    Demo(demo::DemoArgs),
    /// Run a relay.
    Relay(Box<relay::RelayArgs>),
    /// Run the daemon: keep a connection to the relay and serve the control socket.
    Up(Box<up::UpArgs>),
    /// Send a message to a peer of your namespace (exit 0 once the relay accepted it).
    Send(client::SendArgs),
    /// Receive messages: prints `FROM<TAB>BODY` per message and acknowledges them.
    Recv(client::RecvArgs),
    /// Show the daemon's connection: relay, name, namespace, since when, round trip.
    Status,
    /// Round trips to a peer through the relays, answered by its daemon
    /// (each line shows the time and the relays on the way).
    Ping(client::PingArgs),
    /// Merge KEY=VALUE pairs into this peer's status (--clear KEY removes).
    SetStatus(status::SetStatusArgs),
    /// Show peers' current status and presence.
    GetStatus(status::NamesArgs),
    /// Show peers' status, then every change, until interrupted.
    Watch(status::NamesArgs),
    /// Every known peer of the namespace: online/offline, since, status.
    Peers(status::PeersArgs),
    /// Open a byte stream to a port a peer exposes and connect it to
    /// stdin/stdout (for ssh: -o ProxyCommand="swbd connect %h %p").
    Connect(client::ConnectArgs),
    /// Manage API keys in a relay's keys file.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Print shell completions (bash, zsh, fish) to stdout.
    Completions(docs::CompletionsArgs),
    /// Write man pages for swbd and each command into a directory.
    #[command(hide = true)]
    Man(docs::ManArgs),
}

/// A duration flag: plain seconds (`10`, `0.5`) or humantime (`500ms`, `2m`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if (0.0..=86_400.0 * 365.0).contains(&secs) {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s:?} is not a duration between 0 and one year"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (like 10, 1.5, 500ms, 2m): {e}"))
}

/// Shared flags of the commands that talk to the daemon.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    /// Control socket.
    pub(crate) control: PathBuf,
    /// Whether `control` came from `--control` / `SWB_CONTROL` (not the default).
    pub(crate) control_given: bool,
    /// JSON output.
    pub(crate) json: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event (`timestamp`, `level`, `fields`, `spans`).
    Json,
}

fn init_logs(default: &str, verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => default.to_string(),
        1 => "info,swb_relay=debug,swb_daemon=debug".into(),
        _ => "debug".into(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_default = match cli.command {
        Command::Relay(_) | Command::Up(_) => "info",
        _ => "warn",
    };
    init_logs(log_default, cli.verbose, cli.log_format);
    let control_given = cli.control.is_some();
    let out = Output {
        control_given,
        control: cli
            .control
            .clone()
            .unwrap_or_else(swb_daemon::default_control_path),
        json: cli.json,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("swbd: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Demo(a) => demo::run(a, &out).await,
            Command::Relay(a) => relay::run(*a).await,
            Command::Up(a) => up::run(*a, &out).await,
            Command::Send(a) => client::send(a, &out).await,
            Command::Recv(a) => client::recv(a, &out).await,
            Command::Status => client::status(&out).await,
            Command::Ping(a) => client::ping(a, &out).await,
            Command::Connect(a) => client::connect(a, &out).await,
            Command::SetStatus(a) => status::set_status(a, &out).await,
            Command::GetStatus(a) => status::get_status(a, &out).await,
            Command::Watch(a) => status::watch(a, &out).await,
            Command::Peers(a) => status::peers(a, &out).await,
            Command::Keys(k) => keys::run(k, &out),
            Command::Completions(a) => docs::completions(a),
            Command::Man(a) => docs::man(a),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swbd: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Standard output was closed by its reader (`EPIPE`): the command ends
/// quietly with exit 0, as `ripgrep` does — what was wanted was read.
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed by its reader")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes one line to stdout (see [`outln!`]).
pub(crate) fn stdout_line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut w = std::io::stdout().lock();
    w.write_fmt(args)
        .and_then(|()| w.write_all(b"\n"))
        .map_err(stdout_error)
}

/// A failed write to stdout: [`StdoutClosed`] when the reader went away,
/// otherwise the error itself.
pub(crate) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// One line: the outermost context, then its causes — each once, though an
/// error that names its source in its own text also reports it as a cause.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.ends_with(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_accept_seconds_and_humantime() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let bind = swb_relay::RelayError::Bind {
            addr: "127.0.0.1:9".parse().expect("addr"),
            source: io(),
        };
        let e = anyhow::Error::new(bind).context("starting the relay");
        let line = one_line(&e);
        assert_eq!(line.matches(&io().to_string()).count(), 1, "{line}");
        assert!(line.starts_with("starting the relay: cannot listen on 127.0.0.1:9: "));
        let e = anyhow::Error::new(io()).context("reading keys");
        assert_eq!(one_line(&e), format!("reading keys: {}", io()));
    }
}
