//! Reading the GGUF header (metadata and tensor directory) from a file, with
//! errors that name the file and the problem.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;

use crate::error::{Error, Result};

/// Parses the GGUF header of `path` (tensor data is not read).
pub fn read_content(path: &Path) -> Result<Content> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    Content::read(&mut reader).map_err(|e| Error::InvalidGguf {
        path: path.to_path_buf(),
        message: describe(&e),
    })
}

/// The message of a candle error without the backtrace candle appends when
/// `RUST_BACKTRACE` is set; a short read ("failed to fill whole buffer") is
/// called what it is.
fn describe(e: &candle_core::Error) -> String {
    let mut e = e;
    while let candle_core::Error::WithBacktrace { inner, .. } = e {
        e = inner;
    }
    let msg = e.to_string();
    if msg.contains("failed to fill whole buffer") {
        format!("file is truncated ({msg})")
    } else {
        msg
    }
}
