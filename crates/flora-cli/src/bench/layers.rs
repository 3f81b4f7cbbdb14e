//! `flora bench layers`: one adapted projection, every execution method, ratios to base.
//!
//! For each width d (square W0), shape (decode b=32 l=1 / prefill b=8 l=64), rank, and adapter
//! popularity pattern, every method is first checked against the slow reference on sampled
//! rows, then timed (median). Each sequence of the batch picks an adapter by the pattern; its l
//! tokens share it.

use super::chart;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use flora_adapters::cost::{median_secs, CostModel};
use flora_adapters::init::{self, WeightRng};
use flora_adapters::{adapted_linear, baseline, AdapterBatch, AdapterWeights, BaseWeight, ExecOptions, FloraPolicy, LayerAdapters};
use std::fmt::Write as _;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Base,
    LoraBmm,
    Lora,
    FloraVectorized,
    FloraMerged,
    FloraAuto,
    Ia3,
    /// A plain GEMM over r*b*l rows: the floor for fLoRA-vectorized.
    GemmStacked,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Base,
        Method::LoraBmm,
        Method::Lora,
        Method::FloraVectorized,
        Method::FloraMerged,
        Method::FloraAuto,
        Method::Ia3,
        Method::GemmStacked,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Base => "base",
            Method::LoraBmm => "lora-bmm",
            Method::Lora => "lora",
            Method::FloraVectorized => "flora-vectorized",
            Method::FloraMerged => "flora-merged",
            Method::FloraAuto => "flora-auto",
            Method::Ia3 => "ia3",
            Method::GemmStacked => "gemm-stacked",
        }
    }

    fn depends_on_rank(self) -> bool {
        !matches!(self, Method::Base | Method::Ia3)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Popularity {
    Distinct,
    Uniform4,
    Zipf,
    Identical,
}

impl Popularity {
    const ALL: [Popularity; 4] = [Popularity::Distinct, Popularity::Uniform4, Popularity::Zipf, Popularity::Identical];

    pub fn name(self) -> &'static str {
        match self {
            Popularity::Distinct => "distinct",
            Popularity::Uniform4 => "uniform4",
            Popularity::Zipf => "zipf",
            Popularity::Identical => "identical",
        }
    }

    /// Adapter index of each of `b` sequences (deterministic).
    fn assign(self, b: usize, rng: &mut WeightRng) -> Vec<u32> {
        match self {
            Popularity::Distinct => (0..b as u32).collect(),
            Popularity::Identical => vec![0; b],
            Popularity::Uniform4 => rng.uniform(b, 1.0).iter().map(|u| (((u + 1.0) * 2.0) as u32).min(3)).collect(),
            Popularity::Zipf => {
                let h: f32 = (1..=b).map(|k| 1.0 / k as f32).sum();
                rng.uniform(b, 1.0)
                    .iter()
                    .map(|u| {
                        let mut x = (u + 1.0) / 2.0 * h;
                        let mut k = 0;
                        while k + 1 < b && x >= 1.0 / (k + 1) as f32 {
                            x -= 1.0 / (k + 1) as f32;
                            k += 1;
                        }
                        k as u32
                    })
                    .collect()
            }
        }
    }
}

/// One measured row of layers.csv.
#[derive(Clone, Debug)]
pub struct Row {
    pub d: usize,
    pub b: usize,
    pub l: usize,
    pub r: usize,
    pub pattern: Popularity,
    pub method: Method,
    pub ms_median: f64,
    pub ratio_to_base: f64,
}

struct Sweep {
    dims: Vec<usize>,
    shapes: Vec<(usize, usize)>,
    ranks: Vec<usize>,
    patterns: Vec<Popularity>,
}

pub fn run(quick: bool, out: &Path, budget: f64, dims: Option<Vec<usize>>, ranks: Option<Vec<usize>>) -> Result<()> {
    let mut sweep = if quick {
        Sweep { dims: vec![576, 2048], shapes: vec![(32, 1), (8, 64)], ranks: vec![1, 4, 16], patterns: vec![Popularity::Distinct, Popularity::Identical] }
    } else {
        Sweep { dims: vec![576, 2048, 4096], shapes: vec![(32, 1), (8, 64)], ranks: vec![1, 2, 4, 8, 16, 32, 64], patterns: Popularity::ALL.to_vec() }
    };
    if let Some(dims) = dims {
        if dims.iter().any(|&d| d == 0) {
            bail!("--dims: widths must be positive");
        }
        sweep.dims = dims;
    }
    if let Some(ranks) = ranks {
        if ranks.iter().any(|&r| r == 0) {
            bail!("--ranks: ranks must be positive");
        }
        sweep.ranks = ranks;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let machine = super::machine_description();
    eprintln!("flora bench layers: {machine}");
    let n_total = sweep.dims.len() * sweep.shapes.len() * sweep.patterns.len();
    let progress = indicatif::ProgressBar::new(n_total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} eta {eta}] {msg}").expect("valid template"),
    );
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    for &d in &sweep.dims {
        let cost = CostModel::measure(d);
        costs.push((d, cost.clone()));
        let opts_auto = ExecOptions { flora: FloraPolicy::Auto, cost };
        for &(b, l) in &sweep.shapes {
            for &pattern in &sweep.patterns {
                progress.set_message(format!("d={d} b={b} l={l} {}", pattern.name()));
                rows.extend(measure_shape(d, b, l, pattern, &sweep.ranks, &opts_auto, budget)?);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    let csv = out.join("layers.csv");
    write_csv(&csv, &rows)?;
    let svg = out.join("layers.svg");
    chart::ratio_vs_rank(&svg, &rows, "distinct")?;
    let report = report(&rows, &costs, &machine, quick);
    std::fs::write(out.join("layers.md"), &report)?;
    println!("{report}");
    eprintln!("wrote {}, {} and {}", csv.display(), svg.display(), out.join("layers.md").display());
    Ok(())
}

/// All methods and ranks for one (d, b, l, pattern).
fn measure_shape(d: usize, b: usize, l: usize, pattern: Popularity, ranks: &[usize], auto: &ExecOptions, budget: f64) -> Result<Vec<Row>> {
    let dev = Device::Cpu;
    let n = b * l;
    let mut rng = WeightRng::new((d * 31 + b * 7 + l) as u64);
    let w0 = Tensor::from_vec(rng.uniform(d * d, 1.0 / (d as f32).sqrt()), (d, d), &dev)?;
    let base = BaseWeight::from_out_in(&w0)?;
    let x = Tensor::from_vec(rng.uniform(n * d, 1.0), (n, d), &dev)?;
    let seq_adapter = pattern.assign(b, &mut rng);
    let n_adapters = *seq_adapter.iter().max().unwrap() as usize + 1;
    let row_adapter: Vec<u32> = seq_adapter.iter().flat_map(|&a| std::iter::repeat_n(a, l)).collect();
    let batch = AdapterBatch::from_row_slots(row_adapter.iter().map(|&a| Some(a)).collect());
    let base_batch = AdapterBatch::base_only(n);
    let run_base = || adapted_linear(&x, &base, &base_batch, None, auto).map(|_| ());
    // Times `f` interleaved with the base run, so both medians see the same machine load;
    // returns (method ms, ratio to the interleaved base).
    let time = |f: &mut dyn FnMut() -> Result<Tensor>| -> Result<(f64, f64)> {
        let err = std::cell::RefCell::new(None);
        let (m, b) = median_pair_secs(
            || {
                if let Err(e) = f() {
                    *err.borrow_mut() = Some(e);
                }
            },
            || {
                if let Err(e) = run_base() {
                    *err.borrow_mut() = Some(e.into());
                }
            },
            budget,
        );
        match err.into_inner() {
            Some(e) => Err(e),
            None => Ok((m * 1e3, m / b)),
        }
    };
    let base_ms = median_secs(|| drop(run_base()), budget) * 1e3;
    let mut out = vec![Row { d, b, l, r: 0, pattern, method: Method::Base, ms_median: base_ms, ratio_to_base: 1.0 }];

    let ia3: Vec<AdapterWeights> = (0..n_adapters).map(|_| init::ia3_random(d, false, &mut rng, &dev)).collect::<candle_core::Result<_>>()?;
    let ia3_layer = pack(d, &ia3)?;
    check(&x, &w0, &base, &batch, &ia3_layer, auto, "ia3")?;
    let (ms, ratio) = time(&mut || Ok(adapted_linear(&x, &base, &batch, Some(&ia3_layer), auto)?))?;
    out.push(row(d, b, l, 0, pattern, Method::Ia3, ms, ratio));

    for &r in ranks {
        let loras: Vec<AdapterWeights> = (0..n_adapters).map(|_| init::lora_random(r, d, d, 2.0 * r as f32, &mut rng, &dev)).collect::<candle_core::Result<_>>()?;
        let lora_layer = pack(d, &loras)?;
        let floras: Vec<AdapterWeights> = (0..n_adapters).map(|_| init::flora_random(r, d, d, &mut rng, &dev)).collect::<candle_core::Result<_>>()?;
        let flora_layer = pack(d, &floras)?;
        let vec_opts = ExecOptions { flora: FloraPolicy::Vectorized, ..auto.clone() };
        let merged_opts = ExecOptions { flora: FloraPolicy::Merged, ..auto.clone() };

        // LoRA: ours, then the paper's gather + bmm baseline.
        check(&x, &w0, &base, &batch, &lora_layer, auto, "lora")?;
        let (ms, ratio) = time(&mut || Ok(adapted_linear(&x, &base, &batch, Some(&lora_layer), auto)?))?;
        out.push(row(d, b, l, r, pattern, Method::Lora, ms, ratio));
        let (a_all, b_all, scale) = stack_lora(&loras)?;
        let idx = Tensor::from_vec(row_adapter.clone(), n, &dev)?;
        let wt = base.transposed();
        let bmm = baseline::lora_gather_bmm(&x, wt, &a_all, &b_all, &idx, scale)?;
        let ours = adapted_linear(&x, &base, &batch, Some(&lora_layer), auto)?;
        max_diff(&bmm, &ours, "lora-bmm vs lora")?;
        let (ms, ratio) = time(&mut || Ok(baseline::lora_gather_bmm(&x, wt, &a_all, &b_all, &idx, scale)?))?;
        out.push(row(d, b, l, r, pattern, Method::LoraBmm, ms, ratio));

        for (method, opts) in [(Method::FloraVectorized, &vec_opts), (Method::FloraMerged, &merged_opts), (Method::FloraAuto, auto)] {
            check(&x, &w0, &base, &batch, &flora_layer, opts, method.name())?;
            let (ms, ratio) = time(&mut || Ok(adapted_linear(&x, &base, &batch, Some(&flora_layer), opts)?))?;
            out.push(row(d, b, l, r, pattern, method, ms, ratio));
        }

        let xs = Tensor::from_vec(rng.uniform(r * n * d, 1.0), (r * n, d), &dev)?;
        let stacked_batch = AdapterBatch::base_only(r * n);
        let (ms, ratio) = time(&mut || Ok(adapted_linear(&xs, &base, &stacked_batch, None, auto)?))?;
        out.push(row(d, b, l, r, pattern, Method::GemmStacked, ms, ratio));
    }
    Ok(out)
}

fn row(d: usize, b: usize, l: usize, r: usize, pattern: Popularity, method: Method, ms: f64, ratio: f64) -> Row {
    Row { d, b, l, r, pattern, method, ms_median: ms, ratio_to_base: ratio }
}

/// Medians of `f` and `g` run alternately for about `budget_s` (at least 3 pairs).
fn median_pair_secs(mut f: impl FnMut(), mut g: impl FnMut(), budget_s: f64) -> (f64, f64) {
    f();
    g();
    let start = std::time::Instant::now();
    let (mut fs, mut gs) = (Vec::new(), Vec::new());
    while fs.len() < 3 || (start.elapsed().as_secs_f64() < budget_s && fs.len() < 500) {
        let t = std::time::Instant::now();
        f();
        fs.push(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        g();
        gs.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    (med(&mut fs), med(&mut gs))
}

fn pack(d: usize, weights: &[AdapterWeights]) -> Result<LayerAdapters> {
    let names: Vec<String> = (0..weights.len()).map(|i| format!("bench-{i}")).collect();
    let slots: Vec<_> = weights.iter().zip(&names).map(|(w, n)| Some((n.as_str(), w))).collect();
    Ok(LayerAdapters::pack("bench.proj", d, d, &slots, &Device::Cpu)?)
}

fn stack_lora(loras: &[AdapterWeights]) -> Result<(Tensor, Tensor, f64)> {
    let (mut a_all, mut b_all, mut scale) = (Vec::new(), Vec::new(), 0.0);
    for w in loras {
        let AdapterWeights::Lora { a, b, scale: s } = w else { bail!("not a LoRA adapter") };
        a_all.push(a.clone());
        b_all.push(b.clone());
        scale = *s as f64;
    }
    Ok((Tensor::stack(&a_all, 0)?, Tensor::stack(&b_all, 0)?, scale))
}

/// Checks the method's output on sampled rows (first and last) against the dense f64 reference.
fn check(x: &Tensor, w0: &Tensor, base: &BaseWeight, batch: &AdapterBatch, layer: &LayerAdapters, opts: &ExecOptions, what: &str) -> Result<()> {
    let y = adapted_linear(x, base, batch, Some(layer), opts)?;
    let (n, d_in) = x.dims2()?;
    let d_out = base.d_out();
    let w64: Vec<f64> = w0.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    let p64: Vec<f64> = layer.params().to_vec1::<f32>()?.into_iter().map(f64::from).collect();
    for row in [0, n - 1] {
        let xr: Vec<f64> = x.get(row)?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let want = flora_adapters::reference::forward(&xr, &w64, &p64, layer.slots(), &batch.row_slots()[row..=row], d_in, d_out);
        let got: Vec<f32> = y.get(row)?.to_vec1()?;
        let err = got.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs())).fold(0.0, f64::max);
        if err > 1e-3 {
            bail!("{what}: row {row} differs from the reference (max rel err {err:.2e}); refusing to time a wrong kernel");
        }
    }
    Ok(())
}

fn max_diff(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
    if d > 1e-3 * (1.0 + s) {
        bail!("{what}: outputs differ by {d}");
    }
    Ok(())
}

fn write_csv(path: &Path, rows: &[Row]) -> Result<()> {
    let mut s = String::from("d,b,l,r,pattern,method,ms_median,ratio_to_base\n");
    for r in rows {
        writeln!(s, "{},{},{},{},{},{},{:.4},{:.4}", r.d, r.b, r.l, r.r, r.pattern.name(), r.method.name(), r.ms_median, r.ratio_to_base)?;
    }
    let tmp = path.with_extension("csv.tmp");
    std::fs::write(&tmp, s)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn find(rows: &[Row], d: usize, b: usize, l: usize, r: usize, pattern: Popularity, method: Method) -> Option<&Row> {
    rows.iter().find(|x| x.d == d && x.b == b && x.l == l && (x.r == r || !method.depends_on_rank()) && x.pattern == pattern && x.method == method)
}

/// Smallest rank at which `lora` is faster than `flora` (None: fLoRA wins at every measured rank).
pub fn inflection(rows: &[Row], d: usize, b: usize, l: usize, pattern: Popularity, flora: Method, lora: Method) -> Option<usize> {
    let mut ranks: Vec<usize> = rows.iter().filter(|x| x.d == d && x.method == flora).map(|x| x.r).collect();
    ranks.sort();
    ranks.dedup();
    ranks.into_iter().find(|&r| match (find(rows, d, b, l, r, pattern, flora), find(rows, d, b, l, r, pattern, lora)) {
        (Some(f), Some(lo)) => lo.ms_median < f.ms_median,
        _ => false,
    })
}

fn report(rows: &[Row], costs: &[(usize, CostModel)], machine: &str, quick: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# flora bench layers{}\n", if quick { " (--quick)" } else { "" });
    let _ = writeln!(s, "Machine: {machine}. f32, medians; ratio = method time / base-only time in the same run.\n");
    let mut shapes: Vec<(usize, usize, usize)> = rows.iter().map(|r| (r.d, r.b, r.l)).collect();
    shapes.dedup();
    let _ = writeln!(s, "## Inflection rank (distinct adapters: smallest rank where LoRA is faster than fLoRA)\n");
    let _ = writeln!(s, "| d | b x l | base ms | base GFLOP/s | vectorized vs lora-bmm (paper) | vectorized vs lora (ours) | auto vs lora-bmm | auto vs lora (ours) |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let show = |r: Option<usize>| r.map_or("> max measured".to_string(), |v| v.to_string());
    for &(d, b, l) in &shapes {
        let p = Popularity::Distinct;
        let Some(base) = find(rows, d, b, l, 0, p, Method::Base) else { continue };
        let gflops = 2.0 * (b * l * d * d) as f64 / (base.ms_median * 1e-3) / 1e9;
        let _ = writeln!(
            s,
            "| {d} | {b} x {l} | {:.3} | {gflops:.0} | {} | {} | {} | {} |",
            base.ms_median,
            show(inflection(rows, d, b, l, p, Method::FloraVectorized, Method::LoraBmm)),
            show(inflection(rows, d, b, l, p, Method::FloraVectorized, Method::Lora)),
            show(inflection(rows, d, b, l, p, Method::FloraAuto, Method::LoraBmm)),
            show(inflection(rows, d, b, l, p, Method::FloraAuto, Method::Lora)),
        );
    }
    let mut ranks: Vec<usize> = rows.iter().map(|r| r.r).filter(|&r| r > 0).collect();
    ranks.sort();
    ranks.dedup();
    for pattern in Popularity::ALL {
        if !rows.iter().any(|r| r.pattern == pattern) {
            continue;
        }
        let _ = writeln!(s, "\n## Ratio to base, {} adapters\n", pattern.name());
        let _ = write!(s, "| d | b x l | method | ia3 |");
        for r in &ranks {
            let _ = write!(s, " r={r} |");
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|---|---|---|{}", "---|".repeat(ranks.len()));
        for &(d, b, l) in &shapes {
            let ia3 = find(rows, d, b, l, 0, pattern, Method::Ia3).map_or(f64::NAN, |x| x.ratio_to_base);
            for m in Method::ALL.iter().filter(|m| m.depends_on_rank()) {
                let _ = write!(s, "| {d} | {b} x {l} | {} | {ia3:.2} |", m.name());
                for &r in &ranks {
                    let v = find(rows, d, b, l, r, pattern, *m).map_or(f64::NAN, |x| x.ratio_to_base);
                    let _ = write!(s, " {v:.2} |");
                }
                let _ = writeln!(s);
            }
        }
    }
    let _ = writeln!(s, "\n## Cost-model constants measured in this run\n");
    let _ = writeln!(s, "| d | GEMM GFLOP/s by rows | bandwidth GB/s | call overhead us |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (d, c) in costs {
        let rates: Vec<String> = c.gemm_rate.iter().map(|(m, r)| format!("{m}: {:.0}", r / 1e9)).collect();
        let _ = writeln!(s, "| {d} | {} | {:.1} | {:.2} |", rates.join(", "), c.bandwidth / 1e9, c.call_overhead * 1e6);
    }
    s
}
