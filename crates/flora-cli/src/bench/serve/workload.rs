//! What a serving benchmark sends: which adapter each request names, how long its prompt and
//! output are, and when it arrives.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::Rng;

/// Which adapter a request names, out of `n`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Popularity {
    /// Every request names adapter 0.
    One,
    Uniform,
    /// Zipf with exponent s: adapter k (0-based) has weight 1/(k+1)^s.
    Zipf(f64),
}

impl Popularity {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "one" => Popularity::One,
            "uniform" => Popularity::Uniform,
            "zipf" => Popularity::Zipf(1.0),
            other => match other.strip_prefix("zipf:").and_then(|x| x.parse().ok()) {
                Some(e) => Popularity::Zipf(e),
                None => bail!("popularity {other:?}: use one, uniform, zipf or zipf:EXPONENT"),
            },
        })
    }

    pub fn name(&self) -> String {
        match self {
            Popularity::One => "one".into(),
            Popularity::Uniform => "uniform".into(),
            Popularity::Zipf(e) => format!("zipf:{e}"),
        }
    }
}

/// Draws adapter indices in `0..n`.
pub struct AdapterPicker {
    /// Cumulative weights (Zipf), normalized to 1.
    cdf: Vec<f64>,
    pop: Popularity,
}

impl AdapterPicker {
    pub fn new(pop: Popularity, n: usize) -> Self {
        let cdf = match pop {
            Popularity::Zipf(s) => {
                let w: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
                let total: f64 = w.iter().sum();
                w.iter().scan(0.0, |acc, x| {
                    *acc += x / total;
                    Some(*acc)
                }).collect()
            }
            _ => Vec::new(),
        };
        Self { cdf, pop }
    }

    pub fn pick(&self, rng: &mut StdRng, n: usize) -> usize {
        match self.pop {
            Popularity::One => 0,
            Popularity::Uniform => rng.random_range(0..n),
            Popularity::Zipf(_) => {
                let u: f64 = rng.random();
                self.cdf.partition_point(|&c| c < u).min(n - 1)
            }
        }
    }
}

/// A length: fixed `N`, or uniform in `LO:HI` (inclusive).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LengthDist {
    pub lo: usize,
    pub hi: usize,
}

impl LengthDist {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not a length (N or LO:HI)");
        let (lo, hi) = match s.split_once(':') {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let n = s.trim().parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        Ok(Self { lo, hi })
    }

    pub fn sample(&self, rng: &mut StdRng) -> usize {
        rng.random_range(self.lo..=self.hi)
    }
}

impl std::fmt::Display for LengthDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}:{}", self.lo, self.hi)
        }
    }
}

/// Exponential inter-arrival time (Poisson arrivals at `rate` per second).
pub fn poisson_gap(rng: &mut StdRng, rate: f64) -> f64 {
    let u: f64 = rng.random::<f64>().max(1e-12);
    -u.ln() / rate
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zipf_prefers_the_first_adapters_and_stays_in_range() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = AdapterPicker::new(Popularity::Zipf(1.0), 1000);
        let mut counts = vec![0usize; 1000];
        for _ in 0..20000 {
            counts[p.pick(&mut rng, 1000)] += 1;
        }
        // Weight of the first adapter is 1/H(1000) ~ 0.134.
        let first = counts[0] as f64 / 20000.0;
        assert!((0.11..0.16).contains(&first), "{first}");
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
    }

    #[test]
    fn lengths_parse_and_sample_in_range() {
        assert_eq!(LengthDist::parse("64").unwrap(), LengthDist { lo: 64, hi: 64 });
        let d = LengthDist::parse("8:16").unwrap();
        let mut rng = StdRng::seed_from_u64(2);
        assert!((0..100).all(|_| (8..=16).contains(&d.sample(&mut rng))));
        assert!(LengthDist::parse("0").is_err() && LengthDist::parse("9:3").is_err() && LengthDist::parse("x").is_err());
        assert!(Popularity::parse("zipf:1.2").is_ok() && Popularity::parse("nope").is_err());
    }
}
