//! The `promptgate` binary: parse the command line, set up logging, run one subcommand.

use std::io::IsTerminal;

use clap::Parser;
use promptgate::app::{self, ExitCode};
use promptgate::config::{Cli, Commands, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!(
            "promptgate: bad --log filter {:?}: {e}; using \"info\"",
            cli.log
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let result = match &cli.command {
        Commands::Classify(args) => app::classify(args),
        Commands::Serve(args) => app::serve(args),
        Commands::Eval(args) => app::eval(args),
        Commands::Train(args) => app::train(args),
        Commands::Bench(args) => promptgate::bench::run(args).map(|_| ExitCode::Ok),
    };
    let code = result.unwrap_or_else(|e| {
        tracing::error!("{e:#}");
        ExitCode::Error
    });
    std::process::ExitCode::from(code as u8)
}
