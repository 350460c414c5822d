//! `swbd completions SHELL` and `swbd man DIR`: shell completions and man
//! pages generated from the same clap definitions as the parser, so they
//! never drift from the flags.

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};
use std::path::PathBuf;

/// A shell to generate completions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Shell {
    /// bash (`/usr/share/bash-completion/completions/swbd`).
    Bash,
    /// zsh (`/usr/share/zsh/vendor-completions/_swbd`).
    Zsh,
    /// fish (`/usr/share/fish/vendor_completions.d/swbd.fish`).
    Fish,
}

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Directory to write `swbd.1` and one page per command (`swbd-relay.1`, …) into.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// Writes completions for `a.shell` to stdout.
pub(crate) fn completions(a: CompletionsArgs) -> Result<()> {
    let mut cmd = crate::Cli::command();
    let shell = match a.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "swbd", &mut buf);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &buf).map_err(crate::stdout_error)
}

/// Writes the man pages into `a.dir` (created if missing) and lists them.
pub(crate) fn man(a: ManArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let cmd = crate::Cli::command();
    let written = write_pages(&cmd, &a.dir)?;
    for p in written {
        outln!("{}", p.display());
    }
    Ok(())
}

/// One page for `cmd` and one for each visible subcommand, recursively
/// (`swbd-keys-create.1`).
fn write_pages(cmd: &clap::Command, dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    write_pages_as(cmd, cmd.get_name().to_string(), dir)
}

fn write_pages_as(
    cmd: &clap::Command,
    words: String,
    dir: &std::path::Path,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let page = words.replace(' ', "-");
    let cmd = cmd
        .clone()
        .name(page.clone())
        .bin_name(words.clone())
        .disable_help_subcommand(true);
    let path = dir.join(format!("{page}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .context("cannot render a man page")?;
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    out.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out.extend(write_pages_as(
            sub,
            format!("{words} {}", sub.get_name()),
            dir,
        )?);
    }
    Ok(out)
}
