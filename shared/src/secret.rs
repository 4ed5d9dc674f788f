//! Secrets read from a file or standard input (`--token-file`, `--enroll-token-file`,
//! `--webhook-secret-file`), so that they stay out of shell history and process lists. The rule
//! for what such a file holds lives here; each binary opens the file (or stdin) itself.

use std::io::Read;

/// The path that means standard input.
pub const STDIN: &str = "-";

/// A secret file is read up to this size; a larger one is refused, not truncated.
pub const MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read it: {0}")]
    Read(#[from] std::io::Error),
    #[error("it is empty")]
    Empty,
    #[error("it holds more than one line; a secret is one line")]
    MultiLine,
    #[error("it is larger than {MAX_BYTES} bytes")]
    TooLarge,
    #[error("it is not UTF-8 text")]
    NotText,
}

/// The secret in a file's text: its one line, without the surrounding whitespace (the newline
/// that `echo` or an editor leaves).
pub fn from_text(text: &str) -> Result<String, SecretError> {
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretError::Empty);
    }
    if secret.contains(['\n', '\r']) {
        return Err(SecretError::MultiLine);
    }
    Ok(secret.to_owned())
}

/// Reads a secret from `source` (a file, or stdin), at most [`MAX_BYTES`].
pub fn read(source: impl Read) -> Result<String, SecretError> {
    let mut bytes = Vec::new();
    source.take(MAX_BYTES as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > MAX_BYTES {
        return Err(SecretError::TooLarge);
    }
    from_text(std::str::from_utf8(&bytes).map_err(|_| SecretError::NotText)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_holds_one_line_and_its_newline_is_dropped() {
        assert_eq!(from_text("mst_abc\n").unwrap(), "mst_abc");
        assert_eq!(from_text("  s3cret value \r\n").unwrap(), "s3cret value");
        assert!(matches!(from_text("\n\n"), Err(SecretError::Empty)));
        assert!(matches!(from_text("one\ntwo\n"), Err(SecretError::MultiLine)));
    }

    #[test]
    fn reading_refuses_what_is_too_large_or_not_text() {
        assert_eq!(read(&b"mse_x\n"[..]).unwrap(), "mse_x");
        assert!(matches!(read(&vec![b'a'; MAX_BYTES + 1][..]), Err(SecretError::TooLarge)));
        assert!(matches!(read(&[0xff, 0xfe][..]), Err(SecretError::NotText)));
    }
}
