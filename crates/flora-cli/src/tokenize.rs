//! `flora tokenize`: the token ids of a text, as a JSON array (a debugging aid).

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// Text to tokenize (special tokens such as <|im_start|> are recognized).
    pub text: String,
    #[arg(long, help = crate::load::MODEL_HELP)]
    pub model: Option<PathBuf>,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let tok = crate::load::tokenizer(args.model.as_deref())?;
    let ids = tok.encode(&args.text)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
