//! Bearer tokens as both servers check them: token files, and comparison in constant time.

use std::path::Path;

use anyhow::{Context, bail};

/// The tokens in a file: one per line; blank lines and `#` comments are skipped. A file
/// with no token is an error (it would lock everyone out, or be a mistake).
pub fn read_token_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        bail!(
            "the token file {} holds no token (one per line)",
            path.display()
        );
    }
    Ok(tokens)
}

/// Whether `token` is one of `accepted`. Every accepted token is compared, each in time
/// that depends on the lengths only, so timing tells neither which token matched nor how
/// much of one.
pub fn token_matches(token: Option<&str>, accepted: &[String]) -> bool {
    let Some(t) = token else {
        return false;
    };
    accepted
        .iter()
        .fold(false, |found, k| found | ct_eq(t.as_bytes(), k.as_bytes()))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly() {
        let ok = vec!["s3cret".to_string(), "other".to_string()];
        assert!(token_matches(Some("s3cret"), &ok));
        assert!(token_matches(Some("other"), &ok));
        for bad in ["s3cre", "s3cret ", "S3cret", ""] {
            assert!(!token_matches(Some(bad), &ok), "{bad}");
        }
        assert!(!token_matches(None, &ok));
        assert!(!token_matches(Some("x"), &[]));
    }

    #[test]
    fn token_files_skip_comments_and_refuse_empty_ones() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t");
        std::fs::write(&f, "# tokens\n\n  abc \nxyz\n").unwrap();
        assert_eq!(read_token_file(&f).unwrap(), vec!["abc", "xyz"]);
        std::fs::write(&f, "# none\n").unwrap();
        let e = read_token_file(&f).unwrap_err();
        assert!(format!("{e}").contains("holds no token"), "{e}");
    }
}
