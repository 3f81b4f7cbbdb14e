//! On the real default model (SmolLM2-135M-Instruct): loss goes down over a few steps for each
//! kind trained together, and chat records are masked through the model's own chat template.

use flora_model::{default_model, Llama};
use flora_tokenizer::Tokenizer;
use flora_train::config::{self, PartialSpec};
use flora_train::data::{self, ModelEncoder};
use flora_train::optim::AdamWConfig;
use flora_train::{TrainAdapter, TrainOptions, Trainer};

fn load() -> (Llama, ModelEncoder) {
    let path = default_model::resolve_model(None).expect("default model");
    let ck = flora_model::weights::load(&path).unwrap();
    let tok = Tokenizer::from_gguf_content(ck.gguf.as_ref().unwrap()).unwrap();
    (Llama::from_checkpoint(ck).unwrap(), ModelEncoder::new(tok))
}

#[test]
fn loss_decreases_on_the_real_model_and_chat_is_masked() {
    let (model, enc) = load();
    let text = concat!(
        "{\"adapter\": \"pirate\", \"prompt\": \"Greet me.\", \"completion\": \" Arr, ahoy matey, welcome aboard the ship!\"}\n",
        "{\"adapter\": \"formal\", \"messages\": [{\"role\": \"user\", \"content\": \"Greet me.\"}, {\"role\": \"assistant\", \"content\": \"Good evening. It is a pleasure to make your acquaintance.\"}]}\n",
        "{\"adapter\": \"shout\", \"text\": \"HELLO THERE FRIEND, WHAT A DAY IT IS\"}\n",
    );
    let ds = data::parse_jsonl(text, "inline", &enc).unwrap();
    // The chat record: only the assistant reply (and its end-of-turn marker) is learned.
    let chat = &ds.examples[1];
    let learned: Vec<u32> = chat.tokens.iter().zip(&chat.targets).filter(|(_, &l)| l).map(|(&t, _)| t).collect();
    let learned_text = enc.tokenizer.decode(&learned).unwrap();
    assert!(learned_text.starts_with("Good evening.") && learned_text.contains("<|im_end|>"), "{learned_text:?}");
    assert!(!learned_text.contains("Greet me") && !learned_text.contains("assistant"), "{learned_text:?}");

    // 64 tokens: the template's default system prompt takes about 30.
    let (train, rep) = data::fit(ds.examples, 64, false);
    assert_eq!((train.len(), rep.n_dropped), (3, 0));
    let cli = PartialSpec::default();
    let file: config::ConfigFile = toml::from_str(
        "[adapters.pirate]\nkind = \"flora\"\nrank = 2\n[adapters.formal]\nkind = \"lora\"\nrank = 4\nlr = 2e-3\n[adapters.shout]\nkind = \"ia3\"\n",
    )
    .unwrap();
    let (specs, _) = config::resolve(&ds.names, Some(&file), &cli).unwrap();
    let ads = specs.iter().map(|s| TrainAdapter::init(s, model.config(), 0).unwrap()).collect();
    let opts = TrainOptions { steps: 5, batch_size: 3, grad_accum: 1, warmup: 0, min_lr_ratio: 1.0, seed: 0, adamw: AdamWConfig::default(), pad_id: 0 };
    let eval = train.clone();
    let mut tr = Trainer::new(&model, ads, train, opts).unwrap();
    let before = tr.evaluate(&eval).unwrap();
    let mut losses = Vec::new();
    while !tr.done() {
        losses.push(tr.train_step().unwrap().loss);
    }
    let after = tr.evaluate(&eval).unwrap();
    eprintln!("step losses {losses:?}");
    assert_eq!(after.iter().map(|e| e.adapter.as_str()).collect::<Vec<_>>(), ["pirate", "formal", "shout"]);
    for (b, a) in before.iter().zip(&after) {
        eprintln!("{}: {:.3} -> {:.3}", b.adapter, b.loss, a.loss);
        assert!(a.loss < b.loss - 0.05, "{}: loss {:.3} -> {:.3} did not decrease", b.adapter, b.loss, a.loss);
    }
    assert!(losses[4] < losses[0], "step loss did not decrease: {losses:?}");
}
