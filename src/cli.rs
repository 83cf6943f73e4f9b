//! The `berth` command line: `serve`, `check-config`. The binary's `main` only calls [`main`].

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

/// Exit status for a configuration error (EX_USAGE... sysexits' EX_USAGE is 64).
pub const EXIT_CONFIG: i32 = 64;

/// berth: a pull-through caching proxy for OCI / Docker registries.
#[derive(Parser, Debug)]
#[command(name = "berth", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Options shared by every command that reads the config.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// Config file (TOML).
    #[arg(long, short, env = "BERTH_CONFIG", default_value = "berth.toml")]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set cache.disk_bytes=10GiB` (repeatable; upstreams by
    /// index: `--set upstream.0.url=https://...`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the cache.
    Serve {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
        /// Log format.
        #[arg(long, value_enum, default_value = "text", env = "BERTH_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Validate the config and exit (0 when valid, 64 with every problem listed when not).
    CheckConfig {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn load(args: &ConfigArgs) -> Result<Config, i32> {
    Config::load(&args.config, &args.sets).map_err(|e| {
        eprintln!(
            "berth: invalid configuration {}:\n{e}",
            args.config.display()
        );
        EXIT_CONFIG
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
}

/// Runs the command line; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} upstream{}, listen {}, cache {})",
                    config.config.display(),
                    c.upstreams.len(),
                    if c.upstreams.len() == 1 { "" } else { "s" },
                    c.server.listen,
                    c.cache.dir.display()
                );
                0
            }
            Err(code) => code,
        },
        Command::Serve { config, log_format } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(serve(cfg))
        }
    }
}

async fn serve(cfg: Config) -> i32 {
    let running = match crate::server::start(cfg, prometheus::Registry::new()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("berth: {e}");
            return 1;
        }
    };
    let stop = running.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    running.wait().await;
    0
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
