//! `flora generate`: stream a completion of a prompt to stdout, with an optional adapter.

use anyhow::{bail, Result};
use flora_model::sampling::{Sampler, SamplingParams};
use flora_model::{Logits, SeqStep};
use flora_tokenizer::{ChatMessage, StopFilter};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Adapter directory (PEFT LoRA / IA3, or flora's fLoRA layout).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, help = crate::load::MODEL_HELP)]
    pub model: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this text (repeatable); the stop text is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, env = "FLORA_WEIGHTS", help = crate::load::WEIGHTS_HELP)]
    pub weights: Option<flora_adapters::WeightFormat>,
    #[arg(long, env = "FLORA_LORA_TABLES", default_value = "bf16", help = crate::load::LORA_TABLES_HELP)]
    pub lora_tables: flora_adapters::LoraTables,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    if let Err(e) = params.validate() {
        bail!("--{}", e.replace('_', "-"));
    }
    let (mut model, tok) = crate::load::model_and_tokenizer(args.model.as_deref(), args.weights)?;
    model.set_lora_tables(args.lora_tables);
    let text = if args.chat { tok.chat_template()?.render(&[ChatMessage::user(args.prompt.clone())], true)? } else { args.prompt.clone() };
    let mut prompt = tok.encode(&text)?;
    if tok.add_bos() {
        if let Some(b) = tok.bos_id() {
            prompt.insert(0, b);
        }
    }
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let context = model.config().context;
    if prompt.len() + args.max_tokens > context {
        bail!("prompt ({} tokens) + --max-tokens ({}) exceeds the model's context of {context} tokens", prompt.len(), args.max_tokens);
    }
    let adapter = match &args.adapter {
        Some(dir) => {
            let name = dir.file_name().and_then(|s| s.to_str()).unwrap_or("adapter").to_string();
            let a = flora_model::peft::load_adapter_dir(dir, &name, model.config())?;
            crate::load::tracing_free_log(&format!("adapter {name}: {} rank {}", a.kind, a.rank));
            Some(model.pack_adapters(&[&a])?)
        }
        None => None,
    };
    let slot = adapter.as_ref().map(|_| 0);
    let mut sampler = Sampler::new(params);
    let mut cache = model.new_cache();
    let mut history = prompt.clone();
    let mut decoder = tok.stream_decoder(true);
    let mut out = StopFilter::new(args.stop.clone());
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    let t0 = Instant::now();
    let mut logits = model.step_rows(&mut [SeqStep { tokens: &prompt, cache: &mut cache, slot, logits: Logits::Last }], adapter.as_ref())?;
    let t_prefill = t0.elapsed().as_secs_f64();
    let mut n_gen = 0;
    let eos = tok.eos_id();
    while n_gen < args.max_tokens {
        let next = sampler.sample(&logits, &history);
        n_gen += 1;
        if Some(next) == eos {
            break;
        }
        history.push(next);
        let piece = decoder.push(next)?;
        let (emit, stopped) = out.push(&piece);
        stdout.write_all(emit.as_bytes())?;
        stdout.flush()?;
        if stopped || n_gen == args.max_tokens {
            break;
        }
        logits = model.step_rows(&mut [SeqStep { tokens: &[next], cache: &mut cache, slot, logits: Logits::Last }], adapter.as_ref())?;
    }
    let (rest, _) = out.push(&decoder.finish());
    stdout.write_all(rest.as_bytes())?;
    stdout.write_all(out.finish().as_bytes())?;
    writeln!(stdout)?;
    let total = t0.elapsed().as_secs_f64();
    crate::load::tracing_free_log(&format!(
        "prompt {} tokens in {:.2}s ({:.0} tok/s), generated {n_gen} tokens in {:.2}s ({:.1} tok/s)",
        prompt.len(),
        t_prefill,
        prompt.len() as f64 / t_prefill,
        total - t_prefill,
        n_gen as f64 / (total - t_prefill).max(1e-9)
    ));
    Ok(())
}
