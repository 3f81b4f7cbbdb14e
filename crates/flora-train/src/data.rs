//! Training data: JSONL records -> tokenized examples with loss masks -> fitted to a maximum
//! length (truncated, or packed) -> a held-out split per adapter -> seeded, resumable batch order.
//!
//! One record per line (blank lines are skipped), each naming its adapter and holding exactly one of
//! - `{"adapter": A, "text": T}`: loss on every token of T (and the final EOS);
//! - `{"adapter": A, "prompt": P, "completion": C}`: loss on C (and EOS) only;
//! - `{"adapter": A, "messages": [{"role": R, "content": X}, ...]}`: rendered with the model's chat
//!   template; loss on the assistant turns (content and end-of-turn marker) only.
//!
//! An [`Example`] is `tokens [n]` and `targets [n]`: `targets[i]` says whether token `i` is a
//! loss target (predicted from tokens `..i`); `targets[0]` is always false.

use crate::error::{io_err, Result, TrainError};
use flora_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// What the data layer needs from a tokenizer: the model's GGUF tokenizer ([`ModelEncoder`]), or a
/// toy encoder in tests.
pub trait TextEncoder {
    /// Token ids of `text`, no BOS/EOS added.
    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String>;
    /// Prepended to every example when `Some` (the model's `add_bos`).
    fn bos(&self) -> Option<u32>;
    /// Appended to `text` and `completion` examples when `Some`.
    fn eos(&self) -> Option<u32>;
    /// The conversation rendered with the chat template (`None`: the model has none).
    fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Option<std::result::Result<String, String>>;
}

/// The model's tokenizer and its compiled chat template.
pub struct ModelEncoder {
    pub tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

impl ModelEncoder {
    pub fn new(tokenizer: Tokenizer) -> Self {
        let template = tokenizer.chat_template().ok();
        Self { tokenizer, template }
    }
}

impl TextEncoder for ModelEncoder {
    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        self.tokenizer.encode(text).map_err(|e| e.to_string())
    }
    fn bos(&self) -> Option<u32> {
        if self.tokenizer.add_bos() {
            self.tokenizer.bos_id()
        } else {
            None
        }
    }
    fn eos(&self) -> Option<u32> {
        self.tokenizer.eos_id()
    }
    fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Option<std::result::Result<String, String>> {
        self.template.as_ref().map(|t| t.render(messages, add_generation_prompt).map_err(|e| e.to_string()))
    }
}

/// One tokenized example of one adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Index into [`Dataset::names`].
    pub adapter: usize,
    pub tokens: Vec<u32>,
    /// `targets[i]`: token `i` is a loss target. Same length as `tokens`; `targets[0] == false`.
    pub targets: Vec<bool>,
    /// 1-based line of the record in its file (the first record's line for packed examples).
    pub line: usize,
}

impl Example {
    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }
}

/// Examples and the adapter names they refer to (index = `Example::adapter`).
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub names: Vec<String>,
    pub examples: Vec<Example>,
}

/// Adapter names become directory names under `--out`: letters, digits, `-`, `_`, `.`; not
/// starting with `.`; at most 100 characters.
pub fn check_adapter_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 100 || name.starts_with('.') || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(format!("adapter name {name:?} must be 1-100 letters, digits, '-', '_' or '.', not starting with '.'"));
    }
    Ok(())
}

/// Reads a JSONL file. Adapter indices follow first appearance; every malformed line is an
/// error naming `file:line`.
pub fn read_jsonl(path: &Path, enc: &dyn TextEncoder) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    parse_jsonl(&text, &path.display().to_string(), enc)
}

/// [`read_jsonl`] over text already in memory; `file` names it in errors.
pub fn parse_jsonl(text: &str, file: &str, enc: &dyn TextEncoder) -> Result<Dataset> {
    let mut ds = Dataset::default();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let err = |msg: String| TrainError::Data { file: file.to_string(), line, msg };
        let value: Value = serde_json::from_str(raw).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let (adapter, tokens, targets) = tokenize_record(&value, enc).map_err(err)?;
        let next = index.len();
        let id = *index.entry(adapter.clone()).or_insert(next);
        if id == ds.names.len() {
            ds.names.push(adapter);
        }
        ds.examples.push(Example { adapter: id, tokens, targets, line });
    }
    if ds.examples.is_empty() {
        return Err(TrainError::Data { file: file.to_string(), line: 0, msg: "no records (expected one JSON object per line)".into() });
    }
    Ok(ds)
}

fn string_field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> std::result::Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{key}` must be a string, found {}", type_name(other))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One record -> (adapter name, tokens, targets).
fn tokenize_record(value: &Value, enc: &dyn TextEncoder) -> std::result::Result<(String, Vec<u32>, Vec<bool>), String> {
    let obj = value.as_object().ok_or_else(|| format!("expected a JSON object, found {}", type_name(value)))?;
    let adapter = string_field(obj, "adapter")?.ok_or("missing `adapter` (the name of the adapter this example trains)")?;
    check_adapter_name(adapter)?;
    let text = string_field(obj, "text")?;
    let prompt = string_field(obj, "prompt")?;
    let completion = string_field(obj, "completion")?;
    let messages = obj.get("messages").filter(|v| !v.is_null());
    let n_forms = [text.is_some(), prompt.is_some() || completion.is_some(), messages.is_some()].iter().filter(|&&b| b).count();
    if n_forms != 1 {
        return Err(format!(
            "expected exactly one of `text`, `prompt` + `completion`, or `messages`; found {}",
            if n_forms == 0 { "none".to_string() } else { "several".to_string() }
        ));
    }
    let enc_str = |s: &str| enc.encode(s).map_err(|e| format!("tokenizer: {e}"));
    let mut tokens: Vec<u32> = enc.bos().into_iter().collect();
    let mut targets: Vec<bool> = vec![false; tokens.len()];
    let push = |ids: Vec<u32>, learn: bool, tokens: &mut Vec<u32>, targets: &mut Vec<bool>| {
        targets.extend(std::iter::repeat_n(learn, ids.len()));
        tokens.extend(ids);
    };
    if let Some(t) = text {
        if t.is_empty() {
            return Err("`text` is empty".into());
        }
        push(enc_str(t)?, true, &mut tokens, &mut targets);
        push(enc.eos().into_iter().collect(), true, &mut tokens, &mut targets);
    } else if prompt.is_some() || completion.is_some() {
        let (Some(p), Some(c)) = (prompt, completion) else {
            return Err("`prompt` and `completion` go together; one of them is missing".into());
        };
        if c.is_empty() {
            return Err("`completion` is empty: nothing to learn".into());
        }
        push(enc_str(p)?, false, &mut tokens, &mut targets);
        push(enc_str(c)?, true, &mut tokens, &mut targets);
        push(enc.eos().into_iter().collect(), true, &mut tokens, &mut targets);
    } else if let Some(m) = messages {
        let msgs = parse_messages(m)?;
        for (piece, learn) in chat_pieces(&msgs, enc)? {
            push(enc_str(&piece)?, learn, &mut tokens, &mut targets);
        }
    }
    if let Some(first) = targets.first_mut() {
        *first = false;
    }
    if !targets.iter().any(|&t| t) {
        return Err("the record has no tokens to learn".into());
    }
    Ok((adapter.to_string(), tokens, targets))
}

fn parse_messages(v: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let arr = v.as_array().ok_or_else(|| format!("`messages` must be an array, found {}", type_name(v)))?;
    if arr.is_empty() {
        return Err("`messages` is empty".into());
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let obj = m.as_object().ok_or_else(|| format!("messages[{i}] must be an object with `role` and `content`"))?;
        let role = string_field(obj, "role").map_err(|e| format!("messages[{i}]: {e}"))?.ok_or_else(|| format!("messages[{i}]: missing `role`"))?;
        let content =
            string_field(obj, "content").map_err(|e| format!("messages[{i}]: {e}"))?.ok_or_else(|| format!("messages[{i}]: missing `content`"))?;
        out.push(ChatMessage::new(role, content));
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("`messages` has no assistant turn: nothing to learn".into());
    }
    Ok(out)
}

/// The rendered conversation cut into pieces: `(text, learn)`. Rendering each prefix of the
/// conversation finds where each message starts; for an assistant turn, the prefix rendered with
/// the generation prompt ends at the start of the reply, so the header is context and the reply
/// (with its end-of-turn marker) is learned.
fn chat_pieces(msgs: &[ChatMessage], enc: &dyn TextEncoder) -> std::result::Result<Vec<(String, bool)>, String> {
    let render = |n: usize, gen: bool| -> std::result::Result<String, String> {
        if n == 0 && !gen {
            return Ok(String::new());
        }
        enc.render_chat(&msgs[..n], gen).ok_or("the model has no chat template; use `text` or `prompt` + `completion`")?.map_err(|e| format!("chat template: {e}"))
    };
    let mut pieces = Vec::new();
    let mut done = String::new();
    for (k, m) in msgs.iter().enumerate() {
        let full = render(k + 1, false)?;
        let inconsistent = || "the chat template does not render the conversation's prefixes consistently; use `prompt` + `completion`".to_string();
        if m.role == "assistant" {
            let header = render(k, true)?;
            let (Some(h), true) = (header.strip_prefix(done.as_str()), full.starts_with(header.as_str())) else {
                return Err(inconsistent());
            };
            pieces.push((h.to_string(), false));
            pieces.push((full[header.len()..].to_string(), true));
        } else {
            pieces.push((full.strip_prefix(done.as_str()).ok_or_else(inconsistent)?.to_string(), false));
        }
        done = full;
    }
    pieces.retain(|(p, _)| !p.is_empty());
    Ok(pieces)
}

/// How [`fit`] changed the examples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FitReport {
    pub n_truncated: usize,
    /// Examples dropped because truncation left no target.
    pub n_dropped: usize,
}

/// Fits examples to `seq_len` tokens: truncates each (keeping its start), or with `pack`
/// concatenates each adapter's examples (in order) and cuts the stream into `seq_len` chunks.
/// Packed chunks attend across example boundaries (no per-document masking).
pub fn fit(examples: Vec<Example>, seq_len: usize, pack: bool) -> (Vec<Example>, FitReport) {
    let mut report = FitReport::default();
    let mut out = Vec::new();
    let keep = |mut e: Example, out: &mut Vec<Example>, report: &mut FitReport| {
        e.targets[0] = false;
        if e.n_targets() > 0 {
            out.push(e);
        } else {
            report.n_dropped += 1;
        }
    };
    if !pack {
        for mut e in examples {
            if e.tokens.len() > seq_len {
                e.tokens.truncate(seq_len);
                e.targets.truncate(seq_len);
                report.n_truncated += 1;
            }
            keep(e, &mut out, &mut report);
        }
        return (out, report);
    }
    let mut streams: BTreeMap<usize, Example> = BTreeMap::new();
    for e in examples {
        let s = streams.entry(e.adapter).or_insert_with(|| Example { adapter: e.adapter, tokens: vec![], targets: vec![], line: e.line });
        s.tokens.extend(&e.tokens);
        s.targets.extend(&e.targets);
    }
    for (_, s) in streams {
        for (tokens, targets) in s.tokens.chunks(seq_len).zip(s.targets.chunks(seq_len)) {
            keep(Example { adapter: s.adapter, tokens: tokens.to_vec(), targets: targets.to_vec(), line: s.line }, &mut out, &mut report);
        }
    }
    (out, report)
}

/// Holds out `fraction` of each adapter's examples (seeded; at least one when the adapter has
/// two or more and `fraction > 0`, never all). Returns `(train, eval)`, each in input order.
pub fn split_eval(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_e7a1);
    let mut by_adapter: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        by_adapter.entry(e.adapter).or_default().push(i);
    }
    let mut held = vec![false; examples.len()];
    for (_, mut idx) in by_adapter {
        let n = idx.len();
        if fraction <= 0.0 || n < 2 {
            continue;
        }
        let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
        idx.shuffle(&mut rng);
        for &i in &idx[..k] {
            held[i] = true;
        }
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (e, h) in examples.into_iter().zip(held) {
        if h { eval.push(e) } else { train.push(e) }
    }
    (train, eval)
}

/// Where the batch order stands: epoch `epoch`'s permutation, next index `cursor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderPos {
    pub epoch: u64,
    pub cursor: usize,
}

/// Seeded batch order over `n` examples: each epoch is a fresh permutation derived from
/// `(seed, epoch)` only, so a position `(epoch, cursor)` restores the order exactly.
/// Batches draw from the global permutation, so they mix adapters.
#[derive(Clone, Debug)]
pub struct Loader {
    n: usize,
    seed: u64,
    pos: LoaderPos,
    perm: Vec<usize>,
}

impl Loader {
    pub fn new(n: usize, seed: u64) -> Self {
        Self::at(n, seed, LoaderPos { epoch: 0, cursor: 0 })
    }

    pub fn at(n: usize, seed: u64, pos: LoaderPos) -> Self {
        Self { n, seed, perm: permutation(n, seed, pos.epoch), pos }
    }

    pub fn pos(&self) -> LoaderPos {
        self.pos
    }

    /// The next `b` example indices (crossing into the next epoch when this one runs out).
    pub fn next_batch(&mut self, b: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(b);
        while out.len() < b && self.n > 0 {
            if self.pos.cursor == self.n {
                self.pos = LoaderPos { epoch: self.pos.epoch + 1, cursor: 0 };
                self.perm = permutation(self.n, self.seed, self.pos.epoch);
            }
            out.push(self.perm[self.pos.cursor]);
            self.pos.cursor += 1;
        }
        out
    }
}

fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch);
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(&mut rng);
    p
}
