//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.
//! Stop strings and token limits are the caller's (they need the tokenizer's text).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off: drop tokens whose probability is below min_p * the top probability.
    pub min_p: f32,
    /// 1 = off: logits of tokens already seen are divided (positive) or multiplied (negative) by it.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// A sampler with its own random stream (reproducible for a given seed).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch kept between tokens (a vocabulary's worth each): the logits after the
    /// repetition penalty, and the draw's weights.
    penalized: Vec<f32>,
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng, penalized: Vec::new(), weights: Vec::new() }
    }

    /// Picks the next token from `logits [vocab]` given the tokens so far.
    ///
    /// No full sort of the vocabulary: without top-k, top-p or min-p the token is drawn from
    /// the softmax in vocabulary order; with them only the tokens that can survive the filters
    /// are sorted (see [`Candidates`]). A full sort of SmolLM's 49152 logits took 1.8 ms, per
    /// sequence and token, on the engine's one thread.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let l = if p.repetition_penalty != 1.0 {
            self.penalized.clear();
            self.penalized.extend_from_slice(logits);
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(v) = self.penalized.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
                }
            }
            &self.penalized[..]
        } else {
            logits
        };
        if p.temperature == 0.0 {
            return argmax(l);
        }
        match Candidates::new(l, p, &mut self.weights) {
            Candidates::All { weights, blocks, total } => {
                // Whole blocks are stepped over by their sums, then the token is found in one.
                let mut u = self.rng.random::<f32>() as f64 * total;
                for (b, &bs) in blocks.iter().enumerate() {
                    if u < bs {
                        let block = &weights[b * DRAW_BLOCK..((b + 1) * DRAW_BLOCK).min(weights.len())];
                        return (b * DRAW_BLOCK + walk(block, u as f32)) as u32;
                    }
                    u -= bs;
                }
                // Rounding left u past the last block: the last token with any weight.
                weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
            }
            Candidates::Kept { tokens, probs } => {
                let total: f32 = probs.iter().sum();
                tokens[walk(&probs, self.rng.random::<f32>() * total)]
            }
        }
    }
}

/// The index where `u` falls when the weights are laid end to end (the first `i` with
/// `u < w[i]` after subtracting those before it); past the end through rounding, the last
/// index with any weight (0 if none).
fn walk(weights: &[f32], mut u: f32) -> usize {
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return i;
        }
        u -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// Weight cuts tried in turn for the tokens a filtered draw sorts (the top token's weight is
/// 1; after the last, every token): peaked logits stop at the first.
const CUTS: [f32; 5] = [0.3, 0.1, 1e-2, 1e-4, 1e-8];

/// Tokens per block of the unfiltered draw.
const DRAW_BLOCK: usize = 256;

/// The tokens a temperature draw chooses among, with their weights.
#[derive(Debug)]
enum Candidates<'a> {
    /// No filter: every token, `weights[t] = exp((l[t] - max) / T)` in vocabulary order, the
    /// sums of its blocks of [`DRAW_BLOCK`] tokens and their total.
    All { weights: &'a [f32], blocks: Vec<f64>, total: f64 },
    /// The tokens that survive top-k, top-p and min-p, most likely first, with their
    /// probabilities normalized over the top-k set (as top-p and min-p see them).
    Kept { tokens: Vec<u32>, probs: Vec<f32> },
}

impl<'a> Candidates<'a> {
    /// `weights` is scratch, filled with one weight per token.
    fn new(l: &[f32], p: &SamplingParams, weights: &'a mut Vec<f32>) -> Self {
        let max = max_of(l);
        if !max.is_finite() {
            // A +inf logit wins outright; no finite logit at all: the first, as greedy picks.
            return Candidates::Kept { tokens: vec![argmax(l)], probs: vec![1.0] };
        }
        // Divided, not multiplied by 1/T: a subnormal temperature's reciprocal overflows, and
        // the top token's weight must stay e^0 = 1 (any T > 0 is valid). NaN logits weigh 0.
        let t = p.temperature;
        weights.clear();
        weights.extend(l.iter().map(|&v| {
            let d = (v - max) / t;
            if d.is_nan() {
                f32::NEG_INFINITY
            } else {
                d
            }
        }));
        flora_adapters::cpu::vecops::exp_in_place(weights);
        let weights = &weights[..];
        let k = if p.top_k > 0 { p.top_k.min(l.len()) } else { l.len() };
        if k == l.len() && p.top_p >= 1.0 && p.min_p <= 0.0 {
            let blocks: Vec<f64> = weights.chunks(DRAW_BLOCK).map(sum_f64).collect();
            let total = blocks.iter().sum();
            return Candidates::All { weights, blocks, total };
        }
        // The tokens whose weight is at least `tau` (the top one's weight is 1), unordered.
        let above = |tau: f32| -> Vec<(f32, u32)> {
            // NaN logits (weight 0) never enter, even at the last cut: sorted first by
            // `total_cmp`, one would take a top-k place and zero min-p's floor.
            l.iter().zip(weights).enumerate().filter(|(_, (&v, &w))| w >= tau && !v.is_nan()).map(|(t, (&v, _))| (v, t as u32)).collect()
        };
        // Best first; ties: lower id first.
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let weight = |t: u32| weights[t as usize];
        // Lower the cut until the tokens above it hold everything the filters can keep: the
        // top-k set when top-k is on (its sum normalizes the probabilities), else the min-p
        // survivors, else a top-p prefix. The last cut, 0, takes every token.
        let (mut pool, total) = if k < l.len() {
            let mut pool = CUTS.into_iter().map(above).find(|c| c.len() >= k).unwrap_or_else(|| above(0.0));
            if pool.len() > k {
                pool.select_nth_unstable_by(k - 1, order);
                pool.truncate(k);
            }
            let total = pool.iter().map(|&(_, t)| weight(t) as f64).sum::<f64>() as f32;
            (pool, total)
        } else {
            let total = sum_f64(weights) as f32;
            let pool = if p.min_p > 0.0 {
                above(p.min_p)
            } else {
                // Some slack over top_p so that f32 rounding in the cumulative sum below
                // cannot run past the end of a prefix that holds just enough.
                let need = (p.top_p as f64 + 1e-4) * total as f64;
                CUTS
                    .into_iter()
                    .map(above)
                    .find(|c| c.iter().map(|&(_, t)| weight(t) as f64).sum::<f64>() >= need)
                    .unwrap_or_else(|| above(0.0))
            };
            (pool, total)
        };
        // Never empty: the top token (weight 1, its logit finite) is above every cut.
        pool.sort_unstable_by(order);
        let mut probs: Vec<f32> = pool.iter().map(|&(_, t)| weight(t) / total).collect();
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        pool.truncate(keep);
        probs.truncate(keep);
        Candidates::Kept { tokens: pool.into_iter().map(|(_, t)| t).collect(), probs }
    }
}

/// The largest value (NaN-free input), in 16 lanes so that it vectorizes.
fn max_of(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes.iter().copied().fold(tail, f32::max)
}

/// The sum in f64 (49152 small weights summed in f32 drift by 1e-4), in 8 lanes.
fn sum_f64(v: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for (s, &x) in lanes.iter_mut().zip(c) {
            *s += x as f64;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// The index of the largest value (the first of equals; NaN never wins; 0 for no number).
pub fn argmax(v: &[f32]) -> u32 {
    // The largest of each block (vectorized), then the first block holding the overall
    // largest, searched alone: two passes of SIMD maxima instead of a scalar scan.
    const BLOCK: usize = 512;
    let (mut best, mut at) = (f32::NEG_INFINITY, 0);
    for (b, chunk) in v.chunks(BLOCK).enumerate() {
        let m = max_of(chunk);
        if m > best {
            (best, at) = (m, b);
        }
    }
    let chunk = &v[(at * BLOCK).min(v.len())..];
    (at * BLOCK + chunk.iter().position(|&x| x == best).unwrap_or(0)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nan() {
        for n in [1, 15, 16, 17, 49152] {
            for at in [0, n / 2, n - 1] {
                let mut v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
                v[at] = 5.0;
                assert_eq!(argmax(&v), at as u32, "n {n} at {at}");
                v.push(5.0);
                assert_eq!(argmax(&v), at as u32, "n {n} at {at}: a later equal value");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_topk_topp_minp_penalty_and_seed() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[]), 1);
        // Penalty 4 on token 1: 3/4 < 2 -> token 2 wins.
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 4.0, ..Default::default() });
        assert_eq!(s.sample(&logits, &[1]), 2);
        // top_k = 1 at any temperature is greedy.
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 1, seed: Some(1), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
        // top_p tiny keeps the top token only; min_p = 1 too.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.01, seed: Some(2), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, min_p: 1.0, seed: Some(2), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
        // Same seed, same stream; high temperature reaches every token.
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 10.0, seed: Some(seed), ..Default::default() });
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let d = draw(9);
        assert!((0..4).all(|t| d.contains(&t)));
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err().contains("top_p"));
    }
    /// The obvious version of the filtered draw's candidates: sort every token by logit, cut
    /// to top-k, normalize, cut by top-p and min-p (f64 arithmetic).
    fn reference_kept(l: &[f32], p: &SamplingParams) -> (Vec<u32>, Vec<f64>) {
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = l[idx[0] as usize] as f64;
        let w: Vec<f64> = idx.iter().map(|&i| ((l[i as usize] as f64 - max) / p.temperature as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        let probs: Vec<f64> = w.iter().map(|x| x / total).collect();
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            keep = probs.iter().position(|&q| { acc += q; acc >= p.top_p as f64 }).map_or(keep, |i| i + 1);
        }
        if p.min_p > 0.0 {
            keep = keep.min(probs.iter().take_while(|&&q| q >= p.min_p as f64 * probs[0]).count().max(1));
        }
        (idx[..keep].to_vec(), probs[..keep].to_vec())
    }

    /// Logits of `vocab` distinct values: flat, peaked (a few far above the rest) or Zipf-like.
    fn logits(vocab: usize, shape: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut perm: Vec<usize> = (0..vocab).collect();
        for i in (1..vocab).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        perm.iter()
            .map(|&r| match shape {
                0 => r as f32 * 20.0 / vocab as f32 - 10.0,
                1 => if r + 4 >= vocab { 12.0 + r as f32 / vocab as f32 } else { r as f32 * 5.0 / vocab as f32 },
                _ => -((vocab - r) as f32).ln() * 1.5,
            })
            .collect()
    }

    #[test]
    fn filtered_candidates_equal_a_full_sort() {
        let mut cases = 0;
        for vocab in [5, 1000, 49152] {
            for shape in 0..3 {
                let l = logits(vocab, shape, vocab as u64 + shape as u64);
                for (t, k, top_p, min_p) in [
                    (1.0, 0, 1.0, 0.05),
                    (1.0, 0, 0.9, 0.0),
                    (0.7, 0, 0.5, 0.0),
                    (2.0, 0, 0.99, 0.0),
                    (1.0, 1, 1.0, 0.0),
                    (1.0, 40, 1.0, 0.0),
                    (0.5, 40, 0.9, 0.1),
                    (1.0, vocab - 1, 0.95, 0.0),
                    (1.0, vocab, 0.8, 0.01),
                    (3.0, 0, 0.999, 0.0),
                ] {
                    let p = SamplingParams { temperature: t, top_k: k, top_p, min_p, ..Default::default() };
                    let (want, want_p) = reference_kept(&l, &p);
                    let (tokens, probs) = match Candidates::new(&l, &p, &mut Vec::new()) {
                        Candidates::Kept { tokens, probs } => (tokens, probs),
                        // No filter left (top-k at least the vocabulary): every token, and
                        // the reference keeps them all.
                        Candidates::All { weights, blocks, total } => {
                            assert_eq!(want.len(), vocab, "vocab {vocab} {p:?}: no filter, yet the reference cut");
                            assert!((blocks.iter().sum::<f64>() - total).abs() <= 1e-9 * total);
                            (want.clone(), want.iter().map(|&t| (weights[t as usize] as f64 / total) as f32).collect())
                        }
                    };
                    let n = tokens.len().min(want.len());
                    assert_eq!(tokens[..n], want[..n], "vocab {vocab} shape {shape} {p:?}");
                    for (g, w) in probs.iter().zip(&want_p) {
                        assert!((*g as f64 - w).abs() <= 1e-5 + 1e-4 * w, "vocab {vocab} shape {shape} {p:?}: prob {g} vs {w}");
                    }
                    // A different count only where f32 rounding meets a filter's boundary.
                    if tokens.len() != want.len() {
                        let cum: f64 = want_p[..n].iter().sum();
                        let near_top_p = (cum - top_p as f64).abs() < 1e-4;
                        let edge = want_p.get(n).or(want_p.last()).copied().unwrap_or(0.0);
                        let near_min_p = (edge / want_p[0] - min_p as f64).abs() < 1e-4;
                        assert!(near_top_p || near_min_p, "vocab {vocab} shape {shape} {p:?}: kept {} vs {}", tokens.len(), want.len());
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 90);
    }

    #[test]
    fn draws_follow_the_softmax_with_and_without_filters() {
        let l = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        let soft = |t: f32, keep: &[usize]| {
            let w: Vec<f64> = keep.iter().map(|&i| ((l[i] / t) as f64).exp()).collect();
            let s: f64 = w.iter().sum();
            w.into_iter().map(move |x| x / s)
        };
        // (params, tokens the draw may give).
        for (p, keep) in [
            (SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() }, vec![0, 1, 2, 3, 4]),
            (SamplingParams { temperature: 0.5, seed: Some(4), ..Default::default() }, vec![0, 1, 2, 3, 4]),
            (SamplingParams { temperature: 1.0, top_k: 3, seed: Some(5), ..Default::default() }, vec![2, 1, 4]),
        ] {
            let n = 40_000;
            let mut counts = [0usize; 5];
            let mut s = Sampler::new(p.clone());
            for _ in 0..n {
                counts[s.sample(&l, &[]) as usize] += 1;
            }
            for (&i, want) in keep.iter().zip(soft(p.temperature, &keep)) {
                let got = counts[i] as f64 / n as f64;
                assert!((got - want).abs() < 0.01, "{p:?}: token {i} drawn {got:.4}, softmax {want:.4}");
            }
            assert_eq!(keep.iter().map(|&i| counts[i]).sum::<usize>(), n, "{p:?}: a filtered-out token was drawn");
        }
    }

    #[test]
    fn a_draw_over_many_blocks_follows_the_softmax() {
        // 1000 tokens (four blocks of the unfiltered draw), the mass in blocks 1-3.
        let l: Vec<f32> = (0..1000).map(|i| if [300, 555, 700, 999].contains(&i) { 3.0 + (i % 7) as f32 * 0.3 } else { -4.0 }).collect();
        let w: Vec<f64> = l.iter().map(|&x| (x as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        let n = 40_000;
        let mut counts = vec![0usize; l.len()];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(11), ..Default::default() });
        for _ in 0..n {
            counts[s.sample(&l, &[]) as usize] += 1;
        }
        for i in [300, 555, 700, 999, 0, 256, 512] {
            let (got, want) = (counts[i] as f64 / n as f64, w[i] / total);
            assert!((got - want).abs() < 0.01, "token {i} drawn {got:.4}, softmax {want:.4}");
        }
        let rest: usize = counts.iter().enumerate().filter(|(i, _)| ![300, 555, 700, 999].contains(i)).map(|(_, c)| c).sum();
        let want_rest = 1.0 - [300, 555, 700, 999].iter().map(|&i| w[i]).sum::<f64>() / total;
        assert!((rest as f64 / n as f64 - want_rest).abs() < 0.01, "low tokens drawn {rest} of {n}, softmax {want_rest:.4}");
    }

    #[test]
    fn logits_without_a_finite_weight_fall_back_to_the_best() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(1), ..Default::default() });
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
        // +inf wins; NaN never does, with or without filters.
        for (top_k, top_p) in [(0, 1.0), (2, 1.0), (0, 0.9)] {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k, top_p, seed: Some(2), ..Default::default() });
            assert_eq!(s.sample(&[0.0, f32::INFINITY, 5.0, 1.0], &[]), 1);
            let mut l = vec![0f32; 600];
            l[100] = 30.0;
            l[7] = f32::NAN;
            assert!((0..20).all(|_| s.sample(&l, &[]) == 100), "top_k {top_k} top_p {top_p}");
        }
        // top-k with min-p: a NaN must neither take a top-k place nor zero min-p's floor
        // (token 200's probability, 0.27, is under 0.5 x the top one's 0.73).
        let mut l = vec![0f32; 600];
        (l[100], l[200], l[7]) = (30.0, 29.0, f32::NAN);
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 3, min_p: 0.5, seed: Some(5), ..Default::default() });
        assert!((0..2000).all(|_| s.sample(&l, &[]) == 100), "min-p cut token 200 with a NaN among the logits");
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        for t in [1e-38, 1e-39, 1e-45] {
            for (top_k, top_p, min_p) in [(0, 1.0, 0.0), (2, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.1)] {
                let mut s = Sampler::new(SamplingParams { temperature: t, top_k, top_p, min_p, seed: Some(3), ..Default::default() });
                assert_eq!(s.sample(&[0.0, 1.0, 5.0, 2.0], &[]), 2, "T {t} top_k {top_k} top_p {top_p} min_p {min_p}");
            }
        }
    }
}
