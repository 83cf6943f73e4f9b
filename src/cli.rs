//! The `berth` command line: `serve`, `check-config`, `node-config` and the cache tools. The
//! binary's `main` only calls [`main`].
//!
//! Architecture: docs/ARCHITECTURE.md, "Commands".

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
        /// Never contact any origin: serve only what is cached (air-gapped sites).
        #[arg(long)]
        offline: bool,
    },
    /// Validate the config and exit (0 when valid, 64 with every problem listed when not).
    CheckConfig {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write cached images (or, with none named, every pinned image) to an OCI image layout
    /// archive, to carry into an air-gapped site.
    Export {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
        /// The archive to write.
        #[arg(long)]
        out: PathBuf,
        /// Images to export (as given to `warm`).
        images: Vec<String>,
    },
    /// Load an archive written by `berth export` into the cache, verifying every digest; a
    /// corrupt or truncated archive is refused and changes nothing.
    Import {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
        /// The archive.
        bundle: PathBuf,
        /// Pin the imported images.
        #[arg(long)]
        pin: bool,
    },
    /// Drop from the cache directory of a stopped berth: an image (`host/repo:tag` drops the
    /// tag mapping and the image; `host/repo@sha256:…` or a manifest digest the image), a tag
    /// mapping alone (`--tag-only`), or a blob (its digest). The next pull fetches it again. For
    /// a running berth: `POST /purge?target=…` on its admin listener.
    Purge {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
        /// Images, tags or digests.
        #[arg(required = true)]
        targets: Vec<String>,
        /// Drop only the tag mapping, keep the image.
        #[arg(long)]
        tag_only: bool,
        /// Also drop pinned content (its pins are released).
        #[arg(long)]
        force: bool,
    },
    /// Scrub the cache directory of a stopped berth: re-hash stored objects (all, or a random
    /// sample) at a bounded rate, remove those that do not match their digest or recorded size,
    /// and report. Exit status 0 when all matched, 1 when corrupt objects were removed (they
    /// are fetched again on the next request). For a running berth: `POST /verify` on its
    /// admin listener.
    Verify {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
        /// Check this many objects chosen at random instead of all.
        #[arg(long)]
        sample: Option<usize>,
        /// Read at most this much per second, e.g. `100MiB` (unbounded when absent).
        #[arg(long, value_parser = crate::config::units::parse_size)]
        rate: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Release images pinned by `warm --pin` or `import --pin` (as they were named there):
    /// they become ordinary cache entries, evicted first when space is needed.
    Unpin {
        /// Config options.
        #[command(flatten)]
        config: ConfigArgs,
        /// Image references, as recorded (see pins.json in the cache directory).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Point this node's container runtimes at berth: containerd `certs.d/<registry>/hosts.toml`
    /// for every upstream host, and a CRI-O / podman `registries.conf.d` drop-in. Rewrites only
    /// files it wrote itself (they start with a marker line); safe to run again.
    NodeConfig(NodeConfigArgs),
    /// Fill the cache ahead of time from a list of images (tags or digests).
    Warm(WarmArgs),
}

/// `berth node-config`'s arguments.
#[derive(Debug, clap::Args)]
pub struct NodeConfigArgs {
    /// Config options (the upstreams to mirror).
    #[command(flatten)]
    pub config: ConfigArgs,
    /// berth as this node reaches it, e.g. `http://127.0.0.1:5000` (node topology) or
    /// `https://berth.example:5000`.
    #[arg(long, value_name = "URL")]
    pub mirror: String,
    /// Never go around berth: runtimes get no origin to fall back to.
    #[arg(long)]
    pub no_fallback: bool,
    /// containerd's `config_path` directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    pub containerd_dir: PathBuf,
    /// The CRI-O / podman drop-in directory.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/etc/containers/registries.conf.d"
    )]
    pub registries_dir: PathBuf,
    /// Write no containerd files.
    #[arg(long)]
    pub no_containerd: bool,
    /// Write no registries.conf.d drop-in.
    #[arg(long)]
    pub no_registries_conf: bool,
    /// CA certificate (path on the node) containerd trusts for an https mirror.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from an https mirror.
    #[arg(long)]
    pub skip_verify: bool,
    /// Print what would change (and the new file contents), change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove every file this command wrote, instead of writing.
    #[arg(long)]
    pub remove: bool,
    /// Also create the config's `cache.dir` and give it to this `UID:GID` (a hostPath the
    /// kubelet created belongs to root; the image runs as 65532:65532).
    #[arg(long, value_name = "UID:GID")]
    pub cache_owner: Option<String>,
}

/// `berth warm`'s arguments.
#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    /// Config options.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Images, e.g. `docker.io/library/nginx:1.27` or `ghcr.io/org/app@sha256:...`; a
    /// reference without a registry host goes to the default upstream.
    pub images: Vec<String>,
    /// File with one image per line (`#` comments allowed).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Platforms to keep from multi-platform images, e.g. `linux/amd64,linux/arm64`
    /// (default: all).
    #[arg(long, value_delimiter = ',')]
    pub platform: Vec<String>,
    /// Also fetch referrers (signatures, SBOMs) of every manifest.
    #[arg(long)]
    pub with_referrers: bool,
    /// Blob downloads at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Pin the images: never evicted by the disk budget (refused if they would not fit).
    #[arg(long)]
    pub pin: bool,
    /// Pull through a running berth at this URL instead of opening the cache directory
    /// (which a running berth holds).
    #[arg(long, value_name = "URL")]
    pub via: Option<String>,
    /// `user:password` for upstreams that need client credentials.
    #[arg(long, env = "BERTH_WARM_CREDENTIALS", hide_env_values = true)]
    pub creds: Option<String>,
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

/// Logging for `serve`: request handlers hand lines to a writer thread that writes them in
/// batches ([`crate::logwriter`]) instead of writing to stderr themselves (a line per request
/// would otherwise cost a write system call on the hot path). The returned guard writes what is
/// buffered when dropped at exit.
fn init_logging(format: LogFormat) -> crate::logwriter::LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = crate::logwriter::spawn(std::io::stderr());
    let ansi = stderr_is_terminal();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer.clone());
    let installed = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
    // Request lines skip the generic formatter (the same line, a fraction of the cost), except
    // in colour on a terminal, where the formatter's colours are the point.
    if installed.is_ok() && !ansi {
        let format = match format {
            LogFormat::Text => crate::proxy::reqlog::LineFormat::Text,
            LogFormat::Json => crate::proxy::reqlog::LineFormat::Json,
        };
        crate::proxy::reqlog::install(writer, format);
    }
    guard
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
        Command::Serve {
            config,
            log_format,
            offline,
        } => {
            let mut cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if offline {
                if let Err(e) = cfg.set_offline() {
                    eprintln!("berth: --offline: {e}");
                    return EXIT_CONFIG;
                }
            }
            let _log = init_logging(log_format);
            runtime_with(cfg.server.worker_threads).block_on(serve(cfg))
        }
        Command::Export {
            config,
            out,
            images,
        } => with_cache(&config, "export", |cache, upstreams| async move {
            let r = tokio::task::block_in_place(|| {
                crate::bundle::export(&cache, &upstreams, &images, &out)
            })?;
            Ok(format!(
                "exported {} image(s) to {}: {} manifest(s), {} blob(s), {} bytes",
                r.images,
                out.display(),
                r.manifests,
                r.blobs,
                r.bytes
            ))
        }),
        Command::Import {
            config,
            bundle,
            pin,
        } => with_cache(&config, "import", |cache, upstreams| async move {
            let result = crate::bundle::import(&cache, &upstreams, &bundle, pin).await;
            let _ = cache.save_recency();
            let r = result?;
            Ok(format!(
                "imported {} image(s) from {}: {} manifest(s), {} blob(s), {} bytes{}",
                r.images,
                bundle.display(),
                r.manifests,
                r.blobs,
                r.bytes,
                if pin { ", pinned" } else { "" }
            ))
        }),
        Command::Purge {
            config,
            targets,
            tag_only,
            force,
        } => purge(&config, &targets, tag_only, force),
        Command::Verify {
            config,
            sample,
            rate,
            json,
        } => verify(&config, sample, rate, json),
        Command::Unpin { config, images } => unpin(&config, &images),
        Command::NodeConfig(args) => node_config_command(args),
        Command::Warm(args) => warm_command(args),
    }
}

/// `berth purge`: drops tags, images or blobs from a stopped berth's cache.
fn purge(config: &ConfigArgs, targets: &[String], tag_only: bool, force: bool) -> i32 {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging_quiet();
    let (cache, upstreams) = match open_offline(&cfg) {
        Ok(x) => x,
        Err(e) => {
            eprintln!(
                "berth: purge: {e} (a running berth purges with `POST /purge` on its \
                 admin listener)"
            );
            return 1;
        }
    };
    let mut failed = 0;
    for target in targets {
        match crate::proxy::purge::purge(&cache, &upstreams, target, tag_only, force) {
            Ok(r) => println!(
                "purged {target}: {} tag mapping(s), {} manifest(s), {} blob(s), {} bytes{}",
                r.tags,
                r.manifests,
                r.blobs,
                r.bytes,
                if r.unpinned.is_empty() {
                    String::new()
                } else {
                    format!("; unpinned {}", r.unpinned.join(", "))
                }
            ),
            Err(e) => {
                eprintln!("berth: purge: {e}");
                failed += 1;
            }
        }
    }
    i32::from(failed > 0)
}

/// `berth verify`: scrubs a stopped berth's disk tier and prints (or emits as JSON) the report.
fn verify(config: &ConfigArgs, sample: Option<usize>, rate: Option<u64>, json: bool) -> i32 {
    let cache = match open_stopped_cache(
        config,
        "verify",
        " (a running berth scrubs its cache with `POST /verify` on its admin listener)",
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let report = match cache.scrub(&crate::cache::ScrubOptions { sample, rate }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: verify: {e}");
            return 1;
        }
    };
    let _ = cache.save_recency();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        for f in &report.corrupt {
            println!(
                "removed {} {}: {}{}",
                f.kind,
                f.digest,
                f.reason,
                if f.pinned {
                    " (pinned: warm or import its image again)"
                } else {
                    ""
                }
            );
        }
        println!(
            "verified {} object(s), {} bytes in {:.1} s: {} corrupt (removed), {} missing",
            report.checked,
            report.bytes,
            report.seconds,
            report.corrupt.len(),
            report.missing
        );
    }
    i32::from(!report.corrupt.is_empty())
}

/// `berth unpin`: lets the disk budget evict images again.
fn unpin(config: &ConfigArgs, images: &[String]) -> i32 {
    let cache = match open_stopped_cache(config, "unpin", "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut missing = 0;
    for image in images {
        if cache.unpin_image(image) == 0 {
            eprintln!("berth: unpin: {image} is not pinned");
            missing += 1;
        } else {
            println!("unpinned {image}");
        }
    }
    let _ = cache.save_recency();
    i32::from(missing > 0)
}

/// `berth node-config`: checks the arguments, prepares the cache directory if asked, then
/// writes (or removes, or prints) the node's mirror files.
fn node_config_command(args: NodeConfigArgs) -> i32 {
    let NodeConfigArgs {
        config,
        mirror,
        no_fallback,
        containerd_dir,
        registries_dir,
        no_containerd,
        no_registries_conf,
        ca_file,
        skip_verify,
        dry_run,
        remove,
        cache_owner,
    } = args;
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let cache_owner = match cache_owner.as_deref().map(crate::nodeconf::parse_owner) {
        Some(None) => {
            eprintln!("berth: node-config: --cache-owner takes UID:GID");
            return EXIT_CONFIG;
        }
        Some(Some(owner)) => Some(owner),
        None => None,
    };
    let mirror = match mirror.parse() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("berth: node-config: {e}");
            return EXIT_CONFIG;
        }
    };
    let opts = crate::nodeconf::Options {
        mirror,
        fallback: if no_fallback {
            crate::nodeconf::Fallback::None
        } else {
            crate::nodeconf::Fallback::Origin
        },
        containerd_dir: (!no_containerd).then_some(containerd_dir),
        registries_dir: (!no_registries_conf).then_some(registries_dir),
        ca_file,
        skip_verify,
    };
    if let (Some(owner), false, false) = (cache_owner, dry_run, remove) {
        match crate::nodeconf::prepare_cache_dir(&cfg.cache.dir, owner) {
            Ok(changed) => println!(
                "{} {} ({}:{})",
                if changed { "prepared" } else { "unchanged" },
                cfg.cache.dir.display(),
                owner.0,
                owner.1
            ),
            Err(e) => {
                eprintln!("berth: node-config: cache directory: {e}");
                return 1;
            }
        }
    }
    node_config(&cfg, &opts, dry_run, remove)
}

/// `berth warm`: reads the image list, then fills the cache (or a running berth via `--via`).
fn warm_command(args: WarmArgs) -> i32 {
    let WarmArgs {
        config,
        mut images,
        file,
        platform,
        with_referrers,
        concurrency,
        pin,
        via,
        creds,
    } = args;
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(f) = file {
        match std::fs::read_to_string(&f) {
            Ok(text) => images.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
                    .filter(|l| !l.is_empty()),
            ),
            Err(e) => {
                eprintln!("berth: {}: {e}", f.display());
                return EXIT_CONFIG;
            }
        }
    }
    if images.is_empty() {
        eprintln!("berth: warm: no images given (arguments or --file)");
        return EXIT_CONFIG;
    }
    if pin && via.is_some() {
        eprintln!("berth: warm: --pin needs the cache directory itself (run without --via, with berth stopped)");
        return EXIT_CONFIG;
    }
    init_logging_quiet();
    let opts = crate::warm::WarmOptions {
        images,
        platforms: platform,
        with_referrers,
        concurrency,
        pin,
        via,
        credentials: creds,
    };
    runtime().block_on(warm(cfg, opts))
}

/// Runs a command that works on the cache directory itself (export, import): loads the
/// config, opens the cache (taking its lock), prints the summary or the error.
fn with_cache<F, Fut>(args: &ConfigArgs, name: &str, f: F) -> i32
where
    F: FnOnce(crate::cache::Cache, crate::upstream::Upstreams) -> Fut,
    Fut: std::future::Future<Output = Result<String, crate::bundle::BundleError>>,
{
    let cfg = match load(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging_quiet();
    runtime().block_on(async move {
        let (cache, upstreams) = match open_offline(&cfg) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("berth: {name}: {e}");
                return 1;
            }
        };
        match f(cache, upstreams).await {
            Ok(summary) => {
                println!("{summary}");
                0
            }
            Err(e) => {
                eprintln!("berth: {name}: {e}");
                1
            }
        }
    })
}

/// The cache directory of a config, for a command that works on a stopped berth's cache:
/// loads the config and opens the cache (taking its lock), or prints why not (with `hint`) and
/// gives the exit status.
fn open_stopped_cache(
    config: &ConfigArgs,
    command: &str,
    hint: &str,
) -> Result<crate::cache::Cache, i32> {
    let cfg = load(config)?;
    init_logging_quiet();
    crate::cache::Cache::open(&cfg.cache).map_err(|e| {
        eprintln!(
            "berth: {command}: cache {}: {e}{hint}",
            cfg.cache.dir.display()
        );
        1
    })
}

/// The cache and upstream table of a config, without listeners (export, import).
fn open_offline(cfg: &Config) -> Result<(crate::cache::Cache, crate::upstream::Upstreams), String> {
    let cache = crate::cache::Cache::open(&cfg.cache)
        .map_err(|e| format!("cache {}: {e}", cfg.cache.dir.display()))?;
    let upstreams = crate::upstream::Upstreams::new(&cfg.upstreams).map_err(|e| e.to_string())?;
    Ok((cache, upstreams))
}

/// `berth node-config`: plans, prints and (unless `dry_run`) applies the node's files. Exit
/// status 1 when a file could not be written or one in the way was not written by berth.
fn node_config(cfg: &Config, opts: &crate::nodeconf::Options, dry_run: bool, remove: bool) -> i32 {
    use crate::nodeconf::{apply, describe, plan, Change};
    let changes = match plan(cfg, opts, remove) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth: node-config: {e}");
            return 1;
        }
    };
    for change in &changes {
        println!("{}", describe(change, dry_run));
        if let (true, Change::Write { contents, .. }) = (dry_run, change) {
            for line in contents.lines() {
                println!("    {line}");
            }
        }
    }
    if !dry_run {
        if let Err(e) = apply(&changes) {
            eprintln!("berth: node-config: {e}");
            return 1;
        }
    }
    let foreign = changes
        .iter()
        .filter(|c| matches!(c, Change::Foreign { .. }))
        .count();
    if foreign > 0 {
        eprintln!(
            "berth: node-config: {foreign} file(s) in the way were not written by berth; \
             move them aside (or merge berth in by hand) and run again"
        );
        return 1;
    }
    0
}

/// Warnings only: warm's own output is its progress and summary.
fn init_logging_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Colour codes only for a person at a terminal: a journal, a container log or a file gets
/// plain text.
fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

async fn warm(mut cfg: Config, opts: crate::warm::WarmOptions) -> i32 {
    let (base, running) = match &opts.via {
        Some(url) => (url.clone(), None),
        None => {
            cfg.server.listen = "127.0.0.1:0".parse().expect("valid address");
            cfg.server.tls = None;
            cfg.admin.listen = None;
            match crate::server::start(cfg, prometheus::Registry::new()).await {
                Ok(r) => (format!("http://{}", r.addr), Some(r)),
                Err(e) => {
                    eprintln!("berth: warm: {e}");
                    return 1;
                }
            }
        }
    };
    let app = running.as_ref().map(|r| r.app.clone());
    let results = crate::warm::warm(base, app, &opts).await;
    if let Some(r) = running {
        r.shutdown().await;
    }
    let failed: Vec<_> = results.iter().filter(|r| r.error.is_some()).collect();
    let fetched: u64 = results.iter().map(|r| r.fetched).sum();
    let skipped: u64 = results.iter().map(|r| r.skipped).sum();
    println!(
        "warmed {} of {} image(s): {} bytes fetched, {} bytes already cached",
        results.len() - failed.len(),
        results.len(),
        fetched,
        skipped
    );
    for f in &failed {
        println!(
            "FAILED {}: {}",
            f.reference,
            f.error.as_deref().unwrap_or("")
        );
    }
    if failed.is_empty() {
        0
    } else {
        1
    }
}

async fn serve(cfg: Config) -> i32 {
    raise_fd_limit();
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

/// Every connection holds a file descriptor: take all the open-file limit allows.
fn raise_fd_limit() {
    match crate::server::fd_limit::raise() {
        Ok((before, after)) => tracing::info!(
            soft = after.soft,
            hard = after.hard,
            soft_before = before.soft,
            "open-file limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn runtime() -> tokio::runtime::Runtime {
    runtime_with(None)
}

/// The runtime, with `workers` async worker threads (default: one per CPU).
fn runtime_with(workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().build().expect("tokio runtime")
}
