//! `flora bench serve`: load on the HTTP server (started here, or at `--url`), the paper's
//! serving analysis (throughput vs rank for LoRA and fLoRA, against the base model), the adapter
//! pool under Zipf traffic over many adapters, and a soak with clients that disconnect.

mod adapters;
mod client;
mod report;
mod workload;

use anyhow::{bail, Context, Result};
use client::{Arrivals, Outcome, Planned, Source};
use flora_adapters::AdapterKind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use workload::{AdapterPicker, LengthDist, Popularity};

#[derive(clap::Args, Clone)]
pub struct ServeBenchArgs {
    /// compare: base vs LoRA vs fLoRA at each rank (throughput vs rank, inflection rank).
    /// pool: many adapters, Zipf traffic, a pool sized for a few of them (hit rate, p99 TTFT).
    /// soak: mixed load for --duration seconds with clients that disconnect mid-stream; checks
    /// that no request is lost or hangs.
    #[arg(long, default_value = "compare", value_parser = ["compare", "pool", "soak"])]
    pub scenario: String,
    /// Target a running server instead of starting one. It must serve the base model as `base`
    /// (`flora serve --served-model-name base`) and the adapters the scenario names, e.g.
    /// `lora-r8-000` (a run without --url writes them under --out).
    #[arg(long)]
    pub url: Option<String>,
    /// Model file for the server started here.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, env = "FLORA_WEIGHTS", help = crate::load::WEIGHTS_HELP)]
    pub weights: Option<flora_adapters::WeightFormat>,
    /// Output directory (CSV, chart, report; generated adapters under DIR/adapters).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Requests in flight at all times (closed loop).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Poisson arrivals at this many requests/s instead of a fixed concurrency.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests per configuration (compare, pool).
    #[arg(long, default_value_t = 96)]
    pub requests: usize,
    /// Prompt tokens: N or LO:HI (uniform).
    #[arg(long, default_value = "64", value_parser = LengthDist::parse)]
    pub prompt_len: LengthDist,
    /// Output tokens: N or LO:HI (uniform); generation ignores end-of-sequence.
    #[arg(long, default_value = "64", value_parser = LengthDist::parse)]
    pub output_len: LengthDist,
    /// Distinct adapters per configuration (compare) or registered (pool, soak).
    #[arg(long)]
    pub adapters: Option<usize>,
    /// Which adapter each request names: one, uniform, zipf, zipf:S.
    #[arg(long)]
    pub popularity: Option<String>,
    /// Ranks to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub ranks: Vec<usize>,
    /// Adapter kinds to compare (lora, flora, ia3).
    #[arg(long, value_delimiter = ',', default_value = "lora,flora")]
    pub kinds: Vec<String>,
    /// Projections the generated adapters target (q,k,v,o,gate,up,down or all).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub targets: Vec<String>,
    /// Adapters the pool may hold (pool scenario): --max-pool-bytes = this many adapters.
    #[arg(long, default_value_t = 64)]
    pub pool_capacity: usize,
    /// Soak duration in seconds.
    #[arg(long, default_value_t = 600)]
    pub duration: u64,
    /// Fraction of soak requests whose client disconnects mid-stream.
    #[arg(long, default_value_t = 0.2)]
    pub disconnect_fraction: f64,
    /// Sampling temperature of every request (0: greedy). The OpenAI API's default is 1.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// A small, fast run (fewer ranks and requests).
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// A request's adapter name for configuration (kind, rank) and index i.
pub fn adapter_name(kind: Option<AdapterKind>, rank: usize, i: usize) -> String {
    match kind {
        None => "base".into(),
        Some(k) => format!("{k}-r{rank}-{i:03}"),
    }
}

pub fn run(mut args: ServeBenchArgs) -> Result<()> {
    if args.quick {
        args.requests = args.requests.min(48);
        if args.ranks == [1, 2, 4, 8, 16] {
            args.ranks = vec![1, 8];
        }
        args.duration = args.duration.min(60);
    }
    if args.concurrency == 0 || args.requests == 0 || args.rate.is_some_and(|r| r <= 0.0 || !r.is_finite()) {
        bail!("--concurrency, --requests and --rate must be positive");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    crate::load::init_logging_at("warn");
    match args.scenario.as_str() {
        "compare" => compare(&args),
        "pool" => pool(&args),
        "soak" => soak(&args),
        _ => unreachable!("clap checks the scenario"),
    }
}

/// The server the scenario talks to: started here (with the given adapters dir and pool size),
/// or the one at --url.
struct Target {
    url: String,
    runtime: tokio::runtime::Runtime,
    server: Option<flora_serve::RunningServer>,
}

impl Target {
    fn new(args: &ServeBenchArgs, adapters_dir: &Path, max_pool_bytes: usize, max_loras: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        if let Some(url) = &args.url {
            return Ok(Self { url: url.trim_end_matches('/').to_string(), runtime, server: None });
        }
        let (model, tok) = crate::load::model_and_tokenizer(args.model.as_deref(), args.weights)?;
        let opts = flora_serve::ServeOptions {
            model_name: "base".into(),
            adapters_dir: Some(adapters_dir.to_path_buf()),
            max_pool_bytes,
            engine: flora_serve::engine::EngineConfig {
                scheduler: flora_serve::scheduler::SchedulerConfig { max_loras, ..Default::default() },
                max_waiting: 4096,
            },
            ..Default::default()
        };
        let server = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            flora_serve::RunningServer::start(model, tok, opts, listener)
        })?;
        Ok(Self { url: format!("http://{}", server.addr), runtime, server: Some(server) })
    }

    fn load(&self, source: Source, arrivals: Arrivals, seed: u64) -> (Vec<Outcome>, f64) {
        self.runtime.block_on(client::run(&self.url, source, arrivals, Duration::from_secs(600), seed))
    }

    /// The server's Prometheus text.
    fn metrics(&self) -> Result<String> {
        let url = format!("{}/metrics", self.url);
        Ok(self.runtime.block_on(async { reqwest::get(url).await?.text().await })?)
    }

    fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            let _ = self.runtime.block_on(s.shutdown());
        }
    }
}

fn arrivals(args: &ServeBenchArgs) -> Arrivals {
    args.rate.map_or(Arrivals::Concurrency(args.concurrency), Arrivals::Rate)
}

/// `n` requests naming `names` by `pop`, with random prompt ids.
fn plan(args: &ServeBenchArgs, names: &[String], pop: Popularity, n: usize, rng: &mut StdRng) -> VecDeque<Planned> {
    let picker = AdapterPicker::new(pop, names.len());
    (0..n)
        .map(|_| Planned {
            model: names[picker.pick(rng, names.len())].clone(),
            prompt: (0..args.prompt_len.sample(rng)).map(|_| rng.random_range(1000..20000)).collect(),
            max_tokens: args.output_len.sample(rng),
            temperature: args.temperature,
            disconnect_after: None,
        })
        .collect()
}

fn compare(args: &ServeBenchArgs) -> Result<()> {
    let n_adapters = args.adapters.unwrap_or(32);
    let pop = Popularity::parse(args.popularity.as_deref().unwrap_or("uniform"))?;
    let kinds = args.kinds.iter().map(|k| adapters::parse_kind(k)).collect::<Result<Vec<_>>>()?;
    let dir = args.out.join(format!("adapters-{}", args.targets.join("_")));
    let mut configs: Vec<(Option<AdapterKind>, usize)> = vec![(None, 0)];
    for &k in &kinds {
        let ranks: Vec<usize> = if k == AdapterKind::Ia3 { vec![1] } else { args.ranks.clone() };
        configs.extend(ranks.into_iter().map(|r| (Some(k), r)));
    }
    if args.url.is_none() {
        let cfg = adapters::model_config(args.model.as_deref())?;
        for &(k, r) in &configs {
            if let Some(k) = k {
                adapters::generate(&cfg, &dir, k, r, n_adapters, &args.targets, args.seed)?;
            }
        }
    }
    let target = Target::new(args, &dir, 8 << 30, n_adapters.max(1))?;
    // Warm up: one small round so first-load costs do not land in the first configuration.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let warm = plan(args, &["base".to_string()], Popularity::One, 4, &mut rng);
    target.load(Source::List(warm), Arrivals::Concurrency(4), args.seed);
    let mut rows = Vec::new();
    for &(kind, rank) in &configs {
        let names: Vec<String> = match kind {
            None => vec!["base".into()],
            Some(_) => (0..n_adapters).map(|i| adapter_name(kind, rank, i)).collect(),
        };
        let mut rng = StdRng::seed_from_u64(args.seed);
        let reqs = plan(args, &names, if kind.is_none() { Popularity::One } else { pop }, args.requests, &mut rng);
        let (outcomes, wall) = target.load(Source::List(reqs), arrivals(args), args.seed);
        let row = report::Row::new(kind, rank, names.len(), &pop.name(), args, &outcomes, wall);
        eprintln!("{}", row.line());
        rows.push(row);
    }
    target.shutdown();
    report::write_compare(&args.out, args, &rows)
}

fn pool(args: &ServeBenchArgs) -> Result<()> {
    let n = args.adapters.unwrap_or(1000);
    let pop = Popularity::parse(args.popularity.as_deref().unwrap_or("zipf"))?;
    let rank = 8;
    let dir = args.out.join(format!("pool-adapters-{}", args.targets.join("_")));
    let cfg = adapters::model_config(args.model.as_deref())?;
    let bytes_each = adapters::generate(&cfg, &dir, AdapterKind::Lora, rank, n, &args.targets, args.seed)?;
    let pool_bytes = bytes_each * args.pool_capacity;
    let target = Target::new(args, &dir, pool_bytes, args.concurrency.min(args.pool_capacity).max(1))?;
    let names: Vec<String> = (0..n).map(|i| adapter_name(Some(AdapterKind::Lora), rank, i)).collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let reqs = plan(args, &names, pop, args.requests, &mut rng);
    let before = report::pool_counters(&target.metrics()?);
    let (outcomes, wall) = target.load(Source::List(reqs), arrivals(args), args.seed);
    let after = report::pool_counters(&target.metrics()?);
    target.shutdown();
    report::write_pool(&args.out, args, n, rank, pool_bytes, bytes_each, &outcomes, wall, before, after)
}

fn soak(args: &ServeBenchArgs) -> Result<()> {
    let n = args.adapters.unwrap_or(48);
    let pop = Popularity::parse(args.popularity.as_deref().unwrap_or("zipf"))?;
    let dir = args.out.join(format!("soak-adapters-{}", args.targets.join("_")));
    let cfg = adapters::model_config(args.model.as_deref())?;
    // A third each of LoRA r8, fLoRA r2 and IA3, plus the base model.
    let per = n.div_ceil(3);
    let kinds = [(AdapterKind::Lora, 8), (AdapterKind::Flora, 2), (AdapterKind::Ia3, 1)];
    let mut names = vec!["base".to_string()];
    for (k, r) in kinds {
        adapters::generate(&cfg, &dir, k, r, per, &args.targets, args.seed)?;
        names.extend((0..per).map(|i| adapter_name(Some(k), r, i)));
    }
    let target = Target::new(args, &dir, 256 << 20, 16)?;
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let picker = AdapterPicker::new(pop, names.len());
    let (plen, olen, frac, temperature) = (args.prompt_len, args.output_len, args.disconnect_fraction, args.temperature);
    let make = move || {
        let max_tokens = olen.sample(&mut rng);
        Planned {
            model: names[picker.pick(&mut rng, names.len())].clone(),
            prompt: (0..plen.sample(&mut rng)).map(|_| rng.random_range(1000..20000)).collect(),
            max_tokens,
            temperature,
            disconnect_after: rng.random_bool(frac).then(|| rng.random_range(1..=max_tokens.max(1))),
        }
    };
    eprintln!("soak: {}s of load at {:?}", args.duration, arrivals(args));
    let (outcomes, wall) = target.load(Source::Until { deadline, make: Box::new(make) }, arrivals(args), args.seed);
    // After the load: the engine must drain to idle (nothing hung inside the server).
    let t = Instant::now();
    let idle = loop {
        let m = target.metrics()?;
        let g = |name: &str| report::gauge(&m, name).unwrap_or(f64::NAN);
        if g("flora_running_sequences") == 0.0 && g("flora_queue_depth") == 0.0 {
            break true;
        }
        if t.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let metrics = target.metrics()?;
    target.shutdown();
    report::write_soak(&args.out, args, &outcomes, wall, idle, &metrics)
}
