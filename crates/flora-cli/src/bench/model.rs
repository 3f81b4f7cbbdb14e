//! `flora bench model`: prefill and decode tokens/s of the real model at several batch sizes,
//! base-only and with distinct adapters per sequence, and peak memory.

use anyhow::Result;
use flora_adapters::{AdapterKind, LoraTables, WeightFormat};
use flora_model::adapters::Adapter;
use flora_model::{Llama, Logits, SeqStep};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// An adapter setting of the sweep: kind and rank (None: base model only), and how bf16
/// inference stores LoRA tables (measured with bf16 weights only).
#[derive(Clone, Copy)]
struct Setting {
    kind: Option<AdapterKind>,
    rank: usize,
    lora_tables: LoraTables,
}

impl Setting {
    const BASE: Self = Self { kind: None, rank: 0, lora_tables: LoraTables::Bf16 };

    fn new(kind: AdapterKind, rank: usize) -> Self {
        Self { kind: Some(kind), rank, lora_tables: LoraTables::Bf16 }
    }

    fn label(&self) -> String {
        match (self.kind, self.lora_tables) {
            (None, _) => "base".into(),
            (Some(AdapterKind::Lora), LoraTables::Int8) => format!("lora-r{}-int8", self.rank),
            (Some(k), _) => format!("{k}-r{}", self.rank),
        }
    }

    /// Whether the setting means something with `format` weights (f32 tables have no 8 bits).
    fn applies_to(&self, format: WeightFormat) -> bool {
        self.lora_tables == LoraTables::Bf16 || format == WeightFormat::Bf16
    }
}

/// One setting's sequences at one batch size: adapters, caches and the next tokens.
struct SettingRun {
    setting: Setting,
    packed: Option<flora_model::ModelAdapters>,
    n_adapters: usize,
    caches: Vec<flora_model::KvCache>,
    /// The prompts until the prefill, then each sequence's next (greedy) token.
    next: Vec<Vec<u32>>,
}

impl SettingRun {
    fn new(model: &Llama, setting: Setting, batch: usize, prompt_len: usize) -> Result<Self> {
        let adapters: Vec<Adapter> = match setting.kind {
            None => vec![],
            Some(k) => (0..batch.min(32))
                .map(|i| super::random_adapter::random_adapter(model.config(), &flora_model::Proj::ALL, k, setting.rank, 100 + i as u64))
                .collect::<Result<_>>()?,
        };
        let packed = if adapters.is_empty() { None } else { Some(model.pack_adapters(&adapters.iter().collect::<Vec<_>>())?) };
        let vocab = model.config().vocab as u32;
        let prompts = (0..batch).map(|i| (0..prompt_len).map(|t| ((i * 7919 + t * 104729) as u32) % vocab).collect()).collect();
        Ok(Self { setting, packed, n_adapters: adapters.len(), caches: (0..batch).map(|_| model.new_cache()).collect(), next: prompts })
    }

    /// One step over all sequences (`next[i]` for sequence i: the whole prompt in the first
    /// step, the prefill; one token after), keeping the greedy next tokens.
    fn step(&mut self, model: &Llama) -> Result<()> {
        let n_adapters = self.n_adapters;
        let mut steps: Vec<SeqStep> = self
            .caches
            .iter_mut()
            .zip(&self.next)
            .enumerate()
            .map(|(i, (c, t))| SeqStep { tokens: t, cache: c, slot: (n_adapters > 0).then(|| (i % n_adapters) as u32), logits: Logits::Last })
            .collect();
        let logits = model.step_rows(&mut steps, self.packed.as_ref())?;
        self.next = logits.chunks_exact(model.config().vocab).map(|r| vec![flora_model::sampling::argmax(r)]).collect();
        Ok(())
    }
}

struct Measured {
    format: WeightFormat,
    batch: usize,
    setting: String,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    /// Decode rate over the base's at the same batch size: the median over rounds of the
    /// base's step time over this setting's, both from the same round (steps back to back, so
    /// the machine's drift between rounds cancels).
    ratio_to_base: f64,
    /// Batch 1: the decode rate of each round over the bandwidth limit read just before it
    /// (median), and the median of those readings (GB/s).
    paired: Option<(f64, f64)>,
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Main-memory read bandwidth with the rayon pool: each thread sums one contiguous share of a
/// buffer far larger than any cache (8 independent lanes). Agrees with a C/OpenMP AVX-512
/// reader on the development machine (45 vs 47-49 GB/s); smaller work-stolen chunks read 30%
/// lower.
struct BandwidthProbe {
    words: Vec<u64>,
}

impl BandwidthProbe {
    fn new(bytes: usize) -> Self {
        Self { words: std::hint::black_box((0..(bytes / 8) as u64).collect()) }
    }

    /// GB/s: the best of `passes` passes.
    fn read(&self, passes: usize) -> f64 {
        use rayon::prelude::*;
        let share = self.words.len().div_ceil(rayon::current_num_threads());
        let mut best = f64::INFINITY;
        for _ in 0..passes {
            let t = Instant::now();
            let sum = self
                .words
                .par_chunks(share)
                .map(|c| {
                    let mut acc = [0u64; 8];
                    for x in c.chunks_exact(8) {
                        for l in 0..8 {
                            acc[l] = acc[l].wrapping_add(x[l]);
                        }
                    }
                    acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
                })
                .reduce(|| 0, u64::wrapping_add);
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(sum);
        }
        (self.words.len() * 8) as f64 / best / 1e9
    }
}

/// Main-memory read bandwidth (GB/s): the best of 5 passes over 512 MiB.
pub fn read_bandwidth_gb_s() -> f64 {
    BandwidthProbe::new(512 << 20).read(5)
}

/// Bytes of the probe read beside every batch-1 decode round (dropped after batch 1, so that
/// it does not count in the peak memory of the larger batches).
const ROUND_PROBE_BYTES: usize = 256 << 20;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Weight bytes one decode token streams: every projection of every layer plus the LM head.
fn weight_bytes_per_token(cfg: &flora_model::LlamaConfig, format: WeightFormat) -> f64 {
    let per_layer: usize = flora_model::Proj::ALL.iter().map(|p| p.dims(cfg).0 * p.dims(cfg).1).sum();
    let params = per_layer * cfg.n_layers + cfg.vocab * cfg.hidden;
    params as f64 * if format == WeightFormat::Bf16 { 2.0 } else { 4.0 }
}

/// What `run` measures: batch sizes, weight formats, the LoRA settings' rank, and the
/// prompt and decode lengths (`quick`: fewer adapter settings).
pub struct Sweep<'a> {
    pub quick: bool,
    pub prompt_len: usize,
    pub decode_steps: usize,
    pub batches: &'a [usize],
    pub formats: &'a [WeightFormat],
    pub lora_rank: usize,
    /// The adapter settings to run (labels, as [`Setting::label`]); None: the default set.
    pub settings: Option<&'a [String]>,
}

/// The settings of a sweep, base first: `chosen` (labels; unknown ones are an error) or the
/// default set.
fn settings_to_run(quick: bool, lora_rank: usize, chosen: Option<&[String]>) -> Result<Vec<Setting>> {
    let lora_int8 = Setting { lora_tables: LoraTables::Int8, ..Setting::new(AdapterKind::Lora, lora_rank) };
    let all = [
        Setting::BASE,
        Setting::new(AdapterKind::Lora, lora_rank),
        lora_int8,
        Setting::new(AdapterKind::Flora, 1),
        Setting::new(AdapterKind::Flora, 2),
        Setting::new(AdapterKind::Flora, 4),
    ];
    let Some(chosen) = chosen else {
        return Ok(all.into_iter().take(if quick { 4 } else { all.len() }).collect());
    };
    let labels: Vec<String> = all.iter().map(Setting::label).collect();
    if let Some(unknown) = chosen.iter().find(|c| !labels.contains(c)) {
        anyhow::bail!("--settings: no setting {unknown:?} (the settings are {})", labels.join(", "));
    }
    Ok(all.into_iter().filter(|s| s.kind.is_none() || chosen.contains(&s.label())).collect())
}

pub fn run(model_path: Option<&Path>, out: &Path, sweep: &Sweep) -> Result<()> {
    let &Sweep { quick, prompt_len, decode_steps, batches, formats, lora_rank, settings: chosen } = sweep;
    let settings = settings_to_run(quick, lora_rank, chosen)?;
    std::fs::create_dir_all(out)?;
    let path = flora_model::default_model::resolve_model(model_path)?;
    let mut model = Llama::from_checkpoint(flora_model::weights::load(&path)?)?;
    let rss_loaded = peak_rss_mib();
    // Bandwidth is read before and after the sweep and the higher reading is the limit (the
    // machine is shared: a low reading would flatter the batch-1 ratio).
    let bandwidth_before = read_bandwidth_gb_s();
    let mut rows = Vec::new();
    let n_settings: usize = formats.iter().map(|&f| settings.iter().filter(|s| s.applies_to(f)).count()).sum();
    let progress = indicatif::ProgressBar::new((n_settings * batches.len()) as u64)
        .with_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}").expect("template"));
    for &format in formats {
        model.set_weight_format(format)?;
        for &b in batches {
            // Every setting's sequences are prefilled (each prefill timed alone), then decoded
            // in rounds that step each setting once, so drift on the shared machine reaches
            // the base and the adapter settings alike and the ratios compare like with like.
            let mut runs = Vec::with_capacity(settings.len());
            for &s in settings.iter().filter(|s| s.applies_to(format)) {
                progress.set_message(format!("{format}, batch {b}, {}: prefill", s.label()));
                model.set_lora_tables(s.lora_tables);
                let mut run = SettingRun::new(&model, s, b, prompt_len)?;
                let t = Instant::now();
                run.step(&model)?;
                runs.push((run, t.elapsed().as_secs_f64(), Vec::with_capacity(decode_steps)));
            }
            progress.set_message(format!("{format}, batch {b}: decode"));
            // At batch 1 the bandwidth is read before every round, so the decode rate is set
            // against the machine's state at that moment (its readings drift by 2x).
            let probe = (b == 1).then(|| BandwidthProbe::new(ROUND_PROBE_BYTES));
            let mut round_bw = Vec::with_capacity(decode_steps);
            let n = runs.len();
            for round in 0..decode_steps {
                if let Some(p) = &probe {
                    round_bw.push(p.read(2));
                }
                // Each round starts one setting further on, so that no setting always follows
                // the same one (a step after fLoRA r=4's traffic finds colder caches).
                for j in 0..n {
                    let (run, _, step_s) = &mut runs[(round + j) % n];
                    let t = Instant::now();
                    run.step(&model)?;
                    step_s.push(t.elapsed().as_secs_f64());
                }
            }
            drop(probe);
            let bytes = weight_bytes_per_token(model.config(), format);
            let bw_median = (!round_bw.is_empty()).then(|| median(&mut round_bw.clone()));
            // The first setting is the base (see `settings`); its step of each round.
            debug_assert_eq!(runs[0].0.setting.label(), "base");
            let base_steps = runs[0].2.clone();
            for (run, prefill_s, mut step_s) in runs {
                let mut per_round: Vec<f64> = base_steps.iter().zip(&step_s).map(|(base, s)| base / s).collect();
                let ratio_to_base = median(&mut per_round);
                let paired = bw_median.map(|bw_median| {
                    let mut ratios: Vec<f64> = step_s.iter().zip(&round_bw).map(|(s, bw)| (1.0 / s) / (bw * 1e9 / bytes)).collect();
                    (median(&mut ratios), bw_median)
                });
                rows.push(Measured {
                    format,
                    batch: b,
                    setting: run.setting.label(),
                    prefill_tok_s: (b * prompt_len) as f64 / prefill_s,
                    decode_tok_s: b as f64 / median(&mut step_s),
                    ratio_to_base,
                    paired,
                });
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    let peak = peak_rss_mib();
    let bandwidth = bandwidth_before.max(read_bandwidth_gb_s());
    let md = report(&rows, &ReportContext { path: &path, quick, prompt_len, decode_steps, bandwidth, cfg: model.config(), peak, rss_loaded });
    let mut csv = String::from("format,batch,setting,prefill_tok_s,decode_tok_s,decode_ratio_to_base\n");
    for r in &rows {
        let _ = writeln!(csv, "{},{},{},{:.1},{:.1},{:.3}", r.format, r.batch, r.setting, r.prefill_tok_s, r.decode_tok_s, r.ratio_to_base);
    }
    let tmp = out.join("model.csv.tmp");
    std::fs::write(&tmp, csv)?;
    std::fs::rename(&tmp, out.join("model.csv"))?;
    std::fs::write(out.join("model.md"), &md)?;
    println!("{md}");
    Ok(())
}

struct ReportContext<'a> {
    path: &'a Path,
    quick: bool,
    prompt_len: usize,
    decode_steps: usize,
    bandwidth: f64,
    cfg: &'a flora_model::LlamaConfig,
    peak: f64,
    rss_loaded: f64,
}

/// Transformers' prefill on the reference machine (the model issue's figure, f32, 2 threads).
const TRANSFORMERS_PREFILL_TOK_S: f64 = 680.0;

/// The markdown report: one table per weight format, then each target with its measured figure.
fn report(rows: &[Measured], cx: &ReportContext) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# flora bench model{}\n",
        if cx.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        md,
        "Model: {}. Machine: {}. Weights dequantized at load, prompt {} tokens (every sequence's prompt in one step), {} decode steps. Main-memory read bandwidth ({} threads summing 512 MiB; the higher of a reading before and one after the sweep): {:.1} GB/s.",
        cx.path.display(),
        super::machine_description(),
        cx.prompt_len,
        cx.decode_steps,
        rayon::current_num_threads(),
        cx.bandwidth
    );
    let _ = writeln!(md, "Decode tok/s = batch / the median time of a decode step (each step includes the greedy pick from the logits); the settings of a batch size are prefilled, then decoded in rounds of one step each (each round starting one setting further on), so machine drift reaches all alike. Decode vs base = the median over rounds of the base's step time over the setting's in the same round. At batch 1 every round starts with a bandwidth reading (the same threads, best of 2 passes over 256 MiB), and the batch-1 target sets each round's base decode rate against the limit read just before it (median over the rounds). Adapters: one distinct adapter per sequence (up to 32) on all 7 projections of every layer; `-int8` rows keep LoRA's tables in 8 bits (`--lora-tables int8`, bf16 weights only).");
    let formats: Vec<WeightFormat> = rows.iter().fold(Vec::new(), |mut v, r| {
        if !v.contains(&r.format) {
            v.push(r.format);
        }
        v
    });
    for &f in &formats {
        let _ = writeln!(md, "\n## {f} weights\n");
        let _ = writeln!(
            md,
            "| batch | adapters | prefill tok/s | decode tok/s | decode vs base |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for r in rows.iter().filter(|r| r.format == f) {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.1} | {:.2} |",
                r.batch,
                r.setting,
                r.prefill_tok_s,
                r.decode_tok_s,
                r.ratio_to_base
            );
        }
    }
    let _ = writeln!(md, "\n## Targets\n");
    let _ = writeln!(md, "| target | format | measured | goal | met |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    let find = |f: WeightFormat, b: usize, s: &str| {
        rows.iter()
            .find(|r| r.format == f && r.batch == b && r.setting == s)
    };
    let mut line = |what: String, f: WeightFormat, measured: String, goal: String, met: bool| {
        let _ = writeln!(
            md,
            "| {what} | {f} | {measured} | {goal} | {} |",
            if met { "yes" } else { "**no**" }
        );
    };
    for &f in &formats {
        if let Some(r) = find(f, 1, "base") {
            let bytes = weight_bytes_per_token(cx.cfg, f);
            let limit = cx.bandwidth * 1e9 / bytes;
            let ratio = r.decode_tok_s / limit;
            let (paired, round_bw) = r.paired.expect("batch 1 reads the bandwidth every round");
            line(
                "batch-1 decode vs the bandwidth limit".into(),
                f,
                format!(
                    "{:.1} tok/s = {paired:.3}x of the limit read before each round (median; readings' median {round_bw:.1} GB/s = {:.0} tok/s at {:.0} MB/token); {ratio:.3}x of the sweep's {limit:.0} tok/s",
                    r.decode_tok_s,
                    round_bw * 1e9 / bytes,
                    bytes / 1e6
                ),
                ">= 0.75x".into(),
                paired >= 0.75,
            );
        }
        if let Some(r) = find(f, 32, "base") {
            line(
                "batch-32 decode".into(),
                f,
                format!("{:.0} tok/s", r.decode_tok_s),
                ">= 600 tok/s".into(),
                r.decode_tok_s >= 600.0,
            );
        }
        if let Some(best) = rows
            .iter()
            .filter(|r| r.format == f && r.setting == "base")
            .map(|r| r.prefill_tok_s)
            .reduce(f64::max)
        {
            let ratio = best / TRANSFORMERS_PREFILL_TOK_S;
            line(
                "prefill (best batch) vs transformers' 680 tok/s".into(),
                f,
                format!("{best:.0} tok/s = {ratio:.3}x"),
                ">= 1.5x".into(),
                ratio >= 1.5,
            );
        }
        let b = if find(f, 32, "lora-r8").is_some() {
            32
        } else {
            8
        };
        for (setting, tables) in [("lora-r8", ""), ("lora-r8-int8", ", 8-bit tables")] {
            if let Some(l) = find(f, b, setting) {
                let ratio = l.ratio_to_base;
                line(
                    format!("{b} distinct LoRA r=8 decode vs base{tables}"),
                    f,
                    format!("{ratio:.3}x"),
                    ">= 0.85x".into(),
                    ratio >= 0.85,
                );
            }
        }
    }
    let _ = writeln!(md, "\nPeak resident memory: {:.0} MiB ({:.0} MiB after loading the model in f32; bf16 adds a packed copy of every projection and the LM head, half the f32 size).", cx.peak, cx.rss_loaded);
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(settings: &[Setting]) -> Vec<String> {
        settings.iter().map(Setting::label).collect()
    }

    #[test]
    fn settings_default_pick_and_reject() {
        assert_eq!(labels(&settings_to_run(false, 8, None).unwrap()), ["base", "lora-r8", "lora-r8-int8", "flora-r1", "flora-r2", "flora-r4"]);
        assert_eq!(labels(&settings_to_run(true, 8, None).unwrap()), ["base", "lora-r8", "lora-r8-int8", "flora-r1"]);
        // A pick keeps the base first (the ratios' reference) and the sweep's order.
        let pick = ["flora-r2".to_string(), "lora-r16".to_string()];
        assert_eq!(labels(&settings_to_run(true, 16, Some(&pick)).unwrap()), ["base", "lora-r16", "flora-r2"]);
        let Err(err) = settings_to_run(false, 4, Some(&["lora-r8".to_string()])) else { panic!("lora-r8 at rank 4 must be rejected") };
        let err = err.to_string();
        assert!(err.contains("\"lora-r8\"") && err.contains("lora-r4-int8"), "{err}");
    }
}
