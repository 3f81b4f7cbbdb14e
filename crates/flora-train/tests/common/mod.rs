//! Shared helpers: the tiny random model, adapters with random (non-identity) weights, a toy text
//! encoder, and synthetic per-adapter tasks.
#![allow(dead_code)]

use flora_adapters::AdapterKind;
use flora_model::adapters::RandomAdapter;
use flora_model::{Adapter, Llama, LlamaConfig, Proj};
use flora_tokenizer::ChatMessage;
use flora_train::config::AdapterSpec;
use flora_train::data::{Example, TextEncoder};
use flora_train::TrainAdapter;

pub fn tiny_model() -> Llama {
    Llama::random(LlamaConfig::tiny(), 7).unwrap()
}

pub fn spec(name: &str, kind: AdapterKind, rank: usize, targets: &[Proj], lr: f64) -> AdapterSpec {
    AdapterSpec {
        name: name.into(),
        kind,
        rank: if kind == AdapterKind::Ia3 { 1 } else { rank },
        alpha: (kind == AdapterKind::Lora).then_some(2.0 * rank as f32),
        targets: targets.to_vec(),
        feedforward: if kind == AdapterKind::Ia3 { targets.iter().copied().filter(|&p| p == Proj::Down).collect() } else { vec![] },
        lr,
    }
}

/// An adapter with random weights away from the identity (so every parameter has a gradient).
/// IA3 scales `down`'s input, as `spec` sets `feedforward`.
pub fn random_adapter(cfg: &LlamaConfig, s: &AdapterSpec, seed: u64) -> TrainAdapter {
    let how = RandomAdapter { seed, lora_alpha: s.alpha.unwrap_or(1.0), ia3_input_on_down: true };
    let adapter = Adapter { name: s.name.clone(), ..Adapter::random(cfg, s.kind, s.rank, &s.targets, how).unwrap() };
    TrainAdapter::from_adapter(s.clone(), adapter).unwrap()
}

/// A tiny deterministic token stream.
pub fn lcg_tokens(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as u32) % vocab
        })
        .collect()
}

/// An example of `adapter` with random tokens; every token but the first is a target, except
/// that `prompt` leading tokens are context only.
pub fn random_example(adapter: usize, len: usize, prompt: usize, seed: u64) -> Example {
    let tokens = lcg_tokens(seed, len, 97);
    let targets = (0..len).map(|i| i > 0 && i >= prompt).collect();
    Example { adapter, tokens, targets, line: seed as usize }
}

/// The synthetic task: adapter `a` walks a 16-token cycle with stride `a + 1`, so the next token
/// is a function of the current one that differs per adapter (the base model cannot serve all).
pub const TASK_TOKENS: std::ops::Range<u32> = 10..26;

pub fn task_next(adapter: usize, tok: u32) -> u32 {
    let n = TASK_TOKENS.len() as u32;
    TASK_TOKENS.start + (tok - TASK_TOKENS.start + adapter as u32 + 1) % n
}

pub fn task_example(adapter: usize, len: usize, seed: u64) -> Example {
    let mut t = TASK_TOKENS.start + lcg_tokens(seed, 1, TASK_TOKENS.len() as u32)[0];
    let mut tokens = vec![t];
    for _ in 1..len {
        t = task_next(adapter, t);
        tokens.push(t);
    }
    Example { adapter, tokens, targets: (0..len).map(|i| i > 0).collect(), line: seed as usize }
}

/// Toy text encoder over the tiny vocabulary: one token per byte (`3 + byte % 94`), BOS 1, EOS 2,
/// and a chat format `<role>content|` with `<assistant>` as the generation prompt.
pub struct ToyEncoder;

impl TextEncoder for ToyEncoder {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(text.bytes().map(|b| 3 + (b as u32) % 94).collect())
    }
    fn bos(&self) -> Option<u32> {
        Some(1)
    }
    fn eos(&self) -> Option<u32> {
        Some(2)
    }
    fn render_chat(&self, messages: &[ChatMessage], gen: bool) -> Option<Result<String, String>> {
        let mut s: String = messages.iter().map(|m| format!("<{}>{}|", m.role, m.content)).collect();
        if gen {
            s.push_str("<assistant>");
        }
        Some(Ok(s))
    }
}
