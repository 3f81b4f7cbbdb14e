//! Data: the three record forms and their loss masks, clear `file:line` errors, fitting
//! (truncation, packing), the per-adapter eval split, and the seeded resumable order that mixes
//! adapters; and the per-adapter configuration.

mod common;

use common::ToyEncoder;
use flora_adapters::AdapterKind;
use flora_model::Proj;
use flora_train::config::{self, ConfigFile, PartialSpec};
use flora_train::data::{self, Loader, LoaderPos};

fn parse(text: &str) -> Result<data::Dataset, String> {
    data::parse_jsonl(text, "train.jsonl", &ToyEncoder).map_err(|e| e.to_string())
}

fn toy(s: &str) -> Vec<u32> {
    s.bytes().map(|b| 3 + (b as u32) % 94).collect()
}

#[test]
fn record_forms_and_loss_masks() {
    let ds = parse(concat!(
        "{\"adapter\": \"a\", \"text\": \"hi\"}\n",
        "\n",
        "{\"adapter\": \"b\", \"prompt\": \"Q:\", \"completion\": \"ok\"}\n",
        "{\"adapter\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"yz\"}, {\"role\": \"user\", \"content\": \"w\"}, {\"role\": \"assistant\", \"content\": \"v\"}]}\n",
    ))
    .unwrap();
    assert_eq!(ds.names, vec!["a", "b"]);
    let [t, p, c] = &ds.examples[..] else { panic!("three examples") };
    assert_eq!((t.adapter, t.line, p.adapter, p.line, c.adapter, c.line), (0, 1, 1, 3, 0, 4));
    // text: BOS + "hi" + EOS, everything after BOS learned.
    assert_eq!(t.tokens, [vec![1], toy("hi"), vec![2]].concat());
    assert_eq!(t.targets, vec![false, true, true, true]);
    // prompt + completion: only the completion and EOS.
    assert_eq!(p.tokens, [vec![1], toy("Q:"), toy("ok"), vec![2]].concat());
    assert_eq!(p.targets, vec![false, false, false, true, true, true]);
    // chat: only assistant replies (with their end marker) are learned; headers are context.
    let learned: Vec<u32> = c.tokens.iter().zip(&c.targets).filter(|(_, &l)| l).map(|(&t, _)| t).collect();
    assert_eq!(learned, toy("yz|v|"));
    assert_eq!(c.tokens, [vec![1], toy("<user>x|<assistant>yz|<user>w|<assistant>v|")].concat());
}

#[test]
fn malformed_lines_name_file_and_line() {
    let cases = [
        ("{\"adapter\": \"a\", \"text\": \"ok\"}\n{not json\n", "train.jsonl:2: not valid JSON"),
        ("[1, 2]\n", "train.jsonl:1: expected a JSON object"),
        ("{\"text\": \"x\"}\n", "train.jsonl:1: missing `adapter`"),
        ("\n\n{\"adapter\": \"a\"}\n", "train.jsonl:3: expected exactly one of `text`, `prompt` + `completion`, or `messages`; found none"),
        ("{\"adapter\": \"a\", \"text\": \"x\", \"prompt\": \"y\", \"completion\": \"z\"}\n", "found several"),
        ("{\"adapter\": \"a\", \"prompt\": \"y\"}\n", "train.jsonl:1: `prompt` and `completion` go together"),
        ("{\"adapter\": \"a\", \"text\": 3}\n", "train.jsonl:1: `text` must be a string, found a number"),
        ("{\"adapter\": \"../etc\", \"text\": \"x\"}\n", "train.jsonl:1: adapter name \"../etc\""),
        ("{\"adapter\": \"a\", \"text\": \"\"}\n", "`text` is empty"),
        ("{\"adapter\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n", "train.jsonl:1: `messages` has no assistant turn"),
        ("{\"adapter\": \"a\", \"messages\": [{\"role\": \"user\"}]}\n", "train.jsonl:1: messages[0]: missing `content`"),
        ("{\"adapter\": \"a\", \"messages\": \"hi\"}\n", "`messages` must be an array"),
        ("\n  \n", "train.jsonl:0: no records"),
    ];
    for (text, want) in cases {
        let err = parse(text).unwrap_err();
        assert!(err.contains(want), "for {text:?}: got {err:?}, want it to contain {want:?}");
    }
}

#[test]
fn fitting_truncates_or_packs() {
    let ds = parse(concat!(
        "{\"adapter\": \"a\", \"text\": \"abcdefghij\"}\n",
        "{\"adapter\": \"a\", \"prompt\": \"0123456789\", \"completion\": \"x\"}\n",
        "{\"adapter\": \"b\", \"text\": \"xy\"}\n",
    ))
    .unwrap();
    let (fitted, rep) = data::fit(ds.examples.clone(), 6, false);
    assert_eq!(rep, data::FitReport { n_truncated: 2, n_dropped: 1 }, "the prompt fills all 6 tokens: dropped");
    assert_eq!(fitted.len(), 2);
    assert!(fitted.iter().all(|e| e.tokens.len() <= 6 && e.tokens.len() == e.targets.len() && !e.targets[0]));
    let (packed, _) = data::fit(ds.examples.clone(), 6, true);
    // Adapter a's stream, cut every 6 tokens: targets survive except at chunk starts (nothing
    // precedes them); chunks without targets are dropped.
    let stream: Vec<bool> = ds.examples.iter().filter(|e| e.adapter == 0).flat_map(|e| e.targets.clone()).collect();
    let want = stream.iter().enumerate().filter(|&(i, &t)| t && i % 6 != 0).count();
    let packed_a: Vec<_> = packed.iter().filter(|e| e.adapter == 0).collect();
    assert_eq!(packed_a.iter().map(|e| e.n_targets()).sum::<usize>(), want);
    assert_eq!(packed_a.len(), 3, "25 tokens -> 5 chunks, 2 of them without targets");
    assert!(packed.iter().all(|e| e.tokens.len() <= 6 && !e.targets[0] && e.n_targets() > 0));
}

#[test]
fn eval_split_is_per_adapter_and_seeded() {
    let text: String = (0..30).map(|i| format!("{{\"adapter\": \"{}\", \"text\": \"t{i}\"}}\n", ["a", "b", "c"][i % 3])).collect::<String>() + "{\"adapter\": \"solo\", \"text\": \"x\"}\n";
    let ds = parse(&text).unwrap();
    let (train, eval) = data::split_eval(ds.examples.clone(), 0.2, 1);
    for a in 0..3 {
        assert_eq!(eval.iter().filter(|e| e.adapter == a).count(), 2, "adapter {a}: 20% of 10");
    }
    assert!(train.iter().any(|e| e.adapter == 3) && !eval.iter().any(|e| e.adapter == 3), "a single example stays in training");
    assert_eq!(data::split_eval(ds.examples.clone(), 0.2, 1).1, eval, "same seed, same split");
    assert_ne!(data::split_eval(ds.examples, 0.2, 2).1, eval, "another seed, another split");
}

#[test]
fn loader_order_is_seeded_resumable_and_mixes_adapters() {
    let mut l = Loader::new(10, 4);
    let batches: Vec<Vec<usize>> = (0..7).map(|_| l.next_batch(3)).collect();
    // Each epoch visits every example once.
    let first: Vec<usize> = batches.iter().flatten().take(10).copied().collect();
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_ne!(first, (0..10).collect::<Vec<_>>(), "shuffled");
    // Resuming from a saved position gives the same continuation.
    let mut a = Loader::new(10, 4);
    for _ in 0..4 {
        a.next_batch(3);
    }
    let pos = a.pos();
    assert_eq!(pos, LoaderPos { epoch: 1, cursor: 2 });
    let mut b = Loader::at(10, 4, pos);
    assert_eq!(a.next_batch(5), b.next_batch(5));
    // Adapter i % 3: most batches of 6 mix adapters.
    let mut l = Loader::new(30, 1);
    let mixed = (0..5).filter(|_| l.next_batch(6).iter().map(|i| i % 3).collect::<std::collections::BTreeSet<_>>().len() > 1).count();
    assert!(mixed >= 4, "batches should mix adapters");
}

#[test]
fn per_adapter_config_precedence_and_paper_defaults() {
    let file: ConfigFile = toml::from_str(
        r#"
        [defaults]
        rank = 4
        lr = 1e-3
        [adapters.sql]
        kind = "lora"
        rank = 8
        alpha = 16
        targets = ["q", "v_proj", "self_attn.k_proj"]
        [adapters.tone]
        kind = "ia3"
        targets = ["k_proj", "v_proj", "down_proj"]
        lr = 2e-3
        [adapters.ghost]
        kind = "flora"
        "#,
    )
    .unwrap();
    let names: Vec<String> = ["sql", "tone", "plain"].iter().map(|s| s.to_string()).collect();
    let cli = PartialSpec { kind: Some("flora".into()), ..Default::default() };
    let (specs, warnings) = config::resolve(&names, Some(&file), &cli).unwrap();
    assert_eq!((specs[0].kind, specs[0].rank, specs[0].alpha, specs[0].lr), (AdapterKind::Lora, 8, Some(16.0), 1e-3));
    assert_eq!(specs[0].targets, vec![Proj::Q, Proj::K, Proj::V]);
    assert_eq!((specs[1].kind, specs[1].rank, specs[1].lr), (AdapterKind::Ia3, 1, 2e-3));
    assert_eq!(specs[1].feedforward, vec![Proj::Down], "PEFT's llama convention: down_proj scales its input");
    // CLI kind, [defaults] rank and lr, paper's targets.
    assert_eq!((specs[2].kind, specs[2].rank, specs[2].lr), (AdapterKind::Flora, 4, 1e-3));
    assert_eq!(specs[2].targets, vec![Proj::Q, Proj::K]);
    assert!(warnings.iter().any(|w| w.contains("ghost")));
    // Paper defaults when nothing is set.
    let (d, _) = config::resolve(&["x".to_string()], None, &PartialSpec::default()).unwrap();
    assert_eq!((d[0].kind, d[0].rank, d[0].lr, d[0].targets.clone()), (AdapterKind::Flora, 1, 8e-3, vec![Proj::Q, Proj::K]));
    for (kind, lr) in [("lora", 1e-4), ("ia3", 5e-3)] {
        let (d, _) = config::resolve(&["x".to_string()], None, &PartialSpec { kind: Some(kind.into()), ..Default::default() }).unwrap();
        assert_eq!(d[0].lr, lr);
    }
    // Errors.
    for (spec, want) in [
        (PartialSpec { kind: Some("dora".into()), ..Default::default() }, "unknown adapter kind"),
        (PartialSpec { rank: Some(0), ..Default::default() }, "rank 0"),
        (PartialSpec { targets: Some(vec!["qq".into()]), ..Default::default() }, "unknown target module"),
        (PartialSpec { lr: Some(-1.0), ..Default::default() }, "lr -1"),
    ] {
        let err = config::resolve(&["x".to_string()], None, &spec).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    assert!(toml::from_str::<ConfigFile>("[adapters.x]\nrnak = 2\n").is_err(), "unknown keys are errors");
}
